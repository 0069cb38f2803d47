"""Fused fake-quantization kernels for CUDA tensors, written in Triton.

The CPU path of every primitive is plain torch code (:mod:`torchquant.quantizers_functional`).
On a GPU that code launches four or five kernels per call and computes a quantizer's grid
with a dozen more tiny ones; here one kernel does each job:

* :func:`fake_quant_grid`: ``clamp(round(x / scale), lo - zero_point, hi - zero_point) * scale``
  for a per-tensor, per-channel or per-element grid (the eager CUDA path of
  :func:`~torchquant.affine_quantize` and :func:`~torchquant.qfmt_quantize`);
* :func:`fake_quant_ranges`: the same, with the grid computed inside the kernel from an
  observer's compact ``(min, max)`` exactly as :meth:`AffineQuantizer.qparams
  <torchquant.AffineQuantizer.qparams>` does, per tensor, channel or group (the eager CUDA
  path of :class:`~torchquant.AffineQuantizer`); :func:`fake_quant_qfmt` and
  :func:`minifloat_ranges` do the same for :class:`~torchquant.QfmtQuantizer`'s step
  and :class:`~torchquant.MinifloatQuantizer`'s scale;
* :func:`observe_minmax`: one launch folds a batch's ``(min, max)`` into the state of
  ``BatchMinMax``, ``RunningMinMax`` or ``ExpAvgMinMax``, with no host synchronisation: a
  batch containing NaN or Inf leaves the state unchanged and is counted on the device, and
  the observer raises when its ranges are next read from the host;
  :func:`observe_minmax_rows` computes the batch's ``(min, max)`` in the same launch where
  the ranges are the batch's consecutive rows (per tensor, per channel along the first axis,
  per group along the last, up to ``MAX_OBSERVED_ROWS``): its programs merge their ranges
  with integer atomics and the last to finish updates the state.

Per-channel and per-group parameters (a grid, an LSQ step, a minifloat scale) are read and
turned into a grid once per run of the elements that share them (a channel's, a group's), not
per element, where the runs are a multiple of 16 elements or longer than 256 (``Layout.runs``).

A QAT call (observe, then quantize) is then two launches (the observer's, the fake quant;
three for other granularities, with torch's reduction first) with no ``.item()``, so a QAT
step can be captured in a CUDA graph.

Numerics are the CPU path's, bit for bit: float32 arithmetic, true division by the step,
round half to even, one multiplication. The backward of the straight-through estimator is
the identity and launches nothing; for the clipped variant (``gradient_clip=True``) the
fake quant also writes the mask, a bit per element (what the backward keeps: a 32nd of a
float32 ``x``), and the backward is one kernel that reads it.

Eager calls reach the kernels through ``torch.autograd.Function`` (about 4 us of Python
per call, against 23 us through the dispatcher), or directly where no gradient can flow
(no grad mode, an input that needs none: calibration, evaluation). The same computations
are registered as the custom ops ``torch.ops.torchquant.fake_quant_grid``, ``fake_quant_ranges``, ``lsq``,
``minifloat`` and ``mx`` (in :mod:`torchquant.quantizers_functional`, with fake tensors
and autograd) for code that wants one opaque op in a graph. Under
``torch.compile`` the quantizers keep emitting plain torch operations, which inductor fuses
with their neighbours.

CI has no GPU: the tests run the same kernel source on CPU tensors through Triton's
interpreter (:func:`interpreted`) and compare it with the CPU path bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from ..granularity import Granularity

__all__ = [
    "enabled",
    "fake_quant_grid",
    "fake_quant_qfmt",
    "fake_quant_ranges",
    "interpreted",
    "lsq",
    "lsq_gradients",
    "minifloat",
    "minifloat_ranges",
    "mx",
    "observe_minmax",
    "observe_minmax_rows",
    "observe_scratch",
    "triton_available",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Device types whose tensors take the Triton path. Tests add "cpu" to run the interpreter.
_DEVICES = {"cuda"}
_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (it ships with torch's CUDA wheels on Linux)."""
    return importlib.util.find_spec("triton") is not None


