"""SmoothQuant: the paper's scales, folded into a norm or a linear layer with the float model
unchanged, better static W8A8 on outlier activations, options and errors."""

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.ptq import SmoothQuantResult, smoothing_scales, smoothquant

S = tq.QModuleState
D, HID, N = 32, 48, 256


class _MLPBlock(nn.Module):
    """RMS-style norm -> gate/up -> SiLU(gate) * up -> down: two smoothable groups, one after a
    normalisation (``gate, up``) and one after a linear layer (``down`` after ``up``)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.gate = nn.Linear(D, HID)
        self.up = nn.Linear(D, HID)
        self.down = nn.Linear(HID, D)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g)


def _model(acts=True, seed=0):
    torch.manual_seed(seed)
    net = _MLPBlock()
    with torch.no_grad():  # outlier channels after the norm and in up's output
        net.norm.weight.copy_(torch.ones(D))
        net.norm.weight[[2, 9]] = 40.0
        net.up.weight[[5, 30]] *= 30.0
    w8 = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)  # noqa: E731
    a8 = (lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax())) if acts else None
    return tq.quantize_model(net, w8, a8, method="swap")


def _float(q, x):
    with torch.no_grad(), tq.qmodule_state(q, S.BYPASSED):
        return q(x)


def _group_inputs(q, x):
    """``(n, in)`` inputs of ``gate`` and ``down`` in the float model."""
    seen = {}
    hooks = [
        getattr(q, n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach().clone()))
        for n in ("gate", "down")
    ]
    _float(q, x)
    for h in hooks:
        h.remove()
    return seen


def test_scales_fold_into_the_norm_and_the_linear_layer_and_leave_the_float_model_unchanged():
    q, x = _model(), _inputs()
    before = _float(q, x)
    res = smoothquant(q, [x], progress=False)
    assert isinstance(res, SmoothQuantResult)
    assert res.folded == {"gate,up": "norm", "down": "up"} and res.skipped == {}
    # float32 reassociation only: errors relative to the outputs' scale
    torch.testing.assert_close(_float(q, x), before, rtol=1e-5, atol=1e-6 * float(before.abs().max()))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8])
def test_scales_are_the_papers(alpha):
    """``s_j = max|X_j|^alpha / max|W_:j|^(1-alpha)``: weight columns times ``s``, inputs divided by it."""
    q, x = _model(), _inputs()
    X = _group_inputs(q, x)
    Wg, Wu, Wd = (getattr(q, n).layer.weight.detach().clone() for n in ("gate", "up", "down"))
    s_gu = X["gate"].abs().amax(0).pow(alpha) / torch.cat([Wg, Wu]).abs().amax(0).pow(1 - alpha)
    s_d = X["down"].abs().amax(0).pow(alpha) / Wd.abs().amax(0).pow(1 - alpha)
    res = smoothquant(q, [x], alpha=alpha, progress=False)
    torch.testing.assert_close(q.gate.layer.weight.detach(), Wg * s_gu)
    torch.testing.assert_close(q.down.layer.weight.detach(), Wd * s_d)
    torch.testing.assert_close(_group_inputs(q, x)["gate"], X["gate"] / s_gu, rtol=1e-5, atol=1e-5)
    assert res.max_scale["gate,up"] == pytest.approx(float(s_gu.max()), rel=1e-6)


def test_smoothing_scales_leave_dead_channels_at_one():
    s = smoothing_scales(torch.tensor([0.0, 4.0, 9.0]), torch.tensor([1.0, 0.0, 1.0]), 0.5)
    assert s.tolist() == [1.0, 1.0, 3.0]


def test_smoothquant_lowers_static_w8a8_error_on_outlier_activations():
    x = _inputs()
    errors = {}
    for name in ("plain", "smoothquant"):
        q = _model()
        ref = _float(q, x)
        if name == "smoothquant":
            smoothquant(q, [x], progress=False)
        tq.calibrate(q, [x], progress=False)
        with torch.no_grad(), tq.qmodule_state(q, S.QUANT_EVAL):
            errors[name] = float((q(x) - ref).pow(2).mean())
    assert errors["smoothquant"] < 0.5 * errors["plain"], errors


def test_norms_only_skips_groups_after_a_linear_layer():
    q = _model()
    res = smoothquant(q, [_inputs()], targets="norms", progress=False)
    assert res.folded == {"gate,up": "norm"}
    assert res.skipped == {"down": "its input comes from up, not a normalisation (targets='norms')"}


class _Router(nn.Module):
    def __init__(self, squash: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, D))
        self.squash = squash

    def forward(self, h):
        h = h.view(-1, D)
        return nn.functional.linear(h.tanh() if self.squash else h, self.weight).softmax(-1)


class _Routed(_MLPBlock):
    """The norm's output also feeds a router with a bare weight (DeepSeek / GLM MoE blocks: shared experts,
    router and routed experts all read it): the router's columns must take the inverse scales."""

    def __init__(self, squash: bool = False):
        super().__init__()
        self.router = _Router(squash)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h)) * self.router(h)[:, :1]


