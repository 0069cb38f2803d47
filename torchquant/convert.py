"""Whole-model quantization: one entry point, :func:`quantize_model`.

``method="fx"`` (the default) traces the model with torch.fx and rewrites its
graph (layers and functional operations, see :mod:`torchquant.graph.fx`);
``method="swap"`` replaces layers in place, for models torch.fx cannot trace
(layers only, see :mod:`torchquant.graph.swap`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Container, Iterable
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .factories import QuantizerFactory
from .graph.common import (
    FLOAT_REASONS_ATTR,
    Skip,
    SkipSpec,
    check_skip,
    place_quantizers,
    skip_reason,
    warn_unmatched_skip,
)
from .graph.concrete import bind_examples, describe_examples
from .graph.fx import FunctionalOp, FxTraceError, quantize_fx
from .graph.swap import quantize_swap
from .layers import LAYER_TYPES, is_normalization, layer_adapter
from .qmodules import QModule, QOp, fold_bn_mode

__all__ = [
    "CONVERSIONS_ATTR",
    "FloatLayersWarning",
    "FunctionalOp",
    "FxTraceError",
    "float_layers",
    "quantize_model",
    "record_conversion",
    "unconverted_weights",
]


class FloatLayersWarning(UserWarning):
    """``quantize_model`` left layers with weights in float that the user did not skip.

    Silence it with ``warnings.filterwarnings("ignore", category=tq.FloatLayersWarning)``,
    or skip those layers explicitly.
    """


# Layers float_layers reports by type, lookup tables (position embeddings are often nn.Embedding
# subclasses) and normalisations (a LayerNorm over (C, F) has a 2-d weight): not reported here.
_NOT_WEIGHTED = (
    *LAYER_TYPES,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
)


_WEIGHT_NAMES = ("weight", "weights", "kernel", "proj", "projection", "q", "k", "v", "o", "r", "w", "W")
_WEIGHT_SUFFIXES = ("_weight", "_weights", "_kernel", "_proj", "_projection")


def _weight_like(name: str, t: Tensor) -> bool:
    """Whether a parameter a module registers on itself is used as a layer's weight: a matrix or a
    stack of them (at least two dimensions larger than 1) named ``weight(s)``, ``weight_*``, ``*_weight(s)``,
    ``kernel``, ``*_kernel``, ``proj``, ``*_proj``, ``projection``, ``*_projection``, ``w``/``W``, ``w_*``/``W_*``
    (``W_q``), ``w1``/``w2``/``w3``/``v1`` (FFN weights), or ``q``/``k``/``v``/``o``/``r`` (attention projections
    XLNet multiplies with einsum)."""
    if sum(d > 1 for d in t.shape) < 2:  # a scale, a bias, a (heads, 1, 1) temperature
        return False
    if name in _WEIGHT_NAMES or name.startswith(("weight_", "w_", "W_")) or name.endswith(_WEIGHT_SUFFIXES):
        return True
    return len(name) == 2 and name[0] in "wv" and name[1].isdigit()  # w1, w2, w3, v1: FFN weights (DBRX)


def _own_weights(
    m: nn.Module, held_params: set[int], weight_like: Callable[[str, Tensor], bool]
) -> list[tuple[str, Tensor]]:
    """``m``'s own weight-like parameters that no QModule holds, a parametrized one (weight norm) included."""
    own = [(p, t) for p, t in m.named_parameters(recurse=False) if id(t) not in held_params]
    if parametrize.is_parametrized(m):
        own += [(p, getattr(m, p)) for p in m.parametrizations]
    return [(p, t) for p, t in own if weight_like(p, t)]


def _under(name: str, prefixes: Container[str]) -> bool:
    """Whether ``name`` is one of ``prefixes`` (a set, a dict's keys) or inside one (``""`` is the whole model)."""
    if "" in prefixes:
        return True
    parts = name.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts) + 1))


