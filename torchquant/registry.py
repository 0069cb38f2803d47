"""Registries of quantizers and range observers, by name.

Recipes and the command line refer to methods by string; a researcher's own
class joins with a decorator::

    @tq.register_quantizer("my-sign")
    class MySign(tq.Quantizer):
        ...

    q = tq.make_quantizer("my-sign")
    tq.list_quantizers()          # [..., "my-sign", ...]

Names are case-insensitive; an unknown name raises ``KeyError`` listing the
valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = [
    "OBSERVERS",
    "QUANTIZERS",
    "Registry",
    "list_observers",
    "list_quantizers",
    "make_observer",
    "make_quantizer",
    "register_observer",
    "register_quantizer",
]

T = TypeVar("T", bound=type)


class Registry:
    """A name -> class (or factory function) table filled by a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., nn.Module]] = {}

    def register(self, name: str, *, overwrite: bool = False) -> Callable[[T], T]:
        key = name.lower()

        def deco(obj: T) -> T:
            if key in self._entries and self._entries[key] is not obj and not overwrite:
                raise ValueError(f"a {self.kind} named {name!r} is already registered ({self._entries[key]!r})")
            self._entries[key] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., nn.Module]:
        try:
            return self._entries[name.lower()]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}") from None

    def make(self, name: str, *args: Any, **kwargs: Any) -> nn.Module:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._entries


QUANTIZERS = Registry("quantizer")
OBSERVERS = Registry("range observer")


def register_quantizer(name: str, *, overwrite: bool = False) -> Callable[[T], T]:
    """Class decorator: make a quantizer available as ``make_quantizer(name, ...)``."""
    return QUANTIZERS.register(name, overwrite=overwrite)


def register_observer(name: str, *, overwrite: bool = False) -> Callable[[T], T]:
    """Class decorator: make a range observer available as ``make_observer(name, ...)``."""
    return OBSERVERS.register(name, overwrite=overwrite)


def make_quantizer(name: str, *args: Any, **kwargs: Any) -> nn.Module:
    """Build a registered quantizer: ``make_quantizer("affine", n_bits=8, range_observer=...)``."""
    return QUANTIZERS.make(name, *args, **kwargs)


def make_observer(name: str, *args: Any, **kwargs: Any) -> nn.Module:
    """Build a registered range observer: ``make_observer("ema", momentum=0.9, axis=0)``."""
    return OBSERVERS.make(name, *args, **kwargs)


def list_quantizers() -> list[str]:
    return QUANTIZERS.names()


def list_observers() -> list[str]:
    return OBSERVERS.names()
