import importlib

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.bench.models import DigitsCNN
from torchquant.ptq import AdaRoundQuantizer
from torchquant.quantizers_functional import inverse_rectified_sigmoid, rectified_sigmoid

rec = importlib.import_module("torchquant.ptq.reconstruction")

W4 = lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax())  # noqa: E731
A8 = lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax())  # noqa: E731
FAST = dict(iters=30, batch_size=16, lr=1e-2, progress=False)


def _mlp(seed=0, acts=A8):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    return tq.quantize_model(net.eval(), W4, acts, method="swap")


def _data(seed=1, n=4, shape=(32, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rectified_sigmoid_range_and_inverse():
    v = torch.linspace(-20, 20, 101)
    h = rectified_sigmoid(v)
    assert h.min() == 0 and h.max() == 1
    hs = torch.linspace(0.05, 0.95, 19)
    assert torch.allclose(rectified_sigmoid(inverse_rectified_sigmoid(hs)), hs, atol=1e-6)


def test_adaround_quantizer_starts_at_the_weight_and_hardens_to_floor_or_ceil():
    q = tq.AffineQuantizer(4, tq.BatchMinMax())
    w = torch.randn(6, 5)
    q.pre_observe(w)
    grid = q.grid()
    ada = AdaRoundQuantizer(grid, w)
    # Soft rounding starts at the fractional part: the weight itself, clipped to the grid's range.
    w_in = w.clamp((grid.qmin - grid.zero_point) * grid.scale, (grid.qmax - grid.zero_point) * grid.scale)
    assert torch.allclose(ada(w), w_in, atol=1e-5)
    ada.soft = False
    hard = ada(w)
    codes = hard / grid.scale + grid.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the grid
    lo, hi = torch.floor(w_in / grid.scale) * grid.scale, torch.ceil(w_in / grid.scale) * grid.scale
    assert ((hard - lo).abs() < 1e-5).logical_or((hard - hi).abs() < 1e-5).all()
    assert torch.equal(q(hard), hard)  # the original quantizer reproduces hard-rounded weights
    with torch.no_grad():
        ada.alpha.fill_(50.0)
    assert ada.regularizer(2.0).item() == 0.0  # h == 1 everywhere
    with pytest.raises(ValueError, match="built for a weight of shape"):
        ada(torch.randn(3, 3))
    with pytest.raises(TypeError, match="AffineGrid"):
        AdaRoundQuantizer("grid", w)


# Non-uniform weight quantizers: NF4 in blocks of 4 inputs, 4-bit APoT per tensor.
LEVEL_WEIGHTS = {
    "nf4-block4": lambda m, n: tq.NF4Quantizer(tq.BatchMinMax(axis=1, group_size=4)),
    "apot4-per-tensor": lambda m, n: tq.APoTQuantizer(4, tq.BatchMinMax()),
}


@pytest.mark.parametrize("make", LEVEL_WEIGHTS.values(), ids=LEVEL_WEIGHTS.keys())
def test_adaround_quantizer_on_levels_starts_at_the_weight_and_hardens_to_a_neighbour(make):
    q = make(None, "w")
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    q.pre_observe(w)
    levels = q.levels()
    ada = AdaRoundQuantizer(levels, w)
    assert ada.grid() is None and torch.equal(ada.levels().levels, levels.levels)
    # every weight lies inside its block's range [-absmax, absmax]: the soft value starts at it
    assert torch.allclose(ada(w), w, atol=1e-5)
    lo, hi = (levels.dequantize(c) for c in levels.neighbours(w))
    assert (lo <= w + 1e-6).all() and (w <= hi + 1e-6).all() and (hi > lo).any()
    with torch.no_grad():
        ada.alpha.copy_(torch.randn(w.shape))  # any rounding choice
    ada.soft = False
    hard = ada(w)
    assert torch.equal(torch.where(ada.alpha >= 0, hi, lo), hard)  # exactly one of the two neighbours
    assert torch.equal(q(hard), hard)  # on the levels: the original quantizer reproduces it
    assert torch.equal(levels.dequantize(levels.codes(hard)), hard)


@pytest.mark.parametrize("make", LEVEL_WEIGHTS.values(), ids=LEVEL_WEIGHTS.keys())
def test_adaround_on_levels_beats_nearest_rounding_and_ends_on_the_levels(make):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    q = tq.quantize_model(net.eval(), make, None, method="swap")
    data = _data(n=8)
    tq.calibrate(q, data, progress=False)
    x = torch.cat(data)
    layers = (q[0], q[2], q[4])
    with torch.no_grad():
        fp = q(x)
        with tq.qmodule_state(q, tq.QModuleState.QUANT_EVAL):
            err_nearest = (q(x) - fp).pow(2).mean()
            nearest = [m.weight_quantizer(m.layer.weight) for m in layers]
    tq.ptq.adaround(q, data, iters=200, batch_size=32, lr=1e-2, progress=False)
    with torch.no_grad(), tq.qmodule_state(q, tq.QModuleState.QUANT_EVAL):
        err_ada = (q(x) - fp).pow(2).mean()
    assert err_ada < 0.8 * err_nearest, (err_nearest, err_ada)
    for m, rtn in zip(layers, nearest):
        w, levels = m.layer.weight.detach(), m.weight_quantizer.levels()
        assert torch.equal(levels.dequantize(levels.codes(w)), w)  # written back on the levels
        assert torch.equal(m.weight_quantizer(w), w)
        assert not torch.equal(w, rtn)  # and not simply rounded to nearest


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)), LEVEL_WEIGHTS["nf4-block4"]],
    ids=["affine-w4", "nf4-block4"],
)
def test_adaround_with_folded_batchnorm_rounds_the_folded_weight(make):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)).eval()
    with torch.no_grad():  # BatchNorm far from the identity: the folded weight is not the layer's
        net[1].running_var.uniform_(2.0, 6.0)
        net[1].running_mean.normal_()
        net[1].weight.uniform_(0.5, 2.0)
    data = [torch.randn(16, 4, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    x = torch.cat(data)
    with torch.no_grad():
        fp = net(x)
    q = tq.quantize_model(net, make, None, method="swap", fold_bn=True)
    tq.calibrate(q, data, progress=False)
    with torch.no_grad(), tq.qmodule_state(q, tq.QModuleState.QUANT_EVAL):
        err_nearest = (q(x) - fp).pow(2).mean()
    tq.ptq.adaround(q, data, iters=200, batch_size=32, lr=1e-2, progress=False)
    with torch.no_grad(), tq.qmodule_state(q, tq.QModuleState.QUANT_EVAL):
        err_ada = (q(x) - fp).pow(2).mean()
        folded = q[0].weight_to_quantize()
        # the layer holds rounded values divided by gamma / sigma: folded again, they are on the grid
        assert torch.allclose(q[0].weight_quantizer(folded), folded, rtol=0, atol=1e-6)
    assert err_ada < 0.8 * err_nearest, (err_nearest, err_ada)


@pytest.mark.parametrize("preset", ["adaround", "brecq", "qdrop"])
def test_reconstruction_fixes_rounding_into_the_weights(preset):
    q = _mlp()
    data = _data()
    tq.calibrate(q, data, progress=False)
    w0 = [m.layer.weight.detach().clone() for m in (q[0], q[2], q[4])]
    blocks = {"blocks": ["2"]} if preset != "adaround" else {}
    losses = getattr(tq.ptq, preset)(q, data, **FAST, **blocks)
    assert list(losses) == ["0", "2", "4"]  # forward order; with blocks, "2" is a block unit
    for m, w in zip((q[0], q[2], q[4]), w0):
        g = m.weight_quantizer.grid()
        w = w.clamp((g.qmin - g.zero_point) * g.scale, (g.qmax - g.zero_point) * g.scale)
        lo, hi = torch.floor(w / g.scale) * g.scale, torch.ceil(w / g.scale) * g.scale
        wq = m.layer.weight.detach()
        assert ((wq - lo).abs() < 1e-5).logical_or((wq - hi).abs() < 1e-5).all()
        assert torch.equal(m.weight_quantizer(wq), wq)
        assert isinstance(m.weight_quantizer, tq.AffineQuantizer)  # the original quantizer is back
    assert all(m.qstate is tq.QModuleState.BYPASSED for _, m in tq.iter_qmodules(q))


def test_reconstructed_model_round_trips_state_dict():
    q = _mlp()
    data = _data()
    tq.calibrate(q, data, progress=False)
    tq.ptq.adaround(q, data, **FAST)
    fresh = _mlp(seed=5)
    fresh.load_state_dict(q.state_dict(), strict=True)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    tq.set_qmodule_state(fresh, tq.QModuleState.QUANT_EVAL)
    x = torch.randn(10, 8)
    assert torch.equal(q(x), fresh(x))


def test_adaround_beats_nearest_rounding_on_the_layer_outputs():
    q = _mlp(acts=None)
    data = _data(n=8)
    tq.calibrate(q, data, progress=False)
    x = torch.cat(data)
    with torch.no_grad():
        fp = q(x)
        with tq.qmodule_state(q, tq.QModuleState.QUANT_EVAL):
            err_nearest = (q(x) - fp).pow(2).mean()
    tq.ptq.adaround(q, data, iters=100, batch_size=32, lr=1e-2, progress=False)
    with torch.no_grad(), tq.qmodule_state(q, tq.QModuleState.QUANT_EVAL):
        err_ada = (q(x) - fp).pow(2).mean()
    assert err_ada < 0.8 * err_nearest, (err_nearest, err_ada)


def test_seed_makes_reconstruction_reproducible():
    results = []
    for seed in (0, 0, 1):
        q = _mlp()
        data = _data()
        tq.calibrate(q, data, progress=False)
        tq.ptq.qdrop(q, data, seed=seed, blocks=["2"], **FAST)
        results.append(_weights(q))
    assert _same(results[0], results[1])
    assert not _same(results[0], results[2])


def test_blocks_are_residual_blocks_and_act_steps_can_be_learned():
    torch.manual_seed(0)
    q = tq.quantize_model(DigitsCNN().eval(), W4, A8, method="swap")
    data = [torch.rand(16, 1, 8, 8) for _ in range(2)]
    tq.calibrate(q, data, progress=False)
    obs = q.block1.conv1[0].acts_quantizer.range_observer
    before = obs.max_val.clone()
    losses = tq.ptq.brecq(q, data, learn_act_step=True, act_lr=1e-2, iters=5, batch_size=8, progress=False)
    assert list(losses) == ["stem.0", "block1", "down.0.0", "down.1.0", "block2", "fc"]
    assert not torch.equal(obs.max_val, before)  # learned step written back into the ranges
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    assert q(data[0]).shape == (16, 10)


def test_power_of_two_activation_grids_keep_their_calibrated_steps():
    # a learned step written back went through force_ranges, which rounded it up to another power of two
    torch.manual_seed(0)
    pow2 = lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax(), power_of_two=True)  # noqa: E731
    q = tq.quantize_model(DigitsCNN().eval(), W4, lambda m, n: pow2(m, n) if n == "stem.0" else A8(m, n),
                          method="swap")  # fmt: skip
    data = [torch.rand(16, 1, 8, 8) for _ in range(2)]
    tq.calibrate(q, data, progress=False)
    kept, learned = q.stem[0].acts_quantizer.range_observer, q.block1.conv1[0].acts_quantizer.range_observer
    before = (kept.max_val.clone(), learned.max_val.clone())
    with pytest.warns(UserWarning, match=r"1 activation quantizer\(s\) keep their calibrated steps.*stem\.0\.acts"):
        tq.ptq.brecq(q, data, learn_act_step=True, act_lr=1e-2, iters=5, batch_size=8, progress=False)
    assert torch.equal(kept.max_val, before[0]) and not torch.equal(learned.max_val, before[1])


def test_failure_part_way_restores_the_model(monkeypatch):
    q = _mlp()
    data = _data()
    tq.calibrate(q, data, progress=False)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL_ACT_ONLY)
    before = _weights(q)
    quantizers = [m.weight_quantizer for m in (q[0], q[2], q[4])]
    calls = []
    orig = rec._reconstruct_unit

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return orig(*args, **kwargs)

    monkeypatch.setattr(rec, "_reconstruct_unit", failing)
    with pytest.raises(RuntimeError, match="boom"):
        tq.ptq.adaround(q, data, **FAST)
    assert _same(before, _weights(q))
    assert [m.weight_quantizer for m in (q[0], q[2], q[4])] == quantizers
    assert all(m.qstate is tq.QModuleState.QUANT_EVAL_ACT_ONLY for _, m in tq.iter_qmodules(q))


