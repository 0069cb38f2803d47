"""Quantizable torchvision MobileNetV2 and MobileNetV3.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018;
Howard et al., "Searching for MobileNetV3", ICCV 2019.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor, nn

from ..factories import QuantizerFactory
from ..graph.common import place_quantizers
from ..qmodules import SUPPORTED_ACTIVATIONS
from ._common import _Builder, _Head, _import_optional

__all__ = [
    "FusedInvertedResidual",
    "FusedInvertedResidualV3",
    "FusedMobileNetV2",
    "FusedMobileNetV3",
    "FusedSqueezeExcitation",
    "GatedScale",
]


class FusedInvertedResidual(nn.Module):
    """A quantizable ``torchvision.models.mobilenetv2.InvertedResidual``.

    ``conv`` is an ``nn.Sequential`` of QWrappers: the optional 1x1 expansion
    (conv+BN+ReLU6), the depthwise conv+BN+ReLU6 and the linear 1x1 projection
    (conv+BN); ``add`` is a QOp on ``x + conv(x)`` where the block has a
    residual connection, else ``None``.
    """

    def __init__(self, block: nn.Module, b: _Builder, prefix: str) -> None:
        super().__init__()
        seq = list(block.conv)
        # [Conv2dNormActivation (expand)], Conv2dNormActivation (depthwise), Conv2d, BatchNorm2d
        if len(seq) not in (3, 4) or not isinstance(seq[-2], nn.Conv2d):
            raise TypeError(
                f"FusedMobileNetV2: {prefix}conv has an unexpected layout "
                f"{[type(m).__name__ for m in seq]}; expected torchvision's InvertedResidual"
            )
        wrappers = [b.wrap(list(cba), f"{prefix}conv.{i}") for i, cba in enumerate(seq[:-2])]
        project = seq[-2]
        wrappers.append(b.wrap([project, seq[-1]], f"{prefix}conv.{len(wrappers)}"))
        self.conv = nn.Sequential(*wrappers)
        self.add = b.op(operator.add, project, f"{prefix}add") if block.use_res_connect else None

    def forward(self, x: Tensor) -> Tensor:
        if self.add is None:
            return self.conv(x)
        return self.add(x, self.conv(x))


class FusedMobileNetV2(nn.Module):
    """A quantizable copy of a ``torchvision.models.MobileNetV2`` that shares its parameters.

    ``features`` becomes an ``nn.Sequential`` of the stem (a QWrapper, or the
    float ``Conv2dNormActivation`` when ``quantize_first=False``), one
    :class:`FusedInvertedResidual` per block and the final 1x1 conv+BN+ReLU6
    QWrapper; the global average pooling is a QOp and the classifier's
    ``Linear`` a QWrapper when ``quantize_fc``. Same input/output as the float
    model; every QModule starts ``BYPASSED``.

    Factories are called as ``factory(module)`` or ``factory(module, name)``:
    ``module`` is the conv or ``Linear`` being wrapped (for a residual add, the
    projection conv whose output it consumes; for the pooling, an
    ``nn.AdaptiveAvgPool2d``), ``name`` the quantization point's qualified name
    in the converted model (``"features.0"``, ``"features.2.conv.1"``,
    ``"features.3.add"``, ``"avgpool"``, ``"classifier.1"``).

    Args:
        net: a ``torchvision.models.MobileNetV2``.
        weight_quantizer: factory for every conv weight.
        acts_quantizer: factory for every conv+BN(+ReLU6) output and every residual add.
        quantize_first: quantize the stem conv's weight and output; ``True`` by
            default, as in the original torchquant's MobileNetV2 converter.
        quantize_fc: quantize the pooling output and the classifier ``Linear``.
        avg_pool_quantizer: with ``quantize_fc``, factory for the pooling output;
            ``None`` uses ``acts_quantizer``.
        fc_weight_quantizer: with ``quantize_fc``, factory for the classifier
            weight; ``None`` uses ``weight_quantizer``.
        fc_acts_quantizer: with ``quantize_fc``, factory for the classifier
            output; ``None`` uses ``acts_quantizer``.
        fold_bn: passed to every QWrapper that holds a BatchNorm.

    Raises:
        ImportError: torchvision is not installed.
        TypeError: ``net`` is not a torchvision MobileNetV2 or has an unexpected layout.
        ValueError: a pooling/classifier factory is given with ``quantize_fc=False``.
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
        tv = _import_optional("torchvision.models.mobilenetv2", "FusedMobileNetV2")
        if not isinstance(net, tv.MobileNetV2):
            raise TypeError(f"FusedMobileNetV2: expected a torchvision.models.MobileNetV2, got {type(net).__name__}")
        head = _Head(quantize_fc, avg_pool_quantizer, fc_weight_quantizer, fc_acts_quantizer)
        b = _Builder("FusedMobileNetV2", weight_quantizer, acts_quantizer, fold_bn, head)

        feats = list(net.features)
        stem, blocks, last = feats[0], feats[1:-1], feats[-1]
        out: list[nn.Module] = [b.wrap(list(stem), "features.0") if quantize_first else stem]
        for i, block in enumerate(blocks, start=1):
            if not isinstance(block, tv.InvertedResidual):
                raise TypeError(f"FusedMobileNetV2: features.{i} is a {type(block).__name__}, not an InvertedResidual")
            out.append(FusedInvertedResidual(block, b, f"features.{i}."))
        out.append(b.wrap(list(last), f"features.{len(feats) - 1}"))
        self.features = nn.Sequential(*out)

        pool = nn.AdaptiveAvgPool2d((1, 1))
        self.avgpool: nn.Module = pool
        cls = list(net.classifier)  # Dropout, Linear
        if quantize_fc:
            self.avgpool = b.pool(pool, pool, "avgpool")
            cls[-1] = b.classifier([cls[-1]], f"classifier.{len(cls) - 1}")
        self.classifier = nn.Sequential(*cls)
        self.train(net.training)
        place_quantizers(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))  # (N, C, H, W) -> (N, C, 1, 1)
        return self.classifier(torch.flatten(x, 1))


