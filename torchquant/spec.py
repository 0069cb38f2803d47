"""Quantizers described by data: registry names and constructor arguments.

One description serves recipe files, the Hugging Face ``TorchQuantConfig`` and
self-describing checkpoints (:func:`torchquant.save`)::

    {"quantizer": "affine", "observer": "batch_minmax",
     "args": {"n_bits": 8, "symmetric": True}, "observer_args": {"axis": 0}}

:class:`QuantizerSpec` builds a quantizer from such a description, and
:func:`describe` gives the description of a quantizer that exists: every
quantizer and range observer records the arguments it was constructed with, so a
quantizer built in Python (``tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))``) is
described as well as one built from a spec, provided its class is registered
(:func:`~torchquant.register_quantizer`) and its arguments are plain values
(numbers, strings, booleans, ``None``, lists and dicts of them, or a registered
range observer as ``range_observer``).

A quantizer whose constructor takes tensors (AdaRound's grid and weight) describes
itself instead, by overriding ``spec_args()`` and the classmethod
``from_spec_args(**args)``; its state (scales, learned values) comes from the
state dict, not from the description.

Example:
    >>> import torchquant as tq
    >>> q = tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=True)
    >>> spec = tq.spec.describe(q)
    >>> spec.to_dict()  # doctest: +NORMALIZE_WHITESPACE
    {'quantizer': 'affine', 'observer': 'batch_minmax', 'args': {'n_bits': 4, 'symmetric': True},
     'observer_args': {'axis': 0}}
    >>> type(spec.build()).__name__
    'AffineQuantizer'
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .registry import OBSERVERS, QUANTIZERS, Registry

__all__ = [
    "CONFIG_KEY",
    "QuantizerSpec",
    "RecordsInit",
    "SpecError",
    "decode_entry",
    "describe",
    "encode_entry",
    "init_args",
    "plain",
    "registered_class_name",
]

_KEYS = ("quantizer", "observer", "args", "observer_args")


class SpecError(ValueError):
    """A quantizer or observer cannot be described by registry name and plain arguments (or rebuilt from one)."""


class RecordsInit:
    """Mixin that records the constructor arguments of every instance (read by :func:`describe`).

    ``__new__`` stores ``(args, kwargs)`` before ``__init__`` runs, so subclasses need no
    cooperation; copies and pickles keep the record.
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        self = super().__new__(cls)
        object.__setattr__(self, "_tq_init", (args, dict(kwargs)))
        return self


