"""Post-training quantization recipes on the built-in tasks (used by the tests and ``benchmarks/ptq.py``).

* :func:`train_float`: a float model trained on digits or mnist1d, deterministic for the seed.
* :func:`imbalance_channels`: make a MobileNet-style model's depthwise channel ranges
  span orders of magnitude, as they do in ImageNet-trained MobileNetV2.
* :func:`run_method`: quantize a copy per-tensor, apply one PTQ method, return the test accuracy.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..convert import quantize_model
from ..ptq import adaround, bias_correction, brecq, calibrate, equalize, fold_qwrapper_batchnorm, qdrop
from ..qmodules import QModuleState, QWrapper, iter_qmodules
from ..quantizers import AffineQuantizer
from ..range_observers import BatchMinMax, RunningMinMax
from ..utils import set_qmodule_state
from . import data as bdata
from . import models as bmodels
from .train import evaluate, train

__all__ = ["METHODS", "TASKS", "imbalance_channels", "load_task_data", "quantized_copy", "run_method", "train_float"]

TASKS: dict[str, tuple[str, type[nn.Module], int]] = {
    # name: (dataset, model class, epochs)
    "digits_cnn": ("digits", bmodels.DigitsCNN, 15),
    "mnist1d_cnn": ("mnist1d", bmodels.MNIST1DCNN, 15),
    "digits_mobilenet": ("digits", bmodels.DigitsMobileNet, 15),
}

METHODS = ("nearest", "adaround", "brecq", "qdrop", "bc", "cle", "cle+bc")


def load_task_data(dataset: str):
    """``((x_train, y_train), (x_test, y_test))`` of ``"digits"`` or ``"mnist1d"`` (4000 samples)."""
    if dataset == "digits":
        return bdata.digits(seed=0)
    if dataset == "mnist1d":
        return bdata.mnist1d(seed=0, num_samples=4000)
    raise KeyError(f"unknown dataset {dataset!r}; valid: digits, mnist1d")


def train_float(task: str, seed: int = 0):
    """Train the float model of ``task`` (a key of :data:`TASKS`); returns ``(model, train_split, test_split)``."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    dataset, cls, epochs = TASKS[task]
    train_split, test_split = load_task_data(dataset)
    torch.manual_seed(seed)
    model = cls()
    train(model, train_split, epochs=epochs, seed=seed)
    return model.eval(), train_split, test_split


def imbalance_channels(model: nn.Module, decades: float = 3.0, seed: int = 0) -> nn.Module:
    """Spread the output ranges of every ``InvertedResidual``'s depthwise layer over ``decades`` decades.

    Channel ``i`` of the depthwise BatchNorm is divided by ``k_i = 10 ** U(0, decades)``
    and input channel ``i`` of the projection multiplied by ``k_i``. The float function is
    unchanged wherever the ReLU6 in between does not saturate (check the float accuracy),
    but per-tensor weight quantization after BatchNorm folding now crushes the small
    channels: the situation of ImageNet-trained MobileNetV2 (Nagel et al. 2019, Fig. 2),
    which a tiny model trained with weight decay on digits does not reach by itself.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, bmodels.InvertedResidual):
                bn = m.depthwise[1]
                k = 10 ** (torch.rand(bn.num_features, generator=g) * decades)
                bn.weight.div_(k)
                bn.bias.div_(k)
                m.project[0].weight.mul_(k.reshape(1, -1, 1, 1))
    return model


def quantized_copy(model: nn.Module, w_bits: int, a_bits: int) -> nn.Module:
    """A per-tensor ``W{w_bits}A{a_bits}`` copy: min-max weights, running min-max activations (swap)."""
    return quantize_model(
        copy.deepcopy(model),
        lambda m, n: AffineQuantizer(w_bits, BatchMinMax()),
        lambda m, n: AffineQuantizer(a_bits, RunningMinMax()),
        method="swap",
    )


def calib_batches(train_split, n: int = 256, batch_size: int = 64) -> list[torch.Tensor]:
    """The first ``n`` training inputs in batches (labels are not used by PTQ)."""
    return list(train_split[0][:n].split(batch_size))


def run_method(
    model: nn.Module,
    train_split,
    test_split,
    method: str,
    w_bits: int,
    a_bits: int,
    *,
    iters: int = 100,
    lr: float = 1e-2,
    act_lr: float = 1e-2,
    fold: bool = True,
    seed: int = 0,
    return_model: bool = False,
    **options,
):
    """Quantize a copy of ``model``, apply ``method`` (one of :data:`METHODS`), return its test accuracy.

    BatchNorm is folded into the weights first when ``fold`` (as deployed; CLE always folds).
    Calibration uses 256 training samples; reconstruction ``iters`` steps per unit with
    batch 32 and Adam at ``lr`` (the paper's 1e-3 needs thousands of steps); BRECQ and QDrop
    learn their activation steps at the relative rate ``act_lr``; ``options`` go to the
    reconstruction preset (e.g. ``learn_act_step=False`` or ``loss="mse"``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
    q = quantized_copy(model, w_bits, a_bits)
    calib = calib_batches(train_split)
    if method.startswith("cle"):
        equalize(q, example_input=calib[0])
    if fold or method.startswith("cle"):
        for _, m in iter_qmodules(q):
            if isinstance(m, QWrapper):
                fold_qwrapper_batchnorm(m)
    calibrate(q, calib, progress=False)
    opts = dict(iters=iters, batch_size=32, lr=lr, seed=seed, progress=False, **options)
    if method.endswith("bc"):
        bias_correction(q, calib, progress=False)
    elif method == "adaround":
        adaround(q, calib, **opts)
    elif method == "brecq":
        brecq(q, calib, act_lr=act_lr, **opts)
    elif method == "qdrop":
        qdrop(q, calib, act_lr=act_lr, **opts)
    set_qmodule_state(q, QModuleState.QUANT_EVAL)
    acc = evaluate(q, test_split)
    return (acc, q) if return_model else acc
