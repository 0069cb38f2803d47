"""torchquant.hf: TorchQuantConfig, from_pretrained / save_pretrained round trips on one tiny model per family."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tiny import (  # noqa: E402
    bert_config,
    gemma_config,
    gpt2_config,
    llama_config,
    mixtral_config,
    qwen2_config,
    vit_config,
    whisper_config,
)

import torchquant as tq  # noqa: E402
from torchquant.hf import TorchQuantConfig, quantize  # noqa: E402
from torchquant.spec import SpecError  # noqa: E402

S = tq.QModuleState


@dataclass(frozen=True)
class Family:
    name: str
    config: Any
    auto: str
    inputs: Any
    causal: bool = False

    def batch(self) -> dict:
        torch.manual_seed(1)
        return self.inputs()


def _ids(vocab: int = 100, n: int = 12) -> dict:
    return {"input_ids": torch.randint(0, vocab, (2, n))}


FAMILIES = [
    Family("llama", llama_config, "AutoModelForCausalLM", _ids, causal=True),
    Family("qwen2", qwen2_config, "AutoModelForCausalLM", _ids, causal=True),
    Family("gpt2", gpt2_config, "AutoModelForCausalLM", _ids, causal=True),
    # a scaled embedding (a subclass of nn.Embedding) and norms multiplying by 1 + weight
    Family("gemma", gemma_config, "AutoModelForCausalLM", _ids, causal=True),
    Family("bert", lambda: bert_config(num_labels=3), "AutoModelForSequenceClassification", _ids),
    Family(
        "vit",
        lambda: vit_config(num_labels=5),
        "AutoModelForImageClassification",
        lambda: {"pixel_values": torch.randn(2, 3, 16, 16)},
    ),
    Family(
        "whisper",
        whisper_config,
        "AutoModelForSpeechSeq2Seq",
        lambda: {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": torch.randint(3, 100, (2, 5))},
    ),
]


@pytest.fixture(scope="module")
def float_dirs(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        torch.manual_seed(0)
        cls = getattr(transformers, fam.auto)
        model = cls.from_config(fam.config())
        path = tmp_path_factory.mktemp(fam.name)
        model.save_pretrained(path)
        out[fam.name] = path
    return out


def _load(fam: Family, path, **kw):
    return getattr(transformers, fam.auto).from_pretrained(path, **kw).eval()


def _out(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean())).item()


CONFIGS = {
    "w8": dict(weights="int8"),
    # ViT's patch embedding has 3 input channels: no groups of 16 there
    "w4g16-emb8": dict(
        weights="int4-g16",
        embeddings="int8",
        overrides={"*.patch_embeddings.*": {"weights": "int4"}, "model.encoder.conv*": {"weights": "int4"}},
    ),
    "w8a8-norms": dict(weights="int8", activations="int8", norm_outputs="int8"),
    # every attention point: per-token dynamic layer inputs, static Q, 4-bit KIVI keys/values, 8-bit probabilities
    "w8-attn-kv4": dict(
        weights="int8", activations="int8-dynamic", attention="int8", kv_cache="int4-g4", attention_probs="int8"
    ),
}


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("fam", FAMILIES, ids=[f.name for f in FAMILIES])
def test_from_pretrained_calibrate_save_and_reload_exactly(fam, cfg, float_dirs, tmp_path):
    batch = fam.batch()
    ref = _out(_load(fam, float_dirs[fam.name]), batch)
    config = TorchQuantConfig(**CONFIGS[cfg])
    model = _load(fam, float_dirs[fam.name], quantization_config=config)
    states = set(tq.get_qmodule_states(model).values())
    if config.quantizes_activations:
        assert states == {S.CALIBRATION}
        # calibration observes, the forward is the float one (observed probabilities come from an eager
        # softmax instead of the fused kernel: equal up to float rounding)
        assert torch.allclose(_out(model, batch), ref, rtol=0, atol=1e-5)
        tq.calibrate(model, [batch, fam.batch()], progress=False)
        tq.set_qmodule_state(model, S.QUANT_EVAL)
    else:
        assert states == {S.QUANT_EVAL}  # ranges from the weights, no data needed
    out = _out(model, batch)
    assert not torch.equal(out, ref)
    assert _sqnr(ref, out) > (8 if "4" in cfg else 15)

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "torchquant" and saved["weights"] == config.weights
    reloaded = _load(fam, tmp_path)
    assert tq.get_qmodule_states(reloaded) == tq.get_qmodule_states(model)
    assert torch.equal(_out(reloaded, batch), out)
    if fam.causal or fam.name == "whisper":  # generate(), with the KV cache quantized in the kv4 config
        key = "input_ids" if fam.causal else "input_features"
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(reloaded.generate(**{key: batch[key]}, **kw), model.generate(**{key: batch[key]}, **kw))


def test_every_linear_and_conv1d_is_quantized_and_lm_head_stays_float(float_dirs):
    fam = FAMILIES[2]  # gpt2: Conv1D layers, tied lm_head
    model = _load(fam, float_dirs["gpt2"], quantization_config=TorchQuantConfig(weights="int8", embeddings="int8"))
    names = {n for n, _ in tq.iter_qmodules(model)}
    assert "transformer.h.0.attn.c_attn" in names and "transformer.wte" in names
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.lm_head.weight is model.transformer.wte.layer.weight


@pytest.mark.parametrize("tied", [False, True], ids=["separate-head", "tied-head"])
def test_weight_only_int4_g64_checkpoint_is_under_a_third_of_float16(tmp_path, tied):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=512,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(tmp_path / "float")
    config = TorchQuantConfig(weights="int4-g64", embeddings="int4-g64", modules_to_not_convert=[])
    fam = FAMILIES[0]
    quantized = _load(fam, tmp_path / "float", quantization_config=config, dtype=torch.float16)
    quantized.save_pretrained(tmp_path / "q")
    ratio = (tmp_path / "q" / "model.safetensors").stat().st_size / (
        tmp_path / "float" / "model.safetensors"
    ).stat().st_size
    assert ratio < 0.3  # 4 bits + one float32 magnitude per 64 weights, vs 16 bits
    batch = {"input_ids": torch.randint(0, 512, (2, 12))}
    assert torch.equal(_out(_load(fam, tmp_path / "q", dtype=torch.float16), batch), _out(quantized, batch))


def test_overrides_and_modules_to_not_convert(float_dirs):
    config = TorchQuantConfig(
        weights="int4",
        overrides={"*.mlp.down_proj": {"weights": "int8"}, "model.layers.1.*": {"weights": None}},
        modules_to_not_convert=["self_attn"],
    )
    model = _load(FAMILIES[0], float_dirs["llama"], quantization_config=config)
    layer0, layer1 = model.model.layers
    assert layer0.mlp.down_proj.weight_quantizer.n_bits == 8
    assert layer0.mlp.up_proj.weight_quantizer.n_bits == 4
    assert layer1.mlp.up_proj.weight_quantizer is None
    assert isinstance(layer0.self_attn.q_proj, torch.nn.Linear)


def test_the_issue_example_works_as_written():
    config = TorchQuantConfig(
        weights={
            "quantizer": "affine",
            "observer": "batch_minmax",
            "args": {"n_bits": 8, "symmetric": True},
            "observer_args": {"axis": 0},
        },
        modules_to_not_convert=["lm_head"],
    )
    model = quantize(transformers.LlamaForCausalLM(llama_config()), config)
    q = model.model.layers[0].self_attn.q_proj.weight_quantizer
    assert isinstance(q, tq.AffineQuantizer) and q.symmetric and q.granularity == tq.per_channel(0)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert TorchQuantConfig.from_dict(json.loads(config.to_json_string())).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": "int4-g16-dynamic"}, "unknown options"),
        ({"activations": "int8-g16"}, "groups"),
        ({"weights": "uint4"}, "unknown short form"),
        ({"weights": {"quantizer": "affine", "bits": 4}}, "unknown keys"),
        ({"weights": {"quantizer": "no-such"}}, "valid names"),
        ({"overrides": {"x": {"kv_cache": "int4"}}}, "per-module overrides"),
        ({"modules_to_not_convert": "lm_head"}, "list of names"),
        ({"wieghts": "int8"}, "unknown arguments"),
        ({"weights": "int1"}, "symmetric weights need at least 2 bits"),  # every weight rounded to 0
        ({"kv_cache": "int4-g0"}, "at least one element"),  # was read as the default group of 32
        ({"weights": "int4-g0"}, "at least one element"),
        ({"activations": "int8-dynamic-percentile"}, "choose one of"),
        ({"activations": "int8-minmax-percentile"}, "choose one of"),
        ({"activations": "int0"}, "at least 1 bit"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises((SpecError, KeyError, TypeError), match=message):
        TorchQuantConfig(**kwargs)


def test_kv_value_groups_that_do_not_divide_the_head_dimension_are_refused_when_converting():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config())  # head_dim 8
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn: the value quantizer groups 32 .* 8 here"):
        quantize(model, TorchQuantConfig(weights="int8", kv_cache="int4"))


def test_registered_quantizer_names_are_short_forms():
    config = TorchQuantConfig(weights="fp8_e4m3", activations="fp8_e4m3")
    assert config.weights == {"quantizer": "fp8_e4m3"}


@pytest.mark.parametrize("short, symmetric", [("int3-g16-mse", True), ("int3-g16-asym-mse", False)])
def test_mse_weight_ranges_short_form(short, symmetric):
    """``-mse``: each group's range minimises its squared rounding error, so it is clipped inside
    min/max and rounds the weights closer than min/max does."""
    from torchquant.hf.config import WEIGHT_MSE_BINS

    config = TorchQuantConfig(weights=short)
    assert config.weights["observer"] == "mse" and config.weights["args"] == {"n_bits": 3, "symmetric": symmetric}
    assert config.weights["observer_args"]["bins"] == WEIGHT_MSE_BINS
    errors = {}
    for name, cfg in (("mse", config), ("minmax", TorchQuantConfig(weights=short.replace("-mse", "")))):
        torch.manual_seed(0)
        model = quantize(transformers.LlamaForCausalLM(llama_config()).eval(), cfg)
        w = model.model.layers[0].mlp.down_proj
        assert type(w.weight_quantizer.range_observer).__name__ == ("MSEObserver" if name == "mse" else "BatchMinMax")
        with torch.no_grad():
            wq = w.weight_quantizer(w.layer.weight)
        errors[name] = float((wq - w.layer.weight.detach()).pow(2).sum())
    assert errors["mse"] < errors["minmax"]


def test_calibrating_an_encoder_decoder_with_label_only_batches(float_dirs):
    # a seq2seq batch often has labels and no decoder inputs: the model builds those from the labels
    fam = FAMILIES[-1]
    model = _load(fam, float_dirs["whisper"], quantization_config=TorchQuantConfig(weights="int8", activations="int8"))
    batch = {"input_features": torch.randn(2, 8, 32), "labels": torch.randint(3, 100, (2, 5))}
    tq.calibrate(model, [batch], progress=False)
    decoder_q = model.model.decoder.layers[0].self_attn.q_proj.input_quantizer
    assert decoder_q.range_observer.initialized


def test_quantize_then_save_pretrained_round_trips(tmp_path):
    # converting a model already in memory, not through from_pretrained, saves the same way
    torch.manual_seed(0)
    model = quantize(transformers.LlamaForCausalLM(llama_config()).eval(), TorchQuantConfig(weights="int4-g16"))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "torchquant"
    batch = FAMILIES[0].batch()
    assert torch.equal(_out(_load(FAMILIES[0], tmp_path), batch), _out(model, batch))


def test_a_checkpoint_loaded_with_or_without_the_head_around_its_base_model_is_refused_saying_why(tmp_path):
    # transformers adds or strips base_model_prefix for the weights, the quantized modules' names stay as saved
    torch.manual_seed(0)
    quantize(transformers.LlamaForCausalLM(llama_config()).eval(), TorchQuantConfig(weights="int8")).save_pretrained(
        tmp_path / "lm"
    )
    with pytest.raises(ValueError, match=r"saved from a model with a head .* LlamaModel names them without"):
        transformers.AutoModel.from_pretrained(tmp_path / "lm")
    quantize(transformers.LlamaModel(llama_config()).eval(), TorchQuantConfig(weights="int8")).save_pretrained(
        tmp_path / "base"
    )
    with pytest.raises(ValueError, match=r"saved from a base model without a head .* names them with the prefix"):
        transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "base")


def test_norm_outputs_go_to_normalisations_only():
    model = quantize(transformers.GPT2LMHeadModel(gpt2_config()), TorchQuantConfig(weights="int8", norm_outputs="int8"))
    block = model.transformer.h[0]
    assert isinstance(block.ln_1, tq.QOp) and block.ln_1.acts_quantizer is not None
    assert block.attn.c_attn.acts_quantizer is None  # a Conv1D layer, not a normalisation


def test_a_checkpoint_saved_without_configuration_entries_loads(tmp_path):
    # save_pretrained writes every quantizer's configuration and every QModule's mode (<prefix>_extra_state);
    # checkpoints written before that have neither and still load, modes from the header's description
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = quantize(transformers.LlamaForCausalLM(llama_config()).eval(), TorchQuantConfig(weights="int4-g16"))
    model.save_pretrained(tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    entries = [k for k in tensors if k.endswith(tq.spec.CONFIG_KEY)]
    assert "model.layers.0.self_attn.q_proj._extra_state" in entries
    assert "model.layers.0.self_attn.q_proj.weight_quantizer._extra_state" in entries
    save_file({k: v for k, v in tensors.items() if k not in entries}, path, metadata=meta)
    reloaded = _load(FAMILIES[0], tmp_path)
    assert tq.get_qmodule_states(reloaded) == tq.get_qmodule_states(model)
    batch = FAMILIES[0].batch()
    assert torch.equal(_out(reloaded, batch), _out(model, batch))


def test_a_checkpoint_that_left_a_scaled_embedding_float_loads_as_saved(tmp_path):
    """Gemma's scaled word embedding is quantized now; a checkpoint saved when it stayed float (no description
    of it, its float weight) loads with it float again, computing what it computed when saved."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    float_model = transformers.GemmaForCausalLM(gemma_config()).eval()
    float_model.save_pretrained(tmp_path / "float")
    config = TorchQuantConfig(weights="int8", embeddings="int8")
    model = _load(FAMILIES[0], tmp_path / "float", quantization_config=config)
    assert isinstance(model.model.embed_tokens, tq.QWrapper)
    model.save_pretrained(tmp_path / "q")
    (path,) = (tmp_path / "q").glob("*.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    desc = json.loads(meta["torchquant"])
    del desc["modules"]["model.embed_tokens"]  # as the earlier torchquant wrote it: nothing about the embedding
    desc["packed"].pop("model.embed_tokens.weight", None)
    old = {k: v for k, v in tensors.items() if not k.startswith("model.embed_tokens.")}
    old["model.embed_tokens.weight"] = float_model.model.embed_tokens.weight.detach().clone()
    save_file(old, path, metadata={**meta, "torchquant": json.dumps(desc)})
    reloaded = _load(FAMILIES[0], tmp_path / "q")
    assert type(reloaded.model.embed_tokens).__name__ == "GemmaTextScaledWordEmbedding"
    batch = {"input_ids": torch.randint(0, 100, (2, 12))}
    with tq.qmodule_state(model, S.QUANT_EVAL), torch.no_grad():
        model.model.embed_tokens.qstate = S.BYPASSED  # the saved model's embedding: float
        expected = model(**batch).logits
    assert torch.equal(_out(reloaded, batch), expected)


MOE_FAMILIES = {
    "mixtral": lambda: transformers.MixtralForCausalLM(mixtral_config()),
    "qwen2-moe": lambda: transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(
            **_moe_base(),
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        )
    ),
    # (experts, in, out) banks, biases, interleaved gate/up
    "gpt-oss": lambda: transformers.GptOssForCausalLM(
        transformers.GptOssConfig(
            **_moe_base(), num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"]
        )
    ),
}


