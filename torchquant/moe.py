"""Mixture-of-experts expert banks with quantized weights: :class:`QExperts`.

transformers 5 stores the routed experts of an MoE layer (Mixtral, Qwen2/3-MoE, DeepSeek,
OLMoE, ...) as one module whose parameters are banks of matrices, ``gate_up_proj``
``(E, 2 * I, H)`` (or ``up_proj`` when the experts have no gate) and ``down_proj``
``(E, H, I)``, stored ``(E, in, out)`` instead when the class declares ``is_transposed``, and
runs them with the implementation its config names (a loop over the experts a batch hits,
or grouped matrix products). No ``nn.Linear`` is involved; :func:`~torchquant.quantize_model`
with ``method="swap"`` (which the Hugging Face integration uses) puts a :class:`QExperts` in
their place. Nothing here imports transformers: a bank is
recognised by its parameters.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .qmodules import QModule, QModuleState, _cached_quantize, _LayerAttributes, _run_quantizer
from .quantizers import Quantizer

__all__ = ["QExperts", "expert_banks", "expert_inputs"]

# bank parameter -> quantizer role (the attribute is ``<role>_quantizer``); the roles avoid the
# parameter names, which transformers' checkpoint conversions match when saving and loading
_ROLES = {"gate_up_proj": "gate_up", "up_proj": "up", "down_proj": "down"}


def expert_banks(module: nn.Module) -> list[str]:
    """The expert-bank parameters of ``module`` (``["gate_up_proj", "down_proj"]``), or ``[]`` if it is none.

    A module is an expert bank when it has a ``down_proj`` and a ``gate_up_proj`` or
    ``up_proj`` parameter, each with three dimensions and the same number of experts, and
    no other parameter of two or more dimensions besides biases (``*_bias``). The banks are
    stored ``(E, out, in)``, or ``(E, in, out)`` when the module says ``is_transposed`` or,
    lacking that flag, when the shapes of ``gate_up_proj`` and ``down_proj`` only chain that way.

    Example:
        >>> m = nn.Module()
        >>> m.gate_up_proj, m.down_proj = nn.Parameter(torch.zeros(4, 6, 2)), nn.Parameter(torch.zeros(4, 2, 3))
        >>> expert_banks(m), expert_banks(nn.Linear(2, 2))
        (['gate_up_proj', 'down_proj'], [])
    """
    params = module._parameters
    found = [n for n in _ROLES if isinstance(params.get(n), Tensor) and params[n].dim() == 3]
    if "down_proj" not in found or len(found) < 2 or len({params[n].shape[0] for n in found}) != 1:
        return []
    # Another matrix besides the banks (a separate gate_proj bank): not a layout QExperts knows.
    others = [n for n, p in params.items() if n not in found and p is not None and p.dim() >= 2]
    if any(not n.endswith("_bias") for n in others):
        return []
    return found


def _transposed(layer: nn.Module, banks: list[str]) -> bool:
    """Whether the banks are stored ``(E, in, out)``: the layer's ``is_transposed``, else, for
    ``gate_up_proj``, from the shapes (the two products must chain through the hidden size)."""
    flag = getattr(layer, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    if banks[0] != "gate_up_proj":  # up (E, a, b) and down (E, b, a) chain either way: the usual layout
        return False
    g, d = layer._parameters["gate_up_proj"].shape, layer._parameters["down_proj"].shape
    return g[1] == d[2] and g[2] != d[1]  # (E, H, 2I) and (E, I, H), as Llama 4 stores them


def _rows(bank: Tensor, transposed: bool) -> Tensor:
    """``(E, out, in)`` (``(E, in, out)`` transposed) -> ``(E * out, in)``: a row per output channel of each expert."""
    if transposed:
        bank = bank.transpose(1, 2)
    return bank.reshape(-1, bank.shape[-1])


def _bank(rows: Tensor, experts: int, transposed: bool) -> Tensor:
    """The inverse of :func:`_rows`, laid out in memory as the stored bank: the experts' products then run
    the kernels the float module runs (a transposed view takes other BLAS paths, whose sums round
    differently on some CPUs)."""
    bank = rows.reshape(experts, -1, rows.shape[-1])
    return bank.transpose(1, 2).contiguous() if transposed else bank


class QExperts(_LayerAttributes, QModule):
    """A transformers expert bank whose weight banks and input are quantized.

    Holds the experts module as ``.layer`` and calls it with its banks replaced by their
    quantized values (``torch.func.functional_call``), so whichever implementation the
    model's config selects runs unchanged. Each weight quantizer sees its bank as an
    ``(E * out, in)`` matrix, one row per output channel of each expert, the layout of a
    ``Linear``'s weight: ``axis=0`` is one range per (expert, output channel), ``axis=1``
    with a group size groups along the input. ``input_quantizer`` quantizes the hidden
    states ``(T, H)`` the experts receive, the input of every expert's first product, and
    ``down_input_quantizer`` the input of every expert's ``down_proj`` product (the gated
    intermediate, ``act(gate) * up``); each has one range shared by the experts. The
    intermediate is found by following the experts' forward as :func:`expert_inputs` does
    (transformers' experts run their eager loop meanwhile); observing it takes the
    intermediates of all experts at once, so a mode that observes and quantizes (QAT) runs
    the experts twice, once without gradients to observe. Biases of experts that have them
    stay float. In ``BYPASSED`` the module runs itself.

    Args:
        layer: the experts module (see :func:`expert_banks`).
        weight_quantizers: ``{bank parameter: quantizer or None}``, e.g.
            ``{"gate_up_proj": q1, "down_proj": q2}``; banks left out are not quantized.
        input_quantizer: quantizer for the hidden states, or ``None``.
        down_input_quantizer: quantizer for the input of the ``down_proj`` products, or ``None``.

    Raises:
        TypeError: ``layer`` has no expert banks, or a quantizer is not a :class:`~torchquant.Quantizer`.
        ValueError: a bank name that ``layer`` does not have.

    Example:
        >>> import torchquant as tq
        >>> class Experts(nn.Module):  # the layout of transformers' MixtralExperts, two experts
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gate_up_proj = nn.Parameter(torch.randn(2, 8, 4))
        ...         self.down_proj = nn.Parameter(torch.randn(2, 4, 4))
        ...     def forward(self, x, expert):
        ...         g, u = (x @ self.gate_up_proj[expert].T).chunk(2, -1)
        ...         return (g.relu() * u) @ self.down_proj[expert].T
        >>> w4 = lambda: tq.AffineQuantizer(4, tq.BatchMinMax(axis=1, group_size=2), symmetric=True)
        >>> q = QExperts(Experts(), {"gate_up_proj": w4(), "down_proj": w4()})
        >>> q.observe_weight()
        >>> q.qstate = tq.QModuleState.QUANT_EVAL
        >>> q(torch.randn(3, 4), 1).shape
        torch.Size([3, 4])
        >>> q.gate_up_quantizer.range_observer.min_val.shape  # (E * out, in / group)
        torch.Size([16, 2])
    """

    WEIGHT_ROLES = tuple(_ROLES.values())  # the summary lists these quantizers as weight ones
    ROLE_OF_BANK: ClassVar[Mapping[str, str]] = MappingProxyType(_ROLES)  # bank -> role: ``<role>_quantizer``

    def __init__(
        self,
        layer: nn.Module,
        weight_quantizers: dict[str, Quantizer | None] | None = None,
        input_quantizer: Quantizer | None = None,
        down_input_quantizer: Quantizer | None = None,
    ) -> None:
        super().__init__()
        banks = expert_banks(layer)
        if not banks:
            raise TypeError(
                f"QExperts: {type(layer).__name__} is not an expert bank (3-d parameters down_proj and "
                "gate_up_proj or up_proj)"
            )
        weight_quantizers = dict(weight_quantizers or {})
        unknown = sorted(set(weight_quantizers) - set(banks))
        if unknown:
            raise ValueError(f"QExperts: {type(layer).__name__} has no bank {unknown}; its banks: {banks}")
        for q in (*weight_quantizers.values(), input_quantizer, down_input_quantizer):
            if q is not None and not isinstance(q, Quantizer):
                raise TypeError(f"QExperts: quantizers must be Quantizer instances or None, got {type(q).__name__}")
        self.layer = layer
        self.banks = banks
        self.transposed = _transposed(layer, banks)
        # registered even while None: forward reads them from _modules
        for bank in banks:
            self.register_module(f"{_ROLES[bank]}_quantizer", weight_quantizers.get(bank))
        self.register_module("input_quantizer", input_quantizer)
        self.register_module("down_input_quantizer", down_input_quantizer)
        self._name_quantizers("QExperts")
        self._weight_cache: dict[str, dict[str, Any]] | None = None  # see torchquant.utils.cached_quantized_weights
        self._listener: Callable[[str, int, Tensor], None] | None = None  # see expert_inputs

    def __getstate__(self) -> dict[str, Any]:
        # what expert_inputs attached is about this module, not a copy of it (and is not picklable)
        return {**super().__getstate__(), "_listener": None, "_weight_cache": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_weight_cache", None)
        self.__dict__.setdefault("_listener", None)
        if "down_input_quantizer" not in self._modules:  # pickled before QExperts had one
            self.register_module("down_input_quantizer", None)

    def bank_quantizer(self, bank: str) -> Quantizer | None:
        """The quantizer of the bank parameter ``bank`` (``"gate_up_proj"``, ``"up_proj"`` or ``"down_proj"``)."""
        return self._modules.get(f"{_ROLES[bank]}_quantizer")

    def matrix(self, bank: str, expert: int) -> Tensor:
        """Expert ``expert``'s ``(out, in)`` matrix of the bank parameter ``bank``: a view of it (writes go through).

        Example:
            >>> m = nn.Module()
            >>> m.gate_up_proj, m.down_proj = nn.Parameter(torch.zeros(2, 4, 8)), nn.Parameter(torch.zeros(2, 4, 4))
            >>> m.is_transposed = True  # (E, in, out), as GPT-OSS stores them
            >>> QExperts(m).matrix("gate_up_proj", 1).shape  # (out, in) whatever the layout
            torch.Size([8, 4])
        """
        w = self.layer._parameters[bank][expert]
        return w.t() if self.transposed else w

    def _weights(self) -> list[tuple[str, Quantizer, Tensor]]:
        """``(bank, quantizer, (E * out, in) rows)`` of every quantized bank."""
        out = []
        for bank in self.banks:
            q = self.bank_quantizer(bank)
            if q is not None:
                out.append((bank, q, _rows(getattr(self.layer, bank), self.transposed)))
        return out

    def observe_weight(self) -> None:
        """Let the weight quantizers observe their banks (ranges from the weights, no data needed)."""
        with torch.no_grad():
            for _, q, rows in self._weights():
                _run_quantizer(q, rows, observe=True, quantize=False)

    def quantized_banks(self) -> dict[str, Tensor]:
        """Every quantized bank in its stored layout, as the current mode uses it, without observing."""
        s = self.qstate
        experts = getattr(self.layer, self.banks[0]).shape[0]
        return {
            bank: _bank(q(rows) if s.is_weight_quantized else rows, experts, self.transposed)
            for bank, q, rows in self._weights()
        }

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        s = self.qstate
        if s is QModuleState.BYPASSED:
            if self._listener is None:
                return self.layer(hidden_states, *args, **kwargs)
            own = {b: self.layer._parameters[b] for b in self.banks}
            return self._follow(lambda: self.layer(hidden_states, *args, **kwargs), own, self._listener, {}, None)
        experts = self.layer._parameters[self.banks[0]].shape[0]
        banks = {}
        cache = self._weight_cache if s.is_weight_quantized and not s.is_weight_observed else None
        for bank, q, rows in self._weights():
            if cache is not None:
                post = functools.partial(_bank, experts=experts, transposed=self.transposed)
                banks[bank] = _cached_quantize(cache.setdefault(bank, {}), q, rows, post=post)
                continue
            w = _run_quantizer(q, rows, s.is_weight_observed, s.is_weight_quantized)
            if s.is_weight_quantized:
                banks[bank] = _bank(w, experts, self.transposed)
        iq = self._modules["input_quantizer"]
        if iq is not None:
            hidden_states = _run_quantizer(iq, hidden_states, s.is_act_observed, s.is_act_quantized)

        def call() -> Tensor:
            if not banks:
                return self.layer(hidden_states, *args, **kwargs)
            return torch.func.functional_call(self.layer, banks, (hidden_states, *args), kwargs, strict=False)

        dq = self._modules["down_input_quantizer"]
        dq = dq if dq is not None and (s.is_act_observed or s.is_act_quantized) else None
        listener = self._listener
        if dq is None and listener is None:
            return call()
        reads = {b: banks.get(b, self.layer._parameters[b]) for b in self.banks}  # the banks the forward reads
        seen: list[Tensor] = []

        def keep(bank: str, e: int, x: Tensor) -> None:
            if bank == "down_proj":
                seen.append(x.detach().reshape(-1, x.shape[-1]))

        observe_after = dq is not None and s.is_act_observed and not s.is_act_quantized
        if dq is not None and s.is_act_observed and s.is_act_quantized:
            # QAT: the quantizer observes the inputs of all experts at once, before any is quantized
            with torch.no_grad():
                self._follow(call, reads, keep, {}, hidden_states)
            self._observe_down(dq, seen, reads)

        def report(bank: str, e: int, x: Tensor) -> None:
            if observe_after:
                keep(bank, e, x)
            if listener is not None:
                listener(bank, e, x)

        quantize = (
            {"down_proj": lambda x: _run_quantizer(dq, x, False, True)} if dq is not None and s.is_act_quantized else {}
        )
        out = self._follow(call, reads, report, quantize, hidden_states if dq is not None else None)
        if observe_after:
            self._observe_down(dq, seen, reads)
        return out

    def _follow(
        self,
        call: Callable[[], Tensor],
        reads: dict[str, Tensor],
        report: Callable[[str, int, Tensor], None],
        transform: dict[str, Callable[[Tensor], Tensor]],
        check: Tensor | None,
    ) -> Tensor:
        """``call()`` in the experts' eager loop, with the inputs of their products reported and transformed."""
        mode = _BankReads(reads, report, transform)
        with _eager(self.layer), mode:
            out = call()
        if check is not None and "down_proj" not in mode.read and check.numel() > 0:
            raise RuntimeError(
                f"QExperts[{type(self.layer).__name__}]: down_input_quantizer is set, but the experts' forward "
                "does not multiply by down_proj[e] (F.linear, @, torch.matmul) or by the whole bank (torch.bmm), "
                "so its input cannot be quantized; set down_input_quantizer = None"
            )
        return out

    def _observe_down(self, dq: Quantizer, seen: list[Tensor], reads: dict[str, Tensor]) -> None:
        width = reads["down_proj"].shape[1 if self.transposed else 2]
        x = torch.cat(seen) if seen else reads["down_proj"].new_zeros(0, width)
        _run_quantizer(dq, x, True, False)

    def extra_repr(self) -> str:
        return f"banks={self.banks}, transposed={self.transposed}, qstate={self.qstate.name}"


# How an expert's product reads its weight: F.linear(x, w) or x @ w with w = bank[e] (after
# casts or transposes), or one batched product over the whole bank (Llama 4's (E, T, in) @ (E, in, out)).
_LINEAR = frozenset({F.linear})
_MATMUL = frozenset({torch.matmul, Tensor.matmul, Tensor.__matmul__})
_BMM = frozenset({torch.bmm, Tensor.bmm})
_GETITEM = Tensor.__getitem__


class _BankReads(TorchFunctionMode):
    """Sees every operation of one call of an experts module and finds the input of each product
    with a bank: ``F.linear``/``@``/``torch.matmul`` with one expert's slice ``bank[e]``, or
    ``torch.bmm`` with the whole bank (``(E, T, in) @ (E, in, out)``).

    ``transform[bank](x)`` replaces the input of the products with ``bank`` (quantizes it), then
    ``report(bank, expert, x)`` sees each expert's input ``x`` ``(..., in)`` as the product reads it.
    A slice ``bank[e]`` is tagged with its expert; tensors made from a tagged one alone with the
    same number of elements (casts, transposes, views) keep the tag. :attr:`read` holds the banks
    whose products were found."""

    def __init__(
        self,
        banks: dict[str, Tensor],
        report: Callable[[str, int, Tensor], None] | None = None,
        transform: dict[str, Callable[[Tensor], Tensor]] | None = None,
    ) -> None:
        super().__init__()
        self.report = report
        self.transform = transform or {}
        self.read: set[str] = set()  # the banks whose products were found
        # id -> (tensor, bank, expert or None for the whole bank); the tensor is held so its id stays unique
        self.tags: dict[int, tuple[Tensor, str, int | None]] = {id(t): (t, b, None) for b, t in banks.items()}

    def _tag(self, t: Any) -> tuple[str, int | None] | None:
        found = self.tags.get(id(t)) if isinstance(t, Tensor) else None
        return None if found is None or found[0] is not t else found[1:]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        whole = func in _BMM
        if args and (whole or func in _LINEAR or func in _MATMUL):
            key = "mat2" if whole else "weight" if func in _LINEAR else "other"
            tag = self._tag(args[1] if len(args) > 1 else kwargs.get(key))
            if tag is not None and (tag[1] is None) == whole:
                bank, expert = tag
                x = args[0]
                fn = self.transform.get(bank)
                if fn is not None:
                    x = fn(x)
                    args = (x, *args[1:])
                self.read.add(bank)
                if self.report is not None:
                    for e, rows in enumerate(x.unbind(0)) if whole else [(expert, x)]:
                        self.report(bank, e, rows)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if not args or not isinstance(out, Tensor):
            return out
        tag = self._tag(args[0])
        if tag is None:
            return out
        bank, expert = tag
        if func is _GETITEM and expert is None:
            e = _expert_index(args[1] if len(args) > 1 else None)
            if e is not None:
                self.tags[id(out)] = (out, bank, e)
        elif expert is not None and out.numel() == args[0].numel() and out is not args[0]:
            self.tags[id(out)] = (out, bank, expert)
        return out


def _expert_index(idx: Any) -> int | None:
    """``e`` when ``bank[idx]`` is one expert's matrix: a Python int or a 0-d integer tensor."""
    if isinstance(idx, int) and not isinstance(idx, bool):
        return idx
    if isinstance(idx, Tensor) and idx.dim() == 0 and not idx.is_floating_point() and idx.dtype != torch.bool:
        return int(idx)
    return None


@contextlib.contextmanager
def _eager(layer: nn.Module) -> Iterator[None]:
    """transformers' experts run their own (eager) forward, a loop over the experts, while active:
    the batched and grouped implementations read the banks in ways :class:`_RoutedInputs` cannot follow."""
    config = getattr(layer, "config", None)
    key = "_experts_implementation_internal"
    if config is None or getattr(config, key, None) in (None, "eager"):
        yield
        return
    old = getattr(config, key)
    setattr(config, key, "eager")  # the plain attribute: the property's setter would recurse into sub-configs
    try:
        yield
    finally:
        setattr(config, key, old)


@contextlib.contextmanager
def expert_inputs(
    qe: QExperts, report: Callable[[str, int, Tensor], None], banks: Sequence[str] | None = None
) -> Iterator[None]:
    """While active, each call of ``qe`` reports what every expert's product reads.

    ``report(bank, expert, x)`` gets the input rows ``x`` ``(..., in)`` of expert ``expert``'s
    product with the bank parameter ``bank``: the hidden states routed to that expert for the
    first bank, the gated intermediate for ``down_proj``, as the experts' own forward computes
    them (transformers' experts run their eager loop meanwhile). The inputs are found by
    following the forward's tensor operations: a product (``F.linear``, ``@``, ``torch.matmul``)
    with ``bank[e]``, possibly cast or transposed, or a batched product ``torch.bmm`` over the
    whole bank. A forward that reads its banks otherwise reports nothing.

    Args:
        qe: the experts.
        report: called once per expert and product.
        banks: the bank parameters to report (all by default).

    Example:
        >>> class Experts(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.up_proj = nn.Parameter(torch.randn(2, 6, 4))
        ...         self.down_proj = nn.Parameter(torch.randn(2, 4, 6))
        ...     def forward(self, x, expert):
        ...         return F.linear(F.linear(x, self.up_proj[expert]).relu(), self.down_proj[expert])
        >>> seen = []
        >>> q = QExperts(Experts())
        >>> with expert_inputs(q, lambda bank, e, x: seen.append((bank, e, tuple(x.shape)))):
        ...     _ = q(torch.randn(3, 4), 1)
        >>> seen
        [('up_proj', 1, (3, 4)), ('down_proj', 1, (3, 6))]
    """
    wanted = list(qe.banks if banks is None else banks)
    unknown = sorted(set(wanted) - set(qe.banks))
    if unknown:
        raise ValueError(f"expert_inputs: {type(qe.layer).__name__} has no bank {unknown}; its banks: {qe.banks}")
    prev = qe._listener

    def listener(bank: str, e: int, x: Tensor) -> None:
        if bank in wanted:
            report(bank, e, x)
        if prev is not None:
            prev(bank, e, x)

    qe._listener = listener
    try:
        yield
    finally:
        qe._listener = prev
