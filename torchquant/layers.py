"""The layer types torchquant quantizes, their BatchNorm, and the BatchNorm folding arithmetic.

:data:`BN_FOR_LAYER` is the one table of supported layers: ``QWrapper``, both
conversion methods (``graph.swap``, ``graph.fx``), BatchNorm folding, the model
summary and the experiment layer all read it, so a new layer type is one entry here.

``BN(conv(x, W) + b) == conv(x, W * s) + (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)`` per output channel (Jacob et al. 2018):

* :func:`bn_scale_shift`, :func:`fold_bn_params`: that arithmetic, as pure functions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BN_FOR_LAYER", "FOLDABLE_TYPES", "LAYER_TYPES", "bn_scale_shift", "fold_bn_params"]

BN_FOR_LAYER: dict[type[nn.Module], type[nn.modules.batchnorm._BatchNorm]] = {
    nn.Linear: nn.BatchNorm1d,
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
}
"""Layer types a ``QWrapper`` holds, each with the BatchNorm type that may follow it."""

LAYER_TYPES: tuple[type[nn.Module], ...] = tuple(BN_FOR_LAYER)
"""The keys of :data:`BN_FOR_LAYER`, for ``isinstance`` checks."""

FOLDABLE_TYPES: tuple[type[nn.Module], ...] = (
    *LAYER_TYPES,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""Layer types :func:`~torchquant.fold_batchnorm` folds a following BatchNorm into (the quantized ones
and the transposed convolutions, which are folded along their second weight axis)."""


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
