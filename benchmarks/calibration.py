"""Calibration cost of the range observers: resnet18, 20 batches, each observer against min/max.

Builds torchvision's resnet18 (random init, eval mode), quantizes it with
``tq.quantize_model`` (8-bit symmetric per-channel weights with ``BatchMinMax``,
8-bit activations at every conv output and residual add with the observer under
test) and times a calibration pass: ``--batches`` batches of random
``(16, 3, 112, 112)`` inputs in ``QModuleState.CALIBRATION`` under
``torch.no_grad()``, then one ``get_ranges()`` per observer, which is where
the histogram observers run their search. ``torch.set_num_threads(2)``, eager.

The passes of all observers are interleaved batch by batch (so that they share
the machine's load), repeated ``--rounds`` times with fresh observers, and each
observer's median is compared with the median of the min/max pass
(``RunningMinMax``) of this same run, in wall-clock and in process CPU time.
Target (issue 4): every observer <= 1.3x min/max.

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


def calibrate_interleaved(models: dict[str, nn.Module], batches: list[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Wall-clock and process CPU seconds of one calibration pass of each model.

    The passes are interleaved batch by batch (each batch runs through every model,
    in an order that rotates), so that all observers see the same machine load.
    """
    wall = dict.fromkeys(models, 0.0)
    cpu = dict.fromkeys(models, 0.0)
    names = list(models)
    for m in models.values():
        tq.set_qmodule_state(m, tq.QModuleState.CALIBRATION)
    with torch.no_grad():
        for i, x in enumerate(batches):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                t, c = time.perf_counter(), time.process_time()
                models[name](x)
                wall[name] += time.perf_counter() - t
                cpu[name] += time.process_time() - c
        for name, m in models.items():  # the lazy range search is part of the calibration cost
            t, c = time.perf_counter(), time.process_time()
            for o in m.modules():
                if isinstance(o, tq.RangeObserver):
                    o.get_ranges()
            wall[name] += time.perf_counter() - t
            cpu[name] += time.process_time() - c
    return {name: (wall[name], cpu[name]) for name in models}


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
    for _ in range(args.rounds):
        fresh = {name: copy.deepcopy(m) for name, m in models.items()}  # unobserved
        for name, (w, c) in calibrate_interleaved(fresh, batches).items():
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
