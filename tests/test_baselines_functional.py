"""Primitives of the research baselines: bit-exact forwards and exact STE gradients."""

import math

import pytest
import torch

from torchquant import FORMATS, MinifloatFormat
from torchquant.quantizers_functional import (
    e8m0_block_scale,
    lsq_quantize,
    minifloat_round,
    mx_quantize,
    pact_quantize,
    scaled_sign,
    sign_ste,
    straight_through,
)


def all_values(fmt: MinifloatFormat) -> list[tuple[float, int]]:
    """Every finite non-negative value of ``fmt`` with its mantissa code, decoded from the bit definition."""
    out = []
    for e in range(2**fmt.exp_bits):
        for m in range(2**fmt.man_bits):
            if e == 0:
                v = m / 2**fmt.man_bits * 2.0 ** (1 - fmt.bias)
            else:
                v = (1 + m / 2**fmt.man_bits) * 2.0 ** (e - fmt.bias)
            top = e == 2**fmt.exp_bits - 1
            if fmt.special == "ieee" and top:
                continue  # inf / nan
            if fmt.special == "nan_only" and top and m == 2**fmt.man_bits - 1:
                continue  # nan
            out.append((v, m))
    return out


def nearest_even(x: float, table: list[tuple[float, int]]) -> float:
    """Round-to-nearest, ties to the even mantissa code, saturating; by brute force."""
    a = min(abs(x), max(v for v, _ in table))
    best = min(table, key=lambda vm: (abs(vm[0] - a), vm[1] % 2))
    return math.copysign(best[0], x)


def fmt_round(x, fmt):
    return minifloat_round(x, fmt.man_bits, fmt.bias, fmt.max_value)


@pytest.mark.parametrize(
    "name, max_value",
    [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0), ("fp6_e3m2", 28.0), ("fp6_e2m3", 7.5), ("fp4_e2m1", 6.0)],
)
def test_format_max_values_from_the_specs(name, max_value):
    fmt = FORMATS[name]
    assert fmt.max_value == max_value == max(v for v, _ in all_values(fmt))
    # emax_elem of the OCP MX spec: exponent of the largest normal
    assert fmt.emax == {"fp8_e4m3": 8, "fp8_e5m2": 15, "fp6_e3m2": 4, "fp6_e2m3": 2, "fp4_e2m1": 2}[name]


def test_fp4_e2m1_value_set():
    assert sorted(v for v, _ in all_values(FORMATS["fp4_e2m1"])) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("name", ["fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8"])
def test_small_formats_round_to_nearest_even_by_brute_force(name):
    fmt = FORMATS[name]
    table = all_values(fmt)
    vals = torch.tensor(sorted({v for v, _ in table}))
    mids = (vals[1:] + vals[:-1]) / 2  # exact ties
    x = torch.cat([vals, -vals, mids, -mids, torch.randn(2000) * fmt.max_value / 2, torch.tensor([1e3, -1e3])])
    ref = torch.tensor([nearest_even(v, table) for v in x.tolist()])
    assert torch.equal(fmt_round(x, fmt), ref)


def test_int8_element_is_symmetric_int8_with_scale_2_pow_minus_6():
    x = torch.linspace(-2.5, 2.5, 4001)
    ref = torch.clamp(torch.round(x * 64), -127, 127) / 64
    assert torch.equal(fmt_round(x, FORMATS["int8"]), ref)


@pytest.mark.parametrize("name, dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_bit_exact_against_torch_casts(name, dtype):
    fmt = FORMATS[name]
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    vals = codes[torch.isfinite(codes)].unique()
    pos = vals[vals >= 0]
    mids = (pos[1:] + pos[:-1]) / 2  # ties: round half to even
    g = torch.Generator().manual_seed(0)
    # log-uniform magnitudes over the whole range, subnormals included
    mags = torch.exp2(torch.empty(20000).uniform_(math.log2(fmt.max_value) - 30, math.log2(fmt.max_value), generator=g))
    signs = torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0)
    x = torch.cat([vals, mids, -mids, mags * signs, torch.zeros(1)])
    assert x.abs().max() <= fmt.max_value
    assert torch.equal(fmt_round(x, fmt), x.to(dtype).float())
    # idempotent on the format's own values
    assert torch.equal(fmt_round(vals, fmt), vals)


