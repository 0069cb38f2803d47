"""Quantizable EfficientNets from efficientnet_pytorch (b0 to b8, l2).

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019; Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018.
"""

from __future__ import annotations

import math
import operator

import torch.nn.functional as F
from torch import Tensor, nn

from ..factories import QuantizerFactory
from ..graph.common import place_quantizers
from ._common import _Builder, _Head, _import_optional, _plain_conv2d

__all__ = ["FusedEfficientNet", "FusedMBConvBlock", "SamePad2d"]


class SamePad2d(nn.Module):
    """TensorFlow ``"SAME"`` zero padding computed from the input size, for a following conv.

    Pads ``(N, C, H, W)`` so that a conv with ``kernel_size``, ``stride`` and
    ``dilation`` and no padding of its own outputs ``ceil(H / stride)`` x
    ``ceil(W / stride)``; the extra row/column, when the total is odd, goes
    bottom/right. This is the padding of efficientnet_pytorch's
    ``Conv2dDynamicSamePadding`` taken out of the conv, so the conv itself can be
    a plain ``nn.Conv2d`` inside a QWrapper. Zero padding keeps a quantized
    input on its grid (every affine grid here contains 0).

    Args:
        kernel_size: ``(kH, kW)`` of the conv.
        stride: ``(sH, sW)``.
        dilation: ``(dH, dW)``.
    """

    def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> None:
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.dilation = tuple(dilation)

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        pads = []
        for i, k, s, d in zip((iw, ih), self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
            pads += [total // 2, total - total // 2]  # (left, right) then (top, bottom)
        if any(p > 0 for p in pads):
            x = F.pad(x, pads)
        return x

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


def _split_same_padding(conv: nn.Conv2d, ep_utils, where: str) -> tuple[nn.Module | None, nn.Conv2d]:
    """``(pad module or None, plain nn.Conv2d sharing conv's parameters)``."""
    if type(conv) is nn.Conv2d:
        return None, conv
    if isinstance(conv, ep_utils.Conv2dStaticSamePadding):
        pad = conv.static_padding  # ZeroPad2d computed for the model's image_size, or Identity
        if isinstance(pad, nn.Identity):
            return None, _plain_conv2d(conv, padding=tuple(conv.padding))
        left, right, top, bottom = pad.padding
        if left == right and top == bottom and tuple(conv.padding) == (0, 0):
            return None, _plain_conv2d(conv, padding=(top, left))  # symmetric: the conv pads itself
        return pad, _plain_conv2d(conv, padding=tuple(conv.padding))
    if isinstance(conv, ep_utils.Conv2dDynamicSamePadding):
        if all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride):
            return None, _plain_conv2d(conv, padding=tuple(conv.padding))  # "SAME" pads nothing here
        return SamePad2d(conv.weight.shape[-2:], tuple(conv.stride), tuple(conv.dilation)), _plain_conv2d(
            conv, padding=tuple(conv.padding)
        )
    raise TypeError(
        f"FusedEfficientNet: {where} is a {type(conv).__name__}; expected nn.Conv2d, "
        "Conv2dStaticSamePadding or Conv2dDynamicSamePadding"
    )


def _silu(act: nn.Module, ep_utils, where: str) -> nn.Module:
    """The module equivalent of efficientnet_pytorch's Swish / MemoryEfficientSwish: ``nn.SiLU``."""
    if isinstance(act, nn.SiLU):
        return act
    if isinstance(act, ep_utils.MemoryEfficientSwish) or type(act).__name__ == "Swish":
        return nn.SiLU()
    raise TypeError(f"FusedEfficientNet: {where} is a {type(act).__name__}; expected Swish or MemoryEfficientSwish")


class FusedMBConvBlock(nn.Module):
    """A quantizable efficientnet_pytorch ``MBConvBlock``.

    QWrappers ``expand_conv`` (1x1 conv+BN+SiLU, when the block expands),
    ``depthwise_conv`` (conv+BN+SiLU, after ``depthwise_pad`` where the conv
    pads "SAME"), ``se_reduce`` (1x1 conv+SiLU), ``se_expand`` (1x1
    conv+Sigmoid: the gate) and ``project_conv`` (1x1 conv+BN); QOps
    ``se_pool`` (global average pooling), ``se_scale`` (``gate * x``) and
    ``add`` (the skip connection, when the block has one). Drop connect
    (stochastic depth) is applied in training mode before the add, as in the
    float block. Forward: ``(x, drop_connect_rate=None) -> Tensor``.
    """

    def __init__(self, block: nn.Module, b: _Builder, prefix: str, ep_utils) -> None:
        super().__init__()
        args = block._block_args
        self.has_se = bool(block.has_se)
        self.has_skip = bool(block.id_skip and args.stride == 1 and args.input_filters == args.output_filters)
        swish = _silu(block._swish, ep_utils, f"{prefix}_swish")

        self.expand_conv = None
        if args.expand_ratio != 1:
            pad, conv = _split_same_padding(block._expand_conv, ep_utils, f"{prefix}_expand_conv")
            if pad is not None:  # a 1x1 stride-1 conv never pads
                raise TypeError(f"FusedEfficientNet: {prefix}_expand_conv pads; expected a 1x1 conv")
            self.expand_conv = b.wrap(
                [conv, block._bn0, swish], f"{prefix}expand_conv", factory_module=block._expand_conv
            )
        self.depthwise_pad, conv = _split_same_padding(block._depthwise_conv, ep_utils, f"{prefix}_depthwise_conv")
        self.depthwise_conv = b.wrap(
            [conv, block._bn1, swish], f"{prefix}depthwise_conv", factory_module=block._depthwise_conv
        )
        if self.has_se:
            self.se_pool = b.op(_global_avg_pool, block._depthwise_conv, f"{prefix}se_pool")
            _, reduce = _split_same_padding(block._se_reduce, ep_utils, f"{prefix}_se_reduce")  # 1x1 on 1x1: no pad
            _, expand = _split_same_padding(block._se_expand, ep_utils, f"{prefix}_se_expand")
            self.se_reduce = b.wrap([reduce, swish], f"{prefix}se_reduce", factory_module=block._se_reduce)
            self.se_expand = b.wrap([expand, nn.Sigmoid()], f"{prefix}se_expand", factory_module=block._se_expand)
            self.se_scale = b.op(operator.mul, block._se_expand, f"{prefix}se_scale")
        pad, conv = _split_same_padding(block._project_conv, ep_utils, f"{prefix}_project_conv")
        if pad is not None:
            raise TypeError(f"FusedEfficientNet: {prefix}_project_conv pads; expected a 1x1 conv")
        self.project_conv = b.wrap([conv, block._bn2], f"{prefix}project_conv", factory_module=block._project_conv)
        self.add = b.op(operator.add, block._project_conv, f"{prefix}add") if self.has_skip else None
        self._drop_connect = ep_utils.drop_connect

    def forward(self, x: Tensor, drop_connect_rate: float | None = None) -> Tensor:
        inputs = x
        if self.expand_conv is not None:
            x = self.expand_conv(x)
        if self.depthwise_pad is not None:
            x = self.depthwise_pad(x)
        x = self.depthwise_conv(x)
        if self.has_se:
            gate = self.se_expand(self.se_reduce(self.se_pool(x)))  # (N, C, 1, 1)
            x = self.se_scale(gate, x)
        x = self.project_conv(x)
        if self.add is not None:
            if drop_connect_rate:
                x = self._drop_connect(x, p=drop_connect_rate, training=self.training)
            x = self.add(x, inputs)
        return x


def _global_avg_pool(x: Tensor) -> Tensor:
    """``(N, C, H, W) -> (N, C, 1, 1)`` average."""
    return F.adaptive_avg_pool2d(x, 1)


class FusedEfficientNet(nn.Module):
    """A quantizable copy of an efficientnet_pytorch ``EfficientNet`` that shares its parameters.

    Works for every size (``EfficientNet.from_name("efficientnet-b0")`` to
    ``-b8`` and ``-l2``), with static (``image_size`` set, the default of
    ``from_name``) or dynamic (``image_size=None``) same-padding convolutions.
    Each conv+BN+Swish becomes a :class:`~torchquant.qmodules.QWrapper` whose
    conv is a plain ``nn.Conv2d`` holding the float conv's own ``weight`` and
    ``bias`` Parameters; a conv's "SAME" padding runs before the QWrapper
    (the conv's own ``ZeroPad2d`` for static padding, :class:`SamePad2d` for
    dynamic; symmetric static padding goes into the conv). Swish and
    MemoryEfficientSwish become ``nn.SiLU`` (the same function). The
    squeeze-excitation pooling, the ``sigmoid(gate) * x`` multiply (the sigmoid
    is fused into the ``se_expand`` QWrapper, so the gate is quantized) and the
    skip additions are QOps. Same input/output as the float model; every QModule
    starts ``BYPASSED``.

    Factories are called as ``factory(module)`` or ``factory(module, name)``:
    ``module`` is the float model's conv or ``Linear`` being wrapped (for the
    QOps: the conv whose output they consume; for the final pooling, its
    ``AdaptiveAvgPool2d``), ``name`` the qualified name in the converted model
    (``"conv_stem"``, ``"blocks.3.depthwise_conv"``, ``"blocks.3.se_scale"``,
    ``"blocks.3.add"``, ``"conv_head"``, ``"avg_pool"``, ``"fc"``).

    Args:
        net: an ``efficientnet_pytorch.EfficientNet``.
        weight_quantizer: factory for every conv weight.
        acts_quantizer: factory for every conv output, SE pooling, SE multiply and skip add.
        quantize_first: quantize the stem conv's weight and output; ``True`` by
            default, as in the original torchquant's EfficientNet converter.
        quantize_fc: quantize the final pooling output and the classifier
            ``Linear`` (needs ``include_top``).
        avg_pool_quantizer: with ``quantize_fc``, factory for the pooling output;
            ``None`` uses ``acts_quantizer``.
        fc_weight_quantizer: with ``quantize_fc``, factory for the classifier
            weight; ``None`` uses ``weight_quantizer``.
        fc_acts_quantizer: with ``quantize_fc``, factory for the classifier
            output; ``None`` uses ``acts_quantizer``.
        fold_bn: passed to every QWrapper that holds a BatchNorm.

    Raises:
        ImportError: efficientnet_pytorch is not installed.
        TypeError: ``net`` is not an efficientnet_pytorch EfficientNet or has an
            unexpected layer.
        ValueError: a pooling/classifier factory is given with
            ``quantize_fc=False``, or ``quantize_fc`` for a model without a classifier.
    """

    def __init__(
        self,
        net: nn.Module,
        weight_quantizer: QuantizerFactory | None,
        acts_quantizer: QuantizerFactory | None,
        *,
        quantize_first: bool = True,
        quantize_fc: bool = False,
        avg_pool_quantizer: QuantizerFactory | None = None,
        fc_weight_quantizer: QuantizerFactory | None = None,
        fc_acts_quantizer: QuantizerFactory | None = None,
        fold_bn: bool | str = False,
    ) -> None:
        super().__init__()
        ep_model = _import_optional("efficientnet_pytorch.model", "FusedEfficientNet")
        ep_utils = _import_optional("efficientnet_pytorch.utils", "FusedEfficientNet")
        if not isinstance(net, ep_model.EfficientNet):
            raise TypeError(
                f"FusedEfficientNet: expected an efficientnet_pytorch EfficientNet, got {type(net).__name__}"
            )
        head = _Head(quantize_fc, avg_pool_quantizer, fc_weight_quantizer, fc_acts_quantizer)
        head.check("FusedEfficientNet")
        self.include_top = bool(net._global_params.include_top)
        if quantize_fc and not self.include_top:
            raise ValueError("FusedEfficientNet: quantize_fc=True, but the model has no classifier (include_top=False)")
        b = _Builder("FusedEfficientNet", weight_quantizer, acts_quantizer, fold_bn, head)
        self.drop_connect_rate = net._global_params.drop_connect_rate
        swish = _silu(net._swish, ep_utils, "_swish")

        if quantize_first:
            self.stem_pad, conv = _split_same_padding(net._conv_stem, ep_utils, "_conv_stem")
            self.conv_stem: nn.Module = b.wrap([conv, net._bn0, swish], "conv_stem", factory_module=net._conv_stem)
        else:
            self.stem_pad = None
            self.conv_stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)  # float, as it is
        self.blocks = nn.ModuleList(
            FusedMBConvBlock(block, b, f"blocks.{i}.", ep_utils) for i, block in enumerate(net._blocks)
        )
        pad, conv = _split_same_padding(net._conv_head, ep_utils, "_conv_head")
        if pad is not None:
            raise TypeError("FusedEfficientNet: _conv_head pads; expected a 1x1 conv")
        self.conv_head = b.wrap([conv, net._bn1, swish], "conv_head", factory_module=net._conv_head)

        self.avg_pool: nn.Module = net._avg_pooling
        if self.include_top:
            self.dropout = net._dropout
            self.fc: nn.Module = net._fc
        if quantize_fc:
            self.avg_pool = b.pool(net._avg_pooling, net._avg_pooling, "avg_pool")
            self.fc = b.classifier([net._fc], "fc")
        self.train(net.training)
        place_quantizers(self)

    def forward(self, x: Tensor) -> Tensor:
        if self.stem_pad is not None:
            x = self.stem_pad(x)
        x = self.conv_stem(x)
        n = len(self.blocks)
        for idx, block in enumerate(self.blocks):
            rate = self.drop_connect_rate
            if rate:
                rate *= float(idx) / n  # deeper blocks drop more, as in the float model
            x = block(x, drop_connect_rate=rate)
        x = self.avg_pool(self.conv_head(x))  # (N, C, H, W) -> (N, C, 1, 1)
        if not self.include_top:
            return x
        return self.fc(self.dropout(x.flatten(start_dim=1)))
