"""Bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", sec. 4.2).

Quantizing a layer's weight ``W -> W_q`` shifts the expected pre-activation
output by ``E[(W_q - W) x]`` per output channel; subtracting that from the
layer's bias removes the shift. The expectation comes either from data
(``method="empirical"``) or, data-free, from the BatchNorm statistics of the
preceding layer (``method="analytic"``): its pre-activation channel ``i`` is
modelled as ``N(beta_i, gamma_i^2)`` and passed through the activation in
closed form (ReLU, ReLU6 / :class:`~torchquant.ptq.ChannelClip`, LeakyReLU or none).
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import BN_FOR_LAYER, bn_scale_shift
from ..qmodules import QModuleState, QWrapper
from ..utils import call_model, progress_bar, restoring_states
from ._common import Snapshot, first_names, forward_order, materialize, require_qmodules
from .equalize import ChannelClip, _in_view, _layer_in_out, find_layer_pairs
from .registry import _keyword_options, register_ptq_algorithm

__all__ = ["bias_correction", "expected_activation"]

_WEIGHT_EVAL = (QModuleState.QUANT_EVAL, QModuleState.QUANT_EVAL_WEIGHT_ONLY)


def _phi(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _cdf(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _clipped_mean(mu: Tensor, sigma: Tensor, lo: Tensor | float, hi: Tensor | float | None) -> Tensor:
    """``E[clamp(z, lo, hi)]`` for ``z ~ N(mu, sigma^2)`` (``hi=None``: no upper clip)."""
    sigma = sigma.clamp(min=1e-12)
    a = (lo - mu) / sigma
    mean = lo * _cdf(a)
    if hi is None:
        return mean + mu * (1 - _cdf(a)) + sigma * _phi(a)
    b = (hi - mu) / sigma
    return mean + mu * (_cdf(b) - _cdf(a)) + sigma * (_phi(a) - _phi(b)) + hi * (1 - _cdf(b))


def expected_activation(act: nn.Module | None, mean: Tensor, std: Tensor) -> Tensor:
    """``E[act(z)]`` per channel for ``z ~ N(mean, std^2)``, in closed form.

    Args:
        act: ``None`` (identity), ``nn.ReLU``, ``nn.ReLU6``, ``nn.LeakyReLU`` or
            :class:`~torchquant.ptq.ChannelClip`.
        mean: ``(C,)`` means.
        std: ``(C,)`` standard deviations.

    Returns:
        ``(C,)`` expectations.

    Raises:
        TypeError: another activation.
    """
    if act is None:
        return mean.clone()
    if isinstance(act, nn.ReLU):
        return _clipped_mean(mean, std, 0.0, None)
    if isinstance(act, nn.ReLU6):
        return _clipped_mean(mean, std, 0.0, 6.0)
    if isinstance(act, ChannelClip):
        return _clipped_mean(mean, std, 0.0, act.upper)
    if isinstance(act, nn.LeakyReLU):
        pos = _clipped_mean(mean, std, 0.0, None)
        return pos + act.negative_slope * (mean - pos)  # E[min(z, 0)] = E[z] - E[max(z, 0)]
    raise TypeError(f"expected_activation: no closed form for {type(act).__name__}")


def _weight_error(wrapper: QWrapper, name: str) -> Tensor:
    """``q(W) - W`` for the weight the quantizer sees (BatchNorm folded in with ``fold_bn=True``)."""
    q = wrapper.weight_quantizer
    try:
        with torch.no_grad():
            w = wrapper.weight_to_quantize().detach()
            return q(w) - w
    except RuntimeError as e:
        raise RuntimeError(f"bias_correction: the weight quantizer of {name} is not ready ({e})") from e


def _remove_shift(wrapper: QWrapper, shift: Tensor) -> None:
    """Move the wrapper's output by ``-shift`` ``(C_out,)`` through its layer's bias (created when missing).

    With ``fold_bn=True`` the layer's bias reaches the output times BatchNorm's ``gamma / sigma``: it
    moves by ``-shift`` divided by that factor (a channel whose factor is 0 has no error to remove).
    """
    delta = -shift
    if wrapper.fold_bn:
        factor, _ = bn_scale_shift(wrapper.bn)
        delta = torch.where(factor != 0, delta / factor, torch.zeros_like(delta))
    layer = wrapper.layer
    with torch.no_grad():
        if layer.bias is None:
            layer.bias = nn.Parameter(delta.detach().clone())
        else:
            layer.bias.add_(delta)


def bias_correction(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    method: str = "empirical",
    mode: QModuleState = QModuleState.QUANT_EVAL,
    bn_stats: dict[str, tuple[Tensor, Tensor]] | None = None,
    num_batches: int | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Subtract the expected output shift ``E[(W_q - W) x]`` from every weight-quantized layer's bias.

    ``"empirical"``: layers are corrected in forward order; each one's inputs ``x``
    come from running ``data`` through the model in ``mode`` (so they include the
    quantization of the preceding layers and their corrections), and the shift is
    averaged over the batch and spatial positions.

    ``"analytic"``: data-free; for each consecutive pair ``A -> B`` (as found by
    :func:`~torchquant.ptq.find_layer_pairs`) with statistics for ``A`` (its
    BatchNorm, or ``bn_stats[name_of_A]`` after folding, e.g. from
    :func:`~torchquant.ptq.equalize`), ``E[x]`` is ``expected_activation(A.act, ...)``
    and the shift ``(W_q - W) E[x]`` (weights summed over the kernel: zero padding is
    neglected). Layers without such a predecessor are left alone.

    The weight quantizers need their ranges (calibrate first); the layer's bias is
    created when missing. The correction is applied to the bias before BatchNorm. The
    error is that of the weight the quantizer sees and the input the product reads: with
    ``fold_bn=True`` the folded weight (the bias then moves by the shift divided by
    ``gamma / sigma``), after the wrapper's ``input_transform`` (``"analytic"``: applied to
    ``E[x]``, a linear transform) and, ``"empirical"`` only, its input quantizer.

    Args:
        model: a calibrated model with QWrappers.
        data: calibration batches (``"empirical"`` only), as for :func:`~torchquant.ptq.calibrate`.
        method: ``"empirical"`` or ``"analytic"``.
        mode: the quantized mode the model will run in (``QUANT_EVAL`` or ``QUANT_EVAL_WEIGHT_ONLY``).
        bn_stats: per QWrapper name, ``(mean, std)`` ``(C,)`` of its pre-activation output,
            for layers whose BatchNorm was folded (``"analytic"`` only).
        num_batches: use at most this many batches of ``data``.
        progress: show a progress bar over layers.

    Returns:
        The shift removed from each corrected layer's output, ``(C_out,)``, by QWrapper name (the
        correction subtracted from its bias, but with ``fold_bn=True``).

    Raises:
        ValueError: no QModule, empty or missing data, an unknown method, a mode that
            does not quantize weights, or no layer to correct.
        RuntimeError: a weight quantizer without ranges; the model is left untouched.
    """
    require_qmodules(model, "bias_correction")
    if not isinstance(mode, QModuleState) or mode not in _WEIGHT_EVAL:
        raise ValueError(f"bias_correction: mode must be QUANT_EVAL or QUANT_EVAL_WEIGHT_ONLY, got {mode!r}")
    if method not in ("empirical", "analytic"):
        raise ValueError(f"bias_correction: method must be 'empirical' or 'analytic', got {method!r}")
    if method == "analytic" and data is not None:
        raise ValueError("bias_correction: method='analytic' is data-free; pass data=None")
    if method == "empirical" and bn_stats is not None:
        raise ValueError("bias_correction: bn_stats is only used by method='analytic'")
    named = {m: n for n, m in model.named_modules()}
    # Linear and Conv layers only: the correction is a per-output-channel bias (an Embedding has none).
    wrappers = [
        m
        for m in named
        if isinstance(m, QWrapper)
        and m.weight_quantizer is not None
        and type(m.layer) in BN_FOR_LAYER
        and not m.weight_is_computed
    ]
    # Two wrappers of one layer (a module listed twice, converted by swap) would each correct its one bias.
    per_layer = collections.Counter(id(w.layer) for w in wrappers)
    twice = [named[w] for w in wrappers if per_layer[id(w.layer)] > 1]
    if twice:
        warnings.warn(
            f"bias_correction: {len(twice)} wrappers share their layer (a module listed twice) and keep its bias: "
            f"{', '.join(twice)}",
            UserWarning,
            stacklevel=2,
        )
        wrappers = [w for w in wrappers if per_layer[id(w.layer)] == 1]
    if not wrappers:
        raise ValueError(
            f"bias_correction: {type(model).__name__} has no QWrapper with a weight quantizer on a Linear/Conv layer"
        )
    snapshot = Snapshot(model)
    try:
        if method == "analytic":
            out = _analytic(model, named, wrappers, bn_stats or {}, progress)
        else:
            if data is None:
                raise ValueError("bias_correction: method='empirical' needs calibration data")
            batches = materialize(data, num_batches, "bias_correction")
            out = _empirical(model, named, wrappers, batches, mode, progress)
    except BaseException:
        snapshot.restore()
        raise
    on_grid = [name for name, shift in out.items() if not shift.any()]  # q(W) - W was zero
    if on_grid:
        warnings.warn(
            f"bias_correction: {first_names(on_grid, 8)} have weights already on their quantization grid (as "
            "AdaRound, BRECQ, QDrop and GPTQ leave them): no error to correct there; after such an algorithm, "
            "bias correction has nothing to do",
            UserWarning,
            stacklevel=2,
        )
    return out


