"""Federated quantization-aware training with Flower (extra ``[flower]``, ``flwr>=1.21``).

A Flower ``ClientApp`` / ``ServerApp`` pair on Flower's Message API, in which every
client trains a torchquant-quantized model and sends its update compressed:

* **Clients** (:func:`client_app`) load the global state (weights, learned quantizer
  parameters, observer ranges), train it with quantization-aware training
  (``QUANT_AWARE_TRAIN``; a model without quantizers trains in float) and reply with
  ``delta = new - global`` for every parameter, quantized with any registered quantizer
  whose outputs lie on an affine grid (``"int8"``, ``"int4-g64"``, ``"int2"``, a
  :class:`~torchquant.spec.QuantizerSpec`), with nearest or stochastic rounding. What is
  sent is integer codes packed into bytes plus the grid's scales and zero points.
* **The server** (:func:`server_app`, strategy :class:`QuantizedFedAvg`, a Flower
  ``FedAvg``) averages the decoded updates weighted by the clients' example counts,
  as FedAvg averages weights, so learned quantizer parameters (LSQ steps, PACT clips)
  are averaged like weights. Range observers are merged with the rule of
  :func:`torchquant.distributed.sync_observers` (:func:`torchquant.distributed.merge_ranges`:
  minimum of the minima, maximum of the maxima), then weight observers observe the
  averaged weights; every client loads the merged state at the start of the next round,
  so all clients quantize on the same grid.
* Before the first round the server runs a calibration round (message type
  ``"train.calibrate"``): every client calibrates on its own data, and the merged ranges
  and averaged initial learned parameters start QAT from one shared grid.

Bytes: :func:`payload_bytes` counts a message's arrays exactly (the sum of their
``nbytes``); the strategy records it for every upload (``bytes-up`` in the history).

Running it. Flower's simulation engine (``flwr.simulation.run_simulation``) needs Ray
(``flwr[simulation]``), a heavy dependency that also starts a cluster runtime; instead,
:func:`run_federation` runs a ``ServerApp`` and a ``ClientApp`` in one process through a
small :class:`InProcessGrid` (a Flower ``Grid``) that delivers Flower ``Message`` objects
to the ``ClientApp`` and serialises every message's content to Flower's protobuf wire
format and back on the way, as the deployment engine would. The two apps are ordinary
Flower apps: a slow test also runs them on Flower's deployment engine (a SuperLink and
two SuperNodes on loopback, ``flwr run``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> import torchquant as tq
    >>> from torchquant.integrations import flower
    >>> def model_fn():
    ...     net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ...     return tq.quantize_model(net, lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True),
    ...                              lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax()), method="swap")
    >>> def data_fn(partition, partitions):
    ...     g = torch.Generator().manual_seed(partition)
    ...     x = torch.randn(32, 4, generator=g)
    ...     batches = [(x[i : i + 8], (x[i : i + 8, 0] > 0).long()) for i in range(0, 32, 8)]
    ...     return batches, batches
    >>> config = flower.FederatedConfig(update="int8", lr=0.1)
    >>> fed = flower.run_federation(flower.server_app(model_fn, config, num_rounds=2),
    ...                             flower.client_app(model_fn, data_fn, config), num_clients=2)
    >>> history = flower.history(fed)
    >>> sorted(history), len(history["bytes-up"])
    (['bytes-calibration', 'bytes-up'], 2)
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

try:
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("torchquant.integrations.flower needs Flower: pip install 'torchquant[flower]'") from e
try:
    from flwr.supercore.run import Run
except ImportError:  # pragma: no cover - flwr 1.21 keeps it here
    from flwr.common.typing import Run
try:  # recent flwr: new messages take their run and node ids from the process's task identity
    from flwr.supercore.task_identity import TaskIdentity
except ImportError:  # pragma: no cover - older flwr has none
    TaskIdentity = None

from ..distributed import merge_ranges, observers
from ..granularity import Granularity
from ..ptq import calibrate, reobserve_weights
from ..qmodules import QModuleState, iter_qmodules
from ..quantizers import AffineGrid
from ..range_observers import HistogramRangeObserver
from ..spec import QuantizerSpec
from ..utils import set_qmodule_state

__all__ = [
    "CALIBRATE",
    "ClientData",
    "FederatedConfig",
    "Federation",
    "InProcessGrid",
    "QuantizedFedAvg",
    "client_app",
    "decode_update",
    "encode_update",
    "history",
    "merge_observer_states",
    "observer_state",
    "pack_bits",
    "payload_bytes",
    "run_federation",
    "server_app",
    "stochastic_round",
    "unpack_bits",
    "update_spec",
]

_log = logging.getLogger(__name__)

CALIBRATE = "train.calibrate"
"""Message type of the calibration round the server runs before the first training round."""

_WHO = "torchquant.integrations.flower"
_SERVER_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID
_SHORT = re.compile(r"^int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?P<asym>-asym)?$")
_FLOAT = ("float", "float32", "fp32")
_ROUNDINGS = ("nearest", "stochastic")

ModelFn = Callable[[], nn.Module]
Batches = Iterable[tuple[Tensor, Tensor]]
ClientData = tuple[Batches, Batches]
"""What a ``data_fn`` returns: ``(train_batches, eval_batches)``, re-iterable ``(x, y)`` batches."""
DataFn = Callable[[int, int], ClientData]


# ------------------------------------------------------------------------ primitives
def stochastic_round(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round each element down or up at random, up with probability ``x - floor(x)``: unbiased.

    ``floor(x + u)`` with ``u ~ U[0, 1)``, so ``E[stochastic_round(x)] = x`` exactly and
    each result is ``floor(x)`` or ``ceil(x)``.

    Args:
        x: any floating tensor.
        generator: the random source (a seeded ``torch.Generator`` makes it repeatable).

    Returns:
        A tensor of ``x``'s shape and dtype holding integers.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> r = stochastic_round(torch.full((10000,), 2.25), g)
        >>> sorted(set(r.tolist())), round(r.mean().item(), 1)
        ([2.0, 3.0], 2.2)
    """
    if not x.is_floating_point():
        raise TypeError(f"{_WHO}.stochastic_round: x must be floating point, got {x.dtype}")
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return torch.floor(x + u)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack non-negative integer codes of ``bits`` bits each into bytes, least significant bit first.

    Args:
        codes: integers in ``[0, 2 ** bits)``, any shape (read flattened, ``n`` elements).
        bits: 1 to 16.

    Returns:
        ``uint8`` of shape ``(ceil(n * bits / 8),)``.

    Raises:
        ValueError: ``bits`` out of range or a code that does not fit in ``bits`` bits.

    Example:
        >>> p = pack_bits(torch.tensor([0, 1, 2, 3, 3]), 2)
        >>> p.tolist(), unpack_bits(p, 2, 5).tolist()
        ([228, 3], [0, 1, 2, 3, 3])
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"{_WHO}.pack_bits: bits must be an int in [1, 16], got {bits!r}")
    u = codes.detach().flatten().to(torch.int64)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ValueError(f"{_WHO}.pack_bits: codes must lie in [0, {2**bits}), got [{int(u.min())}, {int(u.max())}]")
    if bits == 8:
        return u.to(torch.uint8)
    bit = ((u[:, None] >> torch.arange(bits)) & 1).flatten()  # (n, bits) -> (n * bits,)
    bit = torch.cat([bit, bit.new_zeros((-bit.numel()) % 8)])
    return (bit.view(-1, 8) << torch.arange(8)).sum(dim=1).to(torch.uint8)  # (n * bits / 8, 8) -> (n * bits / 8,)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes, ``int64`` of shape ``(n,)``.

    Raises:
        ValueError: ``packed`` is not the ``ceil(n * bits / 8)`` bytes :func:`pack_bits` makes of ``n``
            codes of ``bits`` bits (codes packed at another width, for one).
    """
    if packed.numel() != -(-n * bits // 8):
        raise ValueError(
            f"{_WHO}.unpack_bits: {packed.numel()} bytes, where n={n} codes of {bits} bits take {-(-n * bits // 8)}"
        )
    p = packed.flatten().to(torch.int64)
    if bits == 8:
        return p[:n]
    bit = ((p[:, None] >> torch.arange(8)) & 1).flatten()[: n * bits].view(n, bits)  # (bytes, 8) -> (n, bits)
    return (bit << torch.arange(bits)).sum(dim=1)


def payload_bytes(content: Message | RecordDict | ArrayRecord) -> int:
    """The bytes of the arrays a message carries: the sum of their ``nbytes``, exactly.

    Counts every ``Array`` in every ``ArrayRecord`` (``prod(shape) * itemsize``), not the
    few bytes of keys, configs, metrics and ``.npy`` headers around them (Flower's
    ``Array.data`` adds a header of about 128 bytes per array).

    Example:
        >>> rec = ArrayRecord({"codes": Array(np.zeros(10, np.uint8)), "scale": Array(np.zeros(2, np.float32))})
        >>> payload_bytes(rec)
        18
    """
    if isinstance(content, Message):
        content = content.content
    records = [content] if isinstance(content, ArrayRecord) else list(content.array_records.values())
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for r in records for a in r.values())


# ------------------------------------------------------------------ update codec
def update_spec(spec: str | Mapping[str, Any] | QuantizerSpec | None) -> QuantizerSpec | None:
    """The quantizer that compresses updates, from a short form, a spec or ``None`` (float32).

    Short forms: ``"int<b>"`` symmetric per row (output channel) of each parameter,
    ``"int<b>-g<G>"`` symmetric per group of ``G`` consecutive elements of a row, ``-asym``
    for a zero point; ``"float32"`` (or ``None``) sends float32 deltas. Any other string is
    a registered quantizer name, and a dict or :class:`~torchquant.spec.QuantizerSpec`
    any registered quantizer with its observer. Its outputs must lie on an affine grid
    (``grid()``), per tensor, per row (``axis=0``) or along rows (``axis=1``, grouped or not).

    Raises:
        ValueError: an unknown short form, or a quantizer without an affine grid or with
            another granularity (the message names the spec).

    Example:
        >>> update_spec("int4-g64").to_dict()  # doctest: +NORMALIZE_WHITESPACE
        {'quantizer': 'affine', 'observer': 'batch_minmax', 'args': {'n_bits': 4, 'symmetric': True},
         'observer_args': {'axis': 1, 'group_size': 64}}
    """
    if spec is None or (isinstance(spec, str) and spec.lower() in _FLOAT):
        return None
    if isinstance(spec, str):
        m = _SHORT.match(spec.strip().lower())
        if m is not None:
            group = int(m["group"]) if m["group"] else None
            observer_args = {"axis": 0} if group is None else {"axis": 1, "group_size": group}
            out = QuantizerSpec(
                "affine", "batch_minmax", {"n_bits": int(m["bits"]), "symmetric": not m["asym"]}, observer_args
            )
        else:
            out = QuantizerSpec(spec.lower())
    else:
        out = QuantizerSpec.from_dict(spec, f"{_WHO}: update spec")
    width = 2 * int(out.observer_args.get("group_size") or 32)
    probe = torch.linspace(-1.0, 1.0, 2 * width).view(2, width)
    try:
        q = out.build()
        if isinstance(getattr(q, "range_observer", None), HistogramRangeObserver):
            raise ValueError(
                f"its observer is a {type(q.range_observer).__name__}, whose ranges need histograms of "
                "several batches; each update is observed once: use batch_minmax"
            )
        out.build().pre_observe(torch.zeros_like(probe))  # what decode_update builds its grid on
        q.pre_observe(probe)
        grid = q.grid()
    except Exception as e:
        raise ValueError(f"{_WHO}: update spec {spec!r} cannot quantize (rows, columns) updates: {e}") from e
    if not isinstance(grid, AffineGrid):
        raise ValueError(
            f"{_WHO}: update spec {spec!r}: {type(q).__name__} has no affine grid (grid() is None), "
            "so its outputs cannot be sent as integer codes; use an affine quantizer such as 'int8' or 'int4-g64'"
        )
    g = grid.granularity
    if not (g.axis is None or (g.axis in (0, -2) and g.group_size is None) or g.axis in (1, -1)):
        raise ValueError(
            f"{_WHO}: update spec {spec!r}: updates are quantized per tensor, per row or along rows, not {g}"
        )
    if grid.n_bits > 16:
        raise ValueError(f"{_WHO}: update spec {spec!r}: codes of {grid.n_bits} bits; updates are sent in 1 to 16")
    with torch.no_grad():
        rebuilt = torch.round(probe / grid.scale + grid.zero_point).clamp(grid.qmin, grid.qmax) - grid.zero_point
        err = ((rebuilt * grid.scale - probe).abs() / grid.scale.expand_as(probe)).max()
    if not err <= 0.5 + 1e-3:  # an update is signed: a clipped or unsigned grid would lose part of it
        raise ValueError(
            f"{_WHO}: update spec {spec!r}: {type(q).__name__}'s grid misses values of [-1, 1] it observed by "
            f"{float(err):.3g} steps (a clipped or unsigned grid); updates need a grid that covers their range"
        )
    return out


def _spec_key(spec: str | Mapping[str, Any] | QuantizerSpec | None) -> str:
    """The update format in a canonical text form, sent with every update so the server decodes it as it was made."""
    qspec = update_spec(spec)
    return "float32" if qspec is None else json.dumps(qspec.to_dict(), sort_keys=True)


def _aliases(model: nn.Module) -> dict[str, str]:
    """State-dict keys that name a tensor an earlier key names too (a tied weight), mapped to that key."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in first:
            out[k] = first[id(v)]
        else:
            first[id(v)] = k
    return out


