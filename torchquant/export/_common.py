"""Helpers shared by the export functions: finding quantization points and checking the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..qmodules import QModule, QModuleState
from ..quantizers import AffineGrid, LevelGrid, Quantizer

_EVAL_MODES = frozenset(
    {QModuleState.QUANT_EVAL, QModuleState.QUANT_EVAL_WEIGHT_ONLY, QModuleState.QUANT_EVAL_ACT_ONLY}
)


@dataclass
class QuantPoint:
    """One quantizer of a QModule: where it sits and what it does in the module's mode."""

    name: str  # qualified name of the quantizer, e.g. "layer1.0.conv1.weight_quantizer"
    owner: str  # qualified name of the QModule
    attr: str  # attribute name on the QModule
    quantizer: Quantizer
    module: QModule


def quant_points(model: nn.Module, who: str, modes: frozenset = _EVAL_MODES) -> list[QuantPoint]:
    """Every quantizer owned by a QModule of ``model``, after checking modes and calibration.

    Raises:
        ValueError: no QModule in ``model``; a QModule in a mode outside ``modes``
            (naming it and its mode); a quantizer that was never calibrated.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: expected an nn.Module, got {type(model).__name__}")
    points: list[QuantPoint] = []
    found = False
    for owner, m in model.named_modules():
        if not isinstance(m, QModule):
            continue
        found = True
        if m.qstate not in modes:
            raise ValueError(
                f"{who}: module {owner or type(model).__name__!r} ({type(m).__name__}) is in mode "
                f"{m.qstate.name}; expected one of {sorted(s.name for s in modes)} "
                "(calibrate, then set_qmodule_state(model, QModuleState.QUANT_EVAL))"
            )
        for attr, q in m.quantizers().items():
            name = f"{owner}.{attr}" if owner else attr
            if m.qstate is QModuleState.QUANT_EVAL:  # every quantizer is used: all must be calibrated
                check_calibrated(q, name, who)
            points.append(QuantPoint(name, owner, attr, q, m))
    if not found:
        raise ValueError(f"{who}: {type(model).__name__} contains no QModule; quantize it first (tq.quantize_model)")
    return points


def check_calibrated(q: Quantizer, name: str, who: str) -> AffineGrid | LevelGrid | None:
    """``q.grid()``, else ``q.levels()``, turning a missing calibration into a ``ValueError`` naming ``name``."""
    try:
        grid = q.grid()
        return grid if grid is not None else q.levels()
    except RuntimeError as e:
        raise ValueError(f"{who}: quantizer {name!r} ({type(q).__name__}) was never calibrated: {e}") from e


def to_numpy(t: Tensor, dtype: Any = None) -> Any:
    """``t`` as a NumPy array on the host (any device, detached), cast to ``dtype`` if given.

    Float types NumPy lacks (bfloat16, float8) go through float32.
    """
    t = t.detach()
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.float()
    a = t.cpu().numpy()
    return a if dtype is None else a.astype(dtype)
