"""``quantize_model(method="fx")``: trace a float model with torch.fx and rewrite its graph.

The pass, in graph order:

* **Layers.** A call of a module whose exact type has a
  :class:`~torchquant.layers.LayerAdapter` (``Conv1d/2d/3d``, ``Linear``,
  ``Embedding``, Hugging Face's ``Conv1D``, timm's weight-standardised convolutions,
  parametrized layers; such modules are not traced into), followed by
  the matching ``BatchNorm`` module (Linear and Conv) when the layer's output has no other user,
  followed by a supported activation when the previous output has no other
  user, becomes one :class:`~torchquant.qmodules.QWrapper` placed at the
  layer's qualified name. The activation may be a module (one of
  :data:`~torchquant.qmodules.SUPPORTED_ACTIVATIONS`) or a call listed in
  :data:`FUNCTIONAL_ACTIVATIONS` (``F.relu``, ``torch.sigmoid``, ``x.relu()``,
  ...), which becomes the equivalent module with its arguments (``inplace``,
  ``negative_slope``, ``min_val``/``max_val``, ``approximate``).
* **Operations that create new activation values** become a
  :class:`~torchquant.qmodules.QOp` with the same arguments: the functions in
  :data:`QOP_FUNCTIONS`, the tensor methods in :data:`QOP_METHODS` and the
  modules in :data:`QOP_MODULES` (average pooling, normalisation, softmax),
  when their output is a floating-point tensor (normalisation outputs are thus
  quantized by default here; ``quantize_model``'s ``norm_outputs`` is for
  ``"swap"``). Activations that compute new values but follow no layer they
  could be fused into (a GELU after a transpose, a SiLU after an addition, a
  Hardsigmoid gate), ``torch.addcmul``, ``F.normalize`` and interpolating
  resampling (:data:`QOP_ACTIVATION_MODULES`, :data:`QOP_ACTIVATION_FUNCTIONS`)
  get a ``QOp`` too, but only when the activation factory gives them a quantizer;
  otherwise they stay as called. A ``QOp`` for a function sits
  in the module the call was made from, named after the operation
  (``layer1.0.add``, ``layer1.0.add_1``); one for a module replaces it at its
  own name.
* Everything else stays as traced: shape and indexing operations, max pooling,
  nearest-neighbour resampling, dropout, ReLU/ReLU6/Hardtanh (they do not create
  new values); in-place arithmetic (``x.add_(y)``), whose
  quantized copy would not reach the later users of the mutated tensor; and
  functional convolutions (``F.conv2d`` with a weight attribute), which have no
  module to wrap. :func:`torchquant.summary` lists the layers with weights that
  stayed in float and why.

Factories receive, for a ``QWrapper``, the original layer module
and its qualified name; for a module ``QOp``, the wrapped module and its name;
for a function ``QOp``, a :class:`FunctionalOp` describing the call and the
``QOp``'s qualified name.

Stochastic depth (torchvision's ``StochasticDepth``, timm's ``DropPath`` and ``DropBlock2d``)
modules are leaves, so they follow the mode at run time; other values the traced code derives
from ``self.training`` follow it through :mod:`torchquant.graph.modes`. Modules that are
``QModule`` s or ``Quantizer`` s, skipped modules, and the
leaf modules given by the user (and, when ``timm`` is imported, the modules and
functions it registers as not traceable) are not traced into. A leaf with parameters
(those, and the torch.nn modules torch.fx keeps whole, such as
``nn.TransformerEncoderLayer``) is quantized inside: traced on its own, with the
constant arguments its calls pass fixed, and rewritten by this same pass; when that
fails, its layers are swapped (:mod:`torchquant.graph.swap`) in a copy that shares its
parameters. With example inputs, every trace runs on them (:mod:`torchquant.graph.concrete`):
branches on sizes follow the example, guarded, and a leaf is traced with its inputs for it.
An ``nn.MultiheadAttention`` becomes a
:class:`~torchquant.qmodules.QMultiheadAttention`. A module that passes its layers' weights
to ``F.linear`` (:data:`~torchquant.graph.readers.WEIGHT_READERS`: torchvision's Swin
attention) is a leaf whose layers are swapped and whose weight reads go to the wrappers.
"""

from __future__ import annotations

import inspect
import operator
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..factories import QuantizerFactory, call_factory
from ..layers import FLOAT_LAYERS, LAYER_TYPES, is_normalization, layer_adapter
from ..qmodules import SUPPORTED_ACTIVATIONS, QModule, QOp
from ..quantizers import Quantizer
from .common import (
    FLOAT_REASONS_ATTR,
    make_qmha,
    make_qwrapper,
    mha_unsupported,
    skip_reason,
    structural_copy,
)
from .concrete import GRAPH_DIR, MISSING, TORCH_DIR, BranchGuardError, ExampleValues, StateRestored, branch_guard
from .modes import ModeDiff, TrainingBranchWarning, follow_mode, install_mode_flags, is_mode_flag_call
from .readers import is_weight_reader
from .swap import quantize_swap

__all__ = [
    "FUNCTIONAL_ACTIVATIONS",
    "QOP_ACTIVATION_FUNCTIONS",
    "QOP_ACTIVATION_MODULES",
    "QOP_FUNCTIONS",
    "QOP_METHODS",
    "QOP_MODULES",
    "FunctionalOp",
    "FxTraceError",
    "quantize_fx",
]


class FxTraceError(RuntimeError):
    """torch.fx could not trace the model; the message names the module and the operation."""


@dataclass(frozen=True)
class FunctionalOp:
    """What an ``acts_quantizer`` factory receives, instead of a module, for a function ``QOp``.

    Attributes:
        fn: the function the ``QOp`` calls, e.g. ``operator.add``, ``torch.cat``,
            or for a tensor method the unbound method (``torch.Tensor.mean``).
        node: the torch.fx node name of the call in the traced graph.
    """

    fn: Callable
    node: str

    @property
    def name(self) -> str:
        """The function's short name (``"add"``, ``"cat"``, ``"mean"``)."""
        return getattr(self.fn, "__name__", type(self.fn).__name__)

    def __str__(self) -> str:
        return self.name


# ----------------------------------------------------------------------------- rule tables
FUNCTIONAL_ACTIVATIONS: dict[Any, tuple[type[nn.Module], tuple[str, ...]]] = {
    F.relu: (nn.ReLU, ("inplace",)),
    torch.relu: (nn.ReLU, ()),
    F.relu6: (nn.ReLU6, ("inplace",)),
    F.silu: (nn.SiLU, ("inplace",)),
    F.hardswish: (nn.Hardswish, ("inplace",)),
    F.gelu: (nn.GELU, ("approximate",)),
    F.leaky_relu: (nn.LeakyReLU, ("negative_slope", "inplace")),
    F.hardtanh: (nn.Hardtanh, ("min_val", "max_val", "inplace")),
    torch.sigmoid: (nn.Sigmoid, ()),
    torch.tanh: (nn.Tanh, ()),
    "relu": (nn.ReLU, ()),
    "sigmoid": (nn.Sigmoid, ()),
    "tanh": (nn.Tanh, ()),
}
"""Activation calls fused into a ``QWrapper``: function (or tensor-method name) ->
(module class, names of the arguments after the input, passed to its constructor).
``F.sigmoid`` and ``F.tanh`` trace as the ``sigmoid``/``tanh`` methods."""

QOP_FUNCTIONS: frozenset = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.matmul,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.matmul,
        torch.bmm,
        torch.einsum,
        torch.cat,
        torch.concat,
        torch.stack,
        torch.mean,
        torch.sum,
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        F.layer_norm,
        F.group_norm,
        F.softmax,
        torch.softmax,
        F.scaled_dot_product_attention,
    }
)
"""Functions whose floating-point tensor output gets a ``QOp``."""

QOP_METHODS: frozenset[str] = frozenset({"add", "sub", "mul", "div", "matmul", "bmm", "mean", "sum", "softmax"})
"""Tensor methods whose floating-point tensor output gets a ``QOp`` (in-place ones stay float)."""

