"""Quantizer factories: how converters ask the user for a quantizer per layer.

A factory is a callable that receives the module being wrapped and its
qualified name in the model, and returns a :class:`~torchquant.quantizers.Quantizer`
or ``None`` (leave that side in float). The seed README's one-argument form
``lambda module: ...`` is accepted too::

    def weights(module, name):
        bits = 8 if name in ("conv1", "fc") else 4
        return tq.AffineQuantizer(bits, tq.BatchMinMax(axis=0))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from .quantizers import Quantizer

__all__ = ["QuantizerFactory", "call_factory"]

QuantizerFactory = Callable[..., "Quantizer | None"]
"""``(module, name) -> Quantizer | None``, or ``(module) -> Quantizer | None``."""


def _n_positional(fn: Callable) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 2
    n = 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return 2
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


def call_factory(
    factory: QuantizerFactory | None, module: nn.Module, name: str, role: str = "quantizer"
) -> Quantizer | None:
    """Call ``factory(module, name)`` (or ``factory(module)``) and check what comes back.

    Raises:
        TypeError: the factory is not callable (a Quantizer *instance* given where a
            factory is expected is the usual mistake: one instance cannot serve
            several layers), or it returned something other than a Quantizer or None.
    """
    if factory is None:
        return None
    if isinstance(factory, nn.Module) or not callable(factory):
        raise TypeError(
            f"{role} for {name or type(module).__name__!r} must be a factory (module, name) -> Quantizer, "
            f"got {type(factory).__name__}; wrap it, e.g. lambda module, name: AffineQuantizer(8, BatchMinMax())"
        )
    q = factory(module, name) if _n_positional(factory) >= 2 else factory(module)
    if q is not None and not isinstance(q, Quantizer):
        raise TypeError(f"{role} factory returned {type(q).__name__} for {name!r}; expected a Quantizer or None")
    return q
