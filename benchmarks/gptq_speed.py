"""GPTQ's wall time on SmolLM2-135M (whole model, W4 per group of 64, weight-only) and its perplexity.

Every decoder ``Linear`` gets 4-bit symmetric per-group-of-64 weights
(``TorchQuantConfig(weights="int4-g64")``, ``lm_head`` and the embedding float); the weight
ranges come from the weights, then :func:`torchquant.ptq.gptq` runs on ``--calib`` windows
of ``--seq-len`` tokens of the calibration text (consecutive, or overlapping evenly when the
text is too short for that many). Printed: the seconds GPTQ took, split into
phases (block runs that collect Hessians, block runs that compute the next block's inputs,
the per-layer column loop), and the perplexity on ``--windows`` non-overlapping windows of
the evaluation text (with ``--rtn``, round-to-nearest's too).

On a CPU shared with other processes, ``--threads 1`` can be several times faster than two
threads (each parallel operation waits for a thread that is not running).

Run: ``python benchmarks/gptq_speed.py [--calib 128] [--seq-len 512] [--windows 4] [--rtn] [--threads N]``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import importlib
import time

import torch

import torchquant as tq
import torchquant.hf as tqh
from torchquant.bench.lm import default_texts, load_smollm2, perplexity, token_ids

gptq_module = importlib.import_module("torchquant.ptq.gptq")  # the package exports the function gptq
sequential = importlib.import_module("torchquant.ptq.sequential")
PHASES: collections.Counter = collections.Counter()
_IN_HESSIANS = [False]


def _timed(phase, fn):
    """``fn`` adding its wall time to ``PHASES[phase]`` (``phase``: a name, or a function of no arguments giving it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[phase() if callable(phase) else phase] += time.perf_counter() - start

    return wrapper


def _flagged(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _IN_HESSIANS[0] = True
        try:
            return fn(*args, **kwargs)
        finally:
            _IN_HESSIANS[0] = False

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--rtn", action="store_true", help="also score round-to-nearest")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    calib_text, eval_text = default_texts()
    ids = token_ids(tokenizer, calib_text)  # 47k tokens on Python 3.11: 91 disjoint windows of 512
    stride = min(args.seq_len, (ids.numel() - args.seq_len) // max(args.calib - 1, 1))
    calib = [ids[i * stride : i * stride + args.seq_len][None] for i in range(args.calib)]  # (1, seq_len) each
    print(f"calibration: {args.calib} windows of {args.seq_len} tokens, one every {stride} tokens")
    q = copy.deepcopy(model)
    tqh.quantize(q, tqh.TorchQuantConfig(weights="int4-g64"), initial_state=False)
    tq.calibrate(q, calib[:1], mode=tq.QModuleState.CALIBRATION_WEIGHT_ONLY, progress=False)

    def score(m) -> float:
        with tq.qmodule_state(m, tq.QModuleState.QUANT_EVAL):
            return perplexity(m, tokenizer, eval_text, seq_len=512, max_windows=args.windows, progress=False)

    if args.rtn:
        print(f"round-to-nearest perplexity: {score(q):.2f}", flush=True)
    hessians, runs, column_loop = gptq_module._hessians, sequential.Block.run, gptq_module.gptq_quantize_weight
    gptq_module._hessians = _flagged(hessians)
    sequential.Block.run = _timed(
        lambda: "Hessian passes (block forward to the group, X^T X)" if _IN_HESSIANS[0] else "output passes",
        runs,
    )
    gptq_module.gptq_quantize_weight = _timed("gptq_quantize_weight (Cholesky, column loop)", column_loop)
    try:
        start = time.perf_counter()
        tq.ptq.gptq(q, calib, act_order=args.act_order)
        total = time.perf_counter() - start
    finally:
        gptq_module._hessians, sequential.Block.run, gptq_module.gptq_quantize_weight = hessians, runs, column_loop
    print(f"gptq on {args.calib} x {args.seq_len} tokens: {total:.1f} s ({torch.get_num_threads()} threads)")
    for phase, seconds in PHASES.most_common():
        print(f"  {phase}: {seconds:.1f} s")
    print(f"  the rest (capturing block 0's inputs, probing blocks, writing weights): {total - PHASES.total():.1f} s")
    print(f"GPTQ perplexity: {score(q):.2f}")


if __name__ == "__main__":
    main()
