"""The custom ops ``torch.ops.torchquant.*`` (registered in ``torchquant.quantizers_functional``).

Each op passes ``torch.library.opcheck`` (schema, fake tensors, autograd registration), gives
the eager primitive's values and gradients, and is one node under ``torch.export``. These run
on every torch in CI, Triton or not; on a GPU the ops' CUDA implementation is the kernel.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from values import same, special

import torchquant as tq
from torchquant import quantizers_functional as F
from torchquant.quantizers_functional import lsq_quantize, minifloat_quantize, mx_quantize


def test_custom_ops_pass_opcheck_and_match_the_primitives():
    x = special((4, 6, 8)).requires_grad_()
    s, z = torch.tensor(0.1), torch.tensor(3.0)
    assert same(torch.ops.torchquant.fake_quant_grid(x, s, z, 0.0, 15.0, False), tq.affine_quantize(x, s, z, 16))
    x = torch.randn(4, 6, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.torchquant.fake_quant_grid, (x, s, z, 0.0, 15.0, True))
    torch.library.opcheck(torch.ops.torchquant.fake_quant_grid, (x, s, None, -8.0, 7.0, False))
    mn, mx = torch.randn(1, 6, 1) - 2, torch.rand(1, 6, 1) + 1
    torch.library.opcheck(torch.ops.torchquant.fake_quant_ranges, (x, mn, mx, 16, False, False, 1, None, None, True))
    q = tq.AffineQuantizer(4, tq.BatchMinMax(axis=-1, group_size=4), symmetric=True, power_of_two=True)
    q.pre_observe(x)
    o = q.range_observer
    args = (o.min_val, o.max_val, 16, True, True, -1, 4, q._fixed_zero_point, False)
    assert same(torch.ops.torchquant.fake_quant_ranges(x, *args), q(x))
    torch.library.opcheck(torch.ops.torchquant.fake_quant_ranges, (x, *args))
    compiled = torch.compile(lambda t: torch.ops.torchquant.fake_quant_ranges(t, *args), fullgraph=True)
    assert same(compiled(x), q(x))
    if torch.cuda.is_available():  # the CUDA implementation is the kernel
        xc = x.detach().cuda()
        argc = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        assert same(torch.ops.torchquant.fake_quant_ranges(xc, *argc), q(x))


def test_lsq_minifloat_and_mx_custom_ops_pass_opcheck_and_match_the_primitives():
    """``torchquant::lsq`` / ``minifloat`` / ``mx``: torch.library's checks, the primitives' values and
    gradients (LSQ's step and offset gradients included), one node each under torch.export."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(4, 6, 40, generator=g) * 3).requires_grad_()
    step = (torch.rand(1, 6, 1, generator=g) * 0.2 + 0.05).requires_grad_()
    offset = (torch.randn(1, 6, 1, generator=g) * 0.1).requires_grad_()
    scale = torch.rand(1, 6, 1, generator=g) + 0.5
    ops = torch.ops.torchquant
    cases = {
        "lsq": (ops.lsq, (x, step, offset, 4, 3, 0.3), lambda: lsq_quantize(x, step, offset, 4, 3, 0.3)),
        "lsq-no-offset": (ops.lsq, (x, step, None, 0, 15, 1.0), lambda: lsq_quantize(x, step, None, 0, 15, 1.0)),
        "minifloat": (ops.minifloat, (x, scale, 3, 7, 448.0), lambda: minifloat_quantize(x, scale, 3, 7, 448.0)),
        "mx": (ops.mx, (x, 1, 1, 6.0, 2, 32, -1), lambda: mx_quantize(x, 1, 1, 6.0, 2, 32, -1)),
        "mx-axis-1": (ops.mx, (x, 2, 15, 57344.0, 15, 4, 1), lambda: mx_quantize(x, 2, 15, 57344.0, 15, 4, 1)),
    }
    grad = torch.linspace(-1, 1, x.numel()).view_as(x)
    leaves = (x, step, offset)
    for name, (op, args, primitive) in cases.items():
        torch.library.opcheck(op, args)
        outs, grads = [], []
        for fn in (functools.partial(op, *args), primitive):
            for t in leaves:
                t.grad = None
            y = fn()
            y.backward(grad)
            outs.append(y)
            grads.append([None if t.grad is None else t.grad.clone() for t in leaves])
        assert same(outs[0], outs[1]), name
        for a, b in zip(*grads, strict=True):
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)

    class Net(nn.Module):
        def forward(self, t, s):
            return ops.mx(ops.minifloat(ops.lsq(t, s, None, 4, 3, 1.0), s, 3, 7, 448.0), 1, 1, 6.0, 2, 32, -1)

    if torch.cuda.is_available():  # the CUDA implementation is the kernel
        for name, (op, args, primitive) in cases.items():
            on_gpu = tuple(a.detach().cuda() if isinstance(a, torch.Tensor) else a for a in args)
            assert same(op(*on_gpu), primitive()), name

    ep = torch.export.export(Net(), (x.detach(), step.detach()))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == ["torchquant.lsq.default", "torchquant.minifloat.default", "torchquant.mx.default"]
    assert same(ep.module()(x.detach(), step.detach()), Net()(x.detach(), step.detach()))


def test_the_lsq_backward_op_passes_opcheck_and_traces_with_fake_tensors(monkeypatch):
    """``torchquant::lsq_backward`` is an op of its own: tracing LSQ's forward and backward with
    fake tensors (what torch.compile training and export do) never runs an implementation, even
    where the CUDA kernel would be chosen (forced here on the CPU)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 6, 8, generator=g)
    step = torch.rand(1, 6, 1, generator=g) * 0.2 + 0.05
    offset = torch.randn(1, 6, 1, generator=g) * 0.1
    grad = torch.randn(4, 6, 8, generator=g)
    for off in (offset, None):
        torch.library.opcheck(torch.ops.torchquant.lsq_backward, (grad, x, step, off, 4, 3, 0.3))
    from torch.fx.experimental.proxy_tensor import make_fx

    def fwd_bwd(t, s, b):
        t, s, b = (v.detach().requires_grad_() for v in (t, s, b))
        y = torch.ops.torchquant.lsq(t, s, b, 4, 3, 0.3)
        return torch.autograd.grad(y.sum(), (t, s, b))

    monkeypatch.setattr(F, "_kernel_ok", lambda t: True)  # a real call would now launch Triton
    gm = make_fx(fwd_bwd, tracing_mode="fake")(x, step, offset)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "torchquant.lsq.default" in targets and "torchquant.lsq_backward.default" in targets
