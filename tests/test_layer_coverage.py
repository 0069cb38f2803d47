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
    expected = wq.grad if case == "embedding" else wq.grad.t()
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


def test_embedding_subclass_and_unconverted_layers_are_reported():
    class MyEmbedding(nn.Embedding):
        pass

    net = nn.Sequential(MyEmbedding(10, 4))
    tq.quantize_model(net, wf8, None, method="swap")
    rows = tq.summary_rows(net)
    assert rows[0]["kind"] == "float" and "subclass of a supported layer" in rows[0]["note"]
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
