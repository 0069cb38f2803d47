"""Implementation of :mod:`torchquant.debug`."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..qmodules import QModule, QModuleState, QWrapper
from ..quantizers import Quantizer
from ..utils import call_model, model_output, restoring_states

__all__ = ["Report", "mixed_precision", "plot_ranges", "sensitivity", "sqnr_report"]

Data = Tensor | Iterable[Any]
Metric = Callable[[nn.Module, Any], float]


@dataclass
class Report:
    """Rows of a diagnostic (a list of dicts, DataFrame-like) and their text table.

    ``str(report)`` is the table; ``report.rows`` the data (``pandas.DataFrame(report.rows)``
    works where pandas is installed).
    """

    rows: list[dict[str, Any]]
    columns: list[str] = field(default_factory=list)

    def table(self) -> str:
        """A fixed-width text table of the rows."""
        cols = self.columns or (list(self.rows[0]) if self.rows else [])
        cells = [[_fmt(r.get(c)) for c in cols] for r in self.rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return "" if v is None else str(v)


def _batches(data: Data, who: str) -> list[Any]:
    if isinstance(data, (Tensor, dict)):  # one batch: a tensor, or keyword arguments (a tokenizer's output)
        return [data]
    try:
        batches = list(data)
    except TypeError as e:
        raise TypeError(
            f"{who}: data must be a tensor, a dict or an iterable of batches, got {type(data).__name__}"
        ) from e
    if not batches:
        raise ValueError(f"{who}: data is empty")
    return batches


def _run(model: nn.Module, batches: list[Any], who: str) -> list[Tensor]:
    """The model's output tensor for each batch (batches as :func:`~torchquant.calibrate` takes them)."""
    with torch.no_grad():
        return [model_output(call_model(model, b, who), who) for b in batches]


def _qmodules(model: nn.Module, who: str) -> list[tuple[str, QModule]]:
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, QModule)]
    if not mods:
        raise ValueError(f"{who}: {type(model).__name__} contains no QModule; quantize it first (tq.quantize_model)")
    return mods


class _States:
    """Puts ``model`` in ``eval()`` while it is measured (BatchNorm statistics and dropout stay as they are:
    dozens of passes in training mode would move them, and each score would depend on the ones before) and
    gives every QModule its mode and every module its ``training`` flag back on exit, also on error."""

    def __init__(self, model: nn.Module, mods: list[tuple[str, QModule]]) -> None:
        self.model = model
        self.mods = mods

    def __enter__(self) -> _States:
        self._restore = restoring_states(self.model)
        self._restore.__enter__()
        self.model.eval()
        return self

    def __exit__(self, *exc) -> None:
        self._restore.__exit__(*exc)

    def set(self, quantized: set[str]) -> None:
        for n, m in self.mods:
            m.qstate = QModuleState.QUANT_EVAL if n in quantized else QModuleState.BYPASSED


def _run_quantized_with_hooks(
    model: nn.Module, mods: list[tuple[str, QModule]], batches: list[Any], hooks: list, who: str
) -> None:
    """Run ``batches`` with every point in ``mods`` quantized, then remove ``hooks`` and restore the modes."""
    try:
        with _States(model, mods) as st:
            st.set({n for n, _ in mods})
            with torch.no_grad():
                for b in batches:
                    call_model(model, b, who)  # only the hooks' measurements are wanted
    finally:
        for h in hooks:
            h.remove()


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_report(model: nn.Module, data: Data) -> Report:
    """Signal-to-quantization-noise ratio of every quantization point, in dB.

    Runs ``data`` through ``model`` with every QModule in ``QUANT_EVAL`` (modes are
    restored afterwards) and, at each quantizer, compares what it receives with
    what it returns: ``SQNR = 10 log10(sum x^2 / sum (x - q(x))^2)`` over all
    batches. Weights are measured on the weight, activations on the float tensor
    entering the activation quantizer (the upstream layers being quantized).

    Args:
        model: a calibrated quantized model.
        data: a tensor, a dict of keyword arguments (one batch), or an iterable of batches as
            :func:`~torchquant.calibrate` takes them (labels are left out of dict batches).

    Returns:
        A :class:`Report` with one row per quantizer: ``point``, ``kind``
        (``"weight"``/``"activation"``), ``quantizer``, ``n_bits``, ``sqnr_db``;
        rows in model order.

    Raises:
        ValueError: no QModule in ``model``, or empty ``data``.
    """
    who = "sqnr_report"
    mods = _qmodules(model, who)
    batches = _batches(data, who)
    sums: dict[str, list[float]] = {}
    rows: list[dict[str, Any]] = []
    hooks = []
    seen: set[int] = set()
    for owner, m in mods:
        for attr, q in m.quantizers().items():
            if id(q) in seen:  # one quantizer several modules hold: one row, under its first name
                continue
            seen.add(id(q))
            name = f"{owner}.{attr}" if owner else attr
            kind = "weight" if any(q is w for w in m.weight_quantizers()) else "activation"
            rows.append(
                {"point": name, "kind": kind, "quantizer": type(q).__name__, "n_bits": getattr(q, "n_bits", None)}
            )
            sums[name] = [0.0, 0.0]

            def hook(mod, args, out, name=name):
                x = args[0].detach().double()
                sums[name][0] += float((x * x).sum())
                sums[name][1] += float(((x - out.detach().double()) ** 2).sum())

            hooks.append(q.register_forward_hook(hook))
    _run_quantized_with_hooks(model, mods, batches, hooks, who)
    for r in rows:
        r["sqnr_db"] = _sqnr_db(*sums[r["point"]])
    return Report(rows, ["point", "kind", "quantizer", "n_bits", "sqnr_db"])