@register_ptq_algorithm("bias_correction", aliases=("bc",), options=_keyword_options(bias_correction))
def _bias_correction_algorithm(model: nn.Module, data: Iterable | None, **options: Any) -> dict[str, Tensor]:
    """Subtract the expected output shift E[(W_q - W) x] from every weight-quantized layer's bias.

    :func:`bias_correction` called as ``fn(model, data, **options)``: with ``method="analytic"``
    (data-free) the calibration data a recipe passes is not used.
    """
    return bias_correction(model, None if options.get("method") == "analytic" else data, **options)


def _empirical(model, named, wrappers, batches, mode, progress) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    skipped: list[str] = []
    with restoring_states(model):
        model.eval()
        for _, m in require_qmodules(model, "bias_correction"):
            m.qstate = mode
        order = forward_order(model, wrappers, batches[0], "bias_correction")
        for w in progress_bar(order, len(order), "bias correction", progress):
            name = named[w]
            dw = _weight_error(w, name)
            total: list[Tensor] = []
            count = [0]
            callers_bias: list[bool] = []

            def hook(mod, args, kwargs, dw=dw, total=total, count=count, callers_bias=callers_bias):
                callers_bias.append(kwargs.get("bias") is not None)
                x = args[0]  # what the layer's product reads: after the wrapper's input transform and quantizer
                if mod.input_transform is not None:
                    x = mod.input_transform(x)
                if mod._modules.get("input_quantizer") is not None:
                    x = mod._quantize_input(x)
                layer = mod.layer
                y = F.linear(x, dw) if isinstance(layer, nn.Linear) else layer._conv_forward(x, dw, None)
                # (N, C, ...) -> (C,): sum over every dim but the channel one
                ch = y.dim() - 1 if isinstance(mod.layer, nn.Linear) else 1
                dims = [d for d in range(y.dim()) if d != ch]
                total.append(y.sum(dims))
                count[0] += y.numel() // y.shape[ch]

            h = w.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                with torch.no_grad():
                    for batch in batches:
                        call_model(model, batch, "bias_correction")
            finally:
                h.remove()
            if any(callers_bias):
                # the module passes a bias of its own (torchquant.weight_reads): the layer's is not the one used
                skipped.append(name)
                continue
            shift = torch.stack(total).sum(0) / count[0]
            _remove_shift(w, shift)
            out[name] = shift
    if skipped:
        warnings.warn(
            f"bias_correction: {first_names(skipped, 8)} left uncorrected: the model calls them with a bias of its "
            "own making (a module passing their weight to F.linear), not the layer's",
            stacklevel=3,
        )
    return out


