"""The Triton kernels against the torch path, value for value, on the CPU through Triton's interpreter.

CI has no GPU. The kernels' source runs here on CPU tensors (``torchquant.kernels.interpreted``):
the ``kernel_path`` fixture routes CPU tensors through it, and every test computes the same thing
with and without that route and compares values exactly (NaN positions for NaN). Each test also
checks that the kernels actually ran, so a silent fallback to the torch path cannot pass.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant import kernels

pytest.importorskip("triton")
# The interpreter computes with NumPy, which warns where the kernels overflow on purpose (inf inputs).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture
def kernel_path(monkeypatch):
    """A context manager that sends CPU tensors through the interpreted kernels; yields a launch counter."""
    calls = {"n": 0}
    impl = kernels._impl

    def counting(device):
        calls["n"] += 1
        return impl(device)

    monkeypatch.setattr(kernels, "_impl", counting)

    @contextlib.contextmanager
    def on():
        old = set(kernels._DEVICES)
        kernels._DEVICES.add("cpu")
        try:
            yield calls
        finally:
            kernels._DEVICES.clear()
            kernels._DEVICES.update(old)

    return on


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical values: exact equality, NaN at the same positions.

    The sign of an exact zero is not compared: torch's own CPU path gives ``max(+0, -0)`` as
    ``-0`` with tensor bounds and ``+0`` with number bounds (the x86 max instruction returns
    its second operand for two zeros), and the kernels follow the number-bound path.
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    na, nb = a.isnan(), b.isnan()
    return torch.equal(na, nb) and torch.equal(a[~na], b[~nb])


def special(shape: tuple[int, ...], scale: float = 3.0) -> torch.Tensor:
    """Random values with rounding ties, signed zeros' sources, NaN and infinities mixed in."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * scale
    flat = x.view(-1)
    vals = [0.5, 1.5, 2.5, -0.5, -2.5, -0.3, 0.0, float("nan"), float("inf"), float("-inf"), 1e30, -1e-30]
    flat[: len(vals)] = torch.tensor(vals)
    return x


DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", ["per-tensor", "per-channel", "per-element", "number-zero-point", "qfmt"])
def test_fake_quant_grid_is_bit_identical_to_the_torch_path(kernel_path, grid, dtype):
    x = special((4, 6, 5)).to(dtype)
    g = torch.Generator().manual_seed(1)
    if grid == "per-tensor":
        fn = lambda t: tq.affine_quantize(t, torch.tensor(0.37), torch.tensor(100.0), 256)  # noqa: E731
    elif grid == "per-channel":
        d, z = torch.rand(1, 6, 1, generator=g) * 0.1 + 0.01, torch.randint(0, 16, (1, 6, 1), generator=g).float()
        fn = lambda t: tq.affine_quantize(t, d, z, 16)  # noqa: E731
    elif grid == "per-element":
        d = torch.rand(4, 6, 5, generator=g) + 0.05
        z = torch.randint(0, 256, (4, 6, 5), generator=g).float()
        fn = lambda t: tq.affine_quantize(t, d, z, 256)  # noqa: E731
    elif grid == "number-zero-point":
        fn = lambda t: tq.affine_quantize(t, 0.25, 8, 16)  # noqa: E731
    else:
        fn = lambda t: tq.qfmt_quantize(t, torch.tensor(0.125), -8, 7)  # noqa: E731
    ref = fn(x)
    with kernel_path() as calls:
        out = fn(x)
    assert calls["n"] > 0
    assert same(out, ref)


GRANULARITIES = {
    "per-tensor": dict(),
    "per-channel-0": dict(axis=0),
    "per-channel-1": dict(axis=1),
    "per-group": dict(axis=-1, group_size=4),
}
GRIDS = {
    "asym": dict(),
    "sym": dict(symmetric=True),
    "pow2": dict(power_of_two=True),
    "sym-pow2-clip": dict(symmetric=True, power_of_two=True, gradient_clip=True),
    "clip": dict(gradient_clip=True),
}