class _Sign(tq.Quantizer):
    def pre_observe(self, x):
        pass

    def quantize(self, x):
        return torch.sign(x)

    def post_observe(self, x):
        pass


def test_reconstruction_bad_input():
    data = _data()
    with pytest.raises(ValueError, match="no QModule"):
        tq.ptq.adaround(nn.Linear(2, 2), data)
    q = _mlp()
    with pytest.raises(ValueError, match="empty"):
        tq.ptq.adaround(q, [])
    with pytest.raises(ValueError, match="mode"):
        tq.ptq.adaround(q, data, mode=tq.QModuleState.CALIBRATION)
    with pytest.raises(ValueError, match="granularity"):
        tq.ptq.reconstruct(q, data, granularity="tensor")
    with pytest.raises(ValueError, match="need act_quant"):
        tq.ptq.reconstruct(q, data, drop_prob=0.5)
    with pytest.raises(TypeError, match="fixed by this preset"):
        tq.ptq.adaround(q, data, granularity="block")
    with pytest.raises(ValueError, match="iters"):
        tq.ptq.adaround(q, data, iters=0)
    with pytest.raises(ValueError, match="loss must be"):
        tq.ptq.brecq(q, data, loss="l1")
    with pytest.raises(ValueError, match="only used with loss='fisher'"):
        tq.ptq.qdrop(q, data, fisher_damping=0.5)
    with pytest.raises(ValueError, match="fisher_damping must be"):
        tq.ptq.brecq(q, data, fisher_damping=-1.0)
    before = _weights(q)
    with pytest.raises(RuntimeError, match="calibrate"):  # not calibrated
        tq.ptq.adaround(q, data, **FAST)
    assert _same(before, _weights(q))
    tq.calibrate(q, data, progress=False)
    before = _weights(q)
    with pytest.raises(RuntimeError, match="check the input shape"):  # mismatched shapes
        tq.ptq.adaround(q, [torch.randn(4, 9)], **FAST)
    with pytest.raises(ValueError, match="found no block"):
        tq.ptq.brecq(q, data, **FAST)
    assert _same(before, _weights(q))
    s = tq.quantize_model(nn.Sequential(nn.Linear(8, 2)), lambda m, n: _Sign(), None, method="swap")
    with pytest.raises(TypeError, match=r"neither an affine grid \(grid\(\)\) nor levels"):
        tq.ptq.adaround(s, data, **FAST)
    r = tq.quantize_model(
        nn.Sequential(nn.Linear(8, 2)), W4, lambda m, n: tq.QfmtQuantizer(8, True, tq.BatchMinMax()), method="swap"
    )
    tq.calibrate(r, data, progress=False)
    with pytest.raises(TypeError, match="learn_act_step needs AffineQuantizer"):
        tq.ptq.brecq(r, data, blocks=["0"], learn_act_step=True, **FAST)


