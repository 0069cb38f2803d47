"""BatchNorm folding: QWrapper(fold_bn=True), freeze_bn_stats, fold_batchnorm."""

import contextlib
import copy
import io

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant import AffineQuantizer, BatchMinMax, QModuleState, QWrapper, qmodule_state

S = QModuleState

LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), nn.BatchNorm1d, (8, 6)),
    "conv1d-nobias": (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d, (4, 3, 9)),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.BatchNorm2d, (4, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 2, padding=1), nn.BatchNorm3d, (2, 2, 4, 5, 5)),
}


def randomise_bn(bn):
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return bn


def make(kind, act=True, fold=True, n_bits=8):
    ctor, bn_cls, shape = LAYERS[kind]
    layer = ctor()
    n_out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    seq = [layer, randomise_bn(bn_cls(n_out))] + ([nn.ReLU()] if act else [])
    ref = nn.Sequential(*copy.deepcopy(seq))
    w = QWrapper(seq, weight_quantizer=AffineQuantizer(n_bits, BatchMinMax(axis=0), symmetric=True), fold_bn=fold)
    return w, ref, torch.randn(shape)


def bshape(y):
    return (1, -1, *([1] * (y.dim() - 2)))


def test_fold_bn_params_hand_computed():
    lin = nn.Linear(1, 2)
    bn = nn.BatchNorm1d(2, eps=0.0)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0], [-1.0]]))
        lin.bias.copy_(torch.tensor([1.0, 0.5]))
        bn.running_mean.copy_(torch.tensor([3.0, -1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]))
        bn.weight.copy_(torch.tensor([0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2]))
    folded = tq.fold_batchnorm(nn.Sequential(lin, bn).eval())
    # channel 0: s = 0.5 / 2 = 0.25, w = 0.5, b = (1 - 3) * 0.25 + 0.1 = -0.4
    # channel 1: s = 2 / 0.5 = 4, w = -4, b = (0.5 + 1) * 4 - 0.2 = 5.8
    assert torch.allclose(folded[0].weight, torch.tensor([[0.5], [-4.0]]))
    assert torch.allclose(folded[0].bias, torch.tensor([-0.4, 5.8]))
    assert isinstance(folded[1], nn.Identity)
    assert isinstance(bn, nn.BatchNorm1d) and lin.weight[0, 0] == 2.0  # the original is untouched


@pytest.mark.parametrize("kind", list(LAYERS))
def test_eval_folded_equals_float_conv_bn(kind):
    w, ref, x = make(kind)
    w.eval(), ref.eval()
    y_ref = ref(x)
    assert torch.equal(w(x), y_ref)  # bypassed: layers run unfolded
    with qmodule_state(w, S.CALIBRATION_WEIGHT_ONLY):  # folded path, weight observed, not quantized
        assert torch.allclose(w(x), y_ref, atol=1e-5)
        # the weight quantizer saw the folded weight
        w_fold, _ = tq.fold_bn_params(ref[0].weight, ref[0].bias, ref[1])
        mn, mx = w.weight_quantizer.range_observer.get_ranges()
        assert torch.allclose(mx.flatten(), w_fold.flatten(1).max(1).values)
        assert torch.allclose(mn.flatten(), w_fold.flatten(1).min(1).values)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_eval_quantized_uses_quantized_folded_weight(kind):
    w, ref, x = make(kind, act=False, n_bits=4)
    w.eval(), ref.eval()
    w_fold, b_fold = tq.fold_bn_params(ref[0].weight, ref[0].bias, ref[1])
    q = AffineQuantizer(4, BatchMinMax(axis=0), symmetric=True)
    q.pre_observe(w_fold)
    expected = w._layer_with(x, q(w_fold), b_fold)
    with qmodule_state(w, S.QUANT_AWARE_TRAIN):
        y = w(x)
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.allclose(w.quantized_weight(), w_fold, atol=1e-6)  # BYPASSED now: float folded weight
    with qmodule_state(w, S.QUANT_EVAL):
        assert torch.allclose(w.quantized_weight(), q(w_fold), atol=1e-6)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_training_matches_batchnorm_and_updates_running_stats(kind):
    w, ref, x = make(kind)
    w.train(), ref.train()
    with qmodule_state(w, S.CALIBRATION_WEIGHT_ONLY):  # weights folded and observed, not quantized
        y = w(x)
    assert torch.allclose(y, ref(x), atol=1e-5)  # batch statistics, as BatchNorm in training
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(w.bn, name), getattr(ref[1], name), atol=1e-6), name


