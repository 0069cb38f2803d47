"""quantize_model(method="fx") follows train/eval mode where the traced code reads ``self.training``."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchquant as tq
from torchquant.bench.models import DigitsCNN
from torchquant.graph.modes import MODE_FLAG, ModeFlag, is_mode_flag_call

S = tq.QModuleState
NEW_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)


def wf(m, name):
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))


def af(m, name):
    return tq.AffineQuantizer(8, tq.ExpAvgMinMax())


class Attention(nn.Module):
    """Functional dropout on its output and, like timm's attention, a dropout probability of 0 in eval."""

    def __init__(self, dim=16, p=0.5):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.p = p

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return F.dropout(self.proj(y), self.p, self.training)


class Noisy(nn.Module):
    """Computes something more in training: no constant can follow that."""

    def __init__(self, dim=16):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.aux = nn.Linear(dim, dim)

    def forward(self, x):
        y = self.fc(x)
        if self.training:
            y = y + self.aux(x)
        return y


class Net(nn.Module):
    def __init__(self, block=Attention):
        super().__init__()
        self.block = block()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block(x))


def _same_as_float(net, q, x):
    """Outputs of ``q`` (bypassed) and ``net`` with the same seed, in both modes."""
    same = []
    for mode in (True, False):
        net.train(mode), q.train(mode)
        torch.manual_seed(0)
        ref = net(x)
        torch.manual_seed(0)
        same.append(torch.equal(q(x), ref))
    return same


@pytest.mark.parametrize("converted_in", ["train", "eval"])
def test_functional_dropout_and_attention_dropout_follow_the_mode(converted_in):
    torch.manual_seed(0)
    net = Net().train(converted_in == "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.TrainingBranchWarning)
        q = tq.quantize_model(net, wf, af)
    assert isinstance(q.get_submodule(f"block.{MODE_FLAG}"), ModeFlag)  # the module whose forward reads its mode
    flags = [n for n in q.graph.nodes if is_mode_flag_call(n)]
    assert sorted(n.args for n in flags) == [(0.5, 0.0), (True, False)]
    assert _same_as_float(net, q, torch.randn(2, 5, 16)) == [True, True]
    # the flag is no quantization point and no float report
    assert "block.scaled_dot_product_attention" in dict(tq.iter_qmodules(q))
    assert not [k for k in q.meta["_tq_float_reasons"] if MODE_FLAG in k]


def test_a_model_that_does_not_read_its_mode_converts_as_before():
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.TrainingBranchWarning)
        q = tq.quantize_model(DigitsCNN().train(), wf, af)
    assert not [n for n, m in q.named_modules() if isinstance(m, ModeFlag)]
    assert not [n for n in q.graph.nodes if is_mode_flag_call(n)]


def test_a_branch_in_training_warns_naming_the_module():
    net = Net(Noisy).eval()
    with pytest.warns(tq.TrainingBranchWarning, match=r"'block' \(Noisy\) computes differently in train mode") as w:
        q = tq.quantize_model(net, wf, af)
    assert "leaf_modules" in str(w[0].message)
    x = torch.randn(2, 16)
    assert _same_as_float(net, q, x) == [False, True]  # as the warning says: the eval computation in both modes


def test_the_model_itself_branching_warns_without_the_leaf_advice():
    net = Noisy().train()
    with pytest.warns(tq.TrainingBranchWarning, match=r"the model \(Noisy\) computes differently in eval mode") as w:
        tq.quantize_model(net, wf, af)
    assert "leaf_modules" not in str(w[0].message)


def test_a_branching_module_in_leaf_modules_is_swapped_and_runs_as_written():
    net = Net(Noisy).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.TrainingBranchWarning)
        q = tq.quantize_model(net, wf, af, leaf_modules=[Noisy])
    assert {"block.fc", "block.aux", "head"} <= {n for n, m in tq.iter_qmodules(q) if isinstance(m, tq.QWrapper)}
    assert _same_as_float(net, q, torch.randn(2, 16)) == [True, True]


class MadeInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return F.dropout(self.fc(x) * torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.5, self.training)


def test_the_second_trace_leaves_the_float_model_as_it_was():
    net = MadeInForward().train()
    net.drop.eval()  # a module in a mode of its own keeps it
    attrs = set(net.__dict__)
    tq.quantize_model(net, wf, af)
    assert set(net.__dict__) == attrs  # torch.fx stores tensors made in forward on the root: not the second trace's
    assert net.training and net.fc.training and not net.drop.training


def test_the_flag_survives_copies_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    q = tq.quantize_model(net, wf, af)
    x = torch.randn(2, 5, 16)
    tq.calibrate(q, [x], progress=False)
    tq.save(q, tmp_path / "q.pt")
    copies = [copy.deepcopy(q), tq.load(Net(), tmp_path / "q.pt")]
    if NEW_TORCH:  # torch 2.13 cannot unpickle a whole GraphModule
        buf = io.BytesIO()
        torch.save(q, buf)
        buf.seek(0)
        copies.append(torch.load(buf, weights_only=False))
    for c in copies:
        tq.set_qmodule_state(c, S.BYPASSED)
        assert _same_as_float(net, c, x) == [True, True]