def test_fisher_weights_of_the_logits_are_the_kl_gradient_squared():
    # For the last layer the gradient of KL(float || quantized) w.r.t. its output (the logits) is
    # softmax(quantized) - softmax(float), sample by sample.
    q = _mlp(acts=None)
    data = _data()
    tq.calibrate(q, data, progress=False)
    with torch.no_grad():
        ref = [q(x) for x in data]
        tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
        out = [q(x) for x in data]
    order = [q[0], q[2], q[4]]
    w = rec._fisher_weights(q, q[4], [], data, ref, damping=0.5)
    g2 = torch.cat([o.softmax(1) - r.softmax(1) for o, r in zip(out, ref)]).pow(2)
    assert torch.allclose(w, (g2 / g2.mean() + 0.5) / 1.5, rtol=1e-4, atol=1e-6)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    # Earlier units: the later QModules run in BYPASSED while the gradient is taken, and get their mode back.
    w0 = rec._fisher_weights(q, q[0], order[1:], data, ref, damping=0.0)
    assert w0.shape == (len(data) * 32, 16) and w0.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert all(m.qstate is tq.QModuleState.QUANT_EVAL for m in order)


def test_brecq_uses_the_fisher_loss_and_learns_act_steps_by_default(monkeypatch):
    q = _mlp()
    data = _data()
    tq.calibrate(q, data, progress=False)
    obs = q[2].acts_quantizer.range_observer
    before = obs.max_val.clone()
    calls = []
    orig = rec._fisher_weights
    monkeypatch.setattr(rec, "_fisher_weights", lambda *a, **k: calls.append(1) or orig(*a, **k))
    tq.ptq.brecq(q, data, blocks=["2"], act_lr=1e-2, **FAST)
    assert len(calls) == 3  # one per unit
    assert not torch.equal(obs.max_val, before)  # learned step written back
    q2 = _mlp()
    tq.calibrate(q2, data, progress=False)
    tq.ptq.brecq(q2, data, blocks=["2"], learn_act_step=False, loss="mse", **FAST)
    assert torch.equal(q2[2].acts_quantizer.range_observer.max_val, before)
    assert len(calls) == 3