def _moe_base() -> dict:
    cfg = mixtral_config()
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return {k: getattr(cfg, k) for k in (*keys, "vocab_size")}


@pytest.mark.parametrize("family", list(MOE_FAMILIES))
def test_mixture_of_experts_banks_are_quantized_and_reload_exactly(family, tmp_path):
    """transformers stores the experts as (experts, out, in) parameters of one module: they become a QExperts,
    the router stays float by default, and nothing with weights stays float unannounced."""
    import warnings

    torch.manual_seed(0)
    MOE_FAMILIES[family]().save_pretrained(tmp_path / "float")
    batch = {"input_ids": torch.randint(0, 100, (2, 12))}
    ref = _out(_load(FAMILIES[0], tmp_path / "float"), batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.FloatLayersWarning)
        model = _load(FAMILIES[0], tmp_path / "float", quantization_config=TorchQuantConfig(weights="int8"))
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, tq.QExperts) and experts.qstate is tq.QModuleState.QUANT_EVAL
    assert experts.transposed is (family == "gpt-oss")
    held = {id(p) for _, m in tq.iter_qmodules(model) for p in m.parameters()}
    unheld = {n.rpartition(".")[0] for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in held}
    router = "model.layers.0.mlp." + ("router" if family == "gpt-oss" else "gate")
    assert unheld == {"lm_head", router}
    notes = {r["name"]: r["note"] for r in tq.summary_rows(model)}
    assert notes[router].startswith("skipped by glob")
    y = _out(model, batch)
    assert 30 < _sqnr(ref, y) < 80  # int8 per channel
    model.save_pretrained(tmp_path / "q")
    assert torch.equal(_out(_load(FAMILIES[0], tmp_path / "q"), batch), y)
    # the banks are stored as int8 codes under their quantizers' names (transformers renames the banks' own
    # keys on save), so the checkpoint is about a quarter of the float one
    from safetensors import safe_open

    (path,) = (tmp_path / "q").glob("*.safetensors")
    with safe_open(path, framework="pt") as f:  # Mixtral's mlp is block_sparse_moe in its checkpoints
        assert any(".layers.0." in k and k.endswith(".experts.gate_up_quantizer.__tq_codes") for k in f.keys())  # noqa: SIM118
    (float_path,) = (tmp_path / "float").glob("*.safetensors")
    assert path.stat().st_size < 0.6 * float_path.stat().st_size


