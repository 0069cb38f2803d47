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

import torch
from torch import Tensor

__all__ = [
    "affine_quantize",
    "compute_dtype",
    "gradient_clip",
    "inverse_rectified_sigmoid",
    "qfmt_quantize",
    "rectified_sigmoid",
    "round_ste",
]

_HALF_TYPES = (torch.float16, torch.bfloat16)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype in which grid arithmetic on ``x`` is done.

    float16 and bfloat16 cannot represent every integer of an 8-bit grid after
    division, so their grid arithmetic runs in float32; float32 and float64 run
    in their own dtype. Integer tensors raise ``TypeError``.
    """
    if not x.is_floating_point():
        raise TypeError(f"torchquant: expected a floating-point tensor, got dtype {x.dtype}")
    return torch.float32 if x.dtype in _HALF_TYPES else x.dtype


def _fake_quant(x: Tensor, delta: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    # clamp(round(x / delta), lo, hi) * delta, with one output allocation.
    dt = compute_dtype(x)
    delta = delta.to(dt)
    out = torch.div(x.to(dt), delta)
    out.round_()
    # maximum/minimum with out= are vectorised for broadcast bounds; clamp_ with tensor bounds is not.
    torch.maximum(out, lo.to(dt), out=out)
    torch.minimum(out, hi.to(dt), out=out)
    out.mul_(delta)
    return out.to(x.dtype)


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

    Example:
        >>> affine_quantize(torch.tensor([0.26, -1.0, 9.0]), 0.5, 2, 8)
        tensor([ 0.5000, -1.0000,  2.5000])
    """
    delta = _as_tensor(delta, x)
    zp = _as_tensor(zero_point, x)
    # round(x/d) + zp clamped to [0, n-1], minus zp == round(x/d) clamped to [-zp, n-1-zp]:
    # exact in floating point because zp is an integer.
    return _FakeQuantSTE.apply(x, delta, -zp, (n_levels - 1) - zp)


def qfmt_quantize(x: Tensor, delta: Tensor | float, min_int: int | Tensor, max_int: int | Tensor) -> Tensor:
    """Fixed-point (Q-format) fake quantization with a straight-through gradient.

    Output ``clamp(round(x / delta), min_int, max_int) * delta``, where ``delta``
    is usually a power of two ``2 ** -frac_bits``.

    Args:
        x: input of any shape, floating point.
        delta: step size (broadcasts against ``x``).
        min_int: smallest integer, e.g. ``-2 ** (n - 1)`` signed or ``0`` unsigned.
        max_int: largest integer, e.g. ``2 ** (n - 1) - 1`` signed.

    Example:
        >>> qfmt_quantize(torch.tensor([3.9, 7.2, -10.0]), 2.0, -8, 7)
        tensor([  4.,   8., -10.])
    """
    delta = _as_tensor(delta, x)
    return _FakeQuantSTE.apply(x, delta, _as_tensor(min_int, x), _as_tensor(max_int, x))


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
        inside = (x >= lo) & (x <= hi)
        return grad * inside, None, None


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
