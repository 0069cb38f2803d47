"""Small float models for the built-in datasets.

They contain what real networks contain (Conv + BatchNorm + activation, residual
adds, depthwise-separable and inverted-residual blocks, a classifier), so
every quantization method meets the usual difficulties, and they train on two
CPU cores in seconds. They are plain ``nn.Module`` s; quantize them with
:func:`torchquant.quantize_model`. Their residual blocks are the default blocks
of BRECQ and QDrop (:func:`torchquant.ptq.reconstruction_block`).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..ptq import reconstruction_block

__all__ = ["MNIST1DCNN", "MODELS", "DigitsCNN", "DigitsMobileNet", "InvertedResidual", "ResidualBlock", "build_model"]


def conv_bn(
    cin: int,
    cout: int,
    k: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
    dim: int = 2,
) -> nn.Sequential:
    conv = (nn.Conv1d if dim == 1 else nn.Conv2d)(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    bn = (nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d)(cout)
    return nn.Sequential(conv, bn, act()) if act is not None else nn.Sequential(conv, bn)


@reconstruction_block
class ResidualBlock(nn.Module):
    """``relu(x + bn(conv(relu(bn(conv(x))))))``, a ResNet basic block without downsampling."""

    def __init__(self, channels: int, dim: int = 2) -> None:
        super().__init__()
        self.conv1 = conv_bn(channels, channels, dim=dim)
        self.conv2 = conv_bn(channels, channels, act=None, dim=dim)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x + self.conv2(self.conv1(x)))


@reconstruction_block
class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 project; add when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn(cin, hidden, k=1, act=nn.ReLU6)
        self.depthwise = conv_bn(hidden, hidden, k=3, stride=stride, groups=hidden, act=nn.ReLU6)
        self.project = conv_bn(hidden, cout, k=1, act=None)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.use_residual else y


class DigitsCNN(nn.Module):
    """A small ResNet-style CNN for ``(N, 1, 8, 8)`` digits: stem, two residual blocks, a downsampling
    depthwise-separable stage, global pooling and a linear classifier (24k parameters at width 16, 6.4k at width 8)."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn(1, width)
        self.block1 = ResidualBlock(width)
        self.down = nn.Sequential(conv_bn(width, width, stride=2, groups=width), conv_bn(width, 2 * width, k=1))
        self.block2 = ResidualBlock(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


class DigitsMobileNet(nn.Module):
    """A MobileNetV2-style CNN for digits: inverted residual blocks with depthwise convolutions,
    BatchNorm and ReLU6 (the architecture where per-tensor quantization suffers)."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = conv_bn(1, width, act=nn.ReLU6)
        self.blocks = nn.Sequential(
            InvertedResidual(width, width),
            InvertedResidual(width, 2 * width, stride=2),
            InvertedResidual(2 * width, 2 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


class MNIST1DCNN(nn.Module):
    """A 1-D CNN for MNIST-1D ``(N, 1, 40)``: three Conv1d+BN+ReLU stages, a residual block, a classifier."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = conv_bn(1, width, k=5, dim=1)
        self.down1 = conv_bn(width, width, stride=2, dim=1)
        self.block = ResidualBlock(width, dim=1)
        self.down2 = conv_bn(width, 2 * width, stride=2, dim=1)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.down2(self.block(self.down1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


MODELS: dict[str, type[nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "digits_mobilenet": DigitsMobileNet,
    "mnist1d_cnn": MNIST1DCNN,
}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a built-in model by name (see :data:`MODELS`); unknown names list the valid ones."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)
