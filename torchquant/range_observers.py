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

from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import kernels
from .granularity import Granularity
from .quantizers_functional import _is_tracing, compute_dtype
from .registry import register_observer
from .spec import RecordsInit

__all__ = [
    "BatchMinMax",
    "EntropyObserver",
    "ExpAvgMinMax",
    "HistogramRangeObserver",
    "MSEObserver",
    "PercentileObserver",
    "RangeObserver",
    "RunningMinMax",
]

# torch.compile before torch 2.14 loses in-place updates of 0-d float64 tensors (AOTAutograd: 2.11 and 2.13
# checked, 2.14 computes them): there an observer with such state (per-tensor ranges, ExpAvgMinMax's decay
# of a float64 model) updates outside the compiled graph, a graph break instead of ranges that never move.
_SCALAR_F64_UPDATES_LOST = torch.__version__ < "2.14"


@torch.compiler.disable
def _outside_the_graph(update: Callable[..., None], *args: Tensor) -> None:
    update(*args)


class RangeObserver(RecordsInit, nn.Module):
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
    # The update rule of torchquant.kernels.observe_minmax that equals this class's _update
    # (on CUDA one kernel then updates the state with no host sync); None: no kernel. Not
    # inherited: a subclass that changes the rule gets the generic path.
    _kernel_kind: int | None = None

    # True while the owning quantizer's forward pass runs (quantizers.base.forward_with_observer).
    _in_forward = False
    # (shape, dtype, device, min_val, (batch min, batch max), scratch) of the CUDA kernel path's last
    # batch: the buffers the next batch of that shape is reduced into, while min_val is the same, and
    # the scratch of kernels.observe_minmax_rows where that reduces it (None: it does not).
    _stage: tuple | None = None

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
        # Batches with NaN or Inf seen by the CUDA kernel path, counted on the device and
        # reported by the next host read of the ranges (_raise_deferred).
        self._nonfinite: Tensor | None = None
        self._unreported = False

    # ----------------------------------------------------------------- public API
    @property
    def initialized(self) -> bool:
        """Whether ranges exist (observed, forced or loaded)."""
        return self.min_val.numel() > 0

    def observe_batch(self, x: Tensor) -> None:
        """Update the ranges with a batch. ``x`` is any shape the granularity fits.

        On CUDA, once initialised, ``BatchMinMax``, ``RunningMinMax`` and ``ExpAvgMinMax``
        update their state in one kernel without a host synchronisation: a batch with NaN
        or Inf then leaves the ranges untouched and the ``ValueError`` is raised by the next
        host read of the ranges outside a quantizer's forward pass (:meth:`get_ranges`,
        from the quantizer's ``grid()``, export or debugging reports).

        An empty batch (a second-stage head given no detections, a rank whose data ran out)
        leaves the state as it is; with ``distributed_sync`` the rank still takes part in
        the all-reduce, so it ends with the same ranges as the ranks that had data.

        Raises:
            TypeError: ``x`` is not floating point.
            ValueError: ``x`` contains NaN or Inf (ranges are left untouched), or
                the granularity does not fit ``x``'s shape.
        """
        if not x.is_floating_point():
            raise TypeError(f"{self._tq_name}: cannot observe a tensor of dtype {x.dtype}")
        x = x.detach()
        kind = type(self).__dict__.get("_kernel_kind")
        if x.numel() == 0:
            ranges = self._empty_batch_ranges(x)
            if ranges is None:
                return
            mn, mx = ranges
        else:
            stage = self._stage
            if (
                stage is not None
                and kernels.enabled(x)  # first: under torch.compile nothing below is traced (no guards)
                and stage[0] == x.shape
                and stage[1] == x.dtype
                and stage[2] == x.device
                and stage[3] is self._buffers["min_val"]  # not reset, moved or reloaded with another shape since
                and not self.distributed_sync
            ):
                # The kernel path again, on a tensor like the last one: reduced and folded in one launch where
                # the ranges are x's consecutive rows, else reduced into the same buffers, then folded.
                if stage[5] is not None and self._observe_rows(kind, x, stage[5]):
                    return
                self._observe_kernel(kind, *self.granularity.reduce(x, self._tq_name, stage[4]))
                return
            mn, mx = self.granularity.reduce(x, who=self._tq_name)  # compact shapes
            # Per-group ranges follow the tensor's other dimensions: a weight's rows (the same on every rank)
            # or an activation's samples (each rank's own, in a shape that differs with the shard): not reduced.
            if self.distributed_sync and self.granularity.group_size is None:
                mn, mx = self._all_reduce_batch(mn, mx)
        if (
            kind is not None
            and self.initialized
            and kernels.enabled(x)
            and self.min_val.dtype == torch.float32
            and mn.shape == self.min_val.shape
        ):
            if not (self.distributed_sync or torch.is_inference_mode_enabled()):
                # Staging buffers for the next batches of this shape: the QAT call then
                # allocates nothing besides its output. (Not inference tensors: those could not
                # be written outside inference mode.)
                rows = self._observed_rows(x)
                scratch = None if rows is None else kernels.observe_scratch(rows, x.device)
                self.__dict__["_stage"] = (x.shape, x.dtype, x.device, self.min_val, (mn, mx), scratch)
            self._observe_kernel(kind, mn, mx)
            return
        self._fold(x, mn, mx)

    def _fold(self, x: Tensor, mn: Tensor, mx: Tensor) -> None:
        """Check the batch's compact ``(min, max)``, allocate the state at the first batch, update it."""
        self._check_finite(mn, mx)
        dt = compute_dtype(x)
        if mn.dtype != dt:
            mn, mx = mn.to(dt), mx.to(dt)
        if not self.initialized:
            self._initialize(mn)
        elif mn.shape != self.min_val.shape:
            raise ValueError(
                f"{self._tq_name}: observed a tensor of shape {tuple(x.shape)} whose ranges have shape "
                f"{tuple(mn.shape)} at {self.granularity}, but earlier ranges have shape {tuple(self.min_val.shape)}"
            )
        if mn.dtype != self.min_val.dtype:
            mn, mx = mn.to(self.min_val.dtype), mx.to(self.min_val.dtype)
        self._update_state(self._observe, x, mn, mx)

    def _update_state(self, update: Callable[..., None], *args: Tensor) -> None:
        """``update(*args)``; outside the compiled graph where torch.compile would lose its in-place updates of
        this observer's state (see ``_SCALAR_F64_UPDATES_LOST``)."""
        if (
            _SCALAR_F64_UPDATES_LOST
            and torch.compiler.is_compiling()
            and any(b is not None and b.dim() == 0 and b.dtype == torch.float64 for b in self._buffers.values())
        ):
            _outside_the_graph(update, *args)
        else:
            update(*args)

    def _empty_batch_ranges(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The ranges an empty batch contributes: none, except on a synchronised rank, which
        all-reduces the reduction's identity (``+inf`` / ``-inf``, in ``x``'s dtype as the other
        ranks' batch ranges are) and gets what the other ranks observed, to update its state with
        on the same path as they do (``None`` when no rank had data)."""
        self.granularity.check(x.shape, self._tq_name)  # the shape must still fit the granularity
        if not self.distributed_sync:
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        shape = self.granularity.compact_shape(x.shape)
        mn = torch.full(shape, torch.inf, dtype=x.dtype, device=x.device)
        mx = torch.full(shape, -torch.inf, dtype=x.dtype, device=x.device)
        dist.all_reduce(mn, op=dist.ReduceOp.MIN, group=self.process_group)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=self.process_group)
        if bool(torch.isposinf(mn).all()):  # the same on every rank: no rank had data
            return None
        return mn, mx

    def get_ranges(self) -> tuple[Tensor, Tensor]:
        """``(min, max)``, shaped to broadcast against the observed tensor.

        Raises:
            RuntimeError: nothing has been observed yet.
            ValueError: the CUDA kernel path skipped batches with NaN or Inf since the
                last read (see :meth:`observe_batch`).
        """
        self._raise_deferred()
        if not self.initialized:
            raise RuntimeError(
                f"{self._tq_name}: no ranges yet; calibrate first (run data through the model in a "
                "CALIBRATION or QUANT_AWARE_TRAIN mode) or call force_ranges()"
            )
        g = self.granularity
        return g.expand(self.min_val), g.expand(self.max_val)

    def force_ranges(self, min_val: Tensor | float, max_val: Tensor | float) -> None:
        """Set the ranges by hand (compact shape, or numbers: one range for every channel; per group only the
        compact shape)."""
        mn = torch.as_tensor(min_val, dtype=torch.get_default_dtype()).detach().clone()
        mx = torch.as_tensor(max_val, dtype=torch.get_default_dtype()).detach().clone()
        if mn.shape != mx.shape:
            raise ValueError(f"{self._tq_name}: min shape {tuple(mn.shape)} != max shape {tuple(mx.shape)}")
        if not (torch.isfinite(mn).all() and torch.isfinite(mx).all()):
            raise ValueError(f"{self._tq_name}: forced ranges must be finite, got {mn} and {mx}")
        if (mn > mx).any():
            raise ValueError(f"{self._tq_name}: forced min exceeds max: {mn} > {mx}")
        if self.granularity.group_size is not None and mn.dim() == 0:
            raise ValueError(
                f"{self._tq_name}: {self.granularity} ranges are forced in their compact shape (the tensor's, with "
                "n // group_size along the grouped axis), not as numbers"
            )
        self._initialize(mn)
        self.min_val.copy_(mn)
        self.max_val.copy_(mx)

    def reset(self) -> None:
        """Forget everything observed."""
        for name, buf in list(self.named_buffers(recurse=False)):
            setattr(self, name, torch.empty(0, dtype=buf.dtype, device=buf.device))
        self._nonfinite, self._unreported = None, False
        self.__dict__["_stage"] = None

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half(): the staging buffers would stay where they were; drop them.
        self.__dict__["_stage"] = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return str(self.granularity)

    # --------------------------------------------------------------- for subclasses
    def _update(self, batch_min: Tensor, batch_max: Tensor) -> None:
        """Fold a batch's compact ``(min, max)`` into ``self.min_val`` / ``self.max_val``."""
        raise NotImplementedError

    def _observe(self, x: Tensor, batch_min: Tensor, batch_max: Tensor) -> None:
        """Fold a validated batch into the state; by default ``self._update(batch_min, batch_max)``.

        Observers whose statistics need the values themselves (histograms) override
        this instead of :meth:`_update`; ``x`` is the detached batch, already checked
        to be finite and to fit the granularity.
        """
        self._update(batch_min, batch_max)

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
    def _observe_kernel(self, kind: int, mn: Tensor, mx: Tensor) -> None:
        """Update the state with :func:`torchquant.kernels.observe_minmax`: one launch, no host sync."""
        # The QAT hot path: buffers from _buffers and flags into __dict__, not through
        # nn.Module's __getattr__ / __setattr__ (about 1 us each).
        b = self._buffers
        kernels.observe_minmax(
            kind, mn, mx, b["min_val"], b["max_val"], self._nonfinite_count(), **self._kernel_state()
        )

    def _observe_rows(self, kind: int, x: Tensor, scratch: Tensor) -> bool:
        """Reduce ``x`` and update the state with :func:`torchquant.kernels.observe_minmax_rows`: one launch."""
        b = self._buffers
        min_val = b["min_val"]
        return kernels.observe_minmax_rows(
            kind, x, min_val.numel(), scratch, min_val, b["max_val"], self._nonfinite_count(), **self._kernel_state()
        )

    def _observed_rows(self, x: Tensor) -> int | None:
        """The number of ranges where they belong to ``x``'s consecutive rows (per tensor, per channel along the
        first axis, per group along the last) and ``x`` is laid out in them (contiguous; per tensor, any dense
        layout), as :func:`torchquant.kernels.observe_minmax_rows` reduces them; ``None`` where they do not, or
        are too many for it."""
        g = self.granularity
        axis = None if g.axis is None else g.axis % x.dim()
        if not (axis is None or (axis == 0 and g.group_size is None) or (axis == x.dim() - 1 and g.group_size)):
            return None
        rows = self.min_val.numel()
        return rows if rows <= kernels.MAX_OBSERVED_ROWS and kernels._dense(x, rows > 1) else None

    def _nonfinite_count(self) -> Tensor:
        """The device's count of skipped non-finite batches, marked as not yet reported."""
        d = self.__dict__
        nonfinite = d.get("_nonfinite")
        min_val = self._buffers["min_val"]
        if nonfinite is None or nonfinite.device != min_val.device:
            nonfinite = d["_nonfinite"] = torch.zeros((), dtype=torch.int32, device=min_val.device)
        d["_unreported"] = True
        return nonfinite

    def _kernel_state(self) -> dict:
        """The state :func:`torchquant.kernels.observe_minmax` updates besides the ranges."""
        return {}

    def _raise_deferred(self) -> None:
        # The kernel path's finiteness check, read on the host here (one sync) and only
        # when that path ran since the last read; not during a quantizer's forward pass
        # (quantizers.base.forward_with_observer), which then makes no host sync.
        if not self._unreported or self._in_forward:
            return
        self._unreported = False
        bad = int(self._nonfinite.item())
        if bad:
            self._nonfinite.zero_()
            raise ValueError(
                f"{self._tq_name}: {bad} observed batch(es) contained NaN or Inf; they were skipped "
                "and the ranges left unchanged"
            )

    def _check_finite(self, mn: Tensor, mx: Tensor) -> None:
        # min/max propagate NaN and Inf, so checking the small reduced tensors
        # covers the whole batch. Skipped under tracing, where it would break the graph.
        if _is_tracing():
            return
        # x - x is 0 for finite x and NaN for +-inf and NaN: one host sync, few small ops.
        bad = (mn - mn).add_(mx - mx)
        if bad.dim():
            bad = bad.sum()
        if bad.item() != 0:
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

    _kernel_kind = kernels.KIND_BATCH

    def _update(self, batch_min: Tensor, batch_max: Tensor) -> None:
        self.min_val.copy_(batch_min)
        self.max_val.copy_(batch_max)


@register_observer("running_minmax")
class RunningMinMax(RangeObserver):
    """The smallest minimum and largest maximum over every batch observed.

    The usual post-training calibration rule (torch.ao's ``MinMaxObserver``).
    """

    num_batches: Tensor
    _kernel_kind = kernels.KIND_RUNNING

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

    def _kernel_state(self) -> dict:
        return {"num_batches": self._buffers["num_batches"]}

    def reset(self) -> None:
        super().reset()
        self.num_batches = torch.zeros((), dtype=torch.long, device=self.num_batches.device)


@register_observer("ema_minmax")
class ExpAvgMinMax(RangeObserver):
    """Exponential moving average of batch minima and maxima, bias-corrected.

    ``ema <- momentum * ema + (1 - momentum) * batch`` starting from ``ema = 0``;
    the ranges are ``ema / (1 - momentum ** n)`` after ``n`` batches (the
    correction of Adam, Kingma & Ba 2015), so the first batch's range comes back
    unshrunk (up to float rounding). ``momentum ** n`` is kept as a running product
    (the buffer ``decay``; rebuilt from ``num_batches`` when a state dict saved without
    it is loaded): under ``torch.compile`` no power is computed inside the
    quantization kernels.

    Args:
        momentum: weight of the past, in ``[0, 1)``.
        axis: granularity axis, as in :class:`RangeObserver`.
        group_size: granularity group size, as in :class:`RangeObserver`.
    """

    num_batches: Tensor
    ema_min: Tensor
    ema_max: Tensor
    decay: Tensor
    _kernel_kind = kernels.KIND_EMA

    def __init__(self, momentum: float = 0.9, *, axis: int | None = None, group_size: int | None = None) -> None:
        super().__init__(axis=axis, group_size=group_size)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"ExpAvgMinMax: momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema_min", torch.empty(0))
        self.register_buffer("ema_max", torch.empty(0))
        self.register_buffer("decay", torch.ones(()))  # momentum ** num_batches, a running product

    def _initialize(self, like: Tensor) -> None:
        super()._initialize(like)
        self.ema_min = torch.zeros_like(self.min_val)
        self.ema_max = torch.zeros_like(self.max_val)
        self._set_decay()

    def _set_decay(self) -> None:
        """``decay = momentum ** num_batches``, in the dtype of the ranges (tensor ops: no host sync,
        no graph break when the first observation happens under ``torch.compile``)."""
        dtype = self.min_val.dtype if self.min_val.is_floating_point() else torch.get_default_dtype()
        base = torch.full((), self.momentum, dtype=dtype, device=self.num_batches.device)
        self.decay = base.pow(self.num_batches.to(dtype))

    def _update(self, batch_min: Tensor, batch_max: Tensor) -> None:
        m = self.momentum
        self.num_batches.add_(1)
        self.decay.mul_(m)
        emas = (self.ema_min, self.ema_max)
        # Both updates in one call each: fewer small ops. The batch term is its own product
        # (no fused multiply-add), so every backend and the CUDA kernel round alike.
        torch._foreach_mul_(emas, m)
        torch._foreach_add_(emas, torch._foreach_mul((batch_min, batch_max), 1.0 - m))
        correction = 1.0 - self.decay  # ()
        torch.div(self.ema_min, correction, out=self.min_val)
        torch.div(self.ema_max, correction, out=self.max_val)

    def _kernel_state(self) -> dict:
        b = self._buffers
        return {
            "num_batches": b["num_batches"],
            "ema_min": b["ema_min"],
            "ema_max": b["ema_max"],
            "decay": b["decay"],
            "momentum": self.momentum,
        }

    def force_ranges(self, min_val: Tensor | float, max_val: Tensor | float) -> None:
        super().force_ranges(min_val, max_val)
        # Continue the average from the forced ranges.
        if int(self.num_batches) == 0:
            self.num_batches.fill_(1)
        self._set_decay()
        correction = 1.0 - self.decay
        self.ema_min = self.min_val * correction
        self.ema_max = self.max_val * correction

    def reset(self) -> None:
        super().reset()
        self.num_batches = torch.zeros((), dtype=torch.long, device=self.num_batches.device)
        self._set_decay()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if prefix + "decay" not in state_dict:  # saved before decay existed: rebuilt from num_batches
            self._set_decay()
            if prefix + "decay" in missing:
                missing.remove(prefix + "decay")

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, {self.granularity}"


