"""``benchmarks/kernel_sass.py``: the kernels' static sm_90 cost, compiled without a GPU."""

from __future__ import annotations

import sys

import pytest
from benchmark_script import load

pytest.importorskip("triton.backends.nvidia")


@pytest.fixture(scope="module")
def script():
    return load("kernel_sass")


def test_runs_take_fewer_instructions_and_divisions_than_indexing_each_element(script):
    _, fn, constexprs, options = script.variants()[0]  # AffineQuantizer: the grid from each element's ranges
    per_element = script.compile_stats(fn, dict(constexprs, GRAN=1), 90, options)
    runs = script.compile_stats(fn, dict(constexprs, GRAN=2), 90, options)
    assert runs["sass"] < per_element["sass"] * 0.6, (runs, per_element)
    assert runs["div.rn"] < per_element["div.rn"], (runs, per_element)  # one grid a run, not one an element
    assert runs["v4 loads"] == per_element["v4 loads"] > 0  # the aligned runs' loads stay vectorized
    assert runs["local bytes"] == per_element["local bytes"] == 0


@pytest.mark.slow
def test_the_script_prints_three_rows_a_kernel(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kernel_sass.py"])
    script.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.rstrip().endswith(" 0")]
    assert len(rows) == 3 * len(script.variants())  # every variant compiled, none spilling
