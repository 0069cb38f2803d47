"""Federated learning on scikit-learn's digits with Flower: accuracy and uploaded bytes per update format.

Ten clients hold a non-IID split of the digits training set (for each class, the shares
of the clients are drawn from a Dirichlet distribution with ``alpha = 0.5``); each round
every client trains one local epoch of a small MLP (64-128-64-10) and sends its update,
in float32 or quantized to 8, 4 or 2 bits (symmetric, per row, nearest or stochastic
rounding), and the server averages them (``torchquant.integrations.flower``). The model
is either float32 or W8A8 QAT (8-bit per-channel weights, 8-bit activations with EMA
ranges merged across clients). The table gives the final accuracy and loss of the global
model on the held-out test set (360 images: one image is 0.28 points) and the bytes all
clients uploaded over the run (the arrays of every reply, exactly: codes, scales, zero
points, and for QAT the observer ranges), from the calibration round to the last round.
Everything is seeded: two runs print the same table. It runs in-process
(:func:`torchquant.integrations.flower.run_federation`): no Ray, no network.

    python benchmarks/flower.py [--rounds 30] [--clients 10] [--alpha 0.5] [--lr 0.1] [--quick] [--out runs/flower]

Writes ``results.csv`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import torchquant as tq
from torchquant.bench.data import digits
from torchquant.integrations import flower

# (model, update spec, rounding): the rows of the table.
ROWS = [
    ("float32", None, "nearest"),
    ("float32", "int8", "nearest"),
    ("float32", "int4", "nearest"),
    ("float32", "int4", "stochastic"),
    ("float32", "int2", "nearest"),
    ("float32", "int2", "stochastic"),
    ("w8a8-qat", None, "nearest"),
    ("w8a8-qat", "int8", "nearest"),
    ("w8a8-qat", "int4", "nearest"),
    ("w8a8-qat", "int2", "stochastic"),
]
QUICK_ROWS = [ROWS[0], ROWS[1], ROWS[5], ROWS[6], ROWS[7]]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def model_fn(kind: str):
    """``() -> model`` for ``kind`` ``"float32"`` or ``"w8a8-qat"``."""
    if kind == "float32":
        return mlp
    if kind == "w8a8-qat":
        return lambda: tq.quantize_model(
            mlp(),
            lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True),
            lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax()),
            method="swap",
        )
    raise ValueError(f"benchmarks/flower.py: unknown model kind {kind!r}; valid: 'float32', 'w8a8-qat'")


def dirichlet_split(y: torch.Tensor, clients: int, alpha: float, seed: int, min_size: int = 10) -> list[torch.Tensor]:
    """Indices of each client's examples: per class, shares ~ Dirichlet(alpha); redrawn until every
    client has ``min_size`` examples."""
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    while True:
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [torch.tensor(sorted(p)) for p in parts]


class Shuffled:
    """Re-iterable ``(x, y)`` batches in a new order each pass (torch's global generator, which
    the ClientApp seeds per client and round)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __iter__(self):
        for idx in torch.randperm(len(self.x)).split(self.batch_size):
            yield self.x[idx], self.y[idx]


@dataclass
class Result:
    model: str
    updates: str
    rounding: str
    accuracy: float
    loss: float
    vs_float_updates: float
    bytes_up: int
    bytes_ratio: float
    wire_bytes_up: int
    seconds: float


def run(rows, rounds: int, clients: int, alpha: float, seed: int = 0, lr: float = 0.1) -> list[Result]:
    (x_tr, y_tr), test = digits(seed=seed)
    parts = dirichlet_split(y_tr, clients, alpha, seed)
    test_batches = [(test[0][i : i + 256], test[1][i : i + 256]) for i in range(0, len(test[0]), 256)]

    def data_fn(partition: int, partitions: int):
        idx = parts[partition]
        return Shuffled(x_tr[idx], y_tr[idx], 32), []

    out: list[Result] = []
    reference: dict[str, tuple[float, int]] = {}
    for kind, update, rounding in rows:
        t0 = time.perf_counter()
        config = flower.FederatedConfig(update=update, rounding=rounding, lr=lr, local_epochs=1, seed=seed)
        fed = flower.run_federation(
            flower.server_app(model_fn(kind), config, num_rounds=rounds, test_data=test_batches, min_nodes=clients),
            flower.client_app(model_fn(kind), data_fn, config),
            num_clients=clients,
            log_level=logging.ERROR,  # FedAvg warns that federated evaluation is off: it is, on purpose
        )
        h = flower.history(fed)
        acc = 100 * h["accuracy"][-1]
        sent = int(sum(h["bytes-up"]) + sum(h.get("bytes-calibration", [])))
        if update is None:
            reference[kind] = (acc, sent)
        ref_acc, ref_bytes = reference.get(kind, (math.nan, math.nan))
        out.append(
            Result(
                kind,
                update or "float32",
                rounding if update else "-",
                round(acc, 2),
                round(h["loss"][-1], 4),
                round(acc - ref_acc, 2),
                sent,
                round(sent / ref_bytes, 4),
                fed.wire_bytes_up,
                round(time.perf_counter() - t0, 1),
            )
        )
    return out


def table(results: list[Result]) -> str:
    lines = [
        "| model | updates | rounding | accuracy % | test loss | vs float updates | bytes up | vs float | time s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        vs_acc = "-" if math.isnan(r.vs_float_updates) else f"{r.vs_float_updates:+.2f}"
        vs_bytes = "-" if math.isnan(r.bytes_ratio) else f"{r.bytes_ratio:.3f}"
        lines.append(
            f"| {r.model} | {r.updates} | {r.rounding} | {r.accuracy:.2f} | {r.loss:.4f} | {vs_acc} "
            f"| {r.bytes_up:,} | {vs_bytes} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the non-IID split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.1, help="clients' SGD learning rate (momentum 0.9)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the same numbers on any machine)")
    p.add_argument("--quick", action="store_true", help="2 rounds and 5 rows (a smoke test)")
    p.add_argument("--out", type=Path, default=Path("runs/flower"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, rounds = (QUICK_ROWS, 2) if args.quick else (ROWS, args.rounds)
    t0 = time.perf_counter()
    results = run(rows, rounds, args.clients, args.alpha, args.seed, args.lr)
    print(
        f"Flower, digits, {args.clients} clients, Dirichlet alpha {args.alpha}, {rounds} rounds x 1 local epoch "
        f"(SGD lr {args.lr}), MLP 64-128-64-10, seed {args.seed}"
    )
    print(table(results))
    print(f"total {time.perf_counter() - t0:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        w.writeheader()
        w.writerows(asdict(r) for r in results)
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()} for r in results]
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return results


if __name__ == "__main__":
    main()
