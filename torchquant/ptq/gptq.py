"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): weight rounding with second-order error feedback.

For a layer with weight ``W`` (``(rows, cols)``: the :meth:`~torchquant.QWrapper.weight_view`,
a convolution's flattened to ``(out, in * kh * kw)``) and calibration inputs ``X``
(``(n, cols)``, a convolution's unfolded patches), GPTQ quantizes the columns of ``W`` one
at a time onto the weight quantizer's fixed grid and spreads each column's rounding
error over the columns not yet quantized so that ``||X W^T - X W_q^T||`` stays small:

* ``H = 2 X^T X / n``, accumulated batch by batch (activations are never stored);
  inputs with ``H_jj = 0`` (dead) get ``H_jj = 1`` and a zero weight; ``damp *
  mean(diag H)`` is added to the diagonal.
* ``U``: the upper Cholesky factor of ``H^-1``. Column ``j`` is rounded to nearest on its
  grid, ``q_j = Q(w_j)``, and the columns after it get ``W[:, k] -= (w_j - q_j) / U_jj *
  U_jk``; within a block of ``block_size`` columns this happens column by column, and
  the block's accumulated error reaches the later columns in one matrix product
  (lazy batch updates).
* ``act_order=True`` quantizes columns in order of decreasing ``H_jj``. The grid is
  computed before GPTQ (by calibration) and does not change, so with per-group grids
  the groups are always the grid's own, fixed groups of consecutive input channels
  ("static groups"): each column keeps its group's scale and zero point whatever order it
  is quantized in. A grid recomputed per group during GPTQ (the reference implementation's
  default without act order) is not offered: the grid belongs to the quantizer.

The quantized values are written into the layer's float weight; the grid (the observer's
ranges) is left as it is, so the frozen-range quantizer in ``QUANT_EVAL`` reproduces them
exactly. (Calibrating the weights again would recompute the ranges; do not.)

Layers are processed block by block on the sequential engine
(:mod:`torchquant.ptq.sequential`): the inputs of a transformer's decoder layer ``i`` are
the outputs of layer ``i - 1`` after it was quantized, and within a block the layers are
quantized group by group in forward order (``q, k, v``, then ``o``, then ``gate, up``, then
``down``), each group's Hessian collected afresh from the block whose earlier layers are
already quantized (sequential refinement; layers reading the same tensor share one
product). A model without a list of blocks is one block; layers outside the blocks (a
head) are processed last with passes over the whole model. The model runs in ``mode``
(``QUANT_EVAL`` by default) while inputs are collected, so each layer sees its inputs as
in quantized inference, after its ``input_quantizer`` when the mode quantizes activations.

Which layers: ``Linear``, Hugging Face ``Conv1D`` and ``Conv2d`` with ``groups=1``,
integer padding and ``padding_mode="zeros"``. Other weighted layers (grouped or depthwise
convolutions, ``Conv1d``/``Conv3d``, ``Embedding``) and wrappers with ``fold_bn=True`` (their
quantizer sees the BatchNorm-folded weight, not the stored one) keep their float weights,
to be rounded to nearest by their quantizer; :class:`GPTQResult` lists them with the reason.

Mixture-of-experts banks (:class:`~torchquant.QExperts`) are quantized expert by expert: each
expert's matrix in a bank is a layer of its own, with the Hessian of the inputs routed to that
expert (:func:`~torchquant.moe.expert_inputs`: the hidden states for ``gate_up_proj``/``up_proj``,
the gated intermediate for ``down_proj``, collected after the first bank is quantized). The
banks of a block come after its other layers (in a decoder layer the experts run last), and
hold ``experts * in * in`` floats of Hessians per bank while it is processed. An expert that
no calibration token reached keeps its float weights, rounded to nearest, and is listed in
:attr:`GPTQResult.skipped` (with a warning): more or longer batches reach more experts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..moe import QExperts, expert_inputs
from ..qmodules import QModuleState, QWrapper
from ..quantizers import AffineGrid
from ..utils import qmodule_state
from ._common import (
    UNROUTED,
    all_or_nothing,
    materialize,
    require_qmodules,
    tied_weights,
    warn_skipped,
    warn_tied,
)
from .registry import register_ptq_algorithm
from .sequential import Block, sequential_blocks

__all__ = ["GPTQResult", "gptq", "gptq_quantize_weight"]


@dataclass(frozen=True)
class GPTQResult:
    """What :func:`gptq` did.

    Attributes:
        losses: for each layer quantized by GPTQ (qualified name; ``"<experts>.<bank>[<e>]"``
            for expert ``e`` of a mixture-of-experts bank), the paper's loss
            ``sum_j ||w_j - q_j||^2 / (2 U_jj^2)`` over its columns (the increase of the layer's
            output error caused by rounding, in the units of ``H``).
        skipped: layers left to round-to-nearest, by qualified name, with the reason.
    """

    losses: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _skip_reason(w: QWrapper) -> str | None:
    layer = w.layer
    if w.fold_bn:
        return "fold_bn=True: its quantizer sees the BatchNorm-folded weight"
    if w.weight_is_computed:
        return "its weight is computed in forward (no parameter to write the result into)"
    if isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D":
        return None
    if type(layer) is nn.Conv2d:
        if layer.groups != 1:
            return f"a Conv2d with groups={layer.groups} (GPTQ handles groups=1)"
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            return f"a Conv2d with padding={layer.padding!r}, padding_mode={layer.padding_mode!r}"
        return None
    return f"{type(layer).__name__} layers are not handled by GPTQ"


def _rows(w: QWrapper, x: Tensor) -> Tensor:
    """The layer's input as ``(n, cols)`` rows matching the flattened weight view's columns."""
    layer = w.layer
    if isinstance(layer, nn.Conv2d):
        # (N, C, H, W) -> (N, C*kh*kw, L) -> (N*L, C*kh*kw): the order of weight.reshape(out, -1)
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])  # (..., in) -> (n, in)


