"""Stateless, differentiable quantization primitives.

Every function here is pure: it takes a tensor and the parameters of a grid and
returns the fake-quantized tensor (quantized then dequantized, in the input's
dtype). Scales and zero points broadcast against ``x``, so one function serves
per-tensor, per-channel and per-group quantization: pass a 0-d scale, a scale
shaped ``(C, 1, 1, 1)`` or a scale shaped like ``x``.

Rounding is half-to-even (``torch.round``), the IEEE default that numpy,
torch.ao and ONNX ``QuantizeLinear`` use.

Backward passes are straight-through estimators (Bengio et al. 2013): the
incoming gradient is returned unchanged for ``x``. No gradient flows to the grid
parameters here; quantizers that learn their grid (LSQ, PACT) build on
:func:`round_ste` instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import kernels
from .granularity import Granularity

__all__ = [
    "affine_qparams",
    "affine_quantize",
    "compute_dtype",
    "e8m0_block_scale",
    "gradient_clip",
    "inverse_rectified_sigmoid",
    "level_codes",
    "level_neighbours",
    "level_quantize",
    "level_values",
    "lsq_quantize",
    "minifloat_quantize",
    "minifloat_round",
    "mx_block_scales",
    "mx_quantize",
    "pact_quantize",
    "qfmt_quantize",
    "qfmt_step",
    "rectified_sigmoid",
    "round_ste",
    "scaled_sign",
    "sign_ste",
    "straight_through",
]

_HALF_TYPES = (torch.float16, torch.bfloat16)
_EPS = torch.finfo(torch.float32).eps
_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)


def _is_tracing() -> bool:
    """True under torch.compile / torch.export, torch.jit tracing or torch.fx symbolic tracing."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or _fx_tracing()


def _bound(v: Tensor | float) -> Tensor | float:
    """A clamp bound as a Python number where that is free, else the tensor.

    Number bounds let the fake quant clamp in one pass instead of two. A 0-d CPU
    tensor is read without a device sync; under tracing (compile, fx, jit) the
    tensor stays, so the bound is not baked into the graph as a constant.
    """
    if not isinstance(v, Tensor):
        return float(v)
    if v.dim() == 0 and v.device.type == "cpu" and not _is_tracing():
        return v.item()
    return v


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype in which grid arithmetic on ``x`` is done.

    float16 and bfloat16 cannot represent every integer of an 8-bit grid after
    division, so their grid arithmetic runs in float32; float32 and float64 run
    in their own dtype. Integer tensors raise ``TypeError``.
    """
    if not x.is_floating_point():
        raise TypeError(f"torchquant: expected a floating-point tensor, got dtype {x.dtype}")
    return torch.float32 if x.dtype in _HALF_TYPES else x.dtype


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``: ``t`` itself when it already is, never a no-op ``t.to(dtype)``.

    The value an autograd.Function's forward returns must be neither mutated in place nor
    a no-op alias (``.to`` to its own dtype) of an intermediate: torch 2.11's dynamo then
    sends the Function's gradient to the wrong slot and the compiled STE gradient is zero
    (pytorch/pytorch#180642). ``tests/test_quantizers_functional.py`` checks every
    primitive's compiled gradient against eager, its traced forward for in-place ops, and
    the forwards' source for returned ``.to`` casts.
    """
    return t if t.dtype == dtype else t.to(dtype)