@pytest.mark.parametrize("family", [*MOE_FAMILIES, "llama4"])
def test_gptq_quantizes_every_expert_of_a_mixture_of_experts_model(family):
    """Each expert of each bank gets GPTQ on the tokens routed to it, in the eager, grouped and batched
    implementations' models alike (Llama 4 applies every expert to its slice of one batched product)."""
    torch.manual_seed(0)
    if family == "llama4":
        cfg = transformers.Llama4TextConfig(
            **_moe_base(), num_local_experts=4, num_experts_per_tok=1, head_dim=8, intermediate_size_mlp=64
        )
        model = transformers.Llama4ForCausalLM(cfg)
    else:
        model = MOE_FAMILIES[family]()
    model.eval()
    data = [{"input_ids": torch.randint(0, 100, (2, 16))} for _ in range(2)]
    with torch.no_grad():
        ref = model(**data[0]).logits
    quantize(model, TorchQuantConfig(weights="int4"))
    tq.calibrate(model, data, progress=False)
    result = tq.ptq.gptq(model, data, progress=False)
    experts = next(n for n, m in model.named_modules() if isinstance(m, tq.QExperts))
    assert {f"{experts}.{b}[{e}]" for b in ("gate_up_proj", "down_proj") for e in range(4)} <= set(result.losses)
    assert not result.skipped
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    with torch.no_grad():
        assert _sqnr(ref, model(**data[0]).logits) > 15  # int4 per channel, random weights: about 20-30 dB