def _output_sqnr(reference: list[Tensor], who: str) -> Metric:
    def metric(model: nn.Module, batches: list[Any]) -> float:
        outs = _run(model, batches, who)
        signal = sum(float((r.double() ** 2).sum()) for r in reference)
        noise = sum(float(((r.double() - o.double()) ** 2).sum()) for r, o in zip(reference, outs))
        return _sqnr_db(signal, noise)

    return metric


def sensitivity(
    model: nn.Module,
    data: Data,
    metric: Metric | None = None,
    *,
    higher_is_better: bool = True,
) -> Report:
    """The metric with one layer quantized at a time, and with all layers but one.

    For every QModule (by qualified name): ``only`` is the metric with that module in
    ``QUANT_EVAL`` and every other one ``BYPASSED``; ``all_but`` with every other one in
    ``QUANT_EVAL`` and that one ``BYPASSED``. Modes are restored afterwards.

    Args:
        model: a calibrated quantized model.
        data: a tensor, a dict of keyword arguments (one batch), or an iterable of batches as
            :func:`~torchquant.calibrate` takes them (labels are left out of dict batches).
        metric: ``metric(model, batches) -> float`` where ``batches`` is ``data`` as a
            list (e.g. accuracy on labelled batches). ``None``: SQNR (dB) of the model
            output against the float model's output (``BYPASSED``).
        higher_is_better: how to sort: rows come most harmful first (lowest ``only``
            when higher is better).

    Returns:
        A :class:`Report` with rows ``layer``, ``only``, ``all_but``, plus ``float`` and
        ``all`` (the metric with nothing and everything quantized) in ``report.rows``'s
        every row, sorted most harmful first.

    Raises:
        ValueError: no QModule in ``model``, or empty ``data``.
    """
    who = "sensitivity"
    mods = _qmodules(model, who)
    batches = _batches(data, who)
    names = [n for n, _ in mods]
    with _States(model, mods) as st:
        st.set(set())
        if metric is None:
            metric = _output_sqnr(_run(model, batches, who), who)
        base = float(metric(model, batches))
        st.set(set(names))
        full = float(metric(model, batches))
        rows = []
        for n in names:
            st.set({n})
            only = float(metric(model, batches))
            st.set(set(names) - {n})
            all_but = float(metric(model, batches))
            rows.append({"layer": n, "only": only, "all_but": all_but, "float": base, "all": full})
    rows.sort(key=lambda r: r["only"], reverse=not higher_is_better)
    return Report(rows, ["layer", "only", "all_but"])


