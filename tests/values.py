"""Value-for-value comparison and awkward inputs, shared by the tests of the kernels and the custom ops."""

from __future__ import annotations

import torch


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical values: exact equality, NaN at the same positions (``a`` may be on another device).

    The sign of an exact zero is not compared: torch's own CPU path gives ``max(+0, -0)`` as
    ``-0`` with tensor bounds and ``+0`` with number bounds (the x86 max instruction returns
    its second operand for two zeros), and the kernels follow the number-bound path.
    """
    a = a.detach().cpu()
    b = b.detach().cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    na, nb = a.isnan(), b.isnan()
    return torch.equal(na, nb) and torch.equal(a[~na], b[~nb])


def special(shape: tuple[int, ...], scale: float = 3.0) -> torch.Tensor:
    """Random values with rounding ties, signed zeros' sources, NaN and infinities mixed in."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * scale
    flat = x.view(-1)
    vals = [0.5, 1.5, 2.5, -0.5, -2.5, -0.3, 0.0, float("nan"), float("inf"), float("-inf"), 1e30, -1e-30]
    flat[: len(vals)] = torch.tensor(vals)
    return x
