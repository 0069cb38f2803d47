"""Self-describing quantized checkpoints: :func:`save` and :func:`load` (safetensors).

A checkpoint holds the model's tensors and, in the safetensors header, a JSON
description: how the model was converted (the ``quantize_model`` call's options),
every quantizer as registry names and arguments (:mod:`torchquant.spec`), and
every QModule's mode. :func:`load` converts a float model the same way, loads the
state and restores the modes, without calibration data and without the Python
factories that built the original::

    q = tq.quantize_model(model, wf, af)
    ...                                     # calibrate, QAT, AdaRound
    tq.save(q, "model.safetensors")

    q2 = tq.load(build_float_model(), "model.safetensors")   # same outputs as q

Weights are stored packed as integers where that loses nothing the model uses:
a ``QWrapper`` whose mode quantizes its weight with frozen ranges (the
``QUANT_EVAL*`` modes) and whose weight quantizer has an affine grid, or levels
(:meth:`~torchquant.quantizers.Quantizer.levels`: NF4, APoT), of at most 256 values
stores the integer codes (one per byte; two per byte for 16 levels or fewer) instead
of the float weight; :func:`load` writes the dequantized weight
back, and the quantized weight (hence every output) is unchanged. The ranges of
such a symmetric weight quantizer are stored as one magnitude per range
(``max(|min|, |max|)``, all a symmetric grid depends on), so a 4-bit weight in
groups of 64 takes 4.5 bits. The expert banks of a :class:`~torchquant.QExperts` in those modes are packed the same
way, as the ``(E * out, in)`` rows their quantizers see, under the quantizer's name
(``<experts>.gate_up_quantizer.__tq_codes``: transformers rewrites the banks' own keys
when it saves). Such a
checkpoint is for inference: the float weights of packed layers are not kept
(pass ``pack=False`` to keep them, e.g. to continue training).

The tensors include the configuration entries every state dict carries
(``<prefix>_extra_state``: each quantizer's
:meth:`~torchquant.quantizers.Quantizer.grid_config` and each QModule's mode), so
the file loads with ``load_state_dict`` as well, checked and with the modes restored;
files written before those entries existed load as before.
"""

from __future__ import annotations

import importlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .convert import CONVERSIONS_ATTR, quantize_model
from .graph.concrete import examples_from_description
from .moe import QExperts, _bank
from .qmodules import QModule, QModuleState, QMultiheadAttention, QWrapper, iter_qmodules
from .quantizers import AffineGrid, AffineQuantizer, LevelGrid, Quantizer
from .range_observers import BatchMinMax, RunningMinMax
from .spec import QuantizerSpec, SpecError, canonical, describe

__all__ = [
    "FORMAT",
    "describe_model",
    "load",
    "load_quantized_state",
    "quantized_state_dict",
    "register_conversion",
    "replay_conversion",
    "save",
    "unwrap_undescribed",
]

FORMAT = "torchquant.checkpoint/1"
CODES_SUFFIX = ".__tq_codes"
AMAX_KEY = "__tq_amax"
_META_KEY = "torchquant"

Replay = Callable[[nn.Module, dict, Callable[[str, str], "nn.Module | None"]], nn.Module]
_REPLAYS: dict[str, Replay] = {}


def register_conversion(kind: str) -> Callable[[Replay], Replay]:
    """Decorator: how :func:`load` repeats a recorded conversion of kind ``kind``.

    The function receives the model, the record (as written by
    :func:`torchquant.convert.record_conversion`) and ``build(name, attr)``, which
    returns the quantizer the checkpoint describes for QModule ``name``'s attribute
    ``attr`` (or ``None``); it returns the converted model. A record may name the
    module that registers its kind under ``"module"``; :func:`load` imports it.
    """

    def deco(fn: Replay) -> Replay:
        _REPLAYS[kind] = fn
        return fn

    return deco


def _resolve(qualified: str, model: nn.Module | None = None, what: str = "entry") -> Any:
    """The object named ``"module:qualname"``; a module type the import cannot find (defined in the saving
    script's ``__main__`` or in a function) is looked up among the types of ``model``'s modules by name."""
    module, _, name = qualified.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj
    except ImportError as e:
        if e.name is not None and e.name != module and not module.startswith(e.name + "."):
            raise  # the module exists but needs a package that is missing: that is the error to see
        cause: Exception = e
    except AttributeError as e:  # defined in the saving script's __main__ or in a function
        cause = e
    found = {type(m) for m in (model.modules() if model is not None else ()) if type(m).__qualname__ == name}
    if len(found) == 1:
        return found.pop()
    raise ValueError(
        f"load: the checkpoint's conversion names {qualified!r} as a {what}, which cannot be imported here"
        + (f" and matches {len(found)} module types of the model" if found else "")
        + "; define or import it at module level before loading (a class defined in the saving script's "
        "__main__ is found only there)"
    ) from cause


