import pytest
import torch

import torchquant as tq
from torchquant import AffineQuantizer, BatchMinMax, ExpAvgMinMax, QfmtQuantizer, Quantizer


def observed(q, x):
    q.pre_observe(x)
    return q


def test_qfmt_reference_values_from_the_spec():
    q = observed(QfmtQuantizer(4, True, BatchMinMax()), torch.tensor([3.9, 7.2, -10.0]))
    assert q(torch.tensor([3.9, 7.2, -10.0])).tolist() == [4.0, 8.0, -10.0]
    q = observed(QfmtQuantizer(4, False, BatchMinMax()), torch.tensor([3.9, 7.2, 10.3]))
    assert q(torch.tensor([3.9, 7.2, 10.3])).tolist() == [4.0, 7.0, 10.0]


def test_qfmt_fractional_step():
    # max |x| = 0.9 -> int_bits = floor(log2 0.9) + 1 = 0; signed 8 bits -> frac 7, step 1/128
    x = torch.tensor([0.9, -0.3, 0.0051])
    q = observed(QfmtQuantizer(8, True, BatchMinMax()), x)
    assert torch.equal(q.step(), torch.tensor(2.0**-7))
    assert torch.equal(q(x), torch.round(x * 128) / 128)
    g = q.grid()
    assert (g.qmin, g.qmax) == (-128, 127) and g.zero_point.item() == 0


def test_affine_hand_computed():
    # range [-1, 2] relaxed (already includes 0); 2 bits: delta = 3/3 = 1, zp = 1
    x = torch.tensor([-1.0, 0.1, 0.5, 1.5, 2.0, 7.0])
    q = observed(AffineQuantizer(2, BatchMinMax()), torch.tensor([-1.0, 2.0]))
    d, z = q.qparams()
    assert d.item() == 1.0 and z.item() == 1.0
    assert q(x).tolist() == [-1.0, 0.0, 0.0, 2.0, 2.0, 2.0]


def test_affine_range_relaxed_to_include_zero():
    x = torch.tensor([1.0, 3.0])  # min 1 -> relaxed to 0
    q = observed(AffineQuantizer(8, BatchMinMax()), x)
    d, z = q.qparams()
    assert torch.allclose(d, torch.tensor(3.0 / 255)) and z.item() == 0.0
    assert q(torch.tensor([0.0])).item() == 0.0


def test_affine_symmetric():
    x = torch.tensor([-1.0, 3.0])
    q = observed(AffineQuantizer(8, BatchMinMax(), symmetric=True), x)
    d, z = q.qparams()
    assert torch.allclose(d, torch.tensor(6.0 / 255))
    assert z.item() == 128.0  # round(127.5) half to even
    y = q(torch.tensor([-3.0, 3.0]))
    assert torch.allclose(y, torch.tensor([-128 * 6 / 255, 127 * 6 / 255]))


def test_affine_per_channel_equals_separate_per_tensor():
    w = torch.randn(4, 3, 3, 3)
    qc = observed(AffineQuantizer(4, BatchMinMax(axis=0)), w)
    yc = qc(w)
    for c in range(4):
        qt = observed(AffineQuantizer(4, BatchMinMax()), w[c])
        assert torch.equal(yc[c], qt(w[c]))


