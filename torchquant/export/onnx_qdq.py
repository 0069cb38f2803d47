"""ONNX export with QuantizeLinear/DequantizeLinear at every quantization point.

How it works: on a copy of the model, every quantizer is replaced by a stub that
computes the same simulated value but is exported (TorchScript exporter,
``torch.onnx.export(..., dynamo=False)``) as one placeholder node
``torchquant::QuantPoint``. A pass over the ONNX graph then replaces each
placeholder using the quantizer's :meth:`~torchquant.quantizers.Quantizer.grid`:

* input computed from the model input (an activation):
  ``QuantizeLinear -> [Clip] -> DequantizeLinear`` (``Clip`` on the integers only
  when the grid is narrower than its ONNX type, e.g. 6 bits in ``uint8``);
* input constant (a weight): the integer codes are stored as an integer
  initializer followed by ``DequantizeLinear``; the float weight is dropped.

A quantizer with levels instead of an affine grid (:meth:`~torchquant.quantizers.Quantizer.levels`,
a :class:`~torchquant.quantizers.LevelGrid`: NF4, APoT) is replaced using them:

* input constant (a weight): its codes are stored as a ``uint8`` initializer (``uint16``
  beyond 256 levels), read through ``Cast -> Gather`` from the codebook initializer and
  multiplied by the scale (per group: in the grouped shape ``(.., n / g, g, ..)``, then
  ``Reshape``), so no float copy of the weight is stored;
* input computed (an activation): the nearest level is computed in float ops,
  ``Div -> Unsqueeze -> Greater`` (against the midpoints between levels) ``-> Cast ->
  ReduceSum -> Gather -> Mul``, the same arithmetic as the simulation.

A BatchNorm folded into its layer (``fold_bn=True``) is folded here too, on both paths.

A per-tensor activation read by a ``MatMul``/``Gemm`` through data movement only
(reshapes, transposes, slices, concatenations of the same grid, zero padding) gets a
``QuantizeLinear -> DequantizeLinear`` pair of its own grid right before the product
(``tq_requantize/...``; exact, since the values lie on that grid), so that onnxruntime
can run the product on integers instead of quantizing the float tensor again itself.

A quantizer that rounds to a floating-point format (:meth:`~torchquant.quantizers.Quantizer.float_grid`,
a :class:`~torchquant.quantizers.FloatGrid`: FP8, FP6, FP4, OCP MX) is replaced using it:

* FP8 E4M3/E5M2 and MX's INT8 element have ONNX types (``float8e4m3fn``, ``float8e5m2``,
  ``int8`` with the scale divided by 64): a weight is stored in it followed by
  ``DequantizeLinear`` (opset 19; MX blocks with ``block_size``, opset 21), an activation gets
  ``QuantizeLinear -> DequantizeLinear`` (opset 21), MX block scales computed in the graph
  from each block's maximum;
* other formats: a weight is stored as integers times the format's smallest subnormal
  (every value of a format is one: FP4 E2M1 in ``int8`` as ``k / 2``, FP6 E3M2 in ``int16``
  at opset 21) with ``DequantizeLinear``, or where no such type exists at the opset as ``uint8``
  codes of the format's values read from its codebook (as levels are); an activation is
  rounded in float ops (``Log``/``Floor``/``Pow`` for the exponent, ``Round``), the
  simulation's arithmetic, then (where those integers have a type) read through an exact
  ``QuantizeLinear -> DequantizeLinear`` of them, a point :func:`~torchquant.export.check_parity` compares.

Grids map to ONNX integer types: a ``[0, 2^n - 1]`` grid to ``uint8``/``uint4``
with its zero points, or, for weights with ``signed_weights=True``, shifted by
``2^(n-1)`` to ``int8``/``int4`` (a symmetric grid's zero point ``2^(n-1)``
becomes 0, what onnxruntime's integer kernels want); signed grids (Q-format) to ``int8``/``int4``. 4-bit types
need opset 21; 9 to 16 bits need opset 21 (``int16``/``uint16``). A 4-bit activation
that a ``MaxPool`` reads is stored as ``uint8``/``int8`` with a ``Clip`` to its 4-bit
range (same values): onnxruntime would otherwise run the ``MaxPool`` on 4-bit
integers, which it cannot. So is an activation of 1 to 3 bits (ONNX's ``Clip`` takes
no 4-bit type). A quantizer
with neither an affine grid nor levels (``grid()`` and ``levels()`` are ``None``), or
one whose grid fits no ONNX type at the chosen opset, is exported as its float-valued
simulation with a warning naming it.
"""

from __future__ import annotations

import copy
import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..granularity import Granularity
from ..graph.concrete import traced_branches
from ..moe import QExperts
from ..quantizers import AffineGrid, FloatGrid, LevelGrid, MinifloatFormat, Quantizer
from ._common import quant_points, to_numpy

if TYPE_CHECKING:
    import onnx

__all__ = ["onnx_type_for_grid", "to_onnx"]

_DOMAIN = "torchquant"
_OP = "QuantPoint"


def _require_onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("torchquant.export.to_onnx needs onnx: pip install torchquant[export]") from e
    return onnx


@dataclass
class _Record:
    name: str
    quantizer: Quantizer
    grid: AffineGrid | None = None
    levels: LevelGrid | None = None  # when the quantizer has levels instead of an affine grid
    float_grid: FloatGrid | None = None  # when it rounds to a floating-point format instead
    codes: Tensor | None = None  # integer codes of the last input (used when that input is a constant)
    scales: Tensor | None = None  # a float grid's scales for the last input (MX: compact block scales)
    ranks: list[int] = field(default_factory=list)  # dimensions of the input, per call
    values: Tensor | None = None  # without grid or levels: the simulated values of a parameter or buffer input
    calls: int = 0


class _Active:
    """The records of the export in progress (the autograd.Function looks them up by index)."""

    records: ClassVar[list[_Record]] = []
    constants: ClassVar[set[int]] = set()  # ids of the model's parameters and buffers


class _QuantPointFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, idx: int) -> Tensor:  # type: ignore[override]
        rec = _Active.records[idx]
        # The exported node is ``symbolic``'s placeholder; the quantizer's own ops (nested autograd
        # Functions included) are not traced into a subgraph of it: that subgraph is discarded, and
        # tracing it made the exporter's graph passes several times slower on large models.
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            with torch.no_grad():
                val = rec.quantizer.quantize(x)
        finally:
            torch._C._set_tracing_state(state)
        if state is None:
            return val
        return x.detach().clone().copy_(val)  # traced as two ops; same value as the simulation

    @staticmethod
    def symbolic(g, x, idx: int):  # type: ignore[override]
        out = g.op(f"{_DOMAIN}::{_OP}", x, idx_i=idx)
        out.setType(x.type())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Export never differentiates; straight-through for completeness.
        return grad, None


class _Stub(nn.Module):
    """Stands in for a quantizer during export; same forward value."""

    def __init__(self, idx: int, who: str, quantizer: Quantizer) -> None:
        super().__init__()
        self.idx = idx
        self.who = who
        # A submodule: the parameters its float simulation reads (LSQ+'s step and offset) are traced as
        # the model's, not as constants that require grad (which the exporter refuses).
        self.quantizer = quantizer

    def forward(self, x: Tensor) -> Tensor:
        rec = _Active.records[self.idx]
        rec.calls += 1
        if rec.float_grid is not None:
            if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
                who = f"to_onnx: quantizer {rec.name!r} ({type(rec.quantizer).__name__})"
                fg = rec.float_grid
                try:
                    fg.check(x.shape, who)
                except ValueError as e:
                    raise _GridMismatch(str(e)) from None
                with torch.no_grad():  # the format's values and the scales, stored for a constant input
                    rec.codes = fg.elements(x.detach())
                    rec.scales = fg.block_scales(x.detach()) if fg.blocked else fg.scale
                    rec.ranks.append(x.dim())
            return _QuantPointFn.apply(x, self.idx)
        if rec.grid is None and rec.levels is None:
            if id(x) not in _Active.constants and id(x._base) not in _Active.constants:  # _base: a view (W.t())
                return rec.quantizer.quantize(x)  # float simulation, traced as ordinary ops
            if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
                with torch.no_grad():  # a weight: its simulated values are stored (its ops may not export)
                    rec.values = rec.quantizer.quantize(x.detach())
            return _QuantPointFn.apply(x, self.idx)
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            # Eager dry run: keep the codes, so a constant input becomes an integer initializer
            # holding exactly the simulated codes.
            who = f"to_onnx: quantizer {rec.name!r} ({type(rec.quantizer).__name__})"
            grid = rec.grid if rec.grid is not None else rec.levels
            try:
                grid.check(x.shape, who)  # type: ignore[union-attr]
            except ValueError as e:
                raise _GridMismatch(str(e)) from None
            with torch.no_grad():
                # the codes of the simulated values: a quantizer may round other than to the nearest
                # point of its grid (AdaRound's learned rounding)
                q = rec.quantizer.quantize(x.detach())
                if rec.grid is not None:
                    rec.codes = rec.grid.to_int(q, who)
                else:
                    rec.codes = rec.levels.codes(q, who)  # type: ignore[union-attr]
        return _QuantPointFn.apply(x, self.idx)


class _GridMismatch(ValueError):
    """A quantizer's grid() does not fit its tensor (raised as is, not as an input problem)."""


@dataclass(frozen=True)
class OnnxType:
    """An ONNX integer type for a grid: ``onnx.TensorProto`` code, its range, and the code shift."""

    elem_type: int
    lo: int
    hi: int
    shift: int  # onnx_code = code - shift; onnx_zero_point = zero_point - shift
    name: str


