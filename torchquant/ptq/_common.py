"""Plumbing shared by the post-training algorithms: data batches,
snapshots that undo a failed algorithm, forward order of modules, input capture."""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import torch
from torch import Tensor, nn

from ..moe import QExperts
from ..qmodules import QModule, QWrapper, iter_qmodules
from ..utils import call_model


def materialize(data: Iterable, num_batches: int | None, who: str) -> list:
    """The first ``num_batches`` batches of ``data`` as a list (all if ``None``); error when empty."""
    out = list(stream(data, num_batches, who)[0])
    if not out:
        raise ValueError(f"{who}: the calibration data is empty")
    return out


def stream(data: Iterable, num_batches: int | None, who: str) -> tuple[Iterator, list, int | None]:
    """The first ``num_batches`` batches of ``data`` (all if ``None``) one at a time, for one pass over them.

    Returns ``(batches, first, total)``: the iterator; a list that receives the first batch as it goes
    by (empty afterwards when ``data`` was); the number of batches when ``data`` has a length.
    """
    _check_data(data, num_batches, who)
    first: list = []
    try:
        total = len(data) if isinstance(data, Sized) else None
    except TypeError:  # a DataLoader over an IterableDataset without a length
        total = None
    if total is not None and num_batches is not None:
        total = min(total, num_batches)

    def batches() -> Iterator:
        for batch in itertools.islice(data, num_batches):  # no batch fetched beyond num_batches
            if not first:
                first.append(batch)
            yield batch

    return batches(), first, total


def _check_data(data: Iterable, num_batches: int | None, who: str) -> None:
    if isinstance(data, (Tensor, dict)) or not isinstance(data, Iterable):
        raise TypeError(
            f"{who}: data must be an iterable of batches (a list, a DataLoader, a generator), "
            f"got {type(data).__name__}; wrap a single tensor in a list: [x]"
        )
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)):
        raise TypeError(f"{who}: num_batches must be an int or None, got {num_batches!r}")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"{who}: num_batches must be >= 1, got {num_batches}")


SCALED_BY_ATTR = "_tq_scaled_by"  # names of the algorithms that folded channel scales into the model's norms


def mark_scaled(model: nn.Module, who: str) -> None:
    """Record that ``who`` folded per-channel scales into ``model``'s normalisations and layers."""
    setattr(model, SCALED_BY_ATTR, [*getattr(model, SCALED_BY_ATTR, []), who])


def require_qmodules(model: nn.Module, who: str) -> list[tuple[str, QModule]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: expected an nn.Module, got {type(model).__name__}")
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"{who}: {meta} (and maybe more) is on the meta device, with no values to work on; "
            "load the weights first (from_pretrained without device_map='meta', or load_state_dict(assign=True))"
        )
    qms = iter_qmodules(model)
    if not qms:
        raise ValueError(
            f"{who}: {type(model).__name__} contains no QModule; make it quantizable first "
            "(tq.quantize_model(model, weight_factory, acts_factory, method='swap'))"
        )
    return qms