def test_act_lr_is_relative_to_the_calibrated_step():
    # A bias-free ReLU network is positively homogeneous: with inputs scaled by 10 every activation and
    # every calibrated step is 10 times larger, the rounding problem is the same and Adam is invariant
    # to the gradients' scale, so a relative act_lr learns steps exactly 10 times larger.
    def build():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
        return tq.quantize_model(net.eval(), W4, A8, method="swap")

    data = _data()
    ranges = []
    for scale in (1.0, 10.0):
        q = build()
        scaled = [x * scale for x in data]
        tq.calibrate(q, scaled, progress=False)
        tq.ptq.qdrop(q, scaled, blocks=["2"], act_lr=1e-2, seed=3, **FAST)
        ranges.append(torch.stack([q[i].acts_quantizer.range_observer.max_val.reshape(()) for i in (0, 2)]))
    assert torch.allclose(ranges[1], 10 * ranges[0], rtol=1e-3), ranges


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        y = self.a(x)
        y += 1  # in place on a unit's output
        return self.b(torch.relu_(y))


def test_fisher_loss_allows_in_place_ops_on_unit_outputs():
    torch.manual_seed(0)
    q = tq.quantize_model(_InPlace().eval(), W4, A8, method="swap")
    data = _data()
    tq.calibrate(q, data, progress=False)
    losses = tq.ptq.reconstruct(q, data, loss="fisher", **FAST)
    assert list(losses) == ["a", "b"]


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)

    def forward(self, x):
        return {"logits": self.a(x)}


