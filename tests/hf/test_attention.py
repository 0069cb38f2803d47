"""Quantized attention and KV cache in Hugging Face models (tiny random configs, offline)."""

from __future__ import annotations

import pytest
import torch

import torchquant as tq

transformers = pytest.importorskip("transformers")

from hf_tiny import (  # noqa: E402
    bert_config,
    gemma2_config,
    gpt2_config,
    llama_config,
    mistral_config,
    vit_config,
    whisper_config,
)
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from torchquant.hf import QAttention, attention_modules, kv_quantizers, quantize_attention  # noqa: E402

S = tq.QModuleState
pytestmark = pytest.mark.usefixtures("one_thread")

SQNR_8BIT_DB = 35.0  # measured 50 to 93 dB on these models (query, key, value per head and token, probs per tensor)


def text_inputs(left_padding: bool):
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    if left_padding:
        mask[0, :4] = 0
    else:
        mask[0, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}, mask.bool()


def build(kind: str, impl: str, init_range: float = 0.02):
    """(model, inputs, positions whose logits are compared: the unpadded ones)."""
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(llama_config(initializer_range=init_range))
        inputs, real = text_inputs(left_padding=True)
    elif kind == "gpt2":
        model = transformers.GPT2LMHeadModel(gpt2_config(initializer_range=init_range))
        inputs, real = text_inputs(left_padding=True)
    elif kind == "bert":
        model = transformers.BertForMaskedLM(bert_config())
        inputs, real = text_inputs(left_padding=False)
    elif kind == "vit":
        model = transformers.ViTForImageClassification(vit_config(num_labels=3))
        inputs, real = {"pixel_values": torch.randn(2, 3, 16, 16)}, None
    else:
        model = transformers.WhisperForConditionalGeneration(whisper_config())
        inputs = {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": torch.randint(3, 100, (2, 6))}
        real = None
    model.set_attn_implementation(impl)
    return model.eval(), inputs, real


def head_dim(module) -> int:
    return getattr(module, "head_dim", None) or module.attention_head_size  # BERT names it so


def per_token(n_bits):
    return lambda module, name: tq.DynamicAffineQuantizer(n_bits, axis=-1, group_size=head_dim(module))


def kivi(n_bits: int, group_size: int) -> dict:
    """``quantize_attention``'s key and value factories: KIVI's quantizers, new ones for every module."""
    return {
        "key": lambda m, n: kv_quantizers(n_bits, group_size=group_size)[0],
        "value": lambda m, n: kv_quantizers(n_bits, group_size=group_size)[1],
    }


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean())).item()


MODELS = ["llama", "gpt2", "bert", "vit", "whisper"]
N_ATTENTION = {"llama": 2, "gpt2": 2, "bert": 2, "vit": 2, "whisper": 6}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", MODELS)
def test_bypassed_equals_float_and_quant_eval_is_close(kind, impl):
    model, inputs, real = build(kind, impl)
    with torch.no_grad():
        ref = model(**inputs).logits
    names = quantize_attention(
        model,
        query=per_token(8),
        key=per_token(8),
        value=per_token(8),
        probs=lambda m, n: tq.DynamicAffineQuantizer(8),
    )
    assert len(names) == N_ATTENTION[kind]
    assert all(isinstance(model.get_submodule(n).attn_quantizer, QAttention) for n in names)
    assert {n for n, _ in attention_modules(model)} == set(names)
    assert all(m.config._attn_implementation == "torchquant" for _, m in attention_modules(model))
    assert all(model.get_submodule(n).attn_quantizer.implementation == impl for n in names)
    sel = (slice(None),) if real is None else (real,)  # padded queries' outputs are not compared
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)  # the same kernel on the same tensors
        with tq.qmodule_state(model, S.CALIBRATION):  # eager when the probabilities are observed
            torch.testing.assert_close(model(**inputs).logits[sel], ref[sel], rtol=1e-5, atol=1e-5)
        tq.set_qmodule_state(model, S.QUANT_EVAL)
        quantized = model(**inputs).logits
    assert not torch.equal(quantized, ref)
    assert sqnr_db(ref[sel], quantized[sel]) > SQNR_8BIT_DB


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_encoder_decoder_with_sub_configs(impl):
    torch.manual_seed(0)
    decoder = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, add_cross_attention=True, is_decoder=True
    )
    cfg = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(bert_config(), decoder)
    model = transformers.EncoderDecoderModel(cfg).eval()
    model.set_attn_implementation(impl)
    ids = torch.randint(3, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(3, 100, (2, 6))}
    with torch.no_grad():
        ref = model(**inputs).logits
    names = quantize_attention(model, query=per_token(8), key=per_token(8), value=per_token(8))
    assert len(names) == 6 and sum(n.endswith("crossattention") for n in names) == 2
    assert model.config.encoder._attn_implementation == model.config.decoder._attn_implementation == "torchquant"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
        tq.set_qmodule_state(model, S.QUANT_EVAL)
        assert sqnr_db(ref, model(**inputs).logits) > SQNR_8BIT_DB