@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
@pytest.mark.parametrize("gran", list(GRANULARITIES), ids=list(GRANULARITIES))
def test_affine_quantizer_forward_and_backward_are_bit_identical(kernel_path, gran, grid):
    """The grid computed inside the kernel from the observer's ranges equals AffineQuantizer.qparams."""
    q = tq.AffineQuantizer(4, tq.BatchMinMax(**GRANULARITIES[gran]), **GRIDS[grid])
    x = special((4, 6, 8))
    q.pre_observe(torch.nan_to_num(x, nan=0.0, posinf=5.0, neginf=-7.0) * 0.6)  # the grid clips part of x
    grad = torch.linspace(-1, 1, x.numel()).view_as(x)
    results = []
    for route in (contextlib.nullcontext(), kernel_path()):
        xi = x.clone().requires_grad_()
        with route as calls:
            y = q(xi)
            y.backward(grad)
        results.append((y.detach(), xi.grad))
    assert calls["n"] > 0
    (y_ref, g_ref), (y_k, g_k) = results
    assert same(y_k, y_ref)
    assert same(g_k, g_ref)
    if not GRIDS[grid].get("gradient_clip"):
        assert torch.equal(g_k, grad)  # the straight-through gradient, exactly


OBSERVERS = {
    "batch": lambda **kw: tq.BatchMinMax(**kw),
    "running": lambda **kw: tq.RunningMinMax(**kw),
    "ema": lambda **kw: tq.ExpAvgMinMax(0.8, **kw),
}


@pytest.mark.parametrize("gran", ["per-tensor", "per-channel-1", "per-group"])
@pytest.mark.parametrize("name", list(OBSERVERS))
def test_observer_state_is_bit_identical_and_nonfinite_batches_are_reported(kernel_path, name, gran):
    torch.manual_seed(0)
    ref = OBSERVERS[name](**GRANULARITIES[gran])
    ref.observe_batch(torch.randn(4, 6, 8))  # the first observation takes the torch path on every device
    ker = copy.deepcopy(ref)
    for i in range(3):
        x = torch.randn(4, 6, 8) * (i + 1) + i
        ref.observe_batch(x)
        with kernel_path() as calls:
            ker.observe_batch(x)
        assert calls["n"] > 0
        for (n, a), (_, b) in zip(ref.named_buffers(), ker.named_buffers(), strict=True):
            assert same(b, a), n

    before = {n: b.clone() for n, b in ker.named_buffers()}
    bad = torch.randn(4, 6, 8)
    bad[1, 2, 3] = float("nan")
    with kernel_path():
        ker.observe_batch(bad)  # no host sync: the error waits for the next read of the ranges
    for n, b in ker.named_buffers():
        assert same(b, before[n]), n
    with pytest.raises(ValueError, match="NaN or Inf"):
        ker.get_ranges()
    torch.testing.assert_close(ker.get_ranges(), ref.get_ranges(), rtol=0, atol=0)  # reported once


