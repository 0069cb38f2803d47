"""The sequential block engine: block discovery, captured inputs, groups, fold targets, and GPTQ on it."""

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.ptq import gptq_quantize_weight
from torchquant.ptq.sequential import Block, find_blocks, fold_input_scale, sequential_blocks

transformers = pytest.importorskip("transformers")
from tests.hf.hf_tiny import VOCAB, gemma2_config, gemma_config, llama_config  # noqa: E402


def W8():
    return tq.AffineQuantizer(8, tq.BatchMinMax())


def _llama(seed=0, **kw):
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(llama_config(**kw)).eval()
    wf = lambda mod, name: tq.AffineQuantizer(4, tq.RunningMinMax(axis=0))  # noqa: E731
    return tq.quantize_model(m, wf, None, method="swap", skip=["lm_head", "model.embed_tokens"])


def _batches(n=3, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, seq), generator=g) for _ in range(n)]


def test_blocks_are_the_decoder_layers_and_a_model_without_them_is_one_block():
    q = _llama()
    assert [n for n, _ in find_blocks(q)] == ["model.layers.0", "model.layers.1"]
    assert [n for n, _ in find_blocks(q, "model.layers")] == ["model.layers.0", "model.layers.1"]
    with pytest.raises(ValueError, match=r"blocks='model\.nope' is not a submodule of LlamaForCausalLM"):
        find_blocks(q, "model.nope")
    net = tq.quantize_model(nn.Sequential(nn.Linear(4, 4)), lambda m, n: W8(), None, method="swap")
    assert find_blocks(net) == []
    (only,) = list(sequential_blocks(net, [torch.randn(2, 4)], progress=False))
    assert only.name == "" and [n for n, _ in only.layers] == ["0"]


def test_groups_share_one_input_and_fold_targets_are_found_numerically():
    q = _llama()
    (first, *_) = sequential_blocks(q, _batches(), mode=tq.QModuleState.BYPASSED, progress=False)
    assert isinstance(first, Block) and first.name == "model.layers.0"
    at = dict((m, n.rsplit(".", 1)[-1]) for n, m in first.layers)
    groups = [[at[m] for m in g] for g in first.groups()]
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    layer = q.model.layers[0]
    targets = [first.fold_target(g) for g in first.groups()]
    # o_proj: v_proj has 2 key/value heads for 4 query heads, so no one-for-one channel map
    assert targets[0] is layer.input_layernorm and targets[1] is None
    assert targets[2] is layer.post_attention_layernorm and targets[3] is layer.mlp.up_proj


def test_the_row_module_of_gate_and_up_is_the_mlp_and_attention_has_none():
    """AWQ scores a group by the output of the smallest module taking only its input (an MLP); attention
    also takes position embeddings, and a single layer is its own output."""
    q = _llama()
    first = next(iter(sequential_blocks(q, _batches(), mode=tq.QModuleState.BYPASSED, progress=False)))
    found = [first.row_module(g) for g in first.groups()]
    assert found[0] is None and found[1] is None and found[3] is None
    assert found[2] == (q.model.layers[0].mlp, 3)


def test_without_shared_heads_v_proj_is_the_fold_target_of_o_proj():
    q = _llama(num_key_value_heads=4)
    first = next(iter(sequential_blocks(q, _batches(), mode=tq.QModuleState.BYPASSED, progress=False)))
    assert first.fold_target(first.groups()[1]) is q.model.layers[0].self_attn.v_proj


FOLD_FAMILIES = {
    "llama": lambda: _llama(),
    # norms multiply by 1 + weight (random gains, so that the offset matters)
    "gemma": lambda: _quantized(transformers.GemmaForCausalLM(gemma_config())),
    "gemma2": lambda: _quantized(transformers.Gemma2ForCausalLM(gemma2_config())),
}


def _quantized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.5)
    wf = lambda mod, name: tq.AffineQuantizer(4, tq.RunningMinMax(axis=0))  # noqa: E731
    return tq.quantize_model(model.eval(), wf, None, method="swap", skip=["lm_head", "model.embed_tokens"])


