"""The hand-written converters (torchquant.models): the equivalence contract for every family."""

import copy
import io
import subprocess
import sys

import pytest
import torch
from torch import nn

import torchquant as tq
import torchquant.models as torchquant_models
from torchquant.models import FusedEfficientNet, FusedMobileNetV2, FusedMobileNetV3, FusedResNet, SamePad2d

torchvision = pytest.importorskip("torchvision")
efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
EfficientNet = efficientnet_pytorch.EfficientNet

S = tq.QModuleState


class LearnedScaleQuantizer(tq.Quantizer):
    """A user-defined quantizer with a parameter of its own (an LSQ-style learned step)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.05))

    def pre_observe(self, x):
        pass

    def quantize(self, x):
        return torch.clamp(tq.round_ste(x / self.scale), -128, 127) * self.scale

    def post_observe(self, x):
        pass


def weights_8bit(module):
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))


def acts_8bit(module):
    return tq.AffineQuantizer(8, tq.ExpAvgMinMax())


# name -> (float model builder, converter, input); the full contract runs on these.
FULL = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), FusedResNet, (2, 3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), FusedMobileNetV2, (2, 3, 32, 32)),
    "mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
        FusedMobileNetV3,
        (2, 3, 32, 32),
    ),
    "efficientnet-b0": (
        lambda: EfficientNet.from_name("efficientnet-b0", num_classes=10),
        FusedEfficientNet,
        (2, 3, 32, 32),
    ),
    "efficientnet-b0-dynamic-pad": (
        lambda: EfficientNet.from_name("efficientnet-b0", num_classes=10, image_size=None),
        FusedEfficientNet,
        (2, 3, 33, 31),
    ),
}


def _convert(name, **kwargs):
    make, cls, shape = FULL[name]
    net = make().eval()
    return net, cls(net, weights_8bit, acts_8bit, quantize_first=True, quantize_fc=True, **kwargs).eval(), shape


def _realistic_bn_stats(net, shape):
    # Random init leaves BN running stats at (0, 1), which makes MobileNetV2's activations vanish;
    # a few train-mode batches give the statistics a trained model would have.
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, *shape[1:]))
    net.eval()


@pytest.mark.parametrize("name", list(FULL))
def test_bypassed_and_calibration_equal_float(name):
    net, fused, shape = _convert(name)
    x = torch.randn(shape)
    with torch.no_grad():
        ref = net(x)
        assert torch.allclose(fused(x), ref, atol=1e-5)
        with tq.qmodule_state(fused, S.CALIBRATION):
            assert torch.allclose(fused(x), ref, atol=1e-5)


def _sqnr_db(net, cls, x, bits):
    fused = cls(
        net,
        lambda m: tq.AffineQuantizer(bits, tq.BatchMinMax(axis=0)),
        lambda m: tq.AffineQuantizer(bits, tq.ExpAvgMinMax()),
        quantize_first=True,
        quantize_fc=True,
    ).eval()
    with torch.no_grad():
        ref = net(x)
        with tq.qmodule_state(fused, S.CALIBRATION):
            fused(x)
        with tq.qmodule_state(fused, S.QUANT_EVAL):
            y = fused(x)
    return (10 * torch.log10(ref.pow(2).sum() / (ref - y).pow(2).sum())).item()


@pytest.mark.parametrize("name", list(FULL))
def test_quant_eval_error_shrinks_with_bits(name):
    # Quantization is really applied at the requested width: each extra bit halves the step, so
    # 16 bits should beat 8 bits by ~48 dB. These random-init nets accumulate noise over ~50
    # quantization points, so the absolute 8-bit SQNR is low (resnet18 ~15 dB; MobileNetV2 at
    # 32x32 ~3 dB, losing ~2 dB per block: 44 dB after features.0, 4 dB after features.17).
    make, cls, shape = FULL[name]
    net = make().eval()
    _realistic_bn_stats(net, shape)
    x = torch.randn(shape)
    sqnr8, sqnr16 = _sqnr_db(net, cls, x, 8), _sqnr_db(net, cls, x, 16)
    assert sqnr8 > 0 and sqnr16 > sqnr8 + 20, f"{name}: SQNR {sqnr8:.1f} dB at 8 bits, {sqnr16:.1f} dB at 16 bits"


@pytest.mark.parametrize("name", list(FULL))
def test_quant_aware_train_gives_every_parameter_a_finite_gradient(name):
    make, cls, shape = FULL[name]
    net = make()
    fused = cls(net, weights_8bit, LearnedScaleQuantizer, quantize_first=True, quantize_fc=True).train()
    own = {id(p) for p in net.parameters()}
    quantizer_params = [p for n, p in fused.named_parameters() if n.endswith("acts_quantizer.scale")]
    assert quantizer_params and own <= {id(p) for p in fused.parameters()}
    tq.set_qmodule_state(fused, S.QUANT_AWARE_TRAIN)
    fused(torch.randn(shape)).square().mean().backward()
    for n, p in fused.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    assert any(p.grad.abs().sum() > 0 for p in quantizer_params)


@pytest.mark.parametrize("name", list(FULL))
def test_deepcopy_and_strict_state_dict_round_trip(name):
    _, fused, shape = _convert(name)
    x = torch.randn(shape)
    with tq.qmodule_state(fused, S.CALIBRATION), torch.no_grad():
        fused(x)
    tq.set_qmodule_state(fused, S.QUANT_EVAL)
    with torch.no_grad():
        y = fused(x)
        assert torch.equal(copy.deepcopy(fused)(x), y)
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    _, fresh, _ = _convert(name)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    tq.set_qmodule_state(fresh, S.QUANT_EVAL)
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


@pytest.mark.parametrize("name", list(FULL))
def test_uses_the_float_models_own_parameters(name):
    net, fused, _ = _convert(name)
    fused_params = {id(p) for p in fused.parameters()}
    assert all(id(p) in fused_params for p in net.parameters())
    with torch.no_grad():
        next(net.parameters()).add_(1.0)  # an update to one is an update to the other
    assert any(p is next(net.parameters()) for p in fused.parameters())


def test_seed_readme_example_runs_as_written():
    class QuantizerForMyModuleWeights(tq.AffineQuantizer):
        def __init__(self, module):
            super().__init__(4 if module.weight.shape[1] > 64 else 8, tq.BatchMinMax(axis=0))

    class QuantizerForMyModuleActivations(tq.AffineQuantizer):
        def __init__(self, module):
            super().__init__(8, tq.ExpAvgMinMax())

    full_precision_model = torchvision.models.resnet18(num_classes=10)
    fused_model = FusedResNet(
        full_precision_model,
        weight_quantizer=lambda module: QuantizerForMyModuleWeights(module),
        acts_quantizer=lambda module: QuantizerForMyModuleActivations(module),
    )
    bits = {n: m.weight_quantizer.n_bits for n, m in tq.iter_qmodules(fused_model) if isinstance(m, tq.QWrapper)}
    assert bits["layer1.0.conv1"] == 8 and bits["layer4.1.conv2"] == 4
    with tq.qmodule_state(fused_model, S.QUANT_AWARE_TRAIN):
        assert fused_model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_quantization_points_and_names():
    seen = {}

    def wf(module, name):
        seen[name] = module
        return tq.AffineQuantizer(8 if name in ("layer1.0.conv1", "fc") else 4, tq.BatchMinMax(axis=0))

    net = torchvision.models.resnet18()
    fused = FusedResNet(net, wf, acts_8bit)
    # the stem and the classifier stay float by default
    assert isinstance(fused.conv1, nn.Sequential) and fused.fc is net.fc and fused.avgpool is net.avgpool
    assert "conv1" not in seen and "fc" not in seen
    assert seen["layer1.0.conv1"] is net.layer1[0].conv1 and seen["layer2.0.downsample"] is net.layer2[0].downsample[0]
    qops = [n for n, m in tq.iter_qmodules(fused) if isinstance(m, tq.QOp)]
    assert qops == [f"layer{i}.{j}.add_relu" for i in range(1, 5) for j in range(2)]
    assert fused.layer1[0].conv1.weight_quantizer.n_bits == 8 and fused.layer1[0].conv2.weight_quantizer.n_bits == 4


def test_fc_overrides_and_head_argument_checks():
    net = torchvision.models.resnet18(num_classes=10)
    calls = {}

    def pool_q(module, name):
        calls["pool"] = (type(module), name)
        return tq.AffineQuantizer(6, tq.ExpAvgMinMax())

    fused = FusedResNet(
        net,
        weights_8bit,
        acts_8bit,
        quantize_fc=True,
        avg_pool_quantizer=pool_q,
        fc_weight_quantizer=lambda m: tq.AffineQuantizer(3, tq.BatchMinMax(axis=0)),
    )
    assert calls["pool"] == (nn.AdaptiveAvgPool2d, "avgpool")
    assert fused.avgpool.acts_quantizer.n_bits == 6
    assert fused.fc.weight_quantizer.n_bits == 3 and fused.fc.acts_quantizer.n_bits == 8  # acts falls back
    with pytest.raises(ValueError, match=r"avg_pool_quantizer.*quantize_fc=False"):
        FusedResNet(net, weights_8bit, acts_8bit, avg_pool_quantizer=acts_8bit)
    with pytest.raises(ValueError, match="include_top"):
        FusedEfficientNet(EfficientNet.from_name("efficientnet-b0", include_top=False), None, None, quantize_fc=True)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match=r"FusedResNet: expected a torchvision\.models\.ResNet"):
        FusedResNet(torchvision.models.mobilenet_v2(), weights_8bit, acts_8bit)
    with pytest.raises(TypeError, match="FusedMobileNetV2: expected"):
        FusedMobileNetV2(torchvision.models.resnet18(), weights_8bit, acts_8bit)
    with pytest.raises(TypeError, match="FusedEfficientNet: expected"):
        FusedEfficientNet(torchvision.models.resnet18(), weights_8bit, acts_8bit)
    with pytest.raises(TypeError, match="must be a factory"):
        FusedResNet(torchvision.models.resnet18(), tq.AffineQuantizer(8, tq.BatchMinMax()), acts_8bit)


def test_none_factories_leave_everything_float():
    net = torchvision.models.resnet18().eval()
    fused = FusedResNet(net, None, None).eval()
    assert all(not m.quantizers() for _, m in tq.iter_qmodules(fused))
    x = torch.randn(1, 3, 32, 32)
    with tq.qmodule_state(fused, S.QUANT_EVAL), torch.no_grad():
        assert torch.allclose(fused(x), net(x), atol=1e-5)


def test_fold_bn_flag_reaches_every_wrapper_with_bn():
    net = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    fused = FusedResNet(net, weights_8bit, acts_8bit, fold_bn=True).eval()
    wrappers = [m for _, m in tq.iter_qmodules(fused) if isinstance(m, tq.QWrapper)]
    assert all(w.fold_bn == (w.bn is not None) for w in wrappers)
    with torch.no_grad():
        assert torch.allclose(fused(x), net(x), atol=1e-4)


def test_efficientnet_structure_swish_se_and_padding():
    net = EfficientNet.from_name("efficientnet-b0")
    fused = FusedEfficientNet(net, weights_8bit, acts_8bit)
    block = fused.blocks[1]  # expands, stride 2, 3x3 depthwise: asymmetric static padding
    assert (
        isinstance(block.depthwise_pad, nn.ZeroPad2d)
        and block.depthwise_pad is net._blocks[1]._depthwise_conv.static_padding
    )
    assert (
        type(block.depthwise_conv.layer) is nn.Conv2d
        and block.depthwise_conv.layer.weight is net._blocks[1]._depthwise_conv.weight
    )
    assert isinstance(block.depthwise_conv.act, nn.SiLU) and isinstance(block.se_expand.act, nn.Sigmoid)
    assert block.add is None and fused.blocks[2].add is not None
    assert {"se_pool", "se_scale"} <= {n.split(".")[-1] for n, _ in tq.iter_qmodules(block)}
    dyn = FusedEfficientNet(EfficientNet.from_name("efficientnet-b0", image_size=None), weights_8bit, acts_8bit)
    assert isinstance(dyn.blocks[1].depthwise_pad, SamePad2d) and dyn.blocks[2].depthwise_pad is not None


@pytest.mark.parametrize("size,stride", [(64, 2), (65, 2), (7, 1), (9, 3)], ids=lambda v: str(v))
def test_same_pad_matches_efficientnet_dynamic_conv(size, stride):
    conv = efficientnet_pytorch.utils.Conv2dDynamicSamePadding(4, 4, 5, stride=stride, bias=True)
    x = torch.randn(1, 4, size, size + 1)
    pad = SamePad2d((5, 5), (stride, stride), (1, 1))
    y = nn.functional.conv2d(pad(x), conv.weight, conv.bias, stride)
    assert torch.equal(y, conv(x))


def test_efficientnet_drop_connect_in_training_matches_float():
    # dropout off, so drop connect is the only randomness
    net = EfficientNet.from_name("efficientnet-b0", num_classes=10, drop_connect_rate=0.5, dropout_rate=0.0).train()
    fused = FusedEfficientNet(net, weights_8bit, acts_8bit).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    ref = net(x)
    torch.manual_seed(1)
    y = fused(x)
    torch.manual_seed(2)
    other = fused(x)
    # 1e-4: SiLU and MemoryEfficientSwish differ in the last bit, which train-mode BN amplifies
    assert torch.allclose(y, ref, atol=1e-4) and not torch.allclose(other, ref, atol=1e-2)


def test_mobilenet_structure():
    net = torchvision.models.mobilenet_v2()
    fused = FusedMobileNetV2(net, weights_8bit, acts_8bit, quantize_first=False)
    assert fused.features[0] is net.features[0]
    assert [type(m).__name__ for m in fused.features[2].conv] == ["QWrapper"] * 3
    assert fused.features[2].add is None and fused.features[3].add is not None
    assert fused.classifier[1] is net.classifier[1]


def test_mobilenet_v3_squeeze_excitation_and_classifier():
    net = torchvision.models.mobilenet_v3_small(num_classes=10)
    fused = FusedMobileNetV3(net, weights_8bit, acts_8bit, quantize_fc=True)
    se = fused.features[1].block[1]
    assert isinstance(se.scale.op, torchquant_models.GatedScale)  # Hardsigmoid cannot be fused: it gates in the QOp
    assert se.scale.op.activation is net.features[1].block[1].scale_activation
    assert isinstance(fused.classifier[0].act, nn.Hardswish) and isinstance(fused.classifier[1], nn.Identity)
    assert fused.classifier[3].layer is net.classifier[3]


@pytest.mark.slow
def test_mobilenet_v3_large_converts_bypassed_equal():
    net = torchvision.models.mobilenet_v3_large(num_classes=10).eval()
    fused = FusedMobileNetV3(net, weights_8bit, acts_8bit, quantize_fc=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), tq.qmodule_state(fused, S.CALIBRATION):
        assert torch.allclose(fused(x), net(x), atol=1e-5)


def test_import_torchquant_imports_no_optional_package():
    code = (
        "import sys, torchquant, torchquant.models; "
        "bad = [m for m in ('torchvision', 'efficientnet_pytorch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    monkeypatch.setitem(sys.modules, "torchvision.models.resnet", None)
    with pytest.raises(ImportError, match=r"pip install torchquant\[vision\]"):
        FusedResNet(nn.Linear(1, 1), None, None)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    tv = torchvision.models.resnet
    net = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=10).eval()
    fused = FusedResNet(net, weights_8bit, acts_8bit, quantize_first=True, quantize_fc=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with tq.qmodule_state(fused, S.CALIBRATION), torch.no_grad():
        fused(x)
    tq.set_qmodule_state(fused, S.QUANT_EVAL)
    with torch.no_grad():
        ref = fused(x)
        assert torch.allclose(torch.compile(fused)(x), ref, atol=1e-5)


RESNETS = [
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]


@pytest.mark.slow
@pytest.mark.parametrize("arch", RESNETS)
def test_every_resnet_family_member_converts_bypassed_equal(arch):
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(num_classes=10).eval()
    fused = FusedResNet(net, weights_8bit, acts_8bit, quantize_first=True, quantize_fc=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), tq.qmodule_state(fused, S.CALIBRATION):
        assert torch.allclose(fused(x), net(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [f"efficientnet-b{i}" for i in range(1, 8)])
def test_every_efficientnet_converts_bypassed_equal(arch):
    torch.manual_seed(0)
    net = EfficientNet.from_name(arch, num_classes=10).eval()
    fused = FusedEfficientNet(net, weights_8bit, acts_8bit, quantize_fc=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), tq.qmodule_state(fused, S.CALIBRATION):
        assert torch.allclose(fused(x), net(x), atol=1e-5)


def test_resnet_add_relu_has_autograds_relu_gradient_eager_and_compiled():
    from torchquant.models.resnet import add_relu

    x = torch.randn(2, 4, 5, 5)
    y = torch.randn(2, 4, 5, 5)
    y[0, 0] = -x[0, 0]  # exact zeros: relu'(0) = 0
    g = torch.randn(2, 4, 5, 5)
    ref = [t.clone().requires_grad_() for t in (x, y)]
    torch.relu(ref[0] + ref[1]).backward(g)
    for fn in (add_relu, torch.compile(add_relu, fullgraph=True)):
        ins = [t.clone().requires_grad_() for t in (x, y)]
        out = fn(*ins)
        assert torch.equal(out, torch.relu(x + y))
        out.backward(g)
        assert torch.equal(ins[0].grad, ref[0].grad) and torch.equal(ins[1].grad, ref[1].grad)
    with torch.no_grad():
        assert torch.equal(add_relu(x, y), torch.relu(x + y))


def test_resnet_add_relu_keeps_a_bool_mask_in_eager_mode():
    """The output's quantizer makes another tensor of it: eager mode keeps a quarter of its bytes."""
    from torchquant.models.resnet import add_relu

    saved = []
    x, y = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(2, 4, 5, 5)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        add_relu(x, y)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, (2, 4, 5, 5))]
