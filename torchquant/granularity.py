"""One description of quantization granularity, shared by every observer and quantizer.

A :class:`Granularity` is an axis and an optional group size:

* per-tensor: ``Granularity()``: one range for the whole tensor;
* per-channel: ``Granularity(axis=0)``: one range per index along ``axis``
  (the output channels of a ``Conv2d`` weight ``(C_out, C_in, kH, kW)``);
* per-group: ``Granularity(axis=1, group_size=128)``: one range per run of
  ``group_size`` consecutive elements along ``axis``, separately for every index
  of the other axes (the 4-bit LLM weight layout: a ``(out, in)`` weight gets
  ``(out, in // 128)`` ranges).

:meth:`Granularity.reduce` computes ``(min, max)`` in a compact shape (and
:meth:`Granularity.aggregate` a sum, mean or largest value),
:meth:`Granularity.expand` turns such a compact tensor into one that broadcasts
against the observed tensor, so quantizers never branch on granularity.
:meth:`Granularity.grouped` is the one per-group reshape they all use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PER_TENSOR", "Granularity", "per_channel", "per_group"]


@dataclass(frozen=True)
class Granularity:
    """Where quantization parameters change within a tensor.

    Args:
        axis: ``None`` for per-tensor, else the axis (negative counts from the end)
            along which ranges differ.
        group_size: with ``axis``, the number of consecutive elements along
            ``axis`` that share a range (per-group); ``None`` means per-channel.
    """

    axis: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.axis is not None and (isinstance(self.axis, bool) or not isinstance(self.axis, int)):
            raise TypeError(f"Granularity: axis must be an int or None, got {self.axis!r}")
        if self.group_size is not None:
            if self.axis is None:
                raise ValueError("Granularity: group_size needs an axis (per-group runs along one axis)")
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"Granularity: group_size must be a positive int, got {self.group_size!r}")

    @property
    def kind(self) -> str:
        """``"per_tensor"``, ``"per_channel"`` or ``"per_group"``."""
        if self.axis is None:
            return "per_tensor"
        return "per_channel" if self.group_size is None else "per_group"

    def __str__(self) -> str:
        if self.axis is None:
            return "per-tensor"
        if self.group_size is None:
            return f"per-channel(axis={self.axis})"
        return f"per-group(axis={self.axis}, size={self.group_size})"

    def check(self, shape: torch.Size, who: str = "observer") -> int | None:
        """Validate against a tensor shape and return the normalised axis.

        Raises:
            ValueError: naming ``who``, the tensor shape and the granularity when
                the axis does not exist or the group size does not divide it.
        """
        if self.axis is None:
            return None
        ndim = len(shape)
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"{who}: {self} does not fit a tensor of shape {tuple(shape)} (it has {ndim} dimensions)")
        axis = self.axis % ndim
        if self.group_size is not None and shape[axis] % self.group_size != 0:
            raise ValueError(
                f"{who}: {self} does not fit a tensor of shape {tuple(shape)}: "
                f"group size {self.group_size} does not divide dimension {axis} of size {shape[axis]}"
            )
        return axis

    def compact_shape(self, shape: torch.Size) -> tuple[int, ...]:
        """Shape of the compact per-range tensors for a tensor of ``shape``.

        ``()`` per-tensor; ``(1, .., C, .., 1)`` per-channel; per-group the
        tensor's shape with ``shape[axis]`` replaced by ``shape[axis] // group_size``.
        """
        axis = self.check(shape)
        if axis is None:
            return ()
        if self.group_size is None:
            return tuple(s if i == axis else 1 for i, s in enumerate(shape))
        return tuple(s // self.group_size if i == axis else s for i, s in enumerate(shape))

    def reduce(
        self, x: Tensor, who: str = "observer", out: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(min, max)`` of ``x`` at this granularity, in the compact shape.

        NaN propagates into the result (callers check finiteness once, on the
        small result, instead of scanning ``x`` twice).

        Args:
            x: the tensor to reduce.
            who: who to name in errors.
            out: two tensors of the compact shape and ``x``'s dtype and device to write
                into instead of allocating (an observer's staging buffers on the QAT path).
        """
        axis = self.check(x.shape, who)
        if axis is None:
            return torch.aminmax(x) if out is None else torch.aminmax(x, out=out)  # (...) -> (), ()
        if self.group_size is None:
            if axis == 0 and x.is_contiguous():
                c = x.shape[0]
                flat = x.reshape(c, -1)  # (C, -1) -> (C,)
                if out is not None:
                    torch.aminmax(flat, dim=1, out=(out[0].view(c), out[1].view(c)))
                    return out
                mn, mx = torch.aminmax(flat, dim=1)
                return mn.view(self.compact_shape(x.shape)), mx.view(self.compact_shape(x.shape))
            dims = tuple(i for i in range(x.dim()) if i != axis)
            if out is None:
                return torch.amin(x, dim=dims, keepdim=True), torch.amax(x, dim=dims, keepdim=True)
            torch.amin(x, dim=dims, keepdim=True, out=out[0])
            torch.amax(x, dim=dims, keepdim=True, out=out[1])
            return out
        split = self._split(x, axis)  # (.., n/g, g, ..) -> (.., n/g, ..)
        return torch.aminmax(split, dim=axis + 1) if out is None else torch.aminmax(split, dim=axis + 1, out=out)

    def aggregate(self, x: Tensor, op: str, who: str = "quantizer") -> Tensor:
        """``op`` (``"sum"``, ``"mean"`` or ``"amax"``) of ``x`` at this granularity, in the compact shape.

        Per-channel on a 1-d tensor (one element per channel) returns ``x`` itself.

        Raises:
            ValueError: the granularity does not fit ``x`` (naming ``who``).
        """
        fn = {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax}[op]
        axis = self.check(x.shape, who)
        if axis is None:
            return fn(x)
        if self.group_size is None:
            dims = tuple(i for i in range(x.dim()) if i != axis)
            return fn(x, dim=dims, keepdim=True) if dims else x
        return fn(self._split(x, axis), dim=axis + 1)  # (.., n/g, g, ..) -> (.., n/g, ..)

    def grouped(self, x: Tensor, who: str = "observer") -> Tensor:
        """``x`` with the group axis split in two: ``(.., n, ..) -> (.., n // group_size, group_size, ..)``.

        The elements that share a range then run along dimension ``axis + 1``
        (``axis`` counted from the front), so reducing over it gives the compact
        shape. A view where ``x``'s layout allows it.

        Raises:
            ValueError: the granularity is not per-group, or does not fit ``x`` (naming ``who``).

        Example:
            >>> per_group(4).grouped(torch.arange(16.0).view(2, 8)).shape
            torch.Size([2, 2, 4])
        """
        axis = self.check(x.shape, who)
        if axis is None or self.group_size is None:
            raise ValueError(f"{who}: grouped() needs a per-group granularity, got {self}")
        return self._split(x, axis)

    def _split(self, x: Tensor, axis: int) -> Tensor:
        # `axis` is normalised and checked by the caller (check() is not repeated on hot paths).
        g = self.group_size
        return x.reshape(*x.shape[:axis], x.shape[axis] // g, g, *x.shape[axis + 1 :])  # type: ignore[operator]

    def expand(self, r: Tensor) -> Tensor:
        """Make a compact per-range tensor broadcast against the observed tensor.

        Per-tensor and per-channel tensors already broadcast and come back as
        they are; per-group ones (which have the observed tensor's rank) are
        repeated ``group_size`` times along the axis.
        """
        if self.group_size is None or self.axis is None:
            return r
        return torch.repeat_interleave(r, self.group_size, dim=self.axis % r.dim())


PER_TENSOR = Granularity()


def per_channel(axis: int = 0) -> Granularity:
    """Per-channel granularity along ``axis`` (0: output channels of a weight)."""
    return Granularity(axis=axis)


def per_group(group_size: int, axis: int = -1) -> Granularity:
    """Per-group granularity: ``group_size`` consecutive elements along ``axis``."""
    return Granularity(axis=axis, group_size=group_size)
