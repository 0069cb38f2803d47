"""Learned step sizes and clipping levels, trained with the task loss: LSQ, LSQ+ and PACT.

| registry name | class | paper |
|---|---|---|
| ``lsq`` | :class:`LSQQuantizer` | Esser et al. 2020 |
| ``lsq+`` | :class:`LSQPlusQuantizer` | Bhalgat et al. 2020 |
| ``pact`` | :class:`PACTQuantizer` | Choi et al. 2018 |

Learned parameters (LSQ's step, LSQ+'s offset, per-channel PACT clipping
levels) whose shape depends on the data exist from construction as empty
``nn.Parameter`` objects, so an optimizer built before the first forward holds
them; the first :meth:`~torchquant.quantizers.Quantizer.pre_observe` (a
calibration or QAT forward) fills them in place with ``param.data = ...``,
keeping the same ``Parameter`` object. Loading a state dict resizes them.
Wrap a model in ``DistributedDataParallel`` only after that first forward.
All three subclass :class:`~torchquant.quantizers.base.LearnedQuantizer`, the
public base that gives these guarantees to a new learned quantizer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..granularity import Granularity
from ..quantizers_functional import compute_dtype, lsq_quantize, pact_quantize
from ..registry import Example, register_quantizer
from .base import AffineGrid, LearnedQuantizer, check_n_bits

__all__ = ["LSQPlusQuantizer", "LSQQuantizer", "PACTQuantizer", "pact_regularization"]

# A leaf for torch.fx: tracing records one call instead of entering the autograd.Function.
torch.fx.wrap("pact_quantize")

_EPS = torch.finfo(torch.float32).eps


_LazyParamQuantizer = LearnedQuantizer  # the base's former, private name


@torch.fx.wrap
def _lsq(
    x: Tensor,
    step: Tensor,
    offset: Tensor | None,
    qn: int,
    qp: int,
    scale_grad: bool,
    axis: int | None,
    group_size: int | None,
) -> Tensor:
    # LSQ / LSQ+ from compact parameters: gradient scale 1 / sqrt(N * Q_P), N = elements per step.
    g = Granularity(axis=axis, group_size=group_size)
    n = x.numel() / max(step.numel(), 1)  # elements per step; 0 for an empty x, whose gradients are empty
    gscale = 1.0 / math.sqrt(n * qp) if scale_grad and n > 0 else 1.0
    if group_size is not None and axis is not None and x.dim() > 0:
        a = axis % x.dim()
        if all(n == 1 for n in x.shape[a + 1 :]):
            # Groups along the last axis (a weight's input dimension): x as (.., n/g, g) against the
            # parameters as (.., n/g, 1), not the parameters repeated to x's size: no tensor of x's
            # size besides the output, and the CUDA kernel reads one parameter per group.
            xg = g.grouped(x, "LSQ")
            params = [None if p is None else p.unsqueeze(a + 1) for p in (step, offset)]
            return lsq_quantize(xg, params[0], params[1], qn, qp, gscale).reshape(x.shape)
    return lsq_quantize(x, g.expand(step), None if offset is None else g.expand(offset), qn, qp, gscale)


def _int_range(n_bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)``: the grid is the integers ``-Q_N .. Q_P``."""
    if signed:
        return 2 ** (n_bits - 1), 2 ** (n_bits - 1) - 1
    return 0, 2**n_bits - 1


class _IntRange:
    """``n_bits`` as a checked attribute that keeps ``qn, qp`` (the grid ``-Q_N .. Q_P``) in step with it:
    setting it after construction (a mixed-precision search) changes the grid; ``signed`` is set first."""

    signed: bool
    qn: int
    qp: int

    @property
    def n_bits(self) -> int:
        return self._n_bits

    @n_bits.setter
    def n_bits(self, n_bits: int) -> None:
        self._n_bits = check_n_bits(n_bits, type(self).__name__, low=2 if self.signed else 1, high=16)
        self.qn, self.qp = _int_range(self._n_bits, self.signed)

    def __setstate__(self, state: dict) -> None:
        if "n_bits" in state:  # pickled when n_bits was a plain attribute
            state["_n_bits"] = state.pop("n_bits")
        super().__setstate__(state)  # type: ignore[misc]


