"""Sending a module's ``F.linear`` calls on its wrapped layers' weights to the wrappers.

The mechanism behind :mod:`torchquant.graph.readers` (which decides which modules get it):
a module whose forward passes ``self.<child>.weight`` to ``F.linear`` never calls the
child's :class:`~torchquant.qmodules.QWrapper`; :func:`redirect_weight_reads` makes it.
:func:`is_redirected` tells a tracer to keep such a module whole (traced, the reads become
plain attribute reads and the redirect is lost).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .qmodules import QWrapper

__all__ = ["is_redirected", "redirect_weight_reads"]


def _linear_args(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    x, w, b = (args[i] if i < len(args) else kwargs.get(k) for i, k in enumerate(("input", "weight", "bias")))
    return x, w, b


_RUNNING = threading.local()  # ids of the redirect-watched wrappers whose forward runs in this thread


def _running() -> set[int]:
    ids = getattr(_RUNNING, "ids", None)
    if ids is None:
        ids = _RUNNING.ids = set()
    return ids


def _wrapper_starts(wrapper: nn.Module, args: tuple) -> None:
    _running().add(id(wrapper))


def _wrapper_ends(wrapper: nn.Module, args: tuple, output: Any) -> None:
    _running().discard(id(wrapper))


def _watch(wrapper: QWrapper) -> None:
    """Hooks that tell the mode when ``wrapper``'s own forward runs (its F.linear on its own weight is no read)."""
    # Registered in place, never in copied hook dicts: a pass's hook handles (calibration's) must still
    # remove their hooks. A structural copy sharing these dicts gets the same harmless markers.
    if _wrapper_starts not in wrapper._forward_pre_hooks.values():
        wrapper.register_forward_pre_hook(_wrapper_starts)
        wrapper.register_forward_hook(_wrapper_ends, always_call=True)


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
            # the mode is off while this runs, so the wrapper's own F.linear is not sent here again; nor is
            # that of a wrapper the module calls as a module
            if wrapper is not None and w is wrapper._modules["layer"].weight and id(wrapper) not in _running():
                own = wrapper._modules["layer"].bias
                if b is own:  # a plain call, as when the module calls the layer
                    return wrapper(x)
                # no bias where the layer has one: a zero bias
                return wrapper(x, bias=b if b is not None else own.new_zeros(own.shape))
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
        self._local = threading.local()  # the modes entered, per thread (torch's mode stack is per thread)

    def _modes(self) -> list[_LinearReads | None]:
        modes = getattr(self._local, "modes", None)
        if modes is None:
            modes = self._local.modes = []
        return modes

    def enter(self, module: nn.Module, args: tuple) -> None:
        wrappers = _linear_wrappers(module)
        mode = None
        if wrappers:  # BYPASSED too: passes that collect a layer's float inputs hook its wrapper
            for w in wrappers.values():
                _watch(w)
            mode = _LinearReads(wrappers)
            mode.__enter__()
        self._modes().append(mode)

    def leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        modes = self._modes()
        mode = modes.pop() if modes else None
        if mode is not None:
            mode.__exit__(None, None, None)

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a copy taken during a forward starts outside it

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._local = threading.local()


def redirect_weight_reads(module: nn.Module) -> nn.Module:
    """Run ``module``'s forward with its wrapped ``nn.Linear`` children's weight reads sent to the wrappers.

    What ``quantize_model`` does to a weight reader's type; called by hand, it is not part of the
    conversion that :func:`torchquant.load` replays (use :func:`~torchquant.graph.readers.register_weight_reader`).
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
        >>> from torchquant.weight_reads import redirect_weight_reads
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
    if is_redirected(module):
        return module
    for attr in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_always_called"):
        setattr(module, attr, OrderedDict(getattr(module, attr)))
    redirect = _Redirect()
    module.register_forward_pre_hook(redirect.enter)
    module.register_forward_hook(redirect.leave, always_call=True)
    return module


def is_redirected(module: nn.Module) -> bool:
    """Whether :func:`redirect_weight_reads` was applied to ``module`` (keep it whole when tracing)."""
    return any(isinstance(getattr(h, "__self__", None), _Redirect) for h in module._forward_pre_hooks.values())
