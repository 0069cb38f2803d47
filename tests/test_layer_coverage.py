"""Layers beyond Conv/Linear: nn.Embedding, Hugging Face's GPT-2 Conv1D, and normalisation outputs.

The weight quantizer of every layer sees an ``(out, in)`` view (an embedding table as
stored, a Conv1D's ``(in, out)`` weight transposed), so per-row (``axis=0``) and
per-group along the input (``axis=1, group_size=g``) mean the same for all of them.
Whole models (tiny random GPT-2 and Llama configs, nothing downloaded) check the
conversion, weight tying and the W8A8 error in dB.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import torchquant as tq
from torchquant.layers import LAYER_ADAPTERS_BY_NAME, is_normalization, layer_adapter

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

S = tq.QModuleState

pytestmark = pytest.mark.usefixtures("one_thread")

GRANULARITIES = {"per-row": dict(axis=0), "per-group": dict(axis=1, group_size=4)}


def _wq(axis: int = 0, group_size: int | None = None, bits: int = 4) -> tq.AffineQuantizer:
    return tq.AffineQuantizer(bits, tq.BatchMinMax(axis=axis, group_size=group_size), symmetric=True)


def wf8(m, name):
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)


def af8(m, name):
    return tq.AffineQuantizer(8, tq.RunningMinMax())


def _embedding() -> nn.Embedding:
    return nn.Embedding(20, 16, padding_idx=0, scale_grad_by_freq=True)


def _conv1d() -> Conv1D:
    layer = Conv1D(12, 16)  # nf=12 outputs, nx=16 inputs: weight (16, 12)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer


def _ids() -> torch.Tensor:
    return torch.tensor([[0, 3, 3, 19], [5, 0, 7, 1]])


# Each case: (layer builder, input builder, the layer's weight as the quantizer sees it, the layer run with a view)
CASES = {
    "embedding": (
        _embedding,
        _ids,
        lambda layer: layer.weight,
        lambda layer, x, w: F.embedding(x, w, layer.padding_idx, None, 2.0, layer.scale_grad_by_freq),
    ),
    "hf-conv1d": (
        _conv1d,
        lambda: torch.randn(2, 5, 16),
        lambda layer: layer.weight.t(),
        lambda layer, x, w: x @ w.t() + layer.bias,
    ),
    "timm-linear": (  # an nn.Linear subclass whose forward is F.linear outside TorchScript (timm's heads)
        lambda: pytest.importorskip("timm.layers.linear").Linear(16, 12),
        lambda: torch.randn(2, 5, 16),
        lambda layer: layer.weight,
        lambda layer, x, w: F.linear(x, w, layer.bias),
    ),
}


def _params(cases=CASES, grans=GRANULARITIES):
    return [pytest.param(c, g, id=f"{c}-{g}") for c in cases for g in grans]


def test_adapters_are_table_entries_and_hf_conv1d_is_matched_by_name():
    assert layer_adapter(nn.Embedding(3, 2)) is not None
    assert layer_adapter(Conv1D(2, 3)) is LAYER_ADAPTERS_BY_NAME["transformers.pytorch_utils.Conv1D"]

    class MyConv1D(Conv1D):  # exact class only, as for nn.Linear subclasses
        pass

    assert layer_adapter(MyConv1D(2, 3)) is None and layer_adapter(nn.ReLU()) is None


@pytest.mark.parametrize(("case", "gran"), _params())
def test_bypassed_is_bit_exact_and_keeps_the_module(case, gran):
    build, make_x, _, _ = CASES[case]
    layer = build()
    x = make_x()
    ref = layer(x)
    w = tq.QWrapper(layer, _wq(**GRANULARITIES[gran]), af8(None, ""))
    assert w.layer is layer
    assert torch.equal(w(x), ref)
    with tq.qmodule_state(w, S.CALIBRATION):
        assert torch.equal(w(x), ref)


@pytest.mark.parametrize(("case", "gran"), _params())
def test_quant_eval_weight_is_the_quantizer_on_the_out_in_view(case, gran):
    build, make_x, view, run = CASES[case]
    layer = build()
    x = make_x()
    kw = GRANULARITIES[gran]
    w = tq.QWrapper(layer, _wq(**kw), None)
    with tq.qmodule_state(w, S.CALIBRATION):
        w(x)
    # A fresh quantizer calibrated on a contiguous copy of the (out, in) view gives the same grid.
    ref_q = _wq(**kw)
    wv = view(layer).detach().contiguous()
    with torch.no_grad():
        ref_q.pre_observe(wv)
        ref_q.post_observe(wv)
    scale = w.weight_quantizer.grid().scale
    assert torch.equal(scale, ref_q.grid().scale)
    # one scale per output row (per row of a Conv1D's transposed weight), or per run of g inputs in it
    blocks = scale.expand(wv.shape).reshape(wv.shape[0], -1, kw.get("group_size", wv.shape[1]))
    assert torch.equal(blocks, blocks[..., :1].expand(blocks.shape))
    rest = blocks[1:, :, 0]  # row 0 is the embedding's all-zero padding row
    assert len(rest.unique()) == rest.numel()  # every other row (and group) has its own scale
    with tq.qmodule_state(w, S.QUANT_EVAL), torch.no_grad():
        wq = ref_q(wv)
        assert not torch.equal(wq, wv)
        assert torch.equal(w.quantized_weight(), wq)
        assert torch.allclose(w(x), run(layer, x, wq), atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_qat_gradient_reaches_the_weight_straight_through(case):
    build, make_x, _, run = CASES[case]
    layer = build()
    x = make_x()
    w = tq.QWrapper(layer, _wq(), None).train()
    with tq.qmodule_state(w, S.QUANT_AWARE_TRAIN):
        y = w(x)
        wq = w.quantized_weight().detach().requires_grad_()
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (run(layer, x, wq) * g).sum().backward()  # the same loss with the quantized weight as a leaf
    assert layer.weight.grad is not None
    # min/max ranges cover every weight, so nothing is clipped: the STE passes the gradient unchanged
    expected = wq.grad.t() if case == "hf-conv1d" else wq.grad  # Conv1D stores (in, out)
    assert torch.allclose(layer.weight.grad, expected, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip_keeps_the_key_names(case):
    build, make_x, _, _ = CASES[case]
    x = make_x()
    w = tq.QWrapper(build(), _wq(), af8(None, ""))
    with tq.qmodule_state(w, S.CALIBRATION):
        w(x)
    sd = w.state_dict()
    assert "layer.weight" in sd and any(k.startswith("weight_quantizer.") for k in sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = tq.QWrapper(build(), _wq(), af8(None, ""))
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    tq.set_qmodule_state(w, S.QUANT_EVAL)
    tq.set_qmodule_state(fresh, S.QUANT_EVAL)
    with torch.no_grad():
        assert torch.equal(fresh(x), w(x))
        assert torch.equal(copy.deepcopy(w)(x), w(x))


@pytest.mark.parametrize("case", CASES)
def test_a_pickled_wrapper_keeps_its_adapter(case):
    build, make_x, _, _ = CASES[case]
    w = tq.QWrapper(build(), _wq(), None)
    buf = io.BytesIO()
    torch.save(w, buf)
    buf.seek(0)
    x = make_x()
    assert torch.equal(torch.load(buf, weights_only=False)(x), w(x))


def test_torch_compile_of_a_wrapped_embedding_matches_eager():
    w = tq.QWrapper(_embedding(), _wq(axis=1, group_size=4), af8(None, ""))
    x = _ids()
    with tq.qmodule_state(w, S.CALIBRATION):
        w(x)
    tq.set_qmodule_state(w, S.QUANT_EVAL)
    with torch.no_grad():
        eager = w(x)
        compiled = torch.compile(w, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(compiled, eager)


# ------------------------------------------------------------------ whole models
def _sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean()))


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    cfg.bos_token_id = cfg.eos_token_id = 0  # the default (50256) lies outside the tiny vocabulary
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_swap_wraps_conv1d_and_embeddings_keeps_tying_and_w8a8_is_close():
    net = _gpt2()
    ids = torch.randint(0, 100, (4, 16))
    with torch.no_grad():
        ref = net(ids).logits
    conv1d_names = [n for n, m in net.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d_names) == 8
    q = tq.quantize_model(net, wf8, af8, method="swap")
    modules = dict(q.named_modules())
    for name in [*conv1d_names, "transformer.wte", "transformer.wpe", "lm_head"]:
        assert isinstance(modules[name], tq.QWrapper), name
    # lm_head is tied to wte: both wrappers hold the very same Parameter
    assert q.lm_head.layer.weight is q.transformer.wte.layer.weight
    with torch.no_grad():
        assert torch.equal(q(ids).logits, ref)
    tq.calibrate(q, [ids], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    with torch.no_grad():
        y = q(ids).logits
    # measured 36.7 dB (W8 per-channel symmetric, A8 per-tensor min/max, seed 0)
    assert _sqnr_db(ref, y) > 25.0
    rows = {r["name"]: r for r in tq.summary_rows(q)}
    assert rows["transformer.h.0.attn.c_attn"]["layers"] == "Conv1D"
    assert rows["transformer.wte"]["layers"] == "Embedding" and rows["transformer.wte"]["weight_bits"] == 8
    assert not [r for r in rows.values() if r["kind"] == "float"]


def _llama():
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def test_norm_outputs_quantizes_weightless_norms_too():
    from transformers.models.olmo.modeling_olmo import OlmoLayerNorm  # non-parametric LayerNorm

    cfg = transformers.OlmoConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    net = transformers.OlmoForCausalLM(cfg).eval()
    norms = [n for n, m in net.named_modules() if isinstance(m, OlmoLayerNorm)]
    assert len(norms) == 5 and not is_normalization(net.get_submodule(norms[0]))  # no gain to fold a scale into
    q = tq.quantize_model(net, wf8, af8, method="swap", norm_outputs=True)
    assert all(isinstance(q.get_submodule(n), tq.QOp) for n in norms)


@pytest.mark.parametrize("norm_outputs", [True, False], ids=["norm-outputs", "no-norm-outputs"])
def test_llama_norm_outputs(norm_outputs):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    net = _llama()
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        ref = net(ids).logits
    norm_names = [n for n, m in net.named_modules() if isinstance(m, LlamaRMSNorm)]
    assert len(norm_names) == 5 and all(is_normalization(net.get_submodule(n)) for n in norm_names)
    q = tq.quantize_model(net, wf8, af8, method="swap", norm_outputs=norm_outputs)
    modules = dict(q.named_modules())
    qops = [n for n in norm_names if isinstance(modules[n], tq.QOp)]
    assert qops == (norm_names if norm_outputs else [])
    if norm_outputs:
        assert isinstance(modules[norm_names[0]].op, LlamaRMSNorm)
        row = next(r for r in tq.summary_rows(q) if r["name"] == norm_names[0])
        assert (row["kind"], row["layers"], row["act_bits"]) == ("QOp", "LlamaRMSNorm", 8)
    assert isinstance(q.model.embed_tokens, tq.QWrapper)
    with torch.no_grad():
        assert torch.equal(q(ids).logits, ref)


def test_norm_outputs_wraps_torch_norms_in_swap_and_is_refused_by_fx():
    net = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.RMSNorm(8), nn.GroupNorm(2, 8))
    q = tq.quantize_model(copy.deepcopy(net), None, af8, method="swap", norm_outputs=True)
    assert [type(m).__name__ for m in q] == ["QWrapper", "QOp", "QOp", "QOp"]
    with pytest.raises(ValueError, match="norm_outputs applies to method='swap'"):
        tq.quantize_model(net, None, af8, method="fx", norm_outputs=True)
    fx = tq.quantize_model(net, None, af8, method="fx")  # fx gives norms (RMSNorm too) a QOp already
    assert sum(isinstance(m, tq.QOp) for m in fx.modules()) == 3


class _TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids).mean(1))


@pytest.mark.parametrize("method", ["fx", "swap"])
def test_embedding_is_wrapped_by_both_methods_and_a_factory_may_decline_it(method):
    net = _TokenNet().eval()
    ids = _ids()
    ref = net(ids)
    q = tq.quantize_model(copy.deepcopy(net), wf8, af8, method=method)
    assert isinstance(q.emb, tq.QWrapper) and isinstance(q.emb.layer, nn.Embedding)
    assert torch.equal(q(ids), ref)

    def no_embeddings(m, name):
        return None if isinstance(m, nn.Embedding) else wf8(m, name)

    q = tq.quantize_model(copy.deepcopy(net), no_embeddings, af8, method=method)
    assert q.emb.weight_quantizer is None and q.fc.weight_quantizer is not None


def test_fx_wraps_hf_conv1d_when_it_is_a_leaf_module():
    net = nn.Sequential(_conv1d(), nn.ReLU()).eval()
    x = torch.randn(2, 3, 16)
    q = tq.quantize_model(net, wf8, af8, method="fx", leaf_modules=[Conv1D])
    assert isinstance(q.get_submodule("0"), tq.QWrapper) and q.get_submodule("0").layer is net[0]
    assert isinstance(q.get_submodule("0").act, nn.ReLU)
    assert torch.equal(q(x), net(x))


@pytest.mark.parametrize("method", ["fx", "swap"])
def test_embedding_bag_stays_float_with_a_reason(method):
    class BagNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(20, 8)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bag(ids)

    q = tq.quantize_model(BagNet(), wf8, af8, method=method)
    assert isinstance(q.bag, nn.EmbeddingBag)
    rows = {r["name"]: r for r in tq.summary_rows(q)}
    assert rows["bag"]["kind"] == "float" and "EmbeddingBag is not quantized" in rows["bag"]["note"]


def test_subclasses_computing_their_base_or_a_scaled_embedding_are_quantized_others_reported():
    """A subclass of Linear/Embedding is quantized when it keeps its base's forward, or when it is an embedding
    whose output is the lookup times its ``embed_scale`` (Gemma's, Bart's scaled word embeddings)."""

    class Same(nn.Embedding):
        pass

    class Scaled(nn.Embedding):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.register_buffer("embed_scale", torch.tensor(2.0), persistent=False)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale.to(self.weight.dtype)

    class Shifted(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    class IdsOrProbabilities(nn.Embedding):  # Ovis2's visual table: ids look up, float inputs multiply
        def forward(self, x):
            return super().forward(x) if not x.is_floating_point() else x @ self.weight

    torch.manual_seed(0)
    net = nn.Sequential(Same(10, 4), Scaled(10, 4), Shifted(4, 4), IdsOrProbabilities(10, 4))
    ids = torch.randint(0, 10, (3, 5))
    with torch.no_grad():
        ref = [net[0](ids), net[1](ids)]
    with pytest.warns(tq.FloatLayersWarning, match="stay in float: 2, 3"):
        q = tq.quantize_model(net, lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)), None, method="swap")
    assert isinstance(q[0], tq.QWrapper) and isinstance(q[1], tq.QWrapper)
    rows = tq.summary_rows(q)
    for row in rows[2:]:  # a forward of their own, not a scaled lookup: float, said so
        assert row["kind"] == "float" and "subclass of a supported layer" in row["note"]
    with torch.no_grad(), tq.qmodule_state(q, S.BYPASSED):
        assert torch.equal(q[0](ids), ref[0]) and torch.equal(q[1](ids), ref[1])
    tq.calibrate(q[1], [ids], progress=False)  # (the Sequential is a container here, not a model)
    with torch.no_grad(), tq.qmodule_state(q[1], S.QUANT_EVAL):
        assert torch.equal(q[1](ids), 2.0 * q[1].quantized_weight()[ids])
    hand_built = nn.Sequential(nn.Embedding(10, 4), Conv1D(3, 4))
    assert [(r["layers"], r["note"]) for r in tq.summary_rows(hand_built)] == [
        ("Embedding", "not converted"),
        ("Conv1D", "not converted"),
    ]


def test_adaround_writes_grid_values_through_the_conv1d_view():
    net = nn.Sequential(nn.Embedding(50, 16), _conv1d()).eval()
    q = tq.quantize_model(net, lambda m, n: _wq(bits=4), None, method="swap")
    data = [torch.randint(0, 50, (8, 6)) for _ in range(2)]
    tq.calibrate(q, data, progress=False)
    before = q[1].layer.weight.clone()
    tq.ptq.get_ptq_algorithm("adaround")(q, data, iters=5, progress=False)
    assert not torch.equal(q[1].layer.weight, before)
    with tq.qmodule_state(q, S.QUANT_EVAL), torch.no_grad():
        for w in q:  # the learned rounding is written into the parameters: quantizing them changes nothing
            assert torch.allclose(w.quantized_weight(), w.weight_view(), atol=1e-6)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kw", "match"), [(dict(max_norm=1.0), "max_norm=1.0 renormalises"), (dict(sparse=True), "sparse=True")]
)
def test_embeddings_that_cannot_be_quantized_raise_naming_the_module(kw, match):
    net = nn.Sequential(nn.Sequential(nn.Embedding(10, 4, **kw)))
    with pytest.raises(ValueError, match=rf"cannot quantize '0\.0'.*{match}.*skip=\['0\.0'\]"):
        tq.quantize_model(net, wf8, None, method="swap")
    with pytest.raises(ValueError, match=match):
        tq.QWrapper(nn.Embedding(10, 4, **kw), _wq())
    tq.quantize_model(net, wf8, None, method="swap", skip=["0.0"])  # the way out the message names


@pytest.mark.parametrize("layer", [nn.Embedding(4, 4), Conv1D(4, 4)], ids=["embedding", "hf-conv1d"])
def test_no_batchnorm_after_embedding_or_conv1d(layer):
    with pytest.raises(TypeError, match="takes no BatchNorm"):
        tq.QWrapper([layer, nn.BatchNorm1d(4)], _wq(), fold_bn=True)


# ------------------------------------------------------------------ export
def test_onnx_export_of_embedding_and_conv1d_has_parity():
    pytest.importorskip("onnxruntime")
    net = nn.Sequential(nn.Embedding(50, 16, padding_idx=0), _conv1d()).eval()
    q = tq.quantize_model(net, wf8, af8, method="swap")
    ids = torch.randint(0, 50, (4, 7))
    tq.calibrate(q, [ids], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    proto = tq.export.to_onnx(q, ids)
    ops = [n.op_type for n in proto.graph.node]
    assert ops[:2] == ["DequantizeLinear", "Gather"]  # integer table -> DequantizeLinear -> Gather
    assert tq.export.check_parity(q, proto, ids).passed()
    params = tq.export.integer_params(q)
    assert params["0.weight_quantizer"]["int_weight"].shape == (50, 16)
    assert params["1.weight_quantizer"]["int_weight"].shape == (12, 16)  # Conv1D: the (out, in) view


# ----------------------------------------------------------------------------- weights computed in forward
class _Capture(torch.overrides.TorchFunctionMode):
    """Records the weight a layer's own forward gives to F.conv2d / F.linear."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.conv2d, F.linear):
            self.weights.append(args[1])
        return func(*args, **(kwargs or {}))


