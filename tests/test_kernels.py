"""The Triton kernels against the CPU's torch path, value for value.

Every test computes a result with the CPU's torch path (the reference) and again through the
kernels, on one of two routes:

* ``interpreter``: CPU tensors through Triton's interpreter (``torchquant.kernels.interpreted``),
  the same kernel source run with NumPy: this is how CI, which has no GPU, checks the kernels;
* ``cuda``: the compiled kernels on a GPU (skipped where there is none).

Values must be identical (NaN at the same positions); reductions over many elements (LSQ's
step gradient) are compared to float32 rounding. Each test also checks that the kernels ran,
so a silent fallback to the torch path cannot pass.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from values import same, special

import torchquant as tq
from torchquant import kernels
from torchquant.quantizers_functional import lsq_quantize, minifloat_quantize, mx_quantize

pytest.importorskip("triton")
# The interpreter computes with NumPy, which warns where the kernels overflow on purpose (inf inputs).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


class Route:
    """Where the kernel side of a test runs: ``device`` for its tensors, ``on()`` around its calls."""

    def __init__(self, name: str, calls: dict[str, int]) -> None:
        self.name = name
        self.device = torch.device("cuda" if name == "cuda" else "cpu")
        self.calls = calls

    @contextlib.contextmanager
    def on(self):
        old = set(kernels._DEVICES)
        if self.name == "interpreter":
            kernels._DEVICES.add("cpu")
        try:
            yield self.calls
        finally:
            kernels._DEVICES.clear()
            kernels._DEVICES.update(old)

    def to(self, obj):
        """A copy of a tensor or module on this route's device."""
        if isinstance(obj, torch.Tensor):
            return obj.detach().to(self.device, copy=True).requires_grad_(obj.requires_grad)
        return copy.deepcopy(obj).to(self.device)