def gptq_quantize_weight(
    weight: Tensor,
    hessian: Tensor,
    grid: AffineGrid,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    name: str = "",
) -> tuple[Tensor, float]:
    """GPTQ on one weight matrix (the module docstring's algorithm).

    Args:
        weight: ``(rows, cols)`` float weight.
        hessian: ``(cols, cols)`` ``2 X^T X / n`` of the layer's inputs.
        grid: the weight's affine grid; its scale and zero point broadcast against ``weight``
            (read per column: per-tensor, per-row or per-group grids all work).
        damp: fraction of ``mean(diag H)`` over the live columns (``H_jj > 0``) added to the
            diagonal; dead columns (never-nonzero inputs) get weight 0, whatever the scale of the rest.
        block_size: columns per lazy-update block.
        act_order: quantize columns in order of decreasing ``diag H``.
        name: the layer's name, for errors.

    Returns:
        The quantized weight (``(rows, cols)``, on ``grid``, dtype of ``weight``) and the loss.

    Raises:
        RuntimeError: ``H`` is not positive definite even after damping (raise ``damp``).
    """
    rows, cols = weight.shape
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float32).clone()
    scale = grid.scale.to(torch.float32).expand(rows, cols)
    zero = grid.zero_point.to(torch.float32).expand(rows, cols)
    dead = torch.diag(H) == 0
    # the damping's scale is the live columns' (a dead column's placeholder 1 would set it otherwise)
    live_mean = torch.diag(H)[~dead].mean() if bool((~dead).any()) else H.new_tensor(1.0)
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H, scale, zero = W[:, perm], H[perm][:, perm], scale[:, perm], zero[:, perm]
    H.diagonal().add_(damp * live_mean)
    with _single_threaded():
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)  # H^-1 = U^T U
        if int(info) != 0:
            who = f"gptq: {name}" if name else "gptq"
            raise RuntimeError(f"{who}: the Hessian is not positive definite with damp={damp}; use a larger damp")
        Q, loss = _round_columns(W, U, scale, zero, grid.qmin, grid.qmax, block_size)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(weight.dtype), float(loss)


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """One intra-op thread for the duration: the column loop is thousands of operations on vectors,
    where waking and joining threads costs more than it saves (measured on two CPU cores, a
    576 x 1536 weight: 1.5x slower unloaded, 20x faster while other processes compete for them)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _round_columns(
    W: Tensor, U: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int, block_size: int
) -> tuple[Tensor, Tensor]:
    """GPTQ's column loop with lazy batch updates: ``W``, ``scale``, ``zero`` ``(rows, cols)``, ``U`` ``(cols, cols)``.

    Returns the rounded ``(rows, cols)`` weight and the loss (float64). ``W`` is updated in place.
    """
    cols = W.shape[1]
    # Column j of a block is row j of its (b, rows) transposed copies: contiguous, and each
    # column's work is a few in-place vector operations (the same arithmetic, operation by
    # operation, as quantizing a column of W and updating the columns after it).
    Q = torch.empty_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].t().contiguous()  # (b, rows)
        S1 = scale[:, i1:i2].t().contiguous()
        Z1 = zero[:, i1:i2].t().contiguous()
        Q1 = torch.empty_like(W1)
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        for i in range(i2 - i1):
            w, s, z, q, err = W1[i], S1[i], Z1[i], Q1[i], Err1[i]  # (rows,) each
            torch.div(w, s, out=q).round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)
            torch.sub(w, q, out=err).div_(d[i])
            W1[i + 1 :].sub_(torch.outer(U1[i, i + 1 :], err))  # the block's later columns
        Q[:, i1:i2] = Q1.t()
        loss += Err1.pow(2).sum(dim=1).double().sum() / 2
        W[:, i2:] -= Err1.t() @ U[i1:i2, i2:]  # lazy batch update of the later columns
    return Q, loss


def _check(value, name: str, kind, low) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value < low:
        raise ValueError(f"gptq: {name} must be a {kind.__name__} >= {low}, got {value!r}")


@register_ptq_algorithm("gptq")
def gptq(
    model: nn.Module,
    data: Iterable,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    true_sequential: bool = True,
    num_batches: int | None = None,
    mode: QModuleState = QModuleState.QUANT_EVAL,
    blocks: str | None = None,
    progress: bool = True,
) -> GPTQResult:
    """GPTQ (Frantar et al. 2022): round each layer's weights with Hessian-based error feedback.

    See the module docstring for the algorithm, the layers it handles (mixture-of-experts
    banks expert by expert) and those it leaves to round-to-nearest. The model must be
    calibrated (weight quantizers with ranges; activation quantizers too when ``mode``
    quantizes activations). There is no randomness: the result depends only on the model and
    the data. If anything fails part-way, the model (weights, modes, training flags) is
    restored exactly as it was.

    Args:
        model: a quantizable model (from :func:`~torchquant.quantize_model`) whose weight
            quantizers report an affine grid (:meth:`~torchquant.quantizers.Quantizer.grid`).
        data: calibration batches (as for :func:`~torchquant.ptq.calibrate`).
        damp: dampening, as a fraction of the mean of ``diag H``.
        block_size: columns per lazy-update block.
        act_order: quantize columns in order of decreasing ``diag H`` (activation order).
        true_sequential: collect each group's Hessian after the block's earlier groups are
            quantized (the paper's "true sequential" option); ``False`` collects all of a block's
            Hessians in float (the block ``BYPASSED``, its inputs still from the quantized blocks
            before it) before any of its layers changes, as llm-compressor's pipeline does.
        num_batches: use at most this many batches of ``data``.
        mode: the mode every QModule runs in while inputs are collected.
        blocks: the qualified name of the model's list of blocks (decoder layers); found
            by itself when ``None``, none with ``""`` (one pass over the whole model per
            layer group; see :mod:`torchquant.ptq.sequential`). Layers outside the blocks (a
            head, a stem) are processed after them, on passes over the whole model.
        progress: show a progress bar over blocks.

    Returns:
        A :class:`GPTQResult`: the loss of each quantized layer and the layers skipped.

    Raises:
        TypeError: a weight quantizer without an affine grid (naming the module).
        ValueError: no QModule, empty data, a bad option, or no layer GPTQ can handle.
        RuntimeError: a weight quantizer without ranges (calibrate first), a Hessian that
            is not positive definite, or mixture-of-experts banks whose forward reads them in
            a way :func:`~torchquant.moe.expert_inputs` cannot follow (naming the module).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torchquant as tq
        >>> net = tq.quantize_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
        ...                         lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)), None, method="swap")
        >>> data = [torch.randn(16, 8)]
        >>> _ = tq.calibrate(net, data, progress=False)
        >>> sorted(tq.ptq.gptq(net, data, progress=False).losses)
        ['0', '2']
    """
    qmodules = require_qmodules(model, "gptq")
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not damp >= 0:
        raise ValueError(f"gptq: damp must be a number >= 0, got {damp!r}")
    _check(block_size, "block_size", int, 1)
    if not isinstance(act_order, bool):
        raise ValueError(f"gptq: act_order must be a bool, got {act_order!r}")
    if not isinstance(true_sequential, bool):
        raise ValueError(f"gptq: true_sequential must be a bool, got {true_sequential!r}")
    if not isinstance(mode, QModuleState):
        raise ValueError(f"gptq: mode must be a QModuleState, got {mode!r}")
    batches = materialize(data, num_batches, "gptq")
    names = {m: n for n, m in qmodules}
    todo: list[QWrapper] = []
    grids: dict[QWrapper, AffineGrid] = {}
    bank_grids: dict[tuple[QExperts, str], AffineGrid] = {}
    skipped: dict[str, str] = {}
    tied = tied_weights(model, [(n, m) for n, m in qmodules if isinstance(m, QWrapper)])
    for name, w in qmodules:
        if isinstance(w, QExperts):
            for bank in w.banks:
                q = w.bank_quantizer(bank)
                if q is not None:
                    rows = (w.layer._parameters[bank].shape[0] * _out_of(w, bank), _in_of(w, bank))
                    bank_grids[(w, bank)] = _grid_of(q, rows, f"the {bank} quantizer of {name}")
            continue
        if not isinstance(w, QWrapper) or w.weight_quantizer is None:
            continue
        reason = _skip_reason(w)
        if reason is None and w in tied:
            reason = f"its weight is shared with {', '.join(tied[w])} (round to nearest)"
        if reason is not None:
            skipped[name] = reason
            continue
        grids[w] = _grid_of(w.weight_quantizer, w.weight_view().shape, f"the weight quantizer of {name}")
        todo.append(w)
    experts = list(dict.fromkeys(qe for qe, _ in bank_grids))
    if not todo and not experts:
        raise ValueError(f"gptq: no layer that GPTQ handles in {type(model).__name__} (skipped: {skipped})")
    options = {"damp": float(damp), "block_size": block_size, "act_order": act_order}

    with all_or_nothing(model):
        model.eval()
        losses: dict[str, float] = {}
        left = set(todo)
        experts_left = set(experts)

        def process(block: Block) -> None:
            groups = block.groups([w for _, w in block.layers if w in left])
            mine = [qe for qe in experts if qe in experts_left and _inside(qe, block.module)]
            early: dict[QWrapper, Tensor] = {}
            early_banks: dict[tuple[QExperts, str, int], Tensor] = {}
            if not true_sequential:  # every Hessian from the float block, before any of its layers changes
                with qmodule_state(block.module, QModuleState.BYPASSED):
                    for g in groups:
                        early.update(_hessians(block, g))
                    if mine:
                        quantized = {qe: [b for b in qe.banks if (qe, b) in bank_grids] for qe in mine}
                        early_banks = _expert_hessians(block, quantized, names)
            for group in groups:
                hessians = _hessians(block, group) if true_sequential else early
                for w in group:
                    wv = w.weight_view()  # (out, in, ...) view of the parameter
                    q, loss = gptq_quantize_weight(
                        wv.reshape(wv.shape[0], -1), hessians[w], _flat(grids[w], wv.shape), name=names[w], **options
                    )
                    with torch.no_grad():
                        wv.copy_(q.reshape(wv.shape))
                    losses[names[w]] = loss
                    left.discard(w)
            if not mine:
                return
            for step in range(max(len(qe.banks) for qe in mine)):  # the first banks, then down_proj
                banks = {
                    qe: [qe.banks[step]] for qe in mine if step < len(qe.banks) and (qe, qe.banks[step]) in bank_grids
                }
                if not banks:
                    continue
                hessians_b = _expert_hessians(block, banks, names) if true_sequential else early_banks
                for qe, (bank,) in banks.items():
                    _gptq_bank(qe, bank, names[qe], bank_grids[(qe, bank)], hessians_b, losses, skipped, options)
            experts_left.difference_update(mine)

        for block in sequential_blocks(model, batches, blocks=blocks, mode=mode, who="gptq", progress=progress):
            process(block)
        if left or experts_left:  # layers outside the blocks (a head, a stem): passes over the whole model
            for block in sequential_blocks(model, batches, blocks="", mode=mode, who="gptq", progress=False):
                process(block)
        for m in sorted(left, key=names.get) + sorted(experts_left, key=names.get):
            skipped[names[m]] = _NEVER_CALLED
    left_to_rtn = (
        (
            _NEVER_CALLED,
            "quantized module(s) were never called by the forward pass",
            "a module whose weight its parent reads directly (Jamba's mamba dt_proj) is never called, and "
            "branches the batches do not take are not either",
        ),
        (
            _NO_TOKENS,
            "expert matrices received no calibration token",
            "more or longer calibration batches reach more experts",
        ),
    )
    warn_tied({w: h for w, h in tied.items() if w.weight_quantizer is not None}, names, "gptq")
    for reason, what, hint in left_to_rtn:
        warn_skipped(skipped, reason, f"{what} and keep their round-to-nearest weights", "gptq", hint)
    return GPTQResult(losses=losses, skipped=skipped)


_NO_TOKENS = f"{UNROUTED} (round to nearest)"
_NEVER_CALLED = "never called by the forward pass (round to nearest)"


def _grid_of(q, shape, who: str) -> AffineGrid:
    """The affine grid of weight quantizer ``q`` (named ``who``), checked against the weight's ``shape``."""
    try:
        grid = q.grid()
    except RuntimeError as e:
        raise RuntimeError(f"gptq: {who} has no ranges; calibrate first ({e})") from e
    if grid is None:
        raise TypeError(
            f"gptq: {who} ({type(q).__name__}) reports no affine grid; GPTQ needs one (e.g. AffineQuantizer)"
        )
    grid.check(shape, f"gptq: {who}")
    return grid


