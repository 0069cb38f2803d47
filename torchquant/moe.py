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

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .qmodules import QModule, QModuleState, _LayerAttributes, _run_quantizer
from .quantizers import Quantizer

__all__ = ["QExperts", "expert_banks"]

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
    """The inverse of :func:`_rows`."""
    bank = rows.reshape(experts, -1, rows.shape[-1])
    return bank.transpose(1, 2) if transposed else bank


class QExperts(_LayerAttributes, QModule):
    """A transformers expert bank whose weight banks and input are quantized.

    Holds the experts module as ``.layer`` and calls it with its banks replaced by their
    quantized values (``torch.func.functional_call``), so whichever implementation the
    model's config selects runs unchanged. Each weight quantizer sees its bank as an
    ``(E * out, in)`` matrix, one row per output channel of each expert, the layout of a
    ``Linear``'s weight: ``axis=0`` is one range per (expert, output channel), ``axis=1``
    with a group size groups along the input. ``input_quantizer`` quantizes the hidden
    states ``(T, H)`` the experts receive, the input of every expert's first product (one
    range shared by the experts). The product between the two banks and the biases of
    experts that have them stay float. In ``BYPASSED`` the module runs itself.

    Args:
        layer: the experts module (see :func:`expert_banks`).
        weight_quantizers: ``{bank parameter: quantizer or None}``, e.g.
            ``{"gate_up_proj": q1, "down_proj": q2}``; banks left out are not quantized.
        input_quantizer: quantizer for the hidden states, or ``None``.

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
        for q in (*weight_quantizers.values(), input_quantizer):
            if q is not None and not isinstance(q, Quantizer):
                raise TypeError(f"QExperts: quantizers must be Quantizer instances or None, got {type(q).__name__}")
        self.layer = layer
        self.banks = banks
        self.transposed = _transposed(layer, banks)
        # registered even while None: forward reads them from _modules
        for bank in banks:
            self.register_module(f"{_ROLES[bank]}_quantizer", weight_quantizers.get(bank))
        self.register_module("input_quantizer", input_quantizer)
        self._name_quantizers("QExperts")

    def bank_quantizer(self, bank: str) -> Quantizer | None:
        """The quantizer of the bank parameter ``bank`` (``"gate_up_proj"``, ``"up_proj"`` or ``"down_proj"``)."""
        return self._modules.get(f"{_ROLES[bank]}_quantizer")

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
            return self.layer(hidden_states, *args, **kwargs)
        experts = self.layer._parameters[self.banks[0]].shape[0]
        banks = {}
        for bank, q, rows in self._weights():
            w = _run_quantizer(q, rows, s.is_weight_observed, s.is_weight_quantized)
            if s.is_weight_quantized:
                banks[bank] = _bank(w, experts, self.transposed)
        iq = self._modules["input_quantizer"]
        if iq is not None:
            hidden_states = _run_quantizer(iq, hidden_states, s.is_act_observed, s.is_act_quantized)
        if not banks:
            return self.layer(hidden_states, *args, **kwargs)
        return torch.func.functional_call(self.layer, banks, (hidden_states, *args), kwargs, strict=False)

    def extra_repr(self) -> str:
        return f"banks={self.banks}, transposed={self.transposed}, qstate={self.qstate.name}"
