"""Utilities: changing the quantization mode of every module in a model, restoring
modes and training flags after a temporary change, and progress bars.

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

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from .qmodules import QModule, QModuleState, iter_qmodules

__all__ = [
    "get_qmodule_states",
    "iter_qmodules",
    "progress_bar",
    "qmodule_state",
    "restoring_states",
    "set_qmodule_state",
]


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


@contextmanager
def restoring_states(module: nn.Module) -> Iterator[nn.Module]:
    """Save every QModule's mode and every module's ``training`` flag; put them back on exit.

    The body may change both freely (``model.eval()``, ``set_qmodule_state``, per-module
    ``qstate``); on exit, also when it raises, each module gets exactly its saved values
    back. Post-training algorithms run inside it so that they leave the modes as they found them.

    Example:
        >>> from torch import nn
        >>> from torchquant import QModuleState, QWrapper, set_qmodule_state
        >>> from torchquant.utils import restoring_states
        >>> model = nn.Sequential(QWrapper(nn.Linear(4, 4)))
        >>> with restoring_states(model):
        ...     set_qmodule_state(model, QModuleState.CALIBRATION)
        ...     _ = model.eval()
        >>> model[0].qstate.name, model.training
        ('BYPASSED', True)
    """
    modes = [(m, m.qstate) for _, m in iter_qmodules(module)]
    training = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, prev in modes:
            m.qstate = prev
        for m, flag in training:
            m.training = flag


def progress_bar(it: Iterable, total: int | None, desc: str, enabled: bool) -> Iterator:
    """``it`` in a tqdm bar on stderr when ``enabled`` and tqdm is installed, else ``it`` unchanged."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm comes with the bench extra; without it there is no bar
            return iter(it)
        return iter(tqdm(it, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True))
    return iter(it)
