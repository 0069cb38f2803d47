"""to_onnx: graph structure, integer types, errors and warnings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.export import onnx_type_for_grid

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

S = tq.QModuleState


def _net(wq, aq, out=4):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, out)
    )
    return tq.quantize_model(net.eval(), wq, aq, method="swap")


def _calibrated(wq, aq):
    net = _net(wq, aq)
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(torch.randn(16, 3, 4, 4))
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    return net


def _run(proto, x):
    sess = ort.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"], disabled_optimizers=["ClipQuantRewrite"]
    )
    return sess.run(None, {"input0": x.numpy()})[0]


def _w8(m, n):
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)


def _a8(m, n):
    return tq.AffineQuantizer(8, tq.RunningMinMax())


def _inits(proto):
    return {t.name: t for t in proto.graph.initializer}


@pytest.mark.parametrize("signed", [False, True], ids=["uint8-weights", "int8-weights"])
def test_weights_are_integer_initializers_and_outputs_match(signed):
    net = _calibrated(_w8, _a8)
    proto = tq.export.to_onnx(net, torch.randn(1, 3, 4, 4), signed_weights=signed)
    inits = _inits(proto)
    dq_w = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(dq_w) == 2  # conv and linear weights
    for n in dq_w:
        t = inits[n.input[0]]
        assert t.data_type == (onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8)
        assert next(a.i for a in n.attribute if a.name == "axis") == 0
        zp = numpy_helper.to_array(inits[n.input[2]])
        # symmetric: zero point 2^(n-1) (127 where the core's round(127.5 - ulp) gives it), shifted when signed
        assert set(zp.astype(int).tolist()) <= ({0, -1} if signed else {128, 127})
    # no float copy of a weight left: float initializers are biases, BN parameters and scales only
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2 for t in inits.values())
    conv_codes = numpy_helper.to_array(inits[dq_w[0].input[0]]).astype(np.int64)
    expected = net[0].weight_quantizer.grid().to_int(net[0].layer.weight).numpy() - (128 if signed else 0)
    np.testing.assert_array_equal(conv_codes, expected)
    x = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        ref = net(x).numpy()
    step = float(net[4].acts_quantizer.grid().scale)
    assert np.abs(_run(proto, x) - ref).max() <= step * 1.01


def test_model_is_not_modified_and_file_written(tmp_path):
    net = _calibrated(_w8, _a8)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        before = net(x)
    path = tmp_path / "m.onnx"
    tq.export.to_onnx(net, x[:1], path)
    assert isinstance(net[0].weight_quantizer, tq.AffineQuantizer)
    with torch.no_grad():
        assert torch.equal(net(x), before)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def test_4bit_uses_int4_at_opset21_and_clips_in_uint8_before():
    net = _calibrated(
        lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=True),
        lambda m, n: tq.AffineQuantizer(4, tq.RunningMinMax()),
    )
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        ref = net(x).numpy()
    p21 = tq.export.to_onnx(net, x[:1], opset=21)
    types21 = {t.data_type for t in p21.graph.initializer}
    assert onnx.TensorProto.UINT4 in types21
    assert "Clip" not in {n.op_type for n in p21.graph.node}
    p17 = tq.export.to_onnx(net, x[:1], opset=17)
    clips = [n for n in p17.graph.node if n.op_type == "Clip"]
    assert len(clips) == 2  # one per activation point: [0, 15] inside uint8
    for p in (p21, p17):
        # The ONNX semantics exactly; onnxruntime's optimized kernels to within a rounding tie.
        plain = ort.SessionOptions()
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(p.SerializeToString(), plain, providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(sess.run(None, {"input0": x.numpy()})[0], ref)
        report = tq.export.check_parity(net, p, x)
        assert report.passed() and report.outputs["output0"].max_steps == 0, report


def test_grid_type_mapping():
    g = tq.granularity.PER_TENSOR

    def grid(qmin, qmax, zp):
        return tq.AffineGrid(torch.tensor(0.1), torch.tensor(float(zp)), qmin, qmax, g)

    tp = onnx.TensorProto
    assert onnx_type_for_grid(grid(0, 255, 3), 17, prefer_signed=False).elem_type == tp.UINT8
    t = onnx_type_for_grid(grid(0, 255, 128), 17, prefer_signed=True)
    assert (t.elem_type, t.shift) == (tp.INT8, 128)
    assert onnx_type_for_grid(grid(0, 255, 128), 17, prefer_signed=False).elem_type == tp.UINT8
    assert onnx_type_for_grid(grid(-128, 127, 0), 17, prefer_signed=False).elem_type == tp.INT8
    assert onnx_type_for_grid(grid(-8, 7, 0), 21, prefer_signed=False).elem_type == tp.INT4
    assert onnx_type_for_grid(grid(-8, 7, 0), 17, prefer_signed=False).elem_type == tp.INT8
    assert onnx_type_for_grid(grid(0, 4095, 7), 21, prefer_signed=False).elem_type == tp.UINT16
    assert onnx_type_for_grid(grid(0, 4095, 7), 17, prefer_signed=False) is None


def test_qfmt_signed_grid_exports_as_int8():
    net = _calibrated(
        lambda m, n: tq.QfmtQuantizer(8, True, tq.BatchMinMax()),
        lambda m, n: tq.QfmtQuantizer(8, True, tq.RunningMinMax()),
    )
    x = torch.randn(3, 3, 4, 4)
    proto = tq.export.to_onnx(net, x[:1])
    q_nodes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    inits = _inits(proto)
    assert all(inits[n.input[2]].data_type == onnx.TensorProto.INT8 for n in q_nodes)
    with torch.no_grad():
        np.testing.assert_allclose(_run(proto, x), net(x).numpy(), rtol=0, atol=1e-6)


def test_too_wide_grid_warns_and_exports_float_simulation():
    net = _calibrated(_w8, lambda m, n: tq.AffineQuantizer(12, tq.RunningMinMax()))
    x = torch.randn(3, 3, 4, 4)
    with pytest.warns(UserWarning, match=r"'0\.acts_quantizer'.*12-bit grid"):
        proto = tq.export.to_onnx(net, x[:1], opset=17)
    with torch.no_grad():
        np.testing.assert_allclose(_run(proto, x), net(x).numpy(), rtol=0, atol=1e-5)


class SignQuantizer(tq.Quantizer):
    """Binary quantizer without an affine grid: sign(x) * mean|x| (fixed at 0.5 here)."""

    def pre_observe(self, x):
        pass

    def quantize(self, x):
        return torch.where(x >= 0, 0.5, -0.5).to(x.dtype)

    def post_observe(self, x):
        pass


def test_non_affine_quantizer_warns_with_its_name_and_matches():
    net = _calibrated(lambda m, n: SignQuantizer() if isinstance(m, nn.Conv2d) else _w8(m, n), _a8)
    x = torch.randn(3, 3, 4, 4)
    with pytest.warns(UserWarning, match=r"'0\.weight_quantizer' \(SignQuantizer\) has no affine grid"):
        proto = tq.export.to_onnx(net, x[:1])
    with torch.no_grad():
        np.testing.assert_allclose(_run(proto, x), net(x).numpy(), rtol=0, atol=1e-5)


def test_per_group_weights_use_blocked_dequantize_at_opset21():
    torch.manual_seed(0)
    net = tq.quantize_model(
        nn.Sequential(nn.Linear(32, 8)),
        lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=1, group_size=8)),
        _a8,
        method="swap",
    )
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(torch.randn(16, 32))
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    x = torch.randn(4, 32)
    proto = tq.export.to_onnx(net, x[:1], opset=21)
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in _inits(proto))
    assert {a.name: a.i for a in dq.attribute} == {"axis": 1, "block_size": 8}
    with torch.no_grad():
        np.testing.assert_allclose(_run(proto, x), net(x).numpy(), rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match="per-group quantization needs opset 21"):
        proto17 = tq.export.to_onnx(net, x[:1], opset=17)
    with torch.no_grad():
        np.testing.assert_allclose(_run(proto17, x), net(x).numpy(), rtol=0, atol=1e-6)


def test_errors_name_the_module():
    net = _net(_w8, _a8)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with pytest.raises(ValueError, match=r"'0\.weight_quantizer'.*never calibrated"):
        tq.export.to_onnx(net, torch.randn(1, 3, 4, 4))
    net = _calibrated(_w8, _a8)
    net[4].qstate = S.CALIBRATION
    with pytest.raises(ValueError, match=r"module '4' \(QWrapper\) is in mode CALIBRATION"):
        tq.export.to_onnx(net, torch.randn(1, 3, 4, 4))
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with pytest.raises(ValueError, match=r"example inputs of shapes \[\(1, 3, 5, 5\)\]"):
        tq.export.to_onnx(net, torch.randn(1, 3, 5, 5))
    with pytest.raises(TypeError, match="example_inputs"):
        tq.export.to_onnx(net, [1, 2])
    with pytest.raises(ValueError, match="opset"):
        tq.export.to_onnx(net, torch.randn(1, 3, 4, 4), opset=9)
    with pytest.raises(ValueError, match="contains no QModule"):
        tq.export.to_onnx(nn.Linear(2, 2), torch.randn(1, 2))


@pytest.mark.parametrize("through", [nn.Identity(), nn.Flatten(0, 0)], ids=["direct", "through-reshape"])
def test_4bit_activation_read_by_maxpool_is_stored_in_8_bits(through):
    # onnxruntime turns DequantizeLinear -> MaxPool into a MaxPool on the integers and has no 4-bit MaxPool.
    torch.manual_seed(0)
    a4 = lambda m, n: tq.AffineQuantizer(4, tq.RunningMinMax())  # noqa: E731
    w4 = lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=True)  # noqa: E731
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), through, nn.MaxPool2d(2), nn.Conv2d(4, 4, 1)
    )
    net = tq.quantize_model(net.eval(), w4, a4, method="swap")
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(torch.randn(8, 3, 8, 8))
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    proto = tq.export.to_onnx(net, torch.randn(1, 3, 8, 8), opset=21)
    inits = _inits(proto)
    q_types = {
        n.name.split("/")[0]: inits[n.input[2]].data_type for n in proto.graph.node if n.op_type == "QuantizeLinear"
    }
    assert q_types == {"0.0.acts_quantizer": onnx.TensorProto.UINT8, "3.acts_quantizer": onnx.TensorProto.UINT4}
    (clip,) = [n for n in proto.graph.node if n.op_type == "Clip"]
    assert [int(numpy_helper.to_array(inits[i])) for i in clip.input[1:]] == [0, 15]
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = net(x).numpy()
    step = float(net[3].acts_quantizer.grid().scale)
    assert np.abs(_run(proto, x) - ref).max() <= step * 1.01  # loads and runs in onnxruntime


def test_4bit_activation_read_by_a_conv_with_8bit_weights_loads_and_matches():
    # onnxruntime fuses DequantizeLinear(uint4) -> Conv <- DequantizeLinear(int8) into a QLinearConv, which
    # takes no 4-bit input: stored as 4 bits, the model did not load
    torch.manual_seed(0)
    net = nn.Sequential(tq.QOp(nn.Identity(), tq.AffineQuantizer(4, tq.RunningMinMax())), nn.Conv2d(3, 8, 3))
    net[1] = tq.QWrapper(net[1], tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True))
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(torch.randn(16, 3, 8, 8))
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    x = torch.randn(4, 3, 8, 8)
    proto = tq.export.to_onnx(net, x[:1], opset=21)
    (q,) = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert _inits(proto)[q.input[2]].data_type == onnx.TensorProto.UINT8
    with torch.no_grad():
        np.testing.assert_allclose(_run(proto, x), net(x).numpy(), rtol=0, atol=1e-5)


class _WrongGridQuantizer(tq.AffineQuantizer):
    """Quantizes like AffineQuantizer, but grid() returns a scale that does not fit the weight."""

    def __init__(self, wrong: str) -> None:
        super().__init__(8, tq.BatchMinMax(axis=0), symmetric=True)
        self.wrong = wrong

    def grid(self):
        g = super().grid()
        if self.wrong == "flat":  # (C,) instead of (C, 1, 1, 1): does not broadcast against (C, C_in, kH, kW)
            return tq.AffineGrid(g.scale.reshape(-1), g.zero_point.reshape(-1), g.qmin, g.qmax, g.granularity)
        # per-channel scales under a per-tensor granularity: broadcasts, but is not what the grid says
        return tq.AffineGrid(g.scale, g.zero_point, g.qmin, g.qmax, tq.Granularity())


@pytest.mark.parametrize(
    ("wrong", "reason"),
    [("flat", r"scale does not broadcast.*scale of shape \(8,\)"), ("granularity", r"scale of shape \(8, 1, 1, 1\)")],
)
def test_grid_that_does_not_fit_its_tensor_is_named_with_the_shapes(wrong, reason):
    net = _calibrated(lambda m, n: _WrongGridQuantizer(wrong), _a8)
    assert net[0].weight_quantizer._tq_name == "0.weight_quantizer"
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=reason) as e:
        tq.export.to_onnx(net, x)
    msg = str(e.value)
    assert msg.startswith("to_onnx: quantizer '0.weight_quantizer' (_WrongGridQuantizer): grid() does not fit")
    assert "tensor of shape (8, 3, 3, 3)" in msg
    assert "does not run on example inputs" not in msg
    with pytest.raises(ValueError, match=r"^integer_params: quantizer '0\.weight_quantizer'.*\(8, 3, 3, 3\)"):
        tq.export.integer_params(net)


class _Attention(nn.Module):
    """Arguments left at their defaults (a bool, an optional tensor) reach a call that needs Python values."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)