def _llama4_moe() -> torch.nn.Module:
    cfg = transformers.Llama4TextConfig(
        **_moe_base(), num_local_experts=4, num_experts_per_tok=1, head_dim=8, intermediate_size_mlp=64
    )
    return transformers.Llama4ForCausalLM(cfg)


def test_a_router_subclassing_linear_stays_float_by_default_without_a_warning():
    import warnings

    torch.manual_seed(0)
    model = _llama4_moe()  # Llama4Router is an nn.Linear whose forward also routes
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.FloatLayersWarning)
        quantize(model, TorchQuantConfig(weights="int8"))
    notes = {r["name"]: r["note"] for r in tq.summary_rows(model)}
    assert notes["model.layers.0.feed_forward.router"].startswith("skipped by glob")
    assert isinstance(model.model.layers[0].feed_forward.experts, tq.QExperts)


def test_smoothquant_warns_about_experts_that_got_no_token(monkeypatch):
    torch.manual_seed(0)
    model = MOE_FAMILIES["mixtral"]().eval()
    quantize(model, TorchQuantConfig(weights="int8", activations="int8"), initial_state=False)
    gate = model.model.layers[0].mlp.gate
    route = type(gate).forward

    def only_experts_0_and_1(hidden):  # the router's (logits, scores, indices), experts 2 and 3 never chosen
        logits, _, _ = route(gate, hidden)
        logits = logits.masked_fill(torch.arange(logits.shape[-1]) >= 2, -1e9)
        scores, idx = logits.softmax(-1).topk(gate.top_k, -1)
        return logits, scores / scores.sum(-1, keepdim=True), idx

    monkeypatch.setattr(gate, "forward", only_experts_0_and_1)
    data = [{"input_ids": torch.randint(0, 100, (2, 16))}]
    with pytest.warns(UserWarning, match=r"smoothquant: 2 expert matrices received no calibration token"):
        res = tq.ptq.smoothquant(model, data, progress=False)
    assert {k for k, v in res.skipped.items() if "no calibration token" in v} == {
        "model.layers.0.mlp.experts.down_proj[2]",
        "model.layers.0.mlp.experts.down_proj[3]",
    }


