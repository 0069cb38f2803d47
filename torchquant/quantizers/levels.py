"""Non-uniform grids: NormalFloat (NF4) and additive powers-of-two (APoT) levels.

Both report their outputs through :meth:`~torchquant.quantizers.Quantizer.levels`, a
:class:`~torchquant.quantizers.LevelGrid` (a sorted codebook times a scale), so AdaRound
chooses between neighbouring levels and export stores integer codes plus the codebook.

| registry name | class | reference |
|---|---|---|
| ``nf4`` | :class:`NF4Quantizer` | Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs" |
| ``apot`` | :class:`APoTQuantizer` | Li et al. 2020, "Additive Powers-of-Two Quantization" (ICLR) |
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import Tensor

from ..quantizers_functional import level_quantize
from ..range_observers import BatchMinMax, ExpAvgMinMax, RangeObserver
from ..registry import Example, register_quantizer
from .base import LevelGrid, RangeQuantizer, check_n_bits

__all__ = ["APoTQuantizer", "NF4Quantizer", "apot_levels", "nf4_levels"]

# A leaf for torch.fx: tracing records one call instead of entering the comparisons.
torch.fx.wrap("level_quantize")

_TINY = torch.finfo(torch.float32).tiny

# QLoRA's offset: the mean of 1 - 1/(2 * 15) and 1 - 1/(2 * 16), rounded to the 7 digits with which the
# published table was computed (with the exact mean, 12 of the 16 values differ in the last bits).
_NF4_OFFSET = 0.9677083


@functools.cache
def _nf4_table() -> tuple[float, ...]:
    # Quantiles of N(0, 1): 8 for the positive half and 7 for the negative one, so that 0 is a level.
    # Probabilities in float32, quantiles in float64, rounded to float32, then scaled by the largest
    # in float32: the steps by which the published table was computed, reproduced bit for bit.
    f32 = torch.float32  # explicit: the table must not follow torch.set_default_dtype
    pos = torch.special.ndtri(torch.linspace(_NF4_OFFSET, 0.5, 9, dtype=f32)[:-1].double()).float()
    neg = (-torch.special.ndtri(torch.linspace(_NF4_OFFSET, 0.5, 8, dtype=f32)[:-1].double())).float()
    v = torch.cat([neg, torch.zeros(1, dtype=f32), pos]).sort().values
    return tuple((v / v.max()).tolist())


def nf4_levels() -> Tensor:
    """The 16 NormalFloat-4 levels (QLoRA), ascending, in ``[-1, 1]``, zero exact.

    Quantiles of the standard normal distribution, 8 for positive and 7 for negative
    values plus an exact 0, normalised to a largest magnitude of 1 (Dettmers et al. 2023,
    section 3 and appendix E). Equal, in float32, to the table the paper publishes.

    Returns:
        A ``(16,)`` float32 tensor.

    Example:
        >>> nf4_levels()[[0, 7, 15]]
        tensor([-1.,  0.,  1.])
    """
    return torch.tensor(_nf4_table(), dtype=torch.float32)


@functools.cache
def _apot_table(n_bits: int, k: int, signed: bool) -> tuple[float, ...]:
    m = n_bits - 1 if signed else n_bits  # magnitude bits
    n = math.ceil(m / k)  # additive terms
    terms = []
    for i in range(n):
        bits = k if i < n - 1 else m - k * (n - 1)
        # term i: 0 or 2^-(i + j n), j = 0 .. 2^bits - 2; the exponents of different terms differ
        # modulo n, so every sum is distinct and the m bits give 2^m magnitudes
        terms.append([0.0] + [2.0 ** -(i + j * n) for j in range(2**bits - 1)])
    mags = sorted({sum(c) for c in itertools.product(*terms)})
    top = mags[-1]
    mags = [v / top for v in mags]  # the largest level is 1: the scale is the clipping value alpha
    if signed:
        mags = [-v for v in reversed(mags[1:])] + mags
    return tuple(mags)


def apot_levels(n_bits: int, k: int = 2, signed: bool = True) -> Tensor:
    """Additive powers-of-two levels (Li et al. 2020), ascending, largest magnitude 1.

    With ``m`` magnitude bits (``n_bits`` minus a sign bit when ``signed``), each level is
    a sum of ``n = ceil(m / k)`` terms ``p_0 + ... + p_{n-1}``, term ``i`` being 0 or one of
    ``2^-i, 2^-(i + n), ..., 2^-(i + (2^k - 2) n)`` (the paper's equation 5; the last term
    takes the ``m - k (n - 1)`` bits left when ``k`` does not divide ``m``). The ``2^m``
    distinct sums are divided by the largest one; signed levels are these and their
    negatives (``2^(m+1) - 1`` levels, zero once).

    Args:
        n_bits: bits per element, sign included when ``signed`` (2 to 9 signed, 1 to 8 unsigned).
        k: bits of each additive term (the paper's base bit-width, 2).
        signed: levels symmetric around zero (weights) or from 0 up (activations after ReLU).

    Returns:
        A ``(K,)`` float32 tensor.

    Raises:
        ValueError: ``n_bits`` or ``k`` out of range.

    Example:
        >>> apot_levels(4, signed=False) * 1.5  # p_0 in {0, 1, 1/4, 1/16}, p_1 in {0, 1/2, 1/8, 1/32}
        tensor([0.0000, 0.0312, 0.0625, 0.0938, 0.1250, 0.1875, 0.2500, 0.2812, 0.3750,
                0.5000, 0.5625, 0.7500, 1.0000, 1.0312, 1.1250, 1.5000])
    """
    signed = bool(signed)
    check_n_bits(n_bits, "apot_levels", low=2 if signed else 1, high=9 if signed else 8)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"apot_levels: k must be a positive int, got {k!r}")
    return torch.tensor(_apot_table(n_bits, k, signed), dtype=torch.float32)


class _LevelQuantizer(RangeQuantizer):
    """A sorted codebook (a non-persistent buffer) scaled by a clipping value from a range observer."""

    codebook: Tensor

    def __init__(self, codebook: Tensor, range_observer: RangeObserver, signed: bool = True) -> None:
        super().__init__(range_observer)
        self.signed = signed
        # Derived from the constructor arguments, so not saved: the state dict holds the observer only.
        self.register_buffer("codebook", codebook, persistent=False)

    def scale(self) -> Tensor:
        """The clipping value, broadcastable against the input: ``max(|min|, |max|)`` (``max`` unsigned)."""
        mn, mx = self.ranges()
        alpha = torch.maximum(mn.abs(), mx.abs()) if self.signed else mx
        return alpha.clamp(min=_TINY)  # an all-zero block stays finite (every value quantizes to 0)

    def quantize(self, x: Tensor) -> Tensor:
        return level_quantize(x, self.codebook, self.scale().to(x.device))

    def levels(self) -> LevelGrid:
        return LevelGrid(self.codebook, self.scale(), self.granularity)


@register_quantizer(
    "nf4",
    examples=[
        Example("w-block3", lambda: NF4Quantizer(BatchMinMax(axis=1, group_size=3)), role="weight"),
        Example("w-per-channel", lambda: NF4Quantizer(BatchMinMax(axis=0)), role="weight"),
        Example("a-ema", lambda: NF4Quantizer(ExpAvgMinMax()), role="act"),
    ],
)
class NF4Quantizer(_LevelQuantizer):
    """NormalFloat 4-bit (QLoRA, Dettmers et al. 2023): 16 normal-quantile levels times the block's absmax.

    ``x_q = scale * nf4[code]``, ``code`` the nearest of the 16 levels of
    :func:`nf4_levels` to ``x / scale`` (a tie goes to the lower level) and ``scale``
    the block's largest magnitude, ``max(|min|, |max|)`` from ``range_observer``.
    The default observer is QLoRA's layout: ``BatchMinMax(axis=1, group_size=64)``, blocks
    of 64 consecutive elements along the input dimension of an ``(out, in, ...)`` weight.
    Gradient: straight through. :meth:`levels` reports the codebook and scale.

    Args:
        range_observer: where the absmax comes from (its granularity is the block layout),
            ``None`` for blocks of :attr:`BLOCK_SIZE` along dimension 1.

    Example:
        >>> q = NF4Quantizer(BatchMinMax())
        >>> x = torch.tensor([-2.0, -0.1, 0.3, 1.0])
        >>> q.pre_observe(x)
        >>> q(x)  # scale 2: levels -2, ..., -0.1821, 0, 0.1592, 0.3219, ...
        tensor([-2.0000, -0.1821,  0.3219,  0.8814])
    """

    BLOCK_SIZE = 64

    def __init__(self, range_observer: RangeObserver | None = None) -> None:
        if range_observer is None:
            range_observer = BatchMinMax(axis=1, group_size=self.BLOCK_SIZE)
        super().__init__(nf4_levels(), range_observer)

    def extra_repr(self) -> str:
        return f"{self.granularity}"


@register_quantizer(
    "apot",
    examples=[
        Example("w4-per-channel", lambda: APoTQuantizer(4, BatchMinMax(axis=0)), role="weight"),
        Example("w3-k1", lambda: APoTQuantizer(3, BatchMinMax(), k=1), role="weight"),
        Example("a4-unsigned-ema", lambda: APoTQuantizer(4, ExpAvgMinMax(), signed=False), role="act"),
    ],
)
class APoTQuantizer(_LevelQuantizer):
    """Additive powers-of-two quantizer (Li et al. 2020): sums of powers of two times a clipping value.

    ``x_q = alpha * apot[code]``, ``code`` the nearest level of :func:`apot_levels`
    (``n_bits``, ``k``, ``signed``) to ``x / alpha`` (a tie goes to the lower level); the
    clipping value ``alpha`` is ``max(|min|, |max|)`` from ``range_observer`` (``max``
    when unsigned), per tensor, channel or group as its granularity says. Each level is
    a sum of a few powers of two, so a multiplication by it is a few shifts and adds.
    Gradient: straight through. :meth:`levels` reports the codebook and scale.

    Args:
        n_bits: bits per element, sign bit included when ``signed``.
        range_observer: where ``alpha`` comes from.
        k: bits of each additive term (2 in the paper).
        signed: levels symmetric around zero (weights) or from zero up (activations).

    Example:
        >>> q = APoTQuantizer(4, BatchMinMax(), signed=False)
        >>> x = torch.tensor([0.0, 0.2, 0.7, 1.5])
        >>> q.pre_observe(x)
        >>> q(x)  # alpha 1.5
        tensor([0.0000, 0.1875, 0.7500, 1.5000])
    """

    def __init__(self, n_bits: int, range_observer: RangeObserver, k: int = 2, signed: bool = True) -> None:
        signed = bool(signed)
        super().__init__(self._codebook(n_bits, k, signed), range_observer, signed)
        self.k = k
        self._n_bits = n_bits

    def _codebook(self, n_bits: int, k: int, signed: bool) -> Tensor:
        try:
            return apot_levels(n_bits, k, signed)
        except ValueError as e:
            raise ValueError(str(e).replace("apot_levels", type(self).__name__, 1)) from None

    @property
    def n_bits(self) -> int:
        """Bits per element; setting it rebuilds the codebook (a mixed-precision search changes it)."""
        return self._n_bits

    @n_bits.setter
    def n_bits(self, n_bits: int) -> None:
        codebook = self._codebook(n_bits, self.k, self.signed)
        self.codebook = codebook.to(self.codebook.device)
        self._n_bits = n_bits

    def __setstate__(self, state: dict) -> None:
        if "n_bits" in state:  # pickled when n_bits was a plain attribute
            state["_n_bits"] = state.pop("n_bits")
        super().__setstate__(state)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, k={self.k}, signed={self.signed}"