def test_calibrate_summary_state_dict_and_second_call():
    model, inputs, _ = build("llama", "sdpa")
    keys = set(model.state_dict())
    quantize_attention(model, key=lambda m, n: kv_quantizers(4, group_size=4)[0], value=per_token(4))
    added = set(model.state_dict()) - keys
    # Dynamic quantizers hold no tensors of state: only their configuration and the QAttention modes.
    assert added and all(k.endswith(tq.spec.CONFIG_KEY) for k in added)
    assert keys <= set(model.state_dict())
    tq.calibrate(model, [inputs["input_ids"]], progress=False)  # observing changes nothing, modes come back
    assert set(tq.get_qmodule_states(model).values()) == {S.BYPASSED}
    rows = [r for r in tq.summary_rows(model) if r["kind"] == "QAttention"]
    assert [r["name"] for r in rows] == [
        "model.layers.0.self_attn.attn_quantizer",
        "model.layers.1.self_attn.attn_quantizer",
    ]
    assert rows[0]["act_bits"] == 4 and "key" in rows[0]["layers"] and "query" not in rows[0]["layers"]
    assert "QAttention" in tq.summary(model)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_attention(model, key=per_token(8))


def test_skip_leaves_a_module_in_float_and_other_implementations_are_refused():
    model, inputs, _ = build("llama", "eager")
    with torch.no_grad():
        ref = model(**inputs).logits
    names = quantize_attention(model, key=per_token(2), value=per_token(2), skip=["*.layers.1.*"])
    assert names == ["model.layers.0.self_attn"]
    assert not hasattr(model.model.layers[1].self_attn, "attn_quantizer")
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, ref)
        tq.set_qmodule_state(model, S.BYPASSED)
        assert torch.equal(model(**inputs).logits, ref)  # the skipped layer runs its eager kernel
    other, _, _ = build("gpt2", "sdpa")
    other.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="set_attn_implementation"):
        quantize_attention(other, key=per_token(8))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        quantize_attention(torch.nn.Linear(2, 2), key=per_token(8))


@pytest.mark.parametrize("attention_first", [True, False], ids=["attention-first", "swap-first"])
def test_with_quantize_model_swap_in_either_order(attention_first):
    model, inputs, real = build("llama", "sdpa")
    with torch.no_grad():
        ref = model(**inputs).logits

    def weights(module, name):
        return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)

    def attention(m):
        return quantize_attention(m, key=per_token(8), value=per_token(8))

    if attention_first:
        attention(model)
    model = tq.quantize_model(model, weights, None, method="swap")
    if not attention_first:
        attention(model)
    assert tq.summary(model).splitlines()[-1] == (
        "18 quantization points (16 QWrapper, 0 QOp, 2 QAttention), 0 left in float"
    )
    tq.calibrate(model, [inputs["input_ids"]], progress=False)
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    with torch.no_grad():
        y = model(**inputs).logits
    assert sqnr_db(ref[real], y[real]) > SQNR_8BIT_DB