@pytest.mark.parametrize("algorithm", ["awq", "smoothquant"])
@pytest.mark.parametrize("family", [*MOE_FAMILIES, "llama4"])
def test_the_experts_first_input_is_scaled_with_the_router_compensating(family, algorithm):
    """The norm before the experts feeds the router too (and Qwen2-MoE's shared expert): its scale is folded
    into the norm and taken back by every reader, the router's weight included, so the float model (and
    its routing) does not change. Llama 4 multiplies the router's scores into the experts' input first:
    refused, with the reason."""
    torch.manual_seed(0)
    model = (_llama4_moe() if family == "llama4" else MOE_FAMILIES[family]()).eval()
    data = [{"input_ids": torch.randint(0, 100, (2, 16))} for _ in range(2)]
    with torch.no_grad():
        ref = model(**data[0]).logits
    quantize(model, TorchQuantConfig(weights="int4-g16", activations="int8" if algorithm == "smoothquant" else None))
    mlp = model.model.layers[0].feed_forward if family == "llama4" else model.model.layers[0].mlp
    router = (mlp.router if family in ("gpt-oss", "llama4") else mlp.gate).weight.detach().clone()
    if family != "llama4" and algorithm == "awq":  # AWQ scores the scale by the whole MoE block's output
        from torchquant.ptq.sequential import sequential_blocks

        block = next(iter(sequential_blocks(model, data, mode=S.BYPASSED, progress=False)))
        fold = block.shared_fold(mlp.experts)
        assert block.row_module([*fold.layers, *fold.experts]) == (mlp, 3)
    opts = {"clip": False} if algorithm == "awq" else {}
    result = getattr(tq.ptq, algorithm)(model, data, progress=False, **opts)
    done = result.exponents if algorithm == "awq" else result.folded
    key = next((k for k in done if k.endswith("mlp.experts.gate_up_proj")), None)
    if family == "llama4":
        assert key is None
        assert "not a normalisation's output" in result.skipped["model.layers.0.feed_forward.experts.gate_up_proj"]
        assert "changes the block's output" in next(v for k, v in result.skipped.items() if "shared_expert.gate" in k)
    else:
        assert key is not None and ("shared_expert.gate_proj" in key) == (family == "qwen2-moe")
        scaled = done[key] != 0.0 if algorithm == "awq" else True  # AWQ's exponent 0 is no scale
        assert torch.equal(mlp.gate.weight if family != "gpt-oss" else mlp.router.weight, router) is not scaled
    with tq.qmodule_state(model, S.BYPASSED), torch.no_grad():
        assert _sqnr(ref, model(**data[0]).logits) > 100  # float32 rounding only


