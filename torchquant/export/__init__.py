"""Deployment: ONNX Q/DQ export, integer parameters for hardware, safe checkpoints.

``import torchquant`` does not import onnx; the functions here import it when called.
"""

from .onnx_qdq import onnx_type_for_grid, to_onnx

__all__ = ["onnx_type_for_grid", "to_onnx"]
