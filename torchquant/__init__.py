"""torchquant: a quantization development kit for researchers on PyTorch.

The public names of the core modules are re-exported here::

    import torchquant as tq
    q = tq.AffineQuantizer(8, tq.ExpAvgMinMax())
"""

from . import baselines, distributed, ptq, quantizers_functional, registry, spec
from .convert import FloatLayersWarning, FunctionalOp, FxTraceError, quantize_model
from .factories import call_factory
from .folding import bn_scale_shift, fold_batchnorm, fold_bn_params, freeze_bn_stats
from .granularity import PER_TENSOR, Granularity, per_channel, per_group
from .graph.concrete import BranchGuardError
from .graph.modes import TrainingBranchWarning
from .moe import QExperts
from .ptq import UncalledQModulesWarning, calibrate
from .qmodules import SUPPORTED_ACTIVATIONS, QModule, QModuleState, QMultiheadAttention, QOp, QWrapper, iter_qmodules
from .quantizers import (
    FORMATS,
    AffineGrid,
    AffineQuantizer,
    APoTQuantizer,
    BinaryQuantizer,
    DoReFaActQuantizer,
    DoReFaWeightQuantizer,
    DynamicAffineQuantizer,
    FloatGrid,
    LearnedQuantizer,
    LevelGrid,
    LSQPlusQuantizer,
    LSQQuantizer,
    MinifloatFormat,
    MinifloatQuantizer,
    MXQuantizer,
    NF4Quantizer,
    PACTQuantizer,
    QfmtQuantizer,
    Quantizer,
    RangeQuantizer,
    ResidualGroupQuantizer,
    TernaryQuantizer,
    XNORWeightQuantizer,
    pact_regularization,
)
from .quantizers_functional import (
    affine_qparams,
    affine_quantize,
    gradient_clip,
    qfmt_quantize,
    qfmt_step,
    round_ste,
)
from .range_observers import (
    BatchMinMax,
    EntropyObserver,
    ExpAvgMinMax,
    HistogramRangeObserver,
    MSEObserver,
    PercentileObserver,
    RangeObserver,
    RunningMinMax,
)
from .registry import (
    list_observers,
    list_quantizers,
    make_observer,
    make_quantizer,
    register_observer,
    register_quantizer,
)
from .serialize import load, save
from .summary import print_summary, summary, summary_rows
from .utils import get_qmodule_states, qmodule_state, set_qmodule_state

__version__ = "0.1.0"

# Submodules that need optional packages (numpy, onnx, matplotlib) load on first use,
# so `import torchquant` needs torch alone.
_LAZY_SUBMODULES = ("debug", "export")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'torchquant' has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "PER_TENSOR",
    "SUPPORTED_ACTIVATIONS",
    "APoTQuantizer",
    "AffineGrid",
    "AffineQuantizer",
    "BatchMinMax",
    "BinaryQuantizer",
    "BranchGuardError",
    "DoReFaActQuantizer",
    "DoReFaWeightQuantizer",
    "DynamicAffineQuantizer",
    "EntropyObserver",
    "ExpAvgMinMax",
    "FloatGrid",
    "FloatLayersWarning",
    "FunctionalOp",
    "FxTraceError",
    "Granularity",
    "HistogramRangeObserver",
    "LSQPlusQuantizer",
    "LSQQuantizer",
    "LearnedQuantizer",
    "LevelGrid",
    "MSEObserver",
    "MXQuantizer",
    "MinifloatFormat",
    "MinifloatQuantizer",
    "NF4Quantizer",
    "PACTQuantizer",
    "PercentileObserver",
    "QExperts",
    "QModule",
    "QModuleState",
    "QMultiheadAttention",
    "QOp",
    "QWrapper",
    "QfmtQuantizer",
    "Quantizer",
    "RangeObserver",
    "RangeQuantizer",
    "ResidualGroupQuantizer",
    "RunningMinMax",
    "TernaryQuantizer",
    "TrainingBranchWarning",
    "UncalledQModulesWarning",
    "XNORWeightQuantizer",
    "affine_qparams",
    "affine_quantize",
    "baselines",
    "bn_scale_shift",
    "calibrate",
    "call_factory",
    "debug",
    "distributed",
    "export",
    "fold_batchnorm",
    "fold_bn_params",
    "freeze_bn_stats",
    "get_qmodule_states",
    "gradient_clip",
    "iter_qmodules",
    "list_observers",
    "list_quantizers",
    "load",
    "make_observer",
    "make_quantizer",
    "pact_regularization",
    "per_channel",
    "per_group",
    "print_summary",
    "ptq",
    "qfmt_quantize",
    "qfmt_step",
    "qmodule_state",
    "quantize_model",
    "quantizers_functional",
    "register_observer",
    "register_quantizer",
    "registry",
    "round_ste",
    "save",
    "set_qmodule_state",
    "spec",
    "summary",
    "summary_rows",
]
