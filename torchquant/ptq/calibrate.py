"""Calibration: run data through a quantizable model so its observers record ranges."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ..qmodules import QModuleState
from ..utils import call_model, progress_bar, restoring_states
from ._common import materialize, require_qmodules

__all__ = ["UncalledQModulesWarning", "calibrate"]


class UncalledQModulesWarning(UserWarning):
    """``calibrate`` ran batches through a model and some of its QModules were never called.

    Either the model reads a wrapped layer's weight instead of calling the layer (the layer
    then computes in float whatever the summary says), or the batches never took the branch
    that calls it (its activation quantizers then have no ranges).
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
    batches = materialize(data, num_batches, "calibrate")
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda m, args: called.add(id(m))) for _, m in qmodules]
    try:
        with restoring_states(model), torch.no_grad():
            model.eval()
            for _, m in qmodules:
                m.qstate = mode
            for batch in progress_bar(batches, len(batches), "calibrate", progress):
                call_model(model, batch, "calibrate")
    finally:
        for h in hooks:
            h.remove()
    _warn_uncalled([name for name, m in qmodules if id(m) not in called])
    return model


def _warn_uncalled(names: list[str]) -> None:
    if not names:
        return
    shown = ", ".join(n or "(the model itself)" for n in names[:8]) + (
        f", ... ({len(names) - 8} more)" if len(names) > 8 else ""
    )
    warnings.warn(
        f"calibrate: {len(names)} QModule(s) were never called by the forward pass: {shown}. If the model "
        "reads their layer's weight instead of calling the layer, that layer computes in float; if a branch "
        "the batches did not take calls them, their activation quantizers have no ranges yet",
        UncalledQModulesWarning,
        stacklevel=3,
    )
