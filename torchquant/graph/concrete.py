"""Tracing with example inputs: torch.fx branches on sizes, guarded.

torch.fx cannot trace ``if pad_r > 0:`` or ``if new_h != H:`` on a traced size: the
value is unknown while tracing. :class:`ExampleValues` makes a tracer carry, next to each
node, the value it takes for the example inputs (each operation is run once on them). A
branch on a size, an ``int()`` or a ``range()`` of one, a ``len()`` of a traced value then
follows the example, and the graph records a guard that recomputes the condition at run
time from the traced sizes and raises :class:`BranchGuardError` when an input takes the
other branch. The rest of the graph stays symbolic: the sizes that flow into ``reshape``
or ``F.pad`` are computed at run time, so other batch sizes and, where no branch depends
on them, other resolutions run.

Branches on tensor values (``if x.abs().max() > 1:``, a ``.item()``, a size that depends on
values such as ``x[x > 0].shape[0]``), on parameters and buffers (trained, updated, or another
model's when a checkpoint is replayed) and on what a recorded example does not keep
(``requires_grad``, strides) are refused: they would freeze the example into the graph.
"""

from __future__ import annotations

import inspect
import operator
import os
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx
from torch.fx._symbolic_trace import _maybe_revert_all_patches
from torch.fx.node import has_side_effect, map_aggregate
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = [
    "MISSING",
    "BranchGuardError",
    "ExampleValues",
    "StateRestored",
    "bind_examples",
    "branch_guard",
    "describe_examples",
    "examples_from_description",
    "split_examples",
    "traced_branches",
]

MISSING = object()
"""The value of a node the example inputs do not determine."""

