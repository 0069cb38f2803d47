"""Quantizers: ``nn.Module`` s that hold a quantization scheme's state and call a primitive.

A quantizer is driven by its owner (:class:`~torchquant.qmodules.QWrapper`,
:class:`~torchquant.qmodules.QOp`) through three calls, chosen by the owner's
:class:`~torchquant.qmodules.QModuleState`:

* :meth:`Quantizer.pre_observe` sees the float tensor before quantization
  (range observation, initialisation of learned parameters);
* :meth:`Quantizer.quantize` returns the fake-quantized tensor (``forward`` is
  ``quantize``);
* :meth:`Quantizer.post_observe` sees the quantized tensor afterwards.

A new quantizer is a small subclass. For example, a sign quantizer::

    class SignQuantizer(Quantizer):
        def pre_observe(self, x):
            pass

        def quantize(self, x):
            return x + (torch.sign(x) - x).detach()  # sign forward, identity gradient

        def post_observe(self, x):
            pass

A quantizer whose parameters are trained with the task loss (a learned step,
clipping level or offset) subclasses :class:`LearnedQuantizer`, which creates the
parameters, initialises them from the first tensor it sees and loads them from a
state dict.

Quantizers whose outputs lie on an affine integer grid describe it through
:meth:`Quantizer.grid`, which export and integer extraction use without knowing
the class; :meth:`AffineGrid.check` says when a grid does not fit the tensor.
Non-uniform quantizers whose outputs lie on a finite set of levels (NF4, APoT, a
codebook of one's own) describe it through :meth:`Quantizer.levels`, a
:class:`LevelGrid` (ascending levels times a scale, with nearest-level codes, the two
neighbouring levels and dequantization); AdaRound and ONNX export use it the same way.
Quantizers that round to a floating-point format (FP8, FP4, OCP MX) describe it through
:meth:`Quantizer.float_grid`, a :class:`FloatGrid` (the format, its scales, or MX's block
scales computed from the input); ONNX export stores FP8 as ONNX's float8 types with it.

Every quantizer is importable from here; each family lives in one module, and
every class is registered by name (``tq.make_quantizer("lsq", 4)``):

* :mod:`~torchquant.quantizers.base`: :class:`Quantizer`, :class:`RangeQuantizer`,
  :class:`LearnedQuantizer`, :class:`StatelessQuantizer`, :class:`AffineGrid`,
  :class:`LevelGrid`, :class:`FloatGrid`, :func:`check_n_bits`;
* :mod:`~torchquant.quantizers.formats`: :class:`MinifloatFormat` and the OCP formats
  :data:`FORMATS`;
* :mod:`~torchquant.quantizers.affine`: ``affine``, ``qfmt``
  (:class:`AffineQuantizer`, :class:`QfmtQuantizer`);
* :mod:`~torchquant.quantizers.learned`: ``lsq``, ``lsq+``, ``pact``
  (:class:`LSQQuantizer`, :class:`LSQPlusQuantizer`, :class:`PACTQuantizer`);
* :mod:`~torchquant.quantizers.dorefa`: ``dorefa_weight``, ``dorefa_act``
  (:class:`DoReFaWeightQuantizer`, :class:`DoReFaActQuantizer`);
* :mod:`~torchquant.quantizers.binary`: ``bnn``, ``xnor``, ``twn``
  (:class:`BinaryQuantizer`, :class:`XNORWeightQuantizer`, :class:`TernaryQuantizer`);
* :mod:`~torchquant.quantizers.minifloat`: ``minifloat``, ``fp8_e4m3``, ``fp8_e5m2``,
  ``fp6_e3m2``, ``fp6_e2m3``, ``fp4_e2m1``, ``mx``, ``mxfp8_*``, ``mxfp6_*``, ``mxfp4``,
  ``mxint8`` (:class:`MinifloatQuantizer`, :class:`MXQuantizer`);
* :mod:`~torchquant.quantizers.levels`: ``nf4``, ``apot`` (:class:`NF4Quantizer`,
  :class:`APoTQuantizer`; the level sets :func:`nf4_levels`, :func:`apot_levels`);
* :mod:`~torchquant.quantizers.adaround`: ``adaround`` (:class:`AdaRoundQuantizer`, on an
  affine grid or on levels);
* :mod:`~torchquant.quantizers.dynamic`: ``dynamic_affine``, ``dynamic_affine_residual``
  (:class:`DynamicAffineQuantizer`, :class:`ResidualGroupQuantizer`).

A new quantizer is one class in the module of its family (or a new module
here), registered with :func:`~torchquant.registry.register_quantizer`; the
registry contract tests then check it without a test of its own.
"""

from .adaround import AdaRoundQuantizer
from .affine import AffineQuantizer, QfmtQuantizer
from .base import (
    AffineGrid,
    FloatGrid,
    LearnedQuantizer,
    LevelGrid,
    Quantizer,
    RangeQuantizer,
    StatelessQuantizer,
    check_n_bits,
)
from .binary import BinaryQuantizer, TernaryQuantizer, XNORWeightQuantizer
from .dorefa import DoReFaActQuantizer, DoReFaWeightQuantizer
from .dynamic import DynamicAffineQuantizer, ResidualGroupQuantizer
from .formats import FORMATS, MinifloatFormat
from .learned import LSQPlusQuantizer, LSQQuantizer, PACTQuantizer, pact_regularization
from .levels import APoTQuantizer, NF4Quantizer, apot_levels, nf4_levels
from .minifloat import MinifloatQuantizer, MXQuantizer

__all__ = [
    "FORMATS",
    "APoTQuantizer",
    "AdaRoundQuantizer",
    "AffineGrid",
    "AffineQuantizer",
    "BinaryQuantizer",
    "DoReFaActQuantizer",
    "DoReFaWeightQuantizer",
    "DynamicAffineQuantizer",
    "FloatGrid",
    "LSQPlusQuantizer",
    "LSQQuantizer",
    "LearnedQuantizer",
    "LevelGrid",
    "MXQuantizer",
    "MinifloatFormat",
    "MinifloatQuantizer",
    "NF4Quantizer",
    "PACTQuantizer",
    "QfmtQuantizer",
    "Quantizer",
    "RangeQuantizer",
    "ResidualGroupQuantizer",
    "StatelessQuantizer",
    "TernaryQuantizer",
    "XNORWeightQuantizer",
    "apot_levels",
    "check_n_bits",
    "nf4_levels",
    "pact_regularization",
]