@dataclass(frozen=True)
class QuantizerSpec:
    """A quantizer as registry names and keyword arguments.

    Attributes:
        quantizer: name in the quantizer registry (``tq.list_quantizers()``).
        observer: name in the observer registry, or ``None``; when given, the observer
            is built with ``observer_args`` and passed as ``range_observer=``.
        args: keyword arguments of the quantizer (JSON values).
        observer_args: keyword arguments of the observer, e.g. ``{"axis": 0}``.

    Example:
        >>> spec = QuantizerSpec("affine", "ema_minmax", {"n_bits": 8})
        >>> q = spec.build()
        >>> QuantizerSpec.from_dict(spec.to_dict()) == spec
        True
    """

    quantizer: str
    observer: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    observer_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.quantizer, str):
            raise SpecError(f"QuantizerSpec: 'quantizer' must be a registry name, got {self.quantizer!r}")
        if self.observer is not None and not isinstance(self.observer, str):
            raise SpecError(f"QuantizerSpec: 'observer' must be a registry name or None, got {self.observer!r}")
        for key in ("args", "observer_args"):
            value = getattr(self, key)
            if not isinstance(value, Mapping):
                raise SpecError(f"QuantizerSpec: {key!r} must be a table of keyword arguments, got {value!r}")
            object.__setattr__(self, key, dict(value))
        if self.observer is None and self.observer_args:
            raise SpecError(
                f"QuantizerSpec: observer_args {self.observer_args!r} without an 'observer' would be ignored; "
                "name the observer (e.g. 'minmax') or drop them"
            )

    # ------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        """The JSON form (keys with empty values left out)."""
        out: dict[str, Any] = {"quantizer": self.quantizer}
        if self.observer is not None:
            out["observer"] = self.observer
        if self.args:
            out["args"] = plain(self.args, "args")
        if self.observer_args:
            out["observer_args"] = plain(self.observer_args, "observer_args")
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "quantizer spec") -> QuantizerSpec:
        """Read the JSON form; ``where`` names the source in errors.

        Raises:
            SpecError: not a table, a missing ``quantizer`` or unknown keys.
        """
        if isinstance(raw, QuantizerSpec):
            return raw
        if not isinstance(raw, Mapping):
            raise SpecError(f"{where}: expected a table with at least 'quantizer', got {raw!r}")
        unknown = set(raw) - set(_KEYS)
        if unknown:
            raise SpecError(f"{where}: unknown keys {sorted(unknown)}; valid: {list(_KEYS)}")
        if "quantizer" not in raw:
            raise SpecError(f"{where}: missing 'quantizer' (a name from tq.list_quantizers())")
        for key in ("args", "observer_args"):
            value = raw.get(key)
            if value is not None and not isinstance(value, Mapping):
                raise SpecError(f"{where}: {key!r} must be a table of keyword arguments, got {value!r}")
        try:
            return cls(
                raw["quantizer"],
                raw.get("observer"),
                dict(raw.get("args") or {}),
                dict(raw.get("observer_args") or {}),
            )
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None

    def replace(self, **changes: Any) -> QuantizerSpec:
        """A copy with fields changed; ``args``/``observer_args`` given here are merged into the current ones."""
        fields = {k: getattr(self, k) for k in _KEYS}
        for key in ("args", "observer_args"):
            if key in changes:
                changes[key] = {**fields[key], **changes[key]}
        if "observer" in changes and changes["observer"] is None and "observer_args" not in changes:
            changes["observer_args"] = {}  # no observer, no observer arguments
        fields.update(changes)
        return QuantizerSpec(**fields)

    # ------------------------------------------------------------ building
    def check(self) -> None:
        """Check that the names are registered (``KeyError`` listing the valid names otherwise)."""
        QUANTIZERS.get(self.quantizer)
        if self.observer is not None:
            OBSERVERS.get(self.observer)

    def build(self) -> nn.Module:
        """A fresh quantizer (with a fresh observer).

        Raises:
            KeyError: an unknown registry name.
            SpecError: the quantizer or observer rejected the arguments.
        """
        kwargs = dict(self.args)
        if self.observer is not None:
            kwargs["range_observer"] = _make(OBSERVERS, self.observer, self.observer_args)
        return _make(QUANTIZERS, self.quantizer, kwargs)


