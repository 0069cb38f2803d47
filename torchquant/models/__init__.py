"""Hand-written converters for common image models, preserving their weights.

* :class:`FusedResNet`: every torchvision ResNet, ResNeXt and Wide ResNet;
* :class:`FusedMobileNetV2`, :class:`FusedMobileNetV3`: torchvision MobileNetV2 and V3 (small, large);
* :class:`FusedEfficientNet`: efficientnet_pytorch EfficientNet-b0 .. b8.

Each takes the float model and quantizer factories, and returns a model that
shares the float model's parameters and is driven by
:func:`torchquant.set_qmodule_state`. Importing this package does not import
torchvision or efficientnet_pytorch; the converters import them when called
(``pip install torchquant[vision]``).
"""

from .efficientnet import FusedEfficientNet, FusedMBConvBlock, SamePad2d
from .mobilenet import (
    FusedInvertedResidual,
    FusedInvertedResidualV3,
    FusedMobileNetV2,
    FusedMobileNetV3,
    FusedSqueezeExcitation,
    GatedScale,
)
from .resnet import FusedBasicBlock, FusedBottleneck, FusedResNet

__all__ = [
    "FusedBasicBlock",
    "FusedBottleneck",
    "FusedEfficientNet",
    "FusedInvertedResidual",
    "FusedInvertedResidualV3",
    "FusedMBConvBlock",
    "FusedMobileNetV2",
    "FusedMobileNetV3",
    "FusedResNet",
    "FusedSqueezeExcitation",
    "GatedScale",
    "SamePad2d",
]
