"""Plain, reproducible training and evaluation loops for the built-in tasks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .data import Split, batches

__all__ = ["accuracy", "evaluate", "train"]


def train(
    model: nn.Module,
    data: Split,
    *,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
    extra_loss: Callable[[nn.Module], Tensor] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """SGD with momentum 0.9 and a cosine schedule; deterministic for a given ``seed``.

    Args:
        model: trained in place (whatever quantization mode it is in).
        data: ``(x, y)`` tensors.
        epochs: passes over ``data``.
        lr: peak learning rate.
        batch_size: mini-batch size.
        weight_decay: L2 penalty of SGD.
        seed: seeds the shuffling.
        extra_loss: optional ``model -> scalar`` added to the loss (e.g. PACT's regulariser).
        progress: optional callback ``(epoch, mean_loss)``.

    Returns:
        ``model``.
    """
    steps = epochs * ((len(data[0]) + batch_size - 1) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    model.train()
    for epoch in range(epochs):
        total, n = 0.0, 0
        for x, y in batches(data, batch_size, shuffle=True, seed=seed * 1000 + epoch):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(x)
            n += len(x)
        if progress is not None:
            progress(epoch, total / max(n, 1))
    return model


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent, in eval mode (the quantization mode is left as it is)."""
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in batches(data, batch_size):
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return 100.0 * correct / len(data[0])


accuracy = evaluate
