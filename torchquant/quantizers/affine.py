"""Uniform integer grids from observed ranges: :class:`AffineQuantizer` and fixed-point :class:`QfmtQuantizer`."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from ..quantizers_functional import (
    _by_group,
    affine_qparams,
    affine_quantize,
    gradient_clip,
    qfmt_quantize,
    qfmt_step,
)
from ..range_observers import BatchMinMax, ExpAvgMinMax, RangeObserver, RunningMinMax
from ..registry import Example, register_quantizer
from .base import AffineGrid, RangeQuantizer, check_n_bits, kernel_ranges

__all__ = ["AffineQuantizer", "QfmtQuantizer"]

# The primitives are leaves for torch.fx: tracing records one call instead of
# entering the autograd.Function.
torch.fx.wrap("affine_quantize")
torch.fx.wrap("qfmt_quantize")
torch.fx.wrap("gradient_clip")


@register_quantizer(
    "affine",
    examples=[
        Example("w4-per-channel", lambda: AffineQuantizer(4, BatchMinMax(axis=0)), role="weight"),
        Example("w8-symmetric-pot", lambda: AffineQuantizer(8, BatchMinMax(), symmetric=True, power_of_two=True)),
        Example("a8-ema", lambda: AffineQuantizer(8, ExpAvgMinMax()), role="act"),
        Example(
            "a8-per-channel-clip", lambda: AffineQuantizer(8, RunningMinMax(axis=1), gradient_clip=True), role="act"
        ),
    ],
)
class AffineQuantizer(RangeQuantizer):
    """Uniform affine quantizer on ``2 ** n_bits`` levels.

    The observed range ``[min, max]`` is relaxed to include 0 (so zero is exact);
    ``symmetric=True`` makes it ``[-max|r|, max|r|]``. Then
    ``delta = (max - min) / (2 ** n_bits - 1)``, ``zero_point = round(-min / delta)``
    and levels ``0 .. 2 ** n_bits - 1``. ``delta`` is at least ``eps`` (float32 machine
    epsilon, as in ``torch.ao``), so a zero range stays finite; a range narrower than
    ``(2 ** n_bits - 1) * eps`` (about ``3e-5`` at 8 bits) is quantized on that coarser step.

    Args:
        n_bits: bits per element, 1 to 32 (the grid is exact in float32 up to 24).
        range_observer: where ranges come from; its granularity is the quantizer's.
        symmetric: symmetric range around zero.
        gradient_clip: zero the gradient where the input lies outside the grid's
            range (clipped STE), instead of passing it straight through.
        power_of_two: round ``delta`` up to the next power of two (exact
            powers of two stay), so rescaling is a bit shift in hardware; the
            zero point is then ``round(-min / delta)`` with the rounded ``delta``.
            The grid covers at least the observed range, up to half a step.

    Example:
        >>> from torchquant import BatchMinMax
        >>> q = AffineQuantizer(2, BatchMinMax())
        >>> x = torch.tensor([-1.0, 0.1, 0.5, 2.0])
        >>> q.pre_observe(x)
        >>> q(x)
        tensor([-1.,  0.,  0.,  2.])
    """

    def __init__(
        self,
        n_bits: int,
        range_observer: RangeObserver,
        symmetric: bool = False,
        gradient_clip: bool = False,
        power_of_two: bool = False,
    ) -> None:
        super().__init__(range_observer)
        self.n_bits = check_n_bits(n_bits, type(self).__name__)
        self.symmetric = bool(symmetric)
        self.gradient_clip = bool(gradient_clip)
        self.power_of_two = bool(power_of_two)

    @property
    def n_levels(self) -> int:
        return 2**self.n_bits

    def qparams(self) -> tuple[Tensor, Tensor]:
        """``(delta, zero_point)`` broadcastable against the input (:func:`~torchquant.affine_qparams`)."""
        mn, mx = self.ranges()
        return affine_qparams(mn, mx, self.n_levels, self.symmetric, self.power_of_two, self._fixed_zero_point)

    def quantize(self, x: Tensor) -> Tensor:
        if kernels.enabled(x):
            out = self._quantize_kernel(x)
            if out is not None:
                return out
        obs = self._modules["range_observer"]
        # (under torch.compile the compiler fuses the repeated ranges away: the plain path traces more simply)
        if obs is not None and obs.granularity.group_size is not None and not torch.compiler.is_compiling():
            ranges = kernel_ranges(self, obs, AffineQuantizer, "qparams")
            if ranges is not None:
                # The grid once per group, broadcast over each group's elements (bit-identical to
                # the ranges repeated to x's size, which costs several passes over a tensor that size).
                return _by_group(obs.granularity, x, ranges, self._quantize_in_ranges)
        delta, zero_point = self.qparams()
        return self._on_grid(x, delta, zero_point)

    def _quantize_in_ranges(self, x: Tensor, mn: Tensor, mx: Tensor) -> Tensor:
        delta, zero_point = affine_qparams(
            mn, mx, self.n_levels, self.symmetric, self.power_of_two, self._fixed_zero_point
        )
        return self._on_grid(x, delta, zero_point)

    def _on_grid(self, x: Tensor, delta: Tensor, zero_point: Tensor) -> Tensor:
        if self.gradient_clip:
            x = gradient_clip(x, -zero_point * delta, (self.n_levels - 1 - zero_point) * delta)
        fixed = self._fixed_zero_point  # a number keeps the fake quant's clamp to one pass
        return affine_quantize(x, delta, zero_point if fixed is None else fixed, self.n_levels)

    def _quantize_kernel(self, x: Tensor) -> Tensor | None:
        """One CUDA kernel that computes the grid from the observer's ranges and fake-quantizes.

        ``None`` (the caller runs the torch path) when a subclass changes how the grid or the
        ranges are computed, or when there are no ranges yet (that path raises the error).
        """
        obs = self._modules["range_observer"]
        ranges = kernel_ranges(self, obs, AffineQuantizer, "qparams")
        if ranges is None:
            return None
        return kernels.fake_quant_ranges(
            x,
            *ranges,
            obs.granularity,
            self.n_levels,
            self.symmetric,
            self.power_of_two,
            self._fixed_zero_point,
            self.gradient_clip,
        )

    @property
    def _fixed_zero_point(self) -> float | None:
        """The zero point when it does not depend on the range, else ``None``.

        Symmetric (not power-of-two) grids: ``-min / delta`` is ``(2**n - 1) / 2`` in exact
        arithmetic; it is evaluated exactly (half to even) rather than left to a rounding
        error that would pick 127 or 128 per channel.
        """
        if self.symmetric and not self.power_of_two:
            return float(round((self.n_levels - 1) / 2))
        return None

    def grid(self) -> AffineGrid:
        delta, zero_point = self.qparams()
        return AffineGrid(delta, zero_point, 0, self.n_levels - 1, self.granularity)

    def extra_repr(self) -> str:
        pot = ", power_of_two=True" if self.power_of_two else ""
        return f"n_bits={self.n_bits}, symmetric={self.symmetric}, gradient_clip={self.gradient_clip}{pot}"


@register_quantizer(
    "qfmt",
    examples=[
        Example("w6", lambda: QfmtQuantizer(6, True, BatchMinMax()), role="weight"),
        Example("a8-unsigned-clip", lambda: QfmtQuantizer(8, False, ExpAvgMinMax(), gradient_clip=True), role="act"),
    ],
)
class QfmtQuantizer(RangeQuantizer):
    """Fixed-point (Q-format) quantizer: power-of-two step, integer range set by ``n_bits``.

    ``n_bits`` counts the sign bit when ``signed``. The integer range is
    ``[-2 ** (n - 1), 2 ** (n - 1) - 1]`` signed or ``[0, 2 ** n - 1]`` unsigned,
    the step ``2 ** -frac_bits`` with ``int_bits = floor(log2(max|range|)) + 1``
    and ``frac_bits = n_bits - int_bits`` (minus 1 if signed): :func:`~torchquant.qfmt_step`.
    On CUDA one kernel computes the step from the observer's state and fake-quantizes.

    Example:
        >>> from torchquant import BatchMinMax
        >>> q = QfmtQuantizer(4, True, BatchMinMax())
        >>> x = torch.tensor([3.9, 7.2, -10.0])
        >>> q.pre_observe(x)
        >>> q(x)
        tensor([  4.,   8., -10.])
    """

    def __init__(self, n_bits: int, signed: bool, range_observer: RangeObserver, gradient_clip: bool = False) -> None:
        super().__init__(range_observer)
        self.signed = bool(signed)
        self.n_bits = check_n_bits(n_bits, type(self).__name__, low=2 if self.signed else 1)
        self.gradient_clip = bool(gradient_clip)

    @property
    def int_range(self) -> tuple[int, int]:
        if self.signed:
            return -(2 ** (self.n_bits - 1)), 2 ** (self.n_bits - 1) - 1
        return 0, 2**self.n_bits - 1

    def step(self) -> Tensor:
        """``2 ** -frac_bits``, broadcastable against the input (:func:`~torchquant.qfmt_step`)."""
        mn, mx = self.ranges()
        return qfmt_step(mn, mx, self.n_bits, self.signed)

    def quantize(self, x: Tensor) -> Tensor:
        lo, hi = self.int_range
        obs = self._modules["range_observer"]
        ranges = kernel_ranges(self, obs, QfmtQuantizer, "step") if kernels.enabled(x) else None
        if ranges is not None:
            # One CUDA kernel: the step from the observer's ranges, then the fake quant.
            out = kernels.fake_quant_qfmt(
                x, *ranges, obs.granularity, self.n_bits, self.signed, lo, hi, self.gradient_clip
            )
            if out is not None:
                return out
        delta = self.step()
        if self.gradient_clip:
            x = gradient_clip(x, lo * delta, hi * delta)
        return qfmt_quantize(x, delta, lo, hi)

    def grid(self) -> AffineGrid:
        delta = self.step()
        lo, hi = self.int_range
        return AffineGrid(delta, torch.zeros_like(delta), lo, hi, self.granularity)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, signed={self.signed}, gradient_clip={self.gradient_clip}"
