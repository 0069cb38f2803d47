"""Modules that pass a wrapped layer's weight to ``F.linear`` instead of calling the layer.

torchvision's Swin attention (``ShiftedWindowAttention``, ``ShiftedWindowAttentionV2``)
computes ``F.linear(x, self.qkv.weight, qkv_bias)`` and ``F.linear(x, self.proj.weight, ...)``
inside one function (``shifted_window_attention``, a leaf for torch.fx). Wrapping ``qkv``
and ``proj`` in :class:`~torchquant.qmodules.QWrapper` s alone changes nothing: the wrappers
are never called and both layers compute in float.

:func:`redirect_weight_reads` makes such a module's own forward run with its wrapped
``nn.Linear`` children quantized. While the module runs, a torch function mode sends every
``F.linear`` call whose weight *is* a wrapped layer's weight parameter to that wrapper, with
the input and the bias of the call (Swin V2 passes a copy of the bias with the keys' part
zeroed). No modelling code is copied, the state-dict keys do not change, and the wrappers'
forward hooks (calibration, GPTQ's and AdaRound's input collection) see the calls, in every
mode: ``BYPASSED``, a wrapper computes ``F.linear`` with the same arguments, bit-identical.

With ``example_inputs``, ``quantize_model(method="fx")`` traces such a module instead, into the
functions that the modules defining its class and its bases mark with ``torch.fx.wrap``: the
weight reads become layers and the attention's own operations ``QOp`` s
(:mod:`torchquant.graph.concrete`).

:func:`torchquant.quantize_model` applies this to the exact types in :data:`WEIGHT_READERS`
and those given to :func:`register_weight_reader`, with either method, and to those in
:data:`SWAP_WEIGHT_READERS` (timm's EVA, BEiT and Swin V2 attention) with ``method="swap"`` (so :func:`torchquant.load`,
which replays the conversion, does too).
"""

from __future__ import annotations

from torch import nn

from ..weight_reads import redirect_weight_reads

__all__ = [
    "SWAP_WEIGHT_READERS",
    "WEIGHT_READERS",
    "is_weight_reader",
    "redirect_weight_reads",
    "register_weight_reader",
]

WEIGHT_READERS: frozenset[str] = frozenset(
    {
        "torchvision.models.swin_transformer.ShiftedWindowAttention",
        "torchvision.models.swin_transformer.ShiftedWindowAttentionV2",
    }
)
"""Qualified names of the module types that pass their ``nn.Linear`` children's weights to
``F.linear``; ``quantize_model`` redirects those reads to the children's wrappers."""


SWAP_WEIGHT_READERS: frozenset[str] = frozenset(
    {
        "timm.models.eva.EvaAttention",
        "timm.models.beit.Attention",
        "timm.models.swin_transformer_v2.WindowAttention",
    }
)
"""Qualified names of the module types whose ``F.linear(x, self.qkv.weight, bias)`` calls torch.fx sees
(``method="fx"`` wraps them as functional layers, the attention's own operations quantized around them);
only ``method="swap"`` redirects their reads."""

_REGISTERED: set[type[nn.Module]] = set()


def register_weight_reader(cls: type[nn.Module]) -> type[nn.Module]:
    """Have :func:`torchquant.quantize_model` redirect the weight reads of modules of exactly this type.

    For a module of your own whose forward passes ``self.<child>.weight`` to ``F.linear``. Register
    before converting, and before :func:`torchquant.load` replays a conversion in another process
    (as for a registered quantizer). Usable as a class decorator.

    Raises:
        TypeError: ``cls`` is not an ``nn.Module`` subclass.

    Example:
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> from torchquant.graph.readers import is_weight_reader, register_weight_reader
        >>> @register_weight_reader
        ... class Reads(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return F.linear(x, self.fc.weight, self.fc.bias)
        >>> is_weight_reader(Reads())
        True
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_weight_reader: expected an nn.Module subclass, got {cls!r}")
    _REGISTERED.add(cls)
    return cls


def is_weight_reader(module: nn.Module, traced: bool = False) -> bool:
    """Whether ``module``'s exact type is in :data:`WEIGHT_READERS` or registered (:func:`register_weight_reader`),
    or, unless ``traced`` (the fx method asks), in :data:`SWAP_WEIGHT_READERS`."""
    cls = type(module)
    name = f"{cls.__module__}.{cls.__qualname__}"
    return cls in _REGISTERED or name in WEIGHT_READERS or (not traced and name in SWAP_WEIGHT_READERS)
