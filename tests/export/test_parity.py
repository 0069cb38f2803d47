"""check_parity: the report, its criteria, detection of a wrong export, and bad input."""

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


def _w8(m, n):
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)


def _a8(m, n):
    return tq.AffineQuantizer(8, tq.RunningMinMax())


class Net(nn.Module):
    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.mid = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 16, 5)
        self.twice = twice

    def forward(self, x):
        x = self.relu(self.conv(x))
        x = self.mid(x)
        if self.twice:
            x = self.mid(x)
        return self.fc(x.flatten(1))


def _calibrated(twice: bool = False, skip=()) -> nn.Module:
    torch.manual_seed(0)
    net = tq.quantize_model(Net(twice).eval(), _w8, _a8, method="swap", skip=skip)
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(torch.randn(64, 3, 4, 4))
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    return net


def test_a_faithful_export_passes_with_every_point_reported():
    net = _calibrated()
    proto = tq.export.to_onnx(net, torch.randn(1, 3, 4, 4))
    report = tq.export.check_parity(net, proto, torch.randn(16, 3, 4, 4))
    assert sorted(report.points) == ["conv.acts_quantizer", "fc.acts_quantizer", "mid.acts_quantizer"]
    for a in report.points.values():
        assert a.max_steps <= 1 and a.identical >= 0.99
    (out,) = report.outputs
    assert report.outputs[out].max_steps <= 1 and report.outputs[out].size == 16 * 5
    assert report.passed() and report.failures() == []
    text = str(report)
    assert "parity: passed" in text and "mid.acts_quantizer" in text
    assert {r["kind"] for r in report.rows} == {"point", "output", "output, no ties adopted"}
    # The optimized run read at every point, in execution order, with nothing departing.
    assert list(report.optimized) == ["conv.acts_quantizer", "mid.acts_quantizer", "fc.acts_quantizer"]
    assert all(a.max_steps == 0 for a in report.optimized.values())
    assert report.divergence is None and "first differs" not in text


def test_reads_the_file_from_a_path(tmp_path):
    net = _calibrated()
    path = tmp_path / "net.onnx"
    tq.export.to_onnx(net, torch.randn(1, 3, 4, 4), path)
    assert tq.export.check_parity(net, path, torch.randn(4, 3, 4, 4)).passed()


def test_a_wrong_weight_is_found_at_its_own_point():
    net = _calibrated()
    proto = tq.export.to_onnx(net, torch.randn(1, 3, 4, 4), signed_weights=True)
    # Corrupt the integer weights of the middle layer: two codes off everywhere.
    (init,) = [t for t in proto.graph.initializer if t.name == "mid.weight_quantizer/2/int_weight"]
    w = numpy_helper.to_array(init).astype(np.int16)
    init.CopyFrom(numpy_helper.from_array(np.clip(w + 2, -128, 127).astype(np.int8), init.name))
    report = tq.export.check_parity(net, proto, torch.randn(16, 3, 4, 4))
    # Teacher-forced: the point before it agrees, its own point does not.
    assert report.points["conv.acts_quantizer"].max_steps <= 1
    assert report.points["mid.acts_quantizer"].max_steps > 1
    assert report.points["fc.acts_quantizer"].max_steps <= 1  # it reads the simulation's value
    assert not report.passed()
    assert any(f.startswith("point mid.acts_quantizer") for f in report.failures())
    assert "parity: FAILED" in str(report)


def test_a_float_output_is_compared_by_its_absolute_difference():
    net = _calibrated(skip=["fc"])  # the classifier stays float
    proto = tq.export.to_onnx(net, torch.randn(1, 3, 4, 4))
    report = tq.export.check_parity(net, proto, torch.randn(16, 3, 4, 4))
    (out,) = report.outputs
    a = report.outputs[out]
    assert a.max_steps is None and a.identical is None
    assert a.max_abs < 1e-4 * report.output_scale[out]
    assert report.passed()
    assert not report.passed(rel_tol=0.0) or a.max_abs == 0.0