@pytest.mark.parametrize("family", ["mixtral", "gpt-oss"])
def test_mixture_of_experts_activations_reach_every_expert_product_and_reload_exactly(family, tmp_path):
    """activations="int8" quantizes the hidden states the experts receive and each expert's down_proj input
    (the gated intermediate, found inside transformers' own forward); calibrated ranges survive save/reload."""
    torch.manual_seed(0)
    MOE_FAMILIES[family]().save_pretrained(tmp_path / "float")
    batch = {"input_ids": torch.randint(0, 100, (2, 12))}
    ref = _out(_load(FAMILIES[0], tmp_path / "float"), batch)
    config = TorchQuantConfig(weights="int8", activations="int8")
    model = _load(FAMILIES[0], tmp_path / "float", quantization_config=config)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.down_input_quantizer, tq.AffineQuantizer)
    assert torch.allclose(_out(model, batch), ref, rtol=0, atol=1e-5)  # calibration computes in float
    tq.calibrate(model, [batch, {"input_ids": torch.randint(0, 100, (2, 12))}], progress=False)
    observer = experts.down_input_quantizer.range_observer
    assert observer.initialized and float(observer.max_val) > 0
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    y = _out(model, batch)
    held, experts.down_input_quantizer = experts.down_input_quantizer, None
    without = _out(model, batch)  # the down_proj inputs in float: another output
    experts.down_input_quantizer = held
    assert not torch.equal(y, without) and 20 < _sqnr(ref, y) < 60
    model.save_pretrained(tmp_path / "q")
    reloaded = _load(FAMILIES[0], tmp_path / "q")
    assert torch.equal(
        reloaded.model.layers[0].mlp.experts.down_input_quantizer.range_observer.max_val, observer.max_val
    )
    assert torch.equal(_out(reloaded, batch), y)


