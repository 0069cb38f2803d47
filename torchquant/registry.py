"""Registries of quantizers and range observers, by name.

Recipes and the command line refer to methods by string; a researcher's own
class joins with a decorator::

    @tq.register_quantizer("my-sign")
    class MySign(tq.Quantizer):
        ...

    q = tq.make_quantizer("my-sign")
    tq.list_quantizers()          # [..., "my-sign", ...]

Names are case-insensitive; an unknown name raises ``KeyError`` listing the
valid ones.

Every entry can be built without data: from its default arguments, or from
the :class:`Example` s given when it was registered. :meth:`Registry.examples`
lists them, and the registry contract tests build each one and run it through
the same checks (QWrapper, QOp, torch.fx, torch.compile, ``state_dict``,
backward, idempotence, grid and ONNX export), so a new entry is tested without a
test of its own::

    @tq.register_quantizer("my-step", examples=[tq.registry.Example("w4", lambda: MyStep(4), role="weight")])
    class MyStep(tq.Quantizer):
        def __init__(self, n_bits):
            ...
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

__all__ = [
    "OBSERVERS",
    "QUANTIZERS",
    "Example",
    "Registry",
    "list_observers",
    "list_quantizers",
    "make_observer",
    "make_quantizer",
    "register_observer",
    "register_quantizer",
]

T = TypeVar("T", bound=type)

_ROLES = ("weight", "act", "any")


@dataclass(frozen=True)
class Example:
    """A working instance of a registry entry, built without data, and what it promises.

    Attributes:
        name: a short id for test reports, e.g. ``"w4-per-channel"``.
        build: zero-argument callable returning a fresh instance.
        role: what the instance quantizes: ``"weight"``, ``"act"`` (activations) or ``"any"``.
        weight_shape: the only weight shape the instance quantizes (it was fitted to
            one tensor), or ``None`` for any shape.
        idempotent: once its state is set, quantizing an output again returns it
            unchanged (``False`` where the output is renormalised from the input, as in
            DoReFa's weights, or where rounding is learned per element).
        ste: the input receives a gradient (the incoming one, possibly clipped or
            rescaled); ``False`` where only the quantizer's own parameters learn.
        on_grid: the outputs lie on :meth:`~torchquant.quantizers.Quantizer.grid`
            when it is not ``None`` (``False`` for a relaxation such as soft rounding).
    """

    name: str
    build: Callable[[], nn.Module]
    role: str = "any"
    weight_shape: tuple[int, ...] | None = None
    idempotent: bool = True
    ste: bool = True
    on_grid: bool = True

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise ValueError(f"Example {self.name!r}: role must be one of {_ROLES}, got {self.role!r}")


class Registry:
    """A name -> class (or factory function) table filled by a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., nn.Module]] = {}
        self._examples: dict[str, tuple[Example, ...]] = {}

    def register(self, name: str, *, overwrite: bool = False, examples: Sequence[Example] = ()) -> Callable[[T], T]:
        """Decorator: add a class or factory under ``name``, with ``examples`` that build it without data."""
        key = name.lower()
        examples = tuple(examples)
        for e in examples:
            if not isinstance(e, Example):
                raise TypeError(f"{self.kind} {name!r}: examples must be registry.Example objects, got {e!r}")

        def deco(obj: T) -> T:
            if key in self._entries and self._entries[key] is not obj and not overwrite:
                raise ValueError(f"a {self.kind} named {name!r} is already registered ({self._entries[key]!r})")
            self._entries[key] = obj
            self._examples[key] = examples
            return obj

        return deco

    def get(self, name: str) -> Callable[..., nn.Module]:
        try:
            return self._entries[name.lower()]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}") from None

    def make(self, name: str, *args: Any, **kwargs: Any) -> nn.Module:
        obj = self.get(name)(*args, **kwargs)
        # The name and arguments describe the instance (torchquant.spec.describe), also when the
        # entry is a factory function rather than the class.
        object.__setattr__(obj, "_tq_made", (name.lower(), args, dict(kwargs)))
        return obj

    def examples(self, name: str) -> list[Example]:
        """The :class:`Example` s of entry ``name``: those it was registered with, else its default arguments.

        Raises:
            TypeError: the entry needs arguments and was registered without examples.
        """
        entry = self.get(name)
        found = list(self._examples.get(name.lower(), ()))
        if not found and _callable_without_arguments(entry):
            found = [Example("default", entry)]
        if not found:
            raise TypeError(
                f"{self.kind} {name!r} ({getattr(entry, '__qualname__', entry)!r}) cannot be built without "
                "arguments: give its parameters defaults, or register it with "
                "examples=[torchquant.registry.Example(...)]"
            )
        return found

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries


def _callable_without_arguments(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    required = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )
    return all(p.default is not inspect.Parameter.empty for p in params if p.kind in required)


QUANTIZERS = Registry("quantizer")
OBSERVERS = Registry("range observer")


def register_quantizer(name: str, *, overwrite: bool = False, examples: Sequence[Example] = ()) -> Callable[[T], T]:
    """Class decorator: make a quantizer available as ``make_quantizer(name, ...)``.

    ``examples`` build working instances without data (see :class:`Example`); they are
    needed when the constructor has arguments without defaults.
    """
    return QUANTIZERS.register(name, overwrite=overwrite, examples=examples)


def register_observer(name: str, *, overwrite: bool = False, examples: Sequence[Example] = ()) -> Callable[[T], T]:
    """Class decorator: make a range observer available as ``make_observer(name, ...)``.

    ``examples`` as in :func:`register_quantizer`.
    """
    return OBSERVERS.register(name, overwrite=overwrite, examples=examples)


def make_quantizer(name: str, *args: Any, **kwargs: Any) -> nn.Module:
    """Build a registered quantizer: ``make_quantizer("affine", n_bits=8, range_observer=...)``."""
    return QUANTIZERS.make(name, *args, **kwargs)


def make_observer(name: str, *args: Any, **kwargs: Any) -> nn.Module:
    """Build a registered range observer: ``make_observer("ema", momentum=0.9, axis=0)``."""
    return OBSERVERS.make(name, *args, **kwargs)


def list_quantizers() -> list[str]:
    return QUANTIZERS.names()


def list_observers() -> list[str]:
    return OBSERVERS.names()
