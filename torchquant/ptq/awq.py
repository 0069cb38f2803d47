"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"): per-channel scales that protect the weights of salient input channels, and a
clipping search.

For a group of layers reading one input ``X`` (``(n, in)``) with a module producing its
channels one for one (:meth:`~torchquant.ptq.sequential.Block.fold_target`: a
normalisation, or ``up_proj`` for ``down_proj``), AWQ scales input channel ``j`` by

    ``s_j = mean|X_j| ** a``, normalised so that ``max(s) * min(s) = 1``,

multiplying weight column ``j`` by ``s_j`` before quantization and dividing ``X_j`` by it
(folded into the producing module, so the float model is unchanged). Channels with large
activations get larger weights and so a relatively finer grid. The exponent ``a`` is
searched over ``0, 1/n_grid, ..., (n_grid - 1)/n_grid`` to minimise the group's output
error ``sum_l ||(X / s) Q(W_l s)^T - X W_l^T||^2`` with each layer's own weight
quantizer ``Q`` (a fresh copy observing the scaled weight: any registered quantizer's
grid, per channel or per group, symmetric or not). When the group's layers sit in a module
that takes their input as its only tensor argument and works row by row (an MLP:
``gate``, ``up`` and the ``down`` after them; a mixture-of-experts block with its router),
the error is that module's output error on the sampled rows instead, with only the group
quantized (each ``W`` as ``Q(W s) / s``), as in the paper
(:meth:`~torchquant.ptq.sequential.Block.row_module`, and checked: the first half of the
rows run alone must give the same outputs); attention modules take more than their input,
or mix the rows, so ``q, k, v`` keep the layers' own error. On SmolLM2-135M (W4 g64) the MLP's
output error gives perplexity 18.08 where the layers' own error gave 18.29 (18.11 leaving
``gate, up`` unscaled).

