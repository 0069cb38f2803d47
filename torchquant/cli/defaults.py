"""The default grid of ``torchquant bench`` and ``make demo``: defined here, and only here.

``tests/test_cli_bench.py`` checks that every default recipe is available, so a
name whose method is missing fails the tests rather than the demo.
"""

from __future__ import annotations

__all__ = ["DEFAULT_BITS", "DEFAULT_DATASET", "DEFAULT_RECIPES", "FLOAT_TRAINING"]

DEFAULT_DATASET = "digits"
DEFAULT_RECIPES: tuple[str, ...] = ("ptq-minmax", "ptq-adaround", "qat-minmax", "qat-lsq")
DEFAULT_BITS: tuple[str, ...] = ("w8a8", "w4a8", "w4a4", "w2a2")

# Float training of the baseline per dataset: (epochs, peak learning rate); others need --epochs.
FLOAT_TRAINING: dict[str, tuple[int, float]] = {"digits": (15, 0.05), "mnist1d": (30, 0.05)}
