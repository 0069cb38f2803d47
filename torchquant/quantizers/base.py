"""The quantizer contract: :class:`Quantizer`, its bases and the :class:`AffineGrid` export uses.

Every quantizer in :mod:`torchquant.quantizers` (and every one a researcher
writes) subclasses :class:`Quantizer`; see the package docstring for the three
calls an owner makes. Three bases fill in the observe calls for the common kinds:
:class:`RangeQuantizer` (a grid from a range observer), :class:`LearnedQuantizer`
(parameters trained with the task loss) and :class:`StatelessQuantizer` (nothing to
observe).
"""

from __future__ import annotations

import abc
import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..granularity import Granularity
from ..quantizers_functional import (
    compute_dtype,
    level_codes,
    level_neighbours,
    level_values,
    minifloat_round,
    mx_block_scales,
)
from ..range_observers import RangeObserver
from ..spec import (
    CONFIG_KEY,
    RecordsInit,
    SpecError,
    decode_entry,
    encode_entry,
    init_args,
    plain,
    registered_class_name,
)
from .formats import MinifloatFormat

__all__ = [
    "AffineGrid",
    "FloatGrid",
    "LearnedQuantizer",
    "LevelGrid",
    "Quantizer",
    "RangeQuantizer",
    "StatelessQuantizer",
    "check_n_bits",
]


def check_n_bits(n_bits: int, who: str, low: int = 1, high: int = 32) -> int:
    """Validate a bit-width: an ``int`` in ``[low, high]``, else ``ValueError`` naming ``who``."""
    if isinstance(n_bits, bool) or not isinstance(n_bits, int):
        raise ValueError(f"{who}: n_bits must be an int, got {n_bits!r}")
    if not low <= n_bits <= high:
        raise ValueError(f"{who}: n_bits must be in [{low}, {high}], got {n_bits}")
    return n_bits


def _check_fits(shape: Sequence[int], g: Granularity, params: dict[str, Tensor], who: str, contract: str) -> None:
    """Check that each of ``params`` broadcasts against ``shape`` and changes only where ``g`` says.

    The shared body of :meth:`AffineGrid.check` and :meth:`LevelGrid.check`; ``contract``
    names the method that produced the parameters (``"grid()"``, ``"levels()"``).
    """
    shape = torch.Size(shape)
    try:
        axis = g.check(shape, who)
    except ValueError as e:
        raise ValueError(f"{e} (the granularity of its {contract})") from None
    allowed = set() if axis is None else {axis} if g.group_size is None else set(range(len(shape)))
    for name, t in params.items():
        own = tuple(t.shape)
        offset = len(shape) - len(own)  # broadcasting aligns the shapes on the right
        if offset < 0 or any(n not in (1, shape[offset + i]) for i, n in enumerate(own)):
            reason = f"{name} does not broadcast against the tensor"
        elif {offset + i for i, n in enumerate(own) if n != 1} - allowed:
            where = "has one value" if axis is None else f"changes along dimension {axis} only"
            reason = f"a {g} grid {where}, its {name} does not"
        else:
            continue
        expected = () if axis is None else g.compact_shape(shape) if g.group_size is None else tuple(shape)
        hint = " (Granularity.expand() turns compact per-group values into it)" if g.group_size else ""
        shapes = ", ".join(f"{n} of shape {tuple(v.shape)}" for n, v in params.items())
        raise ValueError(
            f"{who}: {contract} does not fit the tensor it quantizes: {reason} ({shapes}, tensor of "
            f"shape {tuple(shape)}); a {g} scale for this tensor has shape {expected}{hint}"
        )


