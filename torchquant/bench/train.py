"""The experiment layer's training and evaluation loops, in one process or under ``torchrun``.

Every experiment trains and evaluates through :func:`train` and :func:`evaluate`: the
tutorials and ``benchmarks/`` with ``(x, y)`` tensors, ``torchquant bench`` with a
:class:`BenchData` task and a :class:`Runtime`. Under ``torchrun`` each global batch
(drawn from the same seeded permutation on every rank) is split between the ranks,
gradients are averaged by DistributedDataParallel, range observers are synchronised
(:func:`torchquant.distributed.sync_observers`) and accuracy counts are summed over
the ranks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import sync_observers
from ..utils import progress_bar
from .data import Split

__all__ = ["BenchData", "Runtime", "accuracy", "evaluate", "train"]


@dataclass
class Runtime:
    """Where this process stands: rank, world size and device.

    Attributes:
        rank: this process's rank (0 in a single process).
        world_size: number of processes.
        device: where models and batches live.
        quiet: suppress log lines and progress bars.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    quiet: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        """Print ``msg`` to stderr on rank 0 unless quiet."""
        if self.is_main and not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


@dataclass
class BenchData:
    """A classification task: train and test sets, the number of classes and a name.

    ``train`` and ``test`` are ``torch.utils.data.Dataset`` s of ``(input, label)``;
    a ``TensorDataset`` is sliced directly (fast), others go through a DataLoader.

    Attributes:
        name: the dataset's name (for the cache key and the report).
        train: training set.
        test: test set.
        num_classes: number of classes.
        workers: DataLoader worker processes for non-tensor datasets.
    """

    name: str
    train: Any
    test: Any
    num_classes: int
    workers: int = 0

    def fetch(self, split: str, index_batches: list[Tensor]) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield ``(x, y)`` for each index tensor of ``index_batches`` from ``split`` (``"train"``/``"test"``)."""
        return _fetch(self.train if split == "train" else self.test, index_batches, self.workers)


def _dataset(data: BenchData | Split, split: str) -> tuple[Any, int]:
    """``data``'s ``split`` as a dataset, and the DataLoader workers to read it with."""
    if isinstance(data, BenchData):
        return (data.train if split == "train" else data.test), data.workers
    x, y = data
    return torch.utils.data.TensorDataset(x, y), 0


def _fetch(ds: Any, index_batches: list[Tensor], workers: int) -> Iterator[tuple[Tensor, Tensor]]:
    if isinstance(ds, torch.utils.data.TensorDataset):
        x, y = ds.tensors[0], ds.tensors[1]
        for idx in index_batches:
            yield x[idx], y[idx]
        return
    yield from torch.utils.data.DataLoader(ds, batch_sampler=[i.tolist() for i in index_batches], num_workers=workers)


def _to(batch: tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def _epoch_batches(n: int, batch_size: int, seed: int, rt: Runtime) -> list[Tensor]:
    """This rank's share of each global batch of a seeded permutation; batches too small to split are dropped."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [b[rt.rank :: rt.world_size] for b in perm.split(batch_size) if len(b) >= rt.world_size]


def _broadcast_state(model: nn.Module, rt: Runtime) -> None:
    """Make every rank hold rank 0's buffers (BatchNorm statistics drift apart on different shards)."""
    if rt.distributed:
        for buf in model.buffers():
            if buf.numel():
                torch.distributed.broadcast(buf, 0)


def train(
    model: nn.Module,
    data: BenchData | Split,
    *,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
    extra_loss: Callable[[nn.Module], Tensor] | None = None,
    progress: Callable[[int, float], None] | None = None,
    runtime: Runtime | None = None,
    bar: str | None = None,
) -> nn.Module:
    """SGD with momentum 0.9 and a cosine schedule, in whatever quantization mode ``model`` is in;
    deterministic for a given ``seed``.

    Under ``torchrun`` (a distributed ``runtime``) the model is wrapped in
    DistributedDataParallel and its range observers are synchronised; afterwards every
    rank holds rank 0's buffers.

    Args:
        model: trained in place.
        data: ``(x, y)`` tensors, or a :class:`BenchData` (its training set).
        epochs: passes over the training set.
        lr: peak learning rate.
        batch_size: mini-batch size (over all ranks).
        weight_decay: L2 penalty of SGD.
        seed: seeds the shuffling.
        extra_loss: optional ``model -> scalar`` added to the loss (e.g. PACT's regulariser).
        progress: optional callback ``(epoch, mean_loss)`` after each epoch.
        runtime: rank, world size and device (default: one process on the CPU).
        bar: show a progress bar over epochs with this label.

    Returns:
        ``model``.
    """
    rt = Runtime() if runtime is None else runtime
    ds, workers = _dataset(data, "train")
    n = len(ds)
    steps = epochs * max(1, sum(1 for b in range(0, n, batch_size) if n - b >= rt.world_size))
    net: nn.Module = model
    if rt.distributed:
        sync_observers(model)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    net.train()
    for epoch in progress_bar(range(epochs), epochs, bar or "", bar is not None):
        total, count = 0.0, 0
        batches = _epoch_batches(n, batch_size, seed * 1000 + epoch, rt)
        for batch in _fetch(ds, batches, workers):
            x, y = _to(batch, rt.device)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None:  # the mean loss costs a host synchronisation per step
                total += float(loss.detach()) * len(x)
                count += len(x)
        if progress is not None:
            progress(epoch, total / max(count, 1))
    _broadcast_state(model, rt)
    return model


@torch.no_grad()
def evaluate(
    model: nn.Module, data: BenchData | Split, batch_size: int = 512, *, runtime: Runtime | None = None
) -> float:
    """Top-1 accuracy in percent, in eval mode (the quantization mode is left as it is).

    Args:
        model: the classifier.
        data: ``(x, y)`` tensors, or a :class:`BenchData` (its test set).
        batch_size: evaluation batch size.
        runtime: rank, world size and device; ranks share the test set and sum their counts.
    """
    rt = Runtime() if runtime is None else runtime
    ds, workers = _dataset(data, "test")
    was_training = model.training
    model.eval()
    idx = torch.arange(len(ds))[rt.rank :: rt.world_size]
    correct = torch.zeros((), dtype=torch.long, device=rt.device)
    total = torch.zeros((), dtype=torch.long, device=rt.device)
    for batch in _fetch(ds, list(idx.split(batch_size)), workers):
        x, y = _to(batch, rt.device)
        correct += (model(x).argmax(1) == y).sum()
        total += len(y)
    if rt.distributed:
        torch.distributed.all_reduce(correct)
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return 100.0 * int(correct) / max(int(total), 1)


accuracy = evaluate