# Tensor attributes and methods whose result depends only on the tensor's size, dtype or device (what a
# recorded example keeps: not its strides, nor requires_grad, which the trace's no_grad would fix).
_SIZE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
_SIZE_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension", "get_device"})
# Operations whose output size depends on the values of their input: functions, and tensor methods by name.
_VALUE_SIZED = frozenset(
    {torch.nonzero, torch.masked_select, torch.unique, torch.unique_consecutive, torch.argwhere, torch.bincount}
)
_VALUE_SIZED_METHODS = frozenset({"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "bincount"})

# Where torch's code and the tracing machinery (torchquant/graph) live: a model's own line is outside both.
TORCH_DIR = os.path.dirname(torch.__file__)
GRAPH_DIR = os.path.dirname(os.path.abspath(__file__))


class BranchGuardError(RuntimeError):
    """An input takes another branch than the example inputs the model was converted with."""


@has_side_effect
def branch_guard(value: Any, expected: Any, where: str) -> Any:
    """Raise :class:`BranchGuardError` unless ``value`` (a traced condition, size or length),
    converted like ``expected`` (``bool``, ``int``, ``float``), equals ``expected``, what it was for
    the example inputs. ``where`` names the model's line."""
    if isinstance(value, fx.Proxy):  # re-traced (an unpickled GraphModule): record the guard again
        return value.tracer.create_proxy("call_function", branch_guard, (value, expected, where), {})
    if isinstance(expected, bool):
        # branch on the condition rather than compare it: torch.compile's symbolic conditions only branch
        got = True if value else False  # noqa: SIM210
        differs = got is not expected
    else:
        got = type(expected)(value)
        differs = got != expected
    if differs:
        raise BranchGuardError(
            f"a traced condition gives {got!r} for this input where the example inputs the model was converted "
            f"with gave {expected!r}, so the input takes another branch than the traced one; at {where}\n"
            f"  Convert the model with example inputs of this size (quantize_model(..., example_inputs=...))."
        )


def traced_branches(model: torch.nn.Module) -> list[str]:
    """Where the guards of ``model`` (converted with example inputs) are: the model's lines, in graph order."""
    return [
        node.args[2]
        for m in model.modules()
        if isinstance(m, fx.GraphModule)
        for node in m.graph.nodes
        if node.op == "call_function" and node.target is branch_guard
    ]


def _model_line() -> str:
    """``file:line in fn: code`` of the innermost frame outside torch and torchquant's tracing."""
    for f in reversed(traceback.extract_stack()):
        if not f.filename.startswith((GRAPH_DIR, TORCH_DIR)):
            return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    return "a traced condition"


class _ExampleProxy(fx.Proxy):
    """A proxy whose ``len()``, ``int()`` and ``range()`` follow the example value, guarded, and
    whose item assignment (``t[:, 0] = v``) is recorded."""

    def __len__(self) -> int:
        return self.tracer.concretize(self, len)

    def __int__(self) -> int:
        return self.tracer.concretize(self, int)

    def __index__(self) -> int:
        return self.tracer.concretize(self, int)

    def __float__(self) -> float:
        return self.tracer.concretize(self, float)

    def __setitem__(self, key: Any, value: Any) -> None:  # in place, as run: recorded in order
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class ExampleValues:
    """Mixin for an ``fx.Tracer``: every node gets the value it takes for the example inputs.

    Args:
        examples: the example value of each placeholder, by the name of the ``forward``
            parameter it stands for. A placeholder without one (a fixed ``concrete_args``
            entry) and everything computed from it have no value: a branch on them fails
            as in plain torch.fx.

    After tracing, :attr:`values` maps nodes to their example values (``MISSING`` absent).
    Operations and leaf modules run on the example values under ``torch.no_grad()``; the
    model's buffers and tensor attributes are restored after the trace (a BatchNorm in
    training mode keeps its statistics, a cache written in place its contents).
    """

    def __init__(self, *args: Any, examples: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # examples default to none: unpickling a GraphModule re-traces it with its tracer built bare
        super().__init__(*args, **kwargs)
        # buffers read as nodes (a cache a forward filled, ConViT's rel_indices, is indexed with traced sizes)
        self.proxy_buffer_attributes = True
        self.examples = examples or {}
        self.values: dict[fx.Node, Any] = {}
        self.data: set[fx.Node] = set()  # nodes whose value depends on tensor contents, not only sizes
        self.value_sized: set[fx.Node] = set()  # nodes whose size depends on tensor contents
        self.failure: str | None = None  # the first operation that failed on the examples

    # -- values
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ExampleProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest, **kw):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest, **kw)
        node = proxy.node
        if node in self.values:
            return proxy
        inputs = [a.node for a in _proxies((args, kwargs))]
        try:
            value = self._evaluate(kind, target, args, kwargs)
        except Exception as e:  # an operation that fails on the example: branches on it fail as in plain fx
            value = MISSING
            if self.failure is None:
                self.failure = f"{node.format_node()}: {type(e).__name__}: {e}"
        self.values[node] = value
        if any(i in self.value_sized for i in inputs) or _sized_by_values(kind, target, args, self):
            self.value_sized.add(node)
        source_sized = bool(inputs) and inputs[0] not in self.value_sized
        sized = kind == "call_method" and target in _SIZE_METHODS and source_sized
        sized = sized or (kind == "call_function" and target is getattr and args[1] in _SIZE_ATTRS and source_sized)
        # input tensors are data, numbers given as inputs (a leaf's (H, W)) sizes; parameters and buffers
        # are trained or updated (and a replayed conversion reads another model's): data too
        fed = kind in ("placeholder", "get_attr") and any(isinstance(v, torch.Tensor) for v in _leaves(value))
        if fed or (not sized and any(i in self.data for i in inputs)):
            self.data.add(node)
        return proxy

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            return self.examples.get(target, MISSING)
        a, k = map_aggregate((args, kwargs), self._value_of)
        if any(v is MISSING for v in _leaves((a, k))):
            return MISSING
        # torch.fx patches Module.__call__/__getattr__ and wrapped functions while tracing: use the real ones
        with torch.no_grad(), _maybe_revert_all_patches():
            if kind == "get_attr":
                obj = self.root
                for part in target.split("."):
                    obj = getattr(obj, part)
                return obj
            if kind == "call_function":
                return target(*a, **k)
            if kind == "call_method":
                return getattr(a[0], target)(*a[1:], **k)
            if kind == "call_module":
                module = self.root.get_submodule(target)
                if any(isinstance(m, LazyModuleMixin) and m.has_uninitialized_params() for m in module.modules()):
                    return MISSING  # running it would materialise it (and change its class) for good
                try:
                    return module(*a, **k)
                except Exception:
                    if not module.training:
                        raise
                    # the other mode's trace: a BatchNorm in training refuses a batch of one, which the
                    # sizes do not depend on
                    with _EvalMode(module):
                        return module(*a, **k)
        return MISSING

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """As ``fx.Tracer.trace``; the model's buffers and tensor attributes, which the operations run on
        (a BatchNorm in training updates its statistics, a cache is written in place), are restored."""
        if not isinstance(root, torch.nn.Module):
            return super().trace(root, concrete_args)
        with StateRestored(root):
            return super().trace(root, concrete_args)

    def _value_of(self, a: Any) -> Any:
        return self.values.get(a.node, MISSING) if isinstance(a, fx.Proxy) else a

    # -- control flow
    def _known(self, obj: fx.Proxy, what: str, sized: bool = False) -> Any:
        node = obj.node
        value = self.values.get(node, MISSING)
        if value is MISSING:
            if self.failure is not None:
                raise fx.proxy.TraceError(
                    f"{what} on a value the example inputs did not reach: running the model on them failed "
                    f"at {self.failure}"
                )
            return MISSING
        if node in self.data and not (sized and node not in self.value_sized):
            raise fx.proxy.TraceError(
                f"{what} depends on tensor values (or on what an example does not record: strides, "
                "requires_grad), not only on sizes: it cannot follow the example inputs"
            )
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self._known(obj, "a branch")
        if value is MISSING:
            return super().to_bool(obj)
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            return super().to_bool(obj)
        result = bool(value)
        self.create_proxy("call_function", branch_guard, (obj, result, _model_line()), {})
        return result

    def concretize(self, obj: fx.Proxy, convert: type) -> Any:
        """``len``/``int``/``float`` of a traced value: the example's, with a guard."""
        value = self._known(obj, f"{convert.__name__}()", sized=convert is len)  # a length is a size
        if value is MISSING:
            raise fx.proxy.TraceError(f"{convert.__name__}() of a traced value without an example value")
        result = convert(value)
        measured = obj if convert is not len else self.create_proxy("call_function", len, (obj,), {})
        self.create_proxy("call_function", branch_guard, (measured, result, _model_line()), {})
        return result

    def iter(self, obj: fx.Proxy) -> Iterator:
        n = self.concretize(obj, len)
        return iter([obj[i] for i in range(n)])


class StateRestored:
    """Restores, on exit, the contents of the buffers and plain tensor attributes of ``root``'s
    modules (a BatchNorm's kernel updates its statistics without bumping their version counter, so
    all are copied back). Tensors that cannot be written in place are left out: inference tensors,
    lazy ones, expanded ones (stride 0)."""

    def __init__(self, root: torch.nn.Module) -> None:
        found: dict[int, torch.Tensor] = {}
        for m in root.modules():
            for t in (*m._buffers.values(), *vars(m).values()):
                if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) and _writable(t):
                    found.setdefault(id(t), t)
        self.saved = [(t, t.clone()) for t in found.values()]

    def __enter__(self) -> StateRestored:
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for t, copy in self.saved:
                t.copy_(copy)


