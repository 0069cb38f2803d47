"""What a converted model quantizes, and what stayed in float.

:func:`summary_rows` lists one dict per quantization point (every
:class:`~torchquant.qmodules.QWrapper` and :class:`~torchquant.qmodules.QOp`)
and per layer that stayed in float; :func:`summary` renders them as a text
table and :func:`print_summary` prints it.

Float layers come from two places: what the converter recorded
(:func:`~torchquant.quantize_model` notes skipped modules and layers it has no
rule for, with the reason) and a scan of the model for modules of the layer
types of :data:`~torchquant.layers.LAYER_ADAPTERS` (``Conv``, ``Linear``,
``Embedding``, Hugging Face's ``Conv1D``) outside any ``QWrapper`` ("not
converted"), and for modules that use weight parameters of their own
(:func:`~torchquant.convert.unconverted_weights`: an MoE expert bank, a router, an LSTM),
so hand-built models are covered too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .convert import _under, unconverted_weights
from .graph.common import FLOAT_REASONS_ATTR
from .layers import LAYER_TYPES, layer_adapter
from .qmodules import QModule, QOp, QWrapper
from .quantizers import Quantizer

__all__ = ["print_summary", "summary", "summary_rows"]

_COLUMNS = (
    ("name", "name"),
    ("kind", "kind"),
    ("layers", "layers/op"),
    ("weight_quantizer", "weight quantizer"),
    ("weight_bits", "w bits"),
    ("weight_granularity", "w granularity"),
    ("act_quantizer", "act quantizer"),
    ("act_bits", "a bits"),
    ("act_granularity", "a granularity"),
    ("note", "note"),
)


def _quantizer_info(q: Quantizer | None) -> tuple[str | None, int | None, str | None]:
    if q is None:
        return None, None, None
    bits = getattr(q, "n_bits", None)
    gran = getattr(q, "granularity", None)
    if gran is None:  # scaled minifloat quantizers keep it on their observer
        gran = getattr(getattr(q, "range_observer", None), "granularity", None)
    where = "per-token" if getattr(q, "per_token", False) else None if gran is None else str(gran)
    return type(q).__name__, bits if isinstance(bits, int) else None, where


def _roles_info(roles: dict[str, Quantizer]) -> tuple[str | None, int | None, str | None]:
    """Class names (``/``-joined), the bit-width when all share one, and ``role: granularity`` pairs."""
    infos = {role: _quantizer_info(q) for role, q in roles.items()}
    names = "/".join(dict.fromkeys(i[0] for i in infos.values())) or None
    bits = {i[1] for i in infos.values()}
    grans = ", ".join(f"{role}: {i[2]}" for role, i in infos.items() if i[2] is not None) or None
    return names, bits.pop() if len(bits) == 1 else None, grans


def _float_reasons(model: nn.Module) -> dict[str, str]:
    reasons: dict[str, str] = {}
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict):
        reasons.update(meta.get(FLOAT_REASONS_ATTR, {}))
    reasons.update(getattr(model, FLOAT_REASONS_ATTR, {}))
    return reasons


def _rotation_text(m: nn.Module) -> str:
    rot = getattr(m, "head_rotation", None)  # QAttention's query/key rotation (QuaRot)
    return "" if rot is None else f" after {type(rot).__name__}(query, key)"


def summary_rows(model: nn.Module) -> list[dict[str, Any]]:
    """One dict per quantization point and per layer left in float, in module order.

    Keys: ``name`` (qualified name), ``kind`` (``"QWrapper"``, ``"QOp"``,
    ``"float"``, or another QModule's class name such as ``"QAttention"``), ``layers``
    (``"Conv2d+BatchNorm2d+ReLU"``, ``"HadamardTransform+Linear"`` with an input
    transform, the op name, the float module's type, or another
    QModule's quantizer roles, ``"QAttention(key, value)"``),
    ``weight_quantizer``/``act_quantizer`` (class names, ``/``-joined for several, or
    ``None``), ``weight_bits``/``act_bits`` (``int``, or ``None`` when there is none or
    several differ), ``weight_granularity``/``act_granularity`` (e.g.
    ``"per-channel(axis=0)"``, ``"key: per-group(axis=-2, size=32), ..."``, or ``None``),
    ``note`` (why something is in float, or ``""``).

    Args:
        model: any model; typically the output of :func:`torchquant.quantize_model`.

    Returns:
        The rows.
    """
    rows: list[dict[str, Any]] = []
    qnames: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, QModule):
            qnames.add(name)
        if isinstance(m, QWrapper):
            layers = "+".join(type(x).__name__ for x in (m.input_transform, m.layer, m.bn, m.act) if x is not None)
            wq, aq, iq = m.weight_quantizer, m.acts_quantizer, m.input_quantizer
        elif isinstance(m, QOp):
            op = m.op
            layers = type(op).__name__ if isinstance(op, nn.Module) else getattr(op, "__name__", repr(op))
            wq, aq, iq = None, m.acts_quantizer, None
        elif isinstance(m, QModule):  # e.g. torchquant.hf.QAttention: its quantizers by role, as activation ones
            roles = {n.removesuffix("_quantizer"): q for n, q in m.quantizers().items()}
            weight_roles = {r: q for r, q in roles.items() if r in getattr(m, "WEIGHT_ROLES", ())}
            w, wb, wg = _roles_info(weight_roles) if weight_roles else (None, None, None)
            a, ab, ag = _roles_info({r: q for r, q in roles.items() if r not in weight_roles})
            unquantized = [r for r in getattr(m, "WEIGHT_ROLES", ()) if r not in weight_roles]
            note = "no quantizers (float)" if not roles else ""
            if roles and unquantized:
                note = f"no quantizer for the {', '.join(unquantized)} weight{'s' * (len(unquantized) > 1)} (float)"
            rows.append(
                dict(
                    name=name,
                    kind=type(m).__name__,
                    layers=f"{type(m).__name__}({', '.join(roles)})" + _rotation_text(m),
                    weight_quantizer=w,
                    weight_bits=wb,
                    weight_granularity=wg,
                    act_quantizer=a,
                    act_bits=ab,
                    act_granularity=ag,
                    note=note,
                )
            )
            continue
        else:
            continue
        w, wb, wg = _quantizer_info(wq)
        a, ab, ag = _quantizer_info(aq)
        if iq is not None:  # a layer's input quantizer (transformers' "W8A8"), shown by role with its output's
            a, ab, ag = _roles_info({"input": iq, **({"output": aq} if aq is not None else {})})
        missing = [s for s, q in (("weights", wq), ("outputs", aq)) if q is None]
        if isinstance(m, QOp):
            missing = [s for s in missing if s != "weights"]
        note = f"no quantizer for {' and '.join(missing)} (float)" if missing else ""
        rows.append(
            dict(
                name=name,
                kind=type(m).__name__,
                layers=layers,
                weight_quantizer=w,
                weight_bits=wb,
                weight_granularity=wg,
                act_quantizer=a,
                act_bits=ab,
                act_granularity=ag,
                note=note,
            )
        )
    floats: dict[str, tuple[str, str]] = {}
    reasons = _float_reasons(model)
    modules = dict(model.named_modules())
    for name, reason in reasons.items():
        if _under(name, qnames):  # converted since (a second conversion, a wrapper put in by hand)
            continue
        m = modules.get(name)
        floats[name] = (type(m).__name__ if m is not None else "-", reason)
    raw = unconverted_weights(model)
    for name, m in model.named_modules():
        is_layer = isinstance(m, LAYER_TYPES) or layer_adapter(m) is not None
        if (is_layer or name in raw) and not _under(name, qnames) and not _under(name, floats):
            floats[name] = (type(m).__name__, raw.get(name, "not converted"))
    for name, (layers, reason) in floats.items():
        rows.append(
            dict(
                name=name,
                kind="float",
                layers=layers,
                weight_quantizer=None,
                weight_bits=None,
                weight_granularity=None,
                act_quantizer=None,
                act_bits=None,
                act_granularity=None,
                note=reason,
            )
        )
    return rows


def summary(model: nn.Module) -> str:
    """A text table of :func:`summary_rows`, with a count line at the end.

    Args:
        model: any model; typically the output of :func:`torchquant.quantize_model`.

    Returns:
        The table.

    Examples:
        >>> import torchquant as tq
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> q = tq.quantize_model(net, lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)), None, skip=["2"])
        >>> table = tq.summary(q)
        >>> print(table.splitlines()[-1])
        1 quantization point (1 QWrapper, 0 QOp), 1 left in float
        >>> [(r["name"], r["kind"], r["weight_bits"], r["note"]) for r in tq.summary_rows(q)]
        [('0', 'QWrapper', 4, 'no quantizer for outputs (float)'), ('2', 'float', None, "skipped by glob '2' (Linear)")]
    """
    rows = summary_rows(model)
    cells = [[h for _, h in _COLUMNS]]
    cells += [["-" if r[k] is None else str(r[k]) for k, _ in _COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))

    # a module holding no quantizer quantizes nothing: a layer's weights count as float, an operation not at all
    def quantizes(r: dict[str, Any]) -> bool:
        return r["kind"] != "float" and bool(r["weight_quantizer"] or r["act_quantizer"])

    points = [r for r in rows if quantizes(r)]
    n_w = sum(r["kind"] == "QWrapper" for r in points)
    n_o = sum(r["kind"] == "QOp" for r in points)
    n_f = sum(not quantizes(r) and r["kind"] != "QOp" for r in rows)
    others: dict[str, int] = {}
    for r in points:
        if r["kind"] not in ("QWrapper", "QOp"):
            others[r["kind"]] = others.get(r["kind"], 0) + 1
    n = n_w + n_o + sum(others.values())
    kinds = "".join(f", {k} {kind}" for kind, k in others.items())
    lines.append(f"{n} quantization point{'s' * (n != 1)} ({n_w} QWrapper, {n_o} QOp{kinds}), {n_f} left in float")
    return "\n".join(lines)


def print_summary(model: nn.Module) -> None:
    """Print :func:`summary` of ``model``.

    Args:
        model: any model.
    """
    print(summary(model))