def test_minifloat_saturates_and_keeps_nan():
    fmt = FORMATS["fp8_e4m3"]
    x = torch.tensor([464.0, 1e6, -1e30, float("inf"), float("nan")])
    y = fmt_round(x, fmt)
    assert y[:4].tolist() == [448.0, 448.0, -448.0, 448.0] and torch.isnan(y[4])


def test_minifloat_generic_format_with_custom_bias():
    fmt = MinifloatFormat(3, 1, bias=1, special="ieee")  # emax = 6 - 1 = 5, max = 1.5 * 32
    assert fmt.emax == 5 and fmt.max_value == 48.0
    table = all_values(fmt)
    x = torch.linspace(-60, 60, 961)
    assert torch.equal(fmt_round(x, fmt), torch.tensor([nearest_even(v, table) for v in x.tolist()]))


def test_minifloat_e8m7_is_bfloat16():
    # the widest exponent float32 simulates: subnormals, the largest finite value and ties
    fmt = MinifloatFormat(8, 7, special="ieee")
    x = torch.cat([torch.randn(4096) * 10.0 ** torch.randint(-40, 39, (4096,)), torch.tensor([3.3e38, 1e-40])])
    x = x[x.isfinite() & (x.abs() <= fmt.max_value)]
    assert torch.equal(fmt_round(x, fmt), x.bfloat16().float())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(exp_bits=0, man_bits=2),
        dict(exp_bits=4, man_bits=-1),
        dict(exp_bits=1, man_bits=2, special="ieee"),
        dict(exp_bits=4, man_bits=0, special="nan_only"),
        dict(exp_bits=4, man_bits=3, special="fnuz"),
        dict(exp_bits=8, man_bits=3),
        dict(exp_bits=8, man_bits=1, special="nan_only"),
        dict(exp_bits=5, man_bits=2, bias=200),
        dict(exp_bits=4, man_bits=3, bias=2.5),
    ],
    ids=[
        "no-exponent",
        "negative-mantissa",
        "ieee-1-bit-exponent",
        "nan-only-no-mantissa",
        "unknown-special",
        "above-float32",
        "nan-only-above-float32",
        "below-float32",
        "float-bias",
    ],
)
def test_bad_formats_raise(kwargs):
    with pytest.raises(ValueError, match="MinifloatFormat"):
        MinifloatFormat(**kwargs)


# ----------------------------------------------------------------------------- MX


def test_e8m0_scale_by_hand():
    amax = torch.tensor([5.0, 4.0, 0.7, 0.0, 1e38])
    # floor(log2) = 2, 2, -1, (zero block), 126; minus emax 8 (E4M3)
    assert e8m0_block_scale(amax, 8).tolist() == [2.0**-6, 2.0**-6, 2.0**-9, 2.0**-127, 2.0**118]
    assert e8m0_block_scale(torch.tensor([1e38]), -10).item() == 2.0**127  # clamped to the E8M0 range
    # OCP MX v1.0: a block whose maximum is infinite or NaN gets the NaN scale
    assert e8m0_block_scale(torch.tensor([float("inf"), float("nan"), 3.0]), 8).isnan().tolist() == [True, True, False]


@pytest.mark.parametrize("special", [float("inf"), -float("inf"), float("nan")])
def test_an_mx_block_with_an_infinity_or_nan_decodes_as_nan_and_leaves_the_others(special):
    f = FORMATS["fp4_e2m1"]
    args = (f.man_bits, f.bias, f.max_value, f.emax)
    x = torch.randn(3, 64)
    x[1, 40] = special
    y = mx_quantize(x, *args)
    assert y[1, 32:].isnan().all() and not y[1, :32].isnan().any()  # only the block holding it
    clean = x.clone()
    clean[1, 40] = 0.0
    expected = mx_quantize(clean, *args)
    assert torch.equal(y[1, :32], expected[1, :32]) and torch.equal(y[[0, 2]], expected[[0, 2]])


def mx_ref(x, elem_dtype_round, emax, block=32):
    """Per-block reference along the last axis: X from amax by hand, elements via ``elem_dtype_round``."""
    out = torch.empty_like(x)
    for idx in range(x.shape[0]):
        for start in range(0, x.shape[1], block):
            b = x[idx, start : start + block]
            amax = b.abs().max().item()
            X = 2.0 ** (math.floor(math.log2(amax)) - emax) if amax > 0 else 2.0**-127
            out[idx, start : start + block] = elem_dtype_round(b / X) * X
    return out


