"""Post-training quantization recipes on the built-in tasks (used by the tests and ``benchmarks/ptq.py``).

* :func:`train_float`: a float model trained on digits or mnist1d, deterministic for the seed.
* :func:`imbalance_channels`: make a MobileNet-style model's depthwise channel ranges
  span orders of magnitude, as they do in ImageNet-trained MobileNetV2.
* :func:`run_method`: quantize a copy per-tensor, apply registered PTQ algorithms, return the test accuracy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ..convert import quantize_model
from ..layers import LAYER_TYPES
from ..ptq import calibrate, fold_qwrapper_batchnorm, get_ptq_algorithm, list_ptq_algorithms
from ..qmodules import QModuleState, QWrapper, iter_qmodules
from ..quantizers import AffineQuantizer
from ..range_observers import BatchMinMax, RunningMinMax
from ..utils import set_qmodule_state
from . import data as bdata
from . import models as bmodels
from .train import evaluate, train

__all__ = [
    "NEAREST",
    "TASKS",
    "imbalance_channels",
    "load_task_data",
    "methods",
    "quantized_copy",
    "run_method",
    "train_float",
]

TASKS: dict[str, tuple[str, Callable[[], nn.Module], int]] = {
    # name: (dataset, model constructor, epochs)
    # DigitsCNN at width 8 (6.4k parameters): at the default width 16, W4A4 AdaRound, BRECQ
    # and QDrop all land within one test image of the float accuracy, so their comparison
    # measures noise; at width 8 nearest rounding loses 2 points and the methods separate.
    "digits_cnn": ("digits", partial(bmodels.DigitsCNN, width=8), 15),
    "mnist1d_cnn": ("mnist1d", bmodels.MNIST1DCNN, 15),
    "digits_mobilenet": ("digits", bmodels.DigitsMobileNet, 15),
}

NEAREST = "nearest"
"""The method name of plain calibration (rounding to nearest), no PTQ algorithm."""


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
    dataset, build, epochs = TASKS[task]
    train_split, test_split = load_task_data(dataset)
    torch.manual_seed(seed)
    model = build()
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


def quantized_copy(
    model: nn.Module,
    w_bits: int,
    a_bits: int,
    *,
    first_last_bits: int | None = None,
    quantize_output: bool = True,
) -> nn.Module:
    """A per-tensor ``W{w_bits}A{a_bits}`` copy: min-max weights, running min-max activations (swap).

    By default every layer is quantized to the nominal bits, its output included (so the
    logits are ``a_bits`` wide). The BRECQ and QDrop experiments use another protocol (their
    released code: ``set_first_last_layer_to_8bit`` and ``disable_network_output_quantization``
    in ``quant/quant_model.py`` of yhhhli/BRECQ and wimh966/QDrop), which is
    ``first_last_bits=8, quantize_output=False`` here:

    * ``first_last_bits``: the weights of the first and the last layer get these bits, and so
      does the output of the layer before the last (their ``module_list[-2].act_quantizer``,
      meant as the last layer's input). BRECQ's code also keeps the first layer's output at 8
      bits and skips its reconstruction; QDrop's does neither, nor does this option.
    * ``quantize_output=False``: the last layer's output (the network output) is not quantized;
      both codes do this whether or not the first and last layers are at 8 bits.

    Layers are Conv1d/2d/3d and Linear modules in ``named_modules`` order.

    Args:
        model: a float model (not modified).
        w_bits: weight bits.
        a_bits: output activation bits.
        first_last_bits: bits of the first and last layers' weights and of the last layer's
            input, or ``None`` for ``w_bits`` / ``a_bits``.
        quantize_output: quantize the last layer's output to ``a_bits``.

    Returns:
        The quantizable copy, every QModule ``BYPASSED``.

    Raises:
        ValueError: ``first_last_bits`` is given or ``quantize_output`` is ``False`` but ``model``
            has fewer than two layers.
    """
    high_w: set[str] = set()
    high_a: set[str] = set()
    float_out: set[str] = set()
    if first_last_bits is not None or not quantize_output:
        layers = [n for n, m in model.named_modules() if type(m) in LAYER_TYPES]
        if len(layers) < 2:
            raise ValueError(
                f"quantized_copy: first_last_bits / quantize_output=False need at least two layers, "
                f"{type(model).__name__} has {layers}"
            )
        if first_last_bits is not None:
            high_w, high_a = {layers[0], layers[-1]}, {layers[-2]}
        if not quantize_output:
            float_out = {layers[-1]}

    def weights(m: nn.Module, n: str) -> AffineQuantizer:
        return AffineQuantizer(first_last_bits if n in high_w else w_bits, BatchMinMax())

    def acts(m: nn.Module, n: str) -> AffineQuantizer | None:
        if n in float_out:
            return None
        return AffineQuantizer(first_last_bits if n in high_a else a_bits, RunningMinMax())

    return quantize_model(copy.deepcopy(model), weights, acts, method="swap")


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
    first_last_bits: int | None = None,
    quantize_output: bool = True,
    seed: int = 0,
    return_model: bool = False,
    **options,
):
    """Quantize a copy of ``model``, apply ``method``, return its test accuracy.

    ``method`` is ``"nearest"`` (calibration only) or names of registered PTQ algorithms
    (:func:`torchquant.ptq.list_ptq_algorithms`, or aliases such as ``"bc"`` and ``"cle"``)
    joined by ``+``, e.g. ``"cle+bc"``; algorithms registered ``before_calibration`` run
    first, the others after calibration, each in the order given.
    BatchNorm is folded into the weights first when ``fold`` (as deployed; CLE always folds).
    ``first_last_bits`` and ``quantize_output`` go to :func:`quantized_copy` (``8`` and
    ``False``: the BRECQ / QDrop protocol, first and last layer at 8 bits, output not quantized).
    Calibration uses 256 training samples; every algorithm gets, of ``iters`` steps per unit
    with batch 32, Adam at ``lr``, activation steps learned at the relative rate ``act_lr``
    (the paper's 1e-3 needs thousands of steps), ``seed``, no progress bar and ``options``
    (e.g. ``learn_act_step=False`` or ``loss="mse"``), the ones it takes.

    Raises:
        KeyError: a name that is not a registered PTQ algorithm (the message lists them).
        TypeError: an entry of ``options`` that none of the algorithms takes.
    """
    algorithms = [] if method == NEAREST else [get_ptq_algorithm(name) for name in method.split("+")]
    q = quantized_copy(model, w_bits, a_bits, first_last_bits=first_last_bits, quantize_output=quantize_output)
    calib = calib_batches(train_split)
    unused = sorted(k for k in options if not any(k in a.options for a in algorithms))
    if unused:
        raise TypeError(f"run_method: no algorithm of {method!r} takes the options {unused}")
    opts = dict(iters=iters, batch_size=32, lr=lr, act_lr=act_lr, seed=seed, progress=False, **options)
    before = [a for a in algorithms if a.before_calibration]
    for algorithm in before:
        algorithm(q, calib, **algorithm.accepted(opts))
    if fold or before:
        for _, m in iter_qmodules(q):
            if isinstance(m, QWrapper):
                fold_qwrapper_batchnorm(m)
    calibrate(q, calib, progress=False)
    for algorithm in algorithms:
        if not algorithm.before_calibration:
            algorithm(q, calib, **algorithm.accepted(opts))
    set_qmodule_state(q, QModuleState.QUANT_EVAL)
    acc = evaluate(q, test_split)
    return (acc, q) if return_model else acc


def methods() -> list[str]:
    """The single-algorithm methods :func:`run_method` accepts: ``"nearest"`` and every registered PTQ
    algorithm for any model (``model_kind="any"``; QuaRot, for causal LMs, is left out)."""
    return [NEAREST, *(n for n in list_ptq_algorithms() if get_ptq_algorithm(n).model_kind == "any")]
