"""Whole-model quantization: one entry point, :func:`quantize_model`.

``method="swap"`` replaces layers in place: every ``Conv1d/2d/3d`` or ``Linear``
becomes a :class:`~torchquant.qmodules.QWrapper`, fused with the BatchNorm and
supported activation that follow it inside an ``nn.Sequential``. It covers
layers, not functional operations (``x + y``, ``torch.cat``, ``F.relu``): those
stay in float. Use it for models torch.fx cannot trace.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from .factories import QuantizerFactory, call_factory
from .qmodules import _BN_FOR_LAYER, SUPPORTED_ACTIVATIONS, QModule, QWrapper

__all__ = ["quantize_model"]

SkipSpec = Iterable["str | type[nn.Module]"]


def _skipped(name: str, module: nn.Module, skip: tuple) -> bool:
    for s in skip:
        if isinstance(s, str) and fnmatch.fnmatchcase(name, s):
            return True
        if isinstance(s, type) and isinstance(module, s):
            return True
    return False


def _check_skip(skip: SkipSpec) -> tuple:
    skip = (skip,) if isinstance(skip, (str, type)) else tuple(skip)
    for s in skip:
        if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
            raise TypeError(f"quantize_model: skip entries must be name globs or nn.Module types, got {s!r}")
    return skip


def _wrap(layers: list[nn.Module], name: str, wf, af, fold_bn: bool) -> QWrapper:
    layer = layers[0]
    return QWrapper(
        layers,
        weight_quantizer=call_factory(wf, layer, name, "weight_quantizer"),
        acts_quantizer=call_factory(af, layer, name, "acts_quantizer"),
        fold_bn=fold_bn and len(layers) > 1 and isinstance(layers[1], nn.modules.batchnorm._BatchNorm),
    )


def _swap(module: nn.Module, prefix: str, wf, af, skip: tuple, fold_bn: bool) -> None:
    if isinstance(module, QModule):
        return
    if isinstance(module, nn.Sequential):
        items = list(module._modules.items())
        i = 0
        while i < len(items):
            key, child = items[i]
            name = f"{prefix}{key}"
            if type(child) in _BN_FOR_LAYER and not _skipped(name, child, skip):
                group = [child]
                j = i + 1
                if j < len(items) and type(items[j][1]) is _BN_FOR_LAYER[type(child)]:
                    group.append(items[j][1])
                    j += 1
                if j < len(items) and type(items[j][1]) in SUPPORTED_ACTIVATIONS:
                    group.append(items[j][1])
                    j += 1
                module._modules[key] = _wrap(group, name, wf, af, fold_bn)
                for k in range(i + 1, j):  # keep indices stable: fused modules become Identity
                    module._modules[items[k][0]] = nn.Identity()
                i = j
                continue
            if child is not None and not _skipped(name, child, skip):
                _swap(child, name + ".", wf, af, skip, fold_bn)
            i += 1
        return
    for key, child in list(module._modules.items()):
        if child is None:
            continue
        name = f"{prefix}{key}"
        if _skipped(name, child, skip):
            continue
        if type(child) in _BN_FOR_LAYER:
            module._modules[key] = _wrap([child], name, wf, af, fold_bn)
        else:
            _swap(child, name + ".", wf, af, skip, fold_bn)


def quantize_model(
    model: nn.Module,
    weight_quantizer: QuantizerFactory | None,
    acts_quantizer: QuantizerFactory | None,
    *,
    skip: SkipSpec = (),
    method: str = "fx",
    fold_bn: bool = False,
) -> nn.Module:
    """Make every layer of ``model`` quantizable.

    Args:
        model: a float model.
        weight_quantizer: factory ``(module, name) -> Quantizer | None`` for layer weights.
        acts_quantizer: factory ``(module, name) -> Quantizer | None`` for output activations.
        skip: qualified-name globs (``"layer4.*"``) and module types left in float.
        method: ``"swap"``: replace modules in place (layers only, see the module docstring).
        fold_bn: fold BatchNorm into the preceding layer's weights (see ``QWrapper``).

    Returns:
        The quantizable model (``model`` itself for ``"swap"``), every QModule ``BYPASSED``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import torchquant as tq
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> q = tq.quantize_model(net, lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)),
        ...                       lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax()), method="swap")
        >>> [type(m).__name__ for m in q]
        ['QWrapper', 'Identity', 'Identity', 'Flatten', 'QWrapper']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: expected an nn.Module, got {type(model).__name__}")
    skip = _check_skip(skip)
    if method == "swap":
        _swap(model, "", weight_quantizer, acts_quantizer, skip, fold_bn)
        return model
    if method == "fx":
        raise NotImplementedError("quantize_model: method='fx' is not available yet; use method='swap'")
    raise ValueError(f"quantize_model: unknown method {method!r}; valid: 'fx', 'swap'")
