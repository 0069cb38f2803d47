"""AdaRound's learned rounding (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

:class:`AdaRoundQuantizer` rounds one weight tensor on a fixed affine grid, or between
the two neighbouring levels of a non-uniform one (:class:`~torchquant.quantizers.LevelGrid`);
the reconstruction engine (:mod:`torchquant.ptq.reconstruction`) learns its rounding
and then writes the rounded weight back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..granularity import Granularity
from ..quantizers_functional import (
    compute_dtype,
    inverse_rectified_sigmoid,
    level_neighbours,
    level_values,
    rectified_sigmoid,
)
from ..range_observers import BatchMinMax
from ..registry import Example, register_quantizer
from .affine import AffineQuantizer
from .base import AffineGrid, LevelGrid, Quantizer

__all__ = ["AdaRoundQuantizer"]

ZETA = 1.1
GAMMA = -0.1


def _example(shape: tuple[int, ...]) -> AdaRoundQuantizer:
    """Soft rounding of a fixed random weight on its 4-bit per-channel grid."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q = AffineQuantizer(4, BatchMinMax(axis=0))
    q.pre_observe(w)
    return AdaRoundQuantizer(q.grid(), w)


def _levels_example(shape: tuple[int, ...]) -> AdaRoundQuantizer:
    """Soft rounding of a fixed random weight between neighbouring NF4 levels, per channel."""
    from .levels import NF4Quantizer  # a sibling family, needed by this example only

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q = NF4Quantizer(BatchMinMax(axis=0))
    q.pre_observe(w)
    return AdaRoundQuantizer(q.levels(), w)


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
        ),
        Example(
            "nf4-per-channel-soft",
            lambda: _levels_example(_SHAPE),
            role="weight",
            weight_shape=_SHAPE,
            idempotent=False,
            ste=False,
            on_grid=False,
        ),
    ],
)
class AdaRoundQuantizer(Quantizer):
    """Learned rounding on a fixed affine grid or between neighbouring levels (Nagel et al. 2020).

    On an affine grid:
    ``quantize(W) = scale * (clamp(floor(W / scale) + h + zero_point, qmin, qmax) - zero_point)``.
    On levels (a :class:`~torchquant.quantizers.LevelGrid`, e.g. NF4 or APoT):
    ``quantize(W) = scale * (l_lo + h * (l_hi - l_lo))``, ``l_lo`` and ``l_hi`` the levels
    at and above ``W / scale`` (the floor and ceiling in level space; outside the levels'
    range both are the nearest end). Either way ``h = rectified_sigmoid(alpha)`` (soft,
    differentiable in ``alpha``) or ``h = [alpha >= 0]`` (hard, so the output is one of the
    two). ``alpha`` starts so that ``h`` is the fractional position of ``W`` between the
    two, i.e. the soft quantizer starts at ``W`` itself (inside the range).

    Args:
        grid: the grid (any quantizer's :meth:`~torchquant.quantizers.Quantizer.grid`) or
            levels (:meth:`~torchquant.quantizers.Quantizer.levels`).
        weight: the weight it will round, any shape ``grid.scale`` broadcasts against.
        soft: start in soft mode (set the ``soft`` attribute to switch).

    Example:
        >>> from torchquant.granularity import Granularity
        >>> levels = LevelGrid(torch.tensor([-1.0, 0.0, 0.25, 1.0]), torch.tensor(2.0), Granularity())
        >>> w = torch.tensor([0.1, 1.0, 1.5])  # between the levels 0 and 0.5, 0.5 and 2, 0.5 and 2
        >>> q = AdaRoundQuantizer(levels, w)
        >>> torch.allclose(q(w), w, atol=1e-5)  # soft: starts at the weight
        True
        >>> q.soft = False
        >>> q(w)  # hard: the nearer of the two, until reconstruction learns otherwise
        tensor([0.0000, 0.5000, 2.0000])
    """

    scale: Tensor
    zero_point: Tensor
    levels_table: Tensor

    non_grid_args = frozenset({"soft"})  # soft rounding turns hard at the end of AdaRound

    def __init__(self, grid: AffineGrid | LevelGrid, weight: Tensor, soft: bool = True) -> None:
        super().__init__()
        if not isinstance(grid, (AffineGrid, LevelGrid)):
            raise TypeError(f"AdaRoundQuantizer: grid must be an AffineGrid or a LevelGrid, got {type(grid).__name__}")
        # The rounding variables and the grid live in float32 for a half-precision weight: Adam's steps on
        # float16 alphas underflow to NaN, and in bfloat16 most of them are below half an ulp.
        w = weight.detach()
        w = w.to(compute_dtype(w))
        try:
            torch.broadcast_shapes(grid.scale.shape, w.shape)
        except RuntimeError as e:
            raise ValueError(
                f"AdaRoundQuantizer: grid scale of shape {tuple(grid.scale.shape)} does not broadcast against "
                f"the weight of shape {tuple(w.shape)}"
            ) from e
        self.register_buffer("scale", grid.scale.detach().clone().to(w.dtype))
        self.granularity: Granularity = grid.granularity
        self.soft = bool(soft)
        if isinstance(grid, LevelGrid):
            grid.check(w.shape, "AdaRoundQuantizer")
            self.register_buffer("levels_table", grid.levels.detach().clone().to(w.dtype))
            self.qmin = self.qmax = None
            lo, hi = self._neighbours(w)
            gap = hi - lo
            # the position of W between its two levels; 0 where they coincide (outside the range)
            frac = torch.where(gap > 0, (w / self.scale - lo) / gap.clamp(min=torch.finfo(w.dtype).tiny), 0.0)
            self.alpha = nn.Parameter(inverse_rectified_sigmoid(frac.clamp(0, 1), ZETA, GAMMA))
            return
        self.register_buffer("zero_point", grid.zero_point.detach().clone().to(w.dtype))
        self.qmin, self.qmax = int(grid.qmin), int(grid.qmax)
        ratio = w / self.scale
        self.alpha = nn.Parameter(inverse_rectified_sigmoid(ratio - torch.floor(ratio), ZETA, GAMMA))

    @property
    def on_levels(self) -> bool:
        """Whether this rounds between levels (a :class:`LevelGrid`) rather than on an affine grid."""
        return "levels_table" in self._buffers

    def _neighbours(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The values of the levels at and above ``x / scale`` (in level units), shaped like ``x``."""
        table = self.levels_table
        lo, hi = level_neighbours(x / self.scale, table)
        return level_values(table, lo), level_values(table, hi)

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
            "levels_shape": list(self.levels_table.shape) if self.on_levels else None,
        }

    @classmethod
    def from_spec_args(
        cls,
        shape: list[int],
        scale_shape: list[int],
        qmin: int | None = None,
        qmax: int | None = None,
        axis: int | None = None,
        group_size: int | None = None,
        soft: bool = True,
        levels_shape: list[int] | None = None,
    ) -> AdaRoundQuantizer:
        """An AdaRound quantizer of the given shapes with placeholder values, to be filled by ``load_state_dict``.

        ``levels_shape`` (the codebook's shape, ``(..., K)``) rebuilds one that rounds between levels;
        otherwise ``qmin`` and ``qmax`` give the affine grid.

        Raises:
            TypeError: neither ``levels_shape`` nor both ``qmin`` and ``qmax``.
        """
        g = Granularity(axis=axis, group_size=group_size)
        if levels_shape is not None:
            placeholder = torch.arange(float(levels_shape[-1])).expand(*levels_shape)  # ascending, as check() wants
            return cls(LevelGrid(placeholder.clone(), torch.ones(scale_shape), g), torch.zeros(shape), soft=soft)
        if qmin is None or qmax is None:
            raise TypeError("AdaRoundQuantizer.from_spec_args: give qmin and qmax (affine) or levels_shape (levels)")
        grid = AffineGrid(torch.ones(scale_shape), torch.zeros(scale_shape), qmin, qmax, g)
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
        # in the rounding variables' dtype (float32 for a half-precision weight, as the grid); the dtype of a
        # parameter, not compute_dtype(x): torch.fx traces this
        dtype, x = x.dtype, x.to(self._parameters["alpha"].dtype)
        if self.on_levels:
            lo, hi = self._neighbours(x)
            h = self.rounding()
            # lo (1 - h) + hi h, not lo + h (hi - lo): exactly the level when h is 0 or 1. x * 0: the
            # weight gets a (zero) gradient, as floor() gives it on an affine grid.
            return ((lo * (1 - h) + hi * h) * self.scale + x * 0).to(dtype)
        q = torch.floor(x / self.scale) + self.rounding() + self.zero_point
        return ((torch.clamp(q, self.qmin, self.qmax) - self.zero_point) * self.scale).to(dtype)

    def grid(self) -> AffineGrid | None:
        if self.on_levels:
            return None
        return AffineGrid(self.scale, self.zero_point, self.qmin, self.qmax, self.granularity)

    def levels(self) -> LevelGrid | None:
        if not self.on_levels:
            return None
        return LevelGrid(self.levels_table, self.scale, self.granularity)

    def extra_repr(self) -> str:
        if self.on_levels:
            return f"levels={self.levels_table.shape[-1]}, soft={self.soft}"
        return f"qmin={self.qmin}, qmax={self.qmax}, soft={self.soft}"