def test_affine_per_group_equals_separate_per_tensor():
    w = torch.randn(3, 16)
    qg = observed(AffineQuantizer(4, BatchMinMax(axis=1, group_size=8)), w)
    yg = qg(w)
    for r in range(3):
        for g in range(2):
            blk = w[r, g * 8 : (g + 1) * 8]
            qt = observed(AffineQuantizer(4, BatchMinMax()), blk)
            assert torch.equal(yg[r, g * 8 : (g + 1) * 8], qt(blk))


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"symmetric": True},
        {"power_of_two": True},
        {"gradient_clip": True},
        {"symmetric": True, "power_of_two": True},
    ],
    ids=["asym", "sym", "pot", "clip", "sym-pot"],
)
def test_affine_per_group_is_bit_identical_to_the_grid_repeated_to_the_tensor(axis, options):
    """The CPU path computes one grid per group and broadcasts it; the reference repeats the ranges to x's size."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 8) * torch.logspace(-2, 1, 8)
    q = observed(AffineQuantizer(3, BatchMinMax(axis=axis, group_size=4), **options), x)
    y = x.clone().requires_grad_()
    out = q(y)
    out.backward(torch.arange(x.numel(), dtype=x.dtype).view_as(x))
    delta, zero_point = q.qparams()  # (4, 16, 8): the ranges repeated along the axis
    assert delta.shape == x.shape
    ref_in = x.clone().requires_grad_()
    ref = q._on_grid(ref_in, delta, zero_point)
    ref.backward(torch.arange(x.numel(), dtype=x.dtype).view_as(x))
    assert torch.equal(out, ref)
    assert torch.equal(y.grad, ref_in.grad)
    z = torch.randn(4, 16, 8) * 3  # values beyond the ranges: the clamp and the clipped gradient
    assert torch.equal(q(z), q._on_grid(z, delta, zero_point))


def test_constant_tensors_are_finite():
    for x in (torch.zeros(10), torch.full((10,), 3.0)):
        for q in (AffineQuantizer(8, BatchMinMax()), QfmtQuantizer(8, True, BatchMinMax())):
            q.pre_observe(x)
            y = q(x)
            assert torch.isfinite(y).all()
            assert torch.allclose(y, x, atol=3.0 / 255)
    q = observed(AffineQuantizer(8, BatchMinMax()), torch.zeros(3))
    assert torch.isfinite(q(torch.tensor([1.0, -5.0, 1e30]))).all()


def test_quantize_before_observe_names_module():
    q = AffineQuantizer(8, ExpAvgMinMax())
    with pytest.raises(RuntimeError, match=r"AffineQuantizer.range_observer.*calibrate first"):
        q(torch.randn(3))


@pytest.mark.parametrize(
    ("make", "bad"),
    [
        (lambda n: AffineQuantizer(n, BatchMinMax()), [0, 33, -1, 2.5, True, "8"]),
        (lambda n: QfmtQuantizer(n, True, BatchMinMax()), [1, 0, 33]),
        (lambda n: QfmtQuantizer(n, False, BatchMinMax()), [0, 40]),
    ],
)
def test_bad_n_bits(make, bad):
    for n in bad:
        with pytest.raises(ValueError, match="n_bits"):
            make(n)


def test_observer_must_be_an_observer():
    with pytest.raises(TypeError, match="RangeObserver"):
        AffineQuantizer(8, BatchMinMax)


def test_ste_gradient_exact_and_clipped():
    x = torch.tensor([-3.0, -0.5, 0.2, 0.9, 5.0], requires_grad=True)
    q = observed(AffineQuantizer(8, BatchMinMax()), torch.tensor([-1.0, 1.0]))
    g = torch.arange(1.0, 6.0)
    q(x).backward(g)
    assert torch.equal(x.grad, g)
    x.grad = None
    qc = observed(AffineQuantizer(8, BatchMinMax(), gradient_clip=True), torch.tensor([-1.0, 1.0]))
    qc(x).backward(g)
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]
    x.grad = None
    qf = observed(QfmtQuantizer(4, True, BatchMinMax(), gradient_clip=True), torch.tensor([-1.0, 1.0]))
    # max|r| = 1 -> int_bits 1, frac 2, step 0.25, range [-2, 1.75]
    qf(x).backward(g)
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    x = torch.randn(64).to(dtype)
    q = observed(AffineQuantizer(8, ExpAvgMinMax()), x)
    y = q(x)
    assert y.dtype == dtype
    assert (y.float() - x.float()).abs().max() < 0.05


def test_grid_reproduces_quantizer_output():
    w = torch.randn(6, 5)
    for q in (
        AffineQuantizer(4, BatchMinMax(axis=0)),
        AffineQuantizer(8, BatchMinMax(), symmetric=True),
        QfmtQuantizer(6, True, BatchMinMax(axis=0)),
    ):
        q.pre_observe(w)
        g = q.grid()
        ints = g.to_int(w)
        assert ints.min() >= g.qmin and ints.max() <= g.qmax
        assert torch.equal(g.from_int(ints), q(w))


def test_sign_quantizer_subclass_from_the_docs():
    class SignQuantizer(Quantizer):
        def pre_observe(self, x):
            pass

        def quantize(self, x):
            return x + (torch.sign(x) - x).detach()

        def post_observe(self, x):
            pass

    q = SignQuantizer()
    x = torch.tensor([-0.3, 0.0, 2.0], requires_grad=True)
    y = q(x)
    assert y.tolist() == [-1.0, 0.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]
    assert q.grid() is None
    w = tq.QWrapper(torch.nn.Linear(3, 2), weight_quantizer=q)
    with tq.qmodule_state(w, tq.QModuleState.QUANT_EVAL):
        assert torch.equal(w.quantized_weight(), torch.sign(w.layer.weight))


def test_quantizer_is_abstract():
    with pytest.raises(TypeError):
        Quantizer()


def test_symmetric_zero_point_is_exact_for_every_channel():
    w = torch.randn(64, 9) * torch.logspace(-3, 2, 64).unsqueeze(1)
    q = observed(AffineQuantizer(8, BatchMinMax(axis=0), symmetric=True), w)
    _, z = q.qparams()
    assert torch.all(z == 128.0)
    q4 = observed(AffineQuantizer(4, BatchMinMax(axis=0), symmetric=True), w)
    assert torch.all(q4.qparams()[1] == 8.0)


@pytest.mark.parametrize(
    ("granularity", "scale_shape", "tensor_shape"),
    [
        (tq.Granularity(), (), (8, 3, 3, 3)),
        (tq.Granularity(), (1, 1, 1, 1), (8, 3, 3, 3)),
        (tq.Granularity(axis=0), (8, 1, 1, 1), (8, 3, 3, 3)),
        (tq.Granularity(axis=1), (4, 1, 1), (2, 4, 5, 5)),  # right-aligned, as broadcasting does
        (tq.Granularity(axis=-1, group_size=2), (3, 4), (3, 4)),  # per-group, expanded
    ],
    ids=["per-tensor-scalar", "per-tensor-keepdim", "per-channel", "per-channel-short", "per-group"],
)
def test_grid_check_accepts_shapes_that_fit(granularity, scale_shape, tensor_shape):
    grid = tq.AffineGrid(torch.ones(scale_shape), torch.zeros(scale_shape), -8, 7, granularity)
    grid.check(torch.Size(tensor_shape), "q")
    x = torch.randn(tensor_shape)
    assert torch.equal(grid.from_int(grid.to_int(x, "q"), "q"), x.round().clamp(-8, 7))


@pytest.mark.parametrize(
    ("granularity", "scale_shape", "tensor_shape", "reason"),
    [
        (tq.Granularity(axis=0), (8,), (8, 3, 3, 3), "scale does not broadcast"),
        (tq.Granularity(axis=0), (8, 1, 1, 1, 1), (8, 3, 3, 3), "scale does not broadcast"),
        (tq.Granularity(), (8, 1, 1, 1), (8, 3, 3, 3), "has one value, its scale does not"),
        (tq.Granularity(axis=0), (1, 3, 1, 1), (8, 3, 3, 3), "along dimension 0 only, its scale does not"),
        (tq.Granularity(axis=4), (), (8, 3, 3, 3), "has 4 dimensions"),
    ],
    ids=["not-broadcasting", "more-dims", "per-tensor-with-channels", "wrong-axis", "axis-out-of-range"],
)
def test_grid_check_rejects_naming_who_and_the_shapes(granularity, scale_shape, tensor_shape, reason):
    grid = tq.AffineGrid(torch.ones(scale_shape), torch.zeros(scale_shape), -8, 7, granularity)
    x = torch.randn(tensor_shape)
    for call in (lambda: grid.check(x.shape, "layer.q"), lambda: grid.to_int(x, "layer.q")):
        with pytest.raises(ValueError, match=reason) as e:
            call()
        assert str(e.value).startswith("layer.q: ")
        assert str(tuple(tensor_shape)) in str(e.value)
        if "dimensions" not in reason:
            assert f"scale of shape {scale_shape}" in str(e.value)
    with pytest.raises(ValueError, match=r"^AffineGrid: "):
        grid.from_int(torch.zeros(tensor_shape, dtype=torch.int64))


def test_grid_check_zero_point_shape():
    g = tq.Granularity(axis=0)
    grid = tq.AffineGrid(torch.ones(8, 1), torch.zeros(8), 0, 255, g)  # zero point (8,) vs tensor (8, 5)
    with pytest.raises(ValueError, match=r"zero_point does not broadcast.*zero_point of shape \(8,\)"):
        grid.check((8, 5), "q")
    tq.AffineGrid(torch.ones(8, 1), torch.zeros(()), 0, 255, g).check((8, 5), "q")  # one zero point is fine


# ------------------------------------------------------------------ levels (non-uniform grids)

# The NF4 table as published (Dettmers et al. 2023, appendix E), in float32.
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def _nearest_by_search(v, levels):
    """Reference: the index of the closest level by exhaustive search (the first, i.e. lower, one on a tie)."""
    return (v.unsqueeze(-1) - levels).abs().argmin(-1)


def test_level_grid_codes_neighbours_and_dequantize_hand_computed():
    g = tq.LevelGrid(torch.tensor([-1.0, 0.0, 0.5, 1.0]), torch.tensor(2.0), tq.Granularity())
    # in level units: -1.5 (below), -0.5 (tie between -1 and 0), 0 (a level), 0.2, 0.25 (tie), 0.3, 0.75 (tie), 3
    x = torch.tensor([-3.0, -1.0, 0.0, 0.4, 0.5, 0.6, 1.5, 6.0])
    assert g.codes(x).tolist() == [0, 0, 1, 1, 1, 2, 2, 3]  # ties go to the lower level
    lo, hi = g.neighbours(x)
    assert lo.tolist() == [0, 0, 1, 1, 1, 1, 2, 3]
    assert hi.tolist() == [0, 1, 2, 2, 2, 2, 3, 3]  # outside the range both are the end
    assert g.dequantize(g.codes(x)).tolist() == [-2.0, -2.0, 0.0, 0.0, 0.0, 1.0, 1.0, 2.0]
    assert (g.n_levels, g.n_bits) == (4, 2)


def test_level_grid_per_channel_codebook_equals_each_row_on_its_own():
    table = torch.tensor([[-1.0, 0.0, 1.0], [-3.0, -1.0, 2.0]]).view(2, 1, 3)  # a codebook per row
    scale = torch.tensor([0.5, 2.0]).view(2, 1)
    g = tq.LevelGrid(table, scale, tq.Granularity(axis=0))
    x = torch.randn(2, 50) * 3
    codes = g.codes(x)
    for c in range(2):
        row = tq.LevelGrid(table[c, 0], scale[c, 0], tq.Granularity())
        assert torch.equal(codes[c], row.codes(x[c]))
        assert torch.equal(g.dequantize(codes)[c], row.dequantize(codes[c]))
        assert torch.equal(codes[c], _nearest_by_search(x[c] / scale[c], table[c, 0]))


@pytest.mark.parametrize(
    ("levels", "scale", "granularity", "reason"),
    [
        (torch.tensor([0.0, 1.0]), torch.ones(8), tq.Granularity(axis=0), r"scale does not broadcast"),
        (torch.ones(8, 2).cumsum(1), torch.ones(8, 1), tq.Granularity(axis=0), r"levels\[\.\.\., 0\] does not"),
        (torch.tensor([0.0, 1.0, 0.5]), torch.ones(()), tq.Granularity(), r"strictly ascending"),
        (torch.tensor([1.0]), torch.ones(()), tq.Granularity(), r"at least two levels"),
    ],
    ids=["scale-not-broadcasting", "codebook-not-broadcasting", "unsorted", "one-level"],
)
def test_level_grid_check_names_who_and_the_shapes(levels, scale, granularity, reason):
    g = tq.LevelGrid(levels, scale, granularity)
    for call in (lambda: g.check((8, 5), "layer.q"), lambda: g.codes(torch.randn(8, 5), "layer.q")):
        with pytest.raises(ValueError, match=reason) as e:
            call()
        assert str(e.value).startswith("layer.q: ")


def test_nf4_levels_are_the_published_table():
    levels = tq.quantizers.nf4_levels()
    assert levels.dtype == torch.float32
    assert torch.equal(levels, torch.tensor(NF4_PUBLISHED))  # bit for bit in float32
    q = tq.NF4Quantizer()
    assert torch.equal(q.codebook, levels)
    assert q.granularity == tq.Granularity(axis=1, group_size=64)  # QLoRA's blocks of 64 along the inputs


def test_nf4_quantizes_each_block_by_its_absmax():
    w = torch.randn(4, 128)
    q = observed(tq.NF4Quantizer(), w)
    y = q(w)
    table = tq.quantizers.nf4_levels()
    for block in range(2):
        part = w[:, 64 * block : 64 * (block + 1)]
        absmax = part.abs().amax(1, keepdim=True)
        expected = table[_nearest_by_search(part / absmax, table)] * absmax
        assert torch.equal(y[:, 64 * block : 64 * (block + 1)], expected)
    assert torch.equal(q(y), y)
    grid = q.levels()
    assert grid.granularity == q.granularity and torch.equal(grid.dequantize(grid.codes(w)), y)


def test_apot_levels_are_the_papers_sums_of_powers_of_two():
    # 4 bits, k = 2 (the paper's equation 5): p_0 in {0, 2^0, 2^-2, 2^-4}, p_1 in {0, 2^-1, 2^-3, 2^-5}
    p0, p1 = [0, 1, 2**-2, 2**-4], [0, 2**-1, 2**-3, 2**-5]
    sums = sorted({a + b for a in p0 for b in p1})
    assert len(sums) == 16
    assert torch.equal(tq.quantizers.apot_levels(4, k=2, signed=False), torch.tensor(sums) / 1.5)
    # signed 4 bits: a sign and 3 magnitude bits, p_0 in {0, 2^0, 2^-2, 2^-4}, p_1 in {0, 2^-1}
    mags = sorted({a + b for a in p0 for b in [0, 2**-1]})
    signed = [-m for m in reversed(mags[1:])] + mags
    assert torch.equal(tq.quantizers.apot_levels(4), torch.tensor(signed) / 1.5)
    # k = 1 is uniform: sums of distinct powers of two 1, 1/2, 1/4
    assert torch.equal(tq.quantizers.apot_levels(3, k=1, signed=False), torch.arange(8.0) / 7)
    with pytest.raises(ValueError, match=r"APoTQuantizer: n_bits must be in \[2, 9\], got 1"):
        tq.APoTQuantizer(1, BatchMinMax())
    with pytest.raises(ValueError, match=r"APoTQuantizer: k must be a positive int, got 0"):
        tq.APoTQuantizer(4, BatchMinMax(), k=0)


def test_apot_scales_its_levels_by_the_clipping_value():
    x = torch.randn(3, 40)
    q = observed(tq.APoTQuantizer(4, BatchMinMax(axis=0)), x)
    alpha = x.abs().amax(1, keepdim=True)
    table = tq.quantizers.apot_levels(4)
    assert torch.equal(q(x), table[_nearest_by_search(x / alpha, table)] * alpha)
    relu = observed(tq.APoTQuantizer(4, BatchMinMax(), signed=False), x.relu())
    assert relu.levels().levels.min() == 0 and torch.equal(relu.levels().scale, x.relu().max())


@pytest.mark.parametrize(
    "make",
    [lambda: tq.NF4Quantizer(BatchMinMax(axis=0)), lambda: tq.APoTQuantizer(3, BatchMinMax())],
    ids=["nf4", "apot"],
)
def test_level_quantizers_pass_the_gradient_straight_through(make):
    x = torch.randn(4, 16, requires_grad=True)
    q = observed(make(), x.detach())
    g = torch.randn(4, 16)
    q(x).backward(g)
    assert torch.equal(x.grad, g)


def test_levels_default_to_none_and_affine_quantizers_keep_grid():
    q = observed(AffineQuantizer(4, BatchMinMax()), torch.randn(10))
    assert q.levels() is None and q.grid() is not None
    nf4 = observed(tq.NF4Quantizer(BatchMinMax()), torch.randn(10))
    assert nf4.grid() is None and isinstance(nf4.levels(), tq.LevelGrid)
    with pytest.raises(RuntimeError, match="calibrate first"):
        tq.NF4Quantizer().levels()


def test_level_quantizers_are_described_by_the_spec():
    spec = tq.spec.describe(tq.APoTQuantizer(3, BatchMinMax(axis=0), k=1, signed=False))
    assert spec.to_dict() == {"quantizer": "apot", "observer": "batch_minmax",
                              "args": {"n_bits": 3, "k": 1, "signed": False}, "observer_args": {"axis": 0}}  # fmt: skip
    rebuilt = spec.build()
    assert torch.equal(rebuilt.codebook, tq.quantizers.apot_levels(3, k=1, signed=False))
    nf4 = tq.spec.describe(tq.NF4Quantizer(BatchMinMax(axis=1, group_size=32)))
    assert nf4.to_dict() == {
        "quantizer": "nf4",
        "observer": "batch_minmax",
        "observer_args": {"axis": 1, "group_size": 32},
    }
    assert nf4.build().granularity == tq.Granularity(axis=1, group_size=32)


def test_affine_per_group_ranges_of_another_rank_broadcast_as_before():
    """Ranges forced with fewer dimensions than the input (or observed on a smaller one) are repeated and broadcast."""
    q = AffineQuantizer(4, BatchMinMax(axis=-1, group_size=8))
    q.range_observer.force_ranges(-torch.ones(2), torch.ones(2) * 2)  # one range per group of a 16-wide last axis
    x = torch.randn(5, 16)
    delta, zero_point = q.qparams()
    assert torch.equal(q(x), q._on_grid(x, delta, zero_point))
    w = torch.randn(4, 16)
    q = observed(AffineQuantizer(4, BatchMinMax(axis=-1, group_size=8)), w)
    x = torch.randn(3, 4, 16)
    delta, zero_point = q.qparams()
    assert torch.equal(q(x), q._on_grid(x, delta, zero_point))


def test_minifloat_values_are_the_finite_values_of_the_format():
    for name, dtype in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        every = torch.arange(256, dtype=torch.uint8).view(dtype).float()
        assert torch.equal(tq.FORMATS[name].values(), every[every.isfinite()].unique())
    for name, count in (("fp6_e3m2", 63), ("fp6_e2m3", 63), ("fp4_e2m1", 15), ("int8", 255)):
        v = tq.FORMATS[name].values()
        assert v.numel() == count and torch.equal(tq.FORMATS[name].quantize(v), v)  # each a value of its own
    assert torch.equal(tq.FORMATS["int8"].values(), torch.arange(-127, 128) / 64)  # MX's INT8 element


def test_float_grid_checks_and_block_scales():
    x = torch.randn(6, 70) * 4
    mx = tq.MXQuantizer("fp4_e2m1", block_size=32, axis=1).float_grid()
    assert mx.blocked and mx.block_scales(x).shape == (6, 3)  # ceil(70 / 32) blocks, the last one of 6
    assert torch.equal(mx.quantize(x), tq.MXQuantizer("fp4_e2m1", block_size=32, axis=1)(x))
    with pytest.raises(ValueError, match=r"MX blocks along axis 1 do not fit a tensor of shape \(70,\)"):
        mx.check((70,))
    scaled = tq.FloatGrid(tq.FORMATS["fp8_e4m3"], torch.ones(6, 1), tq.per_channel(0))
    scaled.check(x.shape)
    with pytest.raises(ValueError, match=r"q: float_grid\(\) does not fit"):
        scaled.check((5, 70), "q")
    with pytest.raises(ValueError, match="block_scales\\(\\) needs MX blocks"):
        scaled.block_scales(x)


def test_float_grid_elements_are_computed_as_the_simulation_does_for_half_precision():
    torch.manual_seed(0)
    q = tq.MinifloatQuantizer("fp4_e2m1", tq.RunningMinMax())
    x = torch.randn(64, 64, dtype=torch.bfloat16) * 3
    q.pre_observe(x)
    fg = q.float_grid()
    elements = fg.elements(x)
    assert elements.dtype == torch.float32  # divided in float32: in bfloat16, 127 of 4096 rounded otherwise
    assert torch.equal((elements * fg.scale).to(torch.bfloat16), q(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_grid_codes_of_half_precision_tensors_are_the_simulation_s(dtype):
    # to_int/codes divide in float32 as the quantizers do: in half precision, x / scale rounds to other codes.
    torch.manual_seed(0)
    w = torch.randn(64, 128).to(dtype)
    affine = tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)
    nf4 = tq.NF4Quantizer(tq.BatchMinMax(axis=0))
    affine.pre_observe(w)
    nf4.pre_observe(w)
    affine.to(dtype), nf4.to(dtype)  # half-precision range state, as in a model cast after calibration
    with torch.no_grad():
        out, out_nf4 = affine(w), nf4(w)
    grid, levels = affine.grid(), nf4.levels()
    assert grid.scale.dtype == dtype
    codes = grid.to_int(w)
    expected = torch.round(w.float() / grid.scale.float()) + grid.zero_point.float()
    assert torch.equal(codes, expected.clamp(0, 255).long())
    assert torch.equal(grid.from_int(codes).to(dtype), out)
    assert grid.from_int(codes).dtype == torch.float32  # 255 codes times a half-precision scale
    assert torch.equal(levels.quantize(w), out_nf4) and levels.quantize(w).dtype == dtype
