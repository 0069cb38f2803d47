import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchquant import quantizers_functional as F
from torchquant.quantizers_functional import affine_quantize, compute_dtype, gradient_clip, qfmt_quantize, round_ste


def test_affine_reference_values(device):
    x = torch.tensor([0.26, -1.0, 9.0, -2.0, 0.25, 0.75], device=device)
    # delta 0.5, zp 2, 8 levels: integer grid 0..7 -> values (-2..5) * 0.5
    y = affine_quantize(x, torch.tensor(0.5, device=device), torch.tensor(2.0, device=device), 8)
    # 0.26/0.5=0.52->1; -1->-2 (+2=0); 9->18 clamp to 5 -> 2.5; -2 -> -4 clamp -2 -> -1.0;
    # 0.25/0.5=0.5 -> 0 (half to even); 0.75/0.5=1.5 -> 2 (half to even)
    assert y.tolist() == [0.5, -1.0, 2.5, -1.0, 0.0, 1.0]


def test_affine_python_scalars():
    y = affine_quantize(torch.tensor([1.2, -0.3]), 0.1, 3, 16)
    assert torch.equal(y, torch.tensor([1.2, -0.3]).div(0.1).round().clamp(-3, 12).mul(0.1))


def test_qfmt_reference_values(device):
    x = torch.tensor([3.9, 7.2, -10.0], device=device)
    assert qfmt_quantize(x, 2.0, -8, 7).tolist() == [4.0, 8.0, -10.0]
    x = torch.tensor([3.9, 7.2, 10.3], device=device)
    assert qfmt_quantize(x, 1.0, 0, 15).tolist() == [4.0, 7.0, 10.0]
    assert qfmt_quantize(torch.tensor([100.0, -100.0]), 0.25, -8, 7).tolist() == [1.75, -2.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qfmt_step_takes_the_exact_exponent(dtype):
    """int_bits = floor(log2(amax)) + 1 exactly, also one ulp below a power of two, where a
    rounded log2 returns the power's exponent; reference: Python's exact math.frexp."""
    import math

    vals = []
    for k in (-20, -3, 0, 1, 2, 7, 30, 100):
        p = torch.tensor(2.0**k, dtype=dtype)
        vals += [p, torch.nextafter(p, torch.zeros((), dtype=dtype)), p * 1.5]
    amax = torch.stack(vals)
    for n_bits, signed in ((8, True), (4, False), (2, True)):
        step = F.qfmt_step(-amax, amax * 0.5, n_bits, signed)
        want = [2.0 ** (math.frexp(a)[1] - (n_bits - signed)) for a in amax.tolist()]
        assert step.dtype == dtype
        assert step.tolist() == want
    # a zero range keeps a finite step: float32 eps (2 ** -23) has int_bits -22
    assert F.qfmt_step(torch.zeros(()), torch.zeros(()), 8, True).item() == 2.0 ** (-22 - 7)


def test_per_channel_broadcast():
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    delta = torch.tensor([[1.0], [2.0]])
    zp = torch.tensor([[0.0], [1.0]])
    y = affine_quantize(x, delta, zp, 4)
    # row 0: ints 0..3 -> [1,2,3]; row 1: round(x/2)=[0,1,2] (0.5->0, 1.5->2) clamp [-1, 2] -> [0,2,4]
    assert y.tolist() == [[1.0, 2.0, 3.0], [0.0, 2.0, 4.0]]


def test_ste_gradient_is_identity():
    x = torch.randn(100, requires_grad=True)
    g = torch.randn(100)
    affine_quantize(x, 0.1, 0, 4).backward(g)
    assert torch.equal(x.grad, g)
    x.grad = None
    qfmt_quantize(x, 0.25, -2, 1).backward(g)
    assert torch.equal(x.grad, g)


def test_round_ste():
    x = torch.tensor([0.5, 1.5, 2.4, -0.5], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_gradient_clip_forward_identity_and_mask():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 1.5], requires_grad=True)
    y = gradient_clip(x, -1.0, 1.0)
    assert torch.equal(y, x)
    y.backward(torch.full_like(x, 3.0))
    # bounds included, strictly outside zeroed
    assert x.grad.tolist() == [0.0, 3.0, 3.0, 3.0, 0.0]


def test_gradient_clip_broadcast_bounds():
    x = torch.tensor([[0.5, 2.0], [0.5, 2.0]], requires_grad=True)
    gradient_clip(x, torch.zeros(2, 1), torch.tensor([[1.0], [3.0]])).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0], [1.0, 1.0]]


