"""The sequential engine of the LLM post-training algorithms: one block at a time.

GPTQ, AWQ and SmoothQuant process a transformer stack the way their papers do: the
inputs of decoder block 0 are captured once from the calibration batches, block ``i``
is processed on its inputs, and its outputs (computed after processing, in the mode
the caller asks for: quantized for GPTQ, float for AWQ and SmoothQuant) become the
inputs of block ``i + 1``. Only one block's activations are held at a time, and each
block runs only its own layers, so a pass costs one block's forward instead of the
whole model's.

The blocks are found without knowing the architecture: the longest ``nn.ModuleList``
whose entries share one class and contain weighted :class:`~torchquant.QWrapper` s
(``model.model.layers`` of a Llama, ``transformer.h`` of a GPT-2); ``blocks="path"``
names it instead. A model without such a list is one block whose inputs are the
calibration batches themselves. Keyword arguments of the blocks (attention masks,
rotary embeddings) are captured with the hidden states; a model that gives its blocks
different ones (per-layer masks) has them captured for every block.

Inside a block, :meth:`Block.groups` splits the weighted layers into groups that read
one and the same input tensor (``q_proj, k_proj, v_proj``; ``gate_proj, up_proj``;
``o_proj``; ``down_proj``), in forward order, and :meth:`Block.fold_target` finds the
module whose output channels are that input's channels: a normalisation whose output
is the tensor itself, or a layer of the block whose output channels scale the input's
channels one for one (checked numerically: ``up_proj`` for ``down_proj``, ``v_proj`` for
``o_proj`` when heads are not shared), so a per-channel scale can move from the group's
input into that module (:func:`fold_input_scale`).

A normalisation whose output other modules read too (a mixture-of-experts router, the
expert banks, a shared expert; the attention and the MLP of a parallel block, as in Phi,
Falcon and Cohere) takes a scale only if every reader takes its inverse:
:meth:`Block.shared_fold` lists them (the quantized layers, the experts' first banks
and the float modules with one ``(out, in)`` weight, such as a router) and checks on the
first batch that the block's output does not change when the scale moves through all of
them (:func:`fold_shared_scale`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import divide_norm_output_, is_normalization, norm_gain_offset
from ..moe import QExperts, expert_inputs
from ..qmodules import QModule, QModuleState, QWrapper, iter_qmodules
from ..utils import cached_quantized_weights, call_model, model_output, progress_bar, qmodule_state
from ._common import _Stop

__all__ = [
    "Block",
    "SharedFold",
    "find_blocks",
    "fold_expert_scale",
    "fold_input_scale",
    "fold_shared_scale",
    "sequential_blocks",
]

Hook = Callable[[QWrapper, Tensor, int], None]


def find_blocks(model: nn.Module, blocks: str | None = None, who: str = "sequential") -> list[tuple[str, nn.Module]]:
    """The repeated blocks of ``model``: ``[(qualified name, block), ...]`` in order, or ``[]``.

    Args:
        model: a quantizable model.
        blocks: the qualified name of the ``nn.ModuleList`` (or ``nn.Sequential``) of blocks;
            ``None`` picks the longest list of distinct same-class modules holding QWrappers
            (a list repeating a module, shared across depth, is not one); ``""`` finds none
            (the whole model is one block).
        who: the caller's name, for errors.

    Raises:
        ValueError: ``blocks`` names no module list of ``model``.
    """
    if blocks == "":
        return []
    if blocks is not None:
        try:
            lst = model.get_submodule(blocks)
        except AttributeError as e:
            raise ValueError(f"{who}: blocks={blocks!r} is not a submodule of {type(model).__name__}") from e
        if not isinstance(lst, (nn.ModuleList, nn.Sequential)) or len(lst) == 0:
            raise ValueError(f"{who}: blocks={blocks!r} is a {type(lst).__name__}, not a non-empty ModuleList")
        if len({id(b) for b in lst}) != len(lst):
            raise ValueError(
                f"{who}: blocks={blocks!r} holds the same module more than once (weights shared across depth), "
                "and the sequential engine processes one block at a time; pass blocks='' to process the whole "
                "model at once"
            )
        return [(f"{blocks}.{i}", b) for i, b in enumerate(lst)]
    best: tuple[int, str, nn.Module] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2 or len({type(b) for b in m}) != 1:
            continue
        if len({id(b) for b in m}) != len(m):  # a block repeated (shared across depth): the whole model at once
            continue
        n = sum(isinstance(q, QWrapper) for b in m for q in b.modules())
        if n and (best is None or n > best[0]):
            best = (n, name, m)
    if best is None:
        return []
    return [(f"{best[1]}.{i}", b) for i, b in enumerate(best[2])]


def _no_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Block keyword arguments without a key/value cache: re-running a block must not append to it."""
    out = {}
    for k, v in kwargs.items():
        if type(v).__name__.endswith("Cache"):
            v = None
        elif k == "use_cache":
            v = False
        out[k] = v
    return out


def _no_cache_arg(x: Any) -> Any:
    """A block's positional argument, detached; ``None`` for a key/value cache (GPT-2 passes its cache
    positionally): re-running the block must not append to it."""
    return None if type(x).__name__.endswith("Cache") else _detach(x)


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