def test_a_moe_checkpoint_saved_before_down_input_quantizers_loads_as_it_was(tmp_path):
    """Checkpoints of W8A8 MoE models written before QExperts quantized every expert's down_proj input have
    no such quantizer: from_pretrained and tq.load leave it out, and the model computes what it did."""
    torch.manual_seed(0)
    MOE_FAMILIES["mixtral"]().save_pretrained(tmp_path / "float")
    model = _load(
        FAMILIES[0], tmp_path / "float", quantization_config=TorchQuantConfig(weights="int8", activations="int8")
    )
    batch = {"input_ids": torch.randint(0, 100, (2, 12))}
    tq.calibrate(model, [batch], progress=False)
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    for layer in model.model.layers:
        layer.mlp.experts.down_input_quantizer = None  # the model an earlier version made
    old = _out(model, batch)
    model.save_pretrained(tmp_path / "q")
    tq.save(model, tmp_path / "native.safetensors")
    assert "down_input_quantizer" not in json.dumps(json.loads(_description(tmp_path / "q")))
    reloaded = _load(FAMILIES[0], tmp_path / "q")
    assert reloaded.model.layers[0].mlp.experts.down_input_quantizer is None
    assert torch.equal(_out(reloaded, batch), old)
    native = tq.load(transformers.MixtralForCausalLM(mixtral_config()).eval(), tmp_path / "native.safetensors")
    assert native.model.layers[0].mlp.experts.down_input_quantizer is None
    assert torch.equal(_out(native, batch), old)


def _description(folder) -> str:
    from safetensors import safe_open

    (path,) = folder.glob("*.safetensors")
    with safe_open(path, framework="pt") as f:
        return f.metadata()["torchquant"]


@pytest.mark.parametrize("rotate", [False, True], ids=["tied", "untied-by-quarot"])
def test_a_quantized_tied_head_round_trips_through_save_pretrained(rotate, tmp_path):
    """With lm_head quantized, the embedding and the head each keep their own float name: a rotation that unties
    them (QuaRot) saves two tensors, not the embedding's under both names."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(tie_word_embeddings=True)).eval()
    config = TorchQuantConfig(weights="int8", embeddings="int8", modules_to_not_convert=[])
    qm = quantize(model, config, initial_state=False)
    names = qm._tq_float_names
    assert names["lm_head.layer.weight"] == "lm_head.weight"
    assert names["model.embed_tokens.layer.weight"] == "model.embed_tokens.weight"
    ids = torch.randint(0, 100, (2, 12))
    if rotate:
        tq.ptq.quarot(qm, [ids])
        assert qm.lm_head.layer.weight is not qm.model.embed_tokens.layer.weight
    tq.calibrate(qm, [ids], progress=False)
    tq.set_qmodule_state(qm, tq.QModuleState.QUANT_EVAL)
    with torch.no_grad():
        expected = qm(ids).logits
    qm.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
