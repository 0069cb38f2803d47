"""Quantization-aware training on scikit-learn's digits with the core API.

Trains a small CNN in float32, then fine-tunes copies of it with 8-bit and
4-bit quantization-aware training (per-channel weights, per-tensor
activations) and prints an accuracy table. Runs in well under a minute on two
CPU cores; no download.

    python examples/digits_qat.py
"""

from __future__ import annotations

import time

import torch
from torch import nn

from torchquant import (
    AffineQuantizer,
    BatchMinMax,
    ExpAvgMinMax,
    QModuleState,
    QWrapper,
    qmodule_state,
    set_qmodule_state,
)
from torchquant.bench.data import digits
from torchquant.bench.train import evaluate as accuracy
from torchquant.bench.train import train


def qwrap(layers, w_bits: int, a_bits: int | None) -> QWrapper:
    return QWrapper(
        layers,
        weight_quantizer=AffineQuantizer(w_bits, BatchMinMax(axis=0), symmetric=True),
        acts_quantizer=None if a_bits is None else AffineQuantizer(a_bits, ExpAvgMinMax()),
    )


def build(w_bits: int = 8, a_bits: int = 8) -> nn.Sequential:
    """A small CNN whose every layer is a QWrapper (bypassed until a mode is set)."""
    return nn.Sequential(
        qwrap([nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()], w_bits, a_bits),
        qwrap([nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU()], w_bits, a_bits),
        qwrap([nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()], w_bits, a_bits),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        qwrap(nn.Linear(32, 10), w_bits, None),
    )


def float_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s layer and BatchNorm tensors, without its quantizers' state (their bit-widths differ)."""
    return {k: v for k, v in model.state_dict().items() if "_quantizer." not in k and not k.endswith("_extra_state")}


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    train_set, test_set = digits()
    t0 = time.time()
    fp = build()
    train(fp, train_set, epochs=15, lr=0.05)
    rows = [("float32", "-", accuracy(fp, test_set))]
    for w_bits, a_bits in ((8, 8), (4, 4)):
        model = build(w_bits, a_bits)
        model.load_state_dict(float_weights(fp), strict=False)  # float weights; quantizers start empty
        with qmodule_state(model, QModuleState.CALIBRATION):
            model.eval()(train_set[0][:512])  # initial ranges, forward unchanged
        set_qmodule_state(model, QModuleState.QUANT_EVAL)
        ptq = accuracy(model, test_set)
        set_qmodule_state(model, QModuleState.QUANT_AWARE_TRAIN)
        train(model, train_set, epochs=5, lr=0.01)
        set_qmodule_state(model, QModuleState.QUANT_EVAL)
        rows.append((f"W{w_bits}A{a_bits} PTQ (no training)", f"{w_bits}/{a_bits}", ptq))
        rows.append((f"W{w_bits}A{a_bits} QAT (5 epochs)", f"{w_bits}/{a_bits}", accuracy(model, test_set)))
    print(f"\ntorchquant demo: scikit-learn digits, small CNN ({time.time() - t0:.0f}s)\n")
    print(f"{'model':<28} {'w/a bits':>8} {'test acc %':>11}")
    for name, bits, acc in rows:
        print(f"{name:<28} {bits:>8} {acc:>11.2f}")


if __name__ == "__main__":
    main()
