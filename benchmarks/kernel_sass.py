"""Static cost of the Triton kernels on sm_90 without a GPU: SASS instructions a thread, per element or per run.

Compiles variants of torchquant's kernels ahead of time for NVIDIA sm_90 (H100, H200) as
Triton's launcher would specialise them for a 512x4608 float32 weight (pointers, the element
count and the run length divisible by 16), with the ``ptxas`` and ``cuobjdump`` the Triton
wheel ships, and prints for each: the SASS instructions of its program (a thread's 8 of a
1024-element block, cold paths such as division's slow path included), the IEEE divisions in
its PTX, its 128-bit loads, and its registers and local (spilled) bytes per thread. Rows
compare one parameter per tensor, per channel element by element (an index and a grid per
element) and per channel in runs (``Layout.runs``: a grid per run of the elements that share it).

Static counts, not timings: fewer instructions matter where a kernel is bound by its
arithmetic rather than by memory. ``benchmarks/gpu_check.sh`` times the kernels on a GPU.

    python benchmarks/kernel_sass.py [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from torchquant.kernels import _triton as K

_FLOATS = {"lo", "hi", "nlm1", "fixed_zp", "qn", "qp", "man_bits", "e_min", "max_value"}
_DIVISIBLE = {"n", "INNER", "C"}  # 512 x 4608 elements, runs of 4608, 512 channels: all divisible by 16
_GRANS = {"per tensor": 0, "per channel, element by element": 1, "per channel, in runs": 2}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_stats(fn, constexprs: dict, arch: int, options: dict | None = None) -> dict[str, int]:
    """Compile ``fn`` with ``constexprs`` for sm_``arch`` (float32 pointers; a mask pointer of bytes) and count."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*u8" if name == "m_ptr" and constexprs.get("MASK") else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in _DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return kernel_stats(triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options or {}))


def kernel_stats(kernel) -> dict[str, int]:
    """What a compiled Triton kernel costs: SASS instructions, IEEE divisions and 128-bit loads in its PTX,
    registers and local (spilled) bytes per thread, read with the ``cuobjdump`` Triton ships."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
    fields = dict(w.split(":", 1) for w in usage.stdout.split() if re.fullmatch(r"[A-Z]+:\d+", w))
    ptx = kernel.asm["ptx"]
    return {
        "sass": sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)),
        "div.rn": ptx.count("div.rn.f32"),
        "v4 loads": len(re.findall(r"ld\.global\.(?:\w+\.)*v4", ptx)),
        "registers": int(fields["REG"]),
        "local bytes": int(fields["LOCAL"]),
    }


def variants() -> list[tuple[str, object, dict, dict]]:
    """(name, kernel, constexprs without GRAN, compile options) of the rows."""
    fq = dict(POW2=False, FIXED_ZP=False, BF16=False, BLOCK=1024, ROWS=1)
    exact = dict(enable_fp_fusion=False)
    return [
        (
            "AffineQuantizer, symmetric",
            K._fake_quant_kernel,
            dict(fq, MODE=K.MODE_RANGES, MASK=False, SYMMETRIC=True),
            {},
        ),
        (
            "  clipped gradient (mask)",
            K._fake_quant_kernel,
            dict(fq, MODE=K.MODE_RANGES, MASK=True, SYMMETRIC=True),
            {},
        ),
        (
            "affine_quantize (step, zero point)",
            K._fake_quant_kernel,
            dict(fq, MODE=K.MODE_GRID, MASK=False, SYMMETRIC=False),
            {},
        ),
        ("LSQ+ forward", K._lsq_fwd_kernel, dict(OFFSET=True, BF16=False, BLOCK=1024, ROWS=1), exact),
        ("LSQ+ backward", K._lsq_bwd_kernel, dict(OFFSET=True, BF16=False, BLOCK=1024, ROWS=1), exact),
        ("minifloat (scale from ranges)", K._minifloat_kernel, dict(RANGES=True, BF16=False, BLOCK=1024, ROWS=1), {}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, 90 for sm_90 (H100, H200)")
    args = parser.parse_args()
    print(f"Triton {triton.__version__}, sm_{args.arch}, a 1024-element block over 128 threads (8 elements a thread)")
    head = f"{'kernel':<36} {'parameters':<32} {'SASS':>6} {'div.rn':>7} {'v4 ld':>6} {'regs':>5} {'local':>6}"
    print(head)
    for name, fn, constexprs, options in variants():
        for where, gran in _GRANS.items():
            s = compile_stats(fn, dict(constexprs, GRAN=gran), args.arch, options)
            print(
                f"{name:<36} {where:<32} {s['sass']:>6} {s['div.rn']:>7} {s['v4 loads']:>6} {s['registers']:>5} "
                f"{s['local bytes']:>6}"
            )


if __name__ == "__main__":
    main()
