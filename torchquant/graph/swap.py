"""``quantize_model(method="swap")``: replace layers in place, for models torch.fx cannot trace.

Every module whose exact type has a :class:`~torchquant.layers.LayerAdapter`
(``Conv1d/2d/3d``, ``Linear``, ``Embedding``, Hugging Face's ``Conv1D``) becomes a
:class:`~torchquant.qmodules.QWrapper` at the same name, fused with the matching
BatchNorm (Linear and Conv) and a supported activation that directly follow it
inside an ``nn.Sequential`` (the fused ones become ``nn.Identity`` so indices stay
stable; a fused wrapper first called from outside its Sequential warns). With
``norm_outputs=True`` every normalisation module
(:func:`~torchquant.layers.is_normalization`: ``LayerNorm``, ``RMSNorm``,
``GroupNorm``, Hugging Face's ``*RMSNorm``) becomes a :class:`~torchquant.qmodules.QOp`
around it, quantizing its output. An ``nn.MultiheadAttention`` becomes a
:class:`~torchquant.qmodules.QMultiheadAttention` (both projection weights and the
output), a mixture-of-experts expert bank (:func:`~torchquant.moe.expert_banks`: transformers 5's
``*Experts`` modules) a :class:`~torchquant.moe.QExperts` (its weight banks, from the weight
factory called with ``"<name>.<bank>"``), and the ``nn.TransformerEncoderLayer``/``nn.TransformerEncoder`` modules
around quantized ones stop using their fused kernels
(:func:`~torchquant.graph.common.disable_fused_paths`). It covers modules, not
functional operations (``x + y``, ``torch.cat``, ``F.relu``): those stay in float, and
so do activations applied outside an ``nn.Sequential``. A module that passes its layers'
weights to ``F.linear`` instead of calling them (torchvision's Swin attention,
:data:`~torchquant.graph.readers.WEIGHT_READERS`) has those reads sent to the wrappers
(:func:`~torchquant.graph.readers.redirect_weight_reads`).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from ..factories import QuantizerFactory, call_factory
from ..layers import FLOAT_LAYERS, LAYER_TYPES, is_normalization, layer_adapter
from ..moe import QExperts, expert_banks
from ..qmodules import SUPPORTED_ACTIVATIONS, QModule, QOp
from ..quantizers_functional import _is_tracing
from .common import disable_fused_paths, make_qmha, make_qwrapper, mha_unsupported, skip_reason
from .readers import is_weight_reader, redirect_weight_reads

__all__ = ["quantize_swap"]


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _norm_qop(norm: nn.Module, name: str, af: QuantizerFactory | None) -> QOp:
    qop = QOp(norm, acts_quantizer=call_factory(af, norm, name, "acts_quantizer"))
    qop.train(norm.training)
    qop._name_quantizers(name)
    return qop


def _fusable(items: list, j: int, prefix: str, skip: tuple, types) -> bool:
    """Whether the ``j``-th child of a Sequential is of one of ``types`` (exactly) and not skipped: a module
    ``skip`` names stays where it is, in float."""
    if j >= len(items) or type(items[j][1]) not in types:
        return False
    return skip_reason(f"{prefix}{items[j][0]}", items[j][1], skip) is None


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_CHECKPOINT_FILE = torch.utils.checkpoint.__file__  # checkpoint_sequential and checkpoint wrappers: in order


def _called_by_its_sequential(wrapper: nn.Module, frame: Any) -> bool:
    """Whether the call stack above ``frame`` runs ``wrapper`` from a method of the module holding it (its
    Sequential's forward, or a subclass's) or from torch's activation checkpointing, which runs a Sequential's
    modules in order; torch's own frames (``Module.__call__``, wrappers) are looked through."""
    for _ in range(64):
        if frame is None:
            return False
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and any(m is wrapper for m in owner._modules.values()):
            return True
        name = frame.f_code.co_filename
        if name == _CHECKPOINT_FILE:
            return True
        if not name.startswith(_TORCH_DIR):
            return False
        frame = frame.f_back
    return False


