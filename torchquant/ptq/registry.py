"""The registry of post-training algorithms, by name.

Recipes (``algorithm = "adaround"``), the ``torchquant`` command and the PTQ
benchmark look algorithms up here instead of listing them. An algorithm joins
with a decorator on its entry point, in its own module of ``torchquant/ptq/``::

    @register_ptq_algorithm("my-rounding")
    def my_rounding(model, data, *, iters=100, seed=0, progress=True):
        ...

    get_ptq_algorithm("my-rounding")(q, calib_batches, iters=50)
    list_ptq_algorithms()          # [..., "my-rounding", ...]

Every entry is called as ``fn(model, data, **options)`` on a quantizable model
(from ``quantize_model``), with ``data`` a list of calibration batches. Names
and aliases are case-insensitive; an unknown name raises ``KeyError`` listing
the valid ones. ``tests/test_ptq_registry.py`` runs every entry through the same
contract checks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from ..registry import Registry

__all__ = [
    "MODEL_KINDS",
    "PTQ_ALGORITHMS",
    "PTQAlgorithm",
    "get_ptq_algorithm",
    "list_ptq_algorithms",
    "register_ptq_algorithm",
]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class PTQAlgorithm:
    """A registered post-training algorithm.

    Attributes:
        name: the registered name (also how recipes refer to it).
        fn: the entry point, ``fn(model, data, **options)``.
        options: the keyword options ``fn`` accepts; callers that hold a common set of
            options (iterations, seed, progress) pass each algorithm the ones it takes.
        before_calibration: the algorithm changes weights or BatchNorm in a way that
            makes earlier ranges stale (cross-layer equalization), so it runs on the
            uncalibrated model and calibration follows it; otherwise it needs a
            calibrated model and runs after calibration.
        aliases: other names it is found under (``"bc"`` for ``"bias_correction"``).
        description: one line, from the entry point's docstring.
        model_kind: the models it applies to: ``"any"`` quantizable model, or one of
            :data:`MODEL_KINDS` for an algorithm tied to an architecture (``"causal_lm"``:
            a Hugging Face Llama-layout causal LM). The contract tests run each entry on a
            model of its kind.
    """

    name: str
    fn: Callable[..., Any]
    options: frozenset[str]
    before_calibration: bool = False
    aliases: tuple[str, ...] = ()
    description: str = ""
    model_kind: str = "any"

    def __call__(self, model: nn.Module, data: list, **options: Any) -> Any:
        """Run the algorithm: ``fn(model, data, **options)``."""
        return self.fn(model, data, **options)

    def accepted(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The subset of ``options`` this algorithm takes."""
        return {k: v for k, v in options.items() if k in self.options}


PTQ_ALGORITHMS = Registry("PTQ algorithm")

MODEL_KINDS = ("any", "causal_lm")
"""The values of :attr:`PTQAlgorithm.model_kind`."""


def _keyword_options(fn: Callable[..., Any]) -> frozenset[str]:
    """Names of ``fn``'s parameters after ``(model, data)`` that can be passed by keyword."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in kinds)


def register_ptq_algorithm(
    name: str,
    *,
    options: Iterable[str] | None = None,
    before_calibration: bool = False,
    aliases: Iterable[str] = (),
    model_kind: str = "any",
    overwrite: bool = False,
) -> Callable[[F], F]:
    """Function decorator: register a post-training algorithm ``fn(model, data, **options)`` as ``name``.

    Args:
        name: the registered name.
        options: the keyword options ``fn`` accepts; by default read from its signature
            (give them when ``fn`` takes ``**kwargs``).
        before_calibration: see :class:`PTQAlgorithm`.
        aliases: other names for the same entry.
        model_kind: see :class:`PTQAlgorithm`.
        overwrite: replace an entry of the same name.

    Returns:
        The decorator, which returns ``fn`` unchanged.

    Raises:
        ValueError: a ``model_kind`` not in :data:`MODEL_KINDS`.
    """
    if model_kind not in MODEL_KINDS:
        raise ValueError(
            f"register_ptq_algorithm({name!r}): model_kind must be one of {MODEL_KINDS}, got {model_kind!r}"
        )

    def deco(fn: F) -> F:
        entry = PTQAlgorithm(
            name=name.lower(),
            fn=fn,
            options=frozenset(options) if options is not None else _keyword_options(fn),
            before_calibration=before_calibration,
            aliases=tuple(a.lower() for a in aliases),
            description=(inspect.getdoc(fn) or "").split("\n")[0],
            model_kind=model_kind,
        )
        for key in (name, *aliases):
            PTQ_ALGORITHMS.register(key, overwrite=overwrite)(entry)
        return fn

    return deco


def get_ptq_algorithm(name: str) -> PTQAlgorithm:
    """The algorithm registered as ``name`` (or an alias); ``KeyError`` listing the valid names otherwise."""
    return PTQ_ALGORITHMS.get(name)


def list_ptq_algorithms() -> list[str]:
    """Registered names of all algorithms (aliases left out)."""
    return sorted({PTQ_ALGORITHMS.get(n).name for n in PTQ_ALGORITHMS.names()})