@register_conversion("quantize_model")
def _replay_quantize_model(model: nn.Module, record: dict, build: Callable[[str, str], Any]) -> nn.Module:
    skip = [s if isinstance(s, str) else _resolve(s["type"], model, "skip type") for s in record.get("skip", [])]
    kwargs: dict[str, Any] = {"skip": skip, "method": record["method"], "fold_bn": record.get("fold_bn", False)}
    if record["method"] == "fx":
        kwargs["leaf_modules"] = [_resolve(t, model, "leaf module type") for t in record.get("leaf_modules", [])]
        kwargs["autowrap_functions"] = [
            _resolve(f, model, "autowrapped function") for f in record.get("autowrap_functions", [])
        ]
    for key, value in record.get("options", {}).items():
        kwargs[key] = value
    if "example_inputs" in kwargs:  # recorded as shapes and dtypes: the traced branches depend on nothing else
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        kwargs["example_inputs"] = examples_from_description(kwargs["example_inputs"], device)

    def weights(module: nn.Module, name: str) -> Any:
        # A QMultiheadAttention's weight factory calls are named "<name>.in_proj" / "<name>.out_proj",
        # a QExperts' "<name>.gate_up_proj" / "<name>.down_proj" (its quantizers: gate_up_quantizer, ...).
        owner, _, role = name.rpartition(".")
        attr = f"{role}_quantizer" if role in QMultiheadAttention.WEIGHT_ROLES else None
        if role in QExperts.ROLE_OF_BANK:
            attr = f"{QExperts.ROLE_OF_BANK[role]}_quantizer"
        if attr is not None:
            q = build(owner, attr)
            if q is not None:
                return q
        return build(name, "weight_quantizer")

    return quantize_model(model, weights, lambda module, name: build(name, "acts_quantizer"), **kwargs)


# ----------------------------------------------------------------------- describe
def describe_model(model: nn.Module) -> dict[str, Any]:
    """The JSON description a checkpoint carries: conversions, quantizer specs and modes by qualified name.

    Raises:
        torchquant.spec.SpecError: a quantizer cannot be described (its message names
            the quantizer and what to register or change).
    """
    modules = {}
    for name, m in iter_qmodules(model):
        quantizers = {attr: describe(q, who=f"{name}.{attr}").to_dict() for attr, q in m.quantizers().items()}
        modules[name] = {"type": type(m).__name__, "qstate": m.qstate.value, "quantizers": quantizers}
        factory = getattr(m, "_tq_factory_name", None)
        if factory is not None and factory != name:  # the name quantize_model's factories were called with
            modules[name]["factory_name"] = factory
    return {"format": FORMAT, "conversions": list(getattr(model, CONVERSIONS_ATTR, [])), "modules": modules}


# ------------------------------------------------------------------------ packing
def _pack_codes(q: Tensor, qmin: int, qmax: int) -> tuple[Tensor, int]:
    """Integer codes (any shape) -> ``(uint8 bytes, bits)``: 4 bits (two per byte) for <= 16 levels, else 8."""
    u = (q - qmin).to(torch.uint8).flatten()
    if qmax - qmin < 16:
        if u.numel() % 2:
            u = torch.cat([u, u.new_zeros(1)])
        return u[0::2] | (u[1::2] << 4), 4
    return u, 8


def _unpack_codes(packed: Tensor, bits: int, qmin: int, shape: list[int]) -> Tensor:
    n = 1
    for d in shape:
        n *= d
    u = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()[:n] if bits == 4 else packed[:n]
    return (u.to(torch.int64) + qmin).reshape(shape)


def _packable(m: QModule) -> bool:
    s = m.qstate
    return (
        isinstance(m, QWrapper)
        and m.weight_quantizer is not None
        and not m.fold_bn
        and not m.weight_is_computed
        and s.is_weight_quantized
        and not s.is_weight_observed
        and isinstance(getattr(m.layer, "weight", None), Tensor)
        and _has_state(m.weight_quantizer)
    )


