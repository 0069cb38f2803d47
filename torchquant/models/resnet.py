"""Quantizable torchvision ResNets: every ``torchvision.models.ResNet`` (ResNet, ResNeXt, Wide ResNet).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016;
Xie et al., "Aggregated Residual Transformations" (ResNeXt), CVPR 2017;
Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..factories import QuantizerFactory
from ..graph.common import place_quantizers
from ._common import _Builder, _Head, _import_optional

__all__ = ["FusedBasicBlock", "FusedBottleneck", "FusedResNet"]


class _AddReLU(torch.autograd.Function):
    """``relu(x + y)`` whose backward multiplies by ``out > 0``: autograd's gradient exactly
    (``relu'(0) = 0``).

    It exists for ``torch.compile``: with autograd's ReLU, inductor saves the mask as a bool
    tensor written inside the fused add + observe + fake-quant kernel, and on an AVX2 CPU those
    kernels ran several times slower than without it; saving the float output instead took the
    compiled QAT step of resnet18's ``layer1`` + ``layer2[0]`` (batch 16, 56x56) from 1.10x to
    0.99x the compiled float step (one interleaved run, 25 steps). In eager mode, where the
    output's quantizer makes another tensor of it, the mask is kept as a bool tensor: a quarter
    of the float output's bytes (resnet18's QAT step saves 1.32x float32's activations, not 1.42x).
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        out = torch.relu(x + y)
        ctx.save_for_backward(out if torch.compiler.is_compiling() else out > 0)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        g = grad * (torch.sign(saved) if saved.is_floating_point() else saved)
        return g, g


def add_relu(x: Tensor, y: Tensor) -> Tensor:
    """``relu(x + y)``: the end of a residual block.

    Without gradients, one allocation (the ReLU runs in place on the sum); with them,
    :class:`_AddReLU`, whose saved state compiles to faster kernels.
    """
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad) and x.shape == y.shape:
        return _AddReLU.apply(x, y)
    return torch.add(x, y).relu_()


