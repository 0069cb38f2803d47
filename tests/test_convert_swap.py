import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchquant as tq
from torchquant.bench.models import DigitsCNN

S = tq.QModuleState


def wf(m, name):
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))


def af(m, name):
    return tq.AffineQuantizer(8, tq.ExpAvgMinMax())


def test_swap_fuses_sequential_and_keeps_outputs():
    torch.manual_seed(0)
    net = DigitsCNN().eval()
    x = torch.rand(4, 1, 8, 8)
    ref = net(x)
    q = tq.quantize_model(net, wf, af, method="swap")
    assert q is net
    assert isinstance(q.stem[0], tq.QWrapper) and isinstance(q.stem[1], nn.Identity)
    assert isinstance(q.fc, tq.QWrapper)
    assert torch.equal(q(x), ref)
    with tq.qmodule_state(q, S.CALIBRATION):
        assert torch.equal(q(x), ref)
    with tq.qmodule_state(q, S.QUANT_EVAL):
        y = q(x)
    assert not torch.equal(y, ref) and torch.allclose(y, ref, atol=0.2)


def test_swap_skip_by_glob_and_type_and_names():
    net = DigitsCNN()
    seen = []

    def wf_named(m, name):
        seen.append(name)
        return tq.AffineQuantizer(8 if name in ("stem.0", "fc") else 4, tq.BatchMinMax(axis=0))

    tq.quantize_model(net, wf_named, None, skip=["block2.*", nn.Linear], method="swap")
    assert not isinstance(net.fc, tq.QWrapper)
    assert not any(isinstance(m, tq.QWrapper) for m in net.block2.modules())
    assert "stem.0" in seen and "block1.conv1.0" in seen
    assert net.stem[0].weight_quantizer.n_bits == 8 and net.block1.conv1[0].weight_quantizer.n_bits == 4


@pytest.mark.parametrize(
    "skip", ["1", nn.BatchNorm2d, "2", nn.ReLU], ids=["bn-name", "bn-type", "act-name", "act-type"]
)
def test_swap_leaves_a_skipped_batchnorm_or_activation_out_of_the_wrapper(skip):
    # a skipped BatchNorm was fused (and folded into the quantized weight with fold_bn=True)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    q = tq.quantize_model(net, wf, af, skip=[skip], method="swap", fold_bn=True)
    fused = [type(m).__name__ for m in (q[0].bn, q[0].act) if m is not None]
    assert fused == ([] if skip in ("1", nn.BatchNorm2d) else ["BatchNorm2d"])
    assert type(q[1]) is (nn.Identity if fused else nn.BatchNorm2d)
    assert type(q[2]) is nn.ReLU


@pytest.mark.parametrize("method", ["fx", "swap"])
def test_skip_entries_that_match_nothing_are_named(method):
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"matched no module .*'fc', '3\.\*', 'ConvTranspose2d'"):
        q = tq.quantize_model(net, wf, af, skip=["fc", "3.*", "2", nn.ConvTranspose2d], method=method)
    mods = dict(q.named_modules())
    assert not isinstance(mods["2"], tq.QWrapper) and isinstance(mods["0"], tq.QWrapper)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tq.quantize_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), wf, af, skip=[nn.ReLU, "0"], method=method)


class _Experts(nn.Module):
    """An MoE expert bank stored as transformers 5 stores one: (experts, out, in) parameters used directly."""

    def __init__(self, n: int = 3, d: int = 4, h: int = 8) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(n, 2 * h, d))
        self.down_proj = nn.Parameter(torch.randn(n, d, h))

    def forward(self, x):
        gate, up = torch.einsum("td,eod->teo", x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.einsum("teh,edh->td", F.silu(gate) * up, self.down_proj)


class _Router(nn.Module):
    def __init__(self, d: int = 4, n: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, d))

    def forward(self, x):
        return F.linear(x, self.weight).softmax(-1)


