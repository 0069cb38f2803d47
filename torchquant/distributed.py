"""Quantization under ``torch.distributed``: keeping range observers identical on every rank.

In data-parallel training each rank sees a different shard of every batch. The
learned parameters of quantizers stay identical because DistributedDataParallel
averages their gradients, and DDP's buffer broadcast keeps BatchNorm statistics
aligned; but a range observer updates its ranges from the data it sees, so
without help every rank would hold different quantization parameters.

:func:`sync_observers` switches every :class:`~torchquant.range_observers.RangeObserver`
of a model to all-reduce each batch's statistics before its update (min of the
minima, max of the maxima), so that after every step every rank holds the
ranges a single process would hold had it seen the concatenation of all ranks'
batches. It is an explicit call on one model, never a global mode::

    dist.init_process_group("gloo")
    model = tq.quantize_model(model, weights, acts, method="swap")
    tq.distributed.sync_observers(model)          # every observer of *this* model
    ddp = torch.nn.parallel.DistributedDataParallel(model)

Outside an initialised process group the synchronised observers behave exactly
as unsynchronised ones, so the same script runs in one process too. Learned
quantizers (LSQ, PACT) initialise their parameters on their first batch: run one
forward (a calibration batch) before wrapping the model in DDP, which registers the
parameters with the shapes they have then. Per-group observers are not reduced:
their ranges follow the tensor's other dimensions (a weight's rows, the same on
every rank, or an activation's samples, each rank's own).

Every rank must then run the same sequence of observing forwards (same number
of calibration batches, same modes), because each observation is a collective
operation; modes that do not observe (``QUANT_EVAL``, ``BYPASSED``) are free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .range_observers import RangeObserver

__all__ = ["merge_ranges", "observers", "sync_observers"]


def observers(model: nn.Module) -> list[tuple[str, RangeObserver]]:
    """Every :class:`~torchquant.range_observers.RangeObserver` in ``model`` with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RangeObserver)]


def merge_ranges(mins: Sequence[Tensor], maxs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Combine ranges held by several parties with the rule :func:`sync_observers` all-reduces with.

    The elementwise minimum of the minima and maximum of the maxima, after non-finite
    values become ``-inf`` / ``+inf`` (as in ``RangeObserver._all_reduce_batch``). Used
    where ranges are combined without a process group, e.g. by the federated server of
    :mod:`torchquant.integrations.flower`.

    Args:
        mins: one compact minimum per party, all of the same shape (``()`` per tensor,
            ``(C, 1, ...)`` per channel, ...).
        maxs: the matching maxima.

    Returns:
        ``(min, max)`` in the parties' shape.

    Raises:
        ValueError: no ranges, different numbers of minima and maxima, or shapes that differ.

    Example:
        >>> lo, hi = merge_ranges([torch.tensor([0.0, -2.0]), torch.tensor([-1.0, 0.5])],
        ...                       [torch.tensor([3.0, 1.0]), torch.tensor([2.0, 4.0])])
        >>> lo.tolist(), hi.tolist()
        ([-1.0, -2.0], [3.0, 4.0])
    """
    if len(mins) == 0 or len(mins) != len(maxs):
        raise ValueError(
            f"merge_ranges: expected as many minima as maxima (at least one), got {len(mins)} and {len(maxs)}"
        )
    shapes = {tuple(t.shape) for t in (*mins, *maxs)}
    if len(shapes) != 1:
        raise ValueError(f"merge_ranges: every range must have the same shape, got {sorted(shapes)}")
    mn = torch.stack([torch.where(torch.isfinite(t), t, -torch.inf) for t in mins]).amin(dim=0)
    mx = torch.stack([torch.where(torch.isfinite(t), t, torch.inf) for t in maxs]).amax(dim=0)
    return mn, mx


def sync_observers(model: nn.Module, process_group: Any = None, enabled: bool = True) -> int:
    """Make every range observer in ``model`` all-reduce its batch statistics across ranks.

    Sets ``distributed_sync`` and ``process_group`` on each observer. With
    ``enabled=False`` it switches synchronisation off again.

    Args:
        model: any module; its observers are found recursively.
        process_group: the ``torch.distributed`` group to reduce over; ``None`` is
            the default (world) group.
        enabled: switch synchronisation on (``True``) or off (``False``).

    Returns:
        The number of observers changed (0 for a model without range observers,
        for example one whose quantizers only have learned parameters, which DDP
        already keeps identical).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torchquant as tq
        >>> q = tq.AffineQuantizer(8, tq.ExpAvgMinMax())
        >>> sync_observers(q)
        1
        >>> q.range_observer.distributed_sync
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sync_observers: expected an nn.Module, got {type(model).__name__}")
    found = observers(model)
    for _, obs in found:
        obs.distributed_sync = bool(enabled)
        obs.process_group = process_group if enabled else None
    return len(found)
