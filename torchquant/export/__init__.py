"""Deployment: ONNX Q/DQ export, integer parameters for hardware, safe checkpoints.

``import torchquant`` does not import onnx, onnxruntime or safetensors; the
functions here import them when called.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .integer import integer_params, load_integer_params, save_integer_params
from .onnx_qdq import onnx_type_for_grid, to_onnx
from .parity import Agreement, Divergence, ParityReport, check_parity

__all__ = [
    "Agreement",
    "Divergence",
    "ParityReport",
    "check_parity",
    "integer_params",
    "load_checkpoint",
    "load_integer_params",
    "onnx_type_for_grid",
    "save_checkpoint",
    "save_integer_params",
    "to_onnx",
]
