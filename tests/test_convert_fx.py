import copy
import io
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchquant as tq
import torchquant.graph.common as graph_common
from torchquant.bench.models import DigitsCNN, ResidualBlock

S = tq.QModuleState


def wf(m, name):
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))


def af(m, name):
    return tq.AffineQuantizer(8, tq.ExpAvgMinMax())


def qnames(model):
    return {n: (type(m).__name__, m._describe() if isinstance(m, tq.QWrapper) else m._op_name())
            for n, m in tq.iter_qmodules(model)}  # fmt: skip


def test_digits_cnn_layers_and_ops_become_qmodules_and_outputs_are_kept():
    net = DigitsCNN().eval()
    x = torch.rand(4, 1, 8, 8)
    ref = net(x)
    q = tq.quantize_model(net, wf, af).eval()
    assert isinstance(q, torch.fx.GraphModule)
    assert qnames(q) == {
        "stem.0": ("QWrapper", "Conv2d+BatchNorm2d+ReLU"),
        "block1.conv1.0": ("QWrapper", "Conv2d+BatchNorm2d+ReLU"),
        "block1.conv2.0": ("QWrapper", "Conv2d+BatchNorm2d"),
        "block1.add": ("QOp", "add"),
        "down.0.0": ("QWrapper", "Conv2d+BatchNorm2d+ReLU"),
        "down.1.0": ("QWrapper", "Conv2d+BatchNorm2d+ReLU"),
        "block2.conv1.0": ("QWrapper", "Conv2d+BatchNorm2d+ReLU"),
        "block2.conv2.0": ("QWrapper", "Conv2d+BatchNorm2d"),
        "block2.add": ("QOp", "add"),
        "pool": ("QOp", "AdaptiveAvgPool2d"),
        "fc": ("QWrapper", "Linear"),
    }
    assert torch.equal(q(x), ref)
    with tq.qmodule_state(q, S.CALIBRATION):
        assert torch.equal(q(x), ref)
    with tq.qmodule_state(q, S.QUANT_EVAL):
        y = q(x)
    assert not torch.equal(y, ref) and torch.allclose(y, ref, atol=0.2)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    assert set(tq.get_qmodule_states(q).values()) == {S.QUANT_EVAL}


def test_float_model_keeps_its_structure_and_shares_parameters():
    net = DigitsCNN()
    q = tq.quantize_model(net, wf, af)
    assert not tq.iter_qmodules(net)
    assert q.stem.get_submodule("0").layer.weight is net.stem[0].weight
    assert q.stem.get_submodule("0").bn is net.stem[1]
    keys = list(q.state_dict())
    assert "stem.0.layer.weight" in keys and not any(k.startswith("stem.1.") for k in keys)  # BN kept once


class ConvAct(nn.Module):
    def __init__(self, act, dim=2, bn=True):
        super().__init__()
        conv, norm = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}[
            dim
        ]
        self.conv = conv(3, 4, 3, padding=1)
        self.bn = norm(4) if bn else nn.Identity()
        self.act = act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


ACTS = {
    "F.relu-inplace": (lambda y: F.relu(y, inplace=True), nn.ReLU, {"inplace": True}),
    "torch.relu": (torch.relu, nn.ReLU, {"inplace": False}),
    "method-relu": (lambda y: y.relu(), nn.ReLU, {}),
    "F.relu6": (F.relu6, nn.ReLU6, {}),
    "F.silu": (F.silu, nn.SiLU, {}),
    "F.hardswish": (F.hardswish, nn.Hardswish, {}),
    "F.gelu-tanh": (lambda y: F.gelu(y, approximate="tanh"), nn.GELU, {"approximate": "tanh"}),
    "F.leaky_relu-0.2": (lambda y: F.leaky_relu(y, 0.2), nn.LeakyReLU, {"negative_slope": 0.2}),
    "F.hardtanh--2-3": (lambda y: F.hardtanh(y, -2.0, max_val=3.0), nn.Hardtanh, {"min_val": -2.0, "max_val": 3.0}),
    "torch.sigmoid": (torch.sigmoid, nn.Sigmoid, {}),
    "F.sigmoid": (F.sigmoid, nn.Sigmoid, {}),
    "torch.tanh": (torch.tanh, nn.Tanh, {}),
    "module-LeakyReLU": (nn.LeakyReLU(0.3), nn.LeakyReLU, {"negative_slope": 0.3}),
}


