"""BatchNorm folding arithmetic (pure functions).

``BN(conv(x, W) + b) == conv(x, W * s) + (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)`` per output channel (Jacob et al. 2018).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["bn_scale_shift", "fold_bn_params"]


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` of an eval-mode BatchNorm: ``bn(y) == y * scale + shift``. Shapes ``(C,)``."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError(f"cannot fold {bn}: it tracks no running statistics")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def fold_bn_params(
    weight: Tensor, bias: Tensor | None, bn: nn.modules.batchnorm._BatchNorm, transposed: bool = False
) -> tuple[Tensor, Tensor]:
    """Weight ``(C_out, ...)`` and bias ``(C_out,)`` of the layer with ``bn`` (eval statistics) folded in.

    ``transposed=True`` for ConvTranspose weights ``(C_in, C_out / groups, ...)``.
    """
    scale, shift = bn_scale_shift(bn)
    shape = [1] * weight.dim()
    shape[1 if transposed else 0] = -1
    w = weight * scale.reshape(shape)
    b = shift if bias is None else bias * scale + shift
    return w, b