QOP_MODULES: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.Softmax,
)
"""Module types (exact) whose calls get a ``QOp``; a BatchNorm fused into a ``QWrapper`` does not.
A BatchNorm subclass that applies an activation (timm's ``BatchNormAct2d``) and follows
no layer gets one too."""

QOP_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Mish, nn.ELU, nn.SELU,
    nn.CELU, nn.Softplus, nn.PReLU,
)  # fmt: skip
"""Activation module types (exact) that compute new values: a call that is not fused into the
layer before it (data movement or an addition in between, a gate) gets a ``QOp`` when the
activation factory gives a quantizer for it, and stays the plain module otherwise. ReLU, ReLU6
and Hardtanh only clip values, so their outputs stay on their inputs' grid and need none."""

QOP_ACTIVATION_FUNCTIONS: frozenset = frozenset(
    {
        F.silu, F.hardswish, F.gelu, F.leaky_relu, torch.sigmoid, torch.tanh, F.hardsigmoid, F.mish, F.elu,
        F.selu, F.celu, F.softplus, F.prelu, torch.addcmul, F.normalize, "sigmoid", "tanh",
    }
)  # fmt: skip
"""Functions (and tensor-method names) that compute new values and are handled as
:data:`QOP_ACTIVATION_MODULES`: a ``QOp`` when the factory gives a quantizer, else left as called.
Resampling (``nn.Upsample``, ``F.interpolate``) joins them unless its mode is ``"nearest"``,
which only copies values."""

_COPYING_MODES = ("nearest", "nearest-exact")  # resampling modes that copy input values
# Tensors made from a size, a dtype and a value alone.
_CREATION = frozenset(
    {
        torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.zeros_like, torch.ones_like,
        torch.full_like, torch.empty_like, "new_zeros", "new_ones", "new_full", "new_empty",
    }
)  # fmt: skip
_FUNCTIONAL_LAYERS = frozenset({F.conv1d, F.conv2d, F.conv3d, F.linear})
# Operations whose float outputs need no quantizer of their own: they move, select or
# clip values (quantized inputs give outputs on the same grid), or are identities in eval.
_VALUE_PRESERVING = frozenset(
    {
        operator.getitem, getattr, operator.neg, torch.flatten, torch.reshape, torch.transpose, torch.permute,
        torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.unbind, torch.roll, torch.flip,
        torch.narrow, torch.clone, torch.relu, torch.clamp, torch.clip, torch.max, torch.amax, torch.maximum,
        torch.minimum, torch.where, torch.swapaxes, torch.swapdims, torch.movedim,
        F.pad, F.relu, F.relu6, F.hardtanh, F.dropout, F.dropout1d, F.dropout2d,
        F.dropout3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
        F.adaptive_max_pool3d, F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle, torch.channel_shuffle,
        "view", "reshape", "permute", "transpose", "flatten", "unflatten", "contiguous", "squeeze", "unsqueeze",
        "expand", "expand_as", "repeat", "chunk", "split", "unbind", "narrow", "flip", "roll", "clone", "detach",
        "to", "type", "float", "double", "half", "bfloat16", "relu", "relu_", "clamp", "clamp_", "clip", "max",
        "amax", "neg", "masked_fill", "index_select", "gather", "t", "mT", "view_as", "reshape_as", "movedim",
        "swapaxes", "squeeze_", "unsqueeze_", "tile", "repeat_interleave", "split_with_sizes", "type_as",
    }
)  # fmt: skip
# Checks the traced graph makes of its inputs: they compute nothing.
_CHECKS = frozenset({branch_guard, fx._symbolic_trace._assert_is_none})
_NOT_VALUES = _FUNCTIONAL_LAYERS | _CHECKS
# Library functions recorded as single calls (torch.fx.wrap) that are identities in eval mode.
_VALUE_PRESERVING_NAMES = frozenset({"stochastic_depth", "drop_path", "drop_connect"})
# Functions timm and torchvision record as single calls (not traceable) that only move values:
# window and grid partitions undone, zero padding before a patch merge.
_DATA_MOVEMENT_CALLS = frozenset(
    {
        ("timm.models.swin_transformer", "window_reverse"), ("timm.models.swin_transformer_v2", "window_reverse"),
        ("timm.models.swin_transformer_v2_cr", "window_reverse"), ("timm.models.davit", "window_reverse"),
        ("timm.models.gcvit", "window_reverse"), ("timm.models.maxxvit", "window_reverse"),
        ("timm.models.maxxvit", "window_reverse_nchw"), ("timm.models.maxxvit", "grid_reverse"),
        ("timm.models.maxxvit", "grid_reverse_nchw"), ("timm.models.nest", "deblockify"),
        ("torchvision.models.swin_transformer", "_patch_merging_pad"),
    }
)  # fmt: skip
_VALUE_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten, nn.Unflatten,
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ChannelShuffle,
)  # fmt: skip
_NON_TENSOR_METHODS = frozenset(
    {"size", "dim", "ndimension", "numel", "nelement", "tolist", "item", "stride", "element_size", "is_contiguous"}
)
_NON_TENSOR_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse"})
_INT_METHODS = frozenset({"long", "int", "short", "bool", "byte", "char", "argmax", "argmin", "nonzero"})
_FLOAT_METHODS = frozenset({"float", "double", "half", "bfloat16"})
_INT_FUNCTIONS = frozenset(
    {torch.argmax, torch.argmin, torch.nonzero, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge}
    | {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.not_, operator.floordiv}
)


# ----------------------------------------------------------------------------- tracing
class _Tracer(fx.Tracer):
    """Leaves: QModules, Quantizers, skipped modules, user leaf types; remembers where tracing broke."""

    def __init__(
        self, skip: tuple = (), leaf_modules: tuple = (), autowrap_functions: tuple = (), prefix: str = ""
    ) -> None:
        # Defaults: unpickling a GraphModule (torch.load of a whole quantized model) re-traces its code
        # with a subclass of the tracer that made it, built without arguments.
        super().__init__(autowrap_functions=autowrap_functions)
        self.skip = skip
        self.leaf_types = leaf_modules
        self.prefix = prefix
        self.skipped: dict[str, tuple[str, nn.Module]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (QModule, Quantizer)) or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if module_qualified_name:
            reason = skip_reason(self.prefix + module_qualified_name, m, self.skip)
            if reason is not None:
                self.skipped[module_qualified_name] = (reason, m)
                return True
        if layer_adapter(m) is not None:  # a layer computing its weight in forward (timm's StdConv2d) stays whole
            return True
        if is_weight_reader(m, traced=True):  # its layers are swapped and its weight reads redirected (graph.readers)
            return True
        if _train_only(m):  # stochastic depth, DropPath: traced, their mode would be frozen at trace time
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            if not hasattr(e, "_tq_failed_module"):  # innermost module first
                try:
                    path = self.path_of_module(m)
                except NameError:
                    path = "?"
                e._tq_failed_module = (path, type(m).__name__)
            raise


_NN_MODULES_DIR = os.path.join(TORCH_DIR, "nn", "modules")


