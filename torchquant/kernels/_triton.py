"""Triton kernels behind :mod:`torchquant.kernels` (imported on first use: Triton is optional).

Every kernel computes in float32 and reproduces the CPU path's arithmetic operation by
operation: true division by the step (``div_rn``), round half to even, clamping to integer
bounds before rounding (exact, since the bounds are integers), then one multiplication.
The module is also loaded a second time with ``TRITON_INTERPRET=1`` (see
:func:`torchquant.kernels.interpreted`) so that the same kernel source runs on CPU tensors
through Triton's interpreter, which is how CI checks the kernels bit for bit without a GPU.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024
_OBS_BLOCK = 1024

# Granularity layouts of the compact parameter tensors, see Layout (RUNS: Layout.runs).
PER_TENSOR, INDEXED, RUNS = 0, 1, 2
# What the parameter pointers hold (see _params).
MODE_GRID, MODE_BOUNDS, MODE_RANGES, MODE_QFMT = 0, 1, 2, 3


# fmt: off
@triton.jit
def _round_half_even(v):
    # rint by the 2**23 shifter: below 2**23 a float32's ulp is at most 1/2, and |v| + 2**23 lies
    # in [2**23, 2**24), where the ulp is 1, so the addition rounds |v| half to even (2**23 is
    # even) and the subtraction is exact; from 2**23 on (and Inf, NaN) v is its own rounding.
    # v's sign bit goes back on, so that -0.3 gives -0.0 as torch.round does. Five SASS instructions
    # where a floor-based rint takes thirteen; IEEE additions give the interpreter the same bits.
    a = tl.abs(v)
    r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _next_power_of_two(d):
    # d > 0 and normal: a power of two has an all-zero mantissa; otherwise the next one is
    # the exponent plus one with a zero mantissa (torch.frexp / ldexp in the CPU path).
    bits = d.to(tl.int32, bitcast=True)
    up = (((bits >> 23) + 1) << 23).to(tl.float32, bitcast=True)
    return tl.where((bits & 0x7FFFFF) == 0, d, up)


@triton.jit
def _qparams(mn, mx, nlm1, fixed_zp, SYMMETRIC: tl.constexpr, POW2: tl.constexpr, FIXED_ZP: tl.constexpr):
    # AffineQuantizer.qparams, operation by operation.
    mn = tl.minimum(mn, 0.0)
    mx = tl.maximum(mx, 0.0)
    if SYMMETRIC:
        mx = tl.maximum(-mn, mx)
        mn = -mx
    # halved first, as the CPU path: the same bits, finite for a range wider than float32 holds
    delta = tl.math.div_rn(mx * 0.5 - mn * 0.5, nlm1 * 0.5)
    delta = tl.maximum(delta, 1.1920928955078125e-07)  # float32 eps
    if POW2:
        delta = _next_power_of_two(delta)
    if FIXED_ZP:  # noqa: SIM108 (a constexpr branch: the other side is not compiled)
        zp = delta * 0.0 + fixed_zp  # delta is finite: a zero of its shape
    else:
        zp = _round_half_even(tl.math.div_rn(-mn, delta))
    return delta, zp


@triton.jit
def _load(ptrs, mask, BF16: tl.constexpr):
    # float32 values; bfloat16 comes through an int16 view and is widened on the bits (exact,
    # subnormals included, where Triton's interpreter converts them wrongly).
    if BF16:
        bits = tl.load(ptrs, mask=mask, other=0)
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptrs, out, mask, BF16: tl.constexpr):
    # float32 -> bfloat16 rounds half to even on the bits (Triton's interpreter truncates),
    # stored through an int16 view of the output; NaN stays NaN.
    if BF16:
        bits = out.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(out != out, 0x7FC0, bits)
        tl.store(ptrs, bits.to(tl.int16), mask=mask)
    else:
        tl.store(ptrs, out.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _param_index(offs, C, INNER, G, RO, RC, RI):
    # The element at flat offset e of a contiguous (outer, C, inner) tensor uses parameter
    # o * RO + (c // G) * RC + i * RI of the compact tensor (see Layout).
    i = offs % INNER
    t = offs // INNER
    c = t % C
    o = t // C
    return o * RO + (c // G) * RC + i * RI


@triton.jit
def _tile(n, INNER, GRAN: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # This program's elements: (offsets, their mask, what _params / _param_pair index their parameters by, its
    # mask). With RUNS, ROWS runs of INNER elements by BLOCK of their columns, indexed by run (run r reads
    # parameter r % C): a parameter and a grid per run, not an index and a grid per element; otherwise BLOCK
    # consecutive elements, indexed by offset.
    if GRAN == 2:
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
        row_ok = rows < n // INNER
        return rows * INNER + cols, row_ok & (cols < INNER), rows, row_ok
    else:
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        return offs, mask, offs, mask


@triton.jit
def _params(offs, mask, a_ptr, b_ptr, lo, hi, nlm1, fixed_zp, C, INNER, G, RO, RC, RI,
            MODE: tl.constexpr, GRAN: tl.constexpr, SYMMETRIC: tl.constexpr, POW2: tl.constexpr,
            FIXED_ZP: tl.constexpr):
    # (step, lowest code, highest code) for the elements at offs; with RUNS, offs are run indices.
    if GRAN == 0:
        a = tl.load(a_ptr).to(tl.float32)
        if MODE != 1:
            b = tl.load(b_ptr).to(tl.float32)
    else:
        if GRAN == 2:  # noqa: SIM108 (a constexpr branch: the other side is not compiled)
            p = offs % C
        else:
            p = _param_index(offs, C, INNER, G, RO, RC, RI)
        a = tl.load(a_ptr + p, mask=mask, other=1.0).to(tl.float32)
        if MODE != 1:
            b = tl.load(b_ptr + p, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:  # a: step, b: zero point; codes in [lo - zp, hi - zp]
        delta = a
        lo_c = -(b - lo)  # -zp for lo = 0, zero's sign included, as the torch path's bound
        hi_c = hi - b
    elif MODE == 1:  # a: step; codes in [lo, hi]
        delta = a
        lo_c = a * 0.0 + lo
        hi_c = a * 0.0 + hi
    elif MODE == 2:  # a: range min, b: range max; the affine grid on levels 0 .. nlm1
        delta, zp = _qparams(a, b, nlm1, fixed_zp, SYMMETRIC, POW2, FIXED_ZP)
        lo_c = -zp
        hi_c = nlm1 - zp
    else:  # a: range min, b: range max; the Q-format step of width nlm1 (n_bits - signed), codes in [lo, hi]
        delta = _qfmt_step(a, b, nlm1)
        lo_c = a * 0.0 + lo
        hi_c = a * 0.0 + hi
    return delta, lo_c, hi_c


@triton.jit
def _qfmt_step(mn, mx, width):
    # qfmt_step: 2 ** (int_bits - width), int_bits = floor(log2(max(|mn|, |mx|, eps))) + 1, exactly.
    amax = tl.maximum(tl.maximum(tl.abs(mn), tl.abs(mx)), 1.1920928955078125e-07)  # float32 eps
    return _pow2(_floor_log2(amax) + 1.0 - width)


@triton.jit
def _fake_quant_kernel(x_ptr, m_ptr, out_ptr, n, a_ptr, b_ptr, lo, hi, nlm1, fixed_zp, C, INNER, G, RO, RC, RI,
                       MODE: tl.constexpr, GRAN: tl.constexpr, SYMMETRIC: tl.constexpr, POW2: tl.constexpr,
                       FIXED_ZP: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr, MASK: tl.constexpr,
                       ROWS: tl.constexpr):
    offs, mask, p, p_mask = _tile(n, INNER, GRAN, ROWS, BLOCK)
    delta, lo_c, hi_c = _params(p, p_mask, a_ptr, b_ptr, lo, hi, nlm1, fixed_zp, C, INNER, G, RO, RC, RI,
                                MODE, GRAN, SYMMETRIC, POW2, FIXED_ZP)
    x = _load(x_ptr + offs, mask, BF16)
    v = tl.math.div_rn(x.to(tl.float32), delta)
    v = tl.where(v < lo_c, lo_c, v)  # comparisons keep NaN, as torch.clamp does
    v = tl.where(v > hi_c, hi_c, v)
    out = _round_half_even(v) * delta
    _store(out_ptr + offs, out, mask, BF16)
    if MASK:
        # The clipped STE's mask, lo_code * step <= x <= hi_code * step, a bit per element: element e is bit
        # e % 8 of byte e // 8 (BLOCK, and with RUNS the run length, is a multiple of 8, so a program writes
        # whole bytes of its own).
        inside = ((x >= lo_c * delta) & (x <= hi_c * delta)).to(tl.int32)
        if GRAN == 2:
            packed = tl.reduce(tl.reshape(inside, (ROWS, BLOCK // 8, 8)) * (1 << tl.arange(0, 8))[None, None, :],
                               2, _add)
            bcols = tl.program_id(1) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)[None, :]  # p: the tile's runs
            tl.store(m_ptr + p * (INNER // 8) + bcols, packed.to(tl.uint8), mask=p_mask & (bcols * 8 < INNER))
        else:
            packed = tl.reduce(tl.reshape(inside, (BLOCK // 8, 8)) * (1 << tl.arange(0, 8))[None, :], 1, _add)
            boffs = tl.program_id(0) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
            tl.store(m_ptr + boffs, packed.to(tl.uint8), mask=boffs * 8 < n)  # n + 7 could overflow int32


@triton.jit
def _masked_grad_kernel(g_ptr, m_ptr, out_ptr, n, BF16: tl.constexpr, BLOCK: tl.constexpr):
    # The clipped STE's backward from the packed mask of _fake_quant_kernel: the gradient where the bit is set.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = _load(g_ptr + offs, mask, BF16)
    bit = (tl.load(m_ptr + offs // 8, mask=mask, other=0).to(tl.int32) >> (offs % 8)) & 1
    _store(out_ptr + offs, g * bit.to(tl.float32), mask, BF16)  # grad * mask: -0.0 and NaN as in torch


@triton.jit
def _add(a, b):
    # tl.sum is a library function of one Triton flavour; a combine function of ours serves both.
    return a + b


@triton.jit
def _observe_kernel(bmin_ptr, bmax_ptr, min_ptr, max_ptr, ema_min_ptr, ema_max_ptr, nb_ptr, decay_ptr, bad_ptr,
                    R, momentum, one_minus_m, KIND: tl.constexpr, BLOCK: tl.constexpr):
    # One program: a batch with NaN or Inf anywhere leaves the state untouched and is counted
    # in bad_ptr, so the check needs no host synchronisation (the host reads the count later).
    # While loops over R, not range(0, R, BLOCK): Triton 3.6's interpreter takes a range's runtime bound as an
    # int of a one-element array, which NumPy 2.4 refuses; a comparison's truth value works in every version.
    nonfinite = tl.full((BLOCK,), 0, tl.int32)
    start = 0
    while start < R:
        offs = start + tl.arange(0, BLOCK)
        m = offs < R
        bmn = tl.load(bmin_ptr + offs, mask=m, other=0.0).to(tl.float32)
        bmx = tl.load(bmax_ptr + offs, mask=m, other=0.0).to(tl.float32)
        # x - x is 0 for finite x and NaN for NaN and +-inf.
        nonfinite += ((bmn - bmn) != 0.0).to(tl.int32) + ((bmx - bmx) != 0.0).to(tl.int32)
        start += BLOCK
    if tl.reduce(nonfinite, 0, _add) > 0:
        tl.store(bad_ptr, tl.load(bad_ptr) + 1)
    else:
        nb = tl.load(nb_ptr)
        correction = _next_decay(decay_ptr, momentum, KIND)
        start = 0
        while start < R:
            offs = start + tl.arange(0, BLOCK)
            m = offs < R
            bmn = tl.load(bmin_ptr + offs, mask=m, other=0.0).to(tl.float32)
            bmx = tl.load(bmax_ptr + offs, mask=m, other=0.0).to(tl.float32)
            _fold_batch(bmn, bmx, offs, m, min_ptr, max_ptr, ema_min_ptr, ema_max_ptr, nb, momentum, one_minus_m,
                        correction, KIND)
            start += BLOCK
        if KIND != 0:
            tl.store(nb_ptr, nb + 1)


@triton.jit
def _next_decay(decay_ptr, momentum, KIND: tl.constexpr):
    # ExpAvgMinMax (KIND 2): decay *= momentum, stored; returns the bias correction 1 - decay (else 1).
    correction = momentum * 0.0 + 1.0  # a float32 scalar, as the other branch's
    if KIND == 2:
        decay = tl.load(decay_ptr) * momentum
        tl.store(decay_ptr, decay)
        correction = 1.0 - decay
    return correction


@triton.jit
def _fold_batch(bmn, bmx, offs, m, min_ptr, max_ptr, ema_min_ptr, ema_max_ptr, nb, momentum, one_minus_m,
                correction, KIND: tl.constexpr):
    # The state at offs (mask m) after the batch ranges (bmn, bmx): BatchMinMax (KIND 0), RunningMinMax (1),
    # ExpAvgMinMax (2), as their _update.
    if KIND == 0:
        new_mn = bmn
        new_mx = bmx
    elif KIND == 1:
        old_mn = tl.load(min_ptr + offs, mask=m, other=0.0)
        old_mx = tl.load(max_ptr + offs, mask=m, other=0.0)
        new_mn = tl.where(nb == 0, bmn, tl.minimum(old_mn, bmn))
        new_mx = tl.where(nb == 0, bmx, tl.maximum(old_mx, bmx))
    else:
        # Two products and a sum, each rounded (launched without FMA contraction), as on the CPU.
        e_mn = tl.load(ema_min_ptr + offs, mask=m, other=0.0) * momentum + bmn * one_minus_m
        e_mx = tl.load(ema_max_ptr + offs, mask=m, other=0.0) * momentum + bmx * one_minus_m
        tl.store(ema_min_ptr + offs, e_mn, mask=m)
        tl.store(ema_max_ptr + offs, e_mx, mask=m)
        new_mn = tl.math.div_rn(e_mn, correction)
        new_mx = tl.math.div_rn(e_mx, correction)
    tl.store(min_ptr + offs, new_mn, mask=m)
    tl.store(max_ptr + offs, new_mx, mask=m)


@triton.jit
def _order_key(v):
    # The int32 whose order is v's (float32, not NaN; -0.0 below +0.0): batch ranges are reduced across
    # programs with integer atomics, which every Triton flavour has and which order zeros deterministically.
    b = v.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def _from_order_key(k):
    return tl.where(k < 0, k ^ 0x7FFFFFFF, k).to(tl.float32, bitcast=True)


@triton.jit
def _observe_rows_kernel(x_ptr, L, scratch_ptr, min_ptr, max_ptr, ema_min_ptr, ema_max_ptr, nb_ptr, decay_ptr,
                         bad_ptr, C, momentum, one_minus_m, KIND: tl.constexpr, BF16: tl.constexpr,
                         BLOCK: tl.constexpr, OBS_BLOCK: tl.constexpr):
    # The batch ranges of x as C rows of L (per channel along a contiguous tensor's first axis, per group along
    # its last; per tensor C = 1) folded into the state, in one launch. Program (c, j) reduces every
    # num_programs(1)-th block of row c and merges its (min, max) into the scratch (int32: C minimum keys, C maximum
    # keys, the non-finite count, a ticket); the program that takes the last ticket reads the batch ranges, updates
    # the state as _observe_kernel does, and resets the scratch for the next launch.
    c = tl.program_id(0)
    stride = tl.num_programs(1) * BLOCK
    row = x_ptr + c.to(tl.int64) * L
    lo = tl.full((BLOCK,), 2147483647, tl.int32)
    hi = tl.full((BLOCK,), -2147483648, tl.int32)
    nonfinite = tl.full((BLOCK,), 0, tl.int32)
    start = tl.program_id(1) * BLOCK
    while start < L:
        offs = start + tl.arange(0, BLOCK)
        m = offs < L
        x = _load(row + offs, m, BF16)  # masked lanes 0.0: finite
        finite = (x - x) == 0.0  # 0 for finite x, NaN for NaN and +-inf
        key = _order_key(x)
        lo = tl.minimum(lo, tl.where(m & finite, key, 2147483647))
        hi = tl.maximum(hi, tl.where(m & finite, key, -2147483648))
        nonfinite += (~finite).to(tl.int32)
        start += stride
    tl.atomic_min(scratch_ptr + c, tl.reduce(lo, 0, _min))
    tl.atomic_max(scratch_ptr + C + c, tl.reduce(hi, 0, _max))
    bad = tl.reduce(nonfinite, 0, _add)
    if bad > 0:  # one address for every program: merged only where there is something to count
        tl.atomic_add(scratch_ptr + 2 * C, bad)
    # acq_rel: every program's merges above happen before its ticket, and the last ticket's reads after them
    ticket = tl.atomic_add(scratch_ptr + 2 * C + 1, 1)
    if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
        bad = tl.atomic_xchg(scratch_ptr + 2 * C, 0)
        tl.atomic_xchg(scratch_ptr + 2 * C + 1, 0)
        nb = tl.load(nb_ptr)
        correction = momentum * 0.0 + 1.0
        if bad == 0:
            correction = _next_decay(decay_ptr, momentum, KIND)
        start = 0
        while start < C:
            offs = start + tl.arange(0, OBS_BLOCK)
            m = offs < C
            bmn = _from_order_key(tl.atomic_xchg(scratch_ptr + offs, 2147483647, mask=m))
            bmx = _from_order_key(tl.atomic_xchg(scratch_ptr + C + offs, -2147483648, mask=m))
            if bad == 0:
                _fold_batch(bmn, bmx, offs, m, min_ptr, max_ptr, ema_min_ptr, ema_max_ptr, nb, momentum,
                            one_minus_m, correction, KIND)
            start += OBS_BLOCK
        if bad == 0:
            if KIND != 0:
                tl.store(nb_ptr, nb + 1)
        else:
            tl.store(bad_ptr, tl.load(bad_ptr) + 1)


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _lsq_fwd_kernel(x_ptr, out_ptr, s_ptr, b_ptr, n, qn, qp, C, INNER, G, RO, RC, RI,
                    GRAN: tl.constexpr, OFFSET: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr,
                    ROWS: tl.constexpr):
    # clamp(round((x - b) / s), -qn, qp) * s + b, each operation rounded (no FMA), as on the CPU.
    offs, mask, p, p_mask = _tile(n, INNER, GRAN, ROWS, BLOCK)
    x = _load(x_ptr + offs, mask, BF16)
    s, b = _param_pair(p, p_mask, s_ptr, b_ptr, C, INNER, G, RO, RC, RI, GRAN, OFFSET)
    v = tl.math.div_rn(x - b, s)  # b is +0.0 without an offset: x - 0.0 == x
    q = _round_half_even(v)
    q = tl.where(q < -qn, -qn, q)
    q = tl.where(q > qp, qp, q)
    out = q * s
    if OFFSET:
        out = out + b
    _store(out_ptr + offs, out, mask, BF16)


@triton.jit
def _param_pair(offs, mask, s_ptr, b_ptr, C, INNER, G, RO, RC, RI, GRAN: tl.constexpr, OFFSET: tl.constexpr):
    # The parameters at offs: s (masked lanes 1.0) and, with OFFSET, b (else +0.0).
    if GRAN == 0:
        s = tl.load(s_ptr).to(tl.float32)
        b = s * 0.0
        if OFFSET:
            b = tl.load(b_ptr).to(tl.float32)
    else:
        if GRAN == 2:  # noqa: SIM108 (a constexpr branch: the other side is not compiled)
            p = offs % C  # offs are run indices
        else:
            p = _param_index(offs, C, INNER, G, RO, RC, RI)
        s = tl.load(s_ptr + p, mask=mask, other=1.0).to(tl.float32)
        b = s * 0.0
        if OFFSET:
            b = tl.load(b_ptr + p, mask=mask, other=0.0).to(tl.float32)
    return s, b


@triton.jit
def _lsq_bwd_kernel(g_ptr, x_ptr, gx_ptr, ts_ptr, tb_ptr, s_ptr, b_ptr, n, qn, qp, C, INNER, G, RO, RC, RI,
                    GRAN: tl.constexpr, OFFSET: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr,
                    ROWS: tl.constexpr):
    # LSQ's gradients (Esser et al. 2020, eq. 3; Bhalgat et al. 2020), per element; the caller
    # sums ts and tb to the parameters' shapes. v and q are recomputed from x, not stored.
    offs, mask, p, p_mask = _tile(n, INNER, GRAN, ROWS, BLOCK)
    x = _load(x_ptr + offs, mask, BF16)
    g = _load(g_ptr + offs, mask, BF16)
    s, b = _param_pair(p, p_mask, s_ptr, b_ptr, C, INNER, G, RO, RC, RI, GRAN, OFFSET)
    v = tl.math.div_rn(x - b, s)  # b is +0.0 without an offset: x - 0.0 == x
    q = _round_half_even(v)
    q = tl.where(q < -qn, -qn, q)
    q = tl.where(q > qp, qp, q)
    inside = (v > -qn) & (v < qp)
    tl.store(gx_ptr + offs, g * inside.to(tl.float32), mask=mask)
    tl.store(ts_ptr + offs, g * tl.where(inside, q - v, q), mask=mask)
    if OFFSET:
        tl.store(tb_ptr + offs, g * (~inside).to(tl.float32), mask=mask)


@triton.jit
def _pow2(k):
    # 2 ** k for integer-valued float k in [-149, 127], exactly: the product of two normal powers.
    k1 = tl.maximum(k, -126.0)
    p1 = ((k1.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    p2 = (((k - k1).to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return p1 * p2


@triton.jit
def _floor_log2(a):
    # torch.frexp's exponent minus one for a >= 0, from the exponent field (subnormals scaled
    # by 2 ** 64 first); zero, inf and NaN give -1 (frexp's exponent 0).
    sub = a < 1.1754943508222875e-38
    b = tl.where(sub, a * 18446744073709551616.0, a)
    field = (b.to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = (field - 127).to(tl.float32) - tl.where(sub, 64.0, 0.0)
    return tl.where((field == 255) | (a == 0.0), -1.0, e)


@triton.jit
def _minifloat(y, man_bits, e_min, max_value):
    # minifloat_round: round |y| on its binade's grid (ties to even), saturate, restore the sign.
    ya = tl.abs(y)
    e = tl.maximum(_floor_log2(ya), e_min)
    step = _pow2(e - man_bits)
    q = _round_half_even(tl.math.div_rn(ya, step)) * step
    q = tl.where(q > max_value, max_value, q)
    neg = (y.to(tl.int32, bitcast=True) >> 31) != 0
    return tl.where(neg, -q, q)


@triton.jit
def _minifloat_kernel(x_ptr, out_ptr, a_ptr, b_ptr, n, man_bits, e_min, max_value, C, INNER, G, RO, RC, RI,
                      RANGES: tl.constexpr, GRAN: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr,
                      ROWS: tl.constexpr):
    # a: the scale; or, with RANGES, a range min and b its max, the scale max(|a|, |b|) / max_value
    # (at least the smallest normal), as MinifloatQuantizer.scale computes it.
    offs, mask, p, p_mask = _tile(n, INNER, GRAN, ROWS, BLOCK)
    x = _load(x_ptr + offs, mask, BF16)
    a, b = _param_pair(p, p_mask, a_ptr, b_ptr, C, INNER, G, RO, RC, RI, GRAN, RANGES)
    if RANGES:  # noqa: SIM108 (a constexpr branch); the smallest normal float32 at least
        s = tl.maximum(tl.math.div_rn(tl.maximum(tl.abs(a), tl.abs(b)), max_value), 1.1754943508222875e-38)
    else:
        s = a
    out = _minifloat(tl.math.div_rn(x, s), man_bits, e_min, max_value) * s
    _store(out_ptr + offs, out, mask, BF16)


@triton.jit
def _nanmax(a, b):
    # max that propagates NaN, as torch.amax
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _mx_kernel(x_ptr, out_ptr, n_blocks, row_len, blocks_per_row, block_size, man_bits, e_min, max_value, elem_emax,
               NB: tl.constexpr, BS: tl.constexpr, BF16: tl.constexpr):
    # NB blocks of block_size elements per program, on rows of row_len (the last block of a
    # row zero-padded): the E8M0 scale from the block's max |x|, then the element format.
    blk = tl.program_id(0) * NB + tl.arange(0, NB)
    t = tl.arange(0, BS)
    row = blk // blocks_per_row
    col = (blk % blocks_per_row)[:, None] * block_size + t[None, :]
    mask = (blk < n_blocks)[:, None] & (t < block_size)[None, :] & (col < row_len)
    offs = row[:, None] * row_len + col
    x = _load(x_ptr + offs, mask, BF16)
    amax = tl.reduce(tl.abs(x), 1, _nanmax)
    # e8m0_block_scale: 2 ** clamp(floor(log2(amax)) - emax, -127, 127) (subnormal maxima exactly), 2 ** -127 for 0
    shared = _floor_log2(amax) - elem_emax
    shared = tl.where(amax > 0.0, shared, -127.0)
    shared = tl.minimum(tl.maximum(shared, -127.0), 127.0)
    scale = (_pow2(shared) + (amax - amax))[:, None]  # NaN (E8M0's NaN) for an inf or NaN maximum
    out = _minifloat(tl.math.div_rn(x, scale), man_bits, e_min, max_value) * scale
    _store(out_ptr + offs, out, mask, BF16)


# fmt: on
# --------------------------------------------------------------------------- launchers


class Layout:
    """Where the compact parameter of each element of a contiguous tensor lives.

    The tensor is viewed as ``(outer, C, inner)`` around one axis; the element ``(o, c, i)``
    reads parameter ``o * ro + (c // g) * rc + i * ri``. Per-channel: ``(0, 1, 0)``, ``g = 1``;
    per-group of ``g`` along the axis (compact shape ``(outer, C / g, inner)``):
    ``((C / g) * inner, inner, 1)``; one parameter per element: ``C = numel``, ``rc = 1``.
    """

    __slots__ = ("c", "g", "gran", "inner", "rc", "ri", "ro")

    def __init__(self, gran: int, c: int = 1, inner: int = 1, g: int = 1, ro: int = 0, rc: int = 0, ri: int = 0):
        self.gran, self.c, self.inner, self.g, self.ro, self.rc, self.ri = gran, c, inner, g, ro, rc, ri

    def args(self) -> tuple[int, ...]:
        return self.c, self.inner, self.g, self.ro, self.rc, self.ri

    def runs(self, n: int, with_mask: bool) -> tuple[Layout, int, int] | None:
        """This layout on ``n`` elements as runs of consecutive elements that share a parameter, or ``None``.

        Returns ``(layout, rows, block)``: a ``RUNS`` layout (``inner``: the run length L; run ``r`` reads
        parameter ``r % c``) and the tile of a program, ``rows`` runs by ``block`` of their elements, so that
        a kernel computes a grid once per run (or per row of a thread's) instead of an index and a grid per
        element. Fits per-channel parameters (a run is a channel's ``inner`` elements) and per-group ones along
        the last axis (a run is a group), for runs that are a multiple of 16 elements long (the alignment
        Triton vectorizes by: in a tile of shorter unaligned runs each thread would hold elements of
        several runs, one at a time) or longer than 256; a multiple of 8 with the clipped gradient's mask,
        whose bytes a program then writes whole.
        """
        return _runs(self.gran, *self.args(), n, with_mask)

    @staticmethod
    def for_granularity(shape: torch.Size, axis: int | None, group_size: int | None) -> Layout:
        """The layout of an observer's compact ``(min, max)`` (``Granularity.compact_shape``)."""
        if axis is None:
            return Layout(PER_TENSOR)
        axis %= len(shape)
        c, inner = shape[axis], math.prod(shape[axis + 1 :])
        if group_size is None:
            return Layout(INDEXED, c, inner, 1, 0, 1, 0)
        return Layout(INDEXED, c, inner, group_size, (c // group_size) * inner, inner, 1)

    @staticmethod
    def for_broadcast(x: Tensor, p: Tensor) -> Layout | None:
        """The layout of a parameter tensor ``p`` that broadcasts against ``x``, or ``None`` if none fits.

        ``p`` has one value, or varies along one run of adjacent axes of ``x`` with ``x``'s sizes
        there and size 1 elsewhere: per channel, per group on a ``(rows, groups, group_size)``
        view, per element.
        """
        if p.dim() > x.dim():  # the result would gain p's leading dimensions
            return None
        if p.numel() == 1:
            return Layout(PER_TENSOR)
        if not p.is_contiguous():
            return None
        shape = (1,) * (x.dim() - p.dim()) + tuple(p.shape)
        axes = [i for i, s in enumerate(shape) if s != 1]
        first, last = axes[0], axes[-1]
        if any(shape[i] != x.shape[i] for i in range(first, last + 1)):
            return None
        # x as (outer, C, inner) around the run: element (o, c, i) reads p's element c
        return Layout(INDEXED, p.numel(), math.prod(x.shape[last + 1 :]), 1, 0, 1, 0)


@functools.lru_cache(maxsize=4096)
def _runs(
    gran: int, c: int, inner: int, g: int, ro: int, rc: int, ri: int, n: int, with_mask: bool
) -> tuple[Layout, int, int] | None:
    # Element e = (o, k, i) of the (outer, c, inner) view reads o * ro + (k // g) * rc + i * ri: constant over
    # runs of L = g * inner elements when ri does not vary it; run r = o * (c // g) + k // g reads
    # r % (c // g) when ro == 0 (per channel), r when ro == c // g (consecutive groups); both need rc == 1.
    if gran != INDEXED or (ri and inner != 1) or rc != 1 or g < 1 or c % g:
        return None
    groups, length = c // g, g * inner
    if ro == 0:
        modulus = groups
    elif ro == groups:
        modulus = n // length
    else:
        return None
    if length < 16 or (length % 16 and length <= 256) or (with_mask and length % 8) or n % length:
        return None
    block = min(_BLOCK, triton.next_power_of_2(length))
    if (length + block - 1) // block > 65535:  # the grid's second dimension
        return None
    return Layout(RUNS, modulus, length), _BLOCK // block, block


def _grid(n: int) -> tuple[int]:
    return ((n + _BLOCK - 1) // _BLOCK,)  # not triton.cdiv: a JIT function, 8 us per host call


def _tiling(layout: Layout, n: int, with_mask: bool = False) -> tuple[Layout, tuple[int, ...], int, int]:
    """``(layout, grid, rows, block)`` of a launch over ``n`` elements: as runs where :meth:`Layout.runs` fits."""
    runs = layout.runs(n, with_mask) if layout.gran == INDEXED else None
    if runs is None:
        return layout, _grid(n), 1, _BLOCK
    layout, rows, block = runs
    return layout, ((n // layout.inner + rows - 1) // rows, (layout.inner + block - 1) // block), rows, block


def _bits(t: Tensor) -> Tensor:
    # What a kernel gets for a tensor: bfloat16 as its int16 bits (see _load / _store).
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _launch_grid(
    kernel,
    tensors: tuple[Tensor, ...],
    out: Tensor,
    a: Tensor,
    b: Tensor | None,
    layout: Layout,
    mode: int,
    lo: float,
    hi: float,
    n_levels: int,
    symmetric: bool,
    power_of_two: bool,
    fixed_zp: float | None,
    bf16: bool,
    **meta: bool,
) -> Tensor:
    """Launch a kernel taking ``(*tensors, out, n)`` then the grid's parameters (see _params) and the
    constexprs ``meta``; return ``out``. An indexed layout that :meth:`Layout.runs` fits is launched as runs."""
    n = out.numel()
    if n:
        layout, grid, rows, block = _tiling(layout, n, bool(meta.get("MASK")))
        kernel[grid](
            *map(_bits, tensors), _bits(out), n, a, a if b is None else b, float(lo), float(hi),
            float(n_levels - 1), 0.0 if fixed_zp is None else float(fixed_zp), *layout.args(),
            MODE=mode, GRAN=layout.gran, SYMMETRIC=bool(symmetric), POW2=bool(power_of_two),
            FIXED_ZP=fixed_zp is not None, BF16=bf16, BLOCK=block, ROWS=rows, **meta,
        )  # fmt: skip
    return out


def fake_quant(
    x: Tensor,
    a: Tensor,
    b: Tensor | None,
    layout: Layout,
    mode: int,
    lo: float = 0.0,
    hi: float = 0.0,
    n_levels: int = 2,
    symmetric: bool = False,
    power_of_two: bool = False,
    fixed_zp: float | None = None,
    with_mask: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Fake-quantize contiguous ``x`` on the grid ``mode`` reads from ``a`` and ``b`` (see :func:`_params`).

    ``MODE_GRID``: step and zero point, codes in ``[lo, hi]`` before the shift;
    ``MODE_BOUNDS``: step, codes in ``[lo, hi]``; ``MODE_RANGES``: the affine grid of
    ``n_levels`` levels from ``(min, max)``; ``MODE_QFMT``: the Q-format step of
    ``n_levels - 1 = n_bits - signed`` bits from ``(min, max)``, codes in ``[lo, hi]``.
    ``with_mask``: also the clipped STE's mask, packed a bit per element in memory order
    (``uint8`` of ``ceil(numel / 8)``, for :func:`masked_grad`): an eighth of a byte per
    element kept for the backward instead of ``x``.
    """
    grid = (lo, hi, n_levels, symmetric, power_of_two, fixed_zp, x.dtype == torch.bfloat16)
    bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8, device=x.device) if with_mask else x
    out = _launch_grid(_fake_quant_kernel, (x, bits), torch.empty_like(x), a, b, layout, mode, *grid, MASK=with_mask)
    return (out, bits) if with_mask else out


def masked_grad(grad: Tensor, bits: Tensor) -> Tensor:
    """``grad`` (dense, in the memory order of the ``x`` the mask was made for) where ``bits`` (from
    :func:`fake_quant` with ``with_mask=True``) has the element's bit set, else 0."""
    out = torch.empty_like(grad)
    n = grad.numel()
    if n:
        _masked_grad_kernel[_grid(n)](_bits(grad), bits, _bits(out), n, BF16=grad.dtype == torch.bfloat16, BLOCK=_BLOCK)
    return out


def observe(
    kind: int,
    batch_min: Tensor,
    batch_max: Tensor,
    min_val: Tensor,
    max_val: Tensor,
    bad: Tensor,
    num_batches: Tensor | None = None,
    ema_min: Tensor | None = None,
    ema_max: Tensor | None = None,
    decay: Tensor | None = None,
    momentum: float = 0.0,
) -> None:
    """Fold a batch's compact ``(min, max)`` into an observer's float32 state, in place, in one launch."""
    r = min_val.numel()
    nb = num_batches if num_batches is not None else bad
    _observe_kernel[(1,)](
        batch_min,
        batch_max,
        min_val,
        max_val,
        min_val if ema_min is None else ema_min,
        max_val if ema_max is None else ema_max,
        nb,
        min_val if decay is None else decay,
        bad,
        r,
        float(momentum),
        1.0 - float(momentum),
        KIND=kind,
        BLOCK=_OBS_BLOCK,
        enable_fp_fusion=False,
    )


# At most this many programs reduce a batch in observe_rows (about eight per SM of a large GPU): enough loads in
# flight to stream the batch at memory speed, and few merges into the scratch.
_OBS_PROGRAMS = 1024


def observe_rows(
    kind: int,
    x: Tensor,
    rows: int,
    scratch: Tensor,
    min_val: Tensor,
    max_val: Tensor,
    bad: Tensor,
    num_batches: Tensor | None = None,
    ema_min: Tensor | None = None,
    ema_max: Tensor | None = None,
    decay: Tensor | None = None,
    momentum: float = 0.0,
) -> bool:
    """Reduce contiguous ``x`` as ``rows`` rows to their ``(min, max)`` and fold them into the state, in one launch.

    As :func:`observe` given ``x``'s per-row ranges (the state holds ``rows`` values). ``scratch``: from
    ``torchquant.kernels.observe_scratch(rows)``, used by one launch at a time. Returns ``False`` without launching
    where ``x`` is too long for the kernel's int32 offsets (the caller then reduces with torch).
    """
    length = x.numel() // rows
    chunks = max(1, min((length + _BLOCK - 1) // _BLOCK, _OBS_PROGRAMS // rows))
    if length + chunks * _BLOCK >= 2**31:
        return False
    nb = num_batches if num_batches is not None else bad
    _observe_rows_kernel[(rows, chunks)](
        _bits(x), length, scratch, min_val, max_val,
        min_val if ema_min is None else ema_min, max_val if ema_max is None else ema_max,
        nb, min_val if decay is None else decay, bad, rows, float(momentum), 1.0 - float(momentum),
        KIND=kind, BF16=x.dtype == torch.bfloat16, BLOCK=_BLOCK, OBS_BLOCK=_OBS_BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return True


def lsq_forward(x: Tensor, step: Tensor, offset: Tensor | None, layout: Layout, qn: int, qp: int) -> Tensor:
    """LSQ / LSQ+ forward: ``clamp(round((x - offset) / step), -qn, qp) * step + offset``."""
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    bf16 = x.dtype == torch.bfloat16
    layout, grid, rows, block = _tiling(layout, n)
    _lsq_fwd_kernel[grid](
        _bits(x), _bits(out), step, step if offset is None else offset, n, float(qn), float(qp),
        *layout.args(), GRAN=layout.gran, OFFSET=offset is not None, BF16=bf16, BLOCK=block, ROWS=rows,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out


def lsq_backward(
    grad: Tensor, x: Tensor, step: Tensor, offset: Tensor | None, layout: Layout, qn: int, qp: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-element LSQ gradients: ``(d x, d step terms, d offset terms)``, the last two in float32."""
    n = x.numel()
    gx = torch.empty_like(x, dtype=torch.float32)  # x's memory order, as the kernel walks it
    ts = torch.empty_like(gx)
    tb = torch.empty_like(gx) if offset is not None else None
    if n:
        layout, grid, rows, block = _tiling(layout, n)
        _lsq_bwd_kernel[grid](
            _bits(grad), _bits(x), gx, ts, ts if tb is None else tb, step, step if offset is None else offset, n,
            float(qn), float(qp), *layout.args(), GRAN=layout.gran, OFFSET=offset is not None,
            BF16=x.dtype == torch.bfloat16, BLOCK=block, ROWS=rows,
            enable_fp_fusion=False,
        )  # fmt: skip
    return gx, ts, tb


def minifloat(
    x: Tensor, a: Tensor, b: Tensor | None, layout: Layout, man_bits: int, bias: int, max_value: float
) -> Tensor:
    """``minifloat_round(x / scale) * scale`` (see :func:`torchquant.minifloat_quantize`).

    ``scale`` is ``a``; or, when ``b`` is given, ``max(max(|a|, |b|) / max_value, tiny)`` from
    the range ``(a, b)`` (as :meth:`torchquant.MinifloatQuantizer.scale`).
    """
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    bf16 = x.dtype == torch.bfloat16
    layout, grid, rows, block = _tiling(layout, n)
    _minifloat_kernel[grid](
        _bits(x), _bits(out), a, a if b is None else b, n, float(man_bits), float(1 - bias), float(max_value),
        *layout.args(), RANGES=b is not None, GRAN=layout.gran, BF16=bf16, BLOCK=block, ROWS=rows,
    )  # fmt: skip
    return out


def mx(x: Tensor, man_bits: int, bias: int, max_value: float, elem_emax: int, block_size: int) -> Tensor:
    """MX fake quantization of contiguous ``x`` in blocks along its last axis (see :func:`torchquant.mx_quantize`)."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    row_len = x.shape[-1]
    rows = x.numel() // row_len
    per_row = (row_len + block_size - 1) // block_size
    n_blocks = rows * per_row
    bs = triton.next_power_of_2(block_size)
    nb = max(1, min(64, 2048 // bs))
    bf16 = x.dtype == torch.bfloat16
    _mx_kernel[((n_blocks + nb - 1) // nb,)](
        _bits(x), _bits(out), n_blocks, row_len, per_row, block_size, float(man_bits),
        float(1 - bias), float(max_value), float(elem_emax), NB=nb, BS=bs, BF16=bf16,
    )  # fmt: skip
    return out