def test_training_formula_quantized_hand_computed():
    """Krishnamoorthi 2018 fig. 8: conv(x, Q(W g / sigma)) * sigma / sigma_B + beta + g (b - mu_B) / sigma_B."""
    w, ref, x = make("conv2d-grouped", act=False, n_bits=3)
    w.train()
    bn = ref[1]
    y_float = ref[0](x)
    mu_b = y_float.mean((0, 2, 3))
    var_b = y_float.var((0, 2, 3), unbiased=False)
    n = y_float.numel() / y_float.shape[1]
    m = bn.momentum
    run_var = (1 - m) * bn.running_var + m * var_b * n / (n - 1)
    sigma, sigma_b = torch.sqrt(run_var + bn.eps), torch.sqrt(var_b + bn.eps)
    w_fold = ref[0].weight * (torch.rsqrt(run_var + bn.eps) * bn.weight).reshape(-1, 1, 1, 1)
    q = AffineQuantizer(3, BatchMinMax(axis=0), symmetric=True)
    q.pre_observe(w_fold)
    conv = ref[0]._conv_forward(x, q(w_fold), None)
    expected = conv * (sigma / sigma_b).reshape(bshape(conv)) + (
        bn.bias + bn.weight * (ref[0].bias - mu_b) / sigma_b
    ).reshape(bshape(conv))
    with qmodule_state(w, S.QUANT_AWARE_TRAIN):
        y = w(x)
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.allclose(w.bn.running_var, run_var)
    assert torch.allclose(w.weight_quantizer.range_observer.get_ranges()[1].flatten(), w_fold.flatten(1).amax(1))


def test_qat_training_step_runs_and_learns():
    torch.manual_seed(0)
    model = nn.Sequential(
        QWrapper(
            [nn.Conv2d(3, 8, 3, padding=1), randomise_bn(nn.BatchNorm2d(8)), nn.ReLU()],
            AffineQuantizer(4, BatchMinMax(axis=0), symmetric=True),
            AffineQuantizer(8, tq.ExpAvgMinMax()),
            fold_bn=True,
        ),
        nn.Flatten(),
        QWrapper([nn.Linear(8 * 4 * 4, 4), nn.BatchNorm1d(4)], AffineQuantizer(4, BatchMinMax(axis=0)), fold_bn=True),
    ).train()
    tq.set_qmodule_state(model, S.QUANT_AWARE_TRAIN)
    x, target = torch.randn(16, 3, 4, 4), torch.randint(0, 4, (16,))
    before = model[0].bn.running_mean.clone()
    losses = []
    for _ in range(5):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        with torch.no_grad():  # plain SGD (torch.optim would import torch._dynamo: slow)
            for p in model.parameters():
                p -= 0.1 * p.grad
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(model[0].bn.running_mean, before)
    assert model[0].bn.num_batches_tracked.item() == 5
    for p in (model[0].layer.weight, model[0].bn.weight, model[0].bn.bias, model[2].layer.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_freeze_bn_stats_uses_and_keeps_running_stats():
    w, ref, x = make("conv2d-grouped", n_bits=4)
    model = nn.Sequential(w).train()
    assert tq.freeze_bn_stats(model) == 1
    stats = {k: v.clone() for k, v in w.bn.named_buffers()}
    with qmodule_state(model, S.QUANT_AWARE_TRAIN):
        y_train = model(x)
        model.eval()
        y_eval = model(x)
    assert torch.equal(y_train, y_eval)  # frozen training = eval formula
    for k, v in w.bn.named_buffers():
        assert torch.equal(v, stats[k]), k  # no update
    with qmodule_state(model, S.BYPASSED):  # unfolded path frozen too
        model.train()
        assert torch.allclose(model(x), ref.eval()(x), atol=1e-6)
    assert torch.equal(w.bn.running_mean, stats["running_mean"])
    tq.freeze_bn_stats(model, frozen=False)
    with qmodule_state(model, S.QUANT_AWARE_TRAIN):
        model(x)
    assert not torch.equal(w.bn.running_mean, stats["running_mean"])


def test_freeze_without_folded_wrappers_raises():
    with pytest.raises(ValueError, match="fold_bn=True"):
        tq.freeze_bn_stats(nn.Sequential(QWrapper([nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)])))


