"""Train/eval behaviour of an fx-traced model.

torch.fx runs ``forward`` once, in the mode the model has when it is traced: a value the
code derives from ``self.training`` becomes a constant of the graph. Traced in train mode,
``F.dropout(x, p, self.training)`` keeps dropping in eval; traced in eval mode, it never
drops in quantization-aware training. :func:`follow_mode` traces the model a second time in
the other mode and compares the two graphs:

- a constant argument that differs between them (the ``training`` flag of a functional
  dropout, ``dropout_p=p if self.training else 0.0`` of an attention) is replaced by a call of a
  :class:`ModeFlag` that follows, at run time, the mode of the module whose forward made it, so the
  converted model behaves like the float model in both modes;
- a difference in what is computed (``if self.training: x = x + noise``, an auxiliary head that
  runs only in training) cannot follow the mode: a :class:`TrainingBranchWarning` names the
  module whose forward branches, and the converted model keeps the traced branch.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = [
    "MODE_FLAG",
    "ModeConstant",
    "ModeDiff",
    "ModeFlag",
    "TrainingBranchWarning",
    "follow_mode",
    "install_mode_flags",
    "is_mode_flag_call",
]

MODE_FLAG = "_tq_mode"
"""Name of a :class:`ModeFlag`, the child of each module of a converted ``GraphModule`` whose forward made
mode-dependent constants."""

_SIMPLE = (bool, int, float, str, type(None))
# torch.fx's names for constants made in forward: numbered in order of creation, so compared without the number
_TENSOR_CONSTANT = re.compile(r"_(tensor_constant|torchbind_obj|tree_spec_constant|opaque_obj)\d+")


class TrainingBranchWarning(UserWarning):
    """``quantize_model(method="fx")`` traced a forward that computes differently in train and eval
    mode; the converted model keeps the branch of the mode it was converted in.

    Convert the model in the mode it will be used in, name the module's type in ``leaf_modules``
    (its layers are then quantized inside it, and its forward runs as written), or use
    ``method="swap"``.
    """


class ModeFlag(nn.Module):
    """Holds no state: called with the train-mode and eval-mode values of a graph constant, returns the
    one of its mode (set by the converted model's ``train()``/``eval()``).

    A module call, not a function: torch.fx keeps it whole when a ``GraphModule`` is re-traced (as
    ``torch.load`` of a whole model does), where a function call would be evaluated into a constant.

    Example:
        >>> flag = ModeFlag()
        >>> flag(0.1, 0.0), flag.eval()(0.1, 0.0)
        (0.1, 0.0)
    """

    def forward(self, train_value: Any, eval_value: Any) -> Any:
        return train_value if self.training else eval_value


def _signature(node: fx.Node) -> tuple:
    if node.op == "placeholder":
        return (node.op, node.name)
    if node.op == "get_attr" and _TENSOR_CONSTANT.fullmatch(node.target):
        return (node.op, _TENSOR_CONSTANT.sub(r"_\1", node.target))
    return (node.op, node.target)


def _owner(node: fx.Node) -> tuple[str, str]:
    """Qualified name and type name of the module whose forward made ``node``."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if node.op == "call_module" and stack and stack[-1][0] == node.target:
        stack = stack[:-1]
    if not stack:
        return "", ""
    path, cls = stack[-1]
    return path, getattr(cls, "__name__", str(cls))


class _Diff:
    """Walks the arguments of two aligned nodes; records constants that differ."""

    def __init__(self, peer: dict[fx.Node, fx.Node]) -> None:
        self.peer = peer  # node of the other graph -> node of the traced graph
        self.aligned = set(peer.values())
        self.consts: list[tuple[tuple, Any, Any]] = []  # (path in args, this mode's value, other mode's value)

    def walk(self, a: Any, b: Any, path: tuple) -> bool:
        """False when ``a`` and ``b`` differ in anything but simple constants."""
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            # a node only one graph has is a branch reported where it is made, not here
            return self.peer.get(b) is a or b not in self.peer or a not in self.aligned
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            return False
        if isinstance(a, slice) and isinstance(b, slice):  # e.g. x[:, :n] with n traced: no constant to follow
            n = len(self.consts)
            same = self.walk((a.start, a.stop, a.step), (b.start, b.stop, b.step), path)
            if len(self.consts) > n:
                del self.consts[n:]
                return False
            return same
        if isinstance(a, (tuple, list)) and type(a) is type(b):
            return len(a) == len(b) and all(self.walk(x, y, (*path, i)) for i, (x, y) in enumerate(zip(a, b)))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(self.walk(a[k], b[k], (*path, k)) for k in a)
        if isinstance(a, _SIMPLE) and isinstance(b, _SIMPLE):
            if type(a) is not type(b) or a != b:
                self.consts.append((path, a, b))
            return True
        try:
            return type(a) is type(b) and bool(a == b)
        except Exception:  # e.g. tensors: an ambiguous comparison is a difference
            return a is b


def _replace(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    items = list(value)
    items[head] = _replace(items[head], rest, new)
    return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)


@dataclass
class ModeConstant:
    """A constant argument of ``node`` that differs between the modes: at ``path`` in ``(args, kwargs)``,
    made in the forward of the module at ``owner`` (relative to the traced model)."""

    node: fx.Node
    path: tuple
    train_value: Any
    eval_value: Any
    owner: str


@dataclass
class ModeDiff:
    """What :func:`follow_mode` found.

    Attributes:
        constants: the mode-dependent constants outside the branching modules.
        branches: ``(qualified name relative to the traced model, type name)`` of each outermost module
            whose forward computes differently in the other mode; ``("", "")`` is the model itself.
        error: why the model could not be traced in the other mode, if it could not.
    """

    constants: list[ModeConstant] = field(default_factory=list)
    branches: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None


def follow_mode(graph: fx.Graph, mode_of: Callable[[str], bool], trace_other: Callable[[], fx.Graph]) -> ModeDiff:
    """Compare ``graph`` with the same model traced with every module in the other mode (``trace_other()``).

    The two node sequences are aligned (:class:`difflib.SequenceMatcher` on each node's operation and
    target); nodes only one graph has, and aligned nodes whose arguments differ in anything but
    simple constants, are branches, attributed to the module whose forward made them. A constant
    that differs is kept only outside every branching module (inside one, the alignment cannot say
    which call it belongs to); ``mode_of(path)``, the mode the module at ``path`` had when ``graph`` was
    traced, says which value is the train-mode one.
    """
    try:
        other = trace_other()
    except Exception as e:  # the other mode's forward runs code this one does not: a branch
        return ModeDiff(branches=[("", "")], error=f"{type(e).__name__}: {e}")
    mine, theirs = _live(graph), _live(other)
    matcher = difflib.SequenceMatcher(None, [_signature(n) for n in mine], [_signature(n) for n in theirs], False)
    peer: dict[fx.Node, fx.Node] = {}
    owners: dict[tuple[str, str], None] = {}
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            peer.update(zip(theirs[j1:j2], mine[i1:i2]))
        else:
            owners.update(dict.fromkeys(_owner(n) for n in (*mine[i1:i2], *theirs[j1:j2])))
    constants = []
    diff = _Diff(peer)
    for b, a in peer.items():
        diff.consts = []
        if not diff.walk((a.args, a.kwargs), (b.args, b.kwargs), ()):
            owners[_owner(a)] = None
            continue
        owner = _owner(a)[0]
        for path, mine_value, their_value in diff.consts:
            train_value, eval_value = (mine_value, their_value) if mode_of(owner) else (their_value, mine_value)
            constants.append(ModeConstant(a, path, train_value, eval_value, owner))
    # A branch shows as the nodes it adds or removes, made in the branching module and in the modules it
    # calls: name the outermost ones.
    branches = [(p, c) for p, c in owners if not any(_inside(p, q) for q, _ in owners if q != p)]
    constants = [c for c in constants if not any(c.owner == p or _inside(c.owner, p) for p, _ in branches)]
    return ModeDiff(constants, branches)


_READS = frozenset({"size", "dim", "numel", "stride", "is_contiguous"})


def _live(graph: fx.Graph) -> list[fx.Node]:
    """The nodes of ``graph`` but unused reads (``x.device`` for a cache key, ``self.weight``): a mode
    branch that reads an attribute and does not use it computes the same."""
    return [
        n
        for n in graph.nodes
        if n.users
        or n.op in ("placeholder", "output")
        or not (
            n.op == "get_attr"
            or (n.op == "call_function" and n.target is getattr)
            or (n.op == "call_method" and n.target in _READS)
        )
    ]


def _inside(path: str, ancestor: str) -> bool:
    return ancestor == "" or path.startswith(ancestor + ".")


def install_mode_flags(gm: fx.GraphModule, constants: list[ModeConstant], mode_of: Callable[[str], bool]) -> None:
    """Replace each mode-dependent constant of ``gm``'s graph by a call of a :class:`ModeFlag` at
    ``<owner>._tq_mode`` (in the mode ``mode_of(owner)``), so it follows ``train()``/``eval()`` of
    the module whose forward made it, as in the float model."""
    for c in constants:
        name = f"{c.owner}.{MODE_FLAG}" if c.owner else MODE_FLAG
        try:
            gm.get_submodule(name)
        except AttributeError:
            gm.add_submodule(name, ModeFlag().train(mode_of(c.owner)))
        with gm.graph.inserting_before(c.node):
            value = gm.graph.call_module(name, (c.train_value, c.eval_value))
        args, kwargs = _replace((c.node.args, c.node.kwargs), c.path, value)
        c.node.args, c.node.kwargs = tuple(args), dict(kwargs)


def is_mode_flag_call(node: fx.Node) -> bool:
    """Whether ``node`` calls a :class:`ModeFlag` installed by :func:`install_mode_flags`."""
    return node.op == "call_module" and node.target.rpartition(".")[2] == MODE_FLAG
