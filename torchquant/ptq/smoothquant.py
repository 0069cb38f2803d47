"""SmoothQuant (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models"): move activation outliers into the weights.

For a group of layers reading one input ``X`` (``(n, in)``: ``q, k, v`` after a
normalisation, ``gate, up``, ``down`` after ``up``) with weights ``W`` (``(out, in)``
each), a per-channel scale

    ``s_j = max|X_j| ** alpha / max|W_:j| ** (1 - alpha)``

(the maximum over all tokens, and over the rows of every layer of the group) divides the
input channel ``j`` and multiplies the weight column ``j``: ``X W^T = (X / s) (W s)^T``.
``alpha`` is the migration strength: 1 moves all of the activations' range into the
weights, 0 all of the weights' range into the activations (``s_j = 1 / max|W_:j|``: the
weight columns come out with equal ranges); 0.5, the paper's default, splits it. The
division is folded into the module that produces ``X``
(:meth:`~torchquant.ptq.sequential.Block.fold_target`: the normalisation's weight and
bias, or the producing layer's rows and bias), so the float model is unchanged and the
quantized model has no extra operation. Groups with no such module are left alone and
listed in the result.

Mixture-of-experts banks (:class:`~torchquant.QExperts`): with ``targets="all"``, each
expert's ``down_proj`` input is smoothed with the maximum over the tokens routed to it
(:func:`~torchquant.moe.expert_inputs`) and its own ``down_proj`` columns, folded into the
rows of its ``gate_up_proj`` that produce ``up``
(:meth:`~torchquant.ptq.sequential.Block.up_rows`; a gating no scale passes through is
listed in the result). The experts' first input is smoothed with every other reader of the
normalisation before it (:meth:`~torchquant.ptq.sequential.Block.shared_fold`: a router, a
shared expert): one scale from the maximum over all tokens and over the columns of every
quantized reader, the experts' first matrices included, folded into the normalisation and
its inverse into all readers, the router's weight included, so routing does not change
(keyed by all the readers' names, the experts' as ``"<experts>.gate_up_proj"``).

It runs before calibration (it changes weights, so activation and weight ranges are
computed afterwards; weight ranges already observed are recomputed from the new weights)
on the float model, block by block on the sequential engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..moe import QExperts, expert_inputs
from ..qmodules import QModuleState, QWrapper
from ._common import UNROUTED, all_or_nothing, mark_scaled, materialize, require_qmodules, warn_skipped
from .calibrate import reobserve_weights, reset_activation_ranges
from .registry import register_ptq_algorithm
from .sequential import (
    OUTSIDE_BLOCKS,
    Block,
    SharedFold,
    fold_expert_scale,
    fold_input_scale,
    fold_shared_scale,
    layers_outside,
    sequential_blocks,
)

__all__ = ["SmoothQuantResult", "smoothing_scales", "smoothquant"]


@dataclass(frozen=True)
class SmoothQuantResult:
    """What :func:`smoothquant` did.

    Attributes:
        folded: for each smoothed group (its layers' qualified names joined by ``","``; an
            expert's ``"<experts>.down_proj[<e>]"``), the module the scales were folded into (an
            expert's ``"<experts>.gate_up_proj[<e>]"``).
        max_scale: for each smoothed group, the largest ``s_j``.
        skipped: groups left alone, with the reason.
    """

    folded: dict[str, str] = field(default_factory=dict)
    max_scale: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def smoothing_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's per-channel scales ``s = a ** alpha / w ** (1 - alpha)``.

    Args:
        act_absmax: ``(in,)`` ``max |X_j|`` over tokens.
        weight_absmax: ``(in,)`` ``max |W_:j|`` over output rows.
        alpha: migration strength in ``[0, 1]``.

    Returns:
        ``(in,)`` positive scales; ``1`` where a channel has no activation or no weight.

    Example:
        >>> import torch
        >>> smoothing_scales(torch.tensor([16.0, 1.0]), torch.tensor([1.0, 4.0]), 0.5)
        tensor([4.0000, 0.5000])
    """
    a = act_absmax.to(torch.float32)
    w = weight_absmax.to(torch.float32)
    s = a.pow(alpha) / w.pow(1 - alpha)
    dead = (a <= 0) | (w <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=1e-5))


def _group_name(names: dict[nn.Module, str], group: list[QWrapper]) -> str:
    return ",".join(names[w] for w in group)


