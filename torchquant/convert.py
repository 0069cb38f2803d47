"""Whole-model quantization: one entry point, :func:`quantize_model`.

``method="fx"`` (the default) traces the model with torch.fx and rewrites its
graph (layers and functional operations, see :mod:`torchquant.graph.fx`);
``method="swap"`` replaces layers in place, for models torch.fx cannot trace
(layers only, see :mod:`torchquant.graph.swap`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

from torch import nn

from .factories import QuantizerFactory
from .graph.common import FLOAT_REASONS_ATTR, SkipSpec, check_skip, place_quantizers, skip_reason
from .graph.fx import FunctionalOp, FxTraceError, quantize_fx
from .graph.swap import quantize_swap
from .layers import LAYER_TYPES, layer_adapter
from .qmodules import QModule

__all__ = [
    "CONVERSIONS_ATTR",
    "FloatLayersWarning",
    "FunctionalOp",
    "FxTraceError",
    "float_layers",
    "quantize_model",
    "record_conversion",
]


class FloatLayersWarning(UserWarning):
    """``quantize_model`` left layers with weights in float that the user did not skip.

    Silence it with ``warnings.filterwarnings("ignore", category=tq.FloatLayersWarning)``,
    or skip those layers explicitly.
    """


def float_layers(model: nn.Module, skip: tuple = ()) -> list[str]:
    """Qualified names of the layers with weights (Linear, Conv, Embedding, ...) that no QModule holds
    and that ``skip`` does not name (neither the layer nor a module above it)."""
    held: list[str] = []
    out = []
    for name, m in model.named_modules():
        if isinstance(m, QModule):
            held.append(name)
            continue
        if not (isinstance(m, LAYER_TYPES) or layer_adapter(m) is not None):
            continue
        if any(h == "" or name == h or name.startswith(h + ".") for h in held):
            continue
        parts = name.split(".")
        ancestors = [(".".join(parts[:i]), model.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts) + 1)]
        if any(skip_reason(n, a, skip) is not None for n, a in ancestors):
            continue
        out.append(name)
    return out


def _warn_float_layers(model: nn.Module, skip: tuple) -> None:
    names = float_layers(model, skip)
    if names:
        shown = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
        warnings.warn(
            f"quantize_model: {len(names)} layer(s) with weights stay in float: {shown}; "
            "tq.print_summary(model) says why (skip them to silence this)",
            FloatLayersWarning,
            stacklevel=3,
        )


CONVERSIONS_ATTR = "_tq_conversions"
"""Name of the ``list[dict]`` attribute in which converters record, in order, how a model was
converted (JSON data), so :func:`torchquant.load` can convert a float model the same way."""


def _qualified(obj: object) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def record_conversion(model: nn.Module, record: dict) -> None:
    """Append ``record`` (JSON data with a ``"kind"`` key) to ``model``'s conversion history."""
    history = list(getattr(model, CONVERSIONS_ATTR, []))
    history.append(record)
    setattr(model, CONVERSIONS_ATTR, history)


def _skip_record(skip: tuple) -> list:
    return [s if isinstance(s, str) else {"type": _qualified(s)} for s in skip]