def unconverted_weights(
    model: nn.Module, *, weight_like: Callable[[str, Tensor], bool] | None = None
) -> dict[str, str]:
    """Modules outside any QModule that use weight parameters of their own instead of a layer torchquant converts.

    The layer types of :data:`~torchquant.layers.LAYER_ADAPTERS` are not listed here (the
    summary and :func:`float_layers` name those when they stay float), nor are parameters a
    QModule also holds (a weight torch.fx moved into a ``QWrapper``), embedding tables and
    normalisation layers. A weight here is a parameter with at least two dimensions larger
    than 1 named ``weight``, ``weight_*``, ``*_weight``, ``*_weights``, ``proj``, ``*_proj``,
    ``projection``, ``*_projection``, ``w1``/``w2``/``w3`` or ``v1``: a router's ``weight``, an
    LSTM's ``weight_ih_l0``, a ``ConvTranspose2d``'s weight, an MoE expert bank's ``gate_up_proj``
    or DBRX's ``w1``. Position embeddings,
    class tokens, relative-position tables and per-head scales are not (by name or shape).

    Args:
        model: any model, typically the output of :func:`quantize_model`.
        weight_like: ``(parameter name, tensor) -> bool``, what counts as a weight instead
            of the rule above (an integration whose models keep weights under other names
            passes a broader one).

    Returns:
        ``{qualified name: why its weights stay float}``, in module order.

    Example:
        >>> import torch
        >>> class Mixer(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.token_proj = nn.Parameter(torch.randn(16, 16))
        ...         self.pos_embed = nn.Parameter(torch.randn(1, 16, 8))
        >>> unconverted_weights(nn.Sequential(nn.Linear(8, 8), Mixer(), nn.ConvTranspose1d(2, 2, 3)))
        {'1': 'Mixer uses its parameter token_proj (16, 16) itself, not through a layer torchquant converts', \
'2': 'no rule for ConvTranspose1d: its weight (2, 2, 3) stays float'}
    """
    qmodules = [(n, m) for n, m in model.named_modules() if isinstance(m, QModule)]
    held = {n for n, _ in qmodules}
    held_params = {id(p) for _, m in qmodules for p in m.parameters()}
    out: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, (QModule, parametrize.ParametrizationList)) or _under(name, held):
            continue
        if isinstance(m, _NOT_WEIGHTED) or is_normalization(m) or layer_adapter(m) is not None:
            continue
        own = _own_weights(m, held_params, weight_like or _weight_like)
        if not own:
            continue
        if isinstance(m, nn.RNNBase):
            out[name] = (
                f"{type(m).__name__} keeps float weights: its fused recurrent kernel reads weight_ih/weight_hh "
                "itself; torchquant has no rule for it"
            )
            continue
        # parametrize makes a subclass "Parametrized<Cls>" holding a "parametrizations" dict
        cls = (type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)).__name__
        if [p for p, _ in own] == ["weight"] and all(n == "parametrizations" for n, _ in m.named_children()):
            out[name] = f"no rule for {cls}: its weight {tuple(own[0][1].shape)} stays float"
        else:
            listed = ", ".join(f"{p} {tuple(t.shape)}" for p, t in own)
            plural = "s" * (len(own) > 1)
            out[name] = f"{cls} uses its parameter{plural} {listed} itself, not through a layer torchquant converts"
    return out


def _is_qop(gm: nn.Module, node: Any) -> bool:
    try:
        return isinstance(gm.get_submodule(node.target), QOp)
    except AttributeError:
        return False


def _warn_traced_optional_inputs(gm: nn.Module) -> None:
    """Warn about forward arguments that default to ``None`` but were traced as given tensors.

    Without example inputs torch.fx passes a proxy for every argument, so ``if mask is not None``
    takes the branch that uses ``mask``: the converted model then fails when called without it.
    """
    graph = getattr(gm, "graph", None)
    if graph is None:  # the whole model is one leaf
        return

    def needs_a_tensor(user: Any, arg: Any) -> bool:
        # None would fail there: a method, an attribute, arithmetic, a module's input (a layer, or the QOp the
        # conversion made of arithmetic: `y + mask`)
        if user.op == "call_method":
            return user.args[:1] == (arg,)
        if user.op == "call_module":
            return user.args[:1] == (arg,) or (len(user.args) > 1 and arg in user.args and _is_qop(gm, user))
        return (
            user.op == "call_function"
            and (user.target is getattr or getattr(user.target, "__module__", None) == "_operator")
            and arg in user.args
        )

    used = [
        n.target
        for n in graph.nodes
        if n.op == "placeholder" and n.args == (None,) and any(needs_a_tensor(u, n) for u in n.users)
    ]
    if used:
        names = ", ".join(repr(t) for t in used)
        warnings.warn(
            f"quantize_model: the trace took the forward's optional argument(s) {names} (default None) as given "
            "tensors, so the converted model needs them; to convert it for calls without them, pass "
            "example_inputs= as you call the model",
            UserWarning,
            stacklevel=3,
        )