def test_a_layer_called_twice_gives_one_point_per_call():
    # Shared weights across depth (ALBERT, a recurrent cell): each call is a point of its own, in call order.
    net = _calibrated(twice=True)
    proto = tq.export.to_onnx(net, torch.randn(1, 3, 4, 4))
    report = tq.export.check_parity(net, proto, torch.randn(16, 3, 4, 4))
    assert sorted(report.points) == ["conv.acts_quantizer", "fc.acts_quantizer", "mid.acts_quantizer",
                                     "mid.acts_quantizer#1"]  # fmt: skip
    assert report.passed(), report.failures()
    # The calls are told apart: the second call's codes are compared with the second call's simulation.
    seen = []
    handle = net.mid.acts_quantizer.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        net(torch.randn(16, 3, 4, 4))
    handle.remove()
    assert not torch.equal(seen[0], seen[1])
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    # The second call's scale eight times larger: only that point departs.
    scale = next(t for t in broken.graph.initializer if t.name == "mid.acts_quantizer/3.1/scale")
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 8, scale.name))
    bad = tq.export.check_parity(net, broken, torch.randn(16, 3, 4, 4))
    assert bad.points["mid.acts_quantizer"].max_steps == 0
    assert bad.points["mid.acts_quantizer#1"].max_steps > 1


def test_bad_input_gets_clear_errors():
    net = _calibrated()
    x = torch.randn(2, 3, 4, 4)
    proto = tq.export.to_onnx(net, x)
    with pytest.raises(ValueError, match="1 inputs"):
        tq.export.check_parity(net, proto, (x, x))
    with pytest.raises(ValueError, match="tie_steps"):
        tq.export.check_parity(net, proto, x, tie_steps=0.5)
    tq.set_qmodule_state(net, S.CALIBRATION)
    with pytest.raises(ValueError, match="CALIBRATION"):
        tq.export.check_parity(net, proto, x)
    # A model calling a quantizer more often than the file has points for it.
    twice = _calibrated(twice=True)
    with pytest.raises(ValueError, match=r"more often.*'mid\.acts_quantizer#1'"):
        tq.export.check_parity(twice, proto, x)
    # An export of another model.
    other = tq.quantize_model(nn.Sequential(nn.Linear(48, 5)).eval(), _w8, _a8, method="swap")
    with torch.no_grad(), tq.qmodule_state(other, S.CALIBRATION):
        other(torch.randn(8, 48))
    tq.set_qmodule_state(other, S.QUANT_EVAL)
    with pytest.raises(ValueError, match="quantization point"):
        tq.export.check_parity(other, proto, x)


def test_tie_window_of_a_layer_with_a_float_bias_is_half_its_int32_bias_step():
    # onnxruntime adds the bias as int32 at scale s_x * s_w: up to 0.5 * s_x * s_w / s_y output steps.
    from torchquant.export.parity import _bias_windows

    net = _calibrated()
    proto = tq.export.to_onnx(net, torch.randn(1, 3, 4, 4))
    windows = _bias_windows(proto)
    # The first conv reads the float model input (no DequantizeLinear): no window; the others have one.
    assert sorted(windows) == ["fc.acts_quantizer", "mid.acts_quantizer"]
    sx = float(net.conv.acts_quantizer.grid().scale)
    sw = float(net.mid.weight_quantizer.grid().scale.max())
    sy = float(net.mid.acts_quantizer.grid().scale)
    assert windows["mid.acts_quantizer"] == pytest.approx(0.5 * sx * sw / sy, rel=1e-6)


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(4 + 3, 2)

    def forward(self, x, extra):
        y = self.a(x)  # a graph output, and read by b
        return y, self.b(torch.cat([y, extra], 1))


def _two_in_two_out():
    torch.manual_seed(0)
    net = tq.quantize_model(TwoInTwoOut().eval(), _w8, _a8, method="swap")
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(torch.randn(64, 6), torch.randn(64, 3))
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    return net


