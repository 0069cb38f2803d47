"""Post-training quantization: calibration, cross-layer equalization, bias correction,
one reconstruction engine for AdaRound, BRECQ and QDrop, QuaRot's rotations, and the LLM
algorithms (GPTQ, AWQ, SmoothQuant) on a sequential block engine (:mod:`torchquant.ptq.sequential`).

A typical pipeline (Nagel et al. 2021, "A White Paper on Neural Network Quantization")::

    q = tq.quantize_model(model, weights, acts, method="swap")
    tq.ptq.equalize(q)                        # optional: CLE + high-bias absorption (folds BN)
    tq.calibrate(q, calib_batches)            # ranges
    tq.ptq.bias_correction(q, calib_batches)  # or tq.ptq.adaround / brecq / qdrop / gptq
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)

Every algorithm is also registered by name (:func:`list_ptq_algorithms`,
:func:`get_ptq_algorithm`), which is how recipes, the command line and the
benchmarks find them.
"""

from .awq import AWQResult, awq
from .bias_correction import bias_correction, expected_activation
from .calibrate import UncalledQModulesWarning, calibrate, reobserve_weights
from .equalize import ChannelClip, EqualizationResult, equalize, find_layer_pairs, fold_qwrapper_batchnorm
from .gptq import GPTQResult, gptq, gptq_quantize_weight
from .reconstruction import (
    ADAROUND,
    BRECQ,
    PRESETS,
    QDROP,
    RECONSTRUCTION_BLOCKS,
    AdaRoundQuantizer,
    ReconstructionConfig,
    adaround,
    brecq,
    qdrop,
    reconstruct,
    reconstruction_block,
)
from .registry import PTQ_ALGORITHMS, PTQAlgorithm, get_ptq_algorithm, list_ptq_algorithms, register_ptq_algorithm
from .rotate import QuaRotResult, quarot
from .smoothquant import SmoothQuantResult, smoothing_scales, smoothquant

__all__ = [
    "ADAROUND",
    "BRECQ",
    "PRESETS",
    "PTQ_ALGORITHMS",
    "QDROP",
    "RECONSTRUCTION_BLOCKS",
    "AWQResult",
    "AdaRoundQuantizer",
    "ChannelClip",
    "EqualizationResult",
    "GPTQResult",
    "PTQAlgorithm",
    "QuaRotResult",
    "ReconstructionConfig",
    "SmoothQuantResult",
    "UncalledQModulesWarning",
    "adaround",
    "awq",
    "bias_correction",
    "brecq",
    "calibrate",
    "equalize",
    "expected_activation",
    "find_layer_pairs",
    "fold_qwrapper_batchnorm",
    "get_ptq_algorithm",
    "gptq",
    "gptq_quantize_weight",
    "list_ptq_algorithms",
    "qdrop",
    "quarot",
    "reconstruct",
    "reconstruction_block",
    "register_ptq_algorithm",
    "reobserve_weights",
    "smoothing_scales",
    "smoothquant",
]
