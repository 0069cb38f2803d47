"""Tiny random configs of the transformer families the Hugging Face tests use (nothing is downloaded).

One definition per family; a test passes what it needs on top (``num_labels``,
``initializer_range``) as keyword arguments.
"""

import transformers

VOCAB = 100


def llama_config(**kw) -> transformers.LlamaConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaConfig(**{**base, "vocab_size": VOCAB, **kw})


def qwen2_config(**kw) -> transformers.Qwen2Config:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.Qwen2Config(**{**base, "vocab_size": VOCAB, **kw})


def mistral_config(**kw) -> transformers.MistralConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.MistralConfig(**{**base, "vocab_size": VOCAB, **kw})


def mixtral_config(**kw) -> transformers.MixtralConfig:
    """Four experts, two per token."""
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    return transformers.MixtralConfig(
        **{**base, "vocab_size": VOCAB, "num_local_experts": 4, "num_experts_per_tok": 2, **kw}
    )


def gemma_config(**kw) -> transformers.GemmaConfig:
    """Gemma's RMSNorms multiply by ``1 + weight``."""
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.GemmaConfig(**{**base, "vocab_size": VOCAB, "head_dim": 8, **kw})


def gemma2_config(**kw) -> transformers.Gemma2Config:
    """Gemma's gains, and a normalisation before and after the attention and the MLP (sandwich norms)."""
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return transformers.Gemma2Config(**{**base, "vocab_size": VOCAB, "head_dim": 8, **kw})


def gpt2_config(**kw) -> transformers.GPT2Config:
    return transformers.GPT2Config(**{**dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB), **kw})


def bert_config(**kw) -> transformers.BertConfig:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return transformers.BertConfig(**{**base, "vocab_size": VOCAB, "max_position_embeddings": 64, **kw})


def vit_config(**kw) -> transformers.ViTConfig:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return transformers.ViTConfig(**{**base, "image_size": 16, "patch_size": 4, "num_channels": 3, **kw})


def whisper_config(**kw) -> transformers.WhisperConfig:
    """Input features ``(B, 8, 32)``: 8 mel bins, 32 frames (two per encoder position)."""
    base = dict(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=32,
        decoder_start_token_id=1,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    return transformers.WhisperConfig(**{**base, "vocab_size": VOCAB, **kw})