The clipping search then shrinks each weight range: for each range cell of the weight
quantizer (the whole tensor, a row, or a row's group), the weights are clamped to ``r``
times the cell's ``[min, max]`` with ``r`` in ``1, 1 - 1/n_grid, ...`` down to
``1 - max_shrink``, choosing per cell the ``r`` that minimises that cell's contribution to
the layer's output error. The clamped weights are written into the layer, so calibrating
afterwards (a min/max observer) finds the clipped ranges.

Mixture-of-experts banks (:class:`~torchquant.QExperts`) are handled expert by expert, on the
tokens routed to each (:func:`~torchquant.moe.expert_inputs`), after the block's layers: the
input scale of each expert's ``down_proj`` is searched as above and folded into the rows of
its ``gate_up_proj`` that produce ``up`` (found numerically, as for ``up_proj``: the second
half of ``[gate; up]`` or the odd rows of an interleaved bank; a gating such as GPT-OSS'
``(up + 1) * act(gate)`` passes no scale through and is listed in ``skipped``), and every
quantized bank gets the clipping search per expert (results keyed ``"<experts>.<bank>[<e>]"``).
The experts' first input is scaled with every other reader of the normalisation before it
(:meth:`~torchquant.ptq.sequential.Block.shared_fold`): one scale for the normalisation, searched
over the error of every expert's first matrix on its routed tokens (weighed by their number) and
of the quantized layers reading it (a shared expert's), its inverse folded into all of them and
into the router's weight, so that routing does not change. The exponents of such a group are
keyed by all its readers' names (the experts' as ``"<experts>.gate_up_proj"``).

Errors are measured on ``sample_tokens`` input rows drawn (seeded) from the calibration
batches; ``mean|X_j|`` uses all of them. Blocks are processed in order on the sequential
engine with float inputs, as in the paper. Of the layers, only ``Linear`` and Hugging Face
``Conv1D`` take part (and the expert banks above); AWQ runs before calibration, on the float model (weight ranges that
were already observed are recomputed from the new weights).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..moe import QExperts, expert_inputs
from ..qmodules import QModuleState, QWrapper, _run_quantizer
from ..spec import describe
from ..utils import model_output
from ._common import (
    SCALED_BY_ATTR,
    UNROUTED,
    all_or_nothing,
    mark_scaled,
    materialize,
    require_qmodules,
    warn_skipped,
)
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

__all__ = ["AWQResult", "awq"]


@dataclass(frozen=True)
class AWQResult:
    """What :func:`awq` did.

    Attributes:
        exponents: for each scaled group (its layers' names joined by ``","``; an expert's
            ``"<experts>.down_proj[<e>]"``), the chosen ``a``.
        clip_ratios: for each clipped layer (an expert's matrix: ``"<experts>.<bank>[<e>]"``), the
            mean chosen clipping ratio over its cells.
        skipped: groups not scaled, with the reason (they may still be clipped); expert matrices
            no calibration token reached, or whose inputs could not be followed, are listed too.
    """

    exponents: dict[str, float] = field(default_factory=dict)
    clip_ratios: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _fresh(q: nn.Module) -> nn.Module:
    """A new, unobserved quantizer configured like ``q``."""
    try:
        return describe(q).build()
    except (TypeError, ValueError):  # not described by a registered spec: copy and forget its state
        c = copy.deepcopy(q)
        reset = getattr(getattr(c, "range_observer", c), "reset", None)
        if reset is None:
            raise TypeError(f"awq: cannot make a fresh copy of {type(q).__name__} (no spec, no reset())") from None
        reset()
        return c


def _quantize(q: nn.Module, w: Tensor) -> Tensor:
    """``w`` quantized by a fresh copy of ``q`` that observes it."""
    return _run_quantizer(_fresh(q), w, observe=True, quantize=True)


def _cells(q: nn.Module, rows: int, cols: int) -> tuple[int, int] | None:
    """``(G, group size)``: the weight quantizer's range cells along the input dimension, or ``None``.

    Per tensor and per row: one cell spanning the row (``G = 1``); per group of ``g``
    inputs: ``G = cols // g``. Other granularities are not clipped.
    """
    gran = getattr(q, "granularity", None)
    if gran is None:
        return None
    axis = None if gran.axis is None else gran.axis % 2
    if axis is None or (axis == 0 and gran.group_size is None):
        return 1, cols
    if axis == 1 and gran.group_size is not None and cols % gran.group_size == 0:
        return cols // gran.group_size, gran.group_size
    return None


def _search_scale(group: list[QWrapper], X: Tensor, x_mean: Tensor, n_grid: int) -> tuple[Tensor, float]:
    """The best ``s`` (``(in,)``) and its exponent for ``group`` on inputs ``X`` (``(n, in)``)."""
    return _search_scale_of([(w.weight_view(), w.weight_quantizer) for w in group], X, x_mean, n_grid)


def _search_scale_of(
    matrices: list[tuple[Tensor, nn.Module]], X: Tensor, x_mean: Tensor, n_grid: int
) -> tuple[Tensor, float]:
    """The best ``s`` (``(in,)``) and its exponent for weights ``(out, in)`` read by inputs ``X`` (``(n, in)``),
    each quantized by a fresh copy of its quantizer.

    Each weight's error ``mean((X / s) Q(W s)^T - X W^T)^2`` is computed as
    ``sum((E C) * E) / (n * out)`` with ``E = Q(W s) / s - W`` (``(out, in)``) and
    ``C = X^T X``: the same quantity without an ``(n, out)`` product per candidate.
    """
    C = X.t() @ X  # (in, in)
    return _search_scale_items([(view, q, C, X.shape[0]) for view, q in matrices], x_mean, n_grid)


def _search_scale_items(
    items: list[tuple[Tensor, nn.Module, Tensor, int]], x_mean: Tensor, n_grid: int
) -> tuple[Tensor, float]:
    """:func:`_search_scale_of` with inputs of its own for each weight: ``(weight (out, in), quantizer,
    C = X^T X (in, in), n)``, each weight's error ``sum((E C) * E) / (n * out)``."""
    Ws = [(view.detach().float(), q, view.dtype, C, n) for view, q, C, n in items]
    best: tuple[float, Tensor, float] | None = None
    for a, s in _candidates(x_mean, n_grid):
        loss = 0.0
        for W, q, dtype, C, n in Ws:
            E = _quantize(q, (W * s).to(dtype)).float() / s - W
            loss += float(((E @ C) * E).sum()) / (n * W.shape[0])
        if best is None or loss < best[0]:
            best = (loss, s, a)
    assert best is not None
    return best[1], best[2]


def _candidates(x_mean: Tensor, n_grid: int) -> Iterator[tuple[float, Tensor]]:
    """``(a, s)`` for ``a = 0, 1/n_grid, ...``: ``s = mean|X|^a`` normalised so that ``max(s) min(s) = 1``."""
    for i in range(n_grid):
        a = i / n_grid
        s = x_mean.pow(a).clamp(min=1e-4)
        yield a, s / (s.max() * s.min()).sqrt()


def _run_rows(module: nn.Module, rank: int, X: Tensor) -> Tensor:
    """``module``'s output ``(m, out)`` for input rows ``X`` ``(m, in)`` given as a tensor of rank ``rank``."""
    dtype = next((p.dtype for p in module.parameters()), X.dtype)
    out = model_output(module(X.reshape((1,) * (rank - 2) + tuple(X.shape)).to(dtype)), "awq").float()
    return out.reshape(-1, out.shape[-1])


def _row_output(module: nn.Module, rank: int, X: Tensor) -> Tensor | None:
    """``module``'s output on ``X`` (``(m, in)``) when it computes each row on its own, else ``None``: the first
    half of the rows run alone must give the same outputs as in the whole (an attention module that takes
    only its input mixes them)."""
    if X.shape[0] < 2:
        return None
    with torch.no_grad():
        whole = _run_rows(module, rank, X)
        part = _run_rows(module, rank, X[: X.shape[0] // 2])
    if whole.shape[0] != X.shape[0] or part.shape != whole[: part.shape[0]].shape:
        return None
    dtype = next((p.dtype for p in module.parameters()), X.dtype)
    tol = max(1e-4, 8 * torch.finfo(dtype).eps) * float(whole.abs().max())
    return whole if bool(((whole[: part.shape[0]] - part).abs() <= tol).all()) else None


def _search_scale_module(
    module: nn.Module,
    rank: int,
    X: Tensor,
    ref: Tensor,
    matrices: list[tuple[Tensor, nn.Module]],
    x_mean: Tensor,
    n_grid: int,
) -> tuple[Tensor, float]:
    """The best ``s`` (``(in,)``) and its exponent by ``module``'s output error on input rows ``X`` (``(m, in)``,
    given to it as a tensor of rank ``rank``; ``ref``: its float output, from :func:`_row_output`) with only
    ``matrices`` (views ``(out, in)`` and their quantizers) quantized, each ``W`` replaced by ``Q(W s) / s``
    meanwhile: the paper's objective for a group whose layers feed one another (``gate``, ``up`` and the
    ``down`` after them; the experts and their router)."""
    dtype = matrices[0][0].dtype
    saved = [view.detach().clone() for view, _ in matrices]
    best: tuple[float, Tensor, float] | None = None
    with torch.no_grad():
        try:
            for a, s in _candidates(x_mean, n_grid):
                for (view, q), W in zip(matrices, saved):
                    Ws = (W.float() * s).to(dtype)
                    view.copy_((_quantize(q, Ws).float() / s).to(dtype))
                loss = float((_run_rows(module, rank, X) - ref).pow(2).mean())
                if best is None or loss < best[0]:
                    best = (loss, s, a)
        finally:
            for (view, _), W in zip(matrices, saved):
                view.copy_(W)
    assert best is not None
    return best[1], best[2]


def _search_clip(w: QWrapper, X: Tensor, n_grid: int, max_shrink: float) -> float | None:
    """Clamp ``w``'s weight to the best ratio of each range cell's ``[min, max]``; the mean ratio."""
    return _clip_matrix(w.weight_view(), w.weight_quantizer, X, n_grid, max_shrink)


def _clip_matrix(view: Tensor, q: nn.Module, X: Tensor, n_grid: int, max_shrink: float) -> float | None:
    """Clamp the weight ``view`` (``(out, in)``, written in place) to the best ratio of each of ``q``'s
    range cells' ``[min, max]`` for inputs ``X`` (``(n, in)``); the mean ratio, ``None`` when not clipped."""
    W = view.detach().float()
    rows, cols = W.shape
    cells = _cells(q, rows, cols)
    if cells is None:
        return None
    G, gs = cells
    per_tensor = getattr(q.granularity, "axis", 0) is None
    Wg = W.reshape(rows, G, gs)
    if per_tensor:
        lo, hi = W.min().expand(rows, G, 1), W.max().expand(rows, G, 1)
    else:
        lo, hi = Wg.amin(-1, keepdim=True), Wg.amax(-1, keepdim=True)
    Xg = X.reshape(-1, G, gs).transpose(0, 1)  # (G, n, gs)
    # A cell's output error mean_n (x_g . d_g)^2 is the quadratic form d_g C_g d_g / n with
    # C_g = X_g^T X_g: no (n, rows, G) tensor per candidate.
    C = Xg.transpose(1, 2) @ Xg / X.shape[0]  # (G, gs, gs)
    ratios = [1 - k / n_grid for k in range(int(max_shrink * n_grid) + 1)]
    errs = []
    for r in ratios:
        Wc = torch.maximum(torch.minimum(Wg, hi * r), lo * r).reshape(rows, cols)
        D = (_quantize(q, Wc.to(view.dtype)).float() - W).reshape(rows, G, gs).transpose(0, 1)
        err = ((D @ C) * D).sum(-1).t()  # (rows, G): each cell's output error
        errs.append(err.sum().expand(rows, G) if per_tensor else err)
    choice = torch.stack(errs).argmin(0)  # (rows, G)
    r = torch.tensor(ratios, dtype=W.dtype, device=W.device)[choice].unsqueeze(-1)  # (rows, G, 1)
    with torch.no_grad():
        view.copy_(torch.maximum(torch.minimum(Wg, hi * r), lo * r).reshape(rows, cols).to(view.dtype))
    return float(r.mean())


def _module_rows(block: Block, module: nn.Module, sample_tokens: int, seed: int) -> tuple[Tensor, Tensor]:
    """``mean|x_j|`` over all tokens ``(in,)`` of ``module``'s input and a seeded sample of its rows ``(m, in)``."""
    means, X = _stats(block, [[module]], sample_tokens, seed)  # type: ignore[list-item]
    return means[module], X[module]


def _stats(block: Block, groups: list[list[QWrapper]], sample_tokens: int, seed: int):
    """Per group: ``mean|x_j|`` over all tokens ``(in,)`` and a seeded sample of rows ``(m, in)``."""
    sums: dict[QWrapper, Tensor] = {}
    counts: dict[QWrapper, int] = {}
    samples: dict[QWrapper, list[Tensor]] = {}
    per_batch = max(1, -(-sample_tokens // block.num_batches))

    def pre(mod: QWrapper, x: Tensor, i: int) -> None:
        x = x.detach()
        transform = getattr(mod, "input_transform", None)  # a row module (an MLP) has none
        if transform is not None:  # the rows the layer reads (QuaRot's online Hadamard)
            x = transform(x)
        rows = block.real_tokens(mod, x, i).reshape(-1, x.shape[-1]).float()  # padding left out
        sums[mod] = rows.abs().sum(0) + sums.get(mod, 0)
        counts[mod] = counts.get(mod, 0) + rows.shape[0]
        g = torch.Generator().manual_seed(seed * 100003 + i)
        pick = torch.randperm(rows.shape[0], generator=g)[:per_batch].to(rows.device)
        samples.setdefault(mod, []).append(rows[pick])

    last = groups[-1][0] if block.called_once() else None
    block.run({g[0]: pre for g in groups}, stop_after=last)
    return {m: sums[m] / counts[m] for m in sums}, {m: torch.cat(v)[:sample_tokens] for m, v in samples.items()}


class _Unfollowed(Exception):
    """The experts' forward reads these banks in a way :func:`~torchquant.moe.expert_inputs` cannot follow."""

    def __init__(self, banks: list[str]) -> None:
        super().__init__(banks)
        self.banks = banks


_UNFOLLOWED = "the experts' forward does not multiply by"


_Stats = tuple[dict[tuple[str, int], Tensor], dict[tuple[str, int], Tensor], dict[tuple[str, int], int]]


def _expert_stats(block: Block, qe: QExperts, banks: list[str], sample_tokens: int, seed: int) -> _Stats:
    """Per ``(bank, expert)``: ``mean|x_j|`` of the inputs routed to it ``(in,)``, a seeded sample of them,
    and their number.

    All-zero rows are left out: Llama 4 gives every expert every token, the ones not routed to it
    multiplied by a zero score. Raises when a bank's products were never seen (see :func:`expert_inputs`).
    """
    sums: dict[tuple[str, int], Tensor] = {}
    counts: dict[tuple[str, int], int] = {}
    samples: dict[tuple[str, int], list[Tensor]] = {}
    per_batch = max(1, -(-sample_tokens // block.num_batches))
    calls = [0]
    seen: set[str] = set()

    def report(bank: str, e: int, x: Tensor) -> None:
        seen.add(bank)
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        rows = rows[rows.ne(0).any(-1)]
        key = (bank, e)
        sums[key] = rows.abs().sum(0) + sums.get(key, 0)
        counts[key] = counts.get(key, 0) + rows.shape[0]
        calls[0] += 1
        g = torch.Generator().manual_seed(seed * 100003 + calls[0])
        pick = torch.randperm(rows.shape[0], generator=g)[:per_batch].to(rows.device)
        samples.setdefault(key, []).append(rows[pick])

    with expert_inputs(qe, report, banks):
        block.run()
    hidden = [b for b in banks if b not in seen]
    if hidden:
        raise _Unfollowed(hidden)
    means = {k: sums[k] / counts[k] for k in sums if counts[k]}
    return means, {k: torch.cat(v)[:sample_tokens] for k, v in samples.items() if k in means}, counts


def _quantized_banks(qe: QExperts) -> list[str]:
    return [b for b in qe.banks if qe.bank_quantizer(b) is not None]


def _awq_shared(
    block: Block,
    fold: SharedFold,
    first_of: dict[QWrapper, QWrapper],
    X: dict[QWrapper, Tensor],
    x_mean: dict[QWrapper, Tensor],
    data: dict[QExperts, _Stats | _Unfollowed],
    n_grid: int,
    sample_tokens: int,
    seed: int,
) -> float | str:
    """AWQ's input scale for a normalisation read by experts, a router, a shared expert (see the module
    docstring), folded; the exponent, or why there is none. ``X`` and the experts' samples in ``data`` are
    divided by the scale."""
    row = block.row_module([*fold.layers, *fold.experts])
    rows = _module_rows(block, row[0], sample_tokens, seed) if row is not None else None
    ref = _row_output(*row, rows[1]) if row is not None and rows is not None else None
    if row is not None and rows is not None and ref is not None:  # the MoE block's output: routed rows
        module, rank = row
        quantized = [w for w in fold.layers if w.weight_quantizer is not None]
        matrices = [(w.weight_view(), w.weight_quantizer) for w in quantized]
        for qe in fold.experts:
            bank, q = qe.banks[0], qe.bank_quantizer(qe.banks[0])
            if q is not None:
                n = qe.layer._parameters[bank].shape[0]
                matrices += [(qe.matrix(bank, e), q) for e in range(n)]
        if not matrices:
            return "nothing quantized reads its output"
        s, a = _search_scale_module(module, rank, rows[1], ref, matrices, rows[0], n_grid)
        _fold_shared(fold, s, first_of, X, data)
        return a
    items: list[tuple[Tensor, nn.Module, Tensor, int]] = []
    firsts = list(dict.fromkeys(first_of[w] for w in fold.layers if w in first_of))
    C = {f: X[f].t() @ X[f] for f in firsts}
    for w in fold.layers:
        if w in first_of:
            items.append((w.weight_view(), w.weight_quantizer, C[first_of[w]], X[first_of[w]].shape[0]))
    routed: list[tuple[QExperts, int]] = []
    for qe in fold.experts:
        bank, q = qe.banks[0], qe.bank_quantizer(qe.banks[0])
        found = data.get(qe)
        if q is None or found is None:
            continue
        if isinstance(found, _Unfollowed):
            return f"the inputs each expert receives are unknown (its forward's {found.banks[0]}[e] products)"
        routed += [(qe, e) for b, e in found[1] if b == bank]
    if not items and not routed:
        return "nothing quantized reads its output"
    # experts are weighed by the tokens routed to each: one expert's error counts per routed row
    n_routed = sum(data[qe][1][(qe.banks[0], e)].shape[0] for qe, e in routed)
    for qe, e in routed:
        Xe = data[qe][1][(qe.banks[0], e)]
        items.append((qe.matrix(qe.banks[0], e), qe.bank_quantizer(qe.banks[0]), Xe.t() @ Xe, n_routed))
    if firsts:
        mean = x_mean[firsts[0]]  # every token
    else:
        sums = [data[qe][0][(qe.banks[0], e)] * data[qe][2][(qe.banks[0], e)] for qe, e in routed]
        mean = torch.stack(sums).sum(0) / sum(data[qe][2][(qe.banks[0], e)] for qe, e in routed)
    s, a = _search_scale_items(items, mean, n_grid)
    _fold_shared(fold, s, first_of, X, data)
    return a


def _fold_shared(
    fold: SharedFold,
    s: Tensor,
    first_of: dict[QWrapper, QWrapper],
    X: dict[QWrapper, Tensor],
    data: dict[QExperts, _Stats | _Unfollowed],
) -> None:
    """Fold ``s`` and divide the samples of the inputs it scales (the layers' and the experts' first bank's)."""
    fold_shared_scale(fold, s)
    for f in dict.fromkeys(first_of[w] for w in fold.layers if w in first_of):
        X[f] = X[f] / s
    for qe in fold.experts:
        found = data.get(qe)
        if found is not None and not isinstance(found, _Unfollowed):
            samples = found[1]
            for key in [k for k in samples if k[0] == qe.banks[0]]:
                samples[key] = samples[key] / s


def _awq_experts(
    qe: QExperts,
    name: str,
    found: _Stats | _Unfollowed,
    up: Tensor | None,
    n_grid: int,
    clip: bool,
    max_shrink: float,
) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """AWQ on one experts module, expert by expert: ``down_proj``'s input scale folded into the expert's ``up``
    rows (``up``: :meth:`Block.up_rows`), and every quantized bank's clipping search, each on the tokens routed
    to the expert (``found``: :func:`_expert_stats`).

    Returns ``(exponents, clip ratios, skipped)`` keyed ``"<name>.<bank>[<e>]"``."""
    exponents: dict[str, float] = {}
    ratios: dict[str, float] = {}
    skipped: dict[str, str] = {}
    banks = _quantized_banks(qe)
    n_experts = qe.layer._parameters[qe.banks[0]].shape[0]
    if isinstance(found, _Unfollowed):
        why = (
            f"{_UNFOLLOWED} {found.banks[0]}[e] (F.linear, @, torch.matmul) or by the "
            "whole bank (torch.bmm), so the inputs each expert receives are unknown"
        )
        return {}, {}, {f"{name}.{b}[{i}]": why for b in banks for i in range(n_experts)}
    means, X, _ = found
    for bank in banks:
        skipped.update({f"{name}.{bank}[{e}]": UNROUTED for e in range(n_experts) if (bank, e) not in X})
    if "down_proj" in banks:
        for e in range(n_experts):
            key = f"{name}.down_proj[{e}]"
            if key in skipped:
                continue
            if up is None:
                skipped[key] = (
                    "no gate_up_proj rows scale down_proj's input one for one (see awq's docstring)"
                    if qe.banks[0] == "gate_up_proj"
                    else "no gate: act(up_proj) passes no scale through to down_proj's input"
                )
            else:
                down = qe.matrix("down_proj", e)
                s, a = _search_scale_of(
                    [(down, qe.bank_quantizer("down_proj"))], X[("down_proj", e)], means[("down_proj", e)], n_grid
                )
                fold_expert_scale(qe, e, up, s)
                exponents[key] = a
                X[("down_proj", e)] = X[("down_proj", e)] / s
    if clip:
        for bank in banks:
            for e in range(n_experts):
                if (bank, e) in X:
                    r = _clip_matrix(qe.matrix(bank, e), qe.bank_quantizer(bank), X[(bank, e)], n_grid, max_shrink)
                    if r is not None:
                        ratios[f"{name}.{bank}[{e}]"] = r
    return exponents, ratios, skipped


def _awq_layer(w: QWrapper) -> bool:
    return (isinstance(w.layer, nn.Linear) or type(w.layer).__name__ == "Conv1D") and not w.fold_bn


def _check(value, name: str, low: float, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value < low:
        raise ValueError(f"awq: {name} must be a {kind.__name__} >= {low}, got {value!r}")


@register_ptq_algorithm("awq", before_calibration=True)
def awq(
    model: nn.Module,
    data: Iterable,
    *,
    n_grid: int = 20,
    clip: bool = True,
    max_shrink: float = 0.5,
    sample_tokens: int = 2048,
    num_batches: int | None = None,
    blocks: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> AWQResult:
    """AWQ (Lin et al. 2023): activation-aware channel scales and a clipping search for the weight quantizers.

    See the module docstring. Run it on a model from :func:`~torchquant.quantize_model` (or
    :func:`torchquant.hf.quantize`) before calibrating. The float model's outputs change only
    through the clipping. If anything fails, the model is restored exactly.

    Args:
        model: a quantizable model with weight quantizers (any registered kind).
        data: calibration batches (as for :func:`~torchquant.ptq.calibrate`).
        n_grid: candidates of the scale exponent (and steps of the clipping ratio).
        clip: run the clipping search after scaling.
        max_shrink: the smallest clipping ratio is ``1 - max_shrink``.
        sample_tokens: input rows used to measure errors.
        num_batches: use at most this many batches of ``data``.
        blocks: the qualified name of the model's list of blocks (found when ``None``).
        seed: seed of the row sample.
        progress: show a progress bar over blocks.

    Returns:
        An :class:`AWQResult`.

    Raises:
        ValueError: no QModule, empty data or a bad option.

    Example:
        >>> import torch, torchquant as tq
        >>> from torch import nn
        >>> w4 = lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))
        >>> net = tq.quantize_model(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4)), w4, None, method="swap")
        >>> sorted(tq.ptq.awq(net, [torch.randn(64, 8)], progress=False).clip_ratios)
        ['1']
    """
    require_qmodules(model, "awq")
    if "awq" in getattr(model, SCALED_BY_ATTR, []):
        warnings.warn(
            "awq: awq already folded scales into this model: a second run scales and clips its already clipped "
            "weights again (the clip ratios compound); run it once, on the float-converted model",
            stacklevel=2,
        )
    _check(n_grid, "n_grid", 1)
    _check(sample_tokens, "sample_tokens", 1)
    _check(seed, "seed", 0)
    if not isinstance(clip, bool):
        raise ValueError(f"awq: clip must be a bool, got {clip!r}")
    if isinstance(max_shrink, bool) or not isinstance(max_shrink, (int, float)) or not 0 <= max_shrink < 1:
        raise ValueError(f"awq: max_shrink must be a number in [0, 1), got {max_shrink!r}")
    batches = materialize(data, num_batches, "awq")
    names = {m: n for n, m in model.named_modules()}
    exponents: dict[str, float] = {}
    clip_ratios: dict[str, float] = {}
    skipped: dict[str, str] = {}
    with all_or_nothing(model):
        model.eval()
        mode = QModuleState.BYPASSED
        inside: set[nn.Module] = set()
        for block in sequential_blocks(model, batches, blocks=blocks, mode=mode, who="awq", progress=progress):
            inside.update(w for _, w in block.layers)
            layers = [w for _, w in block.layers if _awq_layer(w) and w.weight_quantizer is not None]
            groups = block.groups(layers)
            x_mean, X = _stats(block, groups, sample_tokens, seed) if groups else ({}, {})
            first_of = {w: g[0] for g in groups for w in g}
            experts, shared, joint = block.joint_folds(groups)
            for group in groups:
                if group[0] in joint:  # scaled with the experts and the router reading the same norm
                    continue
                gname = ",".join(names[w] for w in group)
                target = block.fold_target(group)
                Xg = X[group[0]]
                if target is None:
                    skipped[gname] = block.unscaled_reason(group[0])
                else:
                    row = block.row_module(group)
                    ref = _row_output(*row, Xg) if row is not None else None
                    if row is not None and ref is not None:  # gate, up: the error of the MLP's output
                        matrices = [(w.weight_view(), w.weight_quantizer) for w in group]
                        s, a = _search_scale_module(*row, Xg, ref, matrices, x_mean[group[0]], n_grid)
                    else:
                        s, a = _search_scale(group, Xg, x_mean[group[0]], n_grid)
                    fold_input_scale(target, group, s)
                    exponents[gname] = a
                    Xg = Xg / s
                if clip:
                    for w in group:
                        ratio = _search_clip(w, Xg, n_grid, float(max_shrink))
                        if ratio is not None:
                            clip_ratios[names[w]] = ratio
            reobserve_weights(layers)
            data: dict[QExperts, _Stats | _Unfollowed] = {}
            for qe in experts:  # after the layers' scales: the experts' inputs are taken as they are now
                try:
                    data[qe] = _expert_stats(block, qe, _quantized_banks(qe), sample_tokens, seed)
                except _Unfollowed as e:
                    data[qe] = e
            for fold in shared.values():
                found = _awq_shared(block, fold, first_of, X, x_mean, data, n_grid, sample_tokens, seed)
                key = block.fold_name(fold)
                if isinstance(found, str):
                    skipped[key] = found
                else:
                    exponents[key] = found
                if clip:
                    for w in fold.layers:
                        ratio = _search_clip(w, X[first_of[w]], n_grid, float(max_shrink)) if w in first_of else None
                        if ratio is not None:
                            clip_ratios[names[w]] = ratio
                reobserve_weights([w for w in fold.layers if w.weight_quantizer is not None])
            for qe in experts:
                if qe.bank_quantizer(qe.banks[0]) is not None and not any(qe in f.experts for f in shared.values()):
                    skipped[f"{names[qe]}.{qe.banks[0]}"] = block.unscaled_reason(qe)
                up = block.up_rows(qe) if "down_proj" in _quantized_banks(qe) else None
                found = _awq_experts(qe, names[qe], data[qe], up, n_grid, clip, float(max_shrink))
                exponents.update(found[0])
                clip_ratios.update(found[1])
                skipped.update(found[2])
                reobserve_weights([qe])
    for reason, what in ((UNROUTED, "received no calibration token"), (_UNFOLLOWED, "could not be followed")):
        warn_skipped(skipped, reason, f"expert matrices {what} and keep their round-to-nearest weights", "awq")
    for name in layers_outside(model, inside, _awq_layer):
        skipped[name] = OUTSIDE_BLOCKS
    if exponents:  # scales folded into norms and layers: the activations changed (clipping alone changes none)
        reset_activation_ranges(model, "awq")
        mark_scaled(model, "awq")
    return AWQResult(exponents=exponents, clip_ratios=clip_ratios, skipped=skipped)