class _Halved(nn.Module):
    def forward(self, w):
        return w * 0.5


def _timm_conv(name):
    def build():
        std_conv = pytest.importorskip("timm.layers.std_conv")
        kw = dict(stride=2) if name.endswith("Same") else {}
        return getattr(std_conv, name)(3, 4, 3, **kw)

    return build


def _weight_norm_conv():
    return torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))


def _parametrized_conv():
    layer = nn.Conv2d(3, 4, 3)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", _Halved())
    return layer


def _old_weight_norm_conv():
    with pytest.warns(FutureWarning):
        return torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3))


def _pruned_conv():
    layer = nn.Conv2d(3, 4, 3)
    prune.l1_unstructured(layer, "weight", amount=0.5)  # weight = weight_orig * weight_mask
    return layer


COMPUTED = {
    "timm-ScaledStdConv2d": _timm_conv("ScaledStdConv2d"),
    "timm-StdConv2d": _timm_conv("StdConv2d"),
    "timm-StdConv2dSame": _timm_conv("StdConv2dSame"),
    "timm-ScaledStdConv2dSame": _timm_conv("ScaledStdConv2dSame"),
    "weight_norm": _weight_norm_conv,
    "parametrize": _parametrized_conv,
    "weight_norm-deprecated-hook": _old_weight_norm_conv,
    "pruned": _pruned_conv,
}


