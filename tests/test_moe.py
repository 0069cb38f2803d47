"""QExperts: mixture-of-experts banks (transformers 5's layout) with quantized weights and inputs."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchquant as tq
from torchquant.moe import QExperts, expert_banks

S = tq.QModuleState


class Experts(nn.Module):
    """An expert bank as transformers 5 stores one: ``(E, out, in)`` banks, or ``(E, in, out)`` transposed;
    each token goes to the experts in ``index`` ``(T, k)`` with the weights ``scores`` ``(T, k)``."""

    def __init__(
        self, n: int = 3, d: int = 8, h: int = 12, *, transposed: bool = False, gate: bool = True, flag: bool = True
    ) -> None:
        super().__init__()
        if flag:  # transformers' experts say is_transposed; Llama 4's store (E, in, out) without saying so
            self.is_transposed = transposed
        self.transposed = transposed
        first = "gate_up_proj" if gate else "up_proj"
        shape1, shape2 = (
            ((n, d, 2 * h if gate else h), (n, h, d)) if transposed else ((n, 2 * h if gate else h, d), (n, d, h))
        )
        setattr(self, first, nn.Parameter(torch.randn(shape1) / d**0.5))
        self.down_proj = nn.Parameter(torch.randn(shape2) / h**0.5)
        self.first = first

    def _w(self, name: str, e: int) -> torch.Tensor:
        w = getattr(self, name)[e]
        return w.T if self.transposed else w  # (out, in)

    def forward(self, x, index, scores):
        out = torch.zeros_like(x)
        for e in range(self.down_proj.shape[0]):
            rows, slot = torch.where(index == e)
            if rows.numel() == 0:
                continue
            hidden = F.linear(x[rows], self._w(self.first, e))
            if self.first == "gate_up_proj":
                gate, up = hidden.chunk(2, dim=-1)
                hidden = F.silu(gate) * up
            out.index_add_(0, rows, F.linear(hidden, self._w("down_proj", e)) * scores[rows, slot, None])
        return out


def _routing(t: int = 10, n: int = 3, k: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, 8, generator=g)
    index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(t)])
    return x, index, torch.rand(t, k, generator=g).softmax(-1)


def w4():
    return tq.AffineQuantizer(4, tq.BatchMinMax(axis=1, group_size=4), symmetric=True)


def w8_per_channel():
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)


def test_expert_banks_are_found_by_their_parameters():
    assert expert_banks(Experts()) == ["gate_up_proj", "down_proj"]
    assert expert_banks(Experts(gate=False)) == ["up_proj", "down_proj"]
    assert expert_banks(nn.Linear(4, 4)) == []
    m = Experts()
    m.down_proj = nn.Parameter(torch.randn(2, 8, 12))  # another number of experts
    assert expert_banks(m) == []
    m = nn.Module()
    m.gate_up_proj = nn.Parameter(torch.randn(3, 4, 4))  # no down_proj
    assert expert_banks(m) == []
    m = Experts(gate=False)
    m.gate_proj = nn.Parameter(torch.randn(3, 12, 8))  # a third bank: a layout QExperts does not know
    assert expert_banks(m) == []
    assert "gate_proj (3, 12, 8)" in tq.convert.unconverted_weights(nn.Sequential(m))["0"]
    m = Experts(transposed=True)
    m.gate_up_proj_bias = nn.Parameter(torch.zeros(3, 24))  # biases are fine (GPT-OSS)
    assert expert_banks(m) == ["gate_up_proj", "down_proj"]


@pytest.mark.parametrize(
    ("transposed", "flag"), [(False, True), (True, True), (True, False)], ids=["out-in", "in-out", "in-out-unflagged"]
)
@pytest.mark.parametrize("make", [w4, w8_per_channel], ids=["w4-per-group", "w8-per-channel"])
def test_each_expert_is_quantized_as_a_linear_weight(transposed, flag, make):
    torch.manual_seed(0)
    layer = Experts(transposed=transposed, flag=flag)
    q = QExperts(copy.deepcopy(layer), {"gate_up_proj": make(), "down_proj": make()})
    x, index, scores = _routing()
    assert torch.equal(q(x, index, scores), layer(x, index, scores))  # BYPASSED: the module itself
    q.observe_weight()
    q.qstate = S.QUANT_EVAL_WEIGHT_ONLY
    # the reference: every expert's (out, in) matrix through its own quantizer, as a Linear's weight would be
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            for e in range(3):
                w = ref._w(name, e)
                one = make()
                one.pre_observe(w)
                w.copy_(one(w))
    y = q(x, index, scores)
    assert torch.equal(y, ref(x, index, scores))
    assert not torch.equal(y, layer(x, index, scores))
    banks = q.quantized_banks()
    assert torch.equal(banks["down_proj"], ref.down_proj)
    assert q.gate_up_quantizer.range_observer.min_val.shape[0] == 3 * 24  # E * out rows, in both layouts


def test_modes_observe_and_train():
    torch.manual_seed(0)
    layer = Experts()
    q = QExperts(layer, {"gate_up_proj": w4(), "down_proj": w4()}, tq.AffineQuantizer(8, tq.RunningMinMax()))
    x, index, scores = _routing()
    q.qstate = S.CALIBRATION
    with torch.no_grad():
        assert torch.equal(q(x, index, scores), layer(x, index, scores))  # observes, computes in float
    assert q.input_quantizer.range_observer.initialized and q.down_quantizer.range_observer.initialized
    q.qstate = S.QUANT_AWARE_TRAIN
    xg = x.clone().requires_grad_()
    q(xg, index, scores).square().sum().backward()
    assert layer.gate_up_proj.grad is not None and layer.gate_up_proj.grad.abs().sum() > 0
    assert layer.down_proj.grad.abs().sum() > 0 and xg.grad.abs().sum() > 0
    q.qstate = S.QUANT_EVAL
    with torch.no_grad():
        y = q(x, index, scores)
        fresh = QExperts(
            Experts(), {"gate_up_proj": w4(), "down_proj": w4()}, tq.AffineQuantizer(8, tq.RunningMinMax())
        )
        fresh.load_state_dict(q.state_dict())
        assert fresh.qstate is S.QUANT_EVAL and torch.equal(fresh(x, index, scores), y)


def test_bad_arguments_name_the_module():
    with pytest.raises(TypeError, match="QExperts: Linear is not an expert bank"):
        QExperts(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"has no bank \['up_proj'\]"):
        QExperts(Experts(), {"up_proj": w4()})
    with pytest.raises(TypeError, match="Quantizer instances or None, got BatchMinMax"):
        QExperts(Experts(), {"down_proj": tq.BatchMinMax()})


class _Moe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.router = nn.Linear(8, 3, bias=False)
        self.experts = Experts()

    def forward(self, x):
        x = self.proj(x)
        scores, index = self.router(x).softmax(-1).topk(2, dim=-1)
        return self.experts(x, index, scores)


def test_quantize_model_swap_replaces_the_bank_and_a_state_dict_reloads():
    torch.manual_seed(0)
    net = _Moe()
    x = torch.randn(10, 8)
    ref = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.FloatLayersWarning)
        q = tq.quantize_model(copy.deepcopy(net), lambda m, n: w4(), None, method="swap")
    assert isinstance(q.experts, QExperts) and q.experts.gate_up_quantizer._tq_name == "QExperts.gate_up_quantizer"
    rows = {r["name"]: r for r in tq.summary_rows(q)}
    assert rows["experts"]["kind"] == "QExperts" and rows["experts"]["weight_bits"] == 4
    assert "gate_up: per-group(axis=1, size=4)" in rows["experts"]["weight_granularity"]
    assert torch.equal(q(x), ref)  # BYPASSED
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    y = q(x)
    err = (y - ref).pow(2).mean() / ref.pow(2).mean()
    assert 0 < err < 0.05
    fresh = tq.quantize_model(copy.deepcopy(net), lambda m, n: w4(), None, method="swap")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), y)


def test_save_and_load_rebuild_the_bank_quantizers(tmp_path):
    torch.manual_seed(0)
    net = _Moe()
    x = torch.randn(10, 8)
    q = tq.quantize_model(copy.deepcopy(net), lambda m, n: w4(), None, method="swap")
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    y = q(x)
    tq.save(q, tmp_path / "moe.safetensors")
    loaded = tq.load(copy.deepcopy(net), tmp_path / "moe.safetensors")
    assert isinstance(loaded.experts, QExperts) and loaded.experts.down_quantizer is not None
    assert torch.equal(loaded(x), y)


def test_onnx_export_refuses_an_expert_bank_by_name():
    pytest.importorskip("onnx")
    q = tq.quantize_model(_Moe(), lambda m, n: w4(), None, method="swap")
    x = torch.randn(10, 8)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    with pytest.raises(ValueError, match="to_onnx: experts is a QExperts"):
        tq.export.to_onnx(q, (x,), "unused.onnx")


def test_gptq_says_it_leaves_the_banks_alone():
    torch.manual_seed(0)
    q = tq.quantize_model(_Moe(), lambda m, n: w4(), None, method="swap")
    x = torch.randn(10, 8)
    tq.calibrate(q, [x], progress=False)
    with pytest.warns(UserWarning, match=r"gptq: 1 mixture-of-experts bank\(s\) keep their round-to-nearest weights"):
        tq.ptq.gptq(q, [x], progress=False)


def test_sqnr_report_lists_the_banks_as_weights():
    torch.manual_seed(0)
    q = tq.quantize_model(_Moe(), lambda m, n: w4(), None, method="swap")
    x = torch.randn(10, 8)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    kinds = {r["point"]: r["kind"] for r in tq.debug.sqnr_report(q, x).rows}
    assert kinds["experts.gate_up_quantizer"] == kinds["experts.down_quantizer"] == "weight"
