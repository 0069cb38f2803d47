"""Fake-quantization speed: torchquant's primitives and quantizer against torch's fused ops.

Prints median wall-clock times (ms) and ratios measured in this one run (each pair
timed alternately, so that machine noise hits both sides alike), with
``torch.set_num_threads(2)``, eager mode:

* ``affine_quantize`` forward and forward+backward on a 16M-element tensor (``--numel``),
  against ``torch.fake_quantize_per_tensor_affine`` and ``x.clone()``; forward+backward
  twice: with torch's gradient (zero outside the grid: ``gradient_clip`` first, as
  ``AffineQuantizer(gradient_clip=True)`` computes it), the row compared with torch's op,
  and with torchquant's default straight-through gradient (less work, not a comparison);
* per-channel on a 512x512x3x3 weight, against ``torch.fake_quantize_per_channel_affine``;
* ``AffineQuantizer(8, ExpAvgMinMax())`` in QUANT_AWARE_TRAIN (observe + quantize)
  against ``torch.ao.quantization.FusedMovingAvgObsFakeQuantize``.

Targets (issue 2): per-tensor fwd <= 0.7x, fwd+bwd with torch's gradient <= 1.0x,
per-channel fwd <= 0.5x, QAT call <= 0.8x. The targets are for the CPU; ``--device cuda`` prints the same table
on a GPU (times between device synchronizations), where they are not judged, with three
more rows: the per-tensor forward and the QAT call under ``torch.compile``, and a per-group
forward (a 512x4608 weight in groups of 128 against torch's per-channel op on the
``(18432, 128)`` view, one channel per group).

    python benchmarks/fake_quant.py [--repeats 21] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.ao.quantization import FusedMovingAvgObsFakeQuantize

from torchquant import AffineQuantizer, ExpAvgMinMax, affine_quantize
from torchquant.quantizers_functional import gradient_clip

NUMEL = 16 * 1024 * 1024


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def pair_ms(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median ms of ``a`` and of ``b``, timed alternately, so that machine noise hits both alike."""
    for _ in range(3):
        a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((a, times[0]), (b, times[1])):
            _sync()
            t = time.perf_counter()
            fn()
            _sync()
            out.append(time.perf_counter() - t)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def per_group_row(r: int) -> tuple[str, float, float, str, None]:
    """Per-group forward on a 512x4608 weight, groups of 128 along its rows (CUDA table only).

    torchquant: ``affine_quantize`` on the ``(512, 36, 128)`` view with ``(512, 36, 1)`` scales and
    zero points; torch: its per-channel fused op on the ``(18432, 128)`` view, one channel per group.
    """
    w = torch.randn(512, 36, 128)
    sc = torch.rand(512, 36, 1) * 0.01 + 0.005
    zc = torch.randint(0, 256, (512, 36, 1), dtype=torch.int32)
    zf = zc.float()
    w2, sc2, zc2 = w.view(-1, 128), sc.view(-1), zc.view(-1)
    ours, theirs = pair_ms(
        lambda: affine_quantize(w, sc, zf, 256),
        lambda: torch.fake_quantize_per_channel_affine(w2, sc2, zc2, 0, 0, 255),
        r,
    )
    return "per-group forward, 512x4608 g128", ours, theirs, "torch per-channel op, a channel per group", None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--numel", type=int, default=NUMEL, help="per-tensor elements (targets judged at the default)")
    parser.add_argument("--device", default="cpu", help="cpu (targets judged) or cuda")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    torch.set_default_device(dev)
    r = args.repeats
    rows: list[tuple[str, float, float, str, float | None]] = []

    # the row labels say the size measured; the targets are for the default size
    n = f"{args.numel // 2**20}M" if args.numel % 2**20 == 0 else f"{args.numel:,}"
    x = torch.randn(args.numel)
    scale, zp = 8.0 / 255, 128
    d, z = torch.tensor(scale), torch.tensor(float(zp))
    zi = torch.tensor(zp, dtype=torch.int32)
    ours, theirs = pair_ms(
        lambda: affine_quantize(x, d, z, 256), lambda: torch.fake_quantize_per_tensor_affine(x, d, zi, 0, 255), r
    )
    clone = median_ms(lambda: x.clone(), r)
    rows.append((f"per-tensor forward, {n}", ours, theirs, "torch.fake_quantize_per_tensor_affine", 0.7))
    rows.append((f"per-tensor forward, {n}", ours, clone, "x.clone()", None))
    if dev.type == "cuda":  # one fused kernel from inductor, against torch's fused op
        fused = torch.compile(lambda t: affine_quantize(t, d, z, 256))
        rows.append((f"per-tensor fwd compiled, {n}", median_ms(lambda: fused(x), r), theirs, "torch fused op", None))

    xg = x.clone().requires_grad_()
    g = torch.randn_like(x)

    def ours_fb():
        affine_quantize(xg, d, z, 256).backward(g)
        xg.grad = None

    def theirs_fb():
        torch.fake_quantize_per_tensor_affine(xg, d, zi, 0, 255).backward(g)
        xg.grad = None

    def clone_fb():
        xg.clone().backward(g)
        xg.grad = None

    lo, hi = (0 - zp) * scale, (255 - zp) * scale

    def ours_clipped_fb():  # torch's gradient rule: zero outside the grid's range
        affine_quantize(gradient_clip(xg, lo, hi), d, z, 256).backward(g)
        xg.grad = None

    ours_ms, theirs_ms = pair_ms(ours_clipped_fb, theirs_fb, r)
    rows.append((f"per-tensor fwd+bwd, {n}", ours_ms, theirs_ms, "torch fused op", 1.0))
    rows.append((f"  straight-through gradient, {n}", median_ms(ours_fb, r), theirs_ms, "torch fused op", None))
    rows.append((f"  straight-through gradient, {n}", median_ms(ours_fb, r), median_ms(clone_fb, r), "x.clone()", None))

    # per-channel weight
    w = torch.randn(512, 512, 3, 3)
    sc = torch.rand(512) * 0.01 + 0.005
    zc = torch.randint(0, 256, (512,), dtype=torch.int32)
    sc4, zc4 = sc.view(-1, 1, 1, 1), zc.float().view(-1, 1, 1, 1)
    ours, theirs = pair_ms(
        lambda: affine_quantize(w, sc4, zc4, 256),
        lambda: torch.fake_quantize_per_channel_affine(w, sc, zc, 0, 0, 255),
        r,
    )
    rows.append(("per-channel forward, 512x512x3x3", ours, theirs, "torch.fake_quantize_per_channel_affine", 0.5))
    rows.append(("per-channel forward, 512x512x3x3", ours, median_ms(lambda: w.clone(), r), "w.clone()", None))
    if dev.type == "cuda":
        rows.append(per_group_row(r))

    # QAT call: observe + quantize
    fq_name = "FusedMovingAvgObsFakeQuantize"
    q = AffineQuantizer(8, ExpAvgMinMax())
    fq = FusedMovingAvgObsFakeQuantize().to(dev)

    def ours_qat():
        q.pre_observe(x)
        return q(x)

    ours_qat_ms, theirs_qat = pair_ms(ours_qat, lambda: fq(x), r)
    rows.append((f"QAT call (observe+quantize), {n}", ours_qat_ms, theirs_qat, fq_name, 0.8))
    if dev.type == "cuda":  # the same call compiled (observer update and quantization in inductor's kernels)
        qat_compiled = torch.compile(ours_qat)
        rows.append((f"QAT call compiled, {n}", median_ms(qat_compiled, r), theirs_qat, fq_name, None))

    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, median of {r} runs (ms)\n")
    print(f"{'case':<34} {'torchquant':>10} {'baseline':>10} {'ratio':>7} {'target':>7}  baseline")
    ok = True
    for case, a, b, name, target in rows:
        ratio = a / b
        if dev.type != "cpu" or (args.numel != NUMEL and "per-channel" not in case):
            target = None
        tgt = "" if target is None else f"<={target}"
        flag = "" if target is None else ("  ok" if ratio <= target else "  MISSED")
        ok &= target is None or ratio <= target
        print(f"{case:<34} {a:>10.2f} {b:>10.2f} {ratio:>7.2f} {tgt:>7}  {name}{flag}")
    if dev.type == "cpu":
        print("\nall targets met" if ok else "\nsome targets missed")


if __name__ == "__main__":
    main()
