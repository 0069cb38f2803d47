"""Range observers: modules that track the ``(min, max)`` range of the tensors they see.

A quantizer owns an observer and asks it for ranges; the observer knows nothing
about grids. Every observer takes the same granularity options (``axis`` and
``group_size``, see :mod:`torchquant.granularity`) and returns ranges that
broadcast against the observed tensor.

State (ranges, counters) lives in registered buffers, so it survives
``state_dict`` round trips and ``copy.deepcopy``. Buffers are empty until the
first observation and take their shape from it (or from a loaded state dict).

Writing a new observer means overriding :meth:`RangeObserver._update`, which gets
the batch's ``(min, max)`` at the observer's granularity, and, where the
observer keeps more state than its ranges, :meth:`RangeObserver.force_ranges`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .granularity import Granularity
from .quantizers_functional import compute_dtype
from .registry import register_observer

__all__ = ["BatchMinMax", "ExpAvgMinMax", "RangeObserver", "RunningMinMax"]


_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)


def _is_tracing() -> bool:
    """True under torch.compile / torch.export or torch.fx symbolic tracing."""
    return torch.compiler.is_compiling() or _fx_tracing()


class RangeObserver(nn.Module):
    """Base class of range observers.

    Args:
        axis: ``None`` (default) for per-tensor ranges, else the axis along which
            ranges differ (per-channel), e.g. ``0`` for the output channels of a
            weight or ``1`` for the channels of an ``(N, C, H, W)`` activation.
        group_size: with ``axis``, share one range among ``group_size``
            consecutive elements along ``axis`` (per-group).

    Subclasses implement :meth:`_update`.
    """

    min_val: Tensor
    max_val: Tensor

    def __init__(self, *, axis: int | None = None, group_size: int | None = None) -> None:
        super().__init__()
        self.granularity = Granularity(axis=axis, group_size=group_size)
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self._tq_name = type(self).__name__
        # Distributed training: when True, each batch's statistics are all-reduced over
        # ``process_group`` (None: the default group) before the update, so every rank holds
        # identical ranges. Set by torchquant.distributed.sync_observers; never implicit.
        self.distributed_sync = False
        self.process_group = None

    # ----------------------------------------------------------------- public API
    @property
    def initialized(self) -> bool:
        """Whether ranges exist (observed, forced or loaded)."""
        return self.min_val.numel() > 0

    def observe_batch(self, x: Tensor) -> None:
        """Update the ranges with a batch. ``x`` is any shape the granularity fits.

        Raises:
            TypeError: ``x`` is not floating point.
            ValueError: ``x`` contains NaN or Inf (ranges are left untouched), or
                the granularity does not fit ``x``'s shape.
        """
        if not x.is_floating_point():
            raise TypeError(f"{self._tq_name}: cannot observe a tensor of dtype {x.dtype}")
        x = x.detach()
        mn, mx = self.granularity.reduce(x, who=self._tq_name)  # compact shapes
        if self.distributed_sync:
            mn, mx = self._all_reduce_batch(mn, mx)
        self._check_finite(mn, mx)
        dt = compute_dtype(x)
        mn, mx = mn.to(dt), mx.to(dt)
        if not self.initialized:
            self._initialize(mn)
        elif mn.shape != self.min_val.shape:
            raise ValueError(
                f"{self._tq_name}: observed a tensor of shape {tuple(x.shape)} whose ranges have shape "
                f"{tuple(mn.shape)} at {self.granularity}, but earlier ranges have shape {tuple(self.min_val.shape)}"
            )
        self._update(mn.to(self.min_val.dtype), mx.to(self.min_val.dtype))

    def get_ranges(self) -> tuple[Tensor, Tensor]:
        """``(min, max)``, shaped to broadcast against the observed tensor.

        Raises:
            RuntimeError: nothing has been observed yet.
        """
        if not self.initialized:
            raise RuntimeError(
                f"{self._tq_name}: no ranges yet; calibrate first (run data through the model in a "
                "CALIBRATION or QUANT_AWARE_TRAIN mode) or call force_ranges()"
            )
        g = self.granularity
        return g.expand(self.min_val), g.expand(self.max_val)

    def force_ranges(self, min_val: Tensor | float, max_val: Tensor | float) -> None:
        """Set the ranges by hand (compact shape, or scalars for per-tensor)."""
        mn = torch.as_tensor(min_val, dtype=torch.get_default_dtype()).detach().clone()
        mx = torch.as_tensor(max_val, dtype=torch.get_default_dtype()).detach().clone()
        if mn.shape != mx.shape:
            raise ValueError(f"{self._tq_name}: min shape {tuple(mn.shape)} != max shape {tuple(mx.shape)}")
        if not (torch.isfinite(mn).all() and torch.isfinite(mx).all()):
            raise ValueError(f"{self._tq_name}: forced ranges must be finite, got {mn} and {mx}")
        if (mn > mx).any():
            raise ValueError(f"{self._tq_name}: forced min exceeds max: {mn} > {mx}")
        self._initialize(mn)
        self.min_val.copy_(mn)
        self.max_val.copy_(mx)

    def reset(self) -> None:
        """Forget everything observed."""
        for name, buf in list(self.named_buffers(recurse=False)):
            setattr(self, name, torch.empty(0, dtype=buf.dtype, device=buf.device))

    def extra_repr(self) -> str:
        return str(self.granularity)

    # --------------------------------------------------------------- for subclasses
    def _update(self, batch_min: Tensor, batch_max: Tensor) -> None:
        """Fold a batch's compact ``(min, max)`` into ``self.min_val`` / ``self.max_val``."""
        raise NotImplementedError

    def _all_reduce_batch(self, batch_min: Tensor, batch_max: Tensor) -> tuple[Tensor, Tensor]:
        """Combine a batch's compact ``(min, max)`` across ranks: min of mins, max of maxes.

        Non-finite values become -inf / +inf first, so that every rank sees them and
        raises together instead of one rank raising while the others wait. Observers
        with other batch statistics (histograms, say) override this.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return batch_min, batch_max
        mn = torch.where(torch.isfinite(batch_min), batch_min, -torch.inf).contiguous()
        mx = torch.where(torch.isfinite(batch_max), batch_max, torch.inf).contiguous()
        dist.all_reduce(mn, op=dist.ReduceOp.MIN, group=self.process_group)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=self.process_group)
        return mn, mx

    def _initialize(self, like: Tensor) -> None:
        """Allocate state buffers shaped like the compact range tensor ``like``."""
        device = self.min_val.device
        self.min_val = torch.zeros(like.shape, dtype=like.dtype, device=device)
        self.max_val = torch.zeros(like.shape, dtype=like.dtype, device=device)

    # -------------------------------------------------------------------- plumbing
    def _check_finite(self, mn: Tensor, mx: Tensor) -> None:
        # min/max propagate NaN and Inf, so checking the small reduced tensors
        # covers the whole batch. Skipped under tracing, where it would break the graph.
        if _is_tracing():
            return
        if not bool(torch.isfinite(mn).all() & torch.isfinite(mx).all()):
            raise ValueError(f"{self._tq_name}: observed data contains NaN or Inf; ranges left unchanged")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Buffers take the shape of what is loaded (they are empty before the first observation).
        for name, buf in self.named_buffers(recurse=False):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != buf.shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=buf.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


@register_observer("batch_minmax")
class BatchMinMax(RangeObserver):
    """The range of the most recent batch only.

    The natural choice for weights, which change every step of training.
    """

    def _update(self, batch_min: Tensor, batch_max: Tensor) -> None:
        self.min_val.copy_(batch_min)
        self.max_val.copy_(batch_max)


@register_observer("running_minmax")
class RunningMinMax(RangeObserver):
    """The smallest minimum and largest maximum over every batch observed.

    The usual post-training calibration rule (torch.ao's ``MinMaxObserver``).
    """

    num_batches: Tensor

    def __init__(self, *, axis: int | None = None, group_size: int | None = None) -> None:
        super().__init__(axis=axis, group_size=group_size)
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    def _update(self, batch_min: Tensor, batch_max: Tensor) -> None:
        first = self.num_batches == 0  # (), no host sync
        torch.where(first, batch_min, torch.minimum(self.min_val, batch_min), out=self.min_val)
        torch.where(first, batch_max, torch.maximum(self.max_val, batch_max), out=self.max_val)
        self.num_batches.add_(1)

    def force_ranges(self, min_val: Tensor | float, max_val: Tensor | float) -> None:
        super().force_ranges(min_val, max_val)
        self.num_batches.fill_(1)

    def reset(self) -> None:
        super().reset()
        self.num_batches = torch.zeros((), dtype=torch.long, device=self.num_batches.device)


@register_observer("ema_minmax")
class ExpAvgMinMax(RangeObserver):
    """Exponential moving average of batch minima and maxima, bias-corrected.

    ``ema <- momentum * ema + (1 - momentum) * batch`` starting from ``ema = 0``;
    the ranges are ``ema / (1 - momentum ** n)`` after ``n`` batches (the
    correction of Adam, Kingma & Ba 2015), so the first batch's range comes back
    unshrunk (up to float rounding).

    Args:
        momentum: weight of the past, in ``[0, 1)``.
        axis: granularity axis, as in :class:`RangeObserver`.
        group_size: granularity group size, as in :class:`RangeObserver`.
    """

    num_batches: Tensor
    ema_min: Tensor
    ema_max: Tensor

    def __init__(self, momentum: float = 0.9, *, axis: int | None = None, group_size: int | None = None) -> None:
        super().__init__(axis=axis, group_size=group_size)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"ExpAvgMinMax: momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema_min", torch.empty(0))
        self.register_buffer("ema_max", torch.empty(0))

    def _initialize(self, like: Tensor) -> None:
        super()._initialize(like)
        self.ema_min = torch.zeros_like(self.min_val)
        self.ema_max = torch.zeros_like(self.max_val)

    def _update(self, batch_min: Tensor, batch_max: Tensor) -> None:
        m = self.momentum
        self.num_batches.add_(1)
        self.ema_min.mul_(m).add_(batch_min, alpha=1.0 - m)
        self.ema_max.mul_(m).add_(batch_max, alpha=1.0 - m)
        correction = 1.0 - torch.pow(m, self.num_batches.to(self.ema_min.dtype))  # ()
        torch.div(self.ema_min, correction, out=self.min_val)
        torch.div(self.ema_max, correction, out=self.max_val)

    def force_ranges(self, min_val: Tensor | float, max_val: Tensor | float) -> None:
        super().force_ranges(min_val, max_val)
        # Continue the average from the forced ranges.
        if int(self.num_batches) == 0:
            self.num_batches.fill_(1)
        correction = 1.0 - self.momentum ** int(self.num_batches)
        self.ema_min = self.min_val * correction
        self.ema_max = self.max_val * correction

    def reset(self) -> None:
        super().reset()
        self.num_batches = torch.zeros((), dtype=torch.long, device=self.num_batches.device)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, {self.granularity}"
