"""Quantizers: ``nn.Module`` s that hold a quantization scheme's state and call a primitive.

A quantizer is driven by its owner (:class:`~torchquant.qmodules.QWrapper`,
:class:`~torchquant.qmodules.QOp`) through three calls, chosen by the owner's
:class:`~torchquant.qmodules.QModuleState`:

* :meth:`Quantizer.pre_observe` sees the float tensor before quantization
  (range observation, initialisation of learned parameters);
* :meth:`Quantizer.quantize` returns the fake-quantized tensor (``forward`` is
  ``quantize``);
* :meth:`Quantizer.post_observe` sees the quantized tensor afterwards.

A new quantizer is a small subclass. For example, a sign quantizer::

    class SignQuantizer(Quantizer):
        def pre_observe(self, x):
            pass

        def quantize(self, x):
            return x + (torch.sign(x) - x).detach()  # sign forward, identity gradient

        def post_observe(self, x):
            pass

Quantizers whose outputs lie on an affine integer grid describe it through
:meth:`Quantizer.grid`, which export and integer extraction use without knowing
the class.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import kernels
from .granularity import Granularity
from .quantizers_functional import affine_qparams, affine_quantize, gradient_clip, qfmt_quantize
from .range_observers import RangeObserver
from .registry import register_quantizer

__all__ = ["AffineGrid", "AffineQuantizer", "QfmtQuantizer", "Quantizer", "RangeQuantizer", "check_n_bits"]

# The primitives are leaves for torch.fx: tracing records one call instead of
# entering the autograd.Function.
torch.fx.wrap("affine_quantize")
torch.fx.wrap("qfmt_quantize")
torch.fx.wrap("gradient_clip")

_EPS = torch.finfo(torch.float32).eps


def check_n_bits(n_bits: int, who: str, low: int = 1, high: int = 32) -> int:
    """Validate a bit-width: an ``int`` in ``[low, high]``, else ``ValueError`` naming ``who``."""
    if isinstance(n_bits, bool) or not isinstance(n_bits, int):
        raise ValueError(f"{who}: n_bits must be an int, got {n_bits!r}")
    if not low <= n_bits <= high:
        raise ValueError(f"{who}: n_bits must be in [{low}, {high}], got {n_bits}")
    return n_bits


@dataclass(frozen=True)
class AffineGrid:
    """An affine integer grid: ``x_q = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.

    Attributes:
        scale: step size, broadcasts against the quantized tensor.
        zero_point: integer-valued (stored as float), same shape as ``scale``.
        qmin, qmax: the integer range.
        granularity: where ``scale`` and ``zero_point`` change.
    """

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    granularity: Granularity

    @property
    def n_bits(self) -> int:
        return math.ceil(math.log2(self.qmax - self.qmin + 1))

    def to_int(self, x: Tensor) -> Tensor:
        """The integer codes of ``x`` on this grid (``torch.int64``)."""
        q = torch.round(x / self.scale) + self.zero_point
        return q.clamp(self.qmin, self.qmax).to(torch.int64)

    def from_int(self, q: Tensor) -> Tensor:
        """Dequantize integer codes: ``(q - zero_point) * scale``."""
        return (q.to(self.scale.dtype) - self.zero_point) * self.scale


class Quantizer(nn.Module, abc.ABC):
    """Base class of every quantizer.

    Subclasses implement :meth:`pre_observe`, :meth:`quantize` and
    :meth:`post_observe`; ``forward`` calls :meth:`quantize`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._tq_name = type(self).__name__

    @abc.abstractmethod
    def pre_observe(self, x: Tensor) -> None:
        """Observe the float tensor ``x`` before it is quantized."""

    @abc.abstractmethod
    def quantize(self, x: Tensor) -> Tensor:
        """Return ``x`` fake-quantized, same shape and dtype, differentiable."""

    @abc.abstractmethod
    def post_observe(self, x: Tensor) -> None:
        """Observe the quantizer's output ``x``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.quantize(x)

    def grid(self) -> AffineGrid | None:
        """The affine integer grid the outputs lie on, or ``None`` if they lie on none."""
        return None


class RangeQuantizer(Quantizer):
    """A quantizer whose grid comes from a :class:`RangeObserver`.

    ``pre_observe`` feeds the observer; ``post_observe`` does nothing. Subclasses
    implement :meth:`quantize` using :meth:`ranges`.
    """

    def __init__(self, range_observer: RangeObserver) -> None:
        super().__init__()
        if not isinstance(range_observer, RangeObserver):
            raise TypeError(
                f"{type(self).__name__}: range_observer must be a RangeObserver instance "
                f"(e.g. BatchMinMax()), got {range_observer!r}"
            )
        self.range_observer = range_observer
        self._set_name(type(self).__name__)

    def _set_name(self, name: str) -> None:
        self._tq_name = name
        self.range_observer._tq_name = f"{name}.range_observer"

    @property
    def granularity(self) -> Granularity:
        return self.range_observer.granularity

    def pre_observe(self, x: Tensor) -> None:
        self.range_observer.observe_batch(x)

    def post_observe(self, x: Tensor) -> None:
        pass

    def ranges(self) -> tuple[Tensor, Tensor]:
        """The observer's ``(min, max)``, broadcastable against the input."""
        return self.range_observer.get_ranges()