def _writable(t: torch.Tensor) -> bool:
    if torch.nn.parameter.is_lazy(t) or t.is_inference() or t.is_meta:
        return False
    return all(stride != 0 or size == 1 for stride, size in zip(t.stride(), t.shape, strict=True))


class _EvalMode:
    """``module`` and its children in eval mode for the block (flags set directly, as tracing does)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.flags = [(m, m.training) for m in module.modules()]

    def __enter__(self) -> None:
        for m, _ in self.flags:
            m.training = False

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


def _sized_by_values(kind: str, target: Any, args: tuple, tracer: ExampleValues) -> bool:
    """Whether the output's size depends on tensor values: ``nonzero``, ``torch.where(cond)``,
    ``repeat_interleave`` by a tensor, indexing with a boolean mask computed from data (``x[x > 0]``;
    a mask built from sizes, ``torch.arange(n) > 0``, is a size)."""
    if kind == "call_function" and target in _VALUE_SIZED:
        return True
    if kind == "call_method" and target in _VALUE_SIZED_METHODS:
        return True
    if kind in ("call_function", "call_method") and target in (torch.where, "where") and len(args) == 1:
        return True
    if kind in ("call_function", "call_method") and target in (torch.repeat_interleave, "repeat_interleave"):
        return len(args) > 1 and isinstance(args[1], fx.Proxy) and args[1].node in tracer.data
    if not (kind == "call_function" and target is operator.getitem and len(args) > 1):
        return False
    index = [p for p in _proxies(args[1]) if p.node in tracer.data]
    return any(
        isinstance(v, torch.Tensor) and v.dtype == torch.bool for v in (tracer.values.get(p.node) for p in index)
    )


def _proxies(a: Any) -> list[fx.Proxy]:
    out: list[fx.Proxy] = []
    map_aggregate(a, lambda x: out.append(x) if isinstance(x, fx.Proxy) else None)
    return out


def _leaves(a: Any) -> list[Any]:
    out: list[Any] = []
    map_aggregate(a, lambda x: out.append(x))
    return out


# ----------------------------------------------------------------------------- example inputs
def split_examples(example_inputs: Any) -> tuple[tuple, dict]:
    """``example_inputs`` (a tensor, a tuple/list of positional arguments or a dict of keyword
    arguments) as ``(args, kwargs)``."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def bind_examples(model: torch.nn.Module, example_inputs: Any) -> tuple[dict[str, Any], dict[str, None]]:
    """The example value of each parameter of ``model.forward``, by name, and the parameters to fix.

    A parameter the examples leave out takes its default: ``None`` is fixed (the traced
    graph asserts it stays ``None``), as is one given as ``None``; another default is an
    example value like a given one (a branch on it is guarded).

    Raises:
        ValueError: the examples do not bind to ``forward``'s signature.
    """
    args, kwargs = split_examples(example_inputs)
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(
            f"quantize_model: example_inputs do not match {type(model).__name__}.forward{sig}: {e}"
        ) from None
    for pname, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and bound.arguments.get(pname):
            raise ValueError(
                f"quantize_model: example_inputs for {type(model).__name__}.forward's *{pname} cannot be traced "
                f"(torch.fx gives *args/**kwargs no placeholders); pass them to named parameters"
            )
    given = {k: v for k, v in bound.arguments.items() if v is not None}
    fixed: dict[str, None] = {k: None for k, v in bound.arguments.items() if v is None}
    for pname, p in sig.parameters.items():
        if pname in given or pname in fixed or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is None:
            fixed[pname] = None
        else:
            given[pname] = p.default
    return given, fixed


