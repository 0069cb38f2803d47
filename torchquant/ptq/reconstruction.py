"""One reconstruction engine for AdaRound, BRECQ and QDrop.

The engine walks the model's *units* in forward order and, for each, learns
how to round its weights (and optionally its activation step sizes) so that
the quantized unit reproduces the float unit's output:

``min_V  || unit_q(x_q) - unit_fp(x_fp) ||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)``

* ``x_q`` is the unit's input in the quantized model (units before it already
  reconstructed), ``unit_fp(x_fp)`` the float model's output of the same unit.
  The squared error is summed over channels (dim 1) and averaged over the rest
  (each element weighted by the diagonal Fisher with ``loss="fisher"``, below).
* Weights use AdaRound's soft rounding (Nagel et al. 2020, "Up or Down? Adaptive
  Rounding for Post-Training Quantization"): ``W_q = s * (clamp(floor(W / s) + h(V)
  + z, qmin, qmax) - z)`` with the rectified sigmoid ``h`` (``zeta = 1.1``,
  ``gamma = -0.1``), on the grid any weight quantizer reports through
  :meth:`~torchquant.quantizers.Quantizer.grid` (:class:`AdaRoundQuantizer`). The
  regulariser's ``beta`` is annealed linearly from 20 to 2 after a warm-up of 20%
  of the iterations without it; ``lambda = 0.01``; Adam.
* Afterwards the rounding is made hard (``h = [V >= 0]``), the rounded grid values
  are written into the layer's weight and the original weight quantizer is put
  back: its grid is unchanged, so in ``QUANT_EVAL`` modes it reproduces them exactly,
  and the model saves and loads like any other quantized model. (Calibrating the
  weights again would recompute their ranges from the rounded weights; do not.)

The presets differ only by options:

=============  ===========  ==============================  =================  ==================  ========
preset         granularity  activations inside the unit     drop probability   learned act. steps  loss
=============  ===========  ==============================  =================  ==================  ========
``adaround``   layer        float (weight-only; loss on the  0                  no                  mse
                            layer output after BatchNorm
                            and activation, before its
                            output quantizer)
``brecq``      block        quantized                       0                  yes (default)       fisher
``qdrop``      block        quantized, each element kept     0.5 (also mixes    yes (default)       mse
                            float with probability ``p``     float inputs in)
=============  ===========  ==============================  =================  ==================  ========

Blocks (BRECQ, Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training
Quantization by Block Reconstruction") are residual blocks: by default
:class:`torchquant.bench.models.ResidualBlock` / ``InvertedResidual`` and, when
torchvision is loaded, its ``BasicBlock``, ``Bottleneck`` and ``InvertedResidual``;
or the types / qualified-name globs given as ``blocks``. Layers outside every
block are reconstructed on their own.

``loss="fisher"`` is BRECQ's diagonal-Fisher weighting: each element of the squared
error is weighted by the squared gradient, w.r.t. the unit's output, of the task
loss, here ``KL(softmax(float logits) || softmax(quantized logits))`` (no labels
needed), computed once per unit on the calibration data in the model quantized up
to and including the unit (later QModules bypassed, the unit still rounded to
nearest). The weights are normalised to mean 1 and damped:
``(g^2 / mean(g^2) + fisher_damping) / (1 + fisher_damping)``.

QDrop (Wei et al. 2022, "QDrop: Randomly Dropping Quantization for Extremely
Low-bit Post-Training Quantization") replaces each quantized activation inside the
unit, and each element of the unit's input, by its float value with probability
``drop_prob`` at every iteration (no drop once reconstructed).

Learned activation step sizes (``learn_act_step=True``, the default of both block
presets, whose papers learn them jointly with the rounding) follow LSQ (Esser et
al. 2020): the step of each per-tensor or per-channel
:class:`~torchquant.AffineQuantizer` inside the unit starts from its calibrated
value, is trained with the straight-through estimator by Adam at a learning rate
*relative* to that value (``act_lr`` times the quantizer's mean step), annealed to 0 with a cosine
as in both papers, and is written back into its observer's ranges.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..qmodules import QModule, QModuleState, QWrapper, iter_qmodules
from ..quantizers import AdaRoundQuantizer, AffineGrid, AffineQuantizer, Quantizer
from ..quantizers_functional import round_ste
from ._common import Snapshot, call_model, capture, forward_order, materialize, progress_bar, require_qmodules

__all__ = ["AdaRoundQuantizer", "adaround", "brecq", "qdrop", "reconstruct"]


class _LearnedStep(Quantizer):
    """LSQ-style activation quantizer on a copy of an AffineQuantizer's grid, step trained by STE."""

    def __init__(self, inner: AffineQuantizer) -> None:
        super().__init__()
        grid = inner.grid()
        self.inner = inner
        self.step = nn.Parameter(grid.scale.detach().clone())
        self.register_buffer("zero_point", grid.zero_point.detach().clone())
        self.qmin, self.qmax = grid.qmin, grid.qmax

    def pre_observe(self, x: Tensor) -> None:
        pass

    def post_observe(self, x: Tensor) -> None:
        pass

    def quantize(self, x: Tensor) -> Tensor:
        s = self.step.abs().clamp(min=1e-8)
        q = torch.clamp(round_ste(x / s) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * s

    def write_back(self) -> None:
        """Set the inner quantizer's ranges so that its step is the learned one (zero point unchanged)."""
        obs = self.inner.range_observer
        s = self.step.detach().abs().clamp(min=1e-8)
        if self.inner.symmetric:
            half = (self.qmax - self.qmin) / 2
            mn, mx = -s * half, s * half
        else:
            mn, mx = (self.qmin - self.zero_point) * s, (self.qmax - self.zero_point) * s
        obs.force_ranges(mn.reshape(obs.min_val.shape), mx.reshape(obs.max_val.shape))


class _Drop(Quantizer):
    """QDrop: each element of ``inner(x)`` is replaced by ``x`` with probability ``p``."""

    def __init__(self, inner: Quantizer, p: float, generator: torch.Generator) -> None:
        super().__init__()
        self.inner = inner
        self.p = p
        self.generator = generator

    def pre_observe(self, x: Tensor) -> None:
        pass

    def post_observe(self, x: Tensor) -> None:
        pass

    def quantize(self, x: Tensor) -> Tensor:
        drop = torch.rand(x.shape, generator=self.generator, device=x.device) < self.p
        return torch.where(drop, x, self.inner(x))


def _default_blocks() -> tuple[type[nn.Module], ...]:
    from ..bench.models import InvertedResidual, ResidualBlock

    types: list[type[nn.Module]] = [ResidualBlock, InvertedResidual]
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is not None:
        types += [resnet.BasicBlock, resnet.Bottleneck]
    mbv2 = sys.modules.get("torchvision.models.mobilenetv2")
    if mbv2 is not None:
        types.append(mbv2.InvertedResidual)
    return tuple(types)


def _units(model: nn.Module, granularity: str, blocks: Sequence[Any] | None) -> list[tuple[str, nn.Module]]:
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, QWrapper) and m.weight_quantizer is not None]
    if granularity == "layer":
        return wrappers
    specs = tuple(blocks) if blocks is not None else _default_blocks()
    for s in specs:
        if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
            raise TypeError(f"reconstruct: blocks entries must be nn.Module types or name globs, got {s!r}")

    def is_block(name: str, m: nn.Module) -> bool:
        return any(
            (isinstance(s, str) and fnmatch.fnmatchcase(name, s)) or (isinstance(s, type) and isinstance(m, s))
            for s in specs
        )

    units: list[tuple[str, nn.Module]] = []
    covered: set[int] = set()
    for name, m in model.named_modules():
        if name and id(m) not in covered and is_block(name, m):
            inner = [w for w in m.modules() if isinstance(w, QWrapper) and w.weight_quantizer is not None]
            if inner:
                units.append((name, m))
                covered.update(id(x) for x in m.modules())
    if not units:
        raise ValueError(
            f"reconstruct: granularity='block' found no block in {type(model).__name__} among "
            f"{[getattr(s, '__name__', s) for s in specs]}; pass blocks=[BlockType or 'name.glob']"
        )
    units += [(n, w) for n, w in wrappers if id(w) not in covered]
    return units


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"reconstruct: {name} must be an int >= 1, got {value!r}")
    return value


