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

:func:`torchquant.quantize_model` applies this to the exact types in :data:`WEIGHT_READERS`
and those given to :func:`register_weight_reader`, with either method (so :func:`torchquant.load`,
which replays the conversion, does too).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..qmodules import QWrapper

__all__ = ["WEIGHT_READERS", "is_weight_reader", "redirect_weight_reads", "register_weight_reader"]

WEIGHT_READERS: frozenset[str] = frozenset(
    {
        "torchvision.models.swin_transformer.ShiftedWindowAttention",
        "torchvision.models.swin_transformer.ShiftedWindowAttentionV2",
    }
)
"""Qualified names of the module types that pass their ``nn.Linear`` children's weights to
``F.linear``; ``quantize_model`` redirects those reads to the children's wrappers."""


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


def is_weight_reader(module: nn.Module) -> bool:
    """Whether ``module``'s exact type is in :data:`WEIGHT_READERS` or registered (:func:`register_weight_reader`)."""
    cls = type(module)
    return cls in _REGISTERED or f"{cls.__module__}.{cls.__qualname__}" in WEIGHT_READERS


def _linear_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    named = ("input", "weight", "bias")
    values = [args[i] if i < len(args) else kwargs.get(k) for i, k in enumerate(named)]
    return values[0], values[1], values[2]


class _LinearReads(TorchFunctionMode):
    """Sends ``F.linear(x, w, b)`` with ``w`` a wrapped layer's weight to ``wrapper(x, bias=b)``."""

    def __init__(self, wrappers: dict[int, QWrapper]) -> None:
        super().__init__()
        self.wrappers = wrappers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w, b = _linear_args(args, kwargs)
            wrapper = self.wrappers.get(id(w))
            # the mode is off while this runs, so the wrapper's own F.linear is not sent here again
            if wrapper is not None and w is wrapper._modules["layer"].weight:
                return wrapper(x, bias=b)
        return func(*args, **kwargs)


def _linear_wrappers(module: nn.Module) -> dict[int, QWrapper]:
    return {
        id(c._modules["layer"].weight): c
        for c in module._modules.values()
        if isinstance(c, QWrapper) and type(c._modules["layer"]) is nn.Linear and not c.fold_bn
    }


class _Redirect:
    """The pre-hook and always-called forward hook that enter and leave the mode around the module's forward."""

    def __init__(self) -> None:
        self._modes: list[_LinearReads | None] = []

    def enter(self, module: nn.Module, args: tuple) -> None:
        wrappers = _linear_wrappers(module)
        mode = None
        if wrappers:  # BYPASSED too: passes that collect a layer's float inputs hook its wrapper
            mode = _LinearReads(wrappers)
            mode.__enter__()
        self._modes.append(mode)

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        mode = self._modes.pop() if self._modes else None
        if mode is not None:
            mode.__exit__(None, None, None)

    def __getstate__(self) -> dict[str, Any]:
        return {"_modes": []}  # a copy taken during a forward starts outside it


def redirect_weight_reads(module: nn.Module) -> nn.Module:
    """Run ``module``'s forward with its wrapped ``nn.Linear`` children's weight reads sent to the wrappers.

    What ``quantize_model`` does to a weight reader's type; called by hand, it is not part of the
    conversion that :func:`torchquant.load` replays (use :func:`register_weight_reader`).
    Idempotent. ``module``'s hook dictionaries are replaced by copies first, so a structural copy
    that shares them with the float model (:func:`~torchquant.graph.common.structural_copy`) does
    not redirect the float model too.

    Args:
        module: a module whose forward passes ``self.<child>.weight`` to ``F.linear``, its
            ``nn.Linear`` children already wrapped in :class:`~torchquant.qmodules.QWrapper` s
            (without BatchNorm folding).

    Returns:
        ``module``, with a forward pre-hook and an always-called forward hook.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch import nn
        >>> import torchquant as tq
        >>> from torchquant.graph.readers import redirect_weight_reads
        >>> class Reads(nn.Module):  # calls F.linear with its layer's weight, never the layer
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return F.linear(x, self.fc.weight, self.fc.bias)
        >>> m = Reads()
        >>> m.fc = tq.QWrapper(m.fc, tq.AffineQuantizer(4, tq.BatchMinMax()))
        >>> m = redirect_weight_reads(m)
        >>> m.fc.observe_weight()  # weight ranges need no data
        >>> m.fc.qstate = tq.QModuleState.QUANT_EVAL_WEIGHT_ONLY
        >>> x = torch.randn(2, 4)
        >>> torch.equal(m(x), F.linear(x, m.fc.quantized_weight(), m.fc.bias))
        True
    """
    if any(isinstance(getattr(h, "__self__", None), _Redirect) for h in module._forward_pre_hooks.values()):
        return module
    for attr in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_always_called"):
        setattr(module, attr, OrderedDict(getattr(module, attr)))
    redirect = _Redirect()
    module.register_forward_pre_hook(redirect.enter)
    module.register_forward_hook(redirect.leave, always_call=True)
    return module
