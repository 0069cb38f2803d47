"""The layer types torchquant quantizes, how a ``QWrapper`` runs each, their BatchNorm, and the folding arithmetic.

:data:`LAYER_ADAPTERS` is the one table of supported layers: each entry is a
:class:`LayerAdapter` saying how to see the layer's weight in the ``(out, in, ...)``
layout the weight quantizer gets and how to run the layer with a given weight.
``QWrapper``, both conversion methods (``graph.swap``, ``graph.fx``), BatchNorm
folding, the model summary and the experiment layer all read it (through
:func:`layer_adapter`, :data:`BN_FOR_LAYER` and :data:`LAYER_TYPES`), so a new layer
type is one entry here. Layers of optional packages (Hugging Face's GPT-2
``Conv1D``, timm's weight-standardised convolutions) are entries of
:data:`LAYER_ADAPTERS_BY_NAME`, keyed by the class's ``module.qualname``, so
``import torchquant`` imports none of those packages. A layer whose weight is computed
in ``forward`` or on access (weight standardisation, a ``torch.nn.utils.parametrize``
parametrization, weight norm) has an adapter with ``computed=True`` that gives the
quantizer the computed weight (see :func:`layer_adapter`).

:data:`NORM_TYPES` and :func:`is_normalization` name the normalisation modules whose
outputs ``quantize_model(..., method="swap", norm_outputs=True)`` quantizes;
:func:`norm_gain_offset` and :func:`divide_norm_output_` move a per-channel scale into one
(``weight`` or Gemma's ``1 + weight``), as SmoothQuant, AWQ and QuaRot do.

``BN(conv(x, W) + b) == conv(x, W * s) + (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)`` per output channel (Jacob et al. 2018):

* :func:`bn_scale`, :func:`bn_scale_shift`, :func:`fold_bn_params`: that arithmetic, as pure functions.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "BN_FOR_LAYER",
    "FLOAT_LAYERS",
    "FOLDABLE_TYPES",
    "LAYER_ADAPTERS",
    "LAYER_ADAPTERS_BY_NAME",
    "LAYER_TYPES",
    "NORM_TYPES",
    "LayerAdapter",
    "bn_scale",
    "bn_scale_shift",
    "divide_norm_output_",
    "fold_bn_params",
    "is_normalization",
    "layer_adapter",
    "norm_gain_offset",
]


@dataclass(frozen=True)
class LayerAdapter:
    """How a ``QWrapper`` runs one layer type with a (possibly quantized) weight.

    The weight quantizer always sees the ``(out, in, ...)`` view given by ``weight``,
    so ``axis=0`` means output channels (rows, for an embedding table) and
    ``axis=1``/``-1`` with a group size means groups along the input, whatever the
    layer's storage layout.

    Attributes:
        weight: ``layer -> Tensor``, the layer's weight as an ``(out, in, ...)`` view of
            its parameter (the parameter itself when that is its layout), so
            ``view.copy_(...)`` writes the parameter.
        forward: ``(layer, x, w, bias) -> Tensor``, the layer's output for input ``x``
            with weight ``w`` in the ``(out, in, ...)`` layout and ``bias`` (or ``None``);
            bit-identical to ``layer(x)`` when given ``weight(layer)`` and the layer's bias.
        n_out: ``layer -> int``, the size of the weight view's axis 0.
        bn: the BatchNorm type that may follow the layer (fused, foldable), or ``None``
            when none is fused.
        unsupported: ``layer -> str | None``, why this layer's configuration cannot be
            quantized (``None`` when it can).
        computed: ``weight`` computes the weight from parameters (weight standardisation, a
            parametrization, weight norm) instead of viewing one, so writing into it changes
            nothing and no BatchNorm is folded into it.
    """

    weight: Callable[[nn.Module], Tensor]
    forward: Callable[[nn.Module, Tensor, Tensor, Tensor | None], Tensor]
    n_out: Callable[[nn.Module], int]
    bn: type[nn.modules.batchnorm._BatchNorm] | None = None
    unsupported: Callable[[nn.Module], str | None] | None = None
    computed: bool = False

    def why_unsupported(self, layer: nn.Module) -> str | None:
        """Why ``layer`` cannot be quantized, or ``None`` when it can."""
        return None if self.unsupported is None else self.unsupported(layer)


# Plain functions, not lambdas: a QWrapper holds its adapter, and a pickled model must pickle it.
def _own_weight(layer: nn.Module) -> Tensor:
    return layer.weight


def _linear_forward(layer: nn.Linear, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(x, w, b)


def _linear_n_out(layer: nn.Linear) -> int:
    return layer.out_features


def _conv_forward(layer: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return layer._conv_forward(x, w, b)  # honours padding_mode, groups, dilation


def _conv_n_out(layer: nn.Module) -> int:
    return layer.out_channels


def _embedding_forward(layer: nn.Embedding, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # (..., ) int64 indices -> (..., dim); max_norm and sparse are refused by _embedding_unsupported.
    return F.embedding(x, w, layer.padding_idx, None, layer.norm_type, layer.scale_grad_by_freq, False)


def _embedding_n_out(layer: nn.Embedding) -> int:
    return layer.num_embeddings


def _embedding_unsupported(layer: nn.Embedding) -> str | None:
    if layer.max_norm is not None:
        # F.embedding renormalises the rows it reads in place; on a quantized copy that
        # would neither update the parameter nor match nn.Embedding.
        return f"max_norm={layer.max_norm} renormalises the weight in place, which a quantized weight cannot do"
    if layer.sparse:
        return "sparse=True gradients do not pass through a weight quantizer"
    return None


def _conv1d_hf_weight(layer: nn.Module) -> Tensor:
    return layer.weight.t()  # stored (in, out) -> (out, in), a view


def _conv1d_hf_forward(layer: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # transformers.pytorch_utils.Conv1D.forward with W = w.t(): (..., in) -> (..., out). For the
    # unquantized view w.t() is the parameter itself, so the result is bit-identical to the layer's.
    y = x.view(-1, x.size(-1))
    y = torch.addmm(b, y, w.t()) if b is not None else y @ w.t()
    return y.view(*x.shape[:-1], w.shape[0])


def _conv1d_hf_n_out(layer: nn.Module) -> int:
    return layer.nf


def _std_conv_weight(layer: nn.Module) -> Tensor:
    # timm's StdConv2d: each output channel's weight standardised (zero mean, unit variance), as its forward does.
    w = layer.weight
    flat = F.batch_norm(w.reshape(1, layer.out_channels, -1), None, None, training=True, momentum=0.0, eps=layer.eps)
    return flat.reshape_as(w)


def _scaled_std_conv_weight(layer: nn.Module) -> Tensor:
    # timm's ScaledStdConv2d (NFNets): standardised, then scaled per output channel by gain * gamma / sqrt(fan_in).
    w = layer.weight
    gain = (layer.gain * layer.scale).view(-1)  # (out,)
    return F.batch_norm(
        w.reshape(1, layer.out_channels, -1), None, None, weight=gain, training=True, momentum=0.0, eps=layer.eps
    ).reshape_as(w)


def _std_conv_forward(layer: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    if getattr(layer, "same_pad", False):  # the *Same variants pad at run time, TensorFlow's "SAME"
        from timm.layers.padding import pad_same  # the layer is timm's, so timm is imported

        x = pad_same(x, layer.kernel_size, layer.stride, layer.dilation)
    return F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


def _conv2d_same_forward(layer: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # timm's Conv2dSame (TensorFlow "SAME" padding at run time): timm.layers.conv2d_same.conv2d_same.
    from timm.layers.padding import pad_same  # the layer is timm's, so timm is imported

    x = pad_same(x, w.shape[-2:], layer.stride, layer.dilation)
    return F.conv2d(x, w, b, layer.stride, (0, 0), layer.dilation, layer.groups)


LAYER_ADAPTERS: dict[type[nn.Module], LayerAdapter] = {
    nn.Linear: LayerAdapter(_own_weight, _linear_forward, _linear_n_out, bn=nn.BatchNorm1d),
    nn.Conv1d: LayerAdapter(_own_weight, _conv_forward, _conv_n_out, bn=nn.BatchNorm1d),
    nn.Conv2d: LayerAdapter(_own_weight, _conv_forward, _conv_n_out, bn=nn.BatchNorm2d),
    nn.Conv3d: LayerAdapter(_own_weight, _conv_forward, _conv_n_out, bn=nn.BatchNorm3d),
    nn.Embedding: LayerAdapter(_own_weight, _embedding_forward, _embedding_n_out, unsupported=_embedding_unsupported),
    # nn.MultiheadAttention's out_proj: a Linear subclass with no forward of its own.
    nn.modules.linear.NonDynamicallyQuantizableLinear: LayerAdapter(
        _own_weight, _linear_forward, _linear_n_out, bn=nn.BatchNorm1d
    ),
}
"""Layer types (exact) a ``QWrapper`` holds, each with its :class:`LayerAdapter`."""


def _falcon_linear_forward(layer: nn.Module, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # transformers' FalconLinear: x @ W^T, then + b (not F.linear, whose rounding differs in half precision).
    out = x @ w.T
    return out if b is None else out + b


LAYER_ADAPTERS_BY_NAME: dict[str, LayerAdapter] = {
    # Hugging Face GPT-2's linear layer: weight stored (in, out), y = x @ W + b.
    "transformers.pytorch_utils.Conv1D": LayerAdapter(_conv1d_hf_weight, _conv1d_hf_forward, _conv1d_hf_n_out),
    "transformers.models.falcon.modeling_falcon.FalconLinear": LayerAdapter(
        _own_weight, _falcon_linear_forward, _linear_n_out, bn=nn.BatchNorm1d
    ),
    # timm's Linear casts its parameters to the input's dtype under TorchScript only: F.linear otherwise.
    "timm.layers.linear.Linear": LayerAdapter(_own_weight, _linear_forward, _linear_n_out, bn=nn.BatchNorm1d),
    "timm.layers.conv2d_same.Conv2dSame": LayerAdapter(
        _own_weight, _conv2d_same_forward, _conv_n_out, bn=nn.BatchNorm2d
    ),
    # timm's weight-standardised convolutions compute their weight in forward; the quantizer sees that weight.
    **{
        f"timm.layers.std_conv.{name}": LayerAdapter(weight, _std_conv_forward, _conv_n_out, computed=True)
        for name, weight in (
            ("StdConv2d", _std_conv_weight),
            ("StdConv2dSame", _std_conv_weight),
            ("ScaledStdConv2d", _scaled_std_conv_weight),
            ("ScaledStdConv2dSame", _scaled_std_conv_weight),
        )
    },
}
"""Layer classes of optional packages, keyed by ``f"{cls.__module__}.{cls.__qualname__}"`` (exact class)."""


FLOAT_LAYERS: dict[type[nn.Module], str] = {
    nn.EmbeddingBag: (
        "EmbeddingBag is not quantized: its offsets and per_sample_weights inputs do not pass through "
        "QWrapper's one-input forward"
    ),
}
"""Layer types with weights that the converters leave in float, with the reason the summary shows."""


def _adapter_of_class(cls: type) -> LayerAdapter | None:
    adapter = LAYER_ADAPTERS.get(cls)
    if adapter is None:
        adapter = LAYER_ADAPTERS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    return adapter


def _weight_hooks(module: nn.Module) -> list:
    """The forward pre-hooks that compute one of ``module``'s tensors: the deprecated
    ``torch.nn.utils.weight_norm`` and ``torch.nn.utils.prune``'s methods."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.weight_norm import WeightNorm

    hooks = getattr(module, "_forward_pre_hooks", {})
    return [h for h in hooks.values() if isinstance(h, (WeightNorm, BasePruningMethod))]


