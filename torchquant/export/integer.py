"""Integer parameters for hardware: codes, scales, zero points, integer biases.

:func:`integer_params` returns, for every quantization point of a calibrated
model, plain NumPy arrays and numbers::

    {
      "layer1.0.conv1.weight_quantizer": {
          "kind": "weight", "n_bits": 8, "qmin": 0, "qmax": 255,
          "granularity": "per_channel", "axis": 0, "group_size": None,
          "scale": float32, broadcasting against the tensor (per channel (C_out, 1, 1, 1);
              per group, the tensor's shape: each group's scale repeated over its elements),
          "zero_point": int64 (same shape),
          "int_weight": int64 codes in [qmin, qmax], shaped as QWrapper.weight_view()
              ((out, in, ...): the layer's weight, transposed for Hugging Face's Conv1D;
              with BatchNorm folded in for a ``fold_bn=True`` wrapper),
          "bias": float32 (C_out,) or absent (with ``fold_bn=True`` the folded bias: the layer's
              and the BatchNorm's shift),
          "input_point": name of the per-tensor quantization point feeding the layer (its own
              input_quantizer if it has one), or absent; absent for per-group weights and weights
              with one scale per input channel (no single accumulator scale per output channel),
          "int_bias": int64 (C_out,): round(bias / (input_scale * weight_scale)), or absent,
          "bias_scale": float64 (C_out,): input_scale * weight_scale, or absent,
      },
      "layer1.0.conv1.acts_quantizer": {"kind": "activation", ...},
    }

so that ``x_int = clamp(round(x / scale) + zero_point, qmin, qmax)`` and
``x = (x_int - zero_point) * scale``. A layer's output is then computable in
integers: ``acc = sum((x_int - zx) * (w_int - zw)) + int_bias`` (exact in int64),
``y = acc * bias_scale`` (see docs/export.md for a worked example).

The input point of a layer (for the integer bias) is found by running
``example_inputs`` once: a layer whose input tensor is exactly the output of a
per-tensor quantizer gets it (a layer called more than once per forward pass only if the
same quantizer feeds every call; otherwise a warning names it). Quantizers with levels instead of an affine grid
(:meth:`~torchquant.quantizers.Quantizer.levels`: NF4, APoT) appear with
``"affine": False``, ``"n_levels"``, the granularity, ``"levels"`` (float32, the codebook
``(..., K)``), ``"scale"`` (float32, broadcasting against the tensor) and, for a weight,
``"codes"`` (int64 in ``[0, K - 1]``, shaped as ``QWrapper.weight_view()``), so that
``w = levels[..., codes] * scale``. Quantizers rounding to a floating-point format
(:meth:`~torchquant.quantizers.Quantizer.float_grid`: FP8, FP4, MX) appear with
``"affine": False``, the format (``"format"`` such as ``"e4m3"``, ``"exp_bits"``,
``"man_bits"``, ``"exp_bias"``, ``"special"``, ``"max_value"``), the granularity,
``"blocked"`` (MX: a power-of-two scale per block of ``group_size`` along ``axis``, from the
tensor itself), ``"scale"`` (float32, broadcasting against the tensor; for MX blocks, a
weight's compact block scales) and, for a weight, ``"elements"`` (float32, the format's
values), so that ``w = elements * scale`` (each block's scale repeated along the axis for MX).
Quantizers with none of these appear with ``"kind"``, ``"quantizer"`` and ``"affine": False`` only.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..qmodules import QMultiheadAttention, QWrapper
from ..quantizers import FloatGrid
from ._common import quant_points, to_numpy

__all__ = ["integer_params", "load_integer_params", "save_integer_params"]


def integer_params(
    model: nn.Module, example_inputs: Tensor | Sequence[Tensor] | None = None
) -> dict[str, dict[str, Any]]:
    """Integer codes, scales, zero points, bit-widths and granularity of every quantization point.

    Args:
        model: a calibrated model whose QModules are in a ``QUANT_EVAL`` mode.
        example_inputs: optional input (tensor or tuple) run once to find which
            per-tensor activation quantizer feeds each layer; with it, layers get
            ``int_bias`` and ``bias_scale``. Without it, biases stay float.

    Returns:
        ``{point name: {field: value}}`` (see the module docstring); arrays are NumPy.

    Raises:
        ValueError: a QModule not in a ``QUANT_EVAL`` mode, a quantizer never
            calibrated, or a weight quantizer whose ``grid()`` does not fit the weight
            (naming it); an integer bias that does not fit in int32.

    Example:
        >>> import torch, torchquant as tq
        >>> from torch import nn
        >>> net = tq.quantize_model(nn.Sequential(nn.Linear(4, 3)),
        ...     lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)),
        ...     lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax()), method="swap")
        >>> with tq.qmodule_state(net, tq.QModuleState.CALIBRATION):
        ...     _ = net(torch.randn(16, 4))
        >>> tq.set_qmodule_state(net, tq.QModuleState.QUANT_EVAL)
        >>> p = tq.export.integer_params(net)["0.weight_quantizer"]
        >>> p["int_weight"].shape, p["n_bits"], p["granularity"]
        ((3, 4), 4, 'per_channel')
    """
    who = "integer_params"
    points = quant_points(model, who)
    feeders = _find_input_points(model, points, example_inputs, who) if example_inputs is not None else {}
    out: dict[str, dict[str, Any]] = {}
    biased: list[tuple[str, Tensor, Tensor, str, str]] = []
    weight_of: dict[str, QWrapper | tuple[Tensor, Tensor | None]] = {}
    for p in points:
        m = p.module
        if isinstance(m, QWrapper) and p.quantizer is m.weight_quantizer:
            weight_of[p.name] = m
        elif isinstance(m, QMultiheadAttention):  # (weight, bias) of the packed input and the output projection
            mha = m.layer
            for q, wb in (
                (m.in_proj_quantizer, (mha.in_proj_weight, mha.in_proj_bias)),
                (m.out_proj_quantizer, (mha.out_proj.weight, mha.out_proj.bias)),
            ):
                if p.quantizer is q:
                    weight_of[p.name] = wb
    for p in points:
        grid = p.quantizer.grid()
        kind = "weight" if p.name in weight_of else "activation"
        entry: dict[str, Any] = {"kind": kind, "quantizer": type(p.quantizer).__name__, "affine": grid is not None}
        if grid is None:
            levels = p.quantizer.levels()
            fg = p.quantizer.float_grid() if levels is None else None
            if fg is not None:
                entry.update(_float_entry(fg, _weight(weight_of[p.name]) if kind == "weight" else None))
            if levels is not None:
                g = levels.granularity
                entry.update(
                    n_levels=levels.n_levels,
                    granularity=g.kind,
                    axis=g.axis,
                    group_size=g.group_size,
                    levels=to_numpy(levels.levels, np.float32),
                    scale=to_numpy(levels.scale, np.float32),
                )
                if kind == "weight":
                    who = f"integer_params: quantizer {p.name!r} ({type(p.quantizer).__name__})"
                    with torch.no_grad():
                        q = p.quantizer.quantize(_weight(weight_of[p.name]))  # its rounding (AdaRound's)
                        entry["codes"] = to_numpy(levels.codes(q, who), np.int64)
            bias = _bias(weight_of[p.name]) if kind == "weight" else None
            if bias is not None:
                entry["bias"] = to_numpy(bias, np.float32)
            out[p.name] = entry
            continue
        g = grid.granularity
        entry.update(
            n_bits=grid.n_bits,
            qmin=grid.qmin,
            qmax=grid.qmax,
            granularity=g.kind,
            axis=g.axis,
            group_size=g.group_size,
            scale=to_numpy(grid.scale, np.float32),
            zero_point=to_numpy(grid.zero_point.round(), np.int64),
        )
        if kind == "weight" and isinstance(weight_of[p.name], tuple):
            w, bias = weight_of[p.name]
            with torch.no_grad():
                who = f"integer_params: quantizer {p.name!r} ({type(p.quantizer).__name__})"
                entry["int_weight"] = to_numpy(grid.to_int(p.quantizer.quantize(w), who), np.int64)
                if bias is not None:
                    entry["bias"] = to_numpy(bias, np.float32)
        elif kind == "weight":
            wrapper = weight_of[p.name]
            with torch.no_grad():
                w = wrapper.weight_to_quantize()  # (out, in, ...); BatchNorm folded with fold_bn=True
                who = f"integer_params: quantizer {p.name!r} ({type(p.quantizer).__name__})"
                # the codes of the simulated weight: a quantizer may round other than to nearest (AdaRound)
                entry["int_weight"] = to_numpy(grid.to_int(p.quantizer.quantize(w), who), np.int64)
                bias = _bias(wrapper)
                if bias is not None:
                    entry["bias"] = to_numpy(bias, np.float32)
                    feeder = feeders.get(p.owner)
                    # per group or per input channel (axis 1 of the (out, in, ...) weight), no single accumulator
                    # scale per output channel: no int_bias
                    per_output = g.group_size is None and g.axis in (None, 0)
                    if feeder is not None and per_output:  # once every point is done (module order)
                        biased.append((p.name, bias, grid.scale, feeder, who))
        out[p.name] = entry
    for name, bias, w_scale, feeder, who in biased:
        out[name].update(_int_bias(bias, w_scale, feeder, out, name, who))
    return out


def _bias(owner: QWrapper | tuple[Tensor, Tensor | None]) -> Tensor | None:
    """The float bias of a weight point's layer; with ``fold_bn=True`` the folded one (the layer's bias, if any,
    and the BatchNorm's shift, with the running statistics)."""
    if isinstance(owner, tuple):
        return owner[1]
    if owner.fold_bn:
        with torch.no_grad():
            return owner._folded_params()[1]
    bias = getattr(owner.layer, "bias", None)
    return bias if isinstance(bias, Tensor) else None