def _has_state(q: Quantizer) -> bool:
    """Whether ``q`` has the ranges (or learned values) its grid needs: a wrapper the model never calls
    was never observed, and keeps its float weight in the file."""
    obs = getattr(q, "range_observer", None)
    if obs is not None and not obs.initialized:
        return False
    return getattr(q, "initialized", True) is not False


def _symmetric_minmax(q: nn.Module) -> bool:
    """A symmetric affine quantizer whose observer's state is its ``min_val``/``max_val`` (plus counters)."""
    obs = getattr(q, "range_observer", None)
    return (
        isinstance(q, AffineQuantizer)
        and q.symmetric
        and isinstance(obs, (BatchMinMax, RunningMinMax))
        and type(obs)._update in (BatchMinMax._update, RunningMinMax._update)
    )


def _grid_or_levels(q: Quantizer) -> AffineGrid | LevelGrid | None:
    grid = q.grid()
    return grid if grid is not None else q.levels()


def _pack_weight(m: QWrapper) -> tuple[Tensor, dict] | None:
    """The packed codes of ``m``'s weight and how to read them, or ``None`` when packing would change outputs."""
    return _pack_tensor(m.weight_quantizer, m.weight_view().detach())  # (out, in, ...): the grid's layout


def _packable_experts(m: QModule) -> bool:
    s = m.qstate
    return isinstance(m, QExperts) and s.is_weight_quantized and not s.is_weight_observed


def _pack_banks(m: QExperts) -> dict[str, tuple[Tensor, dict]]:
    """The packed codes of each quantized bank of ``m`` (its ``(E * out, in)`` rows, the layout its quantizer
    sees), by bank, where packing does not change outputs."""
    out = {}
    for bank, q, rows in m._weights():
        found = _pack_tensor(q, rows.detach())
        if found is not None:
            out[bank] = (found[0], {**found[1], "bank": bank, "experts": m.layer._parameters[bank].shape[0]})
    return out


def _pack_tensor(quantizer: Quantizer, w: Tensor) -> tuple[Tensor, dict] | None:
    """The packed codes of ``w`` on ``quantizer``'s grid and how to read them, or ``None``."""
    grid = _grid_or_levels(quantizer)
    if grid is None:
        return None
    qmin, qmax = (0, grid.n_levels - 1) if isinstance(grid, LevelGrid) else (grid.qmin, grid.qmax)
    if qmax - qmin >= 256:
        return None
    try:
        if torch.broadcast_shapes(grid.scale.shape, w.shape) != w.shape:
            return None
    except RuntimeError:
        return None
    with torch.no_grad():
        codes = grid.codes(w) if isinstance(grid, LevelGrid) else grid.to_int(w)
        restored = _dequantize(grid, codes).to(w.dtype)
        # Exact by construction for affine grids and levels; checked, so a quantizer whose grid() or
        # levels() does not describe its outputs keeps its float weight instead of changing the model.
        if not torch.equal(quantizer(restored), quantizer(w)):
            return None
    packed, bits = _pack_codes(codes.cpu(), qmin, qmax)
    info = {"bits": bits, "qmin": qmin, "shape": list(w.shape), "dtype": str(w.dtype)}
    if isinstance(grid, LevelGrid):
        info["levels"] = True  # codes of levels() rather than of grid()
    return packed, info


def _dequantize(grid: AffineGrid | LevelGrid, codes: Tensor) -> Tensor:
    return grid.dequantize(codes) if isinstance(grid, LevelGrid) else grid.from_int(codes)


