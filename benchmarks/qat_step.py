"""QAT training-step speed (and GPU memory): torchquant against float32 and torch.ao eager QAT on torchvision ResNets.

Measures, in one run, the median wall-clock time of one SGD step (forward +
cross-entropy + backward + ``optimizer.step``) of torchvision ``resnet18`` or
``resnet50`` (``--arch``) at ``--batch`` x 3 x ``--size`` x ``--size``, for:

* ``float32``: the plain torchvision model;
* ``torchquant FusedResNet``: ``FusedResNet(quantize_first=True, quantize_fc=True)``
  with 8-bit symmetric per-channel weights (``AffineQuantizer(8, BatchMinMax(axis=0),
  symmetric=True)``, the weight grid of torch.ao's x86 QAT qconfig) and
  8-bit per-tensor activations (``AffineQuantizer(8, ExpAvgMinMax())``) at every
  conv output, residual add, the pooling and the classifier, in ``QUANT_AWARE_TRAIN``;
* ``torchquant quantize_model(fx)``: the same quantizers through
  ``tq.quantize_model(method="fx")``, reported as unavailable (with the reason)
  where this torchquant has no fx path; it never falls back to another method;
* ``torchquant FusedResNet as ao`` / ``torchquant fx as ao``: the same, doing torch.ao's
  work: BatchNorm folded into the quantized weight in training, its batch statistics read
  from the quantized convolution's output (``fold_bn="one_pass"``, as its ConvBn modules)
  and the gradient zero outside each grid (``gradient_clip=True``, as its fake-quant's
  mask); these rows, not the two above, are compared with torch.ao;
* ``torch.ao eager QAT``: torchvision's quantizable ResNet, ``fuse_model(is_qat=True)``
  (``fuse_modules_qat``) and ``prepare_qat`` with ``get_default_qat_qconfig("x86")``;
* each of the above under ``torch.compile`` (default inductor backend).

Steps are interleaved round-robin across the variants, so machine noise hits them
alike, and the ratios against float32 (eager rows against eager float32, compiled
rows against compiled float32) come from this one run.

CPU (the default): resnet18, batch 16, 112x112, ``torch.set_num_threads(2)``, 15 timed
steps. Targets (issue 3): torchquant eager <= 1.20x, torchquant compiled <= 1.05x.

CUDA (``--device cuda``; default 224x224, batch 64, 10 timed steps): each step is timed
between ``torch.cuda.synchronize()`` calls, and a peak-memory column gives the memory one
step allocates above what is resident before it (models, optimizer state, inputs; the
gradients are freed between steps), ``max_memory_allocated`` after
``reset_peak_memory_stats`` minus ``memory_allocated`` before, measured for each variant
on one step of its own. The build column is the time of the first (eager) step and, for
compiled rows, of the two compiling steps. The host column is the time to issue a step (Python, dispatch
and launches) before the synchronisation: well below the step time, the GPU bounds the step; near it, the host
does, or the host waited for the GPU (a full launch queue, about a thousand kernels, or an allocation that
synchronises): the profile (``--profile``) tells them apart.
Targets (issue 16): torchquant eager (the rows doing
torch.ao's work) <= torch.ao eager QAT's time, torchquant compiled <= 1.05x compiled float32, peak step memory <= 1.3x
float32's in the same mode. ``--profile`` adds, per eager variant (float32 and
quantize_model(fx) unless ``--profile-variants``), the kernels launched in one step and the
15 kernels that take the most device time (``torch.profiler``).

    python benchmarks/qat_step.py [--steps 15] [--no-compile]
    python benchmarks/qat_step.py --device cuda [--arch resnet50] [--batch 64] [--size 224] [--no-compile]
        [--variants float32,fused,fx,ao] [--compiled-variants float32,fx] [--budget 240] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import torchquant as tq
from torchquant.models import FusedResNet

GiB = 2.0**30


def wq(module, name=""):
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)


def aq(module, name=""):
    return tq.AffineQuantizer(8, tq.ExpAvgMinMax())


def wq_clip(module, name=""):
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True, gradient_clip=True)


def aq_clip(module, name=""):
    return tq.AffineQuantizer(8, tq.ExpAvgMinMax(), gradient_clip=True)


def make_float(arch: str) -> nn.Module:
    return getattr(torchvision.models, arch)(num_classes=1000)


def make_fused(arch: str) -> nn.Module:
    m = FusedResNet(make_float(arch), wq, aq, quantize_first=True, quantize_fc=True)
    tq.set_qmodule_state(m, tq.QModuleState.QUANT_AWARE_TRAIN)
    return m


def make_fx(arch: str) -> nn.Module:
    m = tq.quantize_model(make_float(arch), wq, aq, method="fx")
    tq.set_qmodule_state(m, tq.QModuleState.QUANT_AWARE_TRAIN)
    return m


def make_fused_ao(arch: str) -> nn.Module:
    # torch.ao's work: BatchNorm folded into the quantized weight in training, one convolution whose output gives
    # the batch statistics (its ConvBn modules), gradient zero outside each grid (its fake-quant's mask)
    m = FusedResNet(make_float(arch), wq_clip, aq_clip, quantize_first=True, quantize_fc=True, fold_bn="one_pass")
    tq.set_qmodule_state(m, tq.QModuleState.QUANT_AWARE_TRAIN)
    return m


def make_fx_ao(arch: str) -> nn.Module:
    m = tq.quantize_model(make_float(arch), wq_clip, aq_clip, method="fx", fold_bn="one_pass")
    tq.set_qmodule_state(m, tq.QModuleState.QUANT_AWARE_TRAIN)
    return m


def make_ao(arch: str) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat
    from torchvision.models import quantization

    m = getattr(quantization, arch)(weights=None, quantize=False).train()
    m.fuse_model(is_qat=True)  # fuse_modules_qat on conv+bn(+relu)
    m.qconfig = get_default_qat_qconfig("x86")
    prepare_qat(m, inplace=True)
    return m


# key (for --variants), row name, builder
SPECS: list[tuple[str, str, Callable[[str], nn.Module]]] = [
    ("float32", "float32", make_float),
    ("fused", "torchquant FusedResNet", make_fused),
    ("fx", "torchquant quantize_model(fx)", make_fx),
    ("fused-ao", "torchquant FusedResNet as ao", make_fused_ao),
    ("fx-ao", "torchquant fx as ao", make_fx_ao),
    ("ao", "torch.ao eager QAT", make_ao),
]
# The rows that do torch.ao's work (BatchNorm folded in training, clipped straight-through gradient), compared
# with it; the others quantize after an unfolded BatchNorm with a straight-through gradient (less work).
LIKE_AO = ("torchquant FusedResNet as ao", "torchquant fx as ao")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    def __init__(self, name: str, model: nn.Module, compiled: bool, device: torch.device, batch: int, size: int):
        self.name = name
        self.device = device
        self.batch, self.size = batch, size
        model.to(device).train()
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.model = model
        self.times: list[float] = []
        self.host_times: list[float] = []
        self.peak_bytes: float | None = None
        # one eager step first: observers allocate their buffers on first use
        t = time.perf_counter()
        self.step_fn = self._make_step(model)
        self.step_fn()
        if compiled:
            self.step_fn = self._make_step(torch.compile(model))
            for _ in range(2):  # compile forward and backward
                self.step_fn()
        sync(device)
        self.build_s = time.perf_counter() - t

    def _make_step(self, model: nn.Module) -> Callable[[], None]:
        x = torch.randn(self.batch, 3, self.size, self.size, device=self.device)
        y = torch.randint(0, 1000, (self.batch,), device=self.device)

        def step() -> None:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

        return step

    def timed_step(self) -> None:
        sync(self.device)
        t = time.perf_counter()
        self.step_fn()
        self.host_times.append(time.perf_counter() - t)  # issued; on CUDA the device may still be working
        sync(self.device)
        self.times.append(time.perf_counter() - t)

    def measure_peak(self) -> None:
        """Bytes one step allocates above what is resident before it (CUDA only)."""
        sync(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step_fn()
        sync(self.device)
        self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - before

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3

    @property
    def host_ms(self) -> float:
        """Median time to issue a step (Python and launches), before waiting for the device."""
        return statistics.median(self.host_times) * 1e3


def build(name: str, make: Callable[[], nn.Module], compiled: bool, **kw) -> Variant | str:
    try:
        return Variant(name, make(), compiled, **kw)
    except Exception as e:  # reported as a row, never silently replaced by another method
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if compiled and not isinstance(e, NotImplementedError):
            traceback.print_exc(limit=2)
        return f"unavailable ({msg[:110]})"


def run_or_drop(rows: list[tuple[str, bool, Variant | str]], v: Variant, fn: Callable[[], None]) -> None:
    """Run ``fn``; if it raises, the variant's row becomes the error (the other variants go on)."""
    for i, (name, compiled, r) in enumerate(rows):
        if r is v:
            try:
                fn()
            except Exception as e:
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                rows[i] = (name, compiled, f"failed ({msg[:110]})")