class Fn(nn.Module):
    """Applies a function; traced into, so the call appears in the graph as it is written."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, y):
        return self.fn(y)


@pytest.mark.parametrize("act", list(ACTS), ids=list(ACTS))
def test_functional_and_module_activations_are_fused_with_their_arguments(act):
    fn, cls, attrs = ACTS[act]
    net = ConvAct(fn if isinstance(fn, nn.Module) else Fn(fn)).eval()
    x = torch.randn(2, 3, 6, 6)
    ref = net(x)
    q = tq.quantize_model(net, wf, af).eval()
    assert list(qnames(q)) == ["conv"]
    w = q.conv
    assert type(w.act) is cls and w.bn is not None
    for k, v in attrs.items():
        assert getattr(w.act, k) == v
    assert torch.equal(q(x), ref)


@pytest.mark.parametrize("dim", [1, 2, 3], ids=["conv1d", "conv2d", "conv3d"])
def test_conv_dims_and_linear(dim):
    net = ConvAct(nn.ReLU(), dim=dim)
    x = torch.randn(2, 3, *([5] * dim))
    ref = net.eval()(x)
    q = tq.quantize_model(net, wf, af).eval()
    assert qnames(q) == {"conv": ("QWrapper", f"Conv{dim}d+BatchNorm{dim}d+ReLU")}
    assert torch.equal(q(x), ref)
    lin = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.GELU(), nn.Linear(3, 2))
    assert qnames(tq.quantize_model(lin, wf, af)) == {
        "0": ("QWrapper", "Linear+BatchNorm1d+GELU"),
        "3": ("QWrapper", "Linear"),
    }


class Branchy(nn.Module):
    """conv output read twice: BN must not be fused; BN output read twice: the activation must not be."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y
        u = self.bn2(self.conv2(z))
        return F.relu(u) * u


def test_fusion_stops_where_an_intermediate_has_other_users():
    net = Branchy().eval()
    x = torch.randn(2, 3, 4, 4)
    ref = net(x)
    q = tq.quantize_model(net, wf, af).eval()
    assert qnames(q) == {
        "conv": ("QWrapper", "Conv2d"),
        "bn": ("QOp", "BatchNorm2d"),
        "add": ("QOp", "add"),
        "conv2": ("QWrapper", "Conv2d+BatchNorm2d"),
        "mul": ("QOp", "mul"),
    }
    assert torch.equal(q(x), ref)


class Swish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * torch.sigmoid(y)


def test_written_out_swish_becomes_silu():
    net = Swish().eval()
    x = torch.randn(2, 3, 4, 4)
    q = tq.quantize_model(net, wf, af).eval()
    assert qnames(q) == {"conv": ("QWrapper", "Conv2d+BatchNorm2d+SiLU")}
    assert torch.allclose(q(x), net(x), atol=1e-6)  # SiLU vs x * sigmoid(x): float rounding only


