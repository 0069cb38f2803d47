"""Dynamic affine quantizers: the grid comes from the tensor being quantized, every call.

* :class:`DynamicAffineQuantizer` (``dynamic_affine``): per-tensor, per-channel or
  per-group ranges of the input itself (per-token activation quantization in LLMs,
  key/value quantization of an attention cache).
* :class:`ResidualGroupQuantizer` (``dynamic_affine_residual``): per-group along an
  axis whose length need not be a multiple of the group size; the incomplete last
  group stays in float (KIVI's residual, Liu et al. 2024) or gets its own range.

Neither holds state, so calibration changes nothing; ``grid()`` is ``None`` because the
grid depends on each input (ONNX export needs a stored grid).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..granularity import Granularity
from ..quantizers_functional import _range_step, affine_qparams, affine_quantize, compute_dtype, straight_through
from ..registry import Example, register_quantizer
from .base import StatelessQuantizer, check_n_bits

__all__ = ["DynamicAffineQuantizer", "ResidualGroupQuantizer"]


def _fixed_zero_point(n_levels: int, symmetric: bool) -> float | None:
    # The same zero point as AffineQuantizer._fixed_zero_point (symmetric, not power-of-two).
    return float(round((n_levels - 1) / 2)) if symmetric else None


def _size(x: Tensor, axis: int) -> int:
    """``x.shape[axis]``; a size torch.jit traces (ONNX export) is a tensor, taken as the number it is
    (torch.compile's symbolic sizes stay symbolic: no recompilation per sequence length)."""
    n = x.shape[axis]
    return int(n) if isinstance(n, Tensor) else n


@torch.fx.wrap
def _dynamic_affine(
    x: Tensor,
    n_bits: int,
    axis: int | None,
    group_size: int | None,
    symmetric: bool,
    who: str,
    per_token: bool = False,
    include_zero: bool = True,
):
    if x.numel() == 0:  # no values to take a range from (an expert routed no tokens): nothing to quantize
        return x.clone()
    if per_token:  # one range per index of every axis but the last
        axis, group_size = -1, _size(x, -1)
    g = Granularity(axis=axis, group_size=group_size)
    mn, mx = g.reduce(x.detach(), who)  # compact: () / (1, .., C, .., 1) / (.., n // g, ..)
    n_levels = 2**n_bits
    if not include_zero:
        return _min_max_grid(x, g, mn, mx, n_levels)
    fixed = _fixed_zero_point(n_levels, symmetric)
    delta, zero_point = affine_qparams(mn.float(), mx.float(), n_levels, symmetric, False, fixed)
    delta = g.expand(delta)  # broadcasts against x
    return affine_quantize(x, delta, g.expand(zero_point) if fixed is None else fixed, n_levels)


@register_quantizer(
    "dynamic_affine",
    examples=[
        Example("a8-per-tensor", lambda: DynamicAffineQuantizer(8), role="act"),
        Example("a4-groups-of-2", lambda: DynamicAffineQuantizer(4, axis=-1, group_size=2), role="act"),
        Example("a8-per-token", lambda: DynamicAffineQuantizer(8, per_token=True), role="act"),
        Example(
            "a4-per-token-min-max-grid",
            lambda: DynamicAffineQuantizer(4, per_token=True, include_zero=False),
            role="act",
        ),
        Example(
            "a8-per-channel-symmetric", lambda: DynamicAffineQuantizer(8, axis=1, symmetric=True), idempotent=False
        ),
        # Re-quantizing re-derives each range from the quantized values: the same step in exact
        # arithmetic, but it can differ in the last bit, which moves an output by one ulp.
        Example(
            "w4-per-group", lambda: DynamicAffineQuantizer(4, axis=1, group_size=3), role="weight", idempotent=False
        ),
    ],
)
class DynamicAffineQuantizer(StatelessQuantizer):
    """Affine quantizer whose ranges are the min and max of each tensor it quantizes.

    The grid arithmetic is :class:`~torchquant.AffineQuantizer`'s
    (:func:`~torchquant.affine_qparams` on the ranges, then
    :func:`~torchquant.affine_quantize`), with the ranges reduced from ``x`` itself at
    the granularity ``Granularity(axis, group_size)`` in every quantizing mode. Nothing
    is stored: observing does nothing and ``state_dict`` is empty.

    Per-token quantization of an activation ``(B, T, C)`` is one range per row of ``C``
    elements: ``per_token=True`` (the same as ``axis=-1, group_size=C`` for whatever
    ``C`` the tensor has); of attention queries, keys or values ``(B, H, T, D)``, one
    range per token and head. (Per-channel ``axis=-1`` instead shares one range per
    channel over the batch and all tokens.)

    The gradient is straight-through for ``x``; no gradient flows through the ranges.
    Quantizing an output again gives it back up to the float rounding of the re-derived
    step (asymmetric grids), or on a finer grid (symmetric ones: the range of the output
    is no longer symmetric).

    Args:
        n_bits: bits per element, 1 to 24.
        axis: ``None`` (one range per tensor) or the per-channel / per-group axis.
        group_size: with ``axis``, that many consecutive elements along ``axis`` share a range.
        symmetric: a grid symmetric around zero (``[-max|x|, max|x|]``).
        per_token: one range per index of every axis but the last (instead of ``axis``
            and ``group_size``).
        include_zero: widen each range to include 0 (an integer zero point, as every
            affine grid here); ``False``: levels run from the range's min to its max with a
            float offset, zero need not be one (KIVI's grid; asymmetric only).

    Raises:
        ValueError: a bad ``n_bits`` or granularity, ``symmetric`` without ``include_zero``; at
            call time, a granularity that does not fit the tensor (naming the quantizer, the
            shape and the granularity).

    Example:
        >>> q = DynamicAffineQuantizer(2, axis=-1, group_size=2)
        >>> q(torch.tensor([[0.0, 3.0, -1.0, 2.0]]))  # ranges [0, 3] and [-1, 2]
        tensor([[ 0.,  3., -1.,  2.]])
    """

    def __init__(
        self,
        n_bits: int = 8,
        *,
        axis: int | None = None,
        group_size: int | None = None,
        symmetric: bool = False,
        per_token: bool = False,
        include_zero: bool = True,
    ) -> None:
        super().__init__()
        self.n_bits = check_n_bits(n_bits, type(self).__name__, high=24)
        if per_token and (axis is not None or group_size is not None):
            raise ValueError(f"{type(self).__name__}: per_token=True sets the granularity; give no axis or group_size")
        self.granularity = Granularity(axis=axis, group_size=group_size)
        self.symmetric = bool(symmetric)
        self.per_token = bool(per_token)
        self.include_zero = _check_include_zero(include_zero, self.symmetric, type(self).__name__)

    def quantize(self, x: Tensor) -> Tensor:
        g = self.granularity
        return _dynamic_affine(
            x, self.n_bits, g.axis, g.group_size, self.symmetric, self._tq_name, self.per_token, self.include_zero
        )

    def extra_repr(self) -> str:
        where = "per-token" if self.per_token else str(self.granularity)
        zero = "" if self.include_zero else ", include_zero=False"
        return f"n_bits={self.n_bits}, {where}, symmetric={self.symmetric}{zero}"


def _check_include_zero(include_zero: bool, symmetric: bool, who: str) -> bool:
    if symmetric and not include_zero:
        raise ValueError(f"{who}: a symmetric grid is centred on zero; include_zero=False needs symmetric=False")
    return bool(include_zero)


def _min_max_grid(x: Tensor, g: Granularity, mn: Tensor, mx: Tensor, n_levels: int) -> Tensor:
    """``x`` on the grid of ``n_levels`` levels from each range's min to its max (a float offset: zero need not
    be a level, as in KIVI), ``clamp(round((x - min) / delta), 0, n - 1) * delta + min``; straight-through."""
    dt = compute_dtype(x)
    k = n_levels - 1
    lo, hi = mn.to(dt), mx.to(dt)
    delta = _range_step(lo, hi, n_levels)
    delta, lo = g.expand(delta), g.expand(lo)
    q = torch.clamp(torch.round((x.detach().to(dt) - lo) / delta), 0, k)
    return straight_through(x, (q * delta + lo).to(x.dtype))


@torch.fx.wrap
def _residual_groups(
    x: Tensor, n_bits: int, axis: int, group_size: int, symmetric: bool, residual: bool, who: str, include_zero: bool
) -> Tensor:
    axis = Granularity(axis=axis).check(x.shape, who)
    length = _size(x, axis)
    full = length - length % group_size

    def groups(t: Tensor, size: int) -> Tensor:
        return _dynamic_affine(t, n_bits, axis, size, symmetric, who, include_zero=include_zero)

    if full == length:
        return groups(x, group_size)
    head, tail = x.narrow(axis, 0, full), x.narrow(axis, full, length - full)
    if not residual:  # the incomplete group is one shorter group with its own range
        tail = groups(tail, length - full)
    if full == 0:
        return tail
    return torch.cat([groups(head, group_size), tail], dim=axis)


@register_quantizer(
    "dynamic_affine_residual",
    examples=[
        Example("kivi-keys-4", lambda: ResidualGroupQuantizer(4, axis=-2, group_size=4), role="act"),
        Example("kivi-keys-2-no-residual", lambda: ResidualGroupQuantizer(2, axis=-2, group_size=4, residual=False)),
        Example(
            "kivi-keys-min-max-grid",
            lambda: ResidualGroupQuantizer(2, axis=-2, group_size=4, include_zero=False),
            role="act",
        ),
    ],
)
class ResidualGroupQuantizer(StatelessQuantizer):
    """Dynamic per-group quantization along an axis whose length need not be a multiple of ``group_size``.

    Along ``axis`` (length ``n``), the first ``n - n % group_size`` elements are quantized
    as :class:`DynamicAffineQuantizer` ``(n_bits, axis=axis, group_size=group_size)``
    does. The last ``n % group_size`` elements stay in float with ``residual=True``
    (KIVI's residual, Liu et al. 2024: the key cache is quantized per channel over groups
    of ``group_size`` tokens, and tokens of a group that is not yet complete are kept in
    full precision), or are quantized as one shorter group with ``residual=False``.

    For keys ``(B, H, T, D)`` of an attention cache, ``axis=-2`` gives one range per
    (batch, head, channel) and group of ``group_size`` consecutive tokens. A complete
    group's quantization depends on its own elements only, so it does not change as the
    axis grows: re-quantizing the float tensor at every step gives what a cache that
    stores each group once, when it completes, holds.

    Args:
        n_bits: bits per element, 1 to 24.
        axis: the grouped axis.
        group_size: consecutive elements along ``axis`` that share a range.
        symmetric: symmetric grids.
        residual: keep the incomplete last group in float (else quantize it on its own).
        include_zero: see :class:`DynamicAffineQuantizer` (``False``: KIVI's min-to-max grid).

    Example:
        >>> q = ResidualGroupQuantizer(2, axis=0, group_size=2)
        >>> q(torch.tensor([0.0, 3.0, 1.1, 0.7, 0.123]))  # groups [0, 3], [1.1, 0.7]; 0.123 stays
        tensor([0.0000, 3.0000, 1.1000, 0.7333, 0.1230])
    """

    def __init__(
        self,
        n_bits: int = 4,
        *,
        axis: int = -2,
        group_size: int = 32,
        symmetric: bool = False,
        residual: bool = True,
        include_zero: bool = True,
    ) -> None:
        super().__init__()
        self.n_bits = check_n_bits(n_bits, type(self).__name__, high=24)
        self.granularity = Granularity(axis=axis, group_size=group_size)  # validates both
        self.symmetric = bool(symmetric)
        self.residual = bool(residual)
        self.include_zero = _check_include_zero(include_zero, self.symmetric, type(self).__name__)

    def quantize(self, x: Tensor) -> Tensor:
        g = self.granularity
        return _residual_groups(
            x, self.n_bits, g.axis, g.group_size, self.symmetric, self.residual, self._tq_name, self.include_zero
        )

    def extra_repr(self) -> str:
        zero = "" if self.include_zero else ", include_zero=False"
        return f"n_bits={self.n_bits}, {self.granularity}, symmetric={self.symmetric}, residual={self.residual}{zero}"