def reconstruct(
    model: nn.Module,
    data: Iterable,
    *,
    granularity: str = "layer",
    blocks: Sequence[type[nn.Module] | str] | None = None,
    act_quant: bool = False,
    drop_prob: float = 0.0,
    learn_act_step: bool = False,
    loss: str = "mse",
    fisher_damping: float | None = None,
    iters: int = 10000,
    batch_size: int = 32,
    lr: float = 1e-3,
    act_lr: float = 4e-4,
    reg_weight: float = 0.01,
    beta: tuple[float, float] = (20.0, 2.0),
    warmup: float = 0.2,
    mode: QModuleState = QModuleState.QUANT_EVAL,
    num_batches: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Learn the weight rounding of a calibrated model unit by unit (see the module docstring).

    The model must be calibrated (every quantizer has its ranges) and runs in ``mode``
    while the inputs of each unit are collected; a float copy gives the targets. On
    success the weights hold the hard-rounded grid values; if anything fails
    part-way, the model is restored exactly as it was.

    Args:
        model: a calibrated model with QWrappers whose weight quantizers report a grid.
        data: calibration batches (as for :func:`~torchquant.ptq.calibrate`); all of them
            (or ``num_batches``) are kept in memory as unit inputs.
        granularity: ``"layer"`` (each QWrapper) or ``"block"`` (see ``blocks``).
        blocks: for ``"block"``: module types and/or qualified-name globs of the blocks.
        act_quant: quantize activations inside the unit while reconstructing it.
        drop_prob: QDrop's probability of keeping an activation (and an input element) float.
        learn_act_step: also learn the steps of the unit's activation AffineQuantizers (LSQ).
        loss: ``"mse"`` (squared error summed over channels) or ``"fisher"`` (each element
            weighted by BRECQ's diagonal Fisher; the model must return logits ``(N, C, ...)``).
        fisher_damping: with ``loss="fisher"``: added to the normalised Fisher weights (default 1.0).
        iters: optimisation steps per unit.
        batch_size: samples per step, drawn at random from the unit's cached inputs.
        lr: Adam learning rate of the rounding variables.
        act_lr: Adam learning rate of the activation steps, relative to each step's calibrated
            value, annealed to 0 with a cosine. The default 4e-4 corresponds to the papers'
            4e-5 for steps of about 0.1 over their 20k iterations; short runs need about 1e-2.
        reg_weight: ``lambda``, weight of the rounding regulariser.
        beta: ``(start, end)`` of the annealed regulariser exponent.
        warmup: fraction of ``iters`` without the regulariser.
        mode: the quantized mode the model is used in: ``QUANT_EVAL`` or ``QUANT_EVAL_WEIGHT_ONLY``.
        num_batches: use at most this many batches of ``data``.
        seed: seeds the sampling and QDrop's masks (results are reproducible for a seed).
        progress: show a progress bar over units.

    Returns:
        The final reconstruction loss of each unit, by qualified name.

    Raises:
        ValueError: no QModule, empty data, a wrong mode or option, no unit found,
            or a unit not called with one tensor.
        TypeError: a weight quantizer without an affine grid (or, with
            ``learn_act_step``, an activation quantizer that is not an AffineQuantizer).
        RuntimeError: the model does not run on ``data`` in ``mode`` (e.g. not calibrated).
    """
    qmodules = require_qmodules(model, "reconstruct")
    if granularity not in ("layer", "block"):
        raise ValueError(f"reconstruct: granularity must be 'layer' or 'block', got {granularity!r}")
    if blocks is not None and granularity != "block":
        raise ValueError("reconstruct: blocks is only used with granularity='block'")
    if not isinstance(mode, QModuleState) or mode not in (QModuleState.QUANT_EVAL, QModuleState.QUANT_EVAL_WEIGHT_ONLY):
        raise ValueError(f"reconstruct: mode must be QUANT_EVAL or QUANT_EVAL_WEIGHT_ONLY, got {mode!r}")
    if not 0.0 <= float(drop_prob) < 1.0:
        raise ValueError(f"reconstruct: drop_prob must be in [0, 1), got {drop_prob!r}")
    if (drop_prob > 0 or learn_act_step) and not act_quant:
        raise ValueError("reconstruct: drop_prob > 0 and learn_act_step need act_quant=True")
    if act_quant and mode is not QModuleState.QUANT_EVAL:
        raise ValueError("reconstruct: act_quant=True needs mode=QUANT_EVAL (activations quantized)")
    if loss not in ("mse", "fisher"):
        raise ValueError(f"reconstruct: loss must be 'mse' or 'fisher', got {loss!r}")
    if fisher_damping is not None and loss != "fisher":
        raise ValueError("reconstruct: fisher_damping is only used with loss='fisher'")
    damping = 1.0 if fisher_damping is None else fisher_damping
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"reconstruct: fisher_damping must be a number >= 0, got {fisher_damping!r}")
    iters = _check_positive_int(iters, "iters")
    batch_size = _check_positive_int(batch_size, "batch_size")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"reconstruct: warmup must be in [0, 1), got {warmup!r}")
    if len(beta) != 2 or not beta[0] >= beta[1] > 0:
        raise ValueError(f"reconstruct: beta must be (start, end) with start >= end > 0, got {beta!r}")
    batches = materialize(data, num_batches, "reconstruct")
    units = _units(model, granularity, blocks)
    for name, unit in units:
        for w in [unit] if isinstance(unit, QWrapper) else unit.modules():
            if isinstance(w, QWrapper) and w.weight_quantizer is not None:
                _grid_of(w.weight_quantizer, f"the weight quantizer of {name}")
            if learn_act_step and isinstance(w, QModule) and w.quantizers().get("acts_quantizer") is not None:
                q = w.acts_quantizer
                if not isinstance(q, AffineQuantizer):
                    raise TypeError(
                        f"reconstruct: learn_act_step needs AffineQuantizer activation quantizers; "
                        f"{name} has {type(q).__name__} (pass learn_act_step=False to keep its ranges)"
                    )

    saved_modes = [(m, m.qstate) for _, m in qmodules]
    saved_training = [(m, m.training) for m in model.modules()]
    snapshot = Snapshot(model)
    try:
        float_model = copy.deepcopy(model)
        for _, m in iter_qmodules(float_model):
            m.qstate = QModuleState.BYPASSED
        float_model.eval()
        float_modules = dict(float_model.named_modules())
        model.eval()
        for _, m in qmodules:
            m.qstate = mode
        try:
            with torch.no_grad():
                call_model(model, batches[0], "reconstruct")
        except Exception as e:
            raise RuntimeError(
                f"reconstruct: the model does not run on the first batch in {mode.name} "
                f"(calibrate it first and check the input shape): {e}"
            ) from e
        names = {m: n for n, m in units}
        order = forward_order(model, [m for _, m in units], batches[0], "reconstruct")
        missing = [n for n, m in units if m not in order]
        if missing:
            raise ValueError(f"reconstruct: units never called by the forward pass: {missing}")
        all_order = forward_order(model, [m for _, m in qmodules], batches[0], "reconstruct")
        refs: list[Tensor] = []
        if loss == "fisher":
            with torch.no_grad():
                refs = [_logits(call_model(float_model, b, "reconstruct")) for b in batches]
        losses: dict[str, float] = {}
        opts = dict(
            act_quant=act_quant,
            drop_prob=float(drop_prob),
            learn_act_step=learn_act_step,
            iters=iters,
            batch_size=batch_size,
            lr=lr,
            act_lr=act_lr,
            reg_weight=reg_weight,
            beta=beta,
            warmup=warmup,
            mode=mode,
        )
        for i, unit in enumerate(progress_bar(order, len(order), "reconstruct", progress)):
            name = names[unit]
            x_q, _ = capture(model, unit, batches, "reconstruct", name, want_output=False)
            x_fp, y_fp = capture(float_model, float_modules[name], batches, "reconstruct", name, want_output=True)
            weight = None
            if loss == "fisher":
                inside = {id(m) for m in unit.modules()}
                last = max(k for k, m in enumerate(all_order) if id(m) in inside)
                weight = _fisher_weights(model, unit, all_order[last + 1 :], batches, refs, float(damping))
            gen = torch.Generator(device=x_q.device).manual_seed(seed * 100003 + i)
            losses[name] = _reconstruct_unit(unit, x_q, x_fp, y_fp, weight, gen, **opts)
    except BaseException:
        snapshot.restore()
        raise
    for m, s in saved_modes:
        m.qstate = s
    for m, t in saved_training:
        m.training = t
    return losses


def _logits(out: Any) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() < 2:
        raise ValueError(
            "reconstruct: loss='fisher' needs a model that returns class logits (a tensor of shape (N, C, ...)), "
            f"got {type(out).__name__}{'' if not isinstance(out, Tensor) else ' of shape ' + str(tuple(out.shape))}; "
            "pass loss='mse'"
        )
    return out


def _fisher_weights(
    model: nn.Module, unit: nn.Module, later: list[nn.Module], batches: list, refs: list[Tensor], damping: float
) -> Tensor:
    """BRECQ's diagonal Fisher weights of ``unit``'s output, one per output element.

    ``g`` is the gradient w.r.t. the unit's output of ``KL(softmax(float logits) || softmax(model logits))``
    summed over the batch, in the model quantized up to and including the unit (the QModules called
    after it run in ``BYPASSED``). Returns ``(g ** 2 / mean(g ** 2) + damping) / (1 + damping)``,
    shaped like the unit's outputs over all batches (mean 1).
    """
    saved = [(m, m.qstate) for m in later]
    store: dict[str, Tensor] = {}

    def hook(mod: nn.Module, args: Any, out: Tensor) -> Tensor:
        leaf = out.detach().requires_grad_(True)
        store["out"] = leaf
        return leaf.clone()  # not the leaf itself: the model may modify the output in place

    grads = []
    handle = unit.register_forward_hook(hook)
    try:
        for m in later:
            m.qstate = QModuleState.BYPASSED
        with torch.enable_grad():
            for batch, ref in zip(batches, refs):
                out = _logits(call_model(model, batch, "reconstruct"))
                kl = F.kl_div(out.log_softmax(1), ref.log_softmax(1), reduction="sum", log_target=True)
                (g,) = torch.autograd.grad(kl, store["out"])
                grads.append(g)
    finally:
        handle.remove()
        for m, s in saved:
            m.qstate = s
    g2 = torch.cat(grads).pow(2)
    mean = g2.mean()
    g2 = g2 / mean if mean > 0 else torch.ones_like(g2)
    return (g2 + damping) / (1 + damping)


def _grid_of(q: Quantizer, who: str) -> AffineGrid:
    try:
        grid = q.grid()
    except RuntimeError as e:
        raise RuntimeError(f"reconstruct: {who} has no ranges; calibrate the model first ({e})") from e
    if grid is None:
        raise TypeError(f"reconstruct: {who} ({type(q).__name__}) reports no affine grid; AdaRound needs one")
    return grid


def _reconstruct_unit(
    unit: nn.Module,
    x_q: Tensor,
    x_fp: Tensor,
    y_fp: Tensor,
    weight: Tensor | None,
    gen: torch.Generator,
    *,
    act_quant: bool,
    drop_prob: float,
    learn_act_step: bool,
    iters: int,
    batch_size: int,
    lr: float,
    act_lr: float,
    reg_weight: float,
    beta: tuple[float, float],
    warmup: float,
    mode: QModuleState,
) -> float:
    if x_q.shape != x_fp.shape:
        raise ValueError(
            f"reconstruct: quantized and float inputs of {type(unit).__name__} differ in shape: "
            f"{tuple(x_q.shape)} vs {tuple(x_fp.shape)}"
        )
    qmods = [m for m in unit.modules() if isinstance(m, QModule)]
    wrappers = [m for m in qmods if isinstance(m, QWrapper) and m.weight_quantizer is not None]
    saved_q: list[tuple[QModule, str, Quantizer]] = []
    saved_grad = [(p, p.requires_grad) for p in unit.parameters()]
    ada: dict[QWrapper, AdaRoundQuantizer] = {}
    learned: list[_LearnedStep] = []
    try:
        for p, _ in saved_grad:
            p.requires_grad_(False)
        for w in wrappers:
            ada[w] = AdaRoundQuantizer(_grid_of(w.weight_quantizer, "weight quantizer"), w.layer.weight)
            saved_q.append((w, "weight_quantizer", w.weight_quantizer))
            w.weight_quantizer = ada[w]
        if act_quant:
            for m in qmods:
                q = m.quantizers().get("acts_quantizer")
                if q is None:
                    continue
                saved_q.append((m, "acts_quantizer", q))
                new: Quantizer = q
                if learn_act_step:
                    new = _LearnedStep(q)
                    learned.append(new)
                if drop_prob > 0:
                    new = _Drop(new, drop_prob, gen)
                m.acts_quantizer = new
        unit_mode = QModuleState.QUANT_EVAL if act_quant else QModuleState.QUANT_EVAL_WEIGHT_ONLY
        for m in qmods:
            m.qstate = unit_mode
        groups = [{"params": [a.alpha for a in ada.values()], "lr": lr}]
        # act_lr is relative: each step moves by about act_lr times its calibrated value per iteration.
        groups += [{"params": [s.step], "lr": act_lr * float(s.step.detach().abs().mean())} for s in learned]
        opt = torch.optim.Adam(groups)
        # Both papers anneal the activation steps' learning rate to 0 with a cosine.
        act_lrs = [g["lr"] for g in opt.param_groups[1:]]
        n = x_q.shape[0]
        warm = int(warmup * iters)
        rec = torch.zeros(())
        for it in range(iters):
            idx = torch.randint(n, (min(batch_size, n),), generator=gen, device=x_q.device)
            x = x_q[idx]
            if drop_prob > 0:
                x = torch.where(torch.rand(x.shape, generator=gen, device=x.device) < drop_prob, x_fp[idx], x)
            y = unit(x)
            err = (y - y_fp[idx]).pow(2)
            if weight is not None:
                err = err * weight[idx]
            rec = err.sum(1).mean()
            loss = rec
            if it >= warm and reg_weight > 0:
                t = (it - warm) / max(iters - warm, 1)
                b = beta[1] + (beta[0] - beta[1]) * (1 - t)
                loss = loss + reg_weight * sum(a.regularizer(b) for a in ada.values())
            for g, base in zip(opt.param_groups[1:], act_lrs):
                g["lr"] = base * 0.5 * (1 + math.cos(math.pi * it / iters))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            for w, a in ada.items():
                a.soft = False
                w.layer.weight.copy_(a(w.layer.weight))
            for s in learned:
                s.write_back()
        return float(rec.detach())
    finally:
        for m, attr, q in reversed(saved_q):
            setattr(m, attr, q)
        for m in qmods:
            m.qstate = mode
        for p, g in saved_grad:
            p.requires_grad_(g)


def _preset(who: str, fixed: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise TypeError(f"{who}: {clash} are fixed by this preset; call torchquant.ptq.reconstruct to change them")
    return {**fixed, **kwargs}


def adaround(model: nn.Module, data: Iterable, **kwargs: Any) -> dict[str, float]:
    """AdaRound (Nagel et al. 2020): layer-wise, weight-only reconstruction of the rounding.

    :func:`reconstruct` with ``granularity="layer"``, ``act_quant=False``, ``drop_prob=0``.
    Each layer's inputs come from the quantized model (activations quantized in
    ``QUANT_EVAL``, earlier layers already rounded); the loss is on its output
    after BatchNorm and activation, before its output quantizer.

    Args:
        model: a calibrated quantizable model.
        data: calibration batches.
        **kwargs: the other options of :func:`reconstruct` (``iters``, ``batch_size``, ``lr``,
            ``reg_weight``, ``beta``, ``warmup``, ``mode``, ``num_batches``, ``seed``, ``progress``).

    Returns:
        The final reconstruction loss of each layer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torchquant as tq
        >>> net = tq.quantize_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
        ...                         lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax()), None, method="swap")
        >>> data = [torch.randn(16, 8)]
        >>> _ = tq.calibrate(net, data, progress=False)
        >>> sorted(tq.ptq.adaround(net, data, iters=20, progress=False))
        ['0', '2']
    """
    fixed = {"granularity": "layer", "act_quant": False, "drop_prob": 0.0, "learn_act_step": False}
    return reconstruct(model, data, **_preset("adaround", fixed, kwargs))


def brecq(model: nn.Module, data: Iterable, **kwargs: Any) -> dict[str, float]:
    """BRECQ (Li et al. 2021): block-wise reconstruction with activations quantized inside the block.

    :func:`reconstruct` with ``granularity="block"``, ``act_quant=True``, ``drop_prob=0``
    and, unless given, the paper's ``loss="fisher"`` (block outputs weighted by the
    diagonal Fisher) and ``learn_act_step=True`` (activation steps learned jointly).

    Args:
        model: a calibrated quantizable model.
        data: calibration batches.
        **kwargs: the other options of :func:`reconstruct` (``blocks``, ``learn_act_step``,
            ``loss``, ``fisher_damping``, ``act_lr``, ``iters``, ``batch_size``, ``lr``, ``seed``, ...).

    Returns:
        The final reconstruction loss of each unit.
    """
    fixed = {"granularity": "block", "act_quant": True, "drop_prob": 0.0}
    kwargs = {"learn_act_step": True, "loss": "fisher", **kwargs}
    return reconstruct(model, data, **_preset("brecq", fixed, kwargs))


def qdrop(model: nn.Module, data: Iterable, drop_prob: float = 0.5, **kwargs: Any) -> dict[str, float]:
    """QDrop (Wei et al. 2022): block-wise reconstruction that randomly drops activation quantization.

    :func:`reconstruct` with ``granularity="block"``, ``act_quant=True``, ``drop_prob`` and,
    unless given, ``learn_act_step=True`` (activation steps learned jointly, as in the paper);
    the loss is the plain squared error (``loss="mse"``), as in the paper.

    Args:
        model: a calibrated quantizable model.
        data: calibration batches.
        drop_prob: probability of keeping each activation element float (the paper's 0.5).
        **kwargs: the other options of :func:`reconstruct`.

    Returns:
        The final reconstruction loss of each unit.
    """
    fixed = {"granularity": "block", "act_quant": True, "drop_prob": drop_prob}
    kwargs = {"learn_act_step": True, **kwargs}
    return reconstruct(model, data, **_preset("qdrop", fixed, kwargs))