def test_a_config_shared_with_a_converted_model_is_refused():
    model, _, _ = build("llama", "sdpa")
    twin = transformers.LlamaForCausalLM(model.config)  # the same config object
    quantize_attention(model, key=per_token(8))
    with pytest.raises(RuntimeError, match="no QAttention"):
        twin(torch.randint(3, 100, (1, 4)))
    with pytest.raises(ValueError, match="shared"):
        quantize_attention(twin, key=per_token(8))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_probabilities_lie_on_the_grid(impl):
    model, inputs, _ = build("llama", impl)
    with torch.no_grad():
        ref = model(**inputs).logits
    quantize_attention(model, probs=lambda m, n: tq.DynamicAffineQuantizer(3))
    seen = []
    for n, _ in attention_modules(model):
        qa = model.get_submodule(n).attn_quantizer
        qa.probs_quantizer.register_forward_hook(lambda mod, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)  # bypassed: the model's own kernel, no probabilities
        assert seen == []
        tq.set_qmodule_state(model, S.QUANT_EVAL)
        out = model(**inputs, output_attentions=True)
    assert len(seen) == 2
    for (p, q), returned in zip(seen, out.attentions):
        assert torch.equal(q, returned)  # the quantized probabilities are what attention used and returns
        assert p.shape == (2, 4, 12, 12) and torch.allclose(p.sum(-1), torch.ones(()))
        step = p.max() / 7  # 3 bits, per tensor, range [0, max p]
        codes = q / step
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.round().unique().numel() <= 8
        assert not torch.equal(p, q)


