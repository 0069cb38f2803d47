"""quantize_model(method="fx", example_inputs=...): branches on sizes follow the example, guarded."""

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchquant as tq
from torchquant.graph.concrete import BranchGuardError
from torchquant.graph.fx import FxTraceError

S = tq.QModuleState
W = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)  # noqa: E731
A = lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax())  # noqa: E731


class _WindowAttention(nn.Module):
    """Pads the sequence to whole windows only when it needs it (timm's Twins): a branch on a size."""

    def __init__(self, dim: int = 8, window: int = 4) -> None:
        super().__init__()
        self.window = window
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # (B, L, C)
        b, length, c = x.shape
        pad = (self.window - length % self.window) % self.window
        if pad > 0:
            x = F.pad(x, (0, 0, 0, pad))
        q, k, v = self.qkv(x).reshape(b, -1, self.window, 3, c).unbind(3)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).reshape(b, -1, c)[:, :length])


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = _WindowAttention()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.embed(x)
        return self.head(y + self.attn(y))


def _ops(q: nn.Module) -> list[str]:
    return [r["name"] for r in tq.summary_rows(q) if r["kind"] == "QOp"]


def test_a_branch_on_a_size_follows_the_example_and_is_guarded():
    net = _Net().eval()
    with pytest.raises(FxTraceError, match=r"control flow[\s\S]*pass example_inputs= to trace it"):
        tq.quantize_model(net, W, A)
    q = tq.quantize_model(net, W, A, example_inputs=torch.randn(1, 8, 4))
    assert q.meta["_tq_float_reasons"] == {}
    assert {"attn.matmul", "attn.softmax", "attn.matmul_1", "add"} <= set(_ops(q))
    for x in (torch.randn(1, 8, 4), torch.randn(3, 12, 4)):  # other batch sizes and lengths on the same branch
        torch.testing.assert_close(q(x), net(x), rtol=0, atol=0)
    with pytest.raises(BranchGuardError, match=r"gives True .* gave False[\s\S]*if pad > 0:"):
        q(torch.randn(1, 7, 4))


def test_a_converted_guarded_model_calibrates_and_quantizes():
    net = _Net().eval()
    q = tq.quantize_model(net, W, A, example_inputs=torch.randn(1, 8, 4))
    x = torch.randn(4, 8, 4)
    with torch.no_grad(), tq.qmodule_state(q, S.CALIBRATION):
        q(x)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    y = q(x)
    sqnr = 10 * torch.log10(net(x).pow(2).mean() / (net(x) - y).pow(2).mean())
    assert 20 < sqnr < 60  # quantized, close to float


class _TakesPaddedBranch(nn.Module):
    def forward(self, x):
        if x.shape[-1] % 2:
            x = F.pad(x, (0, 1))
        return torch.tanh(x) * 2


def test_the_branch_taken_is_the_examples():
    net = _TakesPaddedBranch()
    q = tq.quantize_model(net, W, A, example_inputs=torch.randn(2, 3))
    assert q(torch.ones(1, 5)).shape == (1, 6)
    with pytest.raises(BranchGuardError):
        q(torch.ones(1, 4))