def onnx_type_for_grid(grid: AffineGrid, opset: int, prefer_signed: bool) -> OnnxType | None:
    """The ONNX integer type that holds ``grid``'s codes, or ``None`` if none does at ``opset``.

    Args:
        grid: the quantizer's grid.
        opset: target ONNX opset (4-bit and 16-bit types need 21).
        prefer_signed: shift a ``[0, 2^n - 1]`` grid by ``2^(n-1)`` to the signed
            type (a symmetric grid's zero point ``2^(n-1)`` becomes 0).

    Returns:
        The type, or ``None``.
    """
    onnx = _require_onnx()
    tp = onnx.TensorProto
    qmin, qmax = grid.qmin, grid.qmax
    shift = 0
    if prefer_signed and qmin == 0 and (qmax + 1) % 2 == 0:
        shift = (qmax + 1) // 2  # zero point 2^(n-1) becomes 0
    lo, hi = qmin - shift, qmax - shift
    candidates = [
        (4, "int4", tp.INT4, -8, 7, 21),
        (4, "uint4", tp.UINT4, 0, 15, 21),
        (8, "int8", tp.INT8, -128, 127, 10),
        (8, "uint8", tp.UINT8, 0, 255, 10),
        (16, "int16", tp.INT16, -(2**15), 2**15 - 1, 21),
        (16, "uint16", tp.UINT16, 0, 2**16 - 1, 21),
    ]
    if lo >= 0:  # an unsigned grid goes to the unsigned type of each width first
        candidates.sort(key=lambda c: (c[0], c[3] < 0))
    zp = grid.zero_point - shift
    for _, name, code, tlo, thi, min_opset in candidates:
        if opset < min_opset or lo < tlo or hi > thi:
            continue
        if bool((zp < tlo).any()) or bool((zp > thi).any()):
            continue
        return OnnxType(code, tlo, thi, shift, name)
    return None


def _qparams(grid: AffineGrid, ot: OnnxType, shape: torch.Size) -> tuple[Tensor, Tensor, dict]:
    """ONNX scale / zero point tensors and the Q/DQ attributes for ``grid`` on a tensor of ``shape``."""
    scale = grid.scale.detach().to(torch.float32)
    zp = (grid.zero_point.detach() - ot.shift).round().to(torch.int64)
    (scale, zp), attrs = _layout([scale, zp], grid.granularity, shape)
    return scale, zp, attrs


def _layout(params: list[Tensor], g: Granularity, shape: torch.Size) -> tuple[list[Tensor], dict]:
    """Quantization parameters (broadcasting against a tensor of ``shape``) in the layout of ONNX's Q/DQ
    at granularity ``g``: a scalar, a vector with ``axis``, or per group the compact shape with
    ``axis`` and ``block_size`` (opset 21)."""
    axis = g.check(shape, "to_onnx")
    if axis is None:
        return [p.reshape(()) for p in params], {}
    if g.group_size is None:
        return [p.reshape(-1) for p in params], {"axis": axis}
    # per-group: compact shape (.., n / group, ..); the grid may hold the expanded one
    compact = g.compact_shape(shape)
    idx = torch.arange(0, shape[axis], g.group_size)
    params = [p if tuple(p.shape) == compact else p.index_select(axis, idx) for p in params]
    return [p.reshape(compact) for p in params], {"axis": axis, "block_size": g.group_size}


def _describe_fit(grid: AffineGrid, opset: int) -> str:
    return f"{grid.n_bits}-bit grid [{grid.qmin}, {grid.qmax}] has no ONNX integer type at opset {opset}"