class GatedScale(nn.Module):
    """``activation(gate) * x``: a squeeze-excitation gate whose activation a QWrapper cannot fuse (Hardsigmoid).

    Args:
        activation: the gate's activation module.
    """

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, gate: Tensor, x: Tensor) -> Tensor:
        return self.activation(gate) * x  # (N, C, 1, 1) * (N, C, H, W)


class FusedSqueezeExcitation(nn.Module):
    """A quantizable ``torchvision.ops.SqueezeExcitation`` (as in MobileNetV3).

    QOp ``pool`` (global average), QWrapper ``fc1`` (1x1 conv + its activation),
    QWrapper ``fc2`` (1x1 conv, with the gate activation fused when it is one of
    :data:`~torchquant.qmodules.SUPPORTED_ACTIVATIONS`) and QOp ``scale``
    (``gate * x``; the gate activation runs inside it when it could not be fused,
    e.g. Hardsigmoid).
    """

    def __init__(self, se: nn.Module, b: _Builder, prefix: str) -> None:
        super().__init__()
        self.pool = b.op(se.avgpool, se.avgpool, f"{prefix}pool")
        self.fc1 = b.wrap([se.fc1, se.activation], f"{prefix}fc1")
        if type(se.scale_activation) in SUPPORTED_ACTIVATIONS:
            self.fc2 = b.wrap([se.fc2, se.scale_activation], f"{prefix}fc2")
            self.scale = b.op(operator.mul, se.fc2, f"{prefix}scale")
        else:
            self.fc2 = b.wrap([se.fc2], f"{prefix}fc2")
            self.scale = b.op(GatedScale(se.scale_activation), se.fc2, f"{prefix}scale")

    def forward(self, x: Tensor) -> Tensor:
        return self.scale(self.fc2(self.fc1(self.pool(x))), x)


class FusedInvertedResidualV3(nn.Module):
    """A quantizable ``torchvision.models.mobilenetv3.InvertedResidual``.

    ``block`` is an ``nn.Sequential`` of QWrappers (expansion, depthwise,
    projection conv+BN(+activation)) and, where the block has one, a
    :class:`FusedSqueezeExcitation`; ``add`` is a QOp on ``block(x) + x`` where
    the block has a residual connection, else ``None``.
    """

    def __init__(self, block: nn.Module, b: _Builder, prefix: str, se_type: type) -> None:
        super().__init__()
        out: list[nn.Module] = []
        last_conv = None
        for j, m in enumerate(block.block):
            if isinstance(m, se_type):
                out.append(FusedSqueezeExcitation(m, b, f"{prefix}block.{j}."))
            elif isinstance(m, nn.Sequential):  # Conv2dNormActivation
                out.append(b.wrap(list(m), f"{prefix}block.{j}"))
                last_conv = m[0]
            else:
                raise TypeError(f"FusedMobileNetV3: {prefix}block.{j} is an unexpected {type(m).__name__}")
        self.block = nn.Sequential(*out)
        self.add = b.op(operator.add, last_conv, f"{prefix}add") if block.use_res_connect else None

    def forward(self, x: Tensor) -> Tensor:
        if self.add is None:
            return self.block(x)
        return self.add(self.block(x), x)