def enabled(x: Tensor) -> bool:
    """Whether ``x`` takes the kernel path: a float32/16 or bfloat16 CUDA tensor, eager, Triton present.

    Under ``torch.compile``, ``torch.jit`` or ``torch.fx`` tracing the plain torch path is
    recorded instead, so that the compiler can fuse it.
    """
    # Tracing first: under torch.compile the rest is never traced (dynamo would break the graph
    # on triton_available's import machinery). The fx check covers make_fx too, whose tensors are
    # real or fake, not Proxies. Called twice a QAT call: x.is_cuda, not x.device (a new
    # torch.device, 0.3 us).
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _fx_tracing():
        return False
    on = "cuda" in _DEVICES if x.is_cuda else x.device.type in _DEVICES
    return on and x.dtype in _DTYPES and x.numel() < 2**31 and triton_available()


def _impl(device: torch.device) -> ModuleType:
    if device.type == "cpu":
        return interpreted()
    return _compiled()


@functools.cache
def _compiled() -> ModuleType:
    return importlib.import_module("torchquant.kernels._triton")


@functools.lru_cache(maxsize=1024)
def _ranges_layout(shape: torch.Size, granularity: Granularity, interpret: bool):
    """``(compact shape, Layout)`` of ``granularity`` on a tensor of ``shape`` (cached: the QAT hot path)."""
    k = interpreted() if interpret else _compiled()
    compact = granularity.compact_shape(shape)
    return compact, k.Layout.for_granularity(shape, granularity.axis, granularity.group_size)


@functools.cache
def interpreted() -> ModuleType:
    """The kernel module loaded a second time under ``TRITON_INTERPRET=1``: the same kernels on CPU tensors.

    Slow (NumPy, one program at a time); for tests on machines without a GPU.
    """
    import triton.runtime.jit  # triton itself imported with its compiled flavour

    # Imported lazily by Triton's first launch, which asserts the flavour it was imported with.
    with contextlib.suppress(ImportError):
        import triton.experimental.gluon  # noqa: F401
    name = "torchquant.kernels._triton_interpreted"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "_triton.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return module


# --------------------------------------------------------------------------- fake quant


class _GridFQ(torch.autograd.Function):
    """The fake quant on the grid ``(scale, zero point, lo, hi)``; backward: identity or clipped STE."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, layout, mode, lo, hi, clip):  # type: ignore[override]
        return _fake_quant(ctx, clip, x, scale, zero_point, layout, mode, lo, hi)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # straight-through: d out / d x := 1; clipped: 1 where x lay inside the grid's range, 0 outside
        g = _masked_grad(ctx, grad) if ctx.clip else grad
        return g, None, None, None, None, None, None, None


def _untracked(x: Tensor) -> bool:
    """Whether no gradient can flow through ``x`` here (no grad mode, or ``x`` needs none; no forward-mode AD
    level open): the kernel then launches without its ``autograd.Function``, about 2.7 us of host time less."""
    return not (x.requires_grad and torch.is_grad_enabled()) and _forward_ad._current_level < 0


def _like(grad: Tensor, shape: torch.Size, stride: tuple[int, ...]) -> Tensor:
    """``grad`` laid out in memory as the dense ``x`` of ``shape`` and ``stride`` is: the backward kernels walk
    both in memory order (``x`` may be channels_last, and the incoming gradient anything, broadcast included)."""
    if grad.stride() == stride:
        return grad
    return torch.empty_strided(shape, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def _fake_quant(ctx, clip: bool, x: Tensor, *args) -> Tensor:
    """``fake_quant(x, *args)`` for an autograd Function's forward; with ``clip`` and a gradient to take, the
    kernel also writes the clipped STE's mask, kept for :func:`_masked_grad` (a 32nd of ``x``'s bytes, taken now:
    an observer updates its ranges in place before the backward)."""
    k = _impl(x.device)
    ctx.clip = clip and ctx.needs_input_grad[0]
    if not ctx.clip:
        return k.fake_quant(x, *args)
    out, bits = k.fake_quant(x, *args, with_mask=True)
    ctx.save_for_backward(bits)
    ctx.x_layout = x.shape, x.stride()
    return out


def _masked_grad(ctx, grad: Tensor) -> Tensor:
    """The clipped STE's gradient from the mask :func:`_fake_quant` kept."""
    (bits,) = ctx.saved_tensors
    grad = _like(grad, *ctx.x_layout)  # the mask is in x's memory order
    return _impl(grad.device).masked_grad(grad, bits)