@dataclass
class _Call:
    args: tuple
    kwargs: dict[str, Any]


class Block:
    """One block with its captured inputs, for one processing step of :func:`sequential_blocks`.

    Attributes:
        name: the block's qualified name in the model (``""`` for a whole-model block).
        module: the block.
        layers: its weighted QWrappers as ``(qualified name in the model, wrapper)``.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        calls: list[_Call],
        model_call: bool,
        who: str,
        prefix: str,
        masks: Sequence[Tensor | None] = (),
    ):
        self.name = name
        self.module = module
        self._calls = calls
        self._masks = list(masks)
        self._model_call = model_call
        self._who = who
        qms = iter_qmodules(module)
        self.layers = [(f"{prefix}{n}" if n else prefix.rstrip("."), m) for n, m in qms if isinstance(m, QWrapper)]
        self._names = {m: (f"{prefix}{n}" if n else prefix.rstrip(".")) for n, m in module.named_modules()}
        self._probe: _Probe | None = None
        self._shared: dict[nn.Module, SharedFold | str] = {}
        self._kept: dict[tuple, bool] = {}

    @property
    def num_batches(self) -> int:
        return len(self._calls)

    def inputs(self) -> list[tuple[tuple, dict[str, Any]]]:
        """The captured inputs of each batch: ``(positional, keyword)``, the hidden states first
        (a whole-model block: the batch itself), without a key/value cache."""
        return [(c.args, c.kwargs) for c in self._calls]

    def real_tokens(self, layer: nn.Module, x: Tensor, i: int) -> Tensor:
        """``layer``'s (a QWrapper's, a row module's) input ``x`` on batch ``i`` without its padded tokens:
        ``x[mask]``, ``(n, ..., C)``, where the batch has an ``attention_mask`` ``(B, T)`` with zeros and
        ``x`` is ``(B, T, ..., C)``; else ``x``.

        Statistics of the inputs (GPTQ's Hessians, AWQ's and SmoothQuant's channel magnitudes)
        take the real tokens only: a padded position's activations are whatever the model
        computes for a token that is ignored.
        """
        mask = self._masks[i] if i < len(self._masks) else None
        if mask is None or isinstance(getattr(layer, "layer", layer), nn.modules.conv._ConvNd) or x.dim() < 3:
            return x
        if tuple(x.shape[:2]) != tuple(mask.shape):
            return x
        return x[mask.to(x.device)]

    def _call(self, i: int) -> Any:
        c = self._calls[i]
        if self._model_call:
            return call_model(self.module, c.args[0], self._who)
        out = self.module(*c.args, **c.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def run(
        self,
        hooks: dict[QWrapper, Hook] | None = None,
        *,
        stop_after: QWrapper | None = None,
        batches: Sequence[int] | None = None,
    ) -> list[Any]:
        """Run the block on its captured inputs, with no gradients.

        Quantized weights are computed once per run, not once per batch
        (:func:`~torchquant.utils.cached_quantized_weights`).

        Args:
            hooks: ``{layer: fn(layer, x, batch_index)}`` called with each layer's input ``x``
                before the layer runs (as the layer receives it, before its input quantizer).
            stop_after: end each pass once this layer's hook has run (its inputs are all that
                is wanted); the outputs are then not computed.
            batches: indices of the captured batches to run (all by default).

        Returns:
            The block's outputs, one per batch (empty when stopped).
        """
        hooks = hooks or {}
        handles = []
        index = [0]
        for layer, fn in hooks.items():

            def pre(mod, args, fn=fn, layer=layer):
                fn(mod, args[0], index[0])
                if mod is stop_after:
                    raise _Stop

            handles.append(layer.register_forward_pre_hook(pre))
        if stop_after is not None and stop_after not in hooks:

            def stop(mod, args):
                raise _Stop

            handles.append(stop_after.register_forward_pre_hook(stop))
        outs = []
        try:
            # Weights do not change during a run: each layer's weight is quantized once, not once per batch.
            with torch.no_grad(), cached_quantized_weights(self.module):
                for i in batches if batches is not None else range(len(self._calls)):
                    index[0] = i
                    try:
                        out = self._call(i)
                    except _Stop:
                        continue
                    if stop_after is None:
                        outs.append(out)
        finally:
            for h in handles:
                h.remove()
        return outs

    def groups(self, layers: Sequence[QWrapper] | None = None) -> list[list[QWrapper]]:
        """``layers`` (all of the block's by default) in forward order, split into groups that read one input tensor."""
        probe = self._probed()
        wanted = set(layers) if layers is not None else {m for _, m in self.layers}
        out: list[list[QWrapper]] = []
        for group in probe.groups:
            g = [m for m in group if m in wanted]
            if g:
                out.append(g)
        return out

    def called_once(self) -> bool:
        """Whether every layer of the block is called once per forward (so a pass may stop early)."""
        return self._probed().called_once

    def fold_target(self, group: Sequence[QWrapper]) -> nn.Module | None:
        """The module whose output channels are ``group``'s input channels one for one, or ``None``.

        A normalisation whose output is the group's input tensor and whose ``weight`` is a per-channel
        gain (:func:`~torchquant.layers.norm_gain_offset`: ``weight`` or Gemma's ``1 + weight``), when
        moving seeded factors through it and the group leaves the block's output unchanged on the first
        batch (BERT adds its LayerNorms' outputs to the residual too: refused), else a
        ``Linear``/``Conv1D`` wrapper of the block whose output channels scale the group's
        input channels one for one (tested on the first batch with random positive scales).
        """
        probe = self._probed()
        if any(probe.counts.get(m, 1) > 1 for m in group):  # a scale folded before one call misses the others
            return None
        first = group[0]
        norm = probe.norm_of.get(first)
        if norm is not None and norm_gain_offset(norm) is not None:
            # Checked on the first batch: an addition reading the norm's output too (BERT's residual after
            # its LayerNorm) is no module, and the probe does not see it.
            key = (norm, tuple(group))
            if key not in self._kept:
                self._kept[key] = self._output_kept(SharedFold(norm, tuple(group), (), ()))
            return norm if self._kept[key] else None
        width = _in_features(first)
        if width is None:
            return None
        before = probe.order[: probe.order.index(first)]
        for cand in reversed(before):
            if cand in group or _out_features(cand) != width or probe.counts.get(cand, 1) > 1:
                continue
            if cand.fold_bn or cand.bn is not None or cand.act is not None:  # not a plain linear output
                continue
            if self._scales_through(cand, first) and self._linear_fold_kept(cand, group):
                return cand
        return None

    def _linear_fold_kept(self, cand: QWrapper, group: Sequence[QWrapper]) -> bool:
        """Whether scaling ``cand``'s output channels and dividing ``group``'s input columns by the same seeded
        factors leaves the block's output unchanged on the first batch (an output the residual reads too,
        as ALBERT's input projection, would change)."""
        dtype = cand.weight_view().dtype
        r = probe_factors(_out_features(cand), dtype)
        views = [w.weight_view() for w in group]
        with qmodule_state(self.module, QModuleState.BYPASSED):
            ref = model_output(self.run(batches=[0])[0], self._who)
            with _scaled_output(cand, r), _restored(views):
                with torch.no_grad():
                    for wv in views:
                        wv.div_(r.to(wv).reshape(1, -1, *[1] * (wv.dim() - 2)))
                out = model_output(self.run(batches=[0])[0], self._who)
        if ref.shape != out.shape:
            return False
        return scaled_one_for_one(ref, out, torch.ones(ref.shape[-1]), dtype)

    def _scales_through(self, cand: QWrapper, layer: QWrapper) -> bool:
        seen: list[Tensor] = []

        def grab(mod, x, i):
            seen.append(x.detach().clone())

        dtype = cand.weight_view().dtype
        r = probe_factors(_out_features(cand), dtype)
        with qmodule_state(self.module, QModuleState.BYPASSED):
            self.run({layer: grab}, stop_after=layer, batches=[0])
            with _scaled_output(cand, r):
                self.run({layer: grab}, stop_after=layer, batches=[0])
        return len(seen) == 2 and scaled_one_for_one(seen[0], seen[1], r, dtype)

    def up_rows(self, qe: QExperts) -> Tensor | None:
        """The rows of each expert's ``gate_up_proj`` matrix whose outputs scale ``down_proj``'s inputs one
        for one (``act(gate) * up``), or ``None``: the experts' counterpart of :meth:`fold_target` for
        ``down_proj``.

        The second half (``[gate; up]``) or the odd rows (interleaved), found by scaling them
        (:func:`probe_factors`) and watching the ``down_proj`` inputs on the first batch; ``None`` for
        a gating no scale passes through (GPT-OSS' ``(up + 1) * act(gate)``, a clamped ``up``) and for
        banks without a gate (``up_proj``).
        """
        if qe.banks[0] != "gate_up_proj":
            return None
        bank = qe.layer._parameters["gate_up_proj"]
        out = bank.shape[2] if qe.transposed else bank.shape[1]
        half = out // 2
        r = probe_factors(half, bank.dtype)
        for rows in (torch.arange(half, out), torch.arange(1, out, 2)):
            seen: list[list[Tensor]] = [[], []]
            for k in range(2):
                factor = torch.ones(out)
                if k:
                    factor[rows] = r
                report = lambda b, e, x, out=seen[k]: out.append(x.detach())  # noqa: E731
                with _rows_scaled(qe, factor), expert_inputs(qe, report, ["down_proj"]):
                    self.run(batches=[0])
            pairs = list(zip(seen[0], seen[1]))
            if seen[0] and len(seen[0]) == len(seen[1]) and all(scaled_one_for_one(*p, r, bank.dtype) for p in pairs):
                return rows
        return None

    def shared_fold(self, member: QWrapper | QExperts) -> SharedFold | str | None:
        """How a per-channel scale moves into the normalisation whose output ``member`` reads along with
        other modules (a router, the experts, a shared expert), or why it cannot.

        Every module reading the normalisation's output (or a view of it) must take the inverse
        scale on its input columns: a ``Linear``/``Conv1D`` wrapper, a :class:`~torchquant.QExperts`
        (its first bank) or a float module with one ``(out, in)`` weight (a router). The move is
        checked on the first batch: with seeded factors (:func:`probe_factors`) moved through all of
        them, the block's output must not change (a reader that is not a module, a gating or a
        clamp in between would change it).

        Args:
            member: a layer of the block (the first of its group) or an experts module of it.

        Returns:
            A :class:`SharedFold`; the reason there is none; ``None`` when ``member``'s input is not a
            normalisation's output that another module reads too (:meth:`fold_target` covers a group
            that is its only reader).
        """
        found = self._probed().shared.get(member)
        if found is None or isinstance(found, str):
            return found
        norm = found.norm
        if norm not in self._shared:
            self._shared[norm] = (
                found
                if self._output_kept(found)
                else (
                    f"moving a scale through {self._names.get(norm, type(norm).__name__)} and its readers changes "
                    "the block's output (something else reads it, or a reader is not linear in it)"
                )
            )
        return self._shared[norm]

    def shared_folds(self, members: Sequence[nn.Module]) -> dict[nn.Module, SharedFold]:
        """The :class:`SharedFold` s of ``members`` (groups' first layers, experts modules), by normalisation."""
        out: dict[nn.Module, SharedFold] = {}
        for m in members:
            fold = self.shared_fold(m)
            if isinstance(fold, SharedFold):
                out[fold.norm] = fold
        return out

    def joint_folds(
        self, groups: Sequence[Sequence[QWrapper]]
    ) -> tuple[list[QExperts], dict[nn.Module, SharedFold], set[QWrapper]]:
        """The block's experts modules, the :class:`SharedFold` s of ``groups`` and of those experts (by
        normalisation), and the layers the folds scale (their groups are scaled with the fold, not alone)."""
        experts = [m for m in self.module.modules() if isinstance(m, QExperts)]
        shared = self.shared_folds([*(g[0] for g in groups), *experts])
        return experts, shared, {w for fold in shared.values() for w in fold.layers}

    def fold_name(self, fold: SharedFold) -> str:
        """The qualified names of ``fold``'s quantized readers joined by ``","`` (an experts module's as
        ``"<experts>.<first bank>"``): how results key it."""
        names = [self._names[w] for w in fold.layers] + [f"{self._names[qe]}.{qe.banks[0]}" for qe in fold.experts]
        return ",".join(names)

    def unscaled_reason(self, member: nn.Module) -> str:
        """Why no scale moves out of ``member``'s input (a group's first layer with no :meth:`fold_target`, or an
        experts module with no :meth:`shared_fold`)."""
        calls = self._probed().counts.get(member, 1)
        if calls > 1:
            return (f"it is called {calls} times per forward pass (shared weights): a scale folded into the "
                    "module before one call would not reach the others")  # fmt: skip
        fold = self.shared_fold(member)
        if isinstance(fold, str):
            return fold
        if isinstance(member, QExperts):
            return "its input is not a normalisation's output (no module takes its inverse scale)"
        if isinstance(member, QWrapper) and member.input_transform is not None:
            return (f"it transforms its input online ({type(member.input_transform).__name__}, as QuaRot puts "
                    "before down_proj): a channel scale cannot be folded through the transform")  # fmt: skip
        return "no module produces its input channels one for one"

    def row_module(self, members: Sequence[nn.Module]) -> tuple[nn.Module, int] | None:
        """The smallest module of the block holding all of ``members`` (layers, experts modules) that takes
        their input tensor as its only tensor argument, once per forward, and so computes its output row by
        row from sampled input rows (an MLP, a mixture-of-experts block); with the rank of its input.

        ``None`` when there is no such module: an attention module usually also takes position
        embeddings and masks, the block itself takes more, and a group of one layer is left to its own
        output. Whether the module really works row by row is for the caller to check on its rows (an
        attention module called with its input alone does not).
        """
        probe = self._probed()
        if not members or any(m not in probe.member_input for m in members):
            return None
        ptrs = {probe.member_input[m] for m in members}
        paths = [self._names[m].split(".") for m in members]
        depth = 0
        while all(len(p) > depth + 1 for p in paths) and len({p[depth] for p in paths}) == 1:
            depth += 1
        prefix = self._names[self.module].split(".") if self._names[self.module] else []
        path = paths[0][:depth]
        if len(path) <= len(prefix) or (len(members) == 1 and isinstance(members[0], QWrapper)):
            return None
        module = self.module.get_submodule(".".join(path[len(prefix) :]))
        seen = probe.row_input.get(module)
        if isinstance(module, QWrapper) or seen is None or {(seen[0], seen[2])} != ptrs:
            return None  # (the same storage at another width: the module reads more than the group does)
        return module, seen[1]

    def _output_kept(self, fold: SharedFold) -> bool:
        dtype = fold.norm.weight.dtype
        r = probe_factors(fold.norm.weight.numel(), dtype)
        with qmodule_state(self.module, QModuleState.BYPASSED):
            ref = model_output(self.run(batches=[0])[0], self._who)
            with _shared_scaled(fold, r):
                out = model_output(self.run(batches=[0])[0], self._who)
        if ref.shape != out.shape:
            return False
        return scaled_one_for_one(ref, out, torch.ones(ref.shape[-1]), dtype)

    def _probed(self) -> _Probe:
        if self._probe is None:
            self._probe = _probe(self)
        return self._probe


@dataclass(frozen=True)
class SharedFold:
    """A normalisation and every module that reads its output, for a per-channel scale moved into the
    normalisation's gain and out of the readers' input columns (:func:`fold_shared_scale`).

    Attributes:
        norm: the normalisation.
        layers: the quantized layers reading its output (a shared expert's ``gate_proj``, ``up_proj``).
        experts: experts modules whose first bank reads it.
        others: float modules' ``(out, in)`` weights reading it (a router), by qualified name.
    """

    norm: nn.Module
    layers: tuple[QWrapper, ...]
    experts: tuple[QExperts, ...]
    others: tuple[tuple[str, Tensor], ...]


def fold_shared_scale(fold: SharedFold, s: Tensor) -> None:
    """Move a per-channel scale out of the readers of ``fold.norm``'s output: ``x -> x / s`` (the norm's
    gain and bias), and ``W -> W * s`` on every reader's input columns (the layers, each expert's matrix of
    the experts' first bank, the float weights). The float model is unchanged.

    Args:
        fold: from :meth:`Block.shared_fold`.
        s: ``(d,)`` positive scales.
    """
    norm = fold.norm
    offset = norm_gain_offset(norm)
    if offset is None:
        raise ValueError(f"fold: {type(norm).__name__}'s weight is not a per-channel gain; it takes no scale")
    with torch.no_grad():
        divide_norm_output_(norm, s, offset)
        for w in fold.layers:
            wv = w.weight_view()
            wv.mul_(s.to(wv)[None, :])
        for qe in fold.experts:
            bank = qe.layer._parameters[qe.banks[0]]
            bank.mul_((s[None, :, None] if qe.transposed else s[None, None, :]).to(bank))
        for _, t in fold.others:
            t.mul_(s.to(t)[None, :])


@contextlib.contextmanager
def _restored(tensors: Sequence[Tensor | None]) -> Iterator[None]:
    """The values of ``tensors`` (``None`` entries ignored) put back on exit, whatever happened meanwhile."""
    saved = [(t, t.detach().clone()) for t in tensors if isinstance(t, Tensor)]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in saved:
                t.copy_(v)


@contextlib.contextmanager
def _shared_scaled(fold: SharedFold, r: Tensor) -> Iterator[None]:
    tensors = [fold.norm.weight, getattr(fold.norm, "bias", None), *(w.weight_view() for w in fold.layers)]
    tensors += [qe.layer._parameters[qe.banks[0]] for qe in fold.experts] + [t for _, t in fold.others]
    with _restored(tensors):
        fold_shared_scale(fold, r)
        yield


@dataclass
class _Probe:
    order: list[QWrapper]
    groups: list[list[QWrapper]]
    norm_of: dict[QWrapper, nn.Module]
    called_once: bool
    counts: dict[nn.Module, int]  # calls per forward pass of each layer
    shared: dict[nn.Module, SharedFold | str]  # unchecked: see Block.shared_fold
    # per module of the block: (storage, rank, width) of its one tensor argument, or None (other tensors
    # passed, or called more than once)
    row_input: dict[nn.Module, tuple[int, int, int] | None]
    member_input: dict[nn.Module, tuple[int, int]]  # (storage, width) of each layer's and experts module's input


def _probe(block: Block) -> _Probe:
    """Forward order, shared inputs and normalisation outputs of the block's layers, on batch 0."""
    order: list[QWrapper] = []
    inputs: dict[QWrapper, Tensor] = {}
    counts: dict[QWrapper, int] = {}
    norm_out: list[tuple[nn.Module, Tensor]] = []
    handles = []

    def pre(mod, args):
        counts[mod] = counts.get(mod, 0) + 1
        if mod not in inputs:
            order.append(mod)
            inputs[mod] = args[0]  # held: the same object identifies a shared input

    def post(mod, args, out):
        if isinstance(out, Tensor):
            norm_out.append((mod, out))

    # Other modules with weights (a router, an expert bank, a QOp) that read a tensor: a norm's
    # output they read too cannot take a group's scales (their function would change).
    readers: list[tuple[nn.Module, Tensor]] = []

    def read(mod, args):
        if args and isinstance(args[0], Tensor):
            readers.append((mod, args[0]))

    row_input: dict[nn.Module, tuple[int, int, int] | None] = {}

    def record(mod, args, kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        one = len(args) == 1 and len(tensors) == 1 and mod not in row_input
        x = args[0] if one else None
        row_input[mod] = (x.untyped_storage().data_ptr(), x.dim(), x.shape[-1]) if x is not None and x.dim() else None

    inside = {id(x) for _, w in block.layers for x in w.modules()}  # the wrappers, their layers and quantizers
    for m in block.module.modules():
        if m is not block.module and (id(m) not in inside or isinstance(m, QWrapper)):
            handles.append(m.register_forward_pre_hook(record, with_kwargs=True))
    for _, m in block.layers:
        handles.append(m.register_forward_pre_hook(pre))
    for m in block.module.modules():
        if is_normalization(m):
            handles.append(m.register_forward_hook(post))
        elif id(m) not in inside and (isinstance(m, QModule) or next(m.parameters(recurse=False), None) is not None):
            handles.append(m.register_forward_pre_hook(read))
    try:
        with qmodule_state(block.module, QModuleState.BYPASSED), torch.no_grad():
            block._call(0)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[QWrapper]] = []
    for m in order:
        if groups and inputs[groups[-1][0]] is inputs[m]:
            groups[-1].append(m)
        else:
            groups.append([m])
    norm_of = {}
    for g in groups:
        for norm, out in norm_out:
            if out is inputs[g[0]] and not _read_elsewhere(out, g, inputs, readers):
                norm_of[g[0]] = norm
    shared = _shared_readers(block, groups, inputs, norm_out, readers)
    member_input = {m: (x.untyped_storage().data_ptr(), x.shape[-1]) for m, x in inputs.items() if x.dim()}
    member_input.update(
        {m: (x.untyped_storage().data_ptr(), x.shape[-1]) for m, x in readers if isinstance(m, QExperts) and x.dim()}
    )
    return _Probe(
        order, groups, norm_of, all(c == 1 for c in counts.values()), dict(counts), shared, row_input, member_input
    )


def _shared_readers(
    block: Block,
    groups: list[list[QWrapper]],
    inputs: dict[QWrapper, Tensor],
    norm_out: list[tuple[nn.Module, Tensor]],
    readers: list[tuple[nn.Module, Tensor]],
) -> dict[nn.Module, SharedFold | str]:
    """For each group and experts module reading a normalisation's output that other modules read too:
    that normalisation with all its readers, or why a scale cannot move through them."""

    def ptr(t: Tensor) -> int:
        return t.untyped_storage().data_ptr()

    experts_in = [(m, x) for m, x in readers if isinstance(m, QExperts)]
    within = {id(x) for qe, _ in experts_in for x in qe.modules()}  # an experts module's own layer reads it too
    names = block._names
    out: dict[nn.Module, SharedFold | str] = {}
    for norm, y in norm_out:
        p = ptr(y)
        layers = [m for g in groups for m in g if ptr(inputs[m]) == p]
        experts = list(dict.fromkeys(qe for qe, x in experts_in if ptr(x) == p))
        others = list(dict.fromkeys(m for m, x in readers if ptr(x) == p and id(m) not in within))
        reading = {id(g[0]) for g in groups if any(ptr(inputs[m]) == p for m in g)}
        if not experts and not (layers and others) and len(reading) < 2:
            continue  # no reader, or a group alone (Block.fold_target)
        width = y.shape[-1]
        why = None
        if norm_gain_offset(norm) is None:
            why = f"{names.get(norm)}'s weight is not a per-channel gain"
        for m in layers:
            if why is None and _in_features(m) != width:
                why = f"{names.get(m)} reads it but is not a Linear/Conv1D with {width} inputs"
        for qe in experts:
            bank = qe.layer._parameters[qe.banks[0]]
            if why is None and bank.shape[1 if qe.transposed else 2] != width:
                why = f"{names.get(qe)}.{qe.banks[0]} does not have {width} inputs"
        mats: list[tuple[str, Tensor]] = []
        for m in others:
            two_d = [t for t in m._parameters.values() if t is not None and t.dim() == 2]
            if why is None and (isinstance(m, QModule) or len(two_d) != 1 or two_d[0].shape[-1] != width):
                why = f"{names.get(m)} ({type(m).__name__}) reads it and has no single (out, {width}) weight"
            if two_d:
                mats.append((names.get(m, type(m).__name__), two_d[0]))
        found: SharedFold | str = why or SharedFold(norm, tuple(layers), tuple(experts), tuple(mats))
        for member in [*layers, *experts]:
            out[member] = found
    return out


def _read_elsewhere(
    out: Tensor, group: list[QWrapper], inputs: dict[QWrapper, Tensor], readers: list[tuple[nn.Module, Tensor]]
) -> bool:
    """Whether a module outside ``group`` reads ``out`` or a view of it (the same storage)."""
    storage = out.untyped_storage().data_ptr()
    others = [x for m, x in inputs.items() if m not in group] + [x for _, x in readers]
    return any(x.untyped_storage().data_ptr() == storage for x in others)


def _in_features(w: QWrapper) -> int | None:
    if isinstance(w.layer, nn.Linear) or type(w.layer).__name__ == "Conv1D":
        return w.weight_view().shape[1]
    return None


def _out_features(w: QWrapper) -> int | None:
    if isinstance(w.layer, nn.Linear) or type(w.layer).__name__ == "Conv1D":
        return w.weight_view().shape[0]
    return None


def probe_factors(n: int, dtype: torch.dtype) -> Tensor:
    """``n`` seeded positive factors from 1/100 to 100, exact in ``dtype`` (float32 tensor), to scale a
    module's output channels by while checking that a later input scales with them one for one: wide
    enough that a clamp in between (DeepSeek-V4's ``up.clamp``) is reached and the check fails."""
    g = torch.Generator().manual_seed(0)
    return torch.pow(10.0, torch.empty(n).uniform_(-2.0, 2.0, generator=g)).to(dtype).float()


def scaled_one_for_one(x0: Tensor, x1: Tensor, r: Tensor, dtype: torch.dtype) -> bool:
    """Whether ``x1`` is ``x0`` with its last dimension's channels multiplied by ``r``, up to the rounding of
    ``dtype`` (the weights were scaled in it)."""
    if x1.shape != x0.shape:
        return False
    a, b = x0.float(), x1.float() / r.to(x1.device)
    tol = max(1e-4, 4 * torch.finfo(dtype).eps)
    return bool(((b - a).abs() <= tol * (a.abs().max() + a.abs()) + 1e-12).all())


@contextlib.contextmanager
def _rows_scaled(qe: QExperts, factor: Tensor):
    """Every expert's ``gate_up_proj`` output channels (and biases) multiplied by ``factor`` ``(out,)`` meanwhile."""
    bank = qe.layer._parameters["gate_up_proj"]
    bias = qe.layer._parameters.get("gate_up_proj_bias")
    with _restored([bank, bias]):
        with torch.no_grad():
            bank.mul_((factor[None, None, :] if qe.transposed else factor[None, :, None]).to(bank))
            if bias is not None:
                bias.mul_(factor.to(bias))
        yield


def fold_expert_scale(qe: QExperts, expert: int, up_rows: Tensor, s: Tensor) -> None:
    """Move a per-channel scale from expert ``expert``'s ``down_proj`` input into its ``up`` rows:
    ``x -> x / s`` (the rows ``up_rows`` of its ``gate_up_proj`` matrix and their biases divided by ``s``),
    ``W -> W * s`` (its ``down_proj`` columns). The float experts are unchanged.

    Args:
        qe: the experts.
        expert: which expert.
        up_rows: from :meth:`Block.up_rows`.
        s: ``(intermediate,)`` positive scales.
    """
    down, first = qe.matrix("down_proj", expert), qe.matrix("gate_up_proj", expert)
    bias = qe.layer._parameters.get("gate_up_proj_bias")
    with torch.no_grad():
        down.mul_(s.to(down)[None, :])
        first[up_rows] = first[up_rows] / s.to(first)[:, None]
        if bias is not None:
            b = bias[expert]
            b[up_rows] = b[up_rows] / s.to(b)


@contextlib.contextmanager
def _scaled_output(w: QWrapper, r: Tensor) -> Iterator[None]:
    wv = w.weight_view()
    bias = getattr(w.layer, "bias", None)
    with _restored([wv, bias]):
        with torch.no_grad():
            wv.mul_(r.to(wv)[:, None])
            if isinstance(bias, Tensor):
                bias.mul_(r.to(bias))
        yield


def fold_input_scale(target: nn.Module, group: Sequence[QWrapper], s: Tensor) -> None:
    """Move a per-channel scale from ``group``'s input into ``target``: ``x -> x / s``, ``W -> W * s``.

    The float function is unchanged: ``target``'s output channels (a normalisation's
    gain and bias, :func:`~torchquant.layers.divide_norm_output_`; a layer's weight rows
    and bias) are divided by ``s`` and each group layer's weight columns multiplied by it.

    Args:
        target: from :meth:`Block.fold_target`.
        group: layers reading ``target``'s output, weights ``(out, in)``.
        s: ``(in,)`` positive scales.
    """
    if not isinstance(target, QWrapper):  # a normalisation: its gain and bias
        fold_shared_scale(SharedFold(target, tuple(group), (), ()), s)
        return
    with torch.no_grad():
        wv = target.weight_view()
        wv.div_(s.to(wv)[:, None])
        bias = getattr(target.layer, "bias", None)
        if isinstance(bias, Tensor):
            bias.div_(s.to(bias))
        for w in group:
            wv = w.weight_view()
            wv.mul_(s.to(wv)[None, :])


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(b, (bool, int, float, str)):
        return type(a) is type(b) and a == b
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return False


OUTSIDE_BLOCKS = (
    "outside the blocks it processes (a decoder stack's layers only); blocks='' takes the whole model as one block"
)


def layers_outside(model: nn.Module, inside: set[nn.Module], keep: Callable[[QWrapper], bool]) -> list[str]:
    """The qualified names of ``model``'s QWrappers with a weight quantizer that ``keep`` accepts and that no
    processed block held (``inside``): a quantized ``lm_head`` after a decoder stack."""
    return [
        n
        for n, m in iter_qmodules(model)
        if isinstance(m, QWrapper) and m.weight_quantizer is not None and m not in inside and keep(m)
    ]


def _padding_mask(model: nn.Module, batch: Any) -> Tensor | None:
    """A batch's real tokens, ``(B, T)`` bool, where it is a dict whose ``attention_mask`` has the shape of its
    ``input_ids`` and some zeros (padding), on a decoder-only model; else ``None``."""
    if not isinstance(batch, Mapping) or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    mask, ids = batch.get("attention_mask"), batch.get("input_ids")
    if not (isinstance(mask, Tensor) and isinstance(ids, Tensor) and mask.dim() == 2 and mask.shape == ids.shape):
        return None
    mask = mask.bool()
    return None if bool(mask.all()) else mask


def _capture(model: nn.Module, blocks: list[tuple[str, nn.Module]], batches: list, who: str) -> list[list[_Call]]:
    """The calls of every block: block 0's in full, the others' without their hidden states.

    Arguments besides the hidden states are captured for block 0 over all batches; if on
    the first batch every block gets the very same values as block 0 (by keyword and by
    position), they are shared, else every block's are captured over all batches (one
    full forward per batch).
    """
    mods = [b for _, b in blocks]
    per_block: list[list[_Call]] = [[] for _ in mods]

    def hook_for(k: int, stop: bool):
        def pre(mod, args, kwargs):
            if not args and "hidden_states" in kwargs:  # the hidden states passed by keyword
                kwargs = dict(kwargs)
                args = (kwargs.pop("hidden_states"),)
            if not args or not isinstance(args[0], Tensor):
                raise ValueError(f"{who}: block {blocks[k][0]} must be called with its hidden states (a tensor) first")
            per_block[k].append(_Call(tuple(_no_cache_arg(a) for a in args), _no_cache(kwargs)))
            if stop:
                raise _Stop

        return pre

    def run(which: list[int], stop_at: int, data: list) -> None:
        handles = [mods[k].register_forward_pre_hook(hook_for(k, k == stop_at), with_kwargs=True) for k in which]
        try:
            with torch.no_grad():
                for batch in data:
                    with contextlib.suppress(_Stop):
                        call_model(model, batch, who)
        finally:
            for h in handles:
                h.remove()

    last = len(mods) - 1
    run(list(range(len(mods))), last, batches[:1])
    missing = [blocks[k][0] for k in range(len(mods)) if not per_block[k]]
    if missing:
        raise RuntimeError(f"{who}: blocks never called by the forward pass: {missing}")
    first = per_block[0][0]
    shared = all(
        c[0].kwargs.keys() == first.kwargs.keys()
        and all(_same_value(c[0].kwargs[k], v) for k, v in first.kwargs.items())
        and len(c[0].args) == len(first.args)
        and all(_same_value(a, b) for a, b in zip(c[0].args[1:], first.args[1:]))  # per-layer inputs by position
        for c in per_block[1:]
    )
    if shared:
        per_block = [[] for _ in mods]
        run([0], 0, batches)
        return [per_block[0]] + [[] for _ in mods[1:]]
    per_block = [[] for _ in mods]
    run(list(range(len(mods))), last, batches)
    return per_block


def sequential_blocks(
    model: nn.Module,
    batches: list,
    *,
    blocks: str | None = None,
    mode: QModuleState = QModuleState.QUANT_EVAL,
    who: str = "sequential",
    progress: bool = True,
) -> Iterator[Block]:
    """Yield the model's blocks one at a time, each with its inputs; feed each one's outputs to the next.

    The caller processes each yielded :class:`Block` (runs it with hooks, changes its
    weights); when it asks for the next one, the processed block runs on its inputs with
    every QModule in ``mode`` and its outputs become the next block's inputs. The model's
    modes are left to the caller (see :func:`~torchquant.utils.restoring_states`).

    Args:
        model: a quantizable model.
        batches: calibration batches, as :func:`~torchquant.ptq.calibrate` takes them.
        blocks: see :func:`find_blocks`.
        mode: the mode of every QModule while inputs are captured and outputs computed.
        who: the caller's name, for errors and the progress bar.
        progress: show a progress bar over blocks.

    Example:
        >>> import torch, torchquant as tq
        >>> from torch import nn
        >>> from torchquant.ptq.sequential import sequential_blocks
        >>> w8 = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax())
        >>> net = tq.quantize_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), w8, None, method="swap")
        >>> sum(len(b.layers) for b in sequential_blocks(net, [torch.randn(2, 4)], progress=False))
        1
    """
    found = find_blocks(model, blocks, who)
    for _, m in iter_qmodules(model):
        m.qstate = mode
    masks = [_padding_mask(model, b) for b in batches]
    if not found:
        yield Block("", model, [_Call((b,), {}) for b in batches], True, who, "", masks)
        return
    calls = _capture(model, found, batches, who)
    current = calls[0]
    for k, (name, block) in enumerate(progress_bar(found, len(found), who, progress)):
        b = Block(name, block, current, False, who, f"{name}.", masks)
        yield b
        for _, m in iter_qmodules(block):
            m.qstate = mode
        outs = [o.detach() for o in b.run()]
        if k + 1 < len(found):
            nxt = calls[k + 1] or calls[0]  # the next block's own keywords when they differ
            current = [_Call((h, *nxt[i].args[1:]), nxt[i].kwargs) for i, h in enumerate(outs)]
            calls[k + 1] = []  # captured keywords no longer needed