def test_fisher_loss_needs_logits():
    q = tq.quantize_model(_DictOut().eval(), W4, A8, method="swap")
    data = _data()
    tq.calibrate(q, data, progress=False)
    before = _weights(q)
    with pytest.raises(ValueError, match="pass loss='mse'"):
        tq.ptq.brecq(q, data, blocks=["a"], **FAST)
    assert _same(before, _weights(q))
    tq.ptq.brecq(q, data, blocks=["a"], loss="mse", **FAST)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("method", ["adaround", "qdrop-layers"])
def test_a_half_precision_model_learns_its_rounding_in_float32(dtype, method):
    # Adam on float16 rounding variables gave NaN at its first step; in bfloat16 half of them never moved.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    data = _data(n=4, shape=(32, 64))
    x = torch.cat(data)
    with torch.no_grad():
        fp = net(x)
    q = tq.quantize_model(net.to(dtype), W4, A8 if method != "adaround" else None, method="swap")
    tq.calibrate(q, [d.to(dtype) for d in data], progress=False)
    with torch.no_grad(), tq.qmodule_state(q, tq.QModuleState.QUANT_EVAL):
        err_nearest = (q(x.to(dtype)).float() - fp).pow(2).mean()
    drop = {} if method == "adaround" else dict(act_quant=True, learn_act_step=True, drop_prob=0.5)  # QDrop, per layer
    losses = tq.ptq.reconstruct(q, [d.to(dtype) for d in data], iters=100, lr=1e-2, progress=False, **drop)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert q[0].layer.weight.dtype == dtype
    with torch.no_grad(), tq.qmodule_state(q, tq.QModuleState.QUANT_EVAL):
        err = (q(x.to(dtype)).float() - fp).pow(2).mean()
    assert err < err_nearest, (err, err_nearest)