def quantize_model(
    model: nn.Module,
    weight_quantizer: QuantizerFactory | None,
    acts_quantizer: QuantizerFactory | None,
    *,
    skip: SkipSpec = (),
    method: str = "fx",
    fold_bn: bool = False,
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable] = (),
    norm_outputs: bool = False,
) -> nn.Module:
    """Make every layer (and, with ``"fx"``, every activation-creating operation) of ``model`` quantizable.

    ``method="fx"`` traces ``model`` with torch.fx and returns a new
    ``torch.fx.GraphModule`` that shares ``model``'s parameter tensors (``model``
    keeps its structure): ``Conv``/``Linear`` + ``BatchNorm`` + activation
    (module or functional, e.g. ``F.relu``) and ``Embedding`` modules become one
    ``QWrapper`` each; additions,
    multiplications, concatenations, matrix products, average pooling, means,
    normalisations and softmax become ``QOp`` s (the full lists are in
    :mod:`torchquant.graph.fx`). Modules torch.fx keeps whole (``leaf_modules``, timm's
    registered leaves, torch.nn containers such as ``nn.TransformerEncoderLayer``) are
    quantized inside: traced on their own and rewritten, or, when that fails, with their
    layers swapped in a copy sharing their parameters. When torch.fx cannot trace the model
    it raises :class:`FxTraceError` naming the module and the model's line; it never falls
    back (except for a torch.nn module converted on its own, quantized inside a copy).

    ``method="swap"`` replaces ``Conv``/``Linear``/``Embedding`` modules and Hugging
    Face's ``Conv1D`` (GPT-2) in place (fused with a following ``BatchNorm`` and
    activation inside an ``nn.Sequential``) and returns ``model`` itself. It covers
    layers (and, with ``norm_outputs=True``, normalisation outputs), not functional
    operations, and works for models torch.fx cannot trace (Hugging Face
    transformers, data-dependent control flow).

    Either way, ``nn.MultiheadAttention`` becomes a :class:`~torchquant.QMultiheadAttention`
    (input and output projection weights, output), and layers that compute their weight in
    ``forward`` (timm's ``StdConv2d``/``ScaledStdConv2d``, ``torch.nn.utils.parametrize``
    parametrizations such as weight norm) get that computed weight quantized.

    The layer types and how each is quantized are in :data:`torchquant.layers.LAYER_ADAPTERS`:
    the weight quantizer always sees an ``(out, in, ...)`` view, so ``axis=0`` is per
    output channel (per row of an embedding table, per output of a ``Conv1D``, whose
    ``(in, out)`` weight it sees transposed) and ``axis=1, group_size=g`` groups along
    the input (the embedding dimension). A tied output layer (GPT-2's ``lm_head``) keeps
    sharing its Parameter with the embedding.

    Either way, layers with weights that end up in float without being skipped (a
    subclass of ``nn.Linear`` with its own ``forward``, an ``EmbeddingBag``) raise a
    :class:`FloatLayersWarning` naming them. Every new ``QModule`` starts ``BYPASSED``, so the output equals the
    float model's until :func:`~torchquant.utils.set_qmodule_state` changes the mode,
    and the new quantizers sit on the model's device (a QWrapper's on its layer's), so
    a model already on a GPU is converted there.

    Args:
        model: a float model.
        weight_quantizer: factory ``(module, name) -> Quantizer | None`` for layer
            weights; it receives the original layer module (``Conv``, ``Linear``,
            ``Embedding``, ``Conv1D``) and its qualified name (for a
            ``MultiheadAttention`` ``mha`` at ``name``: ``(mha, name + ".in_proj")`` and
            ``(mha.out_proj, name + ".out_proj")``), and may return ``None`` to keep that
            weight in float.
        acts_quantizer: factory ``(module, name) -> Quantizer | None`` for output
            activations of layers and operations. For a layer it receives the layer
            and its name; for a module operation (pooling, ...) that module and its
            name; for a function call a :class:`FunctionalOp` and the ``QOp`` 's name
            (``"layer1.0.add"``).
        skip: qualified-name globs (``"layer4.*"``) and module types whose modules
            stay in float; with ``"fx"`` they are not traced into either.
        method: ``"fx"`` or ``"swap"``.
        fold_bn: passed to every ``QWrapper`` that has a BatchNorm (fold it into
            the weights before weight quantization).
        leaf_modules: with ``"fx"``, module types not to trace into as part of the
            model: each is traced on its own (else swapped inside), so its layers are
            still quantized (``skip`` keeps a module in float). When ``timm`` is
            imported, its registered not-traceable modules and functions are added.
        autowrap_functions: with ``"fx"``, functions recorded as single calls
            instead of being traced into.
        norm_outputs: with ``"swap"``, wrap every normalisation module
            (:func:`~torchquant.layers.is_normalization`: ``LayerNorm``, ``RMSNorm``,
            ``GroupNorm``, Hugging Face's ``LlamaRMSNorm`` and other ``*RMSNorm``/
            ``*LayerNorm`` classes) in a ``QOp`` that quantizes its output with
            ``acts_quantizer``. ``"fx"`` already gives normalisation modules and
            functions a ``QOp`` (:data:`~torchquant.graph.fx.QOP_MODULES`), so
            ``norm_outputs=True`` is refused there.

    Returns:
        The quantizable model, every QModule ``BYPASSED``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, a factory is not callable, or
            a ``skip`` entry is neither a glob nor a module type.
        ValueError: unknown ``method``, ``leaf_modules``/``autowrap_functions``
            given with ``method="swap"``, ``norm_outputs=True`` with ``method="fx"``,
            or a layer whose configuration cannot be quantized (an ``Embedding`` with
            ``max_norm`` or ``sparse=True``; the message names it).
        FxTraceError: torch.fx cannot trace ``model``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> import torchquant as tq
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> wf = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))
        >>> af = lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax())
        >>> q = tq.quantize_model(net, wf, af)
        >>> [type(m).__name__ for m in q.children()]
        ['QWrapper', 'Flatten', 'QWrapper']
        >>> q = tq.quantize_model(net, wf, af, method="swap")
        >>> [type(m).__name__ for m in q]
        ['QWrapper', 'Identity', 'Identity', 'Flatten', 'QWrapper']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: expected an nn.Module, got {type(model).__name__}")
    skip = check_skip(skip)
    leaf_modules, autowrap_functions = tuple(leaf_modules), tuple(autowrap_functions)
    if method == "fx":
        if norm_outputs:
            raise ValueError(
                "quantize_model: norm_outputs applies to method='swap' only; method='fx' already quantizes "
                "normalisation outputs (LayerNorm, RMSNorm, GroupNorm, F.layer_norm, ... become QOps)"
            )
        gm = quantize_fx(
            model,
            weight_quantizer,
            acts_quantizer,
            skip=skip,
            fold_bn=fold_bn,
            leaf_modules=leaf_modules,
            autowrap_functions=autowrap_functions,
        )
        place_quantizers(gm)
        setattr(gm, CONVERSIONS_ATTR, list(getattr(model, CONVERSIONS_ATTR, [])))
        record_conversion(
            gm,
            {
                "kind": "quantize_model",
                "method": "fx",
                "skip": _skip_record(skip),
                "fold_bn": bool(fold_bn),
                "leaf_modules": [_qualified(t) for t in leaf_modules],
                "autowrap_functions": [_qualified(f) for f in autowrap_functions],
            },
        )
        _warn_float_layers(gm, skip)
        return gm
    if method == "swap":
        if tuple(leaf_modules) or tuple(autowrap_functions):
            raise ValueError("quantize_model: leaf_modules and autowrap_functions apply to method='fx' only")
        reasons = quantize_swap(
            model, weight_quantizer, acts_quantizer, skip=skip, fold_bn=fold_bn, norm_outputs=norm_outputs
        )
        place_quantizers(model)
        previous = getattr(model, FLOAT_REASONS_ATTR, {})
        setattr(model, FLOAT_REASONS_ATTR, {**previous, **reasons})
        record_conversion(
            model, {"kind": "quantize_model", "method": "swap", "skip": _skip_record(skip), "fold_bn": bool(fold_bn)}
        )
        _warn_float_layers(model, skip)
        return model
    raise ValueError(f"quantize_model: unknown method {method!r}; valid: 'fx', 'swap'")