def to_onnx(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    path: str | os.PathLike | None = None,
    *,
    opset: int = 17,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None = None,
    signed_weights: bool = False,
) -> onnx.ModelProto:
    """Export a quantized model to ONNX with QuantizeLinear/DequantizeLinear pairs.

    Every quantizer of every QModule becomes a quantization point: activations
    get ``QuantizeLinear -> DequantizeLinear`` on the tensor, weights are stored
    as integer initializers (``int8``/``uint8``/``int4``/``uint4``...) with their
    scales and zero points, followed by ``DequantizeLinear``; per-tensor and
    per-channel (``axis``), per-group with ``block_size`` at opset 21. The rest of
    the graph stays float. See the module docstring for the type mapping.

    Args:
        model: a model with QModules, every one in a ``QUANT_EVAL`` mode (calibrated).
            Not modified (a copy is exported). A ``float16``/``bfloat16`` model is exported
            as its float32 copy with the model's grids (onnxruntime computes in float32).
        example_inputs: a tensor or a tuple of tensors, as ``model(*example_inputs)`` takes;
            arguments of ``forward`` after them keep their defaults, as Python values.
        path: where to write the ``.onnx`` file; ``None`` writes nothing.
        opset: ONNX opset, 13 to 21 (21 for 4-bit and 16-bit types, per-group, float8
            activations and MX blocks; 19 for float8 weights).
        input_names: graph input names (default ``input0``, ``input1``...).
        output_names: graph output names (default ``output0``...).
        dynamic_batch: make dimension 0 of every input and output symbolic (``"batch"``).
        dynamic_axes: the symbolic dimensions of each input and output by name, as
            ``torch.onnx.export`` takes them (``{"input0": {0: "batch", 1: "sequence"}}`` for
            a language model's token ids, or a list of dimensions); given, it replaces
            ``dynamic_batch``.
        signed_weights: store ``[0, 2^n - 1]`` weight grids shifted by ``2^(n-1)`` as
            ``int8``/``int4`` (symmetric ones get zero point 0), the layout onnxruntime's int8 kernels
            prefer on CPUs with VNNI and on ARM. The default ``False`` keeps them
            ``uint8``/``uint4`` with zero point ``2^(n-1)``: on x86 CPUs without VNNI
            (AVX2 only), onnxruntime's fused uint8 x int8 kernels saturate 16-bit
            intermediate sums (several steps of error at the output), its uint8 x uint8
            ones do not. Both are exact in the ONNX semantics.

    Note:
        onnxruntime 1.32 fails to load a model where a ``Clip`` (``ReLU6``,
        ``Hardtanh``) feeds an ``int4``/``uint4`` ``QuantizeLinear`` (its
        ``ClipQuantRewrite`` optimizer rejects 4-bit zero points); create the session
        with ``disabled_optimizers=["ClipQuantRewrite"]``.

    Returns:
        The ``onnx.ModelProto`` (checked with ``onnx.checker``).

    Warns:
        UserWarning: the model or its inputs are ``float16``/``bfloat16`` (exported in float32).
        UserWarning: the model was converted with ``example_inputs`` (its branches on sizes are
            guarded in PyTorch, not in ONNX) and is exported with a dynamic axis (whether or not
            a guard depends on that axis).

    Raises:
        ValueError: a QModule not in a ``QUANT_EVAL`` mode or never calibrated (naming
            it), no QModule at all, an unsupported opset, a quantizer whose ``grid()``
            does not fit the tensor it quantizes (naming it, with the shapes; see
            :meth:`~torchquant.quantizers.AffineGrid.check`), or ``example_inputs`` the
            model cannot run on (the message shows their shapes), ``dynamic_axes`` naming
            neither an input nor an output, or a
            :class:`~torchquant.QExperts` in the model (its routing depends on the data).
        TypeError: ``example_inputs`` is not a tensor or a sequence of tensors.
        RuntimeError: torch's ONNX exporter has no conversion for an operator the model uses
            (naming it).
        ImportError: onnx is not installed.

    Example:
        >>> import torch, torchquant as tq
        >>> from torch import nn
        >>> net = tq.quantize_model(nn.Sequential(nn.Linear(4, 3)),
        ...     lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True),
        ...     lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax()), method="swap")
        >>> with tq.qmodule_state(net, tq.QModuleState.CALIBRATION):
        ...     _ = net(torch.randn(16, 4))
        >>> tq.set_qmodule_state(net, tq.QModuleState.QUANT_EVAL)
        >>> proto = tq.export.to_onnx(net, torch.randn(1, 4), signed_weights=True)
        >>> sorted({n.op_type for n in proto.graph.node})
        ['DequantizeLinear', 'Gemm', 'QuantizeLinear']
    """
    onnx = _require_onnx()
    who = "to_onnx"
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= 21:
        raise ValueError(f"{who}: opset must be an int in [13, 21], got {opset!r}")
    inputs = _as_inputs(example_inputs, who)
    experts = [n for n, m in model.named_modules() if isinstance(m, QExperts)]
    if experts:
        raise ValueError(
            f"{who}: {experts[0]} is a QExperts (a mixture-of-experts bank): which experts run depends on the "
            "data, and a traced ONNX graph keeps only the experts the example inputs reach; export the model "
            "without it (keep it in float: skip= in tq.quantize_model, modules_to_not_convert= in a "
            "TorchQuantConfig) or serve it with a runtime that has MoE kernels"
        )
    points = quant_points(model, who)
    if not points:
        raise ValueError(f"{who}: {type(model).__name__} has QModules but no quantizer to export")
    guards = traced_branches(model)
    if guards and (dynamic_batch or dynamic_axes):
        warnings.warn(
            f"{who}: the model was converted with example_inputs and keeps {len(guards)} traced branch(es) "
            f"guarded in PyTorch (first at {guards[0]}); the ONNX graph holds the branches of the export's "
            "inputs and checks nothing, so inputs of other sizes on a dynamic axis may compute what the "
            "PyTorch model refuses. Export with dynamic_batch=False and no dynamic_axes to fix the sizes.",
            stacklevel=2,
        )

    # A copy whose quantizers are stubs (the original model is left untouched).
    work = copy.deepcopy(model)
    work.eval()
    inputs = _float32_twin(work, inputs, who)
    records: ClassVar[list[_Record]] = []
    for p in points:
        owner = work.get_submodule(p.owner) if p.owner else work
        q = getattr(owner, p.attr)
        records.append(_Record(p.name, q))
        # Into _modules: a layer's own checks (QWrapper's input_quantizer must be a Quantizer) refuse stubs.
        owner._modules[p.attr] = _Stub(len(records) - 1, p.name, q)

    prev = _Active.records, _Active.constants
    _Active.records = records
    _Active.constants = {id(t) for t in (*work.parameters(), *work.buffers())}
    try:
        for rec in records:
            g = rec.quantizer.grid()
            rec.levels = rec.quantizer.levels() if g is None else None
            rec.float_grid = rec.quantizer.float_grid() if g is None and rec.levels is None else None
            if g is None and rec.levels is None and rec.float_grid is None:
                warnings.warn(
                    f"{who}: quantizer {rec.name!r} ({type(rec.quantizer).__name__}) has no affine grid, "
                    "no levels and no float grid; exported as its float-valued simulation",
                    UserWarning,
                    stacklevel=2,
                )
            rec.grid = g
        # Eager dry run: validates the inputs and records the integer codes of constant inputs.
        with torch.no_grad():
            try:
                out = work(*inputs)
            except _GridMismatch as e:
                raise ValueError(str(e)) from None
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                shapes = [tuple(t.shape) for t in inputs]
                raise ValueError(f"{who}: the model does not run on example inputs of shapes {shapes}: {e}") from e
        n_in = len(inputs)
        n_out = len(out) if isinstance(out, (tuple, list)) else 1
        in_names = list(input_names) if input_names is not None else [f"input{i}" for i in range(n_in)]
        out_names = list(output_names) if output_names is not None else [f"output{i}" for i in range(n_out)]
        if len(in_names) != n_in or len(out_names) != n_out:
            raise ValueError(
                f"{who}: got {len(in_names)} input names for {n_in} inputs and {len(out_names)} output "
                f"names for {n_out} outputs"
            )
        dyn = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
        if dynamic_axes is not None:
            unknown = sorted(set(dynamic_axes) - set(in_names + out_names))
            if unknown:
                raise ValueError(
                    f"{who}: dynamic_axes names {unknown}, which are not among the inputs {in_names} "
                    f"or the outputs {out_names}"
                )
            dyn = {n: dict(a) if isinstance(a, Mapping) else list(a) for n, a in dynamic_axes.items()}
        buf = io.BytesIO()
        # The exporter fills every argument the inputs leave out with its default and
        # traces it as a tensor (an fx GraphModule's ``is_causal=False`` then reaches
        # scaled_dot_product_attention as a tensor); a forward that takes exactly the
        # example inputs leaves the defaults to Python.
        forward = work.forward
        work.forward = lambda *args, **kwargs: forward(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*TorchScript.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # torch's exporter writes the standard operators at opset 21 as at 20; the opset-21 types and
            # attributes (4-bit, 16-bit, float8, block_size) are ours, written by _lower_quant_points.
            warnings.filterwarnings("ignore", message="Exporting to ONNX opset version 21 is not supported")
            try:
                torch.onnx.export(
                    work,
                    tuple(inputs),
                    buf,
                    dynamo=False,
                    opset_version=opset,
                    input_names=in_names,
                    output_names=out_names,
                    dynamic_axes=dyn,
                    custom_opsets={_DOMAIN: 1},
                    do_constant_folding=True,
                )
            except RuntimeError as e:  # torch.onnx.errors.UnsupportedOperatorError among them
                simulated = [r.name for r in records if r.grid is None and r.levels is None and r.values is None]
                hint = ""
                if "aten::diff" in str(e):
                    hint = (
                        "; a Hugging Face model builds its attention mask with it when called without one: "
                        "export a wrapper whose forward passes attention_mask=torch.ones_like(input_ids)"
                    )
                elif simulated:
                    hint = (
                        f"; the quantizers exported as their float simulation ({', '.join(simulated[:5])}) may "
                        "use such operations: a quantizer without a grid or levels stores the weights it reads "
                        "directly from a parameter (or a view of one) as their values, and exports anything else, "
                        "such as activations or weights with a BatchNorm folded in (fold_bn=True), as its own "
                        "operations"
                    )
                elif not isinstance(e, torch.onnx.errors.UnsupportedOperatorError):
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RuntimeError(f"{who}: torch's ONNX exporter cannot export the model: {first}{hint}") from e
        proto = onnx.load_model_from_string(buf.getvalue())
        _lower_quant_points(proto, records, opset, who, signed_weights)
    finally:
        _Active.records, _Active.constants = prev
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        onnx.save_model(proto, os.fspath(path))
    return proto


def _as_inputs(example_inputs, who: str) -> list[Tensor]:
    if isinstance(example_inputs, Tensor):
        return [example_inputs]
    if (
        isinstance(example_inputs, (list, tuple))
        and example_inputs
        and all(isinstance(t, Tensor) for t in example_inputs)
    ):
        return list(example_inputs)
    raise TypeError(f"{who}: example_inputs must be a tensor or a non-empty tuple of tensors, got {example_inputs!r}")


def _constant_value(name: str, inits: dict, consts: dict):
    if name in inits:
        return inits[name]
    return consts.get(name)


def _float32_twin(work: nn.Module, inputs: list[Tensor], who: str, warn: bool = True) -> list[Tensor]:
    """Make a half-precision ``work`` (a copy) compute in float32; return the inputs to export it with.

    onnxruntime's CPU kernels, and the integer kernels it fuses Q/DQ into, compute in float32: a
    ``float16``/``bfloat16`` model is exported as its float32 copy. The quantizers keep their
    state's dtype, so their grids (scales, zero points, computed from that state as in the model)
    are the model's, and weights stored as parameters keep their codes (their grid arithmetic
    runs in float32 already); weights computed in ``forward`` (a folded BatchNorm) and the float
    operations between the quantization points are computed in float32.
    """
    half = (torch.float16, torch.bfloat16)
    found = sorted({str(t.dtype) for t in (*work.parameters(), *work.buffers(), *inputs) if t.dtype in half})
    if not found:
        return inputs
    if warn:
        warnings.warn(
            f"{who}: the model or its inputs are {' and '.join(found)}; the ONNX graph computes in float32: "
            "it is the model's float32 copy with the model's grids (feed it float32 inputs), which "
            "check_parity compares it with",
            UserWarning,
            stacklevel=3,
        )
    keep = {id(m) for p in quant_points(work, who) for m in p.quantizer.modules()}
    for m in work.modules():
        if id(m) not in keep:
            m._apply(lambda t: t.float() if t.is_floating_point() else t, recurse=False)
    return [t.float() if t.dtype in half else t for t in inputs]


def _lower_quant_points(proto, records: list[_Record], opset: int, who: str, signed_weights: bool) -> None:
    """Replace every ``torchquant::QuantPoint`` placeholder by Q/DQ nodes and integer initializers."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    new_nodes = []
    new_inits = []
    calls: dict[int, int] = {}
    rounded: set[str] = set()  # activations rounded to a float format in float operations
    for node in graph.node:
        if not (node.domain == _DOMAIN and node.op_type == _OP):
            new_nodes.append(node)
            continue
        idx = next(a.i for a in node.attribute if a.name == "idx")
        rec = records[idx]
        x, y = node.input[0], node.output[0]
        calls[idx] = calls.get(idx, -1) + 1  # a module called twice (shared weights): names of its own per call
        base = f"{rec.name}/{idx}" if calls[idx] == 0 else f"{rec.name}/{idx}.{calls[idx]}"
        const = _constant_value(x, inits, consts)
        if rec.levels is not None:
            if const is not None and rec.codes is None:
                raise RuntimeError(f"{who}: internal error: no codes recorded for constant input of {rec.name!r}")
            codes = rec.codes if const is not None else None
            new_nodes.extend(_level_nodes(rec.levels, codes, x, y, base, new_inits))
            continue
        if rec.float_grid is not None:
            rank = rec.ranks[min(calls[idx], len(rec.ranks) - 1)]  # a quantizer called on tensors of several ranks
            new_nodes.extend(
                _float_grid_nodes(rec, rank, const is not None, x, y, base, new_inits, opset, consumers, who, rounded)
            )
            continue
        if rec.grid is None:  # no grid or levels: placeholders only for parameters, with their simulated values
            if const is None or rec.values is None:
                raise RuntimeError(f"{who}: internal error: no values recorded for constant input of {rec.name!r}")
            new_nodes.extend(_pinned_nodes(to_numpy(rec.values.float()), y, base, new_inits))
            continue
        grid = rec.grid
        ot = onnx_type_for_grid(grid, opset, prefer_signed=signed_weights and const is not None)
        if ot is not None and ot.name in ("int4", "uint4") and const is None:
            narrower = (grid.qmin - ot.shift, grid.qmax - ot.shift) != (ot.lo, ot.hi)  # 1 to 3 bits
            # ONNX has no Clip on 4-bit types; onnxruntime has no 4-bit MaxPool, and fuses a 4-bit activation
            # into a QLinearConv with 8-bit weights, which it then refuses to load
            if narrower or _reaches(y, consumers, ("MaxPool", "Conv", "ConvTranspose")):
                ot = _widened(ot)
        if grid.granularity.group_size is not None and opset < 21:
            ot = None
        if ot is None:
            reason = (
                f"per-group quantization needs opset 21 (got {opset})"
                if grid.granularity.group_size is not None
                else _describe_fit(grid, opset)
            )
            warnings.warn(
                f"{who}: quantizer {rec.name!r}: {reason}; exported as its float-valued simulation", stacklevel=3
            )
            new_nodes.extend(_float_sim_nodes(grid, x, y, base, new_inits))
            continue
        if const is not None:
            if rec.codes is None:
                raise RuntimeError(f"{who}: internal error: no codes recorded for constant input of {rec.name!r}")
            codes = rec.codes - ot.shift
            scale, zp, attrs = _qparams(grid, ot, codes.shape)
            if "block_size" not in attrs and "axis" in attrs and _summed_over(y, attrs["axis"], codes.ndim, consumers):
                warnings.warn(
                    f"{who}: quantizer {rec.name!r}: its scales change along axis {attrs['axis']}, which the "
                    f"layer sums over, and no integer kernel takes such weights; they are exported as their "
                    f"float values (the same numbers)",
                    stacklevel=3,
                )
                new_nodes.extend(_pinned_nodes(to_numpy(grid.from_int(rec.codes).float()), y, base, new_inits))
                continue
            q_name = f"{base}/int_weight"
            new_inits.append(_int_tensor(q_name, ot, codes))
            s_name, z_name = f"{base}/scale", f"{base}/zero_point"
            new_inits.append(numpy_helper.from_array(to_numpy(scale), s_name))
            new_inits.append(_int_tensor(z_name, ot, zp))
            new_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [y], f"{base}/dq", **attrs))
            continue
        shape = _runtime_shape(grid)
        scale, zp, attrs = _qparams(grid, ot, shape)
        s_name, z_name = f"{base}/scale", f"{base}/zero_point"
        new_inits.append(numpy_helper.from_array(to_numpy(scale), s_name))
        new_inits.append(_int_tensor(z_name, ot, zp))
        q_out = f"{base}/q"
        new_nodes.append(helper.make_node("QuantizeLinear", [x, s_name, z_name], [q_out], f"{base}/quantize", **attrs))
        lo, hi = grid.qmin - ot.shift, grid.qmax - ot.shift
        if (lo, hi) != (ot.lo, ot.hi):  # a grid narrower than its type: clamp the integers
            lo_name, hi_name = f"{base}/qmin", f"{base}/qmax"
            new_inits.append(helper.make_tensor(lo_name, ot.elem_type, [], [lo]))
            new_inits.append(helper.make_tensor(hi_name, ot.elem_type, [], [hi]))
            clipped = f"{base}/q_clipped"
            new_nodes.append(helper.make_node("Clip", [q_out, lo_name, hi_name], [clipped], f"{base}/clip"))
            q_out = clipped
        new_nodes.append(
            helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [y], f"{base}/dequantize", **attrs)
        )
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    _remove_unused(graph)
    _requantize_moved_inputs(graph)
    _pin_float_weights(proto)
    _pin_float8_biases(proto)
    _pin_float_grid_weights_of_float_products(graph, rounded)
    # The placeholder domain is gone; keep only the standard opsets.
    keep = [o for o in proto.opset_import if o.domain != _DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    if opset >= 21 and proto.ir_version < 10:
        proto.ir_version = 10  # int4 / uint4 need IR 10


# Ops that move values without changing them.
_SHAPE_OPS = frozenset({"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Slice"})
#: Operators onnxruntime moves a per-tensor ``DequantizeLinear`` past (its QDQ propagation, 1.32), so a
#: layer reading their output reads a dequantized tensor once optimized.
_PROPAGATED = (_SHAPE_OPS - {"Flatten"}) | {"MaxPool"}


def _summed_over(name: str, axis: int, rank: int, consumers: dict[str, list]) -> bool:
    """Whether constant ``name`` (of rank ``rank``) reaches, through ``Transpose`` nodes, the weight input of
    a ``MatMul``, ``Gemm`` or ``Conv`` that sums over its axis ``axis``: per-axis scales there cannot be taken
    out of the sum, so no integer kernel computes the product (onnxruntime refuses or miscomputes it)."""
    from onnx import helper

    todo = [(name, axis % rank)]
    while todo:
        t, ax = todo.pop()
        for n in consumers.get(t, []):
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "Transpose":
                perm = list(attrs.get("perm", range(rank - 1, -1, -1)))
                todo.append((n.output[0], perm.index(ax)))
            elif len(n.input) > 1 and n.input[1] == t:
                summed = {"MatMul": ax == rank - 2, "Gemm": ax == (1 if attrs.get("transB", 0) else 0), "Conv": ax != 0}
                if summed.get(n.op_type, False):
                    return True
    return False


def _reaches(name: str, consumers: dict[str, list], ops: tuple[str, ...]) -> bool:
    """Whether tensor ``name`` feeds one of ``ops``, directly or through shape-only ops."""
    todo, seen = [name], set()
    while todo:
        t = todo.pop()
        for n in consumers.get(t, []):
            if n.op_type in ops:
                return True
            if n.op_type in _SHAPE_OPS and n.output[0] not in seen:
                seen.add(n.output[0])
                todo.append(n.output[0])
    return False


def _widened(ot: OnnxType) -> OnnxType:
    """The 8-bit type of the same signedness and shift as 4-bit ``ot`` (the codes are then clipped).

    onnxruntime (1.32) turns ``DequantizeLinear -> MaxPool`` into a ``MaxPool`` on the
    integers, and has no 4-bit ``MaxPool``, and ``DequantizeLinear -> Conv`` with 8-bit
    weights into a ``QLinearConv``, which takes no 4-bit input: the model would not load. Stored in 8 bits,
    with ``Clip`` to the 4-bit range after ``QuantizeLinear``, the values are the same.
    """
    onnx = _require_onnx()
    tp = onnx.TensorProto
    if ot.name == "int4":
        return OnnxType(tp.INT8, -128, 127, ot.shift, "int8")
    return OnnxType(tp.UINT8, 0, 255, ot.shift, "uint8")


_NP_TYPES = {"int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16"}


def _int_tensor(name: str, ot: OnnxType, values: Tensor):
    """An ONNX integer initializer of type ``ot`` (4-bit types are packed two per byte by onnx.helper)."""
    from onnx import helper, numpy_helper

    if ot.name in _NP_TYPES:
        return numpy_helper.from_array(to_numpy(values, _NP_TYPES[ot.name]), name)
    # int4 / uint4: two values per byte, first value in the low nibble (ONNX layout), zero-padded.
    flat = to_numpy(values.reshape(-1), np.int64) & 0xF
    if flat.size % 2:
        flat = np.append(flat, 0)
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, ot.elem_type, list(values.shape), packed.tobytes(), raw=True)


def _runtime_shape(grid: AffineGrid) -> torch.Size:
    """A tensor shape the activation grid's granularity accepts (only its rank and axis size matter)."""
    g = grid.granularity
    if g.axis is None:
        return torch.Size([1])
    s = grid.scale.shape
    if g.group_size is None:
        return s
    return torch.Size([n * g.group_size if i == g.axis % len(s) else n for i, n in enumerate(s)])


def _float_sim_nodes(grid: AffineGrid, x: str, y: str, base: str, new_inits: list) -> list:
    """``clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` in float ONNX ops (Div, Round, Add, Max, Min, Sub, Mul)."""
    from onnx import helper, numpy_helper

    s = grid.scale.detach().to(torch.float32)  # broadcasts against the tensor
    zp = grid.zero_point.detach().to(torch.float32)
    names = {}
    for key, val in (
        ("s", s),
        ("zp", zp),
        ("lo", torch.tensor(float(grid.qmin))),
        ("hi", torch.tensor(float(grid.qmax))),
    ):
        names[key] = f"{base}/{key}"
        new_inits.append(numpy_helper.from_array(to_numpy(val), names[key]))
    t = [f"{base}/t{i}" for i in range(6)]
    return [
        helper.make_node("Div", [x, names["s"]], [t[0]]),
        helper.make_node("Round", [t[0]], [t[1]]),
        helper.make_node("Add", [t[1], names["zp"]], [t[2]]),
        helper.make_node("Max", [t[2], names["lo"]], [t[3]]),
        helper.make_node("Min", [t[3], names["hi"]], [t[4]]),
        helper.make_node("Sub", [t[4], names["zp"]], [t[5]]),
        helper.make_node("Mul", [t[5], names["s"]], [y]),
    ]


def _grouped_compact(t: Tensor, g: Granularity, shape: torch.Size) -> Tensor:
    """``t`` (broadcasting against ``shape``) as it broadcasts in the grouped shape ``(.., n / gs, gs, ..)``.

    One value per group: a per-group tensor expanded to ``shape`` keeps every ``gs``-th
    element along the axis, then gets a dimension of 1 for the elements of a group.
    """
    axis, gs = g.axis % len(shape), g.group_size  # type: ignore[operator]
    t = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape))
    if t.shape[axis] == shape[axis] and gs > 1:  # type: ignore[operator]
        t = t.index_select(axis, torch.arange(0, shape[axis], gs, device=t.device))
    return t.unsqueeze(axis + 1)


