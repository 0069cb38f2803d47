"""Research baselines: the standard quantization methods as small quantizer classes.

Each class is a :class:`~torchquant.quantizers.Quantizer` that works inside
:class:`~torchquant.qmodules.QWrapper` and :class:`~torchquant.qmodules.QOp`,
keeps its state in registered parameters and buffers (``state_dict`` round
trips into a freshly built module) and is registered by name::

    q = tq.make_quantizer("lsq", n_bits=4, axis=0)

| registry name | class | paper |
|---|---|---|
| ``lsq`` | :class:`LSQQuantizer` | Esser et al. 2020 |
| ``lsq+`` | :class:`LSQPlusQuantizer` | Bhalgat et al. 2020 |
| ``pact`` | :class:`PACTQuantizer` | Choi et al. 2018 |
| ``dorefa_weight``, ``dorefa_act`` | :class:`DoReFaWeightQuantizer`, :class:`DoReFaActQuantizer` | Zhou et al. 2016 |
| ``bnn`` | :class:`BinaryQuantizer` | Courbariaux et al. 2016 |
| ``xnor`` | :class:`XNORWeightQuantizer` | Rastegari et al. 2016 |
| ``twn`` | :class:`TernaryQuantizer` | Li et al. 2016 |
| ``minifloat``, ``fp8_e4m3``, ``fp8_e5m2``, ``fp6_*``, ``fp4_e2m1`` | :class:`MinifloatQuantizer` | OCP FP8 (2023) |
| ``mx``, ``mxfp8_*``, ``mxfp6_*``, ``mxfp4``, ``mxint8`` | :class:`MXQuantizer` | OCP MX v1.0 (2023) |

Power-of-two scales are an option of the core affine quantizer:
``AffineQuantizer(..., power_of_two=True)``.

Learned parameters (LSQ's step, LSQ+'s offset, per-channel PACT clipping
levels) whose shape depends on the data exist from construction as empty
``nn.Parameter`` objects, so an optimizer built before the first forward holds
them; the first :meth:`~torchquant.quantizers.Quantizer.pre_observe` (a
calibration or QAT forward) fills them in place with ``param.data = ...``,
keeping the same ``Parameter`` object. Loading a state dict resizes them.
Wrap a model in ``DistributedDataParallel`` only after that first forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .granularity import Granularity
from .quantizers import AffineGrid, Quantizer, check_n_bits
from .quantizers_functional import (
    affine_quantize,
    compute_dtype,
    gradient_clip,
    lsq_quantize,
    minifloat_quantize,
    mx_quantize,
    pact_quantize,
    round_ste,
    scaled_sign,
    sign_ste,
    straight_through,
)
from .range_observers import RangeObserver
from .registry import register_quantizer

__all__ = [
    "FORMATS",
    "BinaryQuantizer",
    "DoReFaActQuantizer",
    "DoReFaWeightQuantizer",
    "LSQPlusQuantizer",
    "LSQQuantizer",
    "MXQuantizer",
    "MinifloatFormat",
    "MinifloatQuantizer",
    "PACTQuantizer",
    "TernaryQuantizer",
    "XNORWeightQuantizer",
    "pact_regularization",
]

# Primitives and the leaf functions below are leaves for torch.fx: tracing records one call instead
# of entering them (their shape logic needs real tensors).
for _name in ("affine_quantize", "gradient_clip", "pact_quantize", "sign_ste", "minifloat_quantize"):
    torch.fx.wrap(_name)

_EPS = torch.finfo(torch.float32).eps


class _LazyParamQuantizer(Quantizer):
    """Base of quantizers with learned parameters shaped by the first observed tensor.

    Subclasses list the parameter names in ``_lazy_params`` and fill them in
    :meth:`_init_params` (called by the first :meth:`pre_observe`).
    """

    _lazy_params: tuple[str, ...] = ()

    def __init__(self, axis: int | None, group_size: int | None) -> None:
        super().__init__()
        self.granularity = Granularity(axis=axis, group_size=group_size)
        for name in self._lazy_params:
            self.register_parameter(name, nn.Parameter(torch.empty(0)))

    @property
    def initialized(self) -> bool:
        """Whether the learned parameters have values (observed or loaded)."""
        # _parameters, not getattr: torch.fx proxies parameters fetched by attribute.
        return self._parameters[self._lazy_params[0]].numel() > 0

    def pre_observe(self, x: Tensor) -> None:
        """Initialise the learned parameters from the first tensor seen; later calls do nothing."""
        if not self.initialized:
            with torch.no_grad():
                values = self._init_params(x.detach())
            for name, v in zip(self._lazy_params, values):
                p = getattr(self, name)
                # Same Parameter object: optimizers built earlier keep it. Device and dtype follow the
                # module's (.to() / .half() before the first forward), not the observed tensor's.
                p.data = v.to(device=p.device, dtype=p.dtype)

    def post_observe(self, x: Tensor) -> None:
        pass

    def reset(self) -> None:
        """Forget the learned values (the next ``pre_observe`` initialises again)."""
        for name in self._lazy_params:
            p = getattr(self, name)
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def _init_params(self, x: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _check_initialized(self) -> None:
        if not self.initialized:
            raise RuntimeError(
                f"{self._tq_name}: learned parameters {', '.join(self._lazy_params)} are not initialised; "
                "calibrate first (run data through the model in a CALIBRATION or QUANT_AWARE_TRAIN mode) "
                "or load a state dict"
            )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Parameters take the shape of what is loaded (they are empty before the first observation).
        for name in self._lazy_params:
            key, p = prefix + name, getattr(self, name)
            if key in state_dict and state_dict[key].shape != p.shape:
                p.data = torch.empty_like(state_dict[key], dtype=p.dtype, device=p.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


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
    gscale = 1.0 / math.sqrt(x.numel() / step.numel() * qp) if scale_grad else 1.0
    return lsq_quantize(x, g.expand(step), None if offset is None else g.expand(offset), qn, qp, gscale)


def _int_range(n_bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)``: the grid is the integers ``-Q_N .. Q_P``."""
    if signed:
        return 2 ** (n_bits - 1), 2 ** (n_bits - 1) - 1
    return 0, 2**n_bits - 1