@register_quantizer(
    "lsq",
    examples=[
        Example("w4-per-channel", lambda: LSQQuantizer(4, axis=0), role="weight"),
        Example("a4-unsigned", lambda: LSQQuantizer(4, signed=False), role="act"),
        Example("w4-per-group", lambda: LSQQuantizer(4, axis=-1, group_size=3), role="weight"),
    ],
)
class LSQQuantizer(_IntRange, LearnedQuantizer):
    """Learned Step Size Quantization (Esser et al. 2020, "Learned Step Size Quantization", ICLR).

    Forward: ``x_q = round(clamp(x / s, -Q_N, Q_P)) * s`` with the learned step
    ``s`` (one per range of the granularity) and ``Q_N = 2 ** (b - 1)``,
    ``Q_P = 2 ** (b - 1) - 1`` signed, ``Q_N = 0``, ``Q_P = 2 ** b - 1`` unsigned.

    Gradient (the paper's eq. 3, rounding passed straight through): ``x``
    gets the incoming gradient where ``-Q_N < x / s < Q_P``, 0 elsewhere;
    ``s`` gets ``g * sum(grad * d)`` with ``d = round(x / s) - x / s`` inside the
    range, ``-Q_N`` at or below it and ``Q_P`` at or above it, and the gradient scale
    ``g = 1 / sqrt(N * Q_P)`` where ``N`` is the number of elements that share
    one step (per channel for per-channel). For activations ``N`` counts every
    element of the batch the step quantizes (the paper's ``N_F`` counts the
    features of one sample); ``grad_scale=False`` sets ``g = 1``.

    Initialisation (the paper's): ``s = 2 * mean(|x|) / sqrt(Q_P)`` from the first
    observed tensor, per range. ``step`` exists from construction as an empty
    ``nn.Parameter`` and is filled in place then.

    Args:
        n_bits: bits per element (2 to 16 signed, 1 to 16 unsigned).
        signed: signed grid (weights) or unsigned (activations after ReLU).
        axis: ``None`` for one step per tensor, else the axis of per-channel steps.
        group_size: with ``axis``, one step per ``group_size`` elements (per-group).
        grad_scale: apply the gradient scale ``1 / sqrt(N * Q_P)``.

    Example:
        >>> q = LSQQuantizer(4, signed=True, axis=0)
        >>> w = torch.randn(8, 3, 3, 3)
        >>> q.pre_observe(w)  # initialises q.step, shape (8, 1, 1, 1)
        >>> q(w).shape, q.step.shape
        (torch.Size([8, 3, 3, 3]), torch.Size([8, 1, 1, 1]))
    """

    learned_params = ("step",)
    step: nn.Parameter

    non_grid_args = frozenset({"grad_scale"})  # scales the step's gradient only

    def __init__(
        self,
        n_bits: int,
        signed: bool = True,
        *,
        axis: int | None = None,
        group_size: int | None = None,
        grad_scale: bool = True,
    ) -> None:
        super().__init__(axis, group_size)
        self.signed = bool(signed)
        self.n_bits = n_bits  # checked; sets qn, qp
        self.grad_scale = bool(grad_scale)

    def init_params(self, x: Tensor) -> tuple[Tensor, ...]:
        x = x.to(compute_dtype(x))
        mean_abs = self.granularity.aggregate(x.abs(), "mean", self._tq_name)
        return ((2.0 * mean_abs / math.sqrt(self.qp)).clamp(min=_EPS),)

    def quantize(self, x: Tensor) -> Tensor:
        self.check_initialized()
        g = self.granularity
        return _lsq(x, self.step, None, self.qn, self.qp, self.grad_scale, g.axis, g.group_size)

    def grid(self) -> AffineGrid:
        self.check_initialized()
        s = self.granularity.expand(self.step.detach())
        return AffineGrid(s, torch.zeros_like(s), -self.qn, self.qp, self.granularity)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, signed={self.signed}, {self.granularity}, grad_scale={self.grad_scale}"