class FusedBasicBlock(nn.Module):
    """A quantizable ``torchvision.models.resnet.BasicBlock``.

    ``conv1`` (conv+BN+ReLU) and ``conv2`` (conv+BN) are QWrappers, ``downsample``
    (conv+BN) a QWrapper or ``None``, ``add_relu`` a QOp on ``relu(out + identity)``.
    """

    def __init__(self, block: nn.Module, b: _Builder, prefix: str) -> None:
        super().__init__()
        self.conv1 = b.wrap([block.conv1, block.bn1, block.relu], f"{prefix}conv1")
        self.conv2 = b.wrap([block.conv2, block.bn2], f"{prefix}conv2")
        self.downsample = _downsample(block, b, prefix)
        # The add has no module of its own: its factory gets the conv whose output it consumes.
        self.add_relu = b.op(add_relu, block.conv2, f"{prefix}add_relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        identity = x if self.downsample is None else self.downsample(x)
        return self.add_relu(out, identity)


class FusedBottleneck(nn.Module):
    """A quantizable ``torchvision.models.resnet.Bottleneck`` (ResNet-50 and up, ResNeXt, Wide ResNet).

    ``conv1``, ``conv2`` (conv+BN+ReLU) and ``conv3`` (conv+BN) are QWrappers,
    ``downsample`` a QWrapper or ``None``, ``add_relu`` a QOp.
    """

    def __init__(self, block: nn.Module, b: _Builder, prefix: str) -> None:
        super().__init__()
        self.conv1 = b.wrap([block.conv1, block.bn1, block.relu], f"{prefix}conv1")
        self.conv2 = b.wrap([block.conv2, block.bn2, block.relu], f"{prefix}conv2")
        self.conv3 = b.wrap([block.conv3, block.bn3], f"{prefix}conv3")
        self.downsample = _downsample(block, b, prefix)
        self.add_relu = b.op(add_relu, block.conv3, f"{prefix}add_relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv3(self.conv2(self.conv1(x)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.add_relu(out, identity)


def _downsample(block: nn.Module, b: _Builder, prefix: str) -> nn.Module | None:
    ds = block.downsample
    if ds is None:
        return None
    if not isinstance(ds, nn.Sequential):
        raise TypeError(
            f"FusedResNet: {prefix}downsample is a {type(ds).__name__}; expected torchvision's "
            "nn.Sequential(conv1x1, BatchNorm2d)"
        )
    return b.wrap(list(ds), f"{prefix}downsample", factory_module=ds[0])


class FusedResNet(nn.Module):
    """A quantizable copy of a torchvision ResNet that shares its parameters.

    Every member of the family converts: ``resnet18`` .. ``resnet152``,
    ``resnext50_32x4d``, ``resnext101_32x8d``, ``resnext101_64x4d``,
    ``wide_resnet50_2``, ``wide_resnet101_2`` and any ``ResNet(BasicBlock |
    Bottleneck, ...)``. Each residual block's conv+BN(+ReLU) groups become
    :class:`~torchquant.qmodules.QWrapper` s (weights and outputs quantized), the
    downsample conv+BN a QWrapper, and ``relu(out + identity)`` a
    :class:`~torchquant.qmodules.QOp`. The converted model uses the float model's
    own parameter and buffer tensors (training one trains the other), and starts
    with every QModule ``BYPASSED``; drive it with
    :func:`~torchquant.utils.set_qmodule_state`. Input ``(N, 3, H, W)``, output
    ``(N, num_classes)``, as the float model.

    Factories are called as ``factory(module)`` or ``factory(module, name)``
    (see :func:`~torchquant.factories.call_factory`) and return a Quantizer or
    ``None`` (that side stays in float). ``module`` is the conv (or ``Linear``)
    being wrapped; for a residual add, which has no module, the conv whose output
    it consumes; for the pooling, the ``AdaptiveAvgPool2d``. ``name`` is the
    quantization point's qualified name in the converted model (``"conv1"``,
    ``"layer1.0.conv2"``, ``"layer2.0.downsample"``, ``"layer1.0.add_relu"``,
    ``"avgpool"``, ``"fc"``).

    Args:
        net: a ``torchvision.models.ResNet``.
        weight_quantizer: factory for every conv weight.
        acts_quantizer: factory for every conv+BN(+ReLU) output and every residual add.
        quantize_first: quantize the stem (``conv1`` weight and its conv+BN+ReLU
            output); ``False`` (the default, as in the original torchquant) keeps
            the stem in float. The input image itself is never quantized.
        quantize_fc: quantize the global average pooling output and the
            classifier (weight and output); ``False`` keeps both in float.
        avg_pool_quantizer: with ``quantize_fc``, factory for the pooling output;
            ``None`` uses ``acts_quantizer``.
        fc_weight_quantizer: with ``quantize_fc``, factory for the classifier
            weight; ``None`` uses ``weight_quantizer``.
        fc_acts_quantizer: with ``quantize_fc``, factory for the classifier
            output; ``None`` uses ``acts_quantizer``.
        fold_bn: passed to every QWrapper that holds a BatchNorm (see
            :class:`~torchquant.qmodules.QWrapper`).

    Raises:
        ImportError: torchvision is not installed.
        TypeError: ``net`` is not a torchvision ResNet, a block is neither a
            ``BasicBlock`` nor a ``Bottleneck``, or a factory is not callable.
        ValueError: a pooling/classifier factory is given with ``quantize_fc=False``.

    Example:
        >>> import torch, torchvision
        >>> import torchquant as tq
        >>> net = torchvision.models.resnet18(num_classes=10).eval()
        >>> fused = FusedResNet(
        ...     net,
        ...     weight_quantizer=lambda module: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)),
        ...     acts_quantizer=lambda module: tq.AffineQuantizer(8, tq.ExpAvgMinMax()),
        ... ).eval()
        >>> x = torch.randn(1, 3, 32, 32)
        >>> torch.allclose(fused(x), net(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        net: nn.Module,
        weight_quantizer: QuantizerFactory | None,
        acts_quantizer: QuantizerFactory | None,
        *,
        quantize_first: bool = False,
        quantize_fc: bool = False,
        avg_pool_quantizer: QuantizerFactory | None = None,
        fc_weight_quantizer: QuantizerFactory | None = None,
        fc_acts_quantizer: QuantizerFactory | None = None,
        fold_bn: bool | str = False,
    ) -> None:
        super().__init__()
        tv = _import_optional("torchvision.models.resnet", "FusedResNet")
        if not isinstance(net, tv.ResNet):
            raise TypeError(f"FusedResNet: expected a torchvision.models.ResNet, got {type(net).__name__}")
        head = _Head(quantize_fc, avg_pool_quantizer, fc_weight_quantizer, fc_acts_quantizer)
        b = _Builder("FusedResNet", weight_quantizer, acts_quantizer, fold_bn, head)

        stem = [net.conv1, net.bn1, net.relu]
        self.conv1: nn.Module = b.wrap(stem, "conv1") if quantize_first else nn.Sequential(*stem)
        self.maxpool = net.maxpool  # max of on-grid values stays on the grid
        for li in range(1, 5):
            layer_name = f"layer{li}"
            blocks = []
            for bi, block in enumerate(getattr(net, layer_name)):
                prefix = f"{layer_name}.{bi}."
                if isinstance(block, tv.Bottleneck):
                    blocks.append(FusedBottleneck(block, b, prefix))
                elif isinstance(block, tv.BasicBlock):
                    blocks.append(FusedBasicBlock(block, b, prefix))
                else:
                    raise TypeError(
                        f"FusedResNet: {prefix[:-1]} is a {type(block).__name__}; "
                        "only torchvision BasicBlock and Bottleneck convert"
                    )
            setattr(self, layer_name, nn.Sequential(*blocks))

        self.avgpool: nn.Module = net.avgpool
        self.fc: nn.Module = net.fc
        if quantize_fc:
            self.avgpool = b.pool(net.avgpool, net.avgpool, "avgpool")
            self.fc = b.classifier([net.fc], "fc")
        self.train(net.training)
        place_quantizers(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)  # (N, C, 1, 1) -> (N, C)
        return self.fc(x)