def _check_fused_call(wrapper: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a wrapper holding the BatchNorm/activation that followed its layer in a Sequential, run
    once (it removes itself at its first eager call): warns when that call does not come from the Sequential,
    where code reading the wrapper's output before those modules (now ``nn.Identity``) would silently get the
    normalised, activated value."""
    if _is_tracing():  # a compiler's or tracer's frames: checked at the first eager call
        return None
    for key, hook in list(wrapper._forward_pre_hooks.items()):
        if hook is _check_fused_call:
            del wrapper._forward_pre_hooks[key]
    name, fused = wrapper.__dict__.pop("_tq_fused_in", ("?", "?"))
    if not _called_by_its_sequential(wrapper, sys._getframe(1)):
        warnings.warn(
            f"quantize_model(method='swap'): {name!r} holds the {fused} that followed it in its nn.Sequential "
            "(now nn.Identity) and was called outside that Sequential: code that reads its output before them "
            "gets it normalised and activated, unlike the float model; quantize with method='fx', or keep them "
            "apart with skip=",
            stacklevel=2,
        )
    return None


def _swap(module, prefix, wf, af, skip, fold_bn, norm_outputs, reasons: dict[str, str]) -> None:
    if isinstance(module, QModule) or type(module) is nn.MultiheadAttention:
        return  # a MultiheadAttention never calls its out_proj: only a QMultiheadAttention around it quantizes it
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
        adapter = layer_adapter(child)
        if adapter is not None:
            group = [child]
            if sequential:
                j = i
                if _fusable(items, j, prefix, skip, (adapter.bn,) if adapter.bn is not None else ()):
                    group.append(items[j][1])
                    j += 1
                if _fusable(items, j, prefix, skip, SUPPORTED_ACTIVATIONS):
                    group.append(items[j][1])
                    j += 1
                for k in range(i, j):  # keep indices stable: fused modules become Identity
                    module._modules[items[k][0]] = nn.Identity().train(items[k][1].training)
                i = j
            wrapper = make_qwrapper(group, name, wf, af, fold_bn)
            if len(group) > 1:
                wrapper.__dict__["_tq_fused_in"] = (name, "+".join(type(m).__name__ for m in group[1:]))
                wrapper.register_forward_pre_hook(_check_fused_call)
            module._modules[key] = wrapper
        elif type(child) is nn.MultiheadAttention:
            why = mha_unsupported(child)
            if why is None:
                module._modules[key] = make_qmha(child, name, wf, af)
            else:
                reasons[name] = why
        elif banks := expert_banks(child):
            wq = {bank: call_factory(wf, child, f"{name}.{bank}", "weight_quantizer") for bank in banks}
            module._modules[key] = QExperts(child, wq).train(child.training)
        elif type(child) in FLOAT_LAYERS:
            reasons[name] = FLOAT_LAYERS[type(child)]
        elif isinstance(child, LAYER_TYPES) and not child._modules:
            reasons[name] = f"{type(child).__name__} is a subclass of a supported layer, not the layer"
        elif norm_outputs and is_normalization(child, weightless=True):
            module._modules[key] = _norm_qop(child, name, af)
        else:
            _swap(child, name + ".", wf, af, skip, fold_bn, norm_outputs, reasons)
            if is_weight_reader(child):
                redirect_weight_reads(child)


def quantize_swap(
    model: nn.Module,
    weight_quantizer: QuantizerFactory | None,
    acts_quantizer: QuantizerFactory | None,
    *,
    skip: tuple,
    fold_bn: bool | str,
    norm_outputs: bool = False,
    prefix: str = "",
) -> dict[str, str]:
    """Swap ``model``'s layers in place.

    Args:
        model: the float model, modified in place.
        weight_quantizer: factory for layer weights (see :func:`torchquant.quantize_model`).
        acts_quantizer: factory for layer outputs.
        skip: normalised skip entries (name globs and module types).
        fold_bn: passed to every ``QWrapper`` that has a BatchNorm.
        norm_outputs: wrap every normalisation module in a ``QOp`` quantizing its output.
        prefix: qualified name of ``model`` in a larger model, with a trailing dot
            (``"blocks.0."``): the names factories, ``skip`` and the result see.

    Returns:
        Why layers with weights stayed in float, by qualified name.
    """
    reasons: dict[str, str] = {}
    _swap(model, prefix, weight_quantizer, acts_quantizer, skip, fold_bn, norm_outputs, reasons)
    if is_weight_reader(model):
        redirect_weight_reads(model)
    disable_fused_paths(model)
    return reasons