class FusedMobileNetV3(nn.Module):
    """A quantizable copy of a ``torchvision.models.MobileNetV3`` (small or large) that shares its parameters.

    Howard et al., "Searching for MobileNetV3", ICCV 2019. Like
    :class:`FusedMobileNetV2`: ``features`` holds the stem QWrapper (or the float
    stem), one :class:`FusedInvertedResidualV3` per block and the last conv+BN+Hardswish
    QWrapper; with ``quantize_fc`` the pooling is a QOp and both classifier
    ``Linear`` layers are QWrappers (the first fused with its Hardswish, whose
    slot becomes ``nn.Identity``). Names: ``"features.0"``,
    ``"features.4.block.2.fc2"``, ``"features.5.add"``, ``"avgpool"``,
    ``"classifier.0"``, ``"classifier.3"``.

    Args:
        net: a ``torchvision.models.MobileNetV3``.
        weight_quantizer: factory for every conv weight.
        acts_quantizer: factory for every conv output, SE operator and residual add.
        quantize_first: quantize the stem conv's weight and output (default ``True``, as for MobileNetV2).
        quantize_fc: quantize the pooling output and both classifier ``Linear`` layers.
        avg_pool_quantizer: with ``quantize_fc``, factory for the pooling output;
            ``None`` uses ``acts_quantizer``.
        fc_weight_quantizer: with ``quantize_fc``, factory for the classifier
            weights; ``None`` uses ``weight_quantizer``.
        fc_acts_quantizer: with ``quantize_fc``, factory for the classifier
            outputs; ``None`` uses ``acts_quantizer``.
        fold_bn: passed to every QWrapper that holds a BatchNorm.

    Raises:
        ImportError: torchvision is not installed.
        TypeError: ``net`` is not a torchvision MobileNetV3 or has an unexpected layout.
        ValueError: a pooling/classifier factory is given with ``quantize_fc=False``.
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
        tv = _import_optional("torchvision.models.mobilenetv3", "FusedMobileNetV3")
        ops = _import_optional("torchvision.ops.misc", "FusedMobileNetV3")
        if not isinstance(net, tv.MobileNetV3):
            raise TypeError(f"FusedMobileNetV3: expected a torchvision.models.MobileNetV3, got {type(net).__name__}")
        head = _Head(quantize_fc, avg_pool_quantizer, fc_weight_quantizer, fc_acts_quantizer)
        b = _Builder("FusedMobileNetV3", weight_quantizer, acts_quantizer, fold_bn, head)

        feats = list(net.features)
        stem, blocks, last = feats[0], feats[1:-1], feats[-1]
        out: list[nn.Module] = [b.wrap(list(stem), "features.0") if quantize_first else stem]
        for i, block in enumerate(blocks, start=1):
            if not isinstance(block, tv.InvertedResidual):
                raise TypeError(f"FusedMobileNetV3: features.{i} is a {type(block).__name__}, not an InvertedResidual")
            out.append(FusedInvertedResidualV3(block, b, f"features.{i}.", ops.SqueezeExcitation))
        out.append(b.wrap(list(last), f"features.{len(feats) - 1}"))
        self.features = nn.Sequential(*out)

        self.avgpool: nn.Module = net.avgpool
        cls = list(net.classifier)  # Linear, Hardswish, Dropout, Linear
        if quantize_fc:
            self.avgpool = b.pool(net.avgpool, net.avgpool, "avgpool")
            i = 0
            while i < len(cls):
                if isinstance(cls[i], nn.Linear):
                    fuse_act = i + 1 < len(cls) and type(cls[i + 1]) in SUPPORTED_ACTIVATIONS
                    group = cls[i : i + 2] if fuse_act else [cls[i]]
                    cls[i] = b.classifier(group, f"classifier.{i}")
                    if fuse_act:
                        cls[i + 1] = nn.Identity()  # keeps the indices of the float classifier
                        i += 1
                i += 1
        self.classifier = nn.Sequential(*cls)
        self.train(net.training)
        place_quantizers(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))  # (N, C, H, W) -> (N, C, 1, 1)
        return self.classifier(torch.flatten(x, 1))
