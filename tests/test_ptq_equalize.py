import importlib

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.bench.models import MNIST1DCNN, DigitsCNN, DigitsMobileNet
from torchquant.ptq import ChannelClip


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(10 ** (torch.rand(c, generator=g) * 2 - 1))  # ranges spanning 2 decades
                m.bias.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def _quantizable(model):
    return tq.quantize_model(
        model,
        lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax()),
        lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()),
        method="swap",
    )


MODELS = {
    "digits-cnn": (lambda: DigitsCNN(), (16, 1, 8, 8)),
    "digits-mobilenet": (lambda: DigitsMobileNet(), (16, 1, 8, 8)),
    "mnist1d-cnn": (lambda: MNIST1DCNN(), (16, 1, 40)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_equalization_keeps_float_outputs_equal(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    q = _quantizable(_randomize_bn(build()))
    x = torch.rand(shape) * 3
    ref = q(x)
    res = tq.ptq.equalize(q, example_input=x, absorb_bias=False)
    assert res.pairs
    out = q(x)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), float((out - ref).abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_a_half_precision_model_with_relu6_pairs_keeps_its_dtype(dtype):
    # The ChannelClip replacing a ReLU6 had a float32 bound, which promoted the activations.
    torch.manual_seed(0)
    q = _quantizable(_randomize_bn(DigitsMobileNet())).to(dtype)
    x = (torch.rand(16, 1, 8, 8) * 3).to(dtype)
    ref = q(x)
    res = tq.ptq.equalize(q, example_input=x, absorb_bias=False)
    assert res.pairs and any(isinstance(m, ChannelClip) for m in q.modules())
    out = q(x)
    assert out.dtype == dtype
    assert torch.allclose(out.float(), ref.float(), atol=0.1, rtol=0.05), float((out - ref).abs().max())


def test_pairs_found_in_mobilenet_and_cnn():
    mb = _quantizable(DigitsMobileNet().eval())
    expected = []
    for i in range(3):
        b = f"blocks.{i}"
        expected += [(f"{b}.expand.0", f"{b}.depthwise.0"), (f"{b}.depthwise.0", f"{b}.project.0")]
    assert tq.ptq.find_layer_pairs(mb) == expected
    assert tq.ptq.find_layer_pairs(mb, torch.rand(2, 1, 8, 8)) == expected
    assert tq.ptq.find_layer_pairs(mb, relu6="skip") == []  # every pair goes through ReLU6
    cnn = _quantizable(DigitsCNN().eval())
    # Direct connections only: nothing across the residual adds or into the classifier.
    assert tq.ptq.find_layer_pairs(cnn, torch.rand(2, 1, 8, 8)) == [
        ("block1.conv1.0", "block1.conv2.0"),
        ("down.0.0", "down.1.0"),
        ("block2.conv1.0", "block2.conv2.0"),
    ]


def test_example_input_rejects_pairs_not_connected_in_forward():
    class Branches(nn.Module):  # module order says a -> b, data flow says otherwise
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 4, 1)
            self.b = nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(2, 4, 1)

        def forward(self, x):
            return self.b(self.c(x)) + self.a(x)

    q = _quantizable(Branches().eval())
    assert tq.ptq.find_layer_pairs(q) == [("a", "b")]
    assert tq.ptq.find_layer_pairs(q, torch.rand(1, 2, 3, 3)) == []


@pytest.mark.parametrize("mode", [tq.QModuleState.QUANT_EVAL, tq.QModuleState.CALIBRATION])
def test_the_pair_check_runs_the_float_model_and_observes_nothing(mode):
    # in QUANT_EVAL before calibration it failed with "no ranges yet"; in CALIBRATION the example input was
    # observed by the quantizers of layers outside every pair
    torch.manual_seed(0)
    f = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(8, 4)).eval()  # fmt: skip
    q = tq.quantize_model(f, lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax()),
                          lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()), method="swap")  # fmt: skip
    tq.set_qmodule_state(q, mode)
    assert tq.ptq.equalize(q, example_input=torch.rand(4, 3, 12, 12) * 100).pairs == [("0", "3")]
    assert not q[6].acts_quantizer.range_observer.initialized
    assert {m.qstate for _, m in tq.iter_qmodules(q)} == {mode}


def test_ranges_are_equalized_including_depthwise():
    torch.manual_seed(0)
    q = _quantizable(_randomize_bn(DigitsMobileNet()))
    tq.ptq.equalize(q, absorb_bias=False, iterations=100, tolerance=1e-6)
    blk = q.blocks[0]
    for a, b in [(blk.expand[0], blk.depthwise[0]), (blk.depthwise[0], blk.project[0])]:
        r1 = a.layer.weight.abs().flatten(1).amax(1)
        groups = b.layer.groups
        if groups == 1:
            r2 = b.layer.weight.abs().transpose(0, 1).flatten(1).amax(1)
        else:  # depthwise: one row per input channel
            r2 = b.layer.weight.abs().flatten(1).amax(1)
        assert torch.allclose(r1, r2, rtol=1e-3), (r1, r2)
    assert isinstance(blk.expand[0].act, ChannelClip)
    assert blk.expand[0].bn is None and blk.expand[0].layer.bias is not None


