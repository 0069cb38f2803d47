"""AWQ: the float model is unchanged by the scales, the scale and clipping searches against a
direct implementation of the paper's objective, better than round-to-nearest, options."""

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.ptq import AWQResult, awq

S = tq.QModuleState
IN, OUT, N = 32, 24, 256


def _inputs(seed=0):
    """``(N, IN)`` inputs with a few outlier channels (as in LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, IN, generator=g)
    x[:, [3, 17]] *= 25.0
    return x


def _w4(group_size=None):
    def obs():
        return tq.BatchMinMax(axis=0) if group_size is None else tq.BatchMinMax(axis=1, group_size=group_size)

    return lambda m, n: tq.AffineQuantizer(4, obs(), symmetric=True)


def _norm_linear(group_size=None, seed=0):
    """LayerNorm -> (Linear, Linear) reading its output: one AWQ group with a fold target."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(IN)
            self.a = nn.Linear(IN, OUT)
            self.b = nn.Linear(IN, OUT // 2)

        def forward(self, x):
            h = self.norm(x)
            return torch.cat([self.a(h), self.b(h)], -1)

    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # a non-trivial norm, so that folding has something to change
        net.norm.weight.uniform_(0.5, 2.0)
        net.norm.bias.normal_()
    return tq.quantize_model(net, _w4(group_size), None, method="swap")


def _fresh_quantize(w, group_size=None):
    """``w`` rounded by a new quantizer that observes it (what AWQ quantizes each candidate with)."""
    return tq.qmodules._run_quantizer(_w4(group_size)(None, None), w, observe=True, quantize=True)


def _norm_out(q, x):
    with torch.no_grad(), tq.qmodule_state(q, S.BYPASSED):
        return q.norm(x)


def test_scales_leave_the_float_model_unchanged():
    q = _norm_linear()
    x = _inputs()
    with torch.no_grad(), tq.qmodule_state(q, S.BYPASSED):
        before = q(x)
    res = awq(q, [x], clip=False, progress=False)
    assert isinstance(res, AWQResult) and list(res.exponents) == ["a,b"] and res.clip_ratios == {}
    assert res.exponents["a,b"] > 0  # outlier channels: some scaling is chosen
    with torch.no_grad(), tq.qmodule_state(q, S.BYPASSED):
        torch.testing.assert_close(q(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [None, 8], ids=["per-channel", "group-8"])
def test_scale_search_matches_a_direct_search(group_size):
    """The chosen exponent minimises sum over layers of mean((X/s) Q(W s)^T - X W^T)^2."""
    n_grid = 10
    q = _norm_linear(group_size)
    x = _inputs()
    X = _norm_out(q, x)  # the group's input (n, in)
    Ws = [q.a.layer.weight.detach().clone(), q.b.layer.weight.detach().clone()]
    x_mean = X.abs().mean(0)
    losses = []
    for i in range(n_grid):
        s = x_mean.pow(i / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = sum(float(((X / s) @ _fresh_quantize(W * s, group_size).t() - X @ W.t()).pow(2).mean()) for W in Ws)
        losses.append(loss)
    best = min(range(n_grid), key=losses.__getitem__)
    res = awq(q, [x], n_grid=n_grid, clip=False, progress=False)
    assert res.exponents["a,b"] == best / n_grid
    s = x_mean.pow(best / n_grid).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    torch.testing.assert_close(q.a.layer.weight.detach(), Ws[0] * s)  # the weight columns are scaled by s


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(IN, OUT), nn.Linear(IN, OUT), nn.Linear(OUT, IN)

    def forward(self, h):
        return self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class _NormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(IN), _MLP()

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def test_a_group_inside_an_mlp_is_scored_by_the_mlps_output():
    """gate and up feed down: the exponent minimises the MLP's output error with only gate and up quantized,
    each ``W`` as ``Q(W s) / s`` (the paper's objective), not the sum of the two layers' own errors."""
    n_grid = 10
    torch.manual_seed(0)
    net = _NormMLP()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 2.0)
        net.norm.weight[[3, 17]] = 20.0  # outlier channels of the MLP's input
    q = tq.quantize_model(net, _w4(8), None, method="swap")
    x = _inputs()
    X = _norm_out(q, x)
    mlp = q.mlp
    (Wg, bg), (Wu, bu) = [(m.layer.weight.detach().clone(), m.layer.bias.detach()) for m in (mlp.gate, mlp.up)]
    Wd, bd = mlp.down.layer.weight.detach(), mlp.down.layer.bias.detach()

    def out(g, u):
        return (nn.functional.silu(X @ g.t() + bg) * (X @ u.t() + bu)) @ Wd.t() + bd

    ref = out(Wg, Wu)
    x_mean = X.abs().mean(0)
    losses = []
    for i in range(n_grid):
        s = x_mean.pow(i / n_grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        losses.append(float((out(_fresh_quantize(Wg * s, 8) / s, _fresh_quantize(Wu * s, 8) / s) - ref).pow(2).mean()))
    best = min(range(n_grid), key=losses.__getitem__)
    res = awq(q, [x], n_grid=n_grid, clip=False, progress=False)
    assert res.exponents["mlp.gate,mlp.up"] == best / n_grid and best > 0


class _Attention(nn.Module):
    """Takes only its input, as RoBERTa-PreLN's self-attention does, but mixes the rows."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(IN, OUT), nn.Linear(IN, OUT // 2)

    def forward(self, h):
        a = self.a(h)
        return torch.cat([(a @ a.transpose(-1, -2) / OUT).softmax(-1) @ a, self.b(h)], -1)


class _NormAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(IN), _Attention()

    def forward(self, x):
        return self.attn(self.norm(x))


def test_a_module_that_mixes_rows_is_not_scored_by_its_output():
    """An attention module called with its input alone is the group's smallest module taking only that input,
    but it mixes the sampled rows: the layers' own error is used, the same search as without the module."""
    from torchquant.ptq.sequential import sequential_blocks

    torch.manual_seed(0)
    net = _NormAttention()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 2.0)
        net.norm.weight[[3, 17]] = 20.0  # (scored by the mixed rows, the exponent would be 0.4, not 0.15)
    q = tq.quantize_model(net, _w4(8), None, method="swap")
    x = _inputs()
    (block,) = list(sequential_blocks(q, [x], mode=S.BYPASSED, progress=False))
    assert block.row_module(block.groups()[0]) == (q.attn, 2)  # found, and refused by the check on its rows
    flat = tq.quantize_model(_norm_linear(8).eval(), _w4(8), None, method="swap")  # the same layers, no module
    for dst, src in ((flat.norm, q.norm), (flat.a.layer, q.attn.a.layer), (flat.b.layer, q.attn.b.layer)):
        dst.load_state_dict(src.state_dict())
    ours = awq(q, [x], clip=False, progress=False)
    theirs = awq(flat, [x], clip=False, progress=False)
    assert ours.exponents["attn.a,attn.b"] == theirs.exponents["a,b"]


@pytest.mark.parametrize("group_size", [None, 8], ids=["per-channel", "group-8"])
def test_clip_search_matches_a_direct_search_per_cell(group_size):
    """Each range cell's ratio minimises that cell's output error mean_n (x_cell . (Q(W_r) - W)_cell)^2."""
    n_grid, max_shrink = 10, 0.5
    torch.manual_seed(0)
    q = tq.quantize_model(nn.Sequential(nn.Linear(IN, OUT)), _w4(group_size), None, method="swap")
    x = _inputs()
    W = q[0].layer.weight.detach().clone()
    gs = IN if group_size is None else group_size
    Wg = W.reshape(OUT, -1, gs)
    lo, hi = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)
    ratios = [1 - k / n_grid for k in range(int(max_shrink * n_grid) + 1)]
    errs = []
    for r in ratios:
        Wc = torch.maximum(torch.minimum(Wg, hi * r), lo * r).reshape(OUT, IN)
        D = (_fresh_quantize(Wc, group_size) - W).reshape(OUT, -1, gs)
        # every output element's error, cell by cell, directly
        err = torch.stack([(x.reshape(N, -1, gs)[:, None, g] * D[None, :, g]).sum(-1) for g in range(D.shape[1])], -1)
        errs.append(err.pow(2).mean(0))  # (OUT, G)
    choice = torch.stack(errs).argmin(0)
    r = torch.tensor(ratios)[choice].unsqueeze(-1)
    expected = torch.maximum(torch.minimum(Wg, hi * r), lo * r).reshape(OUT, IN)
    res = awq(q, [x], n_grid=n_grid, max_shrink=max_shrink, progress=False)
    assert res.skipped == {"0": "no module produces its input channels one for one"}
    assert res.clip_ratios["0"] == pytest.approx(float(r.mean()))
    torch.testing.assert_close(q[0].layer.weight.detach(), expected)


def test_awq_beats_round_to_nearest_on_outlier_inputs():
    x = _inputs()
    errors = {}
    for name in ("rtn", "awq"):
        q = _norm_linear(group_size=8)
        with torch.no_grad(), tq.qmodule_state(q, S.BYPASSED):
            ref = q(x)
        if name == "awq":
            awq(q, [x], progress=False)
        tq.calibrate(q, [x], progress=False)
        with torch.no_grad(), tq.qmodule_state(q, S.QUANT_EVAL):
            errors[name] = float((q(x) - ref).pow(2).mean())
    assert errors["awq"] < 0.7 * errors["rtn"], errors


def test_awq_is_seeded():
    outs = []
    for _ in range(2):
        q = _norm_linear()
        awq(q, [_inputs()], sample_tokens=64, seed=3, progress=False)
        outs.append(q.a.layer.weight.detach().clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"n_grid": 0}, "n_grid"),
        ({"sample_tokens": 0}, "sample_tokens"),
        ({"max_shrink": 1.0}, "max_shrink"),
        ({"clip": 1}, "clip"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options_are_refused(opts, match):
    with pytest.raises(ValueError, match=match):
        awq(_norm_linear(), [_inputs()], progress=False, **opts)


def test_a_second_awq_run_warns_that_clipping_compounds():
    q = _norm_linear()
    x = _inputs()
    awq(q, [x], progress=False)
    with pytest.warns(UserWarning, match="awq: awq already folded scales into this model"):
        awq(q, [x], progress=False)