def plot_ranges(
    model: nn.Module,
    path: str | os.PathLike,
    data: Data | None = None,
    *,
    bins: int = 100,
    max_points: int = 24,
) -> list[str]:
    """Histograms of weights (and, with ``data``, activations) with each quantizer's clipping range.

    One panel per quantization point whose quantizer has an affine grid: a
    log-scale histogram of the values it quantizes and two vertical lines at the
    grid's ends ``(qmin - zero_point) * scale`` and ``(qmax - zero_point) * scale``
    (the outermost ones for per-channel grids). Saved as a PNG (matplotlib, Agg backend).

    Args:
        model: a calibrated quantized model.
        path: the PNG file to write.
        data: batches to collect activations from (run in ``QUANT_EVAL``, modes
            restored); ``None`` plots weights only.
        bins: histogram bins.
        max_points: at most this many panels, in model order.

    Returns:
        The names of the plotted points.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: no QModule in ``model`` or nothing to plot.
    """
    who = "plot_ranges"
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover
        raise ImportError("plot_ranges needs matplotlib: pip install torchquant[bench]") from e
    mods = _qmodules(model, who)
    values: dict[str, list[Tensor]] = {}  # what each point quantizes, in its own layout (per-channel grids)
    quantizers: dict[str, Quantizer] = {}
    hooks = []
    seen: set[int] = set()
    for owner, m in mods:
        for attr, q in m.quantizers().items():
            if id(q) in seen:  # one quantizer several modules hold: one row, under its first name
                continue
            seen.add(id(q))
            name = f"{owner}.{attr}" if owner else attr
            if q.grid() is None:
                continue
            quantizers[name] = q
            bank = next((b for b, r in getattr(m, "ROLE_OF_BANK", {}).items() if f"{r}_quantizer" == attr), None)
            if isinstance(m, QWrapper) and q is m.weight_quantizer:
                with torch.no_grad():  # with fold_bn, the folded weight its grid is for
                    values[name] = [m.weight_to_quantize().detach()]
            elif bank is not None:  # a QExperts' weight bank: every expert's matrix
                values[name] = [getattr(m.layer, bank).detach().flatten()]
            elif data is not None:

                def hook(mod, args, out, name=name):
                    values.setdefault(name, []).append(args[0].detach())

                hooks.append(q.register_forward_hook(hook))
    if data is not None:
        _run_quantized_with_hooks(model, mods, _batches(data, who), hooks, who)
    names = [n for n in quantizers if n in values][:max_points]
    if not names:
        raise ValueError(f"{who}: nothing to plot (no affine quantizer with observed values)")
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        g = quantizers[name].grid()
        lo_t, hi_t = (g.qmin - g.zero_point) * g.scale, (g.qmax - g.zero_point) * g.scale
        lo, hi = float(lo_t.min()), float(hi_t.max())
        v = torch.cat([t.flatten() for t in values[name]]).float().cpu().numpy()
        ax.hist(v, bins=bins, color="tab:blue", alpha=0.8, log=True)
        for x in (lo, hi):
            ax.axvline(x, color="tab:red", lw=1.2, ls="--")
        clipped = _clipped_percent(values[name], lo_t, hi_t, 0.5 * g.scale)
        ax.set_title(f"{name}\n{g.n_bits}-bit, {g.granularity}, clipped {clipped:.2f}%", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)
    return names


def _clipped_percent(tensors: list[Tensor], lo: Tensor, hi: Tensor, half: Tensor) -> float:
    """The share of the values of ``tensors`` beyond half a step outside their own range's ends, in percent.

    ``lo``, ``hi`` and ``half`` broadcast against each tensor (one value per tensor, channel or group);
    where they do not (a tensor of another layout), the outermost ends and the smallest step are used.
    """
    clipped = total = 0
    for t in tensors:
        t = t.float()
        try:
            out = (t < lo.to(t.device) - half.to(t.device)) | (t > hi.to(t.device) + half.to(t.device))
            if out.shape != t.shape:
                raise RuntimeError("the range broadcasts to another shape")
        except RuntimeError:
            h = float(half.min())
            out = (t < float(lo.min()) - h) | (t > float(hi.max()) + h)
        clipped += int(out.sum())
        total += t.numel()
    return 100.0 * clipped / max(total, 1)


def _set_weight_bits(q: Quantizer, bits: int) -> None:
    from ..quantizers import check_n_bits

    q.n_bits = check_n_bits(bits, type(q).__name__)


def _check_width(q: Quantizer, name: str, bits: int, who: str) -> None:
    """Refuse a width ``q``'s constructor would refuse (a signed Q-format needs 2 bits), naming the point:
    a plan with it could be scored but not saved and loaded."""
    from ..spec import QuantizerSpec, SpecError, describe

    try:
        spec = describe(q)
    except SpecError:  # an unregistered quantizer: only the generic range is known
        return
    try:
        QuantizerSpec(spec.quantizer, spec.observer, {**spec.args, "n_bits": bits}, spec.observer_args).build()
    except ValueError as e:
        raise ValueError(f"{who}: {name} ({type(q).__name__}) cannot take {bits} bits: {e}") from None