def _weight(owner: QWrapper | tuple[Tensor, Tensor | None]) -> Tensor:
    """The tensor a weight quantizer reads: ``(out, in, ...)``, BatchNorm folded with ``fold_bn=True``."""
    if isinstance(owner, tuple):
        return owner[0]
    with torch.no_grad():
        return owner.weight_to_quantize()


def _float_entry(fg: FloatGrid, weight: Tensor | None) -> dict[str, Any]:
    """The fields of a floating-point point: format, granularity, scales and, for a weight, its elements."""
    f, g = fg.fmt, fg.granularity
    entry: dict[str, Any] = {
        "format": f.name,
        "exp_bits": f.exp_bits,
        "man_bits": f.man_bits,
        "exp_bias": f.bias,
        "special": f.special,
        "max_value": f.max_value,
        "granularity": g.kind,
        "axis": g.axis,
        "group_size": g.group_size,
        "blocked": fg.blocked,
    }
    if fg.scale is not None:
        entry["scale"] = to_numpy(fg.scale, np.float32)
    if weight is not None:
        with torch.no_grad():
            w = weight.detach()
            entry["elements"] = to_numpy(fg.elements(w), np.float32)
            if fg.blocked:
                entry["scale"] = to_numpy(fg.block_scales(w), np.float32)
    return entry