def _level_nodes(levels: LevelGrid, codes: Tensor | None, x: str, y: str, base: str, new_inits: list) -> list:
    """Nodes computing ``y`` from a :class:`LevelGrid`: stored codes (a weight) or nearest levels of ``x``.

    ``codes`` given (``x`` is a constant): ``Cast(codes) -> Gather(codebook) -> Mul(scale)``,
    in the grouped shape and then ``Reshape`` for a per-group scale. ``codes`` ``None``:
    ``Div(x, scale) -> Unsqueeze -> Greater(midpoints) -> Cast -> ReduceSum`` gives the
    nearest level's code (a tie goes to the lower level, as in the simulation).
    A codebook per channel (``levels`` of shape ``(..., K)``) is stored flat, and each
    code offset by ``K`` times its codebook's index before the ``Gather``.
    """
    from onnx import TensorProto, helper, numpy_helper

    lv = levels.levels.detach().to(torch.float32)
    scale = levels.scale.detach().to(torch.float32)
    k = lv.shape[-1]
    lead = tuple(lv.shape[:-1])
    nodes = []

    def init(key: str, value: Tensor, dtype=None) -> str:
        name = f"{base}/{key}"
        new_inits.append(numpy_helper.from_array(to_numpy(value, dtype), name))
        return name

    table = init("codebook", lv.reshape(-1))
    g = levels.granularity
    grouped = codes is not None and g.group_size is not None
    shape = codes.shape if codes is not None else None
    offsets = torch.arange(lv[..., 0].numel()).reshape(lead) * k if lead else None
    if grouped:
        scale = _grouped_compact(scale, g, shape)  # type: ignore[arg-type]
        offsets = None if offsets is None else _grouped_compact(offsets, g, shape)  # type: ignore[arg-type]
    if codes is not None:
        stored = codes
        if grouped:
            stored = g.grouped(codes, "to_onnx")  # (.., n, ..) -> (.., n / gs, gs, ..)
        dtype = "uint8" if k <= 256 else "uint16"
        idx = f"{base}/codes"
        new_inits.append(numpy_helper.from_array(to_numpy(stored, dtype), idx))
        nodes.append(helper.make_node("Cast", [idx], [f"{base}/codes_int"], f"{base}/cast", to=TensorProto.INT64))
        idx = f"{base}/codes_int"
    else:
        v, mids = f"{base}/v", init("midpoints", (lv[..., 1:] + lv[..., :-1]) / 2)  # as level_codes computes them
        s_name = init("scale", scale)
        nodes.append(helper.make_node("Div", [x, s_name], [v], f"{base}/div"))
        last = init("last_axis", torch.tensor([-1]), np.int64)
        nodes.append(helper.make_node("Unsqueeze", [v, last], [f"{base}/v1"], f"{base}/unsqueeze"))
        nodes.append(helper.make_node("Greater", [f"{base}/v1", mids], [f"{base}/above"], f"{base}/greater"))
        nodes.append(helper.make_node("Cast", [f"{base}/above"], [f"{base}/above_int"], f"{base}/cast",
                                      to=TensorProto.INT64))  # fmt: skip
        nodes.append(helper.make_node("ReduceSum", [f"{base}/above_int", last], [f"{base}/codes_int"],
                                      f"{base}/reduce", keepdims=0))  # fmt: skip
        idx = f"{base}/codes_int"
    if offsets is not None:
        off = init("codebook_offsets", offsets, np.int64)
        nodes.append(helper.make_node("Add", [idx, off], [f"{base}/flat_codes"], f"{base}/offset"))
        idx = f"{base}/flat_codes"
    values = f"{base}/levels"
    kind = "weight" if codes is not None else "act"
    nodes.append(helper.make_node("Gather", [table, idx], [values], f"{base}/codebook_{kind}", axis=0))
    s_name = f"{base}/scale" if codes is None else init("scale", scale)
    if not grouped:
        nodes.append(helper.make_node("Mul", [values, s_name], [y], f"{base}/mul"))
        return nodes
    nodes.append(helper.make_node("Mul", [values, s_name], [f"{base}/grouped"], f"{base}/mul"))
    target = init("shape", torch.tensor(list(shape)), np.int64)  # type: ignore[arg-type]
    nodes.append(helper.make_node("Reshape", [f"{base}/grouped", target], [y], f"{base}/reshape"))
    return nodes


