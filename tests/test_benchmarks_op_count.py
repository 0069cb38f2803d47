"""``benchmarks/op_count.py``: the kernel launches of an eager CUDA training step, counted on the CPU."""

from __future__ import annotations

import sys

import pytest
import torch
from benchmark_script import load_patching_kernels
from torch import nn

import torchquant as tq

pytest.importorskip("triton")


@pytest.fixture
def script(monkeypatch):
    return load_patching_kernels("op_count", monkeypatch)


def wrapper_step_launches(script, fold_bn) -> dict[str, int]:
    """Launches of one QAT step (forward and backward) of a Conv+BN+ReLU wrapper with torch.ao's clipped grids."""
    counter = [None]
    script.count_triton_launches(counter)
    torch.manual_seed(0)
    w = tq.QWrapper(
        [nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()],
        tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True, gradient_clip=True),
        tq.AffineQuantizer(8, tq.ExpAvgMinMax(), gradient_clip=True),
        fold_bn=fold_bn,
    ).train()
    tq.set_qmodule_state(w, tq.QModuleState.QUANT_AWARE_TRAIN)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    for _ in range(2):  # the first observations allocate the state (torch path) and the staging buffers
        w(x).sum().backward()
    counter[0] = c = script.OpCounter()
    with c:
        w(x).sum().backward()
    return dict(c.ops)


def test_a_quantizer_call_is_two_launches_and_the_clipped_gradient_one_more(script):
    ops = wrapper_step_launches(script, False)
    for name in ("triton:observe_rows", "triton:fake_quant", "triton:masked_grad"):
        assert ops.get(name) == 2, (name, ops)  # weight and output quantizers: one each
    assert "aminmax" not in ops and "triton:observe" not in ops  # the batch's ranges reduced in the update kernel
    assert "clone" not in ops and "stack" not in ops  # the clipped gradient keeps the fake quant's packed mask


def test_the_one_pass_fold_adds_at_most_27_launches_to_a_layer(script):
    """Each (C,)-sized operation of the fold is a kernel launch on a GPU: a regression here slows every
    folded layer of an eager CUDA step (two passes: 54; torch.ao's ConvBn about 20)."""
    unfolded = sum(wrapper_step_launches(script, False).values())
    one_pass = sum(wrapper_step_launches(script, "one_pass").values())
    assert one_pass - unfolded <= 27, (one_pass, unfolded)


def test_the_script_counts_every_variant(script, monkeypatch, capsys):
    pytest.importorskip("torchvision")
    monkeypatch.setattr(sys, "argv", ["op_count.py", "--variants", "float32,fx,fx-ao", "--top", "3", "--size", "32"])
    script.main()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("float32", "torchquant"))]
    # launches, triton, quantizers, above float32, per quantizer, saved KiB, vs float32 (the float row has no
    # "per quantizer")
    rows = {line.split("  ")[0]: line.split()[-7:] for line in lines}
    assert rows["float32"][-6:-2] == ["166", "0", "0", "0"] and rows["float32"][-1] == "1.00x"
    launches, triton, quantizers, above, per_q, _, _ = rows["torchquant quantize_model(fx)"]
    # 51 quantizers of two launches each (the observer's reduction and update in one, the fake quant)
    assert (triton, quantizers, above, per_q) == ("102", "51", str(int(launches) - 166), f"{int(above) / 51:.1f}")
    assert rows["torchquant fx as ao"][1] == "153"  # and the clipped gradients' kernels
    assert "triton:fake_quant 51" in out
    saved = {name: float(r[-1].rstrip("x")) for name, r in rows.items()}
    # torch.ao's work keeps little more: one pass keeps an unfolded Conv+BN's tensors, clipping a bit per element
    fx, fx_ao = saved["torchquant quantize_model(fx)"], saved["torchquant fx as ao"]
    assert 1.0 < fx <= fx_ao < fx + 0.05, (fx, fx_ao)