def test_mxfp8_e4m3_against_torch_cast_per_block():
    x = torch.randn(4, 96) * torch.logspace(-3, 3, 4).unsqueeze(1)
    f = FORMATS["fp8_e4m3"]
    y = mx_quantize(x, f.man_bits, f.bias, f.max_value, f.emax)
    # Saturate before torch's cast: torch 2.14 saturates beyond 448, torch 2.11 gives NaN.
    ref = mx_ref(x, lambda v: v.clamp(-448, 448).to(torch.float8_e4m3fn).float(), 8)
    assert torch.equal(y, ref)


def test_mxint8_by_hand_and_saturation():
    # amax 7.9 -> X = 2**2; 7.9 / 4 = 1.975 -> round(126.4) = 126 / 64
    x = torch.zeros(32)
    x[0], x[1], x[2] = 7.9, -3.0, 0.01
    f = FORMATS["int8"]
    y = mx_quantize(x, f.man_bits, f.bias, f.max_value, f.emax)
    assert y[:3].tolist() == [126 / 64 * 4, -3.0, 0.0] and torch.equal(y[3:], torch.zeros(29))
    # E4M3 elements: 7.9 / 2**(2-8) = 505.6 rounds to 512 > 448 -> saturates to 448 * 2**-6 = 7
    e = FORMATS["fp8_e4m3"]
    y8 = mx_quantize(x, e.man_bits, e.bias, e.max_value, e.emax)
    assert y8[0].item() == 7.0


def test_mx_blocks_along_an_axis_with_padding():
    x = torch.randn(40, 3)
    f = FORMATS["fp4_e2m1"]
    args = (f.man_bits, f.bias, f.max_value, f.emax)
    y = mx_quantize(x, *args, block_size=32, axis=0)
    assert torch.equal(y[:32], mx_quantize(x[:32], *args, axis=0))
    assert torch.equal(y[32:], mx_quantize(x[32:], *args, axis=0))  # the short last block on its own
    assert torch.equal(y, mx_quantize(x.t().contiguous(), *args, axis=-1).t())


def test_mx_gradient_is_straight_through():
    x = torch.randn(2, 64, requires_grad=True)
    f = FORMATS["fp4_e2m1"]
    g = torch.randn(2, 64)
    mx_quantize(x, f.man_bits, f.bias, f.max_value, f.emax).backward(g)
    assert torch.equal(x.grad, g)


# ----------------------------------------------------------------------------- STE functions


def test_sign_ste_forward_and_clipped_gradient():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    y = sign_ste(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    y.backward(torch.full((7,), 3.0))
    assert x.grad.tolist() == [0, 3, 3, 3, 3, 3, 0]


def test_scaled_sign_xnor_gradient():
    x = torch.tensor([[0.5, -2.0, 0.1, 0.0]], requires_grad=True)
    alpha = torch.tensor([[0.65]])
    y = scaled_sign(x, alpha, 4)
    assert torch.equal(y, torch.tensor([[0.65, -0.65, 0.65, 0.65]]))
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    y.backward(g)
    inside = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    assert torch.equal(x.grad, g * (1 / 4 + 0.65 * inside))


def test_pact_forward_and_gradients():
    x = torch.tensor([-1.0, 0.0, 0.5, 1.2, 2.0, 3.0], requires_grad=True)
    alpha = torch.tensor(2.0, requires_grad=True)
    y = pact_quantize(x, alpha, 4)  # step 2/3
    assert torch.equal(y.detach(), torch.round(torch.clamp(x.detach(), 0, 2) * 1.5) / 1.5)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y.backward(g)
    assert x.grad.tolist() == [0, 2, 3, 4, 0, 0]
    assert alpha.grad.item() == 5.0 + 6.0  # d y_q / d alpha = 1 where x >= alpha


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pact_gradients_of_half_inputs_agree_with_the_forward_at_alpha(dtype):
    # x just below a float32 alpha that rounds to x in x's dtype: unclipped in forward (compared in float32);
    # the backward compared in x's dtype had rounded alpha to x and called it clipped
    x = torch.tensor([0.1, 0.05], dtype=dtype).requires_grad_()
    alpha = (x[0].detach().float() + 1e-6).requires_grad_()
    assert alpha.to(dtype) == x[0]
    y = pact_quantize(x, alpha, 16)
    assert y[0].item() == x[0].item() < alpha.item()  # forward: not clipped
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0] and alpha.grad.item() == 0.0


