"""Post-training quantization benchmark.

1. Accuracy table on the built-in tasks (digits, mnist1d): method x setting -> top-1 (%).
2. Seconds for AdaRound and BRECQ on torchvision's resnet18 (random init, quantize_model
   swap, 256 calibration images of 3x112x112, ``--iters`` iterations per unit; the
   issue's reference is 1000). With fewer iterations the time for 1000 is extrapolated
   from the measured per-iteration cost and labelled as such.

Usage::

    python benchmarks/ptq.py --table            # accuracy table (~1-2 min on one core)
    python benchmarks/ptq.py --table --seeds 3 --float-seeds 3  # means over 3 float models x 3 seeds (as the tests)
    python benchmarks/ptq.py --table --first-last-bits 8 --float-output  # the BRECQ / QDrop protocol
    python benchmarks/ptq.py --resnet --iters 50
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import torchquant as tq
from torchquant.bench.ptq import NEAREST, imbalance_channels, run_method, train_float
from torchquant.bench.train import evaluate
from torchquant.ptq import get_ptq_algorithm

SETTINGS = {
    "digits_cnn": [(4, 8, ["nearest", "adaround"]), (4, 4, ["nearest", "adaround", "brecq", "qdrop"])],
    "mnist1d_cnn": [(4, 8, ["nearest", "adaround"]), (4, 4, ["nearest", "adaround", "brecq", "qdrop"])],
    "digits_mobilenet": [(8, 8, ["nearest", "cle", "bc", "cle+bc"]), (4, 8, ["nearest", "cle+bc", "adaround"])],
}


def _seeded(method: str) -> bool:
    """Whether ``method`` draws random numbers (its algorithms take a seed), so it is averaged over seeds."""
    return method != NEAREST and any("seed" in get_ptq_algorithm(m).options for m in method.split("+"))


def table(
    iters: int,
    seeds: int = 1,
    first_last_bits: int | None = None,
    float_output: bool = False,
    float_seeds: int = 1,
) -> None:
    """Print method x setting -> top-1, each the mean over ``float_seeds`` float models (and, for
    the reconstruction methods, ``seeds`` reconstruction seeds per float model)."""
    protocol = dict(first_last_bits=first_last_bits, quantize_output=not float_output)
    rows = []
    for task, cfgs in SETTINGS.items():
        models = []
        t0 = time.perf_counter()
        for fs in range(float_seeds):
            model, tr, te = train_float(task, seed=fs)
            if task == "digits_mobilenet":
                imbalance_channels(model)
            models.append(model)
        fp = [evaluate(m, te) for m in models]
        rows.append((task, "fp32", "float", sum(fp) / len(fp), (time.perf_counter() - t0) / float_seeds))
        for w, a, methods in cfgs:
            for m in methods:
                t0 = time.perf_counter()
                n = seeds if _seeded(m) else 1
                accs = [
                    run_method(model, tr, te, m, w, a, iters=iters, seed=s, **protocol)
                    for model in models
                    for s in range(n)
                ]
                acc = sum(accs) / len(accs)
                rows.append((task, f"W{w}A{a}", m, acc, (time.perf_counter() - t0) / len(accs)))
                each = f"  runs: {' '.join(f'{x:.2f}' for x in accs)}" if len(accs) > 1 else ""
                print(f"{task:18s} W{w}A{a}  {m:9s} {acc:6.2f}  ({rows[-1][4]:.1f} s per run){each}", flush=True)
    mean = f"float models of seeds 0..{float_seeds - 1}" if float_seeds > 1 else "float model of seed 0"
    if seeds > 1:
        mean += f", reconstruction seeds 0..{seeds - 1} each"
    head = f", first and last layer at {first_last_bits} bits" if first_last_bits is not None else ""
    out = ", network output not quantized" if float_output else ""
    print(
        f"\nper-tensor weights and activations, BatchNorm folded{head}{out}, {iters} iterations per unit; "
        f"mean over {mean}"
    )
    print("| task | setting | method | top-1 (%) | seconds per run |\n|---|---|---|---|---|")
    for task, setting, m, acc, sec in rows:
        print(f"| {task} | {setting} | {m} | {acc:.2f} | {sec:.1f} |")


def resnet(iters: int, n_images: int = 256, size: int = 112) -> None:
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover
        raise SystemExit("benchmarks/ptq.py --resnet needs torchvision: pip install torchquant[vision]") from e
    torch.manual_seed(0)
    calib = list(torch.randn(n_images, 3, size, size).split(32))

    def build() -> nn.Module:
        torch.manual_seed(0)
        q = tq.quantize_model(
            torchvision.models.resnet18(num_classes=1000).eval(),
            lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax()),
            lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()),
            method="swap",
        )
        return tq.calibrate(q, calib, progress=False)

    for method in ("adaround", "brecq"):
        fn = get_ptq_algorithm(method)
        q = build()
        t0 = time.perf_counter()
        fn(q, calib, iters=1, batch_size=32, progress=False)
        overhead = time.perf_counter() - t0  # input capture and setup, with 1 iteration per unit
        q = build()
        t0 = time.perf_counter()
        losses = fn(q, calib, iters=iters, batch_size=32, progress=False)
        sec = time.perf_counter() - t0
        per_iter = (sec - overhead) / max(iters - 1, 1)
        label = "measured" if iters == 1000 else f"EXTRAPOLATED from {iters} iterations/unit"
        est = f"{overhead + per_iter * 999:.0f} s ({label})" if per_iter > 0 else "not separable (machine load varied)"
        print(
            f"resnet18 {method}: {len(losses)} units, {iters} it/unit: {sec:.1f} s measured "
            f"(with 1 it/unit: {overhead:.1f} s); 1000 it/unit: {est}; threads={torch.get_num_threads()}",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", action="store_true", help="accuracy table on digits / mnist1d")
    p.add_argument("--resnet", action="store_true", help="seconds for AdaRound / BRECQ on resnet18")
    p.add_argument("--iters", type=int, default=None, help="iterations per unit (table: 100, resnet: 1000)")
    p.add_argument("--seeds", type=int, default=1, help="table: reconstruction seeds to average over")
    p.add_argument("--float-seeds", type=int, default=1, help="table: float models (training seeds) to average over")
    p.add_argument(
        "--first-last-bits", type=int, default=None, help="table: bits of the first and last layers (papers: 8)"
    )
    p.add_argument("--float-output", action="store_true", help="table: leave the network output unquantized")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.float_seeds < 1:
        p.error(f"--float-seeds must be >= 1, got {args.float_seeds}")
    torch.set_num_threads(args.threads)
    if not (args.table or args.resnet):
        args.table = True
    if args.table:
        table(args.iters or 100, args.seeds, args.first_last_bits, args.float_output, args.float_seeds)
    if args.resnet:
        resnet(args.iters or 1000)


if __name__ == "__main__":
    main()