@dataclass(frozen=True)
class AffineGrid:
    """An affine integer grid: ``x_q = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.

    Attributes:
        scale: step size, broadcasts against the quantized tensor: shape ``()`` per tensor,
            ``(C, 1, 1, 1)`` per channel of a ``(C, C_in, kH, kW)`` weight, the tensor's own
            shape per group (:meth:`check` says when it does not fit).
        zero_point: integer-valued (stored as float), usually the same shape as ``scale``.
        qmin, qmax: the integer range.
        granularity: where ``scale`` and ``zero_point`` change.
    """

    scale: Tensor
    zero_point: Tensor
    qmin: int
    qmax: int
    granularity: Granularity

    @property
    def n_bits(self) -> int:
        return math.ceil(math.log2(self.qmax - self.qmin + 1))

    def check(self, shape: Sequence[int], who: str = "AffineGrid") -> None:
        """Check that this grid fits a tensor of ``shape``, the one it quantizes.

        ``scale`` and ``zero_point`` must broadcast against the tensor without
        enlarging it, and change only where :attr:`granularity` says: a single value
        per tensor; per channel, along the axis only (e.g. ``(C, 1, 1, 1)`` for axis 0
        of a ``(C, C_in, kH, kW)`` weight); per group, expanded to the tensor's shape
        (:meth:`~torchquant.granularity.Granularity.expand`).

        Raises:
            ValueError: naming ``who`` (e.g. the quantizer), the scale, zero-point
                and tensor shapes, and the shape the scale should have.
        """
        _check_fits(shape, self.granularity, {"scale": self.scale, "zero_point": self.zero_point}, who, "grid()")

    def to_int(self, x: Tensor, who: str = "AffineGrid") -> Tensor:
        """The integer codes of ``x`` on this grid (``torch.int64``), after :meth:`check` (naming ``who``).

        Computed as the quantizers compute them, in :func:`~torchquant.quantizers_functional.compute_dtype`
        (float32 for a half-precision ``x``: ``x / scale`` in bfloat16 would round to other codes).
        """
        self.check(x.shape, who)
        dt = compute_dtype(x)
        q = torch.round(x.to(dt) / self.scale.to(dt)) + self.zero_point.to(dt)
        return q.clamp(self.qmin, self.qmax).to(torch.int64)

    def from_int(self, q: Tensor, who: str = "AffineGrid") -> Tensor:
        """Dequantize integer codes: ``(q - zero_point) * scale``, after :meth:`check` (naming ``who``).

        In the scale's :func:`~torchquant.quantizers_functional.compute_dtype` (float32 for a
        half-precision scale, which cannot hold every code of a wide grid).
        """
        self.check(q.shape, who)
        dt = compute_dtype(self.scale)
        return (q.to(dt) - self.zero_point.to(dt)) * self.scale.to(dt)


