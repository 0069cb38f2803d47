"""Utilities: changing the quantization mode of every module in a model, restoring
modes and training flags after a temporary change, and progress bars.

Example:
    >>> import torch
    >>> from torch import Tensor, nn
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
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from .qmodules import QModule, QModuleState, iter_qmodules

__all__ = [
    "LABEL_KEYS",
    "cached_quantized_weights",
    "call_model",
    "get_qmodule_states",
    "iter_qmodules",
    "model_output",
    "progress_bar",
    "qmodule_state",
    "restoring_states",
    "set_qmodule_state",
]


LABEL_KEYS = frozenset({"label", "labels", "target", "targets", "y"})


def call_model(model: nn.Module, batch: Any, who: str) -> Any:
    """Run ``model`` on one calibration batch.

    A tensor is the input; a tuple/list ``(input, target, ...)`` gives its first
    element as the input; a dict is passed as keyword arguments, without the
    label keys (``label(s)``, ``target(s)``, ``y``), except that a Hugging Face
    encoder-decoder (``model.config.is_encoder_decoder``) keeps ``labels`` when the batch
    has no decoder inputs: it shifts them into its decoder's input.
    """
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(f"{who}: got an empty {type(batch).__name__} as a batch")
        return model(batch[0])
    if isinstance(batch, dict):
        kwargs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        seq2seq = getattr(getattr(model, "config", None), "is_encoder_decoder", False) is True
        if seq2seq and "labels" in batch and not {"decoder_input_ids", "decoder_inputs_embeds"} & set(batch):
            kwargs["labels"] = batch["labels"]
        if not kwargs:
            raise ValueError(f"{who}: a dict batch needs input keys besides {sorted(LABEL_KEYS)}, got {list(batch)}")
        return model(**kwargs)
    raise TypeError(
        f"{who}: a batch must be a tensor, an (input, target) tuple/list or a dict of tensors, "
        f"got {type(batch).__name__}"
    )


def model_output(out: Any, who: str) -> Tensor:
    """The tensor a model's output stands for: the output itself, its ``logits`` (a Hugging Face
    ``ModelOutput``), or the first tensor of a tuple, list or mapping.

    Raises:
        TypeError: no tensor in ``out`` (naming ``who``).

    Example:
        >>> import torch
        >>> model_output((torch.ones(2), None), "example")
        tensor([1., 1.])
    """
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    values = list(out.values()) if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else []
    for v in values:
        if isinstance(v, Tensor):
            return v
    raise TypeError(f"{who}: the model returned {type(out).__name__}, which holds no tensor to compare")


def _check_mode(mode: QModuleState) -> QModuleState:
    if not isinstance(mode, QModuleState):
        raise TypeError(f"expected a QModuleState, got {mode!r}; valid modes: {[m.name for m in QModuleState]}")
    return mode


def _check_module(module: nn.Module, who: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{who}: expected an nn.Module, got {type(module).__name__}; for several models, call it on each"
        )


def set_qmodule_state(module: nn.Module, mode: QModuleState) -> None:
    """Set ``mode`` on every :class:`~torchquant.qmodules.QModule` in ``module`` (itself included)."""
    _check_module(module, "set_qmodule_state")
    _check_mode(mode)
    for _, m in iter_qmodules(module):
        m.qstate = mode


def get_qmodule_states(module: nn.Module) -> dict[str, QModuleState]:
    """The mode of every QModule in ``module``, by qualified name."""
    _check_module(module, "get_qmodule_states")
    return {name: m.qstate for name, m in iter_qmodules(module)}


@contextmanager
def qmodule_state(module: nn.Module, mode: QModuleState) -> Iterator[nn.Module]:
    """Temporarily set ``mode`` on every QModule in ``module``.

    Each module gets its own previous mode back on exit, also when the body raises.
    """
    _check_module(module, "qmodule_state")
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
    _check_module(module, "restoring_states")
    modes = [(m, m.qstate) for _, m in iter_qmodules(module)]
    training = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, prev in modes:
            m.qstate = prev
        for m, flag in training:
            m.training = flag


@contextmanager
def cached_quantized_weights(module: nn.Module) -> Iterator[nn.Module]:
    """Let every :class:`~torchquant.qmodules.QWrapper` and :class:`~torchquant.QExperts` in ``module`` reuse its
    quantized weights between calls.

    Inside the block, a wrapper whose mode quantizes its weight without observing it
    (``QUANT_EVAL``, ``QUANT_EVAL_WEIGHT_ONLY``) keeps the output of its weight quantizer and
    returns it again as long as its float weight, its quantizer's parameters, buffers and
    other attributes, and its mode are what they were; anything else (an in-place change, a
    ``load_state_dict``, a new bit-width, another mode) recomputes it. The comparison is by
    value, so the output is always bit-identical to the uncached forward. What is not
    cached: calls with gradients enabled (training), under ``torch.compile`` or tracing,
    computed weights (parametrizations), BatchNorm-folded wrappers and quantizers with
    forward hooks. Each wrapper holds a copy of its float weight and its quantized weight
    while cached (memory), and each call compares them (one pass over the weight, and a
    host synchronisation on a GPU). On exit the caches are dropped.

    It is meant for repeated no-gradient passes over the same frozen weights: the
    post-training algorithms' block runs (:mod:`torchquant.ptq.sequential`), evaluation.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchquant import AffineQuantizer, BatchMinMax, QModuleState, QWrapper, qmodule_state
        >>> layer = QWrapper(nn.Linear(8, 8), weight_quantizer=AffineQuantizer(4, BatchMinMax(axis=0)))
        >>> layer.observe_weight()
        >>> x = torch.randn(2, 8)
        >>> with qmodule_state(layer, QModuleState.QUANT_EVAL), torch.no_grad():
        ...     ref = layer(x)
        ...     with cached_quantized_weights(layer):
        ...         outs = [layer(x) for _ in range(3)]  # the weight is quantized once
        >>> all(torch.equal(o, ref) for o in outs)
        True
    """
    saved = [(m, m._weight_cache) for _, m in iter_qmodules(module) if "_weight_cache" in m.__dict__]
    try:
        for m, prev in saved:
            if prev is None:
                m._weight_cache = {}
        yield module
    finally:
        for m, prev in saved:
            m._weight_cache = prev


def progress_bar(it: Iterable, total: int | None, desc: str, enabled: bool) -> Iterator:
    """``it`` in a tqdm bar on stderr when ``enabled`` and tqdm is installed, else ``it`` unchanged."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm comes with the bench extra; without it there is no bar
            return iter(it)
        return iter(tqdm(it, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True))
    return iter(it)