def test_several_inputs_and_outputs_and_a_point_that_is_also_an_output():
    net = _two_in_two_out()
    x = (torch.randn(32, 6), torch.randn(32, 3))
    proto = tq.export.to_onnx(net, x, signed_weights=True)
    report = tq.export.check_parity(net, proto, x)
    assert sorted(report.points) == ["a.acts_quantizer", "b.acts_quantizer"]
    assert sorted(report.outputs) == ["output0", "output1"]
    assert report.passed(), report.failures()
    # A wrong weight in a: its point fails, b still reads the simulation's value of a's output.
    (init,) = [t for t in proto.graph.initializer if t.name.startswith("a.weight_quantizer/") and "int_w" in t.name]
    w = numpy_helper.to_array(init).astype(np.int16)
    init.CopyFrom(numpy_helper.from_array(np.clip(w + 3, -128, 127).astype(np.int8), init.name))
    report = tq.export.check_parity(net, proto, x)
    assert report.points["a.acts_quantizer"].max_steps > 1
    assert report.points["b.acts_quantizer"].max_steps <= 1
    assert report.outputs["output0"].max_steps > 1


def test_float_simulated_points_are_listed_as_unchecked():
    torch.manual_seed(0)
    net = tq.quantize_model(
        nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).eval(),
        _w8,
        lambda m, n: tq.baselines.BinaryQuantizer() if n == "0" else _a8(m, n),
        method="swap",
    )
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(torch.randn(64, 6))
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with pytest.warns(UserWarning, match="float-valued simulation"):
        proto = tq.export.to_onnx(net, torch.randn(1, 6))
    report = tq.export.check_parity(net, proto, torch.randn(16, 6))
    assert report.unchecked == ["0.acts_quantizer"]
    assert sorted(report.points) == ["2.acts_quantizer"]
    assert "not checked" in str(report)


def test_the_model_runs_in_eval_mode_and_keeps_its_training_flags():
    net = _calibrated()
    proto = tq.export.to_onnx(net, torch.randn(1, 3, 4, 4))
    net.train()
    report = tq.export.check_parity(net, proto, torch.randn(8, 3, 4, 4))
    assert report.passed()
    assert all(m.training for m in net.modules())