@pytest.mark.parametrize("fn", ["affine", "qfmt", "clip"])
def test_integer_tensors_rejected(fn):
    x = torch.arange(4)
    with pytest.raises(TypeError, match="floating-point"):
        if fn == "affine":
            affine_quantize(x, 1.0, 0, 4)
        elif fn == "qfmt":
            qfmt_quantize(x, 1.0, 0, 4)
        else:
            gradient_clip(x, 0.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
def test_dtypes_keep_their_own(dtype):
    x = torch.linspace(-3, 3, 101).to(dtype)
    y = affine_quantize(x, torch.tensor(6 / 255), torch.tensor(128.0), 256)
    assert y.dtype == dtype
    ref = affine_quantize(x.to(compute_dtype(x)), torch.tensor(6 / 255), torch.tensor(128.0), 256).to(dtype)
    assert torch.equal(y, ref)


def test_compute_dtype():
    assert compute_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert compute_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64


def test_matches_torch_fake_quantize_on_exact_scales():
    # with a power-of-two scale x/delta == x*(1/delta) exactly, so torch's op must agree bit for bit
    x = torch.randn(10000) * 3
    ours = affine_quantize(x, torch.tensor(2.0**-5), torch.tensor(100.0), 256)
    theirs = torch.fake_quantize_per_tensor_affine(x, 2.0**-5, 100, 0, 255)
    assert torch.equal(ours, theirs)


floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    xs=st.lists(floats, min_size=1, max_size=64),
    delta=st.floats(0.0009765625, 8.0, width=32),
    zp=st.integers(0, 15),
    n_bits=st.integers(1, 8),
)
def test_affine_properties(xs, delta, zp, n_bits):
    n_levels = 2**n_bits
    zp = min(zp, n_levels - 1)
    x = torch.tensor(xs)
    d = torch.tensor(delta)
    z = torch.tensor(float(zp))
    y = affine_quantize(x, d, z, n_levels)
    ints = y / d + z
    # on the grid
    assert torch.allclose(ints, ints.round(), atol=1e-3)
    assert ints.min() >= -1e-3 and ints.max() <= n_levels - 1 + 1e-3
    # idempotent
    assert torch.equal(affine_quantize(y, d, z, n_levels), y)
    # error at most delta/2 inside the range
    lo, hi = -zp * delta, (n_levels - 1 - zp) * delta
    inside = (x >= lo) & (x <= hi)
    assert torch.all((y - x).abs()[inside] <= delta / 2 * (1 + 1e-5) + 1e-6)
    # monotone
    order = torch.argsort(x)
    assert torch.all(torch.diff(y[order]) >= 0)