def _analytic(model, named, wrappers, bn_stats, progress) -> dict[str, Tensor]:
    mods = dict(model.named_modules())
    for k in bn_stats:
        if k not in mods or not isinstance(mods[k], QWrapper):
            raise ValueError(f"bias_correction: bn_stats names {k!r}, which is not a QWrapper of the model")
    pairs = [(mods[a], mods[b]) for a, b in find_layer_pairs(model, relu6="clip")]
    out: dict[str, Tensor] = {}
    todo = []
    for a, b in pairs:
        if b.weight_quantizer is None:
            continue
        if named[a] in bn_stats:
            mean, std = bn_stats[named[a]]
        elif a.bn is not None:
            dev = a.layer.weight.device
            mean = a.bn.bias.detach() if a.bn.bias is not None else torch.zeros(a.bn.num_features, device=dev)
            std = a.bn.weight.detach().abs() if a.bn.weight is not None else torch.ones(a.bn.num_features, device=dev)
        else:
            continue
        if not (a.act is None or isinstance(a.act, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, ChannelClip))):
            continue
        todo.append((a, b, mean, std))
    if not todo:
        raise ValueError(
            "bias_correction: method='analytic' found no layer preceded by a QWrapper with BatchNorm statistics "
            "(pass bn_stats from equalize() if BatchNorm was folded)"
        )
    for a, b, mean, std in progress_bar(todo, len(todo), "bias correction", progress):
        ex = expected_activation(a.act, mean, std)  # (C_in,)
        if b.input_transform is not None:  # linear along the features (QuaRot's Hadamard): E[T x] = T E[x]
            ex = b.input_transform(ex.reshape(1, -1)).reshape(-1)
        dw = _weight_error(b, named[b])
        groups = _layer_in_out(b.layer)[2]
        v = _in_view(dw, groups).sum(-1)  # (g, C_out / g, cpg)
        shift = (v * ex.reshape(groups, 1, -1)).sum(-1).reshape(-1)  # (C_out,)
        _remove_shift(b, shift)
        out[named[b]] = shift
    return out
