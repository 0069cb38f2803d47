"""Check an exported ONNX model against the torchquant simulation, in quantization steps.

:func:`check_parity` runs the file in onnxruntime and the quantized model in PyTorch on
the same inputs and reports, in steps of each quantization point's grid:

* **every activation quantization point, teacher-forced**: the consumers of each
  ``DequantizeLinear`` read the simulation's value at that point instead, so onnxruntime
  computes every point's codes from exactly the simulation's inputs (in the ONNX
  semantics, graph optimizations off) and a difference shows where it arises, not
  downstream of it;
* **every model output, end to end**, with onnxruntime's graph optimizations (its
  integer kernels): once as is, and once with the simulation taking onnxruntime's code
  at the elements that lie within ``tie_steps`` of a rounding tie and are one step
  apart. PyTorch and onnxruntime sum float32 in different orders (about 1e-5 steps
  apart), so such a value may round either way; one tie decided the other way changes a
  code by one step, which the following layers of a deep network amplify into many steps
  at the output. Where onnxruntime's integer kernel adds a float bias as ``int32`` at the
  accumulator scale ``s_x s_w`` (``QLinearConv``, ``QGemm``), the tie is widened by that
  rounding, half of ``s_x s_w / s_y`` steps (at most 0.25). Every other difference stays
  the simulation's own and shows at the output.

A one-step difference at a rounding tie counts as explained (``Agreement.ties``), so a
small tensor is not failed by one tie. A floating-point grid (FP8, MX) resolves much
smaller differences near zero than an integer grid (its subnormal steps): there, differences
below ``FLOAT_NOISE`` of the tensor's largest magnitude (float32 noise in a matmul's output
near zero) count as ties, and so does an MX block whose maximum lies on a power-of-two tie
of its scale where onnxruntime took the other scale. The end-to-end run also reads every point's codes
(``ParityReport.optimized``); the first point that breaks the criteria there, once the
ties before it are adopted, is where onnxruntime's optimized graph departs from the ONNX
semantics (``ParityReport.divergence``, with the kernel that computes it, say
``QLinearSoftmax``); with every point agreeing, the output that does not.

An output produced by a quantization point is compared in its steps; a float output
(say, an unquantized classifier) by its largest absolute difference. Activation
quantizers without a ``DequantizeLinear`` (exported as float simulations: no affine
grid, or a grid the opset cannot store; or as the nearest of their levels,
:meth:`~torchquant.quantizers.Quantizer.levels`) are listed in
``ParityReport.unchecked``; weights stored as codes of levels count as checked.

A quantizer called more than once per forward pass (a module whose weights are shared
across depth, as in ALBERT or a recurrent cell) gives one point per call, in call order:
``name``, then ``name#1``, ``name#2``, ...
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..debug.diagnostics import Report
from ..quantizers_functional import _mx_blocks, e8m0_block_scale, minifloat_round
from ._common import quant_points, to_numpy
from .onnx_qdq import MOVES, REQUANTIZE, _as_inputs, _float32_twin, _require_onnx

__all__ = ["Agreement", "Divergence", "ParityReport", "check_parity"]

#: A simulated value this close (in steps) to the middle of two codes is a rounding tie.
TIE_STEPS = 1e-3
#: A float grid's difference below this fraction of its tensor's largest magnitude is float32 noise in its
#: input, which the format's subnormal steps resolve (a matmul's output near zero, summed in another order).
FLOAT_NOISE = 1e-5
#: The widest a tie gets from the int32 bias rounding of onnxruntime's integer kernels (steps).
MAX_BIAS_WINDOW = 0.25


@dataclass(frozen=True)
class Agreement:
    """How onnxruntime's tensor agrees with the simulation's.

    Attributes:
        max_steps: largest difference in quantization steps (``None`` off a grid).
        identical: fraction of elements with the same integer code (``None`` off a grid).
        max_abs: largest absolute difference.
        size: number of elements compared.
        ties: elements one step apart where the simulated value lies on a rounding tie.
    """

    max_steps: float | None
    identical: float | None
    max_abs: float
    size: int
    ties: int = 0


@dataclass(frozen=True)
class Divergence:
    """Where onnxruntime's optimized run first departs from the simulation.

    Attributes:
        point: the first quantization point, in the simulation's execution order, whose
            codes in onnxruntime's optimized end-to-end run break the default criteria
            (more than one step, or under 99.9 % identical) once the rounding ties before
            it are decided as onnxruntime did; where none does, the first whose codes
            differ at all. ``None`` when every point agrees but an output does not.
        kernel: the operator that computes that point's codes (or that output) in
            onnxruntime's optimized graph (``QLinearSoftmax``, ``MatMulNBits
            (accuracy_level 4)``, ``QLinearConv``...), ``None`` if the graph does not show it.
            Where float element-wise operators compute it (the float simulation of a dynamic
            grid), the nearest fused kernel they read from.
        agreement: that point's (or output's) agreement in the optimized run.
        output: the graph output that differs, when no point does.
    """

    point: str | None
    kernel: str | None
    agreement: Agreement
    output: str | None = None


#: onnxruntime's fused kernels that multiply integer tensors (uint8 x int8 saturates without VNNI).
_INTEGER_PRODUCTS = frozenset(
    {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat"}
)


def _failure(
    a: Agreement, scale: float | None, max_steps: float = 1, min_identical: float = 0.999, rel_tol: float = 1e-4
) -> str | None:
    """How ``a`` breaks the criteria of :meth:`ParityReport.failures`, or ``None`` (``scale``: a float output's)."""
    if a.max_steps is None:
        if scale is not None and a.max_abs > rel_tol * max(scale, 1e-30):
            return f"max |difference| {a.max_abs:.3g} > {rel_tol:g} x {scale:.3g}"
        return None
    explained = a.identical + a.ties / max(a.size, 1)
    if a.max_steps > max_steps or explained < min_identical:
        return f"max {a.max_steps:.0f} steps, {100 * a.identical:.3f} % identical, {a.ties} ties"
    return None


@dataclass
class ParityReport:
    """The result of :func:`check_parity`.

    Attributes:
        points: teacher-forced agreement of every activation quantization point, by the
            quantizer's qualified name (the name ``to_onnx`` gives its nodes).
        outputs: end-to-end agreement of every graph output, rounding ties decided as
            onnxruntime did.
        raw_outputs: the same without adopting any of onnxruntime's codes.
        ties_adopted: how many elements took onnxruntime's code (rounding ties only).
        output_scale: the maximum magnitude of each simulated output (for float outputs).
        unchecked: quantizers the simulation calls that have no ``DequantizeLinear`` in the
            file to compare at: activations exported as float simulations or as levels, and
            quantizers whose results no output uses (the exporter drops them).
        optimized: every activation point in onnxruntime's optimized end-to-end run, in the
            simulation's execution order, against the simulation with the rounding ties
            before it (and at it) decided as onnxruntime did.
        divergence: the first of those that differs, with the kernel computing it, or ``None``.
    """

    points: dict[str, Agreement]
    outputs: dict[str, Agreement]
    raw_outputs: dict[str, Agreement]
    ties_adopted: int
    output_scale: dict[str, float]
    unchecked: list[str] = field(default_factory=list)
    optimized: dict[str, Agreement] = field(default_factory=dict)
    divergence: Divergence | None = None

    def failures(self, max_steps: float = 1, min_identical: float = 0.999, rel_tol: float = 1e-4) -> list[str]:
        """What breaks the criteria, one line each (empty when everything holds).

        A quantization point or on-grid output fails with more than ``max_steps`` steps or
        fewer than ``min_identical`` of its elements identical or one step apart at a
        rounding tie; a float output with a largest absolute difference above ``rel_tol``
        times its largest magnitude.
        """
        items = [(f"point {k}", v, None) for k, v in self.points.items()]
        items += [(f"output {k}", v, self.output_scale[k]) for k, v in self.outputs.items()]
        found = ((where, _failure(a, scale, max_steps, min_identical, rel_tol)) for where, a, scale in items)
        return [f"{where}: {why}" for where, why in found if why is not None]

    def passed(self, max_steps: float = 1, min_identical: float = 0.999, rel_tol: float = 1e-4) -> bool:
        """True when :meth:`failures` finds nothing (defaults: at most one step, >= 99.9 % identical)."""
        return not self.failures(max_steps, min_identical, rel_tol)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per quantization point and per output (DataFrame-like)."""

        def row(where: str, kind: str, a: Agreement) -> dict[str, Any]:
            ident = None if a.identical is None else round(100 * a.identical, 3)
            return {"where": where, "kind": kind, "max_steps": a.max_steps, "identical_%": ident,
                    "ties": a.ties, "max_abs": a.max_abs, "elements": a.size}  # fmt: skip

        rows = [row(k, "point", a) for k, a in self.points.items()]
        rows += [row(k, "output", a) for k, a in self.outputs.items()]
        rows += [row(k, "output, no ties adopted", a) for k, a in self.raw_outputs.items()]
        return rows

    def table(self) -> str:
        """The rows as a text table, then the verdict under the default criteria."""
        rows = [{**r, "max_abs": f"{r['max_abs']:.3g}"} for r in self.rows]
        lines = [str(Report(rows)), f"{self.ties_adopted} rounding ties adopted"]
        if self.unchecked:
            lines.append(
                "not checked (no DequantizeLinear: float simulations, levels, or results no output uses): "
                + ", ".join(self.unchecked)
            )
        d = self.divergence
        if d is not None and d.point is not None:
            a = d.agreement
            lines.append(
                f"onnxruntime's optimized run first differs at {d.point!r} ({d.kernel or 'kernel not found'}): "
                f"max {a.max_steps:.0f} steps, {100 * a.identical:.3f} % identical"
            )
        elif d is not None:
            lines.append(
                f"onnxruntime's optimized run differs at output {d.output!r} ({d.kernel or 'kernel not found'}), "
                f"every point agreeing: max |difference| {d.agreement.max_abs:.3g}"
            )
        bad = self.failures()
        lines.append("parity: passed" if not bad else "parity: FAILED\n  " + "\n  ".join(bad))
        if bad and not any(b.startswith("point") for b in bad):
            lines.append("  " + self._advice())
        return "\n".join(lines)

    def _advice(self) -> str:
        """Why every point agrees in the ONNX semantics while an output does not, and what to try."""
        head = "every point agrees given the simulation's inputs: onnxruntime's optimized kernels compute differently"
        d = self.divergence
        if d is None:
            return head + " (no point differs: the difference is after the last quantization point)"
        at = f"from {d.point!r} on" if d.point is not None else f"at output {d.output!r}"
        where = f"{head}, {at}, computed by {d.kernel or 'a kernel not found in the optimized graph'}"
        kernel = (d.kernel or "").split(" ")[0]
        if d.kernel == "MatMulNBits (accuracy_level 4)":
            why = ("a weight's DequantizeLinear feeds a MatMul whose other input is a float tensor (or on a grid "
                   "onnxruntime's integer products do not take), and onnxruntime's MatMulNBits quantizes it to int8 "
                   "on the fly; quantize that input per tensor in 8 bits, or the session option "
                   "session.qdq_matmulnbits_accuracy_level=1 keeps it in float32")  # fmt: skip
        elif kernel in _INTEGER_PRODUCTS:
            why = "with int8 weights on x86 without VNNI, uint8 x int8 products saturate (signed_weights=False)"
        elif kernel == "QLinearSoftmax":
            why = ("QLinearSoftmax takes exp from a fixed-point table, not dequantize, Softmax, quantize; leave that "
                   "point unquantized to deploy without the difference")  # fmt: skip
        elif kernel.startswith("QLinear"):
            why = (f"{kernel} computes in its own integer arithmetic, not dequantize, float op, quantize; leave that "
                   "point unquantized to deploy without the difference")  # fmt: skip
        else:
            why = "a fused float kernel computes in its own order"
        return (f"{where}: {why}; to confirm, rerun with disabled_optimizers=[..., 'QDQSelectorActionTransformer'] "
                "(no fused integer kernels)")  # fmt: skip

    def __str__(self) -> str:
        return self.table()


def check_parity(
    model: nn.Module,
    onnx_model: Any,
    example_inputs: Tensor | Sequence[Tensor],
    *,
    tie_steps: float = TIE_STEPS,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    session_options: Any = None,
    disabled_optimizers: Sequence[str] = ("ClipQuantRewrite",),
) -> ParityReport:
    """Run ``onnx_model`` in onnxruntime and ``model`` in PyTorch; compare them in quantization steps.

    See the module docstring for what is compared. ``model`` is the quantized model the
    file was exported from, in its ``QUANT_EVAL`` mode; it runs in eval mode (as exported)
    and is left as it was.

    Args:
        model: the quantized model (every QModule in a ``QUANT_EVAL`` mode, calibrated).
        onnx_model: what :func:`~torchquant.export.to_onnx` returned or wrote (a
            ``ModelProto`` or a path).
        example_inputs: a tensor or a tuple of tensors, fed to both (batch and size are free
            where the export has dynamic axes).
        tie_steps: how close to the middle of two codes a simulated value must lie to count
            as a rounding tie (widened by the int32 bias rounding where that applies).
        providers: onnxruntime execution providers.
        session_options: an ``onnxruntime.SessionOptions`` for the end-to-end runs (default:
            all graph optimizations, i.e. integer kernels); the teacher-forced run takes its
            thread counts, with graph optimizations off.
        disabled_optimizers: onnxruntime optimizers to turn off (default
            ``ClipQuantRewrite``, which rejects a ``Clip`` feeding a 4-bit ``QuantizeLinear``).

    Returns:
        A :class:`ParityReport`; ``report.passed()`` applies the default criteria (at most one
        step, at least 99.9 % identical codes), ``print(report)`` shows the table and,
        where onnxruntime's optimized run departs, ``report.divergence`` names the first
        point and the kernel computing it.

    Raises:
        ValueError: the model is not in a ``QUANT_EVAL`` mode or not calibrated, the number
            of inputs or outputs differs from the file's, or the file's quantization points
            (one per call of each quantizer) are not the model's.
        RuntimeError: reading the quantization points changes onnxruntime's optimized result
            (pass ``session_options`` with fewer graph optimizations).
        ImportError: onnx or onnxruntime is not installed.

    Example:
        >>> import torch, torchquant as tq
        >>> from torch import nn
        >>> net = tq.quantize_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
        ...     lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True),
        ...     lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()), method="swap")
        >>> with tq.qmodule_state(net, tq.QModuleState.CALIBRATION):
        ...     _ = net(torch.randn(64, 4))
        >>> tq.set_qmodule_state(net, tq.QModuleState.QUANT_EVAL)
        >>> proto = tq.export.to_onnx(net, torch.randn(1, 4))
        >>> report = tq.export.check_parity(net, proto, torch.randn(32, 4))
        >>> report.passed(), sorted(report.points)
        (True, ['0.acts_quantizer', '2.acts_quantizer'])
    """
    onnx = _require_onnx()
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("torchquant.export.check_parity needs onnxruntime: pip install torchquant[export]") from e
    from onnx import helper

    who = "check_parity"
    if isinstance(tie_steps, bool) or not (isinstance(tie_steps, (int, float)) and 0 <= tie_steps < 0.5):
        raise ValueError(f"{who}: tie_steps must be a number in [0, 0.5), got {tie_steps!r}")
    proto = onnx_model if isinstance(onnx_model, onnx.ModelProto) else onnx.load(os.fspath(onnx_model))
    inputs = _as_inputs(example_inputs, who)
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in (*model.parameters(), *model.buffers(), *inputs)):
        model = copy.deepcopy(model)  # as to_onnx exported it: the float32 twin
        inputs = _float32_twin(model, inputs, who, warn=False)
    quantizers = {p.name: p.quantizer for p in quant_points(model, who)}
    g = proto.graph
    inits = {t.name for t in g.initializer}
    in_names = [i.name for i in g.input if i.name not in inits]
    if len(in_names) != len(inputs):
        raise ValueError(f"{who}: the ONNX model has {len(in_names)} inputs {in_names}, got {len(inputs)} tensors")
    feed = {n: to_numpy(t) for n, t in zip(in_names, inputs)}

    # Quantization points: DequantizeLinear nodes, of activations (input computed) or weights (an initializer).
    dq_of: dict[str, Any] = {}
    weight_points = set()
    for node in g.node:
        if node.op_type == "Gather" and node.name.endswith("/codebook_weight"):  # a weight's codes (levels)
            weight_points.add(_point_of(node.name))
        if node.op_type != "DequantizeLinear":
            continue
        point = _point_of(node.name)
        if point == REQUANTIZE:  # a point's codes again, after data movement: compared at the point
            continue
        if node.input[0] in inits:
            weight_points.add(point)
            continue
        if _quantizer_of(point) not in quantizers:
            raise ValueError(f"{who}: the ONNX model has a quantization point {point!r} the model does not have")
        if point in dq_of:
            raise ValueError(f"{who}: quantization point {point!r} appears twice in the ONNX model")
        dq_of[point] = node

    # The simulation, recording every quantizer's input and output, per call.
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def record(name: str):
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            # copies: a later in-place op (ReLU(inplace=True)) must not change them
            seen[_nth_call(name, seen)] = (args[0].detach().clone(), out.detach().clone())

        return hook

    sim_outputs = _run_hooked(model, inputs, {n: record(n) for n in quantizers})
    quantizers.update({p: quantizers[_quantizer_of(p)] for p in seen})
    missing = [p for p in dq_of if p not in seen]
    if missing:
        raise ValueError(f"{who}: quantization points {missing} are in the ONNX model but the model never calls them")
    extra = [p for p in seen if p not in dq_of and p not in weight_points and _quantizer_of(p) != p
             and any(_quantizer_of(d) == _quantizer_of(p) for d in (*dq_of, *weight_points))]  # fmt: skip
    if extra:
        raise ValueError(f"{who}: the model calls quantizers more often than the ONNX model has points for them: "
                         f"{extra} are not in the file")  # fmt: skip
    unchecked = [n for n in seen if n not in dq_of and n not in weight_points]
    out_names = [o.name for o in g.output]
    if len(out_names) != len(sim_outputs):
        raise ValueError(f"{who}: the ONNX model has {len(out_names)} outputs, the model returns {len(sim_outputs)}")
    out_point = {node.output[0]: p for p, node in dq_of.items() if node.output[0] in out_names}
    windows = _bias_windows(proto)

    def steps_of(point: str, x: Tensor | None = None) -> np.ndarray:
        """One step of ``point``'s grid at every element of its input ``x`` (the simulated one by default)."""
        return to_numpy(_steps(quantizers[point], seen[point][0] if x is None else x), np.float64)

    def tie_mask(point: str, x: Tensor) -> Tensor:
        """Where ``x``, the input of ``point``'s quantizer, lies on a rounding tie (window widened)."""
        v = x.detach().double() / _steps(quantizers[point], x)  # steps, before rounding
        return (v - torch.floor(v) - 0.5).abs() < tie_steps + windows.get(point, 0.0)

    def on_tie(point: str) -> np.ndarray:
        return to_numpy(tie_mask(point, seen[point][0]))

    def float_ties(point: str, x: Tensor, ort_val: np.ndarray, sim_val: np.ndarray) -> np.ndarray | None:
        """A float grid's differences explained by float32 noise in its input: elements of MX blocks on a
        scale tie where onnxruntime's value is the one of the other scale, and differences below
        ``FLOAT_NOISE`` of the tensor's largest magnitude (the format's subnormal steps resolve them)."""
        q = quantizers[point]
        if q.grid() is not None or q.float_grid() is None:
            return None
        top = float(np.abs(sim_val).max()) if sim_val.size else 0.0
        noise = np.abs(ort_val.astype(np.float64) - sim_val) <= FLOAT_NOISE * top
        other = _other_block_scale(q, x, tie_steps)
        if other is None:
            return noise
        alt, mask = (to_numpy(t) for t in other)
        return noise | (mask & (ort_val == alt.astype(ort_val.dtype)))

    def agree(ort_val: np.ndarray, sim_val: np.ndarray, point: str | None, ties: np.ndarray | None,
              x: Tensor | None = None, scale_ties: np.ndarray | None = None) -> Agreement:  # fmt: skip
        diff = np.abs(ort_val.astype(np.float64) - sim_val.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        if point is None:
            return Agreement(None, None, max_abs, int(diff.size))
        d = np.rint(diff / steps_of(point, x))
        tied = (d == 1) & ties if ties is not None else np.zeros(d.shape, bool)
        if scale_ties is not None:  # explained like a rounding tie, by as many steps as they make
            tied = tied | (scale_ties & (d != 0))
        rest = np.where(tied, 0.0, d) if scale_ties is not None else d
        return Agreement(float(rest.max()) if d.size else 0.0, float((d == 0).mean()) if d.size else 1.0, max_abs,
                         int(d.size), int(tied.sum()))  # fmt: skip

    def session(p, options) -> Any:
        return ort.InferenceSession(p.SerializeToString(), options, providers=list(providers),
                                    disabled_optimizers=list(disabled_optimizers))  # fmt: skip

    # 1. Teacher-forced points: the consumers of each activation DequantizeLinear read the simulation's value.
    tf = onnx.ModelProto()
    tf.CopyFrom(proto)
    tg = tf.graph
    tf_feed = dict(feed)
    tf_outputs = {o.name for o in tg.output}
    for point, node in dq_of.items():  # onnxruntime's value stays readable as the DequantizeLinear's output
        value, forced = node.output[0], f"{point}/simulated"
        for consumer in tg.node:
            for i, name in enumerate(consumer.input):
                if name == value:
                    consumer.input[i] = forced
        tf_feed[forced] = to_numpy(seen[point][1], np.float32)
        tg.input.append(helper.make_tensor_value_info(forced, onnx.TensorProto.FLOAT, None))
        if value not in tf_outputs:
            tg.output.append(helper.make_empty_tensor_value_info(value))
    tf_opts = ort.SessionOptions()
    tf_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the ONNX semantics
    if session_options is not None:
        tf_opts.intra_op_num_threads = session_options.intra_op_num_threads
        tf_opts.inter_op_num_threads = session_options.inter_op_num_threads
    s = session(tf, tf_opts)
    vals = dict(zip([o.name for o in s.get_outputs()], s.run(None, tf_feed)))
    points = {}
    for p, n in dq_of.items():
        ort_val = vals[n.output[0]]
        sim_val = to_numpy(seen[p][1], np.float32)
        points[p] = agree(ort_val, sim_val, p, on_tie(p), None, float_ties(p, seen[p][0], ort_val, sim_val))

    # 2. End to end, optimized; every point's codes also read through an extra DequantizeLinear.
    opts = session_options if session_options is not None else ort.SessionOptions()
    side = onnx.ModelProto()
    side.CopyFrom(proto)
    sg = side.graph
    side_name: dict[str, str] = {}
    for p, node in dq_of.items():
        side_name[p] = f"{p}/ort_side"
        extra = helper.make_node("DequantizeLinear", list(node.input), [side_name[p]], f"{p}/side_dq")
        extra.attribute.extend(node.attribute)
        sg.node.append(extra)
        sg.output.append(helper.make_empty_tensor_value_info(side_name[p]))
    s = session(side, opts)
    side_vals = dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))
    y_ort = session(proto, opts).run(None, feed)  # last: a caller's optimized_model_filepath gets this file's graph
    if not all(np.array_equal(side_vals[n], y) for n, y in zip(out_names, y_ort)):
        raise RuntimeError(
            f"{who}: reading the quantization points changed onnxruntime's result; "
            "pass session_options with fewer graph optimizations"
        )

    adopted = 0
    optimized: dict[str, Agreement] = {}
    calls: dict[str, None] = {}

    def adopt(quantizer: str):
        def hook(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            nonlocal adopted
            name = _nth_call(quantizer, calls)
            calls[name] = None
            if name not in side_name:  # a call without a DequantizeLinear (unchecked)
                return out
            scale = _steps(mod, args[0])
            ort_val = torch.from_numpy(side_vals[side_name[name]]).to(device=out.device, dtype=out.dtype)
            take = tie_mask(name, args[0]) & ((ort_val - out).double().abs() / scale).round().eq(1)
            scale_ties = float_ties(name, args[0], side_vals[side_name[name]], to_numpy(out, np.float64))
            if scale_ties is not None:  # float32 noise in a float grid's input
                take = take | torch.from_numpy(scale_ties).to(take.device)
            take = take & ort_val.ne(out)
            adopted += int(take.sum())
            out = torch.where(take, ort_val, out)
            optimized[name] = agree(side_vals[side_name[name]], to_numpy(out, np.float32), name, None, args[0])
            return out

        return hook

    sim_adopted = _run_hooked(model, inputs, {q: adopt(q) for q in dict.fromkeys(map(_quantizer_of, dq_of))})
    outputs, raw, mags = {}, {}, {}
    for n, y, sim, sim_a in zip(out_names, y_ort, sim_outputs, sim_adopted):
        sim_np, sim_a_np = to_numpy(sim, np.float32), to_numpy(sim_a, np.float32)
        if y.shape != sim_np.shape:
            raise ValueError(f"{who}: output {n!r} has shape {y.shape} in onnxruntime, {sim_np.shape} in the model")
        p = out_point.get(n)
        raw[n] = agree(y, sim_np, p, on_tie(p) if p is not None else None)
        outputs[n] = agree(y, sim_a_np, p, None)
        mags[n] = float(np.abs(sim_np).max()) if sim_np.size else 0.0
    report = ParityReport(points, outputs, raw, adopted, mags, unchecked, optimized)
    # Where the optimized run departs: the first point breaking the default criteria, else the first
    # differing at all, else an output that fails with every point agreeing (a weight-only model).
    first = next((p for p, a in optimized.items() if _failure(a, None)), None)
    first = first or next((p for p, a in optimized.items() if a.max_steps), None)
    failing = next((n for n in out_names if _failure(outputs[n], mags[n])), None)
    if first is not None:
        kernel = _optimized_producer(side, dq_of[first].input[0], opts, session)
        report.divergence = Divergence(first, kernel, optimized[first])
    elif failing is not None:
        kernel = _optimized_producer(side, failing, opts, session)
        report.divergence = Divergence(None, kernel, outputs[failing], failing)
    return report


def _point_of(node_name: str) -> str:
    """The quantization point of a node ``to_onnx`` named ``"<quantizer>/<index>[.<call>]/..."``: the
    quantizer's name for its first call, ``"<quantizer>#<call>"`` for a later one."""
    name, _, rest = node_name.partition("/")
    call = rest.split("/")[0].partition(".")[2]
    return f"{name}#{call}" if call else name


def _quantizer_of(point: str) -> str:
    """The quantizer's qualified name of a point (``"<quantizer>#<call>"`` or ``"<quantizer>"``)."""
    return point.split("#")[0]


def _nth_call(quantizer: str, earlier: Any) -> str:
    """The point of ``quantizer``'s next call, given the points of the calls in ``earlier``."""
    n = sum(_quantizer_of(p) == quantizer for p in earlier)
    return f"{quantizer}#{n}" if n else quantizer


def _other_block_scale(quantizer: nn.Module, x: Tensor, tie_steps: float) -> tuple[Tensor, Tensor] | None:
    """For OCP MX blocks whose maximum lies on a scale tie, the values with the block's other scale.

    A block's power-of-two scale changes where its maximum crosses a power of two; one whose
    maximum lies within ``tie_steps`` steps of the element format (relative ``tie_steps * 2 ** -M``)
    of one may take either scale when computed in another summation order, and then every
    element of the block rounds on the other grid. Returns ``(values, mask)`` of ``x``'s shape:
    the simulation with the other scale at the elements of such blocks; ``None`` for quantizers
    without MX blocks.
    """
    if quantizer.grid() is not None:  # type: ignore[operator]
        return None
    fg = quantizer.float_grid()  # type: ignore[operator]
    if fg is None or not fg.blocked:
        return None
    f, g = fg.fmt, fg.granularity
    ax, n = g.axis % x.dim(), x.shape[g.axis]  # type: ignore[operator, index]
    blocks = _mx_blocks(x.detach().float(), g.group_size, ax)  # type: ignore[arg-type]  # (..., n / b, b)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    frac = torch.frexp(amax)[0] * 2  # amax / 2 ** floor(log2(amax)), in [1, 2)
    window = tie_steps * 2.0**-f.man_bits
    low = (frac - 1 < window) & (amax > 0)  # just at or above a power of two: half the scale
    high = 2 - frac < 2 * window  # just below one: twice the scale
    scale = e8m0_block_scale(amax, f.emax)
    other = torch.where(low, scale / 2, torch.where(high, scale * 2, scale))
    alt = minifloat_round(blocks / other, f.man_bits, f.bias, f.max_value) * other  # type: ignore[arg-type]
    mask = (low | high).expand_as(blocks)

    def unblock(t: Tensor) -> Tensor:
        return t.reshape(*t.shape[:-2], -1)[..., :n].movedim(-1, ax)

    return unblock(alt).to(x.dtype), unblock(mask)


def _steps(quantizer: nn.Module, x: Tensor) -> Tensor:
    """One quantization step of ``quantizer``'s grid at every element of its input ``x`` (float64, broadcasting
    against ``x``): an affine grid's scale; for a float grid the spacing of the format's values in the binade
    of ``x / scale``, times the scale."""
    grid = quantizer.grid()  # type: ignore[operator]
    if grid is not None:
        return grid.scale.detach().double()
    fg = quantizer.float_grid()  # type: ignore[operator]
    scale = fg.scale_for(x.detach()).double()
    v = (x.detach().double() / scale).abs()
    e = (torch.frexp(v)[1] - 1).double().clamp(min=1 - fg.fmt.bias, max=fg.fmt.emax)  # floor(log2 v), exact
    return torch.exp2(e - fg.fmt.man_bits) * scale


def _optimized_producer(proto: Any, tensor: str, options: Any, session: Any) -> str | None:
    """The operator that computes ``tensor`` in onnxruntime's optimized graph of ``proto``."""
    import tempfile

    import onnx

    # The caller's options (their session config entries decide the kernels), restored after.
    saved = options.optimized_model_filepath, options.log_severity_level
    with tempfile.TemporaryDirectory() as tmp:
        try:
            options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            options.log_severity_level = 3  # not the warning that an optimized file is hardware-specific
            session(proto, options)
            graph = onnx.load(options.optimized_model_filepath).graph
        except Exception:  # a diagnosis only: a graph that cannot be saved (ORT format, compiled nodes) names none
            return None
        finally:
            options.optimized_model_filepath, options.log_severity_level = saved
    return _kernel_of(graph, tensor)


#: Between a kernel and the codes it makes: data movement, the Clip of a grid narrower than its
#: ONNX type (and a bias added as an initializer, handled apart).
_BETWEEN = MOVES | {"Clip"}


def _kernel_of(graph: Any, tensor: str) -> str | None:
    """The operator computing the codes ``tensor`` in an optimized graph, with its accuracy level.

    A fused integer kernel writes the codes itself; data movement (onnxruntime moves
    integer tensors across it), an unfused ``QuantizeLinear`` and a bias add are looked
    through to the operator whose result the codes are.
    """
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}

    def computing(node: Any) -> Any:
        while node is not None:
            if node.op_type in _BETWEEN:
                node = producer.get(node.input[0])
            elif node.op_type == "Add" and len(node.input) == 2 and sum(i in inits for i in node.input) == 1:
                node = producer.get(node.input[node.input[0] in inits])  # the side that is not the bias
            else:
                break
        return node

    node = computing(producer.get(tensor))  # onnxruntime moves integer tensors across data movement
    if node is not None and node.op_type == "QuantizeLinear":
        node = computing(producer.get(node.input[0]))
    if node is not None and node.op_type in _ELEMENTWISE:
        node = _fused_above(node, producer) or node
    if node is None:
        return None
    level = next((a.i for a in node.attribute if a.name == "accuracy_level"), None)
    return node.op_type if level is None else f"{node.op_type} (accuracy_level {level})"