class _ExampleTracer(ExampleValues, _Tracer):
    """The tracer with example values: branches on sizes follow the example inputs, guarded.

    ``trace_wrapped``: trace into the functions marked with ``torch.fx.wrap`` in the modules that define
    the root's class and its bases rather than record them as calls (torchvision's
    ``shifted_window_attention``, to which a weight reader passes its layers' weights: traced, those
    reads become layers and its attention gets ``QOp`` s). torch.fx keeps that table globally: not
    for conversions in several threads at once."""

    def __init__(self, *args: Any, trace_wrapped: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trace_wrapped = trace_wrapped

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        if not self.trace_wrapped:
            return super().trace(root, concrete_args)
        spaces = {id(vars(sys.modules[c.__module__])) for c in type(root).__mro__ if c.__module__ in sys.modules}
        table = fx._symbolic_trace._wrapped_fns_to_patch
        unwrapped = {k: v for k, v in table.items() if id(v) in spaces}
        for k in unwrapped:
            del table[k]
        try:
            return super().trace(root, concrete_args)
        finally:
            table.update(unwrapped)


def _user_frame(e: BaseException, module: nn.Module | None = None) -> str:
    """``file:line in fn: code`` of the model's own line where tracing failed.

    The innermost traceback frame outside torch and torchquant's tracing (the model's code);
    for a torch.nn module, the innermost one in ``torch/nn/modules``; when the error came
    from torch.fx before any of the model's code ran (e.g. "co_varnames is too small" for a
    decorated ``forward``), where ``module``'s ``forward`` is defined.
    """
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(GRAPH_DIR)]
    outside = [f for f in frames if not f.filename.startswith(TORCH_DIR)]
    if not outside:
        outside = [f for f in frames if f.filename.startswith(_NN_MODULES_DIR)]
    forward = _forward_location(module)
    if outside:
        f = outside[-1]
        at = f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
        if forward and forward[0] != f.filename:  # e.g. a decorator's wrapper: say whose forward it is
            at += f"\n  in the forward of {type(module).__qualname__} at {forward[0]}:{forward[1]}"
        return at
    if forward is None:
        return ""
    return f"{forward[0]}:{forward[1]} in {type(module).__qualname__}.forward (torch.fx failed before running it)"


def _forward_location(module: nn.Module | None) -> tuple[str, int] | None:
    """Source file and first line of ``module``'s ``forward`` (under any decorators), if known."""
    if module is None:
        return None
    try:
        fn = inspect.unwrap(type(module).forward)
        return inspect.getsourcefile(fn) or "?", inspect.getsourcelines(fn)[1]
    except (OSError, TypeError):
        return None


def _trace(model: nn.Module, tracer: _Tracer, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
    try:
        return tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:
        path, cls = getattr(e, "_tq_failed_module", ("", type(model).__name__))
        where = f"module {path!r} ({cls})" if path else f"the top-level module ({cls})"
        try:
            failed = model.get_submodule(path) if path != "?" else None
        except AttributeError:
            failed = None
        frame = _user_frame(e, failed)
        at = f"\n  failing operation: {frame}" if frame else ""
        hint = f", or skip=[{path!r}] to keep that module in float and untraced" if path else ""
        if not isinstance(tracer, ExampleValues) and _on_traced_value(e):
            # the branch, int() or len() may be on a size, which example inputs let the trace follow
            hint += ", or, if it depends on sizes only, pass example_inputs= to trace it (guarded)"
        raise FxTraceError(
            f"quantize_model(method='fx'): torch.fx cannot trace {where}: {type(e).__name__}: {e}{at}\n"
            f"  Use method='swap' (layers only, no functional ops){hint}."
        ) from e


def _on_traced_value(e: BaseException) -> bool:
    """Whether torch.fx failed on control flow, ``len()`` or iteration over a traced value."""
    text = str(e)
    return isinstance(e, (fx.proxy.TraceError, RuntimeError)) and (
        "inputs to control flow" in text or "'len' is not supported" in text or "cannot be iterated" in text
    )


class _TrainingBranch(FxTraceError):
    """A module traced on its own computes differently in the other mode."""


class _Untouched:
    """Restores every module of ``model`` as it was: its attributes, and the contents of its dict, list
    and set attributes. Tracing runs the forward code, which may cache proxies (timm's LeViT), count
    calls or set attributes; torch.fx also stores the tensors made in forward on the root."""

    def __init__(self, model: nn.Module) -> None:
        self.saved = [
            (m, dict(m.__dict__), {k: _contents(v) for k, v in m.__dict__.items() if isinstance(v, (dict, list, set))})
            for m in model.modules()
        ]

    def __enter__(self) -> _Untouched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        for m, attrs, contents in self.saved:
            for k in set(m.__dict__) - set(attrs):
                del m.__dict__[k]
            m.__dict__.update(attrs)
            for k, saved in contents.items():
                v = attrs[k]
                v.clear()
                v.update(saved) if isinstance(v, (dict, set)) else v.extend(saved)


def _contents(v: dict | list | set) -> dict | list | set:
    return dict(v) if isinstance(v, dict) else (list(v) if isinstance(v, list) else set(v))


def _trace_other_mode(
    model: nn.Module, before: _Untouched, make_tracer: Callable[[], _Tracer], concrete_args: dict[str, Any] | None
) -> fx.Graph:
    """Trace ``model`` with every module of it in the mode it is not in; leaves ``model`` as it was.
    The flags are set directly: a ``train()`` override's side effects are not part of tracing.
    ``before`` is ``model`` before the first trace, which may have cached proxies on it (ConViT's
    ``rel_indices``): this trace starts from there too."""
    with _Untouched(model):
        before.restore()
        for m in model.modules():
            m.training = not m.training
        return make_tracer().trace(model, concrete_args=concrete_args)


def _mode_of(model: nn.Module) -> Callable[[str], bool]:
    def mode(path: str) -> bool:
        try:
            return model.get_submodule(path).training
        except AttributeError:
            return model.training

    return mode


def _training_branch(model: nn.Module, prefix: str, found: ModeDiff, strict: bool) -> None:
    """Warn (raise when ``strict``) that ``model``'s forward computes differently in the other mode."""
    mode, other = ("train", "eval") if model.training else ("eval", "train")
    names = [
        f"'{prefix}{path}' ({cls})"
        if path
        else (f"'{prefix[:-1]}'" if prefix else "the model") + f" ({type(model).__name__})"
        for path, cls in found.branches
    ]
    what = f"the forward of {', '.join(names[:4])}{' and others' if len(names) > 4 else ''}"
    if found.error:
        what += f" (torch.fx cannot trace it in {other} mode: {found.error})"
    if strict:
        raise _TrainingBranch(f"{what} computes differently in {other} mode")
    whole = found.branches == [("", "")] and not prefix
    advice = (
        ""
        if whole
        else ", add the module's type to leaf_modules (its layers are then swapped and its forward runs as written)"
    )
    warnings.warn(
        f"quantize_model(method='fx'): {what} computes differently in {other} mode than in {mode} mode, the mode it "
        f"was traced in; there the converted model keeps the {mode}-mode computation in both modes. Convert the "
        f"model in the mode you will use it in{advice}, or use method='swap'.",
        TrainingBranchWarning,
        stacklevel=4,
    )


_TRAIN_ONLY_MODULES = frozenset(
    {
        "torchvision.ops.stochastic_depth.StochasticDepth",
        "timm.layers.drop.DropPath",
        "timm.layers.drop.DropBlock2d",
    }
)
"""Qualified names of modules that change values only in training (stochastic depth, DropPath, DropBlock):
fx leaves, so the call follows the mode at run time, and value-preserving in eval (no float report). Pass
a module of your own that branches on ``self.training`` in ``leaf_modules``."""


def _train_only(m: nn.Module) -> bool:
    cls = type(m)
    return f"{cls.__module__}.{cls.__qualname__}" in _TRAIN_ONLY_MODULES


def _train_only_functions() -> tuple:
    """Library functions that change values only in training, recorded as single calls so that their
    ``training`` argument follows the mode (:mod:`torchquant.graph.modes`) where tracing into them would
    keep the branch of the mode at conversion: efficientnet_pytorch's ``drop_connect``, when imported."""
    if "efficientnet_pytorch" not in sys.modules:
        return ()
    try:
        from efficientnet_pytorch.utils import drop_connect
    except ImportError:  # pragma: no cover - another efficientnet_pytorch layout
        return ()
    return (drop_connect,)


def _timm_leaves() -> tuple[tuple, tuple]:
    """timm's own not-traceable modules and functions, when timm is already imported (never imports it)."""
    if "timm" not in sys.modules:
        return (), ()
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # pragma: no cover - older timm
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


# ----------------------------------------------------------------------------- type inference
def _flat_nodes(a: Any) -> list:
    out: list = []
    fx.node.map_arg(a, out.append)
    return out


def _infer_kinds(gm: fx.GraphModule, examples: dict[fx.Node, Any] | None = None) -> dict[fx.Node, str | None]:
    """Per node: ``"float"`` (floating tensor), ``"int"`` (integer/bool tensor) or ``None`` (not a tensor).

    A conservative static guess from how each value was made: shapes and sizes
    are not tensors, comparisons and ``.long()`` give integer tensors, and an
    operation on float tensors gives a float tensor. Inputs are float tensors, or
    what their example value (``examples``, by node) is.
    """
    kinds: dict[fx.Node, str | None] = {}

    def of_args(n: fx.Node) -> str | None:
        ks = [kinds.get(a) for a in _flat_nodes((n.args, n.kwargs))]
        return "float" if "float" in ks else ("int" if "int" in ks else None)

    for n in gm.graph.nodes:
        k: str | None
        example = MISSING if examples is None else examples.get(n, MISSING)
        if n.op == "placeholder" and example is not MISSING:
            k = _kind_of_value(example)
        elif n.op == "placeholder" or (n.op == "call_module" and not is_mode_flag_call(n)):
            k = "float"
        elif n.op == "call_module":  # a mode-dependent constant
            k = None
        elif n.op == "get_attr":
            try:
                v = operator.attrgetter(n.target)(gm)
            except AttributeError:
                v = None
            k = ("float" if v.is_floating_point() else "int") if isinstance(v, torch.Tensor) else None
        elif n.op == "call_method":
            src = kinds.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
            if n.target in _NON_TENSOR_METHODS or src is None:
                k = None
            elif n.target in _INT_METHODS:
                k = "int"
            elif n.target in _FLOAT_METHODS:
                k = "float"
            elif n.target in ("to", "type"):
                dts = [a for a in (*n.args[1:], *n.kwargs.values()) if isinstance(a, torch.dtype)]
                k = ("float" if dts[0].is_floating_point else "int") if dts else src
            else:
                k = of_args(n)
        elif n.op == "call_function":
            if n.target is getattr:
                k = None if n.args[1] in _NON_TENSOR_ATTRS else kinds.get(n.args[0])
            elif n.target is operator.getitem:
                k = kinds.get(n.args[0]) if isinstance(n.args[0], fx.Node) else None
            elif n.target in _INT_FUNCTIONS:
                k = "int" if of_args(n) is not None else None
            else:
                k = of_args(n)
        else:
            k = None
        kinds[n] = k
    return kinds


def _may_trace_alone(m: nn.Module | None) -> bool:
    """Whether a called module may be a leaf that ``_quantize_inside`` traces on its own."""
    if m is None or isinstance(m, (QModule, Quantizer)) or layer_adapter(m) is not None:
        return False
    return type(m) not in QOP_MODULES and any(True for _ in m.parameters())


def _kind_of_value(v: Any) -> str | None:
    found: list[Any] = []
    fx.node.map_aggregate(v, found.append)
    tensors = [t for t in found if isinstance(t, torch.Tensor)]
    if not tensors:
        return None
    return "float" if any(t.is_floating_point() for t in tensors) else "int"


# ----------------------------------------------------------------------------- rewriting
def _activation(
    node: fx.Node, src: fx.Node, modules: dict[str, nn.Module], skip: tuple, prefix: str = ""
) -> nn.Module | None:
    """The activation module equivalent to ``node`` applied to ``src``, or ``None``."""
    if not node.args or node.args[0] is not src:
        return None
    if node.op == "call_module":
        m = modules[node.target]
        ok = type(m) in SUPPORTED_ACTIVATIONS and len(node.args) == 1 and not node.kwargs
        return m if ok and skip_reason(prefix + node.target, m, skip) is None else None
    if node.op == "call_function":
        spec = FUNCTIONAL_ACTIVATIONS.get(node.target) if not isinstance(node.target, str) else None
    elif node.op == "call_method":
        spec = FUNCTIONAL_ACTIVATIONS.get(node.target)
        if spec is not None and (len(node.args) > 1 or node.kwargs):
            return None
    else:
        return None
    if spec is None:
        return None
    cls, names = spec
    extra = node.args[1:]
    if len(extra) > len(names) or any(k not in names for k in node.kwargs):
        return None
    kwargs = dict(zip(names, extra))
    kwargs.update(node.kwargs)
    if _flat_nodes(kwargs):  # an argument computed at run time: cannot become a constructor argument
        return None
    return cls(**kwargs)


_LAYER_SIGNATURES = {
    F.conv1d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.conv3d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.linear: ("input", "weight", "bias"),
}
_CONV_FOR_FN = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}