def test_pact_per_channel_alpha_gradient_sums_per_channel():
    x = torch.tensor([[[1.0, 5.0]], [[3.0, 4.0]]]).reshape(1, 2, 2)  # (N=1, C=2, L=2)
    alpha = torch.tensor([[[2.0], [3.5]]], requires_grad=True)  # (1, 2, 1)
    pact_quantize(x, alpha, 16).backward(torch.tensor([[[1.0, 2.0], [4.0, 8.0]]]))
    assert alpha.grad.flatten().tolist() == [2.0, 8.0]


def test_lsq_gradients_by_hand():
    x = torch.tensor([0.3, -1.2, 0.9, 0.1], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = lsq_quantize(x, s, None, 2, 1, grad_scale=0.5)  # signed 2 bits: levels -2..1
    # v = x / s = [0.6, -2.4, 1.8, 0.2] -> [1, -2, 1, 0]
    assert y.tolist() == [0.5, -1.0, 0.5, 0.0]
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert x.grad.tolist() == [1, 0, 0, 4]
    # d/ds: round(v) - v inside, -Q_N below, Q_P above, times g
    expected = 0.5 * (1 * (1 - 0.6) + 2 * -2 + 3 * 1 + 4 * (0 - 0.2))
    assert s.grad.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("offset", [None, 0.0], ids=["lsq", "lsq+"])
def test_lsq_gradients_at_the_ends_of_the_range_are_the_clipped_ones(offset):
    # eq. 3 of Esser et al.: v <= -Q_N gives -Q_N and v >= Q_P gives Q_P, and x no gradient there
    x = torch.tensor([-1.0, 0.5, -0.25], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    b = None if offset is None else torch.tensor(offset, requires_grad=True)
    lsq_quantize(x, s, b, 2, 1).backward(torch.tensor([1.0, 2.0, 4.0]))  # v = [-2, 1, -0.5]: both ends
    assert x.grad.tolist() == [0.0, 0.0, 4.0]
    assert s.grad.item() == 1 * -2 + 2 * 1 + 4 * (-0.0 - -0.5)  # round(-0.5) = -0 (half to even)
    if b is not None:
        assert b.grad.item() == 1.0 + 2.0


def test_lsq_gradients_equal_autograd_of_the_papers_forward():
    x = torch.randn(4, 50, requires_grad=True)
    s = torch.tensor([[0.3], [0.2], [0.5], [0.1]], requires_grad=True)
    g = torch.randn(4, 50)
    lsq_quantize(x, s, None, 8, 7, grad_scale=0.1).backward(g)
    gx, gs = x.grad.clone(), s.grad.clone()
    x.grad = s.grad = None
    # eq. 1 of Esser et al. with round -> identity in backward and the gradient-scale trick of their appendix
    s_scaled = (s - s * 0.1).detach() + s * 0.1
    v = torch.clamp(x / s_scaled, -8, 7)
    ((v.round() - v).detach() + v).mul(s_scaled).backward(g)
    assert torch.allclose(gx, x.grad, rtol=1e-6, atol=0)  # autograd's g / s * s vs our exact g
    assert torch.equal(gx == 0, x.grad == 0)
    assert torch.allclose(gs, s.grad, rtol=1e-5, atol=1e-6)


def test_lsq_plus_offset_gradient():
    x = torch.tensor([-1.0, 0.2, 0.7, 5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    b = torch.tensor(-0.25, requires_grad=True)
    y = lsq_quantize(x, s, b, 0, 3, grad_scale=1.0)  # unsigned 2 bits, levels 0..3
    # v = (x + 0.25) / 0.5 = [-1.5, 0.9, 1.9, 10.5] -> [0, 1, 2, 3]
    assert y.tolist() == [-0.25, 0.25, 0.75, 1.25]
    y.backward(torch.tensor([1.0, 2.0, 4.0, 8.0]))
    assert b.grad.item() == 1.0 + 8.0  # clipped elements only
    assert x.grad.tolist() == [0, 2, 4, 0]
    assert s.grad.item() == pytest.approx(1 * 0 + 2 * (1 - 0.9) + 4 * (2 - 1.9) + 8 * 3, rel=1e-6)


def test_straight_through_value_is_exact():
    x = torch.randn(100, requires_grad=True)
    q = torch.round(x.detach() * 7) / 7
    y = straight_through(x, q)
    assert torch.equal(y, q)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(100))