#: Float element-wise operators: a quantizer's float simulation (a dynamic or learned-offset grid), whose
#: own results match; a difference there comes from a fused kernel above them.
_ELEMENTWISE = frozenset(
    {"Mul", "Add", "Sub", "Div", "Round", "Max", "Min", "Clip", "Cast", "Neg", "Abs", "Sign", "Where", "Floor"}
)


def _fused_above(node: Any, producer: dict) -> Any:
    """The nearest onnxruntime fused kernel (``MatMulNBits``, an integer product, a ``QLinear*``) among the
    operators ``node`` reads from, or ``None``."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop(0)
        for i in n.input:
            p = producer.get(i)
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.op_type == "MatMulNBits" or p.op_type in _INTEGER_PRODUCTS or p.op_type.startswith("QLinear"):
                return p
            todo.append(p)
    return None


_PASS_THROUGH = frozenset({"Relu", "Clip", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "MaxPool"})


def _bias_windows(proto: Any) -> dict[str, float]:
    """Per activation point fed by a Conv/Gemm with a float bias: half a bias step, in output steps.

    onnxruntime's integer kernels (``QLinearConv``, ``QGemm``) add the bias as ``int32`` at the
    accumulator scale ``s_x * s_w``: rounded, it moves the output by up to ``0.5 s_x s_w / s_y``
    steps, which widens that point's rounding ties (at most to ``MAX_BIAS_WINDOW``). Only
    per-tensor output points get a window. ``Relu`` / ``Clip`` between the layer and the
    quantization point (fused into the kernel) are looked through, and so are data-movement
    and max ops between the layer's input and its ``DequantizeLinear``.
    """
    from onnx import numpy_helper

    g = proto.graph
    arrays = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def array(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(arrays[name]).astype(np.float64) if name in arrays else None

    windows: dict[str, float] = {}
    for q in g.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in arrays:
            continue
        src = producer.get(q.input[0])
        while src is not None and src.op_type in ("Relu", "Clip"):
            src = producer.get(src.input[0])
        if src is None or src.op_type not in ("Conv", "Gemm") or len(src.input) < 3 or src.input[2] not in arrays:
            continue
        dx, dw = producer.get(src.input[0]), producer.get(src.input[1])
        while dx is not None and dx.op_type in _PASS_THROUGH:  # onnxruntime moves Q/DQ across these
            dx = producer.get(dx.input[0])
        if dx is None or dw is None or dx.op_type != "DequantizeLinear" or dw.op_type != "DequantizeLinear":
            continue
        sx, sw, sy = array(dx.input[1]), array(dw.input[1]), array(q.input[1])
        if sx is None or sw is None or sy is None or sy.size != 1 or sx.size != 1:
            continue
        window = 0.5 * float(sx.item() * np.max(sw) / sy.item())
        windows[_point_of(q.name)] = min(window, MAX_BIAS_WINDOW)
    return windows


def _run_hooked(model: nn.Module, inputs: list[Tensor], hooks: dict[str, Any]) -> list[Tensor]:
    """``model(*inputs)`` in eval mode under no_grad, with forward hooks on the named submodules.

    Returns the outputs as a flat list; the modules' training flags are restored.
    """
    training = [(m, m.training) for m in model.modules()]
    handles = [model.get_submodule(name).register_forward_hook(h) for name, h in hooks.items()]
    try:
        model.eval()
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, t in training:
            m.training = t
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(o, Tensor) for o in outs):
        raise ValueError("check_parity: the model must return a tensor or a tuple/list of tensors")
    return outs
