"""``benchmarks/launch_overhead.py --stub-kernels``: the kernel path's Python measured without a GPU."""

from __future__ import annotations

import sys

import pytest
import torch
from benchmark_script import load_patching_kernels

import torchquant as tq

pytest.importorskip("triton")


@pytest.fixture
def script(monkeypatch):
    return load_patching_kernels("launch_overhead", monkeypatch)


def test_stubbed_launches_take_the_kernel_path_and_launch_nothing(script):
    script.stub_kernel_launches()
    q = tq.AffineQuantizer(4, tq.ExpAvgMinMax())
    x = torch.randn(64) * 3
    q.pre_observe(x)  # the first observation allocates the state on the torch path
    before = q.range_observer.min_val.clone()
    q.pre_observe(x * 2)  # the kernel path: the stubbed update leaves the state alone
    assert torch.equal(q.range_observer.min_val, before)
    assert torch.equal(q(x), x)  # the stubbed fake quant copies its input: nothing was quantized


def test_the_script_prints_every_row_with_stubbed_launches(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["launch_overhead.py", "--stub-kernels", "--numel", "32", "--calls", "5"])
    script.main()
    out = capsys.readouterr().out
    assert "kernel path: stubbed launches" in out
    rows = (
        "AffineQuantizer.quantize",
        "QAT call (observe + quantize)",
        "QWrapper conv3x3+BN+ReLU 16ch, QAT forward",
        "QAT step (fwd+bwd), 21 QWrappers, fx",
        "same net's step in float",
    )
    for row in rows:
        line = next(line for line in out.splitlines() if line.startswith(row))
        assert "failed" not in line and float(line.split()[-2]) > 0, line


def test_the_empty_kernels_of_the_gpu_rows_build_without_a_gpu(script):
    """The GPU-only rows' kernels are built before any row runs: a mistake there would end the
    script on the GPU machine, so their construction is checked here."""
    empty1, empty20, empty20_plain = script._empty_kernels()
    assert list(empty1.arg_names) == ["p"]
    assert len(empty20.arg_names) == 20 and empty20_plain.arg_names == empty20.arg_names
    assert not empty20.do_not_specialize
    assert len(empty20_plain.do_not_specialize) == 16
