"""Export of quantizers with levels (NF4, APoT): codes plus codebook in ONNX and integer_params."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import torchquant as tq

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

S = tq.QModuleState


def _nf4(m, n):
    # QLoRA's blocks of 64 inputs where they fit (the Linear's 128), blocks of 4 input channels in the conv
    return tq.NF4Quantizer() if isinstance(m, nn.Linear) else tq.NF4Quantizer(tq.BatchMinMax(axis=1, group_size=4))


WEIGHTS = {
    "nf4-blocks": _nf4,
    "nf4-per-channel": lambda m, n: tq.NF4Quantizer(tq.BatchMinMax(axis=0)),
    "apot4-per-channel": lambda m, n: tq.APoTQuantizer(4, tq.BatchMinMax(axis=0)),
}
ACTS = {
    "a8": lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()),
    "apot4-unsigned": lambda m, n: tq.APoTQuantizer(4, tq.RunningMinMax(), signed=False),
}


def _conv_bn(weights, acts):
    """conv + BatchNorm (folded) + ReLU, then a Linear; BatchNorm statistics that are not the identity."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)
    ).eval()
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    q = tq.quantize_model(net, weights, acts, method="swap", fold_bn=True)
    with torch.no_grad(), tq.qmodule_state(q, S.CALIBRATION):
        q(torch.randn(32, 8, 4, 4))
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    return q


@pytest.mark.parametrize("acts", ACTS.values(), ids=ACTS.keys())
@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_weights_are_codes_and_codebook_and_outputs_match(weights, acts):
    net = _conv_bn(weights, acts)
    proto = tq.export.to_onnx(net, torch.randn(1, 8, 4, 4))
    inits = {t.name: t for t in proto.graph.initializer}
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops  # folded into the conv's weight (then coded) and bias
    gathers = [n for n in proto.graph.node if n.name.endswith("/codebook_weight")]
    assert len(gathers) == 2  # conv and linear weights
    for node, wrapper in zip(gathers, (net[0], net[4])):
        codebook, cast = inits[node.input[0]], next(n for n in proto.graph.node if n.output[0] == node.input[1])
        codes = inits[cast.input[0]]
        assert codes.data_type == onnx.TensorProto.UINT8
        levels = wrapper.weight_quantizer.levels()
        np.testing.assert_array_equal(numpy_helper.to_array(codebook), levels.levels.numpy())
        w = wrapper.quantized_weight().detach()  # the folded weight on its levels
        expected = levels.codes(w)
        g = levels.granularity
        if g.group_size is not None:
            expected = g.grouped(expected)  # stored in the grouped shape (.., n / g, g, ..)
        np.testing.assert_array_equal(numpy_helper.to_array(codes).astype(np.int64), expected.numpy())
        assert torch.equal(levels.dequantize(levels.codes(w)), w)
    # no float copy of a weight: the only float initializers with two or more dimensions are scales,
    # one value per channel or block
    floats = [t for t in inits.values() if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    assert all(t.name.endswith("/scale") for t in floats), [t.name for t in floats]
    assert sum(int(np.prod(t.dims)) for t in floats) < net[0].layer.weight.numel()
    x = torch.randn(16, 8, 4, 4)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = net(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"input0": x.numpy()})[0], ref, rtol=0, atol=1e-5)
    report = tq.export.check_parity(net, proto, x)
    assert report.passed(), str(report)
    assert not any(n.endswith("weight_quantizer") for n in report.unchecked)  # codes count as checked


def test_a_codebook_per_channel_is_stored_flat_with_offsets():
    class PerChannelCodebook(tq.Quantizer):
        """Two levels per output channel, different in each: {-c, c} with c = 1 + channel / 10."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            c = 1 + torch.arange(channels, dtype=torch.float32).view(channels, 1) / 10
            self.register_buffer("table", torch.cat([-c, c], dim=1).unsqueeze(1))  # (C, 1, 2): against (C, in)

        def pre_observe(self, x):
            pass

        def post_observe(self, x):
            pass

        def quantize(self, x):
            return tq.quantizers_functional.level_quantize(x, self.table, torch.ones(()))

        def levels(self):
            return tq.LevelGrid(self.table, torch.ones(()), tq.Granularity(axis=0))

    torch.manual_seed(0)
    net = tq.quantize_model(nn.Sequential(nn.Linear(6, 3)), lambda m, n: PerChannelCodebook(3), None, method="swap")
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    proto = tq.export.to_onnx(net, torch.randn(1, 6))
    assert "Add" in {n.op_type for n in proto.graph.node}  # code + 2 * channel
    x = torch.randn(5, 6)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input0": x.numpy()})[0], net(x).numpy(), rtol=0, atol=1e-6)


def test_integer_params_give_codes_levels_and_scale():
    net = _conv_bn(WEIGHTS["apot4-per-channel"], ACTS["apot4-unsigned"])
    params = tq.export.integer_params(net)
    w = params["0.weight_quantizer"]
    assert (w["kind"], w["affine"], w["n_levels"], w["granularity"]) == ("weight", False, 15, "per_channel")
    np.testing.assert_array_equal(w["levels"], tq.quantizers.apot_levels(4).numpy())
    folded = net[0].quantized_weight().detach().numpy()
    np.testing.assert_array_equal(w["levels"][w["codes"]] * w["scale"], folded)  # exactly the simulated weight
    a = params["0.acts_quantizer"]
    assert (a["kind"], a["n_levels"]) == ("activation", 16) and "codes" not in a


def test_uncalibrated_level_quantizer_is_named():
    torch.manual_seed(0)
    net = tq.quantize_model(nn.Sequential(nn.Linear(64, 2)), lambda m, n: tq.NF4Quantizer(), None, method="swap")
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with pytest.raises(ValueError, match=r"'0\.weight_quantizer' \(NF4Quantizer\) was never calibrated"):
        tq.export.to_onnx(net, torch.randn(1, 64))


def test_codebook_weights_of_a_conv_behind_a_maxpool_are_not_quantized_again():
    # onnxruntime moves the DequantizeLinear before a MaxPool past it, so the next conv reads a dequantized
    # tensor once optimized and its float weight (the folded codebook) was quantized again on its own int8
    # grid: 43 % identical codes in resnet18's layer1.0.conv1
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.ReLU()
    ).eval()
    net = tq.quantize_model(net, WEIGHTS["nf4-per-channel"], ACTS["a8"], method="swap", fold_bn=True)
    x = torch.randn(8, 3, 16, 16)
    tq.calibrate(net, [x], progress=False)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    proto = tq.export.to_onnx(net, x[:1], opset=21)
    report = tq.export.check_parity(net, proto, x)
    assert report.passed(), str(report)
    assert report.divergence is None, report.divergence