def _layer_from_call(node: fx.Node, gm: fx.GraphModule, model: nn.Module):
    """A plain Conv/Linear equivalent to a functional call whose weight is a module's parameter.

    ``F.linear``'s bias may be computed (timm's EVA concatenates three parameters): the layer then
    has none and the call's bias node is returned, for the wrapper's call.

    Returns ``(layer, owner_name, owner_module, get_attr_nodes, call_bias_node_or_None)``, or a
    string saying why not.
    """
    names = _LAYER_SIGNATURES[node.target]
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        return "unexpected arguments"
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    w, b = bound.get("weight"), bound.get("bias")
    call_bias = None
    if node.target is F.linear and isinstance(b, fx.Node) and b.op != "get_attr":
        call_bias, b = b, None
    attr_nodes = [n for n in (w, b) if isinstance(n, fx.Node)]
    if not isinstance(w, fx.Node) or any(n.op != "get_attr" for n in attr_nodes):
        return "the weight is not a module parameter"
    owner, _, attr = w.target.rpartition(".")
    if attr != "weight" or (isinstance(b, fx.Node) and b.target != (f"{owner}.bias" if owner else "bias")):
        return "the weight is not a module's 'weight' parameter"
    try:
        owner_module = model.get_submodule(owner)
    except AttributeError:
        return "the weight's owner module is not found"
    weight = operator.attrgetter(w.target)(gm)
    bias = operator.attrgetter(b.target)(gm) if isinstance(b, fx.Node) else None
    if b is not None and not isinstance(b, fx.Node):
        return "the bias is not a module parameter"
    if not isinstance(weight, nn.Parameter) or _flat_nodes({k: v for k, v in bound.items() if k not in names[:3]}):
        return "arguments computed at run time"
    if node.target is F.linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        groups = bound.get("groups", 1)
        layer = _CONV_FOR_FN[node.target](
            weight.shape[1] * groups,
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride=bound.get("stride", 1),
            padding=bound.get("padding", 0),
            dilation=bound.get("dilation", 1),
            groups=groups,
            bias=bias is not None,
            device="meta",
        )
    layer.weight = weight
    layer.bias = bias
    layer.train(owner_module.training)
    return layer, owner, owner_module, attr_nodes, call_bias