def _dense(x: Tensor, indexed: bool) -> bool:
    # Elementwise kernels walk memory in order: any dense layout works for one parameter,
    # indexed parameters need the logical (row-major) order.
    if x.is_contiguous():
        return True
    return not indexed and x.is_contiguous(memory_format=torch.channels_last)


def fake_quant_grid(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float | None,
    lo: float,
    hi: float,
    clip_grad: bool = False,
) -> Tensor | None:
    """``clamp(round(x / scale), lo - zero_point, hi - zero_point) * scale`` in one kernel.

    Args:
        x: CUDA tensor (see :func:`enabled`).
        scale: 0-d, or broadcasting against ``x`` along one run of adjacent axes (per channel, per
            group on a ``(rows, groups, group_size)`` view), or ``x``'s shape.
        zero_point: like ``scale``, a number, or ``None`` (codes clamp to ``[lo, hi]``).
        lo: lowest integer code (``0`` affine, ``min_int`` Q-format).
        hi: highest integer code (``2 ** n - 1`` affine, ``max_int`` Q-format).
        clip_grad: zero the gradient outside the range (clipped STE); else identity.

    Returns:
        The fake-quantized tensor (``x``'s shape, dtype and strides), or ``None`` when the
        parameters' shapes fit no kernel layout (the caller then runs the torch path).
    """
    dev = x.device
    if not isinstance(scale, Tensor):
        scale = torch.full((), float(scale), dtype=torch.float32, device=dev)
    if zero_point is not None and not isinstance(zero_point, Tensor):
        lo, hi, zero_point = -(float(zero_point) - lo), hi - float(zero_point), None
    k = _impl(dev)
    layout = k.Layout.for_broadcast(x, scale)
    if layout is None or scale.device != dev or scale.dtype not in _DTYPES:
        return None
    if zero_point is not None:
        zl = k.Layout.for_broadcast(x, zero_point)
        if zl is None or zl.args() != layout.args() or zero_point.device != dev or not zero_point.is_floating_point():
            return None
    if not _dense(x, layout.gran != k.PER_TENSOR):
        return None
    mode = k.MODE_BOUNDS if zero_point is None else k.MODE_GRID
    if _untracked(x):
        return k.fake_quant(x, scale, zero_point, layout, mode, float(lo), float(hi))
    return _GridFQ.apply(x, scale, zero_point, layout, mode, float(lo), float(hi), bool(clip_grad))


class _RangesFQ(torch.autograd.Function):
    """A fake quant with the grid computed from ``(min, max)``; backward: identity or clipped STE."""

    @staticmethod
    def forward(ctx, x, min_val, max_val, layout, mode, grid, clip):  # type: ignore[override]
        return _fake_quant(ctx, clip, x, min_val, max_val, layout, mode, *grid)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        # straight-through: d out / d x := 1; clipped: 1 where x lay inside the grid's range, 0 outside
        return _masked_grad(ctx, grad) if ctx.clip else grad, *(None,) * 6


def _ranges_layout_for(x: Tensor, min_val: Tensor, max_val: Tensor, granularity: Granularity):
    """``(kernel module, Layout)`` for compact float32 ranges on ``x``'s device, or ``None`` (torch path).

    Raises:
        ValueError: the ranges do not have the compact shape ``granularity`` gives ``x``.
    """
    k = _impl(x.device)
    shape, layout = _ranges_layout(x.shape, granularity, x.device.type == "cpu")
    if min_val.shape != shape or max_val.shape != shape:
        raise ValueError(
            f"ranges of shape {tuple(min_val.shape)} do not fit a tensor of shape {tuple(x.shape)} at {granularity}"
        )
    if (
        not _dense(x, layout.gran != k.PER_TENSOR)
        or min_val.dtype != torch.float32
        or max_val.dtype != torch.float32
        or min_val.device != x.device
        or max_val.device != x.device
    ):
        return None
    return k, layout