def _fake_quant(x: Tensor, delta: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    # clamp(round(x / delta), lo, hi) * delta, with one output allocation.
    dt = compute_dtype(x)
    if delta.dtype != dt:
        delta = delta.to(dt)
    if _is_tracing():
        # Out of place under tracing (see _cast); the compiler fuses these ops anyway.
        code = torch.round(torch.div(x.to(dt), delta))
        if isinstance(lo, Tensor) or isinstance(hi, Tensor):
            code = torch.maximum(code, lo.to(dt)) if isinstance(lo, Tensor) else torch.clamp(code, min=lo)
            code = torch.minimum(code, hi.to(dt)) if isinstance(hi, Tensor) else torch.clamp(code, max=hi)
        else:
            code = torch.clamp(code, lo, hi)
        return _cast(torch.mul(code, delta), x.dtype)
    out = torch.div(x if x.dtype == dt else x.to(dt), delta)
    if isinstance(lo, Tensor) or isinstance(hi, Tensor):
        # maximum/minimum with out= are vectorised for tensor bounds; clamp_ with tensor bounds
        # (even 0-d ones) is not: on a 16M-element tensor, 16 ms for both against 32 ms for clamp_.
        out.round_()
        torch.maximum(out, torch.as_tensor(lo, dtype=dt, device=out.device), out=out)
        torch.minimum(out, torch.as_tensor(hi, dtype=dt, device=out.device), out=out)
    else:
        # Number bounds: one vectorised clamp_ pass. Clamping before rounding is exact
        # because the bounds are integers.
        out.clamp_(lo, hi).round_()
    out.mul_(delta)
    return _cast(out, x.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """``clamp(round(x / delta), lo, hi) * delta``; backward: identity for ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, delta: Tensor, lo: Tensor, hi: Tensor) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            return _fake_quant(x, delta, lo, hi)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Straight-through: d out / d x := 1 everywhere.
        return grad, None, None, None


def _as_tensor(v: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(v, Tensor):
        return v
    return torch.tensor(v, dtype=compute_dtype(like), device=like.device)


def affine_quantize(x: Tensor, delta: Tensor | float, zero_point: Tensor | float, n_levels: int) -> Tensor:
    """Affine (asymmetric, uniform) fake quantization with a straight-through gradient.

    ``x_int = clamp(round(x / delta) + zero_point, 0, n_levels - 1)`` and the
    output is ``(x_int - zero_point) * delta``.

    Args:
        x: input of any shape, floating point.
        delta: step size, positive; a 0-d tensor (per-tensor) or a tensor that
            broadcasts against ``x`` (per-channel ``(C, 1, ...)``, per-group).
        zero_point: integer-valued zero point, same shape rules as ``delta``.
        n_levels: number of grid levels, ``2 ** n_bits`` for an n-bit grid.

    Returns:
        Tensor of ``x``'s shape and dtype, on the grid. Backward: the incoming
        gradient for ``x`` (no gradient to ``delta`` or ``zero_point``).

    Raises:
        ValueError: ``n_levels`` is not an int of at least 2, or a number ``delta`` is not
            positive and finite, or a number ``zero_point`` is not an integer. (Tensor
            arguments are not inspected: that would wait for the device.)

    Example:
        >>> affine_quantize(torch.tensor([0.26, -1.0, 9.0]), 0.5, 2, 8)
        tensor([ 0.5000, -1.0000,  2.5000])
    """
    _check_grid_numbers("affine_quantize", delta, zero_point, n_levels)
    if kernels.enabled(x):  # one fused CUDA kernel, same numerics
        out = kernels.fake_quant_grid(x, delta, zero_point, 0.0, n_levels - 1)
        if out is not None:
            return out
    delta = _as_tensor(delta, x)
    # round(x/d) + zp clamped to [0, n-1], minus zp == round(x/d) clamped to [-zp, n-1-zp]:
    # exact in floating point because zp is an integer.
    zp = _bound(zero_point)
    return _FakeQuantSTE.apply(x, delta, -zp, (n_levels - 1) - zp)


def _check_grid_numbers(who: str, delta: Tensor | float, zero_point: Tensor | float | None, n_levels: int) -> None:
    if isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 2:
        raise ValueError(f"{who}: n_levels must be an int >= 2 (2 ** n_bits), got {n_levels!r}")
    if not isinstance(delta, Tensor) and not (math.isfinite(delta) and delta > 0):
        raise ValueError(f"{who}: the step delta must be positive and finite, got {delta!r}")
    if zero_point is not None and not isinstance(zero_point, Tensor) and float(zero_point) != round(zero_point):
        raise ValueError(f"{who}: the zero point must be an integer, got {zero_point!r}")


def _next_power_of_two(d: Tensor) -> Tensor:
    # d = m * 2**e with m in [0.5, 1): d is a power of two iff m == 0.5; else the next one is 2**e. Exact.
    m, e = torch.frexp(d)
    return torch.where(m == 0.5, d, torch.ldexp(torch.ones_like(d), e))


def _range_step(mn: Tensor, mx: Tensor, n_levels: int) -> Tensor:
    """``max((max - min) / (n_levels - 1), eps)``, halved first: the same to the last bit (halving is exact,
    and the rounding of a sum or a quotient commutes with it), but finite for a range wider than float32
    holds (ends 3e38 apart)."""
    return ((mx * 0.5 - mn * 0.5) / (0.5 * (n_levels - 1))).clamp_(min=_EPS)


def affine_qparams(
    min_val: Tensor,
    max_val: Tensor,
    n_levels: int,
    symmetric: bool = False,
    power_of_two: bool = False,
    fixed_zero_point: float | None = None,
) -> tuple[Tensor, Tensor]:
    """``(delta, zero_point)`` of the affine grid on ``n_levels`` levels that covers ``[min, max]``.

    The range is widened to include 0 (``[-max|r|, max|r|]`` when ``symmetric``), then
    ``delta = max((max - min) / (n_levels - 1), eps)`` (float32 machine epsilon, so a zero
    range stays finite; a range below ``(n_levels - 1) * eps``, about ``3e-5`` at 8 bits, is
    coarsened to that step, as in ``torch.ao``), rounded up to a power of two when ``power_of_two``, and
    ``zero_point = round(-min / delta)``, or ``fixed_zero_point`` when given.

    Args:
        min_val: range minima of any shape, e.g. compact per-channel ``(C, 1, 1, 1)``.
        max_val: range maxima, ``min_val``'s shape.
        n_levels: ``2 ** n_bits``.
        symmetric: a grid symmetric around zero.
        power_of_two: round ``delta`` up to a power of two.
        fixed_zero_point: the zero point to use instead of ``round(-min / delta)``.

    Returns:
        ``delta`` and ``zero_point`` (integer-valued floats), ``min_val``'s shape.

    Example:
        >>> affine_qparams(torch.tensor(-1.0), torch.tensor(2.0), 4)
        (tensor(1.), tensor(1.))
    """
    mn = torch.clamp(min_val, max=0.0)
    mx = torch.clamp(max_val, min=0.0)
    if symmetric:
        mx = torch.maximum(-mn, mx)
        mn = -mx
    delta = _range_step(mn, mx, n_levels)
    if power_of_two:
        delta = _next_power_of_two(delta)
    if fixed_zero_point is None:
        return delta, torch.round(-mn / delta)
    return delta, torch.full_like(delta, fixed_zero_point)


def qfmt_quantize(x: Tensor, delta: Tensor | float, min_int: int | Tensor, max_int: int | Tensor) -> Tensor:
    """Fixed-point (Q-format) fake quantization with a straight-through gradient.

    Output ``clamp(round(x / delta), min_int, max_int) * delta``, where ``delta``
    is usually a power of two ``2 ** -frac_bits``.

    Args:
        x: input of any shape, floating point.
        delta: step size (broadcasts against ``x``).
        min_int: smallest integer, e.g. ``-2 ** (n - 1)`` signed or ``0`` unsigned.
        max_int: largest integer, e.g. ``2 ** (n - 1) - 1`` signed.

    Raises:
        ValueError: a number ``delta`` is not positive and finite, or number bounds with
            ``min_int >= max_int``.

    Example:
        >>> qfmt_quantize(torch.tensor([3.9, 7.2, -10.0]), 2.0, -8, 7)
        tensor([  4.,   8., -10.])
    """
    if not isinstance(delta, Tensor) and not (math.isfinite(delta) and delta > 0):
        raise ValueError(f"qfmt_quantize: the step delta must be positive and finite, got {delta!r}")
    if not isinstance(min_int, Tensor) and not isinstance(max_int, Tensor) and not min_int < max_int:
        raise ValueError(f"qfmt_quantize: min_int must be below max_int, got {min_int!r} and {max_int!r}")
    if kernels.enabled(x) and not isinstance(min_int, Tensor) and not isinstance(max_int, Tensor):
        out = kernels.fake_quant_grid(x, delta, None, min_int, max_int)
        if out is not None:
            return out
    delta = _as_tensor(delta, x)
    return _FakeQuantSTE.apply(x, delta, _bound(min_int), _bound(max_int))


def qfmt_step(min_val: Tensor, max_val: Tensor, n_bits: int, signed: bool) -> Tensor:
    """The Q-format step ``2 ** -frac_bits`` whose integer range covers ``[min, max]``.

    ``int_bits = floor(log2(max(|min|, |max|, eps))) + 1``, computed exactly from the
    float's exponent (``eps`` is float32's machine epsilon, so a zero range keeps a
    finite step); ``frac_bits = n_bits - int_bits``, minus 1 more when ``signed``
    (the sign bit). Pair it with :func:`qfmt_quantize`.

    Args:
        min_val: range minima, any shape (per tensor, per channel, per group).
        max_val: range maxima, same shape.
        n_bits: bits per code, the sign bit included when ``signed``.
        signed: whether the codes are signed.

    Returns:
        The step, shaped like ``min_val``, a power of two.

    Example:
        >>> qfmt_step(torch.tensor(-10.0), torch.tensor(7.2), 4, True)  # int_bits 4, frac_bits 4 - 4 - 1
        tensor(2.)
    """
    amax = torch.maximum(min_val.abs(), max_val.abs()).clamp(min=_EPS)
    _, int_bits = torch.frexp(amax)  # amax = m * 2 ** e, m in [0.5, 1): e = floor(log2(amax)) + 1
    return torch.ldexp(torch.ones_like(amax), int_bits - (int(n_bits) - int(bool(signed))))


class _GradientClip(torch.autograd.Function):
    """Identity; backward zeroes the gradient where ``x < lo`` or ``x > hi``."""

    @staticmethod
    def forward(ctx, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, lo, hi)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, lo, hi = ctx.saved_tensors
        # d out / d x = 1 inside [lo, hi] (bounds included), 0 strictly outside.
        return grad * _inside(x, lo, hi), None, None


def _inside(x: Tensor, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    """``lo <= x <= hi``, compared in :func:`compute_dtype` (a 0-d float32 bound would otherwise
    be rounded to a float16 ``x``'s dtype by type promotion)."""
    xd = _cast(x, compute_dtype(x))
    return (xd >= lo) & (xd <= hi)


def gradient_clip(x: Tensor, range_min: Tensor | float, range_max: Tensor | float) -> Tensor:
    """Identity in forward; zero gradient where ``x < range_min`` or ``x > range_max``.

    Composed in front of a straight-through quantizer this gives the clipped
    STE: gradients flow only where ``x`` lies inside the quantization range.
    Bounds broadcast against ``x``.
    """
    if not x.is_floating_point():
        raise TypeError(f"torchquant: expected a floating-point tensor, got dtype {x.dtype}")
    return _GradientClip.apply(x, _as_tensor(range_min, x), _as_tensor(range_max, x))


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Straight-through: d round(x) / dx := 1.
        return grad


def round_ste(x: Tensor) -> Tensor:
    """``torch.round`` (half-to-even) with the identity as its gradient.

    The building block for quantizers that learn their grid: gradients flow
    through ``x / scale`` to both ``x`` and ``scale`` by ordinary autograd.
    """
    return _RoundSTE.apply(x)


# ---------------------------------------------------------------------------
# Primitives of the research quantizers (torchquant.quantizers: learned, dorefa, binary, minifloat).


class _SignSTE(torch.autograd.Function):
    """``+1`` where ``x >= 0``, else ``-1``; backward: the clipped STE of BNN."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.clip = clip
        return _cast(torch.where(x >= 0, 1.0, -1.0), x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        # d sign(x) / dx := 1 where |x| <= clip, else 0 (Courbariaux et al. 2016, "Htanh" STE).
        return grad * (x.abs() <= ctx.clip), None


def sign_ste(x: Tensor, clip: float = 1.0) -> Tensor:
    """Binarization ``sign(x)`` with the clipped straight-through estimator (BNN).

    Forward ``+1`` where ``x >= 0`` and ``-1`` elsewhere (zero maps to ``+1``, as in
    Courbariaux et al. 2016, so the output is always binary). Backward: the
    incoming gradient where ``|x| <= clip``, zero elsewhere.

    Example:
        >>> sign_ste(torch.tensor([-0.3, 0.0, 2.0]))
        tensor([-1.,  1.,  1.])
    """
    compute_dtype(x)
    return _SignSTE.apply(x, float(clip))


class _ScaledSign(torch.autograd.Function):
    """``scale * sign(x)``; backward: XNOR-Net's ``g * (1 / n + scale * 1{|x| <= 1})``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, n: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, scale)
        ctx.n = n
        return _cast(torch.where(x >= 0, scale, -scale), x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, scale = ctx.saved_tensors
        # Rastegari et al. 2016, section 3.1: dC/dW = dC/dW~ * (1/n + alpha * 1{|W| <= 1}), in the scale's
        # dtype (float32 for a half-precision weight).
        g = grad.to(scale.dtype) * (1.0 / ctx.n + scale * (x.abs() <= 1))
        return g.to(grad.dtype), None, None


def scaled_sign(x: Tensor, scale: Tensor, n: int) -> Tensor:
    """XNOR-Net binarization ``scale * sign(x)`` with the paper's gradient.

    Args:
        x: weight of any shape.
        scale: ``alpha = mean |x|`` per range, broadcasting against ``x``
            (treated as a constant by autograd; its dependence on ``x`` is the
            ``1 / n`` term of the gradient).
        n: number of elements that share one ``scale``.

    Returns:
        ``scale * sign(x)`` (zero maps to ``+scale``). Backward for ``x``:
        ``grad * (1 / n + scale * 1{|x| <= 1})`` (Rastegari et al. 2016).
    """
    compute_dtype(x)
    return _ScaledSign.apply(x, scale.detach(), int(n))


class _PACT(torch.autograd.Function):
    """``quantize(clip(x, 0, alpha))``; backward: PACT's STE gradients for ``x`` and ``alpha``."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, n_levels: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, alpha)
        dt = compute_dtype(x)
        a = alpha.to(dt)
        y = torch.minimum(torch.clamp(x.to(dt), min=0.0), a)
        delta = a / (n_levels - 1)
        return _cast(torch.round(y / delta) * delta, x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, alpha = ctx.saved_tensors
        # Choi et al. 2018, eq. 3: d y_q / d x = 1 on [0, alpha), 0 elsewhere;
        # d y_q / d alpha = 1 where x >= alpha, 0 elsewhere (rounding passed straight through).
        xd = _cast(x, compute_dtype(x))  # compared as in forward (float16 x would round alpha to float16)
        above = xd >= alpha.to(xd.dtype)
        gx = grad * ((xd >= 0) & ~above)
        ga = (grad * above).sum_to_size(alpha.shape) if ctx.needs_input_grad[1] else None
        return gx, ga, None


def pact_quantize(x: Tensor, alpha: Tensor, n_levels: int) -> Tensor:
    """PACT activation quantization (Choi et al. 2018).

    ``y = clip(x, 0, alpha)``, ``y_q = round(y * (n - 1) / alpha) * alpha / (n - 1)``.

    Args:
        x: activations, any shape.
        alpha: clipping level, positive, 0-d or broadcasting against ``x``.
        n_levels: ``2 ** n_bits``.

    Returns:
        ``y_q``, ``x``'s shape and dtype. Backward: ``x`` gets the gradient on
        ``[0, alpha)``; ``alpha`` gets the gradient summed over ``x >= alpha``
        (the paper's STE gradient, exactly).

    Example:
        >>> pact_quantize(torch.tensor([-1.0, 0.4, 0.6, 3.0]), torch.tensor(2.0), 3)  # step 1
        tensor([0., 0., 1., 2.])
    """
    return _PACT.apply(x, alpha, int(n_levels))


def _floor_log2(a: Tensor) -> Tensor:
    # Exact floor(log2(a)) for a > 0 through the float's own exponent: a = m * 2**e, m in [0.5, 1).
    _, e = torch.frexp(a)
    return (e - 1).to(a.dtype)


def minifloat_round(x: Tensor, man_bits: int, bias: int, max_value: float) -> Tensor:
    """Round to the nearest value of a sign-magnitude ExMy minifloat, saturating (no STE).

    Normal values are ``2 ** (e - bias) * (1 + m / 2 ** man_bits)``; exponent field
    0 holds the subnormals ``2 ** (1 - bias) * m / 2 ** man_bits``. The exponent
    width only decides the largest value, which ``max_value`` gives. Rounding is
    to nearest, ties to even (IEEE 754's default), and magnitudes beyond
    ``max_value`` saturate to ``+-max_value``: neither infinities nor NaNs are
    produced (NaN inputs stay NaN).

    Args:
        x: input of any shape, floating point.
        man_bits: mantissa bits ``M``.
        bias: exponent bias (``2 ** (E - 1) - 1`` for the OCP formats).
        max_value: largest finite magnitude of the format.

    Returns:
        Tensor of ``x``'s shape and dtype on the format's grid.
    """
    dt = compute_dtype(x)
    xa = x.to(dt).abs()
    e_min = 1 - bias  # exponent of the smallest normal, and of the subnormals' step
    e = torch.clamp(_floor_log2(xa), min=float(e_min))  # zero: frexp gives e = 0, clamped up
    step = torch.exp2(e - man_bits)  # spacing of representable values in this binade
    q = torch.round(xa / step) * step  # exact: division by a power of two, round half to even
    q = torch.clamp(q, max=max_value)
    return torch.copysign(q, x.to(dt)).to(x.dtype)


def _minifloat_reference(x: Tensor, scale: Tensor, man_bits: int, bias: int, max_value: float) -> Tensor:
    dt = compute_dtype(x)
    s = scale.to(dt)
    return _cast(minifloat_round(x.to(dt) / s, man_bits, bias, max_value) * s, x.dtype)


class _MinifloatSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, man_bits: int, bias: int, max_value: float):  # type: ignore[override]
        return _minifloat_reference(x, scale, man_bits, bias, max_value)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # Straight-through: d out / d x := 1 everywhere.
        return grad, None, None, None, None


def minifloat_quantize(x: Tensor, scale: Tensor | float, man_bits: int, bias: int, max_value: float) -> Tensor:
    """Scaled minifloat fake quantization: ``minifloat_round(x / scale) * scale``, STE gradient.

    Args:
        x: input of any shape.
        scale: positive scale, 0-d or broadcasting against ``x`` (per-channel,
            per-block).
        man_bits: mantissa bits of the format (see :func:`minifloat_round`).
        bias: exponent bias.
        max_value: largest finite magnitude (saturation level).

    Returns:
        Tensor of ``x``'s shape and dtype. Backward: the incoming gradient for ``x``.

    Example:
        >>> minifloat_quantize(torch.tensor([0.3, 5.0, 100.0]), 1.0, 1, 1, 6.0)  # FP4 E2M1
        tensor([0.5000, 4.0000, 6.0000])
    """
    scale = _as_tensor(scale, x)
    if kernels.enabled(x):  # one fused CUDA kernel, same numerics
        out = kernels.minifloat(x, scale, int(man_bits), int(bias), float(max_value))
        if out is not None:
            return out
    return _MinifloatSTE.apply(x, scale, int(man_bits), int(bias), float(max_value))


def e8m0_block_scale(amax: Tensor, elem_emax: int) -> Tensor:
    """OCP MX shared scale of blocks with absolute maxima ``amax``.

    ``X = 2 ** clamp(floor(log2(amax)) - elem_emax, -127, 127)`` (the E8M0
    range). An all-zero block gets ``2 ** -127``; a block whose maximum is
    infinite or NaN gets NaN (E8M0's NaN), so every element of it decodes as
    NaN, as the specification has it.

    Example:
        >>> e8m0_block_scale(torch.tensor([5.0, 0.0, float("inf")]), elem_emax=2)
        tensor([1.0000e+00, 5.8775e-39,        nan])
    """
    # exact for subnormal maxima too (a floor at the smallest normal would lift MXINT8's scale to 2 ** -126)
    shared = _floor_log2(amax) - elem_emax
    shared = torch.where(amax > 0, shared, torch.full_like(shared, -127.0))
    # amax - amax: 0 for a finite maximum, NaN for inf or NaN (cheaper than a where on isfinite)
    return torch.exp2(torch.clamp(shared, -127.0, 127.0)) + (amax - amax)


def mx_quantize(
    x: Tensor,
    man_bits: int,
    bias: int,
    max_value: float,
    elem_emax: int,
    block_size: int = 32,
    axis: int = -1,
) -> Tensor:
    """OCP Microscaling (MX v1.0) fake quantization with a straight-through gradient.

    ``x`` is cut into blocks of ``block_size`` consecutive elements along
    ``axis`` (the last block zero-padded when ``block_size`` does not divide the
    axis; padding never changes a block's maximum). Each block gets the shared
    power-of-two scale ``X = 2 ** (floor(log2(max|block|)) - elem_emax)``
    (:func:`e8m0_block_scale`), and each element becomes
    ``minifloat_round(x / X) * X`` in the element format, saturating.

    INT8 elements (MXINT8: two's complement with an implicit scale ``2 ** -6``,
    used here on the symmetric range ``[-127, 127] * 2 ** -6``) are the
    minifloat ``man_bits=6, bias=1, max_value=127/64`` (E1M6) with
    ``elem_emax=0``: every magnitude below 2 then has the step ``2 ** -6``.

    Args:
        x: input of any shape.
        man_bits: mantissa bits of the element format.
        bias: exponent bias of the element format.
        max_value: largest finite element magnitude (saturation level).
        elem_emax: exponent of the element format's largest normal
            (E4M3 8, E5M2 15, E3M2 4, E2M3 2, E2M1 2, INT8 0).
        block_size: elements per block (32 in the specification).
        axis: the axis along which blocks run.

    Returns:
        Tensor of ``x``'s shape and dtype. Backward: the incoming gradient.
    """
    ax = axis % x.dim()
    if x.numel() == 0:  # no blocks (the CUDA kernel gives the same)
        return x.clone()
    if kernels.enabled(x):  # one fused CUDA kernel: block maxima, scales and rounding
        return kernels.mx(x, int(man_bits), int(bias), float(max_value), int(elem_emax), int(block_size), ax)
    return _mx_reference(x, man_bits, bias, max_value, elem_emax, block_size, ax)


def _mx_blocks(x: Tensor, block_size: int, ax: int) -> Tensor:
    """``x`` with ``ax`` moved last, zero-padded to whole blocks and split: ``(..., ceil(n / b), b)``."""
    xt = x.movedim(ax, -1)  # (..., n)
    pad = (-xt.shape[-1]) % block_size
    if pad:
        xt = torch.nn.functional.pad(xt, (0, pad))
    return xt.reshape(*xt.shape[:-1], -1, block_size)


def mx_block_scales(x: Tensor, elem_emax: int, block_size: int = 32, axis: int = -1) -> Tensor:
    """The OCP MX shared scales of ``x``'s blocks, as :func:`mx_quantize` computes them.

    Args:
        x: input of any shape, floating point.
        elem_emax: exponent of the element format's largest normal (E4M3 8, E2M1 2, INT8 0).
        block_size: elements per block along ``axis`` (the last block zero-padded).
        axis: the axis along which blocks run.

    Returns:
        Powers of two (:func:`e8m0_block_scale`) in the compute dtype of ``x``, of ``x``'s
        shape with ``n = x.shape[axis]`` replaced by ``ceil(n / block_size)``.

    Example:
        >>> mx_block_scales(torch.tensor([[5.0, 0.3, -1.2, 0.0, 0.1]]), elem_emax=2, block_size=4)
        tensor([[1.0000, 0.0156]])
    """
    ax = axis % x.dim()
    blocks = _mx_blocks(x.detach(), block_size, ax)  # (..., n / b, b)
    amax = blocks.abs().amax(dim=-1).to(compute_dtype(x))  # (..., n / b)
    return e8m0_block_scale(amax, elem_emax).movedim(-1, ax)


def _mx_reference(
    x: Tensor, man_bits: int, bias: int, max_value: float, elem_emax: int, block_size: int, ax: int
) -> Tensor:
    n = x.shape[ax]
    blocks = _mx_blocks(x, block_size, ax)  # (..., n / b, b)
    amax = blocks.detach().abs().amax(dim=-1, keepdim=True).to(compute_dtype(x))  # (..., n / b, 1)
    scale = e8m0_block_scale(amax, elem_emax)
    q = minifloat_quantize(blocks, scale, man_bits, bias, max_value)
    q = q.reshape(*q.shape[:-2], -1)[..., :n]
    return q.movedim(-1, ax)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor) -> Tensor:  # type: ignore[override]
        return q.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # The value is q, the gradient goes to x unchanged: d out / d x := 1.
        return grad, None


def straight_through(x: Tensor, q: Tensor) -> Tensor:
    """Return ``q`` (bit-exactly) with the incoming gradient passed to ``x`` unchanged.

    The exact form of ``x + (q - x).detach()``, whose value can differ from
    ``q`` in the last bit.
    """
    return _StraightThrough.apply(x, q)


# ---------------------------------------------------------------------------
# Non-uniform grids: a finite, sorted set of levels (a codebook) times a scale.
# ``levels`` has shape (..., K): K ascending values, its leading dimensions broadcast
# against the tensor like a scale (a plain (K,) codebook is shared by every element).


def level_codes(v: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest level for every element of ``v`` (a tie goes to the lower level).

    Args:
        v: ``(...)`` values in the levels' units (the tensor divided by its scale).
        levels: ``(..., K)`` ascending levels; the leading dimensions broadcast against ``v``.

    Returns:
        ``torch.int64`` codes in ``[0, K - 1]``, shaped like ``v``: the number of midpoints
        between neighbouring levels that lie strictly below the value.

    Example:
        >>> level_codes(torch.tensor([-2.0, 0.2, 0.25, 0.3, 9.0]), torch.tensor([-1.0, 0.0, 0.5, 1.0]))
        tensor([0, 1, 1, 2, 3])
    """
    mids = (levels[..., 1:] + levels[..., :-1]) / 2  # (..., K - 1)
    # (..., 1) against (..., K - 1): one comparison per midpoint, summed; exports as plain ONNX ops
    return (v.unsqueeze(-1) > mids).sum(-1)


def level_neighbours(v: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
    """Codes of the two levels around every element of ``v``: the floor and the ceiling in level space.

    ``lo`` is the largest level at or below the value and ``hi = lo + 1``; outside the levels'
    range both are the nearest end (``0`` below the first level, ``K - 1`` at or above the last).

    Args:
        v: ``(...)`` values in the levels' units.
        levels: ``(..., K)`` ascending levels, broadcasting against ``v``.

    Returns:
        ``(lo, hi)``, ``torch.int64`` codes shaped like ``v``.

    Example:
        >>> lo, hi = level_neighbours(torch.tensor([-2.0, 0.0, 0.2, 9.0]), torch.tensor([-1.0, 0.0, 0.5, 1.0]))
        >>> lo.tolist(), hi.tolist()
        ([0, 1, 1, 3], [0, 2, 2, 3])
    """
    k = levels.shape[-1]
    below = (v.unsqueeze(-1) >= levels).sum(-1)  # how many levels lie at or below the value
    lo = (below - 1).clamp(min=0)
    hi = torch.where(below == 0, lo, (lo + 1).clamp(max=k - 1))
    return lo, hi


def level_values(levels: Tensor, codes: Tensor) -> Tensor:
    """The level each code names: ``levels[..., codes]`` with the leading dimensions broadcast.

    Args:
        levels: ``(..., K)`` levels.
        codes: integer codes in ``[0, K - 1]``, any shape the leading dimensions broadcast against.

    Returns:
        A tensor of ``levels``' dtype shaped like ``codes``.
    """
    if levels.dim() == 1:
        return levels[codes]
    extra = codes.dim() + 1 - levels.dim()  # take_along_dim needs equal ranks
    if extra > 0:
        levels = levels.reshape((1,) * extra + tuple(levels.shape))
    return torch.take_along_dim(levels, codes.unsqueeze(-1), dim=-1).squeeze(-1)


def level_quantize(x: Tensor, levels: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """Round every element of ``x`` to the nearest of ``levels * scale``, straight-through gradient.

    ``x_q = levels[level_codes(x / scale, levels)] * scale`` (a tie goes to the lower
    level); the backward pass returns the incoming gradient for ``x``.

    Args:
        x: the tensor to quantize.
        levels: ``(..., K)`` ascending levels whose leading dimensions broadcast against ``x``.
        scale: a positive scale broadcasting against ``x`` (a 0-d, per-channel ``(C, 1, 1, 1)``
            or per-group expanded tensor), or a number.

    Example:
        >>> level_quantize(torch.tensor([0.3, -1.6, 5.0]), torch.tensor([-1.0, 0.0, 0.5, 1.0]), 2.0)
        tensor([ 0., -2.,  2.])
    """
    dtype = compute_dtype(x)
    s = _as_tensor(scale, x).to(dtype)
    lv = levels.to(dtype)
    q = level_values(lv, level_codes(x.to(dtype) / s, lv)) * s
    return straight_through(x, q.to(x.dtype))


def _lsq_reference(x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(out, v, q)``: LSQ's output in ``x``'s dtype, ``v = (x - offset) / step`` and its clamped rounding."""
    dt = compute_dtype(x)
    s = step.to(dt)
    b = offset.to(dt) if offset is not None else None
    v = (x.to(dt) - b) / s if b is not None else x.to(dt) / s
    q = torch.clamp(torch.round(v), -qn, qp)
    out = q * s + b if b is not None else q * s
    return _cast(out, x.dtype), v, q


def _lsq_grads(
    grad: Tensor, v: Tensor, q: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int, grad_scale: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """LSQ's gradients for ``(x, step, offset)`` from the saved ``v`` and ``q`` (``None`` for no offset)."""
    inside = (v > -qn) & (v < qp)
    g = grad.to(v.dtype)
    # Esser et al. 2020, eq. 3: d out / d x = 1 strictly inside the range, 0 outside and at its ends;
    # d out / d step = round(v) - v inside, -qn at or below, qp at or above; times the gradient scale.
    gx = (g * inside).to(grad.dtype)
    gs = (g * torch.where(inside, q - v, q)).sum_to_size(step.shape) * grad_scale
    gb = None
    if offset is not None:
        # Bhalgat et al. 2020: d out / d offset = 0 inside the range, 1 where clipped.
        gb = ((g * ~inside).sum_to_size(offset.shape) * grad_scale).to(offset.dtype)
    return gx, gs.to(step.dtype), gb


class _LSQ(torch.autograd.Function):
    """``clamp(round((x - offset) / step), -qn, qp) * step + offset`` with LSQ's gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int, grad_scale: float):  # type: ignore[override]
        out, v, q = _lsq_reference(x, step, offset, qn, qp)
        ctx.save_for_backward(v, q, step, offset)
        ctx.args = (qn, qp, grad_scale)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, q, step, offset = ctx.saved_tensors
        return *_lsq_grads(grad, v, q, step, offset, *ctx.args), None, None, None


def lsq_quantize(x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int, grad_scale: float = 1.0) -> Tensor:
    """LSQ / LSQ+ fake quantization with the papers' gradients.

    ``v = (x - offset) / step``, output ``clamp(round(v), -qn, qp) * step + offset``
    (``offset`` ``None`` means 0: LSQ).

    Args:
        x: input of any shape.
        step: positive step size, broadcasting against ``x``.
        offset: learned offset (LSQ+), broadcasting against ``x``, or ``None``.
        qn: magnitude of the lowest integer level (``2 ** (b - 1)`` signed, 0 unsigned).
        qp: highest integer level (``2 ** (b - 1) - 1`` signed, ``2 ** b - 1`` unsigned).
        grad_scale: factor ``g`` applied to the gradients of ``step`` and ``offset``
            (LSQ uses ``1 / sqrt(N * qp)``).

    Returns:
        Tensor of ``x``'s shape and dtype. Backward (Esser et al. 2020, eq. 3;
        Bhalgat et al. 2020): ``x`` gets the gradient where ``-qn < v < qp``;
        ``step`` gets ``g * sum(grad * (round(v) - v))`` inside, ``-qn`` / ``qp``
        times the gradient at or beyond the ends; ``offset`` gets ``g * sum(grad)``
        over the clipped elements (the ends included).

    Example:
        >>> lsq_quantize(torch.tensor([0.26, -1.0, 9.0]), torch.tensor(0.5), None, 2, 1)
        tensor([ 0.5000, -1.0000,  0.5000])
    """
    if kernels.enabled(x):  # one fused CUDA kernel each way, v and the rounding recomputed in backward
        out = kernels.lsq(x, step, offset, int(qn), int(qp), float(grad_scale))
        if out is not None:
            return out
    return _LSQ.apply(x, step, offset, int(qn), int(qp), float(grad_scale))


def rectified_sigmoid(v: Tensor, zeta: float = 1.1, gamma: float = -0.1) -> Tensor:
    """AdaRound's soft rounding ``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (Nagel et al. 2020).

    Stretching the sigmoid beyond ``[0, 1]`` and clipping lets ``h`` reach exactly 0
    and 1 with a non-vanishing gradient nearby. Elementwise, any shape.
    """
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def inverse_rectified_sigmoid(h: Tensor, zeta: float = 1.1, gamma: float = -0.1) -> Tensor:
    """The ``V`` with ``rectified_sigmoid(V) == h`` for ``h`` in ``(0, 1)`` (``h`` is clamped to that first)."""
    h = h.clamp(1e-6, 1.0 - 1e-6)
    return -torch.log((zeta - gamma) / (h - gamma) - 1.0)


# --------------------------------------------------------------------------- custom ops
# One opaque op each for graphs (torch.export, torch.compile with the op called directly):
# the CUDA kernel where it applies, the torch path elsewhere, the gradients (STE, clipped
# STE, LSQ's) as registered autograd. The ops are torch.ops.torchquant.fake_quant_grid,
# fake_quant_ranges, lsq (and lsq_backward), minifloat and mx; the functions above stay
# the eager API.


def _kernel_ok(x: Tensor) -> bool:
    # The custom ops' CUDA implementation: the kernel where the eager path would take it.
    return x.is_cuda and kernels.enabled(x)


def _kernel_or_reference(x: Tensor, kernel: Callable[[], Tensor | None], reference: Callable[[], Tensor]) -> Tensor:
    # An op's implementation: the CUDA kernel where it applies (None: its layout does not), else torch.
    if _kernel_ok(x):
        with torch.no_grad():
            out = kernel()
        if out is not None:
            return out
    return reference()


def _by_group(g: Granularity, x: Tensor, compact: tuple[Tensor, ...], fn: Callable[..., Tensor]) -> Tensor:
    """``fn(x, *compact)`` elementwise, for compact per-range tensors (``g.compact_shape(x.shape)``).

    Per-group, ``x`` is split into its groups ``(.., n // group_size, group_size, ..)`` and the
    compact tensors broadcast along the new dimension, instead of being repeated to ``x``'s
    size: the grid is computed once per group (a ``(1536, 576)`` weight in groups of 64: 13.8k
    grids, not 885k), with the same arithmetic per element, so the result is bit-identical.
    The result has ``x``'s shape.
    """
    if g.group_size is None or g.axis is None:
        return fn(x, *compact)
    if any(c.dim() != x.dim() for c in compact):  # ranges of another rank (forced by hand): repeated, as they broadcast
        return fn(x, *(g.expand(c) for c in compact))
    axis = g.axis % x.dim()
    return fn(g._split(x, axis), *(c.unsqueeze(axis + 1) for c in compact)).reshape(x.shape)


def _reference_grid(x: Tensor, scale: Tensor, zero_point: Tensor | None, lo: float, hi: float) -> Tensor:
    if zero_point is None:
        return _fake_quant(x, scale, lo, hi)
    return _fake_quant(x, scale, -(zero_point - lo), hi - zero_point)


@torch.library.custom_op("torchquant::fake_quant_grid", mutates_args=())
def _op_fake_quant_grid(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, lo: float, hi: float, clip_grad: bool
) -> Tensor:
    return _kernel_or_reference(
        x,
        lambda: kernels.fake_quant_grid(x, scale, zero_point, lo, hi),
        lambda: _reference_grid(x, scale, zero_point, lo, hi),
    )


@_op_fake_quant_grid.register_fake
def _(x, scale, zero_point, lo, hi, clip_grad):
    return torch.empty_like(x)


def _grid_setup(ctx, inputs, output):
    x, scale, zero_point, lo, hi, clip_grad = inputs
    ctx.lo, ctx.hi, ctx.clip = lo, hi, clip_grad
    if clip_grad:
        ctx.save_for_backward(x, scale, zero_point)


def _grid_backward(ctx, grad):
    if not ctx.clip:  # straight-through: d out / d x := 1
        return grad, None, None, None, None, None
    x, scale, zero_point = ctx.saved_tensors
    zp = 0.0 if zero_point is None else zero_point
    # d out / d x := 1 where (lo - zp) * scale <= x <= (hi - zp) * scale, else 0
    return grad * _inside(x, -(zp - ctx.lo) * scale, (ctx.hi - zp) * scale), None, None, None, None, None


_op_fake_quant_grid.register_autograd(_grid_backward, setup_context=_grid_setup)


@torch.library.custom_op("torchquant::fake_quant_ranges", mutates_args=())
def _op_fake_quant_ranges(
    x: Tensor,
    min_val: Tensor,
    max_val: Tensor,
    n_levels: int,
    symmetric: bool,
    power_of_two: bool,
    axis: int | None,
    group_size: int | None,
    fixed_zero_point: float | None,
    clip_grad: bool,
) -> Tensor:
    g = Granularity(axis=axis, group_size=group_size)

    def reference() -> Tensor:
        def grid(xs: Tensor, mn: Tensor, mx: Tensor) -> Tensor:
            delta, zp = affine_qparams(mn, mx, n_levels, symmetric, power_of_two, fixed_zero_point)
            return _reference_grid(xs, delta, zp, 0.0, float(n_levels - 1))

        return _by_group(g, x, (min_val, max_val), grid)

    return _kernel_or_reference(
        x,
        lambda: kernels.fake_quant_ranges(x, min_val, max_val, g, n_levels, symmetric, power_of_two, fixed_zero_point),
        reference,
    )


@_op_fake_quant_ranges.register_fake
def _(x, min_val, max_val, n_levels, symmetric, power_of_two, axis, group_size, fixed_zero_point, clip_grad):
    return torch.empty_like(x)


def _ranges_setup(ctx, inputs, output):
    x, min_val, max_val, n_levels, symmetric, power_of_two, axis, group_size, fixed_zero_point, clip_grad = inputs
    ctx.args = (n_levels, symmetric, power_of_two, Granularity(axis=axis, group_size=group_size), fixed_zero_point)
    ctx.clip = clip_grad
    if clip_grad:
        ctx.save_for_backward(x, min_val, max_val)


def _ranges_backward(ctx, grad):
    none = (None,) * 9
    if not ctx.clip:  # straight-through: d out / d x := 1
        return grad, *none
    x, mn, mx = ctx.saved_tensors
    n_levels, symmetric, pow2, g, fixed = ctx.args

    def mask(xs: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        delta, zp = affine_qparams(lo, hi, n_levels, symmetric, pow2, fixed)
        # d out / d x := 1 where -zp * delta <= x <= (n_levels - 1 - zp) * delta, else 0
        return _inside(xs, -zp * delta, (n_levels - 1 - zp) * delta)

    return grad * _by_group(g, x, (mn, mx), mask), *none


_op_fake_quant_ranges.register_autograd(_ranges_backward, setup_context=_ranges_setup)


def _ste_backward(ctx, grad):
    # straight-through: d out / d x := 1; nothing for the other inputs
    return (grad, *(None,) * ctx.n_other)


def _ste_setup(ctx, inputs, output):
    ctx.n_other = len(inputs) - 1


@torch.library.custom_op("torchquant::lsq", mutates_args=())
def _op_lsq(x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int, grad_scale: float) -> Tensor:
    return _kernel_or_reference(
        x,
        lambda: kernels.lsq(x, step, offset, qn, qp, grad_scale),
        lambda: _lsq_reference(x, step, offset, qn, qp)[0],
    )


@_op_lsq.register_fake
def _(x, step, offset, qn, qp, grad_scale):
    return torch.empty_like(x)


def _lsq_setup(ctx, inputs, output):
    x, step, offset, qn, qp, grad_scale = inputs
    ctx.save_for_backward(x, step, offset)
    ctx.args = (qn, qp, grad_scale)


def _lsq_backward(ctx, grad):
    x, step, offset = ctx.saved_tensors
    gx, gs, gb = torch.ops.torchquant.lsq_backward(grad, x, step, offset, *ctx.args)
    return gx, gs, gb if offset is not None else None, None, None, None


_op_lsq.register_autograd(_lsq_backward, setup_context=_lsq_setup)


# The backward is an op of its own: graph tracing (torch.compile training, export) then sees
# one node with a fake implementation instead of entering the kernel launch with fake tensors.
@torch.library.custom_op("torchquant::lsq_backward", mutates_args=())
def _op_lsq_backward(
    grad: Tensor, x: Tensor, step: Tensor, offset: Tensor | None, qn: int, qp: int, grad_scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """LSQ's gradients ``(x, step, offset)``; the offset's is empty without an offset."""
    grads = kernels.lsq_gradients(grad, x, step, offset, qn, qp, grad_scale) if _kernel_ok(x) else None
    if grads is None:
        _, v, q = _lsq_reference(x, step, offset, qn, qp)
        grads = _lsq_grads(grad, v, q, step, offset, qn, qp, grad_scale)
    gx, gs, gb = grads
    return gx.contiguous(), gs.contiguous(), gb.contiguous() if gb is not None else grad.new_empty(0)


@_op_lsq_backward.register_fake
def _(grad, x, step, offset, qn, qp, grad_scale):
    gb = offset.new_empty(offset.shape) if offset is not None else grad.new_empty(0)
    return grad.new_empty(x.shape), step.new_empty(step.shape), gb


@torch.library.custom_op("torchquant::minifloat", mutates_args=())
def _op_minifloat(x: Tensor, scale: Tensor, man_bits: int, bias: int, max_value: float) -> Tensor:
    return _kernel_or_reference(
        x,
        lambda: kernels.minifloat(x, scale, man_bits, bias, max_value),
        lambda: _minifloat_reference(x, scale, man_bits, bias, max_value),
    )


@_op_minifloat.register_fake
def _(x, scale, man_bits, bias, max_value):
    return torch.empty_like(x)


_op_minifloat.register_autograd(_ste_backward, setup_context=_ste_setup)


@torch.library.custom_op("torchquant::mx", mutates_args=())
def _op_mx(x: Tensor, man_bits: int, bias: int, max_value: float, elem_emax: int, block_size: int, axis: int) -> Tensor:
    ax = axis % x.dim()
    out = _kernel_or_reference(
        x,
        lambda: kernels.mx(x, man_bits, bias, max_value, elem_emax, block_size, ax),
        lambda: _mx_reference(x, man_bits, bias, max_value, elem_emax, block_size, ax),
    )
    return out.contiguous()  # else the blocks' layout would decide the strides, which the fake cannot know


@_op_mx.register_fake
def _(x, man_bits, bias, max_value, elem_emax, block_size, axis):
    return x.new_empty(x.shape)


_op_mx.register_autograd(_ste_backward, setup_context=_ste_setup)
