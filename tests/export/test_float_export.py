"""Export of floating-point quantizers (FP8, FP6, FP4, OCP MX) to ONNX: float8 Q/DQ, codebooks, float rounding."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.quantizers import FORMATS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto  # noqa: E402

S = tq.QModuleState
FLOAT8 = {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2}


def _run(proto, x: torch.Tensor, optimize: bool = True) -> np.ndarray:
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s.run(None, {"input0": x.numpy()})[0]


def _assert_exact(net: nn.Module, proto, x: torch.Tensor) -> None:
    """onnxruntime, its graph optimizations on, gives exactly the simulation's output."""
    with torch.no_grad():
        np.testing.assert_array_equal(_run(proto, x), net(x).numpy())


def _export(net: nn.Module, x: torch.Tensor, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*opset version")
        return tq.export.to_onnx(net, x, **kw)


def _hard_values(fmt) -> torch.Tensor:
    """Every value of ``fmt``, the midpoints between them (ties), their float32 neighbours, beyond the range
    (infinities included: they saturate)."""
    v = fmt.values()
    mids = (v[1:] + v[:-1]) / 2
    up, down = torch.tensor(float("inf")), torch.tensor(-float("inf"))
    beyond = torch.tensor([1.01, 2.0, 1e3, 1e30, float("inf")]) * fmt.max_value
    x = torch.cat([v, mids, torch.nextafter(mids, up), torch.nextafter(mids, down), beyond, -beyond])
    return x.reshape(1, -1)


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("name", list(FORMATS))
def test_every_value_tie_and_saturation_rounds_as_the_simulation(name, opset):
    # opset 21 stores FP8 and MX's INT8 in their ONNX types (QuantizeLinear's own rounding); every other
    # format, and every format at opset 17, rounds in float operations (Log, Floor, Pow, Round)
    fmt = FORMATS[name]
    for scale in (1.0, 0.37):
        q = tq.MinifloatQuantizer(fmt, tq.RunningMinMax() if scale != 1.0 else None)
        net = nn.Sequential(tq.QOp(nn.Identity(), q)).eval()
        x = _hard_values(fmt) * scale
        if scale != 1.0:
            with tq.qmodule_state(net, S.CALIBRATION):
                net(torch.tensor([-fmt.max_value * scale, fmt.max_value * scale]))
        tq.set_qmodule_state(net, S.QUANT_EVAL)
        proto = _export(net, x, opset=opset, dynamic_batch=False)
        ops = {n.op_type for n in proto.graph.node}
        native = opset == 21 and name in ("fp8_e4m3", "fp8_e5m2", "int8")
        # Rounded in float operations, the values are then read through an exact Q/DQ of their integer
        # multiples of the format's unit where int8 (int16 at opset 21) holds them: a checkable point.
        k_max = round(fmt.max_value / fmt.unit)
        integer = not native and (k_max <= 127 or (opset == 21 and k_max < 2**15))
        assert ("QuantizeLinear" in ops) == (native or integer) and ("Round" in ops) == (not native)
        with torch.no_grad():
            expected = net(x).numpy()
        for optimize in (False, True):
            np.testing.assert_array_equal(_run(proto, x, optimize), expected)


def _mlp(weights, acts, d_in: int = 64) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d_in, 40), nn.ReLU(), nn.Linear(40, 8)).eval()
    net = tq.quantize_model(net, lambda m, n: weights(), lambda m, n: acts(), method="swap")
    with tq.qmodule_state(net, S.CALIBRATION):
        net(torch.randn(64, d_in))
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    return net


