"""Calibration: run data through a quantizable model so its observers record ranges."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..qmodules import QModule, QModuleState, iter_qmodules
from ..utils import call_model, progress_bar, restoring_states
from ._common import first_names, require_qmodules, stream

__all__ = ["UncalledQModulesWarning", "calibrate", "reobserve_weights"]


class UncalledQModulesWarning(UserWarning):
    """``calibrate`` ran batches through a model and some of its QModules were never called.

    The message tells the two cases apart (a second pass on the first batch watches which
    parameters torch functions receive): the model reads a wrapped layer's weight instead of
    calling the layer (the layer then computes in float whatever the summary says; where the
    reader passes it to ``F.linear`` and is the wrapper's parent, the message names the reader's type
    to give :func:`torchquant.graph.readers.register_weight_reader`), or the
    batches never took the branch that calls it, or the branch runs only in training (its
    activation quantizers then have no ranges).
    """


_OBSERVING = tuple(s for s in QModuleState if s.is_weight_observed or s.is_act_observed)


def calibrate(
    model: nn.Module,
    data: Iterable,
    *,
    mode: QModuleState = QModuleState.CALIBRATION,
    num_batches: int | None = None,
    progress: bool = True,
) -> nn.Module:
    """Run calibration batches through ``model`` with every QModule in ``mode``.

    The model runs in ``eval()`` and under ``torch.no_grad()``; afterwards each
    QModule gets its previous mode back and every module its ``training`` flag,
    also when a batch raises.

    Args:
        model: a model containing QModules (e.g. from :func:`torchquant.quantize_model`).
        data: an iterable of batches: tensors, ``(input, target, ...)`` tuples or lists
            (the first element is the input), or dicts passed as keyword arguments
            without the keys ``label(s)``, ``target(s)``, ``y``.
        mode: a mode that observes (``CALIBRATION``, ``CALIBRATION_WEIGHT_ONLY``,
            ``CALIBRATION_ACT_ONLY`` or a ``QUANT_AWARE_TRAIN*`` mode).
        num_batches: stop after this many batches (all if ``None``).
        progress: show a tqdm progress bar (none if tqdm is not installed).

    Returns:
        ``model``.

    Raises:
        ValueError: ``model`` has no QModule, ``data`` is empty, or ``mode`` observes nothing.
        TypeError: ``mode`` is not a QModuleState, or a batch has an unsupported type.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torchquant as tq
        >>> net = tq.quantize_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), None,
        ...                         lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()), method="swap")
        >>> _ = tq.calibrate(net, [torch.randn(8, 4) for _ in range(3)], progress=False)
        >>> net[0].acts_quantizer.range_observer.initialized, net[0].qstate.name
        (True, 'BYPASSED')
    """
    qmodules = require_qmodules(model, "calibrate")
    if not isinstance(mode, QModuleState):
        raise TypeError(f"calibrate: mode must be a QModuleState, got {mode!r}")
    if mode not in _OBSERVING:
        raise ValueError(
            f"calibrate: mode {mode.name} observes nothing; use one of {', '.join(s.name for s in _OBSERVING)}"
        )
    batches, first, total = stream(data, num_batches, "calibrate")  # one pass: no batch is kept but the first
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda m, args: called.add(id(m))) for _, m in qmodules]
    try:
        with restoring_states(model), torch.no_grad():
            model.eval()
            for _, m in qmodules:
                m.qstate = mode
            for batch in progress_bar(batches, total, "calibrate", progress):
                call_model(model, batch, "calibrate")
    finally:
        for h in hooks:
            h.remove()
    if not first:
        raise ValueError("calibrate: the calibration data is empty")
    uncalled = [(name, m) for name, m in qmodules if id(m) not in called]
    if uncalled:
        with restoring_states(model), torch.no_grad():
            model.eval()
            for _, m in qmodules:
                m.qstate = QModuleState.BYPASSED
            read = _read_directly(model, first[0], uncalled)
        _warn_uncalled(model, [n for n, _ in uncalled], read)
    return model


class _ParameterReads(TorchFunctionMode):
    """Records which of the given parameters a torch function receives, which function, and in which module."""

    def __init__(self, owners: dict[int, str]) -> None:
        super().__init__()
        self.owners = owners
        self.running: list[str] = []  # qualified names of the modules whose forward is running, innermost last
        self.read: dict[str, tuple[str, str]] = {}  # QModule name -> (function name, reading module's name)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in (*args, *kwargs.values()):
            name = self.owners.get(id(a)) if isinstance(a, torch.Tensor) else None
            if name is not None and name not in self.read:
                self.read[name] = (getattr(func, "__name__", str(func)), self.running[-1] if self.running else "")
        return func(*args, **kwargs)


def _read_directly(model: nn.Module, batch, uncalled: list[tuple[str, nn.Module]]) -> dict[str, tuple[str, str]]:
    """The uncalled QModules whose own parameters (a wrapped layer's weight) the forward uses all the same,
    with the function that received them and the module whose forward called it."""
    # a parameter a called QModule holds too (tied embeddings: T5's shared and embed_tokens) is quantized there
    uncalled_ids = {id(m) for _, m in uncalled}
    held = {id(p) for _, m in iter_qmodules(model) if id(m) not in uncalled_ids for p in m.parameters()}
    owners = {id(p): name for name, m in uncalled for p in m.parameters() if id(p) not in held}
    mode = _ParameterReads(owners)

    def leave(module: nn.Module, args: tuple, out: object) -> None:  # returns None: the output stays
        mode.running.pop()

    hooks = []
    for name, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda m, args, name=name: mode.running.append(name)))
        hooks.append(m.register_forward_hook(leave, always_call=True))
    try:
        with mode:
            call_model(model, batch, "calibrate")
    finally:
        for h in hooks:
            h.remove()
    return mode.read


def _warn_uncalled(model: nn.Module, names: list[str], read: dict[str, tuple[str, str]]) -> None:
    def shown(xs: list[str]) -> str:
        return first_names([n or "(the model itself)" for n in xs], 8)

    direct = [n for n in names if n in read]
    absent = [n for n in names if n not in read]
    parts = []
    if direct:
        # F.linear reads by the wrappers' parent: graph.readers can send them to the wrappers
        redirectable = sorted({r for n in direct for f, r in [read[n]] if f == "linear" and n.rpartition(".")[0] == r})
        types = sorted({type(model.get_submodule(r)).__name__ for r in redirectable})
        hint = (
            f"; tq.graph.readers.register_weight_reader({', '.join(types)}) before quantize_model sends the "
            f"F.linear reads of {shown(redirectable)} to the wrappers"
            if redirectable
            else ""
        )
        parts.append(
            f"{shown(direct)} (the model reads their layer's weight instead of calling the layer: it computes in "
            f"float{hint})"
        )
    if absent:
        parts.append(
            f"{shown(absent)} (not reached: a branch the batches did not take, or one used only in training; "
            "their activation quantizers have no ranges yet)"
        )
    warnings.warn(
        f"calibrate: {len(names)} QModule(s) were never called by the forward pass: {'; '.join(parts)}",
        UncalledQModulesWarning,
        stacklevel=3,
    )


def reobserve_weights(modules: Iterable[QModule]) -> None:
    """Recompute the weight ranges of ``modules`` that already have them, from their current weights.

    An algorithm that rewrites weights (scales, clipping) calls it so that a weight
    observer that had already seen the old weights (a running min/max keeps its widest
    range) describes the new ones. A :class:`~torchquant.QExperts` has all its banks observed
    again, a :class:`~torchquant.QMultiheadAttention` both its projections; other QModules
    hold no weight and are passed over.
    """
    for m in modules:
        quantizers = m.weight_quantizers()
        observers = [o for q in quantizers if (o := getattr(q, "range_observer", None)) is not None and o.initialized]
        if observers:
            for o in observers:
                o.reset()
            m.observe_weight()


def reset_activation_ranges(model: nn.Module, who: str) -> list[str]:
    """Forget the activation ranges observed before ``who`` changed the activations (scaled or rotated them).

    Every range observer of a quantizer that is not a weight quantizer
    (:meth:`~torchquant.QModule.weight_quantizers`) and has ranges is reset, with a warning
    naming them: they describe inputs the model no longer computes, and an observer that keeps
    its widest range would carry them into the next calibration. Returns the reset quantizers' names.
    """
    names = []
    for name, m in iter_qmodules(model):
        weights = {id(q) for q in m.weight_quantizers()}
        for attr, q in m.quantizers().items():
            observer = getattr(q, "range_observer", None)
            if id(q) not in weights and observer is not None and observer.initialized:
                observer.reset()
                names.append(f"{name}.{attr}")
    if names:
        warnings.warn(
            f"{who}: {len(names)} activation quantizer(s) had ranges observed before {who} changed their inputs, "
            f"now reset: calibrate after {who} (tq.calibrate); {first_names(names)}",
            UserWarning,
            stacklevel=3,
        )
    return names
