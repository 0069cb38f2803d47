import copy

import torch
from torch import nn

import torchquant as tq
from torchquant.bench.models import DigitsCNN


def wf(m, name):
    return tq.AffineQuantizer(8 if name in ("stem.0", "fc") else 4, tq.BatchMinMax(axis=0))


def af(m, name):
    return None if name == "pool" else tq.QfmtQuantizer(8, True, tq.ExpAvgMinMax())


def test_rows_list_quantization_points_with_quantizers_bits_and_granularity():
    q = tq.quantize_model(DigitsCNN(), wf, af, skip=["block2.*"])
    rows = {r["name"]: r for r in tq.summary_rows(q)}
    assert rows["stem.0"] == dict(
        name="stem.0",
        kind="QWrapper",
        layers="Conv2d+BatchNorm2d+ReLU",
        weight_quantizer="AffineQuantizer",
        weight_bits=8,
        weight_granularity="per-channel(axis=0)",
        act_quantizer="QfmtQuantizer",
        act_bits=8,
        act_granularity="per-tensor",
        note="",
    )
    assert rows["block1.conv1.0"]["weight_bits"] == 4
    assert rows["block1.add"]["kind"] == "QOp" and rows["block1.add"]["layers"] == "add"
    assert rows["block1.add"]["weight_quantizer"] is None and rows["block1.add"]["note"] == ""
    assert rows["pool"]["note"] == "no quantizer for outputs (float)"
    assert rows["block2.conv1"]["kind"] == "float" and rows["block2.conv1"]["note"].startswith("skipped by glob")
    assert rows["block2.add"]["kind"] == "float" and "block2.*" in rows["block2.add"]["note"]


def test_table_and_print(capsys):
    q = tq.quantize_model(DigitsCNN(), wf, af, skip=[nn.Linear])
    table = tq.summary(q)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["name", "kind", "layers/op"]
    assert any(line.startswith("fc ") and "skipped by type Linear" in line for line in lines)
    # the pooling QOp has no quantizer (af returns None for it): it quantizes nothing and has no weights
    assert lines[-1] == "9 quantization points (7 QWrapper, 2 QOp), 1 left in float"
    tq.print_summary(q)
    assert capsys.readouterr().out == table + "\n"


def test_swap_and_hand_built_models_report_float_layers():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    q = tq.quantize_model(copy.deepcopy(net), wf, None, method="swap", skip=["1"])
    rows = {r["name"]: r for r in tq.summary_rows(q)}
    assert rows["0"]["kind"] == rows["2"]["kind"] == "QWrapper"
    assert rows["1"]["note"] == "skipped by glob '1' (Sequential)"
    hand = nn.Sequential(tq.QWrapper(nn.Linear(2, 2)), nn.Conv1d(1, 1, 1))
    rows = tq.summary_rows(hand)
    assert [(r["name"], r["kind"], r["note"]) for r in rows] == [
        ("0", "QWrapper", "no quantizer for weights and outputs (float)"),
        ("1", "float", "not converted"),
    ]
    assert torch.equal(q[0].layer.weight, net[0].weight)


def test_granularity_of_per_token_and_scaled_minifloat_quantizers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
    q = tq.quantize_model(
        net,
        lambda m, n: tq.MinifloatQuantizer("fp8_e4m3", tq.BatchMinMax(axis=0)),
        lambda m, n: tq.DynamicAffineQuantizer(8, per_token=True),
        method="swap",
    )
    row = next(r for r in tq.summary_rows(q) if r["name"] == "0")
    assert row["weight_granularity"] == "per-channel(axis=0)"  # kept on the observer
    assert row["act_granularity"] == "per-token"
    assert row["weight_bits"] is None and row["act_bits"] == 8


def test_modules_without_quantizers_and_converted_layers_count_once():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    nothing = tq.quantize_model(copy.deepcopy(net), None, None)
    assert tq.summary(nothing).splitlines()[-1] == "0 quantization points (0 QWrapper, 0 QOp), 2 left in float"
    # a layer skipped by a first conversion and converted by a second is listed once, as converted
    q = tq.quantize_model(copy.deepcopy(net), wf, None, skip=["2"], method="swap")
    q = tq.quantize_model(q, wf, None, method="swap")
    rows = tq.summary_rows(q)
    assert [(r["name"], r["kind"]) for r in rows] == [("0", "QWrapper"), ("2", "QWrapper")]
    assert tq.summary(q).splitlines()[-1] == "2 quantization points (2 QWrapper, 0 QOp), 0 left in float"


def test_a_multihead_attention_with_a_float_out_proj_says_so():
    mha = tq.QMultiheadAttention(nn.MultiheadAttention(8, 2), tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)), None)
    (row,) = tq.summary_rows(nn.Sequential(mha))
    assert row["weight_bits"] == 4 and row["note"] == "no quantizer for the out_proj weight (float)"
