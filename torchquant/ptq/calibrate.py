"""Calibration: run data through a quantizable model so its observers record ranges."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..qmodules import QModuleState
from ..utils import progress_bar, restoring_states
from ._common import call_model, materialize, require_qmodules

__all__ = ["calibrate"]

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
    with restoring_states(model), torch.no_grad():
        model.eval()
        for _, m in qmodules:
            m.qstate = mode
        for batch in progress_bar(batches, len(batches), "calibrate", progress):
            call_model(model, batch, "calibrate")
    return model