@dataclass(frozen=True)
class LevelGrid:
    """A finite set of levels (a codebook) times a scale: ``x_q = levels[..., code] * scale``.

    The contract of non-uniform quantizers (NF4, APoT, a learned codebook), as
    :class:`AffineGrid` is that of uniform ones: the outputs are ``K`` values per
    channel or group, so they are stored as integer codes plus the codebook.

    Attributes:
        levels: ``(..., K)``, the ``K`` levels in ascending order, in the units of ``scale``.
            A ``(K,)`` codebook is shared by the whole tensor; leading dimensions (a codebook
            per channel or group) broadcast against the tensor like ``scale``.
        scale: positive, broadcasts against the quantized tensor as :attr:`AffineGrid.scale`
            does (``()`` per tensor, ``(C, 1, 1, 1)`` per channel, the tensor's shape per group).
        granularity: where ``scale`` (and a per-channel codebook) change.

    Example:
        >>> g = LevelGrid(torch.tensor([-1.0, 0.0, 0.5, 1.0]), torch.tensor(2.0), Granularity())
        >>> x = torch.tensor([0.3, -0.8, 1.2, 5.0])
        >>> codes = g.codes(x)
        >>> codes.tolist(), g.dequantize(codes).tolist()
        ([1, 1, 2, 3], [0.0, 0.0, 1.0, 2.0])
        >>> [c.tolist() for c in g.neighbours(x)]  # floor and ceiling in level space
        [[1, 0, 2, 3], [2, 1, 3, 3]]
    """

    levels: Tensor
    scale: Tensor
    granularity: Granularity

    @property
    def n_levels(self) -> int:
        """``K``, the number of levels."""
        return int(self.levels.shape[-1])

    @property
    def n_bits(self) -> int:
        """Bits of one code: ``ceil(log2(K))``."""
        return max(1, math.ceil(math.log2(self.n_levels)))

    def check(self, shape: Sequence[int], who: str = "LevelGrid") -> None:
        """Check that these levels fit a tensor of ``shape``, the one they quantize.

        ``scale`` and the leading dimensions of ``levels`` must broadcast against the tensor
        without enlarging it and change only where :attr:`granularity` says (as in
        :meth:`AffineGrid.check`); ``levels`` needs at least two levels in ascending order.

        Raises:
            ValueError: naming ``who`` (e.g. the quantizer) and the shapes.
        """
        lv = self.levels
        if lv.dim() < 1 or lv.shape[-1] < 2:
            raise ValueError(f"{who}: levels() needs at least two levels along the last dimension, got shape "
                             f"{tuple(lv.shape)}")  # fmt: skip
        if bool((lv[..., 1:] <= lv[..., :-1]).any()):
            raise ValueError(f"{who}: levels() must be in strictly ascending order, got {lv.tolist()}")
        _check_fits(shape, self.granularity, {"scale": self.scale, "levels[..., 0]": lv[..., 0]}, who, "levels()")

    def codes(self, x: Tensor, who: str = "LevelGrid") -> Tensor:
        """The code of the nearest level for every element of ``x`` (``torch.int64``, ties to the lower level)."""
        self.check(x.shape, who)
        dt = compute_dtype(x)  # as level_quantize computes them
        return level_codes(x.to(dt) / self.scale.to(dt), self.levels.to(dt))

    def neighbours(self, x: Tensor, who: str = "LevelGrid") -> tuple[Tensor, Tensor]:
        """Codes ``(lo, hi)`` of the levels around every element of ``x``: floor and ceiling in level space.

        ``hi = lo + 1`` inside the levels' range; outside it both are the nearest end
        (:func:`~torchquant.quantizers_functional.level_neighbours`).
        """
        self.check(x.shape, who)
        dt = compute_dtype(x)
        return level_neighbours(x.to(dt) / self.scale.to(dt), self.levels.to(dt))

    def dequantize(self, codes: Tensor, who: str = "LevelGrid") -> Tensor:
        """The values of integer ``codes``: ``levels[..., codes] * scale``, after :meth:`check` (naming ``who``)."""
        self.check(codes.shape, who)
        dt = compute_dtype(self.scale)
        return level_values(self.levels.to(dt), codes) * self.scale.to(dt)

    def quantize(self, x: Tensor, who: str = "LevelGrid") -> Tensor:
        """``x`` rounded to the nearest level: ``dequantize(codes(x))`` (no gradient trick)."""
        return self.dequantize(self.codes(x, who), who).to(x.dtype)