class Ops(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("index", torch.arange(4))

    def forward(self, x):
        n = x.size(0) * 2  # int arithmetic: no QOp
        idx = self.index + 1  # integer tensor: no QOp
        y = self.lin(x)
        a = torch.cat([y, x], dim=-1)
        b = y @ x.transpose(-1, -2)
        c = torch.bmm(b, y).mean(-1, keepdim=True)
        d = F.softmax(y, dim=-1).sum(-1, keepdim=True)
        y.add_(1.0)  # in place: stays float
        return a[..., idx % 4].sum(-1, keepdim=True) * n + c + d + F.avg_pool1d(y, 2).mean(-1, keepdim=True)


def test_qops_on_float_tensor_ops_only():
    net = Ops().eval()
    x = torch.randn(2, 3, 4)
    ref = net(x)
    q = tq.quantize_model(net, wf, af).eval()
    ops = sorted(v[1] for v in qnames(q).values() if v[0] == "QOp")
    assert ops == sorted(
        ["cat", "matmul", "bmm", "mean", "softmax", "sum", "sum", "mul", "add", "add", "add", "avg_pool1d", "mean"]
    )
    assert torch.equal(q(x), ref)
    with tq.qmodule_state(q, S.CALIBRATION):
        assert torch.equal(q(x), ref)


def test_factories_get_modules_descriptors_and_names():
    seen = {}

    def af_rec(m, name):
        seen[name] = m
        return None

    def w_first_last_8(m, name):  # the three-line per-layer rule
        bits = 8 if name in ("stem.0", "fc") else 4
        return tq.AffineQuantizer(bits, tq.BatchMinMax(axis=0))

    q = tq.quantize_model(DigitsCNN(), w_first_last_8, af_rec)
    assert isinstance(seen["stem.0"], nn.Conv2d) and isinstance(seen["fc"], nn.Linear)
    assert isinstance(seen["pool"], nn.AdaptiveAvgPool2d)
    desc = seen["block1.add"]
    assert isinstance(desc, tq.FunctionalOp) and desc.fn is operator.add and desc.name == "add"
    bits = {n: m.weight_quantizer.n_bits for n, m in tq.iter_qmodules(q) if isinstance(m, tq.QWrapper)}
    assert bits["stem.0"] == bits["fc"] == 8 and bits["block1.conv1.0"] == 4
    assert all(m.acts_quantizer is None for _, m in tq.iter_qmodules(q))


def test_skip_by_glob_and_type():
    net = DigitsCNN().eval()
    x = torch.rand(2, 1, 8, 8)
    q = tq.quantize_model(net, wf, af, skip=["block2.*", nn.Linear])
    names = set(qnames(q))
    assert "block1.add" in names and "block2.add" not in names and "fc" not in names
    assert not any(n.startswith("block2.") for n in names)
    assert torch.equal(q(x), net(x))
    q = tq.quantize_model(net, wf, af, skip=[ResidualBlock])
    assert not any(n.startswith("block") for n in qnames(q))


class Dynamic(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class HasDynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = nn.Sequential(nn.Identity(), Dynamic())

    def forward(self, x):
        return self.gate(self.conv(x))


def test_trace_failure_names_module_and_operation_and_never_falls_back():
    with pytest.raises(tq.FxTraceError) as info:
        tq.quantize_model(HasDynamic(), wf, af)
    msg = str(info.value)
    assert "module 'gate.1' (Dynamic)" in msg
    assert "if x.sum() > 0:" in msg and "method='swap'" in msg and "skip=['gate.1']" in msg
    net = HasDynamic()
    q = tq.quantize_model(net, wf, af, skip=["gate.1"])  # the suggested way out works
    assert list(qnames(q)) == ["conv"]
    for sign in (1, -1):
        x = sign * torch.rand(1, 3, 2, 2)
        assert torch.equal(q(x), net(x))


def test_leaf_modules_are_traced_on_their_own_and_quantized_inside():
    torch.manual_seed(0)
    net = DigitsCNN().eval()
    q = tq.quantize_model(net, wf, af, leaf_modules=[ResidualBlock])
    # not part of the top-level graph: each block is one call of its own rewritten GraphModule
    top = [n.target for n in q.graph.nodes if n.op == "call_module"]
    assert "block1" in top and not any(t.startswith("block1.") for t in top)
    assert isinstance(q.block1, torch.fx.GraphModule) and isinstance(net.block1, ResidualBlock)
    assert {"block1.conv1.0", "block1.add"} <= set(qnames(q))
    assert tq.convert.float_layers(q) == []
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(q(x), net(x))
    with pytest.raises(TypeError, match="leaf_modules"):
        tq.quantize_model(DigitsCNN(), wf, af, leaf_modules=["block1"])
    with pytest.raises(ValueError, match="method='fx' only"):
        tq.quantize_model(DigitsCNN(), wf, af, method="swap", leaf_modules=[ResidualBlock])


class SameConv(nn.Conv2d):
    """A Conv2d subclass computing its own padding, like efficientnet_pytorch's."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = SameConv(3, 4, 2)
        self.bn = nn.BatchNorm2d(4)
        self.head = SameConv(4, 2, 2, bias=False)

    def forward(self, x):
        return self.head(F.relu6(self.bn(self.conv(x))))


def test_functional_conv_of_a_conv_subclass_is_wrapped_with_shared_parameters():
    net = SameNet().eval()
    x = torch.randn(2, 3, 5, 5)
    seen = {}

    def wf_rec(m, name):
        seen[name] = m
        return wf(m, name)

    q = tq.quantize_model(net, wf_rec, af).eval()
    assert qnames(q) == {"conv.conv2d": ("QWrapper", "Conv2d+BatchNorm2d+ReLU6"), "head.conv2d": ("QWrapper", "Conv2d")}
    assert seen["conv"] is net.conv and seen["head"] is net.head
    assert q.conv.conv2d.layer.weight is net.conv.weight and q.head.conv2d.layer.bias is None
    assert "conv.weight" not in q.state_dict()
    assert torch.equal(q(x), net(x))


def test_fold_bn_is_passed_to_qwrappers_with_bn(monkeypatch):
    got = []

    class Recorder(tq.QWrapper):
        def __init__(self, layers, weight_quantizer=None, acts_quantizer=None, fold_bn=False):
            got.append(fold_bn)
            super().__init__(layers, weight_quantizer, acts_quantizer, fold_bn=False)

    monkeypatch.setattr(graph_common, "QWrapper", Recorder)
    tq.quantize_model(DigitsCNN(), wf, af, fold_bn=True)
    assert got.count(True) == 7 and got.count(False) == 1  # 7 Conv+BN, the Linear has none
    got.clear()
    q = tq.quantize_model(DigitsCNN(), wf, af, fold_bn=False)
    assert got and not any(got) and not any(m.fold_bn for _, m in tq.iter_qmodules(q) if isinstance(m, tq.QWrapper))


def test_deepcopy_keeps_summary_information():
    q = tq.quantize_model(DigitsCNN(), wf, af, skip=["fc"])
    assert copy.deepcopy(q).meta == q.meta
    assert tq.summary(copy.deepcopy(q)) == tq.summary(q)


class _TrainOnlyNoise(nn.Module):
    """No parameters, behaves differently in training: traced, its mode would be frozen."""

    def forward(self, x):
        return x + torch.randn_like(x) if self.training else x


class _NoisyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.noise = _TrainOnlyNoise()

    def forward(self, x):
        return self.noise(self.fc(x))


def _tv_convnext():
    pytest.importorskip("torchvision")
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], stochastic_depth_prob=0.5)


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, drop_path_rate=0.5)


@pytest.mark.parametrize("build", [_NoisyNet, _tv_convnext, _timm_vit], ids=["custom", "tv-convnext", "timm-vit"])
def test_train_only_modules_follow_the_mode_at_run_time(build):
    # stochastic depth (torchvision), DropPath (timm): kept whole, not traced with the mode of the moment
    torch.manual_seed(0)
    net = build().eval()
    custom = isinstance(net, _NoisyNet)  # a module of the user's own: named in leaf_modules
    q = tq.quantize_model(copy.deepcopy(net), wf, af, leaf_modules=[_TrainOnlyNoise] if custom else ())
    x = torch.randn(2, 4) if custom else torch.randn(2, 3, 16, 16)
    net.train()
    q.train()
    torch.manual_seed(1)
    expected = net(x)
    torch.manual_seed(1)
    assert torch.equal(q(x), expected)
    net.eval()
    q.eval()
    assert torch.equal(q(x), net(x))
    if not custom:  # value-preserving in eval: not reported as an operation left in float
        assert not [r for r in tq.summary_rows(q) if r["kind"] == "float"]


@pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14),
    reason="torch 2.13's GraphModule unpickling fails inside torch (AttributeError on a str __name__)",
)
def test_a_whole_quantized_graph_module_pickles():
    # torch.load re-traces a GraphModule's code with a subclass of the tracer that made it, built without arguments
    q = tq.quantize_model(DigitsCNN(), wf, af)
    x = torch.randn(3, 1, 8, 8)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


class BNAct(nn.BatchNorm2d):
    """BatchNorm, then ``drop`` and ``act`` in one module, like timm's BatchNormAct2d."""

    def __init__(self, n, act):
        super().__init__(n)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


@pytest.mark.parametrize("act", [nn.SiLU(), nn.Identity()], ids=["silu", "no-act"])
def test_batchnorm_act_module_is_split_into_bn_and_activation(act):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), BNAct(4, act)).train()
    net(torch.randn(4, 3, 2, 2))  # non-trivial running statistics
    net.eval()
    x = torch.randn(2, 3, 2, 2)
    q = tq.quantize_model(net, wf, af, leaf_modules=[BNAct]).eval()
    expected = "Conv2d+BatchNorm2d+SiLU" if isinstance(act, nn.SiLU) else "Conv2d+BatchNorm2d"
    assert qnames(q) == {"0": ("QWrapper", expected)}
    assert q.get_submodule("0").bn.running_var is net[1].running_var
    assert torch.equal(q(x), net(x))