@pytest.mark.parametrize("method", ["fx", "swap"])
def test_a_layer_whose_bias_is_pruned_stays_float_with_a_reason(method):
    # the wrapper never runs the layer's hooks: its bias would be the one computed when pruned, stale after
    layer = nn.Linear(4, 4)
    prune.l1_unstructured(layer, "bias", amount=0.5)
    with pytest.warns(tq.convert.FloatLayersWarning):
        q = tq.quantize_model(nn.Sequential(layer, nn.ReLU()), wf8, af8, method=method)
    assert not isinstance(q.get_submodule("0"), tq.QWrapper)


@pytest.mark.parametrize("method", ["fx", "swap"])
@pytest.mark.parametrize("case", list(COMPUTED))
def test_a_weight_computed_in_forward_is_the_one_quantized(case, method):
    def build():
        torch.manual_seed(0)
        layer = COMPUTED[case]()
        with torch.no_grad():  # a weight that standardisation or normalisation visibly changes
            for p in layer.parameters():
                p.add_(torch.rand_like(p))
        return nn.Sequential(layer, nn.ReLU()).eval()

    net = build()  # built twice, not deep-copied: the deprecated weight_norm refuses deepcopy after a forward
    x = torch.randn(2, 3, 9, 9)
    ref = net(x)
    with _Capture() as cap:
        net[0](x)
    (w_used,) = cap.weights  # (out, in, kh, kw): what the layer's own forward convolves with

    q = tq.quantize_model(build() if method == "swap" else net, wf8, af8, method=method)
    wrapper = q.get_submodule("0")
    assert isinstance(wrapper, tq.QWrapper) and wrapper.weight_is_computed
    assert tq.convert.float_layers(q) == []
    assert torch.equal(q(x), ref)
    with tq.qmodule_state(q, S.CALIBRATION):
        assert torch.equal(q(x), ref)
    with tq.qmodule_state(q, S.QUANT_EVAL_WEIGHT_ONLY):
        wq = wrapper.weight_quantizer(w_used)
        assert torch.equal(wrapper.quantized_weight(), wq)
        assert not torch.equal(wq, w_used)
        assert torch.equal(q(x), torch.relu(wrapper._layer_with(x, wq, wrapper.layer.bias)))

    q.train()  # QAT: the gradient reaches the parameters the weight is computed from
    with tq.qmodule_state(q, S.QUANT_AWARE_TRAIN):
        q(x).square().mean().backward()
    grads = [p.grad for p in wrapper.layer.parameters()]  # weight (and gain, g and v, bias) for each case
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_gptq_leaves_a_computed_weight_alone():
    from torchquant.ptq.gptq import _skip_reason

    q = tq.quantize_model(nn.Sequential(_weight_norm_conv()), wf8, None, method="swap")
    assert "computed" in _skip_reason(q[0])


