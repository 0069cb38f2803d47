"""The research quantizers by one more import path: ``from torchquant.baselines import LSQQuantizer``.

They live in :mod:`torchquant.quantizers`, one module per family
(:mod:`~torchquant.quantizers.learned`: LSQ, LSQ+, PACT;
:mod:`~torchquant.quantizers.dorefa`; :mod:`~torchquant.quantizers.binary`:
BNN, XNOR, TWN; :mod:`~torchquant.quantizers.minifloat`: minifloat and MX), and
are also importable from :mod:`torchquant` and :mod:`torchquant.quantizers`;
this module re-exports the same objects.
"""

from .quantizers import (
    FORMATS,
    BinaryQuantizer,
    DoReFaActQuantizer,
    DoReFaWeightQuantizer,
    LSQPlusQuantizer,
    LSQQuantizer,
    MinifloatFormat,
    MinifloatQuantizer,
    MXQuantizer,
    PACTQuantizer,
    TernaryQuantizer,
    XNORWeightQuantizer,
    pact_regularization,
)

__all__ = [
    "FORMATS",
    "BinaryQuantizer",
    "DoReFaActQuantizer",
    "DoReFaWeightQuantizer",
    "LSQPlusQuantizer",
    "LSQQuantizer",
    "MXQuantizer",
    "MinifloatFormat",
    "MinifloatQuantizer",
    "PACTQuantizer",
    "TernaryQuantizer",
    "XNORWeightQuantizer",
    "pact_regularization",
]
