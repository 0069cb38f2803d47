"""Shared plumbing of the hand-written model converters.

:class:`_Builder` turns the user's quantizer factories into QWrappers and QOps,
naming each quantization point by its qualified name in the converted model,
and :func:`_import_optional` imports torchvision / efficientnet_pytorch lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

from torch import Tensor, nn

from ..factories import QuantizerFactory, call_factory
from ..graph.common import make_qwrapper
from ..qmodules import QOp, QWrapper, fold_bn_mode

__all__: list[str] = []


def _import_optional(module: str, who: str) -> ModuleType:
    """Import ``module`` (e.g. ``"torchvision.models.resnet"``) or raise an ImportError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(
            f"{who} needs the optional package {top!r}, which is not installed: pip install torchquant[vision]"
        ) from e


@dataclass(frozen=True)
class _Head:
    """The converters' classifier-head keywords (``quantize_fc`` and the three head factories).

    Attributes:
        quantize_fc: quantize the pooling output and the classifier; ``False`` keeps both in float.
        avg_pool_quantizer: factory for the pooling output (``None``: the acts factory).
        fc_weight_quantizer: factory for the classifier weights (``None``: the weight factory).
        fc_acts_quantizer: factory for the classifier outputs (``None``: the acts factory).
    """

    quantize_fc: bool = False
    avg_pool_quantizer: QuantizerFactory | None = None
    fc_weight_quantizer: QuantizerFactory | None = None
    fc_acts_quantizer: QuantizerFactory | None = None

    def check(self, who: str) -> None:
        """Raise ValueError when head factories are given but the head stays in float."""
        if self.quantize_fc:
            return
        roles = ("avg_pool_quantizer", "fc_weight_quantizer", "fc_acts_quantizer")
        given = [r for r in roles if getattr(self, r) is not None]
        if given:
            raise ValueError(
                f"{who}: {', '.join(given)} given with quantize_fc=False, where the pooling and the classifier "
                "stay in float; pass quantize_fc=True to use them"
            )


class _Builder:
    """Calls the factories for each quantization point of a converted model.

    Args:
        who: the converter's class name, for error messages.
        weight_quantizer: factory for layer weights.
        acts_quantizer: factory for output activations.
        fold_bn: passed to every QWrapper that holds a BatchNorm.
        head: the classifier-head options (checked here).
    """

    def __init__(
        self,
        who: str,
        weight_quantizer: QuantizerFactory | None,
        acts_quantizer: QuantizerFactory | None,
        fold_bn: bool | str,
        head: _Head,
    ) -> None:
        head.check(who)
        for role, f in (("weight_quantizer", weight_quantizer), ("acts_quantizer", acts_quantizer)):
            if f is not None and (isinstance(f, nn.Module) or not callable(f)):
                raise TypeError(
                    f"{who}: {role} must be a factory (module) -> Quantizer or (module, name) -> Quantizer, "
                    f"got {type(f).__name__}; e.g. lambda module: AffineQuantizer(8, BatchMinMax(axis=0))"
                )
        fold_bn_mode(fold_bn, who)
        self.who = who
        self.weight_quantizer = weight_quantizer
        self.acts_quantizer = acts_quantizer
        self.fold_bn = fold_bn
        self.head = head

    def wrap(
        self,
        layers: Sequence[nn.Module],
        name: str,
        *,
        factory_module: nn.Module | None = None,
        weight_quantizer: QuantizerFactory | None = None,
        acts_quantizer: QuantizerFactory | None = None,
    ) -> QWrapper:
        """A QWrapper around ``layers`` (layer, optional BN, optional activation): :func:`make_qwrapper`.

        The factories (the builder's, unless overridden) are called with
        ``factory_module`` (default: the layer) and ``name``.
        """
        return make_qwrapper(
            list(layers),
            name,
            self.weight_quantizer if weight_quantizer is None else weight_quantizer,
            self.acts_quantizer if acts_quantizer is None else acts_quantizer,
            self.fold_bn,
            factory_module,
        )

    def op(
        self,
        op: Callable[..., Tensor],
        module: nn.Module,
        name: str,
        *,
        acts_quantizer: QuantizerFactory | None = None,
    ) -> QOp:
        """A QOp around ``op``; the acts factory is called with ``module`` and ``name``."""
        af = self.acts_quantizer if acts_quantizer is None else acts_quantizer
        return QOp(op, acts_quantizer=call_factory(af, module, name, "acts_quantizer"))

    def pool(self, op: Callable[..., Tensor], module: nn.Module, name: str) -> QOp:
        """The quantized global pooling of the head (``avg_pool_quantizer``, else the acts factory)."""
        return self.op(op, module, name, acts_quantizer=self.head.avg_pool_quantizer)

    def classifier(self, layers: Sequence[nn.Module], name: str) -> QWrapper:
        """A quantized classifier layer (``fc_weight_quantizer`` / ``fc_acts_quantizer``, else the defaults)."""
        return self.wrap(
            layers, name, weight_quantizer=self.head.fc_weight_quantizer, acts_quantizer=self.head.fc_acts_quantizer
        )


def _plain_conv2d(conv: nn.Conv2d, padding: tuple[int, int] | int = 0) -> nn.Conv2d:
    """An ``nn.Conv2d`` of ``conv``'s geometry with ``padding``, holding ``conv``'s own Parameters.

    Used for convolutions that subclass ``nn.Conv2d`` but pad in their own
    ``forward`` (efficientnet_pytorch's same-padding convolutions); the padding
    is then done by a separate module before the QWrapper.
    """
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=tuple(conv.stride),  # type: ignore[arg-type]
        padding=padding,
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
        device="meta",
    )
    plain.weight = conv.weight  # the float model's own tensors, not copies
    plain.bias = conv.bias
    return plain