def test_arguments_left_at_their_defaults_stay_python_values():
    torch.manual_seed(0)
    net = tq.quantize_model(_Attention().eval(), _w8, _a8, method="fx")  # placeholders for both defaults
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(x)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    proto = tq.export.to_onnx(net, x)
    assert [i.name for i in proto.graph.input] == ["input0"]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = net(x)
    got = sess.run(None, {"input0": x.numpy()})[0]
    step = net.scaled_dot_product_attention.acts_quantizer.grid().scale.item()
    assert np.abs(got - expected.numpy()).max() <= step * 1.001


def test_a_layer_with_an_input_quantizer_exports_and_agrees():
    # Linear layers of transformers quantize their input (QWrapper.input_quantizer), as torchquant.hf does.
    torch.manual_seed(0)
    net = tq.quantize_model(nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 4)).eval(), _w8, None, method="swap")
    for layer in (net[0], net[2]):
        layer.input_quantizer = _a8(None, None)
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(torch.randn(16, 5, 8))
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    proto = tq.export.to_onnx(net, x)
    assert isinstance(net[0].input_quantizer, tq.AffineQuantizer)  # the model keeps its quantizers
    report = tq.export.check_parity(net, proto, x)
    assert sorted(report.points) == ["0.input_quantizer", "2.input_quantizer"]
    assert report.passed(), report.failures()


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, **extra):
        return self.fc(x) * extra.get("scale", 1.0)