def _onnx_float_type(fmt: MinifloatFormat) -> tuple[int, float, int] | None:
    """``(ONNX element type, scale factor, min opset)`` storing ``fmt``'s values exactly, or ``None``.

    FP8 E4M3 and E5M2 are ONNX's ``float8e4m3fn`` and ``float8e5m2`` (opset 19; quantizing to them
    rounds to nearest even and saturates, as the simulation does); MX's INT8 element (E1M6, values
    ``k / 64``) is ``int8`` with the scale divided by 64.
    """
    tp = _require_onnx().TensorProto
    key = (fmt.exp_bits, fmt.man_bits, fmt.bias, fmt.special)
    return {
        (4, 3, 7, "nan_only"): (tp.FLOAT8E4M3FN, 1.0, 19),
        (5, 2, 15, "ieee"): (tp.FLOAT8E5M2, 1.0, 19),
        (1, 6, 1, "finite"): (tp.INT8, 2.0**-6, 13),
    }.get(key)


def _typed_tensor(name: str, elem_type: int, values: Tensor):
    """An initializer of ONNX type ``elem_type`` (``int8``, ``int16`` or a float8) holding ``values`` exactly."""
    from onnx import TensorProto, helper, numpy_helper

    if elem_type in (TensorProto.INT8, TensorProto.INT16):
        dtype = np.int8 if elem_type == TensorProto.INT8 else np.int16
        return numpy_helper.from_array(to_numpy(values.round(), dtype), name)
    dt = torch.float8_e4m3fn if elem_type == TensorProto.FLOAT8E4M3FN else torch.float8_e5m2
    raw = values.detach().cpu().to(dt).view(torch.uint8).numpy().tobytes()
    return helper.make_tensor(name, elem_type, list(values.shape), raw, raw=True)


def _float_grid_nodes(
    rec: _Record,
    rank: int,
    const: bool,
    x: str,
    y: str,
    base: str,
    new_inits: list,
    opset: int,
    consumers: dict,
    who: str,
    rounded: set[str],
) -> list:
    """Nodes computing ``y``, the quantization point of a :class:`FloatGrid` on ``x``.

    A format ONNX stores (:func:`_onnx_float_type`) becomes ``QuantizeLinear -> DequantizeLinear``
    on an activation (MX block scales computed in the graph, opset 21) or a typed initializer and
    ``DequantizeLinear`` on a weight. Otherwise a weight is stored as integers times the format's
    smallest value (``int8``, or ``int16`` at opset 21) with ``DequantizeLinear``, or where no such
    type exists at the opset as codes of the format's values (``Gather`` from the codebook, as
    levels are); an activation is rounded in float operations, the same arithmetic as the simulation
    (its output is added to ``rounded``), then read through an exact Q/DQ of its integer multiples of
    the format's unit where a type holds them (a point check_parity compares).
    """
    from onnx import helper

    fg = rec.float_grid
    if fg is None or rec.codes is None or rec.scales is None:
        raise RuntimeError(f"{who}: internal error: no elements recorded for the input of {rec.name!r}")
    fmt, g, shape = fg.fmt, fg.granularity, rec.codes.shape
    typed = _onnx_float_type(fmt)
    axis = None if g.axis is None else g.axis % rank
    grouped = g.group_size is not None
    # An activation's QuantizeLinear takes its type from output_dtype (opset 21), not a zero point:
    # onnxruntime (1.32) drops a Relu before a QuantizeLinear whose zero point is a 0 of any other type
    # than (u)int8, as if the type could not hold negative numbers.
    native = typed is not None and opset >= (21 if grouped or not const else typed[2])

    def init(key: str, value: Tensor) -> str:
        return _const(f"{base}/{key}", to_numpy(value.float()), np.float32, new_inits)

    if const:
        scale_full = fg.expand(rec.scales, shape) if fg.blocked else rec.scales  # broadcasts against the weight
        if not native and (not grouped or opset >= 21):
            # Every value of a format is an integer times its smallest subnormal: where those integers fit
            # int8 (FP4 E2M1 +-12, FP6 E2M3 +-60) or int16 (FP6 E3M2 +-448, opset 21), the weight is stored
            # as them with the scales times that unit: a plain DequantizeLinear, exact.
            as_int = _integer_multiples(fmt, opset)
            typed, native = ((as_int, fmt.unit, 13), True) if as_int is not None else (typed, native)
        if native:
            elem_type, factor, _ = typed  # type: ignore[misc]
            if fg.blocked:
                scale, attrs = rec.scales, {"axis": axis, "block_size": g.group_size}
            else:
                (scale,), attrs = _layout([rec.scales.detach().float()], g, shape)
            if not grouped and "axis" in attrs and _summed_over(y, attrs["axis"], len(shape), consumers):
                warnings.warn(
                    f"{who}: quantizer {rec.name!r}: its scales change along axis {attrs['axis']}, which the "
                    f"layer sums over; its weights are exported as their float values (the same numbers)",
                    stacklevel=4,
                )
                return _pinned_nodes(to_numpy((rec.codes * scale_full).float()), y, base, new_inits)
            q_name = f"{base}/{fmt.name}_weight"
            new_inits.append(_typed_tensor(q_name, elem_type, rec.codes / factor))
            s_name = init("scale", scale * factor)
            return [helper.make_node("DequantizeLinear", [q_name, s_name], [y], f"{base}/dq", **attrs)]
        levels = fmt.values()
        codes = torch.searchsorted(levels, rec.codes.float().contiguous())  # exact: the codes are values
        if fg.blocked and shape[axis] % g.group_size:  # type: ignore[index, operator]
            warnings.warn(
                f"{who}: quantizer {rec.name!r}: blocks of {g.group_size} do not divide axis {axis} of its "
                f"weight {tuple(shape)}; exported as its float values (the same numbers)",
                stacklevel=4,
            )
            return _pinned_nodes(to_numpy((rec.codes * scale_full).float()), y, base, new_inits)
        grid = LevelGrid(levels, scale_full.float(), g)
        return _level_nodes(grid, codes, x, y, base, new_inits)

    nodes: list = []
    if fg.blocked:
        blocks, n, perm = _mx_blocks_nodes(x, rank, axis, g.group_size, base, nodes, new_inits, opset)  # type: ignore[arg-type]
        amax = f"{base}/block_amax"
        nodes.append(helper.make_node("Abs", [blocks], [f"{base}/block_abs"], f"{base}/block_abs"))
        nodes.extend(_reduce_max(f"{base}/block_abs", amax, base, new_inits, opset))  # (..., n / b, 1)
        scale = _e8m0_nodes(amax, fmt.emax, base, nodes, new_inits)
        inverse = None if perm is None else [perm.index(i) for i in range(rank)]
        attrs = {"axis": axis, "block_size": g.group_size}

        def compact_scale(factor: float) -> str:
            """The block scales in the tensor's layout (``(..., n / b)`` along ``axis``), times ``factor``."""
            compact = f"{base}/scale_blocks"
            squeeze_axes = _const(f"{base}/last_axis", [-1], np.int64, new_inits)
            nodes.append(helper.make_node("Squeeze", [scale, squeeze_axes], [compact], f"{base}/squeeze"))
            if inverse is not None:
                nodes.append(helper.make_node("Transpose", [compact], [f"{base}/scale_t"], f"{base}/scale_t",
                                              perm=inverse))  # fmt: skip
                compact = f"{base}/scale_t"
            if factor != 1.0:
                nodes.append(helper.make_node("Mul", [compact, init("factor", torch.tensor(factor))],
                                              [f"{base}/scale"], f"{base}/factor"))  # fmt: skip
                compact = f"{base}/scale"
            return compact

        if native:
            elem_type, factor, _ = typed  # type: ignore[misc]
            return nodes + _qdq_nodes(x, y, compact_scale(factor), elem_type, attrs, base, new_inits, opset)
        v = f"{base}/v"
        nodes.append(helper.make_node("Div", [blocks, scale], [v], f"{base}/div"))
        r = _round_nodes(v, fmt, base, nodes, new_inits)
        rounded.add(y)
        nodes.append(helper.make_node("Mul", [r, scale], [f"{base}/blocks_q"], f"{base}/mul"))
        flat_shape = _const(f"{base}/flat_shape", [0] * (rank - 1) + [-1], np.int64, new_inits)
        nodes.append(helper.make_node("Reshape", [f"{base}/blocks_q", flat_shape], [f"{base}/padded_q"],
                                      f"{base}/unblock"))  # fmt: skip
        starts = _const(f"{base}/slice_start", [0], np.int64, new_inits)
        axes = _const(f"{base}/slice_axis", [-1], np.int64, new_inits)
        as_int = _integer_multiples(fmt, opset) if opset >= 21 else None  # blocked DequantizeLinear: opset 21
        values = f"{base}/rounded" if as_int is not None else y  # then read through an exact DequantizeLinear
        out = f"{base}/unpadded_q" if inverse is not None else values
        nodes.append(helper.make_node("Slice", [f"{base}/padded_q", starts, n, axes], [out], f"{base}/unpad"))
        if inverse is not None:
            nodes.append(helper.make_node("Transpose", [out], [values], f"{base}/untranspose", perm=inverse))
        if as_int is not None:
            nodes += _qdq_nodes(values, y, compact_scale(fmt.unit), as_int, attrs, base, new_inits, opset)
        return nodes
    (scale,), attrs = _layout([rec.scales.detach().float()], g, _act_shape(rec.scales, g, rank))
    if native:
        elem_type, factor, _ = typed  # type: ignore[misc]
        return _qdq_nodes(x, y, init("scale", scale * factor), elem_type, attrs, base, new_inits, opset)
    s_name = init("scale", rec.scales.detach().float())  # broadcasting against x as in the simulation
    nodes.append(helper.make_node("Div", [x, s_name], [f"{base}/v"], f"{base}/div"))
    r = _round_nodes(f"{base}/v", fmt, base, nodes, new_inits)
    rounded.add(y)
    as_int = _integer_multiples(fmt, opset)
    if as_int is None:
        nodes.append(helper.make_node("Mul", [r, s_name], [y], f"{base}/mul"))
        return nodes
    # The values are integers k times the format's unit times the scale: QuantizeLinear to k is exact,
    # and its DequantizeLinear (scale times unit) gives the same float32 product, a point check_parity reads.
    nodes.append(helper.make_node("Mul", [r, s_name], [f"{base}/rounded"], f"{base}/mul"))
    (scale,), attrs = _layout([rec.scales.detach().float()], g, _act_shape(rec.scales, g, rank))
    return nodes + _qdq_nodes(f"{base}/rounded", y, init("scale_unit", scale * fmt.unit), as_int, attrs, base,
                              new_inits, opset)  # fmt: skip