M, X = tq.MinifloatQuantizer, tq.MXQuantizer
MODELS = {
    "fp8-e4m3-scaled": (lambda: M("fp8_e4m3", tq.BatchMinMax(axis=0)), lambda: M("fp8_e4m3", tq.RunningMinMax()), 64),
    "fp8-e5m2-cast": (lambda: M("fp8_e5m2"), lambda: M("fp8_e5m2"), 64),
    "fp4-per-channel": (lambda: M("fp4_e2m1", tq.BatchMinMax(axis=0)), lambda: M("fp4_e2m1", tq.RunningMinMax()), 64),
    "mxfp8": (lambda: X("fp8_e4m3"), lambda: X("fp8_e4m3"), 64),
    "mxfp8-e5m2-partial-block": (lambda: X("fp8_e5m2"), lambda: X("fp8_e5m2"), 70),
    "mxint8": (lambda: X("int8"), lambda: X("int8"), 64),
    "mxfp4": (lambda: X("fp4_e2m1"), lambda: X("fp4_e2m1"), 64),
    "mxfp6-blocks-of-16": (lambda: X("fp6_e2m3", block_size=16), lambda: X("fp6_e2m3", block_size=16), 64),
}


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("name", list(MODELS))
def test_models_agree_exactly_in_the_onnx_semantics_and_onnxruntimes_optimized_run(name, opset):
    weights, acts, d_in = MODELS[name]
    net = _mlp(weights, acts, d_in)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # blocks that do not divide a weight's axis: stored as float values
        proto = _export(net, torch.randn(1, d_in), opset=opset)
    x = torch.randn(16, d_in) * 3  # another batch size: the MX scales are computed in the graph
    with torch.no_grad():
        expected = net(x).numpy()
    for optimize in (False, True):
        np.testing.assert_array_equal(_run(proto, x, optimize), expected)
    report = tq.export.check_parity(net, proto, x)
    assert report.passed(), str(report)
    assert report.divergence is None, report.divergence
    # Every point has a DequantizeLinear at opset 21; at 17, FP4's rounded values through an int8 one.
    checked = opset == 21 or name.startswith("fp4")
    assert sorted(report.points) == (["0.acts_quantizer", "2.acts_quantizer"] if checked else [])
    assert sorted(report.unchecked) == ([] if checked else ["0.acts_quantizer", "2.acts_quantizer"])


def test_fp8_weights_are_stored_as_float8_and_the_float_weights_dropped():
    net = _mlp(lambda: M("fp8_e4m3", tq.BatchMinMax(axis=0)), lambda: M("fp8_e4m3", tq.RunningMinMax()))
    proto = _export(net, torch.randn(1, 64), opset=19)
    types = {t.name: t.data_type for t in proto.graph.initializer}
    assert types["0.weight_quantizer/0/e4m3_weight"] == TensorProto.FLOAT8E4M3FN
    assert not any(n.endswith("layer.weight") for n in types)
    dq = next(n for n in proto.graph.node if n.name == "0.weight_quantizer/0/dq")
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0}  # per output channel
    # at opset 19 the activations round in float operations (a float8 QuantizeLinear needs opset 21 here)
    assert "QuantizeLinear" not in {n.op_type for n in proto.graph.node}


def test_mx_weights_are_blocked_float8_int8_or_codes_of_the_format():
    # FP4's values are integers times 0.5 (+-12 at most): int8 with half the block scale
    for elem, stored, prefix in (
        ("fp8_e5m2", TensorProto.FLOAT8E5M2, "e5m2"),
        ("int8", TensorProto.INT8, "e1m6"),
        ("fp4_e2m1", TensorProto.INT8, "e2m1"),
    ):
        net = _mlp(lambda e=elem: X(e), lambda: tq.AffineQuantizer(8, tq.RunningMinMax()))
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # the (8, 40) weight's last block of 8 is stored too
            warnings.filterwarnings("ignore", message=".*opset version")
            proto = tq.export.to_onnx(net, torch.randn(1, 64), opset=21)
        weight = next(t for t in proto.graph.initializer if t.name == f"0.weight_quantizer/0/{prefix}_weight")
        assert weight.data_type == stored and list(weight.dims) == [40, 64]
        if elem == "fp4_e2m1":
            assert np.abs(onnx.numpy_helper.to_array(weight)).max() <= 12
        scale = next(t for t in proto.graph.initializer if t.name == "0.weight_quantizer/0/scale")
        assert list(scale.dims) == [40, 2]  # one E8M0 scale per block of 32
        dq = next(n for n in proto.graph.node if n.name == "0.weight_quantizer/0/dq")
        assert {a.name: a.i for a in dq.attribute} == {"axis": 1, "block_size": 32}
        assert next(t for t in proto.graph.initializer if t.name == "2.weight_quantizer/2/scale").dims == [8, 2]
    # below opset 21 (no blocked DequantizeLinear): codes of the format's values and its codebook
    net = _mlp(lambda: X("fp4_e2m1"), lambda: tq.AffineQuantizer(8, tq.RunningMinMax()))
    with pytest.warns(UserWarning, match=r"'2\.weight_quantizer': blocks of 32 do not divide axis 1 of its weight"):
        proto = _export(net, torch.randn(1, 64), opset=17)
    codes = next(t for t in proto.graph.initializer if t.name == "0.weight_quantizer/0/codes")
    assert codes.data_type == TensorProto.UINT8 and list(codes.dims) == [40, 2, 32]
    book = next(t for t in proto.graph.initializer if t.name == "0.weight_quantizer/0/codebook")
    assert onnx.numpy_helper.to_array(book).tolist() == FORMATS["fp4_e2m1"].values().tolist()