def test_standalone_batchnorm_act_module_gets_a_qop():
    net = nn.Sequential(BNAct(3, nn.ReLU()), nn.Conv2d(3, 4, 1)).eval()  # pre-activation
    q = tq.quantize_model(net, wf, af, leaf_modules=[BNAct]).eval()
    assert qnames(q) == {"0": ("QOp", "BNAct"), "1": ("QWrapper", "Conv2d")}
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(q(x), net(x))


class _ModeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = BNAct(4, nn.ReLU())
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.conv2(y) + y  # a functional add: a QOp


@pytest.mark.parametrize("method", ["fx", "swap"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_converted_modules_keep_the_source_mode(method, training):
    net = _ModeNet().train()
    net(torch.randn(4, 3, 2, 2))  # non-trivial running statistics
    net.train(training)
    kw = {"leaf_modules": [BNAct]} if method == "fx" else {}
    q = tq.quantize_model(net, wf, af, method=method, **kw)
    # every module the conversion made (QWrappers, QOps, the BatchNorm split from BNAct, their quantizers)
    modes = {name: m.training for name, m in q.named_modules() if type(m) is not nn.Module}
    assert set(modes.values()) == {training}, modes
    if not training:  # without an .eval() call, BatchNorm still uses the running statistics
        x = torch.randn(2, 3, 2, 2)
        assert torch.equal(q(x), _ModeNet.forward(net, x))


@pytest.mark.parametrize("method", ["fx", "swap"])
def test_quantizers_are_placed_on_the_model_device(method):
    """Factories build on the CPU; a model elsewhere (``meta`` here, a GPU in tests/test_cuda.py) gets them there."""
    with torch.device("meta"):
        net = DigitsCNN()
    q = tq.quantize_model(net, lambda m, n: tq.LSQQuantizer(4, axis=0), af, method=method)
    quantizers = [m for m in q.modules() if isinstance(m, tq.Quantizer)]
    assert quantizers and {t.device.type for m in quantizers for t in [*m.parameters(), *m.buffers()]} == {"meta"}


def test_quantizers_of_a_model_split_over_devices_follow_their_layers():
    with torch.device("meta"):
        second = nn.Linear(4, 2)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), second)
    q = tq.quantize_model(net, wf, af, method="swap")
    assert q[0].acts_quantizer.range_observer.min_val.device.type == "cpu"
    assert q[2].acts_quantizer.range_observer.min_val.device.type == "meta"


# ----------------------------------------------------------------------------- leaves: quantized inside
class Gated(nn.Module):
    """Untraceable on its own (data-dependent control flow): quantized inside by a module swap."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc1(x)
        return self.fc2(x)


class Masked(nn.Module):
    """Traceable on its own only with ``mask`` fixed to the constant its caller passes."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        y = self.fc1(x)
        if mask is not None:
            y = y * mask
        return self.fc2(torch.relu(y))