@pytest.mark.parametrize("mode", [S.BYPASSED, S.QUANT_EVAL])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_left_padding_is_respected(kind, impl, mode):
    model, _, _ = build(kind, impl)
    quantize_attention(model, query=per_token(4), key=per_token(4), value=per_token(4))
    tq.set_qmodule_state(model, mode)
    alone = torch.randint(3, 100, (1, 8))
    ids = torch.cat([torch.zeros(1, 4, dtype=torch.long), alone], dim=1)
    ids = torch.cat([ids, torch.randint(3, 100, (1, 12))])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        single = model(input_ids=alone).logits
    torch.testing.assert_close(batched[0, 4:], single[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- KV cache (KIVI) in generate()

_PROMPT = {}


def _kivi_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of a whole sequence without a cache, each query row seeing the keys and values as a
    quantized cache held them when that row was computed: the prompt's rows at prefill (P tokens),
    row i >= P at decoding step i (i + 1 tokens). Batch of one, no padding; a sliding window and
    Gemma 2's score cap are applied as the model asks."""
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
    qa = module.attn_quantizer
    n_rep = query.shape[1] // key.shape[1]
    rows = []
    for i in range(query.shape[2]):
        t = max(_PROMPT["length"], i + 1)
        k = qa.key_quantizer(key[:, :, :t])[:, :, : i + 1].repeat_interleave(n_rep, dim=1)
        v = qa.value_quantizer(value[:, :, :t])[:, :, : i + 1].repeat_interleave(n_rep, dim=1)
        scores = query[:, :, i : i + 1] @ k.transpose(2, 3) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if window is not None:
            scores[..., : max(i + 1 - window, 0)] = float("-inf")
        rows.append(torch.softmax(scores, dim=-1) @ v)  # (B, H, 1, D)
    return torch.cat(rows, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register("tq_test_kivi_reference", _kivi_reference)
AttentionMaskInterface.register("tq_test_kivi_reference", sdpa_mask)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_kivi_cache_matches_the_reference(kind, impl):
    # weights 10x the default initialisation: logits that react to the quantization noticeably
    model, _, _ = build(kind, impl, init_range=0.2)
    prompt = torch.randint(3, 100, (1, 5))
    n_new = 14  # the cache crosses the 8-token group boundary: 5 + 14 = 19 tokens
    gen = {"max_new_tokens": n_new, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        float_out = model.generate(prompt, **gen)
    keys_seen = []
    quantize_attention(model, **kivi(4, group_size=8))
    qa = model.get_submodule(attention_modules(model)[0][0]).attn_quantizer
    qa.key_quantizer.register_forward_hook(lambda mod, args, out: keys_seen.append(args[0].shape[-2]))
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    with torch.no_grad():
        out = model.generate(prompt, **gen)
    assert keys_seen == list(range(5, 5 + n_new))  # the whole cache at every step
    seq = out.sequences[:, :-1]  # every token whose logits generate() computed
    with torch.no_grad():
        one_pass = model(seq).logits[0, prompt.shape[1] - 1 :]  # every query sees the final cache
    _PROMPT["length"] = prompt.shape[1]
    for _, m in attention_modules(model):
        m.config._attn_implementation_internal = "tq_test_kivi_reference"
    with torch.no_grad():
        ref = model(seq).logits[0, prompt.shape[1] - 1 :]  # (n_new, vocab)
    got = torch.cat(out.logits)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # measured: 2e-6
    assert (got - one_pass).abs().max() > 1e-2  # measured: 0.1 to 0.2 (see the module docstring)
    assert (got - torch.cat(float_out.logits)).abs().max() > 1e-1  # 4-bit keys and values change the logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_per_token_cache_matches_one_forward_pass(kind):
    # per-token ranges: a token's quantized key and value do not depend on when they are read
    model, _, _ = build(kind, "sdpa", init_range=0.2)
    quantize_attention(model, query=per_token(4), key=per_token(4), value=per_token(4))
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    prompt = torch.randint(3, 100, (1, 5))
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        ref = model(out.sequences[:, :-1]).logits[0, prompt.shape[1] - 1 :]
    torch.testing.assert_close(torch.cat(out.logits), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", [mistral_config, gemma2_config], ids=["mistral", "gemma2"])
def test_generate_on_sliding_window_layers_refuses_a_cropped_cache_and_matches_with_a_whole_one(family):
    # A sliding-window layer's default cache keeps its last window - 1 tokens: KIVI's key groups
    # would form over the window and move with it. With a cache that keeps every token (the mask
    # still applies the window), generate() gives what a quantized cache would.
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(family(sliding_window=6, initializer_range=0.2)).eval()
    quantize_attention(model, **kivi(4, group_size=4))
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    prompt = torch.randint(3, 100, (1, 5))
    gen = {"max_new_tokens": 10, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"layers\.0\.self_attn\.attn_quantizer\.key_quantizer"):
        model.generate(prompt, **gen)
    with torch.no_grad():
        out = model.generate(prompt, cache=transformers.DynamicCache(), **gen)
    _PROMPT["length"] = prompt.shape[1]
    for _, m in attention_modules(model):
        m.config._attn_implementation_internal = "tq_test_kivi_reference"
    with torch.no_grad():
        ref = model(out.sequences[:, :-1]).logits[0, prompt.shape[1] - 1 :]
    torch.testing.assert_close(torch.cat(out.logits), ref, rtol=1e-4, atol=1e-4)
    # per-token ranges do not depend on which tokens the cache kept: no refusal
    model = transformers.AutoModelForCausalLM.from_config(family(sliding_window=6)).eval()
    quantize_attention(model, key=per_token(4), value=per_token(4))
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    with torch.no_grad():
        assert model.generate(prompt, max_new_tokens=10, do_sample=False).shape == (1, 15)


def test_kivi_quantizers_layout():
    keys, values = kv_quantizers(2, group_size=4)
    k = torch.randn(1, 2, 10, 8)
    kq, vq = keys(k), values(k)
    assert torch.equal(kq[:, :, 8:], k[:, :, 8:])  # residual tokens stay float
    kivi = {"n_bits": 2, "group_size": 4, "include_zero": False}
    assert torch.equal(kq[:, :, :8], tq.DynamicAffineQuantizer(axis=-2, **kivi)(k[:, :, :8]))
    assert torch.equal(vq, tq.DynamicAffineQuantizer(axis=-1, **kivi)(k))
    keys, _ = kv_quantizers(2, group_size=4, residual=False)
    assert not torch.equal(keys(k)[:, :, 8:], k[:, :, 8:])


def test_kivi_grid_runs_from_each_groups_min_to_its_max():
    # KIVI: scale (max - min) / (2^b - 1), zero point the min; a range widened to 0 lost half of a 2-bit
    # key channel's levels where it lay away from 0 (an outlier channel)
    keys, values = kv_quantizers(2, group_size=4)
    k = torch.tensor([8.0, 8.4, 9.1, 9.5]).reshape(1, 1, 4, 1)  # one channel, one group of 4 tokens
    step = (9.5 - 8.0) / 3
    expected = 8.0 + torch.round((k - 8.0) / step) * step
    torch.testing.assert_close(keys(k), expected, rtol=0, atol=1e-6)
    assert keys(k).unique().numel() == 4
    v = torch.tensor([-3.0, -2.5, -2.2, -1.0]).reshape(1, 1, 1, 4)  # one token, one group of 4 channels
    step = 2.0 / 3
    torch.testing.assert_close(values(v), -3.0 + torch.round((v + 3.0) / step) * step, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="include_zero=False needs symmetric=False"):
        tq.DynamicAffineQuantizer(4, symmetric=True, include_zero=False)
    sym_keys, _ = kv_quantizers(4, symmetric=True)
    assert sym_keys.include_zero


def test_a_static_cache_quantizes_the_tokens_seen_not_its_empty_slots():
    # the whole max_cache_len buffer reached the attention: KIVI groups took ranges over empty slots and
    # quantized the newest keys (tokens differed from a dynamic cache)
    model, _, _ = build("llama", "sdpa", init_range=0.2)
    quantize_attention(model, **kivi(2, group_size=4))
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    prompt = torch.randint(3, 100, (1, 7))
    gen = {"max_new_tokens": 8, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        dynamic = model.generate(prompt, **gen)
        static = model.generate(prompt, cache_implementation="static", **gen)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.cat(static.logits), torch.cat(dynamic.logits), rtol=1e-4, atol=1e-4)


def test_packed_sequences_whose_positions_restart_quantize_every_key():
    # max(position_ids) + 1 is not the token count of a packed row: 8 of its 16 keys went through in float
    model, _, _ = build("llama", "sdpa")
    seen = []
    quantize_attention(model, key=lambda m, n: kv_quantizers(2, group_size=4)[0])
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    qa = model.get_submodule(attention_modules(model)[0][0]).attn_quantizer
    qa.key_quantizer.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[-2]))
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 16)), position_ids=torch.cat([torch.arange(8), torch.arange(8)])[None])
    assert seen == [16]


