"""Low-precision floating point: minifloat formats (OCP FP8, FP6, FP4) and OCP Microscaling (MX) blocks.

| registry name | class | specification |
|---|---|---|
| ``minifloat``, ``fp8_e4m3``, ``fp8_e5m2``, ``fp6_*``, ``fp4_e2m1`` | :class:`MinifloatQuantizer` | OCP FP8 (2023) |
| ``mx``, ``mxfp8_*``, ``mxfp6_*``, ``mxfp4``, ``mxint8`` | :class:`MXQuantizer` | OCP MX v1.0 (2023) |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import kernels
from ..granularity import PER_TENSOR, Granularity
from ..quantizers_functional import mx_quantize
from ..range_observers import BatchMinMax, ExpAvgMinMax, RangeObserver
from ..registry import Example, register_quantizer
from .base import FloatGrid, Quantizer, StatelessQuantizer, forward_with_observer, kernel_ranges
from .formats import FORMATS, MinifloatFormat

__all__ = ["MXQuantizer", "MinifloatQuantizer"]


def _format_config(f: MinifloatFormat) -> str:
    """``"e4m3(bias=7, nan_only)"``: a format by its fields, so ``"e4m3"`` and ``"fp8_e4m3"`` compare equal."""
    return f"{f.name}(bias={f.bias}, {f.special})"


def _format(fmt: MinifloatFormat | str, who: str) -> MinifloatFormat:
    if isinstance(fmt, MinifloatFormat):
        return fmt
    if isinstance(fmt, str):
        key = fmt.lower()
        for name, f in FORMATS.items():
            if key in (name, name.split("_")[-1]):
                return f
    raise ValueError(f"{who}: unknown format {fmt!r}; give a MinifloatFormat or one of {', '.join(FORMATS)}")


@register_quantizer(
    "minifloat",
    examples=[
        Example("e4m3-scaled-per-channel", lambda: MinifloatQuantizer("e4m3", BatchMinMax(axis=0)), role="weight"),
        Example("e2m1-cast", lambda: MinifloatQuantizer("fp4_e2m1"), role="act"),
    ],
)
class MinifloatQuantizer(Quantizer):
    """Minifloat fake quantization (ExMy with bias, subnormals, saturation) with an optional range-based scale.

    Forward: ``x_q = round_fmt(x / scale) * scale``, ``round_fmt`` rounding to the
    nearest value of the format (ties to even) and saturating at
    ``+-fmt.max_value``. ``scale = max(|min|, |max|) / fmt.max_value`` from
    ``range_observer`` (per tensor or per channel, as the observer's
    granularity), or 1 without an observer (a plain cast, e.g. equal to
    ``x.to(torch.float8_e4m3fn).float()`` for FP8 E4M3). FP8 E4M3 and E5M2
    follow the OCP 8-bit floating point specification (2023); FP6 and FP4 the
    OCP MX v1.0 specification.

    Gradient: straight through (the incoming gradient for ``x``).

    Args:
        fmt: a :class:`MinifloatFormat` or a name from :data:`FORMATS`
            (``"fp8_e4m3"``, ``"e5m2"``, ...).
        range_observer: where the scale comes from, or ``None`` for scale 1.

    Example:
        >>> q = MinifloatQuantizer("fp4_e2m1")
        >>> q(torch.tensor([0.2, 0.3, 2.6, 100.0]))
        tensor([0.0000, 0.5000, 3.0000, 6.0000])
    """

    def __init__(self, fmt: MinifloatFormat | str, range_observer: RangeObserver | None = None) -> None:
        super().__init__()
        self.fmt = _format(fmt, type(self).__name__)
        if range_observer is not None and not isinstance(range_observer, RangeObserver):
            raise TypeError(f"{type(self).__name__}: range_observer must be a RangeObserver or None")
        self.range_observer = range_observer
        self._set_name(type(self).__name__)

    def _set_name(self, name: str) -> None:
        self._tq_name = name
        if self.range_observer is not None:
            self.range_observer._tq_name = f"{name}.range_observer"

    def grid_config(self) -> dict[str, Any]:
        config = super().grid_config()
        config["args"]["fmt"] = _format_config(self.fmt)
        return config

    def pre_observe(self, x: Tensor) -> None:
        # _modules, as RangeQuantizer does (the QAT hot path); None set at construction is not there
        obs = self._modules.get("range_observer")
        if obs is not None:
            obs.observe_batch(x)

    def post_observe(self, x: Tensor) -> None:
        pass

    def scale(self) -> Tensor:
        """``amax / fmt.max_value``, broadcastable against the input (a 0-d 1 without observer)."""
        if self.range_observer is None:
            return torch.ones(())
        mn, mx = self.range_observer.get_ranges()
        amax = torch.maximum(mn.abs(), mx.abs())
        return (amax / self.fmt.max_value).clamp(min=torch.finfo(torch.float32).tiny)

    def float_grid(self) -> FloatGrid:
        obs = self.range_observer
        return FloatGrid(self.fmt, self.scale(), PER_TENSOR if obs is None else obs.granularity)

    def forward(self, x: Tensor) -> Tensor:
        return forward_with_observer(self, self._modules.get("range_observer"), x)

    def quantize(self, x: Tensor) -> Tensor:
        obs = self._modules.get("range_observer")
        ranges = kernel_ranges(self, obs, MinifloatQuantizer, "scale") if kernels.enabled(x) else None
        if ranges is not None:
            # One CUDA kernel: the scale from the observer's ranges, then the format's rounding.
            f = self.fmt
            out = kernels.minifloat_ranges(x, *ranges, obs.granularity, f.man_bits, f.bias, f.max_value)
            if out is not None:
                return out
        return self.fmt.quantize(x, self.scale().to(x.device))

    def extra_repr(self) -> str:
        f = self.fmt
        return f"{f.name}, bias={f.bias}, max={f.max_value}, scaled={self.range_observer is not None}"


@torch.fx.wrap
def _mx(
    x: Tensor, man_bits: int, bias: int, max_value: float, emax: int, block_size: int, axis: int, who: str
) -> Tensor:
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"{who}: axis {axis} does not exist in a tensor of shape {tuple(x.shape)}")
    return mx_quantize(x, man_bits, bias, max_value, emax, block_size, axis)


@register_quantizer(
    "mx",
    examples=[
        Example("e5m2-axis1", lambda: MXQuantizer("fp8_e5m2", axis=1)),
        Example("e2m1-last-axis-padded", lambda: MXQuantizer("fp4_e2m1", block_size=4)),
    ],
)
class MXQuantizer(StatelessQuantizer):
    """OCP Microscaling (MX v1.0, 2023) block quantization.

    Forward: blocks of ``block_size`` (32) consecutive elements along ``axis``
    share the power-of-two (E8M0) scale ``X = 2 ** (floor(log2(max|block|)) - emax_elem)``;
    each element is rounded to the element format after division by ``X``
    (ties to even, saturating). See :func:`~torchquant.quantizers_functional.mx_quantize`.
    Gradient: straight through.

    Args:
        elem: element format: ``"fp8_e4m3"`` (MXFP8), ``"fp8_e5m2"``, ``"fp6_e3m2"``
            (MXFP6), ``"fp6_e2m3"``, ``"fp4_e2m1"`` (MXFP4), ``"int8"`` (MXINT8) or a
            :class:`MinifloatFormat`.
        block_size: elements per shared scale (32 in the specification).
        axis: axis along which blocks run: the reduction axis of the matmul,
            e.g. ``-1`` for a Linear weight ``(out, in)``, ``1`` for a Conv weight
            or an ``(N, C, H, W)`` activation.

    Example:
        >>> q = MXQuantizer("fp4_e2m1")
        >>> x = torch.tensor([5.0, 0.3, -1.2, 0.0])  # X = 2 ** (2 - 2) = 1
        >>> q(x)
        tensor([ 4.0000,  0.5000, -1.0000,  0.0000])
    """

    def __init__(self, elem: MinifloatFormat | str = "fp8_e4m3", block_size: int = 32, axis: int = -1) -> None:
        super().__init__()
        self.elem = _format(elem, type(self).__name__)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{type(self).__name__}: block_size must be a positive int, got {block_size!r}")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"{type(self).__name__}: axis must be an int, got {axis!r}")
        self.block_size = block_size
        self.axis = axis

    def grid_config(self) -> dict[str, Any]:
        config = super().grid_config()
        config["args"]["elem"] = _format_config(self.elem)
        return config

    def float_grid(self) -> FloatGrid:
        return FloatGrid(self.elem, None, Granularity(self.axis, self.block_size))

    def quantize(self, x: Tensor) -> Tensor:
        f = self.elem
        return _mx(x, f.man_bits, f.bias, f.max_value, f.emax, self.block_size, self.axis, self._tq_name)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return f"elem={self.elem.name}, block_size={self.block_size}, axis={self.axis}"


def _register_named_formats() -> None:
    def minifloat_factory(fmt: str):
        def make(range_observer: RangeObserver | None = None) -> MinifloatQuantizer:
            return MinifloatQuantizer(fmt, range_observer)

        make.__name__ = make.__qualname__ = fmt
        make.__doc__ = f"``MinifloatQuantizer({fmt!r}, range_observer)``."
        return make

    def mx_factory(fmt: str):
        def make(block_size: int = 32, axis: int = -1) -> MXQuantizer:
            return MXQuantizer(fmt, block_size, axis)

        make.__name__ = make.__qualname__ = f"mx_{fmt}"
        make.__doc__ = f"``MXQuantizer({fmt!r}, block_size, axis)``."
        return make

    for fmt in ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"):
        make = minifloat_factory(fmt)
        register_quantizer(fmt, examples=_minifloat_examples(make))(make)
        make = mx_factory(fmt)
        register_quantizer("mx" + fmt.replace("fp4_e2m1", "fp4"), examples=_mx_examples(make))(make)
    make = mx_factory("int8")
    register_quantizer("mxint8", examples=_mx_examples(make))(make)


def _minifloat_examples(make: Callable[..., MinifloatQuantizer]) -> list[Example]:
    return [
        Example("cast", make, role="act"),
        Example("scaled-per-channel", lambda: make(BatchMinMax(axis=0)), role="weight"),
        Example("scaled-ema", lambda: make(ExpAvgMinMax()), role="act"),
    ]


def _mx_examples(make: Callable[..., MXQuantizer]) -> list[Example]:
    return [Example("axis1", lambda: make(axis=1)), Example("axis1-block2", lambda: make(block_size=2, axis=1))]


_register_named_formats()
