"""cached_quantized_weights: the weight is quantized once per frozen state, the outputs are the uncached ones."""

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.quantizers import AffineQuantizer
from torchquant.utils import cached_quantized_weights

S = tq.QModuleState


def _wrapper(kind):
    torch.manual_seed(0)
    if kind == "linear-per-group":
        layer, obs, x = nn.Linear(32, 8), tq.BatchMinMax(axis=1, group_size=16), torch.randn(4, 32)
    else:
        layer, obs, x = nn.Conv2d(3, 8, 3, padding=1), tq.BatchMinMax(axis=0), torch.randn(2, 3, 6, 6)
    w = tq.QWrapper(
        layer, weight_quantizer=tq.AffineQuantizer(4, obs), acts_quantizer=tq.AffineQuantizer(8, tq.BatchMinMax())
    )
    with tq.qmodule_state(w, S.CALIBRATION), torch.no_grad():
        w(x)
    w.qstate = S.QUANT_EVAL
    return w, x


@pytest.fixture
def calls(monkeypatch):
    """How many times a weight quantizer (an AffineQuantizer named ...weight_quantizer) quantized."""
    count = [0]
    quantize = AffineQuantizer.quantize

    def counted(self, x):
        if "weight" in self._tq_name:
            count[0] += 1
        return quantize(self, x)

    monkeypatch.setattr(AffineQuantizer, "quantize", counted)
    return count


def _uncached(w, x):
    with torch.no_grad():
        return w(x)


@pytest.mark.parametrize("kind", ["linear-per-group", "conv2d-per-channel"])
def test_outputs_are_bit_identical_and_the_weight_is_quantized_once(kind, calls):
    w, x = _wrapper(kind)
    ref = _uncached(w, x)
    calls[0] = 0
    with torch.no_grad(), cached_quantized_weights(w):
        outs = [w(x) for _ in range(4)]
    assert calls[0] == 1
    assert all(torch.equal(o, ref) for o in outs)
    assert w._weight_cache is None  # dropped on exit


def _changes():
    def in_place(w):
        with torch.no_grad():
            w.layer.weight[0, 0] += 0.5

    def through_data(w):  # does not bump the version counter
        w.layer.weight.data[1].mul_(-1.0)

    def load_state_dict(w):
        sd = {k: v.clone() for k, v in w.state_dict().items()}
        sd["layer.weight"] = sd["layer.weight"] * 0.5
        w.load_state_dict(sd)

    def new_ranges(w):
        with torch.no_grad():
            w.weight_quantizer.range_observer.max_val.mul_(0.5)

    def bits(w):
        w.weight_quantizer.n_bits = 3

    def new_parameter(w):
        w.layer.weight = nn.Parameter(w.layer.weight.detach() * 2)

    def mode(w):
        w.qstate = S.QUANT_EVAL_ACT_ONLY

    return [in_place, through_data, load_state_dict, new_ranges, bits, new_parameter, mode]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__.replace("_", "-"))
def test_any_change_is_seen(change):
    w, x = _wrapper("linear-per-group")
    with torch.no_grad(), cached_quantized_weights(w):
        before = w(x)
        change(w)
        after = w(x)
    ref = _uncached(w, x)
    assert torch.equal(after, ref) and not torch.equal(after, before)


def test_training_is_not_cached_and_gradients_flow(calls):
    w, x = _wrapper("linear-per-group")
    w.qstate = S.QUANT_AWARE_TRAIN_WEIGHT_ONLY  # observes: never cached
    with cached_quantized_weights(w):
        w(x).sum().backward()
        w.qstate = S.QUANT_EVAL  # quantizes only, but gradients are on
        calls[0] = 0
        w(x).sum().backward()
        w(x).sum().backward()
        assert calls[0] == 2
    assert w.layer.weight.grad is not None and w.layer.weight.grad.abs().sum() > 0


def test_forward_hooks_of_the_quantizer_still_run():
    w, x = _wrapper("linear-per-group")
    seen = []
    w.weight_quantizer.register_forward_hook(lambda m, args, out: seen.append(1))
    with torch.no_grad(), cached_quantized_weights(w):
        w(x)
        w(x)
    assert len(seen) == 2


def test_sequential_block_runs_equal_the_uncached_forward():
    from torchquant.ptq.sequential import sequential_blocks

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    q = tq.quantize_model(net, lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)), None, method="swap")
    data = [torch.randn(8, 16) for _ in range(3)]
    tq.calibrate(q, data, progress=False)
    with tq.qmodule_state(q, S.QUANT_EVAL), torch.no_grad():
        ref = [q(x) for x in data]
        (block,) = sequential_blocks(q, data, progress=False)
        outs = block.run()
    assert all(torch.equal(o, r) for o, r in zip(outs, ref))


def test_expert_banks_are_cached_too(monkeypatch):
    """QExperts quantizes each bank once per cached block, bit-identically, and again after a bank changes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_moe import Experts, _routing

    torch.manual_seed(0)
    q = tq.QExperts(
        Experts(transposed=True),
        {
            "gate_up_proj": AffineQuantizer(4, tq.BatchMinMax(axis=1, group_size=4)),
            "down_proj": AffineQuantizer(4, tq.BatchMinMax(axis=0)),
        },
    )
    q.observe_weight()
    q.qstate = S.QUANT_EVAL
    x, index, scores = _routing()
    with torch.no_grad():
        ref = q(x, index, scores)
    calls = [0]
    quantize = AffineQuantizer.quantize

    def counted(self, x):
        calls[0] += 1
        return quantize(self, x)

    monkeypatch.setattr(AffineQuantizer, "quantize", counted)
    with torch.no_grad(), cached_quantized_weights(q):
        outs = [q(x, index, scores) for _ in range(3)]
        assert calls[0] == 2  # one per bank
        for bank, entry in q._weight_cache.items():  # the bank as the experts read it, not the quantized rows too
            stored = q.layer._parameters[bank]
            assert entry["out"].shape == stored.shape and entry["out"].stride() == stored.stride(), bank
            assert sorted(entry) == ["out", "plain", "tensors", "weight"]
        q.layer.down_proj.data[0, 0, 0] += 1.0  # a write through .data: compared by value, recomputed
        changed = q(x, index, scores)
        assert calls[0] == 3  # only the bank that changed
    assert all(torch.equal(o, ref) for o in outs) and not torch.equal(changed, ref)
    assert q._weight_cache is None
