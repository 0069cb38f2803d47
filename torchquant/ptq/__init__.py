"""Post-training quantization: calibration, cross-layer equalization, bias correction
and one reconstruction engine for AdaRound, BRECQ and QDrop.

A typical pipeline (Nagel et al. 2021, "A White Paper on Neural Network Quantization")::

    q = tq.quantize_model(model, weights, acts, method="swap")
    tq.ptq.equalize(q)                        # optional: CLE + high-bias absorption (folds BN)
    tq.calibrate(q, calib_batches)            # ranges
    tq.ptq.bias_correction(q, calib_batches)  # or tq.ptq.adaround / brecq / qdrop
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
"""

from .bias_correction import bias_correction, expected_activation
from .calibrate import calibrate
from .equalize import ChannelClip, EqualizationResult, equalize, find_layer_pairs, fold_qwrapper_batchnorm
from .reconstruction import AdaRoundQuantizer, adaround, brecq, qdrop, reconstruct

__all__ = [
    "AdaRoundQuantizer",
    "ChannelClip",
    "EqualizationResult",
    "adaround",
    "bias_correction",
    "brecq",
    "calibrate",
    "equalize",
    "expected_activation",
    "find_layer_pairs",
    "fold_qwrapper_batchnorm",
    "qdrop",
    "reconstruct",
]