def _make(registry: Registry, name: str, kwargs: dict[str, Any]) -> nn.Module:
    entry = registry.get(name)
    rebuild = getattr(entry, "from_spec_args", None)
    try:
        if rebuild is None:
            return registry.make(name, **kwargs)
        obj = rebuild(**kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{registry.kind} {name!r} rejected the arguments {sorted(kwargs)}: {e}") from e
    object.__setattr__(obj, "_tq_made", (name.lower(), (), dict(kwargs)))
    return obj


# --------------------------------------------------------------------- describe
def _registered_name(registry: Registry, obj: object) -> str | None:
    made = getattr(obj, "_tq_made", None)
    if made is not None and made[0] in registry:
        return made[0]
    for name in registry.names():
        if registry.get(name) is type(obj):
            return name
    return None


def _bound_args(
    obj: nn.Module, entry: Any, args: tuple, kwargs: dict, who: str, defaults: bool = False
) -> dict[str, Any]:
    try:
        bound = inspect.signature(entry).bind(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{who}: its constructor arguments do not match {entry!r}: {e}") from e
    if defaults:
        bound.apply_defaults()
    out = dict(bound.arguments)
    for name, p in inspect.signature(entry).parameters.items():
        if p.kind == p.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
        elif p.kind == p.VAR_POSITIONAL and name in out and out.pop(name):  # an empty *args is dropped
            raise SpecError(f"{who}: {entry!r} takes *{name}; describe it with spec_args()")
    return out


def _arguments(registry: Registry, obj: nn.Module, who: str) -> tuple[str, dict[str, Any]]:
    """``(registry name, keyword arguments)`` that rebuild ``obj``'s structure."""
    name = _registered_name(registry, obj)
    if name is None:
        raise SpecError(
            f"{who}: {type(obj).__qualname__} is not in the {registry.kind} registry; register it "
            f'(@torchquant.register_{"quantizer" if registry is QUANTIZERS else "observer"}("name")) '
            "so checkpoints can name it"
        )
    own = getattr(type(obj), "spec_args", None)
    if own is not None:
        return name, dict(obj.spec_args())
    entry = registry.get(name)
    made = getattr(obj, "_tq_made", None)
    if made is not None and made[0] == name:
        record = made[1:]
    else:
        record = getattr(obj, "_tq_init", None)
        if record is None:
            raise SpecError(f"{who}: {type(obj).__qualname__} does not record its constructor arguments")
    # Every argument, defaults included, takes the value the object holds now (a plain setting left at its
    # default and changed afterwards counts too; a module the constructor made itself does not); those equal
    # to their default are left out, so equal configurations are described alike.
    passed = _bound_args(obj, entry, *record, who)
    current = _current(obj, _bound_args(obj, entry, *record, who, defaults=True))
    current = {k: v for k, v in current.items() if k in passed or not isinstance(v, nn.Module)}
    return name, _without_defaults(entry, current)


def _without_defaults(entry: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(entry).parameters
    out = {}
    for key, value in kwargs.items():
        p = params.get(key)
        default = inspect.Parameter.empty if p is None else p.default
        if isinstance(value, nn.Module) or type(value) is not type(default) or value != default:
            out[key] = value
    return out


def canonical(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A spec's JSON form with the arguments equal to their registry entry's defaults left out.

    Registry names are replaced by the first (sorted) name of their entry, so aliases
    (``moving_avg_minmax``, ``ema_minmax``) compare equal, and so do descriptions written
    before ``describe`` left defaults out (``symmetric=False`` spelt out). Names that are
    not registered are left as they are.
    """
    out = dict(spec)
    for key, registry, args in (("quantizer", QUANTIZERS, "args"), ("observer", OBSERVERS, "observer_args")):
        name = out.get(key)
        if not (isinstance(name, str) and name in registry):
            continue
        entry = registry.get(name)
        out[key] = next(n for n in registry.names() if registry.get(n) is entry)  # one name for aliases
        if isinstance(out.get(args), Mapping) and getattr(entry, "from_spec_args", None) is None:  # own signature
            kept = _without_defaults(entry, dict(out[args]))
            if kept:
                out[args] = kept
            else:
                out.pop(args)
    return out


def _current(obj: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the values ``obj`` holds now, where it keeps an argument under the same name.

    Research code changes quantizers after construction (a mixed-precision search sets
    ``n_bits``; an observer is swapped): the description follows the object, not its
    history. Arguments kept in ``granularity`` (``axis``, ``group_size``) are read from it.
    """
    out = dict(kwargs)
    own = vars(obj)
    for key in out:
        if key == "range_observer" and isinstance(own.get("_modules", {}).get("range_observer"), nn.Module):
            out[key] = own["_modules"]["range_observer"]
        elif key in ("axis", "group_size") and hasattr(own.get("granularity"), key):
            out[key] = getattr(own["granularity"], key)
        elif key in own and (own[key] is None or isinstance(own[key], (bool, int, float, str))):
            out[key] = own[key]
        elif isinstance(getattr(type(obj), key, None), property):  # n_bits kept behind a checked property
            value = getattr(obj, key)
            if value is None or isinstance(value, (bool, int, float, str)):
                out[key] = value
    return out


def describe(quantizer: nn.Module, who: str | None = None) -> QuantizerSpec:
    """The :class:`QuantizerSpec` that rebuilds ``quantizer`` (its structure; state comes from a state dict).

    Args:
        quantizer: a quantizer whose class (or factory) is registered.
        who: how errors name it (default: its ``_tq_name``, e.g. ``"layer1.0.conv1.weight_quantizer"``).

    Raises:
        SpecError: the class is not registered, or an argument is not a plain value (the
            message names the argument and says what to do).
    """
    who = who or getattr(quantizer, "_tq_name", type(quantizer).__name__)
    name, kwargs = _arguments(QUANTIZERS, quantizer, who)
    observer = observer_args = None
    obs = kwargs.get("range_observer")
    if isinstance(obs, nn.Module):
        del kwargs["range_observer"]
        observer, observer_args = _arguments(OBSERVERS, obs, f"{who}.range_observer")
    for key, value in list(kwargs.items()):
        kwargs[key] = plain(value, f"{who}: argument {key!r}")
    observer_args = {k: plain(v, f"{who}.range_observer: argument {k!r}") for k, v in (observer_args or {}).items()}
    return QuantizerSpec(name, observer, kwargs, observer_args)


def plain(value: Any, where: str) -> Any:
    """``value`` as JSON data (tuples become lists), else :class:`SpecError`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: plain(v, where) for k, v in value.items()}
    raise SpecError(
        f"{where} is {type(value).__name__} {value!r}, which a checkpoint cannot describe; pass plain values "
        "(numbers, strings, lists), or give the class spec_args()/from_spec_args()"
    )


# ------------------------------------------------------------- checkpoint entries
CONFIG_KEY = "_extra_state"
"""State-dict key (after the module's prefix) of the configuration a quantizer or QModule saves: torch's
key for ``get_extra_state()``, which ``torch.distributed.checkpoint`` and FSDP know."""


def encode_entry(data: Mapping[str, Any]) -> Tensor:
    """``data`` as a state-dict entry: a 1-D ``uint8`` tensor holding its UTF-8 JSON.

    A tensor, so that every consumer of state dicts takes it (``torch.save``,
    safetensors, ``save_pretrained``, :func:`torchquant.save`).

    Example:
        >>> decode_entry(encode_entry({"qstate": "quant_eval"}))
        {'qstate': 'quant_eval'}
    """
    raw = json.dumps(data, sort_keys=True).encode()
    return torch.tensor(list(raw), dtype=torch.uint8)


def decode_entry(entry: Any) -> dict[str, Any]:
    """The table :func:`encode_entry` stored.

    Raises:
        ValueError: ``entry`` is not a 1-D ``uint8`` tensor of a JSON table.
    """
    if not isinstance(entry, Tensor) or entry.dtype != torch.uint8 or entry.dim() != 1:
        got = f"a {entry.dtype} tensor of shape {tuple(entry.shape)}" if isinstance(entry, Tensor) else repr(entry)
        raise ValueError(f"expected a 1-D uint8 tensor of JSON, got {got}")
    try:
        data = json.loads(bytes(entry.tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the entry is not UTF-8 JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON table, got {data!r}")
    return data


def registered_class_name(obj: object) -> str:
    """The quantizer registry's name of ``type(obj)`` (the class, not a factory), else the class's qualified name."""
    for name in QUANTIZERS.names():
        if QUANTIZERS.get(name) is type(obj):
            return name
    return type(obj).__qualname__


def init_args(obj: nn.Module, who: str | None = None) -> dict[str, Any]:
    """Every constructor argument of ``obj``'s class, defaults included, with the values ``obj`` holds now.

    Unlike :func:`describe`, the arguments are those of the class itself (not of the
    registered factory that built it) and arguments left at their defaults are listed,
    so that two quantizers configured alike give equal tables. Values are as
    :func:`describe` reads them (an attribute of the same name wins over the recorded
    argument; ``axis``/``group_size`` come from ``granularity``); they may be modules
    (``range_observer``) or other objects.

    Raises:
        SpecError: ``obj`` recorded no constructor arguments, or they do not fit its class.
    """
    who = who or getattr(obj, "_tq_name", type(obj).__name__)
    if getattr(type(obj), "spec_args", None) is not None:
        return dict(obj.spec_args())
    record = getattr(obj, "_tq_init", None)
    if record is None:
        raise SpecError(f"{who}: {type(obj).__qualname__} does not record its constructor arguments")
    return _current(obj, _bound_args(obj, type(obj), record[0], record[1], who, defaults=True))
