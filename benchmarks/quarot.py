"""QuaRot on SmolLM2-135M: W4A4 perplexity with and without the rotation, offline.

The model (``torchquant.bench.lm.load_smollm2``: the GGUF file's weights dequantized to
float32) and the text (``default_texts``: Python's ``pydoc_data/topics.py``, disjoint
calibration and evaluation documents) ship as packages. Each row converts a copy of the
float model with ``torchquant.hf.quantize``: every decoder ``Linear`` gets 4-bit
symmetric round-to-nearest weights (per output channel, or per group of 64 inputs) from
the weights themselves (or float weights), and 4-bit or 8-bit per-token dynamic input
activations (``"int4-dynamic"``, ``"int8-dynamic"``); ``lm_head`` and the embedding stay
float. The "quarot" rows run :func:`torchquant.ptq.quarot` (seed 0, online Hadamard before
``down_proj``, head-dimension rotation of values) before the weights are observed; the
"GPTQ" rows round the weights with :func:`torchquant.ptq.gptq` on the ``--calib``
calibration windows instead of to nearest.
Perplexity: ``--windows`` non-overlapping windows of ``--seq-len`` tokens of the
evaluation text.

Run: ``python benchmarks/quarot.py [--windows 4] [--seq-len 512] [--calib 1] [--rows 0 5 6]``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import torchquant as tq
import torchquant.hf as tqh
from torchquant.bench.lm import calibration_batches, default_texts, load_smollm2, perplexity

ROWS = [
    ("float", None, None, False, False),
    ("W4 per-channel, A4 per-token", "int4", "int4-dynamic", False, False),
    ("W4 per-channel, A4 per-token + quarot", "int4", "int4-dynamic", True, False),
    ("W4 g64, A4 per-token", "int4-g64", "int4-dynamic", False, False),
    ("W4 g64, A4 per-token + quarot", "int4-g64", "int4-dynamic", True, False),
    ("W16 (float), A4 per-token", None, "int4-dynamic", False, False),
    ("W16 (float), A4 per-token + quarot", None, "int4-dynamic", True, False),
    ("W4 g64, A8 per-token", "int4-g64", "int8-dynamic", False, False),
    ("W4 g64, A8 per-token + quarot", "int4-g64", "int8-dynamic", True, False),
    ("W4 per-channel, A16 (float)", "int4", None, False, False),
    ("W4 per-channel, A16 (float) + quarot", "int4", None, True, False),
    ("W4 g64, A16 (float)", "int4-g64", None, False, False),
    ("W4 g64, A16 (float) + quarot", "int4-g64", None, True, False),
    ("W4 g64 GPTQ, A4 per-token", "int4-g64", "int4-dynamic", False, True),
    ("W4 g64 GPTQ, A4 per-token + quarot", "int4-g64", "int4-dynamic", True, True),
    ("W4 g64 GPTQ, A16 (float)", "int4-g64", None, False, True),
    ("W4 g64 GPTQ, A16 (float) + quarot", "int4-g64", None, True, True),
]
"""(label, weights, activations, quarot, gptq): TorchQuantConfig short forms (None: float), then
whether QuaRot runs before calibration and GPTQ after it."""


def quantized(
    model: nn.Module, weights: str | None, activations: str | None, rotate: bool, gptq: bool, calib: list
) -> nn.Module:
    """A copy of ``model`` quantized as one row says, in ``QUANT_EVAL`` (the float copy for the float row)."""
    q = copy.deepcopy(model)
    if weights is None and activations is None:
        return q
    tqh.quantize(q, tqh.TorchQuantConfig(weights=weights, activations=activations), initial_state=False)
    if rotate:
        res = tq.ptq.quarot(q, calib)
        print(f"<!-- quarot: float logits changed by {res.max_error:.2e} (relative) -->")
    tq.calibrate(q, calib, progress=False)  # weight ranges; the activations are dynamic
    if gptq:
        tq.ptq.gptq(q, calib, progress=False)  # layer inputs as quantized inference sees them
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    return q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib", type=int, default=1, help="calibration windows (QuaRot's check uses the first)")
    parser.add_argument("--rows", type=int, nargs="*", help="indices of ROWS to run (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    calib_text, eval_text = default_texts()
    calib = calibration_batches(tokenizer, calib_text, args.calib, args.seq_len)
    print(f"| SmolLM2-135M, {args.windows} x {args.seq_len} tokens | perplexity | seconds |")
    print("|---|---|---|")
    for i, (label, weights, activations, rotate, gptq) in enumerate(ROWS):
        if args.rows and i not in args.rows:
            continue
        start = time.perf_counter()
        q = quantized(model, weights, activations, rotate, gptq, calib)
        ppl = perplexity(q, tokenizer, eval_text, seq_len=args.seq_len, max_windows=args.windows, progress=False)
        print(f"| {label} | {ppl:.2f} | {time.perf_counter() - start:.0f} |", flush=True)
        del q


if __name__ == "__main__":
    main()