def test_torch_export_in_eval_mode_takes_the_eval_values():
    net = Net().eval()
    q = tq.quantize_model(net, wf, af).eval()
    x = torch.randn(2, 5, 16)
    exported = torch.export.export(q, (x,)).module()
    assert torch.equal(exported(x), net(x))


def test_timm_heads_and_attention_with_dropout_follow_the_mode():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    nets = [
        timm.create_model("resnet10t", num_classes=10, drop_rate=0.5),
        timm.create_model(
            "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=1, drop_rate=0.2,
            attn_drop_rate=0.2,
        ),
    ]  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    for net in nets:
        q = tq.quantize_model(net.eval(), wf, af)
        assert [n for n in q.graph.nodes if is_mode_flag_call(n)]
        assert _same_as_float(net, q, x) == [True, True]


def test_efficientnet_pytorch_drop_connect_is_one_call_that_follows_the_mode():
    ep = pytest.importorskip("efficientnet_pytorch")
    from efficientnet_pytorch.utils import drop_connect

    net = ep.EfficientNet.from_name("efficientnet-b0", num_classes=10, image_size=32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.TrainingBranchWarning)
        q = tq.quantize_model(net, wf, af)
    calls = [n for n in q.graph.nodes if n.target is drop_connect]
    assert len(calls) == 9  # every block with a skip connection
    flags = [n.kwargs.get("training", n.args[2] if len(n.args) > 2 else None) for n in calls]
    assert all(isinstance(f, torch.fx.Node) and is_mode_flag_call(f) for f in flags)
    assert not [k for k in q.meta["_tq_float_reasons"] if "drop_connect" in k]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(q.eval()(x), net.eval()(x))
        q.train()
        torch.manual_seed(0)
        first = q(x)
        torch.manual_seed(1)
        assert not torch.equal(q(x), first)  # drop connect (and dropout) draw again in training


class TwoDropouts(nn.Module):
    """A dropout in training only between two that follow the mode: the alignment cannot say which is which."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        y = F.dropout(self.fc(x), 0.1, self.training)
        if self.training:
            y = F.dropout(y, 0.2, True)
        return F.dropout(y, 0.9, self.training)


@pytest.mark.parametrize("converted_in", ["train", "eval"])
def test_inside_a_branching_module_the_traced_computation_is_kept_whole(converted_in):
    net = Net(TwoDropouts).train(converted_in == "train")
    with pytest.warns(tq.TrainingBranchWarning, match=r"'block' \(TwoDropouts\)"):
        q = tq.quantize_model(net, wf, af)
    assert not [n for n in q.graph.nodes if is_mode_flag_call(n)]  # no constant of one call moved to another
    x = torch.randn(2, 5, 16)
    net.train(converted_in == "train")
    q.train(converted_in == "train")
    torch.manual_seed(0)
    ref = net(x)
    torch.manual_seed(0)
    assert torch.equal(q(x), ref)  # the mode it was converted in, exactly


@pytest.mark.parametrize("root_training", [True, False])
def test_a_module_in_a_mode_of_its_own_is_followed(root_training):
    torch.manual_seed(0)
    net = Net()
    net.train(root_training)
    net.block.train(not root_training)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.TrainingBranchWarning)
        q = tq.quantize_model(net, wf, af)
    assert q.get_submodule(f"block.{MODE_FLAG}").training is (not root_training)
    x = torch.randn(2, 5, 16)
    torch.manual_seed(0)
    ref = net(x)
    torch.manual_seed(0)
    assert torch.equal(q(x), ref)  # as converted: the block in its own mode
    assert _same_as_float(net, q, x) == [True, True]


class Stateful(nn.Module):
    """Forward code with side effects: a cache (timm's LeViT caches attention biases in eval), a counter."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.cache = {}
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            return self.fc(x)
        if "bias" not in self.cache:
            self.cache["bias"] = self.fc.bias * 2
        return self.fc(x) + self.cache["bias"]


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Stateful()

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("converted_in", ["train", "eval"])
def test_tracing_leaves_no_trace_on_the_float_model(converted_in):
    net = Wrapper().train(converted_in == "train")
    with pytest.warns(tq.TrainingBranchWarning):
        tq.quantize_model(net, wf, af)
    assert net.inner.cache == {} and net.inner.calls == 0
    torch.save(net, io.BytesIO())  # no proxies left in it


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x) * torch.tensor([1.0, 2.0, 3.0, 4.0])
        if y.sum() > 0:  # data-dependent: torch.fx cannot trace it
            return y
        return -y


def test_a_failed_trace_leaves_no_constants_on_the_model():
    net = Untraceable()
    attrs = set(net.__dict__)
    with pytest.raises(tq.FxTraceError):
        tq.quantize_model(net, wf, af)
    assert set(net.__dict__) == attrs
