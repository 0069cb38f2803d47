"""Minifloat formats: sign, ``E`` exponent and ``M`` mantissa bits (OCP FP8, FP6, FP4, MX's INT8 element).

:class:`MinifloatFormat` describes one; :data:`FORMATS` holds the OCP ones by name. The
quantizers that round to them are in :mod:`~torchquant.quantizers.minifloat`; their
:class:`~torchquant.quantizers.FloatGrid` carries a format with its scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..quantizers_functional import minifloat_quantize

__all__ = ["FORMATS", "MinifloatFormat"]

# A leaf for torch.fx: tracing records one call instead of entering the autograd.Function.
torch.fx.wrap("minifloat_quantize")

_SPECIALS = ("ieee", "nan_only", "finite")


@dataclass(frozen=True)
class MinifloatFormat:
    """A sign-magnitude floating-point format with ``exp_bits`` exponent and ``man_bits`` mantissa bits.

    Args:
        exp_bits: exponent bits ``E`` (>= 1).
        man_bits: mantissa bits ``M`` (>= 0).
        bias: exponent bias; ``None`` means ``2 ** (E - 1) - 1``.
        special: which encodings are not finite numbers:
            ``"ieee"``: the top exponent holds infinities and NaNs (FP8 E5M2);
            ``"nan_only"``: only the all-ones exponent-and-mantissa code is NaN
            (FP8 E4M3 of the OCP spec, torch's ``float8_e4m3fn``);
            ``"finite"``: every code is a number (OCP FP6 E3M2/E2M3, FP4 E2M1).

    Quantizing to a format saturates to ``+-max_value`` and generates neither
    infinities nor NaNs. Subnormals (exponent field 0) are supported.
    """

    exp_bits: int
    man_bits: int
    bias: int | None = None
    special: str = "finite"

    def __post_init__(self) -> None:
        if isinstance(self.exp_bits, bool) or not isinstance(self.exp_bits, int) or not 1 <= self.exp_bits <= 8:
            raise ValueError(f"MinifloatFormat: exp_bits must be an int in [1, 8], got {self.exp_bits!r}")
        if isinstance(self.man_bits, bool) or not isinstance(self.man_bits, int) or not 0 <= self.man_bits <= 10:
            raise ValueError(f"MinifloatFormat: man_bits must be an int in [0, 10], got {self.man_bits!r}")
        if self.special not in _SPECIALS:
            raise ValueError(f"MinifloatFormat: special must be one of {_SPECIALS}, got {self.special!r}")
        if self.special == "ieee" and self.exp_bits < 2:
            raise ValueError("MinifloatFormat: special='ieee' needs exp_bits >= 2")
        if self.special == "nan_only" and self.man_bits < 1:
            raise ValueError("MinifloatFormat: special='nan_only' needs man_bits >= 1")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exp_bits - 1) - 1)
        if isinstance(self.bias, bool) or not isinstance(self.bias, int):
            raise ValueError(f"MinifloatFormat: bias must be an int, got {self.bias!r}")
        # The simulation computes in float32: every value of the format must be one.
        f32 = torch.finfo(torch.float32)
        if self.max_value > f32.max or self.unit < f32.smallest_normal * f32.eps:
            raise ValueError(
                f"MinifloatFormat: {self.name} with bias {self.bias} and special={self.special!r} spans "
                f"[{self.unit:.3g}, {self.max_value:.3g}], outside float32's [1.4e-45, 3.4e+38], in which it is "
                "simulated; use special='ieee' for an 8-bit exponent, or another bias"
            )

    @property
    def name(self) -> str:
        return f"e{self.exp_bits}m{self.man_bits}"

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest normal value."""
        top = 2**self.exp_bits - 1  # largest exponent field
        return (top - 1 if self.special == "ieee" else top) - self.bias  # type: ignore[operator]

    @property
    def max_value(self) -> float:
        """Largest finite magnitude (448 for E4M3, 57344 for E5M2, 6 for E2M1)."""
        m = self.man_bits
        frac = 2 - 2 ** (1 - m) if self.special == "nan_only" else 2 - 2**-m
        return frac * 2.0**self.emax

    def quantize(self, x: Tensor, scale: Tensor | float = 1.0) -> Tensor:
        """``x`` rounded to this format after division by ``scale`` (see :func:`minifloat_quantize`)."""
        return minifloat_quantize(x, scale, self.man_bits, self.bias, self.max_value)  # type: ignore[arg-type]

    @property
    def unit(self) -> float:
        """The smallest subnormal, ``2 ** (1 - bias - M)``: every value of the format is an integer times it."""
        return 2.0 ** (1 - self.bias - self.man_bits)  # type: ignore[operator]

    def values(self) -> Tensor:
        """Every finite value of the format, ascending, one zero: ``(K,)`` float32 (15 for E2M1).

        Example:
            >>> MinifloatFormat(2, 1).values().tolist()
            [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
        """
        m = torch.arange(2**self.man_bits, dtype=torch.float64) / 2**self.man_bits  # mantissa fractions
        e = torch.arange(1, 2**self.exp_bits, dtype=torch.float64)[:, None]  # exponent fields of normals
        normals = (2.0 ** (e - self.bias)) * (1 + m)  # type: ignore[operator]
        subnormals = torch.arange(2**self.man_bits, dtype=torch.float64) * self.unit  # field 0, zero first
        mags = torch.cat([subnormals, normals.reshape(-1)])
        mags = mags[mags <= self.max_value]  # the codes of infinities and NaNs lie above
        return torch.cat([-mags.flip(0)[:-1], mags]).float()


FORMATS: dict[str, MinifloatFormat] = {
    "fp8_e4m3": MinifloatFormat(4, 3, special="nan_only"),
    "fp8_e5m2": MinifloatFormat(5, 2, special="ieee"),
    "fp6_e3m2": MinifloatFormat(3, 2),
    "fp6_e2m3": MinifloatFormat(2, 3),
    "fp4_e2m1": MinifloatFormat(2, 1),
    # MXINT8's element: int8 with an implicit scale 2**-6, symmetric range [-127, 127]; as a format,
    # E1M6 with bias 1 and no special codes has exactly these values.
    "int8": MinifloatFormat(1, 6, bias=1),
}
"""The OCP formats by name (``"int8"``: MX's INT8 element, see
:func:`~torchquant.quantizers_functional.mx_quantize`)."""
