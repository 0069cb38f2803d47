"""``quantize_model(method="swap")``: replace layers in place, for models torch.fx cannot trace.

Every ``Conv1d/2d/3d`` or ``Linear`` module (exact type) becomes a
:class:`~torchquant.qmodules.QWrapper` at the same name, fused with the matching
BatchNorm and a supported activation that directly follow it inside an
``nn.Sequential`` (the fused ones become ``nn.Identity`` so indices stay
stable). It covers layers, not functional operations (``x + y``, ``torch.cat``,
``F.relu``): those stay in float, and so do activations applied outside an
``nn.Sequential``.
"""

from __future__ import annotations

from torch import nn

from ..factories import QuantizerFactory
from ..layers import BN_FOR_LAYER, LAYER_TYPES
from ..qmodules import SUPPORTED_ACTIVATIONS, QModule
from .common import make_qwrapper, skip_reason

__all__ = ["quantize_swap"]


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _swap(module, prefix, wf, af, skip, fold_bn, reasons: dict[str, str]) -> None:
    if isinstance(module, QModule):
        return
    items = list(module._modules.items())
    sequential = isinstance(module, nn.Sequential)
    i = 0
    while i < len(items):
        key, child = items[i]
        i += 1
        if child is None:
            continue
        name = f"{prefix}{key}"
        reason = skip_reason(name, child, skip)
        if reason is not None:
            if _has_params(child):
                reasons[name] = f"{reason} ({type(child).__name__})"
            continue
        if type(child) in BN_FOR_LAYER:
            group = [child]
            if sequential:
                j = i
                if j < len(items) and type(items[j][1]) is BN_FOR_LAYER[type(child)]:
                    group.append(items[j][1])
                    j += 1
                if j < len(items) and type(items[j][1]) in SUPPORTED_ACTIVATIONS:
                    group.append(items[j][1])
                    j += 1
                for k in range(i, j):  # keep indices stable: fused modules become Identity
                    module._modules[items[k][0]] = nn.Identity().train(items[k][1].training)
                i = j
            module._modules[key] = make_qwrapper(group, name, wf, af, fold_bn)
        elif isinstance(child, LAYER_TYPES) and not child._modules:
            reasons[name] = f"{type(child).__name__} is a subclass of a supported layer, not the layer"
        else:
            _swap(child, name + ".", wf, af, skip, fold_bn, reasons)


def quantize_swap(
    model: nn.Module,
    weight_quantizer: QuantizerFactory | None,
    acts_quantizer: QuantizerFactory | None,
    *,
    skip: tuple,
    fold_bn: bool,
) -> dict[str, str]:
    """Swap ``model``'s layers in place.

    Args:
        model: the float model, modified in place.
        weight_quantizer: factory for layer weights (see :func:`torchquant.quantize_model`).
        acts_quantizer: factory for layer outputs.
        skip: normalised skip entries (name globs and module types).
        fold_bn: passed to every ``QWrapper`` that has a BatchNorm.

    Returns:
        Why layers with weights stayed in float, by qualified name.
    """
    reasons: dict[str, str] = {}
    _swap(model, "", weight_quantizer, acts_quantizer, skip, fold_bn, reasons)
    return reasons