def _ranges_fq(
    x: Tensor, min_val: Tensor, max_val: Tensor, granularity: Granularity, mode: str, grid: tuple, clip: bool
) -> Tensor | None:
    found = _ranges_layout_for(x, min_val, max_val, granularity)
    if found is None:
        return None
    k, layout = found
    if _untracked(x):
        return k.fake_quant(x, min_val, max_val, layout, getattr(k, mode), *grid)
    return _RangesFQ.apply(x, min_val, max_val, layout, getattr(k, mode), grid, bool(clip))


def fake_quant_ranges(
    x: Tensor,
    min_val: Tensor,
    max_val: Tensor,
    granularity: Granularity,
    n_levels: int,
    symmetric: bool = False,
    power_of_two: bool = False,
    fixed_zero_point: float | None = None,
    clip_grad: bool = False,
) -> Tensor | None:
    """Affine fake quantization with the grid computed in the kernel from compact ranges.

    Bit-identical to ``AffineQuantizer.quantize`` on the CPU: the range is widened to
    include 0 (made symmetric when ``symmetric``), ``delta = max((max - min) / (n_levels - 1),
    eps)`` (rounded up to a power of two when ``power_of_two``), ``zero_point =
    round(-min / delta)`` or ``fixed_zero_point``.

    Args:
        x: CUDA tensor (see :func:`enabled`), any shape ``granularity`` fits.
        min_val: float32 range minima in ``granularity.compact_shape(x.shape)``.
        max_val: the maxima, same shape.
        granularity: where the ranges change.
        n_levels: ``2 ** n_bits``.
        symmetric: as in ``AffineQuantizer``.
        power_of_two: as in ``AffineQuantizer``.
        fixed_zero_point: the zero point of a symmetric grid, or ``None``.
        clip_grad: clipped STE instead of the identity.

    Returns:
        The fake-quantized tensor, or ``None`` when ``x``'s layout needs the torch path.

    Raises:
        ValueError: the ranges do not have the compact shape ``granularity`` gives ``x``.
    """
    grid = (0.0, 0.0, int(n_levels), bool(symmetric), bool(power_of_two), fixed_zero_point)
    return _ranges_fq(x, min_val, max_val, granularity, "MODE_RANGES", grid, clip_grad)


def fake_quant_qfmt(
    x: Tensor,
    min_val: Tensor,
    max_val: Tensor,
    granularity: Granularity,
    n_bits: int,
    signed: bool,
    min_int: int,
    max_int: int,
    clip_grad: bool = False,
) -> Tensor | None:
    """Q-format fake quantization with the step computed in the kernel from compact ranges.

    Bit-identical to ``QfmtQuantizer.quantize`` on the CPU: the step is
    :func:`~torchquant.qfmt_step` of the ranges (``n_bits``, ``signed``), the codes
    ``[min_int, max_int]`` (``QfmtQuantizer.int_range``).

    Args:
        x: CUDA tensor (see :func:`enabled`), any shape ``granularity`` fits.
        min_val: float32 range minima in ``granularity.compact_shape(x.shape)``.
        max_val: the maxima, same shape.
        granularity: where the ranges change.
        n_bits: bits per code, the sign bit included when ``signed``.
        signed: signed or unsigned codes.
        min_int: the lowest code.
        max_int: the highest code.
        clip_grad: clipped STE instead of the identity.

    Returns:
        The fake-quantized tensor, or ``None`` when ``x``'s layout needs the torch path.

    Raises:
        ValueError: the ranges do not have the compact shape ``granularity`` gives ``x``.
    """
    # The kernel's level count carries the step's width: n_levels - 1 = n_bits - signed.
    grid = (float(min_int), float(max_int), int(n_bits) - int(bool(signed)) + 1, False, False, None)
    return _ranges_fq(x, min_val, max_val, granularity, "MODE_QFMT", grid, clip_grad)


class _LSQFn(torch.autograd.Function):
    """LSQ / LSQ+ in one kernel each way; backward recomputes ``v`` and the rounding from ``x``."""

    @staticmethod
    def forward(ctx, x, step, offset, layout, qn, qp, grad_scale):  # type: ignore[override]
        ctx.save_for_backward(x, step, offset)
        ctx.args = (layout, qn, qp, grad_scale)
        return _impl(x.device).lsq_forward(x, step, offset, layout, qn, qp)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, step, offset = ctx.saved_tensors
        layout, qn, qp, grad_scale = ctx.args
        return *_lsq_grads(grad, x, step, offset, layout, qn, qp, grad_scale), None, None, None, None