@settings(max_examples=40, deadline=None)
@given(xs=st.lists(floats, min_size=1, max_size=64), frac=st.integers(-3, 6), n_bits=st.integers(2, 8))
def test_qfmt_properties(xs, frac, n_bits):
    x = torch.tensor(xs)
    d = 2.0**-frac
    lo, hi = -(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1
    y = qfmt_quantize(x, d, lo, hi)
    assert torch.equal(qfmt_quantize(y, d, lo, hi), y)
    assert torch.equal(y / d, (y / d).round())
    order = torch.argsort(x)
    assert torch.all(torch.diff(y[order]) >= 0)


def test_affine_quantize_zero_point_is_not_baked_into_a_jit_trace():
    # On the CPU a 0-d zero point is read as a number (one clamp pass); under tracing it must
    # stay a tensor input, or the trace would keep the zero point seen while tracing.
    x = torch.tensor([-1.0, 0.3, 2.0])
    traced = torch.jit.trace(lambda x, zp: affine_quantize(x, torch.tensor(0.5), zp, 4), (x, torch.tensor(0.0)))
    assert torch.equal(traced(x, torch.tensor(0.0)), torch.tensor([0.0, 0.5, 1.5]))
    assert torch.equal(traced(x, torch.tensor(2.0)), torch.tensor([-1.0, 0.5, 0.5]))


def _inplace_calls(gm: torch.fx.GraphModule) -> list[str]:
    """In-place tensor calls (``x.round_()``, ``out=``) in the forward bodies of a dynamo graph's
    autograd.Functions."""
    found = []
    for name, body in gm.named_modules():
        if name.startswith("fwd_body") and isinstance(body, torch.fx.GraphModule):
            for n in body.graph.nodes:
                if n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("_"):
                    found.append(f"in-place {n.target}")
                if n.op == "call_function" and "out" in n.kwargs:
                    found.append(f"out= {n.target}")
    return found


def test_no_autograd_function_forward_returns_a_dot_to_cast():
    # A no-op ``t.to(t.dtype)`` returned from a forward is an alias that torch 2.11's dynamo
    # mishandles (see the next test); recent dynamo drops such casts from its graph, so the
    # pattern is checked in the source: forwards, and the module's functions whose result a
    # forward returns (``_fake_quant``), return through ``_cast``.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(F))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def returns(fn):
        return [n.value for n in ast.walk(fn) if isinstance(n, ast.Return) and n.value is not None]

    bodies = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward"):
            bodies[f"{cls.name}.forward"] = fn
            for v in returns(fn):
                if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id in functions:
                    bodies[v.func.id] = functions[v.func.id]
    assert "_fake_quant" in bodies
    offenders = [
        f"{name} line {v.lineno}"
        for name, fn in bodies.items()
        for v in returns(fn)
        if isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and v.func.attr == "to"
    ]
    assert not offenders


_D = torch.tensor(0.1)
PRIMITIVES = {
    "affine-tensor-zp": lambda t: F.affine_quantize(t, _D, torch.tensor(3.0), 256),
    "affine-number-zp": lambda t: F.affine_quantize(t, 0.1, 3, 256),
    "qfmt": lambda t: F.qfmt_quantize(t, 0.25, -8, 7),
    "round_ste": lambda t: F.round_ste(t),
    "gradient_clip": lambda t: F.gradient_clip(t, torch.tensor(-1.0), torch.tensor(1.0)),
    "sign_ste": lambda t: F.sign_ste(t),
    "scaled_sign": lambda t: F.scaled_sign(t, torch.tensor(0.5), 8),
    "pact": lambda t: F.pact_quantize(t, torch.tensor(2.0), 16),
    "minifloat": lambda t: F.minifloat_quantize(t, torch.tensor(1.0), 3, 7, 448.0),
    "mx": lambda t: F.mx_quantize(t, 3, 7, 448.0, 8),
    "lsq": lambda t: F.lsq_quantize(t, torch.tensor(0.2), None, 8, 7),
}


@pytest.mark.parametrize("name", list(PRIMITIVES))
def test_compiled_primitive_has_the_eager_gradient_and_no_inplace_forward(name):
    # torch 2.11's dynamo sends the gradient of an autograd.Function whose forward returns a
    # tensor mutated in place, or a no-op ``.to`` of an intermediate, to the wrong slot
    # (pytorch/pytorch#180642): 9 of these 11 primitives trained with zero gradients under
    # torch.compile there. The gradient check catches it on such a torch; the graph check
    # catches in-place forwards on any torch.
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm.forward

    fn = PRIMITIVES[name]
    x = torch.randn(4, 32) * 3
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.linspace(-1, 1, x.numel()).view_as(x)
    torch._dynamo.reset()
    yc = torch.compile(fn, backend=backend, fullgraph=True)(xc)
    ye = fn(xe)
    assert graphs and not [h for gm in graphs for h in _inplace_calls(gm)]
    assert torch.equal(yc, ye)
    ye.backward(g)
    yc.backward(g)
    assert torch.equal(xc.grad, xe.grad)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "args, match",
    [
        ((0.0, 0, 16), "positive"),
        ((-0.5, 0, 16), "positive"),
        ((float("nan"), 0, 16), "positive"),
        ((0.5, 0, 1), "n_levels"),
        ((0.5, 0, 16.0), "n_levels"),
        ((0.5, 2.5, 16), "integer"),
    ],
    ids=["zero-step", "negative-step", "nan-step", "one-level", "float-levels", "fractional-zero-point"],
)
def test_affine_quantize_rejects_a_degenerate_grid(args, match):
    with pytest.raises(ValueError, match=match):
        affine_quantize(torch.randn(4), *args)


def test_qfmt_quantize_rejects_a_degenerate_grid():
    with pytest.raises(ValueError, match="positive"):
        qfmt_quantize(torch.randn(4), 0.0, -8, 7)
    with pytest.raises(ValueError, match="below"):
        qfmt_quantize(torch.randn(4), 0.5, 7, 7)
