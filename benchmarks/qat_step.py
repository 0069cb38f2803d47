"""QAT training-step speed: torchquant against float32 and torch.ao eager QAT, on torchvision resnet18.

Measures, in one run with ``torch.set_num_threads(2)``, the median wall-clock
time of one SGD step (forward + cross-entropy + backward + ``optimizer.step``)
at batch 16, 3x112x112, for:

* ``float32``: the plain torchvision model;
* ``torchquant FusedResNet``: ``FusedResNet(quantize_first=True, quantize_fc=True)``
  with 8-bit symmetric per-channel weights (``AffineQuantizer(8, BatchMinMax(axis=0),
  symmetric=True)``, the weight grid of torch.ao's x86 QAT qconfig) and
  8-bit per-tensor activations (``AffineQuantizer(8, ExpAvgMinMax())``) at every
  conv output, residual add, the pooling and the classifier, in ``QUANT_AWARE_TRAIN``;
* ``torchquant quantize_model(fx)``: the same quantizers through
  ``tq.quantize_model(method="fx")``, reported as unavailable (with the reason)
  where this torchquant has no fx path; it never falls back to another method;
* ``torch.ao eager QAT``: torchvision's quantizable resnet18, ``fuse_model(is_qat=True)``
  (``fuse_modules_qat``) and ``prepare_qat`` with ``get_default_qat_qconfig("x86")``;
* each of the above under ``torch.compile`` (default inductor backend).

Steps are interleaved round-robin across the variants, so machine noise hits them
alike, and the ratios against float32 (eager rows against eager float32, compiled
rows against compiled float32) come from this one run.
Targets (issue 3): torchquant eager <= 1.20x, torchquant compiled <= 1.05x.

    python benchmarks/qat_step.py [--steps 15] [--no-compile]
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

BATCH, SIZE = 16, 112


def wq(module, name=""):
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)


def aq(module, name=""):
    return tq.AffineQuantizer(8, tq.ExpAvgMinMax())


def make_float() -> nn.Module:
    return torchvision.models.resnet18(num_classes=1000)


def make_fused() -> nn.Module:
    m = FusedResNet(make_float(), wq, aq, quantize_first=True, quantize_fc=True)
    tq.set_qmodule_state(m, tq.QModuleState.QUANT_AWARE_TRAIN)
    return m


def make_fx() -> nn.Module:
    m = tq.quantize_model(make_float(), wq, aq, method="fx")
    tq.set_qmodule_state(m, tq.QModuleState.QUANT_AWARE_TRAIN)
    return m


def make_ao() -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat
    from torchvision.models.quantization import resnet18 as q_resnet18

    m = q_resnet18(weights=None, quantize=False).train()
    m.fuse_model(is_qat=True)  # fuse_modules_qat on conv+bn(+relu)
    m.qconfig = get_default_qat_qconfig("x86")
    prepare_qat(m, inplace=True)
    return m


class Variant:
    def __init__(self, name: str, model: nn.Module, compiled: bool) -> None:
        self.name = name
        model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.model = model
        self.times: list[float] = []
        # one eager step first: observers allocate their buffers on first use
        self.step_fn = self._make_step(model)
        self.step_fn()
        if compiled:
            self.step_fn = self._make_step(torch.compile(model))
            for _ in range(2):  # compile forward and backward
                self.step_fn()

    def _make_step(self, model: nn.Module) -> Callable[[], None]:
        x = torch.randn(BATCH, 3, SIZE, SIZE)
        y = torch.randint(0, 1000, (BATCH,))

        def step() -> None:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

        return step

    def timed_step(self) -> None:
        t = time.perf_counter()
        self.step_fn()
        self.times.append(time.perf_counter() - t)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3


def build(name: str, make: Callable[[], nn.Module], compiled: bool) -> Variant | str:
    try:
        return Variant(name, make(), compiled)
    except Exception as e:  # reported as a row, never silently replaced by another method
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if compiled and not isinstance(e, NotImplementedError):
            traceback.print_exc(limit=2)
        return f"unavailable ({msg[:110]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per variant (after warm-up)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)

    specs = [
        ("float32", make_float),
        ("torchquant FusedResNet", make_fused),
        ("torchquant quantize_model(fx)", make_fx),
        ("torch.ao eager QAT", make_ao),
    ]
    rows: list[tuple[str, bool, Variant | str]] = []
    for compiled in (False, True) if not args.no_compile else (False,):
        for name, make in specs:
            print(f"building {name}{' (compiled)' if compiled else ''} ...", flush=True)
            rows.append((name, compiled, build(name, make, compiled)))

    variants = [v for _, _, v in rows if isinstance(v, Variant)]
    for _ in range(2):  # warm-up
        for v in variants:
            v.step_fn()
    for _ in range(args.steps):
        for v in variants:
            v.timed_step()

    print(
        f"\nresnet18, batch {BATCH}, 3x{SIZE}x{SIZE}, SGD step (fwd+bwd+step), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.steps} interleaved steps"
    )
    print(f"{'variant':<32} {'mode':<9} {'ms/step':>9} {'vs float32':>11}  target")
    base = {c: v for n, c, v in rows if n == "float32"}
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
        print(f"{name:<32} {mode:<9} {v.median_ms:>9.1f} {ratio:>10.2f}x  {verdict}")


if __name__ == "__main__":
    main()
