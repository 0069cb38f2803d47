"""Saving and loading quantized models' state without pickled code."""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Save ``model.state_dict()`` (weights, observer ranges, learned quantizer parameters).

    Only tensors are written, so :func:`load_checkpoint` can read the file with
    ``torch.load(weights_only=True)``. The state dict also holds every quantizer's
    configuration and every QModule's mode (``<prefix>_extra_state``, ``uint8``
    tensors of JSON). Rebuild the model the same way (same ``quantize_model``
    factories) before loading.

    Args:
        model: any module, quantized or not.
        path: destination file.
    """
    torch.save(model.state_dict(), os.fspath(path))


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a state dict saved by :func:`save_checkpoint` into ``model``, never unpickling code.

    Uses ``torch.load(weights_only=True)``: a file that holds anything but tensors and
    plain containers is refused instead of executed.

    Args:
        model: the freshly built (quantized) model the checkpoint belongs to.
        path: the file.
        strict: passed to ``load_state_dict``.

    The modes are restored. A quantizer configured otherwise than the one saved
    (bits, granularity, symmetry, format, class) makes ``load_state_dict`` raise,
    also with ``strict=False``; a file saved before configurations were recorded
    loads unchecked and leaves the modes as they are.

    Returns:
        ``model``, loaded.

    Raises:
        ValueError: the file is not a weights-only state dict (the message says why).
        RuntimeError: from ``load_state_dict``: missing or unexpected keys (``strict``),
            shapes or quantizer configurations that differ, each named.
    """
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for refused globals, RuntimeError for corrupt files
        raise ValueError(f"load_checkpoint: {os.fspath(path)!r} is not a weights-only checkpoint: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"load_checkpoint: {os.fspath(path)!r} holds a {type(state).__name__}, not a state dict")
    model.load_state_dict(state, strict=strict)
    return model
