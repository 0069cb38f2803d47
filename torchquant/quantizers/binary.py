"""One- and two-bit weights: binary (BNN), XNOR-Net's scaled binary and ternary (TWN) quantizers.

| registry name | class | paper |
|---|---|---|
| ``bnn`` | :class:`BinaryQuantizer` | Courbariaux et al. 2016 |
| ``xnor`` | :class:`XNORWeightQuantizer` | Rastegari et al. 2016 |
| ``twn`` | :class:`TernaryQuantizer` | Li et al. 2016 |
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..granularity import Granularity
from ..quantizers_functional import compute_dtype, scaled_sign, sign_ste, straight_through
from ..registry import Example, register_quantizer
from .base import StatelessQuantizer

__all__ = ["BinaryQuantizer", "TernaryQuantizer", "XNORWeightQuantizer"]

# A leaf for torch.fx: tracing records one call instead of entering the autograd.Function.
torch.fx.wrap("sign_ste")


@register_quantizer("bnn")
class BinaryQuantizer(StatelessQuantizer):
    """Binarization with the clipped straight-through estimator (Courbariaux et al. 2016, "Binarized Neural
    Networks", eq. 1 and 4).

    Forward: ``+1`` where ``x >= 0``, ``-1`` elsewhere (weights or activations).
    Gradient: the incoming gradient where ``|x| <= clip``, 0 elsewhere (the
    derivative of ``Htanh``).

    Args:
        clip: the STE's cancellation threshold (1 in the paper).

    Example:
        >>> BinaryQuantizer()(torch.tensor([-0.2, 0.0, 3.0]))
        tensor([-1.,  1.,  1.])
    """

    non_grid_args = frozenset({"clip"})  # bounds the gradient only

    def __init__(self, clip: float = 1.0) -> None:
        super().__init__()
        if not (isinstance(clip, (int, float)) and clip > 0):
            raise ValueError(f"{type(self).__name__}: clip must be positive, got {clip!r}")
        self.clip = float(clip)

    def quantize(self, x: Tensor) -> Tensor:
        return sign_ste(x, self.clip)

    def extra_repr(self) -> str:
        return f"clip={self.clip}"


@torch.fx.wrap
def _xnor(x: Tensor, axis: int | None, group_size: int | None, who: str) -> Tensor:
    g = Granularity(axis=axis, group_size=group_size)
    alpha = g.aggregate(x.detach().abs().to(compute_dtype(x)), "mean", who)  # float32 for half precision
    return scaled_sign(x, g.expand(alpha), x.numel() // alpha.numel())


@register_quantizer(
    "xnor",
    examples=[
        # Quantizing again recomputes mean|W| from the scaled signs: equal up to one float rounding.
        Example("w-per-channel", lambda: XNORWeightQuantizer(axis=0), role="weight", idempotent=False),
    ],
)
class XNORWeightQuantizer(StatelessQuantizer):
    """XNOR-Net binary weights with a per-channel scale (Rastegari et al. 2016, "XNOR-Net", section 3.1).

    Forward: ``W_b = alpha * sign(W)`` with ``alpha = mean(|W|)`` per output
    channel (``axis=0``) or per tensor (``axis=None``); ``sign(0) = +1``.
    Gradient (the paper's): ``dC/dW = dC/dW_b * (1 / n + alpha * 1{|W| <= 1})``,
    ``n`` the number of weights sharing ``alpha``. Weights only (the paper's
    input binarization ``K`` is not part of this class).

    Args:
        axis: per-channel axis (0: output channels), or ``None`` for per tensor.
        group_size: with ``axis``, one ``alpha`` per group.

    Example:
        >>> XNORWeightQuantizer(axis=0)(torch.tensor([[1.0, -3.0], [0.5, 0.5]]))
        tensor([[ 2.0000, -2.0000],
                [ 0.5000,  0.5000]])
    """

    def __init__(self, *, axis: int | None = 0, group_size: int | None = None) -> None:
        super().__init__()
        self.granularity = Granularity(axis=axis, group_size=group_size)

    def quantize(self, x: Tensor) -> Tensor:
        return _xnor(x, self.granularity.axis, self.granularity.group_size, self._tq_name)

    def extra_repr(self) -> str:
        return str(self.granularity)


@torch.fx.wrap
def _ternary(x: Tensor, threshold: float, axis: int | None, group_size: int | None, who: str) -> Tensor:
    g = Granularity(axis=axis, group_size=group_size)
    a = x.detach().abs().to(compute_dtype(x))  # means in float32 for half precision
    delta = threshold * g.expand(g.aggregate(a, "mean", who))
    mask = (a > delta).to(a.dtype)
    count = g.aggregate(mask, "sum", who).clamp(min=1.0)
    alpha = g.expand(g.aggregate(a * mask, "sum", who) / count)  # mean of |W| above Delta
    t = torch.where(x.detach() >= 0, alpha, -alpha) * mask
    return straight_through(x, t.to(x.dtype))


@register_quantizer(
    "twn",
    examples=[
        # Quantizing again recomputes alpha as a mean of alphas: equal up to one float rounding.
        Example("w", lambda: TernaryQuantizer(), role="weight", idempotent=False),
        Example("w-per-channel", lambda: TernaryQuantizer(axis=0), role="weight", idempotent=False),
    ],
)
class TernaryQuantizer(StatelessQuantizer):
    """Ternary Weight Networks (Li et al. 2016, "Ternary Weight Networks", eq. 6 and 7).

    Forward: ``Delta = threshold * mean(|W|)``, ``alpha = mean(|W_i| : |W_i| > Delta)``
    and ``W_t = alpha * sign(W) * 1{|W| > Delta}`` (values ``-alpha, 0, alpha``),
    per tensor or per range of the granularity (``alpha = 0`` where nothing
    exceeds ``Delta``). Gradient: the incoming gradient, unchanged (STE; the
    paper updates the float weights with the ternary weights' gradient).

    Args:
        threshold: the factor of ``mean|W|`` (0.7 in the paper).
        axis: ``None`` per tensor, or the per-channel axis.
        group_size: with ``axis``, per-group.

    Example:
        >>> TernaryQuantizer()(torch.tensor([-2.0, 0.1, 0.3, 1.6]))  # Delta = 0.7, alpha = 1.8
        tensor([-1.8000,  0.0000,  0.0000,  1.8000])
    """

    def __init__(self, threshold: float = 0.7, *, axis: int | None = None, group_size: int | None = None) -> None:
        super().__init__()
        if not (isinstance(threshold, (int, float)) and threshold >= 0):
            raise ValueError(f"{type(self).__name__}: threshold must be >= 0, got {threshold!r}")
        self.threshold = float(threshold)
        self.granularity = Granularity(axis=axis, group_size=group_size)

    def quantize(self, x: Tensor) -> Tensor:
        g = self.granularity
        return _ternary(x, self.threshold, g.axis, g.group_size, self._tq_name)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, {self.granularity}"