@register_quantizer("lsq")
class LSQQuantizer(_LazyParamQuantizer):
    """Learned Step Size Quantization (Esser et al. 2020, "Learned Step Size Quantization", ICLR).

    Forward: ``x_q = round(clamp(x / s, -Q_N, Q_P)) * s`` with the learned step
    ``s`` (one per range of the granularity) and ``Q_N = 2 ** (b - 1)``,
    ``Q_P = 2 ** (b - 1) - 1`` signed, ``Q_N = 0``, ``Q_P = 2 ** b - 1`` unsigned.

    Gradient (the paper's eq. 3, rounding passed straight through): ``x``
    gets the incoming gradient where ``-Q_N <= x / s <= Q_P``, 0 elsewhere;
    ``s`` gets ``g * sum(grad * d)`` with ``d = round(x / s) - x / s`` inside the
    range, ``-Q_N`` below and ``Q_P`` above, and the gradient scale
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

    _lazy_params = ("step",)
    step: nn.Parameter

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
        self.n_bits = check_n_bits(n_bits, type(self).__name__, low=2 if self.signed else 1, high=16)
        self.grad_scale = bool(grad_scale)
        self.qn, self.qp = _int_range(self.n_bits, self.signed)

    def _init_params(self, x: Tensor) -> tuple[Tensor, ...]:
        x = x.to(compute_dtype(x))
        mean_abs = self.granularity.aggregate(x.abs(), "mean", self._tq_name)
        return ((2.0 * mean_abs / math.sqrt(self.qp)).clamp(min=_EPS),)

    def quantize(self, x: Tensor) -> Tensor:
        self._check_initialized()
        g = self.granularity
        return _lsq(x, self.step, None, self.qn, self.qp, self.grad_scale, g.axis, g.group_size)

    def grid(self) -> AffineGrid:
        self._check_initialized()
        s = self.granularity.expand(self.step.detach())
        return AffineGrid(s, torch.zeros_like(s), -self.qn, self.qp, self.granularity)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, signed={self.signed}, {self.granularity}, grad_scale={self.grad_scale}"


@register_quantizer("lsq+")
class LSQPlusQuantizer(_LazyParamQuantizer):
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

    _lazy_params = ("step", "offset")
    step: nn.Parameter
    offset: nn.Parameter

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
        self.n_bits = check_n_bits(n_bits, type(self).__name__, low=2 if self.signed else 1, high=16)
        if init not in ("minmax", "std"):
            raise ValueError(f"{type(self).__name__}: init must be 'minmax' or 'std', got {init!r}")
        self.init = init
        self.grad_scale = bool(grad_scale)
        self.qn, self.qp = _int_range(self.n_bits, self.signed)

    def _init_params(self, x: Tensor) -> tuple[Tensor, ...]:
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
        self._check_initialized()
        g = self.granularity
        return _lsq(x, self.step, self.offset, self.qn, self.qp, self.grad_scale, g.axis, g.group_size)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, signed={self.signed}, {self.granularity}, init={self.init!r}"


@register_quantizer("pact")
class PACTQuantizer(_LazyParamQuantizer):
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

    _lazy_params = ("alpha",)
    alpha: nn.Parameter

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

    def _init_params(self, x: Tensor) -> tuple[Tensor, ...]:
        shape = self.granularity.compact_shape(x.shape)
        return (torch.full(shape, self.alpha_init, dtype=compute_dtype(x)),)

    def quantize(self, x: Tensor) -> Tensor:
        self._check_initialized()
        return pact_quantize(x, self.alpha, 2**self.n_bits)

    def regularization(self) -> Tensor:
        """``reg_lambda * sum(alpha ** 2)``, to add to the training loss."""
        return self.reg_lambda * self.alpha.square().sum()

    def grid(self) -> AffineGrid:
        self._check_initialized()
        a = self.alpha.detach()
        s = a / (2**self.n_bits - 1)
        return AffineGrid(s, torch.zeros_like(s), 0, 2**self.n_bits - 1, self.granularity)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, reg_lambda={self.reg_lambda}, {self.granularity}"


def pact_regularization(model: nn.Module) -> Tensor:
    """Sum of :meth:`PACTQuantizer.regularization` over every PACT quantizer in ``model`` (0 if none)."""
    terms = [m.regularization() for m in model.modules() if isinstance(m, PACTQuantizer)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class _StatelessQuantizer(Quantizer):
    """A quantizer that computes everything from the tensor it quantizes."""

    def pre_observe(self, x: Tensor) -> None:
        pass

    def post_observe(self, x: Tensor) -> None:
        pass


@torch.fx.wrap
def _dorefa_weight(x: Tensor, n_bits: int, axis: int | None, group_size: int | None, who: str) -> Tensor:
    g = Granularity(axis=axis, group_size=group_size)
    if n_bits == 1:
        e = g.expand(g.aggregate(x.detach().abs(), "mean", who))
        return straight_through(x, torch.where(x >= 0, e, -e))
    n = 2**n_bits - 1
    t = torch.tanh(x)
    m = g.expand(g.aggregate(t.abs(), "amax", who)).clamp(min=_EPS)
    w01 = t / (2 * m) + 0.5  # in [0, 1]
    return 2 * (round_ste(w01 * n) / n) - 1


@register_quantizer("dorefa_weight")
class DoReFaWeightQuantizer(_StatelessQuantizer):
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


@register_quantizer("dorefa_act")
class DoReFaActQuantizer(_StatelessQuantizer):
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


@register_quantizer("bnn")
class BinaryQuantizer(_StatelessQuantizer):
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
    alpha = g.aggregate(x.detach().abs(), "mean", who)
    return scaled_sign(x, g.expand(alpha), x.numel() // alpha.numel())


@register_quantizer("xnor")
class XNORWeightQuantizer(_StatelessQuantizer):
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
    a = x.detach().abs()
    delta = threshold * g.expand(g.aggregate(a, "mean", who))
    mask = (a > delta).to(a.dtype)
    count = g.aggregate(mask, "sum", who).clamp(min=1.0)
    alpha = g.expand(g.aggregate(a * mask, "sum", who) / count)  # mean of |W| above Delta
    t = torch.where(x.detach() >= 0, alpha, -alpha) * mask
    return straight_through(x, t.to(x.dtype))


@register_quantizer("twn")
class TernaryQuantizer(_StatelessQuantizer):
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


# --------------------------------------------------------------------------- minifloat and MX

_SPECIALS = ("ieee", "nan_only", "finite")


@dataclass(frozen=True)
class MinifloatFormat:
    """A sign-magnitude floating-point format with ``exp_bits`` exponent and ``man_bits`` mantissa bits.

    Args:
        exp_bits: exponent bits ``E`` (>= 1).
        man_bits: mantissa bits ``M`` (>= 0).
        bias: exponent bias; ``None`` means ``2 ** (E - 1) - 1``.
        special: which encodings are not finite numbers:
            ``"ieee"``: the top exponent holds infinities and NaNs (FP8 E5M2);
            ``"nan_only"``: only the all-ones exponent-and-mantissa code is NaN
            (FP8 E4M3 of the OCP spec, torch's ``float8_e4m3fn``);
            ``"finite"``: every code is a number (OCP FP6 E3M2/E2M3, FP4 E2M1).

    Quantizing to a format saturates to ``+-max_value`` and generates neither
    infinities nor NaNs. Subnormals (exponent field 0) are supported.
    """

    exp_bits: int
    man_bits: int
    bias: int | None = None
    special: str = "finite"

    def __post_init__(self) -> None:
        if isinstance(self.exp_bits, bool) or not isinstance(self.exp_bits, int) or not 1 <= self.exp_bits <= 8:
            raise ValueError(f"MinifloatFormat: exp_bits must be an int in [1, 8], got {self.exp_bits!r}")
        if isinstance(self.man_bits, bool) or not isinstance(self.man_bits, int) or not 0 <= self.man_bits <= 10:
            raise ValueError(f"MinifloatFormat: man_bits must be an int in [0, 10], got {self.man_bits!r}")
        if self.special not in _SPECIALS:
            raise ValueError(f"MinifloatFormat: special must be one of {_SPECIALS}, got {self.special!r}")
        if self.special == "ieee" and self.exp_bits < 2:
            raise ValueError("MinifloatFormat: special='ieee' needs exp_bits >= 2")
        if self.special == "nan_only" and self.man_bits < 1:
            raise ValueError("MinifloatFormat: special='nan_only' needs man_bits >= 1")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exp_bits - 1) - 1)

    @property
    def name(self) -> str:
        return f"e{self.exp_bits}m{self.man_bits}"

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest normal value."""
        top = 2**self.exp_bits - 1  # largest exponent field
        return (top - 1 if self.special == "ieee" else top) - self.bias  # type: ignore[operator]

    @property
    def max_value(self) -> float:
        """Largest finite magnitude (448 for E4M3, 57344 for E5M2, 6 for E2M1)."""
        m = self.man_bits
        frac = 2 - 2 ** (1 - m) if self.special == "nan_only" else 2 - 2**-m
        return frac * 2.0**self.emax

    def quantize(self, x: Tensor, scale: Tensor | float = 1.0) -> Tensor:
        """``x`` rounded to this format after division by ``scale`` (see :func:`minifloat_quantize`)."""
        return minifloat_quantize(x, scale, self.man_bits, self.bias, self.max_value)  # type: ignore[arg-type]


FORMATS: dict[str, MinifloatFormat] = {
    "fp8_e4m3": MinifloatFormat(4, 3, special="nan_only"),
    "fp8_e5m2": MinifloatFormat(5, 2, special="ieee"),
    "fp6_e3m2": MinifloatFormat(3, 2),
    "fp6_e2m3": MinifloatFormat(2, 3),
    "fp4_e2m1": MinifloatFormat(2, 1),
    # MXINT8's element: int8 with an implicit scale 2**-6, symmetric range [-127, 127]; as a format,
    # E1M6 with bias 1 and no special codes has exactly these values.
    "int8": MinifloatFormat(1, 6, bias=1),
}
"""The OCP formats by name (``"int8"``: MX's INT8 element, see
:func:`~torchquant.quantizers_functional.mx_quantize`)."""


def _format(fmt: MinifloatFormat | str, who: str) -> MinifloatFormat:
    if isinstance(fmt, MinifloatFormat):
        return fmt
    if isinstance(fmt, str):
        key = fmt.lower()
        for name, f in FORMATS.items():
            if key in (name, name.split("_")[-1]):
                return f
    raise ValueError(f"{who}: unknown format {fmt!r}; give a MinifloatFormat or one of {', '.join(FORMATS)}")


@register_quantizer("minifloat")
class MinifloatQuantizer(Quantizer):
    """Minifloat fake quantization (ExMy with bias, subnormals, saturation) with an optional range-based scale.

    Forward: ``x_q = round_fmt(x / scale) * scale``, ``round_fmt`` rounding to the
    nearest value of the format (ties to even) and saturating at
    ``+-fmt.max_value``. ``scale = max(|min|, |max|) / fmt.max_value`` from
    ``range_observer`` (per tensor or per channel, as the observer's
    granularity), or 1 without an observer (a plain cast, e.g. equal to
    ``x.to(torch.float8_e4m3fn).float()`` for FP8 E4M3). FP8 E4M3 and E5M2
    follow the OCP 8-bit floating point specification (2023); FP6 and FP4 the
    OCP MX v1.0 specification.

    Gradient: straight through (the incoming gradient for ``x``).

    Args:
        fmt: a :class:`MinifloatFormat` or a name from :data:`FORMATS`
            (``"fp8_e4m3"``, ``"e5m2"``, ...).
        range_observer: where the scale comes from, or ``None`` for scale 1.

    Example:
        >>> q = MinifloatQuantizer("fp4_e2m1")
        >>> q(torch.tensor([0.2, 0.3, 2.6, 100.0]))
        tensor([0.0000, 0.5000, 3.0000, 6.0000])
    """

    def __init__(self, fmt: MinifloatFormat | str, range_observer: RangeObserver | None = None) -> None:
        super().__init__()
        self.fmt = _format(fmt, type(self).__name__)
        if range_observer is not None and not isinstance(range_observer, RangeObserver):
            raise TypeError(f"{type(self).__name__}: range_observer must be a RangeObserver or None")
        self.range_observer = range_observer
        self._set_name(type(self).__name__)

    def _set_name(self, name: str) -> None:
        self._tq_name = name
        if self.range_observer is not None:
            self.range_observer._tq_name = f"{name}.range_observer"

    def pre_observe(self, x: Tensor) -> None:
        if self.range_observer is not None:
            self.range_observer.observe_batch(x)

    def post_observe(self, x: Tensor) -> None:
        pass

    def scale(self) -> Tensor:
        """``amax / fmt.max_value``, broadcastable against the input (a 0-d 1 without observer)."""
        if self.range_observer is None:
            return torch.ones(())
        mn, mx = self.range_observer.get_ranges()
        amax = torch.maximum(mn.abs(), mx.abs())
        return (amax / self.fmt.max_value).clamp(min=torch.finfo(torch.float32).tiny)

    def quantize(self, x: Tensor) -> Tensor:
        return self.fmt.quantize(x, self.scale().to(x.device))

    def extra_repr(self) -> str:
        f = self.fmt
        return f"{f.name}, bias={f.bias}, max={f.max_value}, scaled={self.range_observer is not None}"


@torch.fx.wrap
def _mx(
    x: Tensor, man_bits: int, bias: int, max_value: float, emax: int, block_size: int, axis: int, who: str
) -> Tensor:
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"{who}: axis {axis} does not exist in a tensor of shape {tuple(x.shape)}")
    return mx_quantize(x, man_bits, bias, max_value, emax, block_size, axis)