# ----------------------------------------------------------------------------- nn.MultiheadAttention
class _Attn(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=batch_first)
        self.cross = nn.MultiheadAttention(16, 2, batch_first=batch_first)

    def forward(self, x, memory):
        y, _ = self.attn(x, x, x)
        z, w = self.cross(y, memory, memory)
        return z, w


def _mha_inputs(batch_first):
    x, m = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    return (x, m) if batch_first else (x.transpose(0, 1), m.transpose(0, 1))


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("method", ["fx", "swap"])
def test_multihead_attention_is_quantized_and_bypassed_equals_float(method, batch_first, tmp_path):
    torch.manual_seed(0)
    net = _Attn(batch_first).eval()
    seen = {}

    def wf_seen(m, name):
        seen[name] = type(m).__name__
        return wf8(m, name)

    q = tq.quantize_model(copy.deepcopy(net) if method == "swap" else net, wf_seen, af8, method=method)
    assert seen == {
        "attn.in_proj": "MultiheadAttention",
        "attn.out_proj": "NonDynamicallyQuantizableLinear",
        "cross.in_proj": "MultiheadAttention",
        "cross.out_proj": "NonDynamicallyQuantizableLinear",
    }
    assert isinstance(q.attn, tq.QMultiheadAttention) and q.attn.embed_dim == 16
    assert tq.convert.float_layers(q) == []
    x, m = _mha_inputs(batch_first)
    for grad in (False, True):  # no_grad: the module's fused fast path, which BYPASSED keeps
        with torch.set_grad_enabled(grad):
            (a, wa), (b, wb) = q(x, m), net(x, m)
            assert torch.equal(a, b) and torch.equal(wa, wb)
    row = next(r for r in tq.summary_rows(q) if r["name"] == "attn")
    assert (
        row["weight_bits"] == 8 and "in_proj" in row["weight_granularity"] and "out_proj" in row["weight_granularity"]
    )

    with tq.qmodule_state(q, S.CALIBRATION), torch.no_grad():  # calibrate: observes, outputs unchanged
        assert torch.allclose(q(x, m)[0], net(x, m)[0], atol=1e-6)
    with tq.qmodule_state(q, S.QUANT_EVAL_WEIGHT_ONLY), torch.no_grad():
        ref = copy.deepcopy(net).train()  # its Python path, with the quantized weights
        ref.eval()
        for name in ("attn", "cross"):
            w_in, w_out = q.get_submodule(name).quantized_weights()
            assert not torch.equal(w_in, net.get_submodule(name).in_proj_weight)
            ref.get_submodule(name).in_proj_weight.copy_(w_in)
            ref.get_submodule(name).out_proj.weight.copy_(w_out)
        with torch.enable_grad():
            expected = ref(x, m)[0]
        assert torch.allclose(q(x, m)[0], expected, atol=1e-6)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    with torch.no_grad():
        y = q(x, m)[0]
    assert not torch.equal(y, net(x, m)[0]) and torch.allclose(y, net(x, m)[0], atol=0.1)
    assert torch.equal(copy.deepcopy(q)(x, m)[0], y)
    tq.save(q, tmp_path / "attn.safetensors")  # tq.load converts a float model the same way
    loaded = tq.load(_Attn(batch_first).eval(), tmp_path / "attn.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x, m)[0], y)


def test_multihead_attention_with_separate_projections_stays_float_with_a_reason():
    net = nn.Sequential()
    net.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)
    with pytest.warns(tq.FloatLayersWarning, match="attn.out_proj"):
        q = tq.quantize_model(net, wf8, af8, method="swap")
    notes = {r["name"]: r["note"] for r in tq.summary_rows(q) if r["kind"] == "float"}
    assert "separate query/key/value projections" in notes["attn"]