def float_layers(model: nn.Module, skip: tuple = ()) -> list[str]:
    """Qualified names of the modules whose weights stay float and that ``skip`` does not name (neither
    the module nor one above it): layers with weights (Linear, Conv, Embedding, ...) that no QModule
    holds, and the modules of :func:`unconverted_weights` (a router, an LSTM, a ConvTranspose), in module order."""
    held: set[str] = set()
    out = []
    raw = unconverted_weights(model)
    for name, m in model.named_modules():
        if isinstance(m, QModule):
            held.add(name)
            continue
        if not (isinstance(m, LAYER_TYPES) or layer_adapter(m) is not None or name in raw):
            continue
        if _under(name, held):
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
        names = [n or "(the model itself)" for n in names]
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
    fold_bn: bool | str = False,
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable] = (),
    norm_outputs: bool = False,
    example_inputs: Any = None,
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
            stay in float; with ``"fx"`` they are not traced into either. An entry that
            matches no module or operation the model runs gets a warning naming it.
        method: ``"fx"`` or ``"swap"``.
        fold_bn: passed to every ``QWrapper`` that has a BatchNorm (fold it into
            the weights before weight quantization): ``True`` (or ``"two_pass"``),
            ``"one_pass"`` (one convolution per training step, as torch.ao; see
            :class:`~torchquant.QWrapper`) or ``False``.
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
        example_inputs: with ``"fx"``, example arguments of ``model``'s forward (a tensor, a
            tuple of positional arguments, or a dict of keyword arguments). The trace then
            runs each operation on them, so a branch on a size (``if H % window:``), an
            ``int()``/``range()``/``len()`` of one follows the example and is guarded: an
            input that takes another branch raises
            :class:`~torchquant.graph.concrete.BranchGuardError` naming the model's line.
            Leaves fx cannot trace on their own (timm's ConViT, Twins and MobileViT
            attention) are traced with their inputs for the example instead of having only
            their layers swapped, so their matrix products and softmax are quantized too.
            Branches on tensor values, parameters or buffers are refused, so only shapes and
            dtypes decide; they are recorded, and a checkpoint reloads with zeros of those shapes.
            An export to ONNX keeps the branches without their guards.

    Returns:
        The quantizable model, every QModule ``BYPASSED``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, a factory is not callable, or
            a ``skip`` entry is neither a glob nor a module type.
        ValueError: unknown ``method``, ``leaf_modules``/``autowrap_functions``/``example_inputs``
            given with ``method="swap"``, ``example_inputs`` that do not bind to ``forward``
            (or hold other than tensors and scalars), ``norm_outputs=True`` with ``method="fx"``,
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
    mode = fold_bn_mode(fold_bn, "quantize_model")
    fold_record = mode if mode == "one_pass" else mode is not None  # True/False as before, for older loaders
    checked = isinstance(skip, Skip)  # entries a caller normalised itself: that caller checks what they matched
    skip = skip if checked else check_skip(skip)
    leaf_modules, autowrap_functions = tuple(leaf_modules), tuple(autowrap_functions)
    if method == "fx":
        if norm_outputs:
            raise ValueError(
                "quantize_model: norm_outputs applies to method='swap' only; method='fx' already quantizes "
                "normalisation outputs (LayerNorm, RMSNorm, GroupNorm, F.layer_norm, ... become QOps)"
            )
        examples, fixed = (None, None) if example_inputs is None else bind_examples(model, example_inputs)
        recorded_examples = None if example_inputs is None else describe_examples(example_inputs)
        gm = quantize_fx(
            model,
            weight_quantizer,
            acts_quantizer,
            skip=skip,
            fold_bn=fold_bn,
            leaf_modules=leaf_modules,
            autowrap_functions=autowrap_functions,
            concrete_args=fixed,
            example_args=examples,
        )
        place_quantizers(gm)
        if example_inputs is None:
            _warn_traced_optional_inputs(gm)
        setattr(gm, CONVERSIONS_ATTR, list(getattr(model, CONVERSIONS_ATTR, [])))
        record_conversion(
            gm,
            {
                "kind": "quantize_model",
                "method": "fx",
                "skip": _skip_record(skip),
                "fold_bn": fold_record,
                "leaf_modules": [_qualified(t) for t in leaf_modules],
                "autowrap_functions": [_qualified(f) for f in autowrap_functions],
                **({} if example_inputs is None else {"options": {"example_inputs": recorded_examples}}),
            },
        )
        if not checked:
            warn_unmatched_skip(skip, "quantize_model")
        _warn_float_layers(gm, skip)
        return gm
    if method == "swap":
        if tuple(leaf_modules) or tuple(autowrap_functions) or example_inputs is not None:
            raise ValueError(
                "quantize_model: leaf_modules, autowrap_functions and example_inputs apply to method='fx' only"
            )
        reasons = quantize_swap(
            model, weight_quantizer, acts_quantizer, skip=skip, fold_bn=fold_bn, norm_outputs=norm_outputs
        )
        place_quantizers(model)
        previous = getattr(model, FLOAT_REASONS_ATTR, {})
        setattr(model, FLOAT_REASONS_ATTR, {**previous, **reasons})
        record_conversion(
            model, {"kind": "quantize_model", "method": "swap", "skip": _skip_record(skip), "fold_bn": fold_record}
        )
        if not checked:
            warn_unmatched_skip(skip, "quantize_model")
        _warn_float_layers(model, skip)
        return model
    raise ValueError(f"quantize_model: unknown method {method!r}; valid: 'fx', 'swap'")
