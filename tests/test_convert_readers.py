"""Modules that pass a wrapped layer's weight to F.linear: the reads go to the wrapper (torchquant.graph.readers)."""

from __future__ import annotations

import copy
import io
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchquant as tq
from torchquant.graph import readers
from torchquant.graph.common import structural_copy
from torchquant.graph.readers import WEIGHT_READERS, is_weight_reader, redirect_weight_reads
from torchquant.weight_reads import is_redirected

S = tq.QModuleState


class Reads(nn.Module):
    """Reads ``fc``'s weight and passes a bias of its own making, as Swin V2 does with ``qkv``."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.out = nn.Linear(4, 3)
        self.fail = fail

    def forward(self, x):
        if self.fail:
            raise RuntimeError("forward failed")
        h = F.linear(x, self.fc.weight, self.fc.bias * 2)
        return self.out(torch.relu(h))


def _wrapped(fail: bool = False) -> Reads:
    torch.manual_seed(0)
    m = Reads(fail)
    m.fc = tq.QWrapper(m.fc, tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)), tq.AffineQuantizer(4, tq.BatchMinMax()))
    m.out = tq.QWrapper(m.out, tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)))
    return redirect_weight_reads(m)


def test_the_read_goes_to_the_wrapper_with_the_callers_bias():
    m = _wrapped()
    x = torch.randn(5, 6)
    with torch.no_grad():
        ref_float = m.out(torch.relu(F.linear(x, m.fc.weight, m.fc.bias * 2)))
        assert torch.equal(m(x), ref_float)  # BYPASSED: the module's own float computation
        tq.calibrate(m, [x], progress=False)
        m.fc.qstate = m.out.qstate = S.QUANT_EVAL
        h = F.linear(x, m.fc.weight_quantizer(m.fc.weight), m.fc.bias * 2)
        expected = m.out(torch.relu(m.fc.acts_quantizer(h)))
        assert torch.equal(m(x), expected)
        assert not torch.equal(expected, ref_float)


def test_the_wrapper_is_called_in_every_mode():
    m = _wrapped()
    calls = []
    m.fc.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    x = torch.randn(5, 6)
    m(x)
    assert calls == [(5, 6)]  # BYPASSED too: passes that collect float inputs hook the wrapper
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.UncalledQModulesWarning)
        tq.calibrate(m, [x], progress=False)
    assert len(calls) == 2 and m.fc.acts_quantizer.range_observer.initialized


def test_a_wrapper_the_module_calls_itself_runs_once():
    m = _wrapped()  # Reads calls self.out as a module: its own F.linear on its own weight is no read
    calls = []
    m.out.register_forward_hook(lambda mod, args, out: calls.append(1))
    x = torch.randn(5, 6)
    for state in (S.BYPASSED, S.CALIBRATION):
        calls.clear()
        tq.set_qmodule_state(m, state)
        m(x)
        assert calls == [1], state


def test_bias_correction_leaves_a_layer_called_with_the_modules_own_bias():
    m = _wrapped()  # fc is called with 2 * its bias: a correction of fc.bias would have no effect
    x = torch.randn(8, 6)
    tq.calibrate(m, [x], progress=False)
    before = m.fc.bias.clone()
    with pytest.warns(UserWarning, match=r"bias_correction: fc left uncorrected: the model calls them with a bias"):
        shifts = tq.ptq.bias_correction(m, [x], progress=False)
    assert set(shifts) == {"out"} and torch.equal(m.fc.bias, before)


def test_gradients_reach_the_weight_through_the_redirect():
    m = _wrapped()
    tq.set_qmodule_state(m, S.QUANT_AWARE_TRAIN)
    m(torch.randn(5, 6)).square().sum().backward()
    assert m.fc.weight.grad is not None and m.fc.weight.grad.abs().sum() > 0


def test_a_failing_forward_leaves_no_mode_behind():
    m = _wrapped(fail=True)
    m.fc.qstate = S.CALIBRATION
    with pytest.raises(RuntimeError, match="forward failed"):
        m(torch.randn(5, 6))
    assert not torch.overrides._get_current_function_mode_stack()


def test_install_is_idempotent_and_copies_are_independent():
    m = _wrapped()
    assert redirect_weight_reads(m) is m and len(m._forward_pre_hooks) == 1
    base = Reads()
    base.fc = tq.QWrapper(base.fc, tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)))
    copied = redirect_weight_reads(structural_copy(base))
    assert len(copied._forward_pre_hooks) == 1 and len(base._forward_pre_hooks) == 0  # the hook dicts were shared
    x = torch.randn(3, 6)
    tq.calibrate(m, [x], progress=False)
    m.fc.qstate = m.out.qstate = S.QUANT_EVAL_WEIGHT_ONLY
    with torch.no_grad():
        y = m(x)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        for other in (copy.deepcopy(m), torch.load(buf, weights_only=False)):
            assert torch.equal(other(x), y)


def test_a_callers_bias_replaces_the_layers_own_for_one_call():
    lin = nn.Linear(3, 2)
    w = tq.QWrapper(lin)
    x, b = torch.randn(4, 3), torch.randn(2)
    assert torch.equal(w(x, bias=b), F.linear(x, lin.weight, b))
    assert torch.equal(w(x, bias=None), lin(x))  # None: the layer's own
    assert torch.equal(w(x), lin(x))
    folded = tq.QWrapper([nn.Linear(3, 2), nn.BatchNorm1d(2)], fold_bn=True)
    with pytest.raises(ValueError, match=r"QWrapper\[Linear\+BatchNorm1d\].*folded"):
        folded(x, bias=b)
    traced = torch.fx.symbolic_trace(w)  # the argument becomes a placeholder whose default is the layer's bias
    assert torch.equal(traced(x), lin(x))


def test_a_read_without_bias_gets_none_where_the_layer_has_one():
    class NoBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return F.linear(x, self.fc.weight)

    m = NoBias()
    m.fc = tq.QWrapper(m.fc)
    redirect_weight_reads(m)
    x = torch.randn(3, 6)
    assert torch.allclose(m(x), x @ m.fc.weight.t(), atol=1e-6, rtol=0)


def test_threads_sharing_a_redirected_model_each_get_their_own_bias():
    m = _wrapped()
    x = torch.randn(5, 6)
    tq.calibrate(m, [x], progress=False)
    tq.set_qmodule_state(m, S.QUANT_EVAL)
    with torch.no_grad():
        expected = m(x)
        others = [torch.randn(5, 6) for _ in range(4)]
        expected_others = [m.fc(o) for o in others]  # direct calls: the layer's own bias

        def run(i: int) -> bool:
            ok = True
            for _ in range(20):
                ok &= torch.equal(m(x), expected) if i % 2 else torch.equal(m.fc(others[i]), expected_others[i])
            return ok

        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(run, range(4)))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.reads = Reads()

    def forward(self, x):
        return self.reads(self.inp(x))


@pytest.fixture
def registered_reads():
    readers.register_weight_reader(Reads)
    yield Reads
    readers._REGISTERED.discard(Reads)


@pytest.mark.parametrize("method", ["fx", "swap"])
def test_a_registered_reader_is_redirected_by_quantize_model_and_by_load(registered_reads, method, tmp_path):
    wf = lambda m: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))  # noqa: E731
    af = lambda m: tq.AffineQuantizer(4, tq.BatchMinMax())  # noqa: E731
    torch.manual_seed(0)
    net = _Block()
    fresh = copy.deepcopy(net)
    q = tq.quantize_model(copy.deepcopy(net), wf, af, method=method)
    x = torch.randn(5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.UncalledQModulesWarning)
        tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    tq.save(q, tmp_path / "q.safetensors")
    loaded = tq.load(fresh, tmp_path / "q.safetensors")
    with torch.no_grad():
        y = q(x)
        assert not torch.equal(y, net(x))
        assert torch.equal(loaded(x), y)


def test_register_weight_reader_takes_module_types_only():
    with pytest.raises(TypeError, match=r"register_weight_reader: expected an nn\.Module subclass, got 3"):
        readers.register_weight_reader(3)


def test_registry_holds_torchvision_swin_attention():
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    swin = (tv.ShiftedWindowAttention, tv.ShiftedWindowAttentionV2)
    assert {f"{c.__module__}.{c.__qualname__}" for c in swin} == set(WEIGHT_READERS)
    assert not is_weight_reader(Reads())


def _swin(v2: bool) -> nn.Module:
    from torchvision.models import SwinTransformer
    from torchvision.models.swin_transformer import SwinTransformerBlockV2

    torch.manual_seed(0)
    extra = {"block": SwinTransformerBlockV2} if v2 else {}
    return SwinTransformer([4, 4], 16, [1, 1], [2, 2], [4, 4], **extra).eval()


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("method", ["fx", "swap"])
def test_swin_attention_projections_are_quantized(method, v2):
    pytest.importorskip("torchvision")
    from torchvision.models.swin_transformer import shifted_window_attention

    net = _swin(v2)
    wf = lambda m: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))  # noqa: E731
    af = lambda m: tq.AffineQuantizer(8, tq.BatchMinMax())  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the conversion's nor calibration's float-layer warning
        q = tq.quantize_model(copy.deepcopy(net) if method == "swap" else net, wf, af, method=method)
        x = torch.randn(2, 3, 32, 32)
        tq.calibrate(q, [x], progress=False)
    assert not net.features[1][0].attn._forward_pre_hooks  # fx quantizes a copy sharing the parameters
    attn = q.get_submodule("features.1.0.attn")
    assert isinstance(attn.qkv, tq.QWrapper) and isinstance(attn.proj, tq.QWrapper)
    assert attn.qkv.acts_quantizer.range_observer.initialized  # observed in the model's own forward
    with torch.no_grad():
        tq.set_qmodule_state(q, S.BYPASSED)
        assert torch.equal(q(x), net(x))
        tq.set_qmodule_state(q, S.QUANT_EVAL_WEIGHT_ONLY)
        h = torch.randn(2, 8, 8, 16)
        got = attn(h)
        kwargs = {"logit_scale": attn.logit_scale} if v2 else {}
        expected = shifted_window_attention(
            h, attn.qkv.quantized_weight(), attn.proj.quantized_weight(), attn.get_relative_position_bias(),
            attn.window_size, attn.num_heads, shift_size=attn.shift_size, qkv_bias=attn.qkv.bias,
            proj_bias=attn.proj.bias, training=False, **kwargs,
        )  # fmt: skip
        assert torch.equal(got, expected)


def test_adaround_replays_a_layer_with_the_bias_the_model_passes():
    # Swin V2 zeroes the keys' third of qkv's bias in every call: what that third holds must not matter
    pytest.importorskip("torchvision")
    x = [torch.randn(2, 3, 32, 32)]
    rounded, losses = [], []
    for keys_bias in (0.0, 0.5):
        net = _swin(v2=True)
        with torch.no_grad():
            for m in net.modules():
                if hasattr(m, "logit_scale"):
                    n = m.qkv.bias.numel() // 3
                    m.qkv.bias[n : 2 * n] = keys_bias
        q = tq.quantize_model(net, lambda m: tq.AffineQuantizer(3, tq.BatchMinMax(axis=0)), None, method="swap")
        tq.calibrate(q, x, progress=False)
        losses.append(tq.ptq.adaround(q, x, iters=20, progress=False)["features.1.0.attn.qkv"])
        with tq.qmodule_state(q, S.QUANT_EVAL), torch.no_grad():
            rounded.append(q.get_submodule("features.1.0.attn.qkv").quantized_weight())
    assert losses[0] == losses[1] and losses[0] < 0.01
    assert torch.equal(*rounded)


def test_reconstruction_refuses_a_bias_that_changes_between_calls():
    class Drifting(Reads):
        def forward(self, x):
            return F.linear(x, self.fc.weight, self.fc.bias + x.mean())

    torch.manual_seed(0)
    m = Drifting()
    m.fc = tq.QWrapper(m.fc, tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)))
    redirect_weight_reads(m)
    batches = [torch.randn(5, 6), torch.randn(5, 6)]
    tq.calibrate(m, batches, progress=False)
    with pytest.raises(ValueError, match=r"reconstruct: fc \(QWrapper\) is called with a bias that changes"):
        tq.ptq.adaround(m, batches, iters=2, progress=False)


def test_tracing_a_quantized_model_keeps_the_redirect():
    pytest.importorskip("torchvision")
    net = _swin(v2=False)
    wf = lambda m: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))  # noqa: E731
    q = tq.quantize_model(copy.deepcopy(net), wf, None, method="swap")
    tq.set_qmodule_state(q, S.QUANT_EVAL_WEIGHT_ONLY)
    for _, m in tq.iter_qmodules(q):
        m.observe_weight()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = q(x)
        assert not torch.equal(y, net(x))
        folded = tq.fold_batchnorm(copy.deepcopy(q), trace=True)  # the attention stays a module of the trace
        assert is_redirected(folded.get_submodule("features.1.0.attn"))
        assert torch.equal(folded(x), y)


@pytest.mark.parametrize("method", ["fx", "swap"])
def test_eva_attention_qkv_is_quantized_with_its_concatenated_bias(method):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=1).eval()
    wf = lambda m: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))  # noqa: E731
    x = torch.randn(2, 3, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.FloatLayersWarning)
        warnings.simplefilter("error", tq.UncalledQModulesWarning)
        q = tq.quantize_model(copy.deepcopy(net), wf, None, method=method)
        tq.calibrate(q, [x], progress=False)
    name = "blocks.0.attn.qkv" + (".linear" if method == "fx" else "")  # fx wraps the functional call
    qkv = q.get_submodule(name)
    seen = []
    qkv.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["bias"]), with_kwargs=True)
    with torch.no_grad():
        assert torch.equal(q(x), net(x))
        attn = net.blocks[0].attn
        assert torch.equal(seen[0], torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))


@pytest.mark.parametrize(
    ("model", "kwargs", "size"),
    [
        ("beit_base_patch16_224", dict(depth=1, embed_dim=64, num_heads=2), 32),
        ("swinv2_tiny_window8_256", dict(depths=(1, 1), num_heads=(2, 2), embed_dim=32, window_size=4), 32),
    ],
    ids=["beit", "swinv2"],
)
def test_timm_attentions_that_read_qkv_weight_are_redirected_by_swap(model, kwargs, size):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(model, img_size=size, num_classes=4, **kwargs).eval()
    wf = lambda m: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))  # noqa: E731
    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.UncalledQModulesWarning)
        q = tq.quantize_model(copy.deepcopy(net), wf, None, method="swap")
        tq.calibrate(q, [x], progress=False)  # every qkv wrapper is called (its weight quantized)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    with torch.no_grad():
        assert not torch.equal(q(x), net(x))
        with tq.qmodule_state(q, S.BYPASSED):
            assert torch.equal(q(x), net(x))


class _ConcatBias(nn.Module):
    """EVA's pattern: F.linear with the layer's weight and a bias made of three parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 6, bias=False)
        self.q_bias, self.k_bias, self.v_bias = (nn.Parameter(torch.randn(2)) for _ in range(3))

    def forward(self, x):
        return F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias))).relu()


