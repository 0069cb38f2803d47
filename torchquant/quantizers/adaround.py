"""AdaRound's learned rounding (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

:class:`AdaRoundQuantizer` rounds one weight tensor on a fixed affine grid; the
reconstruction engine (:mod:`torchquant.ptq.reconstruction`) learns its rounding
and then writes the rounded weight back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..granularity import Granularity
from ..quantizers_functional import inverse_rectified_sigmoid, rectified_sigmoid
from ..range_observers import BatchMinMax
from ..registry import Example, register_quantizer
from .affine import AffineQuantizer
from .base import AffineGrid, Quantizer

__all__ = ["AdaRoundQuantizer"]

ZETA = 1.1
GAMMA = -0.1


def _example(shape: tuple[int, ...]) -> AdaRoundQuantizer:
    """Soft rounding of a fixed random weight on its 4-bit per-channel grid."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q = AffineQuantizer(4, BatchMinMax(axis=0))
    q.pre_observe(w)
    return AdaRoundQuantizer(q.grid(), w)


@torch.fx.wrap
def _check_shape(x: Tensor, shape: torch.Size, who: str) -> Tensor:
    # A leaf for torch.fx: the comparison needs the real tensor's shape.
    if x.shape != shape:
        raise ValueError(f"{who}: built for a weight of shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


_SHAPE = (8, 3, 3, 3)


@register_quantizer(
    "adaround",
    examples=[
        # Soft rounding: a relaxation whose gradient goes to alpha alone, off the grid until made hard.
        Example(
            "w4-per-channel-soft",
            lambda: _example(_SHAPE),
            role="weight",
            weight_shape=_SHAPE,
            idempotent=False,
            ste=False,
            on_grid=False,
        )
    ],
)
class AdaRoundQuantizer(Quantizer):
    """Learned rounding on a fixed affine grid (Nagel et al. 2020).

    ``quantize(W) = scale * (clamp(floor(W / scale) + h + zero_point, qmin, qmax) - zero_point)``
    with ``h = rectified_sigmoid(alpha)`` (soft, differentiable in ``alpha``) or
    ``h = [alpha >= 0]`` (hard). ``alpha`` starts so that ``h`` equals the
    fractional part of ``W / scale``, i.e. the soft quantizer starts at ``W`` itself
    (inside the grid's range).

    Args:
        grid: the grid (from any quantizer's :meth:`~torchquant.quantizers.Quantizer.grid`).
        weight: the weight it will round, any shape ``grid.scale`` broadcasts against.
        soft: start in soft mode (set the ``soft`` attribute to switch).
    """

    scale: Tensor
    zero_point: Tensor

    non_grid_args = frozenset({"soft"})  # soft rounding turns hard at the end of AdaRound

    def __init__(self, grid: AffineGrid, weight: Tensor, soft: bool = True) -> None:
        super().__init__()
        if not isinstance(grid, AffineGrid):
            raise TypeError(f"AdaRoundQuantizer: grid must be an AffineGrid, got {type(grid).__name__}")
        w = weight.detach()
        try:
            torch.broadcast_shapes(grid.scale.shape, w.shape)
        except RuntimeError as e:
            raise ValueError(
                f"AdaRoundQuantizer: grid scale of shape {tuple(grid.scale.shape)} does not broadcast against "
                f"the weight of shape {tuple(w.shape)}"
            ) from e
        self.register_buffer("scale", grid.scale.detach().clone().to(w.dtype))
        self.register_buffer("zero_point", grid.zero_point.detach().clone().to(w.dtype))
        self.qmin, self.qmax = int(grid.qmin), int(grid.qmax)
        self.granularity: Granularity = grid.granularity
        ratio = w / self.scale
        self.alpha = nn.Parameter(inverse_rectified_sigmoid(ratio - torch.floor(ratio), ZETA, GAMMA))
        self.soft = bool(soft)

    def spec_args(self) -> dict:
        """Arguments of :meth:`from_spec_args` that rebuild this quantizer's structure (see :mod:`torchquant.spec`)."""
        return {
            "shape": list(self.alpha.shape),
            "scale_shape": list(self.scale.shape),
            "qmin": self.qmin,
            "qmax": self.qmax,
            "axis": self.granularity.axis,
            "group_size": self.granularity.group_size,
            "soft": self.soft,
        }

    @classmethod
    def from_spec_args(
        cls,
        shape: list[int],
        scale_shape: list[int],
        qmin: int,
        qmax: int,
        axis: int | None = None,
        group_size: int | None = None,
        soft: bool = True,
    ) -> AdaRoundQuantizer:
        """An AdaRound quantizer of the given shapes with placeholder values, to be filled by ``load_state_dict``."""
        grid = AffineGrid(
            torch.ones(scale_shape), torch.zeros(scale_shape), qmin, qmax, Granularity(axis=axis, group_size=group_size)
        )
        return cls(grid, torch.zeros(shape), soft=soft)

    def rounding(self) -> Tensor:
        """``h``: soft ``(0..1)`` values or hard ``{0, 1}``, shaped like the weight."""
        if self.soft:
            return rectified_sigmoid(self.alpha, ZETA, GAMMA)
        return (self.alpha >= 0).to(self.alpha.dtype)

    def regularizer(self, beta: float) -> Tensor:
        """``sum(1 - |2 h - 1| ** beta)``: pushes every ``h`` to 0 or 1 as ``beta`` decreases."""
        h = rectified_sigmoid(self.alpha, ZETA, GAMMA)
        return (1 - (2 * h - 1).abs().pow(beta)).sum()

    def pre_observe(self, x: Tensor) -> None:
        pass

    def post_observe(self, x: Tensor) -> None:
        pass

    def quantize(self, x: Tensor) -> Tensor:
        # _parameters, not getattr: torch.fx proxies parameters fetched by attribute, and the shape is a constant.
        x = _check_shape(x, self._parameters["alpha"].shape, self._tq_name)
        q = torch.floor(x / self.scale) + self.rounding() + self.zero_point
        return (torch.clamp(q, self.qmin, self.qmax) - self.zero_point) * self.scale

    def grid(self) -> AffineGrid:
        return AffineGrid(self.scale, self.zero_point, self.qmin, self.qmax, self.granularity)

    def extra_repr(self) -> str:
        return f"qmin={self.qmin}, qmax={self.qmax}, soft={self.soft}"