def _split_bn_act(m: nn.Module, bn_type: type[nn.Module]) -> list[nn.Module] | None:
    """A BatchNorm subclass that also applies ``m.drop`` then ``m.act`` (timm's ``BatchNormAct2d``) as
    ``[plain BatchNorm sharing its parameters and buffers, activation]``; ``None`` if it is not one.

    Only when its forward is the plain BatchNorm's followed by an identity ``drop`` and an
    identity or supported ``act``.
    """
    act, drop = getattr(m, "act", None), getattr(m, "drop", None)
    if not (isinstance(m, bn_type) and isinstance(drop, nn.Identity) and isinstance(act, nn.Module)):
        return None
    if not (isinstance(act, nn.Identity) or type(act) in SUPPORTED_ACTIVATIONS) or m._modules.keys() - {"act", "drop"}:
        return None
    bn = bn_type(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, device="meta")
    for name in ("weight", "bias"):
        setattr(bn, name, getattr(m, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        bn._buffers[name] = m._buffers.get(name)
    bn.train(m.training)  # an eval model's BatchNorm keeps using its running statistics
    return [bn] if isinstance(act, nn.Identity) else [bn, act]


def _is_bn_act(m: nn.Module) -> bool:
    """A BatchNorm+activation module :func:`_split_bn_act` understands (a standalone one gets a QOp)."""
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    return any(isinstance(m, t) and _split_bn_act(m, t) is not None for t in bn_types)


def _is_sigmoid_of(node: fx.Node, src: fx.Node) -> bool:
    return (
        node.args == (src,)
        and not node.kwargs
        and (
            (node.op == "call_function" and node.target is torch.sigmoid)
            or (node.op, node.target) == ("call_method", "sigmoid")
        )
    )


def _swish_nodes(src: fx.Node) -> list[fx.Node] | None:
    """``[sigmoid, mul]`` when ``src``'s two users compute ``src * sigmoid(src)`` (SiLU written out), else None."""
    users = list(src.users)
    sig = next((u for u in users if _is_sigmoid_of(u, src)), None)
    if sig is None or len(sig.users) != 1:
        return None
    mul = next(iter(sig.users))
    ok = (
        mul in users
        and not mul.kwargs
        and (mul.op, mul.target) in (("call_function", operator.mul), ("call_function", torch.mul))
        and set(mul.args) == {src, sig}
        and len(mul.args) == 2
    )
    return [sig, mul] if ok else None


def _computes_values(node: fx.Node) -> bool:
    """Whether a call is one of :data:`QOP_ACTIVATION_FUNCTIONS` or a resampling that interpolates."""
    if node.target is F.interpolate:
        return node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest") not in _COPYING_MODES
    return node.target in QOP_ACTIVATION_FUNCTIONS


def _owner_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return next(reversed(stack.values()))[0]


class _Rewriter:
    def __init__(self, model, gm, wf, af, skip, fold_bn, tracer, autowrap_functions: tuple = ()) -> None:
        self.model = model
        self.prefix = tracer.prefix  # names given to factories and skip are prefix + the name in gm
        self.leaf_types = tracer.leaf_types
        self.autowrap_functions = autowrap_functions
        self.inside: set[str] = set()  # leaves already quantized inside
        self.traceable_with_examples: set[str] = set()  # swapped leaves example inputs would let fx trace
        self.nested_reasons: dict[str, str] = {}  # from inside leaves, already qualified
        self.gm = gm
        self.graph = gm.graph
        self.wf = wf
        self.af = af
        self.skip = skip
        self.fold_bn = fold_bn
        self.modules = dict(gm.named_modules())
        values = getattr(tracer, "values", None)  # with example inputs: each node's value
        # the arguments of each call of a module that may be traced on its own (_quantize_inside) for the
        # examples, taken before rewriting replaces nodes
        self.call_examples: dict[fx.Node, tuple[tuple, dict]] = {
            n: fx.node.map_arg((n.args, n.kwargs), lambda a: values.get(a, MISSING))
            for n in gm.graph.nodes
            if values is not None and n.op == "call_module" and _may_trace_alone(self.modules.get(n.target))
        }
        self.kinds = _infer_kinds(gm, values)
        self.float_reasons: dict[str, str] = {}
        self._calls_agree: dict[str, bool] = {}  # per module called more than once: whether its calls fuse alike
        self.declined: set[fx.Node] = set()  # optional points the factory gave no quantizer, skipped calls
        self.taken: set[str] = set(self.modules)
        self.skipped = set(tracer.skipped)
        for name, (reason, m) in tracer.skipped.items():
            if any(True for _ in m.parameters()):
                self.float_reasons[name] = f"{reason} ({type(m).__name__})"

    # -- module placement
    def _safe_parent(self, path: str) -> nn.Module | None:
        """The GraphModule container at ``path`` (created if missing), unless it belongs to the user's model."""
        parent: nn.Module = self.gm
        for i, part in enumerate(path.split(".") if path else []):
            child = parent._modules.get(part)
            if child is None:
                if hasattr(parent, part):
                    return None
                child = nn.Module()
                parent.add_module(part, child)
            elif child is self._original(".".join(path.split(".")[: i + 1])):
                return None  # a module shared with the float model: do not add children to it
            parent = child
        return parent

    def _original(self, path: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    def _install(self, path: str, module: nn.Module) -> None:
        parent_path, _, attr = path.rpartition(".")
        parent = self.gm.get_submodule(parent_path) if parent_path else self.gm
        setattr(parent, attr, module)
        self.taken.add(path)

    def _fresh_name(self, scope: str, base: str) -> str:
        parent = self._safe_parent(scope)
        if parent is None:
            base = scope.replace(".", "_") + "_" + base
            scope, parent = "", self.gm
        prefix = f"{scope}." if scope else ""
        name, i = f"{prefix}{base}", 0
        while name in self.taken or hasattr(parent, name.rpartition(".")[2]):
            i += 1
            name = f"{prefix}{base}_{i}"
        self.taken.add(name)
        return name

    # -- rules
    def run(self) -> dict[str, str]:
        for node in list(self.graph.nodes):
            if node.graph is not self.graph or node.op == "output" or getattr(node, "_erased", False):
                continue
            if node.op == "call_module":
                self._call_module(node)
            elif node.op == "call_function":
                if node.target in QOP_FUNCTIONS and self.kinds.get(node) == "float":
                    self._function_qop(node, node.target)
                elif node.target in _FUNCTIONAL_LAYERS:
                    self._functional_layer(node)
                elif _computes_values(node) and self.kinds.get(node) == "float":
                    self._function_qop(node, node.target, optional=True)
            elif node.op == "call_method" and self.kinds.get(node) == "float":
                if node.target in QOP_METHODS:
                    self._function_qop(node, getattr(torch.Tensor, node.target))
                elif _computes_values(node):
                    self._function_qop(node, getattr(torch.Tensor, node.target), optional=True)
        self._report_unquantized_ops()
        self.graph.lint()
        _delete_unused_submodules(self.gm)
        self.gm.recompile()
        return {**{self.prefix + k: v for k, v in self.float_reasons.items()}, **self.nested_reasons}

    def _report_unquantized_ops(self) -> None:
        """Record the operations that create new float values and got no quantizer (no rule for them).

        Values computed from parameters and sizes alone (``torch.zeros(B, H, W)``, ``self.logit_scale.exp()``)
        are constants, not activations: not reported."""
        live: set[fx.Node] = set()  # computed from the model's inputs' values (not only their sizes)
        for node in self.graph.nodes:
            if node.target in _CREATION:
                continue
            tensor_args = [a for a in _flat_nodes((node.args, node.kwargs)) if self.kinds.get(a, "new") is not None]
            if node.op == "placeholder" or any(a in live for a in tensor_args):
                live.add(node)
        for node in self.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module") or self.kinds.get(node) != "float":
                continue
            if node not in live:
                continue
            if node.op == "call_module":
                m = self.gm.get_submodule(node.target)
                if (
                    isinstance(m, (QModule, Quantizer, *_VALUE_PRESERVING_MODULES))
                    or _train_only(m)
                    or node.target in self.skipped
                    or node in self.declined
                    or (isinstance(m, nn.Upsample) and m.mode in _COPYING_MODES)
                ):
                    continue
                if node.target in self.inside and isinstance(m, fx.GraphModule):
                    continue  # traced on its own: its operations got their QOps there
                if node.target in self.inside:
                    note = f"layers inside {type(m).__name__} quantized by module swap; its output is not quantized"
                    if node.target in self.traceable_with_examples:
                        note += " (example_inputs= may trace it if its branches depend on sizes only)"
                    self.float_reasons.setdefault(node.target, note)
                elif node.target not in self.float_reasons:
                    self.float_reasons[node.target] = f"no rule for {type(m).__name__} (output not quantized)"
                continue
            if node.target in _VALUE_PRESERVING or node.target in _NOT_VALUES or node in self.declined:
                continue
            if getattr(node.target, "__name__", None) in _VALUE_PRESERVING_NAMES:
                continue
            key = (getattr(node.target, "__module__", None), getattr(node.target, "__name__", None))
            if key in _DATA_MOVEMENT_CALLS or (node.target is F.interpolate and not _computes_values(node)):
                continue
            op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            scope = _owner_path(node)
            key = f"{scope}.{op}" if scope else op
            key = key if key not in self.float_reasons else f"{key} ({node.name})"
            self.float_reasons[key] = f"no rule for {op} (output not quantized)"

    def _call_module(self, node: fx.Node) -> None:
        m = self.modules.get(node.target)
        if m is None or isinstance(m, (QModule, Quantizer)) or node.target in self.skipped:
            return
        if layer_adapter(m) is not None:
            self._fuse(node, m)
        elif type(m) in QOP_MODULES or _is_bn_act(m):
            self._module_qop(node, m)
        elif type(m) is nn.MultiheadAttention:
            self._mha(node, m)
        elif type(m) in QOP_ACTIVATION_MODULES or (isinstance(m, nn.Upsample) and m.mode not in _COPYING_MODES):
            self._module_qop(node, m, optional=True)
        elif type(m) in FLOAT_LAYERS:
            self.float_reasons[node.target] = FLOAT_LAYERS[type(m)]
        elif isinstance(m, LAYER_TYPES) and not m._modules:
            self.float_reasons[node.target] = f"{type(m).__name__} is a subclass of a supported layer, not the layer"
        elif any(True for _ in m.parameters(recurse=True)):
            self._quantize_inside(node, m)

    def _mha(self, node: fx.Node, m: nn.MultiheadAttention) -> None:
        name = node.target
        if name in self.inside:  # called again: the first call installed the QMultiheadAttention
            return
        why = mha_unsupported(m)
        if why is not None or self._safe_parent(name.rpartition(".")[0]) is None:
            self.float_reasons[name] = why or "MultiheadAttention inside a module shared with the float model"
            return
        self.inside.add(name)
        self._install(name, make_qmha(m, self.prefix + name, self.wf, self.af))

    def _quantize_inside(self, node: fx.Node, m: nn.Module) -> None:
        """A module with parameters that fx kept as a leaf (a torch.nn container such as
        ``nn.TransformerEncoderLayer``, a type in ``leaf_modules``, timm's registered leaves):
        trace it on its own and rewrite it, or, when that fails, swap the layers inside a copy
        of it that shares its parameters. The result replaces it in the GraphModule."""
        name = node.target
        if name in self.inside:
            return
        leaf_reason = f"no rule for {type(m).__name__} (leaf module with parameters)"
        if self._safe_parent(name.rpartition(".")[0]) is None:
            self.float_reasons[name] = leaf_reason
            return
        self.inside.add(name)
        calls = [n for n in self.graph.nodes if n.op == "call_module" and n.target == name]
        example = self.call_examples.get(calls[0])
        # a weight reader traced without examples keeps its weight reads as attributes: swap it instead
        concrete = None if is_weight_reader(m, traced=True) and example is None else _concrete_args(m, calls)
        examples = None if concrete is None or example is None else _example_args(m, calls[0], example)
        prefix = f"{self.prefix}{name}."
        sub: nn.Module | None = None
        if concrete is not None:
            try:
                sub = quantize_fx(
                    m,
                    self.wf,
                    self.af,
                    skip=self.skip,
                    fold_bn=self.fold_bn,
                    leaf_modules=self.leaf_types,
                    autowrap_functions=self.autowrap_functions,
                    prefix=prefix,
                    concrete_args=concrete,
                    strict_modes=True,  # a mode branch inside: swap its layers, its forward then runs as written
                    example_args=examples,
                )
                reasons = sub.meta[FLOAT_REASONS_ATTR]
                new_args = _positional_args(m, sub, calls)
                if new_args is None or not self._runs_every_call(m, sub, calls):
                    sub = None
                elif is_weight_reader(m, traced=True) and not any(isinstance(x, QModule) for x in sub.modules()):
                    sub = None  # its weights still read by a call recorded whole: swap, redirecting the reads
            except FxTraceError as e:
                sub = None
                if example is None and _on_traced_value(e.__cause__ or e):
                    self.traceable_with_examples.add(name)
        elif example is None and is_weight_reader(m, traced=True) and _concrete_args(m, calls) is not None:
            self.traceable_with_examples.add(name)  # traced into the function it passes its weights to
        if sub is not None:
            for call, args in zip(calls, new_args, strict=True):
                call.args, call.kwargs = args, {}
        else:
            sub = structural_copy(m)
            # norm_outputs: normalisation outputs are quantization points here as in the traced graph
            reasons = quantize_swap(
                sub, self.wf, self.af, skip=self.skip, fold_bn=self.fold_bn, norm_outputs=True, prefix=prefix
            )
            _unwrap_bare_norms(sub)
        if not any(isinstance(x, QModule) for x in sub.modules()):
            self.float_reasons[name] = leaf_reason
            return
        self._install(name, sub)
        self.nested_reasons.update(reasons)

    def _runs_every_call(self, m: nn.Module, sub: fx.GraphModule, calls: list[fx.Node]) -> bool:
        """Whether ``sub`` (``m`` traced with its first call's example inputs) takes the traced branches
        for the example inputs of its other calls too (a leaf called at two resolutions)."""
        params = list(inspect.signature(m.forward).parameters.values())
        for call in calls[1:]:
            example = self.call_examples.get(call)
            if example is None:
                continue
            bound = inspect.signature(m.forward).bind(*example[0], **example[1])
            bound.apply_defaults()
            args = fx.node.map_aggregate(
                tuple(bound.arguments[p.name] for p in params),
                lambda v: v.clone() if isinstance(v, torch.Tensor) else v,
            )
            try:
                with torch.no_grad(), StateRestored(sub):
                    sub(*args)  # its new QModules are BYPASSED: the float computation
            except BranchGuardError:
                return False
            except Exception:  # failing for another reason is not this check's to judge
                continue
        return True

    def _functional_layer(self, node: fx.Node) -> None:
        """``F.conv2d(x, self.weight, self.bias, ...)`` inside a Conv/Linear subclass (efficientnet_pytorch's
        same-padding convolutions), or ``F.linear(x, self.qkv.weight, computed_bias)`` (timm's EVA): wrap an
        equivalent plain layer that shares the parameters, called with the computed bias where there is one."""
        fn = node.target
        built = _layer_from_call(node, self.gm, self.model)
        scope = _owner_path(node)
        if isinstance(built, str):
            self.float_reasons.setdefault(scope or node.name, f"functional {fn.__name__} call: {built}")
            return
        layer, owner, owner_module, attr_nodes, call_bias = built
        if skip_reason(self.prefix + owner, owner_module, self.skip) is not None:
            return
        name = self._fresh_name(owner, fn.__name__)
        kwargs = None if call_bias is None else {"bias": call_bias}
        self._fuse(node, layer, name=name, origin=(owner_module, owner), args=(node.args[0],), kwargs=kwargs)
        for a in attr_nodes:
            if not a.users:
                self.graph.erase_node(a)
                a._erased = True
                if not any(n.op == "get_attr" and n.target == a.target for n in self.graph.nodes):
                    parent_path, _, attr = a.target.rpartition(".")
                    parent = self.gm.get_submodule(parent_path) if parent_path else self.gm
                    if parent is not self._original(parent_path) and hasattr(parent, attr):
                        delattr(parent, attr)

    def _fuse(
        self,
        node: fx.Node,
        layer: nn.Module,
        name: str | None = None,
        origin: tuple[nn.Module, str] | None = None,
        args: tuple | None = None,
        kwargs: dict | None = None,
    ) -> None:
        chain, layers, cur = self._chain(node, layer, kwargs)
        if node.op == "call_module":
            # A module called more than once has one wrapper: it takes a BatchNorm or activation only
            # if every call is followed by the same ones (the last call's wrapper would otherwise
            # replace the first's and drop what followed it). Decided at the first call, before any
            # call's nodes are replaced.
            agree = self._calls_agree.get(node.target)
            if agree is None:
                calls = [n for n in self.graph.nodes if n.op == "call_module" and n.target == node.target]
                agree = len({self._chain_key(self._chain(n, layer, kwargs)[1]) for n in calls}) == 1
                self._calls_agree[node.target] = agree
            if not agree:
                chain, layers, cur = [node], [layer], node
        name = name or node.target
        factory_module, factory_name = origin or (layer, name)
        factory_name = self.prefix + factory_name
        wrapper = make_qwrapper(layers, factory_name, self.wf, self.af, self.fold_bn, factory_module=factory_module)
        if factory_name != self.prefix + name:  # a functional call's wrapper: tq.save records the factory's name
            wrapper._tq_factory_name = factory_name
        self._install(name, wrapper)
        with self.graph.inserting_after(cur):
            new = self.graph.call_module(
                name, node.args if args is None else args, kwargs or ({} if args else node.kwargs)
            )
        cur.replace_all_uses_with(new)
        for n in reversed(chain):
            self.graph.erase_node(n)
            n._erased = True

    def _chain_key(self, layers: list[nn.Module]) -> tuple:
        """What a fused chain holds after its layer: the modules of the model by identity, others (made from
        functional calls) by type and arguments (``F.leaky_relu(y, 0.2)`` and ``F.leaky_relu(y, 0.01)`` differ)."""
        own = {id(m) for m in self.modules.values()}
        return tuple((type(m), id(m) if id(m) in own else _arguments(m)) for m in layers[1:])

    def _chain(self, node: fx.Node, layer: nn.Module, kwargs: dict | None) -> tuple[list[fx.Node], list, fx.Node]:
        """The nodes ``layer``'s call at ``node`` fuses with (BatchNorm, activation), their modules, the last node."""
        chain, layers, cur = [node], [layer], node
        fused_act = False
        bn_type = layer_adapter(layer).bn
        if len(cur.users) == 1 and bn_type is not None and not kwargs:  # a call's own bias cannot be folded
            user = next(iter(cur.users))
            bn = self.modules.get(user.target) if user.op == "call_module" else None
            ok = (
                bn is not None
                and user.args == (cur,)
                and not user.kwargs
                and skip_reason(self.prefix + user.target, bn, self.skip) is None
            )
            if ok and type(bn) is bn_type:
                chain.append(user)
                layers.append(bn)
                cur = user
            elif ok and (split := _split_bn_act(bn, bn_type)) is not None:
                chain.append(user)
                layers.extend(split)
                cur = user
                fused_act = True
        if not fused_act and len(cur.users) == 1:
            user = next(iter(cur.users))
            act = _activation(user, cur, self.modules, self.skip, self.prefix)
            if act is not None:
                chain.append(user)
                layers.append(act)
                cur = user
        elif not fused_act and len(cur.users) == 2:
            swish = _swish_nodes(cur)
            if swish is not None:
                chain.extend(swish)
                layers.append(nn.SiLU().train(layer.training))
                cur = swish[-1]
        return chain, layers, cur

    def _module_qop(self, node: fx.Node, m: nn.Module, optional: bool = False) -> None:
        """``optional``: no ``QOp`` when the factory gives no quantizer (the module stays as called)."""
        name = node.target
        if isinstance(self.gm.get_submodule(name), QOp):  # the module is called again: a QOp per call
            scope, _, base = name.rpartition(".")
            name = self._fresh_name(scope, base)
        aq = call_factory(self.af, m, self.prefix + name, "acts_quantizer")
        if aq is None and optional:
            self.declined.add(node)
            if name != node.target:
                self.taken.discard(name)
            return
        qop = QOp(m, acts_quantizer=aq)
        qop.train(m.training)
        qop._name_quantizers(self.prefix + name)  # errors name the QOp by its place in the model
        if name == node.target:  # the QOp takes the module's place: reads of its attributes go through it
            for n in self.graph.nodes:
                if n.op == "get_attr" and n.target.startswith(f"{name}."):
                    n.target = f"{name}.op.{n.target[len(name) + 1 :]}"
        self._install(name, qop)
        node.target = name

    def _function_qop(self, node: fx.Node, fn: Callable, optional: bool = False) -> None:
        """``optional``: no ``QOp`` when the factory gives no quantizer (the call stays as made)."""
        desc = FunctionalOp(fn, node.name)
        scope = _owner_path(node)
        wanted = f"{scope}.{desc.name}" if scope else desc.name
        name = self._fresh_name(scope, desc.name)  # kept when skipped: later calls are numbered as without skip
        # A glob may name every such call by the operation (``add``) or one call by its QOp's name (``add_1``).
        reason = skip_reason(self.prefix + wanted, desc, self.skip)
        key = wanted if wanted not in self.float_reasons else f"{wanted} ({node.name})"
        if reason is None:
            reason, key = skip_reason(self.prefix + name, desc, self.skip), name
        if reason is not None:
            self.float_reasons[key] = f"{reason} ({desc.name})"
            self.declined.add(node)  # reported once, as skipped
            return
        aq = call_factory(self.af, desc, self.prefix + name, "acts_quantizer")
        if aq is None and optional:
            self.declined.add(node)
            self.taken.discard(name)
            return
        qop = QOp(fn, acts_quantizer=aq)
        qop._name_quantizers(self.prefix + name)  # errors name the QOp by its place in the model
        owner = self._original(scope)  # the module whose forward makes the call
        qop.train((self.model if owner is None else owner).training)
        self._install(name, qop)
        with self.graph.inserting_after(node):
            new = self.graph.call_module(name, node.args, node.kwargs)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        node._erased = True


def _arguments(m: nn.Module) -> tuple:
    """The constructor arguments of an activation module made from a functional call (its public
    attributes), ``inplace`` left out: ``F.relu(y, inplace=True)`` computes what ``torch.relu(y)`` does."""
    return tuple(
        sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_") and k not in ("inplace", "training"))
    )


def _unwrap_bare_norms(module: nn.Module) -> None:
    """Put back the normalisations whose output the factory gave no quantizer (a ``QOp`` with none).

    A checkpoint whose leaf was swapped without its normalisation outputs then loads as saved:
    its replay gets no quantizer for them and converts the same modules.
    """
    for parent in list(module.modules()):
        for key, child in list(parent._modules.items()):
            if isinstance(child, QOp) and child.acts_quantizer is None and is_normalization(child.op):
                parent._modules[key] = child.op


def _concrete_args(m: nn.Module, calls: list[fx.Node]) -> dict[str, Any] | None:
    """The arguments of ``m.forward`` that every call in ``calls`` passes as the same constant
    (defaults included), to fix when tracing ``m`` on its own (``if mask is None:`` then
    traces); ``None`` when the calls cannot be bound or pass different constants."""
    try:
        sig = inspect.signature(m.forward)
    except (TypeError, ValueError):
        return None
    found: dict[str, Any] | None = None
    for call in calls:
        try:
            bound = sig.bind(*call.args, **call.kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        consts = {}
        for pname, value in bound.arguments.items():
            kind = sig.parameters[pname].kind
            if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                if value:  # fx cannot fix part of *args / **kwargs
                    return None
            elif not _flat_nodes(value):
                consts[pname] = value
        try:
            same = found is None or consts == found
        except Exception:  # constants that do not compare (arrays): do not guess
            return None
        if not same:
            return None
        found = consts
    return found


def _example_args(m: nn.Module, call: fx.Node, example: tuple[tuple, dict]) -> dict[str, Any] | None:
    """The example values ``call`` passed to ``m.forward`` (``example``: its arguments as traced),
    by parameter name, for the traced arguments only (``_concrete_args`` fixes the constant ones);
    ``None`` when the example did not reach one."""
    sig = inspect.signature(m.forward)
    nodes = sig.bind(*call.args, **call.kwargs).arguments
    values = sig.bind(*example[0], **example[1]).arguments
    out = {}
    for pname, arg in nodes.items():
        if not _flat_nodes(arg):
            continue
        found: list[Any] = []
        fx.node.map_aggregate(values[pname], found.append)
        if any(v is MISSING for v in found):
            return None
        out[pname] = values[pname]
    return out


def _positional_args(m: nn.Module, sub: fx.GraphModule, calls: list[fx.Node]) -> list[tuple] | None:
    """Each call's arguments for ``sub`` (``m`` traced with its constant arguments fixed), all
    positional: fx keeps one placeholder per parameter of ``m.forward``, in order, but renames
    the fixed ones (``mask_1``) and gives them the signature's defaults, so they are passed by
    position. ``None`` when the placeholders do not match the parameters one for one."""
    sig = inspect.signature(m.forward)
    params = list(sig.parameters.values())
    n_placeholders = sum(n.op == "placeholder" for n in sub.graph.nodes)
    if n_placeholders != len(params) or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    out = []
    for call in calls:
        bound = sig.bind(*call.args, **call.kwargs)
        bound.apply_defaults()
        out.append(tuple(bound.arguments[p.name] for p in params))
    return out


def _keep_buffers_out_of_state(gm: fx.GraphModule, model: nn.Module) -> None:
    """In ``gm``'s state dict, of the tensors its graph reads, only ``model``'s own persistent buffers.

    The example trace reads every buffer as a node, and the constants it makes (``_tensor_constant0``)
    depend on the branches taken: a cache a forward before the conversion filled (ConViT's
    ``rel_indices``) is read, an empty one is computed. The keys must not depend on that, and a
    conversion replayed from the recorded shapes makes the same constants again."""
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, _, name = node.target.rpartition(".")
        copy = gm.get_submodule(owner)
        if name not in copy._buffers:
            continue
        try:
            source: nn.Module | None = model.get_submodule(owner)
        except AttributeError:
            source = None
        own = source is not None and name in source._buffers and name not in source._non_persistent_buffers_set
        if not own:
            copy._non_persistent_buffers_set.add(name)


def _delete_unused_submodules(gm: fx.GraphModule) -> None:
    """Like ``GraphModule.delete_all_unused_submodules``, but also deletes the second name of a
    module held twice (a BatchNorm now inside a QWrapper and still at its old name)."""
    used: set[str] = {""}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            parts = node.target.split(".")
            used.update(".".join(parts[: i + 1]) for i in range(len(parts)))
            if node.op == "call_module":
                sub = gm.get_submodule(node.target)
                used.update(f"{node.target}.{n}" for n, _ in sub.named_modules(remove_duplicate=False) if n)
    for name, _ in list(gm.named_modules(remove_duplicate=False)):
        if name not in used:
            gm.delete_submodule(name)


def quantize_fx(
    model: nn.Module,
    weight_quantizer: QuantizerFactory | None,
    acts_quantizer: QuantizerFactory | None,
    *,
    skip: tuple,
    fold_bn: bool | str,
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable] = (),
    prefix: str = "",
    concrete_args: dict[str, Any] | None = None,
    strict_modes: bool = False,
    example_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` and rewrite it (see the module docstring). ``model`` keeps its structure;
    the result shares its parameter tensors.

    Args:
        model: the float model.
        weight_quantizer: factory for layer weights (see :func:`torchquant.quantize_model`).
        acts_quantizer: factory for output activations of layers and operations.
        skip: normalised skip entries (name globs and module types).
        fold_bn: passed to every ``QWrapper`` that has a BatchNorm.
        leaf_modules: module types not to trace into (their layers are quantized inside them).
        autowrap_functions: functions recorded as single calls.
        prefix: qualified name of ``model`` in a larger model, with a trailing dot: the
            names factories, ``skip`` and the float reasons see.
        concrete_args: arguments of ``model.forward`` fixed at trace time (``torch.fx``'s).
        strict_modes: raise :class:`FxTraceError` instead of warning when ``model``'s forward
            computes differently in the other mode (:mod:`torchquant.graph.modes`).
        example_args: example values of ``model.forward``'s arguments by parameter name: branches
            on sizes follow them, guarded (:mod:`torchquant.graph.concrete`), and leaves fx cannot
            trace on their own are traced with their inputs for these examples.

    Returns:
        The rewritten ``GraphModule``; ``meta["_tq_float_reasons"]`` says what stayed in float and why.
        For a torch.nn module that torch.fx keeps whole and cannot trace
        (``nn.TransformerEncoderLayer``), a copy sharing its parameters with its layers
        swapped (the reasons in its ``_tq_float_reasons`` attribute).

    Raises:
        TypeError: a ``leaf_modules`` entry is not an ``nn.Module`` type.
        FxTraceError: torch.fx cannot trace the model; names the module and operation.

    Warns:
        TrainingBranchWarning: the forward computes differently in the other mode (a branch on
            ``self.training``), so the result keeps the traced mode's computation in the module named.
            Constants that differ between modes (functional dropout's ``training``) follow instead the
            mode of the module whose forward made them.
    """
    timm_modules, timm_functions = _timm_leaves()
    leaves = tuple(dict.fromkeys(tuple(leaf_modules) + timm_modules))
    for t in leaves:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"quantize_model: leaf_modules entries must be nn.Module types, got {t!r}")
    autowrap = tuple(dict.fromkeys(tuple(autowrap_functions) + timm_functions + _train_only_functions()))

    def make_tracer() -> _Tracer:
        if example_args is None:
            return _Tracer(skip, leaves, autowrap, prefix)
        # each trace runs the operations on its own copy: in-place ones must not change the examples
        examples = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in example_args.items()}
        return _ExampleTracer(skip, leaves, autowrap, prefix, examples=examples, trace_wrapped=reader)

    reader = is_weight_reader(model, traced=True)
    tracer = make_tracer()
    try:
        if reader and example_args is None:  # traced, its layers would stay get_attr reads: swap them instead
            raise FxTraceError(f"{type(model).__name__} reads its layers' weights")
        untouched = _Untouched(model)
        try:
            graph = _trace(model, tracer, concrete_args)
        except BaseException:
            untouched.restore()
            raise
    except FxTraceError:
        if prefix or not (fx.Tracer().is_leaf_module(model, "") or is_weight_reader(model, traced=True)):
            raise
        # A torch.nn module that fx keeps whole inside any model (nn.TransformerEncoderLayer), converted
        # on its own: quantize inside a copy sharing its parameters, as it would be inside a model.
        if type(model) is nn.MultiheadAttention and mha_unsupported(model) is None:
            whole: nn.Module = make_qmha(model, "", weight_quantizer, acts_quantizer)
            reasons = {}
        else:
            whole = structural_copy(model)
            reasons = quantize_swap(whole, weight_quantizer, acts_quantizer, skip=skip, fold_bn=fold_bn)
        setattr(whole, FLOAT_REASONS_ATTR, reasons)
        return whole
    mode_of = _mode_of(model)
    found = follow_mode(graph, mode_of, lambda: _trace_other_mode(model, untouched, make_tracer, concrete_args))
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    if example_args is not None:
        _keep_buffers_out_of_state(gm, model)
    untouched.restore()  # once the GraphModule holds the constants the trace stored on the model
    install_mode_flags(gm, found.constants, mode_of)
    if found.branches:
        _training_branch(model, prefix, found, strict_modes)
    rewriter = _Rewriter(model, gm, weight_quantizer, acts_quantizer, skip, fold_bn, tracer, autowrap)
    if isinstance(tracer, ExampleValues):
        tracer.values.clear()  # every activation for the examples: the rewriter keeps what it needs
    reasons = rewriter.run()
    gm.meta[FLOAT_REASONS_ATTR] = reasons
    return gm