def test_fp6_e3m2_weights_are_int16_at_opset_21():
    net = _mlp(lambda: M("fp6_e3m2", tq.BatchMinMax(axis=0)), lambda: M("fp8_e4m3", tq.RunningMinMax()))
    proto = _export(net, torch.randn(1, 64), opset=21)
    weight = next(t for t in proto.graph.initializer if t.name == "0.weight_quantizer/0/e3m2_weight")
    assert weight.data_type == TensorProto.INT16  # values: integers times 2 ** -4 up to 28, i.e. +-448
    x = torch.randn(16, 64)
    _assert_exact(net, proto, x)


def test_mx_activations_along_channels_with_zero_blocks_and_every_binade():
    # blocks along the channels of an NCHW tensor (axis 1, a transpose in the graph), an all-zero block
    # (scale 2 ** -127), block maxima at and next to every power of two (the exponent computed by Log),
    # subnormal ones included (MXINT8's scale is 2 ** -127 there, not the smallest normal's)
    for elem in ("fp8_e4m3", "fp4_e2m1", "int8"):
        q = X(elem, block_size=4, axis=1)
        net = nn.Sequential(tq.QOp(nn.Identity(), q)).eval()
        tq.set_qmodule_state(net, S.QUANT_EVAL)
        proto = _export(net, torch.randn(1, 10, 3, 3), opset=21)
        powers = torch.exp2(torch.arange(-140.0, 128.0))
        maxima = torch.cat([powers, torch.nextafter(powers, torch.tensor(0.0)), powers * 1.5])
        x = torch.randn(maxima.numel(), 10, 3, 3)
        x[:, :4] = x[:, :4] / x[:, :4].abs().amax(dim=1, keepdim=True) * maxima[:, None, None, None]
        x[:, 4:8] = 0.0
        with torch.no_grad():
            expected = net(x).numpy()
        np.testing.assert_array_equal(_run(proto, x), expected)


@pytest.mark.parametrize("elem", ["fp8_e4m3", "fp4_e2m1", "int8"])
def test_an_mx_activation_block_with_an_infinity_is_nan_as_in_the_simulation(elem):
    # OCP MX: an infinite block maximum gives the NaN scale (onnxruntime's ReduceMax may skip a NaN element,
    # so only infinities are compared)
    net = nn.Sequential(tq.QOp(nn.Identity(), X(elem, block_size=8))).eval()
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    proto = _export(net, torch.randn(1, 24), opset=21)
    x = torch.randn(4, 24)
    x[1, 3], x[2, 17] = float("inf"), -float("inf")
    with torch.no_grad():
        expected = net(x).numpy()
    assert np.isnan(expected).sum() == 16
    for optimize in (False, True):
        np.testing.assert_array_equal(_run(proto, x, optimize), expected)


def test_fp8_bias_keeps_its_float_value_in_onnxruntime():
    # onnxruntime rounds a Gemm's bias to int32 at s_x * s_w when both inputs are dequantized (for its integer
    # kernels): with float8 operands at scale 1 that rounded every bias to an integer
    net = _mlp(lambda: M("fp8_e5m2"), lambda: M("fp8_e5m2"))
    with torch.no_grad():
        net[0].layer.bias.copy_(torch.linspace(-0.7, 0.7, 40))
    proto = _export(net, torch.randn(1, 64), opset=21)
    assert [n.name for n in proto.graph.node if n.name.startswith("tq_pinned/") and n.name.endswith("bias/dq")]
    x = torch.randn(8, 64)
    _assert_exact(net, proto, x)


