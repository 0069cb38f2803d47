"""DoReFa-Net's weight and activation quantizers (Zhou et al. 2016): ``dorefa_weight``, ``dorefa_act``."""

from __future__ import annotations

import torch
from torch import Tensor

from ..granularity import Granularity
from ..quantizers_functional import affine_quantize, compute_dtype, gradient_clip, round_ste, straight_through
from ..registry import Example, register_quantizer
from .base import AffineGrid, StatelessQuantizer, check_n_bits

__all__ = ["DoReFaActQuantizer", "DoReFaWeightQuantizer"]

# Leaves for torch.fx: tracing records one call instead of entering the autograd.Function.
torch.fx.wrap("affine_quantize")
torch.fx.wrap("gradient_clip")

_EPS = torch.finfo(torch.float32).eps


@torch.fx.wrap
def _dorefa_weight(x: Tensor, n_bits: int, axis: int | None, group_size: int | None, who: str) -> Tensor:
    g = Granularity(axis=axis, group_size=group_size)
    if n_bits == 1:
        e = g.expand(g.aggregate(x.detach().abs(), "mean", who))
        return straight_through(x, torch.where(x >= 0, e, -e))
    n = 2**n_bits - 1
    t = torch.tanh(x.to(compute_dtype(x)))  # float32 for half precision: bfloat16 rounds w01 * n to other levels
    m = g.expand(g.aggregate(t.abs(), "amax", who)).clamp(min=_EPS)
    w01 = t / (2 * m) + 0.5  # in [0, 1]
    return (2 * (round_ste(w01 * n) / n) - 1).to(x.dtype)


@register_quantizer(
    "dorefa_weight",
    examples=[
        Example("w4", lambda: DoReFaWeightQuantizer(4), role="weight", idempotent=False),
        Example("w2-per-channel", lambda: DoReFaWeightQuantizer(2, axis=0), role="weight", idempotent=False),
        Example("w1-per-channel", lambda: DoReFaWeightQuantizer(1, axis=0), role="weight", idempotent=False),
    ],
)
class DoReFaWeightQuantizer(StatelessQuantizer):
    """DoReFa-Net weight quantizer (Zhou et al. 2016, "DoReFa-Net", eq. 9).

    Forward for ``k = n_bits > 1``: ``t = tanh(w)``,
    ``w' = t / (2 * max|t|) + 1/2`` (in ``[0, 1]``),
    ``w_q = 2 * round((2 ** k - 1) * w') / (2 ** k - 1) - 1`` (in ``[-1, 1]``).
    For ``k = 1``: ``w_q = sign(w) * mean(|w|)`` (``sign(0) = +1``).
    ``max`` and ``mean`` run over the whole tensor (the paper) or per range of
    the granularity.

    Gradient: rounding is passed straight through; autograd differentiates the
    tanh normalisation (``max|t|`` included), as the paper's definition does.
    For ``k = 1`` the gradient is the identity (``mean|w|`` is a constant, eq. 7).

    Args:
        n_bits: bits per weight.
        axis: ``None`` (per tensor) or the per-channel axis.
        group_size: with ``axis``, per-group.

    Example:
        >>> q = DoReFaWeightQuantizer(2)
        >>> w_q = q(torch.tensor([-2.0, 0.0, 0.1, 2.0]))  # levels -1, -1/3, 1/3, 1
        >>> (w_q * 3).round()
        tensor([-3.,  1.,  1.,  3.])
    """

    def __init__(self, n_bits: int, *, axis: int | None = None, group_size: int | None = None) -> None:
        super().__init__()
        self.n_bits = check_n_bits(n_bits, type(self).__name__, high=16)
        self.granularity = Granularity(axis=axis, group_size=group_size)

    def quantize(self, x: Tensor) -> Tensor:
        g = self.granularity
        return _dorefa_weight(x, self.n_bits, g.axis, g.group_size, self._tq_name)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, {self.granularity}"


@register_quantizer(
    "dorefa_act",
    examples=[
        Example("a4", lambda: DoReFaActQuantizer(4), role="act"),
    ],
)
class DoReFaActQuantizer(StatelessQuantizer):
    """DoReFa-Net activation quantizer (Zhou et al. 2016, section 2.4).

    Forward: ``x_q = round((2 ** k - 1) * clip(x, 0, 1)) / (2 ** k - 1)``.
    Gradient: the incoming gradient on ``[0, 1]``, 0 outside (clip's
    derivative, rounding passed straight through).

    Args:
        n_bits: bits per activation.

    Example:
        >>> DoReFaActQuantizer(2)(torch.tensor([0.2, 0.5, 3.0]))
        tensor([0.3333, 0.6667, 1.0000])
    """

    def __init__(self, n_bits: int) -> None:
        super().__init__()
        self.n_bits = check_n_bits(n_bits, type(self).__name__, high=16)

    def quantize(self, x: Tensor) -> Tensor:
        n = 2**self.n_bits
        x = gradient_clip(x, 0.0, 1.0)
        return affine_quantize(x, 1.0 / (n - 1), 0.0, n)

    def grid(self) -> AffineGrid:
        n = 2**self.n_bits
        return AffineGrid(torch.tensor(1.0 / (n - 1)), torch.tensor(0.0), 0, n - 1, Granularity())

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}"