def test_relu6_becomes_channel_clip_that_matches_relu6_scaled():
    clip = ChannelClip(torch.tensor([6.0, 3.0]))
    x = torch.linspace(-2, 10, 24).reshape(3, 2, 4)
    s = torch.tensor([1.0, 2.0]).reshape(1, 2, 1)
    assert torch.allclose(clip(x / s) * s, nn.functional.relu6(x))


@pytest.mark.parametrize("tokens", [5, 16], ids=["tokens-5", "tokens-as-many-as-features"])
def test_a_linear_pairs_relu6_clips_its_features_on_token_inputs(tokens):
    # (N, T, C): the bounds go along the last dimension; along dim 1 they failed (T != C) or clipped tokens
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 16), nn.ReLU6(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        f[0].weight.mul_(torch.logspace(-1, 1, 16)[:, None] * 3)  # channel ranges far apart: large scales
    q = tq.quantize_model(f, None, None, method="swap")
    x = torch.randn(8, tokens, 16) * 2
    with torch.no_grad():
        ref = q(x)
        tq.ptq.equalize(q, absorb_bias=False)
        assert isinstance(q[0].act, ChannelClip) and q[0].act.dim == -1
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q(x[:, 0]), ref[:, 0], rtol=1e-5, atol=1e-5)  # (N, C) too


def test_a_channel_clip_pickled_before_it_had_a_dim_bounds_channels_first():
    import pickle

    clip = ChannelClip(torch.tensor([6.0, 3.0]))
    del clip.__dict__["dim"]  # the state of a module saved before the attribute existed
    old = pickle.loads(pickle.dumps(clip))
    x = torch.linspace(-2, 10, 24).reshape(3, 2, 4)
    assert torch.equal(old(x), torch.minimum(torch.relu(x), torch.tensor([6.0, 3.0]).reshape(1, 2, 1)))


def test_high_bias_absorption_moves_bias_and_keeps_outputs_close():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        net[1].bias.copy_(torch.full((16,), 5.0))  # large beta: always active
        net[1].weight.copy_(torch.full((16,), 0.5))
    net.eval()
    q = _quantizable(net)
    x = torch.randn(512, 8)
    ref = q(x)
    res = tq.ptq.equalize(q, absorb_bias=True)
    assert res.absorbed["0"].min() > 0
    # With (beta, gamma) = (5, 0.5) per channel, c = beta - 3 gamma = 3.5 before rescaling.
    assert torch.allclose(res.absorbed["0"] * res.scales["0"], torch.full((16,), 3.5), atol=1e-5)
    out = q(x)
    # Exact wherever A's pre-activation stays above c, which holds for most samples here.
    close = (out - ref).abs().amax(1) < 1e-4
    assert close.float().mean() > 0.9


def test_equalize_bad_input_and_restore_on_failure(monkeypatch):
    with pytest.raises(ValueError, match="no QModule"):
        tq.ptq.equalize(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no consecutive QWrapper pairs"):
        tq.ptq.equalize(_quantizable(nn.Sequential(nn.Linear(2, 2), nn.Sigmoid(), nn.Linear(2, 2))))
    with pytest.raises(ValueError, match="relu6"):
        tq.ptq.equalize(_quantizable(DigitsMobileNet()), relu6="relu")
    torch.manual_seed(0)
    q = _quantizable(_randomize_bn(DigitsMobileNet()))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    structure = repr(q)
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return orig(*args)

    eq = importlib.import_module("torchquant.ptq.equalize")

    orig = eq._apply_scale
    monkeypatch.setattr(eq, "_apply_scale", failing)
    with pytest.raises(RuntimeError, match="boom"):
        tq.ptq.equalize(q)
    after = q.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert repr(q) == structure  # BatchNorms and ReLU6s are back


def test_fold_qwrapper_batchnorm_is_exact():
    torch.manual_seed(0)
    w = _quantizable(_randomize_bn(nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU())))[0]
    x = torch.randn(2, 3, 6, 6)
    ref = w(x)
    mean, std = tq.ptq.fold_qwrapper_batchnorm(w)
    assert w.bn is None and mean.shape == std.shape == (5,)
    assert torch.allclose(w(x), ref, atol=1e-5)
    assert tq.ptq.fold_qwrapper_batchnorm(w) is None


def test_a_layer_called_outside_its_pair_or_sharing_its_weight_is_left_out():
    # Rescaling A's output channels for B would change A's other call; a module listed twice shares its weight.
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

        def forward(self, x):
            return self.body(x) + self.body[0](x)[:, :4]

    torch.manual_seed(0)
    q = _quantizable(Reuse().eval())
    x = torch.randn(16, 8)
    assert tq.ptq.find_layer_pairs(q) == [("body.0", "body.2"), ("body.2", "body.4")]
    assert tq.ptq.find_layer_pairs(q, example_input=x) == [("body.2", "body.4")]  # body.0 is called twice
    ref = q(x)
    tq.ptq.equalize(q, example_input=x, absorb_bias=False)
    assert torch.allclose(q(x), ref, atol=1e-5)
    shared = nn.Linear(8, 8)
    q = _quantizable(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), shared, nn.ReLU(), shared).eval())
    assert tq.ptq.find_layer_pairs(q) == []