@pytest.mark.parametrize("squash", [False, True], ids=["linear-router", "tanh-router"])
def test_a_norm_that_a_router_reads_too_is_scaled_only_when_the_router_compensates(squash):
    torch.manual_seed(0)
    net = _Routed(squash)
    with torch.no_grad():
        net.norm.weight.copy_(torch.rand(D) * 10)
    w8 = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)  # noqa: E731
    q = tq.quantize_model(net, w8, lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()), method="swap")
    x = _inputs()
    before = _float(q, x)
    router = q.router.weight.detach().clone()
    res = smoothquant(q, [x], progress=False)
    if squash:  # tanh(h / s) is not tanh(h) / s: nothing can take the scale back
        assert res.folded == {"down": "up"}
        assert "changes the block's output" in res.skipped["gate,up"]
        assert torch.equal(q.router.weight, router)
    else:
        assert res.folded == {"gate,up": "norm", "down": "up"}
        s = q.router.weight.detach() / router  # the router's columns took the scales
        assert torch.allclose(s, s[:1].expand_as(s)) and not torch.allclose(s, torch.ones_like(s))
    torch.testing.assert_close(_float(q, x), before, rtol=1e-5, atol=1e-6 * float(before.abs().max()))


@pytest.mark.parametrize(
    "opts, match", [({"alpha": 1.5}, "alpha"), ({"alpha": True}, "alpha"), ({"targets": "some"}, "targets")]
)
def test_bad_options_are_refused(opts, match):
    with pytest.raises(ValueError, match=match):
        smoothquant(_model(), [_inputs()], progress=False, **opts)


class _Shared(nn.Module):
    """``inp``, then ``layer`` applied ``n`` times (weights shared across depth); with ``residual``, ``inp``'s output
    is also added to the result (ALBERT's input projection feeds the residual stream)."""

    def __init__(self, n: int = 1, residual: bool = False) -> None:
        super().__init__()
        self.inp, self.layer, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.n, self.residual = n, residual

    def forward(self, x):
        h = first = self.inp(x)
        for _ in range(self.n):
            h = torch.tanh(self.layer(h))
        return self.out(h + first if self.residual else h)


@pytest.mark.parametrize(("n", "residual"), [(1, False), (3, False), (1, True)], ids=["once", "thrice", "residual"])
@pytest.mark.parametrize("algo", ["smoothquant", "awq"])
def test_a_scale_is_folded_into_a_layer_only_when_the_float_model_stays_the_same(algo, n, residual):
    # Folded into `inp`, the scale of `layer`'s input would miss the later calls of a shared `layer`, and
    # change the residual that reads `inp`'s output too.
    torch.manual_seed(0)
    net = _Shared(n, residual).eval()
    x = torch.randn(64, 8) * torch.logspace(-1, 1, 8)
    with torch.no_grad():
        ref = net(x)
    w8 = lambda m, name: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)  # noqa: E731
    q = tq.quantize_model(net, w8, lambda m, name: tq.AffineQuantizer(8, tq.RunningMinMax()), method="swap")
    res = tq.ptq.smoothquant(q, [x], progress=False) if algo == "smoothquant" else tq.ptq.awq(q, [x], clip=False)
    with torch.no_grad(), tq.qmodule_state(q, tq.QModuleState.BYPASSED):
        change = float((q(x) - ref).abs().max())
    scaled = res.folded if algo == "smoothquant" else res.exponents
    assert ("layer" in scaled) == (n == 1 and not residual), (scaled, res.skipped)
    if n > 1:
        assert "called 3 times per forward pass" in res.skipped["layer"]
    assert change < 1e-5, change  # the float function is the same (AWQ without its clipping)


def test_activation_ranges_observed_before_smoothquant_are_reset_with_a_warning():
    x = _inputs()
    q = _model()
    tq.calibrate(q, [x], progress=False)
    with pytest.warns(UserWarning, match=r"smoothquant: 3 activation .* gate\.acts_quantizer"):
        smoothquant(q, [x], progress=False)
    assert not q.gate.acts_quantizer.range_observer.initialized
    assert q.gate.weight_quantizer.range_observer.initialized  # weights were observed again, not reset
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    with pytest.raises(RuntimeError, match="no ranges yet"):
        q(x)
    fresh = _model()  # calibrating afterwards gives what smoothquant-then-calibrate gives
    smoothquant(fresh, [x], progress=False)
    for m in (q, fresh):
        tq.calibrate(m, [x], progress=False)
        tq.set_qmodule_state(m, S.QUANT_EVAL)
    with torch.no_grad():
        torch.testing.assert_close(q(x), fresh(x), rtol=0, atol=0)


class _AttentionThenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        h, _ = self.mha(x, x, x)
        return self.fc(self.norm(h))


@pytest.mark.parametrize("algorithm", ["smoothquant", "awq"])
def test_the_weight_ranges_of_multihead_attention_are_not_reset_as_activations(algorithm):
    torch.manual_seed(0)
    net = _AttentionThenMLP()
    with torch.no_grad():
        net.norm.weight[[1, 3]] = 30.0
    w4 = lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=True)  # noqa: E731
    q = tq.quantize_model(net, w4, None, method="swap")
    x = torch.randn(4, 8, 16)
    tq.calibrate(q, [x], progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # weight-only: nothing to reset, nothing to say
        getattr(tq.ptq, algorithm)(q, [x], progress=False, blocks="")
    assert q.mha.in_proj_quantizer.range_observer.initialized
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    assert q(x).shape == (4, 8, 16)
