"""Kernel launches and saved activations of one eager QAT training step, per variant, measured on the CPU.

An eager step on a GPU issues at least one kernel launch per aten operation that computes something, and a
launch costs the host several microseconds whatever the kernel's size: with hundreds of quantization points
the count decides whether the host keeps ahead of the GPU. This script needs no GPU. It runs the variants of
``benchmarks/qat_step.py`` (torchvision ResNets: float32, torchquant with and without torch.ao's work, torch.ao
eager QAT) on the CPU with the CUDA path taken (each of torchquant's Triton launches replaced by a stand-in and
counted as one launch), records every aten operation of one step (forward, cross-entropy, backward and SGD's
update, with its multi-tensor kernels as on a GPU) and leaves out what launches nothing (views, empty
allocations, host-side type helpers). It also measures the activation memory of a step: the bytes autograd saves
for the backward per sample (the growth from batch 2 to batch 4), the bulk of a step's peak memory on a GPU.

torch.ao's fused observer-fake-quant is one aten operation here; on a GPU it launches several kernels (the
range reduction, the running-range update, the grid and the fake quantization with its mask): its row is a
lower bound.

    python benchmarks/op_count.py [--arch resnet18] [--variants float32,fx,fx-ao,ao] [--top 10] [--size 64]
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import launch_overhead  # benchmarks/ is not a package

from torchquant import kernels

# aten operations that launch no kernel: allocations without a fill, host-side helpers, profiler markers
NO_LAUNCH = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "promote_types",
        "result_type",
        "scalar_tensor",
        "detach",
        "lift_fresh",
        "_record_function_enter_new",
        "_record_function_exit",
    }
)


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it that launch work (views and ``NO_LAUNCH`` left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if not self.paused and not func.is_view and name not in NO_LAUNCH:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_triton_launches(counter: list[OpCounter | None]) -> None:
    """Route CPU tensors through the kernel path (``launch_overhead.stub_kernel_launches``) and count each
    stand-in call as one launch of its Triton kernel in ``counter[0]`` (its own operations are not counted)."""
    launch_overhead.stub_kernel_launches()
    stub = kernels._impl(torch.device("cpu"))

    def counted(name, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            c = counter[0]
            if c is None:
                return fn(*args, **kwargs)
            c.ops[f"triton:{name}"] += 1
            c.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                c.paused = False

        return run

    for name, fn in list(vars(stub).items()):
        if name.islower() and callable(fn):  # the stand-ins (constants are upper case, Layout a class)
            setattr(stub, name, counted(name, fn))


def one_step_ops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, counter: list[OpCounter | None]):
    """The operations of the third SGD step of ``model`` (the first two allocate the observers' state)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)  # CUDA's default

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()
    counter[0] = c = OpCounter()
    with c:
        step()
    counter[0] = None
    return c.ops


def saved_bytes_per_sample(model: torch.nn.Module, size: int) -> float:
    """Bytes autograd keeps for the backward per sample of ``3 x size x size``: the activation memory of a step.

    The tensors saved by one forward (unique storages, parameters and buffers left out) at batch 4 less batch 2,
    halved: what grows with the batch, the weights' quantized copies left out.
    """
    model.train()
    held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    totals = []
    for n in (2, 4):
        x = torch.randn(n, 3, size, size)
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, saved=saved) -> torch.Tensor:
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), torch.zeros(n, dtype=torch.long))
        totals.append(sum(v for k, v in saved.items() if k not in held and k != x.untyped_storage().data_ptr()))
        del loss
    return (totals[1] - totals[0]) / 2


def main() -> None:
    import qat_step  # torchvision's models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet50"))
    keys = ",".join(k for k, _, _ in qat_step.SPECS)
    parser.add_argument("--variants", default=keys, help=f"from {keys}")
    parser.add_argument("--top", type=int, default=10, help="the most frequent operations listed per variant")
    parser.add_argument("--size", type=int, default=64, help="input 3 x size x size (the count does not depend on it)")
    args = parser.parse_args()
    wanted = args.variants.split(",")
    unknown = set(wanted) - {k for k, _, _ in qat_step.SPECS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {keys}")
    counter: list[OpCounter | None] = [None]
    count_triton_launches(counter)
    torch.manual_seed(0)
    x = torch.randn(2, 3, args.size, args.size)
    y = torch.randint(0, 1000, (2,))
    rows = []
    for key, name, make in qat_step.SPECS:
        if key in wanted:
            model = make(args.arch)
            n_quantizers = sum(1 for m in model.modules() if type(m).__name__.endswith("Quantizer"))
            n_quantizers += sum(1 for m in model.modules() if type(m).__name__ == "FusedMovingAvgObsFakeQuantize")
            ops = one_step_ops(model, x, y, counter)
            rows.append((name, n_quantizers, ops, saved_bytes_per_sample(model, args.size)))
    base = next((sum(ops.values()) for name, _, ops, _ in rows if name == "float32"), None)
    base_saved = next((saved for name, _, _, saved in rows if name == "float32"), None)
    print(
        f"{args.arch}, one SGD step (forward, cross-entropy, backward, update), torch {torch.__version__}: kernel "
        "launches an eager CUDA step issues, counted on the CPU (torch.ao's fused observer-fake-quant as one), "
        f"and the activations autograd keeps for the backward, per sample of 3x{args.size}x{args.size}"
    )
    head = f"{'launches':>9} {'triton':>7} {'quantizers':>11} {'above float32':>14} {'per quantizer':>14}"
    print(f"{'variant':<32} {head} {'saved KiB':>10} {'vs float32':>11}")
    for name, n_q, ops, saved in rows:
        total = sum(ops.values())
        triton = sum(v for k, v in ops.items() if k.startswith("triton:"))
        extra = f"{'':>14}" if base is None else f"{total - base:>14d}"
        per_q = f"{'':>14}" if base is None or not n_q else f"{(total - base) / n_q:>14.1f}"
        ratio = f"{'':>11}" if not base_saved else f"{saved / base_saved:>10.2f}x"
        print(f"{name:<32} {total:>9d} {triton:>7d} {n_q:>11d} {extra} {per_q} {saved / 1024:>10.1f} {ratio}")
    for name, _, ops, _ in rows:
        print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in ops.most_common(args.top)))


if __name__ == "__main__":
    main()
