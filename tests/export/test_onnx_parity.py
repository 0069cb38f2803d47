"""onnxruntime runs the exported model as the simulation does: parity in quantization steps.

Models, at small inputs: quantize_model(method="swap") conversions of torchvision
resnet18 and mobilenet_v2, a timm model and the built-in DigitsCNN; the seed's
converters (FusedResNet on resnet18, FusedMobileNetV2 on mobilenet_v2,
FusedEfficientNet on efficientnet_pytorch's efficientnet-b0, built from its config);
a quantize_model(method="fx") conversion of timm's mobilenetv3_small_050 (squeeze-
excitation, hard-swish, BatchNormAct, a functional dropout whose ``training`` follows the
mode) and of a two-block timm ViT (attention, layer norms, the class token; its forward's
``attn_mask``/``is_causal`` arguments left at their defaults) and of a small timm Swin
(shifted windows; its softmax outputs left float) and of a small timm PVT v2 (a GELU
between a transpose and a linear layer). Adding a model is one entry in MODELS.
"""

from __future__ import annotations

import pytest
import torch

import torchquant as tq

ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread is fastest


def _swap(net, wf, af):
    return tq.quantize_model(net.eval(), wf, af, method="swap")


def _torchvision(name):
    tv = pytest.importorskip("torchvision")
    return getattr(tv.models, name)(num_classes=10)


def _timm(name, **kwargs):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _digits():
    from torchquant.bench.models import DigitsCNN

    return DigitsCNN()


def _fused(converter, net, wf, af):
    from torchquant import models

    return getattr(models, converter)(net.eval(), wf, af, quantize_first=True, quantize_fc=True)


def _efficientnet_b0():
    ep = pytest.importorskip("efficientnet_pytorch")
    return ep.EfficientNet.from_name("efficientnet-b0", num_classes=10, image_size=32)  # random init, no download


# name -> (convert(weight factory, acts factory) -> quantizable model, input shape, owner of the output quantizer)
MODELS = {
    "digits_cnn": (lambda wf, af: _swap(_digits(), wf, af), (1, 8, 8), "fc"),
    "resnet18": (lambda wf, af: _swap(_torchvision("resnet18"), wf, af), (3, 32, 32), "fc"),
    "mobilenet_v2": (lambda wf, af: _swap(_torchvision("mobilenet_v2"), wf, af), (3, 32, 32), "classifier.1"),
    "timm_resnet10t": (lambda wf, af: _swap(_timm("resnet10t"), wf, af), (3, 32, 32), "fc"),
    "fused_resnet18": (lambda wf, af: _fused("FusedResNet", _torchvision("resnet18"), wf, af), (3, 32, 32), "fc"),
    "fused_mobilenet_v2": (
        lambda wf, af: _fused("FusedMobileNetV2", _torchvision("mobilenet_v2"), wf, af),
        (3, 32, 32),
        "classifier.1",
    ),
    "fused_efficientnet_b0": (
        lambda wf, af: _fused("FusedEfficientNet", _efficientnet_b0(), wf, af),
        (3, 32, 32),
        "fc",
    ),
    "fx_timm_vit_tiny": (
        lambda wf, af: tq.quantize_model(
            _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2).eval(), wf, af, method="fx"
        ),
        (3, 32, 32),
        "head",
    ),
    # window attention: rolls, padding and window partitions between points and linear layers (requantized
    # there); softmax outputs float, since onnxruntime's QLinearSoftmax computes differently
    "fx_timm_swin": (
        lambda wf, af: tq.quantize_model(
            _timm(
                "swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1)
            ).eval(),
            wf,
            lambda m, n: None if n.endswith("softmax") else af(m, n),
            method="fx",
        ),
        (3, 56, 56),
        "head.fc",
    ),
    # depthwise-conv MLPs: a GELU after a transpose, quantized as a point of its own so fc2 reads integers
    "fx_timm_pvt_v2": (
        lambda wf, af: tq.quantize_model(
            _timm("pvt_v2_b0", depths=(1, 1, 1, 1), embed_dims=(16, 16, 32, 32), num_heads=(1, 1, 2, 2)).eval(),
            wf,
            af,
            method="fx",
        ),
        (3, 64, 64),
        "head",
    ),
    "fx_timm_mobilenetv3_small_050": (
        lambda wf, af: tq.quantize_model(_timm("mobilenetv3_small_050", drop_rate=0.2).eval(), wf, af, method="fx"),
        (3, 32, 32),
        "classifier",  # timm's Linear head: a layer of its own (a layer adapter), not traced into
    ),
}
# id -> (weight bits, activation bits, per-channel weights, opset, signed weights)
SETTINGS = {
    "w8a8-per-tensor": (8, 8, False, 17, False),
    "w8a8-per-channel": (8, 8, True, 17, False),
    "w4a4-per-tensor-int4": (4, 4, False, 21, False),
    "w4a4-per-channel-int4": (4, 4, True, 21, False),
}


def _build(model_name, setting):
    convert, shape, out_owner = MODELS[model_name]
    w_bits, a_bits, pc, opset, signed = SETTINGS[setting]
    wax = {"axis": 0} if pc else {}
    torch.manual_seed(0)
    model = convert(
        lambda m, n: tq.AffineQuantizer(w_bits, tq.BatchMinMax(**wax), symmetric=True),
        lambda m, n: tq.AffineQuantizer(a_bits, tq.RunningMinMax()),
    )
    assert not model.training
    with torch.no_grad(), tq.qmodule_state(model, tq.QModuleState.CALIBRATION):
        model(torch.randn(8, *shape))
    tq.set_qmodule_state(model, tq.QModuleState.QUANT_EVAL)
    proto = tq.export.to_onnx(model, torch.randn(1, *shape), opset=opset, signed_weights=signed)
    return model, proto, shape, f"{out_owner}.acts_quantizer"


# The small model and the models added for issue 7 run every setting; the older large ones
# (swap conversions, covered by the same code paths) one per granularity and bit-width, within
# the test-time budget.
ALL_SETTINGS_MODELS = ("digits_cnn", "fused_resnet18", "fused_mobilenet_v2", "fused_efficientnet_b0")
ALL_SETTINGS_MODELS += ("fx_timm_mobilenetv3_small_050",)
LARGE_MODEL_SETTINGS = ("w8a8-per-tensor", "w4a4-per-channel-int4")


def _cases():
    for model_name in MODELS:
        small = model_name == "digits_cnn"
        for setting in SETTINGS if model_name in ALL_SETTINGS_MODELS else LARGE_MODEL_SETTINGS:
            marks = [] if small else [pytest.mark.slow]
            yield pytest.param(model_name, setting, id=f"{model_name}-{setting}", marks=marks)


@pytest.mark.parametrize(("model_name", "setting"), list(_cases()))
def test_parity(model_name, setting):
    model, proto, shape, out_point = _build(model_name, setting)
    x = torch.randn(2, *shape)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    report = tq.export.check_parity(model, proto, x, session_options=so)
    # Every quantization point, given the simulation's inputs, and the model output with onnxruntime's
    # integer kernels (rounding ties decided as onnxruntime did): at most one step, >= 99.9 % identical.
    assert len(report.points) >= 5
    (out_name,) = report.outputs
    assert report.outputs[out_name].max_steps is not None, "the output is a quantization point"
    assert out_point in report.points  # the output's own quantizer is checked too
    print(f"{model_name} {setting}:\n{report}")
    assert report.passed(), report.failures()
    # The optimized run reads the same codes at every point, once the ties before it are adopted.
    assert report.divergence is None, report.divergence
