"""``torchquant bench``: a grid of recipes x bit settings on one model and dataset.

:func:`run_bench` does the work (the command line only parses arguments into a
:class:`BenchConfig`): it trains the float baseline once (or loads it from the
cache), runs every recipe at every bit setting on a copy of it, evaluates, and
writes ``results.csv``, ``results.json`` and ``accuracy_vs_bits.png``.

Before anything trains, every recipe x bit-setting cell builds its quantizers
once (:meth:`~torchquant.cli.recipes.Recipe.check_cell`); a cell that cannot is
a :class:`~torchquant.cli.recipes.RecipeError` naming the recipe file and line,
the recipe and the bit setting. A cell that fails later, while it runs, is
reported as ``failed`` with its error and the grid goes on.

Reproducibility: seeds are fixed (every cell starts from ``torch.manual_seed(seed)``),
``torch.use_deterministic_algorithms(True)`` is on and the number of threads is
fixed, so on CPU the same command gives the same numbers twice.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..bench.train import evaluate
from .defaults import DEFAULT_BITS, DEFAULT_DATASET, DEFAULT_RECIPES, FLOAT_TRAINING
from .engine import BenchData, Runtime, init_runtime, train
from .recipes import (
    RECIPES,
    Bits,
    CellSkipped,
    Recipe,
    RecipeError,
    RecipeUnavailable,
    Settings,
    error_text,
    get_recipe,
    import_modules,
    load_recipe_file,
)
from .report import Row, environment, format_table, plot, write_csv, write_json
from .tasks import BUILTIN_DATASETS, DEFAULT_MODELS, build_data, build_model, load_checkpoint

__all__ = [
    "BenchConfig",
    "BenchResult",
    "check_grid",
    "default_cache_dir",
    "default_threads",
    "resolve_recipes",
    "run_bench",
]

# Test-set batch size; fixed because float results are bit-reproducible only for one batch size.
EVAL_BATCH = 256


def default_cache_dir() -> Path:
    """``$TORCHQUANT_CACHE``, else ``$XDG_CACHE_HOME/torchquant``, else ``~/.cache/torchquant``."""
    if os.environ.get("TORCHQUANT_CACHE"):
        return Path(os.environ["TORCHQUANT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torchquant"


@dataclass
class BenchConfig:
    """Everything ``torchquant bench`` takes (the command line's options, same names).

    ``epochs`` and ``lr`` of the float baseline default to the dataset's entry in
    :data:`~torchquant.cli.defaults.FLOAT_TRAINING`, or to 0 epochs with a
    ``checkpoint``.
    """

    dataset: str = DEFAULT_DATASET
    data_dir: str | None = None
    model: str | None = None
    checkpoint: str | None = None
    recipes: list[str] = field(default_factory=lambda: list(DEFAULT_RECIPES))
    bits: list[str] = field(default_factory=lambda: list(DEFAULT_BITS))
    granularity: str = "channel"
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 64
    qat_epochs: int = 3
    qat_lr: float = 0.01
    calib_batches: int = 8
    calib_batch_size: int = 64
    first_last_bits: int | None = 8
    convert: str = "fx"
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    cache_dir: str | None = None
    no_cache: bool = False
    out: str = "runs/bench"
    quiet: bool = False
    plot: bool = True
    workers: int = 0
    image_size: int = 224
    recipe_files: list[str] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)


@dataclass
class BenchResult:
    """What :func:`run_bench` returns: the rows and where the files are (``None`` off rank 0)."""

    rows: list[Row]
    out_dir: Path
    files: dict[str, Path]
    table: str

    @property
    def failed(self) -> list[Row]:
        """The cells that raised an error while they ran."""
        return [r for r in self.rows if r.status == "failed"]


def resolve_recipes(names: list[str], rt: Runtime | None = None) -> list[Recipe]:
    """Look up recipe names; ``"default"`` expands to the default list, ``"all"`` to every available recipe.

    Raises:
        KeyError: an unknown name (the message lists the valid ones).
        RecipeUnavailable: a recipe needs a method missing from this build.
    """
    out: list[Recipe] = []
    for name in names:
        if name == "default":
            out += [get_recipe(n) for n in DEFAULT_RECIPES]
        elif name == "all":
            for n in RECIPES.names():
                try:
                    get_recipe(n).check_available()
                    out.append(get_recipe(n))
                except RecipeUnavailable as e:
                    if rt is not None:
                        rt.log(f"skipping {n}: {e}")
        else:
            out.append(get_recipe(name))
    for recipe in out:
        recipe.check_available()
    return list({id(r): r for r in out}.values())


def check_grid(recipes: list[Recipe], bits: list[Bits], settings: Settings) -> None:
    """Check every recipe x bit-setting cell without a model or data (see ``Recipe.check_cell``).

    Raises:
        RecipeError: one or more cells cannot run; the message lists each error once with
            where the recipe was defined (file and line), its name and the bit settings.
    """
    errors: dict[tuple[str, str], list[str]] = {}
    for recipe in recipes:
        for b in bits:
            try:
                recipe.check_cell(b, settings)
            except CellSkipped:
                continue
            except Exception as e:
                source = getattr(recipe, "source", None)
                where = f"{source}: recipe {recipe.name!r}" if source else f"recipe {recipe.name!r}"
                errors.setdefault((where, error_text(e)), []).append(str(b))
    if errors:
        lines = [f"{where} at {', '.join(cells)}: {msg}" for (where, msg), cells in errors.items()]
        head = "a recipe cannot be built" if len(lines) == 1 else f"{len(lines)} recipe errors"
        raise RecipeError(f"{head} (nothing was trained):\n  " + "\n  ".join(lines))


def default_threads(dataset: str) -> int:
    """1 for the built-in datasets (their models are too small to gain from threads, and a busy
    machine makes several threads much slower), else the cores divided among local processes (at most 8)."""
    if dataset.lower() in BUILTIN_DATASETS:
        return 1
    return max(1, min(8, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def _setup_determinism(seed: int, threads: int, rt: Runtime) -> int:
    torch.set_num_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if rt.device.type == "cuda":
        torch.backends.cudnn.benchmark = False
    random.seed(seed)
    torch.manual_seed(seed)
    return threads


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _float_baseline(cfg: BenchConfig, model_name: str, data: BenchData, settings: Settings) -> tuple[nn.Module, str]:
    rt = settings.runtime
    epochs, lr = FLOAT_TRAINING.get(data.name, (None, 0.05))
    epochs = cfg.epochs if cfg.epochs is not None else (0 if cfg.checkpoint else epochs)
    lr = cfg.lr if cfg.lr is not None else lr
    if epochs is None:
        raise ValueError(f"dataset {data.name!r} has no default float training: pass --epochs (or --checkpoint)")
    torch.manual_seed(cfg.seed)
    model = build_model(model_name, data.num_classes)
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
    model.to(rt.device)
    if epochs == 0:
        return model, "checkpoint" if cfg.checkpoint else "untrained"
    key = {
        "model": model_name,
        "dataset": data.name,
        "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
        "image_size": cfg.image_size if cfg.data_dir else None,
        "seed": cfg.seed,
        "epochs": epochs,
        "lr": lr,
        "batch_size": cfg.batch_size,
        "weight_decay": settings.weight_decay,
        "checkpoint": _file_digest(cfg.checkpoint) if cfg.checkpoint else None,
        "world_size": rt.world_size,
        # float sums are reduced in another order on another thread count or device: other weights
        "threads": torch.get_num_threads(),
        "device": rt.device.type,
        "torchquant": __version__,
        "torch": torch.__version__.split("+")[0],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cfg.cache_dir or default_cache_dir()) / f"{data.name}-{model_name.replace(':', '_')}-{digest}.pt"
    cached = [not cfg.no_cache and path.is_file()]
    if rt.distributed:
        torch.distributed.broadcast_object_list(cached, 0)  # rank 0 decides for everyone
    if cached[0]:
        state = torch.load(path, map_location=rt.device, weights_only=True)
        model.load_state_dict(state["state_dict"], strict=True)
        rt.log(f"float baseline: loaded from cache {path}")
        return model, f"cached ({epochs} epochs)"
    rt.log(f"float baseline: training {model_name} on {data.name} for {epochs} epochs")
    float_settings = copy.copy(settings)
    float_settings.seed = cfg.seed
    train(model, data, float_settings, epochs=epochs, lr=lr, desc="float32 training")
    if rt.is_main and not cfg.no_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state_dict": model.state_dict(), "key": key}, tmp)
        os.replace(tmp, path)
    rt.barrier()
    return model, f"trained {epochs} epochs"


def run_bench(cfg: BenchConfig, argv: list[str] | None = None) -> BenchResult:
    """Run the grid described by ``cfg`` and write the results (on rank 0).

    Args:
        cfg: the configuration.
        argv: the command line, recorded in ``results.json``.

    Returns:
        The :class:`BenchResult`.

    Raises:
        KeyError: unknown recipe names (listing the valid ones).
        RecipeUnavailable: a requested recipe needs a method missing from this build.
        RecipeError: a recipe file is malformed, or a cell cannot build its quantizers
            (raised before anything trains; see :func:`check_grid`).
        ValueError: unknown dataset / model / bit setting / granularity.

    A cell that raises while it runs is a row with status ``"failed"`` and the error as
    its note (see :attr:`BenchResult.failed`); the other cells still run.
    """
    rt = init_runtime(cfg.device, cfg.quiet)
    threads = _setup_determinism(cfg.seed, cfg.threads or default_threads(cfg.dataset), rt)
    import_modules(cfg.imports)
    for f in cfg.recipe_files:
        load_recipe_file(f)
    recipes = resolve_recipes(cfg.recipes, rt)
    if not recipes:
        raise ValueError("no recipes to run; see `torchquant list`")
    bits = [Bits.parse(b) for b in cfg.bits]
    settings = Settings(
        granularity=cfg.granularity,
        calib_batches=cfg.calib_batches,
        calib_batch_size=cfg.calib_batch_size,
        qat_epochs=cfg.qat_epochs,
        qat_lr=cfg.qat_lr,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        first_last_bits=cfg.first_last_bits,
        convert=cfg.convert,
        progress=not cfg.quiet,
        runtime=rt,
    )
    check_grid(recipes, bits, settings)
    data = build_data(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, image_size=cfg.image_size, workers=cfg.workers)
    model_name = cfg.model or DEFAULT_MODELS.get(data.name)
    if model_name is None:
        raise ValueError(f"dataset {cfg.dataset!r} has no default model: pass --model (a torchvision or timm name)")
    t0 = time.perf_counter()
    float_model, how = _float_baseline(cfg, model_name, data, settings)
    float_acc = evaluate(float_model, data, EVAL_BATCH, runtime=rt)
    rows = [Row("float32", "-", "float", float_acc, 0.0, time.perf_counter() - t0, note=how)]
    rt.log(f"float32: {float_acc:.2f}%")
    for recipe in recipes:
        for b in bits:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            t = time.perf_counter()
            try:
                result = recipe(copy.deepcopy(float_model), b, data, settings)
                acc = evaluate(result.model, data, EVAL_BATCH, runtime=rt)
            except CellSkipped as e:
                rows.append(Row(recipe.name, str(b), "-", None, None, 0.0, "skipped", str(e)))
                rt.log(f"{recipe.name} {b}: skipped ({e})")
                continue
            except Exception as e:  # one broken cell must not lose the others' results
                rows.append(Row(recipe.name, str(b), "-", None, None, time.perf_counter() - t, "failed", error_text(e)))
                rt.log(f"{recipe.name} {b}: failed\n{''.join(traceback.format_exception(e)).rstrip()}")
                continue
            gran = result.info.get("granularity", f"per-{settings.granularity}")
            note = result.info.get("steps", "")
            rows.append(Row(recipe.name, str(b), gran, acc, acc - float_acc, time.perf_counter() - t, "ok", note))
            rt.log(f"{recipe.name} {b}: {acc:.2f}%")
    title = f"torchquant bench: {model_name} on {data.name} (seed {cfg.seed}, {rt.world_size} process(es))"
    table = format_table(rows, title)
    out_dir = Path(cfg.out)
    files: dict[str, Path] = {}
    if rt.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        env = environment(
            argv or [],
            seed=cfg.seed,
            world_size=rt.world_size,
            device=str(rt.device),
            threads_per_process=threads,
            total_seconds=round(time.perf_counter() - t0, 2),
        )
        config = {**asdict(cfg), "model": model_name, "recipes": [r.name for r in recipes]}
        files["csv"] = out_dir / "results.csv"
        files["json"] = out_dir / "results.json"
        write_csv(rows, files["csv"])
        write_json(rows, files["json"], env, config)
        if cfg.plot:
            files["plot"] = plot(rows, out_dir / "accuracy_vs_bits.png", title.removeprefix("torchquant bench: "))
        else:  # a plot of an earlier run would sit beside these results as if it were theirs
            (out_dir / "accuracy_vs_bits.png").unlink(missing_ok=True)
    rt.barrier()
    return BenchResult(rows, out_dir, files, table)
