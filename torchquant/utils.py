"""Utilities: changing the quantization mode of every module in a model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torchquant import QModuleState, QWrapper, qmodule_state
    >>> model = nn.Sequential(QWrapper(nn.Linear(4, 4)))
    >>> with qmodule_state(model, QModuleState.QUANT_AWARE_TRAIN):
    ...     model[0].qstate
    <QModuleState.QUANT_AWARE_TRAIN: 'quant_aware_train'>
    >>> model[0].qstate
    <QModuleState.BYPASSED: 'bypassed'>
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .qmodules import QModule, QModuleState, iter_qmodules

__all__ = ["get_qmodule_states", "iter_qmodules", "qmodule_state", "set_qmodule_state"]


def _check_mode(mode: QModuleState) -> QModuleState:
    if not isinstance(mode, QModuleState):
        raise TypeError(f"expected a QModuleState, got {mode!r}; valid modes: {[m.name for m in QModuleState]}")
    return mode


def set_qmodule_state(module: nn.Module, mode: QModuleState) -> None:
    """Set ``mode`` on every :class:`~torchquant.qmodules.QModule` in ``module`` (itself included)."""
    _check_mode(mode)
    for _, m in iter_qmodules(module):
        m.qstate = mode


def get_qmodule_states(module: nn.Module) -> dict[str, QModuleState]:
    """The mode of every QModule in ``module``, by qualified name."""
    return {name: m.qstate for name, m in iter_qmodules(module)}


@contextmanager
def qmodule_state(module: nn.Module, mode: QModuleState) -> Iterator[nn.Module]:
    """Temporarily set ``mode`` on every QModule in ``module``.

    Each module gets its own previous mode back on exit, also when the body raises.
    """
    _check_mode(mode)
    saved: list[tuple[QModule, QModuleState]] = [(m, m.qstate) for _, m in iter_qmodules(module)]
    try:
        for m, _ in saved:
            m.qstate = mode
        yield module
    finally:
        for m, prev in saved:
            m.qstate = prev
