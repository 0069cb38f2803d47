"""Helpers shared by the whole-model converters: skip rules and wrapper construction."""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable

import torch
from torch import nn

from ..factories import QuantizerFactory, call_factory
from ..layers import layer_adapter
from ..qmodules import QModule, QWrapper
from ..quantizers import Quantizer

__all__ = ["FLOAT_REASONS_ATTR", "SkipSpec", "check_skip", "make_qwrapper", "place_quantizers", "skip_reason"]

SkipSpec = Iterable["str | type[nn.Module]"]

FLOAT_REASONS_ATTR = "_tq_float_reasons"
"""Name of the ``dict[str, str]`` attribute in which converters record, per qualified
name, why a layer or operation stayed in float (read by :func:`torchquant.summary`)."""


def check_skip(skip: SkipSpec) -> tuple:
    """Normalise ``skip`` to a tuple of name globs and ``nn.Module`` types.

    Args:
        skip: one glob or type, or an iterable of them.

    Returns:
        The entries as a tuple.

    Raises:
        TypeError: an entry is neither a string nor an ``nn.Module`` subclass.
    """
    skip = (skip,) if isinstance(skip, (str, type)) else tuple(skip)
    for s in skip:
        if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
            raise TypeError(f"quantize_model: skip entries must be name globs or nn.Module types, got {s!r}")
    return skip


def skip_reason(name: str, module: object, skip: tuple) -> str | None:
    """Why ``module`` called ``name`` is skipped.

    Args:
        name: qualified name.
        module: the module (or a :class:`~torchquant.graph.fx.FunctionalOp`).
        skip: normalised skip entries.

    Returns:
        ``"skipped by glob '...'"``/``"skipped by type ..."``, or ``None`` when not skipped.
    """
    for s in skip:
        if isinstance(s, str) and fnmatch.fnmatchcase(name, s):
            return f"skipped by glob {s!r}"
        if isinstance(s, type) and isinstance(module, s):
            return f"skipped by type {s.__name__}"
    return None


def make_qwrapper(
    layers: list[nn.Module],
    name: str,
    wf: QuantizerFactory | None,
    af: QuantizerFactory | None,
    fold_bn: bool,
    factory_module: nn.Module | None = None,
) -> QWrapper:
    """A :class:`QWrapper` of ``layers``.

    Args:
        layers: the layer, optionally its BatchNorm and activation.
        name: qualified name given to the factories.
        wf: weight quantizer factory.
        af: activation quantizer factory.
        fold_bn: fold the BatchNorm (only passed on when there is one).
        factory_module: what the factories receive (default ``layers[0]``).

    Returns:
        The wrapper.

    Raises:
        ValueError: the layer's configuration cannot be quantized (an ``Embedding`` with
            ``max_norm``); the message names ``name``.
    """
    adapter = layer_adapter(layers[0])
    why = adapter.why_unsupported(layers[0]) if adapter is not None else None
    if why is not None:
        raise ValueError(
            f"quantize_model: cannot quantize {name!r} ({layers[0]}): {why}; keep it in float with skip=[{name!r}]"
        )
    layer = layers[0] if factory_module is None else factory_module
    wrapper = QWrapper(
        layers,
        weight_quantizer=call_factory(wf, layer, name, "weight_quantizer"),
        acts_quantizer=call_factory(af, layer, name, "acts_quantizer"),
        fold_bn=fold_bn and len(layers) > 1 and isinstance(layers[1], nn.modules.batchnorm._BatchNorm),
    )
    if name:  # errors name the layer by its place in the model, not its type
        wrapper._name_quantizers(name)
    # The wrapper and its quantizers take the wrapped layer's mode (a converted eval model stays in eval);
    # the wrapped modules keep theirs.
    mode = layers[0].training
    wrapper.training = mode
    for q in (wrapper.weight_quantizer, wrapper.acts_quantizer):
        if q is not None:
            q.train(mode)
    return wrapper


def place_quantizers(root: nn.Module) -> None:
    """Move the quantizers of every QModule in ``root`` to the device of the tensors they will see.

    Factories build quantizers on the CPU; a model already on a GPU (or on ``meta``) gets
    them there too, so ``quantize_model(model.cuda(), ...)`` runs at once. A QWrapper's
    quantizers follow its layer's weight. A QOp's follow the model when all the model's
    other parameters and buffers share one device; in a model split over several
    devices, QOps stay where their factory built them.
    """
    quantizers = [m for m in root.modules() if isinstance(m, Quantizer)]
    own = {id(t) for q in quantizers for t in itertools.chain(q.parameters(), q.buffers())}
    devices = {t.device for t in itertools.chain(root.parameters(), root.buffers()) if id(t) not in own}
    common = next(iter(devices)) if len(devices) == 1 else None
    for m in root.modules():
        if not isinstance(m, QModule):
            continue
        device = common
        weight = getattr(m.layer, "weight", None) if isinstance(m, QWrapper) else None
        if isinstance(weight, torch.Tensor):
            device = weight.device
        if device is None:
            continue
        for q in m.children():
            if isinstance(q, Quantizer):
                q.to(device)