def tied_weights(model: nn.Module, wrappers: Iterable[tuple[str, QWrapper]]) -> dict[QWrapper, list[str]]:
    """The ``wrappers`` whose weight parameter other modules of ``model`` hold too, with those holders' names.

    Tied input and output embeddings (``lm_head`` and ``embed_tokens`` of a language model with
    ``tie_word_embeddings``) and one module listed twice in an ``nn.Sequential`` share a parameter:
    writing a rounded weight into it changes the other holders as well, so the PTQ algorithms that
    write weights leave such layers at round to nearest.
    """
    holders: dict[int, dict[nn.Module, str]] = {}  # parameter -> {module holding it: that parameter's name}
    for name, m in model.named_modules():  # each module once, under its first name
        for attr, p in m.named_parameters(recurse=False):
            holders.setdefault(id(p), {})[m] = f"{name}.{attr}" if name else attr
    wrappers = list(wrappers)
    by_layer: dict[int, list[str]] = {}  # two wrappers of one layer (a module listed twice, converted by swap)
    for name, w in wrappers:
        by_layer.setdefault(id(w.layer), []).append(name)
    out: dict[QWrapper, list[str]] = {}
    for name, w in wrappers:
        weight = getattr(w.layer, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        others = [n for m, n in holders.get(id(weight), {}).items() if m is not w.layer]
        others += [f"{n}.layer.weight" for n in by_layer[id(w.layer)] if n != name]
        if others:
            out[w] = others
    return out


def warn_tied(tied: dict[QWrapper, list[str]], names: dict[nn.Module, str], who: str) -> None:
    """Warn that ``who`` leaves the layers of :func:`tied_weights` at round to nearest."""
    if tied:
        pairs = [f"{names[w]} (with {', '.join(h)})" for w, h in tied.items()]
        warnings.warn(
            f"{who}: {len(pairs)} layer(s) share their weight with other modules and keep their round-to-nearest "
            f"weights, since writing a rounded weight would change the others too: {first_names(pairs)}; to include "
            "them, untie them first (wrapper.layer.weight = nn.Parameter(wrapper.layer.weight.detach().clone()))",
            UserWarning,
            stacklevel=3,
        )


UNROUTED = "no calibration token was routed to this expert"
"""Why an expert matrix is left as it was: the ``skipped`` reason GPTQ, AWQ and SmoothQuant give."""


def warn_skipped(
    skipped: Mapping[str, str], reason: str, what: str, who: str, hint: str = "see the result's skipped"
) -> None:
    """Warn about the entries of ``skipped`` whose reason starts with ``reason``, if any:
    ``"{who}: {n} {what} ({their names}); {hint}"``, attributed to the caller of ``who``."""
    keys = [k for k, why in skipped.items() if why.startswith(reason)]
    if keys:
        warnings.warn(f"{who}: {len(keys)} {what} ({first_names(keys)}); {hint}", UserWarning, stacklevel=3)


def first_names(names: Sequence[str], n: int = 4) -> str:
    """``names`` joined for a message: the first ``n``, then how many more."""
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def warn_experts_left(qmodules: list[tuple[str, QModule]], who: str, hint: str = "") -> None:
    """Warn that ``who``, which works on ``QWrapper`` layers, leaves mixture-of-experts banks as they are."""
    names = [n for n, m in qmodules if isinstance(m, QExperts)]
    if names:
        shown = first_names(names)
        warnings.warn(
            f"{who}: {len(names)} mixture-of-experts bank(s) keep their round-to-nearest weights ({shown}): "
            f"{who} works on QWrapper layers (Linear, Conv, Embedding), not on QExperts{hint}",
            UserWarning,
            stacklevel=3,
        )


class Snapshot:
    """Everything an algorithm may change in ``model``: parameters and buffers (values
    and identity), child modules, ``qstate`` and ``training`` flags. :meth:`restore`
    puts it all back, so a failed algorithm leaves the model as it found it."""

    def __init__(self, model: nn.Module) -> None:
        self.entries = []
        with torch.no_grad():
            for m in model.modules():
                params = dict(m._parameters)
                buffers = dict(m._buffers)
                self.entries.append(
                    (
                        m,
                        dict(m._modules),
                        params,
                        {k: p.detach().clone() for k, p in params.items() if p is not None},
                        buffers,
                        {k: b.detach().clone() for k, b in buffers.items() if b is not None},
                        m.training,
                        getattr(m, "qstate", None),
                    )
                )

    def restore(self) -> None:
        with torch.no_grad():
            for m, mods, params, pvals, buffers, bvals, training, qstate in self.entries:
                m._modules.clear()
                m._modules.update(mods)
                m._parameters.clear()
                m._parameters.update(params)
                m._buffers.clear()
                m._buffers.update(buffers)
                for k, v in pvals.items():
                    params[k].copy_(v)
                for k, v in bvals.items():
                    buffers[k].copy_(v)
                m.training = training
                if qstate is not None:
                    m.qstate = qstate


@contextlib.contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[None]:
    """Run the body as one step on ``model``: if it raises (an interrupt included), the
    :class:`Snapshot` taken on entry is restored; QModule modes and ``training`` flags are
    put back either way (:func:`~torchquant.utils.restoring_states`)."""
    from ..utils import restoring_states

    snapshot = Snapshot(model)
    with restoring_states(model):
        try:
            yield
        except BaseException:
            snapshot.restore()
            raise


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early."""


def forward_order(
    model: nn.Module, modules: Sequence[nn.Module], batch: Any, who: str, counts: dict | None = None
) -> list[nn.Module]:
    """``modules`` sorted by when a forward pass on ``batch`` first calls them; those never
    called are left out. ``counts``, given, receives how many times each module is called."""
    seen: list[nn.Module] = []
    handles = []
    counts = {} if counts is None else counts

    def hook(mod, args):
        if mod not in seen:
            seen.append(mod)
        counts[mod] = counts.get(mod, 0) + 1

    for m in modules:
        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, batch, who)
    finally:
        for h in handles:
            h.remove()
    return seen


def capture(
    model: nn.Module, module: nn.Module, batches: list, who: str, name: str, want_output: bool, calls: int = 1
) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """Inputs (and outputs) of ``module`` over ``batches``, concatenated along dim 0, and the keyword
    arguments of its calls.

    ``module`` must be called with exactly one tensor and return one tensor, ``calls`` times per
    forward pass (a layer whose weights are shared across depth: every call's rows, batch by
    batch in call order); the forward pass stops right after its last call (or before it when
    only inputs are wanted). A
    :class:`~torchquant.qmodules.QWrapper` may also get ``bias=`` (a module passing its layer's weight
    to ``F.linear`` with a bias of its own, :mod:`torchquant.weight_reads`): the same values in every
    call, returned so that replays of the unit pass it too.
    """
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    biases: list[Any] = []

    def pre(mod, args, kwargs):
        extra = kwargs.keys() - ({"bias"} if isinstance(mod, QWrapper) else set())
        if len(args) != 1 or extra or not isinstance(args[0], Tensor):
            raise ValueError(
                f"{who}: {name} ({type(mod).__name__}) must be called with one tensor to be reconstructed, "
                f"got {len(args)} positional and {len(kwargs)} keyword arguments"
            )
        xs.append(args[0].detach())
        biases.append(kwargs["bias"].detach() if isinstance(kwargs.get("bias"), Tensor) else None)
        if not want_output and len(xs) - n_before == calls:
            raise _Stop

    def post(mod, args, out):
        if not isinstance(out, Tensor):
            raise ValueError(f"{who}: {name} ({type(mod).__name__}) must return one tensor, got {type(out).__name__}")
        ys.append(out.detach())
        if len(ys) - n_before == calls:
            raise _Stop

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = module.register_forward_hook(post) if want_output else None
    try:
        with torch.no_grad():
            for batch in batches:
                n_before = len(xs)
                with contextlib.suppress(_Stop):
                    call_model(model, batch, who)
                if len(xs) == n_before:
                    raise RuntimeError(f"{who}: {name} was not called by the model's forward pass")
                if len(xs) - n_before != calls:
                    raise RuntimeError(
                        f"{who}: {name} was called {len(xs) - n_before} times in a forward pass, {calls} in the first"
                    )
    finally:
        h1.remove()
        if h2 is not None:
            h2.remove()
    kwargs: dict[str, Any] = {}
    if any(b is not None for b in biases):
        first = biases[0]
        if not all(b is not None and first is not None and torch.equal(b, first) for b in biases):
            raise ValueError(
                f"{who}: {name} ({type(module).__name__}) is called with a bias that changes between calls"
            )
        kwargs["bias"] = first
    return torch.cat(xs), (torch.cat(ys) if want_output else None), kwargs


def weighted_wrappers(model: nn.Module) -> list[tuple[str, QWrapper]]:
    return [(n, m) for n, m in iter_qmodules(model) if isinstance(m, QWrapper)]
