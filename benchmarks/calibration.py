"""Calibration cost of the range observers: resnet18, 20 batches, each observer against min/max.

Builds torchvision's resnet18 (random init, eval mode), quantizes it with
``tq.quantize_model`` (8-bit symmetric per-channel weights with ``BatchMinMax``,
8-bit activations at every conv output and residual add with the observer under
test) and times a calibration pass: ``--batches`` batches of random
``(16, 3, 112, 112)`` inputs in ``QModuleState.CALIBRATION`` under
``torch.no_grad()``, then one ``get_ranges()`` per observer, which is where
the histogram observers run their search. ``torch.set_num_threads(2)``, eager.

Each observer is timed ``--rounds`` times, interleaved with the others, and the
median is compared with the median of the min/max pass (``RunningMinMax``) of
this same run. Target (issue 4): every observer <= 1.3x min/max.

    python benchmarks/calibration.py [--batches 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import torchquant as tq

OBSERVERS: dict[str, Callable[[], tq.RangeObserver]] = {
    "minmax (RunningMinMax)": lambda: tq.RunningMinMax(),
    "moving_avg_minmax (ExpAvgMinMax)": lambda: tq.ExpAvgMinMax(0.9),
    "percentile 99.99": lambda: tq.PercentileObserver(99.99),
    "mse 8-bit": lambda: tq.MSEObserver(8),
    "entropy 8-bit (KL)": lambda: tq.EntropyObserver(8),
}
TARGET = 1.3


def build(float_model: nn.Module, make_observer: Callable[[], tq.RangeObserver]) -> nn.Module:
    def weights(module: nn.Module, name: str) -> tq.Quantizer:
        return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)

    def acts(module: nn.Module, name: str) -> tq.Quantizer:
        return tq.AffineQuantizer(8, make_observer())

    return tq.quantize_model(copy.deepcopy(float_model), weights, acts)


def calibrate_seconds(model: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one calibration pass."""
    observers = [m for m in model.modules() if isinstance(m, tq.RangeObserver)]
    tq.set_qmodule_state(model, tq.QModuleState.CALIBRATION)
    t, c = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for x in batches:
            model(x)
        for o in observers:  # the lazy range search is part of the calibration cost
            o.get_ranges()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        import torchvision
    except ImportError as e:
        raise ImportError("benchmarks/calibration.py needs torchvision: pip install torchquant[vision]") from e
    if not hasattr(tq, "quantize_model"):
        raise RuntimeError("benchmarks/calibration.py needs tq.quantize_model (the model conversion)")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    float_model = torchvision.models.resnet18().eval()
    batches = [torch.randn(16, 3, 112, 112) for _ in range(args.batches)]
    models = {name: build(float_model, make) for name, make in OBSERVERS.items()}
    n_act = sum(isinstance(m, tq.RangeObserver) for m in models["minmax (RunningMinMax)"].modules()) - sum(
        isinstance(m, tq.QWrapper) and m.weight_quantizer is not None
        for m in models["minmax (RunningMinMax)"].modules()
    )
    with torch.no_grad():
        float_model(batches[0])  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in OBSERVERS}
    cpu: dict[str, list[float]] = {name: [] for name in OBSERVERS}
    names = list(OBSERVERS)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order each round
            model = copy.deepcopy(models[name])  # fresh, unobserved
            w, c = calibrate_seconds(model, batches)
            wall[name].append(w)
            cpu[name].append(c)
    base_w = statistics.median(wall["minmax (RunningMinMax)"])
    base_c = statistics.median(cpu["minmax (RunningMinMax)"])
    print(
        f"resnet18, {args.batches} batches of (16, 3, 112, 112), {n_act} activation observers, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} rounds"
    )
    print("wall: wall-clock seconds; cpu: this process's CPU seconds (steadier on a shared machine)")
    print(f"{'activation observer':34s} {'wall s':>7s} {'x min/max':>9s} {'cpu s':>7s} {'x min/max':>9s}  <= {TARGET}x")
    for name in OBSERVERS:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        verdict = "" if name.startswith("minmax") else ("ok" if w / base_w <= TARGET else "OVER")
        print(f"{name:34s} {w:7.2f} {w / base_w:9.2f} {c:7.2f} {c / base_c:9.2f}  {verdict}")


if __name__ == "__main__":
    main()
