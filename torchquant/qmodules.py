"""Quantized modules and the state machine that drives them.

* :class:`QModuleState`: the ten modes, each saying whether weights and
  activations are observed and whether they are quantized.
* :class:`QModule`: base class; holds its mode in ``qstate`` (``BYPASSED`` at first).
* :class:`QWrapper`: a layer of :data:`~torchquant.layers.LAYER_ADAPTERS` (Linear, Conv,
  Embedding, Hugging Face ``Conv1D``), optionally followed by BatchNorm and an
  activation, with a weight quantizer and an output-activation quantizer.
* :class:`HadamardTransform`: a fixed orthogonal transform of a layer's input
  (:attr:`QWrapper.input_transform`), as rotation methods (QuaRot) insert.
* :class:`QOp`: any tensor-returning operator (``operator.add``, ``torch.cat``,
  a pooling module) with an output-activation quantizer.
* :class:`QMultiheadAttention`: ``nn.MultiheadAttention`` with its input and output
  projection weights and its output quantized.

The mode is changed only through :func:`torchquant.utils.set_qmodule_state` /
:func:`torchquant.utils.qmodule_state`, never by ``train()`` or ``eval()``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hadamard import hadamard, hadamard_factors, hadamard_transform
from .layers import BN_FOR_LAYER, LAYER_ADAPTERS, LAYER_ADAPTERS_BY_NAME, bn_scale, fold_bn_params, layer_adapter
from .quantizers import LearnedQuantizer, Quantizer
from .quantizers_functional import _is_tracing
from .spec import CONFIG_KEY, decode_entry, encode_entry

__all__ = [
    "SUPPORTED_ACTIVATIONS",
    "HadamardTransform",
    "QModule",
    "QModuleState",
    "QMultiheadAttention",
    "QOp",
    "QWrapper",
]


class QModuleState(enum.Enum):
    """What a :class:`QModule` does with weights and activations.

    ``CALIBRATION*`` modes observe without quantizing (the forward equals the
    float forward), ``QUANT_AWARE_TRAIN*`` modes observe and quantize,
    ``QUANT_EVAL*`` modes quantize with frozen ranges.
    """

    BYPASSED = "bypassed"
    QUANT_AWARE_TRAIN_WEIGHT_ONLY = "quant_aware_train_weight_only"
    QUANT_AWARE_TRAIN_ACT_ONLY = "quant_aware_train_act_only"
    QUANT_AWARE_TRAIN = "quant_aware_train"
    CALIBRATION = "calibration"
    CALIBRATION_WEIGHT_ONLY = "calibration_weight_only"
    CALIBRATION_ACT_ONLY = "calibration_act_only"
    QUANT_EVAL_WEIGHT_ONLY = "quant_eval_weight_only"
    QUANT_EVAL_ACT_ONLY = "quant_eval_act_only"
    QUANT_EVAL = "quant_eval"

    @property
    def is_weight_quantized(self) -> bool:
        return self in _WEIGHT_QUANTIZED

    @property
    def is_act_quantized(self) -> bool:
        return self in _ACT_QUANTIZED

    @property
    def is_weight_observed(self) -> bool:
        return self in _WEIGHT_OBSERVED

    @property
    def is_act_observed(self) -> bool:
        return self in _ACT_OBSERVED


_S = QModuleState
_WEIGHT_QUANTIZED = frozenset(
    {_S.QUANT_AWARE_TRAIN_WEIGHT_ONLY, _S.QUANT_AWARE_TRAIN, _S.QUANT_EVAL_WEIGHT_ONLY, _S.QUANT_EVAL}
)
_ACT_QUANTIZED = frozenset({_S.QUANT_AWARE_TRAIN_ACT_ONLY, _S.QUANT_AWARE_TRAIN, _S.QUANT_EVAL_ACT_ONLY, _S.QUANT_EVAL})
_WEIGHT_OBSERVED = frozenset(
    {_S.QUANT_AWARE_TRAIN_WEIGHT_ONLY, _S.QUANT_AWARE_TRAIN, _S.CALIBRATION, _S.CALIBRATION_WEIGHT_ONLY}
)
_ACT_OBSERVED = frozenset(
    {_S.QUANT_AWARE_TRAIN_ACT_ONLY, _S.QUANT_AWARE_TRAIN, _S.CALIBRATION, _S.CALIBRATION_ACT_ONLY}
)


def _saved_mode(state: Any, where: str) -> QModuleState:
    """The mode in a :meth:`QModule.get_extra_state` entry; ``ValueError`` starting with ``where`` otherwise."""
    try:
        return QModuleState(decode_entry(state).get("qstate"))
    except ValueError as e:
        raise ValueError(f"{where} holds no valid mode ({e}); valid: {[m.value for m in QModuleState]}") from None


# nn.Module's own bookkeeping, and a range observer's transient kernel-path state (its
# staging buffers and forward flag), which no output depends on.
_MODULE_INTERNALS = (frozenset(vars(nn.Module())) - {"training"}) | {"_stage", "_in_forward"}
_SCALARS = (bool, int, float, str, type(None), enum.Enum)


def _quantizer_state(q: Quantizer) -> tuple[list[Any], list[Tensor]] | None:
    """What ``q``'s output can depend on besides its input: its modules' and their attributes' values.

    ``(plain values, tensors)``: every attribute of ``q`` and its submodules (``training``
    included) that is not a tensor, as itself when it is a scalar and as its ``repr`` otherwise,
    and every parameter, buffer and tensor attribute. ``None`` when a forward hook would have
    to run (on ``q``, a submodule or globally): then the quantizer must be called.
    """
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return None
    plain: list[Any] = []
    tensors: list[Tensor] = []
    for m in q.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return None
        plain.append(type(m))
        for group in (m._parameters, m._buffers):
            for key, t in group.items():
                plain.append(key)
                if t is not None:
                    tensors.append(t)
        for key, v in vars(m).items():
            if key in _MODULE_INTERNALS:
                continue
            plain.append(key)
            if isinstance(v, Tensor):
                tensors.append(v)
            else:
                plain.append(v if isinstance(v, _SCALARS) else repr(v))
    return plain, tensors


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
        and a.stride() == b.stride()
        and torch.equal(a, b)
    )


def _cached_quantize(
    cache: dict[str, Any],
    q: Quantizer,
    w: Tensor,
    computed: bool = False,
    post: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``q(w)`` (``post(q(w))`` with ``post``), reused from the last call recorded in ``cache`` while ``w`` and
    ``q``'s state are equal.

    Only with gradients off and in eager mode, for a stored weight (``computed`` is false) and a
    quantizer without forward hooks. The inputs are compared by value (not by version counter:
    writes through ``.data`` do not bump it), so the result is always the uncached one. The
    caches live while :func:`~torchquant.utils.cached_quantized_weights` is active; they keep
    ``post``'s result only (an expert bank laid out from the quantized rows, not the rows too).
    """

    def run() -> Tensor:
        return q(w) if post is None else post(q(w))

    if (
        torch.is_grad_enabled()
        or type(w) not in (Tensor, nn.Parameter)
        or computed
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
    ):
        return run()
    state = _quantizer_state(q)
    if state is None:
        return run()
    plain, tensors = state
    c = cache
    if (
        c
        and c["plain"] == plain
        and len(c["tensors"]) == len(tensors)
        and _same_tensor(c["weight"], w)
        and all(_same_tensor(a, b) for a, b in zip(c["tensors"], tensors))
    ):
        return c["out"]
    out = run()
    c.clear()
    c.update(plain=plain, tensors=[t.detach().clone() for t in tensors], weight=w.detach().clone(), out=out)
    return out