@register_quantizer("mx")
class MXQuantizer(_StatelessQuantizer):
    """OCP Microscaling (MX v1.0, 2023) block quantization.

    Forward: blocks of ``block_size`` (32) consecutive elements along ``axis``
    share the power-of-two (E8M0) scale ``X = 2 ** (floor(log2(max|block|)) - emax_elem)``;
    each element is rounded to the element format after division by ``X``
    (ties to even, saturating). See :func:`~torchquant.quantizers_functional.mx_quantize`.
    Gradient: straight through.

    Args:
        elem: element format: ``"fp8_e4m3"`` (MXFP8), ``"fp8_e5m2"``, ``"fp6_e3m2"``
            (MXFP6), ``"fp6_e2m3"``, ``"fp4_e2m1"`` (MXFP4), ``"int8"`` (MXINT8) or a
            :class:`MinifloatFormat`.
        block_size: elements per shared scale (32 in the specification).
        axis: axis along which blocks run: the reduction axis of the matmul,
            e.g. ``-1`` for a Linear weight ``(out, in)``, ``1`` for a Conv weight
            or an ``(N, C, H, W)`` activation.

    Example:
        >>> q = MXQuantizer("fp4_e2m1")
        >>> x = torch.tensor([5.0, 0.3, -1.2, 0.0])  # X = 2 ** (2 - 2) = 1
        >>> q(x)
        tensor([ 4.0000,  0.5000, -1.0000,  0.0000])
    """

    def __init__(self, elem: MinifloatFormat | str = "fp8_e4m3", block_size: int = 32, axis: int = -1) -> None:
        super().__init__()
        self.elem = _format(elem, type(self).__name__)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{type(self).__name__}: block_size must be a positive int, got {block_size!r}")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"{type(self).__name__}: axis must be an int, got {axis!r}")
        self.block_size = block_size
        self.axis = axis

    def quantize(self, x: Tensor) -> Tensor:
        f = self.elem
        return _mx(x, f.man_bits, f.bias, f.max_value, f.emax, self.block_size, self.axis, self._tq_name)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"elem={self.elem.name}, block_size={self.block_size}, axis={self.axis}"


def _register_named_formats() -> None:
    def minifloat_factory(fmt: str):
        def make(range_observer: RangeObserver | None = None) -> MinifloatQuantizer:
            return MinifloatQuantizer(fmt, range_observer)

        make.__name__ = make.__qualname__ = fmt
        make.__doc__ = f"``MinifloatQuantizer({fmt!r}, range_observer)``."
        return make

    def mx_factory(fmt: str):
        def make(block_size: int = 32, axis: int = -1) -> MXQuantizer:
            return MXQuantizer(fmt, block_size, axis)

        make.__name__ = make.__qualname__ = f"mx_{fmt}"
        make.__doc__ = f"``MXQuantizer({fmt!r}, block_size, axis)``."
        return make

    for fmt in ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"):
        register_quantizer(fmt)(minifloat_factory(fmt))
        register_quantizer("mx" + fmt.replace("fp4_e2m1", "fp4"))(mx_factory(fmt))
    register_quantizer("mxint8")(mx_factory("int8"))


_register_named_formats()
