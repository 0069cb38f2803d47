"""Hugging Face transformers integration: quantized attention and KV cache (``pip install torchquant[hf]``).

``transformers`` is imported on first use, not by ``import torchquant.hf``.
"""

from .attention import (
    ATTN_IMPLEMENTATION,
    QAttention,
    attention_modules,
    kv_quantizers,
    quantize_attention,
    torchquant_attention_forward,
)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "QAttention",
    "attention_modules",
    "kv_quantizers",
    "quantize_attention",
    "torchquant_attention_forward",
]
