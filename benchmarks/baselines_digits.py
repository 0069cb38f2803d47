"""Research baselines on scikit-learn's digits: method x bit-width -> test accuracy.

One float32 CNN (BatchNorm, every layer a QWrapper) is trained once; each
method then fine-tunes a copy of it with quantization-aware training, same seed
and budget, and the table prints test accuracy in QUANT_EVAL. No download;
about a minute on two CPU cores.

    python benchmarks/baselines_digits.py [--qat-epochs 4] [--float-epochs 15]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from torch import nn

import torchquant as tq
from torchquant import QModuleState, QWrapper, qmodule_state, set_qmodule_state
from torchquant.bench.data import digits

Factory = Callable[[int], "tq.Quantizer | None"]


def build(weight: Factory | None = None, act: Factory | None = None, w_bits: int = 8, a_bits: int = 8) -> nn.Module:
    """A small CNN of QWrappers; ``weight(bits)`` / ``act(bits)`` make each layer's quantizers."""

    def wrap(layers, has_act: bool = True) -> QWrapper:
        return QWrapper(
            layers,
            weight_quantizer=weight(w_bits) if weight else None,
            acts_quantizer=act(a_bits) if act and has_act else None,
        )

    return nn.Sequential(
        wrap([nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]),
        wrap([nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU()]),
        wrap([nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        wrap(nn.Linear(32, 10), has_act=False),
    )


def train(model: nn.Module, data, epochs: int, lr: float, seed: int = 0, extra_loss=None) -> None:
    x, y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data
    return (model(x).argmax(1) == y).float().mean().item() * 100


def pretrain(data, epochs: int = 15, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    fp = build()
    train(fp, data, epochs=epochs, lr=0.05, seed=seed)
    return fp


def qat(
    fp: nn.Module,
    weight: Factory,
    act: Factory | None,
    w_bits: int,
    a_bits: int,
    data,
    epochs: int = 4,
    lr: float = 0.01,
    seed: int = 0,
) -> nn.Module:
    """Copy ``fp``'s weights into a quantized model, calibrate, fine-tune with QAT; returns it in QUANT_EVAL."""
    torch.manual_seed(seed)
    model = build(weight, act, w_bits, a_bits)
    missing, unexpected = model.load_state_dict(copy.deepcopy(fp.state_dict()), strict=False)
    assert not unexpected and all("quantizer" in k for k in missing), (missing, unexpected)
    with qmodule_state(model, QModuleState.CALIBRATION):
        model.eval()(data[0][:256])  # initial ranges / learned-parameter initialisation
    set_qmodule_state(model, QModuleState.QUANT_AWARE_TRAIN)
    train(model, data, epochs=epochs, lr=lr, seed=seed, extra_loss=tq.pact_regularization)
    set_qmodule_state(model, QModuleState.QUANT_EVAL)
    return model


# Method -> (weight factory, activation factory), each taking the bit-width.
METHODS: dict[str, tuple[Factory, Factory]] = {
    "affine": (
        lambda b: tq.AffineQuantizer(b, tq.BatchMinMax(axis=0), symmetric=True),
        lambda b: tq.AffineQuantizer(b, tq.ExpAvgMinMax()),
    ),
    "affine-pow2": (
        lambda b: tq.AffineQuantizer(b, tq.BatchMinMax(axis=0), symmetric=True, power_of_two=True),
        lambda b: tq.AffineQuantizer(b, tq.ExpAvgMinMax(), power_of_two=True),
    ),
    "lsq": (lambda b: tq.LSQQuantizer(b, signed=True, axis=0), lambda b: tq.LSQQuantizer(b, signed=False)),
    "lsq+": (
        lambda b: tq.LSQPlusQuantizer(b, signed=True, axis=0, init="std"),
        lambda b: tq.LSQPlusQuantizer(b, signed=False),
    ),
    "pact": (lambda b: tq.DoReFaWeightQuantizer(b), lambda b: tq.PACTQuantizer(b, alpha_init=4.0, reg_lambda=1e-4)),
    "dorefa": (lambda b: tq.DoReFaWeightQuantizer(b), lambda b: tq.DoReFaActQuantizer(b)),
    "bnn": (lambda b: tq.BinaryQuantizer(), lambda b: tq.AffineQuantizer(b, tq.ExpAvgMinMax())),
    "xnor": (lambda b: tq.XNORWeightQuantizer(axis=0), lambda b: tq.AffineQuantizer(b, tq.ExpAvgMinMax())),
    "twn": (lambda b: tq.TernaryQuantizer(axis=0), lambda b: tq.AffineQuantizer(b, tq.ExpAvgMinMax())),
    "fp8_e4m3": (
        lambda b: tq.MinifloatQuantizer("fp8_e4m3", tq.BatchMinMax(axis=0)),
        lambda b: tq.MinifloatQuantizer("fp8_e4m3", tq.ExpAvgMinMax()),
    ),
    "fp8_e5m2": (
        lambda b: tq.MinifloatQuantizer("fp8_e5m2", tq.BatchMinMax(axis=0)),
        lambda b: tq.MinifloatQuantizer("fp8_e5m2", tq.ExpAvgMinMax()),
    ),
    "fp4_e2m1": (
        lambda b: tq.MinifloatQuantizer("fp4_e2m1", tq.BatchMinMax(axis=0)),
        lambda b: tq.MinifloatQuantizer("fp4_e2m1", tq.ExpAvgMinMax()),
    ),
    "mxfp8_e4m3": (lambda b: tq.MXQuantizer("fp8_e4m3", axis=1), lambda b: tq.MXQuantizer("fp8_e4m3", axis=1)),
    "mxfp4": (lambda b: tq.MXQuantizer("fp4_e2m1", axis=1), lambda b: tq.MXQuantizer("fp4_e2m1", axis=1)),
    "mxint8": (lambda b: tq.MXQuantizer("int8", axis=1), lambda b: tq.MXQuantizer("int8", axis=1)),
}

# Method -> the (w_bits, a_bits) it is run at. Formats with a fixed width list only that width.
BITS: dict[str, list[tuple[int, int]]] = {
    "affine": [(8, 8), (4, 4), (2, 2)],
    "affine-pow2": [(8, 8), (4, 4)],
    "lsq": [(8, 8), (4, 4), (2, 2)],
    "lsq+": [(4, 4), (2, 2)],
    "pact": [(8, 8), (4, 4), (2, 2)],
    "dorefa": [(8, 8), (4, 4), (2, 2)],
    "bnn": [(1, 8)],
    "xnor": [(1, 8)],
    "twn": [(2, 8)],
    "fp8_e4m3": [(8, 8)],
    "fp8_e5m2": [(8, 8)],
    "fp4_e2m1": [(4, 4)],
    "mxfp8_e4m3": [(8, 8)],
    "mxfp4": [(4, 4)],
    "mxint8": [(8, 8)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float-epochs", type=int, default=15)
    parser.add_argument("--qat-epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_set, test_set = digits()
    t0 = time.time()
    fp = pretrain(train_set, epochs=args.float_epochs)
    print(f"float32 pretraining: {args.float_epochs} epochs, {time.time() - t0:.1f}s")
    columns = ["W8A8", "W4A4", "W2A2", "W2A8", "W1A8"]
    rows = {"float32": {c: f"{accuracy(fp, test_set):.2f}" for c in columns}}
    for name in args.methods:
        weight, act = METHODS[name]
        rows[name] = {}
        for w_bits, a_bits in BITS[name]:
            t1 = time.time()
            model = qat(fp, weight, act, w_bits, a_bits, train_set, epochs=args.qat_epochs)
            rows[name][f"W{w_bits}A{a_bits}"] = f"{accuracy(model, test_set):.2f}"
            print(f"  {name} W{w_bits}A{a_bits}: {rows[name][f'W{w_bits}A{a_bits}']} ({time.time() - t1:.1f}s)")
    print(f"\ndigits test accuracy (%), QAT {args.qat_epochs} epochs from one float32 model, seed 0")
    print(f"{'method':<12}" + "".join(f"{c:>8}" for c in columns))
    for name, r in rows.items():
        print(f"{name:<12}" + "".join(f"{r.get(c, '-'):>8}" for c in columns))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