@pytest.mark.parametrize("method", ["fx", "swap"])
@pytest.mark.parametrize("kind", ["layer", "encoder"])
def test_transformer_encoder_is_fully_quantized_and_its_fused_path_is_off(method, kind):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    net = (layer if kind == "layer" else nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    q = tq.quantize_model(copy.deepcopy(net) if method == "swap" else net, wf8, af8, method=method)
    assert tq.convert.float_layers(q) == []
    kinds = sorted(type(m).__name__ for _, m in tq.iter_qmodules(q))
    n = 1 if kind == "layer" else 2
    assert kinds.count("QMultiheadAttention") == n and kinds.count("QWrapper") == 2 * n
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert torch.allclose(q(x), net(x), atol=1e-6)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    y = q(x).detach()  # gradients on: the Python path
    with torch.no_grad():  # eval without gradients: the fused kernel would read the float weights
        assert torch.equal(q(x), y)
        assert not torch.equal(y, net(x))


def test_norm_gain_offset_is_found_numerically_and_scaling_moves_the_output_channels():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from torchquant.layers import divide_norm_output_, norm_gain_offset

    torch.manual_seed(0)
    gemma = GemmaRMSNorm(8)
    with torch.no_grad():
        gemma.weight.normal_()  # the check must not depend on the weight's value
    cases = [(nn.LayerNorm(8), 0.0), (nn.RMSNorm(8), 0.0), (LlamaRMSNorm(8), 0.0), (GemmaRMSNorm(8), 1.0), (gemma, 1.0)]
    cases += [
        (GemmaRMSNorm(8).bfloat16(), 1.0),
        (nn.Linear(8, 8), None),
        (nn.LayerNorm(8, elementwise_affine=False), None),
    ]
    for norm, offset in cases:
        before = {k: v.clone() for k, v in norm.state_dict().items()}
        assert norm_gain_offset(norm) == offset, type(norm).__name__
        assert all(torch.equal(v, norm.state_dict()[k]) for k, v in before.items())  # restored
    on_meta = GemmaRMSNorm(8).to("meta")  # the scales on the CPU, the weight elsewhere (a GPU): moved, not refused
    divide_norm_output_(on_meta, torch.rand(8) + 0.5, 1.0)
    assert on_meta.weight.device.type == "meta"
    x = torch.randn(5, 8)
    s = torch.rand(8) + 0.5
    for norm in (gemma, nn.LayerNorm(8)):
        with torch.no_grad():
            if isinstance(norm, nn.LayerNorm):
                norm.bias.normal_()
            ref = norm(x)
            divide_norm_output_(norm, s, norm_gain_offset(norm))
            torch.testing.assert_close(norm(x), ref / s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_falcons_linear_is_quantized_and_bypassed_bit_for_bit(dtype):
    """transformers' FalconLinear computes ``x @ W^T + b`` (not ``F.linear``): its own adapter, so nothing stays
    float and the BYPASSED model is the float one bit for bit, in half precision too."""
    import warnings

    cfg = transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    torch.manual_seed(0)
    net = transformers.FalconForCausalLM(cfg).eval().to(dtype)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        ref = net(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.FloatLayersWarning)
        q = tq.quantize_model(net, wf8, None, method="swap", skip=["lm_head", "transformer.word_embeddings"])
    assert isinstance(q.transformer.h[0].mlp.dense_4h_to_h, tq.QWrapper)
    with torch.no_grad():
        assert torch.equal(q(ids).logits, ref)


def test_folding_a_scale_into_a_half_precision_one_plus_weight_gain_warns_when_it_rounds():
    """Gemma's RMSNorm multiplies by 1 + weight: in bfloat16 a small gain stored as weight = gain - 1 rounds
    near -1 with an absolute step of 2^-8, which can zero a channel."""
    import warnings

    from torchquant.layers import divide_norm_output_

    norm = nn.LayerNorm(4).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([-0.9, 0.0, 0.5, 1.0]))  # gains 0.1, 1, 1.5, 2 with offset 1
    with pytest.warns(UserWarning, match=r"gain is 1 \+ weight, stored in torch.bfloat16.*off by up to"):
        divide_norm_output_(norm, torch.tensor([50.0, 1.0, 1.0, 1.0]), 1.0)
    fine = nn.LayerNorm(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        divide_norm_output_(fine, torch.tensor([50.0, 1.0, 1.0, 1.0]), 1.0)  # float32: exact enough


def test_norm_gain_offset_of_a_half_precision_gemma_norm_with_small_gains():
    """Gains 1 + weight near 0 (weights near -1) are stored coarsely in bfloat16: the probe, on a float32 copy,
    still finds the offset, and the norm is left as it was."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from torchquant.layers import norm_gain_offset

    norm = GemmaRMSNorm(8).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.999, -0.99, 8))
    before = norm.weight.clone()
    assert norm_gain_offset(norm) == 1.0
    assert norm.weight.dtype == torch.bfloat16 and torch.equal(norm.weight, before)
