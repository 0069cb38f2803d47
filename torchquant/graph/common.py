"""Helpers shared by the whole-model converters: skip rules and wrapper construction."""

from __future__ import annotations

import copy
import fnmatch
import itertools
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ..factories import QuantizerFactory, call_factory
from ..layers import layer_adapter
from ..qmodules import QModule, QMultiheadAttention, QWrapper
from ..quantizers import Quantizer

__all__ = [
    "FLOAT_REASONS_ATTR",
    "SkipSpec",
    "check_skip",
    "disable_fused_paths",
    "make_qmha",
    "make_qwrapper",
    "mha_unsupported",
    "place_quantizers",
    "skip_reason",
    "structural_copy",
]

SkipSpec = Iterable["str | type[nn.Module]"]

FLOAT_REASONS_ATTR = "_tq_float_reasons"
"""Name of the ``dict[str, str]`` attribute in which converters record, per qualified
name, why a layer or operation stayed in float (read by :func:`torchquant.summary`)."""


class Skip(tuple):
    """Normalised skip entries (a tuple); ``matched`` collects those :func:`skip_reason` found a match for."""

    matched: set


def check_skip(skip: SkipSpec) -> Skip:
    """Normalise ``skip`` to a tuple of name globs and ``nn.Module`` types.

    Args:
        skip: one glob or type, or an iterable of them.

    Returns:
        The entries as a :class:`Skip` tuple, none matched yet.

    Raises:
        TypeError: an entry is neither a string nor an ``nn.Module`` subclass.
    """
    out = Skip((skip,) if isinstance(skip, (str, type)) else tuple(skip))
    for s in out:
        if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
            raise TypeError(f"quantize_model: skip entries must be name globs or nn.Module types, got {s!r}")
    out.matched = set()
    return out


def warn_unmatched_skip(skip: tuple, who: str) -> None:
    """Warn, naming them, about entries of a :class:`Skip` that matched no module or operation (a typo, or
    a module the forward pass never reaches: the layers meant stay quantized)."""
    matched = getattr(skip, "matched", None)
    if matched is None:
        return
    unmatched = [s if isinstance(s, str) else s.__name__ for s in skip if s not in matched]
    if unmatched:
        warnings.warn(
            f"{who}: skip entries matched no module or operation the model runs: "
            f"{', '.join(repr(s) for s in unmatched)} (qualified names: tq.print_summary(model) lists them)",
            UserWarning,
            stacklevel=3,
        )


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
            reason = f"skipped by glob {s!r}"
        elif isinstance(s, type) and isinstance(module, s):
            reason = f"skipped by type {s.__name__}"
        else:
            continue
        if isinstance(skip, Skip):
            skip.matched.add(s)
        return reason
    return None


def make_qwrapper(
    layers: list[nn.Module],
    name: str,
    wf: QuantizerFactory | None,
    af: QuantizerFactory | None,
    fold_bn: bool | str,
    factory_module: nn.Module | None = None,
) -> QWrapper:
    """A :class:`QWrapper` of ``layers``.

    Args:
        layers: the layer, optionally its BatchNorm and activation.
        name: qualified name given to the factories.
        wf: weight quantizer factory.
        af: activation quantizer factory.
        fold_bn: how to fold the BatchNorm (:class:`QWrapper`'s ``fold_bn``; only passed on when there is one).
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
        fold_bn=fold_bn if len(layers) > 1 and isinstance(layers[1], nn.modules.batchnorm._BatchNorm) else False,
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


def mha_unsupported(mha: nn.MultiheadAttention) -> str | None:
    """Why :class:`~torchquant.QMultiheadAttention` cannot hold ``mha`` (``None`` when it can)."""
    if not mha._qkv_same_embed_dim:
        return (
            f"MultiheadAttention with separate query/key/value projections (kdim={mha.kdim}, vdim={mha.vdim}) "
            "is not quantized"
        )
    return None


def make_qmha(
    mha: nn.MultiheadAttention, name: str, wf: QuantizerFactory | None, af: QuantizerFactory | None
) -> QMultiheadAttention:
    """A :class:`~torchquant.QMultiheadAttention` of ``mha``.

    The weight factory is called with ``(mha, f"{name}.in_proj")`` for the packed input
    projection and ``(mha.out_proj, f"{name}.out_proj")`` for the output projection; the
    activation factory with ``(mha, name)`` for the attention output.
    """
    prefix = f"{name}." if name else ""
    wrapper = QMultiheadAttention(
        mha,
        in_proj_quantizer=call_factory(wf, mha, f"{prefix}in_proj", "weight_quantizer"),
        out_proj_quantizer=call_factory(wf, mha.out_proj, f"{prefix}out_proj", "weight_quantizer"),
        acts_quantizer=call_factory(af, mha, name, "acts_quantizer"),
    )
    if name:
        wrapper._name_quantizers(name)
    wrapper.train(mha.training)
    return wrapper


def disable_fused_paths(root: nn.Module) -> None:
    """Turn off the fused inference kernels of the ``nn.TransformerEncoderLayer`` and
    ``nn.TransformerEncoder`` modules of ``root`` that hold a QModule.

    Those kernels read ``self_attn.in_proj_weight``, ``linear1.weight``, ... directly (the
    float weights, through the wrappers) instead of calling the submodules, so in eval mode
    without gradients they would skip every quantizer inside. The Python path they fall
    back to computes the same values.
    """
    for m in root.modules():
        if not any(isinstance(c, QModule) for c in m.modules()):
            continue
        if isinstance(m, nn.TransformerEncoderLayer):
            m.activation_relu_or_gelu = 0  # read only to choose the fused kernel
        elif isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False


def structural_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree of modules that shares its parameters and buffers.

    Replacing submodules of the copy (a module swap inside it) leaves ``module`` as it was,
    while both compute with the same tensors. A module held at two places is copied once.
    """
    memo: dict[int, nn.Module] = {}

    def copy_tree(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        new = copy.copy(m)  # a new __dict__ holding the same values
        memo[id(m)] = new
        new._parameters = dict(m._parameters)
        new._buffers = dict(m._buffers)
        new._modules = {k: None if c is None else copy_tree(c) for k, c in m._modules.items()}
        return new

    return copy_tree(module)


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
        if isinstance(m, QMultiheadAttention):
            weight = m.layer.out_proj.weight
        if isinstance(weight, torch.Tensor):
            device = weight.device
        if device is None:
            continue
        for q in m.children():
            if isinstance(q, Quantizer):
                q.to(device)