def _recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing recomputing it
    (``torch.utils.checkpoint``, Hugging Face's ``gradient_checkpointing_enable()``).

    The observers saw the batch in the forward pass: observing it again would count it twice, and the
    recomputed outputs would be quantized on other ranges than the forward's (an EMA moved again).
    """
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


_NUMBERS = (int, float, torch.SymInt, torch.SymFloat)  # not an fx Proxy: a traced tensor is quantized


def _run_quantizer(q: Quantizer, x: Tensor, observe: bool, quantize: bool) -> Tensor:
    if isinstance(x, _NUMBERS):  # a number a traced operation computed (a size, as XCiT's H + 1): no grid
        return x
    observe = observe and not _recomputing()
    if isinstance(x, Tensor) and x.numel() == 0:
        # An empty batch (a head given no detections, a rank whose data ran out): the output is
        # empty on any grid, so it needs no state. Observers still see it: they keep their state,
        # and one synchronised across ranks joins the all-reduce the other ranks are in.
        if observe:
            q.pre_observe(x)
        if quantize and isinstance(q, LearnedQuantizer) and q.initialized:
            # through the quantizer: its parameters get zero gradients, as DDP expects of every rank
            return q(x)
        return x
    if observe:
        q.pre_observe(x)
    if quantize:
        x = q(x)
    if observe:
        q.post_observe(x)
    return x


class HadamardTransform(nn.Module):
    """``x @ hadamard(n) / sqrt(n)`` along the last dimension: an orthogonal transform with no parameters.

    What QuaRot (:func:`torchquant.ptq.quarot`) puts in front of a layer's input
    quantizer (:attr:`QWrapper.input_transform`), with the inverse folded into the
    layer's weight. The ``(m, m)`` base matrix of :func:`torchquant.hadamard.hadamard`
    is a non-persistent buffer: it follows ``.to()`` but is not in the state dict (it is
    a function of ``n``).

    Args:
        n: the size of the last dimension (an order :func:`~torchquant.hadamard.hadamard` builds).
        base_order: the base matrix's order (:func:`~torchquant.hadamard.hadamard`'s ``base_order``);
            default :func:`~torchquant.hadamard.hadamard_factors`' choice.

    Raises:
        ValueError: no Hadamard matrix of order ``n`` is known here, or ``base_order`` does not fit it.

    Example:
        >>> t = HadamardTransform(12)
        >>> x = torch.randn(2, 12)
        >>> torch.allclose(t(x).norm(dim=-1), x.norm(dim=-1))
        True
    """

    base: Tensor

    def __init__(self, n: int, base_order: int | None = None) -> None:
        super().__init__()
        m = hadamard_factors(n)[0] if base_order is None else base_order
        self.n = n
        self.register_buffer("base", hadamard(m, base_order=m), persistent=False)  # (m, m), the base itself

    @property
    def base_order(self) -> int:
        return self.base.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return hadamard_transform(x, self.base, n=self.n)  # n given: no shape read, so torch.fx traces it

    def extra_repr(self) -> str:
        m = self.base_order
        return f"n={self.n} (Paley {m} x Sylvester {self.n // m})" if m > 1 else f"n={self.n} (Sylvester)"


class QModule(nn.Module):
    """Base class of modules driven by :class:`QModuleState`.

    ``qstate`` starts as ``BYPASSED``; change it with
    :func:`~torchquant.utils.set_qmodule_state`. The state dict carries it (under
    ``<prefix>_extra_state``, a ``uint8`` tensor of JSON) and ``load_state_dict`` restores
    it, so a reloaded model quantizes as the saved one did; a state dict saved without
    the entry leaves the mode as it is.

    Example:
        >>> saved = QOp(torch.add)
        >>> saved.qstate = QModuleState.QUANT_EVAL
        >>> fresh = QOp(torch.add)
        >>> _ = fresh.load_state_dict(saved.state_dict())
        >>> fresh.qstate
        <QModuleState.QUANT_EVAL: 'quant_eval'>
    """

    def __init__(self) -> None:
        super().__init__()
        self.qstate = QModuleState.BYPASSED

    @property
    def mode(self) -> QModuleState:
        """Alias of ``qstate``, the name the original torchquant used (read and write).

        Example:
            >>> m = QOp(torch.add)
            >>> m.mode = QModuleState.QUANT_EVAL
            >>> m.qstate
            <QModuleState.QUANT_EVAL: 'quant_eval'>
        """
        return self.qstate

    @mode.setter
    def mode(self, value: QModuleState) -> None:
        if not isinstance(value, QModuleState):
            raise TypeError(f"{type(self).__name__}.mode must be a QModuleState, got {value!r}")
        self.qstate = value

    def get_extra_state(self) -> Tensor:
        """The mode as a ``uint8`` tensor of JSON: the state dict's ``<prefix>_extra_state``."""
        return encode_entry({"qstate": self.qstate.value})

    def set_extra_state(self, state: Any) -> None:
        """Restore the mode saved by :meth:`get_extra_state`.

        Raises:
            ValueError: ``state`` holds no valid mode.
        """
        self.qstate = _saved_mode(state, f"{type(self).__name__}: the state dict's {CONFIG_KEY!r}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + CONFIG_KEY
        if key in state_dict:
            try:
                _saved_mode(state_dict[key], f"{prefix[:-1] or type(self).__name__}: the state dict's {key!r}")
            except ValueError as e:
                errors.append(str(e))
                state_dict = {k: v for k, v in state_dict.items() if k != key}  # reported once, with the name
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if key in missing:  # saved before modes were recorded: the mode stays as it is
            missing.remove(key)

    WEIGHT_ROLES: tuple[str, ...] = ()
    """Roles whose quantizers (``<role>_quantizer``) quantize weights; the others quantize activations."""

    def quantizers(self) -> dict[str, Quantizer]:
        """This module's own quantizers by attribute name (``None`` ones left out)."""
        return {n: m for n, m in self.named_children() if isinstance(m, Quantizer)}

    def weight_quantizers(self) -> list[Quantizer]:
        """This module's weight quantizers (those of :attr:`WEIGHT_ROLES`), ``None`` ones left out.

        Example:
            >>> from torch import nn
            >>> from torchquant import AffineQuantizer, BatchMinMax
            >>> w = QWrapper(nn.Linear(4, 4), AffineQuantizer(8, BatchMinMax()), AffineQuantizer(8, BatchMinMax()))
            >>> [type(q).__name__ for q in w.weight_quantizers()], len(w.quantizers())
            (['AffineQuantizer'], 2)
        """
        own = self._modules
        return [q for r in self.WEIGHT_ROLES if isinstance(q := own.get(f"{r}_quantizer"), Quantizer)]

    def _name_quantizers(self, owner: str) -> None:
        for attr, q in self.quantizers().items():
            name = f"{owner}.{attr}"
            if hasattr(q, "_set_name"):
                q._set_name(name)
            else:
                q._tq_name = name


SUPPORTED_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.Hardswish,
    nn.GELU,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
)
_SUPPORTED_TEXT = (
    "|".join([*(t.__name__ for t in LAYER_ADAPTERS), *LAYER_ADAPTERS_BY_NAME])
    + ", optionally then (for "
    + "|".join(t.__name__ for t in BN_FOR_LAYER)
    + ") the matching "
    + "/".join(dict.fromkeys(b.__name__ for b in BN_FOR_LAYER.values()))
    + ", optionally then one of "
    + ", ".join(a.__name__ for a in SUPPORTED_ACTIVATIONS)
)