def _lsq_grads(grad, x, step, offset, layout, qn, qp, grad_scale):
    gx, ts, tb = _impl(x.device).lsq_backward(_like(grad, x.shape, x.stride()), x, step, offset, layout, qn, qp)
    # Esser et al. 2020, eq. 3 and Bhalgat et al. 2020, reduced to the parameters' shapes
    gs = ts.sum_to_size(step.shape) * grad_scale
    gb = (tb.sum_to_size(offset.shape) * grad_scale).to(offset.dtype) if tb is not None else None
    return gx.to(grad.dtype), gs.to(step.dtype), gb


def _param_layout(k: ModuleType, x: Tensor, *params: Tensor | None):
    """The one kernel layout that every given parameter tensor fits, or ``None``."""
    layout = None
    for p in params:
        if p is None:
            continue
        if p.device != x.device or p.dtype not in _DTYPES:
            return None
        pl = k.Layout.for_broadcast(x, p)
        if pl is None or (layout is not None and (pl.gran, *pl.args()) != (layout.gran, *layout.args())):
            return None
        layout = pl
    if layout is None or not _dense(x, layout.gran != k.PER_TENSOR):
        return None
    return layout


def lsq(x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int, grad_scale: float) -> Tensor | None:
    """:func:`~torchquant.lsq_quantize` in one kernel (forward) and one kernel plus sums (backward).

    ``None`` when the parameters' shapes fit no kernel layout.
    """
    k = _impl(x.device)
    layout = _param_layout(k, x, step, offset)
    if layout is None:
        return None
    if _untracked(x) and _untracked(step) and (offset is None or _untracked(offset)):
        return k.lsq_forward(x, step, offset, layout, int(qn), int(qp))
    return _LSQFn.apply(x, step, offset, layout, int(qn), int(qp), float(grad_scale))


