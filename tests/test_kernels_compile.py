"""The Triton kernels compile for the GPUs this project measures on, without one.

``tests/test_kernels.py`` checks what the kernels compute, through Triton's interpreter,
which accepts programs the compiler rejects (a loop-carried value that changes type, a
reshape the layout cannot do). Here every kernel specialisation the quantizers launch is
compiled ahead of time for NVIDIA sm_90 (H100, H200) with the Triton that torch depends on:
Triton IR down to a cubin by the ``ptxas`` its wheel ships, no device needed. The
specialisations come from the registry: each registered quantizer and observer runs three QAT
steps in float32, float16 and bfloat16 on the kernel path with every launch recorded (kernel,
argument types, constexprs, compile options, and the values Triton's launcher specialises on:
pointers and integers divisible by 16, integers equal to 1) and not run, plus the functional
primitives with parameters in the input's dtype and per-channel runs in every tile size. A
kernel no quantizer reaches, or a tile size none launches, fails the coverage test.

The GPU machine may have another Triton version than this one; this checks the source, not
that machine's compiler.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from benchmark_script import load
from test_registry_contract import CASES

import torchquant as tq
from torchquant import kernels
from torchquant.quantizers_functional import lsq_quantize, minifloat_quantize, mx_quantize

triton = pytest.importorskip("triton")
compiler = pytest.importorskip("triton.compiler")
backends = pytest.importorskip("triton.backends.compiler")
pytest.importorskip("triton.backends.nvidia")
kernel_sass = load("kernel_sass")  # reads a cubin's registers and spills with the cuobjdump Triton ships

ARCHS = [90]  # sm_90: H100 and H200
# per-channel run lengths that take each tile of the fake-quant kernel (64 x 16 to 1 x 1024 elements), the last
# two unaligned: 300 in runs (a 2 x 512 tile), 49 element by element
TILE_RUNS = (16, 32, 48, 112, 208, 304, 4608, 300, 49)
# The kernels that round half to even (_round_half_even), and its 2**23 shifter in PTX: an addition of 2**23
# and an addition of -2**23 (or a subtraction of 2**23), float32, round to nearest.
ROUNDING = {"_fake_quant_kernel", "_lsq_fwd_kernel", "_lsq_bwd_kernel", "_minifloat_kernel", "_mx_kernel"}
_SHIFTER_ADD = re.compile(r"add(\.rn)?\.f32\s+%\w+, %\w+, 0f4B000000;")
_SHIFTER_SUB = re.compile(r"(add(\.rn)?\.f32\s+%\w+, %\w+, 0fCB000000|sub(\.rn)?\.f32\s+%\w+, %\w+, 0f4B000000);")
_POINTERS = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int16: "*i16",  # bfloat16 travels as its int16 bits
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.uint8: "*u8",
}


def _arg_spec(value) -> tuple[str, str]:
    """``(Triton type, specialisation)`` of a kernel argument, as Triton's launcher sees it: ``"D"`` for a pointer
    or integer divisible by 16, ``"1"`` for an integer equal to 1 (compiled as a constant), else ``""``."""
    if isinstance(value, torch.Tensor):
        return _POINTERS[value.dtype], "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool):
        return "i1", ""
    if isinstance(value, int):
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), "1" if value == 1 else "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", ""
    raise TypeError(f"a kernel argument of type {type(value).__name__}: teach _arg_spec its Triton type")


class _Recorder:
    """Stands for a kernel of the interpreted module: ``kernel[grid](*args, **kw)`` records the launch, runs nothing."""

    def __init__(self, name: str, specs: dict) -> None:
        self.name, self.specs = name, specs

    def __getitem__(self, grid):
        def launch(*args, **kw):
            key = (self.name, tuple(map(_arg_spec, args)), tuple(sorted(kw.items())))
            self.specs[key] = self.specs.get(key, 0) + 1

        return launch


def _qat_steps(q: torch.nn.Module, x: torch.Tensor) -> None:
    """Three QAT steps: observers allocate their state on the first, take the kernel path from the second and
    reduce the batch in their update kernel (observe_minmax_rows) from the third."""
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_AWARE_TRAIN)
    x = x.requires_grad_()
    for _ in range(3):
        q.pre_observe(x.detach())
        y = q(x)
        q.post_observe(x.detach())
        if y.requires_grad:
            y.float().sum().backward()


def _functional_calls(dtype: torch.dtype) -> None:
    """The primitives with parameters in ``x``'s dtype (the quantizers keep theirs in float32)."""
    x = torch.randn(4, 6, 8, dtype=dtype, requires_grad=True)
    scale = torch.full((1, 6, 1), 0.05, dtype=dtype)
    tq.affine_quantize(x, scale, torch.zeros_like(scale), 16).float().sum().backward()
    tq.affine_quantize(x, torch.tensor(0.05, dtype=dtype), torch.tensor(8.0, dtype=dtype), 16)
    tq.qfmt_quantize(x, scale, -8, 7)
    step = torch.full((6, 1), 0.1, dtype=dtype, requires_grad=True)
    lsq_quantize(x, step, torch.zeros_like(step, requires_grad=True), 4, 3).float().sum().backward()
    minifloat_quantize(x, scale, 3, 7, 448.0)  # E4M3
    mx_quantize(x, 3, 7, 448.0, 8, block_size=8)
    # per-channel runs in each tile size (64 x 16 to 1 x 1024 elements, and unaligned long runs) in float32; in
    # float16 and bfloat16, whose loads and stores differ, the smallest and the largest tile
    for run in TILE_RUNS if dtype == torch.float32 else (TILE_RUNS[0], TILE_RUNS[-1]):
        w = torch.randn(3, run, dtype=dtype, requires_grad=True)
        step = torch.full((3, 1), 0.05, dtype=dtype, requires_grad=True)
        tq.affine_quantize(w, step, torch.zeros(3, 1, dtype=dtype), 16)
        lsq_quantize(w, step, torch.zeros_like(step, requires_grad=True), 4, 3).float().sum().backward()
        minifloat_quantize(w, step, 3, 7, 448.0)
        # weight grids the registry's examples leave out: clipped (the mask), symmetric, power-of-two, Q-format
        for q in (
            tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), gradient_clip=True),
            tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True),
            tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=True, power_of_two=True),
            tq.QfmtQuantizer(8, True, tq.BatchMinMax(axis=0)),
        ):
            _qat_steps(q, w.detach())