def _inside(m: nn.Module, block: nn.Module) -> bool:
    return any(x is m for x in block.modules())


def _in_of(qe: QExperts, bank: str) -> int:
    return qe.matrix(bank, 0).shape[1]


def _out_of(qe: QExperts, bank: str) -> int:
    return qe.matrix(bank, 0).shape[0]


def _expert_hessians(
    block: Block, banks: dict[QExperts, list[str]], names: dict
) -> dict[tuple[QExperts, str, int], Tensor]:
    """``2 X^T X / n`` of the inputs routed to each expert of the ``banks`` of each experts module,
    over the block's batches: ``{(experts module, bank, expert): (in, in)}``. Experts no token
    reached are left out."""
    sums: dict[tuple[QExperts, str, int], Tensor] = {}
    counts: dict[tuple[QExperts, str, int], int] = {}
    seen: set[tuple[QExperts, str]] = set()

    def reporter(qe: QExperts):
        def report(bank: str, e: int, x: Tensor) -> None:
            seen.add((qe, bank))
            X = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # (n, in)
            if X.shape[1] != _in_of(qe, bank):
                raise RuntimeError(
                    f"gptq: expert {e} of {names[qe]} reads {bank} with inputs of width {X.shape[1]}, "
                    f"expected {_in_of(qe, bank)}"
                )
            key = (qe, bank, e)
            xtx = X.t() @ X
            sums[key] = xtx if key not in sums else sums[key] + xtx
            counts[key] = counts.get(key, 0) + X.shape[0]

        return report

    with contextlib.ExitStack() as stack:
        for qe, wanted in banks.items():
            stack.enter_context(expert_inputs(qe, reporter(qe), wanted))
        block.run()
    quiet = [f"{names[qe]}.{b}" for qe, wanted in banks.items() for b in wanted if (qe, b) not in seen]
    if quiet:
        raise RuntimeError(
            f"gptq: could not see which inputs the experts' banks {quiet} receive: the forward pass did not "
            "call them, or their forward does not multiply by bank[e] (F.linear, @, torch.matmul) or by the "
            "whole bank (torch.bmm)"
        )
    return {k: 2.0 * sums[k] / counts[k] for k in sums if bool(sums[k].diagonal().any())}