class _Tokens(nn.Module):
    """A class token and position embeddings: parameters that are not weights."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return torch.cat([self.cls_token.expand(x.shape[0], 1, -1), x], 1) + self.pos_embed


class _Moe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.proj, self.router, self.experts = _Tokens(), nn.Linear(4, 4), _Router(), _Experts()
        self.rnn = nn.LSTM(4, 4, batch_first=True)

    def forward(self, x):  # (N, 4, 4)
        x = self.proj(self.tokens(x))
        x = self.rnn(x)[0]
        t = x.reshape(-1, 4)
        return (self.experts(t) * self.router(t).sum(-1, keepdim=True)).reshape(x.shape)


@pytest.mark.parametrize("method", ["swap", "fx"])
def test_modules_using_their_own_weights_are_reported_and_warned(method):
    """A router's bare weight, an LSTM and (after torch.fx) an expert bank stay float: the warning and the
    summary name them. swap puts a QExperts in place of the bank; torch.fx traces through the bank's forward,
    leaving its parameters in a bare Module, and turns the router's F.linear(x, self.weight) into a QWrapper."""
    w8 = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))  # noqa: E731
    with pytest.warns(tq.FloatLayersWarning) as record:
        q = tq.quantize_model(_Moe(), w8, None, method=method)
    floats = ["router", "rnn"] if method == "swap" else ["rnn", "experts"]  # fx: graph order
    (message,) = [str(r.message) for r in record if r.category is tq.FloatLayersWarning]
    assert f"{len(floats)} layer(s) with weights stay in float: {', '.join(floats)};" in message
    reasons = tq.convert.unconverted_weights(q)
    assert list(reasons) == floats  # not the tokens: position embeddings are not weights
    assert reasons["rnn"].startswith("LSTM keeps float weights")
    rows = {r["name"]: r for r in tq.summary_rows(q)}
    if method == "swap":
        assert reasons["router"] == "no rule for _Router: its weight (3, 4) stays float"
        assert rows["experts"]["kind"] == "QExperts"
    else:
        assert reasons["experts"] == (
            "Module uses its parameters gate_up_proj (3, 16, 4), down_proj (3, 4, 8) itself, "
            "not through a layer torchquant converts"
        )
        assert rows["experts"]["note"] == reasons["experts"]
    assert rows["proj"]["kind"] == "QWrapper" and "tokens" not in rows
    assert all(rows[n]["kind"] == "float" for n in floats)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.FloatLayersWarning)
        tq.quantize_model(_Moe(), w8, None, method=method, skip=floats)


def test_a_weight_fx_moved_into_a_qwrapper_is_not_reported():
    """torch.fx turns ``F.linear(x, self.weight)`` into a QWrapper sharing the parameter: it is quantized."""
    w8 = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.FloatLayersWarning)
        q = tq.quantize_model(nn.Sequential(_Router()), w8, None)
    assert tq.convert.unconverted_weights(q) == {}
    assert any(isinstance(m, tq.QWrapper) for m in q.modules())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        tq.quantize_model(nn.Linear(1, 1), wf, af, method="magic")
    with pytest.raises(TypeError, match="skip"):
        tq.quantize_model(nn.Linear(1, 1), wf, af, skip=[3], method="swap")
    with pytest.raises(TypeError, match="must be a factory"):
        tq.quantize_model(nn.Sequential(nn.Linear(1, 1)), tq.AffineQuantizer(8, tq.BatchMinMax()), None, method="swap")


def test_layers_left_in_float_are_named_in_a_warning():
    class Sub(nn.Linear):  # a subclass with its own forward: no adapter, so it stays in float
        def forward(self, x):
            return super().forward(x) * 2

    w8 = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))  # noqa: E731
    with pytest.warns(tq.FloatLayersWarning, match=r"1 layer\(s\) with weights stay in float: 1"):
        tq.quantize_model(nn.Sequential(nn.Linear(4, 4), Sub(4, 4)), w8, None, method="swap")
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.FloatLayersWarning)
        tq.quantize_model(nn.Sequential(nn.Linear(4, 4), Sub(4, 4)), w8, None, method="swap", skip=["1"])
        tq.quantize_model(nn.TransformerEncoderLayer(16, 2, 32), w8, None, method="swap")