def _int_bias(bias: Tensor, w_scale: Tensor, feeder: str, done: dict, name: str, who: str) -> dict[str, Any]:
    """``int_bias = round(bias / (s_in * s_w))`` per output channel, in float64."""
    s_in = float(np.asarray(done[feeder]["scale"], dtype=np.float64).reshape(()))
    s_w = to_numpy(w_scale.reshape(-1), np.float64)  # () or (C_out,)
    bias_scale = np.broadcast_to(s_in * s_w, bias.shape).astype(np.float64)
    q = np.round(to_numpy(bias, np.float64) / bias_scale)
    if np.abs(q).max(initial=0) > 2**31 - 1:
        raise ValueError(f"{who}: integer bias of {name!r} does not fit in int32 (max |b_int| = {np.abs(q).max():.3g})")
    return {"input_point": feeder, "bias_scale": bias_scale, "int_bias": q.astype(np.int64)}


def _find_input_points(model, points, example_inputs, who: str) -> dict[str, str]:
    """QWrapper name -> name of the per-tensor quantizer whose output tensor is that layer's input."""
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    produced: dict[int, tuple[str, Tensor]] = {}  # id -> (name, tensor); the tensor is kept so ids stay unique
    feeders: dict[str, list[str | None]] = {}  # per call
    hooks = []
    for p in points:
        grid = p.quantizer.grid()
        if grid is None or grid.granularity.axis is not None or p.quantizer is getattr(p.module, "weight_quantizer", 1):
            continue

        def out_hook(mod, args, out, name=p.name):
            produced[id(out)] = (name, out)

        hooks.append(p.quantizer.register_forward_hook(out_hook))
    owners = {p.owner: p.module for p in points if isinstance(p.module, QWrapper)}
    # A layer with an input quantizer of its own (transformer-style W8A8) reads that quantizer's codes.
    own = {p.owner: p for p in points if isinstance(p.module, QWrapper) and p.attr == "input_quantizer"}
    for owner, m in owners.items():
        if owner in own:
            continue

        def pre_hook(mod, args, owner=owner):
            hit = produced.get(id(args[0])) if args else None
            feeders.setdefault(owner, []).append(hit[0] if hit is not None else None)

        hooks.append(m.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            try:
                model(*inputs)
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                shapes = [tuple(t.shape) for t in inputs]
                raise ValueError(f"{who}: the model does not run on example inputs of shapes {shapes}: {e}") from e
    finally:
        for h in hooks:
            h.remove()
    # A layer called more than once (shared weights) has one integer bias only if one quantizer feeds every call.
    mixed = sorted(o for o, f in feeders.items() if len(set(f)) > 1 and any(f))
    if mixed:
        warnings.warn(
            f"{who}: {len(mixed)} layer(s) are called more than once per forward pass with inputs from different "
            f"quantizers, so no single accumulator scale fits their bias; they get no int_bias: {', '.join(mixed)}",
            UserWarning,
            stacklevel=3,
        )
    found = {o: f[0] for o, f in feeders.items() if len(set(f)) == 1 and f[0] is not None}
    for owner, p in own.items():
        grid = p.quantizer.grid()
        if grid is not None and grid.granularity.axis is None:  # per tensor; a per-token dynamic one has no scale
            found[owner] = p.name
    return found


_META = (
    "kind",
    "quantizer",
    "affine",
    "n_bits",
    "n_levels",
    "qmin",
    "qmax",
    "granularity",
    "axis",
    "group_size",
    "input_point",
    "format",
    "exp_bits",
    "man_bits",
    "exp_bias",
    "special",
    "max_value",
    "blocked",
)


def _flatten(params: dict[str, dict[str, Any]]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, str] = {}
    for point, entry in params.items():
        if "/" in point:
            raise ValueError(f"save_integer_params: point name {point!r} contains '/'")
        for k, v in entry.items():
            key = f"{point}/{k}"
            if isinstance(v, np.ndarray):
                arrays[key] = v.copy(order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
            elif k in _META:
                meta[key] = repr(v)
            else:
                raise ValueError(f"save_integer_params: cannot store {key!r} of type {type(v).__name__}")
    return arrays, meta


def save_integer_params(params: dict[str, dict[str, Any]], path: str | os.PathLike) -> None:
    """Save :func:`integer_params` output as ``.npz`` or ``.safetensors`` (chosen by the suffix).

    Nothing is pickled: arrays are stored as arrays; numbers, strings and ``None``
    as text (safetensors metadata, or 0-d unicode arrays in ``.npz``).

    Args:
        params: what :func:`integer_params` returned.
        path: destination, ending in ``.npz`` or ``.safetensors``.

    Raises:
        ValueError: another suffix.
    """
    path = Path(path)
    arrays, meta = _flatten(params)
    if path.suffix == ".npz":
        np.savez(path, **arrays, **{f"__meta__/{k}": np.array(v) for k, v in meta.items()})
    elif path.suffix == ".safetensors":
        try:
            from safetensors.numpy import save_file
        except ImportError as e:  # pragma: no cover
            raise ImportError(
                "save_integer_params: .safetensors needs safetensors: pip install torchquant[export]"
            ) from e
        save_file(arrays, str(path), metadata=meta)
    else:
        raise ValueError(f"save_integer_params: path must end in .npz or .safetensors, got {str(path)!r}")


def _parse(text: str) -> Any:
    import ast

    return ast.literal_eval(text)  # literals only (numbers, strings, None, bools): never code


def load_integer_params(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Load what :func:`save_integer_params` wrote (``allow_pickle=False``; safetensors never pickles).

    Args:
        path: a ``.npz`` or ``.safetensors`` file.

    Returns:
        The same nested dict of NumPy arrays and plain values.
    """
    path = Path(path)
    out: dict[str, dict[str, Any]] = {}

    def put(key: str, value: Any) -> None:
        point, field = key.rsplit("/", 1)
        out.setdefault(point, {})[field] = value

    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            for key in z.files:
                if key.startswith("__meta__/"):
                    put(key[len("__meta__/") :], _parse(str(z[key])))
                else:
                    put(key, z[key])
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            for key, text in (f.metadata() or {}).items():
                put(key, _parse(text))
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                put(key, f.get_tensor(key))
    else:
        raise ValueError(f"load_integer_params: path must end in .npz or .safetensors, got {str(path)!r}")
    return out