def _gptq_bank(
    qe: QExperts,
    bank: str,
    name: str,
    grid: AffineGrid,
    hessians: dict[tuple[QExperts, str, int], Tensor],
    losses: dict[str, float],
    skipped: dict[str, str],
    options: dict,
) -> None:
    """GPTQ on every expert's matrix of one bank, each with its own Hessian and its rows of the grid."""
    n_experts = qe.layer._parameters[bank].shape[0]
    out, cols = _out_of(qe, bank), _in_of(qe, bank)
    flat = _flat(grid, torch.Size((n_experts * out, cols)))  # the (E * out, in) rows the quantizer sees
    for e in range(n_experts):
        key = f"{name}.{bank}[{e}]"
        h = hessians.get((qe, bank, e))
        if h is None:
            skipped[key] = _NO_TOKENS
            continue
        rows = slice(e * out, (e + 1) * out)
        sub = AffineGrid(flat.scale[rows], flat.zero_point[rows], flat.qmin, flat.qmax, flat.granularity)
        w = qe.matrix(bank, e)
        q, losses[key] = gptq_quantize_weight(w, h, sub, name=key, **options)
        with torch.no_grad():
            w.copy_(q)


def _flat(grid: AffineGrid, shape: torch.Size) -> AffineGrid:
    """``grid`` with scale and zero point expanded to ``shape`` and flattened to ``(out, rest)``."""
    rows = shape[0]
    return AffineGrid(
        grid.scale.expand(shape).reshape(rows, -1),
        grid.zero_point.expand(shape).reshape(rows, -1),
        grid.qmin,
        grid.qmax,
        grid.granularity,
    )


