"""onnxruntime runs the exported model as the simulation does: parity in quantization steps.

Models: quantize_model(method="swap") conversions of torchvision resnet18 and
mobilenet_v2, a timm model and the built-in DigitsCNN, at small inputs; adding a
model is one entry in MODELS.
"""

from __future__ import annotations

import pytest
import torch

import torchquant as tq

pytest.importorskip("onnxruntime")
from parity import end_to_end, per_point


def _swap(net, w_bits, a_bits, per_channel):
    wax = {"axis": 0} if per_channel else {}
    return tq.quantize_model(
        net.eval(),
        lambda m, n: tq.AffineQuantizer(w_bits, tq.BatchMinMax(**wax), symmetric=True),
        lambda m, n: tq.AffineQuantizer(a_bits, tq.RunningMinMax()),
        method="swap",
    )


def _torchvision(name):
    tv = pytest.importorskip("torchvision")
    return getattr(tv.models, name)(num_classes=10)


def _timm(name):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, num_classes=10)


def _digits():
    from torchquant.bench.models import DigitsCNN

    return DigitsCNN()


# name -> (float model builder, input shape, name of the output quantizer's owner)
MODELS = {
    "digits_cnn": (_digits, (1, 8, 8), "fc"),
    "resnet18": (lambda: _torchvision("resnet18"), (3, 32, 32), "fc"),
    "mobilenet_v2": (lambda: _torchvision("mobilenet_v2"), (3, 32, 32), "classifier.1"),
    "timm_resnet10t": (lambda: _timm("resnet10t"), (3, 32, 32), "fc"),
}
# id -> (weight bits, activation bits, per-channel weights, opset, signed weights)
SETTINGS = {
    "w8a8-per-tensor": (8, 8, False, 17, False),
    "w8a8-per-channel": (8, 8, True, 17, False),
    "w4a4-per-tensor-int4": (4, 4, False, 21, False),
    "w4a4-per-channel-int4": (4, 4, True, 21, False),
}


def _build(model_name, setting):
    build, shape, out_owner = MODELS[model_name]
    w_bits, a_bits, pc, opset, signed = SETTINGS[setting]
    torch.manual_seed(0)
    model = _swap(build(), w_bits, a_bits, pc)
    with torch.no_grad(), tq.qmodule_state(model, tq.QModuleState.CALIBRATION):
        model(torch.randn(8, *shape))
    tq.set_qmodule_state(model, tq.QModuleState.QUANT_EVAL)
    proto = tq.export.to_onnx(model, torch.randn(1, *shape), opset=opset, signed_weights=signed)
    return model, proto, shape, model.get_submodule(out_owner).acts_quantizer


# The small model runs every setting; the large ones (seconds of TorchScript export each) one per
# granularity and bit-width, within the test-time budget.
LARGE_MODEL_SETTINGS = ("w8a8-per-tensor", "w4a4-per-channel-int4")


def _cases():
    for model_name in MODELS:
        small = model_name == "digits_cnn"
        for setting in SETTINGS if small else LARGE_MODEL_SETTINGS:
            marks = [] if small else [pytest.mark.slow]
            yield pytest.param(model_name, setting, id=f"{model_name}-{setting}", marks=marks)


@pytest.mark.parametrize(("model_name", "setting"), list(_cases()))
def test_parity(model_name, setting):
    model, proto, shape, out_q = _build(model_name, setting)
    x = torch.randn(2, *shape)
    # Every quantization point, given the simulation's inputs: at most one step, >= 99.9 % identical.
    points = per_point(model, proto, x)
    assert len(points) >= 5
    worst = max(points.items(), key=lambda kv: (kv[1][0], -kv[1][1]))
    for name, (max_steps, identical, _) in points.items():
        assert max_steps <= 1 and identical >= 0.999, (name, max_steps, identical)
    # The model output, with onnxruntime's optimizations on.
    max_steps, identical = end_to_end(model, proto, x, out_q)
    print(f"{model_name} {setting}: worst point {worst}, output max {max_steps} steps, {identical:.4f} identical")
    assert max_steps <= 1 and identical >= 0.999
