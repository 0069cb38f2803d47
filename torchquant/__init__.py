"""torchquant: a quantization development kit for researchers on PyTorch.

The public names of the core modules are re-exported here::

    import torchquant as tq
    q = tq.AffineQuantizer(8, tq.ExpAvgMinMax())
"""

from . import ptq, quantizers_functional, registry
from .convert import quantize_model
from .factories import call_factory
from .folding import bn_scale_shift, fold_bn_params
from .granularity import PER_TENSOR, Granularity, per_channel, per_group
from .ptq import calibrate
from .qmodules import SUPPORTED_ACTIVATIONS, QModule, QModuleState, QOp, QWrapper, iter_qmodules
from .quantizers import AffineGrid, AffineQuantizer, QfmtQuantizer, Quantizer, RangeQuantizer
from .quantizers_functional import affine_quantize, gradient_clip, qfmt_quantize, round_ste
from .range_observers import BatchMinMax, ExpAvgMinMax, RangeObserver, RunningMinMax
from .registry import (
    list_observers,
    list_quantizers,
    make_observer,
    make_quantizer,
    register_observer,
    register_quantizer,
)
from .utils import get_qmodule_states, qmodule_state, set_qmodule_state

__version__ = "0.1.0"

__all__ = [
    "PER_TENSOR",
    "SUPPORTED_ACTIVATIONS",
    "AffineGrid",
    "AffineQuantizer",
    "BatchMinMax",
    "ExpAvgMinMax",
    "Granularity",
    "QModule",
    "QModuleState",
    "QOp",
    "QWrapper",
    "QfmtQuantizer",
    "Quantizer",
    "RangeObserver",
    "RangeQuantizer",
    "RunningMinMax",
    "affine_quantize",
    "bn_scale_shift",
    "calibrate",
    "call_factory",
    "fold_bn_params",
    "get_qmodule_states",
    "gradient_clip",
    "iter_qmodules",
    "list_observers",
    "list_quantizers",
    "make_observer",
    "make_quantizer",
    "per_channel",
    "per_group",
    "ptq",
    "qfmt_quantize",
    "qmodule_state",
    "quantize_model",
    "quantizers_functional",
    "register_observer",
    "register_quantizer",
    "registry",
    "round_ste",
    "set_qmodule_state",
]
