"""tq.debug: SQNR report, sensitivity, range plots, mixed precision."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchquant as tq

S = tq.QModuleState


def _model(bits_by_layer=(8, 8, 8)):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), nn.ReLU()), nn.Linear(32, 4))
    names = iter(bits_by_layer)
    bits = {}

    def wq(m, n):
        bits[n] = next(names)
        return tq.AffineQuantizer(bits[n], tq.BatchMinMax(axis=0))

    q = tq.quantize_model(net, wq, lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()), method="swap")
    x = torch.randn(256, 16)
    with torch.no_grad(), tq.qmodule_state(q, S.CALIBRATION):
        q(x)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    return q, x


def test_sqnr_report_matches_direct_computation_and_orders_bit_widths():
    q, x = _model((8, 2, 8))
    rep = tq.debug.sqnr_report(q, [x[:128], (x[128:], None)])
    assert [r["point"] for r in rep.rows] == [
        "0.weight_quantizer", "0.acts_quantizer", "2.0.weight_quantizer", "2.0.acts_quantizer",
        "3.weight_quantizer", "3.acts_quantizer",
    ]  # fmt: skip
    w = q[0].layer.weight.detach().double()
    noise = ((w - q[0].weight_quantizer(q[0].layer.weight).double()) ** 2).sum()
    expected = 10 * math.log10(float((w * w).sum() / noise))
    assert rep.rows[0]["sqnr_db"] == pytest.approx(expected, rel=1e-9)
    by = {r["point"]: r for r in rep.rows}
    assert by["2.0.weight_quantizer"]["sqnr_db"] < by["0.weight_quantizer"]["sqnr_db"] - 20  # 2 vs 8 bits
    assert by["2.0.weight_quantizer"]["n_bits"] == 2 and by["0.acts_quantizer"]["kind"] == "activation"
    assert "sqnr_db" in str(rep).splitlines()[0]
    assert all(m.qstate is S.QUANT_EVAL for _, m in tq.iter_qmodules(q))


def test_sensitivity_finds_the_low_bit_layer_and_restores_modes():
    q, x = _model((8, 2, 8))
    q[0].qstate = S.QUANT_EVAL_WEIGHT_ONLY  # some mode to restore
    rep = tq.debug.sensitivity(q, x)
    assert rep.rows[0]["layer"] == "2.0"  # lowest output SQNR when quantized alone
    assert rep.rows[0]["all_but"] == max(r["all_but"] for r in rep.rows)  # best when left float
    assert math.isinf(rep.rows[0]["float"]) and rep.rows[0]["all"] < rep.rows[0]["only"] + 1e-9
    assert q[0].qstate is S.QUANT_EVAL_WEIGHT_ONLY and q[3].qstate is S.QUANT_EVAL

    def mse(model, batches):  # lower is better
        with torch.no_grad():
            return float(model(batches[0]).pow(2).mean())

    rep2 = tq.debug.sensitivity(q, [x], mse, higher_is_better=False)
    assert [r["only"] for r in rep2.rows] == sorted((r["only"] for r in rep2.rows), reverse=True)


@pytest.mark.slow  # importing matplotlib takes seconds
def test_plot_ranges_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    q, x = _model()
    path = tmp_path / "r.png"
    names = tq.debug.plot_ranges(q, path, x, bins=20)
    assert len(names) == 6 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights_only = tq.debug.plot_ranges(q, tmp_path / "w.png", bins=20)
    assert weights_only == ["0.weight_quantizer", "2.0.weight_quantizer", "3.weight_quantizer"]


def test_mixed_precision_greedy_cost_per_saved_bit():
    q, x = _model()
    layers = {n: m for n, m in tq.iter_qmodules(q)}
    penalty = {"0": 1.0, "2.0": 50.0, "3": 1.0}  # "2.0" is very sensitive to 4 bits

    def metric(model, batches):  # reads the state the search puts the model in
        return 100.0 - sum(
            penalty[n] for n, m in layers.items() if m.qstate.is_weight_quantized and m.weight_quantizer.n_bits == 4
        )

    before = {n: m.weight_quantizer.n_bits for n, m in layers.items()}
    plan = tq.debug.mixed_precision(q, x, metric, budget=7.0, bits=(8, 4))  # 4 bits on >= 416 of 1664 weights
    bits = {r["layer"]: r["bits"] for r in plan.rows}
    assert {r["layer"]: r["params"] for r in plan.rows} == {"0": 512, "2.0": 1024, "3": 128}
    assert bits == {"0": 4, "2.0": 8, "3": 8}  # cheapest per saved bit: 1 / (512 * 4) < 50 / (1024 * 4)
    plan = tq.debug.mixed_precision(q, x, metric, budget=5.0, bits=(8, 4))
    assert {r["layer"]: r["bits"] for r in plan.rows} == {"0": 4, "2.0": 4, "3": 8}  # 2.0 forced, 3 not needed
    assert {n: m.weight_quantizer.n_bits for n, m in layers.items()} == before
    with pytest.raises(ValueError, match="below the smallest width"):
        tq.debug.mixed_precision(q, x, None, budget=3.0, bits=(8, 4))


def test_errors():
    with pytest.raises(ValueError, match="contains no QModule"):
        tq.debug.sqnr_report(nn.Linear(2, 2), torch.randn(1, 2))
    q, _ = _model()
    with pytest.raises(ValueError, match="data is empty"):
        tq.debug.sensitivity(q, [])
    for fn in (tq.debug.sqnr_report, tq.debug.sensitivity):  # a bad batch: the message names the function
        with pytest.raises(TypeError, match=rf"^{fn.__name__}: a batch must be"):
            fn(q, [3])


def test_a_transformers_model_with_dict_batches():
    """Batches as calibrate takes them: a tokenizer's dict (labels left out), one or a list; logits compared."""
    transformers = pytest.importorskip("transformers")
    from hf.hf_tiny import VOCAB, llama_config  # tests/hf, a namespace package

    from torchquant.hf import TorchQuantConfig, quantize

    torch.manual_seed(0)
    model = quantize(transformers.LlamaForCausalLM(llama_config()).eval(), TorchQuantConfig(weights="int4"))
    ids = torch.randint(0, VOCAB, (2, 8))
    batch = {"input_ids": ids, "labels": ids}
    one = tq.debug.sqnr_report(model, batch)
    assert one.rows and all(math.isfinite(r["sqnr_db"]) for r in one.rows)
    both = tq.debug.sqnr_report(model, [batch, {"input_ids": ids}])
    assert [r["sqnr_db"] for r in both.rows] == pytest.approx([r["sqnr_db"] for r in one.rows])
    sens = tq.debug.sensitivity(model, batch)
    assert len(sens.rows) == len(tq.iter_qmodules(model)) and math.isfinite(sens.rows[0]["all"])
    assert {m.qstate for _, m in tq.iter_qmodules(model)} == {S.QUANT_EVAL}  # restored


def test_model_outputs_are_found_in_tuples_and_mappings():
    from torchquant.utils import model_output

    t = torch.ones(2)
    assert model_output(t, "x") is t
    assert model_output((None, t), "x") is t
    assert model_output({"loss": None, "out": t}, "x") is t
    with pytest.raises(TypeError, match=r"sensitivity: the model returned NoneType, which holds no tensor"):
        model_output(None, "sensitivity")