def _act_shape(scale: Tensor, g: Granularity, rank: int) -> torch.Size:
    """A tensor shape of ``rank`` dimensions that an activation scale of granularity ``g`` fits."""
    if g.axis is None:
        return torch.Size([1] * rank)
    s = list(scale.reshape((1,) * (rank - scale.dim()) + tuple(scale.shape)).shape)
    if g.group_size is not None:
        s[g.axis % rank] *= g.group_size
    return torch.Size(s)


def _qdq_nodes(x: str, y: str, scale: str, elem_type: int, attrs: dict, base: str, new_inits: list, opset: int) -> list:
    """``QuantizeLinear -> [Clip] -> DequantizeLinear`` to ``elem_type`` (a float8, ``int16``, or ``int8``
    clipped to ``[-127, 127]``), the type given by ``output_dtype`` (opset 21) with the zero points left
    out (zero); below opset 21 (``int8`` only), by an ``int8`` zero point of 0."""
    from onnx import TensorProto, helper

    q = f"{base}/q"
    if opset >= 21:
        inputs, typed = [x, scale], {"output_dtype": elem_type}
    else:
        zp = f"{base}/zero_point"
        new_inits.append(helper.make_tensor(zp, TensorProto.INT8, [], [0]))
        inputs, typed = [x, scale, zp], {}
    nodes = [helper.make_node("QuantizeLinear", inputs, [q], f"{base}/quantize", **typed, **attrs)]
    if elem_type == TensorProto.INT8:  # MX's INT8 is symmetric: -128 is not one of its values
        lo, hi = f"{base}/qmin", f"{base}/qmax"
        new_inits.append(helper.make_tensor(lo, TensorProto.INT8, [], [-127]))
        new_inits.append(helper.make_tensor(hi, TensorProto.INT8, [], [127]))
        nodes.append(helper.make_node("Clip", [q, lo, hi], [f"{base}/q_clipped"], f"{base}/clip"))
        q = f"{base}/q_clipped"
    nodes.append(helper.make_node("DequantizeLinear", [q, *inputs[1:]], [y], f"{base}/dequantize", **attrs))
    return nodes


def _integer_multiples(fmt: MinifloatFormat, opset: int) -> int | None:
    """The ONNX integer type holding every value of ``fmt`` as an integer times ``fmt.unit``, its smallest
    subnormal (FP4 E2M1: +-12 in ``int8``; FP6 E2M3: +-60; FP6 E3M2: +-448 in ``int16``, opset 21), or ``None``."""
    tp, k_max = _require_onnx().TensorProto, round(fmt.max_value / fmt.unit)
    return tp.INT8 if k_max <= 127 else tp.INT16 if k_max < 2**15 and opset >= 21 else None


def _const(name: str, value: Any, dtype: Any, new_inits: list) -> str:
    from onnx import numpy_helper

    new_inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return name


def _reduce_max(x: str, y: str, base: str, new_inits: list, opset: int) -> list:
    """``ReduceMax`` over the last axis, keeping it (its axes are an input from opset 18)."""
    from onnx import helper

    if opset >= 18:
        axes = _const(f"{base}/reduce_axes", [-1], np.int64, new_inits)
        return [helper.make_node("ReduceMax", [x, axes], [y], f"{base}/block_max", keepdims=1)]
    return [helper.make_node("ReduceMax", [x], [y], f"{base}/block_max", axes=[-1], keepdims=1)]


def _mx_blocks_nodes(
    x: str, rank: int, axis: int, block: int, base: str, nodes: list, new_inits: list, opset: int
) -> tuple[str, str, list[int] | None]:
    """``x`` with ``axis`` moved last, zero-padded to whole blocks and split: ``(..., ceil(n / b), b)``.

    Returns the blocks, ``n`` (a ``(1,)`` int64 tensor, the axis' size at run time) and the
    permutation applied (``None`` when ``axis`` is already last).
    """
    from onnx import helper

    perm = None
    t = x
    if axis != rank - 1:
        perm = [i for i in range(rank) if i != axis] + [axis]
        t = f"{base}/moved"
        nodes.append(helper.make_node("Transpose", [x], [t], f"{base}/move_axis", perm=perm))
    last = _const(f"{base}/last_index", [rank - 1], np.int64, new_inits)
    b = _const(f"{base}/block_size", [block], np.int64, new_inits)
    nodes += [
        helper.make_node("Shape", [t], [f"{base}/shape"], f"{base}/shape"),
        helper.make_node("Gather", [f"{base}/shape", last], [f"{base}/n"], f"{base}/n", axis=0),
        helper.make_node("Mod", [f"{base}/n", b], [f"{base}/n_mod"], f"{base}/n_mod"),
        helper.make_node("Sub", [b, f"{base}/n_mod"], [f"{base}/pad_b"], f"{base}/pad_b"),
        helper.make_node("Mod", [f"{base}/pad_b", b], [f"{base}/pad"], f"{base}/pad"),  # (-n) mod b
    ]
    zeros = _const(f"{base}/pad_zeros", [0] * (2 * rank - 1), np.int64, new_inits)
    nodes.append(helper.make_node("Concat", [zeros, f"{base}/pad"], [f"{base}/pads"], f"{base}/pads", axis=0))
    nodes.append(helper.make_node("Pad", [t, f"{base}/pads"], [f"{base}/padded"], f"{base}/pad_blocks"))
    target = _const(f"{base}/block_shape", [0] * (rank - 1) + [-1, block], np.int64, new_inits)
    nodes.append(helper.make_node("Reshape", [f"{base}/padded", target], [f"{base}/blocks"], f"{base}/blocks"))
    return f"{base}/blocks", f"{base}/n", perm