class WithLeaves(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.gated = Gated()
        self.masked = Masked()

    def forward(self, x):
        return self.masked(self.gated(self.inp(x)))


@pytest.mark.parametrize("sign", [1, -1])
def test_a_user_leaf_is_traced_with_its_constants_else_swapped_in_a_copy(sign):
    torch.manual_seed(0)
    net = WithLeaves().eval()
    seen = []

    def wf_named(m, name):
        seen.append(name)
        return wf(m, name)

    q = tq.quantize_model(net, wf_named, af, leaf_modules=[Gated, Masked])
    assert set(seen) == {"inp", "gated.fc1", "gated.fc2", "masked.fc1", "masked.fc2"}  # full qualified names
    assert tq.convert.float_layers(q) == []
    assert isinstance(q.masked, torch.fx.GraphModule)  # traced on its own: its relu is fused, the call rewritten
    assert qnames(q)["masked.fc1"] == ("QWrapper", "Linear+ReLU")
    assert type(q.gated) is Gated and isinstance(q.gated.fc1, tq.QWrapper)  # swapped inside a copy
    assert type(net.gated.fc1) is nn.Linear and q.gated.fc1.layer.weight is net.gated.fc1.weight  # shared, unchanged
    notes = {r["name"]: r["note"] for r in tq.summary_rows(q) if r["kind"] == "float"}
    assert "masked" not in notes and "module swap" in notes["gated"]
    x = sign * torch.rand(2, 4)
    assert torch.equal(q(x), net(x))
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    y = q(x)
    assert not torch.equal(y, net(x)) and torch.allclose(y, net(x), atol=0.1)


class NormedGated(Gated):
    """Untraceable, with a normalisation before its layers."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return super().forward(self.norm(x))


def test_a_swapped_leaf_quantizes_its_normalisation_outputs_as_the_traced_graph_does():
    torch.manual_seed(0)
    net = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), NormedGated()).eval()
    q = tq.quantize_model(net, wf, af, leaf_modules=[NormedGated])
    assert type(q.get_submodule("2")) is NormedGated  # untraceable: swapped inside
    kinds = {name: type(m).__name__ for name, m in q.named_modules() if name in ("0", "2.norm")}
    assert kinds == {"0": "QOp", "2.norm": "QOp"}
    x = torch.rand(2, 4)
    assert torch.equal(q(x), net(x))


def test_a_swapped_leaf_whose_norm_got_no_quantizer_keeps_it_plain_and_reloads_as_saved(tmp_path):
    # The layout of checkpoints saved before swapped leaves quantized their normalisation outputs.
    def build():
        torch.manual_seed(0)
        net = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), NormedGated()).eval()
        with torch.no_grad():  # a normalised row sums to 0: unequal gains make the branch follow the data's sign
            net[2].norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        return net

    q = tq.quantize_model(build(), wf, lambda m, n: None if n == "2.norm" else af(m, n), leaf_modules=[NormedGated])
    assert type(q.get_submodule("2.norm")) is nn.LayerNorm
    x = torch.rand(8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.ptq.UncalledQModulesWarning)  # both branches run
        tq.calibrate(q, [x, -x, *torch.randn(8, 2, 4)], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    tq.save(q, tmp_path / "q.safetensors")
    again = tq.load(build(), tmp_path / "q.safetensors")
    assert type(again.get_submodule("2.norm")) is nn.LayerNorm
    assert torch.equal(again(x), q(x))


def test_save_and_load_repeat_the_conversion_inside_leaves(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), Masked()).eval()
    q = tq.quantize_model(net, wf, af, leaf_modules=[Masked])
    x = torch.randn(8, 4)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    tq.save(q, tmp_path / "m.safetensors")
    loaded = tq.load(nn.Sequential(nn.Linear(4, 4), Masked()).eval(), tmp_path / "m.safetensors")
    assert isinstance(loaded.get_submodule("1"), torch.fx.GraphModule)
    assert torch.equal(loaded(x), q(x))


def test_skip_reaches_inside_leaves():
    q = tq.quantize_model(WithLeaves(), wf, af, leaf_modules=[Gated, Masked], skip=["gated.fc2", "masked.fc2"])
    names = set(qnames(q))
    assert {"gated.fc1", "masked.fc1"} <= names and not names & {"gated.fc2", "masked.fc2"}
    notes = {r["name"]: r["note"] for r in tq.summary_rows(q) if r["kind"] == "float"}
    assert notes["gated.fc2"].startswith("skipped by glob") and notes["masked.fc2"].startswith("skipped by glob")


def test_a_timm_registered_leaf_is_quantized_inside():
    timm_fx = pytest.importorskip("timm.layers._fx")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x + self.conv(x).mul_(self.scale)  # in place, as timm's NormFreeBlock does

    net = nn.Sequential(nn.Conv2d(3, 3, 1), Block()).eval()
    timm_fx.register_notrace_module(Block)
    try:
        q = tq.quantize_model(net, wf, af)
    finally:
        timm_fx._leaf_modules.discard(Block)
    assert isinstance(q.get_submodule("1"), torch.fx.GraphModule) and "1.conv" in qnames(q)
    assert tq.convert.float_layers(q) == []
    x = torch.rand(1, 3, 4, 4)
    assert torch.equal(q(x), net(x))


def test_a_leaf_called_twice_is_quantized_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Masked()

        def forward(self, x):
            return self.block(self.block(x))

    net = Twice().eval()
    q = tq.quantize_model(net, wf, af, leaf_modules=[Masked])
    assert [n for n in qnames(q) if n.startswith("block.fc")] == ["block.fc1", "block.fc2"]
    x = torch.rand(2, 4)
    assert torch.equal(q(x), net(x))


def test_trace_error_from_torch_fx_itself_names_the_models_forward(monkeypatch):
    # torch.fx failing before any of the model's code runs ("co_varnames is too small" for some decorated
    # forwards, seen on BERT and GPT-2): the raising frame is torch.fx's own.
    ns: dict = {}
    src = "def broken(*args, **kwargs):\n    raise ValueError('code: co_varnames is too small')\n"
    exec(compile(src, torch.fx._symbolic_trace.__file__, "exec"), ns)
    monkeypatch.setattr(torch.fx.Tracer, "create_args_for_root", ns["broken"])
    with pytest.raises(tq.FxTraceError) as info:
        tq.quantize_model(HasDynamic(), wf, af)
    msg = str(info.value)
    assert "co_varnames is too small" in msg
    assert f"{__file__}:" in msg and "HasDynamic.forward" in msg
    assert "torchquant/graph/fx.py" not in msg


def test_the_constants_each_leaf_call_passes_are_fixed_when_tracing_it():
    class Leaf(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, mask=None, scale=1.0, flag=False):
            y = self.fc(x)
            if mask is not None:
                y = y * mask
            if flag:
                y = y + 1
            return y * scale

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Leaf(), Leaf()

        def forward(self, x):
            return self.b(self.a(x, mask=None, scale=2.0, flag=True), None, 3.0)

    net = Net().eval()
    q = tq.quantize_model(net, wf, af, leaf_modules=[Leaf])
    assert isinstance(q.a, torch.fx.GraphModule) and isinstance(q.b, torch.fx.GraphModule)
    assert {"a.fc", "a.add", "a.mul", "b.fc", "b.mul"} <= set(qnames(q))
    x = torch.randn(2, 4)
    assert torch.equal(q(x), net(x))


@pytest.mark.parametrize("layer", [nn.Linear(4, 2), nn.Conv2d(3, 4, 3), nn.Linear(4, 2, bias=False)], ids=str)
def test_a_bare_layer_as_the_model_becomes_one_qwrapper(layer):
    """torch.fx names the root's parameters "weight" and "bias", with no owner prefix."""
    x = torch.randn(2, 3, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.FloatLayersWarning)
        q = tq.quantize_model(layer, lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)), None)
    assert [type(m).__name__ for _, m in tq.iter_qmodules(q)] == ["QWrapper"]
    assert torch.equal(q(x), layer(x))


