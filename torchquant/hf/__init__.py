"""Hugging Face transformers integration (extra ``[hf]``).

Importing this package registers the ``"torchquant"`` quantization method with
transformers, so that::

    import torchquant.hf
    from torchquant.hf import TorchQuantConfig

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=TorchQuantConfig(weights="int4-g128"))
    model.save_pretrained(out)                      # quantizer state, config and packed weights
    model = AutoModelForCausalLM.from_pretrained(out)  # the same quantized model, no calibration

* :mod:`torchquant.hf.config`: :class:`TorchQuantConfig` and its short forms;
* :mod:`torchquant.hf.quantizer`: :func:`quantize` (the conversion) and the ``HfQuantizer``;
* :mod:`torchquant.hf.attention`: quantized attention inputs, probabilities and KV cache
  through transformers' attention-function interface (:func:`quantize_attention`,
  :func:`kv_quantizers`).
* :mod:`torchquant.hf.trainer`: :class:`QuantizationCallback` (QAT under ``transformers.Trainer``)
  and :func:`quantizer_parameter_names`;
* :mod:`torchquant.hf.lora`: :func:`lora_config` (peft LoRA on a quantized base; needs peft).

The last two are imported on first use, so ``import torchquant.hf`` loads neither
the ``Trainer`` machinery nor peft.

``import torchquant`` never imports this package (nor transformers).
"""

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("torchquant.hf needs transformers: pip install 'torchquant[hf]'") from e

from .attention import (
    ATTN_IMPLEMENTATION,
    QAttention,
    attention_modules,
    kv_quantizers,
    quantize_attention,
    torchquant_attention_forward,
)
from .config import FIELDS, TorchQuantConfig, expand_spec
from .quantizer import TorchQuantHfQuantizer, quantize

__all__ = [
    "ATTN_IMPLEMENTATION",
    "FIELDS",
    "QAttention",
    "QWrapperLoraLayer",
    "QuantizationCallback",
    "TorchQuantConfig",
    "TorchQuantHfQuantizer",
    "attention_modules",
    "enable_lora",
    "expand_spec",
    "kv_quantizers",
    "lora_config",
    "quantize",
    "quantize_attention",
    "quantizer_parameter_names",
    "torchquant_attention_forward",
]

_LAZY = {
    "QuantizationCallback": "trainer",
    "quantizer_parameter_names": "trainer",
    "QWrapperLoraLayer": "lora",
    "enable_lora": "lora",
    "lora_config": "lora",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