def test_keyword_arguments_a_hook_adds_still_reach_forward_and_list_dynamic_axes_are_taken():
    torch.manual_seed(0)
    net = tq.quantize_model(_Scaled().eval(), _w8, _a8, method="swap")
    net.register_forward_pre_hook(lambda m, args, kwargs: (args, {**kwargs, "scale": 2.0}), with_kwargs=True)
    x = torch.randn(3, 8)
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(x)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    proto = tq.export.to_onnx(net, x, dynamic_axes={"input0": [0], "output0": [0]})
    with torch.no_grad():
        expected = net(x).numpy()
    assert np.allclose(_run(proto, x), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"dynamic_axes names \['x'\]"):
        tq.export.to_onnx(net, x, dynamic_axes={"x": [0]})


@pytest.mark.parametrize(
    ("value", "requantized"),
    [(None, True), ("zero", True), ("nonzero", False), ("computed", False)],
    ids=["no-value", "zero", "nonzero", "computed"],
)
def test_padding_is_looked_through_only_with_a_value_known_to_be_zero(value, requantized):
    from onnx import TensorProto, helper

    from torchquant.export.onnx_qdq import REQUANTIZE, _requantize_moved_inputs

    def arr(name, a):
        return numpy_helper.from_array(np.asarray(a), name)

    inits = [arr("s", np.float32(0.1)), arr("z", np.uint8(3)),
             arr("w", np.ones((4, 3), np.int8)), arr("ws", np.float32(0.2)), arr("pads", np.array([0, 0, 0, 2])),
             arr("zero", np.float32(0)), arr("nonzero", np.float32(0.5)), arr("five", np.int64(5))]  # fmt: skip
    pad_in = ["a", "pads", *{"zero": ["zero"], "nonzero": ["nonzero"], "computed": ["cast"]}.get(value, [])]
    nodes = [
        helper.make_node("DequantizeLinear", ["codes", "s", "z"], ["a"]),
        helper.make_node("Cast", ["five"], ["cast"], to=TensorProto.FLOAT),
        helper.make_node("Pad", pad_in, ["padded"]),
        helper.make_node("DequantizeLinear", ["w", "ws"], ["wf"]),
        helper.make_node("MatMul", ["padded", "wf"], ["y"]),
    ]
    codes = helper.make_tensor_value_info("codes", TensorProto.UINT8, [2, 4])  # an activation's codes
    graph = helper.make_graph(nodes, "g", [codes], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    _requantize_moved_inputs(graph)
    pairs = [n for n in graph.node if n.name.startswith(REQUANTIZE)]
    assert len(pairs) == (2 if requantized else 0)


@pytest.mark.parametrize("bits", [2, 3])
def test_an_activation_narrower_than_4_bits_is_clipped_in_8_bits_at_opset_21(bits):
    net = _calibrated(_w8, lambda m, n: tq.AffineQuantizer(bits, tq.RunningMinMax()))
    x = torch.randn(3, 3, 4, 4)
    proto = tq.export.to_onnx(net, x[:1], opset=21)  # Clip on uint4 is not ONNX: the codes stay uint8
    clips = [n for n in proto.graph.node if n.op_type == "Clip"]
    assert len(clips) == 2
    inits = _inits(proto)
    assert all(numpy_helper.to_array(inits[c.input[2]]).item() == 2**bits - 1 for c in clips)
    assert tq.export.check_parity(net, proto, x).passed()


class _PerInputChannel(nn.Module):
    """A convolution, a linear layer on 3-d inputs (MatMul of a transposed weight) and one on 2-d inputs (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.seq = nn.Linear(6, 6)
        self.head = nn.Linear(24, 3)

    def forward(self, x):  # (N, 2, 8, 8)
        y = self.conv(x).flatten(2)[..., :6]  # (N, 4, 6)
        return self.head(self.seq(y).flatten(1))


@pytest.mark.parametrize("opset", [17, 21])
def test_weights_with_scales_along_the_summed_axis_export_as_their_float_values(opset):
    # No integer kernel takes per-input-channel weights: onnxruntime refused such a MatMul, and quantized
    # the float weights of a convolution between Q/DQ pairs again on its own grid.
    torch.manual_seed(0)
    net = tq.quantize_model(
        _PerInputChannel().eval(), lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=1), symmetric=True), _a8
    )
    x = torch.randn(16, 2, 8, 8)
    tq.calibrate(net, [x], progress=False)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with pytest.warns(UserWarning, match=r"'seq\.weight_quantizer': its scales change along axis 1") as rec:
        proto = tq.export.to_onnx(net, x[:1], opset=opset)
    named = {str(w.message).split("'")[1] for w in rec if "sums over" in str(w.message)}
    assert named == {f"{n}.weight_quantizer" for n in ("conv", "seq", "head")}
    stored = {n.name.split("/")[0] for n in proto.graph.node if n.name.endswith("/reshape")}
    assert stored == {f"{n}.weight_quantizer" for n in ("conv", "seq", "head")}  # no integer weights left
    report = tq.export.check_parity(net, proto, x)
    assert report.passed(), report.failures()
    assert report.divergence is None, report.divergence


def test_per_output_channel_weights_stay_integer():
    net = _calibrated(_w8, _a8)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proto = tq.export.to_onnx(net, torch.randn(1, 3, 4, 4))
    axes = [a.i for n in proto.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes and set(axes) == {0}


class _GridlessNet(nn.Module):
    """Layers between quantized activations: a Conv (QLinearConv's pattern), a Linear on 3-d inputs, a Gemm."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(2, 8, 3)
        self.c1 = nn.Conv2d(8, 8, 3)
        self.l1 = nn.Linear(6, 6)
        self.l2 = nn.Linear(48, 4)

    def forward(self, x):  # (N, 2, 10, 10)
        y = torch.relu(self.c1(torch.relu(self.c0(x)))).flatten(2)[..., :6]
        return self.l2(torch.relu(self.l1(y)).flatten(1))


GRIDLESS = {
    "binary": lambda: tq.BinaryQuantizer(),
    "xnor": lambda: tq.XNORWeightQuantizer(),
    "ternary": lambda: tq.TernaryQuantizer(),
    "dorefa": lambda: tq.DoReFaWeightQuantizer(4),
}


@pytest.mark.parametrize("kind", list(GRIDLESS))
def test_weights_of_a_quantizer_without_a_grid_export_as_their_values_and_agree(kind):
    # onnxruntime folded binary/ternary/DoReFa float simulations into initializers and quantized the
    # convolution's again on its own grid (64 to 96 % identical codes).
    torch.manual_seed(0)
    net = tq.quantize_model(_GridlessNet().eval(), lambda m, n: _w8(m, n) if n == "c0" else GRIDLESS[kind](), _a8)
    x = torch.randn(8, 2, 10, 10)
    tq.calibrate(net, [x], progress=False)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with pytest.warns(UserWarning, match=r"'c1\.weight_quantizer' \(\w+\) has no affine grid"):
        proto = tq.export.to_onnx(net, x[:1])
    stored = {n.name for n in proto.graph.node if n.name.endswith("/reshape")}
    assert {s.split("/")[0] for s in stored} == {"c1.weight_quantizer", "l1.weight_quantizer", "l2.weight_quantizer"}
    report = tq.export.check_parity(net, proto, x)
    assert report.passed(), report.failures()
    assert report.divergence is None, report.divergence


def test_computed_weights_of_a_quantizer_without_a_grid_are_stored_as_values():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    for bn in (net[1], net[4]):
        bn.running_var.uniform_(0.5, 2)
        bn.running_mean.uniform_(-1, 1)
        bn.weight.data.uniform_(0.5, 2)
    net = tq.quantize_model(
        net.eval(), lambda m, n: _w8(m, n) if n == "0" else tq.TernaryQuantizer(), _a8, method="swap", fold_bn=True
    )
    x = torch.randn(8, 2, 10, 10)
    tq.calibrate(net, [x], progress=False)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with pytest.warns(UserWarning, match="has no affine grid"):
        proto = tq.export.to_onnx(net, x[:1])
    assert [n.name for n in proto.graph.node if n.name.startswith("tq_pinned/")] != []
    report = tq.export.check_parity(net, proto, x)
    assert report.passed(), report.failures()
    assert report.divergence is None, report.divergence


def test_a_simulation_the_exporter_cannot_take_is_named_in_the_error():
    class NoFloatGrid(tq.MinifloatQuantizer):  # its simulation uses frexp, which torch's exporter lacks
        def float_grid(self):
            return None

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    net = tq.quantize_model(net.eval(), lambda m, n: NoFloatGrid("fp8_e4m3"), _a8, method="swap", fold_bn=True)
    x = torch.randn(4, 2, 6, 6)
    tq.calibrate(net, [x], progress=False)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with (
        pytest.warns(UserWarning, match="has no affine grid"),
        pytest.raises(RuntimeError, match=r"float simulation \(0\.weight_quantizer\).*fold_bn=True"),
    ):
        tq.export.to_onnx(net, x[:1])


def test_a_computed_weight_chain_two_layers_share_is_kept_for_the_one_not_stored():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(4, 4, 1)
            self.b1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
            self.b2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), self.b1[1])
            self.b2[0].weight, self.b2[0].bias = self.b1[0].weight, self.b1[0].bias

        def forward(self, x):
            return self.b1(self.stem(x)) + self.b2(x)  # b1 reads a DequantizeLinear, b2 the graph input

    torch.manual_seed(0)
    net = Shared().eval()
    net.b1[1].running_var.uniform_(0.5, 2)
    net.b1[1].weight.data.uniform_(0.5, 2)
    net = tq.quantize_model(
        net, lambda m, n: _w8(m, n) if n == "stem" else tq.TernaryQuantizer(), _a8, method="swap", fold_bn=True
    )
    x = torch.randn(8, 4, 6, 6)
    tq.calibrate(net, [x], progress=False)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with pytest.warns(UserWarning, match="has no affine grid"):
        proto = tq.export.to_onnx(net, x[:1])  # the exporter computes the folded weight once, for both
    report = tq.export.check_parity(net, proto, x)
    assert report.passed(), report.failures()