def _own_input(w: QWrapper) -> bool:
    """Whether ``w`` transforms or quantizes its input before its layer reads it."""
    return w.input_transform is not None or (w.input_quantizer is not None and w.qstate.is_act_quantized)


def _hessians(block: Block, group: list[QWrapper]) -> dict[QWrapper, Tensor]:
    """``2 X^T X / n`` of each layer's inputs as its layer reads them (after its input transform,
    and its input quantizer when the mode quantizes activations), over all of the block's
    batches; layers reading the same tensor share the product.

    Each pass over a batch stops before the first layer that is not needed (when every layer
    is called once): before the group's first layer when the group shares one product."""
    sums: dict[QWrapper, Tensor] = {}
    counts: dict[QWrapper, int] = {}
    shared: dict[int, tuple[Tensor, Tensor, int]] = {}

    def pre(mod: QWrapper, x: Tensor, i: int) -> None:
        x = x.detach()
        own = _own_input(mod)
        key = id(x)
        if not own and key in shared and shared[key][0] is x:
            _, xtx, n = shared[key]
        else:
            if mod.input_transform is not None:
                x = mod.input_transform(x)
            if mod.input_quantizer is not None and mod.qstate.is_act_quantized:
                x = mod.input_quantizer(x)
            X = _rows(mod, block.real_tokens(mod, x, i)).to(torch.float32)  # (n, cols), padding left out
            xtx, n = X.t() @ X, X.shape[0]
            if not own:
                shared.clear()  # only the current tensor can be read again
                shared[key] = (x, xtx, n)
        sums[mod] = xtx if mod not in sums else sums[mod] + xtx
        counts[mod] = counts.get(mod, 0) + n

    own = [w for w in group if _own_input(w)]
    once = block.called_once()
    # The group's layers read one tensor (Block.groups); when none transforms it, the first
    # layer's product is every layer's, and the pass can stop before the first layer runs.
    hooked = group[:1] if once and not own else group
    block.run({w: pre for w in hooked}, stop_after=hooked[-1] if once else None)
    missing = [w for w in hooked if w not in sums]
    if missing:
        raise RuntimeError(f"gptq: {type(missing[0].layer).__name__} layer was not called while collecting inputs")
    h = {w: 2.0 * sums[w] / counts[w] for w in hooked}
    return {w: h.get(w, h[group[0]]) for w in group}
