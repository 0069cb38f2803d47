"""Debugging a 4-bit DigitsCNN: SQNR, sensitivity, range plot and mixed precision.

Trains DigitsCNN on scikit-learn's digits for two epochs (CPU, seconds), quantizes it
harshly (4-bit per-tensor weights and activations), and runs every tq.debug tool. The
range plot in docs/debug.md comes from this script:

    python examples/debug_digits.py [--png docs/img/debug_ranges.png]
"""

from __future__ import annotations

import argparse

import torch

import torchquant as tq
from torchquant.bench.data import digits
from torchquant.bench.models import DigitsCNN
from torchquant.bench.train import evaluate, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", default="debug_ranges.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_split, test_split = digits()
    net = train(DigitsCNN(), train_split, epochs=2).eval()
    print(f"float accuracy: {evaluate(net, test_split):.1f}%")
    qnet = tq.quantize_model(
        net,
        lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax()),
        lambda m, n: tq.AffineQuantizer(4, tq.RunningMinMax()),
        method="swap",
    )
    calib = train_split[0][:256]
    with torch.no_grad(), tq.qmodule_state(qnet, tq.QModuleState.CALIBRATION):
        qnet(calib)
    tq.set_qmodule_state(qnet, tq.QModuleState.QUANT_EVAL)
    print(f"w4a4 per-tensor accuracy: {evaluate(qnet, test_split):.1f}%\n")
    print(tq.debug.sqnr_report(qnet, calib), "\n")

    def accuracy(model, batches):
        return evaluate(model, batches[0])

    print("accuracy (%) with only / all but each layer quantized:")
    print(tq.debug.sensitivity(qnet, [test_split], accuracy), "\n")
    tq.debug.plot_ranges(qnet, args.png, calib, max_points=8, bins=60)
    print(f"range plot: {args.png}\n")
    plan = tq.debug.mixed_precision(qnet, calib, accuracy_metric(test_split), budget=5.0, bits=(8, 4))
    print("mixed precision, at most 5 bits per weight on average:")
    print(plan)
    for row in plan.rows:
        qnet.get_submodule(row["layer"]).weight_quantizer.n_bits = row["bits"]
    print(f"mixed-precision accuracy: {evaluate(qnet, test_split):.1f}%")


def accuracy_metric(split):
    def metric(model, batches):
        return evaluate(model, split)

    return metric


if __name__ == "__main__":
    main()