def test_qat_steps_of_a_model_are_bit_identical(kernel_path):
    """quantize_model in QUANT_AWARE_TRAIN: outputs, gradients and quantizer state over three SGD steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))

    def wq(module, name=""):
        return tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=True)

    def aq(module, name=""):
        return tq.AffineQuantizer(8, tq.ExpAvgMinMax(), gradient_clip=True)

    ref = tq.quantize_model(model, wq, aq, method="fx")
    tq.set_qmodule_state(ref, tq.QModuleState.QUANT_AWARE_TRAIN)
    ref(torch.randn(2, 3, 8, 8))  # observers allocate their state
    ker = copy.deepcopy(ref)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, ker)]
    for step in range(3):
        x = torch.randn(2, 3, 8, 8)
        outs = []
        for m, opt, route in ((ref, opts[0], contextlib.nullcontext()), (ker, opts[1], kernel_path())):
            with route as calls:
                y = m(x)
                y.square().sum().backward()
                opt.step()
                opt.zero_grad()
            outs.append(y.detach())
        assert calls["n"] > 0
        assert same(outs[1], outs[0]), step
    sd_ref, sd_ker = ref.state_dict(), ker.state_dict()
    for k in sd_ref:
        assert torch.equal(sd_ker[k], sd_ref[k]), k


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


def test_tracing_keeps_the_torch_path(kernel_path):
    """Under torch.compile the quantizer records torch ops (inductor fuses them), even where kernels run eagerly."""
    q = tq.AffineQuantizer(8, tq.RunningMinMax())
    x = torch.randn(64)
    q.pre_observe(x)
    with kernel_path() as calls:
        eager = q(x)
        n_eager = calls["n"]
        compiled = torch.compile(q, fullgraph=True)(x)
    assert n_eager > 0 and calls["n"] == n_eager
    assert same(compiled, eager)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["lsq-per-tensor", "lsq-per-channel", "lsq+-per-channel", "lsq+-per-tensor"])
def test_lsq_forward_and_gradients_match(kernel_path, case, dtype):
    """Outputs and the input gradient value for value; the step/offset sums to float32 rounding."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 6, 8, generator=g) * 2).to(dtype)
    per_channel = "per-channel" in case
    shape = (1, 6, 1) if per_channel else ()
    step = (torch.rand(shape, generator=g) * 0.2 + 0.05).requires_grad_()
    offset = (torch.randn(shape, generator=g) * 0.1).requires_grad_() if case.startswith("lsq+") else None
    grad = torch.linspace(-1, 1, x.numel()).view_as(x).to(dtype)
    results = []
    for route in (contextlib.nullcontext(), kernel_path()):
        xi = x.clone().requires_grad_()
        for p in (step, offset):
            if p is not None:
                p.grad = None
        with route as calls:
            y = tq.quantizers_functional.lsq_quantize(xi, step, offset, 4, 3, grad_scale=0.3)
            y.backward(grad)
        results.append((y.detach(), xi.grad, step.grad.clone(), None if offset is None else offset.grad.clone()))
    assert calls["n"] > 0
    (y0, gx0, gs0, gb0), (y1, gx1, gs1, gb1) = results
    assert same(y1, y0)
    assert same(gx1, gx0)
    torch.testing.assert_close(gs1, gs0, rtol=1e-5, atol=1e-6)
    if offset is not None:
        torch.testing.assert_close(gb1, gb0, rtol=1e-5, atol=1e-6)


FORMATS = {"e4m3": (3, 7, 448.0), "e5m2": (2, 15, 57344.0), "e2m1": (1, 1, 6.0), "int8": (6, 1, 127 / 64)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_minifloat_and_mx_match(kernel_path, fmt, dtype):
    man, bias, max_value = FORMATS[fmt]
    x = special((4, 6, 40), scale=50.0)
    x.view(-1)[20:24] = torch.tensor([1e-41, -3e-39, 7e-45, 0.0])  # float32 subnormals
    x = x.to(dtype)
    scale = torch.rand(1, 6, 1, generator=torch.Generator().manual_seed(3)) + 0.5
    emax = {"e4m3": 8, "e5m2": 15, "e2m1": 2, "int8": 0}[fmt]
    cases = {
        "minifloat-per-tensor": lambda t: tq.quantizers_functional.minifloat_quantize(t, 0.75, man, bias, max_value),
        "minifloat-per-channel": lambda t: tq.quantizers_functional.minifloat_quantize(t, scale, man, bias, max_value),
        "mx-last-axis": lambda t: tq.quantizers_functional.mx_quantize(t, man, bias, max_value, emax, 32, -1),
        "mx-axis-1": lambda t: tq.quantizers_functional.mx_quantize(t, man, bias, max_value, emax, 4, 1),
    }
    for name, fn in cases.items():
        xi = x.clone().requires_grad_()
        ref = fn(xi)
        with kernel_path() as calls:
            xk = x.clone().requires_grad_()
            out = fn(xk)
            out.backward(torch.ones_like(out))
        assert calls["n"] > 0, name
        assert same(out.detach(), ref.detach()), name
        assert torch.equal(xk.grad, torch.ones_like(x)), name  # straight through