class Attention(nn.Module):
    """A linear layer on the float model input (3-D, so a MatMul, not a Gemm), then a softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.softmax(self.fc(x), dim=-1))


def _converted(build, acts, shape, gain: float = 1.0, method: str = "fx"):
    """``build()`` converted (8-bit per-channel weights, ``acts``), calibrated on ``x``: ``(model, x)``."""
    torch.manual_seed(0)
    net = tq.quantize_model(build().eval(), _w8, acts, method=method)
    x = gain * torch.randn(*shape)
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(x)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    return net, x


def _attention(quantize_softmax: bool):
    acts = _a8 if quantize_softmax else (lambda m, n: None if n == "softmax" else _a8(m, n))
    net, x = _converted(Attention, acts, (4, 32, 16), gain=3)
    return net, tq.export.to_onnx(net, x[:1]), x


def _float32_matmul_nbits():
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return so


def test_the_first_point_where_onnxruntimes_kernels_depart_is_named_with_the_kernel():
    net, proto, x = _attention(quantize_softmax=True)
    # Every point agrees in the ONNX semantics; onnxruntime's optimized kernels do not.
    report = tq.export.check_parity(net, proto, x)
    assert all(a.max_steps <= 1 and a.identical >= 0.999 for a in report.points.values())
    assert not report.passed()
    # The weight's DequantizeLinear -> MatMul on a float input becomes MatMulNBits, which
    # quantizes that input to int8 on the fly.
    d = report.divergence
    assert (d.point, d.kernel) == ("fc.acts_quantizer", "MatMulNBits (accuracy_level 4)")
    assert d.agreement == report.optimized["fc.acts_quantizer"] and d.agreement.identical < 0.95
    assert "session.qdq_matmulnbits_accuracy_level=1" in str(report)
    # With that input kept in float32, the next kernel to depart is QLinearSoftmax (a table of exp).
    so = _float32_matmul_nbits()
    report = tq.export.check_parity(net, proto, x, session_options=so)
    assert report.optimized["fc.acts_quantizer"].max_steps == 0
    assert (report.divergence.point, report.divergence.kernel) == ("softmax.acts_quantizer", "QLinearSoftmax")
    assert "fixed-point table" in str(report) and not report.passed()
    fresh = ort.SessionOptions()  # the caller's options, restored
    assert so.optimized_model_filepath == fresh.optimized_model_filepath
    assert so.log_severity_level == fresh.log_severity_level
    # Without the fused integer kernels, the file agrees.
    off = ["ClipQuantRewrite", "QDQSelectorActionTransformer"]
    report = tq.export.check_parity(net, proto, x, disabled_optimizers=off)
    assert report.passed() and report.divergence is None


def test_a_grid_narrower_than_its_onnx_type_is_looked_through_to_the_kernel():
    # 7-bit activations at opset 17 are stored as uint8 codes with a Clip after the QuantizeLinear.
    net, x = _converted(Attention, lambda m, n: tq.AffineQuantizer(7, tq.RunningMinMax()), (4, 32, 16), gain=3)
    report = tq.export.check_parity(net, tq.export.to_onnx(net, x[:1]), x)
    d = report.divergence
    assert (d.point, d.kernel) == ("fc.acts_quantizer", "MatMulNBits (accuracy_level 4)")


def test_a_weight_only_model_whose_output_departs_names_the_output_and_its_kernel(tmp_path):
    def build():
        return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))

    net, x = _converted(build, None, (4, 32, 16), gain=3, method="swap")
    proto = tq.export.to_onnx(net, x[:1])
    report = tq.export.check_parity(net, proto, x)
    assert report.points == {} and report.optimized == {} and not report.passed()
    d = report.divergence
    assert (d.point, d.output, d.kernel) == (None, "output0", "MatMulNBits (accuracy_level 4)")
    assert d.agreement == report.outputs["output0"]
    assert "at output 'output0'" in str(report) and "accuracy_level=1" in str(report)
    # The caller's own optimized_model_filepath gets the exported file's graph, not the instrumented one.
    so = _float32_matmul_nbits()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    report = tq.export.check_parity(net, proto, x, session_options=so)
    assert report.passed() and report.divergence is None
    assert so.optimized_model_filepath == str(tmp_path / "optimized.onnx")
    assert [o.name for o in onnx.load(so.optimized_model_filepath).graph.output] == ["output0"]


def test_an_output_of_a_float_simulation_names_the_fused_kernel_it_reads_from():
    # Dynamic per-token activations are float operations in the graph; the kernel that departs is above them.
    def build():
        return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))

    net, x = _converted(build, lambda m, n: tq.DynamicAffineQuantizer(8, per_token=True), (4, 32, 16), method="swap")
    proto = tq.export.to_onnx(net, x[:1])
    report = tq.export.check_parity(net, proto, x)
    d = report.divergence
    assert (d.point, d.output, d.kernel) == (None, "output0", "MatMulNBits (accuracy_level 4)")
    report = tq.export.check_parity(net, proto, x, session_options=_float32_matmul_nbits())
    assert report.passed() and report.divergence is None


def test_an_unquantized_softmax_and_float32_matmul_nbits_deploy_without_the_difference():
    net, proto, x = _attention(quantize_softmax=False)
    report = tq.export.check_parity(net, proto, x, session_options=_float32_matmul_nbits())
    assert report.passed() and report.divergence is None
    assert list(report.optimized) == ["fc.acts_quantizer", "out.acts_quantizer"]


def test_the_kernel_is_found_through_data_movement_a_bias_add_and_an_unfused_quantize():
    from onnx import TensorProto, helper

    from torchquant.export.parity import _kernel_of

    bias = numpy_helper.from_array(np.zeros(4, np.float32), "bias")
    nodes = [
        helper.make_node("QLinearSoftmax", ["a"], ["soft_q"], domain="com.microsoft"),
        helper.make_node("Transpose", ["soft_q"], ["moved"]),  # onnxruntime moved the codes across it
        helper.make_node("MatMulNBits", ["x"], ["mm"], domain="com.microsoft", accuracy_level=4),
        helper.make_node("Add", ["bias", "mm"], ["biased"]),  # the bias first, as torch exports a linear layer
        helper.make_node("QuantizeLinear", ["biased"], ["codes"]),
        helper.make_node("Relu", ["x"], ["r"]),
    ]
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("moved", "codes", "r")]
    graph = helper.make_graph(nodes, "g", [], out, [bias])
    assert _kernel_of(graph, "moved") == "QLinearSoftmax"
    assert _kernel_of(graph, "codes") == "MatMulNBits (accuracy_level 4)"
    assert _kernel_of(graph, "r") == "Relu"
    assert _kernel_of(graph, "absent") is None


class Windowed(nn.Module):
    """A quantized activation reaching a linear layer through a roll, zero padding and a window partition."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)  # quantized: fc1 reads a dequantized tensor
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        y = torch.roll(self.fc1(self.norm(x)), 1, dims=1)  # (B, 8, 16): slices and a concatenation
        y = nn.functional.pad(y, (0, 0, 0, 2))  # (B, 10, 16)
        return self.fc2(y.reshape(-1, 5, 2, 16).transpose(1, 2))


