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


def _cnn():
    """A swap-converted conv + BatchNorm + ReLU, calibrated, left in training mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    w8 = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))  # noqa: E731
    q = tq.quantize_model(net, w8, lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()), method="swap")
    x = torch.randn(16, 3, 8, 8)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    return q.train(), x


def test_analyses_leave_batchnorm_statistics_and_training_flags_as_they_were():
    q, x = _cnn()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    for analysis in (
        lambda: tq.debug.sqnr_report(q, x),
        lambda: tq.debug.sensitivity(q, x),
        lambda: tq.debug.mixed_precision(q, x, None, budget=6.0, bits=(8, 4)),
    ):
        analysis()
        assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())
        assert all(m.training for m in q.modules())


def test_mixed_precision_gives_a_shared_weight_one_width_counted_once():
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    net = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(16, 4))
    q = tq.quantize_model(net, lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)), None, method="swap")
    x = torch.randn(64, 16)
    tq.calibrate(q, [x], progress=False)
    plan = tq.debug.mixed_precision(q, x, None, budget=6.0, bits=(8, 4))
    rows = {r["layer"]: r for r in plan.rows}
    assert rows["0"]["params"] == 256 and rows["2"]["params"] == 0 and rows["4"]["params"] == 64
    assert rows["0"]["bits"] == rows["2"]["bits"]
    assert sum(r["params"] * r["bits"] for r in plan.rows) / sum(r["params"] for r in plan.rows) <= 6.0


def test_mixed_precision_refuses_a_width_a_quantizer_does_not_take_by_name():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    q = tq.quantize_model(net, lambda m, n: tq.QfmtQuantizer(8, True, tq.BatchMinMax(axis=0)), None, method="swap")
    x = torch.randn(64, 16)
    tq.calibrate(q, [x], progress=False)
    with pytest.raises(ValueError, match=r"mixed_precision: 0\.weight_quantizer \(QfmtQuantizer\) cannot take 1 bits"):
        tq.debug.mixed_precision(q, x, None, budget=4.0, bits=(8, 1))


def test_mixed_precision_plans_for_lsq_change_the_grid_and_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    q = tq.quantize_model(net, lambda m, n: tq.LSQQuantizer(8, axis=0), None, method="swap")
    x = torch.randn(64, 16)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    plan = tq.debug.mixed_precision(q, x, None, budget=4.0, bits=(8, 2))
    assert len({r["bits"] for r in plan.rows}) == 2  # the widths score differently: the search can choose
    with torch.no_grad():
        before = q(x)
        for r in plan.rows:
            q.get_submodule(r["layer"]).weight_quantizer.n_bits = r["bits"]
        after = q(x)
    assert not torch.equal(before, after)
    tq.save(q, tmp_path / "q.safetensors")
    torch.manual_seed(0)
    loaded = tq.load(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)), tmp_path / "q.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), after)


@pytest.mark.slow  # importing matplotlib takes seconds
def test_plot_ranges_reads_the_folded_weight_and_clips_per_channel(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from torchquant.debug import diagnostics

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        net[1].running_var.fill_(100.0)  # the folded weight is a tenth of the raw one
    q = tq.quantize_model(
        net.eval(),
        lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)),
        lambda m, n: tq.AffineQuantizer(8, tq.PercentileObserver(90.0, axis=1)),
        method="swap",
        fold_bn=True,
    )
    x = torch.randn(8, 3, 8, 8)
    tq.calibrate(q, [x], progress=False)
    seen = []
    clipped = diagnostics._clipped_percent
    monkeypatch.setattr(diagnostics, "_clipped_percent", lambda *a: seen.append(clipped(*a)) or seen[-1])
    tq.debug.plot_ranges(q, tmp_path / "r.png", x, bins=20)
    assert seen[0] == 0.0  # min/max of the folded weight: nothing clipped
    # the activations: each channel against its own 90th-percentile range
    y = []
    q[0].acts_quantizer.register_forward_hook(lambda m, a, o: y.append(a[0]))
    with torch.no_grad(), tq.qmodule_state(q, S.QUANT_EVAL):
        q(x)
    g = q[0].acts_quantizer.grid()
    lo, hi = (g.qmin - g.zero_point) * g.scale, (g.qmax - g.zero_point) * g.scale
    expected = 100 * float(((y[0] < lo - g.scale / 2) | (y[0] > hi + g.scale / 2)).float().mean())
    assert seen[1] == pytest.approx(expected) and expected > 5.0