def lsq_gradients(
    grad: Tensor, x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int, grad_scale: float
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """LSQ's gradients for ``(x, step, offset)`` in one kernel plus sums, recomputed from ``x``.

    ``None`` when the parameters' shapes fit no kernel layout.
    """
    k = _impl(x.device)
    layout = _param_layout(k, x, step, offset)
    if layout is None:
        return None
    return _lsq_grads(grad, x, step, offset, layout, int(qn), int(qp), float(grad_scale))


class _STE(torch.autograd.Function):
    """A kernel's output with the straight-through gradient ``d out / d x := 1``."""

    @staticmethod
    def forward(ctx, x, run):  # type: ignore[override]
        return run()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def _ste(x: Tensor, run) -> Tensor:
    """``run()``, the straight-through estimator's output for ``x``: through ``_STE`` where a gradient can flow."""
    return run() if _untracked(x) else _STE.apply(x, run)


def minifloat(x: Tensor, scale: Tensor, man_bits: int, bias: int, max_value: float) -> Tensor | None:
    """:func:`~torchquant.minifloat_quantize` in one kernel, or ``None`` when ``scale`` fits no layout."""
    k = _impl(x.device)
    layout = _param_layout(k, x, scale)
    if layout is None:
        return None
    return _ste(x, lambda: k.minifloat(x, scale, None, layout, man_bits, bias, max_value))


def minifloat_ranges(
    x: Tensor,
    min_val: Tensor,
    max_val: Tensor,
    granularity: Granularity,
    man_bits: int,
    bias: int,
    max_value: float,
) -> Tensor | None:
    """:meth:`MinifloatQuantizer.quantize <torchquant.MinifloatQuantizer.quantize>` in one kernel.

    The scale ``max(max(|min|, |max|) / max_value, tiny)`` is computed in the kernel from the
    observer's compact ranges (float32, in ``granularity.compact_shape(x.shape)``). ``None``
    when ``x``'s layout or the ranges need the torch path.

    Raises:
        ValueError: the ranges do not have the compact shape ``granularity`` gives ``x``.
    """
    found = _ranges_layout_for(x, min_val, max_val, granularity)
    if found is None:
        return None
    k, layout = found
    return _ste(x, lambda: k.minifloat(x, min_val, max_val, layout, man_bits, bias, max_value))


def mx(
    x: Tensor, man_bits: int, bias: int, max_value: float, elem_emax: int, block_size: int, axis: int
) -> Tensor | None:
    """:func:`~torchquant.mx_quantize` in one kernel (blocks along ``axis``; other axes are moved first)."""
    k = _impl(x.device)
    moved = x.movedim(axis, -1).contiguous()  # (..., n), blocks along the last axis

    def run() -> Tensor:
        return k.mx(moved, man_bits, bias, max_value, elem_emax, block_size).movedim(-1, axis)

    return _ste(x, run)


# --------------------------------------------------------------------------- observers

KIND_BATCH, KIND_RUNNING, KIND_EMA = 0, 1, 2


def observe_minmax(
    kind: int,
    batch_min: Tensor,
    batch_max: Tensor,
    min_val: Tensor,
    max_val: Tensor,
    nonfinite: Tensor,
    num_batches: Tensor | None = None,
    ema_min: Tensor | None = None,
    ema_max: Tensor | None = None,
    decay: Tensor | None = None,
    momentum: float = 0.0,
) -> None:
    """Fold a batch's compact ``(min, max)`` into a min/max observer's float32 state, in one launch.

    ``kind``: :data:`KIND_BATCH` (the batch's range), :data:`KIND_RUNNING` (running min and
    max; ``num_batches`` counts), :data:`KIND_EMA` (bias-corrected exponential moving
    average with ``ema_min``, ``ema_max``, ``decay = momentum ** n`` and ``num_batches``).
    A batch with NaN or Inf leaves the state unchanged and adds 1 to ``nonfinite``
    (an int32 0-d tensor), without a host synchronisation.
    """
    _impl(min_val.device).observe(
        kind,
        batch_min,
        batch_max,
        min_val,
        max_val,
        nonfinite,
        num_batches,
        ema_min,
        ema_max,
        decay,
        momentum,
    )


# Rows of a batch that observe_minmax_rows reduces: beyond these the merges of its programs into one ticket would
# cost more than the launch they save.
MAX_OBSERVED_ROWS = 4096


def observe_scratch(rows: int, device: torch.device) -> Tensor:
    """The scratch :func:`observe_minmax_rows` needs for ``rows`` rows (reset; each launch leaves it reset)."""
    scratch = torch.zeros(2 * rows + 2, dtype=torch.int32, device=device)  # fills, no copy from the host
    scratch[:rows].fill_(2**31 - 1)  # the minima's order keys, then the maxima's, the non-finite count, a ticket
    scratch[rows : 2 * rows].fill_(-(2**31))
    return scratch


def observe_minmax_rows(
    kind: int,
    x: Tensor,
    rows: int,
    scratch: Tensor,
    min_val: Tensor,
    max_val: Tensor,
    nonfinite: Tensor,
    num_batches: Tensor | None = None,
    ema_min: Tensor | None = None,
    ema_max: Tensor | None = None,
    decay: Tensor | None = None,
    momentum: float = 0.0,
) -> bool:
    """:func:`observe_minmax` with the batch's ``(min, max)`` reduced in the same launch.

    ``x`` is read as ``rows`` consecutive rows of equal length, one range each (one row per tensor; a
    channel's row along the first axis; a group along the last), whose ranges ``min_val`` and ``max_val``
    hold in order. The programs reducing ``x`` merge their ranges with integer atomics into
    ``scratch`` (from :func:`observe_scratch`; one launch at a time may use it) and the last one to finish
    updates the state: one launch per QAT observation instead of two, still without a host sync.

    Returns ``False``, launching nothing, where ``x`` is not laid out in those rows (not contiguous; per tensor,
    not dense either) or is too long for the kernel's int32 offsets.
    """
    if not _dense(x, rows > 1):
        return False
    return _impl(x.device).observe_rows(
        kind, x, rows, scratch, min_val, max_val, nonfinite, num_batches, ema_min, ema_max, decay, momentum
    )