# The exponential moving average of min/max *is* the moving-average min/max observer
# (Jacob et al. 2018, section 3.1): one class, two registry names.
register_observer("moving_avg_minmax")(ExpAvgMinMax)


# ------------------------------------------------------------------ histogram observers
_GOLDEN = 0.6180339887498949
_MAX_HIST_CELLS = 2**26  # ranges x bins; 512 MiB of float64 counts


_SAMPLE_POSITIONS: dict[tuple[int, int, str], Tensor] = {}


def _sample_positions(m: int, s: int, device: torch.device) -> Tensor:
    """``s`` sorted positions in ``range(m)``: one per stratum of ``m / s``, golden-ratio offsets (cached)."""
    key = (m, s, str(device))
    idx = _SAMPLE_POSITIONS.get(key)
    if idx is None:
        if len(_SAMPLE_POSITIONS) > 256:
            _SAMPLE_POSITIONS.clear()
        k = torch.arange(s, dtype=torch.float64)
        idx = torch.floor((k + torch.remainder(k * _GOLDEN, 1.0)) * (m / s)).long().clamp_(max=m - 1).to(device)
        _SAMPLE_POSITIONS[key] = idx
    return idx


def _check_int(value: object, name: str, who: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{who}: {name} must be an int >= {low}, got {value!r}")
    return value


class HistogramRangeObserver(RangeObserver):
    """Base class of observers that choose ranges from a histogram of the observed values.

    Every batch adds to one histogram of ``bins`` bins per range (per tensor,
    channel or group); the histogram spans the running ``[min, max]`` of the
    values (``[0, max |x|]`` when ``abs_values``) and is re-binned onto the wider
    span when a batch extends it: each old bin's count moves to the new bin that
    holds its centre, so a histogram widened ``k`` times is blurred by at most
    ``k`` bins. Subclasses implement :meth:`_ranges_from_histogram`.

    Cost. Per batch the hot path is the ``(min, max)`` reduction of the base class,
    a gather of at most ``max_samples`` values per range and a scatter-add into the
    histogram, all on the tensor's device and without host synchronisation beyond the
    base class's finiteness check. Values are sampled at the fixed positions
    ``floor((k + frac(k * 0.618...)) * M / max_samples)``, ``k = 0 .. max_samples - 1``
    (one value in each of ``max_samples`` equal strata of the ``M`` values of a range,
    at a golden-ratio offset within the stratum so that no regular stride of the
    tensor's layout aliases with it: deterministic, no random state); ranges with at most ``max_samples`` values are
    histogrammed in full, and ``max_samples=None`` always does so. The search that
    turns the histogram into ranges runs lazily, once, the first time
    :meth:`get_ranges` is called after new observations (the ranges are cached in
    ``min_val`` / ``max_val``, keyed on ``num_batches`` vs ``ranges_version``), so
    calibration pays for it once rather than per batch. The observers are meant for
    calibration; in QAT they would repeat the search every step.

    Distributed: the batch ``(min, max)`` is all-reduced by the base class (so all
    ranks share the histogram's span) and the batch histogram is then summed over
    ranks, so every rank holds the same histogram.

    Args:
        bins: histogram bins per range.
        max_samples: most values per range histogrammed per batch, or ``None`` for all.
        abs_values: histogram ``|x|`` over ``[0, max |x|]`` instead of ``x`` over ``[min, max]``.
        axis: granularity axis, as in :class:`RangeObserver`.
        group_size: granularity group size, as in :class:`RangeObserver`.

    Raises:
        ValueError: ``bins`` < 2 or ``max_samples`` < 1.
    """

    num_batches: Tensor
    ranges_version: Tensor
    hist: Tensor
    data_min: Tensor
    data_max: Tensor

    def __init__(
        self,
        *,
        bins: int = 2048,
        max_samples: int | None = 2**15,
        abs_values: bool = False,
        axis: int | None = None,
        group_size: int | None = None,
    ) -> None:
        super().__init__(axis=axis, group_size=group_size)
        who = type(self).__name__
        self.bins = _check_int(bins, "bins", who, 2)
        self.max_samples = None if max_samples is None else _check_int(max_samples, "max_samples", who, 1)
        self.abs_values = bool(abs_values)
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("ranges_version", torch.zeros((), dtype=torch.long))
        self.register_buffer("hist", torch.empty(0, dtype=torch.float64))  # (R, bins) counts
        self.register_buffer("data_min", torch.empty(0))  # (R,) running min of x
        self.register_buffer("data_max", torch.empty(0))  # (R,) running max of x
        self.register_buffer("zero_count", torch.empty(0, dtype=torch.float64))  # (R,) values exactly 0
        self._stale = False  # Python mirror of num_batches != ranges_version (no sync on read)
        self._skip_zeros = False  # subclasses may leave exact zeros out of the histogram

    # ------------------------------------------------------------------ public API
    def get_ranges(self) -> tuple[Tensor, Tensor]:
        """``(min, max)`` chosen from the histogram (computed now if new batches arrived).

        Raises:
            RuntimeError: nothing has been observed yet.
        """
        if self._stale and self.initialized:
            self._update_state(self._compute_ranges)
        return super().get_ranges()

    def force_ranges(self, min_val: Tensor | float, max_val: Tensor | float) -> None:
        """Set the ranges by hand; the histogram starts afresh at the next observation."""
        super().force_ranges(min_val, max_val)
        self._stale = False

    def reset(self) -> None:
        super().reset()
        device = self.num_batches.device
        self.num_batches = torch.zeros((), dtype=torch.long, device=device)
        self.ranges_version = torch.zeros((), dtype=torch.long, device=device)
        self.hist = torch.empty(0, dtype=torch.float64, device=device)
        self.zero_count = torch.empty(0, dtype=torch.float64, device=device)
        self._stale = False

    def histogram(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(counts, low, high)``: counts ``(R, bins)`` over ``[low, high]`` ``(R,)`` per range."""
        lo, hi = self._edges(self.data_min, self.data_max)
        return self.hist, lo, hi

    def extra_repr(self) -> str:
        return f"bins={self.bins}, max_samples={self.max_samples}, {self.granularity}"

    # --------------------------------------------------------------- for subclasses
    def _ranges_from_histogram(self, hist: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Ranges from counts ``hist`` ``(R, bins)`` (float64) over ``[lo, hi]`` ``(R,)``.

        Returns ``(min, max)``, each ``(R,)``. Vectorised over the ``R`` ranges.
        """
        raise NotImplementedError

    # -------------------------------------------------------------------- plumbing
    def _initialize(self, like: Tensor) -> None:
        super()._initialize(like)
        n_ranges = like.numel()
        if n_ranges * self.bins > _MAX_HIST_CELLS:
            raise ValueError(
                f"{self._tq_name}: {n_ranges} ranges x {self.bins} bins exceeds {_MAX_HIST_CELLS} histogram cells; "
                "use fewer bins or a coarser granularity"
            )
        device = self.min_val.device
        self.hist = torch.zeros(n_ranges, self.bins, dtype=torch.float64, device=device)
        self.data_min = torch.zeros(n_ranges, dtype=like.dtype, device=device)
        self.data_max = torch.zeros(n_ranges, dtype=like.dtype, device=device)
        self.zero_count = torch.zeros(n_ranges, dtype=torch.float64, device=device)
        self.num_batches = torch.zeros((), dtype=torch.long, device=device)
        self.ranges_version = torch.zeros((), dtype=torch.long, device=device)

    def _edges(self, mn: Tensor, mx: Tensor) -> tuple[Tensor, Tensor]:
        if self.abs_values:
            return torch.zeros_like(mn), torch.maximum(-mn, mx).clamp_(min=0.0)
        return mn, mx

    def _observe(self, x: Tensor, batch_min: Tensor, batch_max: Tensor) -> None:
        first = self.num_batches == 0  # (), no host sync
        new_min = torch.where(first, batch_min.reshape(-1), torch.minimum(self.data_min, batch_min.reshape(-1)))
        new_max = torch.where(first, batch_max.reshape(-1), torch.maximum(self.data_max, batch_max.reshape(-1)))
        old_lo, old_hi = self._edges(self.data_min, self.data_max)
        lo, hi = self._edges(new_min, new_max)
        hist = self._rebin(self.hist, old_lo, old_hi, lo, hi)  # (R, B); all zeros before the first batch
        batch, zeros = self._batch_histogram(x, lo, hi)  # (R, B), (R,)
        if self.distributed_sync:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                both = torch.cat([batch, zeros[:, None]], 1)
                dist.all_reduce(both, op=dist.ReduceOp.SUM, group=self.process_group)
                batch, zeros = both[:, :-1], both[:, -1]
        self.hist = hist.add_(batch)
        self.zero_count.add_(zeros)
        self.data_min.copy_(new_min)
        self.data_max.copy_(new_max)
        self.num_batches.add_(1)
        self._stale = True

    def _rows(self, x: Tensor) -> Tensor:
        """``x`` as ``(R, M)``: one row of values per range, rows in compact (row-major) order."""
        g = self.granularity
        axis = g.check(x.shape, self._tq_name)
        if axis is None:
            return x.reshape(1, -1)
        if g.group_size is None:
            return x.movedim(axis, 0).reshape(x.shape[axis], -1)
        return g.grouped(x, self._tq_name).movedim(axis + 1, -1).reshape(-1, g.group_size)

    def _sample(self, rows: Tensor) -> Tensor:
        m = rows.shape[1]
        if self.max_samples is None or m <= self.max_samples:
            return rows
        return rows.index_select(1, _sample_positions(m, self.max_samples, rows.device))  # (R, M) -> (R, S)

    def _batch_histogram(self, x: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        rows = self._sample(self._rows(x)).to(lo.dtype)  # (R, S)
        if self.abs_values:
            rows = rows.abs()
        n_ranges, n_bins = lo.shape[0], self.bins
        # bins per unit; 0 for a range of one value (all in bin 0), where n_bins / width would be inf
        # and 0 * inf NaN; clamped where a subnormal width would overflow it
        width = hi - lo
        per_unit = torch.where(width > 0, n_bins / width.clamp(min=torch.finfo(lo.dtype).tiny), 0.0)
        per_unit = per_unit.clamp_(max=torch.finfo(lo.dtype).max)
        scale = per_unit[:, None]  # (R, 1)
        # (x - lo) * scale >= 0, so after the clamp .long() (truncation) is floor; in-place floor_ is
        # needlessly slow on CPU in some torch builds
        idx = torch.addcmul(-lo[:, None] * scale, rows, scale).clamp_(0, n_bins - 1).long()  # (R, S)
        if n_ranges > 1:
            idx += torch.arange(0, n_ranges * n_bins, n_bins, device=idx.device)[:, None]
        counts = torch.zeros(n_ranges * n_bins, dtype=torch.float64, device=idx.device)
        counts.index_add_(
            0, idx.reshape(-1), torch.ones((), dtype=torch.float64, device=idx.device).expand(idx.numel())
        )
        counts = counts.view(n_ranges, n_bins)
        zeros = (rows == 0).sum(1).to(counts.dtype)  # (R,)
        if self._skip_zeros:  # zeros landed in the bin holding 0: take them out again
            zero_bin = ((0.0 - lo) * per_unit).clamp_(0, n_bins - 1).long()  # (R,), floor as above
            counts.scatter_add_(1, zero_bin[:, None], -zeros[:, None])
        return counts, zeros

    def _rebin(self, hist: Tensor, lo: Tensor, hi: Tensor, new_lo: Tensor, new_hi: Tensor) -> Tensor:
        n_bins = self.bins
        dt = torch.float64
        lo, hi, new_lo, new_hi = lo.to(dt), hi.to(dt), new_lo.to(dt), new_hi.to(dt)
        centres = (
            lo[:, None] + (torch.arange(n_bins, dtype=dt, device=hist.device) + 0.5) * ((hi - lo) / n_bins)[:, None]
        )
        new_width = ((new_hi - new_lo) / n_bins).clamp_(min=torch.finfo(dt).tiny)
        idx = ((centres - new_lo[:, None]) / new_width[:, None]).clamp_(0, n_bins - 1).long()  # (R, B), floor
        return torch.zeros_like(hist).scatter_add_(1, idx, hist)

    @torch.no_grad()
    def _compute_ranges(self) -> None:
        lo, hi = self._edges(self.data_min, self.data_max)
        mn, mx = self._ranges_from_histogram(self.hist, lo.to(torch.float64), hi.to(torch.float64))
        self.min_val.copy_(mn.reshape(self.min_val.shape))
        self.max_val.copy_(mx.reshape(self.max_val.shape))
        self.ranges_version.copy_(self.num_batches)
        self._stale = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        # One host sync at load time, never in forward.
        self._stale = bool(self.initialized and int(self.num_batches) != int(self.ranges_version))


def _quantile_from_histogram(hist: Tensor, lo: Tensor, hi: Tensor, q: float) -> Tensor:
    """The ``q``-quantile ``(R,)`` of counts ``(R, B)`` over ``[lo, hi]``, linear within a bin."""
    n_bins = hist.shape[1]
    cdf = hist.cumsum(1)  # (R, B)
    target = cdf[:, -1:] * q  # (R, 1)
    j = torch.searchsorted(cdf, target).clamp_(max=n_bins - 1)  # first bin whose cdf reaches the target
    count = hist.gather(1, j)
    before = cdf.gather(1, j) - count
    within = ((target - before) / count.clamp(min=1e-300)).clamp_(0.0, 1.0)
    return lo + (j + within).squeeze(1) * ((hi - lo) / n_bins)


@register_observer("percentile")
class PercentileObserver(HistogramRangeObserver):
    """The ``100 - p`` and ``p`` percentiles of all values observed (e.g. 0.01 % and 99.99 %).

    Clipping the rare extreme values leaves more grid levels for the bulk of the
    distribution (McKinstry et al. 2018; Wu et al. 2020, "Integer quantization for
    deep learning inference", which calibrates with the 99.9 % to 99.999 % percentiles).

    The percentiles are read from the histogram accumulated over every batch
    (see :class:`HistogramRangeObserver`), so the running combination is the
    percentile of all data seen, not an average of per-batch percentiles; the
    estimate interpolates linearly inside a bin, so it is exact to within one bin
    width ``(max - min) / bins`` for the sampled values. With the default
    ``max_samples=2**15`` a 99.99 % percentile rests on about 3 sampled values per
    batch beyond it (60 over 20 batches); raise ``max_samples`` for more extreme
    percentiles or fewer batches.

    Args:
        percentile: ``p`` in ``(50, 100]``; the range is ``[P_{100-p}, P_p]``.
        bins: histogram bins, as in :class:`HistogramRangeObserver`.
        max_samples: values histogrammed per batch, as in :class:`HistogramRangeObserver`.
        axis: granularity axis, as in :class:`RangeObserver`.
        group_size: granularity group size, as in :class:`RangeObserver`.

    Raises:
        ValueError: ``percentile`` outside ``(50, 100]``.

    Examples:
        >>> import torch
        >>> o = PercentileObserver(99.0)
        >>> o.observe_batch(torch.cat([torch.linspace(-1, 1, 999), torch.tensor([100.0])]))
        >>> [round(float(r), 1) for r in o.get_ranges()]
        [-1.0, 1.0]
    """

    def __init__(
        self,
        percentile: float = 99.99,
        *,
        bins: int = 2048,
        max_samples: int | None = 2**15,
        axis: int | None = None,
        group_size: int | None = None,
    ) -> None:
        super().__init__(bins=bins, max_samples=max_samples, axis=axis, group_size=group_size)
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50 < percentile <= 100:
            raise ValueError(f"PercentileObserver: percentile must be in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def _ranges_from_histogram(self, hist: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        p = self.percentile / 100.0
        return _quantile_from_histogram(hist, lo, hi, 1.0 - p), _quantile_from_histogram(hist, lo, hi, p)

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, {super().extra_repr()}"


@register_observer("mse")
class MSEObserver(HistogramRangeObserver):
    """The clipping range that minimises the mean squared quantization error.

    Candidates are the observed range shrunk by ``alpha`` in
    ``{1/n, 2/n, ..., 1}`` (``n = n_candidates``): ``[alpha * min, alpha * max]``.
    Each candidate's grid is the one an :class:`~torchquant.AffineQuantizer` with
    ``n_bits`` and ``symmetric`` would build from it (range relaxed to include 0,
    ``zero_point`` rounded, step ``delta``, edges ``g_lo``/``g_hi``), and its error
    is the usual additive model (Banner et al. 2019, ACIQ; Nagel et al. 2021, "A
    white paper on neural network quantization", section 3.4): uniform rounding
    noise ``delta ** 2 / 12`` for every value inside ``[g_lo, g_hi]`` except exact
    zeros (which the grid holds exactly, e.g. after a ReLU), plus the squared
    distance to the nearer edge for every value outside, with values read from the
    histogram's bin centres. The smallest error wins (the largest ``alpha`` on
    ties). With prefix sums of the histogram every candidate costs O(1), so the
    search is vectorised over candidates and ranges (per channel: all channels at
    once) and runs lazily when ranges are read.

    Args:
        n_bits: bit-width of the quantizer the range is for.
        symmetric: whether that quantizer is symmetric.
        n_candidates: number of shrink factors tried.
        bins: histogram bins, as in :class:`HistogramRangeObserver`.
        max_samples: values histogrammed per batch, as in :class:`HistogramRangeObserver`.
        axis: granularity axis, as in :class:`RangeObserver`.
        group_size: granularity group size, as in :class:`RangeObserver`.

    Raises:
        ValueError: ``n_bits`` outside 1..16 or ``n_candidates`` < 1.

    Examples:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x = torch.randn(100_000)
        >>> o = MSEObserver(n_bits=4, symmetric=True)
        >>> o.observe_batch(x)
        >>> bool(o.get_ranges()[1] < x.abs().max() / 1.5)  # 4 bits: clip hard
        True
    """

    def __init__(
        self,
        n_bits: int = 8,
        symmetric: bool = False,
        *,
        n_candidates: int = 100,
        bins: int = 2048,
        max_samples: int | None = 2**15,
        axis: int | None = None,
        group_size: int | None = None,
    ) -> None:
        super().__init__(bins=bins, max_samples=max_samples, axis=axis, group_size=group_size)
        if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 1 <= n_bits <= 16:
            raise ValueError(f"MSEObserver: n_bits must be an int in [1, 16], got {n_bits!r}")
        self.n_bits = n_bits
        self.symmetric = bool(symmetric)
        self.n_candidates = _check_int(n_candidates, "n_candidates", "MSEObserver", 1)

    def _ranges_from_histogram(self, hist: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        n_bins = hist.shape[1]
        n_levels = 2**self.n_bits
        dt, dev = hist.dtype, hist.device
        width = ((hi - lo) / n_bins).clamp(min=torch.finfo(dt).tiny)  # (R,)
        centres = lo[:, None] + (torch.arange(n_bins, dtype=dt, device=dev) + 0.5) * width[:, None]  # (R, B)
        zero = torch.zeros_like(hist[:, :1])
        c0 = torch.cat([zero, hist.cumsum(1)], 1)  # (R, B+1): count of bins < j
        c1 = torch.cat([zero, (hist * centres).cumsum(1)], 1)  # sum of values
        c2 = torch.cat([zero, (hist * centres * centres).cumsum(1)], 1)  # sum of squares
        # largest alpha first, so that argmin keeps the widest range on ties
        alphas = torch.arange(self.n_candidates, 0, -1, dtype=dt, device=dev) / self.n_candidates  # (K,)
        mn = (alphas[:, None] * lo).clamp(max=0.0)  # (K, R)
        mx = (alphas[:, None] * hi).clamp(min=0.0)
        if self.symmetric:
            mx = torch.maximum(-mn, mx)
            mn = -mx
        delta = ((mx - mn) / (n_levels - 1)).clamp_(min=torch.finfo(torch.float32).eps)
        zp = torch.round(-mn / delta)
        g_lo, g_hi = -zp * delta, (n_levels - 1 - zp) * delta  # grid edges (K, R)
        # bins 0 .. j_lo-1 have centres below g_lo, bins j_hi .. B-1 above g_hi
        j_lo = torch.ceil((g_lo - lo) / width - 0.5).clamp_(0, n_bins).long().T  # (R, K)
        j_hi = (torch.floor((g_hi - lo) / width - 0.5) + 1).clamp_(0, n_bins).long().T
        g_lo, g_hi, delta = g_lo.T, g_hi.T, delta.T  # (R, K)
        n_lo, s_lo, q_lo = c0.gather(1, j_lo), c1.gather(1, j_lo), c2.gather(1, j_lo)
        n_hi, s_hi, q_hi = c0.gather(1, j_hi), c1.gather(1, j_hi), c2.gather(1, j_hi)
        clip_lo = q_lo - 2 * g_lo * s_lo + g_lo * g_lo * n_lo  # sum of (c - g_lo)^2 below
        clip_hi = (c2[:, -1:] - q_hi) - 2 * g_hi * (c1[:, -1:] - s_hi) + g_hi * g_hi * (c0[:, -1:] - n_hi)
        inside = (n_hi - n_lo - self.zero_count[:, None]).clamp_(min=0.0)
        err = inside * delta * delta / 12 + clip_lo.clamp_(min=0.0) + clip_hi.clamp_(min=0.0)  # (R, K)
        best = alphas[err.argmin(1)]  # (R,), first minimum: the largest alpha
        return best * lo, best * hi

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, symmetric={self.symmetric}, {super().extra_repr()}"


@register_observer("entropy")
class EntropyObserver(HistogramRangeObserver):
    """Entropy (KL-divergence) calibration, as TensorRT describes it (Migacz 2017).

    A histogram of ``|x|`` with ``bins`` bins (2048 in TensorRT) over
    ``[0, max |x|]`` is accumulated over all batches. For every candidate
    threshold bin ``i`` from ``L`` to ``bins`` (``L = 2 ** (n_bits - 1)`` levels
    per side when the range holds negative values, ``2 ** n_bits`` otherwise):

    * the reference distribution ``P`` is bins ``0 .. i-1``, with the counts of
      all bins beyond (the outliers) added to bin ``i-1``;
    * the candidate ``Q`` merges bins ``0 .. i-1`` (without the outliers) into
      ``L`` consecutive groups (group ``k`` spans bins ``floor(k i / L)`` to
      ``floor((k+1) i / L) - 1``) and spreads each group's count evenly over the
      group's non-empty bins;
    * both are normalised and ``KL(P || Q)`` is computed (``+inf`` where
      ``P > 0 = Q``, which happens only in bin ``i-1``).

    The threshold is ``T = (i* + 0.5) * bin_width`` for the minimising ``i*``, and
    the range is ``[max(min, -T), min(max, T)]``. The divergences of all
    candidates are evaluated at once from prefix sums (no loop over candidates),
    lazily when ranges are read.

    The exact zeros that a ReLU produces pile up in bin 0, which ``Q`` cannot
    represent when it merges bin 0 with its neighbours; the divergence then favours
    small thresholds. ``skip_zeros=True`` leaves exact zeros out of the histogram
    (as NVIDIA's pytorch-quantization calibrator optionally does).

    Args:
        n_bits: bit-width of the quantizer the range is for.
        skip_zeros: leave values equal to 0 out of the histogram.
        bins: histogram bins, as in :class:`HistogramRangeObserver`.
        max_samples: values histogrammed per batch, as in :class:`HistogramRangeObserver`.
        axis: granularity axis, as in :class:`RangeObserver`.
        group_size: granularity group size, as in :class:`RangeObserver`.

    Raises:
        ValueError: ``n_bits`` < 1 or ``bins`` < ``2 ** n_bits``.

    Examples:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x = torch.randn(100_000).relu()
        >>> o = EntropyObserver(n_bits=8)
        >>> o.observe_batch(x)
        >>> mn, mx = o.get_ranges()
        >>> float(mn), bool(mx < x.max())
        (0.0, True)
    """

    def __init__(
        self,
        n_bits: int = 8,
        *,
        skip_zeros: bool = False,
        bins: int = 2048,
        max_samples: int | None = 2**15,
        axis: int | None = None,
        group_size: int | None = None,
    ) -> None:
        super().__init__(bins=bins, max_samples=max_samples, abs_values=True, axis=axis, group_size=group_size)
        self._skip_zeros = bool(skip_zeros)
        if isinstance(n_bits, bool) or not isinstance(n_bits, int) or n_bits < 1:
            raise ValueError(f"EntropyObserver: n_bits must be a positive int, got {n_bits!r}")
        if bins < 2**n_bits:
            raise ValueError(f"EntropyObserver: bins ({bins}) must be at least 2 ** n_bits = {2**n_bits}")
        self.n_bits = n_bits

    def _ranges_from_histogram(self, hist: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        signed = self.data_min < 0  # (R,)
        threshold = torch.empty_like(hi)
        # One host sync per level count, at read time only.
        for levels in (2 ** (self.n_bits - 1), 2**self.n_bits):
            rows = torch.nonzero(signed if levels < 2**self.n_bits else ~signed).flatten()
            if rows.numel() == 0:
                continue
            chunk = max(1, 2**23 // ((self.bins - levels + 1) * (levels + 1)))
            for r in rows.split(chunk):
                threshold[r] = _kl_threshold_bins(hist[r], levels)
        threshold = ((threshold + 0.5) * (hi - lo) / self.bins).to(self.data_min.dtype)
        return torch.maximum(self.data_min, -threshold), torch.minimum(self.data_max, threshold)

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, skip_zeros={self._skip_zeros}, {super().extra_repr()}"


_KL_INDEX: dict[tuple[int, int, str], tuple[Tensor, Tensor, Tensor]] = {}


def _kl_groups(levels: int, n_bins: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Candidates ``i`` ``(I,)`` and the first/end bins ``(I * L,)`` of their ``L`` groups (cached)."""
    key = (levels, n_bins, str(device))
    if key not in _KL_INDEX:
        i = torch.arange(levels, n_bins + 1, device=device)  # (I,)
        edges = (torch.arange(levels + 1, device=device)[None, :] * i[:, None]) // levels  # (I, L+1)
        _KL_INDEX[key] = (i, edges[:, :-1].reshape(-1), edges[:, 1:].reshape(-1))
    return _KL_INDEX[key]


def kl_divergences(hist: Tensor, levels: int) -> Tensor:
    """TensorRT's ``KL(P_i || Q_i)`` for every threshold bin ``i = levels .. B`` of counts ``(R, B)``.

    See :class:`EntropyObserver` for ``P_i`` and ``Q_i``. Returns ``(R, B - levels + 1)``,
    column ``c`` for ``i = levels + c``, in ``hist``'s dtype. Computed from prefix sums:
    with ``S_k``/``n_k`` a group's count and non-empty bins, ``C_i`` the count below
    bin ``i`` and ``N`` the total, ``Q_j = S_k / (n_k C_i)`` and the sum over the
    bins of ``h_j log Q_j`` collapses to ``sum_k S_k log(S_k / n_k) - C_i log C_i``.
    """
    n_rows, n_bins = hist.shape
    i, first, end = _kl_groups(levels, n_bins, hist.device)
    n_cand = i.shape[0]
    zero = torch.zeros_like(hist[:, :1])
    cum = torch.cat([zero, hist.cumsum(1)], 1)  # (R, B+1): cum[:, j] = count in bins < j
    nz = torch.cat([zero, (hist > 0).to(hist.dtype).cumsum(1)], 1)
    hlogh = torch.cat([zero, torch.special.xlogy(hist, hist).cumsum(1)], 1)
    s = cum.index_select(1, end) - cum.index_select(1, first)  # (R, I*L) group counts S_k
    n = (nz.index_select(1, end) - nz.index_select(1, first)).clamp_(min=1)  # non-empty bins n_k
    group = torch.special.xlogy(s, s / n).view(n_rows, n_cand, levels)  # S_k log(S_k / n_k)
    total = cum[:, -1:]  # (R, 1) N
    below = cum[:, i]  # (R, I) C_i
    sum_h_log_q = group.sum(2) - torch.special.xlogy(below, below)  # sum_{j<i} h_j log Q_j
    h_last = hist[:, i - 1]  # (R, I)
    s_last = s.view(n_rows, n_cand, levels)[..., -1]  # the last group holds bin i-1
    n_last = n.view(n_rows, n_cand, levels)[..., -1]
    q_last = torch.where(h_last > 0, s_last / (n_last * below.clamp(min=1e-30)), 0.0)  # Q in bin i-1
    p_last = (h_last + total - below) / total  # P in bin i-1: its count plus the outliers
    # sum over j < i-1 of P_j log P_j and of P_j log Q_j (P_j = h_j / N there)
    p_log_p = (hlogh[:, i - 1] - torch.log(total) * cum[:, i - 1]) / total
    p_log_q = (sum_h_log_q - torch.special.xlogy(h_last, q_last)) / total
    last = torch.where(
        p_last > 0,
        torch.where(q_last > 0, p_last * (torch.log(p_last) - torch.log(q_last.clamp(min=1e-30))), torch.inf),
        0.0,
    )
    return p_log_p - p_log_q + last


def _kl_threshold_bins(hist: Tensor, levels: int) -> Tensor:
    """Index ``i*`` ``(R,)`` of the threshold bin minimising :func:`kl_divergences` (first on ties)."""
    return kl_divergences(hist, levels).argmin(1).to(torch.float64) + levels