def test_tracing_an_fx_quantized_model_again_keeps_the_computed_bias():
    torch.manual_seed(0)
    net = _ConcatBias()
    q = tq.quantize_model(net, lambda m: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)), None)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(q(x), net(x))
        retraced = torch.fx.symbolic_trace(q)  # traced into the wrapper: its bias is a node, not the placeholder
        assert torch.equal(retraced(x), net(x))


def test_an_fx_wrapped_functional_call_saves_and_loads(tmp_path):
    # the factories are called for qkv; the wrapper is installed below it (qkv.linear)
    torch.manual_seed(0)
    net = _ConcatBias()
    fresh = copy.deepcopy(net)
    q = tq.quantize_model(
        net, lambda m: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)), lambda m: tq.AffineQuantizer(8, tq.BatchMinMax())
    )
    x = torch.randn(3, 4)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    tq.save(q, tmp_path / "q.safetensors")
    loaded = tq.load(fresh, tmp_path / "q.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x)) and not torch.equal(q(x), net(x))


def test_swin_export_matches_the_simulation():
    pytest.importorskip("torchvision")
    ort = pytest.importorskip("onnxruntime")
    q = tq.quantize_model(
        _swin(v2=True),
        lambda m: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)),
        lambda m: tq.AffineQuantizer(8, tq.ExpAvgMinMax()),
        method="swap",
    )
    x = torch.randn(2, 3, 32, 32)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    proto = tq.export.to_onnx(q, x)
    weights = {i.name.partition("/")[0] for i in proto.graph.initializer if i.name.endswith("/int_weight")}
    assert {"features.1.0.attn.qkv.weight_quantizer", "features.1.0.attn.proj.weight_quantizer"} <= weights
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # float kernels: no saturation
    report = tq.export.check_parity(q, proto, x, session_options=plain)
    assert report.passed(), str(report)


def test_a_registered_reader_is_traced_into_with_example_inputs(registered_reads, tmp_path):
    wf = lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))  # noqa: E731
    af = lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax())  # noqa: E731
    torch.manual_seed(0)
    net = _Block()
    x = torch.randn(5, 6)
    q = tq.quantize_model(copy.deepcopy(net), wf, af, example_inputs=x)
    assert q.meta["_tq_float_reasons"] == {}
    assert isinstance(q.reads, torch.fx.GraphModule)  # traced, not swapped with its reads redirected
    assert {"reads.fc.linear", "reads.out"} <= {n for n, _ in tq.iter_qmodules(q)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.UncalledQModulesWarning)
        tq.calibrate(q, [x], progress=False)  # the traced weight reads are layers the forward calls
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    tq.save(q, tmp_path / "q.safetensors")
    loaded = tq.load(copy.deepcopy(net), tmp_path / "q.safetensors")
    with torch.no_grad():
        y = q(x)
        assert not torch.equal(y, net(x))
        assert torch.equal(loaded(x), y)