def quantized_state_dict(model: nn.Module, *, pack: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, description)`` of ``model``: what :func:`save` writes.

    Tensors are detached, contiguous CPU copies, each stored once (tied parameters
    are recorded as aliases in the description). Packed weights appear as
    ``<key>.__tq_codes`` (uint8) instead of ``<key>``.

    Args:
        model: a model converted by :func:`torchquant.quantize_model` (or holding QModules).
        pack: store weights as integer codes where that loses nothing (see the module docstring).
    """
    desc = describe_model(model)
    state = model.state_dict()
    idents = {key: _ident(t) for key, t in state.items() if isinstance(t, Tensor)}
    counts: dict[tuple, int] = {}
    for ident in idents.values():
        counts[ident] = counts.get(ident, 0) + 1
    packed: dict[str, dict] = {}
    tensors: dict[str, Tensor] = {}
    magnitudes: list[str] = []
    if pack:
        users: dict[tuple, list[tuple[str, QWrapper, str]]] = {}
        for name, m in iter_qmodules(model):
            key = f"{name}.layer.weight" if name else "layer.weight"
            if _packable(m) and key in idents:
                users.setdefault(idents[key], []).append((name, m, key))
        for ident, group in users.items():
            # A weight tied to another tensor is packed only when every user is a packable layer with the
            # same grid (Llama's embedding and head quantized alike): one set of codes serves them all.
            if counts[ident] != len(group) or not _same_grids([m for _, m, _ in group]):
                continue
            found = _pack_weight(group[0][1])
            if found is None:
                continue
            first_key = group[0][2]
            tensors[first_key + CODES_SUFFIX] = found[0]
            for name, m, key in group:
                packed[key] = found[1] if key == first_key else {**found[1], "codes": first_key}
                if _symmetric_minmax(m.weight_quantizer):
                    # A symmetric grid depends on max(|min|, |max|) alone: one number per range instead of two.
                    prefix = f"{name}.weight_quantizer.range_observer." if name else "weight_quantizer.range_observer."
                    mn, mx = state[prefix + "min_val"], state[prefix + "max_val"]
                    tensors[prefix + AMAX_KEY] = torch.maximum(-mn.clamp(max=0), mx.clamp(min=0)).cpu().contiguous()
                    magnitudes.append(prefix)
        for name, m in iter_qmodules(model):
            if not _packable_experts(m):
                continue
            for bank, (codes, info) in _pack_banks(m).items():
                key = f"{name}.layer.{bank}" if name else f"layer.{bank}"
                if key in idents and counts[idents[key]] == 1:
                    # Under the quantizer's name, not the bank's: transformers converts the bank's key on
                    # save (Mixtral's gate_up_proj into per-expert w1/w3) and would split the codes too.
                    role = f"{QExperts.ROLE_OF_BANK[bank]}_quantizer"
                    where = f"{name}.{role}" if name else role
                    tensors[where + CODES_SUFFIX] = codes
                    packed[key] = {**info, "codes": where}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    skipped = {p + k for p in magnitudes for k in ("min_val", "max_val")}
    for key, t in state.items():
        if key in packed or key in skipped:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"save: state_dict entry {key!r} is a {type(t).__name__}, not a tensor")
        if t.numel() and idents[key] in first:
            aliases[key] = first[idents[key]]
            continue
        first[idents[key]] = key
        tensors[key] = t.detach().to("cpu", copy=True).contiguous()
    desc["packed"] = packed
    desc["aliases"] = aliases
    desc["magnitudes"] = magnitudes
    return tensors, desc


def _same_grids(wrappers: list[QWrapper]) -> bool:
    grids = [_grid_or_levels(w.weight_quantizer) for w in wrappers]
    if any(g is None for g in grids):
        return False
    g0 = grids[0]
    if isinstance(g0, LevelGrid):
        return all(
            isinstance(g, LevelGrid)
            and g.levels.shape == g0.levels.shape
            and torch.equal(g.levels, g0.levels)
            and g.scale.shape == g0.scale.shape
            and torch.equal(g.scale, g0.scale)
            for g in grids[1:]
        )
    return all(
        isinstance(g, AffineGrid)
        and (g.qmin, g.qmax) == (g0.qmin, g0.qmax)
        and g.scale.shape == g0.scale.shape
        and torch.equal(g.scale, g0.scale)
        and torch.equal(g.zero_point, g0.zero_point)
        for g in grids[1:]
    )


def _ident(t: Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def load_quantized_state(model: nn.Module, tensors: dict[str, Tensor], desc: dict[str, Any], *, strict: bool = True):
    """Load ``tensors`` (as from :func:`quantized_state_dict`) into ``model`` and restore the modes.

    ``model`` must already have the described structure (QModules at the described
    names with the described quantizers).

    Raises:
        ValueError: the structure differs from the description, or (``strict``) keys are
            missing or unexpected; the message lists them.
    """
    _check_structure(model, desc)
    state = {k: v for k, v in tensors.items() if not k.endswith((CODES_SUFFIX, AMAX_KEY))}
    for prefix in desc.get("magnitudes", []):
        amax = tensors[prefix + AMAX_KEY]
        state[prefix + "min_val"], state[prefix + "max_val"] = -amax, amax.clone()
    for key, first in desc.get("aliases", {}).items():
        state[key] = tensors[first]
    packed = desc.get("packed", {})
    # a file holds no per-module versions (state_dict()._metadata); modules that read theirs (MNASNet,
    # BatchNorm) get those of this model, which is what its own state_dict() would carry
    versions = getattr(model.state_dict(), "_metadata", None)
    state = OrderedDict(state)
    if versions is not None:
        state._metadata = versions  # type: ignore[attr-defined]
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in packed]
    if strict and (missing or result.unexpected_keys):
        raise ValueError(
            f"load: the checkpoint does not match the model: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {result.unexpected_keys[:10]}"
        )
    modules = dict(iter_qmodules(model))
    for key, info in packed.items():
        if "bank" in info:
            owner = modules[key.removesuffix(f"layer.{info['bank']}").removesuffix(".")]
            _unpack_bank(owner, tensors[info.get("codes", key) + CODES_SUFFIX], info)
            continue
        m = modules[key.removesuffix("layer.weight").removesuffix(".")]
        view = m.weight_view()
        with torch.no_grad():
            view.copy_(
                _unpacked(m.weight_quantizer, tensors[info.get("codes", key) + CODES_SUFFIX], info).to(view.dtype)
            )
    for name, info in desc["modules"].items():
        modules[name].qstate = QModuleState(info["qstate"])
    return model


def _unpacked(q: Quantizer, packed: Tensor, info: dict) -> Tensor:
    """The values ``q``'s grid (or levels) gives the packed codes described by ``info``, in their stored shape."""
    grid = q.levels() if info.get("levels") else q.grid()
    return _dequantize(grid, _unpack_codes(packed, info["bits"], info["qmin"], info["shape"]).to(grid.scale.device))