def _parse_layers(layers: nn.Module | Sequence[nn.Module]) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
    if isinstance(layers, nn.Sequential):
        seq = list(layers)
    elif isinstance(layers, nn.Module):
        seq = [layers]
    elif isinstance(layers, (list, tuple)):
        seq = list(layers)
    else:
        raise TypeError(
            f"QWrapper: expected a module, a list or an nn.Sequential of modules, got {type(layers).__name__}"
        )
    names = "[" + ", ".join(type(m).__name__ for m in seq) + "]"

    def bad() -> TypeError:
        return TypeError(f"QWrapper: unsupported layer sequence {names}; supported: {_SUPPORTED_TEXT}")

    if not seq or not all(isinstance(m, nn.Module) for m in seq) or layer_adapter(seq[0]) is None:
        raise bad()
    layer, rest = seq[0], seq[1:]
    adapter = layer_adapter(layer)
    why = adapter.why_unsupported(layer)
    if why is not None:
        raise ValueError(f"QWrapper: cannot quantize {layer}: {why}")
    bn = act = None
    if rest and isinstance(rest[0], nn.modules.batchnorm._BatchNorm):
        if adapter.bn is None:
            raise TypeError(
                f"QWrapper: {type(layer).__name__} takes no BatchNorm (nothing to fold it into), got {names}"
            )
        if type(rest[0]) is not adapter.bn:
            raise bad()
        bn, rest = rest[0], rest[1:]
        n_out = adapter.n_out(layer)
        if bn.num_features != n_out:
            raise ValueError(f"QWrapper: {layer} has {n_out} outputs but {bn} normalises {bn.num_features}")
    if rest and type(rest[0]) in SUPPORTED_ACTIVATIONS:
        act, rest = rest[0], rest[1:]
    if rest:
        raise bad()
    return layer, bn, act


# QWrapper attributes that hold modules, checked on assignment (forward reads them from _modules;
# input_quantizer and input_transform have checks of their own). A quantizer slot takes any module:
# export swaps in stand-ins that are not Quantizers.
_MODULE_SLOTS = frozenset({"layer", "bn", "act", "weight_quantizer", "acts_quantizer"})


FOLD_BN_MODES = ("two_pass", "one_pass")


@torch.library.custom_op("torchquant::buffer_snapshot", mutates_args=())
def _buffer_snapshot(t: Tensor) -> Tensor:
    """A copy of ``t`` that compiled code saves for the backward rather than re-reading ``t``."""
    return t.clone()