@register_quantizer("affine")
class AffineQuantizer(RangeQuantizer):
    """Uniform affine quantizer on ``2 ** n_bits`` levels.

    The observed range ``[min, max]`` is relaxed to include 0 (so zero is exact);
    ``symmetric=True`` makes it ``[-max|r|, max|r|]``. Then
    ``delta = (max - min) / (2 ** n_bits - 1)``, ``zero_point = round(-min / delta)``
    and levels ``0 .. 2 ** n_bits - 1``. A zero range gives ``delta = eps``
    (float32 machine epsilon), so outputs stay finite.

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
        delta, zero_point = self.qparams()
        if self.gradient_clip:
            x = gradient_clip(x, -zero_point * delta, (self.n_levels - 1 - zero_point) * delta)
        fixed = self._fixed_zero_point  # a number keeps the fake quant's clamp to one pass
        return affine_quantize(x, delta, zero_point if fixed is None else fixed, self.n_levels)

    def _quantize_kernel(self, x: Tensor) -> Tensor | None:
        """One CUDA kernel that computes the grid from the observer's ranges and fake-quantizes.

        ``None`` (the caller runs the torch path) when a subclass changes how the grid or the
        ranges are computed, or when there are no ranges yet (that path raises the error).
        """
        obs = self.range_observer
        if (
            not obs.initialized
            or type(self).qparams is not AffineQuantizer.qparams
            or type(self).ranges is not RangeQuantizer.ranges
            or type(obs).get_ranges is not RangeObserver.get_ranges
        ):
            return None
        return kernels.fake_quant_ranges(
            x,
            obs.min_val,
            obs.max_val,
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


@register_quantizer("qfmt")
class QfmtQuantizer(RangeQuantizer):
    """Fixed-point (Q-format) quantizer: power-of-two step, integer range set by ``n_bits``.

    ``n_bits`` counts the sign bit when ``signed``. The integer range is
    ``[-2 ** (n - 1), 2 ** (n - 1) - 1]`` signed or ``[0, 2 ** n - 1]`` unsigned,
    the step ``2 ** -frac_bits`` with ``int_bits = floor(log2(max|range|)) + 1``
    and ``frac_bits = n_bits - int_bits`` (minus 1 if signed).

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
        """``2 ** -frac_bits``, broadcastable against the input."""
        mn, mx = self.ranges()
        amax = torch.maximum(mn.abs(), mx.abs()).clamp_(min=_EPS)
        int_bits = torch.floor(torch.log2(amax)) + 1
        frac_bits = self.n_bits - int_bits - (1 if self.signed else 0)
        return torch.exp2(-frac_bits)

    def quantize(self, x: Tensor) -> Tensor:
        delta = self.step()
        lo, hi = self.int_range
        if self.gradient_clip:
            x = gradient_clip(x, lo * delta, hi * delta)
        return qfmt_quantize(x, delta, lo, hi)

    def grid(self) -> AffineGrid:
        delta = self.step()
        lo, hi = self.int_range
        return AffineGrid(delta, torch.zeros_like(delta), lo, hi, self.granularity)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, signed={self.signed}, gradient_clip={self.gradient_clip}"