class _SquareGrid(nn.Module):
    """``int()`` of a size and a loop over ``range()`` of one (ConViT's relative indices)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):  # (B, N, C), N a square
        side = int(math.sqrt(x.shape[1]))
        rows = [x.view(x.shape[0], side, side, -1)[:, i].sum(1) for i in range(side)]
        return self.fc(torch.stack(rows, 1)) * len(rows)


def test_int_and_range_of_a_size_follow_the_example_guarded():
    net = _SquareGrid()
    q = tq.quantize_model(net, W, A, example_inputs=torch.randn(1, 9, 3))
    x = torch.randn(2, 9, 3)
    torch.testing.assert_close(q(x), net(x))
    with pytest.raises(BranchGuardError, match=r"gives 4 .* gave 3"):
        q(torch.randn(2, 16, 3))


class _Rows(nn.Module):
    def forward(self, x):  # a loop over a tensor's first dimension: its length is a size
        return torch.stack([row.softmax(-1) for row in x])


def test_a_loop_over_a_tensor_follows_its_length_guarded():
    q = tq.quantize_model(_Rows(), W, A, example_inputs=torch.randn(3, 4))
    assert _ops(q) == ["softmax", "softmax_1", "softmax_2", "stack"]  # one softmax per row
    x = torch.randn(3, 4)
    torch.testing.assert_close(q(x), x.softmax(-1))
    with pytest.raises(BranchGuardError, match=r"gives 2 .* gave 3"):
        q(torch.randn(2, 4))


class _DataBranch(nn.Module):
    def forward(self, x):
        if x.abs().max() > 1:
            x = x / x.abs().max()
        return x.softmax(-1)


def test_a_branch_on_tensor_values_is_refused():
    with pytest.raises(FxTraceError, match="depends on tensor values"):
        tq.quantize_model(_DataBranch(), W, A, example_inputs=torch.randn(2, 3))


class _Grid(nn.Module):
    """A leaf with a branch on the (H, W) its parent passes and a cache it fills in forward (ConViT's GPSA)."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(8, 16)
        self.cache = None

    def forward(self, x, size):
        h, w = size
        if self.cache is None or self.cache.shape[0] != h * w:
            self.cache = x.new_zeros(h * w, h * w)
            self.cache[:, 0] = 1.0
        if w % 2:
            x = x * 0.5
        q, k = self.qk(x).chunk(2, -1)
        return (q @ k.transpose(-2, -1) + self.cache).softmax(-1) @ x


class _GridNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.grid = _Grid()
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        y = self.conv(x)
        size = y.shape[-2:]
        y = self.grid(y.flatten(2).transpose(1, 2), size)
        return self.bn(y.transpose(1, 2))


def test_a_leaf_fx_cannot_trace_is_traced_with_its_example_inputs():
    net = _GridNet().eval()
    plain = tq.quantize_model(net, W, A, leaf_modules=[_Grid])
    assert "swap" in plain.meta["_tq_float_reasons"]["grid"]
    assert not any(n.startswith("grid.") for n in _ops(plain))
    q = tq.quantize_model(net, W, A, leaf_modules=[_Grid], example_inputs=torch.randn(1, 3, 4, 5))
    assert q.meta["_tq_float_reasons"] == {}  # the size arithmetic (w % 2) is not reported as float
    assert {"grid.matmul", "grid.add", "grid.softmax", "grid.matmul_1"} <= set(_ops(q))
    assert net.grid.cache is None  # the conversion leaves the float model as it was
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(q(x), net(x))
    with pytest.raises(BranchGuardError, match="if w % 2:"):
        q(torch.randn(2, 3, 4, 4))


def test_tracing_with_examples_in_training_mode_leaves_the_running_statistics():
    net = _GridNet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    q = tq.quantize_model(net, W, A, leaf_modules=[_Grid], example_inputs=torch.randn(2, 3, 4, 5))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert q.training and q.bn.training


def test_examples_are_recorded_as_shapes_and_a_checkpoint_reloads(tmp_path):
    pytest.importorskip("safetensors")
    net = _Net().eval()
    q = tq.quantize_model(net, W, A, example_inputs=(torch.randn(1, 8, 4),))
    record = q._tq_conversions[-1]
    assert record["options"]["example_inputs"] == {"args": [{"shape": [1, 8, 4], "dtype": "float32"}], "kwargs": {}}
    x = torch.randn(2, 8, 4)
    with torch.no_grad(), tq.qmodule_state(q, S.CALIBRATION):
        q(x)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    tq.save(q, tmp_path / "q.safetensors")
    back = tq.load(_Net().eval(), tmp_path / "q.safetensors")
    torch.testing.assert_close(back(x), q(x), rtol=0, atol=0)
    with pytest.raises(BranchGuardError):
        back(torch.randn(1, 7, 4))


def test_a_pickled_guarded_model_keeps_its_guards():
    net = _Net().eval()
    q = tq.quantize_model(net, W, A, example_inputs=torch.randn(1, 8, 4))
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    x = torch.randn(2, 8, 4)
    torch.testing.assert_close(back(x), q(x))
    with pytest.raises(BranchGuardError):
        back(torch.randn(1, 7, 4))


def test_guards_hold_under_torch_compile():
    net = _Net().eval()
    q = tq.quantize_model(net, W, A, example_inputs=torch.randn(1, 8, 4))
    compiled = torch.compile(q, backend="eager", dynamic=True)
    x = torch.randn(2, 12, 4)
    torch.testing.assert_close(compiled(x), q(x))
    with pytest.raises(BranchGuardError):
        compiled(torch.randn(2, 7, 4))


def test_a_guarded_model_exports_to_onnx_with_parity():
    pytest.importorskip("onnxruntime")
    from torchquant import export

    net = _Net().eval()
    q = tq.quantize_model(net, W, A, example_inputs=torch.randn(1, 8, 4))
    with torch.no_grad(), tq.qmodule_state(q, S.CALIBRATION):
        q(torch.randn(8, 8, 4))
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    with pytest.warns(UserWarning, match=r"keeps 1 traced branch\(es\) guarded in PyTorch"):
        export.to_onnx(q, torch.randn(1, 8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proto = export.to_onnx(q, torch.randn(1, 8, 4), dynamic_batch=False)
    report = export.check_parity(q, proto, torch.randn(1, 8, 4))
    # every quantization point, the attention's included, is exact; the output is not compared here:
    # onnxruntime runs the first Linear on the float input as MatMulNBits (docs/export.md)
    assert set(report.points) >= {"attn.matmul.acts_quantizer", "attn.softmax.acts_quantizer", "head.acts_quantizer"}
    assert all(a.max_steps == 0 for a in report.points.values()), report.points


def test_keyword_examples_and_integer_inputs():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 4), nn.Linear(4, 4)

        def forward(self, ids, scale=None):
            x = self.emb(ids)
            if ids.shape[1] > 2:
                x = x * 2
            return self.fc(x) if scale is None else self.fc(x) * scale

    q = tq.quantize_model(Tokens(), W, A, example_inputs={"ids": torch.zeros(1, 3, dtype=torch.long)})
    assert q.meta["_tq_float_reasons"] == {}
    assert q(torch.ones(2, 5, dtype=torch.long)).shape == (2, 5, 4)


def test_bad_example_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match=r"example_inputs do not match _Net\.forward"):
        tq.quantize_model(_Net(), W, A, example_inputs=(torch.randn(1, 8, 4), torch.randn(1)))
    with pytest.raises(ValueError, match="argument 0 is a list"):
        tq.quantize_model(_Net(), W, A, example_inputs=([torch.randn(1, 8, 4)],))
    with pytest.raises(ValueError, match="method='fx' only"):
        tq.quantize_model(_Net(), W, A, method="swap", example_inputs=torch.randn(1, 8, 4))


def test_timm_convit_attention_is_quantized_inside_with_examples(tmp_path):
    timm = pytest.importorskip("timm")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    net = timm.create_model("convit_tiny", img_size=32, patch_size=8, depth=2, local_up_to_layer=1).eval()
    fresh = copy.deepcopy(net)
    plain = tq.quantize_model(net, W, A)
    assert plain.meta["_tq_float_reasons"]["blocks.0.attn"].endswith(
        "(example_inputs= may trace it if its branches depend on sizes only)"
    )
    cache = net.blocks[0].attn.rel_indices
    x = torch.randn(2, 3, 32, 32)
    q = tq.quantize_model(net, W, A, example_inputs=x[:1])
    assert q.meta["_tq_float_reasons"] == {}
    assert {"blocks.0.attn.matmul", "blocks.0.attn.softmax", "blocks.0.attn.matmul_1"} <= set(_ops(q))
    assert net.blocks[0].attn.rel_indices is cache  # its cache, filled in forward, as it was
    torch.testing.assert_close(q(x), net(x))
    # a forward before the conversion fills the cache (a buffer): the trace then reads it instead of computing
    # it, with the same quantization points and state-dict keys, so either conversion loads the other's checkpoint
    net(x)
    after = tq.quantize_model(net, W, A, example_inputs=x[:1])
    assert after.meta["_tq_float_reasons"] == {}
    assert [n for n, _ in tq.iter_qmodules(after)] == [n for n, _ in tq.iter_qmodules(q)]
    assert set(after.state_dict()) == set(q.state_dict())
    tq.calibrate(after, [x], progress=False)
    tq.set_qmodule_state(after, S.QUANT_EVAL)
    tq.save(after, tmp_path / "q.safetensors")
    torch.testing.assert_close(tq.load(fresh, tmp_path / "q.safetensors")(x), after(x), rtol=0, atol=0)


class _Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("halve", torch.tensor(True))
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        if self.halve:  # a buffer: a statistic, or another model's value when a checkpoint is replayed
            x = x / 2
        return x.softmax(-1)


class _Gated(_Flagged):
    def forward(self, x):
        return x.softmax(-1) if self.gain > 0 else x  # a trained value


class _GradBranch(nn.Module):
    def forward(self, x):
        return x.softmax(-1) if x.requires_grad else x  # the trace runs without grad: not recorded


class _MaskedSize(nn.Module):
    def forward(self, x):
        return x.softmax(-1) if x[x > 0].shape[0] > 2 else x  # a size that depends on the values


class _CastSum(nn.Module):
    def forward(self, x):
        return x.softmax(-1) if x.type(torch.float64).sum() > 0 else x


class _WhereSize(nn.Module):
    def forward(self, x):
        return x.softmax(-1) if torch.where(x[:, 0] > 0)[0].shape[0] > 1 else x


@pytest.mark.parametrize("model", [_Flagged, _Gated, _GradBranch, _MaskedSize, _CastSum, _WhereSize])
def test_branches_on_what_examples_do_not_fix_are_refused(model):
    with pytest.raises(FxTraceError, match="depends on tensor values"):
        tq.quantize_model(model(), W, A, example_inputs=torch.randn(4, 3))


def test_a_mask_built_from_sizes_is_a_size():
    class KeepTail(nn.Module):
        def forward(self, x):
            y = x[:, torch.arange(x.shape[1]) > 0]
            return y.softmax(-1) if y.shape[1] % 2 else y

    q = tq.quantize_model(KeepTail(), W, A, example_inputs=torch.randn(2, 4))
    x = torch.randn(2, 4)
    torch.testing.assert_close(q(x), x[:, 1:].softmax(-1))
    with pytest.raises(BranchGuardError):
        q(torch.randn(2, 5))


def test_state_the_trace_cannot_write_is_left_alone():
    class Held(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("pe", torch.zeros(1, 4).expand(3, 4))  # expanded: no in-place write
            with torch.inference_mode():
                self.register_buffer("cache", torch.ones(4))  # an inference tensor, as filled in inference

        def forward(self, x):
            if x.shape[0] > 1:
                x = x + self.pe[: x.shape[0]] + self.cache
            return self.fc(x)

    net = Held()
    q = tq.quantize_model(net, W, A, example_inputs=torch.randn(3, 4))
    x = torch.randn(3, 4)
    torch.testing.assert_close(q(x), net(x))
    lazy = nn.Sequential(nn.Linear(4, 4), nn.LazyBatchNorm1d())
    tq.quantize_model(lazy, W, A, example_inputs=torch.randn(3, 4))
    assert type(lazy[1]) is nn.LazyBatchNorm1d  # not materialised by the trace


def test_the_conversion_leaves_buffers_written_in_forward_as_they_were():
    class RunningMean(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("mean", torch.zeros(4))

        def forward(self, x):
            if self.training:
                self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
            if x.shape[0] > 1:
                x = x - self.mean
            return self.fc(x)

    net = RunningMean().train()
    tq.quantize_model(net, W, A, example_inputs=torch.randn(8, 4) + 5)
    assert torch.equal(net.mean, torch.zeros(4))


class _Pad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):  # (B, L, 4)
        x = x + self.bn(x.mean(1)).unsqueeze(1)
        if x.shape[1] % 2:
            x = F.pad(x, (0, 0, 0, 1))
        return self.fc(x).softmax(-1)


class _TwoLengths(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pad = _Pad()

    def forward(self, x):
        return self.pad(x).sum(1) + self.pad(x[:, :3]).sum(1)  # lengths 4 and 3: both branches


def test_a_leaf_whose_calls_take_different_branches_is_swapped():
    net = _TwoLengths().eval()
    x = torch.randn(2, 4, 4)
    q = tq.quantize_model(net, W, A, leaf_modules=[_Pad], example_inputs=x)
    assert q.meta["_tq_float_reasons"]["pad"].endswith("its output is not quantized")  # no hint: examples given
    torch.testing.assert_close(q(x), net(x))


def test_a_batch_of_one_example_traces_batchnorm_in_both_modes():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.leaf = _Pad()

        def forward(self, x):
            return self.leaf(x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = tq.quantize_model(Net().eval(), W, A, leaf_modules=[_Pad], example_inputs=torch.randn(1, 4, 4))
    assert q.meta["_tq_float_reasons"] == {}


def test_an_argument_given_as_none_is_fixed():
    class Masked(nn.Module):
        def forward(self, x, mask=None):  # given as None, it must not become a traced input
            if mask is not None:
                x = x.masked_fill(mask, 0.0)
            return x.softmax(-1)

    x = torch.randn(2, 3)
    for examples in ({"x": x, "mask": None}, (x, None)):
        q = tq.quantize_model(Masked(), W, A, example_inputs=examples)
        torch.testing.assert_close(q(x, None), x.softmax(-1))


def test_an_example_the_model_cannot_run_on_names_the_failing_operation():
    with pytest.raises(FxTraceError, match=r"example inputs did not reach[\s\S]*embed"):
        tq.quantize_model(_Net(), W, A, example_inputs=torch.randn(1, 8, 5))


def test_torchvision_swin_attention_is_traced_with_examples():
    models = pytest.importorskip("torchvision.models.swin_transformer")
    torch.manual_seed(0)
    net = models.SwinTransformer([2, 2], 8, [2], [2], [2, 2], num_classes=3).eval()
    plain = tq.quantize_model(net, W, A)
    assert plain.meta["_tq_float_reasons"]["features.1.0.attn"].endswith(
        "(example_inputs= may trace it if its branches depend on sizes only)"
    )
    q = tq.quantize_model(net, W, A, example_inputs=torch.randn(1, 3, 8, 8))
    assert q.meta["_tq_float_reasons"] == {}
    ops = set(_ops(q))
    for block in ("features.1.0.attn", "features.1.1.attn"):  # the second block's windows are shifted
        assert {f"{block}.matmul", f"{block}.softmax", f"{block}.matmul_1"} <= ops
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(q(x), net(x))
    with torch.no_grad(), tq.qmodule_state(q, S.CALIBRATION):
        q(x)
    called = set()
    for name, m in tq.iter_qmodules(q):
        m.register_forward_pre_hook(lambda m, a, name=name: called.add(name))
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    q(x)
    assert {"features.1.0.attn.qkv.linear", "features.1.0.attn.proj.linear"} <= called  # the weights are read there


def test_a_registered_reader_calling_another_modules_wrapped_function_is_traced_into_it():
    sw = pytest.importorskip("torchvision.models.swin_transformer")
    from torchquant.graph import readers

    class MyAttention(sw.ShiftedWindowAttention):  # its forward calls torchvision's wrapped function
        pass

    readers.register_weight_reader(MyAttention)
    try:
        torch.manual_seed(0)
        net = sw.SwinTransformer([2, 2], 8, [2], [2], [2, 2], num_classes=3).eval()
        for block in net.features[1]:
            mine = MyAttention(8, [2, 2], block.attn.shift_size, 2)
            mine.load_state_dict(block.attn.state_dict())
            block.attn = mine
        q = tq.quantize_model(net, W, A, example_inputs=torch.randn(1, 3, 8, 8))
    finally:
        readers._REGISTERED.discard(MyAttention)
    assert q.meta["_tq_float_reasons"] == {}
    assert {"features.1.0.attn.qkv.linear", "features.1.0.attn.softmax"} <= set(n for n, _ in tq.iter_qmodules(q))