@pytest.mark.parametrize("family", list(FOLD_FAMILIES))
def test_folding_a_scale_leaves_the_float_model_unchanged(family):
    q = FOLD_FAMILIES[family]()
    x = _batches()[0]
    with tq.qmodule_state(q, tq.QModuleState.BYPASSED):
        before = q(x).logits
        first = next(iter(sequential_blocks(q, _batches(), mode=tq.QModuleState.BYPASSED, progress=False)))
        g = torch.Generator().manual_seed(3)
        folded = 0
        for group in first.groups():
            target = first.fold_target(group)
            if target is not None:
                s = torch.empty(group[0].weight_view().shape[1]).uniform_(0.2, 5.0, generator=g)
                fold_input_scale(target, group, s)
                folded += 1
        after = q(x).logits
    assert folded >= 2  # the groups after each norm at least
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("algorithm", ["smoothquant", "awq"])
def test_a_norm_whose_output_the_residual_adds_too_takes_no_scale(algorithm):
    """BERT adds each LayerNorm's output to the residual after the layers reading it: folding a scale into it
    changed the float logits (11.8 dB after SmoothQuant). The fold is checked on the block's output."""
    from tests.hf.hf_tiny import bert_config

    torch.manual_seed(0)
    q = _quantized(transformers.BertForSequenceClassification(bert_config(num_labels=3)))
    batches = _batches()
    with tq.qmodule_state(q, tq.QModuleState.BYPASSED), torch.no_grad():
        before = q(batches[0]).logits
    opts = {"clip": False} if algorithm == "awq" else {}
    res = getattr(tq.ptq, algorithm)(q, batches, progress=False, **opts)
    assert "bert.encoder.layer.0.intermediate.dense" in res.skipped
    with tq.qmodule_state(q, tq.QModuleState.BYPASSED), torch.no_grad():
        torch.testing.assert_close(q(batches[0]).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("algorithm", ["smoothquant", "awq"])
def test_a_parallel_blocks_norm_is_scaled_for_attention_and_mlp_together(algorithm):
    """Phi's decoder layer feeds one norm's output to q, k, v and to fc1 (attention and MLP in parallel): one
    scale for all four layers, folded into the norm, the float model unchanged."""
    cfg = transformers.PhiConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB
    )
    q = _quantized(transformers.PhiForCausalLM(cfg))
    batches = _batches()
    with tq.qmodule_state(q, tq.QModuleState.BYPASSED), torch.no_grad():
        before = q(batches[0]).logits
    opts = {"clip": False} if algorithm == "awq" else {}
    res = getattr(tq.ptq, algorithm)(q, batches, progress=False, **opts)
    layer = "model.layers.0."
    joint = ",".join(layer + n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"))
    assert joint in (res.exponents if algorithm == "awq" else res.folded)
    with tq.qmodule_state(q, tq.QModuleState.BYPASSED), torch.no_grad():
        torch.testing.assert_close(q(batches[0]).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
@pytest.mark.parametrize("algorithm", ["smoothquant", "awq"])
def test_smoothquant_and_awq_keep_gemmas_float_model(family, algorithm):
    """Gemma's norms compute ``n(x) * (1 + weight)``: dividing the weight by the scales changed the
    float logits (SQNR 4 dB after SmoothQuant); the gain is what must be divided."""
    q = FOLD_FAMILIES[family]()
    batches = _batches()
    with tq.qmodule_state(q, tq.QModuleState.BYPASSED), torch.no_grad():
        before = q(batches[0]).logits
    opts = {"clip": False} if algorithm == "awq" else {}
    res = getattr(tq.ptq, algorithm)(q, batches, progress=False, **opts)
    groups = res.exponents if algorithm == "awq" else res.folded
    assert "model.layers.0.self_attn.q_proj,model.layers.0.self_attn.k_proj,model.layers.0.self_attn.v_proj" in groups
    with tq.qmodule_state(q, tq.QModuleState.BYPASSED), torch.no_grad():
        torch.testing.assert_close(q(batches[0]).logits, before, rtol=1e-4, atol=1e-4)


def test_blocks_get_the_quantized_outputs_of_the_block_before():
    """Block 1's captured inputs equal block 0's outputs in the engine's mode, computed after processing."""
    q = _llama()
    batches = _batches()
    tq.calibrate(q, batches, progress=False)
    seen = []
    for block in sequential_blocks(q, batches, mode=tq.QModuleState.QUANT_EVAL, progress=False):
        seen.append([c.args[0].clone() for c in block._calls])
        if block.name.endswith(".0"):
            with torch.no_grad():  # processing: anything that changes the block
                block.module.mlp.down_proj.layer.weight.mul_(0.5)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    grabbed = []
    h = q.model.layers[1].register_forward_pre_hook(lambda m, a: grabbed.append(a[0]))
    with torch.no_grad():
        for b in batches:
            q(b)
    h.remove()
    for got, want in zip(seen[1], grabbed):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, h, *, gain):
        return self.fc(h) * gain


class _PerLayerKeywords(nn.Module):
    """Each block gets its own keyword value (as models with per-layer attention masks do)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Layer() for _ in range(3))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x, gain=torch.tensor(float(i + 1)))
        return x


def test_blocks_called_with_different_keywords_keep_their_own():
    torch.manual_seed(0)
    net = tq.quantize_model(_PerLayerKeywords(), lambda m, n: W8(), None, method="swap")
    x = torch.randn(4, 6)
    gains = [
        float(b._calls[0].kwargs["gain"])
        for b in sequential_blocks(net, [x], mode=tq.QModuleState.BYPASSED, progress=False)
    ]
    assert gains == [1.0, 2.0, 3.0]


class _PositionalLayer(_Layer):
    def forward(self, h, gain):
        return self.fc(h) * gain


class _PerLayerPositional(nn.Module):
    """Each block gets its own tensor by position (Gemma 3n's per-layer inputs)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_PositionalLayer() for _ in range(3))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x, torch.tensor(float(i + 1)))
        return x


def test_blocks_called_with_different_positional_arguments_keep_their_own():
    torch.manual_seed(0)
    net = tq.quantize_model(_PerLayerPositional(), lambda m, n: W8(), None, method="swap")
    x = torch.randn(4, 6)
    gains = [
        float(b._calls[0].args[1]) for b in sequential_blocks(net, [x], mode=tq.QModuleState.BYPASSED, progress=False)
    ]
    assert gains == [1.0, 2.0, 3.0]


def _reference_gptq(model, batches, layers):
    """Plain sequential GPTQ: each layer's Hessian from full-model passes after the earlier layers are quantized."""
    for w in layers:
        xs = []
        h = w.register_forward_pre_hook(lambda m, a, xs=xs: xs.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            for b in batches:
                model(b)
        h.remove()
        X = torch.cat(xs).float()
        H = 2 * X.t() @ X / X.shape[0]
        wv = w.weight_view()
        qw, _ = gptq_quantize_weight(wv, H, w.weight_quantizer.grid())
        with torch.no_grad():
            wv.copy_(qw)


def test_gptq_on_the_engine_equals_layer_by_layer_gptq_over_the_whole_model():
    batches = _batches(n=4, seq=16)
    a, b = _llama(), _llama()
    for q in (a, b):
        tq.calibrate(q, batches, progress=False)
        tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    tq.ptq.gptq(a, batches, progress=False)
    _reference_gptq(b, batches, [m for _, m in tq.iter_qmodules(b) if isinstance(m, tq.QWrapper)])
    for (n, wa), (_, wb) in zip(tq.iter_qmodules(a), tq.iter_qmodules(b)):
        if isinstance(wa, tq.QWrapper):
            torch.testing.assert_close(wa.weight_view(), wb.weight_view(), rtol=0, atol=1e-5, msg=n)


def test_a_cache_passed_positionally_is_left_out_so_reruns_agree():
    # GPT-2 passes its DynamicCache to each block positionally: a block re-run with it appended its keys and
    # values again (GPTQ's Hessians saw attention over stale keys; AdaRound refused the batches as different).
    transformers = pytest.importorskip("transformers")
    from torchquant.hf import TorchQuantConfig, quantize

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    q = quantize(transformers.GPT2LMHeadModel(cfg).eval(), TorchQuantConfig(weights="int4"))
    ids = [torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    tq.calibrate(q, ids, progress=False)
    for block in sequential_blocks(q, ids, progress=False):
        assert not any(type(a).__name__.endswith("Cache") for args, _ in block.inputs() for a in args)
        first, again = block.run(), block.run()
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert sorted(tq.ptq.adaround(q, ids, iters=5, progress=False))[0] == "transformer.h.0.attn.c_attn"


def _padded_and_alone():
    """Two sequences as one left-padded batch, and each alone (Llama's positions follow the mask)."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(1, VOCAB, (1, 16), generator=g), torch.randint(1, VOCAB, (1, 6), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 10, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    return [{"input_ids": ids, "attention_mask": mask}], [a, b]


def test_padded_tokens_are_left_out_of_gptq_and_smoothquant_statistics(monkeypatch):
    import sys

    gptq_module = sys.modules["torchquant.ptq.gptq"]  # the package's name 'gptq' is the function
    padded, alone = _padded_and_alone()
    q = _llama()
    tq.calibrate(q, padded, progress=False)
    block = next(iter(sequential_blocks(q, padded, progress=False)))
    rows = []
    q_proj = block.module.self_attn.q_proj
    block.run({q_proj: lambda m, x, i: rows.append(block.real_tokens(m, x, i).shape)})
    assert rows == [torch.Size([22, 32])]  # 16 + 6 real tokens of 32

    def hessians(batches):
        seen = []

        def spy(weight, hessian, grid, **kw):
            seen.append(hessian.clone())
            return gptq_quantize_weight(weight, hessian, grid, **kw)

        monkeypatch.setattr(gptq_module, "gptq_quantize_weight", spy)
        q = _llama()
        tq.calibrate(q, batches, progress=False)
        tq.ptq.gptq(q, batches, progress=False)
        return seen

    for got, want in zip(hessians(padded), hessians(alone)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    scales = [tq.ptq.smoothquant(_llama(), data, progress=False).max_scale for data in (padded, alone)]
    assert scales[0] == pytest.approx(scales[1], rel=1e-6)


@pytest.mark.parametrize("algorithm", ["smoothquant", "awq"])
def test_layers_outside_the_stack_are_listed_as_skipped(algorithm):
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(llama_config(tie_word_embeddings=False)).eval()
    wf = lambda mod, name: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))  # noqa: E731
    q = tq.quantize_model(m, wf, None, method="swap", skip=["model.embed_tokens"])
    opts = {"clip": False} if algorithm == "awq" else {}
    res = getattr(tq.ptq, algorithm)(q, _batches(), progress=False, **opts)
    assert res.skipped["lm_head"].startswith("outside the blocks it processes")
    assert not any(k.startswith("model.layers.") and "outside" in v for k, v in res.skipped.items())