def _as_rows(t: Tensor, g: Granularity) -> Tensor:
    """``t`` as a ``(rows, columns)`` matrix: ``(shape[0], -1)``, a 1-d tensor as one row; columns
    zero-padded to a multiple of the group size when ``g`` groups along rows."""
    m = t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)
    if g.group_size is not None and g.axis in (1, -1):
        pad = (-m.shape[1]) % g.group_size
        if pad:
            m = torch.cat([m, m.new_zeros(m.shape[0], pad)], dim=1)
    return m


def _compact(v: Tensor, g: Granularity, shape: torch.Size) -> Tensor:
    """A grid parameter (scale or zero point) reduced to one value per range, flattened."""
    v = v.expand(shape) if v.dim() else v
    if g.axis is None:
        return v.reshape(-1)[:1]
    if g.group_size is None:
        return v.amax(dim=1 if g.axis in (0, -2) else 0).reshape(-1)  # constant along the other axis
    return g.grouped(v)[:, :, 0].reshape(-1)  # (rows, cols / G, G) -> (rows * cols / G,)


def _expand(flat: Tensor, g: Granularity, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_compact`: a tensor that broadcasts against a ``shape`` matrix."""
    if flat.numel() == 1:
        return flat.reshape(())
    if g.axis is None:
        raise ValueError(f"{_WHO}: a per-tensor grid has one scale, got {flat.numel()}")
    if g.group_size is None:
        return flat.view(-1, 1) if g.axis in (0, -2) else flat.view(1, -1)
    return g.expand(flat.view(shape[0], shape[1] // g.group_size))


def encode_update(
    delta: Mapping[str, Tensor],
    spec: str | Mapping[str, Any] | QuantizerSpec | None,
    *,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Compress an update (``new - global`` per tensor) into the arrays a message carries.

    Each tensor is viewed as a ``(rows, columns)`` matrix (see :func:`update_spec`), a fresh
    quantizer of ``spec`` observes it, and its grid gives the codes: ``round(x / scale) +
    zero_point`` (nearest, half to even) or with :func:`stochastic_round` (unbiased),
    clamped to ``[qmin, qmax]``. Per tensor ``name``, the arrays are ``name/codes`` (the
    codes minus ``qmin``, packed with :func:`pack_bits`, ``uint8``), ``name/scale`` (float32,
    one per range) and ``name/zero_point`` (one per range, or a single one when they are
    equal: always for symmetric grids; ``uint8`` for grids of up to 256 levels, else ``int32``).
    With ``spec=None`` the tensor travels as ``name`` in float32.

    Args:
        delta: name -> floating tensor of any shape.
        spec: see :func:`update_spec`.
        rounding: ``"nearest"`` or ``"stochastic"``.
        generator: the random source of stochastic rounding.

    Returns:
        name -> numpy array, ready for ``flwr.app.Array``.

    Raises:
        ValueError: an unknown ``rounding``, a bad ``spec`` or a non-floating tensor (named).

    Example:
        >>> d = {"w": torch.randn(4, 16)}
        >>> arrays = encode_update(d, "int4")
        >>> {k: (v.dtype.name, v.shape) for k, v in arrays.items()}
        {'w/codes': ('uint8', (32,)), 'w/scale': ('float32', (4,)), 'w/zero_point': ('uint8', (1,))}
        >>> err = decode_update(arrays, {"w": d["w"].shape}, "int4")["w"] - d["w"]
        >>> bool((err.abs() <= d["w"].abs().amax(1, keepdim=True) / 15 + 1e-6).all())  # half a step
        True
    """
    if rounding not in _ROUNDINGS:
        raise ValueError(f"{_WHO}: rounding must be one of {_ROUNDINGS}, got {rounding!r}")
    qspec = update_spec(spec)
    out: dict[str, np.ndarray] = {}
    for name, t in delta.items():
        if not t.is_floating_point():
            raise ValueError(f"{_WHO}: update {name!r} is {t.dtype}; only floating tensors are updates")
        x = t.detach().to("cpu", torch.float32)
        if qspec is None:
            out[name] = x.numpy().copy()
            continue
        if x.numel() == 0:  # e.g. a learned quantizer parameter never initialised: nothing to send
            continue
        q = qspec.build()
        m = _as_rows(x, q.granularity)
        q.pre_observe(m)
        grid = q.grid()
        with torch.no_grad():
            u = m / grid.scale + grid.zero_point  # (rows, cols), in steps
            codes = torch.round(u) if rounding == "nearest" else stochastic_round(u, generator)
            codes = codes.clamp(grid.qmin, grid.qmax).to(torch.int64)
        zp = _compact(grid.zero_point, grid.granularity, m.shape)
        if bool((zp == zp[0]).all()):
            zp = zp[:1]
        out[f"{name}/codes"] = pack_bits(codes - grid.qmin, grid.n_bits).numpy()
        out[f"{name}/scale"] = _compact(grid.scale, grid.granularity, m.shape).to(torch.float32).numpy().copy()
        zp_dtype = np.uint8 if grid.qmin >= 0 and grid.qmax < 256 else np.int32
        out[f"{name}/zero_point"] = zp.round().to(torch.int64).numpy().astype(zp_dtype)
    return out


def decode_update(
    arrays: Mapping[str, np.ndarray],
    shapes: Mapping[str, Sequence[int]],
    spec: str | Mapping[str, Any] | QuantizerSpec | None,
) -> dict[str, Tensor]:
    """Rebuild the update :func:`encode_update` compressed: name -> float32 tensor of ``shapes[name]``.

    Every entry is ``(code - zero_point) * scale`` on the sender's grid, exactly.

    Raises:
        KeyError: an array of ``shapes`` is missing (naming it).
        ValueError: arrays whose sizes do not fit the shape.
    """
    qspec = update_spec(spec)
    out: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        shape = torch.Size(shape)
        if qspec is None:
            if name not in arrays:
                raise KeyError(f"{_WHO}: the update has no array {name!r}")
            out[name] = torch.as_tensor(np.asarray(arrays[name]), dtype=torch.float32).reshape(shape)
            continue
        if shape.numel() == 0:
            out[name] = torch.zeros(shape)
            continue
        missing = [f"{name}/{k}" for k in ("codes", "scale", "zero_point") if f"{name}/{k}" not in arrays]
        if missing:
            raise KeyError(f"{_WHO}: the update has no arrays {missing}")
        q = qspec.build()
        g = q.granularity
        m_shape = _as_rows(torch.empty(shape, device="meta"), g).shape
        q.pre_observe(torch.zeros(m_shape))  # any values: only qmin, qmax and the bit width are read
        probe = q.grid()
        try:
            codes = unpack_bits(torch.from_numpy(np.asarray(arrays[f"{name}/codes"])), probe.n_bits, m_shape.numel())
            codes = codes.view(m_shape) + probe.qmin
            scale = _expand(torch.from_numpy(np.asarray(arrays[f"{name}/scale"], dtype=np.float32)), g, m_shape)
            zp = _expand(torch.from_numpy(np.asarray(arrays[f"{name}/zero_point"]).astype(np.float32)), g, m_shape)
            m = (codes.to(torch.float32) - zp) * scale  # (rows, cols[+pad])
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{_WHO}: the arrays of update {name!r} do not fit its shape {tuple(shape)}: {e}") from e
        n_cols = shape.numel() // (shape[0] if len(shape) >= 2 else 1)
        out[name] = m[:, :n_cols].reshape(shape)
    return out


# ----------------------------------------------------------- model state <-> records
def _record(state: Mapping[str, Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().numpy().copy()) for k, v in state.items()})


def _state(record: ArrayRecord) -> dict[str, Tensor]:
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}


def _observer_keys(model: nn.Module) -> set[str]:
    return {f"{n}.{k}" for n, o in observers(model) for k in o.state_dict()}


def _check_observers(model: nn.Module) -> None:
    for name, obs in observers(model):
        if isinstance(obs, HistogramRangeObserver):
            raise TypeError(
                f"{_WHO}: observer {name!r} is a {type(obs).__name__}; histogram observers are for post-training "
                "calibration and have no min/max state to merge. Federated QAT needs BatchMinMax, RunningMinMax "
                "or ExpAvgMinMax"
            )


def observer_state(model: nn.Module) -> dict[str, Tensor]:
    """What a client sends of its range observers: ``<observer>/min_val``, ``/max_val`` (compact, float32)
    and ``/num_batches`` where the observer counts batches. Observers without ranges yet are left out.

    Raises:
        TypeError: a histogram observer (see :func:`merge_observer_states`).
    """
    _check_observers(model)
    out: dict[str, Tensor] = {}
    for name, obs in observers(model):
        if not obs.initialized:
            continue
        out[f"{name}/min_val"] = obs.min_val.detach().float().cpu()
        out[f"{name}/max_val"] = obs.max_val.detach().float().cpu()
        if isinstance(getattr(obs, "num_batches", None), Tensor):
            out[f"{name}/num_batches"] = obs.num_batches.detach().cpu()
    return out


def merge_observer_states(model: nn.Module, states: Sequence[Mapping[str, Tensor]]) -> int:
    """Set every range observer of ``model`` to the merge of the clients' :func:`observer_state` s.

    Ranges merge with :func:`torchquant.distributed.merge_ranges`, the rule
    :func:`~torchquant.distributed.sync_observers` all-reduces each batch with (minimum of
    the minima, maximum of the maxima); batch counters take the largest count. The merged
    ranges go in through ``force_ranges``, which rebuilds whatever else an observer keeps
    (``ExpAvgMinMax``'s averages continue from them). For ``RunningMinMax`` this is the
    state :func:`~torchquant.distributed.sync_observers` gives ranks that saw the clients'
    batches, and for ``BatchMinMax`` too when every client ran the same number of batches;
    ``ExpAvgMinMax`` merges per-client averages, which differ from a synchronised run's
    average of per-batch merges.

    Args:
        model: the global model (its observers are set in place).
        states: one :func:`observer_state` per client.

    Returns:
        The number of observers set (those that some client had ranges for).

    Raises:
        TypeError: a histogram observer (their histograms do not merge by min/max).
        ValueError: clients disagree on which observers have ranges, or on their shapes.
    """
    _check_observers(model)
    count = 0
    for name, obs in observers(model):
        have = [s for s in states if f"{name}/min_val" in s]
        if not have:
            continue
        if len(have) != len(states):
            raise ValueError(f"{_WHO}: observer {name!r} has ranges on {len(have)} of {len(states)} clients")
        try:
            lo, hi = merge_ranges([s[f"{name}/min_val"] for s in have], [s[f"{name}/max_val"] for s in have])
        except ValueError as e:
            raise ValueError(f"{_WHO}: observer {name!r}: {e}") from None
        counter = getattr(obs, "num_batches", None)
        count_of = None
        if isinstance(counter, Tensor) and all(f"{name}/num_batches" in s for s in have):
            count_of = max(int(s[f"{name}/num_batches"]) for s in have)
            counter.fill_(count_of)  # before force_ranges: ExpAvgMinMax rebuilds its averages from it
        obs.force_ranges(lo, hi)
        if count_of is not None:
            obs.num_batches.fill_(count_of)  # after: RunningMinMax.force_ranges counts one batch
        count += 1
    return count


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class FederatedConfig:
    """What clients and server agree on.

    Attributes:
        update: how client updates are compressed, see :func:`update_spec` (``"int8"``,
            ``"int4-g64"``, ``"int2"``, a spec dict, or ``None`` / ``"float32"``).
        rounding: ``"nearest"`` or ``"stochastic"`` (unbiased, :func:`stochastic_round`).
        local_epochs: passes over the client's training batches per round.
        lr: SGD learning rate.
        momentum: SGD momentum (the optimizer starts afresh every round).
        calibration_batches: batches each client calibrates on before the first round.
        seed: seeds every client's torch random state (with the round and partition)
            and the stochastic rounding.

    Raises:
        ValueError: an invalid field (named, with its value).
    """

    update: str | Mapping[str, Any] | None = "int8"
    rounding: str = "nearest"
    local_epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    calibration_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        update_spec(self.update)  # raises on a bad spec now rather than in the first round
        if self.rounding not in _ROUNDINGS:
            raise ValueError(f"{_WHO}: FederatedConfig.rounding must be one of {_ROUNDINGS}, got {self.rounding!r}")
        for name in ("local_epochs", "calibration_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{_WHO}: FederatedConfig.{name} must be a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"{_WHO}: FederatedConfig.lr must be positive, got {self.lr!r}")


# --------------------------------------------------------------------- local work
def _build(model_fn: ModelFn) -> nn.Module:
    model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_WHO}: model_fn must return an nn.Module, got {type(model).__name__}")
    _check_observers(model)
    return model


def _quantized(model: nn.Module) -> bool:
    return any(True for _ in iter_qmodules(model))


def _evaluate(model: nn.Module, batches: Batches) -> tuple[int, float, float]:
    """``(examples, mean loss, accuracy)`` in ``QUANT_EVAL`` (float models: as they are)."""
    if _quantized(model):
        set_qmodule_state(model, QModuleState.QUANT_EVAL)
    model.eval()
    n, loss, correct = 0, 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x)
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(dim=1) == y).sum())
            n += len(y)
    return n, loss / max(n, 1), correct / max(n, 1)


def _train(model: nn.Module, batches: Batches, config: FederatedConfig) -> tuple[int, float]:
    """Local SGD in ``QUANT_AWARE_TRAIN`` (float models: plain training); ``(examples seen, mean loss)``."""
    if _quantized(model):
        set_qmodule_state(model, QModuleState.QUANT_AWARE_TRAIN)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    n, total = 0, 0.0
    for _ in range(config.local_epochs):
        for x, y in batches:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            n += len(y)
            total += float(loss.detach()) * len(y)
    return n, total / max(n, 1)


def _calibrate(model: nn.Module, batches: Batches, num_batches: int) -> int:
    """Calibrate on the first ``num_batches`` batches (:func:`torchquant.calibrate`); the examples seen."""
    seen = 0

    def counted() -> Iterator[Any]:
        nonlocal seen
        for i, batch in enumerate(batches):
            if i == num_batches:
                return
            seen += len(batch[1])
            yield batch

    it = iter(counted())
    first = next(it, None)
    if first is None:  # a client without data sends no ranges (its weight in every merge is 0)
        return 0
    calibrate(model, itertools.chain([first], it), progress=False)
    return seen


def _own_rng() -> contextlib.AbstractContextManager:
    """The torch random state of the CPU and of every initialised CUDA device, restored on exit: the apps
    seed their own (``torch.manual_seed`` seeds every device) and leave the caller's as it was."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def _partition(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise KeyError(
            f"{_WHO}: the node config has no 'partition-id' / 'num-partitions' (got {sorted(cfg)}); "
            "run_federation and Flower's simulation engine set them"
        )
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


# ------------------------------------------------------------------------ ClientApp
def client_app(model_fn: ModelFn, data_fn: DataFn, config: FederatedConfig | None = None) -> ClientApp:
    """A Flower ``ClientApp`` that trains a torchquant model and replies with a compressed update.

    It answers three message types:

    * ``"train.calibrate"`` (:data:`CALIBRATE`): load the global state, calibrate on
      ``config.calibration_batches`` training batches, reply with the observer ranges
      (``observer/...``) and the first values of learned quantizer parameters
      (``init/<state key>``);
    * ``"train"``: load the global state, train ``config.local_epochs`` epochs
      (``QUANT_AWARE_TRAIN``), reply with ``delta/...`` (every parameter's update, see
      :func:`encode_update`; other floating buffers such as BatchNorm statistics as
      float32 deltas ``delta/<key>``; integer buffers such as BatchNorm's
      ``num_batches_tracked`` are not sent and keep the server's value) and ``observer/...``;
    * ``"evaluate"``: load the global state, reply with ``eval-loss`` and ``eval-acc``
      in ``QUANT_EVAL``.

    Every reply carries one ``ArrayRecord`` (``"arrays"``) and one ``MetricRecord``
    (``"metrics"``, with ``num-examples``). After each message the client keeps its model
    state in ``context.state["torchquant.model"]`` (node-local, never sent).

    Args:
        model_fn: builds the model, the same on every client and the server (for example
            ``tq.quantize_model(Net(), weights, acts)``); its initial values do not matter
            on clients, which load the global state.
        data_fn: ``(partition_id, num_partitions) -> (train_batches, eval_batches)``,
            re-iterable ``(x, y)`` batches of this client's data (``x``: the model's input
            ``(N, ...)``, ``y``: class indices ``(N,)``).
        config: what clients and server agree on (:class:`FederatedConfig`).

    Returns:
        The ``ClientApp``.
    """
    config = config or FederatedConfig()
    app = ClientApp()

    update_key = _spec_key(config.update)

    def load(msg: Message) -> tuple[nn.Module, dict[str, Tensor]]:
        model = _build(model_fn)
        state = _state(msg.content["arrays"])
        sent = sorted(k for k in state if k.split("/", 1)[0] in ("delta", "observer", "init"))
        if sent:
            raise ValueError(
                f"{_WHO}: the server sent {sent[0]!r} and {len(sent) - 1} more arrays of client updates instead of "
                "a model state: it must aggregate them with QuantizedFedAvg (server_app), not a stock strategy"
            )
        model.load_state_dict(state)
        return model, state

    def seed(msg: Message, partition: int) -> None:
        rnd = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
        torch.manual_seed(config.seed * 1_000_003 + rnd * 1_009 + partition)

    def reply(
        msg: Message, context: Context, model: nn.Module, arrays: dict[str, np.ndarray], metrics: dict
    ) -> Message:
        context.state["torchquant.model"] = _record(model.state_dict())
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()})})
        content["metrics"] = MetricRecord(metrics)
        content["torchquant"] = ConfigRecord({"update": update_key})
        return Message(content, reply_to=msg)

    @app.train("calibrate")
    def calibrate(msg: Message, context: Context) -> Message:
        with _own_rng():  # the seeding below stays in this handler
            partition, partitions = _partition(context)
            seed(msg, partition)
            model, received = load(msg)
            train_batches, _ = data_fn(partition, partitions)
            n = _calibrate(model, train_batches, config.calibration_batches)
            arrays = {f"observer/{k}": v.numpy() for k, v in observer_state(model).items()}
            obs_keys = _observer_keys(model)
            for k, v in model.state_dict().items():  # learned parameters initialised by this calibration
                if k not in obs_keys and k in received and received[k].numel() == 0 and v.numel() > 0:
                    arrays[f"init/{k}"] = v.detach().cpu().numpy().copy()
            return reply(msg, context, model, arrays, {"num-examples": n})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        with _own_rng():
            partition, partitions = _partition(context)
            seed(msg, partition)
            model, received = load(msg)
            train_batches, _ = data_fn(partition, partitions)
            n, loss = _train(model, train_batches, config)
            new = model.state_dict()
            params = {k for k, _ in model.named_parameters()}
            skip = _observer_keys(model) | set(_aliases(model))  # a tied weight travels once, as a parameter
            delta = {k: new[k].detach() - received[k] for k in new if k in params}
            other = {
                k: new[k].detach() - received[k]
                for k in new
                if k not in params and k not in skip and new[k].is_floating_point() and k in received
            }
            rnd = int(msg.content["config"].get("server-round", 0))
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + rnd * 1_009 + partition + 7)
            arrays = {
                f"delta/{k}": v
                for k, v in encode_update(delta, config.update, rounding=config.rounding, generator=gen).items()
            }
            arrays.update({f"delta/{k}": v for k, v in encode_update(other, None).items()})
            arrays.update({f"observer/{k}": v.numpy() for k, v in observer_state(model).items()})
            return reply(msg, context, model, arrays, {"num-examples": n, "train-loss": loss})

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        partition, partitions = _partition(context)
        model, _ = load(msg)
        _, eval_batches = data_fn(partition, partitions)
        n, loss, acc = _evaluate(model, eval_batches)
        context.state["torchquant.model"] = _record(model.state_dict())
        return Message(
            RecordDict({"metrics": MetricRecord({"num-examples": n, "eval-loss": loss, "eval-acc": acc})}), reply_to=msg
        )

    return app


# ------------------------------------------------------------------------- strategy
def _valid_replies(replies: Iterable[Message], weighted_by_key: str, stage: str) -> list[Message]:
    """The replies without errors (errors are logged), in node order: float sums that do not
    depend on arrival order.

    Raises:
        ValueError: a reply without the ``"arrays"`` record or without ``weighted_by_key`` in its metrics.
    """
    out = []
    for m in replies:
        if m.has_error():
            _log.warning("%s: node %s replied with an error: %s", stage, m.metadata.src_node_id, m.error.reason)
            continue
        metrics = list(m.content.metric_records.values())
        if "arrays" not in m.content.array_records or not metrics or weighted_by_key not in metrics[0]:
            raise ValueError(
                f"{_WHO}: {stage}: the reply of node {m.metadata.src_node_id} needs an ArrayRecord 'arrays' and a "
                f"MetricRecord with {weighted_by_key!r}; it has {sorted(m.content.keys())}"
            )
        out.append(m)
    return sorted(out, key=lambda m: m.metadata.src_node_id)


def _prefixed(record: ArrayRecord, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: a.numpy() for k, a in record.items() if k.startswith(prefix)}


class QuantizedFedAvg(FedAvg):
    """Flower's ``FedAvg`` on compressed updates, with range observers merged.

    Keeps the global model as a torch module (built by ``model_fn``). Each training round
    sends its full state (float32 weights, learned quantizer parameters, observer state);
    :meth:`aggregate_train` decodes every reply's ``delta/...`` arrays, adds their average
    weighted by ``num-examples`` to the global state, and merges the replies'
    ``observer/...`` ranges with :func:`merge_observer_states`. :meth:`calibrate` runs the
    calibration round. The history (``bytes-up`` per round, :func:`payload_bytes` of every
    reply; ``bytes-calibration``) is kept in :attr:`history`.

    Args:
        model: the global model (``model_fn()``); updated in place.
        config: the clients' :class:`FederatedConfig` (its ``update`` decodes the replies).
        **fedavg: ``FedAvg``'s arguments (``fraction_train``, ``min_available_nodes``, ...).
    """

    def __init__(self, model: nn.Module, config: FederatedConfig, **fedavg: Any) -> None:
        super().__init__(**fedavg)
        _check_observers(model)
        self.model = model
        self.config = config
        self.history: dict[str, list[float]] = {"bytes-up": [], "bytes-calibration": []}
        self._global: dict[str, Tensor] | None = None

    def global_arrays(self) -> ArrayRecord:
        """The global model's state as an ``ArrayRecord``."""
        return _record(self.model.state_dict())

    def calibrate(self, grid: Grid, timeout: float = 3600) -> bool:
        """The calibration round: every node calibrates, ranges merge, learned parameters average.

        Waits (up to ``timeout`` seconds) until ``min_available_nodes`` nodes are connected,
        then sends :data:`CALIBRATE` to every connected node.

        Returns:
            ``False`` (and sends nothing) for a model without observers or learned parameters to set.

        Raises:
            RuntimeError: too few nodes connected in time, a node replied with an error, or none replied.
        """
        state = self.model.state_dict()
        needs = any(not o.initialized for _, o in observers(self.model)) or any(
            v.numel() == 0 for k, v in state.items() if k not in _observer_keys(self.model)
        )
        if not needs:
            return False
        content = RecordDict({"arrays": self.global_arrays(), "config": ConfigRecord({"server-round": 0})})
        deadline = time.monotonic() + timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:  # as FedAvg's sampling waits
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{_WHO}: calibration round: {len(nodes)} nodes connected after {timeout} s, "
                    f"min_available_nodes={self.min_available_nodes}"
                )
            time.sleep(1.0)
        msgs = [Message(copy.deepcopy(content), dst_node_id=n, message_type=CALIBRATE) for n in nodes]
        replies = list(grid.send_and_receive(msgs, timeout=timeout))
        errors = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in replies if m.has_error()]
        if errors or not replies:
            raise RuntimeError(f"{_WHO}: calibration round failed: {errors or 'no replies'}")
        replies = _valid_replies(replies, self.weighted_by_key, "calibration")
        self.history["bytes-calibration"].append(sum(payload_bytes(m) for m in replies))
        self._check_format(replies, "calibration")
        replies = [m for m in replies if self._count(m) > 0]  # a client without data calibrated nothing
        weights = self._weights(replies)
        init: dict[str, Tensor] = {}
        for m, w in zip(replies, weights):
            for k, v in _prefixed(m.content["arrays"], "init/").items():
                init[k] = init.get(k, 0) + w * torch.from_numpy(v)
        merge_observer_states(self.model, [self._observers(m) for m in replies])
        if init:
            self.model.load_state_dict({**self.model.state_dict(), **init})
        return True

    def _count(self, m: Message) -> float:
        return float(next(iter(m.content.metric_records.values()))[self.weighted_by_key])

    def _check_format(self, replies: Sequence[Message], stage: str) -> None:
        """Refuse updates compressed in another format than the one this server decodes."""
        ours = _spec_key(self.config.update)
        for m in replies:
            record = m.content.config_records.get("torchquant")
            theirs = record.get("update") if record is not None else None
            if theirs != ours:
                raise ValueError(
                    f"{_WHO}: {stage}: node {m.metadata.src_node_id} sent its update as {theirs or 'unstated'}, "
                    f"but this server decodes {ours}: give the clients and the server the same FederatedConfig.update"
                )

    def _weights(self, replies: Sequence[Message]) -> list[float]:
        counts = [self._count(m) for m in replies]
        total = sum(counts)
        if total <= 0:
            raise ValueError(f"{_WHO}: replies report {counts} {self.weighted_by_key!r}; cannot weight them")
        return [c / total for c in counts]

    @staticmethod
    def _observers(m: Message) -> dict[str, Tensor]:
        return {k: torch.from_numpy(v) for k, v in _prefixed(m.content["arrays"], "observer/").items()}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """FedAvg's, remembering the global state the clients' deltas refer to."""
        self._global = _state(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode, average and apply the updates; merge the observers; record the bytes."""
        valid = _valid_replies(replies, self.weighted_by_key, f"round {server_round}")
        if not valid or self._global is None:
            return None, None
        self.history["bytes-up"].append(sum(payload_bytes(m) for m in valid))
        self._check_format(valid, f"round {server_round}")
        g = self._global
        params = {k for k, _ in self.model.named_parameters()}
        aliases = _aliases(self.model)
        skip = _observer_keys(self.model) | set(aliases)
        others = {k for k, v in g.items() if k not in params and k not in skip and v.is_floating_point()}
        new = dict(g)
        for m, w in zip(valid, self._weights(valid)):
            arrays = _prefixed(m.content["arrays"], "delta/")
            deltas = decode_update(arrays, {k: g[k].shape for k in params}, self.config.update)
            deltas.update(decode_update(arrays, {k: g[k].shape for k in others}, None))
            for k, d in deltas.items():
                new[k] = new[k] + w * d.to(g[k].dtype)
        for alias, key in aliases.items():  # load_state_dict writes a tied tensor once per name
            new[alias] = new[key]
        self.model.load_state_dict(new)
        merge_observer_states(self.model, [self._observers(m) for m in valid])
        # The clients' weight ranges describe their own weights; the global grid must fit the average.
        reobserve_weights(m for _, m in iter_qmodules(self.model))
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return self.global_arrays(), metrics


# ------------------------------------------------------------------------ ServerApp
def server_app(
    model_fn: ModelFn,
    config: FederatedConfig | None = None,
    *,
    num_rounds: int,
    test_data: Batches | None = None,
    fraction_train: float = 1.0,
    fraction_evaluate: float = 0.0,
    min_nodes: int = 2,
) -> ServerApp:
    """A Flower ``ServerApp``: a calibration round, then ``num_rounds`` of :class:`QuantizedFedAvg`.

    At the end, ``context.state`` holds ``"torchquant.global"`` (the final global state, an
    ``ArrayRecord``) and ``"torchquant.history"`` (a ``MetricRecord`` of lists: ``bytes-up``
    per round, ``bytes-calibration``, and with ``test_data`` the server-side ``accuracy`` and
    ``loss`` of the global model before the first round and after each, in ``QUANT_EVAL``).

    Args:
        model_fn: builds the model (as for :func:`client_app`); the server's copy is
            seeded with ``config.seed`` and gives the initial weights.
        config: the clients' :class:`FederatedConfig`.
        num_rounds: training rounds after calibration.
        test_data: ``(x, y)`` batches for centralised evaluation, or ``None``.
        fraction_train: share of nodes sampled each training round.
        fraction_evaluate: share of nodes asked for federated evaluation (0: none).
        min_nodes: minimum nodes that must be connected to start a round.

    Returns:
        The ``ServerApp``.
    """
    config = config or FederatedConfig()
    if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 1:
        raise ValueError(f"{_WHO}: server_app num_rounds must be a positive int, got {num_rounds!r}")
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if isinstance(grid, InProcessGrid) and len(grid.get_node_ids()) < min_nodes:
            raise ValueError(  # no node will join an in-process grid: Flower would wait for ever
                f"{_WHO}: server_app needs min_nodes={min_nodes} nodes to start a round, but the federation has "
                f"{len(grid.get_node_ids())} (num_clients); lower min_nodes or add clients"
            )
        with _own_rng():  # the seeding below stays in this app
            _run_server(grid, context)

    def _run_server(grid: Grid, context: Context) -> None:
        torch.manual_seed(config.seed)
        model = _build(model_fn)
        strategy = QuantizedFedAvg(
            model,
            config,
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_nodes,
            min_evaluate_nodes=min_nodes if fraction_evaluate > 0 else 0,
            min_available_nodes=min_nodes,
        )
        strategy.calibrate(grid)
        evaluator = copy.deepcopy(model)
        scores: dict[str, list[float]] = {"accuracy": [], "loss": []}

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            evaluator.load_state_dict(_state(arrays))
            _, loss, acc = _evaluate(evaluator, test_data)
            scores["accuracy"].append(acc)
            scores["loss"].append(loss)
            return MetricRecord({"accuracy": acc, "loss": loss})

        initial = strategy.global_arrays()
        result = strategy.start(
            grid,
            initial_arrays=initial,
            num_rounds=num_rounds,
            evaluate_fn=central if test_data is not None else None,
        )
        context.state["torchquant.global"] = result.arrays if result.arrays is not None else initial
        hist = {k: [float(x) for x in v] for k, v in strategy.history.items() if v}
        if test_data is not None:
            hist.update(scores)
        context.state["torchquant.history"] = MetricRecord(hist)

    return app


# ---------------------------------------------------------------- in-process driver
def _wire(content: RecordDict) -> tuple[RecordDict, int]:
    """``content`` through Flower's protobuf serialisation and back; ``(copy, serialised bytes)``."""
    raw = recorddict_to_proto(content).SerializeToString()
    return recorddict_from_proto(ProtoRecordDict.FromString(raw)), len(raw)


class InProcessGrid(Grid):
    """A Flower ``Grid`` that delivers messages to a ``ClientApp`` in this process.

    Each node has a ``Context`` that persists across messages (``node_config`` with
    ``partition-id`` and ``num-partitions``, as the simulation engine sets them). Messages
    are handled one at a time, in order; every message's content is serialised to Flower's
    protobuf format and parsed back on the way in both directions, so nothing is shared
    by reference and :attr:`wire_bytes_down` / :attr:`wire_bytes_up` count the serialised
    contents exactly. A ``ClientApp`` that raises propagates the exception.

    Args:
        client_app: the ``ClientApp`` every node runs.
        num_nodes: how many nodes.
        run_config: the run config every context gets.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any] | None = None) -> None:
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"{_WHO}: InProcessGrid num_nodes must be a positive int, got {num_nodes!r}")
        self._app = client_app
        self._run = Run.create_empty(run_id=1)
        self.contexts: dict[int, Context] = {
            1001 + i: Context(
                run_id=1,
                node_id=1001 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self.wire_bytes_down = 0
        self.wire_bytes_up = 0

    def set_run(self, run: Run) -> None:
        """Set the run (a ``flwr.supercore.run.Run``)."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run."""
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """A new instruction message (Flower's deprecated helper; ``Message(...)`` does the same)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """The node ids."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message and run the ``ClientApp`` on it; returns the message ids."""
        ids = []
        for msg in messages:
            dst = msg.metadata.dst_node_id
            if dst not in self.contexts:
                raise ValueError(f"{_WHO}: message for node {dst}, but the grid's nodes are {self.get_node_ids()}")
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id
            content, n = _wire(msg.content)
            self.wire_bytes_down += n
            delivered = Message(content=content, metadata=copy.deepcopy(msg.metadata))
            reply = self._app(delivered, self.contexts[dst])
            if not isinstance(reply, Message):
                raise TypeError(f"{_WHO}: the ClientApp returned {type(reply).__name__}, not a Message")
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            if reply.has_content():
                content, n = _wire(reply.content)
                self.wire_bytes_up += n
                reply = Message(content=content, metadata=reply.metadata)
            self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to ``message_ids`` (each returned once)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push the messages and return every reply (``timeout`` is not needed in-process)."""
        return self.pull_messages(self.push_messages(messages))


@dataclass
class Federation:
    """What :func:`run_federation` returns.

    Attributes:
        server: the ``ServerApp``'s context (``state`` holds what :func:`server_app` stores).
        clients: every node's context, in partition order.
        wire_bytes_down: serialised bytes of every server-to-client message content.
        wire_bytes_up: serialised bytes of every client-to-server message content.
    """

    server: Context
    clients: list[Context]
    wire_bytes_down: int
    wire_bytes_up: int


@contextmanager
def _server_task(run_id: int, level: int) -> Iterator[None]:
    """The ``flwr`` logger at ``level`` and this process identified as the server's task (as Flower's
    runtimes do before running a ``ServerApp``); both restored afterwards."""
    log = logging.getLogger("flwr")
    old_level = log.level
    log.setLevel(level)
    fields = ("_task_id", "_run_id", "_node_id")
    saved = [getattr(TaskIdentity, f) for f in fields] if TaskIdentity is not None else None
    if TaskIdentity is not None:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, _SERVER_NODE_ID
    try:
        yield
    finally:
        log.setLevel(old_level)
        if saved is not None:
            for f, v in zip(fields, saved):
                setattr(TaskIdentity, f, v)


def run_federation(
    server_app: ServerApp,
    client_app: ClientApp,
    num_clients: int,
    *,
    run_config: Mapping[str, Any] | None = None,
    log_level: int = logging.WARNING,
) -> Federation:
    """Run a ``ServerApp`` against ``num_clients`` nodes of a ``ClientApp``, in this process.

    A stand-in for ``flwr.simulation.run_simulation`` that needs neither Ray nor network:
    the ``ServerApp`` runs with an :class:`InProcessGrid`, nodes are handled one after the
    other.

    Args:
        server_app: e.g. :func:`server_app`'s.
        client_app: e.g. :func:`client_app`'s.
        num_clients: number of nodes (partitions ``0 .. num_clients - 1``).
        run_config: given to every context.
        log_level: the ``flwr`` logger's level while it runs (``logging.INFO`` shows Flower's
            round-by-round log).

    Returns:
        A :class:`Federation`.
    """
    grid = InProcessGrid(client_app, num_clients, run_config)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config or {}))
    with _server_task(grid.run.run_id, log_level):
        server_app(grid, context)
    return Federation(context, list(grid.contexts.values()), grid.wire_bytes_down, grid.wire_bytes_up)


def history(federation: Federation) -> dict[str, list[float]]:
    """The server's history of a run of :func:`server_app` (see there), as plain lists.

    Raises:
        KeyError: the run's ``ServerApp`` was not :func:`server_app`'s.
    """
    state = federation.server.state
    if "torchquant.history" not in state:
        raise KeyError(f"{_WHO}: the server context has no 'torchquant.history'; was the ServerApp server_app()'s?")
    return {k: list(v) for k, v in state["torchquant.history"].items()}