def profile_step(v: Variant, top: int = 15) -> None:
    """Kernels launched by one step of ``v`` and the ``top`` kernels by device time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if v.device.type == "cuda" else [])
    sync(v.device)
    with profile(activities=activities) as prof:
        v.step_fn()
        sync(v.device)
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")):
            kernels.setdefault(e.name, []).append(e.time_range.elapsed_us())
    # runtime and driver calls: cudaLaunchKernel(ExC) from aten, cuLaunchKernel(Ex) from Triton and cuDNN
    launches = sum(1 for e in prof.events() if e.name.startswith("cu") and "LaunchKernel" in e.name)
    total_us = sum(sum(t) for t in kernels.values())
    print(
        f"\nprofile of one eager step, {v.name}: {sum(map(len, kernels.values()))} kernels on the device "
        f"({launches} launch calls on the host), {total_us / 1e3:.1f} ms of kernel time"
    )
    if kernels:
        print(f"{'calls':>6} {'total ms':>9} {'share':>6}  kernel")
        for name, ts in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:top]:
            print(f"{len(ts):>6} {sum(ts) / 1e3:>9.2f} {100 * sum(ts) / total_us:>5.1f}%  {name[:110]}")
    sort_by = "self_device_time_total" if v.device.type == "cuda" else "self_cpu_time_total"
    try:
        print(prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=60))
    except (AttributeError, KeyError, ValueError) as e:  # the column's name changed between torch versions
        print(f"(key_averages table by {sort_by} unavailable: {e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 15 CPU, 10 CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet50"))
    parser.add_argument("--batch", type=int, default=None, help="default 16 on the CPU, 64 on CUDA")
    parser.add_argument("--size", type=int, default=None, help="input is 3 x size x size; default 112 CPU, 224 CUDA")
    keys = ",".join(k for k, _, _ in SPECS)
    parser.add_argument("--variants", default=keys, help=f"eager variants to build, in this order, from {keys}")
    parser.add_argument("--compiled-variants", default=None, help="compiled variants (default: --variants)")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds: compiled variants not yet built by then are skipped"
    )
    parser.add_argument("--profile", action="store_true", help="profile one eager step (see the docstring)")
    parser.add_argument("--profile-variants", default="float32,fx")
    args = parser.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    steps = args.steps if args.steps is not None else (10 if cuda else 15)
    batch = args.batch if args.batch is not None else (64 if cuda else 16)
    size = args.size if args.size is not None else (224 if cuda else 112)
    eager_keys = args.variants.split(",")
    compiled_keys = (args.compiled_variants or args.variants).split(",")
    unknown = set(eager_keys + compiled_keys) - {k for k, _, _ in SPECS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {keys}")
    if not cuda:
        torch.set_num_threads(2)
    torch.manual_seed(0)
    t0 = time.perf_counter()

    rows: list[tuple[str, bool, Variant | str]] = []
    for compiled in (False, True) if not args.no_compile else (False,):
        by_key = {key: (name, make) for key, name, make in SPECS}
        for key in compiled_keys if compiled else eager_keys:  # built in the order given
            name, make = by_key[key]
            if compiled and args.budget is not None and time.perf_counter() - t0 > args.budget:
                rows.append((name, compiled, f"skipped (time budget of {args.budget:.0f} s spent)"))
                continue
            # on CUDA the line ends with the build (and compile) time
            print(f"building {name}{' (compiled)' if compiled else ''} ...", end=" " if cuda else "\n", flush=True)
            v = build(name, lambda make=make: make(args.arch), compiled, device=dev, batch=batch, size=size)
            rows.append((name, compiled, v))
            if cuda:
                print(f"{v.build_s:.1f} s" if isinstance(v, Variant) else v, flush=True)

    variants = [v for _, _, v in rows if isinstance(v, Variant)]
    for _ in range(2):  # warm-up
        for v in variants:
            run_or_drop(rows, v, v.step_fn)
    for _ in range(steps):
        for v in variants:
            run_or_drop(rows, v, v.timed_step)
    if cuda:
        for v in variants:
            run_or_drop(rows, v, v.measure_peak)

    threads = f"{torch.get_num_threads()} threads" if not cuda else torch.cuda.get_device_name(dev)
    print(
        f"\n{args.arch}, batch {batch}, 3x{size}x{size}, SGD step (fwd+bwd+step), torch {torch.__version__}, "
        f"{threads}, median of {steps} interleaved steps"
    )
    base = {c: v for n, c, v in rows if n == "float32"}
    ao = {c: v for n, c, v in rows if n == "torch.ao eager QAT"}
    if not cuda:
        print(f"{'variant':<32} {'mode':<9} {'ms/step':>9} {'vs float32':>11}  target")
        targets = {("torchquant FusedResNet", False): 1.20, ("torchquant FusedResNet", True): 1.05}
        targets.update({("torchquant quantize_model(fx)", c): t for (_, c), t in list(targets.items())})
        for name, compiled, v in rows:
            mode = "compiled" if compiled else "eager"
            if not isinstance(v, Variant):
                print(f"{name:<32} {mode:<9} {v}")
                continue
            b = base.get(compiled)
            ratio = v.median_ms / b.median_ms if isinstance(b, Variant) else float("nan")
            t = targets.get((name, compiled))
            verdict = "" if t is None else f"<= {t:.2f}x {'met' if ratio <= t else 'MISSED'}"
            a = ao.get(compiled)
            if name in LIKE_AO and isinstance(a, Variant):
                verdict = f"{v.median_ms / a.median_ms:.2f}x torch.ao's ({mode})"
            print(f"{name:<32} {mode:<9} {v.median_ms:>9.1f} {ratio:>10.2f}x  {verdict}")
    else:
        print_cuda_table(rows, base)
    if args.profile:
        wanted = {name for key, name, _ in SPECS if key in args.profile_variants.split(",")}
        for name, compiled, v in rows:
            if not compiled and name in wanted and isinstance(v, Variant):
                profile_step(v)


def print_cuda_table(rows: list[tuple[str, bool, Variant | str]], base: dict[bool, Variant | str]) -> None:
    """The CUDA table: time, peak step memory, their ratios to float32, and issue 16's targets."""
    head = (
        f"{'variant':<30} {'mode':<9} {'ms/step':>8} {'host ms':>8} {'vs f32':>7} {'peak GiB':>9} {'vs f32':>7} "
        f"{'build s':>8}"
    )
    print(f"{head}  targets")
    ao = {c: v for n, c, v in rows if n == "torch.ao eager QAT"}
    for name, compiled, v in rows:
        mode = "compiled" if compiled else "eager"
        if not isinstance(v, Variant):
            print(f"{name:<30} {mode:<9} {v}")
            continue
        b = base.get(compiled)
        has_base = isinstance(b, Variant)
        t_ratio = v.median_ms / b.median_ms if has_base else float("nan")
        m_ratio = v.peak_bytes / b.peak_bytes if has_base and b.peak_bytes else float("nan")
        verdicts = []
        if name.startswith("torchquant"):
            a = ao.get(False)
            if not compiled and isinstance(a, Variant) and name in LIKE_AO:
                r = v.median_ms / a.median_ms
                verdicts.append(f"time <= torch.ao eager ({r:.2f}x): {'met' if r <= 1.0 else 'MISSED'}")
            if compiled and has_base:
                verdicts.append(f"time <= 1.05x: {'met' if t_ratio <= 1.05 else 'MISSED'}")
            if has_base:
                verdicts.append(f"memory <= 1.30x: {'met' if m_ratio <= 1.30 else 'MISSED'}")
        print(
            f"{name:<30} {mode:<9} {v.median_ms:>8.1f} {v.host_ms:>8.1f} {t_ratio:>6.2f}x {v.peak_bytes / GiB:>9.2f} "
            f"{m_ratio:>6.2f}x {v.build_s:>8.1f}  {'; '.join(verdicts)}"
        )


if __name__ == "__main__":
    main()