def test_state_dict_round_trip_keeps_frozen_flag():
    w, _, x = make("conv1d-nobias")
    w.train()
    with qmodule_state(w, S.QUANT_AWARE_TRAIN):
        w(x)
    w.set_bn_frozen(True)
    buf = io.BytesIO()
    torch.save(w.state_dict(), buf)
    buf.seek(0)
    fresh, _, _ = make("conv1d-nobias")
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert fresh._bn_frozen and bool(fresh.bn_frozen)
    fresh.eval(), w.eval()
    with qmodule_state(w, S.QUANT_EVAL), qmodule_state(fresh, S.QUANT_EVAL):
        assert torch.equal(w(x), fresh(x))
    # fold_bn=False state dicts are unchanged (no bn_frozen key)
    plain = QWrapper([nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5)])
    assert "bn_frozen" not in plain.state_dict()


def test_bad_fold_bn_configurations():
    with pytest.raises(ValueError, match="fold_bn=True needs a BatchNorm"):
        QWrapper(nn.Linear(2, 2), fold_bn=True)
    with pytest.raises(ValueError, match="running statistics"):
        QWrapper([nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)], fold_bn=True)
    with pytest.raises(ValueError, match="set_bn_frozen needs fold_bn=True"):
        QWrapper([nn.Linear(2, 2), nn.BatchNorm1d(2)]).set_bn_frozen()


def test_fold_batchnorm_qwrappers_and_sequentials():
    torch.manual_seed(0)
    folded_w, _, _ = make("conv2d-grouped")
    plain_w = QWrapper([nn.Conv2d(6, 6, 1), randomise_bn(nn.BatchNorm2d(6))], AffineQuantizer(8, BatchMinMax(axis=0)))
    model = nn.Sequential(
        folded_w,
        plain_w,
        nn.Sequential(nn.Conv2d(6, 4, 1, bias=False), randomise_bn(nn.BatchNorm2d(4)), nn.ReLU()),
        nn.Sequential(nn.ConvTranspose2d(4, 3, 2, stride=2), randomise_bn(nn.BatchNorm2d(3))),
        nn.BatchNorm2d(3),  # follows no layer inside its Sequential: stays
    ).eval()
    randomise_bn(model[4])
    x = torch.randn(2, 4, 6, 6)
    f = tq.fold_batchnorm(model)
    assert torch.allclose(f(x), model(x), atol=1e-5)
    assert f[0].bn is None and not f[0].fold_bn and "bn_frozen" not in f[0].state_dict()
    assert f[1].bn is None and f[1].layer.bias is not None
    assert isinstance(f[2][1], nn.Identity) and f[2][0].bias is not None
    assert isinstance(f[3][1], nn.Identity)
    assert isinstance(f[4], nn.BatchNorm2d)
    assert model[0].bn is not None  # deep copy: the original keeps its BatchNorms
    with qmodule_state(f, S.CALIBRATION), qmodule_state(model, S.CALIBRATION):
        assert torch.allclose(f(x), model(x), atol=1e-5)


class AttrNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = randomise_bn(nn.BatchNorm2d(4))
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = randomise_bn(nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn(self.conv(x))))
        return self.bn2(y) + y  # conv2's output has two users: bn2 must stay


