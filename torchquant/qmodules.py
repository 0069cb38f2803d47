"""Quantized modules and the state machine that drives them.

* :class:`QModuleState`: the ten modes, each saying whether weights and
  activations are observed and whether they are quantized.
* :class:`QModule`: base class; holds its mode in ``qstate`` (``BYPASSED`` at first).
* :class:`QWrapper`: a Linear/Conv layer, optionally followed by BatchNorm and an
  activation, with a weight quantizer and an output-activation quantizer.
* :class:`QOp`: any tensor-returning operator (``operator.add``, ``torch.cat``,
  a pooling module) with an output-activation quantizer.

The mode is changed only through :func:`torchquant.utils.set_qmodule_state` /
:func:`torchquant.utils.qmodule_state`, never by ``train()`` or ``eval()``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .quantizers import Quantizer

__all__ = ["SUPPORTED_ACTIVATIONS", "QModule", "QModuleState", "QOp", "QWrapper"]


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


def _run_quantizer(q: Quantizer, x: Tensor, observe: bool, quantize: bool) -> Tensor:
    if observe:
        q.pre_observe(x)
    if quantize:
        x = q(x)
    if observe:
        q.post_observe(x)
    return x


class QModule(nn.Module):
    """Base class of modules driven by :class:`QModuleState`.

    ``qstate`` starts as ``BYPASSED``; change it with
    :func:`~torchquant.utils.set_qmodule_state`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.qstate = QModuleState.BYPASSED

    def quantizers(self) -> dict[str, Quantizer]:
        """This module's own quantizers by attribute name (``None`` ones left out)."""
        return {n: m for n, m in self.named_children() if isinstance(m, Quantizer)}

    def _name_quantizers(self, owner: str) -> None:
        for attr, q in self.quantizers().items():
            name = f"{owner}.{attr}"
            if hasattr(q, "_set_name"):
                q._set_name(name)
            else:
                q._tq_name = name


_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_FOR_LAYER = {
    nn.Linear: nn.BatchNorm1d,
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
}
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
    "Linear|Conv1d|Conv2d|Conv3d, optionally then the matching BatchNorm1d/2d/3d, optionally then one of "
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

    if not seq or not all(isinstance(m, nn.Module) for m in seq) or type(seq[0]) not in _BN_FOR_LAYER:
        raise bad()
    layer, rest = seq[0], seq[1:]
    bn = act = None
    if rest and isinstance(rest[0], nn.modules.batchnorm._BatchNorm):
        if type(rest[0]) is not _BN_FOR_LAYER[type(layer)]:
            raise bad()
        bn, rest = rest[0], rest[1:]
        n_out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if bn.num_features != n_out:
            raise ValueError(f"QWrapper: {layer} has {n_out} outputs but {bn} normalises {bn.num_features}")
    if rest and type(rest[0]) in SUPPORTED_ACTIVATIONS:
        act, rest = rest[0], rest[1:]
    if rest:
        raise bad()
    return layer, bn, act


class QWrapper(QModule):
    """A Linear or Conv layer, optional BatchNorm and activation, with weight and output quantizers.

    The wrapped modules are used as they are (same parameter tensors), and with
    quantization bypassed (the default) the output is bit-identical to running
    them in sequence. Input ``x``: whatever the wrapped layer takes; output:
    the activation's output, fake-quantized by ``acts_quantizer`` in the modes
    that quantize activations.

    Args:
        layers: a module, a list or an ``nn.Sequential``: ``Linear``/``Conv1d``/
            ``Conv2d``/``Conv3d``, optionally the matching ``BatchNorm``, optionally
            one of :data:`SUPPORTED_ACTIVATIONS`.
        weight_quantizer: quantizer for the layer's weight, or ``None`` (float weight).
        acts_quantizer: quantizer for the output activations, or ``None``.
        fold_bn: fold BatchNorm into the weights before weight quantization;
            not implemented yet, and raises rather than being ignored.

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

    def __init__(
        self,
        layers: nn.Module | Sequence[nn.Module],
        weight_quantizer: Quantizer | None = None,
        acts_quantizer: Quantizer | None = None,
        fold_bn: bool = False,
    ) -> None:
        super().__init__()
        layer, bn, act = _parse_layers(layers)
        for role, q in (("weight_quantizer", weight_quantizer), ("acts_quantizer", acts_quantizer)):
            if q is not None and not isinstance(q, Quantizer):
                raise TypeError(f"QWrapper: {role} must be a Quantizer or None, got {type(q).__name__}")
        if fold_bn:
            raise NotImplementedError("QWrapper: fold_bn=True is not implemented yet; use fold_bn=False")
        self.layer = layer
        self.bn = bn
        self.act = act
        self.weight_quantizer = weight_quantizer
        self.acts_quantizer = acts_quantizer
        self.fold_bn = False
        self._name_quantizers(f"QWrapper[{self._describe()}]")

    def _describe(self) -> str:
        return "+".join(type(m).__name__ for m in (self.layer, self.bn, self.act) if m is not None)

    def quantized_weight(self) -> Tensor:
        """The weight as the current mode uses it (quantized or float), without observing."""
        w = self.layer.weight
        if self.weight_quantizer is not None and self.qstate.is_weight_quantized:
            w = self.weight_quantizer(w)
        return w

    def _linear_or_conv(self, x: Tensor, w: Tensor) -> Tensor:
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, w, layer.bias)
        return layer._conv_forward(x, w, layer.bias)  # honours padding_mode, groups, dilation

    def forward(self, x: Tensor) -> Tensor:
        s = self.qstate
        w = self.layer.weight
        if self.weight_quantizer is not None:
            w = _run_quantizer(self.weight_quantizer, w, s.is_weight_observed, s.is_weight_quantized)
        y = self._linear_or_conv(x, w)
        if self.bn is not None:
            y = self.bn(y)
        if self.act is not None:
            y = self.act(y)
        if self.acts_quantizer is not None:
            y = _run_quantizer(self.acts_quantizer, y, s.is_act_observed, s.is_act_quantized)
        return y

    def extra_repr(self) -> str:
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
        if self.acts_quantizer is not None:
            s = self.qstate
            y = _run_quantizer(self.acts_quantizer, y, s.is_act_observed, s.is_act_quantized)
        return y

    def extra_repr(self) -> str:
        return f"op={self._op_name()}, qstate={self.qstate.name}"


def iter_qmodules(module: nn.Module) -> list[tuple[str, QModule]]:
    """Every :class:`QModule` in ``module`` (itself included) with its qualified name."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, QModule)]