def test_fp8_after_a_relu_keeps_the_relu_in_onnxruntime():
    # onnxruntime drops a Relu before a QuantizeLinear whose zero point is 0 of a type other than (u)int8;
    # float8 activations are quantized with output_dtype and no zero point
    net = _mlp(lambda: M("fp8_e4m3", tq.BatchMinMax(axis=0)), lambda: M("fp8_e4m3", tq.RunningMinMax()))
    proto = _export(net, torch.randn(1, 64), opset=21)
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize and all(len(n.input) == 2 for n in quantize)
    x = torch.randn(32, 64) * 3
    _assert_exact(net, proto, x)


@pytest.mark.parametrize("weights", ["fp8_e4m3", "mxfp8_e4m3", "mxfp4"])
def test_weights_with_a_batchnorm_folded_in_are_stored_in_the_format(weights):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    for bn in (net[1], net[4]):
        bn.running_var.uniform_(0.5, 2)
        bn.running_mean.uniform_(-1, 1)
    make = {
        "fp8_e4m3": lambda m, n: M("fp8_e4m3", tq.BatchMinMax(axis=0)),
        "mxfp8_e4m3": lambda m, n: X("fp8_e4m3", block_size=4, axis=1),
        "mxfp4": lambda m, n: X("fp4_e2m1", block_size=4, axis=1),
    }[weights]
    net = tq.quantize_model(
        net.eval(), make, lambda m, n: M("fp8_e4m3", tq.RunningMinMax()), method="swap", fold_bn=True
    )
    x = torch.randn(8, 4, 10, 10)
    tq.calibrate(net, [x], progress=False)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    proto = _export(net, x[:1], opset=21)
    stored = {t.data_type for t in proto.graph.initializer if "weight_quantizer" in t.name}
    assert (TensorProto.FLOAT8E4M3FN if weights != "mxfp4" else TensorProto.INT8) in stored
    # the folded bias of the conv reading a float8 activation is read through a DequantizeLinear of its own
    pinned = [n.name for n in proto.graph.node if n.name.startswith("tq_pinned/") and n.name.endswith("bias/dq")]
    assert pinned == ["tq_pinned//3/Conv/bias/dq"]
    _assert_exact(net, proto, x)
    report = tq.export.check_parity(net, proto, x)
    assert report.passed(), str(report)


@pytest.mark.parametrize("opset", [17, 21])
def test_mx_weights_read_through_a_transposed_view(opset):
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D  # stores (in, out): its quantizer reads weight.t()

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), Conv1D(64, 32), nn.ReLU(), nn.Linear(64, 4)).eval()
    net = tq.quantize_model(net, lambda m, n: X("fp8_e4m3"), lambda m, n: M("fp8_e5m2"), method="swap")
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    proto = _export(net, torch.randn(1, 64), opset=opset)
    stored = {t.name: t for t in proto.graph.initializer}
    if opset == 21:
        assert stored["2.weight_quantizer/2/e4m3_weight"].dims == [64, 32]  # the (out, in) view, blocked along in
    x = torch.randn(16, 64)
    _assert_exact(net, proto, x)


def test_float_grid_that_does_not_fit_its_tensor_is_named():
    class Shaped(tq.MinifloatQuantizer):
        def float_grid(self):
            return tq.FloatGrid(self.fmt, torch.ones(3, 1), tq.per_channel(0))

    net = tq.quantize_model(
        nn.Sequential(nn.Linear(8, 4)), lambda m, n: Shaped("fp8_e4m3"), lambda m, n: None, method="swap"
    )
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with pytest.raises(ValueError, match=r"'0\.weight_quantizer' \(Shaped\).*float_grid\(\)"):
        _export(net, torch.randn(1, 8), opset=21)


def test_check_parity_explains_an_mx_block_whose_maximum_rounds_across_a_power_of_two():
    # onnxruntime computes the input one float32 step larger (as its Sigmoid or a summation order may):
    # a block maximum one step below 0.25 becomes 0.25, and the block takes twice the scale
    net = nn.Sequential(tq.QOp(nn.Identity(), X("fp8_e4m3", block_size=4))).eval()
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    below = float(np.nextafter(np.float32(0.25), np.float32(0)))
    x = torch.tensor([[below, 0.1001, -0.0513, 0.0071, 0.2, 0.11, -0.07, 0.003]])
    proto = _export(net, x, opset=21, dynamic_batch=False)
    graph = proto.graph
    graph.node.insert(0, onnx.helper.make_node("Mul", ["input0", "one_step_up"], ["input0_up"]))
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(1 + 2**-23, np.float32), "one_step_up"))
    for node in graph.node[1:]:
        node.input[:] = ["input0_up" if i == "input0" else i for i in node.input]
    assert float(np.float32(below) * np.float32(1 + 2**-23)) == 0.25  # the premise: across 2 ** -2
    report = tq.export.check_parity(net, proto, x)
    a = report.points["0.acts_quantizer"]
    # a format's values are the same in every binade: of the block, only the maximum changes (it saturated
    # at 448 x 2 ** -11 in the simulation, 2 steps below 0.25)
    assert a.identical == 0.875 and a.ties == 1
    assert a.max_steps == 0 and report.passed(), str(report)
    assert report.ties_adopted == 1 and report.divergence is None