ROUTES = [
    pytest.param("interpreter"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


class _CountingLaunches:
    """A kernel module whose launch functions (its public lower-case functions) count their calls
    (``calls["n"]``) and record them (``calls["launches"]``: name and positional arguments)."""

    def __init__(self, module, calls: dict) -> None:
        self._module, self._calls = module, calls

    def __getattr__(self, name: str):
        value = getattr(self._module, name)
        if name.startswith("_") or not name.islower() or not callable(value) or isinstance(value, type):
            return value  # constants, Layout, helpers

        def launch(*args, **kwargs):
            self._calls["n"] += 1
            self._calls["launches"].append((name, args))
            self._calls.setdefault("kwargs", []).append(kwargs)
            return value(*args, **kwargs)

        return launch


@pytest.fixture(params=ROUTES)
def route(request, monkeypatch) -> Route:
    calls = {"n": 0, "launches": []}  # kernel launches, not lookups of the kernel module: a fallback counts none
    impl = kernels._impl

    def counting(device):
        return _CountingLaunches(impl(device), calls)

    monkeypatch.setattr(kernels, "_impl", counting)
    return Route(request.param, calls)


DTYPES = [pytest.param(d, id=str(d).split(".")[1]) for d in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "grid",
    ["per-tensor", "per-channel", "per-group", "trailing-axes", "per-element", "number-zero-point", "qfmt"],
)
def test_fake_quant_grid_matches_the_cpu(route, grid, dtype):
    x = special((4, 6, 5)).to(dtype)
    g = torch.Generator().manual_seed(1)
    if grid in ("per-group", "trailing-axes"):
        # parameters varying along a run of adjacent axes: per group on the (4, 6, 5) view of a
        # (4, 30) weight in groups of 5, or one per (channel, position) of (4, 6, 5) activations
        shape = (4, 6, 1) if grid == "per-group" else (6, 5)
        params = (torch.rand(shape, generator=g) * 0.1 + 0.01, torch.randint(0, 16, shape, generator=g).float())
        fn = lambda t, d, z: tq.affine_quantize(t, d, z, 16)  # noqa: E731
    elif grid == "per-tensor":
        params = (torch.tensor(0.37), torch.tensor(100.0))
        fn = lambda t, d, z: tq.affine_quantize(t, d, z, 256)  # noqa: E731
    elif grid == "per-channel":
        params = (torch.rand(1, 6, 1, generator=g) * 0.1 + 0.01, torch.randint(0, 16, (1, 6, 1), generator=g).float())
        fn = lambda t, d, z: tq.affine_quantize(t, d, z, 16)  # noqa: E731
    elif grid == "per-element":
        params = (torch.rand(4, 6, 5, generator=g) + 0.05, torch.randint(0, 256, (4, 6, 5), generator=g).float())
        fn = lambda t, d, z: tq.affine_quantize(t, d, z, 256)  # noqa: E731
    elif grid == "number-zero-point":
        params = ()
        fn = lambda t: tq.affine_quantize(t, 0.25, 8, 16)  # noqa: E731
    else:
        params = (torch.tensor(0.125),)
        fn = lambda t, d: tq.qfmt_quantize(t, d, -8, 7)  # noqa: E731
    ref = fn(x, *params)
    with route.on() as calls:
        out = fn(route.to(x), *map(route.to, params))
    assert calls["n"] > 0
    assert out.device.type == route.device.type
    assert same(out, ref)


@pytest.mark.parametrize(
    "shapes", [((4, 6, 5), (4, 1, 5)), ((6, 5), (1, 1, 1))], ids=["axes-not-adjacent", "more-dims-than-x"]
)
def test_parameters_no_kernel_layout_fits_take_the_torch_path(route, shapes):
    xs, ps = shapes
    x = special(xs)
    g = torch.Generator().manual_seed(1)
    d, z = torch.rand(ps, generator=g) * 0.1 + 0.01, torch.randint(0, 16, ps, generator=g).float()
    ref = tq.affine_quantize(x, d, z, 16)
    with route.on() as calls:
        out = tq.affine_quantize(route.to(x), route.to(d), route.to(z), 16)
    assert calls["n"] == 0
    assert out.shape == ref.shape  # broadcast to the parameters' extra dimensions
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


def _quantizer_matches_the_cpu(route, q, dtype, straight_through: bool, set_ranges=None) -> None:
    """``q`` observed on a batch its grid clips (then ``set_ranges(observer)``), forward and backward
    on the CPU's torch path and on ``route``: same outputs and input gradients, value for value."""
    x = special((4, 6, 8))
    q.pre_observe(torch.nan_to_num(x, nan=0.0, posinf=5.0, neginf=-7.0) * 0.6)  # the grid clips part of x
    if set_ranges is not None:
        set_ranges(q.range_observer)
    x = x.to(dtype).requires_grad_()
    grad = torch.linspace(-1, 1, x.numel()).view_as(x).to(dtype)
    y_ref = q(x)
    y_ref.backward(grad)
    qk, xk = route.to(q), route.to(x)
    with route.on() as calls:
        y = qk(xk)
        y.backward(route.to(grad))
    assert calls["n"] > 0
    assert same(y, y_ref)
    assert same(xk.grad, x.grad)
    if straight_through:
        assert same(xk.grad, grad)  # the straight-through gradient, exactly


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
@pytest.mark.parametrize("gran", list(GRANULARITIES), ids=list(GRANULARITIES))
def test_affine_quantizer_forward_and_backward_match_the_cpu(route, gran, grid, dtype):
    """The grid computed inside the kernel from the observer's ranges equals AffineQuantizer.qparams."""
    q = tq.AffineQuantizer(4, tq.BatchMinMax(**GRANULARITIES[gran]), **GRIDS[grid])
    _quantizer_matches_the_cpu(route, q, dtype, straight_through=not GRIDS[grid].get("gradient_clip"))


@pytest.mark.parametrize("grid", ["asym", "sym", "pow2"])
def test_a_range_wider_than_float32_holds_gives_a_finite_grid(route, grid):
    # max - min overflows for finite ends 3e38 apart: delta was inf and every output NaN
    def huge(obs):
        obs.min_val.fill_(-3e38)
        obs.max_val.fill_(3e38)

    q = tq.AffineQuantizer(8, tq.BatchMinMax(), **GRIDS[grid])
    _quantizer_matches_the_cpu(route, q, torch.float32, straight_through=True, set_ranges=huge)
    delta, _ = q.qparams()
    assert torch.isfinite(delta).all() and delta.item() > 3e38 / 255
    x = torch.tensor([-3e38, -1e37, 1.0, 2e38, 3e38])
    y = q(x)
    assert torch.isfinite(y).all() and (y - x).abs().max() <= delta  # the zero point rounds: half a step more


def test_the_step_is_the_range_over_the_levels_to_the_last_bit():
    # halving before the difference keeps (max - min) / (n - 1) bit for bit wherever it is finite
    from torchquant.quantizers_functional import affine_qparams

    g = torch.Generator().manual_seed(0)
    scale = torch.pow(10.0, torch.randint(-30, 30, (20000,), generator=g).float())
    mn, mx = -torch.rand(20000, generator=g) * scale, torch.rand(20000, generator=g) * scale.flip(0)
    for levels in (4, 16, 256, 2**16):
        delta, _ = affine_qparams(mn, mx, levels)
        assert torch.equal(delta, ((mx - mn) / (levels - 1)).clamp(min=torch.finfo(torch.float32).eps))


def _rounding_edges() -> torch.Tensor:
    """Float32 values where a rint goes wrong first: ties of even and odd integers, the values just
    inside and outside half, the binades around 2**22 and 2**23 (where the ulp becomes 1/2, then 1),
    signed zeros, subnormals, the largest finite values, NaN and the infinities."""
    vals = [0.0, 0.3, 0.5, 0.5 - 2.0**-25, 0.5 + 2.0**-24, 1.0, 1.5, 2.5, 3.5, 1e-40, 1e-45, 3.4e38]
    for e in (22, 23, 24):
        for k in (-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5):
            vals.append(2.0**e + k)
    for k in range(0, 64):  # consecutive ties and their neighbours, both parities
        vals += [k + 0.5, k + 0.25, k + 0.75]
    x = torch.tensor(vals, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(4096, generator=g) * torch.pow(2.0, torch.randint(-30, 30, (4096,), generator=g).float())
    x = torch.cat([x, -x, wide, torch.tensor([float("nan"), float("inf"), -float("inf")])])
    return x


def test_the_kernels_round_half_to_even_as_torch_round_does(route):
    # A step of 1 and codes over all of float32's integers: the output is the rounding itself,
    # to the sign of zero (-0.3 gives -0.0); ties, the 2**23 shifter's edges, NaN and Inf.
    x = _rounding_edges()
    lo, hi = -(2**127), 2**127  # the infinities and 3.4e38 clamp to them
    ref = torch.round(x).clamp(float(lo), float(hi))
    with route.on() as calls:
        out = tq.qfmt_quantize(route.to(x), 1.0, lo, hi)
    assert calls["n"] > 0
    assert same(out, ref)
    assert torch.equal(torch.signbit(out.cpu()), torch.signbit(ref))


def _near_powers_of_two(obs) -> None:
    # Ranges at and just below powers of two, where a rounded log2 picks the next exponent
    # (the maxima made small, so that the minima decide max(|min|, |max|)).
    if obs.min_val.numel() == 6:
        below = 1 - 2.0**-24  # one ulp below 1
        mins = [-4.0, -4.0 * below, -16.0 * below, -1e-9, -256.0 * below, -2.0]
        obs.min_val.copy_(torch.tensor(mins).view_as(obs.min_val))
        obs.max_val.fill_(0.1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", ["signed", "unsigned", "signed-clip", "unsigned-clip-3bit"])
@pytest.mark.parametrize("gran", list(GRANULARITIES), ids=list(GRANULARITIES))
def test_qfmt_quantizer_forward_and_backward_match_the_cpu(route, gran, grid, dtype):
    """The Q-format step computed inside the kernel from the observer's ranges equals QfmtQuantizer.step."""
    n_bits = 3 if "3bit" in grid else 6
    q = tq.QfmtQuantizer(n_bits, grid.startswith("signed"), tq.BatchMinMax(**GRANULARITIES[gran]), "clip" in grid)
    _quantizer_matches_the_cpu(route, q, dtype, "clip" not in grid, _near_powers_of_two)


def _zero_first_range(obs) -> None:
    # A zero range (min 0 too after widening): the smallest scale.
    obs.min_val.view(-1)[0] = 0.0
    obs.max_val.view(-1)[0] = 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1"])
@pytest.mark.parametrize("gran", list(GRANULARITIES), ids=list(GRANULARITIES))
def test_minifloat_quantizer_with_an_observer_matches_the_cpu(route, gran, fmt, dtype):
    """The scale computed inside the kernel from the observer's ranges equals MinifloatQuantizer.scale."""
    q = tq.MinifloatQuantizer(fmt, tq.RunningMinMax(**GRANULARITIES[gran]))
    _quantizer_matches_the_cpu(route, q, dtype, True, _zero_first_range)


OBSERVERS = {
    "batch": lambda **kw: tq.BatchMinMax(**kw),
    "running": lambda **kw: tq.RunningMinMax(**kw),
    "ema": lambda **kw: tq.ExpAvgMinMax(0.8, **kw),
}


@pytest.mark.parametrize("gran", ["per-tensor", "per-channel-1", "per-group"])
@pytest.mark.parametrize("name", list(OBSERVERS))
def test_observer_state_matches_the_cpu_and_nonfinite_batches_are_reported(route, name, gran):
    torch.manual_seed(0)
    ref = OBSERVERS[name](**GRANULARITIES[gran])
    ref.observe_batch(torch.randn(4, 6, 8))  # the first observation takes the torch path on every device
    ker = route.to(ref)
    for i in range(3):
        x = torch.randn(4, 6, 8) * (i + 1) + i
        ref.observe_batch(x)
        with route.on() as calls:
            ker.observe_batch(route.to(x))
        assert calls["n"] > 0
        for (n, a), (_, b) in zip(ref.named_buffers(), ker.named_buffers(), strict=True):
            assert same(b, a), n

    before = {n: b.clone() for n, b in ker.named_buffers()}
    bad = torch.randn(4, 6, 8)
    bad[1, 2, 3] = float("nan")
    with route.on():
        ker.observe_batch(route.to(bad))  # no host sync: the error waits for the next read of the ranges
    for n, b in ker.named_buffers():
        assert same(b, before[n]), n
    with pytest.raises(ValueError, match="NaN or Inf"):
        ker.get_ranges()
    for a, b in zip(ker.get_ranges(), ref.get_ranges(), strict=True):  # reported once
        assert same(a, b)


@pytest.mark.parametrize(
    "make",
    [
        lambda: tq.AffineQuantizer(4, tq.BatchMinMax(), gradient_clip=True),
        lambda: tq.QfmtQuantizer(4, True, tq.BatchMinMax(), gradient_clip=True),
        lambda: tq.LSQQuantizer(4, signed=True),
    ],
    ids=["affine-clip", "qfmt-clip", "lsq"],
)
def test_backward_kernels_pair_channels_last_inputs_with_their_gradients(route, make):
    """A channels_last ``x`` (per-tensor grids take it as it is) and a row-major gradient: the
    backward kernels walk memory in order, so the gradient is laid out like ``x`` first."""
    q = make()
    x = special((2, 3, 4, 5)).nan_to_num(0.0, 9.0, -9.0).contiguous(memory_format=torch.channels_last)
    q.pre_observe(x * 0.5)  # the grid clips part of x
    x.requires_grad_()
    grad = torch.linspace(-1, 1, x.numel()).view(x.shape)  # row-major
    q(x).backward(grad)
    qk, xk = route.to(q), x.detach().to(route.device, memory_format=torch.channels_last).requires_grad_()
    with route.on() as calls:
        qk(xk).backward(route.to(grad))
    assert calls["n"] > 0
    assert xk.is_contiguous(memory_format=torch.channels_last)
    assert same(xk.grad, x.grad)
    for a, b in zip(qk.parameters(), q.parameters(), strict=True):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-5, atol=1e-6)


def test_a_qfmt_subclass_keeps_its_own_integer_range_on_the_kernel_path(route):
    """The kernel takes the codes from ``int_range``: a subclass that changes them keeps its own."""

    class Symmetric(tq.QfmtQuantizer):
        @property
        def int_range(self):
            return -(2 ** (self.n_bits - 1)) + 1, 2 ** (self.n_bits - 1) - 1

    q = Symmetric(4, True, tq.BatchMinMax())
    x = torch.linspace(-15.9, 15.9, 40)  # step 2; codes down to -8 would reach -16
    q.pre_observe(x)
    with route.on() as calls:
        y = route.to(q)(route.to(x))
    assert calls["n"] > 0
    assert same(y, q(x))
    assert y.min() == -7 * q.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda: tq.AffineQuantizer(4, tq.ExpAvgMinMax(axis=1)),
        lambda: tq.QfmtQuantizer(6, True, tq.RunningMinMax()),
        lambda: tq.MinifloatQuantizer("fp8_e4m3", tq.BatchMinMax(axis=1)),
        lambda: tq.NF4Quantizer(tq.BatchMinMax(axis=1)),  # a torch path reading ranges in its forward
    ],
    ids=["affine", "qfmt", "minifloat", "nf4"],
)
def test_a_nonfinite_batch_is_reported_after_the_forward_pass_not_during_it(route, make):
    """On the kernel path the NaN/Inf count lives on the device: the forward pass (observe, then
    quantize) reads no host copy of it, whatever the quantizer; the next read of the ranges
    outside the forward pass (here ``grid()`` or ``get_ranges()``) raises, once."""
    q = make()
    q.pre_observe(torch.randn(4, 6, 8))  # the first observation allocates the state (torch path)
    qk = route.to(q)
    good = torch.randn(4, 6, 8) * 2
    bad = good.clone()
    bad[1, 2, 3] = float("inf")
    ref = copy.deepcopy(q)
    ref.pre_observe(good)
    with route.on():
        qk.pre_observe(route.to(good))
        qk.pre_observe(route.to(bad))  # skipped and counted on the device
        y = qk(route.to(good))  # no report here
    assert same(y, ref(good))  # quantized on the ranges from before the bad batch
    with pytest.raises(ValueError, match=r"1 observed batch\(es\) contained NaN or Inf"):
        qk.range_observer.get_ranges()
    qk.range_observer.get_ranges()  # reported once


def test_a_quantizer_called_inside_another_keeps_the_report_deferred(route):
    """Two quantizers sharing an observer, one calling the other in its forward: the inner call
    ends, the outer forward still reads the ranges without the report."""

    class Outer(tq.QfmtQuantizer):
        def quantize(self, x):
            y = self.inner(x)
            self.ranges()  # after the inner forward: still inside the outer one
            return y

    obs = tq.RunningMinMax()
    q = Outer(6, True, obs)
    q.inner = tq.NF4Quantizer(obs)
    q.pre_observe(torch.randn(32))
    qk = route.to(q)
    bad = torch.randn(32)
    bad[3] = float("nan")
    with route.on():
        qk.pre_observe(route.to(bad))
        qk(route.to(torch.randn(32)))  # no report inside
    with pytest.raises(ValueError, match="NaN or Inf"):
        qk.range_observer.get_ranges()


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("gran", ["per-tensor", "per-channel-0", "per-channel-1", "per-group"])
def test_observers_reduce_each_batch_into_the_same_staging_buffers(route, monkeypatch, gran, layout):
    """From the second kernel-path batch of a shape on, the batch (min, max) is reduced into the buffers
    of the one before (no allocation), with the CPU's values: in the update kernel itself, merged through
    one scratch, where the ranges are the batch's consecutive rows (per tensor, per channel along the first
    axis, per group along the last, of a contiguous batch), else by torch into the same pair of buffers;
    a reset drops them."""
    ref = tq.ExpAvgMinMax(0.9, **GRANULARITIES[gran])
    ker = route.to(ref)
    seen, rows = [], []
    observe, observe_rows = kernels.observe_minmax, kernels.observe_minmax_rows

    def recording(kind, batch_min, batch_max, *args, **kw):
        seen.append((batch_min.data_ptr(), batch_max.data_ptr()))
        observe(kind, batch_min, batch_max, *args, **kw)

    def recording_rows(kind, x, n_rows, scratch, *args, **kw):
        launched = observe_rows(kind, x, n_rows, scratch, *args, **kw)
        if launched:
            rows.append(scratch.data_ptr())
        return launched

    monkeypatch.setattr(kernels, "observe_minmax", recording)
    monkeypatch.setattr(kernels, "observe_minmax_rows", recording_rows)
    g = torch.Generator().manual_seed(4)
    for i in range(5):
        x = torch.randn(8, 6, 4, generator=g) * (i + 1)
        if layout == "transposed":
            x = x.transpose(0, 2).contiguous().transpose(0, 2)  # same shape, not contiguous
        ref.observe_batch(x)
        with route.on():
            ker.observe_batch(route.to(x) if layout == "contiguous" else x.to(route.device))
        for (n, a), (_, b) in zip(ref.named_buffers(), ker.named_buffers(), strict=True):
            assert same(b, a), (i, n)
    in_rows = layout == "contiguous" and gran in ("per-tensor", "per-channel-0", "per-group")
    # the first batch allocates the state on the torch path, the second the staging buffers
    assert (len(seen), len(rows)) == ((1, 3) if in_rows else (4, 0))
    assert len(set(seen)) == 1 and len(set(rows)) <= 1  # one pair of buffers, one scratch
    scratch = ker._stage[5]
    if in_rows:  # left reset for the next launch: the reductions' identities, no count, no ticket
        r = ker.min_val.numel()
        reset = [2**31 - 1] * r + [-(2**31)] * r + [0, 0]
        assert scratch.dtype == torch.int32 and scratch.tolist() == reset
    else:
        assert scratch is None or layout == "transposed"
    ker.reset()
    with route.on():
        ker.observe_batch(route.to(torch.randn(8, 6, 4)))  # allocates afresh (torch path)
        ker.observe_batch(route.to(torch.randn(8, 6, 4)))
    assert len(seen) == (2 if in_rows else 5) and seen[-1] != seen[0]


def test_calibrating_under_inference_mode_leaves_no_buffers_qat_cannot_write(route):
    """Batches observed under ``torch.inference_mode`` take the kernel path without staging
    buffers (inference tensors could not be written afterwards); QAT then goes on normally."""
    ref = tq.ExpAvgMinMax(axis=0)
    ker = route.to(ref)
    batches = [torch.randn(16, 32) * (i + 1) for i in range(5)]
    with torch.inference_mode(), route.on():
        for x in batches[:3]:
            ker.observe_batch(route.to(x))
    with route.on():
        for x in batches[3:]:
            ker.observe_batch(route.to(x).requires_grad_())
    for x in batches:
        ref.observe_batch(x)
    for a, b in zip(ker.get_ranges(), ref.get_ranges(), strict=True):
        assert same(a, b)


def test_qat_steps_of_a_model_are_identical_on_the_interpreter(route):
    """quantize_model in QUANT_AWARE_TRAIN: outputs and state over three SGD steps (same device, same sums)."""
    if route.name != "interpreter":
        pytest.skip("on a GPU the convolutions' sums differ from the CPU's; tests/test_cuda.py compares models")
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
        for m, opt, ctx in ((ref, opts[0], contextlib.nullcontext()), (ker, opts[1], route.on())):
            with ctx:
                y = m(x)
                y.square().sum().backward()
                opt.step()
                opt.zero_grad()
            outs.append(y.detach())
        assert route.calls["n"] > 0
        assert same(outs[1], outs[0]), step
    sd_ref, sd_ker = ref.state_dict(), ker.state_dict()
    for k in sd_ref:
        assert torch.equal(sd_ker[k], sd_ref[k]), k


LSQ_CASES = [f"{m}-{g}" for m in ("lsq", "lsq+") for g in ("per-tensor", "per-channel", "per-group")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LSQ_CASES)
def test_lsq_forward_and_gradients_match_the_cpu(route, case, dtype):
    """Outputs and the input gradient value for value; the step/offset sums to float32 rounding."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 6, 8, generator=g) * 2).to(dtype).requires_grad_()
    shape = {"per-channel": (1, 6, 1), "per-group": (4, 6, 1), "per-tensor": ()}[case.split("-", 1)[1]]
    step = (torch.rand(shape, generator=g) * 0.2 + 0.05).requires_grad_()
    offset = (torch.randn(shape, generator=g) * 0.1).requires_grad_() if case.startswith("lsq+") else None
    grad = torch.linspace(-1, 1, x.numel()).view_as(x).to(dtype)
    y_ref = lsq_quantize(x, step, offset, 4, 3, grad_scale=0.3)
    y_ref.backward(grad)
    xk, sk = route.to(x), route.to(step)
    ok = route.to(offset) if offset is not None else None
    with route.on() as calls:
        y = lsq_quantize(xk, sk, ok, 4, 3, grad_scale=0.3)
        y.backward(route.to(grad))
    assert calls["n"] > 0
    assert same(y, y_ref)
    assert same(xk.grad, x.grad)
    torch.testing.assert_close(sk.grad.cpu(), step.grad, rtol=1e-5, atol=1e-6)
    if offset is not None:
        torch.testing.assert_close(ok.grad.cpu(), offset.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offset", [None, 0.25], ids=["lsq", "lsq+"])
def test_lsq_gradients_at_the_ends_of_the_range_match_the_cpu(route, offset):
    # v exactly -qn or qp: the clipped gradients (eq. 3's non-strict cases)
    x = torch.tensor([-2.0, 1.5, 0.3, -0.7]).requires_grad_()  # v = x / 0.5 - 0.5 with the offset
    step = torch.tensor(0.5, requires_grad=True)
    b = torch.tensor(offset, requires_grad=True) if offset is not None else None
    if b is not None:
        x = (x.detach() + 0.25).requires_grad_()
    grad = torch.tensor([1.0, 2.0, 4.0, 8.0])
    lsq_quantize(x, step, b, 4, 3).backward(grad)
    assert x.grad.tolist()[:2] == [0.0, 0.0]
    xk, sk = route.to(x), route.to(step)
    bk = route.to(b) if b is not None else None
    with route.on() as calls:
        lsq_quantize(xk, sk, bk, 4, 3).backward(route.to(grad))
    assert calls["n"] > 0
    assert same(xk.grad, x.grad) and same(sk.grad, step.grad)
    if b is not None:
        assert same(bk.grad, b.grad)


@pytest.mark.parametrize("cls", [tq.LSQQuantizer, tq.LSQPlusQuantizer], ids=["lsq", "lsq+"])
def test_lsq_quantizers_in_groups_along_the_last_axis_launch_the_kernel(route, cls):
    """The grouped view reaches the kernel with the parameters one per group (not repeated to x's
    size) and gives the CPU's outputs, input gradients and parameter gradients."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 32, generator=g) * 2).requires_grad_()
    q = cls(4, axis=-1, group_size=8)
    q.pre_observe(x.detach())
    grad = torch.linspace(-1, 1, x.numel()).view_as(x)
    q(x).backward(grad)
    qk, xk = route.to(q), route.to(x)
    with route.on() as calls:
        y = qk(xk)
        y.backward(route.to(grad))
    # lsq_forward(x, step, ...), lsq_backward(grad, x, step, ...)
    steps = [args[{"lsq_forward": 1, "lsq_backward": 2}[name]] for name, args in calls["launches"]]
    assert [tuple(s.shape) for s in steps] == [(6, 4, 1)] * 2  # forward and backward, one step per group
    assert same(y, q(x))
    assert same(xk.grad, x.grad)
    for name, p in q.named_parameters():
        torch.testing.assert_close(dict(qk.named_parameters())[name].grad.cpu(), p.grad, rtol=1e-5, atol=1e-6)


FORMATS = {"e4m3": (3, 7, 448.0, 8), "e5m2": (2, 15, 57344.0, 15), "e2m1": (1, 1, 6.0, 2), "int8": (6, 1, 127 / 64, 0)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_minifloat_and_mx_match_the_cpu(route, fmt, dtype):
    man, bias, max_value, emax = FORMATS[fmt]
    x = special((4, 6, 40), scale=50.0)
    x.view(-1)[20:24] = torch.tensor([1e-41, -3e-39, 7e-45, 0.0])  # float32 subnormals
    x = x.to(dtype)
    scale = torch.rand(1, 6, 1, generator=torch.Generator().manual_seed(3)) + 0.5
    cases = {
        "minifloat-per-tensor": lambda t, s: minifloat_quantize(t, 0.75, man, bias, max_value),
        "minifloat-per-channel": lambda t, s: minifloat_quantize(t, s, man, bias, max_value),
        "mx-last-axis": lambda t, s: mx_quantize(t, man, bias, max_value, emax, 32, -1),
        "mx-axis-1": lambda t, s: mx_quantize(t, man, bias, max_value, emax, 4, 1),
    }
    for name, fn in cases.items():
        ref = fn(x, scale)
        xk = route.to(x).requires_grad_()
        with route.on() as calls:
            out = fn(xk, route.to(scale))
            out.backward(torch.ones_like(out))
        assert calls["n"] > 0, name
        assert same(out, ref), name
        assert same(xk.grad, torch.ones_like(x)), name  # straight through


@pytest.mark.parametrize("fmt", ["int8", "e2m1"])
def test_an_mx_block_whose_maximum_is_subnormal_takes_the_specifications_scale(route, fmt):
    # OCP MX: X = 2 ** clamp(floor(log2(amax)) - emax, -127, 127); flooring amax at the smallest normal made
    # MXINT8's X 2 ** -126 for amax 1e-40 (output 1.84e-40: an 84% error)
    from torchquant.quantizers_functional import mx_block_scales

    man, bias, max_value, emax = FORMATS[fmt]
    x = torch.tensor([1e-40, -3e-41, 0.0, 2e-42, 1.0, 0.5, -0.25, 3.0])  # a subnormal block, a normal one
    assert mx_block_scales(x, elem_emax=emax, block_size=4)[0].item() == 2.0**-127
    ref = mx_quantize(x, man, bias, max_value, emax, 4)
    if fmt == "int8":
        assert ref[0].item() == round(1e-40 / 2.0**-127 * 64) / 64 * 2.0**-127
    with route.on() as calls:
        out = mx_quantize(route.to(x), man, bias, max_value, emax, 4)
    assert calls["n"] > 0
    assert same(out, ref)


def test_tracing_keeps_the_torch_path(route):
    """Under torch.compile the quantizer records torch ops (inductor fuses them), where kernels run eagerly."""
    q = route.to(tq.AffineQuantizer(8, tq.RunningMinMax()))
    x = torch.randn(64, device=route.device)
    q.pre_observe(x)
    with route.on() as calls:
        eager = q(x)
        n_eager = calls["n"]
        compiled = torch.compile(q, fullgraph=True)(x)
    assert n_eager > 0 and calls["n"] == n_eager
    assert same(compiled, eager)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clipped_gradient_keeps_a_bit_per_element_taken_at_the_forward(route, dtype):
    """The clipped STE's backward reads the mask the fake quant wrote, a bit per element in x's memory order:
    channels_last x of 2500 elements (three programs, a last byte half full), a gradient of other strides, and
    ranges the observer moved between forward and backward (the mask is the forward's, as the torch path's)."""
    q = tq.AffineQuantizer(3, tq.ExpAvgMinMax(), gradient_clip=True)
    x = (torch.randn(2, 10, 5, 25) * 2).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    q.pre_observe(x.detach() * 0.5)  # the grid clips part of x
    grad = torch.linspace(-1, 1, x.numel()).view(2, 25, 5, 10).to(dtype).transpose(1, 3)  # strides unlike x's
    qk, xk = route.to(q), route.to(x)
    xk = xk.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    y_ref = q(x)
    saved = []
    with route.on() as calls, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qk(xk)
        qk.pre_observe(xk.detach() * 3)  # moves the ranges in place before the backward
        y.backward(route.to(grad))
    q.pre_observe(x.detach() * 3)
    y_ref.backward(grad)
    assert [name for name, _ in calls["launches"]] == ["fake_quant", "observe", "masked_grad"]
    assert calls["kwargs"][0] == {"with_mask": True}
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, (x.numel() + 7) // 8)]  # not x: 1/8 byte each
    assert same(y, y_ref)
    assert same(xk.grad, x.grad)
    assert 0 < (x.grad == 0).float().mean() < 0.5


def test_clipped_quantizer_without_gradient_writes_no_mask(route):
    q = tq.AffineQuantizer(4, tq.BatchMinMax(), gradient_clip=True)
    x = special((4, 6, 8))
    q.pre_observe(x.nan_to_num(0.0, 5.0, -7.0))
    qk = route.to(q)
    with route.on() as calls, torch.no_grad():
        y = qk(route.to(x))
    assert [name for name, _ in calls["launches"]] == ["fake_quant"]
    assert not calls["kwargs"][0].get("with_mask")  # the call has no gradient to take
    assert same(y, q(x))


def test_layouts_that_share_a_parameter_over_runs_of_elements_are_launched_as_runs():
    """Per channel (a run is a channel's trailing elements, the runs cycling over the channels) and per group
    along the last axis (a run is a group): the grid is computed once per run. Not: runs shorter than 16,
    short runs not a multiple of 16 long (a thread would take several runs' elements one by one), parameters
    that vary inside a run, a clipped gradient's mask with runs that split its bytes."""
    k = kernels.interpreted()
    fit = lambda shape, axis, group=None: k.Layout.for_granularity(torch.Size(shape), axis, group)  # noqa: E731

    def runs(layout, n, mask=False):
        r = layout.runs(n, mask)
        return None if r is None else (r[0].gran, r[0].c, r[0].inner, r[1], r[2])

    assert runs(fit((64, 32, 3, 3), 0), 64 * 288) == (k.RUNS, 64, 288, 2, 512)  # a conv weight per channel
    assert runs(fit((8, 16, 4, 4), 1), 8 * 16 * 16) == (k.RUNS, 16, 16, 64, 16)  # activations: run r, channel r % 16
    assert runs(fit((6, 512), -1, 128), 6 * 512) == (k.RUNS, 24, 128, 8, 128)  # groups of a row: run r, group r
    assert runs(fit((512, 4608), 0), 512 * 4608) == (k.RUNS, 512, 4608, 1, 1024)  # a run over five programs
    assert runs(fit((64, 32, 3, 3), 0), 64 * 288, mask=True) == (k.RUNS, 64, 288, 2, 512)
    assert runs(fit((8, 16, 7, 7), 1), 8 * 16 * 49) is None  # 49: unaligned short runs
    assert runs(fit((64, 300), 0), 64 * 300) == (k.RUNS, 64, 300, 2, 512)  # unaligned but long: a row a thread
    assert runs(fit((64, 300), 0), 64 * 300, mask=True) is None  # 300: bytes of the mask shared by two runs
    assert runs(fit((64, 8), 0), 64 * 8) is None  # runs of 8: a grid per element costs less than the tile
    assert runs(fit((32, 6, 10), 0, 8), 32 * 60) is None  # groups along a non-last axis vary inside a run
    assert runs(k.Layout(k.PER_TENSOR), 100) is None


RUN_CASES = {
    # name: (x's shape, granularity, launched as runs without the clipped gradient's mask, with it): runs of 16
    # (64 runs a program, 20 of them filled), 1104 (two column blocks of a program, the mask's bytes across
    # them), 1100 (unaligned and long), 32 cycling over 5 channels of 3 samples, groups of 32; element by
    # element: 27 and 49 (unaligned and short)
    "conv-weight": ((20, 4, 2, 2), dict(axis=0), True, True),
    "long-rows": ((5, 1104), dict(axis=0), True, True),
    "long-rows-unaligned": ((5, 1100), dict(axis=0), True, False),
    "activations": ((3, 5, 4, 8), dict(axis=1), True, True),
    "groups": ((6, 96), dict(axis=-1, group_size=32), True, True),
    "unaligned-weight": ((20, 3, 3, 3), dict(axis=0), False, False),
    "unaligned-activations": ((3, 5, 7, 7), dict(axis=1), False, False),
}


class _GranSpy:
    """Stands for a kernel of a kernel module and records the ``GRAN`` each launch took."""

    def __init__(self, kernel, seen: list) -> None:
        self._kernel, self._seen = kernel, seen

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def run(*args, **kw):
            self._seen.append(kw["GRAN"])
            return launch(*args, **kw)

        return run


RUN_KERNELS = {
    "affine-clip": ["_fake_quant_kernel"],
    "qfmt": ["_fake_quant_kernel"],
    "grid": ["_fake_quant_kernel"],
    "lsq-plus": ["_lsq_fwd_kernel", "_lsq_bwd_kernel"],
    "minifloat": ["_minifloat_kernel"],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(RUN_CASES))
@pytest.mark.parametrize("quantizer", list(RUN_KERNELS))
def test_kernels_in_runs_match_the_cpu(route, monkeypatch, case, quantizer, dtype):
    """Per-channel and per-group parameters launched as runs (several runs a program, or a run over several
    programs; runs that do not fill the last program), or element by element where runs do not pay: outputs
    and gradients as the CPU's."""
    shape, gran, as_runs, as_runs_masked = RUN_CASES[case]
    module = kernels.interpreted() if route.name == "interpreter" else kernels._compiled()
    seen: list = []
    for name in RUN_KERNELS[quantizer]:
        monkeypatch.setattr(module, name, _GranSpy(getattr(module, name), seen))
    x = special(shape).to(dtype)
    grad = torch.linspace(-1, 1, x.numel()).view(shape).to(dtype)
    if quantizer == "grid":  # affine_quantize with a step and zero point per channel, or per group of a row's view
        axis = gran["axis"] % len(shape)
        if "group_size" in gran:
            x, grad = x.view(shape[0], -1, gran["group_size"]), grad.view(shape[0], -1, gran["group_size"])
            p_shape = (shape[0], x.shape[1], 1)
        else:
            p_shape = tuple(s if i == axis else 1 for i, s in enumerate(shape))
        g = torch.Generator().manual_seed(0)
        delta = torch.rand(p_shape, generator=g) * 0.2 + 0.05
        zp = torch.randint(0, 16, p_shape, generator=g).float()
        ref_fn = lambda t: tq.affine_quantize(t, delta, zp, 16)  # noqa: E731
        ker_fn = lambda t: tq.affine_quantize(t, route.to(delta), route.to(zp), 16)  # noqa: E731
    else:
        if quantizer == "affine-clip":
            q = tq.AffineQuantizer(4, tq.BatchMinMax(**gran), gradient_clip=True)
        elif quantizer == "qfmt":
            q = tq.QfmtQuantizer(6, True, tq.BatchMinMax(**gran))
        elif quantizer == "minifloat":
            q = tq.MinifloatQuantizer("fp8_e4m3", tq.BatchMinMax(**gran))
        else:
            q = tq.LSQPlusQuantizer(4, **gran)
        q.pre_observe(x.nan_to_num(0.0).clamp(-4, 4))  # finite ranges (LSQ+: its first step and offset)
        ref_fn, ker_fn = q, route.to(q)
    x = x.requires_grad_()
    ref = ref_fn(x)
    ref.backward(grad)
    xk = route.to(x)
    with route.on():
        out = ker_fn(xk)
        out.backward(route.to(grad))
    assert seen == [2 if (as_runs_masked if quantizer == "affine-clip" else as_runs) else 1] * len(seen)
    assert len(seen) == len(RUN_KERNELS[quantizer])
    assert same(out, ref)
    assert same(xk.grad, x.grad)
    if quantizer == "lsq-plus":  # the step and offset gradients: sums of the per-element terms, in another order
        for a, b in zip(ker_fn.parameters(), ref_fn.parameters(), strict=True):
            torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_make_fx_records_the_torch_path(mode, monkeypatch):
    # make_fx traces real or fake tensors, not Proxies: the kernels must stay out of its graph, which then
    # replays the torch path's operations.
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setattr(kernels, "_DEVICES", {"cuda", "cpu"})  # the interpreter standing in for a GPU
    f = lambda t: tq.qfmt_quantize(t, 0.5, -8, 7)  # noqa: E731
    x = torch.randn(16, generator=torch.Generator().manual_seed(0))
    gm = make_fx(f, tracing_mode=mode)(x)
    assert torch.ops.aten.round.default in [n.target for n in gm.graph.nodes]
    assert torch.equal(gm(x.clone()), f(x))


_B, _R, _E = kernels.KIND_BATCH, kernels.KIND_RUNNING, kernels.KIND_EMA


@pytest.mark.parametrize(
    ("shape", "kind", "dtype"),
    [
        ((1, 5000), _E, torch.float32),
        ((3, 2500), _R, torch.float32),
        ((12, 7), _B, torch.float32),
        ((1, 5000), _R, torch.float16),
        ((3, 2500), _E, torch.bfloat16),
    ],
    ids=["1x5000-ema", "3x2500-running", "12x7-batch", "1x5000-running-float16", "3x2500-ema-bfloat16"],
)
def test_observing_rows_in_one_launch_equals_reducing_then_folding(route, shape, kind, dtype):
    """observe_minmax_rows over several programs a row (5 and 3 here) and many rows: the state equals
    observe_minmax's given torch's per-row (min, max), batch after batch; a batch with Inf in one program
    (not the last) or NaN leaves the state as it was and is counted; the scratch is left reset every time."""
    rows, length = shape
    state = {
        "min_val": torch.zeros(rows),
        "max_val": torch.zeros(rows),
        "num_batches": torch.zeros((), dtype=torch.long),
        "ema_min": torch.zeros(rows),
        "ema_max": torch.zeros(rows),
        "decay": torch.ones(()),
    }

    def fresh():
        return {k: route.to(v) for k, v in state.items()}, route.to(torch.zeros((), dtype=torch.int32))

    (a, bad_a), (b, bad_b) = fresh(), fresh()
    scratch = kernels.observe_scratch(rows, route.device)
    reset = scratch.clone()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(rows, length, generator=g) * (i + 1) - i for i in range(3)]
    batches.insert(
        2,
        batches[0].clone().index_put_((torch.tensor(rows - 1), torch.tensor(length // 3)), torch.tensor(float("inf"))),
    )
    batches.append(
        batches[1].clone().index_put_((torch.tensor(0), torch.tensor(length - 1)), torch.tensor(float("nan")))
    )

    def split(st):
        return st["min_val"], st["max_val"], {k: st[k] for k in ("num_batches", "ema_min", "ema_max", "decay")}

    for i, x in enumerate(batches):
        x = route.to(x.to(dtype))
        mn_a, mx_a, kw_a = split(a)
        mn_b, mx_b, kw_b = split(b)
        n0 = len(route.calls["launches"])
        with route.on():
            assert kernels.observe_minmax_rows(kind, x, rows, scratch, mn_a, mx_a, bad_a, momentum=0.75, **kw_a)
        assert [name for name, _ in route.calls["launches"][n0:]] == ["observe_rows"]
        bmn, bmx = torch.aminmax(x, dim=1)
        with route.on():
            kernels.observe_minmax(kind, bmn, bmx, mn_b, mx_b, bad_b, momentum=0.75, **kw_b)
        for k in state:
            assert same(a[k], b[k]), (i, k)
        assert int(bad_a) == int(bad_b) == (i >= 2) + (i >= 4), i
        assert torch.equal(scratch, reset), i


def test_observing_rows_orders_signed_zeros(route):
    """The rows kernel reduces order keys in which -0.0 lies below +0.0: the range of a batch holding both is
    (-0.0, ...) and (..., +0.0), whatever the programs' order (torch's own order of equal zeros is its loop's)."""
    x = route.to(torch.tensor([[0.0, -0.0] * 700, [-0.0, 0.0] * 700, [-1.0, 0.0] + [-0.0] * 1398]))
    mn, mx = route.to(torch.zeros(3)), route.to(torch.zeros(3))
    with route.on():
        kernels.observe_minmax_rows(
            kernels.KIND_BATCH,
            x,
            3,
            kernels.observe_scratch(3, route.device),
            mn,
            mx,
            route.to(torch.zeros((), dtype=torch.int32)),
        )
    assert mn.tolist() == [0.0, 0.0, -1.0] and mx.tolist() == [0.0, 0.0, 0.0]
    assert torch.signbit(mn).tolist() == [True, True, True] and torch.signbit(mx).tolist() == [False, False, False]


def _observed(q: nn.Module) -> nn.Module:
    q.pre_observe(torch.randn(4, 16))
    return q


UNTRACKED = {
    "affine_quantize": lambda: lambda t: tq.affine_quantize(t, torch.tensor(0.1), torch.tensor(3.0), 256),
    "AffineQuantizer": lambda: _observed(tq.AffineQuantizer(4, tq.BatchMinMax(), gradient_clip=True)),
    "lsq": lambda: lambda t: lsq_quantize(t, torch.tensor(0.1), torch.tensor(0.02), 4, 3),
    "MinifloatQuantizer": lambda: _observed(tq.MinifloatQuantizer("fp8_e4m3", tq.BatchMinMax())),
    "mx": lambda: lambda t: mx_quantize(t, 3, 7, 448.0, 8, block_size=8),
}


@pytest.mark.parametrize("name", list(UNTRACKED))
def test_a_call_no_gradient_can_flow_through_launches_without_an_autograd_function(route, monkeypatch, name):
    """x needing no gradient, or no grad mode: the kernel launches directly (no autograd.Function, about 2.5 us
    of host time a call less), with the CPU's values; x needing one: through the Function, with its gradient;
    a forward-mode AD level with a dual x: through the Function too, which raises as the CPU path does (not a
    tangent silently dropped)."""
    applied = []
    for fn in (kernels._GridFQ, kernels._RangesFQ, kernels._LSQFn, kernels._STE):
        original = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, _o=original, _n=fn.__name__: applied.append(_n) or _o(*a))
    f = UNTRACKED[name]()
    fk = route.to(f) if isinstance(f, nn.Module) else f
    x = torch.randn(4, 16)
    ref = f(x)
    with route.on() as calls:
        y = fk(route.to(x))
        with torch.no_grad():
            y_no_grad = fk(route.to(x).requires_grad_())
    assert calls["n"] == 2 and applied == []
    assert same(y, ref) and same(y_no_grad, ref) and y_no_grad.grad_fn is None
    with route.on() as calls:
        xg = route.to(x).requires_grad_()
        fk(xg).sum().backward()
    assert calls["n"] > 2 and len(applied) == 1 and xg.grad is not None
    with route.on(), torch.autograd.forward_ad.dual_level(), pytest.raises(NotImplementedError, match="jvp"):
        fk(torch.autograd.forward_ad.make_dual(route.to(x), route.to(torch.ones_like(x))))