def describe_examples(example_inputs: Any) -> dict[str, Any]:
    """The JSON a conversion record keeps of ``example_inputs``: tensor shapes and dtypes (the
    traced branches depend on nothing else), and scalars as they are.

    Raises:
        ValueError: an example is neither a tensor nor a JSON scalar (the message names it).
    """
    args, kwargs = split_examples(example_inputs)

    def one(v: Any, where: str) -> dict[str, Any]:
        if isinstance(v, torch.Tensor):
            return {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        if v is None or isinstance(v, (bool, int, float, str)):
            return {"value": v}
        raise ValueError(
            f"quantize_model: example_inputs {where} is a {type(v).__name__}; tensors and int/float/bool/str/None "
            "can be recorded in the checkpoint's description"
        )

    return {
        "args": [one(v, f"argument {i}") for i, v in enumerate(args)],
        "kwargs": {k: one(v, repr(k)) for k, v in kwargs.items()},
    }


def examples_from_description(desc: dict[str, Any], device: torch.device | str = "cpu") -> tuple | dict:
    """Example inputs with the recorded shapes and dtypes (zeros), for replaying a conversion."""

    def one(d: dict[str, Any]) -> Any:
        if "value" in d:
            return d["value"]
        return torch.zeros(d["shape"], dtype=getattr(torch, d["dtype"]), device=device)

    args = tuple(one(d) for d in desc.get("args", []))
    kwargs = {k: one(d) for k, d in desc.get("kwargs", {}).items()}
    if kwargs and args:
        raise ValueError("a recorded example has both positional and keyword arguments")
    return kwargs if kwargs else args