def _unpack_bank(m: QExperts, packed: Tensor, info: dict) -> None:
    """Write the bank ``info["bank"]`` of ``m`` from its packed codes (``(E * out, in)`` rows)."""
    rows = _unpacked(m.bank_quantizer(info["bank"]), packed, info)
    bank = m.layer._parameters[info["bank"]]
    with torch.no_grad():
        bank.copy_(_bank(rows, info["experts"], m.transposed).to(bank.dtype))


def _check_structure(model: nn.Module, desc: dict[str, Any]) -> None:
    have = {n: m for n, m in iter_qmodules(model)}
    want = desc["modules"]
    extra, absent = sorted(set(have) - set(want)), sorted(set(want) - set(have))
    if extra or absent:
        raise ValueError(
            f"load: the converted model's quantized modules differ from the checkpoint's: "
            f"not in the checkpoint {extra[:10]}, not in the model {absent[:10]}"
        )
    for name, info in want.items():
        got = {attr: describe(q, who=f"{name}.{attr}").to_dict() for attr, q in have[name].quantizers().items()}
        stored = {attr: canonical(d) if isinstance(d, dict) else d for attr, d in info["quantizers"].items()}
        if {a: canonical(d) for a, d in got.items()} != stored:
            raise ValueError(f"load: {name!r} has quantizers {got}, but the checkpoint describes {info['quantizers']}")


# ------------------------------------------------------------------ save / load
def save(model: nn.Module, path: str | os.PathLike, *, pack: bool = True) -> None:
    """Write ``model`` (converted, possibly calibrated/trained) to a self-describing safetensors file.

    Args:
        model: a model converted by :func:`torchquant.quantize_model` whose quantizers are
            registered classes built from plain arguments (any built-in quantizer and observer).
        path: destination file (``.safetensors``).
        pack: store weights as integer codes where outputs do not change (see module docstring).

    Raises:
        torchquant.spec.SpecError: a quantizer cannot be described (unregistered class or
            arguments that are not plain values); the message names it.
        ImportError: safetensors is not installed (``pip install torchquant[export]``).

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> import torchquant as tq
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> wf = lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))
        >>> q = tq.quantize_model(net, wf, None)
        >>> tq.set_qmodule_state(q, tq.QModuleState.CALIBRATION_WEIGHT_ONLY); _ = q(torch.randn(4, 8))
        >>> tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL_WEIGHT_ONLY)
        >>> path = tempfile.mkdtemp() + "/net.safetensors"
        >>> tq.save(q, path)
        >>> q2 = tq.load(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), path)
        >>> x = torch.randn(3, 8)
        >>> torch.equal(q(x), q2(x))
        True
    """
    save_file = _safetensors().save_file
    tensors, desc = quantized_state_dict(model, pack=pack)
    save_file(tensors, os.fspath(path), metadata={_META_KEY: json.dumps(desc)})


