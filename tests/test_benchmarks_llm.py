"""benchmarks/llm.py: every cell of the table runs on a tiny saved Llama, and the target checks read the rows right.

The real-weight run (SmolLM2-135M) is the benchmark itself; tests/test_cli_lm.py has a reduced one.
"""

import math

import benchmark_script
import pytest

pytest.importorskip("transformers")

from torchquant.cli.lm import LMConfig, LMRow, run_lm

bench = benchmark_script.load("llm")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_cell_runs_on_a_tiny_llama(tiny_llama_dir, tmp_path):
    cfg = LMConfig(
        model=str(tiny_llama_dir), cells=bench.CELLS, calib=2, calib_len=32, eval_windows=1, eval_len=64,
        out=str(tmp_path), plot=False, quiet=True,
    )  # fmt: skip
    rows = run_lm(cfg).rows
    assert [(r.recipe, r.bits) for r in rows] == [("float", "-"), *bench.CELLS]
    assert all(r.status == "ok" and math.isfinite(r.perplexity) for r in rows), [r.note for r in rows]
    assert {t for t, _, _ in bench.check_targets(rows)} == {t for t, _, _ in bench.check_targets(_rows(**FIGS))}
    again, orders = bench.load_results(tmp_path)  # what --check reads
    assert [(r.recipe, r.bits, r.perplexity) for r in again] == [(r.recipe, r.bits, r.perplexity) for r in rows]
    assert orders is None


def _rows(**ppl):
    out = [LMRow("float", "-", ppl.pop("float"), 1.0, 0, 0, None)]
    for key, v in ppl.items():
        recipe, bits = key.rsplit("_", 1)
        out.append(LMRow(recipe.replace("__", "+"), bits, v, None, 0, 0, None))
    return out


# The issue's own figures (its text, not ours) where it gives them, else made up to sit on a bar.
FIGS = dict(
    float=10.74, rtn_w4g64=16.32, gptq_w4g64=13.28, awq_w4g64=14.0, rtn_w3g64=172.0, gptq_w3g64=40.0,
    awq_w3g64=91.4, rtn_w3g64mse=200.0, gptq_w3g64mse=30.0, rtn_w3g64z=50.0, gptq_w3g64z=20.0, awq_w3g64z=30.0,
    rtn_w8a8=27.17, smoothquant_w8a8=18.9, smoothquant_w8a8t=10.84,
    rtn_w4a4tkv4=1000.0, quarot__gptq_w4a4tkv4=32.0,
)  # fmt: skip


def test_targets_on_the_issue_figures():
    got = {t: (ok, fig) for t, ok, fig in bench.check_targets(_rows(**FIGS))}
    # the issue's figures are of another text: the llm-compressor anchor does not apply to them
    assert got["W4 g64: float and RTN equal llm-compressor's (the anchor applies)"][0] is False
    assert got["W4 g64: AWQ < RTN and <= 1.1x GPTQ"][0] is True  # 14.0 <= 14.608
    # symmetric W3: GPTQ on MSE ranges against round to nearest on min/max ranges
    assert got["W3 g64: gptq (mse ranges) recovers >= 50% of RTN's increase"] == (True, "88%")
    assert got["W3 g64: awq recovers >= 50% of RTN's increase"] == (False, "50%")  # 49.99%: just short
    assert got["W3 g64: gptq (mse ranges) <= 3x float"] == (True, "2.79x")
    assert got["W3 g64: gptq on min/max ranges (for reference, not a target)"] == (None, "3.72x")
    assert got["W3 g64 asym: gptq recovers >= 50% of RTN's increase"][0] is True
    assert got["W3 g64 asym: gptq <= 3x float"] == (True, "1.86x")
    figs = {k: v for k, v in FIGS.items() if k != "gptq_w3g64mse"}  # without the MSE cell: GPTQ on min/max
    assert {t: ok for t, ok, _ in bench.check_targets(_rows(**figs))}["W3 g64: gptq <= 3x float"] is False
    figs = {k: v for k, v in FIGS.items() if k != "awq_w3g64z"}
    without = {t for t, _, _ in bench.check_targets(_rows(**figs))}
    assert "W3 g64 asym: awq recovers >= 50% of RTN's increase" not in without
    assert got["W8A8 static: SmoothQuant recovers >= 50% of RTN's increase"][0] is True  # 18.9 <= 18.955
    assert got["W8A8 per-token: SmoothQuant <= 1.01x float"][0] is True
    assert got["W4A4 KV4: QuaRot+GPTQ <= 3x float, RTN > 10x"] == (True, "2.98x (RTN 93.1x)")


def test_targets_fail_where_a_method_does_not_help():
    figs = dict(FIGS, gptq_w4g64=17.5, awq_w4g64=16.5, quarot__gptq_w4a4tkv4=40.0)
    got = {t: ok for t, ok, _ in bench.check_targets(_rows(**figs))}
    assert not got["W4 g64: AWQ < RTN and <= 1.1x GPTQ"]
    assert not got["W4A4 KV4: QuaRot+GPTQ <= 3x float, RTN > 10x"]
    # only the targets whose cells ran
    assert [t for t, _, _ in bench.check_targets(_rows(float=10.0, rtn_w8=10.1))] == []
    assert bench.check_targets([]) == []  # --orders-only has no table


def test_the_llmcompressor_anchor_applies_only_where_float_and_rtn_match_it():
    lc = bench.LLMCOMPRESSOR
    got = {t: ok for t, ok, _ in bench.check_targets(_rows(float=15.1627, rtn_w4g64=21.8834, gptq_w4g64=17.0))}
    assert got == {"W4 g64: float and RTN equal llm-compressor's (the anchor applies)": True}
    rows = _rows(float=lc["float"], rtn_w4g64=lc["rtn"] + 0.01, gptq_w4g64=17.0)
    assert not {t: ok for t, ok, _ in bench.check_targets(rows)}[
        "W4 g64: float and RTN equal llm-compressor's (the anchor applies)"
    ]


def test_calibration_orders_are_permutations_and_the_orders_target_compares_means():
    calib = list(range(32))
    assert bench.reorder(calib, "fwd") == calib and bench.reorder(calib, "rev") == calib[::-1]
    p1 = bench.reorder(calib, "perm1")
    assert sorted(p1) == calib and p1 != calib and p1 == bench.reorder(calib, "perm1") != bench.reorder(calib, "perm2")
    with pytest.raises(ValueError, match="order"):
        bench.reorder(calib, "sideways")
    lc = bench.LLMCOMPRESSOR["gptq_orders"]
    assert len(lc) == len(bench.ORDERS)
    _, ok, figures = bench.check_orders([17.3, 17.4, 17.5, 17.6, 17.7])
    assert ok and figures == "17.50 +- 0.16 vs 17.58 +- 0.12"
    assert not bench.check_orders([17.6] * 4 + [17.7])[1]
