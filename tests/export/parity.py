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


def end_to_end(model, proto, x: torch.Tensor, out_quantizer: tq.Quantizer) -> tuple[float, float]:
    """(max steps, fraction identical) of the model output, onnxruntime (all optimizations) vs simulation."""
    with torch.no_grad():
        sim = model(x).numpy()
    y = ort_session(proto).run(None, {"input0": x.numpy()})[0]
    d = steps(y, sim, float(out_quantizer.grid().scale))
    return float(d.max()), float((d == 0).mean())


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
                sim_vals.setdefault(name, []).append(out.detach().numpy())

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