def read(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, description)`` of a file written by :func:`save`.

    Raises:
        ValueError: the file carries no torchquant description, or one of an unknown format.
    """
    _safetensors()
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    if _META_KEY not in meta:
        raise ValueError(f"load: {os.fspath(path)!r} is not a torchquant checkpoint (no description in its header)")
    desc = json.loads(meta[_META_KEY])
    if desc.get("format") != FORMAT:
        raise ValueError(f"load: {os.fspath(path)!r} has format {desc.get('format')!r}; this torchquant reads {FORMAT}")
    return tensors, desc


def convert_like(model: nn.Module, desc: dict[str, Any]) -> nn.Module:
    """Convert the float ``model`` as the description records (quantizers from their specs, no state)."""
    specs = {name: info["quantizers"] for name, info in desc["modules"].items()}
    # A wrapper of a functional call (fx) sits below the module its factories were called for
    by_factory = {
        info["factory_name"]: info["quantizers"] for info in desc["modules"].values() if "factory_name" in info
    }

    def build(name: str, attr: str) -> nn.Module | None:
        raw = specs.get(name, by_factory.get(name, {})).get(attr)
        if raw is None:
            return None
        where = f"checkpoint: {name}.{attr}"
        spec = QuantizerSpec.from_dict(raw, where=where)
        try:
            return spec.build()
        except ValueError as e:  # SpecError included: the argument the constructor rejected, with the module
            raise SpecError(f"{where}: {e}") from e

    if not desc["conversions"]:
        raise ValueError(
            "load: the checkpoint records no conversion; convert the model yourself the same way, then call "
            "tq.load(converted_model, path)"
        )
    for record in desc["conversions"]:
        model = replay_conversion(model, record, build)
    return model


def replay_conversion(
    model: nn.Module, record: dict[str, Any], build: Callable[[str, str], nn.Module | None]
) -> nn.Module:
    """Repeat one recorded conversion on ``model`` (see :func:`register_conversion`), importing the
    module the record names when its kind is not registered yet.

    Raises:
        ValueError: no replay is registered for the record's kind.
    """
    kind = record.get("kind")
    if kind not in _REPLAYS and "module" in record:
        importlib.import_module(record["module"])
    if kind not in _REPLAYS:
        raise ValueError(f"load: unknown conversion {kind!r}; known: {sorted(_REPLAYS)}")
    return _REPLAYS[kind](model, record, build)


def load(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`save` from its float version.

    ``model`` is the float model (same architecture, any weights): it is converted
    as recorded, its quantizers are built from their descriptions, the saved state
    is loaded and every QModule gets its saved mode. A model you have converted
    yourself (it holds QModules) is loaded without converting again.

    Args:
        model: the float model, or one already converted the same way.
        path: a file written by :func:`save`.
        strict: fail on missing or unexpected keys.

    Returns:
        The quantized model (with ``method="fx"`` a new ``GraphModule``; with
        ``"swap"`` ``model`` itself).

    Raises:
        ValueError: not a torchquant checkpoint, or the model does not match it (the
            message lists the differing modules or keys).
    """
    tensors, desc = read(path)
    if not iter_qmodules(model):
        model = convert_like(model, desc)
        unwrap_undescribed(model, set(desc["modules"]))
    return load_quantized_state(model, tensors, desc, strict=strict)


def unwrap_undescribed(model: nn.Module, described: set[str]) -> list[str]:
    """Put back the float layer of every single-layer ``QWrapper`` of ``model`` that the checkpoint does not
    describe: a layer type this torchquant quantizes but the one that saved the checkpoint left in float
    (a scaled word embedding), so that the checkpoint loads and computes as it did when saved.

    Returns:
        The names of the layers put back.
    """
    found = [
        (name, m)
        for name, m in iter_qmodules(model)
        if name and name not in described and isinstance(m, QWrapper) and m.bn is None and m.act is None
    ]
    for name, m in found:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, m.layer)
    return [n for n, _ in found]


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ImportError("torchquant.save/load need safetensors: pip install 'torchquant[export]'") from e
    return st