def test_a_point_moved_to_a_product_is_requantized_there_and_runs_as_integers(monkeypatch):
    from torchquant.export import onnx_qdq

    net, x = _converted(Windowed, _a8, (4, 8, 16))
    proto = tq.export.to_onnx(net, x[:1])
    pairs = [n for n in proto.graph.node if n.name.startswith(onnx_qdq.REQUANTIZE + "/")]
    assert [n.op_type for n in pairs] == ["QuantizeLinear", "DequantizeLinear"]
    assert [i.split("/")[0] for i in pairs[0].input[1:]] == ["fc1.acts_quantizer"] * 2  # its scale and zero point
    (matmul,) = [n for n in proto.graph.node if n.op_type == "MatMul" and n.name.startswith("/fc2/")]
    assert matmul.input[0] == pairs[1].output[0]
    report = tq.export.check_parity(net, proto, x)
    assert report.passed() and report.divergence is None, report
    assert len(report.points) == 3 and "fc1.acts_quantizer" in report.points  # the pair is no point
    # Without it, onnxruntime quantizes the moved float tensor again, per block, in MatMulNBits.
    monkeypatch.setattr(onnx_qdq, "_requantize_moved_inputs", lambda graph: None)
    report = tq.export.check_parity(net, tq.export.to_onnx(net, x[:1]), x)
    assert report.divergence.kernel == "MatMulNBits (accuracy_level 4)" and not report.passed()


class ProductOfActivations(nn.Module):
    """A per-tensor activation moved by a roll times a per-channel one read directly."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fa = nn.Linear(16, 16)
        self.fb = nn.Linear(16, 16)

    def forward(self, x):
        x = self.norm(x)
        return torch.roll(self.fa(x), 1, 1).transpose(1, 2) @ self.fb(x)


def test_no_requantization_where_onnxruntime_takes_no_integer_product():
    # onnxruntime's integer products refuse a per-channel activation: the rolled side stays float.
    def acts(m, n):
        return None if n == "matmul" else tq.AffineQuantizer(8, tq.RunningMinMax(axis=-1 if n == "fb" else None))

    net, x = _converted(ProductOfActivations, acts, (4, 8, 16))
    proto = tq.export.to_onnx(net, x[:1])
    from torchquant.export.onnx_qdq import REQUANTIZE

    assert not any(n.name.startswith(REQUANTIZE + "/") for n in proto.graph.node)
    assert tq.export.check_parity(net, proto, x).passed()  # runs in onnxruntime, in parity