def _randomized(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    return bn


def test_fold_batchnorm_keeps_the_batchnorm_of_a_layer_used_elsewhere():
    # one conv with a BatchNorm per domain, and a Sequential listing one conv twice: folding changed the other uses
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)

    class Domains(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(conv, _randomized(nn.BatchNorm2d(3)))
            self.b = nn.Sequential(conv, _randomized(nn.BatchNorm2d(3)))

        def forward(self, x):
            return self.a(x) + self.b(x)

    other = nn.Conv2d(3, 3, 3, padding=1)
    twice = nn.Sequential(other, _randomized(nn.BatchNorm2d(3)), other)
    x = torch.randn(2, 3, 6, 6)
    for net, kept in ((Domains().eval(), "a.0, b.0"), (twice.eval(), "0")):
        with pytest.warns(UserWarning, match=f"fold_batchnorm: {kept} kept their BatchNorm"):
            folded = tq.fold_batchnorm(net)
        torch.testing.assert_close(folded(x), net(x), rtol=0, atol=0)
    wrapped = nn.Sequential(QWrapper([conv, _randomized(nn.BatchNorm2d(3))]), QWrapper(conv))  # swap of a shared conv
    with pytest.warns(UserWarning, match="0.layer kept"):
        assert tq.fold_batchnorm(wrapped)[0].bn is not None


def test_fold_batchnorm_traced_keeps_the_batchnorms_of_convs_that_share_a_weight():
    # the traced pass counted calls only: it folded both BatchNorms into the one tied weight (error 2.0)
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_a, self.conv_b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
            self.conv_b.weight = self.conv_a.weight
            self.bn_a, self.bn_b = _randomized(nn.BatchNorm2d(4)), _randomized(nn.BatchNorm2d(4))

        def forward(self, x, y):
            return self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(y))

    torch.manual_seed(0)
    net = Tied().eval()
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="conv_a, conv_b kept their BatchNorm"):
        folded = tq.fold_batchnorm(net, trace=True)
    torch.testing.assert_close(folded(x, y), net(x, y), rtol=0, atol=0)


