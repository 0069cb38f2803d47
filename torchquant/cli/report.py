"""Results of ``torchquant bench``: terminal table, CSV, JSON (with the environment) and a PNG plot."""

from __future__ import annotations

import csv
import json
import platform
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["Row", "environment", "format_table", "plot", "write_csv", "write_json"]


@dataclass
class Row:
    """One cell of the grid (or the float baseline, whose ``recipe`` is ``"float32"``).

    Attributes:
        recipe: recipe name.
        bits: bit setting (``"w4a8"``), ``"-"`` for the float baseline.
        granularity: how weights were quantized.
        accuracy: test accuracy in percent, ``None`` when skipped.
        delta: ``accuracy`` minus the float accuracy, in points.
        seconds: wall time of the cell.
        status: ``"ok"``, ``"skipped"`` (the recipe does not apply to the bit setting)
            or ``"failed"`` (the recipe raised an error while it ran).
        note: how the model was obtained, why the cell was skipped, or the error.
    """

    recipe: str
    bits: str
    granularity: str
    accuracy: float | None
    delta: float | None
    seconds: float
    status: str = "ok"
    note: str = ""


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _note(r: Row) -> str:
    first = r.note.split("\n", 1)[0]
    return f"FAILED: {first}" if r.status == "failed" else first


def format_table(rows: list[Row], title: str = "") -> str:
    """A plain-text table: recipe, bits, granularity, accuracy, delta vs float, seconds, note."""
    header = ["recipe", "bits", "weights", "acc %", "vs float", "time s", "note"]
    body = [
        [r.recipe, r.bits, r.granularity, _fmt(r.accuracy), _fmt(r.delta, True), f"{r.seconds:.1f}", _note(r)]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header[:-1])]
    right = {3, 4, 5}

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out) + ("  " + cells[-1] if cells[-1] else "")

    lines = ([title] if title else []) + [line(header), line(["-" * w for w in widths] + [""])]
    lines += [line(b) for b in body]
    return "\n".join(line.rstrip() for line in lines)


def write_csv(rows: list[Row], path: Path) -> None:
    """Write ``rows`` as CSV with a header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(argv: list[str], **extra: Any) -> dict[str, Any]:
    """Versions, platform and command line, plus ``extra`` (seed, world size, ...)."""
    import torch

    from .. import __version__

    versions = {"torchquant": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    for dist in ("numpy", "scikit-learn", "mnist1d", "torchvision", "timm"):
        v = _version(dist)
        if v is not None:
            versions[dist] = v
    return {
        "command": " ".join(argv),
        "versions": versions,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        **extra,
    }


def write_json(rows: list[Row], path: Path, env: dict[str, Any], config: dict[str, Any]) -> None:
    """Write ``{"environment", "config", "results"}`` as indented JSON."""
    doc = {"environment": env, "config": config, "results": [asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def plot(rows: list[Row], path: Path, title: str) -> Path:
    """Accuracy against bit setting, one line per recipe, the float accuracy dashed.

    Bit settings are placed in the order of the grid; needs matplotlib (``bench`` extra).

    Returns:
        ``path``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - optional
        raise ImportError("the plot needs matplotlib: pip install torchquant[bench] (or pass --no-plot)") from e
    bits = list(dict.fromkeys(r.bits for r in rows if r.recipe != "float32"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for recipe in dict.fromkeys(r.recipe for r in rows if r.recipe != "float32"):
        pts = [(bits.index(r.bits), r.accuracy) for r in rows if r.recipe == recipe and r.accuracy is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=recipe)
    for r in rows:
        if r.recipe == "float32" and r.accuracy is not None:
            ax.axhline(r.accuracy, color="k", linestyle="--", linewidth=1, label=f"float32 ({r.accuracy:.2f})")
    ax.set_xticks(range(len(bits)), bits)
    ax.set_xlabel("bit setting (weights / activations)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