def _floor_log2_nodes(a: str, out: str, base: str, nodes: list, new_inits: list) -> None:
    """``out = floor(log2(a))`` for ``a > 0`` (subnormals too), exactly: an estimate from ``Log``, corrected by
    comparing ``a`` with the power of two it gives (both exact)."""
    from onnx import TensorProto, helper

    k = f"{base}/log2"
    inv_ln2 = _const(f"{k}/inv_ln2", 1 / math.log(2), np.float32, new_inits)
    two = _const(f"{k}/two", 2.0, np.float32, new_inits)
    nodes += [
        helper.make_node("Log", [a], [f"{k}/ln"], f"{k}/ln"),
        helper.make_node("Mul", [f"{k}/ln", inv_ln2], [f"{k}/est"], f"{k}/est"),
        helper.make_node("Floor", [f"{k}/est"], [f"{k}/e0"], f"{k}/floor"),
        helper.make_node("Pow", [two, f"{k}/e0"], [f"{k}/p"], f"{k}/pow"),
        helper.make_node("Greater", [f"{k}/p", a], [f"{k}/over"], f"{k}/over"),
        helper.make_node("Cast", [f"{k}/over"], [f"{k}/over_f"], f"{k}/over_f", to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{k}/p", two], [f"{k}/p2"], f"{k}/p2"),
        helper.make_node("LessOrEqual", [f"{k}/p2", a], [f"{k}/under"], f"{k}/under"),
        helper.make_node("Cast", [f"{k}/under"], [f"{k}/under_f"], f"{k}/under_f", to=TensorProto.FLOAT),
        helper.make_node("Sub", [f"{k}/e0", f"{k}/over_f"], [f"{k}/e1"], f"{k}/down"),
        helper.make_node("Add", [f"{k}/e1", f"{k}/under_f"], [out], f"{k}/up"),
    ]


def _e8m0_nodes(amax: str, elem_emax: int, base: str, nodes: list, new_inits: list) -> str:
    """The MX shared scale ``2 ** clamp(floor(log2(amax)) - elem_emax, -127, 127)`` (``2 ** -127`` for an
    all-zero block, NaN for an infinite one), as :func:`~torchquant.quantizers_functional.e8m0_block_scale`
    computes it. (onnxruntime's ``ReduceMax`` may skip a NaN element, whose block the simulation makes NaN.)"""
    from onnx import helper

    k = f"{base}/e8m0"
    # the smallest subnormal: a subnormal maximum keeps its exponent (0 gets 2 ** -127 below)
    tiny = _const(f"{k}/tiny", np.nextafter(np.float32(0), np.float32(1)), np.float32, new_inits)
    zero = _const(f"{k}/zero", 0.0, np.float32, new_inits)
    emax = _const(f"{k}/emax", float(elem_emax), np.float32, new_inits)
    lo = _const(f"{k}/lo", -127.0, np.float32, new_inits)
    hi = _const(f"{k}/hi", 127.0, np.float32, new_inits)
    two = _const(f"{k}/two", 2.0, np.float32, new_inits)
    nodes.append(helper.make_node("Max", [amax, tiny], [f"{k}/amax"], f"{k}/amax"))
    _floor_log2_nodes(f"{k}/amax", f"{k}/e", k, nodes, new_inits)
    nodes += [
        helper.make_node("Sub", [f"{k}/e", emax], [f"{k}/shared"], f"{k}/shared"),
        helper.make_node("Greater", [amax, zero], [f"{k}/nonzero"], f"{k}/nonzero"),
        helper.make_node("Where", [f"{k}/nonzero", f"{k}/shared", lo], [f"{k}/shared_z"], f"{k}/zero_block"),
        helper.make_node("Clip", [f"{k}/shared_z", lo, hi], [f"{k}/shared_c"], f"{k}/clip"),
        helper.make_node("Pow", [two, f"{k}/shared_c"], [f"{k}/pow2"], f"{k}/pow2"),
        helper.make_node("Sub", [amax, amax], [f"{k}/finite"], f"{k}/finite"),  # 0, or NaN for inf
        helper.make_node("Add", [f"{k}/pow2", f"{k}/finite"], [f"{k}/scale"], f"{k}/scale"),
    ]
    return f"{k}/scale"


def _round_nodes(v: str, fmt: MinifloatFormat, base: str, nodes: list, new_inits: list) -> str:
    """``fmt``'s nearest value to ``v`` (ties to even, saturating), as
    :func:`~torchquant.quantizers_functional.minifloat_round` computes it, in float operations."""
    from onnx import helper

    k = f"{base}/round"
    tiny = _const(f"{k}/tiny", np.finfo(np.float32).tiny, np.float32, new_inits)
    e_min = _const(f"{k}/e_min", float(1 - fmt.bias), np.float32, new_inits)  # type: ignore[operator]
    man = _const(f"{k}/man_bits", float(fmt.man_bits), np.float32, new_inits)
    top = _const(f"{k}/max", fmt.max_value, np.float32, new_inits)
    two = _const(f"{k}/two", 2.0, np.float32, new_inits)
    nodes += [  # saturated first: an infinity rounds to the largest value, as in the simulation
        helper.make_node("Abs", [v], [f"{k}/a_raw"], f"{k}/abs"),
        helper.make_node("Min", [f"{k}/a_raw", top], [f"{k}/a"], f"{k}/saturate_input"),
        helper.make_node("Max", [f"{k}/a", tiny], [f"{k}/a_pos"], f"{k}/a_pos"),
    ]
    _floor_log2_nodes(f"{k}/a_pos", f"{k}/e_raw", k, nodes, new_inits)
    nodes += [
        helper.make_node("Max", [f"{k}/e_raw", e_min], [f"{k}/e"], f"{k}/e"),  # subnormals share e_min's step
        helper.make_node("Sub", [f"{k}/e", man], [f"{k}/step_e"], f"{k}/step_e"),
        helper.make_node("Pow", [two, f"{k}/step_e"], [f"{k}/step"], f"{k}/step"),
        helper.make_node("Div", [f"{k}/a", f"{k}/step"], [f"{k}/units"], f"{k}/units"),
        helper.make_node("Round", [f"{k}/units"], [f"{k}/rounded"], f"{k}/round_even"),
        helper.make_node("Mul", [f"{k}/rounded", f"{k}/step"], [f"{k}/q"], f"{k}/q"),
        helper.make_node("Min", [f"{k}/q", top], [f"{k}/q_sat"], f"{k}/saturate"),
        helper.make_node("Sign", [v], [f"{k}/sign"], f"{k}/sign"),
        helper.make_node("Mul", [f"{k}/q_sat", f"{k}/sign"], [f"{k}/out"], f"{k}/signed"),
    ]
    return f"{k}/out"


#: Name prefix of the QuantizeLinear/DequantizeLinear pairs ``_requantize_moved_inputs`` adds (no point of their own).
REQUANTIZE = "tq_requantize"
#: Operators whose output holds elements of their first input only (per-tensor codes commute with them).
MOVES = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "Expand", "Identity", "Split"}
)
#: Inputs that onnxruntime runs as integer products when a DequantizeLinear feeds them.
_PRODUCT_INPUTS = {"MatMul": (0, 1), "Gemm": (0, 1)}


def _requantize_moved_inputs(graph) -> None:
    """Give every product whose input is a quantized tensor moved around its own DequantizeLinear.

    A per-tensor quantization point read through data movement (the reshapes and
    transposes of attention heads, a window partition, ``torch.roll``'s slices and
    concatenation, zero padding) reaches a ``MatMul`` as a float tensor: onnxruntime then
    fuses the weight's ``DequantizeLinear`` into ``MatMulNBits``, which quantizes that input
    again on the fly, per block, and departs from the simulation. Its values are still on
    the point's grid, so ``QuantizeLinear -> DequantizeLinear`` with the same scale and zero
    point before the product returns them exactly (``round((q - z) s / s) + z = q``), and
    onnxruntime can run an integer product on the codes.

    Only where every operand of the product is then dequantized in a layout onnxruntime's
    integer products take: per-tensor activations, and weights per tensor, per output
    channel or per block (it quantizes a float constant operand itself, rounding it
    differently, and refuses a per-channel activation).
    """
    import functools

    from onnx import TensorProto, helper, numpy_helper

    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    integer_types = {getattr(TensorProto, t) for t in ("INT4", "UINT4", "INT8", "UINT8", "INT16", "UINT16")}

    def array(name: str) -> np.ndarray | None:
        t = _constant_value(name, inits, consts)
        if t is None:
            return None
        if not hasattr(t, "dims"):  # a Constant node: its tensor
            t = next((a.t for a in t.attribute if a.name == "value"), None)
        return None if t is None else numpy_helper.to_array(t)

    @functools.cache  # a chain of rolls doubles the paths to the same tensors at each step
    def grid_of(name: str, depth: int = 0) -> tuple | None:
        """``(scale name, zero point name, values)`` of the per-tensor grid ``name`` lies on, moved only."""
        node = producer.get(name)
        if node is None or depth > 64:
            return None
        if node.op_type == "DequantizeLinear":
            if name == node.output[0] and node.input[0] in inits:
                return None  # a weight: already read by the product as it is
            scale = array(node.input[1])
            zp = array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if scale is None or scale.size != 1 or (zp is not None and zp.size != 1):
                return None
            quantize = producer.get(node.input[0])
            if quantize is not None and quantize.op_type == "Clip":  # codes of a narrower grid in a wider type
                quantize = producer.get(quantize.input[0])
            attrs = {} if quantize is None else {a.name: a.i for a in quantize.attribute}
            typed = attrs.get("output_dtype")
            if typed is not None and typed not in integer_types:
                return None  # a float8 grid: no integer product to feed
            if zp is not None and zp.dtype.name.startswith("float"):
                return None  # a float8 grid given by its zero point's type
            return (node.input[1], node.input[2] if zp is not None else "", (float(scale.item()),
                    None if zp is None else (int(zp.item()), zp.dtype.str), typed))  # fmt: skip
        if node.op_type in MOVES:
            return grid_of(node.input[0], depth + 1)
        if node.op_type == "Pad":  # zero padding: 0 is on every affine grid (the zero point)
            given = len(node.input) > 2 and node.input[2]
            value = array(node.input[2]) if given else np.zeros(1)
            mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
            if mode != b"constant" or value is None or np.any(value != 0):  # a value not read: not known zero
                return None
            return grid_of(node.input[0], depth + 1)
        if node.op_type == "Concat":
            grids = [grid_of(i, depth + 1) for i in node.input]
            if grids and all(g is not None and g[2] == grids[0][2] for g in grids):
                return grids[0]
        return None

    def integer_operand(name: str) -> bool:
        """Dequantized right before the product: a per-tensor activation, or a weight (moved or not)
        per tensor, per output channel (axis 0 of the stored codes) or per block."""
        node = producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[0] not in inits:
            scale = array(node.input[1])
            return scale is not None and scale.size == 1
        while node is not None and node.op_type in MOVES:
            node = producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            return False
        scale = array(node.input[1])
        attrs = {a.name: a.i for a in node.attribute}
        return scale is not None and (scale.size == 1 or "block_size" in attrs or attrs.get("axis", 1) == 0)

    pairs: dict[str, list] = {}  # tensor -> its QuantizeLinear and DequantizeLinear
    for node in graph.node:
        operands = _PRODUCT_INPUTS.get(node.op_type, ())
        if len(node.input) <= max(operands, default=0):
            continue
        direct = {i: getattr(producer.get(node.input[i]), "op_type", None) == "DequantizeLinear" for i in operands}
        grids = {i: None if direct[i] else grid_of(node.input[i]) for i in operands}
        if not all(grids[i] is not None or integer_operand(node.input[i]) for i in operands):
            continue
        for i, grid in grids.items():
            if grid is None:
                continue
            name = node.input[i]
            if name not in pairs:
                s_name, z_name, (_, _, typed) = grid
                base = f"{REQUANTIZE}/{name}"
                ins = [s_name, z_name] if z_name else [s_name]
                # without a zero point the type is uint8 unless given: give the codes' own type
                kw = {"output_dtype": typed} if typed is not None and not z_name else {}
                pairs[name] = [
                    helper.make_node("QuantizeLinear", [name, *ins], [f"{base}/q"], f"{base}/quantize", **kw),
                    helper.make_node("DequantizeLinear", [f"{base}/q", *ins], [f"{base}/dq"], f"{base}/dequantize"),
                ]
            node.input[i] = pairs[name][1].output[0]
    if pairs:  # each pair right after the tensor it reads: the graph stays topologically sorted
        order = []
        for n in graph.node:
            order.append(n)
            for o in n.output:
                order.extend(pairs.pop(o, []))
        del graph.node[:]
        graph.node.extend(order)


