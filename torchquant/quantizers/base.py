"""The quantizer contract: :class:`Quantizer`, :class:`RangeQuantizer` and the :class:`AffineGrid` export uses.

Every quantizer in :mod:`torchquant.quantizers` (and every one a researcher
writes) subclasses :class:`Quantizer`; see the package docstring for the three
calls an owner makes.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..granularity import Granularity
from ..range_observers import RangeObserver
from ..spec import RecordsInit

__all__ = ["AffineGrid", "Quantizer", "RangeQuantizer", "StatelessQuantizer", "check_n_bits"]


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


class Quantizer(RecordsInit, nn.Module, abc.ABC):
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


class StatelessQuantizer(Quantizer):
    """A quantizer that computes everything from the tensor it quantizes: both observe calls do nothing."""

    def pre_observe(self, x: Tensor) -> None:
        pass

    def post_observe(self, x: Tensor) -> None:
        pass
