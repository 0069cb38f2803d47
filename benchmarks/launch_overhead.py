"""Host-side cost of one quantization call on a GPU, layer by layer: where the microseconds go.

On a GPU a fake quantization of a few million elements takes tens of microseconds of kernel
time, so the Python and launch path in front of it decides the speed of an eager QAT step.
This script issues each call ``--calls`` times without synchronising and divides the host
time by the count (the GPU queue absorbs the kernels), then prints the same calls timed one
by one between synchronisations:

* floors: ``torch.empty_like``, ``x.clone()``, torch's fused fake quant, an empty Triton
  kernel with one pointer and with twenty arguments, the latter also launched without Triton's
  JIT dispatch (what a launcher cached per specialisation would cost);
* torchquant's layers: the Triton launcher alone (``kernels._triton.fake_quant``),
  ``affine_quantize``, ``AffineQuantizer.quantize`` (grid from the observer's ranges),
  ``observe_batch`` (the observer's reduction and update, one kernel; also against ``torch.aminmax`` and
  the update kernel, the path of other granularities), the whole QAT call, a
  ``QWrapper`` forward in QUANT_AWARE_TRAIN, and one training step (forward and backward) of a
  20-block Conv+BN+ReLU net quantized by ``quantize_model`` against the same net in float.

    python benchmarks/launch_overhead.py [--device cuda] [--numel 1048576] [--calls 2000]
    python benchmarks/launch_overhead.py --stub-kernels --numel 32

On the CPU (no Triton path) it prints the torch path's host cost for comparison. With
``--stub-kernels`` the CPU takes the kernel path with every launch replaced by a copy of
its input (and the observer's kernel by nothing): the rows then give torchquant's own Python on
that path, which a GPU would add to the launches, measurable on a machine without one
(use a small ``--numel`` so that the remaining torch reductions cost little).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

import torchquant as tq
from torchquant import kernels


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def host_us(fn: Callable[[], object], calls: int, dev: torch.device) -> float:
    """Host microseconds per call, calls queued back to back."""
    for _ in range(20):
        fn()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t
    _sync(dev)
    return host / calls * 1e6


def synced_us(fn: Callable[[], object], calls: int, dev: torch.device) -> float:
    """Wall microseconds per call, each call followed by a synchronisation."""
    times = []
    for _ in range(min(calls, 200)):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2] * 1e6


def _empty_kernels():
    """Empty Triton kernels: one pointer; 4 pointers and 16 integers (about what the fake-quant
    kernel takes); the same with the integers left unspecialised (no divisibility-by-16 and
    equal-to-1 checks in Triton's binder, one compiled variant for every value)."""
    import triton

    def empty1(p):
        pass

    def empty20(p, q, r, s, a, b, c, d, e, f, g, h, i, j, k, m, n, o, u, v):
        pass

    ints = list(empty20.__code__.co_varnames[4:20])
    return triton.jit(empty1), triton.jit(empty20), triton.jit(do_not_specialize=ints)(empty20)


_DEPTH = 20


def _small_nets(dev: torch.device) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A float net of ``_DEPTH`` Conv(8ch)+BN+ReLU blocks and a classifier, its ``quantize_model`` copy
    in QUANT_AWARE_TRAIN (qat_step.py's quantizers), and an input: small enough that a step's host
    cost shows on a CPU."""
    torch.manual_seed(0)

    def net() -> nn.Module:
        blocks = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
        for _ in range(_DEPTH - 1):
            blocks += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
        return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).to(dev)

    qat = tq.quantize_model(
        net(),
        lambda m: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True),
        lambda m: tq.AffineQuantizer(8, tq.ExpAvgMinMax()),
    )
    tq.set_qmodule_state(qat, tq.QModuleState.QUANT_AWARE_TRAIN)
    x = torch.randn(2, 3, 8, 8, device=dev)
    _step(qat, x)  # the first observation allocates the observers' state
    return net(), qat, x


def _step(model: nn.Module, x: torch.Tensor) -> None:
    model(x).square().mean().backward()
    for p in model.parameters():
        p.grad = None


def _direct_launch(jit_fn, args: tuple) -> Callable[[], object]:
    """``jit_fn[(1,)](*args)`` without Triton's JIT dispatch (argument binding, specialisation and
    cache key on every call): the compiled kernel's own launcher, called as ``JITFunction.run``
    calls it. Measures what a launcher cached per specialisation would save; Triton-internal, so
    a diagnostic row only (the script reports it as failed where this Triton differs)."""
    from triton import knobs
    from triton.runtime import driver

    kernel = jit_fn[(1,)](*args)  # compiles, launches once, returns the compiled kernel
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    meta = kernel.launch_metadata((1,), stream, *args)
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return lambda: kernel.run(1, 1, 1, stream, kernel.function, kernel.packed_metadata, meta, *hooks, *args)


def stub_kernel_launches() -> None:
    """Route CPU tensors through the kernel path, with every launch replaced by an empty output."""
    import types

    real = kernels.interpreted()  # the layouts and constants; nothing of it is launched
    stub = types.SimpleNamespace(**{n: getattr(real, n) for n in dir(real) if n.isupper() or n == "Layout"})
    # A copy, not torch.empty_like: garbage values would reach the next layer's observer.
    stub.minifloat = stub.lsq_forward = lambda x, *a, **kw: x.clone()
    stub.fake_quant = lambda x, *a, with_mask=False, **kw: (
        (x.clone(), x.new_empty((x.numel() + 7) // 8, dtype=torch.uint8)) if with_mask else x.clone()
    )
    stub.masked_grad = lambda grad, *a, **kw: grad.clone()
    stub.observe = lambda *a, **kw: None
    stub.observe_rows = lambda *a, **kw: True
    kernels._impl = lambda device: stub
    kernels._DEVICES.add("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--numel", type=int, default=1 << 20)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--stub-kernels", action="store_true", help="CPU only: the kernel path, launches stubbed")
    args = parser.parse_args()
    dev = torch.device(args.device)
    if args.stub_kernels:
        if dev.type != "cpu":
            parser.error("--stub-kernels measures the kernel path's Python on the CPU; leave out --device")
        stub_kernel_launches()
    torch.manual_seed(0)
    x = torch.randn(args.numel, device=dev)
    d, z = torch.tensor(0.05, device=dev), torch.tensor(128.0, device=dev)
    zi = torch.tensor(128, dtype=torch.int32, device=dev)
    fused = torch.ao.quantization.FusedMovingAvgObsFakeQuantize().to(dev)
    rows: list[tuple[str, Callable[[], object]] | tuple[str, Callable[[], object], int]] = [
        ("torch.empty_like", lambda: torch.empty_like(x)),
        ("x.clone()", lambda: x.clone()),
        ("torch.fake_quantize_per_tensor_affine", lambda: torch.fake_quantize_per_tensor_affine(x, d, zi, 0, 255)),
        ("torch.ao FusedMovingAvgObsFakeQuantize", lambda: fused(x)),
    ]
    kernel_path = dev.type == "cuda" and kernels.triton_available()
    if kernel_path:
        empty1, empty20, empty20_plain = _empty_kernels()
        k = kernels._compiled()
        layout = k.Layout.for_broadcast(x, d)
        rows += [
            ("triton: empty kernel, 1 pointer", lambda: empty1[(1,)](x)),
            ("triton: empty kernel, 20 arguments", lambda: empty20[(1,)](x, x, x, x, *range(1, 17))),
            ("triton: same, integers not specialised", lambda: empty20_plain[(1,)](x, x, x, x, *range(1, 17))),
        ]
        try:
            rows.append(
                ("triton: 20 arguments, compiled kernel direct", _direct_launch(empty20, (x, x, x, x, *range(1, 17))))
            )
        except Exception as e:  # Triton-internal: a diagnostic row
            print(f"the direct-launch row is left out: {type(e).__name__}: {e}")
        rows += [
            ("kernels._triton.fake_quant (launcher)", lambda: k.fake_quant(x, d, z, layout, k.MODE_GRID, 0.0, 255.0)),
        ]
    q = tq.AffineQuantizer(8, tq.ExpAvgMinMax()).to(dev)
    q.pre_observe(x)
    q.pre_observe(x)  # the second observation takes the kernel path on a GPU

    def qat_call():
        q.pre_observe(x)
        return q(x)

    # A small layer, so that its compute does not hide the wrapper's host cost on a CPU.
    layers = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).to(dev)
    w = tq.QWrapper(
        list(layers),
        tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True),
        tq.AffineQuantizer(8, tq.ExpAvgMinMax()),
    ).to(dev)
    tq.set_qmodule_state(w, tq.QModuleState.QUANT_AWARE_TRAIN)
    xc = torch.randn(2, 16, 8, 8, device=dev)
    w(xc)
    # ExpAvgMinMax's update of per-tensor state, on the two kernel paths (the rows only differ where Triton runs)
    state = [torch.zeros((), device=dev) for _ in range(4)]  # min, max, ema min, ema max
    counters = torch.zeros((), dtype=torch.long, device=dev), torch.zeros((), dtype=torch.int32, device=dev)
    ema = dict(num_batches=counters[0], ema_min=state[2], ema_max=state[3], decay=torch.ones((), device=dev))
    scratch = kernels.observe_scratch(1, dev)
    if kernels.enabled(x):
        rows += [
            (
                "observe: torch.aminmax, then the update kernel",
                lambda: kernels.observe_minmax(
                    kernels.KIND_EMA, *torch.aminmax(x), *state[:2], counters[1], momentum=0.9, **ema
                ),
            ),
            (
                "observe: reduction and update, one kernel",
                lambda: kernels.observe_minmax_rows(
                    kernels.KIND_EMA, x, 1, scratch, *state[:2], counters[1], momentum=0.9, **ema
                ),
            ),
        ]
    rows += [
        ("tq.affine_quantize", lambda: tq.affine_quantize(x, d, z, 256)),
        ("AffineQuantizer.quantize", lambda: q(x)),
        ("RangeObserver.observe_batch (ExpAvgMinMax)", lambda: q.range_observer.observe_batch(x)),
        ("QAT call (observe + quantize)", qat_call),
        ("QWrapper conv3x3+BN+ReLU 16ch, QAT forward", lambda: w(xc)),
        ("same Conv+BN+ReLU in float", lambda: layers(xc)),
    ]
    float_net, qat_net, xn = _small_nets(dev)
    n_wrappers = sum(isinstance(m, tq.QWrapper) for m in qat_net.modules())
    steps = max(args.calls // 50, 5)  # a step issues about 50 quantizer calls
    rows += [
        (f"QAT step (fwd+bwd), {n_wrappers} QWrappers, fx", lambda: _step(qat_net, xn), steps),
        ("same net's step in float", lambda: _step(float_net, xn), steps),
    ]
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    path = "stubbed launches" if args.stub_kernels else kernel_path
    print(f"torch {torch.__version__}, {where}, {args.numel} elements, kernel path: {path}")
    print(f"{'call':<46} {'host us/call':>13} {'synced us':>10}")
    for name, fn, *n in rows:
        calls = n[0] if n else args.calls
        try:
            print(f"{name:<46} {host_us(fn, calls, dev):>13.1f} {synced_us(fn, calls, dev):>10.1f}")
        except Exception as e:  # a diagnostic: report the row and go on
            print(f"{name:<46} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


if __name__ == "__main__":
    main()