@_buffer_snapshot.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without the call when ``t`` has it (a no-op cast costs a microsecond of host time)."""
    return t if t.dtype == dtype else t.to(dtype)


def _unfold_ratio(scale: Tensor, dead: Tensor, dt: torch.dtype) -> Tensor:
    """``1 / scale`` in ``dt``, 1 on dead channels (selected first: no ``1 / 0``, whose gradient would be NaN)."""
    return torch.where(dead, 1.0, scale.to(dt)).reciprocal()


def _unfold_with(z: Tensor, ratio: Tensor, b: Tensor | None, dt: torch.dtype) -> Tensor:
    """``z * ratio + b`` in ``dt``, ``ratio`` and ``b`` ``(C,)`` along dim 1."""
    shape = (1, -1, *([1] * (z.dim() - 2)))
    z, ratio = _cast(z, dt), ratio.reshape(shape)
    return z * ratio if b is None else torch.addcmul(_cast(b, dt).reshape(shape), z, ratio)


def _unfold_plain(z: Tensor, scale: Tensor, dead: Tensor, b: Tensor | None, dt: torch.dtype) -> Tensor:
    """:class:`_Unfold` in torch operations, for tracers and compilers (which choose what to save themselves)."""
    return _unfold_with(z, _unfold_ratio(scale, dead, dt), b, dt)


class _Unfold(torch.autograd.Function):
    """``u = z / where(dead, 1, scale) + b``, per channel (dim 1), in ``dt``: the one-pass fold's unfolded output.

    Autograd would save ``z`` for the gradient of ``scale``; this saves ``u``, which the BatchNorm reading it keeps
    anyway (one activation less per folded layer), and gets ``z / scale`` back as ``u - b``. Differentiable twice
    (the backward recomputes the ratio from ``scale`` when it builds a graph) and in forward mode.
    """

    @staticmethod
    def forward(ctx, z, scale, dead, b, dt):  # type: ignore[override]
        ratio = _unfold_ratio(scale, dead, dt)  # (C,)
        u = _unfold_with(z, ratio, b, dt)
        ctx.save_for_backward(u, scale, dead, b, ratio)
        ctx.save_for_forward(u, scale, dead, b, ratio)
        # the backward's Python is host time on a GPU: its constants once, here
        ctx.consts = (1, -1, *([1] * (z.dim() - 2))), [0, *range(2, z.dim())], z.dtype, scale.dtype
        return u

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        u, scale, dead, b, ratio = ctx.saved_tensors
        shape, dims, z_dtype, s_dtype = ctx.consts
        if torch.is_grad_enabled():  # create_graph: the ratio as a function of scale, for the second derivative
            ratio = _unfold_ratio(scale, dead, u.dtype)
        need_z, need_s, _, need_b, _ = ctx.needs_input_grad
        gz = gs = gb = None
        if need_z:
            gz = g * ratio.reshape(shape)
            if gz.dtype != z_dtype:
                gz = gz.to(z_dtype)
        g_sum = g.sum(dims) if b is not None and (need_s or need_b) else None
        if need_s:
            # d u / d scale = -z / scale^2 = -(u - b) * ratio; sum(g * b) = b * sum(g)
            t = (g * u).sum(dims)
            if b is not None:
                t = t - b.to(t.dtype) * g_sum
            gs = (t * ratio).masked_fill(dead, 0.0).neg()  # dead channels: ratio is a constant
            if gs.dtype != s_dtype:
                gs = gs.to(s_dtype)
        if b is not None and need_b:
            gb = g_sum.to(b.dtype)
        return gz, gs, None, gb, None

    @staticmethod
    def jvp(ctx, dz, ds, _ddead, db, _ddt):  # type: ignore[override]
        u, _, dead, b, ratio = ctx.saved_tensors
        shape = ctx.consts[0]
        r = ratio.reshape(shape)
        du = torch.zeros_like(u) if dz is None else dz.to(u.dtype) * r
        if ds is not None:  # d u = -(u - b) * ratio * d scale, 0 on dead channels
            zr = u if b is None else u - b.to(u.dtype).reshape(shape)
            du = du - zr * (r * ds.to(u.dtype).masked_fill(dead, 0.0).reshape(shape))
        if db is not None:
            du = du + db.to(u.dtype).reshape(shape)
        return du


def fold_bn_mode(fold_bn: bool | str, who: str) -> str | None:
    """The folding mode a ``fold_bn`` argument asks for: ``None`` (not folded), ``"two_pass"`` or ``"one_pass"``.

    ``True`` is ``"two_pass"``. Raises ``ValueError`` naming ``who`` for anything else.
    """
    if fold_bn is False or fold_bn is None:
        return None
    if fold_bn is True:
        return "two_pass"
    if isinstance(fold_bn, str) and fold_bn in FOLD_BN_MODES:
        return fold_bn
    raise ValueError(f"{who}: fold_bn must be False, True, 'two_pass' or 'one_pass', got {fold_bn!r}")


class QWrapper(QModule):
    """A layer, optional BatchNorm and activation, with weight and output quantizers.

    The layer is one of :data:`~torchquant.layers.LAYER_ADAPTERS` (``Linear``,
    ``Conv1d/2d/3d``, ``Embedding``) or :data:`~torchquant.layers.LAYER_ADAPTERS_BY_NAME`
    (Hugging Face's ``Conv1D``). The weight quantizer sees the weight as an
    ``(out, in, ...)`` view (:meth:`weight_view`): a Linear's or Conv's weight as
    stored, an Embedding's ``(num_embeddings, dim)`` table (``axis=0`` is per row), and
    the transpose of a ``Conv1D``'s ``(in, out)`` weight, so ``axis=0`` always means
    output channels. The wrapped modules are used as they are (same parameter tensors,
    ``.layer`` is the original module), and with quantization bypassed (the default)
    the output is bit-identical to running them in sequence. Input ``x``: whatever
    the wrapped layer takes (token ids for an ``Embedding``); output: the
    activation's output, fake-quantized by ``acts_quantizer`` in the modes that
    quantize activations.

    BatchNorm folding. With ``fold_bn=True`` (or ``"two_pass"``), ``sigma = sqrt(running_var + eps)``,
    ``W_fold = W * gamma / sigma`` per output channel and ``Q`` the weight quantizer:

    * training (``self.training``), statistics not frozen: a float pass
      ``y = layer(x)`` (weight ``W``, bias ``b``) gives the batch statistics
      ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` (gradients flow through them as
      through BatchNorm) and updates the running statistics as BatchNorm does
      (momentum, unbiased variance, ``num_batches_tracked``); then
      ``out = layer(x; Q(W_fold), no bias) * sigma / sigma_B + beta + gamma * (b - mu_B) / sigma_B``.
      The factor ``sigma / sigma_B`` undoes the fold's running ``sigma`` so the output
      is normalised with the batch statistics, exactly as BatchNorm in training,
      while the quantizer always sees the weight folded with the running ``sigma``
      (Krishnamoorthi 2018, figure 8).
    * the same with ``fold_bn="one_pass"``, but with one convolution instead of two: the
      batch statistics are those of the quantized layer's output, ``z = layer(x; Q(W_fold))``
      rescaled to the unfolded layer's units (``u = z * sigma / gamma + b``), so
      ``out = (z - mean_B(z)) * sigma / sigma_B + beta`` with ``sigma_B = sqrt(var_B(u) + eps)``:
      exactly BatchNorm in training applied to ``u`` (torch.ao's ``ConvBn`` QAT modules
      do the same). ``W_fold`` uses the running ``sigma`` before this step's update.
      About half the convolution work of ``"two_pass"`` in training; the running
      statistics track the quantized layer rather than the float one. A channel whose
      quantized folded weight is all zero (``gamma == 0``, or a row the grid rounds to 0)
      outputs ``beta``, passes its gradient on with gain 1 (BatchNorm would divide it by
      ``sqrt(eps)``) and keeps its running statistics. Statistics in float32 for half
      precision models.
    * statistics frozen (:func:`~torchquant.freeze_bn_stats`) or eval:
      ``out = layer(x; Q(W_fold), beta + gamma * (b - mu) / sigma)`` with the running
      ``mu`` and ``sigma``, which are no longer updated.
    * when the mode neither observes nor quantizes weights (``BYPASSED``, ``*_ACT_ONLY``)
      or there is no weight quantizer, the layer and BatchNorm run unfolded, as with
      ``fold_bn=False`` (BatchNorm in eval, or frozen, uses its running statistics).

    Args:
        layers: a module, a list or an ``nn.Sequential``: a supported layer
            (``Linear``/``Conv1d``/``Conv2d``/``Conv3d``/``Embedding``/HF ``Conv1D``),
            optionally the matching ``BatchNorm`` (Linear and Conv only), optionally
            one of :data:`SUPPORTED_ACTIVATIONS`.
        weight_quantizer: quantizer for the layer's weight, or ``None`` (float weight).
        acts_quantizer: quantizer for the output activations, or ``None``.
        input_quantizer: quantizer for the layer's input, or ``None``: how transformer
            studies quantize activations ("W8A8": the inputs of every linear layer),
            driven by the activation side of the mode like ``acts_quantizer``. Not for
            an ``Embedding`` (its input is token ids).
        fold_bn: fold the BatchNorm into the layer's weight and bias before weight
            quantization (Jacob et al. 2018, section 3.2; Krishnamoorthi 2018,
            section 3.2), so the weight quantizer sees the weight that inference uses.
            Needs a BatchNorm that tracks running statistics. ``True`` or ``"two_pass"``
            (batch statistics from a float pass), ``"one_pass"`` (from the quantized
            pass), ``False``: not folded. See "BatchNorm folding" above.

    Input transform. ``input_transform`` (``None`` at first) may be set to a module
    (:class:`HadamardTransform`) that the forward pass applies to the input before
    anything else, in every mode, before the input quantizer: rotation methods (QuaRot)
    put an online Hadamard there and fold its inverse into the weight, so the float
    output does not change while the quantizer sees the rotated input.

    The wrapped layer's attributes stay readable through the wrapper
    (``wrapper.weight``, ``wrapper.in_features``), so a module that reads its
    layer's attributes keeps working once the layer is wrapped; they are the float
    layer's (:meth:`quantized_weight` gives the weight the current mode uses).

    Raises:
        TypeError: an unsupported layer sequence or a quantizer of the wrong type.
        ValueError: ``fold_bn`` not one of ``False``, ``True``, ``"two_pass"``, ``"one_pass"``;
            ``fold_bn`` set without a BatchNorm with running statistics, a
            BatchNorm whose size does not match the layer's outputs, or a layer
            configuration that cannot be quantized (an ``Embedding`` with ``max_norm``
            or ``sparse=True``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchquant import AffineQuantizer, BatchMinMax, ExpAvgMinMax, QWrapper
        >>> w = QWrapper(
        ...     [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()],
        ...     weight_quantizer=AffineQuantizer(4, BatchMinMax(axis=0)),
        ...     acts_quantizer=AffineQuantizer(8, ExpAvgMinMax()),
        ... )
        >>> w(torch.randn(1, 3, 8, 8)).shape
        torch.Size([1, 8, 6, 6])
    """

    input_transform: nn.Module | None
    WEIGHT_ROLES = ("weight",)

    def __init__(
        self,
        layers: nn.Module | Sequence[nn.Module],
        weight_quantizer: Quantizer | None = None,
        acts_quantizer: Quantizer | None = None,
        fold_bn: bool | str = False,
        input_quantizer: Quantizer | None = None,
    ) -> None:
        super().__init__()
        layer, bn, act = _parse_layers(layers)
        mode = fold_bn_mode(fold_bn, "QWrapper")
        for role, q in (
            ("weight_quantizer", weight_quantizer),
            ("acts_quantizer", acts_quantizer),
            ("input_quantizer", input_quantizer),
        ):
            if q is not None and not isinstance(q, Quantizer):
                raise TypeError(f"QWrapper: {role} must be a Quantizer or None, got {type(q).__name__}")
        if mode is not None:
            names = "+".join(type(m).__name__ for m in (layer, bn, act) if m is not None)
            if bn is None:
                raise ValueError(f"QWrapper: fold_bn={fold_bn!r} needs a BatchNorm after the layer, got {names}")
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError(f"QWrapper: fold_bn={fold_bn!r} needs running statistics, but {bn} tracks none")
        self.layer = layer
        self._adapter = layer_adapter(layer)
        self.bn = bn
        self.act = act
        self.weight_quantizer = weight_quantizer
        self.acts_quantizer = acts_quantizer
        self.input_quantizer = input_quantizer
        # registered even while None, so restoring a module dict (ptq.Snapshot) keeps the name
        self.register_module("input_transform", None)
        self.fold_bn = mode is not None
        self.fold_bn_mode = mode or "two_pass"  # how training computes batch statistics (used with fold_bn)
        self._bn_frozen = False  # Python mirror of the bn_frozen buffer (no host sync in forward)
        self._weight_cache: dict[str, Any] | None = None  # see torchquant.utils.cached_quantized_weights
        if self.fold_bn:
            self.register_buffer("bn_frozen", torch.zeros((), dtype=torch.bool))
        self._name_quantizers(f"QWrapper[{self._describe()}]")

    def _describe(self) -> str:
        return "+".join(type(m).__name__ for m in (self.layer, self.bn, self.act) if m is not None)

    def weight_view(self) -> Tensor:
        """The layer's float weight in the ``(out, in, ...)`` layout the weight quantizer sees.

        The parameter itself for Linear, Conv and Embedding (``(num_embeddings, dim)``);
        for Hugging Face's ``Conv1D`` the transposed view ``(out, in)`` of its
        ``(in, out)`` parameter. Writing into it (``copy_``) writes the parameter, except
        where the weight is computed (:attr:`weight_is_computed`).
        """
        return self._adapter.weight(self._modules["layer"])

    def weight_to_quantize(self) -> Tensor:
        """The float weight the weight quantizer sees: :meth:`weight_view`, BatchNorm folded in with ``fold_bn=True``.

        In the ``(out, in, ...)`` layout of :meth:`weight_view`; with ``fold_bn=True``,
        ``W * gamma / sigma`` with the running statistics (what its grid or levels are for).
        """
        return self.weight_view() if not self.fold_bn else self._folded_params()[0]

    @property
    def weight_is_computed(self) -> bool:
        """Whether :meth:`weight_view` computes the weight from parameters (timm's weight-standardised
        convolutions, a ``torch.nn.utils.parametrize`` parametrization, weight norm): the quantizer sees
        that weight, and writing into it changes no parameter (AdaRound, GPTQ and packing leave such layers
        as they are)."""
        return self._adapter.computed

    def quantized_weight(self) -> Tensor:
        """The weight as the current mode uses it (quantized or float), without observing.

        In the ``(out, in, ...)`` layout of :meth:`weight_view`. With ``fold_bn=True``
        this is the weight folded with the running statistics.
        """
        w = self.weight_to_quantize()
        if self.weight_quantizer is not None and self.qstate.is_weight_quantized:
            w = self.weight_quantizer(w)
        return w

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _MODULE_SLOTS and value is not None and not isinstance(value, nn.Module):
            # forward reads these from _modules: a plain callable stored beside them would never run
            where = f"QWrapper[{self._describe()}]" if "layer" in self._modules else "QWrapper"
            raise TypeError(f"{where}: {name} must be an nn.Module or None, got {type(value).__name__}")
        if name == "input_quantizer" and value is not None:
            if not isinstance(value, Quantizer):
                raise TypeError(f"QWrapper: input_quantizer must be a Quantizer or None, got {type(value).__name__}")
            if isinstance(self.layer, nn.Embedding):
                raise ValueError(
                    f"QWrapper[{self._describe()}]: an Embedding's input is token ids; it takes no input_quantizer"
                )
        if name == "input_transform" and value is not None:
            if not isinstance(value, nn.Module) or isinstance(value, Quantizer):
                raise TypeError(
                    "QWrapper: input_transform must be an nn.Module (not a Quantizer) or None, "
                    f"got {type(value).__name__}"
                )
            if isinstance(self.layer, nn.Embedding):
                raise ValueError(
                    f"QWrapper[{self._describe()}]: an Embedding's input is token ids; it takes no input_transform"
                )
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        # Modules that hold a layer read its attributes (``self.q_proj.weight.dtype``, ``in_features``):
        # they stay readable through the wrapper (the float parameters, not their quantized values).
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_modules", {}).get("layer")
            if name.startswith("_") or layer is None or not hasattr(layer, name):
                raise
            return getattr(layer, name)

    def observe_weight(self) -> None:
        """Let the weight quantizer observe the weight it will quantize (ranges from the weights, no data needed).

        The weight as the forward pass gives it to the quantizer: :meth:`weight_view`, or
        the folded weight with ``fold_bn=True``.
        """
        if self.weight_quantizer is None:
            return
        with torch.no_grad():
            w = self.weight_to_quantize()
            _run_quantizer(self.weight_quantizer, w, observe=True, quantize=False)

    def _quantize_input(self, x: Tensor) -> Tensor:
        s = self.qstate
        return _run_quantizer(self._modules["input_quantizer"], x, s.is_act_observed, s.is_act_quantized)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """The wrapped layers on ``x``, quantized as the mode says.

        ``bias``, when given, replaces the layer's own bias for this call: a module that passes its
        layer's weight to ``F.linear`` with a bias of its own making (torchvision's Swin V2 zeroes the
        keys' part) is sent here with that bias (:mod:`torchquant.weight_reads`). Not with
        ``fold_bn=True``.
        """
        if bias is not None and isinstance(bias, torch.fx.Proxy) and bias.node.op == "placeholder":
            bias = None  # traced as the root, fx makes the argument a placeholder: its default applies
        # Submodules from _modules, read once: nn.Module.__getattr__ (behind this class's own) costs
        # about 1 us per lookup, a tenth of a quantizer call's host time on a GPU. An attribute
        # set to None before it ever held a module lives in __dict__ instead, hence .get.
        mods = self._modules
        transform = mods.get("input_transform")
        if transform is not None:
            x = transform(x)
        s = self.qstate
        if mods.get("input_quantizer") is not None:
            x = self._quantize_input(x)
        if self.fold_bn:
            if bias is not None:
                raise ValueError(f"QWrapper[{self._describe()}]: a bias of the caller's cannot replace a folded one")
            return self._forward_folded(x)
        wq = mods.get("weight_quantizer")
        w = self.weight_view()
        if wq is not None:
            if self._weight_cache is not None and s.is_weight_quantized and not s.is_weight_observed:
                w = self._cached_quantized_weight(w)
            else:
                w = _run_quantizer(wq, w, s.is_weight_observed, s.is_weight_quantized)
        y = self._layer_with(x, w, getattr(mods["layer"], "bias", None) if bias is None else bias)
        bn, act, aq = mods.get("bn"), mods.get("act"), mods.get("acts_quantizer")
        if bn is not None:
            y = bn(y)
        if act is not None:
            y = act(y)
        if aq is not None:
            y = _run_quantizer(aq, y, s.is_act_observed, s.is_act_quantized)
        return y

    def _cached_quantized_weight(self, w: Tensor) -> Tensor:
        """``weight_quantizer(w)``, reused from the last call while ``w`` and the quantizer's state are equal
        (:func:`_cached_quantize`)."""
        return _cached_quantize(self._weight_cache, self.weight_quantizer, w, self.weight_is_computed)

    # ------------------------------------------------------------ BatchNorm folding
    def set_bn_frozen(self, frozen: bool = True) -> None:
        """Use (``True``) or stop using the running statistics in training; see :func:`~torchquant.freeze_bn_stats`.

        Raises:
            ValueError: this wrapper was built without ``fold_bn=True``.
        """
        if not self.fold_bn:
            raise ValueError(f"QWrapper[{self._describe()}]: set_bn_frozen needs fold_bn=True")
        self._bn_frozen = bool(frozen)
        self.bn_frozen.fill_(self._bn_frozen)

    def _folded_params(self) -> tuple[Tensor, Tensor]:
        """Weight and bias with the running statistics folded in (:func:`~torchquant.fold_bn_params`)."""
        return fold_bn_params(self.layer.weight, self.layer.bias, self.bn)

    def _folded_weight(self, scale: Tensor | None = None) -> Tensor:
        """The weight of :meth:`_folded_params` (the same operations), without computing the bias; folded with
        ``scale`` when given (``(C,)``, :func:`~torchquant.layers.bn_scale` of a copy of the running variance)."""
        w = self.layer.weight
        scale = bn_scale(self.bn) if scale is None else scale
        return w * scale.reshape(-1, *([1] * (w.dim() - 1)))

    def _layer_with(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """The layer's output with weight ``w`` (``(out, in, ...)`` layout) and bias ``b``."""
        return self._adapter.forward(self._modules["layer"], x, w, b)

    def _update_running_stats(self, mean_b: Tensor, var_b: Tensor, n: int) -> None:
        # BatchNorm's rule: momentum (or the cumulative average when it is None), unbiased variance.
        bn = self.bn
        with torch.no_grad():
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
            f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1.0 - f).add_(mean_b.detach(), alpha=f)
            bn.running_var.mul_(1.0 - f).add_(var_b.detach() * (n / max(n - 1, 1)), alpha=f)

    def _forward_one_pass(self, x: Tensor) -> Tensor:
        """Training with ``fold_bn="one_pass"``: BatchNorm's batch statistics read from the quantized output."""
        # The eager QAT step on a GPU is bound by its host time: submodules and tensors are read once (nn.Module's
        # __getattr__ costs about 1 us a lookup), and no-op casts are not called.
        s = self.qstate
        mods = self._modules
        bn, layer = mods["bn"], mods["layer"]
        running_mean, running_var, gamma, beta = bn.running_mean, bn.running_var, bn.weight, bn.bias
        var = running_var
        if torch.compiler.is_compiling():
            # The partitioner may recompute this read in the backward, after the update below has written the
            # buffer (wrong gradients, pytorch/pytorch#197039): an opaque copy is saved instead.
            var = torch.ops.torchquant.buffer_snapshot(var)
        scale = bn_scale(bn, var)  # (C,) gamma / sigma, the running sigma before this step's update
        w_fold = self._folded_weight(scale)  # eval folds the same bits
        w_fold = _run_quantizer(mods["weight_quantizer"], w_fold, s.is_weight_observed, s.is_weight_quantized)
        z = self._adapter.forward(layer, x, w_fold, None)  # (N, C, ...): gamma / sigma times the output, less b
        # A channel whose quantized folded weight is all zero (gamma == 0, or a weight the grid rounds to 0)
        # carries no batch statistics: normalised with weight sqrt(eps) on u = z + b it outputs beta, passes
        # the gradient on with gain 1 (BatchNorm would divide it by sqrt(eps)) and keeps its running statistics.
        # 1 / scale overflows half precision for small gamma: the statistics are taken in float32
        out_dtype = torch.promote_types(z.dtype, running_var.dtype)  # as the two-pass formula gives
        dt = torch.promote_types(z.dtype, torch.float32)
        # Every (C,) operation is a kernel launch on a GPU: the mask takes three. The product is 0 where either
        # factor is (or where it underflows dt: a scale the grid's step floor has rounded the row to 0 for anyway).
        row_max = torch.linalg.vector_norm(w_fold.detach().flatten(1), float("inf"), dim=1)
        dead = (_cast(row_max, dt) * _cast(scale.detach(), dt)) == 0  # (C,)
        # u = z * sigma / gamma + b, by the scale the weight was folded with (unquantized, the two cancel to
        # rounding); 1 on dead channels
        u = (_unfold_plain if _is_tracing() else _Unfold.apply)(z, scale, dead, layer.bias, dt)
        gain = torch.where(dead, bn.eps**0.5, torch.ones_like(scale, dtype=dt) if gamma is None else _cast(gamma, dt))
        if beta is not None:
            beta = _cast(beta, dt)
        nbt = bn.num_batches_tracked
        if nbt is not None:
            nbt.add_(1)  # a buffer: no gradient to record
        f = bn.momentum if bn.momentum is not None else 1.0 / float(nbt)
        # BatchNorm in training on u: batch statistics and running-statistics update in one native op, on a copy
        # (one launch for both; autograd keeps the tensors it was given; dead channels keep theirs)
        running = _cast(torch.stack((running_mean, running_var)), dt).unbind(0)
        y = F.batch_norm(u, *running, gain, beta, True, f, bn.eps)
        for buf, new in ((running_mean, running[0]), (running_var, running[1])):
            if new.dtype == buf.dtype:
                torch.where(dead, buf, new, out=buf)  # in place: one launch
            else:
                buf.copy_(torch.where(dead, buf, new))
        return _cast(y, out_dtype)

    def _forward_folded(self, x: Tensor) -> Tensor:
        s = self.qstate
        wq = self.weight_quantizer
        bn = self.bn
        unfolded = wq is None or not (s.is_weight_observed or s.is_weight_quantized)
        if not unfolded and x.dim() > 2 and isinstance(self._modules["layer"], nn.Linear):
            raise ValueError(
                f"QWrapper[{self._describe()}]: fold_bn needs a 2-D input (N, features), got {tuple(x.shape)}: "
                "BatchNorm1d normalises dim 1 of the Linear's output, not the features the fold scales"
            )
        if unfolded:
            y = self._layer_with(x, self.layer.weight, self.layer.bias)
            if self._bn_frozen:
                y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            else:
                y = bn(y)
        elif self.training and not self._bn_frozen and self.fold_bn_mode == "one_pass":
            y = self._forward_one_pass(x)
        elif self.training and not self._bn_frozen:
            y_float = self._layer_with(x, self.layer.weight, self.layer.bias)  # (N, C, ...)
            dims = [0, *range(2, y_float.dim())]
            mean_b = y_float.mean(dims)  # (C,)
            var_b = y_float.var(dims, unbiased=False)
            self._update_running_stats(mean_b, var_b, y_float.numel() // y_float.shape[1])
            w_fold = self._folded_weight()  # W * gamma / sigma, running sigma (just updated)
            w_fold = _run_quantizer(wq, w_fold, s.is_weight_observed, s.is_weight_quantized)
            gamma = bn.weight if bn.weight is not None else 1.0
            beta = bn.bias if bn.bias is not None else 0.0
            sigma = torch.sqrt(bn.running_var + bn.eps)
            sigma_b = torch.sqrt(var_b + bn.eps)
            b = self.layer.bias
            bias = beta + gamma * ((-mean_b if b is None else b - mean_b) / sigma_b)  # (C,)
            bshape = (1, -1, *([1] * (y_float.dim() - 2)))
            y = self._layer_with(x, w_fold, None) * (sigma / sigma_b).reshape(bshape) + bias.reshape(bshape)
        else:
            w_fold, b_fold = self._folded_params()
            w_fold = _run_quantizer(wq, w_fold, s.is_weight_observed, s.is_weight_quantized)
            y = self._layer_with(x, w_fold, b_fold)
        if self.act is not None:
            y = self.act(y)
        if self.acts_quantizer is not None:
            y = _run_quantizer(self.acts_quantizer, y, s.is_act_observed, s.is_act_quantized)
        return y

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_adapter" not in self.__dict__:  # a wrapper pickled before it held its adapter
            self._adapter = layer_adapter(self.layer)
        if "input_transform" not in self._modules:  # pickled before wrappers had one
            self.register_module("input_transform", None)
        self.__dict__.setdefault("_weight_cache", None)
        self.__dict__.setdefault("fold_bn_mode", "two_pass")  # pickled before the one-pass mode

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if self.fold_bn:
            self._bn_frozen = bool(self.bn_frozen)  # one host sync at load time

    def extra_repr(self) -> str:
        if self.fold_bn:
            fold = "True" if self.fold_bn_mode == "two_pass" else repr(self.fold_bn_mode)
            return f"qstate={self.qstate.name}, fold_bn={fold}, bn_frozen={self._bn_frozen}"
        return f"qstate={self.qstate.name}"


class QOp(QModule):
    """Any operator returning a tensor, with an output-activation quantizer.

    Args:
        op: a callable such as ``operator.add``, ``torch.cat`` or an ``nn.Module``;
            called with the arguments given to this module.
        acts_quantizer: quantizer for the output, or ``None``.

    Example:
        >>> import operator, torch
        >>> from torchquant import AffineQuantizer, ExpAvgMinMax, QOp
        >>> add = QOp(operator.add, acts_quantizer=AffineQuantizer(8, ExpAvgMinMax()))
        >>> add(torch.ones(2), torch.ones(2))
        tensor([2., 2.])
    """

    def __init__(self, op: Callable[..., Tensor], acts_quantizer: Quantizer | None = None) -> None:
        super().__init__()
        if not callable(op):
            raise TypeError(f"QOp: op must be callable, got {op!r}")
        if acts_quantizer is not None and not isinstance(acts_quantizer, Quantizer):
            raise TypeError(f"QOp: acts_quantizer must be a Quantizer or None, got {type(acts_quantizer).__name__}")
        self.op = op
        self.acts_quantizer = acts_quantizer
        self._name_quantizers(f"QOp[{self._op_name()}]")

    def _op_name(self) -> str:
        return getattr(self.op, "__name__", type(self.op).__name__)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        y = self.op(*args, **kwargs)
        aq = self._modules.get("acts_quantizer")  # as in QWrapper.forward: no nn.Module.__getattr__
        if aq is not None:
            s = self.qstate
            try:
                y = _run_quantizer(aq, y, s.is_act_observed, s.is_act_quantized)
            except TypeError as e:  # said here, off the hot path: quantizers refuse integer tensors themselves
                if isinstance(y, Tensor) and not y.is_floating_point():
                    raise TypeError(
                        f"{aq._tq_name}: the output of this {self._op_name()} is {y.dtype} (index arithmetic such "
                        "as token ids), which has no quantization grid; convert the model with example_inputs= "
                        "so that integer operations stay as they are, or skip it"
                    ) from e
                raise
        return y

    def extra_repr(self) -> str:
        return f"op={self._op_name()}, qstate={self.qstate.name}"


class _LayerAttributes(nn.Module):
    """Attributes a wrapper lacks are read from its ``layer``: the modules around the wrapped one keep
    reading them (a TransformerEncoderLayer reads ``self_attn.batch_first``, an MoE block its experts'
    ``num_experts``). Dunder names are not forwarded."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_modules", {}).get("layer")
            if name.startswith("__") or layer is None or not hasattr(layer, name):
                raise
            return getattr(layer, name)


class QMultiheadAttention(_LayerAttributes, QModule):
    """``nn.MultiheadAttention`` with its two weights and its output quantized.

    The packed input projection ``in_proj_weight`` ``(3 * E, E)`` (queries, keys and values
    stacked along axis 0, so ``axis=0`` is per output row) and the output projection
    ``out_proj.weight`` ``(E, E)`` go through their weight quantizers, and the attention
    output (``(L, N, E)``, or ``(N, L, E)`` with ``batch_first``) through ``acts_quantizer``;
    the attention weights are returned in float. In ``BYPASSED`` (the default) the wrapped
    module runs itself (its fused fast path included), so the outputs are bit-identical;
    in the other modes it runs ``F.multi_head_attention_forward`` with the weights the mode
    gives, as the module's own Python path does. ``.layer`` is the original module and its
    attributes stay readable through the wrapper (``embed_dim``, ``batch_first``).

    Args:
        layer: an ``nn.MultiheadAttention`` (exact type) whose queries, keys and values
            have the same size (it has ``in_proj_weight``).
        in_proj_quantizer: quantizer for ``in_proj_weight``, or ``None``.
        out_proj_quantizer: quantizer for ``out_proj.weight``, or ``None``.
        acts_quantizer: quantizer for the attention output, or ``None``.

    Raises:
        TypeError: ``layer`` is not an ``nn.MultiheadAttention`` or a quantizer has the wrong type.
        ValueError: ``layer`` has separate query/key/value projections (``kdim``/``vdim`` differ
            from ``embed_dim``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchquant import AffineQuantizer, BatchMinMax, QModuleState, QMultiheadAttention
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
        >>> w4 = lambda: AffineQuantizer(4, BatchMinMax(axis=0))
        >>> q = QMultiheadAttention(mha, w4(), w4())
        >>> x = torch.randn(1, 5, 8)
        >>> torch.equal(q(x, x, x)[0], mha(x, x, x)[0])
        True
        >>> q.observe_weight()  # weight ranges need no data
        >>> q.qstate = QModuleState.QUANT_EVAL_WEIGHT_ONLY
        >>> q(x, x, x)[0].shape
        torch.Size([1, 5, 8])
    """

    WEIGHT_ROLES = ("in_proj", "out_proj")  # the summary lists these quantizers as weight ones

    def __init__(
        self,
        layer: nn.MultiheadAttention,
        in_proj_quantizer: Quantizer | None = None,
        out_proj_quantizer: Quantizer | None = None,
        acts_quantizer: Quantizer | None = None,
    ) -> None:
        super().__init__()
        if type(layer) is not nn.MultiheadAttention:
            raise TypeError(f"QMultiheadAttention: expected an nn.MultiheadAttention, got {type(layer).__name__}")
        if not layer._qkv_same_embed_dim:
            raise ValueError(
                f"QMultiheadAttention: {layer} has separate query/key/value projections "
                f"(kdim={layer.kdim}, vdim={layer.vdim}, embed_dim={layer.embed_dim}); only the packed one is supported"
            )
        for role, q in (
            ("in_proj_quantizer", in_proj_quantizer),
            ("out_proj_quantizer", out_proj_quantizer),
            ("acts_quantizer", acts_quantizer),
        ):
            if q is not None and not isinstance(q, Quantizer):
                raise TypeError(f"QMultiheadAttention: {role} must be a Quantizer or None, got {type(q).__name__}")
        self.layer = layer
        self.in_proj_quantizer = in_proj_quantizer
        self.out_proj_quantizer = out_proj_quantizer
        self.acts_quantizer = acts_quantizer
        self._name_quantizers("QMultiheadAttention")

    def observe_weight(self) -> None:
        """Let both weight quantizers observe their weights (ranges from the weights, no data needed)."""
        with torch.no_grad():
            for q, w in self._weights():
                if q is not None:
                    _run_quantizer(q, w, observe=True, quantize=False)

    def _weights(self) -> list[tuple[Quantizer | None, Tensor]]:
        return [
            (self.in_proj_quantizer, self.layer.in_proj_weight),  # (3 * E, E)
            (self.out_proj_quantizer, self.layer.out_proj.weight),  # (E, E)
        ]

    def quantized_weights(self) -> tuple[Tensor, Tensor]:
        """``(in_proj_weight, out_proj.weight)`` as the current mode uses them, without observing."""
        s = self.qstate
        w_in, w_out = (q(w) if q is not None and s.is_weight_quantized else w for q, w in self._weights())
        return w_in, w_out

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        s = self.qstate
        mha = self.layer
        args = (key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        if s is QModuleState.BYPASSED:
            return mha(query, key, value, *args)
        w_in, w_out = mha.in_proj_weight, mha.out_proj.weight
        if self.in_proj_quantizer is not None:
            w_in = _run_quantizer(self.in_proj_quantizer, w_in, s.is_weight_observed, s.is_weight_quantized)
        if self.out_proj_quantizer is not None:
            w_out = _run_quantizer(self.out_proj_quantizer, w_out, s.is_weight_observed, s.is_weight_quantized)
        batch_first = mha.batch_first and query.dim() == 3
        # (N, L, E) -> (L, N, E), keeping "query is key" (the packed projection's test) as the module does
        if batch_first:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        y, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            mha.embed_dim,
            mha.num_heads,
            w_in,
            mha.in_proj_bias,
            mha.bias_k,
            mha.bias_v,
            mha.add_zero_attn,
            mha.dropout,
            w_out,
            mha.out_proj.bias,
            training=mha.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if batch_first:
            y = y.transpose(1, 0)
        if self.acts_quantizer is not None:
            y = _run_quantizer(self.acts_quantizer, y, s.is_act_observed, s.is_act_quantized)
        return y, weights

    def extra_repr(self) -> str:
        return f"qstate={self.qstate.name}"


def iter_qmodules(module: nn.Module) -> list[tuple[str, QModule]]:
    """Every :class:`QModule` in ``module`` (itself included) with its qualified name."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, QModule)]
