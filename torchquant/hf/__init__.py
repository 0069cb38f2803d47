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
    "TorchQuantConfig",
    "TorchQuantHfQuantizer",
    "attention_modules",
    "expand_spec",
    "kv_quantizers",
    "quantize",
    "quantize_attention",
    "torchquant_attention_forward",
]