def test_a_weight_shared_with_another_module_keeps_round_to_nearest():
    # Tied weights (an LM's lm_head and embed_tokens, a module listed twice): writing a rounded weight
    # into the shared parameter would change the other holder too.
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), shared, nn.ReLU(), shared).eval()
    q = tq.quantize_model(net, W4, None, method="swap")
    assert q[2].layer.weight is q[4].layer.weight
    data = _data(n=4)
    tq.calibrate(q, data, progress=False)
    before = q[2].layer.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"2 layer\(s\) share their weight.*2 \(with 4.layer.weight\)"):
        losses = tq.ptq.adaround(q, data, **FAST)
    assert sorted(losses) == ["0"] and torch.equal(q[2].layer.weight, before)


def test_a_layer_called_twice_per_forward_learns_from_every_call(monkeypatch):
    # Weights shared across depth (ALBERT): the unit's rows are those of both calls, its targets both outputs.
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.shared = nn.Linear(8, 16), nn.Linear(16, 16)

        def forward(self, x):
            return self.shared(torch.relu(self.shared(torch.relu(self.first(x)))))

    torch.manual_seed(0)
    q = tq.quantize_model(Twice().eval(), W4, None, method="swap")
    data = _data(n=2)
    tq.calibrate(q, data, progress=False)
    rows = {}
    original = rec._reconstruct_unit

    def spy(unit, x_q, x_fp, y_fp, *args, **kwargs):
        rows[type(unit.layer).__name__ + str(unit.layer.in_features)] = (x_q.shape[0], y_fp.shape[0])
        return original(unit, x_q, x_fp, y_fp, *args, **kwargs)

    monkeypatch.setattr(rec, "_reconstruct_unit", spy)
    for fisher in (False, True):
        losses = tq.ptq.reconstruct(q, data, loss="fisher" if fisher else "mse", **FAST)
        assert sorted(losses) == ["first", "shared"]
        assert rows == {"Linear8": (64, 64), "Linear16": (128, 128)}  # 2 batches of 32 rows, twice for `shared`