@dataclass(frozen=True)
class FloatGrid:
    """The values of a minifloat format times a scale: ``x_q = round_fmt(x / scale) * scale``.

    The contract of floating-point quantizers (FP8, FP6, FP4, OCP MX), as
    :class:`~torchquant.quantizers.AffineGrid` is that of uniform ones: export stores
    the rounded values ``round_fmt(x / scale)`` (:meth:`elements`) with their scales, in the
    format where ONNX has it (``float8e4m3fn``, ``float8e5m2``), else as integer multiples of
    the format's smallest value (``int8``, ``int16``).

    Attributes:
        fmt: the element format.
        scale: positive, broadcasting against the quantized tensor as an affine grid's
            scale does (``()`` per tensor, ``(C, 1, 1, 1)`` per channel); ``None`` for OCP MX
            blocks, whose power-of-two scales come from each input's block maxima
            (:func:`~torchquant.quantizers_functional.mx_block_scales`).
        granularity: where the scale changes; for MX blocks ``per_group(block_size, axis)``,
            the last block of an axis ``block_size`` does not divide being shorter.

    Example:
        >>> from torchquant.quantizers import FORMATS
        >>> g = FloatGrid(FORMATS["fp4_e2m1"], torch.tensor(0.5), Granularity())
        >>> g.quantize(torch.tensor([0.2, 1.3, 9.0])).tolist()
        [0.25, 1.5, 3.0]
    """

    fmt: MinifloatFormat
    scale: Tensor | None
    granularity: Granularity

    @property
    def blocked(self) -> bool:
        """Whether the scales are OCP MX block scales computed from the input."""
        return self.scale is None

    def check(self, shape: torch.Size | tuple[int, ...], who: str = "FloatGrid") -> None:
        """Check that this grid fits a tensor of ``shape``, the one it quantizes.

        A scale must broadcast against the tensor without enlarging it and change only
        where :attr:`granularity` says (as :meth:`~torchquant.quantizers.AffineGrid.check`);
        MX blocks need their axis to exist.

        Raises:
            ValueError: naming ``who`` and the shapes.
        """
        if self.scale is not None:
            _check_fits(shape, self.granularity, {"scale": self.scale}, who, "float_grid()")
            return
        axis = self.granularity.axis
        if axis is None or self.granularity.group_size is None or not -len(shape) <= axis < len(shape):
            raise ValueError(f"{who}: MX blocks along axis {axis} do not fit a tensor of shape {tuple(shape)}")

    def block_scales(self, x: Tensor) -> Tensor:
        """MX blocks only: the scales of ``x``'s blocks, compact (``x.shape`` with ``ceil(n / block_size)``
        along the axis)."""
        g = self.granularity
        if self.scale is not None or g.axis is None or g.group_size is None:
            raise ValueError(f"FloatGrid: block_scales() needs MX blocks (scale None, per-group), got {g}")
        return mx_block_scales(x, self.fmt.emax, g.group_size, g.axis)

    def expand(self, block_scales: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """MX blocks: compact ``block_scales`` (:meth:`block_scales`) repeated to every element of a tensor
        of ``shape``, the last block's cut where it is shorter."""
        g = self.granularity
        ax = g.axis % len(shape)  # type: ignore[operator]
        return block_scales.repeat_interleave(g.group_size, dim=ax).narrow(ax, 0, shape[ax])  # type: ignore[arg-type]

    def scale_for(self, x: Tensor) -> Tensor:
        """The scale of every element of ``x``, broadcasting against it (MX: each element's block scale)."""
        if self.scale is not None:
            return self.scale
        return self.expand(self.block_scales(x), x.shape)

    def elements(self, x: Tensor) -> Tensor:
        """``round_fmt(x / scale)``: the format's values that represent ``x``, of ``x``'s shape, in the dtype the
        simulation computes in (float32 for half-precision inputs, as :func:`compute_dtype` says)."""
        f = self.fmt
        dt = compute_dtype(x)
        s = self.scale_for(x).to(device=x.device, dtype=dt)
        return minifloat_round(x.to(dt) / s, f.man_bits, f.bias, f.max_value)  # type: ignore[arg-type]

    def quantize(self, x: Tensor) -> Tensor:
        """``x`` on this grid: ``round_fmt(x / scale) * scale`` (straight-through gradient)."""
        return self.fmt.quantize(x, self.scale_for(x).to(x.device))


class Quantizer(RecordsInit, nn.Module, abc.ABC):
    """Base class of every quantizer.

    Subclasses implement :meth:`pre_observe`, :meth:`quantize` and
    :meth:`post_observe`; ``forward`` calls :meth:`quantize`.

    Checkpoints carry the configuration: ``state_dict()`` holds, under
    ``<prefix>_extra_state`` (:data:`~torchquant.spec.CONFIG_KEY`), the quantizer's
    :meth:`grid_config` as a ``uint8`` tensor of JSON, and ``load_state_dict`` raises
    (naming the module and both configurations) when the model's quantizer is
    configured otherwise: 4-bit state does not load into an 8-bit quantizer, nor
    per-channel ranges into a per-tensor one. A state dict without the entry (saved
    before it existed) loads unchecked.

    Attributes:
        non_grid_args: constructor arguments left out of :meth:`grid_config`, because
            they change the gradient, the initialisation or the training schedule but
            not the grid (``gradient_clip``; LSQ's ``grad_scale``; AdaRound's ``soft``).
    """

    non_grid_args: ClassVar[frozenset[str]] = frozenset({"gradient_clip"})

    def __init__(self) -> None:
        super().__init__()
        self._tq_name = type(self).__name__

    def grid_config(self) -> dict[str, Any]:
        """What defines this quantizer's grid, as JSON data (what a state dict records and checks).

        ``quantizer``: the registered name of the class (else its qualified name);
        ``args``: every constructor argument with its current value (defaults
        included; see :func:`torchquant.spec.init_args`) except :attr:`non_grid_args`,
        the range observer and arguments that are not plain values; ``granularity``:
        the quantizer's (or its range observer's) granularity, when it has one.
        Subclasses whose grid depends on more (a number format) extend it.

        Example:
            >>> from torchquant import AffineQuantizer, BatchMinMax
            >>> AffineQuantizer(4, BatchMinMax(axis=0)).grid_config()  # doctest: +NORMALIZE_WHITESPACE
            {'quantizer': 'affine', 'args': {'n_bits': 4, 'power_of_two': False, 'symmetric': False},
             'granularity': 'per-channel(axis=0)'}
        """
        try:
            args = init_args(self)
        except SpecError:  # arguments not recorded: the attributes every affine grid has
            args = {k: getattr(self, k) for k in ("n_bits", "signed", "symmetric") if hasattr(self, k)}
        g = getattr(self, "granularity", None)
        if not isinstance(g, Granularity):  # a minifloat scale from an observer
            g = getattr(getattr(self, "range_observer", None), "granularity", None)
        skip = set(self.non_grid_args) | {"range_observer"} | ({"axis", "group_size"} if g is not None else set())
        kept = {}
        for key in sorted(set(args) - skip):
            try:
                kept[key] = plain(args[key], key)
            except SpecError:  # a tensor or object argument: its state, not its configuration
                continue
        config: dict[str, Any] = {"quantizer": registered_class_name(self), "args": kept}
        if g is not None:
            config["granularity"] = str(g)
        return config

    def get_extra_state(self) -> Tensor:
        """:meth:`grid_config` as a ``uint8`` tensor of JSON: the state dict's ``<prefix>_extra_state``."""
        return encode_entry(self.grid_config())

    def set_extra_state(self, state: Any) -> None:
        """Check a saved configuration (a :meth:`get_extra_state` tensor) against this quantizer's.

        Nothing is set: the configuration comes from the constructor, the state dict only
        confirms it. ``load_state_dict`` reports a mismatch with the module's name instead.

        Raises:
            ValueError: ``state`` is not a configuration, or one of a differently configured quantizer.
        """
        problem = self._config_problem(state, CONFIG_KEY)
        if problem is not None:
            raise ValueError(f"{self._tq_name}: {problem}")

    def _config_problem(self, state: Any, key: str) -> str | None:
        """Why the saved configuration ``state`` does not fit this quantizer, or ``None``."""
        try:
            saved = decode_entry(state)
        except ValueError as e:
            return f"the state dict's {key!r} is not a quantizer configuration: {e}"
        now = json.loads(json.dumps(self.grid_config()))  # tuples -> lists, as saved
        differ = _differences(saved, now)
        if not differ:
            return None
        return (
            f"the state dict was saved from a quantizer configured as {_format_config(saved)}, but this model's "
            f"quantizer is {_format_config(now)} (they differ in {', '.join(differ)}); build the model with the "
            f"saved configuration, or delete {key!r} from the state dict to load it anyway"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + CONFIG_KEY
        if key in state_dict:
            problem = self._config_problem(state_dict[key], key)
            if problem is not None:
                errors.append(f"{prefix[:-1] or type(self).__name__}: {problem}")
                # Reported here, with the module's name; set_extra_state would raise it again unnamed.
                state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if key in missing:  # saved before configurations were recorded: loads unchecked
            missing.remove(key)

    @abc.abstractmethod
    def pre_observe(self, x: Tensor) -> None:
        """Observe the float tensor ``x`` before it is quantized."""

    @abc.abstractmethod
    def quantize(self, x: Tensor) -> Tensor:
        """Return ``x`` fake-quantized, same shape and dtype, differentiable."""

    @abc.abstractmethod
    def post_observe(self, x: Tensor) -> None:
        """Observe the quantizer's output ``x``."""

    def forward(self, x: Tensor) -> Tensor:
        return self.quantize(x)

    def grid(self) -> AffineGrid | None:
        """The affine integer grid the outputs lie on, or ``None`` if they lie on none."""
        return None

    def levels(self) -> LevelGrid | None:
        """The finite set of levels the outputs lie on (non-uniform quantizers), or ``None``.

        A quantizer whose outputs lie on an affine grid reports it through :meth:`grid`
        instead, one rounding to a floating-point format through :meth:`float_grid`; one
        with none of them (a sign) returns ``None`` from all three.
        Export stores the weights of a quantizer with levels as integer codes plus the
        codebook, and AdaRound chooses between the two nearest levels.
        """
        return None

    def float_grid(self) -> FloatGrid | None:
        """The floating-point format and scales the outputs lie on (FP8, FP4, OCP MX), or ``None``.

        ``quantize(x)`` must equal ``float_grid().quantize(x)``; export then stores the
        format's values (ONNX ``float8e4m3fn``/``float8e5m2`` where the format is one) and
        the scales, and rounds activations in the format.
        """
        return None


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The fields in which two :meth:`Quantizer.grid_config` tables differ.

    Arguments only one side lists are not compared: a checkpoint saved before an
    argument existed still loads into a quantizer that has it.
    """
    out = [k for k in ("quantizer", "granularity") if saved.get(k) != now.get(k)]
    a, b = saved.get("args") or {}, now.get("args") or {}
    return out + [k for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def _format_config(config: dict[str, Any]) -> str:
    """``affine(n_bits=4, symmetric=False, per-channel(axis=0))``: a :meth:`Quantizer.grid_config` for messages."""
    parts = [f"{k}={v!r}" for k, v in (config.get("args") or {}).items()]
    if "granularity" in config:
        parts.append(str(config["granularity"]))
    return f"{config.get('quantizer', '?')}({', '.join(parts)})"


class RangeQuantizer(Quantizer):
    """A quantizer whose grid comes from a :class:`RangeObserver`.

    ``pre_observe`` feeds the observer; ``post_observe`` does nothing. Subclasses
    implement :meth:`quantize` using :meth:`ranges`.
    """

    def __init__(self, range_observer: RangeObserver) -> None:
        super().__init__()
        if not isinstance(range_observer, RangeObserver):
            raise TypeError(
                f"{type(self).__name__}: range_observer must be a RangeObserver instance "
                f"(e.g. BatchMinMax()), got {range_observer!r}"
            )
        self.range_observer = range_observer
        self._set_name(type(self).__name__)

    def _set_name(self, name: str) -> None:
        self._tq_name = name
        self.range_observer._tq_name = f"{name}.range_observer"

    @property
    def granularity(self) -> Granularity:
        return self.range_observer.granularity

    def pre_observe(self, x: Tensor) -> None:
        # _modules directly: nn.Module.__getattr__ costs 0.6 us, a few percent of a QAT call's host time.
        self._modules["range_observer"].observe_batch(x)

    def post_observe(self, x: Tensor) -> None:
        pass

    def forward(self, x: Tensor) -> Tensor:
        return forward_with_observer(self, self._modules["range_observer"], x)

    def ranges(self) -> tuple[Tensor, Tensor]:
        """The observer's ``(min, max)``, broadcastable against the input."""
        return self.range_observer.get_ranges()


def forward_with_observer(quantizer: Quantizer, observer: RangeObserver | None, x: Tensor) -> Tensor:
    """``quantizer.quantize(x)`` with ``observer``'s report of skipped NaN/Inf batches deferred.

    On CUDA the observers count such batches on the device (see
    :meth:`RangeObserver.observe_batch`); reading the count synchronises with the host,
    so a read of the ranges inside the forward pass leaves the report to the next read
    outside it (:meth:`RangeObserver.get_ranges`, :meth:`Quantizer.grid`, export). The
    QAT step then makes no host synchronisation, whatever the quantizer's ``quantize``.
    """
    if observer is None or torch.compiler.is_compiling():  # compiled code runs no kernel path to report from
        return quantizer.quantize(x)
    # The instance dict, not nn.Module.__setattr__: 0.1 us instead of 1 us per call.
    state = observer.__dict__
    outer = state.get("_in_forward", False)  # an observer shared by quantizers called inside each other
    state["_in_forward"] = True
    try:
        return quantizer.quantize(x)
    finally:
        state["_in_forward"] = outer


def kernel_ranges(
    quantizer: Quantizer, observer: RangeObserver | None, cls: type, *methods: str
) -> tuple[Tensor, Tensor] | None:
    """``observer``'s compact ``(min_val, max_val)`` for a path that computes ``quantizer``'s grid from
    them (a CUDA kernel, the CPU per-group path), or ``None``.

    ``None`` (the general torch path) when the observer holds no ranges yet, or when the
    observer (``get_ranges``) or the quantizer (``ranges``, or any of ``cls``'s ``methods`` the
    grid depends on) is overridden by a subclass: otherwise that path computes what the
    general one would.
    """
    if observer is None:
        return None
    b = observer._buffers  # the QAT hot path: not through nn.Module's __getattr__
    mn = b["min_val"]
    if mn.numel() == 0 or not _plain_classes(type(quantizer), type(observer), cls, methods):
        return None
    return mn, b["max_val"]


@functools.cache
def _plain_classes(qtype: type, otype: type, cls: type, methods: tuple[str, ...]) -> bool:
    # The class-level half of kernel_ranges, once per combination (the QAT hot path).
    return (
        all(getattr(qtype, m, None) is getattr(cls, m, None) for m in (*methods, "ranges"))
        and otype.get_ranges is RangeObserver.get_ranges
    )


class LearnedQuantizer(Quantizer):
    """Base of quantizers whose parameters are learned with the task loss (QAT), shaped by the first tensor seen.

    LSQ's step, LSQ+'s offset and PACT's clipping level are such parameters; their
    shape (one value per tensor, per channel or per group) depends on the tensor the
    quantizer is applied to, which is not known when the model is built. A subclass
    declares:

    * ``learned_params``: a class attribute, the names of its parameters, e.g. ``("step",)``;
    * :meth:`init_params`: their first values, computed from the first tensor observed
      (one tensor per name, usually in the granularity's compact shape,
      :meth:`~torchquant.granularity.Granularity.compact_shape`);
    * the granularity, by passing ``axis`` and ``group_size`` to ``super().__init__``
      (available as ``self.granularity``);
    * :meth:`~Quantizer.quantize`, differentiable in the parameters (call
      :meth:`check_initialized` first), and :meth:`~Quantizer.grid` if the outputs lie on
      an affine grid.

    What the base guarantees:

    * every parameter exists from construction as an empty ``nn.Parameter``, so
      ``model.parameters()`` lists it and an optimizer built before the first forward
      trains it: the first :meth:`pre_observe` (a calibration or QAT forward) fills the
      **same** ``Parameter`` object in place, and later calls change nothing;
    * the values take the module's device and dtype (``.to()``, ``.half()`` before the
      first forward), not the observed tensor's;
    * ``load_state_dict`` resizes the parameters to what is loaded, so a state dict
      loads into a fresh, never-observed instance (``strict=True`` holds), and
      ``copy.deepcopy`` copies them;
    * :meth:`post_observe` does nothing; :meth:`reset` empties the parameters again.

    Constructor arguments are recorded as for every quantizer, so a registered
    subclass whose arguments are plain values is described by
    :func:`torchquant.spec.describe` and saved by :func:`torchquant.save`. Wrap a model
    in ``DistributedDataParallel`` only after the first forward (DDP needs the shapes).

    Args:
        axis: ``None`` for one value per tensor, else the axis of per-channel values.
        group_size: with ``axis``, one value per ``group_size`` elements (per-group).

    Example:
        A symmetric quantizer with a learned clipping level per channel:

        >>> from torchquant.quantizers_functional import round_ste
        >>> class LearnedClip(LearnedQuantizer):
        ...     learned_params = ("clip",)
        ...
        ...     def __init__(self, n_bits=4, *, axis=None):
        ...         super().__init__(axis=axis)
        ...         self.qmax = 2 ** (n_bits - 1) - 1
        ...
        ...     def init_params(self, x):  # (C, ...) -> (C, 1, ...): max |x| per channel
        ...         return (self.granularity.aggregate(x.abs(), "amax").clamp(min=1e-8),)
        ...
        ...     def quantize(self, x):
        ...         self.check_initialized()
        ...         step = self.granularity.expand(self.clip) / self.qmax
        ...         return round_ste((x / step).clamp(-self.qmax, self.qmax)) * step
        >>> q = LearnedClip(4, axis=0)
        >>> clip = q.clip  # empty until the first observation
        >>> q.pre_observe(torch.randn(8, 3, 3, 3))
        >>> q.clip is clip, q.clip.shape
        (True, torch.Size([8, 1, 1, 1]))
        >>> fresh = LearnedClip(4, axis=0)
        >>> fresh.load_state_dict(q.state_dict())
        <All keys matched successfully>
    """

    learned_params: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # Subclasses written for the private base this was (``_LazyParamQuantizer``) keep working.
        if "_lazy_params" in cls.__dict__ and "learned_params" not in cls.__dict__:
            cls.learned_params = cls.__dict__["_lazy_params"]
        if "_init_params" in cls.__dict__ and "init_params" not in cls.__dict__:
            cls.init_params = cls.__dict__["_init_params"]

    def __init__(self, axis: int | None = None, group_size: int | None = None) -> None:
        super().__init__()
        names = self.learned_params
        if isinstance(names, str) or not names or not all(isinstance(n, str) for n in names):
            raise TypeError(
                f"{type(self).__name__}: a LearnedQuantizer declares its parameters as a class attribute, "
                f'e.g. learned_params = ("step",); got {names!r}'
            )
        self.granularity = Granularity(axis=axis, group_size=group_size)
        for name in names:
            self.register_parameter(name, nn.Parameter(torch.empty(0)))

    @property
    def initialized(self) -> bool:
        """Whether the learned parameters have values (observed or loaded)."""
        # _parameters, not getattr: torch.fx proxies parameters fetched by attribute.
        return self._parameters[self.learned_params[0]].numel() > 0

    def init_params(self, x: Tensor) -> tuple[Tensor, ...]:
        """The first values of the parameters, from the first observed tensor ``x`` (detached, no grad).

        Returns:
            One tensor per name of ``learned_params``, in that order (a single tensor
            when there is one parameter). They are cast to the module's device and dtype.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement init_params(x)")

    def pre_observe(self, x: Tensor) -> None:
        """Initialise the learned parameters from the first non-empty tensor seen; later calls do nothing."""
        if self.initialized or x.numel() == 0:  # an empty tensor has no statistics to start from
            return
        self._initialize(x)

    @torch.compiler.disable(
        reason="a learned quantizer initializes its parameters from its first batch, resizing them: outside the "
        "graph (with fullgraph=True, run one eager forward first)"
    )
    def _initialize(self, x: Tensor) -> None:
        # Eager even under torch.compile: it resizes the parameters from (0,), which a compiled graph cannot
        # do (inductor checks its inputs' sizes); the graphs after it see the new sizes.
        with torch.no_grad():
            values = self.init_params(x.detach())
        if isinstance(values, Tensor):
            values = (values,)
        if not isinstance(values, (tuple, list)) or len(values) != len(self.learned_params):
            raise ValueError(
                f"{self._tq_name}: init_params() must return one tensor per learned parameter "
                f"{self.learned_params}, got {values!r}"
            )
        for name, v in zip(self.learned_params, values):
            p = getattr(self, name)
            # Same Parameter object: optimizers built earlier keep it. Device and dtype follow the
            # module's (.to() / .half() before the first forward), not the observed tensor's.
            p.data = torch.as_tensor(v).detach().to(device=p.device, dtype=p.dtype)

    def post_observe(self, x: Tensor) -> None:
        pass

    def reset(self) -> None:
        """Forget the learned values (the next ``pre_observe`` initialises again)."""
        for name in self.learned_params:
            p = getattr(self, name)
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def check_initialized(self) -> None:
        """Raise ``RuntimeError`` (naming the quantizer and saying what to do) if there are no values yet."""
        if not self.initialized:
            raise RuntimeError(
                f"{self._tq_name}: learned parameters {', '.join(self.learned_params)} are not initialised; "
                "calibrate first (run data through the model in a CALIBRATION or QUANT_AWARE_TRAIN mode) "
                "or load a state dict"
            )

    _check_initialized = check_initialized  # the private base's name

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Parameters take the shape of what is loaded (they are empty before the first observation).
        for name in self.learned_params:
            key, p = prefix + name, getattr(self, name)
            if key in state_dict and state_dict[key].shape != p.shape:
                p.data = torch.empty_like(state_dict[key], dtype=p.dtype, device=p.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


class StatelessQuantizer(Quantizer):
    """A quantizer that computes everything from the tensor it quantizes: both observe calls do nothing."""

    def pre_observe(self, x: Tensor) -> None:
        pass

    def post_observe(self, x: Tensor) -> None:
        pass
