"""The loops behind ``torchquant bench``: data access, training, calibration, evaluation.

They work the same in one process and under ``torchrun``: each global batch
(drawn from the same seeded permutation on every rank) is split between the
ranks, gradients are averaged by DistributedDataParallel, range observers are
synchronised (:func:`torchquant.distributed.sync_observers`) and accuracy
counts are summed over the ranks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import sync_observers
from ..ptq import calibrate as ptq_calibrate
from ..qmodules import QModuleState
from ..utils import progress_bar

__all__ = [
    "GRANULARITIES",
    "BenchData",
    "Runtime",
    "Settings",
    "calibrate",
    "calibration_inputs",
    "evaluate",
    "init_runtime",
    "train",
]


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


GRANULARITIES = ("channel", "tensor")


@dataclass
class Settings:
    """Everything a recipe may use besides the model, the bits and the data.

    Attributes:
        granularity: ``"channel"`` (per-output-channel weights) or ``"tensor"``.
        calib_batches: calibration batches (PTQ and QAT initialisation).
        calib_batch_size: samples per calibration batch (over all ranks).
        qat_epochs: epochs of quantization-aware training.
        qat_lr: peak learning rate of quantization-aware training.
        batch_size: training batch size (over all ranks).
        weight_decay: SGD weight decay.
        seed: seeds everything a recipe draws.
        first_last_bits: bit-width of the first and last layers' weights (and of the
            logits), the usual practice; ``None`` quantizes them like the rest.
        convert: ``quantize_model`` method (``"swap"`` or ``"fx"``).
        progress: show progress bars.
        runtime: rank, world size and device (see :class:`Runtime`).
    """

    granularity: str = "channel"
    calib_batches: int = 8
    calib_batch_size: int = 64
    qat_epochs: int = 3
    qat_lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 1e-4
    seed: int = 0
    first_last_bits: int | None = 8
    convert: str = "fx"
    progress: bool = True
    runtime: Runtime = field(default_factory=Runtime)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"Settings: granularity must be one of {GRANULARITIES}, got {self.granularity!r}")


def init_runtime(device: str = "auto", quiet: bool = False) -> Runtime:
    """Set up this process: join the process group under ``torchrun`` (gloo on CPU, nccl on GPU).

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when every local process gets
            a GPU of its own, else the CPU).
        quiet: suppress logs.

    Returns:
        The :class:`Runtime`.

    Raises:
        ValueError: an unknown ``device``, or ``"cuda"`` without a GPU for this process
            (no GPU, or more local processes than GPUs).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(local + 1)))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use_cuda = 0 < local_world <= gpus if device == "auto" else device == "cuda"
    if use_cuda and gpus == 0:
        raise ValueError("--device cuda: no CUDA device is available")
    if use_cuda and local >= gpus:
        raise ValueError(
            f"--device cuda: local rank {local} has no GPU of its own ({gpus} visible); "
            "start at most one process per GPU (torchrun --nproc_per_node) or use --device cpu"
        )
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(rank=rank, world_size=world, device=dev, quiet=quiet)


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
        ds = self.train if split == "train" else self.test
        if isinstance(ds, torch.utils.data.TensorDataset):
            x, y = ds.tensors[0], ds.tensors[1]
            for idx in index_batches:
                yield x[idx], y[idx]
            return
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=[i.tolist() for i in index_batches], num_workers=self.workers
        )
        yield from loader


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
    data: BenchData,
    settings: Settings,
    *,
    epochs: int,
    lr: float,
    desc: str = "train",
) -> nn.Module:
    """SGD (momentum 0.9) with a cosine schedule, in whatever quantization mode ``model`` is in.

    Under ``torchrun`` the model is wrapped in DistributedDataParallel and its
    range observers are synchronised; afterwards every rank holds rank 0's buffers.

    Args:
        model: trained in place.
        data: the task.
        settings: batch size, weight decay, seed, progress and runtime.
        epochs: passes over the training set.
        lr: peak learning rate.
        desc: progress bar label.

    Returns:
        ``model``.
    """
    rt = settings.runtime
    n = len(data.train)
    steps = epochs * max(1, sum(1 for b in range(0, n, settings.batch_size) if n - b >= rt.world_size))
    net: nn.Module = model
    if rt.distributed:
        sync_observers(model)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    net.train()
    bar = progress_bar(range(epochs), epochs, desc, settings.progress and rt.is_main and not rt.quiet)
    for epoch in bar:
        batches = _epoch_batches(n, settings.batch_size, settings.seed * 1000 + epoch, rt)
        for batch in data.fetch("train", batches):
            x, y = _to(batch, rt.device)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            sched.step()
    _broadcast_state(model, rt)
    return model


def calibration_inputs(data: BenchData, settings: Settings, *, shard: bool = True) -> list[Tensor]:
    """The calibration inputs: ``calib_batches`` batches of the training set drawn with the seed.

    Args:
        data: the task.
        settings: ``calib_batches``, ``calib_batch_size``, ``seed``, runtime.
        shard: this rank's share of each batch (``True``) or the whole batches (``False``).

    Returns:
        A list of input tensors on the runtime's device.
    """
    rt = settings.runtime
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(settings.seed + 7919))
    batches = list(perm.split(settings.calib_batch_size))[: settings.calib_batches]
    if shard:
        batches = [b[rt.rank :: rt.world_size] for b in batches if len(b) >= rt.world_size]
    return [x.to(rt.device) for x, _ in data.fetch("train", batches)]


def calibrate(
    model: nn.Module,
    data: BenchData,
    settings: Settings,
    *,
    mode: QModuleState = QModuleState.CALIBRATION,
) -> nn.Module:
    """:func:`torchquant.calibrate` on this rank's share of the calibration batches.

    Under ``torchrun`` each rank sees its share of every batch and the observers
    are synchronised, so all ranks end with the ranges of the whole batches.

    Returns:
        ``model``.
    """
    rt = settings.runtime
    if rt.distributed:
        sync_observers(model)
    inputs = calibration_inputs(data, settings)
    return ptq_calibrate(model, inputs, mode=mode, progress=settings.progress and rt.is_main and not rt.quiet)


@torch.no_grad()
def evaluate(model: nn.Module, data: BenchData, rt: Runtime, batch_size: int = 256) -> float:
    """Top-1 test accuracy in percent, in eval mode; ranks share the test set and sum their counts."""
    was_training = model.training
    model.eval()
    idx = torch.arange(len(data.test))[rt.rank :: rt.world_size]
    correct = torch.zeros((), dtype=torch.long, device=rt.device)
    total = torch.zeros((), dtype=torch.long, device=rt.device)
    for batch in data.fetch("test", list(idx.split(batch_size))):
        x, y = _to(batch, rt.device)
        correct += (model(x).argmax(1) == y).sum()
        total += len(y)
    if rt.distributed:
        torch.distributed.all_reduce(correct)
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return 100.0 * int(correct) / max(int(total), 1)