def test_fp8_activations_keep_the_bias_of_a_layer_with_integer_weights():
    # onnxruntime rounds the bias to int32 at s_x * s_w when both operands are dequantized, whatever their types
    fp4, int8 = (lambda: M("fp4_e2m1", tq.BatchMinMax(axis=0))), (lambda: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)))
    for weights in (fp4, int8):
        net = _mlp(weights, lambda: M("fp8_e4m3", tq.RunningMinMax()))
        with torch.no_grad():
            net[0].layer.bias.copy_(torch.linspace(-0.7, 0.7, 40))
        proto = _export(net, torch.randn(1, 64), opset=21)
        x = torch.randn(32, 64) * 3
        _assert_exact(net, proto, x)


@pytest.mark.parametrize("acts", ["fp4_e2m1", "mxfp4", "fp8_e4m3"])
def test_fp4_weights_of_a_matmul_whose_input_is_a_float_format_activation(acts):
    # onnxruntime turns DequantizeLinear(int8) -> MatMul into MatMulNBits, which quantizes its other input to
    # int8 on the fly; such weights are stored as their values
    torch.manual_seed(0)
    make = {
        "fp4_e2m1": lambda: M("fp4_e2m1", tq.RunningMinMax()),
        "mxfp4": lambda: X("fp4_e2m1"),
        "fp8_e4m3": lambda: M("fp8_e4m3", tq.RunningMinMax()),
    }[acts]
    net = nn.Sequential(tq.QOp(nn.Identity(), make()), nn.Linear(64, 32)).eval()
    net[1] = tq.QWrapper(net[1], M("fp4_e2m1", tq.BatchMinMax(axis=0)), make())
    x = torch.randn(4, 6, 64)  # a Linear on a 3-d input: a MatMul
    with tq.qmodule_state(net, S.CALIBRATION):
        net(x)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    proto = _export(net, x[:1], opset=21)
    _assert_exact(net, proto, x)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp6_e2m3"])
def test_signed_codes_of_a_narrow_format_moved_by_a_flatten_keep_their_sign(fmt):
    # the codes feeding the product again after the Flatten are requantized in their own type, int8:
    # without a zero point a QuantizeLinear makes uint8, and every negative activation read 0
    torch.manual_seed(0)
    net = nn.Sequential(tq.QOp(nn.Identity(), M(fmt, tq.RunningMinMax())), nn.Flatten(), nn.Linear(16, 4)).eval()
    net[2] = tq.QWrapper(net[2], M(fmt, tq.BatchMinMax(axis=0)), None)
    with tq.qmodule_state(net, S.CALIBRATION):
        net(torch.randn(64, 4, 4))
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    x = torch.randn(8, 4, 4)
    proto = _export(net, x[:1], opset=21)
    requantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and "requantize" in n.name]
    assert [a.i for n in requantize for a in n.attribute if a.name == "output_dtype"] == [TensorProto.INT8]
    with torch.no_grad():
        y = net(x).numpy()
    for optimize in (False, True):  # the same products, summed in another order (a negative code read 0: 0.85)
        np.testing.assert_allclose(_run(proto, x, optimize), y, rtol=0, atol=1e-6 * np.abs(y).max())


def test_an_mx_quantizer_called_on_tensors_of_two_ranks():
    class TwoRanks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = tq.QOp(nn.Identity(), X("fp8_e4m3", block_size=8))

        def forward(self, x):
            return self.q(x).sum(1) + self.q(x[:, 0])  # (N, T, C), then (N, C)

    net = TwoRanks().eval()
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    x = torch.randn(3, 5, 20)
    for opset in (17, 21):
        proto = _export(net, x, opset=opset)
        _assert_exact(net, proto, x)