def test_fold_batchnorm_traced():
    model = AttrNet().eval()
    x = torch.randn(2, 3, 8, 8)
    assert isinstance(tq.fold_batchnorm(model).bn, nn.BatchNorm2d)  # not in a Sequential: untouched
    f = tq.fold_batchnorm(model, trace=True)
    assert isinstance(f, torch.fx.GraphModule)
    kept = [n for n, m in f.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert kept == ["bn2"]
    assert torch.allclose(f(x), model(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize("fold", [True, "one_pass"])
def test_torch_compile_folded_wrapper(fold):
    """Compiled training gives eager's outputs, statistics and gradients (one pass reads the running variance
    before updating it: a backward re-reading the buffer would see the updated one)."""
    w, _, x = make("conv2d-grouped", n_bits=4, fold=fold)
    w.train()
    tq.set_qmodule_state(w, S.QUANT_AWARE_TRAIN)
    eager = copy.deepcopy(w)
    compiled = torch.compile(w)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = compiled(xc), eager(xe)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(w.bn.running_var, eager.bn.running_var)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(xc.grad, xe.grad, rtol=1e-4, atol=1e-4)
    for (name, p), p_ref in zip(w.named_parameters(), eager.parameters(), strict=True):
        if name == "layer.bias":  # BatchNorm cancels it: rounding noise (None under eager one pass)
            assert all(t is None or t.abs().max() < 1e-4 for t in (p.grad, p_ref.grad)), name
            continue
        assert torch.allclose(p.grad, p_ref.grad, rtol=1e-4, atol=1e-3 * p_ref.grad.abs().max()), name


# ------------------------------------------------------------------ fold_bn="one_pass"
def make_one_pass(kind, n_bits=8):
    return make(kind, act=False, fold="one_pass", n_bits=n_bits)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_one_pass_training_without_quantization_is_batchnorm(kind):
    """With the weight observed but not quantized, one pass is BatchNorm in training: output, statistics, gradients."""
    w, ref, x = make_one_pass(kind)
    assert w.fold_bn and w.fold_bn_mode == "one_pass"
    w.train(), ref.train()
    xw, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with qmodule_state(w, S.CALIBRATION_WEIGHT_ONLY):
        y = w(xw)
    y_ref = ref(xr)
    assert torch.allclose(y, y_ref, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(w.bn, name), getattr(ref[1], name), atol=1e-6), name
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(xw.grad, xr.grad, atol=1e-5)
    for (name, p), p_ref in zip(w.named_parameters(), ref.parameters(), strict=True):
        grad = torch.zeros_like(p) if p.grad is None else p.grad  # the layer's bias: BatchNorm cancels it
        assert torch.allclose(grad, p_ref.grad, atol=1e-4), name


def test_one_pass_quantized_is_batchnorm_of_the_quantized_conv():
    """torch.ao's ConvBn QAT: BatchNorm in training on conv(x, Q(W g / sigma)) * sigma / g + b (sigma before update)."""
    w, ref, x = make_one_pass("conv2d-grouped", n_bits=3)
    w.train()
    conv, bn = ref[0], ref[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w_fold = conv.weight * scale.reshape(-1, 1, 1, 1)
    q = AffineQuantizer(3, BatchMinMax(axis=0), symmetric=True)
    q.pre_observe(w_fold)
    u = conv._conv_forward(x, q(w_fold), None) / scale.reshape(1, -1, 1, 1) + conv.bias.reshape(1, -1, 1, 1)
    run_mean, run_var = bn.running_mean.clone(), bn.running_var.clone()
    expected = nn.functional.batch_norm(u, run_mean, run_var, bn.weight, bn.bias, True, bn.momentum, bn.eps)
    with qmodule_state(w, S.QUANT_AWARE_TRAIN):
        y = w(x)
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.allclose(w.bn.running_mean, run_mean, atol=1e-6)
    assert torch.allclose(w.bn.running_var, run_var, atol=1e-6)
    assert int(w.bn.num_batches_tracked) == 1


def test_one_pass_zero_gamma_channel_stays_finite_and_keeps_its_statistics():
    w, ref, x = make_one_pass("conv2d-grouped", n_bits=4)
    with torch.no_grad():
        w.bn.weight[0] = 0.0
    before_mean, before_var = w.bn.running_mean.clone(), w.bn.running_var.clone()
    w.train()
    with qmodule_state(w, S.QUANT_AWARE_TRAIN):
        y = w(x)
    assert torch.isfinite(y).all()
    assert torch.allclose(y[:, 0], torch.full_like(y[:, 0], w.bn.bias[0].item()), atol=1e-6)  # gamma 0: beta
    assert w.bn.running_mean[0] == before_mean[0] and w.bn.running_var[0] == before_var[0]
    assert not torch.equal(w.bn.running_mean[1:], before_mean[1:])
    assert not torch.equal(w.bn.running_var[1:], before_var[1:])
    y.square().sum().backward()
    for name, p in w.named_parameters():
        assert name == "layer.bias" or torch.isfinite(p.grad).all(), name  # BatchNorm cancels the layer's bias
    # unquantized, gamma's gradient at 0 is BatchNorm's with the running variance: sum(dL/dy * (u - mu_B) / sigma)
    w.zero_grad()
    with qmodule_state(w, S.CALIBRATION_WEIGHT_ONLY):
        y = w(x)
    g = torch.randn_like(y)
    y.backward(g)
    u = ref[0](x)[:, 0]
    sigma = torch.sqrt(before_var[0] + w.bn.eps)
    expected = (g[:, 0] * (u - u.mean()) / sigma).sum()
    assert torch.allclose(w.bn.weight.grad[0], expected, rtol=1e-4, atol=1e-5)


def test_one_pass_eval_and_frozen_equal_two_pass():
    one, ref, x = make_one_pass("conv1d-nobias", n_bits=4)
    two = QWrapper(
        [copy.deepcopy(ref[0]), copy.deepcopy(ref[1])],
        AffineQuantizer(4, BatchMinMax(axis=0), symmetric=True),
        fold_bn=True,
    )
    for m in (one, two):
        m.set_bn_frozen(True)
        m.train()
    with qmodule_state(one, S.QUANT_AWARE_TRAIN), qmodule_state(two, S.QUANT_AWARE_TRAIN):
        assert torch.equal(one(x), two(x))
        one.eval(), two.eval()
        assert torch.equal(one(x), two(x))
    assert "fold_bn='one_pass'" in repr(one) and "fold_bn=True" in repr(two)


def test_one_pass_reaches_every_converter_and_checkpoints(tmp_path):
    from torchvision.models import resnet18

    from torchquant.models import FusedResNet

    def wf(m):
        return AffineQuantizer(8, BatchMinMax(axis=0), symmetric=True)

    def af(m):
        return AffineQuantizer(8, tq.ExpAvgMinMax())

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    for method in ("fx", "swap"):
        q = tq.quantize_model(copy.deepcopy(net), wf, af, method=method, fold_bn="one_pass")
        modes = [(m.fold_bn, m.fold_bn_mode) for m in q.modules() if isinstance(m, QWrapper)]
        assert modes == [(True, "one_pass"), (False, "two_pass")], method
    fused = FusedResNet(resnet18(num_classes=3), wf, af, fold_bn="one_pass")
    assert {m.fold_bn_mode for m in fused.modules() if isinstance(m, QWrapper) and m.fold_bn} == {"one_pass"}

    q = tq.quantize_model(copy.deepcopy(net), wf, af, fold_bn="one_pass")
    tq.save(q, tmp_path / "m.safetensors")
    loaded = tq.load(copy.deepcopy(net), tmp_path / "m.safetensors")
    assert [m.fold_bn_mode for m in loaded.modules() if isinstance(m, QWrapper) and m.fold_bn] == ["one_pass"]


@pytest.mark.parametrize("bad", ["approximate", 1, "True"])
def test_bad_fold_bn_values_are_refused_naming_the_caller(bad):
    from torchvision.models import resnet18

    from torchquant.models import FusedResNet

    with pytest.raises(ValueError, match=r"QWrapper: fold_bn must be False, True, 'two_pass' or 'one_pass'"):
        QWrapper([nn.Linear(2, 2), nn.BatchNorm1d(2)], fold_bn=bad)
    with pytest.raises(ValueError, match="quantize_model: fold_bn must be"):
        tq.quantize_model(nn.Sequential(nn.Linear(2, 2)), None, None, fold_bn=bad)
    with pytest.raises(ValueError, match="FusedResNet: fold_bn must be"):
        FusedResNet(resnet18(num_classes=3), None, None, fold_bn=bad)
    with pytest.raises(ValueError, match="fold_bn='one_pass' needs a BatchNorm"):
        QWrapper(nn.Linear(2, 2), fold_bn="one_pass")


def test_wrapper_pickled_before_the_one_pass_mode_is_two_pass():
    w, _, _ = make("linear")
    del w.__dict__["fold_bn_mode"]
    buf = io.BytesIO()
    torch.save(w, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.fold_bn_mode == "two_pass"


@pytest.mark.parametrize("kind", list(LAYERS))
def test_the_folded_weight_alone_is_the_folded_params_weight(kind):
    w, _, _ = make(kind)
    assert torch.equal(w._folded_weight(), w._folded_params()[0])  # training and export see one weight


def test_one_pass_channel_whose_quantized_weight_rounds_to_zero_is_not_amplified():
    """A tiny gamma makes a folded weight row round to 0 (the grid's step has a floor): the quantized output has no
    variance, and BatchNorm would divide its gradient by sqrt(eps). It outputs beta, keeps its running statistics
    and gets gradients of the float BatchNorm's size."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), randomise_bn(nn.BatchNorm2d(4))
    x = torch.randn(8, 3, 6, 6)
    with torch.no_grad():
        bn.weight[0] = 1e-8
        bn.running_var.copy_(conv(x).var((0, 2, 3)))  # running statistics of the float layer: sigma ~ sigma_B
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn)).train()
    w = QWrapper([conv, bn], AffineQuantizer(4, BatchMinMax(axis=0), symmetric=True), fold_bn="one_pass").train()
    before = bn.running_var[0].item(), bn.running_mean[0].item()
    g = torch.randn(8, 4, 6, 6)
    with qmodule_state(w, S.QUANT_AWARE_TRAIN):
        y = w(x)
        assert w.quantized_weight()[0].abs().max() == 0  # the case under test
    assert torch.allclose(y[:, 0], torch.full_like(y[:, 0], bn.bias[0].item()), atol=1e-6)
    assert (w.bn.running_var[0].item(), w.bn.running_mean[0].item()) == before
    y.backward(g)
    ref(x).backward(g)
    for p, p_ref in ((w.layer.weight, ref[0].weight), (w.bn.weight, ref[1].weight)):
        ratio = float(p.grad[0].norm() / p_ref.grad[0].norm())  # BatchNorm's 1/sqrt(eps) would make it ~100s
        assert 0.5 < ratio < 2, ratio


def test_one_pass_half_precision_small_gamma_stays_finite():
    """sigma / gamma overflows float16 for gamma below about 1e-3: the statistics are taken in float32."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), randomise_bn(nn.BatchNorm2d(4))
    with torch.no_grad():
        bn.weight[0] = 1e-5
        bn.weight[1] = 2e-3
    w = QWrapper([conv, bn], AffineQuantizer(8, BatchMinMax(axis=0), symmetric=True), fold_bn="one_pass")
    w = w.to(torch.float16).train()
    x = torch.randn(8, 3, 6, 6, dtype=torch.float16)
    with qmodule_state(w, S.QUANT_AWARE_TRAIN):
        y = w(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    y.float().square().sum().backward()
    for name, p in w.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert torch.isfinite(w.bn.running_var).all() and torch.isfinite(w.bn.running_mean).all()


@pytest.mark.parametrize("fold", [True, "one_pass"])
def test_folding_a_linear_batchnorm_needs_2d_inputs(fold):
    w = QWrapper([nn.Linear(5, 5), nn.BatchNorm1d(5)], AffineQuantizer(8, BatchMinMax(axis=0)), fold_bn=fold)
    x = torch.randn(4, 5, 5)
    w.train()
    assert w(x).shape == (4, 5, 5)  # bypassed: run unfolded, as nn.Sequential would
    with qmodule_state(w, S.QUANT_AWARE_TRAIN), pytest.raises(ValueError, match=r"Linear\+BatchNorm1d.*2-D input"):
        w(x)


@pytest.mark.parametrize("with_bias", [False, True])
def test_one_pass_unfolding_gradients_are_exact(with_bias):
    """The eager rescaling saves BatchNorm's input instead of the layer's output: float64 gradcheck against finite
    differences, second derivatives and forward mode included (a dead channel's ratio is the constant 1), and the
    traced formula's values."""
    from torchquant.qmodules import _Unfold, _unfold_plain

    torch.manual_seed(0)
    z = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    dead = torch.tensor([False, True, False, False])
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if with_bias else None

    def unfold(z, scale, *b):
        return _Unfold.apply(z, scale, dead, b[0] if b else None, torch.float64)

    inputs = (z, scale) + ((b,) if with_bias else ())
    assert torch.autograd.gradcheck(unfold, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(unfold, inputs)
    assert torch.equal(unfold(*inputs), _unfold_plain(z, scale, dead, b, torch.float64))


def test_one_pass_keeps_two_activations_of_a_layer_for_the_backward():
    """The layer's input (for its weight's gradient) and BatchNorm's input, as an unfolded Conv+BN: not the
    quantized layer's output as well."""
    w, _, x = make_one_pass("conv2d-grouped", n_bits=4)
    w.train()
    saved = {}

    def pack(t):
        if t.dim() == 4 and t.shape[0] == x.shape[0]:  # activation-sized, not a weight or a per-channel vector
            saved[t.untyped_storage().data_ptr()] = t.shape
        return t

    with qmodule_state(w, S.QUANT_AWARE_TRAIN), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = w(x.clone().requires_grad_())
    assert len(saved) == 2, list(saved.values())
    y.sum().backward()


def test_one_pass_second_derivatives_are_batchnorms():
    """A gradient penalty (double backward) through the unquantized one-pass fold gives BatchNorm's gradients."""
    w, ref, x = make_one_pass("conv2d-grouped")
    w, ref, x = w.double().train(), ref.double().train(), x.double()
    t = torch.randn_like(ref(x))
    grads = []
    for model, state in ((w, S.CALIBRATION_WEIGHT_ONLY), (ref, None)):
        xr = x.clone().requires_grad_()
        with contextlib.nullcontext() if state is None else qmodule_state(model, state):
            y = model(xr)
        (gx,) = torch.autograd.grad((y * t).sum() + y.square().sum(), xr, create_graph=True)
        gx.square().sum().backward()
        grads.append(model.bn.weight.grad if state is not None else model[1].weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9)
