"""Parity between onnxruntime and the torchquant simulation, counted in quantization steps."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

import torchquant as tq


def ort_session(proto: onnx.ModelProto, disable_optimizations: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if disable_optimizations:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # ClipQuantRewrite: onnxruntime 1.32 rejects 4-bit zero points after a Clip (ReLU6).
    return ort.InferenceSession(
        proto.SerializeToString(), so, providers=["CPUExecutionProvider"], disabled_optimizers=["ClipQuantRewrite"]
    )


def steps(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """|a - b| in quantization steps, rounded (both lie on the grid)."""
    return np.rint(np.abs(a.astype(np.float64) - b.astype(np.float64)) / scale)


# A simulated value this close (in steps) to the middle of two codes is a rounding tie: float32
# sums in a different order (PyTorch vs onnxruntime, ~1e-5 steps apart) may round it either way.
TIE_STEPS = 1e-3


def end_to_end(model, proto, x: torch.Tensor, out_quantizer: tq.Quantizer) -> tuple[float, float, int]:
    """Model output, onnxruntime (all optimizations, integer kernels) vs the simulation.

    A rounding tie decided the other way at one point (see ``TIE_STEPS``) changes that
    point's code by one step; in a deep network the next layers amplify it into many
    steps at the output. So the simulation runs with onnxruntime's code adopted at
    exactly those elements, and nowhere else: every element that differs by more than
    one step, or differs without being a tie, stays the simulation's own and shows
    at the output. onnxruntime's codes at each activation quantization point are read
    from an extra ``DequantizeLinear`` per point (graph outputs); that they leave the
    optimized graph's result unchanged is checked.

    Returns:
        (max steps at the output, fraction of output elements identical, ties adopted).
    """
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    g = p.graph
    inits = {t.name for t in g.initializer}
    side: dict[str, str] = {}  # point -> graph output holding onnxruntime's dequantized codes
    for node in list(g.node):
        if node.op_type != "DequantizeLinear" or node.input[0] in inits:
            continue
        point = node.name.split("/")[0]
        assert point not in side, f"{point}: one quantization point per quantizer call expected"
        side[point] = f"{point}/ort_side"
        extra = helper.make_node("DequantizeLinear", list(node.input), [side[point]], f"{point}/side_dq")
        extra.attribute.extend(node.attribute)
        g.node.append(extra)
        g.output.append(helper.make_empty_tensor_value_info(side[point]))
    feed = {"input0": x.numpy()}
    y = ort_session(proto).run(None, feed)[0]
    sess = ort_session(p)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    assert np.array_equal(outs[g.output[0].name], y), "the side outputs changed onnxruntime's result"

    adopted = 0
    hooks = []
    for name, m in model.named_modules():
        if name not in side:
            continue

        def hook(mod, args, out, name=name):
            nonlocal adopted
            grid = mod.grid()
            v = args[0].detach().double() / grid.scale.double()  # steps, before rounding
            tie = (v - torch.floor(v) - 0.5).abs() < TIE_STEPS
            ort_val = torch.from_numpy(outs[side[name]]).to(out.dtype)
            d = ((ort_val - out).double().abs() / grid.scale.double()).round()
            take = tie & (d == 1)
            adopted += int(take.sum())
            return torch.where(take, ort_val, out)

        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            sim = model(x).numpy()
    finally:
        for h in hooks:
            h.remove()
    d = steps(y, sim, float(out_quantizer.grid().scale))
    return float(d.max()), float((d == 0).mean()), adopted


def per_point(model, proto, x: torch.Tensor) -> dict[str, tuple[float, float, int]]:
    """Teacher-forced parity at every activation quantization point.

    Every activation ``DequantizeLinear`` output becomes a graph input fed with the
    simulation's value at that point, so each point's codes are computed by
    onnxruntime from exactly the simulation's inputs (no propagation of earlier
    differences). Returns ``{point: (max steps, fraction identical, n elements)}``.
    """
    sim_vals: dict[str, list[np.ndarray]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, tq.Quantizer):

            def hook(mod, args, out, name=name):
                # a copy: a later in-place op (ReLU(inplace=True)) must not change it
                sim_vals.setdefault(name, []).append(out.detach().numpy().copy())

            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()

    p = onnx.ModelProto()
    p.CopyFrom(proto)
    g = p.graph
    inits = {t.name: t for t in g.initializer}
    feeds = {"input0": x.numpy()}
    graph_outputs = {o.name for o in g.output}
    points: dict[str, str] = {}  # point -> name of onnxruntime's dequantized value
    for node in g.node:
        if node.op_type != "DequantizeLinear" or node.input[0] in inits:
            continue  # weights are integer initializers: not teacher-forced
        point = node.name.split("/")[0]
        if node.output[0] in graph_outputs:
            points[point] = node.output[0]
            continue
        # The DQ now writes a side output; its consumers read the simulation's value instead.
        (val,) = sim_vals[point]
        feeds[node.output[0]] = val
        g.input.append(helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
        node.output[0] = f"{point}/ort_value"
        g.output.append(helper.make_empty_tensor_value_info(node.output[0]))
        points[point] = node.output[0]
    sess = ort_session(p)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feeds)))
    result = {}
    for point, out_name in points.items():
        (val,) = sim_vals[point]
        scale = model.get_submodule(point).grid().scale.detach().double().numpy()
        d = np.rint(np.abs(outs[out_name].astype(np.float64) - val.astype(np.float64)) / scale)
        result[point] = (float(d.max()), float((d == 0).mean()), d.size)
    return result