class _AfterMovement(nn.Module):
    """Activations the layers before them cannot take in: after a transpose, an addition, as a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)
        self.act = nn.GELU()
        self.fc = nn.Linear(4, 4)
        self.gate = nn.Hardsigmoid()
        self.up = nn.Upsample(scale_factor=2, mode="linear")
        self.near = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):  # x: (N, 4, L)
        h = self.act(self.conv(x).transpose(1, 2))  # (N, L, 4)
        y = self.fc(h)
        z = F.silu(y + h)
        g = self.gate(y.mean(1, keepdim=True)) * z + torch.sigmoid(h).tanh()
        s = F.interpolate(g.transpose(1, 2), scale_factor=2.0, mode="linear")
        return self.up(s) + self.near(s) + F.interpolate(s, scale_factor=2.0)


def test_activations_that_follow_no_layer_get_a_qop_when_the_factory_gives_a_quantizer():
    torch.manual_seed(0)
    net = _AfterMovement().eval()
    x = torch.randn(2, 4, 6)
    q = tq.quantize_model(net, wf, af).eval()
    ops = {n: v[1] for n, v in qnames(q).items() if v[0] == "QOp"}
    assert ops == {
        "act": "GELU", "silu": "silu", "gate": "Hardsigmoid", "sigmoid": "sigmoid", "tanh": "tanh",
        "interpolate": "interpolate", "up": "Upsample", "add": "add", "add_1": "add", "add_2": "add",
        "add_3": "add", "mul": "mul", "mean": "mean",
    }  # fmt: skip
    assert not [r for r in tq.summary_rows(q) if r["kind"] == "float"]  # nearest resampling only copies
    ref = net(x)
    assert torch.equal(q(x), ref)
    with tq.qmodule_state(q, S.CALIBRATION):
        assert torch.equal(q(x), ref)
    # fc reads the GELU's quantized output
    tq.calibrate(q, [x], progress=False)
    seen = {}
    q.get_submodule("act").register_forward_hook(lambda m, a, y: seen.update(act=(a[0], y)))
    q.get_submodule("fc").register_forward_pre_hook(lambda m, a: seen.update(fc=a[0]))
    with tq.qmodule_state(q, S.QUANT_EVAL):
        q(x)
    (act_in, act_out), fc_in = seen["act"], seen["fc"]
    assert fc_in is act_out and not torch.equal(act_out, F.gelu(act_in))


def test_an_activation_the_factory_gives_no_quantizer_stays_as_called_and_is_not_reported(tmp_path):
    def declining(m, name):
        return None if name in ("act", "silu", "gate", "sigmoid", "tanh", "interpolate", "up") else af(m, name)

    torch.manual_seed(0)
    q = tq.quantize_model(_AfterMovement().eval(), wf, declining).eval()
    ops = {n for n, v in qnames(q).items() if v[0] == "QOp"}
    assert ops == {"add", "add_1", "add_2", "add_3", "mul", "mean"}
    assert type(q.get_submodule("act")) is nn.GELU and type(q.get_submodule("up")) is nn.Upsample
    assert not [r for r in tq.summary_rows(q) if r["kind"] == "float"]
    # the layout of a checkpoint saved before such activations were points: it loads as saved
    x = torch.randn(8, 4, 6)
    tq.calibrate(q, [x, -x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    tq.save(q, tmp_path / "q.safetensors")
    torch.manual_seed(0)
    again = tq.load(_AfterMovement().eval(), tmp_path / "q.safetensors")
    assert type(again.get_submodule("act")) is nn.GELU
    assert torch.equal(again(x), q(x))


def test_activation_points_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    q = tq.quantize_model(_AfterMovement().eval(), wf, af).eval()
    x = torch.randn(8, 4, 6)
    tq.calibrate(q, [x, -x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    tq.save(q, tmp_path / "q.safetensors")
    again = tq.load(_AfterMovement().eval(), tmp_path / "q.safetensors")
    assert qnames(again) == qnames(q)
    assert torch.equal(again(x), q(x))


def test_data_movement_functions_libraries_wrap_are_not_reported():
    pytest.importorskip("torchvision")
    from torchvision.models import SwinTransformer

    q = tq.quantize_model(SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4]).eval(), wf, af)
    notes = {r["name"]: r["note"] for r in tq.summary_rows(q) if r["kind"] == "float"}
    assert not [n for n in notes if "_patch_merging_pad" in n], notes


class _ReadsItsParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.prelu = nn.PReLU(3)
        self.up = nn.UpsamplingBilinear2d(scale_factor=2)

    def forward(self, x):
        y = self.prelu(self.conv(x) + x)  # not fused: after an addition
        return self.up(y + self.prelu.weight.view(1, -1, 1, 1))


def test_a_module_that_becomes_a_qop_still_has_its_parameters_read():
    torch.manual_seed(0)
    net = _ReadsItsParameter().eval()
    q = tq.quantize_model(net, wf, af).eval()
    assert qnames(q)["prelu"] == ("QOp", "PReLU") and qnames(q)["up"] == ("QOp", "UpsamplingBilinear2d")
    assert q.get_submodule("prelu").op.weight is net.prelu.weight
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(q(x), net(x))


def test_a_skipped_activation_is_reported_once():
    q = tq.quantize_model(_AfterMovement().eval(), wf, af, skip=["silu", "mul"])
    notes = {r["name"]: r["note"] for r in tq.summary_rows(q) if r["kind"] == "float"}
    assert notes == {"silu": "skipped by glob 'silu' (silu)", "mul": "skipped by glob 'mul' (mul)"}


class _Constants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.logit_scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        bias = x.new_zeros(x.size(0), 4)  # from a size only
        return self.fc(x) * self.logit_scale.exp() + bias  # exp of a parameter: a constant


def test_values_computed_from_parameters_and_sizes_alone_are_not_reported_as_float():
    q = tq.quantize_model(_Constants().eval(), wf, af)
    assert not [r for r in tq.summary_rows(q) if r["kind"] == "float"]
    assert {v[1] for v in qnames(q).values() if v[0] == "QOp"} == {"mul", "add"}


def test_a_glob_can_skip_one_call_of_an_operation_by_its_qops_name():
    q = tq.quantize_model(_AfterMovement().eval(), wf, af, skip=["add_1"])
    adds = sorted(n for n, v in qnames(q).items() if v == ("QOp", "add"))
    assert adds == ["add", "add_2", "add_3"]  # the others keep the names they have without the skip
    notes = {r["name"]: r["note"] for r in tq.summary_rows(q) if r["kind"] == "float"}
    assert notes == {"add_1": "skipped by glob 'add_1' (add)"}


@pytest.mark.parametrize("same", [True, False], ids=["same-followers", "other-followers"])
def test_a_layer_called_twice_fuses_only_what_follows_every_call(same):
    # One wrapper per module: fused with a BatchNorm and ReLU only if both calls are followed by them, else the
    # second call's wrapper replaced the first's and the first call lost its BatchNorm and ReLU.
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn1, self.bn2, self.relu = (
                nn.Conv2d(4, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.BatchNorm2d(4),
                nn.ReLU(),
            )

        def forward(self, x):
            x = self.relu(self.bn1(self.conv(x)))
            return self.relu(self.bn1(self.conv(x))) if same else self.bn2(self.conv(x))

    torch.manual_seed(0)
    net = Twice().eval()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 4, 6, 6)
    ref = net(x)
    q = tq.quantize_model(copy.deepcopy(net), lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)),
                          lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()))  # fmt: skip
    assert isinstance(q.conv, tq.QWrapper) and ("bn1" in dict(q.named_children())) != same  # fused, or a QOp
    with torch.no_grad(), tq.qmodule_state(q, tq.QModuleState.BYPASSED):
        assert torch.allclose(q(x), ref, atol=1e-5), float((q(x) - ref).abs().max())


@pytest.mark.parametrize("slopes", [(0.2, 0.01), (0.2, 0.2)], ids=["other-arguments", "same-arguments"])
def test_a_layer_called_twice_fuses_a_functional_activation_only_with_the_same_arguments(slopes):
    # both calls' F.leaky_relu became a LeakyReLU of one type: one wrapper ran the last call's slope for both
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return F.leaky_relu(self.fc(x), slopes[0]) + F.leaky_relu(self.fc(-x), slopes[1])

    torch.manual_seed(0)
    net = Twice().eval()
    x = torch.randn(4, 8)
    q = tq.quantize_model(copy.deepcopy(net), wf, af)
    assert (q.fc.act is not None) == (slopes[0] == slopes[1])
    with torch.no_grad(), tq.qmodule_state(q, tq.QModuleState.BYPASSED):
        assert torch.equal(q(x), net(x))


def test_a_layer_called_twice_fuses_relu_whether_or_not_it_runs_in_place():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return F.relu(self.fc(x), inplace=True) + torch.relu(self.fc(-x))

    q = tq.quantize_model(Twice().eval(), wf, af)
    assert isinstance(q.fc.act, nn.ReLU)


class _OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        y = self.fc(x)
        if mask is not None:  # a proxy is not None: the trace takes this branch
            y = y * mask.view(1, -1)
        return y


def test_an_optional_argument_traced_as_given_is_warned_about_and_example_inputs_trace_without_it():
    wf = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))  # noqa: E731
    with pytest.warns(UserWarning, match=r"optional argument\(s\) 'mask' \(default None\) as given tensors"):
        tq.quantize_model(_OptionalMask(), wf, None)
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        q = tq.quantize_model(_OptionalMask(), wf, None, example_inputs=(x,))
    with tq.qmodule_state(q, tq.QModuleState.BYPASSED), torch.no_grad():
        assert q(x).shape == (2, 4)


class _OptionalAdded(nn.Module):
    def __init__(self, into_layer: bool):
        super().__init__()
        self.fc, self.extra_fc, self.into_layer = nn.Linear(4, 4), nn.Linear(4, 4), into_layer

    def forward(self, x, extra=None):
        y = self.fc(x)
        if extra is not None:
            y = y + (self.extra_fc(extra) if self.into_layer else extra)  # a QOp's input, or a layer's
        return y


@pytest.mark.parametrize("into_layer", [False, True], ids=["added", "into-a-layer"])
def test_an_optional_argument_read_by_a_qop_or_a_layer_is_warned_about(into_layer):
    # the arithmetic had become a QOp before the check ran, and a layer's input was not checked
    with pytest.warns(UserWarning, match=r"optional argument\(s\) 'extra' \(default None\)"):
        tq.quantize_model(_OptionalAdded(into_layer), wf, af)


@pytest.mark.parametrize("method", ["fx", "swap"])
def test_qops_name_their_quantizers_by_their_place_in_the_model(method):
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(x + self.fc(x))

    net = nn.Sequential(Block(), Block())
    q = tq.quantize_model(net, wf, af, method=method, **({"norm_outputs": True} if method == "swap" else {}))
    names = {n: m.acts_quantizer._tq_name for n, m in q.named_modules() if isinstance(m, tq.QOp)}
    expected = {"1.norm", "1.add"} if method == "fx" else {"1.norm"}
    assert expected <= set(names)
    assert all(v == f"{k}.acts_quantizer" for k, v in names.items()), names


def test_a_qop_on_integer_outputs_says_to_convert_with_example_inputs():
    # without examples every input is taken for a float tensor: ids + 1 got a quantizer, and the observer's
    # dtype error named neither the cause nor the way out
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = nn.Embedding(100, 8), nn.Linear(8, 4)

        def forward(self, ids):
            return self.fc(self.emb(ids + 1))

    ids = torch.randint(0, 98, (4, 16))
    q = tq.quantize_model(LM().eval(), wf, af)
    with pytest.raises(TypeError, match=r"add\.acts_quantizer: the output of this add is torch\.int64 .*example_"):
        tq.calibrate(q, [ids], progress=False)
    q = tq.quantize_model(LM().eval(), wf, af, example_inputs=(ids,))
    assert "add" not in dict(q.named_modules())
    tq.calibrate(q, [ids], progress=False)