@register_quantizer(
    "lsq+",
    examples=[
        Example("w4-per-channel-std", lambda: LSQPlusQuantizer(4, signed=True, axis=0, init="std"), role="weight"),
        Example("a4-minmax", lambda: LSQPlusQuantizer(4), role="act"),
    ],
)
class LSQPlusQuantizer(_IntRange, LearnedQuantizer):
    """LSQ+ (Bhalgat et al. 2020, "LSQ+: Improving low-bit quantization through learnable offsets and better
    initialization", CVPR workshops): LSQ with a learned offset, for asymmetric activations (Swish, GELU...).

    Forward: ``x_q = clamp(round((x - beta) / s), -Q_N, Q_P) * s + beta`` with
    learned step ``s`` and offset ``beta`` (one each per range).

    Gradient: ``x`` and ``s`` as in :class:`LSQQuantizer` with ``x - beta`` in
    place of ``x``; ``beta`` gets the incoming gradient summed over the clipped
    elements (``d x_q / d beta`` is 0 inside the range and 1 outside). Both
    learned parameters' gradients are multiplied by LSQ's ``g = 1 / sqrt(N * Q_P)``.

    Initialisation (the paper's section 3.3), from the first observed tensor:
    ``init="minmax"`` (activations): ``s = (max - min) / (Q_P + Q_N)``,
    ``beta = min + Q_N * s`` so that the grid spans ``[min, max]``;
    ``init="std"`` (weights): ``s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2 ** (b - 1)``,
    ``beta = 0``.

    Args:
        n_bits: bits per element.
        signed: integer grid ``-2 ** (b-1) .. 2 ** (b-1) - 1`` (True) or ``0 .. 2 ** b - 1``.
        axis: ``None`` per tensor, else the per-channel axis.
        group_size: with ``axis``, per-group.
        init: ``"minmax"`` or ``"std"``.
        grad_scale: apply LSQ's gradient scale.

    Example:
        >>> q = LSQPlusQuantizer(2)
        >>> q.pre_observe(torch.tensor([-0.5, 2.5]))  # s = 3 / 3 = 1, beta = -0.5
        >>> q(torch.tensor([-0.5, 0.4, 2.0, 9.0])).tolist()
        [-0.5, 0.5, 1.5, 2.5]
    """

    learned_params = ("step", "offset")
    step: nn.Parameter
    offset: nn.Parameter

    non_grid_args = frozenset({"grad_scale", "init"})  # how the gradient is scaled and the parameters start

    def __init__(
        self,
        n_bits: int,
        signed: bool = False,
        *,
        axis: int | None = None,
        group_size: int | None = None,
        init: str = "minmax",
        grad_scale: bool = True,
    ) -> None:
        super().__init__(axis, group_size)
        self.signed = bool(signed)
        self.n_bits = n_bits  # checked; sets qn, qp
        if init not in ("minmax", "std"):
            raise ValueError(f"{type(self).__name__}: init must be 'minmax' or 'std', got {init!r}")
        self.init = init
        self.grad_scale = bool(grad_scale)

    def init_params(self, x: Tensor) -> tuple[Tensor, ...]:
        x = x.to(compute_dtype(x))
        g = self.granularity
        if self.init == "minmax":
            mn, mx = g.reduce(x, who=self._tq_name)
            s = ((mx - mn) / (self.qp + self.qn)).clamp(min=_EPS)
            return s, mn + self.qn * s
        mu = g.aggregate(x, "mean", self._tq_name)
        sigma = (g.aggregate(x * x, "mean", self._tq_name) - mu * mu).clamp(min=0.0).sqrt()
        s = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / 2 ** (self.n_bits - 1)
        return s.clamp(min=_EPS), torch.zeros_like(s)

    def quantize(self, x: Tensor) -> Tensor:
        self.check_initialized()
        g = self.granularity
        return _lsq(x, self.step, self.offset, self.qn, self.qp, self.grad_scale, g.axis, g.group_size)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, signed={self.signed}, {self.granularity}, init={self.init!r}"