def test_what_counts_as_a_weight_of_its_own():
    """Matrices named like weights are reported; position tables, scales and temperatures are not."""

    class Tables(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relative_position_bias_table = nn.Parameter(torch.zeros(4, 13, 13))  # (heads, 2H-1, 2W-1)
            self.freqs = nn.Parameter(torch.zeros(2, 4, 8))
            self.pos_emb = nn.Parameter(torch.zeros(31, 31, 16))
            self.temperature = nn.Parameter(torch.ones(4, 1, 1))
            self.weight = nn.Parameter(torch.ones(1, 1, 1, 8))  # ConvNeXt V2's GRN: a scale

    class Projections(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Parameter(torch.zeros(8, 4))
            self.text_projection = nn.Parameter(torch.zeros(8, 4))
            self.router_weights = nn.Parameter(torch.zeros(3, 8))
            self.w1 = nn.Parameter(torch.zeros(12, 8))  # DBRX's experts: w1, v1, w2

    class Einsum(nn.Module):  # XLNet's attention, Funnel's relative kernel, a plain 'weights'
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Parameter(torch.zeros(8, 2, 4))
            self.r = nn.Parameter(torch.zeros(8, 2, 4))
            self.r_kernel = nn.Parameter(torch.zeros(8, 2, 4))
            self.weights = nn.Parameter(torch.zeros(4, 8))
            self.r_w_bias = nn.Parameter(torch.zeros(2, 4))  # a bias: not reported
            self.W = nn.Parameter(torch.zeros(4, 4))  # research code's torch.matmul(x, self.W)
            self.W_q = nn.Parameter(torch.zeros(4, 4))

    model = nn.Sequential(
        Tables(),
        Projections(),
        nn.utils.parametrizations.weight_norm(nn.ConvTranspose1d(2, 3, 5)),
        nn.Linear(2, 2),
        Einsum(),
    )
    assert tq.convert.unconverted_weights(model) == {
        "1": "Projections uses its parameters proj (8, 4), text_projection (8, 4), router_weights (3, 8), "
        "w1 (12, 8) itself, not through a layer torchquant converts",
        "2": "no rule for ConvTranspose1d: its weight (2, 3, 5) stays float",
        "4": "Einsum uses its parameters q (8, 2, 4), r (8, 2, 4), r_kernel (8, 2, 4), weights (4, 8), W (4, 4), "
        "W_q (4, 4) itself, not through a layer torchquant converts",
    }


class _Taps(nn.Module):
    """Reads the convolution's output before its BatchNorm by indexing the Sequential."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.body[0](x)


class _PoolingSequential(nn.Sequential):
    """Runs its modules in order in a forward of its own, then resizes (torchvision's ASPPPooling)."""

    def forward(self, x):
        size = x.shape[-2:]
        for m in self:
            x = m(x)
        return nn.functional.interpolate(x, size=size)


def _fused_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if "called outside that Sequential" in str(w.message)]


def test_swap_warns_once_when_a_fused_layer_is_called_outside_its_sequential():
    net = _Taps().eval()
    x = torch.randn(2, 3, 6, 6)
    ref = net(x)
    q = tq.quantize_model(net, wf, af, method="swap")
    y, messages = _fused_warnings(lambda: q(x))
    assert len(messages) == 1 and "'body.0'" in messages[0] and "BatchNorm2d+ReLU" in messages[0]
    assert not torch.equal(y, ref)  # what the warning is about: the tap now reads the normalised, activated value
    assert not q.body[0]._forward_pre_hooks  # checked once: no hook left on the hot path
    assert not _fused_warnings(lambda: q(x))[1]


def test_swap_fused_layers_called_by_their_sequential_do_not_warn_and_survive_copies(tmp_path):
    import copy
    import io

    net = DigitsCNN().eval()
    x = torch.rand(2, 1, 8, 8)
    q = tq.quantize_model(net, wf, af, method="swap")
    fused = [m for m in q.modules() if isinstance(m, tq.QWrapper) and m._forward_pre_hooks]
    assert fused  # stem and blocks: conv + BatchNorm + ReLU
    buf = io.BytesIO()
    torch.save(q, buf)  # the hook pickles
    buf.seek(0)
    for model in (copy.deepcopy(q), torch.load(buf, weights_only=False), q):
        _, messages = _fused_warnings(lambda m=model: m(x))
        assert not messages
        assert not any(m._forward_pre_hooks for m in model.modules() if isinstance(m, tq.QWrapper))


def test_swap_fuses_in_a_sequential_subclass_and_its_own_forward_does_not_warn():
    net = nn.Sequential(_PoolingSequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 6, 6)
    ref = net(x)
    q = tq.quantize_model(net, wf, af, method="swap", fold_bn=True)
    assert isinstance(q[0][1], tq.QWrapper) and q[0][1].bn is not None  # fused and folded, as before
    y, messages = _fused_warnings(lambda: q(x))
    assert not messages and torch.equal(y, ref)


def test_swap_checkpointed_sequentials_do_not_warn():
    from torch.utils.checkpoint import checkpoint_sequential

    net = DigitsCNN().eval()
    q = tq.quantize_model(net, wf, af, method="swap")
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    _, messages = _fused_warnings(lambda: checkpoint_sequential(q.stem, 2, x, use_reentrant=False))
    assert not messages