def _pin_float_weights(proto) -> None:
    """Give the float weights of a ``Conv``/``Gemm`` that reads a ``DequantizeLinear`` a form onnxruntime
    keeps as it is.

    onnxruntime quantizes a float weight initializer on its own int8 grid when the layer reads a
    ``DequantizeLinear`` and its result reaches a ``QuantizeLinear`` (through a ``BatchNormalization``,
    ``Relu`` or ``Clip`` it fuses): a layer whose weights the simulation leaves in float, or a weight
    computed from constants by float operations (the simulation of a quantizer without a grid on a
    weight with a BatchNorm folded in), which it folds into an initializer first. Such weights, computed
    here, are stored as a per-element ``DequantizeLinear`` (sign codes, magnitudes as scales: the same
    numbers) and a ``Reshape``.
    """
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    new_nodes: list = []
    dead: set[int] = set()
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        reads_dq = _dequantized_by(node.input[0], producer) is not None
        chain = _constant_chain(node.input[1], producer, inits)
        if not reads_dq or chain is None or any(n.op_type == "DequantizeLinear" for n in chain):
            continue
        w = node.input[1]
        if not chain:  # a float initializer
            if inits[w].data_type != TensorProto.FLOAT or not _reaches_quantize(node, consumers, outputs):
                continue
            value = numpy_helper.to_array(inits[w])
        else:
            value = _evaluate(proto, chain, inits, w)
        base = f"tq_pinned/{node.name or w}"
        inits_added: list = []
        new_nodes.extend(_pinned_nodes(np.asarray(value, dtype=np.float32), f"{base}/w", base, inits_added))
        graph.initializer.extend(inits_added)
        node.input[1] = f"{base}/w"
        dead.update(id(n) for n in chain)
    if not new_nodes:
        return
    # A chain node stays while anything kept reads it (a chain another layer shares), and so do its inputs.
    needed = {i for n in graph.node if id(n) not in dead for i in n.input} | outputs
    for n in reversed(graph.node):  # topological order: readers come after what they read
        if id(n) in dead and any(o in needed for o in n.output):
            dead.discard(id(n))
            needed.update(n.input)
    keep = [n for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(new_nodes + keep)
    _remove_unused(graph)


def _dq_type(dq: Any, producer: dict, inits: dict) -> int | None:
    """The ONNX type a ``DequantizeLinear`` reads: its initializer's, or the type its ``QuantizeLinear`` makes."""
    from onnx import TensorProto

    if dq.input[0] in inits:
        return inits[dq.input[0]].data_type
    q = producer.get(dq.input[0])
    if q is not None and q.op_type == "Clip":
        q = producer.get(q.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    typed = [a.i for a in q.attribute if a.name == "output_dtype"]
    if typed:
        return typed[0]
    zp = inits.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    return zp.data_type if zp is not None else TensorProto.UINT8


def _dequantized_by(name: str, producer: dict) -> Any:
    """The ``DequantizeLinear`` tensor ``name`` comes from, directly or through operators onnxruntime moves it
    past, or ``None``."""
    node = producer.get(name)
    for _ in range(64):
        if node is None or node.op_type not in _PROPAGATED:
            break
        node = producer.get(node.input[0])
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def _moved_from(name: str, tensors: set[str], producer: dict) -> bool:
    """Whether tensor ``name`` is one of ``tensors``, directly or moved (reshaped, transposed, sliced)."""
    for _ in range(64):
        if name in tensors:
            return True
        node = producer.get(name)
        if node is None or node.op_type not in MOVES:
            return False
        name = node.input[0]
    return False


def _evaluate(proto: Any, chain: list, inits: dict, name: str) -> np.ndarray:
    """The value of tensor ``name``, computed by ``chain`` (:func:`_constant_chain`) from initializers."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    needed = {i for n in chain for i in n.input if i in inits}
    sub = helper.make_model(
        helper.make_graph(
            chain, "constant", [], [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)],
            [inits[i] for i in needed],
        ),
        opset_imports=list(proto.opset_import),
        ir_version=proto.ir_version,
    )  # fmt: skip
    (value,) = ReferenceEvaluator(sub).run(None, {})
    return np.asarray(value, dtype=np.float32)


def _pin_float8_biases(proto) -> None:
    """Store the float bias of a ``Conv``/``Gemm`` with a float8 operand as a ``DequantizeLinear`` of its own.

    onnxruntime (1.32) quantizes the bias initializer of a layer whose inputs both come from a
    ``DequantizeLinear`` to ``int32`` at the scale ``s_x * s_w``, for the integer kernels, whatever
    the types: with a float8 operand, which runs in float, that only rounds the bias. A bias read
    through a ``DequantizeLinear`` (the same numbers, :func:`_pinned_nodes`) is left as it is; so is
    one computed from constants (a BatchNorm folded in), which onnxruntime would fold first.
    """
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    float8 = {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2}
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    new_nodes: list = []
    new_inits: list = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        chain = _constant_chain(node.input[2], producer, inits)
        if chain is None or any(n.op_type == "DequantizeLinear" for n in chain):
            continue  # computed from the input, or already read through a DequantizeLinear
        dqs = [_dequantized_by(node.input[i], producer) for i in (0, 1)]
        if any(dq is None for dq in dqs) or not any(_dq_type(dq, producer, inits) in float8 for dq in dqs):
            continue
        base = f"tq_pinned/{node.name or node.input[2]}/bias"
        if chain:
            value = _evaluate(proto, chain, inits, node.input[2])
        else:
            value = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
        new_nodes.extend(_pinned_nodes(value, f"{base}/value", base, new_inits))
        node.input[2] = f"{base}/value"
    if new_nodes:
        needed = {o.name for o in graph.output}
        kept = []
        for n in reversed(new_nodes + list(graph.node)):  # topological order: readers after what they read
            if any(o in needed for o in n.output):  # the bias chains no one reads any more are dropped
                kept.append(n)
                needed.update(n.input)
        del graph.node[:]
        graph.node.extend(reversed(kept))
        graph.initializer.extend(new_inits)
        _remove_unused(graph)


def _pin_float_grid_weights_of_float_products(graph, rounded: set[str]) -> None:
    """Store as their values the integer-stored float-format weights (FP4/FP6 as multiples of their smallest
    value, per tensor or channel) of a ``MatMul`` whose other input is a float-format activation: rounded
    in float operations (``rounded``: FP4/FP6) or dequantized from float8.

    onnxruntime (1.32) turns ``DequantizeLinear(int8) -> MatMul`` into ``MatMulNBits``, which
    quantizes its other input to int8 on the fly: such an activation would be rounded again. (A float
    input that no quantizer rounds is the documented case of ``MatMulNBits``: the weights stay compact.)
    """
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    float8 = {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2}

    def float_format_input(name: str) -> bool:
        dq = _dequantized_by(name, producer)
        return _moved_from(name, rounded, producer) or (dq is not None and _dq_type(dq, producer, inits) in float8)

    pinned: dict[int, list] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or not float_format_input(node.input[0]):
            continue
        dq = producer.get(node.input[1])
        while dq is not None and dq.op_type == "Transpose":
            dq = producer.get(dq.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or id(dq) in pinned or dq.input[0] not in inits:
            continue
        codes = inits[dq.input[0]]
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        float_grid = codes.name.endswith("_weight") and not codes.name.endswith("/int_weight")
        if not float_grid or codes.data_type not in (TensorProto.INT8, TensorProto.INT16) or "block_size" in attrs:
            continue
        k = numpy_helper.to_array(codes).astype(np.float32)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        if scale.ndim == 1 and k.ndim > 1:  # per channel along axis
            axis = attrs.get("axis", 1) % k.ndim
            scale = scale.reshape([-1 if i == axis else 1 for i in range(k.ndim)])
        added: list = []
        pinned[id(dq)] = _pinned_nodes(k * scale, dq.output[0], f"tq_pinned/{dq.name}", added)
        graph.initializer.extend(added)
    if pinned:
        nodes = [m for n in graph.node for m in pinned.get(id(n), [n])]
        del graph.node[:]
        graph.node.extend(nodes)
        _remove_unused(graph)


def _pinned_nodes(value: np.ndarray, y: str, base: str, new_inits: list) -> list:
    """``y = value`` as a per-element ``DequantizeLinear`` (sign codes, magnitudes as scales: the same
    numbers) and a ``Reshape``; onnxruntime neither folds it nor quantizes it again."""
    from onnx import helper, numpy_helper

    sign, magnitude, shape, flat = (f"{base}/{k}" for k in ("sign", "magnitude", "shape", "flat"))
    new_inits.append(numpy_helper.from_array(np.sign(value).astype(np.int8).reshape(-1), sign))
    new_inits.append(numpy_helper.from_array(np.abs(value).reshape(-1), magnitude))
    new_inits.append(numpy_helper.from_array(np.array(value.shape, np.int64), shape))
    return [
        helper.make_node("DequantizeLinear", [sign, magnitude], [flat], f"{base}/dq", axis=0),
        helper.make_node("Reshape", [flat, shape], [y], f"{base}/reshape"),
    ]


def _reaches_quantize(node: Any, consumers: dict[str, list], outputs: set[str]) -> bool:
    """Whether ``node``'s result is quantized, alone or after the operators onnxruntime fuses into it."""
    while node.output[0] not in outputs and len(users := consumers.get(node.output[0], [])) == 1:
        node = users[0]
        if node.op_type == "QuantizeLinear":
            return True
        if node.op_type not in ("BatchNormalization", "Relu", "Clip"):
            return False
    return False


def _constant_chain(name: str, producer: dict, inits: dict) -> list | None:
    """The nodes that compute tensor ``name`` from initializers and ``Constant`` nodes alone, in
    execution order; ``None`` where a graph input reaches it, ``[]`` for an initializer."""
    order: list = []
    seen: set[str] = set()

    def visit(t: str) -> bool:
        if t in inits or t in seen or t == "":
            return True
        n = producer.get(t)
        if n is None:
            return False
        seen.update(n.output)
        if not all(visit(i) for i in n.input):
            return False
        order.append(n)
        return True

    return order if visit(name) else None


def _remove_unused(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(nodes)