def _weight_absmax(group: list[QWrapper]) -> Tensor:
    return torch.stack([w.weight_view().detach().abs().amax(0).float() for w in group]).amax(0)


def _smooth_experts(
    block: Block,
    qe: QExperts,
    name: str,
    alpha: float,
    folded: dict[str, str],
    max_scale: dict[str, float],
    skipped: dict[str, str],
) -> None:
    """Smooth every expert's ``down_proj`` input into its ``up`` rows (see the module docstring)."""
    amax: dict[int, Tensor] = {}

    def report(bank: str, e: int, x: Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float() if x.numel() else None
        if m is not None:
            amax[e] = m if e not in amax else torch.maximum(amax[e], m)

    up = block.up_rows(qe)
    if up is None:
        skipped[f"{name}.down_proj"] = "no gate_up_proj rows scale down_proj's input one for one"
        return
    with expert_inputs(qe, report, ["down_proj"]):
        block.run()
    for e in range(qe.layer._parameters["down_proj"].shape[0]):
        key = f"{name}.down_proj[{e}]"
        if e not in amax or not bool(amax[e].any()):  # Llama 4 gives unrouted experts zero rows
            skipped[key] = UNROUTED
            continue
        s = smoothing_scales(amax[e], qe.matrix("down_proj", e).detach().abs().amax(0).float(), alpha)
        fold_expert_scale(qe, e, up, s)
        folded[key] = f"{name}.gate_up_proj[{e}]"
        max_scale[key] = float(s.max())
    reobserve_weights([qe])


def _smooth_shared(block: Block, fold: SharedFold, acts: list[Tensor], alpha: float) -> Tensor | str:
    """The scales of a normalisation's output read by experts, a router, a shared expert: the maximum over
    every token (``acts``: the quantized layers' inputs; the experts' inputs, measured here) and over the
    columns of every quantized reader, the experts' first matrices included; or why there are none."""
    amax = list(acts)
    weights = [w.weight_view().detach().abs().amax(0).float() for w in fold.layers if w.weight_quantizer is not None]

    def report(bank: str, e: int, x: Tensor) -> None:
        if x.numel():
            amax.append(x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float())

    for qe in fold.experts:
        bank = qe.banks[0]
        if qe.bank_quantizer(bank) is not None:
            w = qe.layer._parameters[bank].detach().abs()
            weights.append(w.amax((0, 2) if qe.transposed else (0, 1)).float())
        with expert_inputs(qe, report, [bank]):
            block.run()
    if not weights:
        return "nothing quantized reads its output"
    if not amax:
        return "no calibration token reached it"
    return smoothing_scales(torch.stack(amax).amax(0), torch.stack(weights).amax(0), alpha)


def _act_absmax(block: Block, groups: list[list[QWrapper]]) -> dict[QWrapper, Tensor]:
    """``max |x_j|`` of each group's input over all batches, ``(in,)``, in one pass over the block."""
    out: dict[QWrapper, Tensor] = {}

    def pre(mod: QWrapper, x: Tensor, i: int) -> None:
        rows = block.real_tokens(mod, x.detach(), i)  # padding left out
        m = rows.abs().reshape(-1, x.shape[-1]).amax(0).float()
        out[mod] = m if mod not in out else torch.maximum(out[mod], m)

    last = groups[-1][0] if block.called_once() else None
    block.run({g[0]: pre for g in groups}, stop_after=last)
    return out


def _smoothable(w: QWrapper) -> bool:
    return (isinstance(w.layer, nn.Linear) or type(w.layer).__name__ == "Conv1D") and not w.fold_bn


@register_ptq_algorithm("smoothquant", before_calibration=True, aliases=("smooth",))
def smoothquant(
    model: nn.Module,
    data: Iterable,
    *,
    alpha: float = 0.5,
    targets: str = "all",
    num_batches: int | None = None,
    blocks: str | None = None,
    progress: bool = True,
) -> SmoothQuantResult:
    """SmoothQuant (Xiao et al. 2022): per-channel scales that move activation outliers into the weights.

    See the module docstring. Run it on a model from :func:`~torchquant.quantize_model`
    (or :func:`torchquant.hf.quantize`) before calibrating; the float model's outputs do
    not change. If anything fails, the model is restored exactly.

    Args:
        model: a quantizable model.
        data: calibration batches (as for :func:`~torchquant.ptq.calibrate`).
        alpha: migration strength in ``[0, 1]`` (0.5 in the paper; larger moves more).
        targets: ``"all"`` smooths every group with a fold target; ``"norms"`` only groups
            after a normalisation (the paper's ``q, k, v`` and ``gate, up``).
        num_batches: use at most this many batches of ``data``.
        blocks: the qualified name of the model's list of blocks (found when ``None``).
        progress: show a progress bar over blocks.

    Returns:
        A :class:`SmoothQuantResult`.

    Raises:
        ValueError: no QModule, empty data or a bad option.

    Example:
        >>> import torch, torchquant as tq
        >>> from torch import nn
        >>> w8 = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))
        >>> net = tq.quantize_model(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 2)), w8, None, method="swap")
        >>> r = tq.ptq.smoothquant(net, [torch.randn(16, 8)], progress=False)
        >>> r.folded
        {'1': '0'}
    """
    require_qmodules(model, "smoothquant")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"smoothquant: alpha must be a number in [0, 1], got {alpha!r}")
    if targets not in ("all", "norms"):
        raise ValueError(f"smoothquant: targets must be 'all' or 'norms', got {targets!r}")
    batches = materialize(data, num_batches, "smoothquant")
    names = {m: n for n, m in model.named_modules()}
    folded: dict[str, str] = {}
    max_scale: dict[str, float] = {}
    skipped: dict[str, str] = {}
    with all_or_nothing(model):
        model.eval()
        mode = QModuleState.BYPASSED
        inside: set[nn.Module] = set()
        for block in sequential_blocks(model, batches, blocks=blocks, mode=mode, who="smoothquant", progress=progress):
            inside.update(w for _, w in block.layers)
            plan: list[tuple[list[QWrapper], nn.Module]] = []
            groups = block.groups([w for _, w in block.layers if _smoothable(w)])
            experts, shared, joint = block.joint_folds(groups)
            for group in groups:
                if group[0] in joint:  # smoothed with the experts and the router reading the same norm
                    continue
                target = block.fold_target(group)
                gname = _group_name(names, group)
                if target is None:
                    skipped[gname] = block.unscaled_reason(group[0])
                elif targets == "norms" and isinstance(target, QWrapper):
                    skipped[gname] = f"its input comes from {names[target]}, not a normalisation (targets='norms')"
                else:
                    plan.append((group, target))
            joint_groups = [g for g in groups if g[0] in joint]
            planned = {g[0] for g, _ in plan} | joint
            measured = [g for g in groups if g[0] in planned]  # in forward order: the pass stops after the last
            acts = _act_absmax(block, measured) if measured else {}
            for group, target in plan:
                s = smoothing_scales(acts[group[0]], _weight_absmax(group), float(alpha))
                fold_input_scale(target, group, s)
                gname = _group_name(names, group)
                folded[gname] = names[target]
                max_scale[gname] = float(s.max())
                reobserve_weights([*group, target] if isinstance(target, QWrapper) else group)
            for fold in shared.values():
                key = block.fold_name(fold)
                firsts = [g[0] for g in joint_groups if g[0] in fold.layers]
                s = _smooth_shared(block, fold, [acts[f] for f in firsts], float(alpha))
                if isinstance(s, str):
                    skipped[key] = s
                    continue
                fold_shared_scale(fold, s)
                folded[key] = names[fold.norm]
                max_scale[key] = float(s.max())
                reobserve_weights([*fold.layers, *fold.experts])
            for qe in experts:
                name = names[qe]
                if not any(qe in f.experts for f in shared.values()):
                    skipped[f"{name}.{qe.banks[0]}"] = block.unscaled_reason(qe)
                if targets == "norms":
                    skipped[f"{name}.down_proj"] = "its input comes from the experts' up rows (targets='norms')"
                else:
                    _smooth_experts(block, qe, name, float(alpha), folded, max_scale, skipped)
    for name in layers_outside(model, inside, _smoothable):
        skipped[name] = OUTSIDE_BLOCKS
    warn_skipped(
        skipped, UNROUTED, "expert matrices received no calibration token and keep their input unscaled", "smoothquant"
    )
    if folded:
        reset_activation_ranges(model, "smoothquant")
        mark_scaled(model, "smoothquant")
    return SmoothQuantResult(folded=folded, max_scale=max_scale, skipped=skipped)
