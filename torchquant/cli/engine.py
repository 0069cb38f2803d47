"""What ``torchquant bench`` adds to the experiment loops of :mod:`torchquant.bench.train`:
the process setup (:func:`init_runtime`), the :class:`Settings` recipes read, and
calibration on the seeded calibration batches (through :func:`torchquant.calibrate`).

All of it works the same in one process and under ``torchrun``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..bench.train import BenchData, Runtime
from ..bench.train import train as bench_train
from ..distributed import sync_observers
from ..ptq import calibrate as ptq_calibrate
from ..qmodules import QModuleState

__all__ = [
    "GRANULARITIES",
    "BenchData",
    "Runtime",
    "Settings",
    "calibrate",
    "calibration_inputs",
    "init_runtime",
    "train",
]


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


def train(
    model: nn.Module,
    data: BenchData,
    settings: Settings,
    *,
    epochs: int,
    lr: float,
    desc: str = "train",
) -> nn.Module:
    """:func:`torchquant.bench.train.train` with the batch size, weight decay, seed, progress
    and runtime of ``settings``.

    Returns:
        ``model``.
    """
    rt = settings.runtime
    show = settings.progress and rt.is_main and not rt.quiet
    return bench_train(
        model,
        data,
        epochs=epochs,
        lr=lr,
        batch_size=settings.batch_size,
        weight_decay=settings.weight_decay,
        seed=settings.seed,
        runtime=rt,
        bar=desc if show else None,
    )


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