def _hooked_tensor(hook: object) -> str:
    return hook.name if hasattr(hook, "compute_weight") else hook._tensor_name  # type: ignore[attr-defined]


def _hooked_weight(layer: nn.Module) -> Tensor:
    (hook,) = [h for h in _weight_hooks(layer) if _hooked_tensor(h) == "weight"]
    if hasattr(hook, "compute_weight"):
        return hook.compute_weight(layer)  # g * v / ||v||, as the weight-norm hook computes it
    return hook.apply_mask(layer)  # weight_orig * weight_mask, as the pruning hook computes it


_hooked_weight_norm = _hooked_weight  # the name wrappers pickled before pruning hooks were read hold


def _scaled_embedding_forward(layer: nn.Embedding, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    out = _embedding_forward(layer, x, w, b)
    scale = layer.embed_scale
    return out * (scale.to(out.dtype) if isinstance(scale, Tensor) else scale)


_SCALED_EMBEDDING = LayerAdapter(
    _own_weight, _scaled_embedding_forward, _embedding_n_out, unsupported=_embedding_unsupported
)


def _subclass_adapter(module: nn.Module) -> LayerAdapter | None:
    """The adapter of a subclass of ``nn.Linear``/``nn.Embedding`` without children that computes what its base
    computes: one that keeps its base's ``forward``, or an embedding with an ``embed_scale`` whose output is the
    base's times that scale (transformers' ``*ScaledWordEmbedding`` of Gemma, Bart, M2M100, ...), checked bit for
    bit on a probe input; ``None`` otherwise (a ``forward`` of its own may do anything: take float inputs,
    add a term)."""
    if module._modules or not isinstance(module, (nn.Linear, nn.Embedding)):
        return None
    base = nn.Linear if isinstance(module, nn.Linear) else nn.Embedding
    if type(module).forward is base.forward:
        return LAYER_ADAPTERS[base]
    w = getattr(module, "weight", None)
    if base is nn.Linear or not hasattr(module, "embed_scale") or not isinstance(w, Tensor) or w.is_meta:
        return None
    if _SCALED_EMBEDDING.why_unsupported(module) is not None:
        return None
    x = torch.arange(min(8, module.num_embeddings), device=w.device)
    try:
        with torch.no_grad():
            same = torch.equal(module(x), _scaled_embedding_forward(module, x, w, None))
    except Exception:  # a forward that fails on the probe is not the scaled lookup
        same = False
    return _SCALED_EMBEDDING if same else None


def layer_adapter(module: object) -> LayerAdapter | None:
    """The :class:`LayerAdapter` of ``module``'s exact type, or ``None`` when a ``QWrapper`` cannot hold it.

    A layer whose weight is computed on access, by ``torch.nn.utils.parametrize`` (weight
    norm from ``torch.nn.utils.parametrizations.weight_norm``, spectral norm, ...) or by the
    deprecated ``torch.nn.utils.weight_norm`` hook, or pruned by ``torch.nn.utils.prune``
    (``weight_orig * weight_mask``), gets its type's adapter reading the computed weight
    (``computed=True``): the quantizer sees the weight the layer uses. One whose bias is pruned
    gets none.
    A subclass of ``nn.Linear`` or ``nn.Embedding`` gets its base's adapter when it keeps the
    base's ``forward``, and an embedding with an ``embed_scale`` (transformers'
    ``GemmaTextScaledWordEmbedding``) a scaled lookup when its output is the base's times that
    scale, bit for bit on a probe input; other subclasses get none (``tq.print_summary`` says so).

    Args:
        module: any object (typically an ``nn.Module``).

    Returns:
        The entry of :data:`LAYER_ADAPTERS` or :data:`LAYER_ADAPTERS_BY_NAME`, such an entry
        for a computed weight, or ``None``.

    Example:
        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> layer_adapter(weight_norm(nn.Linear(4, 2))).computed
        True
    """
    cls = type(module)
    if isinstance(module, nn.Module) and parametrize.is_parametrized(module):
        base = _adapter_of_class(cls.__bases__[0])  # parametrize makes a subclass "Parametrized<Cls>"
        # Only layers whose adapter reads ``layer.weight``, which now computes the parametrized value.
        if base is None or base.weight is not _own_weight:
            return None
        return replace(base, bn=None, computed=True)
    adapter = _adapter_of_class(cls)
    if adapter is None and isinstance(module, nn.Module):
        adapter = _subclass_adapter(module)
    hooks = _weight_hooks(module) if adapter is not None and isinstance(module, nn.Module) else []
    if hooks:
        # the wrapper never calls the layer, so its hooks do not run: the weight they compute is read each
        # call; a hook on another tensor (a pruned bias) would be left stale
        if adapter.weight is not _own_weight or [_hooked_tensor(h) for h in hooks] != ["weight"]:
            return None
        return replace(adapter, weight=_hooked_weight, bn=None, computed=True)
    return adapter


BN_FOR_LAYER: dict[type[nn.Module], type[nn.modules.batchnorm._BatchNorm]] = {
    t: a.bn for t, a in LAYER_ADAPTERS.items() if a.bn is not None
}
"""Layer types that a BatchNorm may follow (fused into the ``QWrapper``, foldable), each with that BatchNorm type."""

LAYER_TYPES: tuple[type[nn.Module], ...] = tuple(LAYER_ADAPTERS)
"""The keys of :data:`LAYER_ADAPTERS`, for ``isinstance`` checks (the by-name entries are not types here)."""

FOLDABLE_TYPES: tuple[type[nn.Module], ...] = (
    *BN_FOR_LAYER,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""Layer types :func:`~torchquant.fold_batchnorm` folds a following BatchNorm into (the quantized ones
that take a BatchNorm and the transposed convolutions, which are folded along their second weight axis)."""

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
"""Normalisation module types (exact) whose output ``norm_outputs=True`` quantizes; see :func:`is_normalization`."""

_NORM_SUFFIXES = ("RMSNorm", "LayerNorm")


def is_normalization(module: nn.Module, *, weightless: bool = False) -> bool:
    """Whether ``module`` is a normalisation whose output ``quantize_model(..., norm_outputs=True)`` quantizes.

    That is an exact :data:`NORM_TYPES` instance, or a class of another package named
    ``*RMSNorm``/``*LayerNorm`` (Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``) that
    has a tensor ``weight`` (or, with ``weightless=True``, none: OLMo's non-parametric
    LayerNorm, whose output ``norm_outputs`` quantizes too) and a ``forward`` taking one tensor.

    Args:
        module: any module.
        weightless: accept such a class without a weight (it has no gain to fold a scale into).

    Returns:
        ``True`` or ``False``.
    """
    cls = type(module)
    if cls in NORM_TYPES:
        return True
    has_weight = isinstance(getattr(module, "weight", None), Tensor)
    if not cls.__name__.endswith(_NORM_SUFFIXES) or not (has_weight or weightless):
        return False
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1 and all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def bn_scale(bn: nn.modules.batchnorm._BatchNorm, running_var: Tensor | None = None) -> Tensor:
    """``gamma / sqrt(running_var + eps)`` ``(C,)``: the factor an eval-mode BatchNorm applies per channel
    (``running_var`` replaces the BatchNorm's when given)."""
    scale = torch.rsqrt((bn.running_var if running_var is None else running_var) + bn.eps)
    return scale if bn.weight is None else scale * bn.weight


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` of an eval-mode BatchNorm: ``bn(y) == y * scale + shift``. Shapes ``(C,)``."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError(f"cannot fold {bn}: it tracks no running statistics")
    scale = bn_scale(bn)
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def fold_bn_params(
    weight: Tensor, bias: Tensor | None, bn: nn.modules.batchnorm._BatchNorm, transposed: bool = False
) -> tuple[Tensor, Tensor]:
    """Weight ``(C_out, ...)`` and bias ``(C_out,)`` of the layer with ``bn`` (eval statistics) folded in.

    ``transposed=True`` for ConvTranspose weights ``(C_in, C_out / groups, ...)``.
    """
    scale, shift = bn_scale_shift(bn)
    shape = [1] * weight.dim()
    shape[1 if transposed else 0] = -1
    w = weight * scale.reshape(shape)
    b = shift if bias is None else bias * scale + shift
    return w, b


def norm_gain_offset(norm: nn.Module) -> float | None:
    """The ``c`` with which ``norm`` multiplies each output channel by ``c + weight``, or ``None``.

    ``0`` for ``LayerNorm``, ``RMSNorm`` and Llama's RMSNorm, ``1`` for Gemma's, which computes
    ``n(x) * (1 + weight)``. Found numerically, not by class: the gain is rescaled by seeded
    factors on a random input, ``c`` being the offset that scales the output channels one for one;
    ``None`` when no offset does (the weight is not a per-channel gain) or ``norm`` has no
    ``(d,)`` weight.

    Args:
        norm: a normalisation module (its weight and bias are restored afterwards).

    Returns:
        ``0.0``, ``1.0`` or ``None``.

    Example:
        >>> norm_gain_offset(nn.LayerNorm(8)), norm_gain_offset(nn.Linear(8, 8))
        (0.0, None)
    """
    w = getattr(norm, "weight", None)
    if not isinstance(w, Tensor) or w.dim() != 1 or w.numel() < 2 or not w.is_floating_point():
        return None
    d = w.numel()
    if w.dtype in (torch.float16, torch.bfloat16):
        # Gains c + weight near 0 are stored coarsely near -c, where the probe's rescaling would round them by
        # more than any tolerance: the probe runs on a float32 copy.
        try:
            norm = copy.deepcopy(norm).float()
            w = norm.weight
        except Exception:  # a module that cannot be copied: probed as it is
            pass
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, d, generator=g).to(w)
    r = torch.empty(d).uniform_(0.25, 4.0, generator=g).to(w.dtype).float()
    tol = max(1e-4, 8 * torch.finfo(w.dtype).eps)
    saved = [(t, t.detach().clone()) for t in (w, getattr(norm, "bias", None)) if isinstance(t, Tensor)]
    try:
        with torch.no_grad():
            y0 = norm(x)
            if not isinstance(y0, Tensor) or y0.shape != x.shape:
                return None
            y0 = y0.float()
            for c in (0.0, 1.0):
                with warnings.catch_warnings():  # a probe: its precision is judged below, not warned about
                    warnings.simplefilter("ignore")
                    divide_norm_output_(norm, r, c)
                y1 = norm(x).float() * r.to(x.device)
                for t, v in saved:
                    t.copy_(v)
                if bool(((y1 - y0).abs() <= tol * (y0.abs().max() + y0.abs()) + 1e-12).all()):
                    return c
    except (RuntimeError, TypeError, ValueError):  # a norm that does not take a (3, d) input
        return None
    finally:
        with torch.no_grad():
            for t, v in saved:
                t.copy_(v)
    return None


def divide_norm_output_(norm: nn.Module, s: Tensor, offset: float = 0.0) -> None:
    """Divide ``norm``'s output channels by ``s`` ``(d,)``, in place: its gain ``offset + weight`` and its bias.

    ``offset`` is :func:`norm_gain_offset`'s; with ``0`` the weight is divided by ``s`` as it is, on any
    device (``s`` is moved to the weight's).

    Example:
        >>> ln = nn.LayerNorm(2)
        >>> divide_norm_output_(ln, torch.tensor([2.0, 0.5]))
        >>> ln.weight.tolist()
        [0.5, 2.0]
    """
    w = norm.weight
    with torch.no_grad():
        if offset == 0:
            w.div_(s.to(w))
        else:
            gain = (w.double() + offset) / s.to(device=w.device, dtype=torch.float64)
            w.copy_((gain - offset).to(w))
            # a gain stored as weight = gain - offset keeps the weight's absolute, not relative, precision
            half = w.dtype in (torch.float16, torch.bfloat16)  # float32's absolute step near -1 is 6e-8: no concern
            err = float(((w.double() + offset - gain).abs() / gain.abs().clamp_min(1e-30)).max()) if half else 0.0
            if err > 0.01:
                warnings.warn(
                    f"{type(norm).__name__}: its gain is {offset:g} + weight, stored in {w.dtype}: the scaled gains "
                    f"are off by up to {err:.1%} (rounding near -{offset:g}); fold scales into a float32 copy "
                    "of the model",
                    stacklevel=2,
                )
        b = getattr(norm, "bias", None)
        if isinstance(b, Tensor):
            b.div_(s.to(b))