@register_quantizer(
    "pact",
    examples=[
        Example("a4", lambda: PACTQuantizer(4, alpha_init=4.0), role="act"),
        Example("a4-per-channel", lambda: PACTQuantizer(4, axis=1), role="act"),
    ],
)
class PACTQuantizer(LearnedQuantizer):
    """PACT (Choi et al. 2018, "PACT: Parameterized Clipping Activation for Quantized Neural Networks").

    Forward: ``y = clip(x, 0, alpha)``, ``y_q = round(y * (2 ** b - 1) / alpha) * alpha / (2 ** b - 1)``
    with a learned clipping level ``alpha`` (replaces ReLU; unsigned).

    Gradient (the paper's eq. 3, rounding passed straight through): ``x`` gets
    the incoming gradient on ``0 <= x < alpha``; ``alpha`` gets it summed over
    ``x >= alpha`` (``d y_q / d alpha = 1`` there, 0 elsewhere). Add
    :meth:`regularization` (``reg_lambda * alpha ** 2``, the paper's L2 term) to the
    loss, or :func:`pact_regularization` for a whole model.

    Args:
        n_bits: bits per element.
        alpha_init: initial clipping level, positive (a large value starts with
            clipping inactive and lets training pull it down).
        reg_lambda: weight of the L2 regularisation of ``alpha``.
        axis: ``None`` (the paper: one alpha per layer) or a per-channel axis, e.g.
            1 for ``(N, C, H, W)`` activations; per-channel alphas are created,
            filled with ``alpha_init``, on the first ``pre_observe``.

    Example:
        >>> q = PACTQuantizer(2, alpha_init=3.0)
        >>> q(torch.tensor([-1.0, 0.4, 1.6, 5.0])).tolist()  # step 1
        [0.0, 0.0, 2.0, 3.0]
    """

    learned_params = ("alpha",)
    alpha: nn.Parameter

    non_grid_args = frozenset({"alpha_init", "reg_lambda"})  # where the learned clip starts and its penalty

    def __init__(
        self, n_bits: int, alpha_init: float = 10.0, reg_lambda: float = 0.0, *, axis: int | None = None
    ) -> None:
        super().__init__(axis, None)
        self.n_bits = check_n_bits(n_bits, type(self).__name__, high=16)
        if not (isinstance(alpha_init, (int, float)) and math.isfinite(alpha_init) and alpha_init > 0):
            raise ValueError(f"{type(self).__name__}: alpha_init must be a positive number, got {alpha_init!r}")
        if not (isinstance(reg_lambda, (int, float)) and reg_lambda >= 0):
            raise ValueError(f"{type(self).__name__}: reg_lambda must be >= 0, got {reg_lambda!r}")
        self.alpha_init = float(alpha_init)
        self.reg_lambda = float(reg_lambda)
        if axis is None:
            self.alpha.data = torch.tensor(self.alpha_init)

    def init_params(self, x: Tensor) -> tuple[Tensor, ...]:
        shape = self.granularity.compact_shape(x.shape)
        return (torch.full(shape, self.alpha_init, dtype=compute_dtype(x)),)

    def quantize(self, x: Tensor) -> Tensor:
        self.check_initialized()
        return pact_quantize(x, self.alpha, 2**self.n_bits)

    def regularization(self) -> Tensor:
        """``reg_lambda * sum(alpha ** 2)``, to add to the training loss."""
        return self.reg_lambda * self.alpha.square().sum()

    def grid(self) -> AffineGrid:
        self.check_initialized()
        a = self.alpha.detach()
        s = a / (2**self.n_bits - 1)
        return AffineGrid(s, torch.zeros_like(s), 0, 2**self.n_bits - 1, self.granularity)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, reg_lambda={self.reg_lambda}, {self.granularity}"


def pact_regularization(model: nn.Module) -> Tensor:
    """Sum of :meth:`PACTQuantizer.regularization` over every PACT quantizer in ``model`` (0 if none)."""
    terms = [m.regularization() for m in model.modules() if isinstance(m, PACTQuantizer)]
    return torch.stack(terms).sum() if terms else torch.zeros(())