@pytest.fixture(scope="module")
def launched() -> dict:
    """``{(kernel name, argument types, sorted keyword arguments): launches}`` of the registry's quantizers."""
    specs: dict = {}
    module = kernels.interpreted()
    names = [n for n in dir(module) if n.startswith("_") and n.endswith("_kernel")]
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the registry's deprecation and calibration warnings
        for n in names:
            mp.setattr(module, n, _Recorder(n, specs))
        mp.setattr(kernels, "_DEVICES", {"cpu"})
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for case in CASES:
                torch.manual_seed(0)
                _qat_steps(case.build(), case.tensor().to(dtype))
            _functional_calls(dtype)
    return specs


def test_the_registry_launches_every_kernel_and_tile(launched):
    from torchquant.kernels import _triton

    defined = {n for n in dir(_triton) if n.startswith("_") and n.endswith("_kernel")}
    assert defined, "no kernels found in torchquant.kernels._triton"
    assert not ROUNDING - defined, f"ROUNDING names kernels that do not exist: {sorted(ROUNDING - defined)}"
    missing = defined - {name for name, _, _ in launched}
    assert not missing, f"no registered quantizer launches {sorted(missing)}: register one that does (or call it here)"
    kws = [dict(kw) for name, _, kw in launched if name == "_fake_quant_kernel"]
    tiles = {(kw["ROWS"], kw["BLOCK"], kw["MASK"]) for kw in kws if kw["GRAN"] == 2}
    for rows, block in ((64, 16), (32, 32), (16, 64), (8, 128), (4, 256), (2, 512), (1, 1024)):
        for mask in (False, True):
            assert (rows, block, mask) in tiles, f"no run tile {rows} x {block} (mask {mask}) launched: {TILE_RUNS}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
def test_every_launched_kernel_compiles_without_spilling(launched, arch):
    from torchquant.kernels import _triton

    target = backends.GPUTarget("cuda", arch, 32)
    assert launched, "nothing was launched"
    failed, spilled, folded = [], [], []
    for (name, args, kw), _ in sorted(launched.items()):
        fn = getattr(_triton, name)
        constexprs = {k: v for k, v in kw if k in fn.arg_names}
        options = {k: v for k, v in kw if k not in fn.arg_names}  # enable_fp_fusion and the like
        runtime = iter(args)
        signature, attrs = {}, {}
        for i, a in enumerate(fn.arg_names):
            if a in constexprs:
                signature[a] = "constexpr"
                continue
            signature[a], spec = next(runtime)
            if spec == "1":  # as Triton's launcher and AOT compiler: a constant
                signature[a], constexprs[a] = "constexpr", 1
            elif spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
        assert next(runtime, None) is None, f"{name} was launched with more arguments than it takes: {args}"
        what = f"{name} {args} {constexprs} {options}"
        try:
            source = compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(source, target=target, options=options)
        except Exception as e:  # the compiler's own error types differ between Triton versions
            failed.append(f"{what}: {type(e).__name__}: {str(e)[:400]}")
            continue
        local = kernel_sass.kernel_stats(compiled)["local bytes"]
        if local:
            spilled.append(f"{what}: {local} bytes of local memory per thread")
        ptx = compiled.asm["ptx"]
        if name in ROUNDING and not (_SHIFTER_ADD.search(ptx) and _SHIFTER_SUB.search(ptx)):
            folded.append(what)
    assert not failed, "\n".join(failed)
    assert not spilled, "\n".join(spilled)
    # _round_half_even's rint is (|v| + 2**23) - 2**23: a compiler that reassociated it to |v| would
    # stop rounding (and fold the select around it away too); the interpreter cannot see that.
    assert not folded, "the 2**23 shifter's addition or subtraction is missing in:\n" + "\n".join(folded)