def mixed_precision(
    model: nn.Module,
    data: Data,
    metric: Metric | None,
    budget: float,
    *,
    bits: Sequence[int] = (8, 6, 4),
    higher_is_better: bool = True,
) -> Report:
    """A greedy per-layer weight bit-width assignment under a size budget.

    Every layer whose weight quantizer has an ``n_bits`` attribute (``AffineQuantizer``,
    ``QfmtQuantizer``...) starts at ``max(bits)``. Sensitivity: for each layer and each
    bit-width, the metric with only that layer's weights quantized at that width
    (``QUANT_EVAL_WEIGHT_ONLY``, all other QModules ``BYPASSED``). Then, while the average weight bit-width exceeds
    ``budget``, the layer move to its next lower width that costs least metric per
    saved bit is taken; finally, layers whose widening still fits the budget are
    widened back, largest metric gain per bit first. The model is left as it was (bit-widths and modes restored);
    apply the result by setting ``n_bits`` on the weight quantizers.

    Args:
        model: a calibrated quantized model (weight ranges observed).
        data: a tensor, a dict of keyword arguments (one batch), or an iterable of batches as
            :func:`~torchquant.calibrate` takes them (labels are left out of dict batches).
        metric: as in :func:`sensitivity` (``None``: output SQNR in dB against float).
        budget: maximum average bits per quantized weight, e.g. ``5.0``.
        bits: the allowed bit-widths.
        higher_is_better: direction of ``metric``.

    Returns:
        A :class:`Report`, one row per layer: ``layer``, ``params``, ``bits``; the average
        bit-width reached is ``sum(params * bits) / sum(params)``. Wrappers of one weight
        (a module listed twice) get one width, its parameters counted under the first.

    Raises:
        ValueError: no adjustable layer, an empty ``bits``, a width a layer's quantizer
            does not take (named), or a budget below what ``min(bits)`` everywhere gives.
    """
    who = "mixed_precision"
    mods = _qmodules(model, who)
    batches = _batches(data, who)
    widths = sorted({int(b) for b in bits}, reverse=True)
    if not widths:
        raise ValueError(f"{who}: bits is empty")
    layers = [
        (n, m)
        for n, m in mods
        if isinstance(m, QWrapper)
        and m.weight_quantizer is not None
        and isinstance(getattr(m.weight_quantizer, "n_bits", None), int)
    ]
    if not layers:
        raise ValueError(f"{who}: no QWrapper with a weight quantizer that has an integer n_bits")
    for n, m in layers:
        for b in widths:
            _check_width(m.weight_quantizer, f"{n}.weight_quantizer", b, who)
    groups: dict[int, list[tuple[str, QWrapper]]] = {}  # by weight tensor: one width per tensor
    for n, m in layers:
        groups.setdefault(id(m.layer.weight), []).append((n, m))
    members = {g[0][0]: g for g in groups.values()}  # keyed by the first wrapper's name
    params = {n: g[0][1].layer.weight.numel() for n, g in members.items()}
    total = sum(params.values())
    if budget < widths[-1] - 1e-9:
        raise ValueError(f"{who}: budget {budget} bits per weight is below the smallest width {widths[-1]}")
    saved_bits = {n: m.weight_quantizer.n_bits for n, m in layers}
    sign = 1.0 if higher_is_better else -1.0
    score: dict[tuple[str, int], float] = {}
    try:
        with _States(model, mods) as st:
            st.set(set())
            if metric is None:
                metric = _output_sqnr(_run(model, batches, who), who)
            for key, group in members.items():
                st.set(set())
                for _, m in group:
                    m.qstate = QModuleState.QUANT_EVAL_WEIGHT_ONLY  # this weight alone
                for b in widths:
                    for _, m in group:
                        _set_weight_bits(m.weight_quantizer, b)
                    score[(key, b)] = sign * float(metric(model, batches))
                for n, m in group:
                    _set_weight_bits(m.weight_quantizer, saved_bits[n])
    finally:
        for n, m in layers:
            _set_weight_bits(m.weight_quantizer, saved_bits[n])
    assign = {n: widths[0] for n in params}

    def avg() -> float:
        return sum(params[n] * assign[n] for n in params) / total

    while avg() > budget + 1e-9:
        best = None
        for n in params:
            i = widths.index(assign[n])
            if i + 1 == len(widths):
                continue
            nb = widths[i + 1]
            cost = (score[(n, assign[n])] - score[(n, nb)]) / (params[n] * (assign[n] - nb))
            if best is None or cost < best[0]:
                best = (cost, n, nb)
        if best is None:
            break
        assign[best[1]] = best[2]
    # Clean-up: a late large step can make earlier small ones unnecessary; widen back what fits,
    # the layers that gain most per added bit first.
    improved = True
    while improved:
        improved = False
        ups = []
        for n in params:
            i = widths.index(assign[n])
            if i > 0:
                wb = widths[i - 1]
                gain = (score[(n, wb)] - score[(n, assign[n])]) / (params[n] * (wb - assign[n]))
                ups.append((gain, n, wb))
        for gain, n, wb in sorted(ups, reverse=True):
            old_bits = assign[n]
            assign[n] = wb
            if avg() <= budget + 1e-9 and gain > 0:
                improved = True
                break
            assign[n] = old_bits
    rows = [
        {"layer": n, "params": params[key] if i == 0 else 0, "bits": assign[key]}
        for key, group in members.items()
        for i, (n, _) in enumerate(group)
    ]
    return Report(rows, ["layer", "params", "bits"])
