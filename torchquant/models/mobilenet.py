"""Quantizable torchvision MobileNetV2.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor, nn

from ..factories import QuantizerFactory
from ._common import _Builder, _check_head_args, _import_optional

__all__ = ["FusedInvertedResidual", "FusedMobileNetV2"]


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
        fold_bn: bool = False,
    ) -> None:
        super().__init__()
        tv = _import_optional("torchvision.models.mobilenetv2", "FusedMobileNetV2")
        if not isinstance(net, tv.MobileNetV2):
            raise TypeError(f"FusedMobileNetV2: expected a torchvision.models.MobileNetV2, got {type(net).__name__}")
        _check_head_args("FusedMobileNetV2", quantize_fc, avg_pool_quantizer, fc_weight_quantizer, fc_acts_quantizer)
        b = _Builder("FusedMobileNetV2", weight_quantizer, acts_quantizer, fold_bn)

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
            self.avgpool = b.op(pool, pool, "avgpool", acts_quantizer=avg_pool_quantizer)
            fc = cls[-1]
            cls[-1] = b.wrap(
                [fc],
                f"classifier.{len(cls) - 1}",
                weight_quantizer=fc_weight_quantizer,
                acts_quantizer=fc_acts_quantizer,
            )
        self.classifier = nn.Sequential(*cls)
        self.train(net.training)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))  # (N, C, H, W) -> (N, C, 1, 1)
        return self.classifier(torch.flatten(x, 1))