def test_gridless_weights_read_through_a_transposed_view_are_stored_as_values():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D  # stores (in, out): its quantizer reads weight.t()

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Conv1D(16, 8), nn.ReLU(), nn.Linear(16, 4))
    net = tq.quantize_model(net.eval(), lambda m, n: tq.TernaryQuantizer(), _a8, method="swap")
    x = torch.randn(32, 8)
    tq.calibrate(net, [x], progress=False)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with pytest.warns(UserWarning, match="has no affine grid"):
        proto = tq.export.to_onnx(net, x[:1])
    assert len([n for n in proto.graph.node if n.name.endswith("/reshape")]) == 3
    report = tq.export.check_parity(net, proto, x)
    assert report.passed(), report.failures()


def test_a_layer_called_twice_exports_with_names_of_its_own_per_call():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    net = tq.quantize_model(Twice().eval(), _w8, _a8, method="swap")
    x = torch.randn(16, 8)
    tq.calibrate(net, [x], progress=False)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    proto = tq.export.to_onnx(net, x[:1])
    names = [n.name for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(names) == len(set(names)) == 2
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y = ort.InferenceSession(proto.SerializeToString(), so).run(None, {"input0": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(y, net(x).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_a_half_precision_model_exports_as_its_float32_twin(dtype):
    # onnxruntime computes Q/DQ graphs in float32: the model's float32 copy is exported.
    half = _calibrated(_w8, _a8).to(dtype)
    x = torch.randn(8, 3, 4, 4)
    with pytest.warns(UserWarning, match=f"{dtype}; the ONNX graph computes in float32"):
        proto = tq.export.to_onnx(half, x[:1].to(dtype))
    assert half[0].layer.weight.dtype == dtype  # the model is left as it was
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    params = tq.export.integer_params(half)
    stored = {t.name.split("/")[0]: numpy_helper.to_array(t) for t in proto.graph.initializer if "int_weight" in t.name}
    assert sorted(stored) == ["0.weight_quantizer", "4.weight_quantizer"]
    # Stored weights keep their codes; the convolution's BatchNorm is folded in float32, not in half precision.
    np.testing.assert_array_equal(stored["4.weight_quantizer"], params["4.weight_quantizer"]["int_weight"])
    folded = stored["0.weight_quantizer"].astype(np.int64) - params["0.weight_quantizer"]["int_weight"]
    assert np.abs(folded).max() <= 1 and (folded == 0).mean() > 0.95
    for name in ("0.acts_quantizer", "4.weight_quantizer"):  # the model's grids, half-precision values
        scale = next(t for t in proto.graph.initializer if t.name.startswith(name) and t.name.endswith("/scale"))
        expected = half.get_submodule(name).grid().scale.float().flatten()
        np.testing.assert_array_equal(numpy_helper.to_array(scale), expected)
    report = tq.export.check_parity(half, proto, x.to(dtype))  # against the float32 copy, as exported
    assert report.passed(), report.failures()
    assert all(a.max_steps == 0 for a in report.points.values())


def test_weights_of_a_learned_rounding_are_stored_as_rounded_by_it():
    # AdaRound (hard) rounds each weight up or down as learned: its codes, not the grid's nearest points
    from torchquant.quantizers import AdaRoundQuantizer

    net = _calibrated(lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=True), None)
    fc = net[4]
    ada = AdaRoundQuantizer(fc.weight_quantizer.grid(), fc.weight_to_quantize(), soft=False)
    with torch.no_grad():
        ada.alpha.copy_(torch.randn_like(ada.alpha))
    fc.weight_quantizer = ada
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    x = torch.randn(8, 3, 4, 4)
    proto = tq.export.to_onnx(net, x[:1])
    inits = {k.split("/")[-1]: numpy_helper.to_array(t) for k, t in _inits(proto).items() if k.startswith("4.weight")}
    codes = inits["int_weight"].astype(np.int64) - inits["zero_point"].astype(np.int64).reshape(-1, 1)
    with torch.no_grad():
        expected = torch.round(fc.quantized_weight() / ada.scale).to(torch.int64).numpy()
        nearest = torch.round(fc.weight_to_quantize() / ada.scale).to(torch.int64).numpy()
        y = net(x).numpy()
    np.testing.assert_array_equal(codes.reshape(expected.shape), expected)
    assert not np.array_equal(codes.reshape(expected.shape), nearest)
    np.testing.assert_allclose(_run(proto, x), y, rtol=0, atol=1e-5)