def test_switching_to_a_builtin_attention_after_quantizing_is_refused():
    # the config then no longer calls torchquant's attention function: it ran in float with no error
    model, _, _ = build("llama", "sdpa")
    quantize_attention(model, query=per_token(4), key=per_token(4), value=per_token(4))
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    model.set_attn_implementation("eager")
    with torch.no_grad(), pytest.raises(RuntimeError, match="attn_implementation is now 'eager'"):
        model(torch.randint(3, 100, (1, 6)))
    for mode in (S.BYPASSED, S.QUANT_EVAL_WEIGHT_ONLY):  # attention in float anyway: nothing to refuse
        tq.set_qmodule_state(model, mode)
        with torch.no_grad():
            model(torch.randint(3, 100, (1, 6)))


def test_a_kv_cache_table_naming_one_role_leaves_the_other_to_the_attention_field():
    from torchquant.hf import TorchQuantConfig

    config = TorchQuantConfig(attention="int8-dynamic", kv_cache={"key": "int4-dynamic"})
    assert set(config.kv_cache) == {"key"}
    model, _, _ = build("llama", "sdpa")
    tq.hf.quantize(model, config)
    qa = model.get_submodule(attention_modules(model)[0][0]).attn_quantizer
    assert qa.key_quantizer.n_bits == 4 and qa.value_quantizer.n_bits == 8


def test_import_torchquant_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, torchquant; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    model, inputs, _ = build("llama", "sdpa")
    quantize_attention(
        model,
        query=per_token(8),
        key=lambda m, n: kv_quantizers(4, group_size=4)[0],
        value=per_token(8),
        probs=lambda m, n: tq.DynamicAffineQuantizer(8),
    )
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    with torch.no_grad():
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert torch.equal(compiled(**inputs).logits, model(**inputs).logits)


def test_gemma2_softcapped_scores_are_capped_in_the_eager_computation():
    # Gemma 2 passes `softcap` to its attention: with the probabilities observed or quantized, attention runs
    # torchquant's eager computation, which caps the scores as the model's own eager attention does.
    from hf_tiny import VOCAB, gemma2_config

    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(gemma2_config(attn_logit_softcapping=5.0)).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    quantize_attention(model, probs=lambda m, n: tq.DynamicAffineQuantizer(8))
    with torch.no_grad():
        with tq.qmodule_state(model, S.CALIBRATION):
            assert torch.equal(model(input_ids=ids).logits, ref)
        tq.set_qmodule_state(model, S.QUANT_EVAL)
        quantized = model(input_ids=ids).logits
    assert sqnr_db(ref, quantized) > SQNR_8BIT_DB


def test_clip_attention_which_names_its_scale_scale_is_quantized():
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8
    )
    model = transformers.CLIPVisionModel(cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
    found = quantize_attention(model, query=per_token(8), key=per_token(8), value=per_token(8))
    assert [n.rpartition("encoder.")[2] for n in found] == ["layers.0.self_attn"]
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).last_hidden_state, ref)  # BYPASSED
        tq.set_qmodule_state(model, S.QUANT_EVAL)
        out = model(pixel_values=x).last_hidden_state
    assert SQNR_8BIT_DB < sqnr_db(ref, out) < 200
