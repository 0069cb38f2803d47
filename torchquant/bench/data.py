"""Built-in datasets that need no download.

* :func:`digits`: scikit-learn's 8x8 handwritten digits, ``(N, 1, 8, 8)`` in ``[0, 1]``.
* :func:`mnist1d`: the MNIST-1D benchmark (Greydanus 2020), generated procedurally
  with ``mnist1d.data.make_dataset``, ``(N, 1, 40)``.

Both return ``((x_train, y_train), (x_test, y_test))`` as tensors, identical for
the same ``seed``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batches", "digits", "mnist1d"]

Split = tuple[Tensor, Tensor]


def digits(seed: int = 0, train_fraction: float = 0.8) -> tuple[Split, Split]:
    """scikit-learn's digits (1797 images, 10 classes), split at random with ``seed``.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``; ``x`` float32 ``(N, 1, 8, 8)`` in ``[0, 1]``,
        ``y`` int64 ``(N,)``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("torchquant.bench.data.digits needs scikit-learn: pip install torchquant[bench]") from e
    ds = load_digits()
    x = torch.tensor(ds.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(ds.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(train_fraction * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return (x[tr], y[tr]), (x[te], y[te])


def mnist1d(seed: int = 0, num_samples: int = 5000) -> tuple[Split, Split]:
    """MNIST-1D generated procedurally (no download): 40-sample signals, 10 classes.

    Uses ``mnist1d.data.make_dataset`` with the package's default arguments, its
    own 80/20 split, ``num_samples`` in total and ``seed``.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``; ``x`` float32 ``(N, 1, 40)``, ``y`` int64.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover
        raise ImportError("torchquant.bench.data.mnist1d needs mnist1d: pip install torchquant[bench]") from e
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    d = make_dataset(args)
    x = torch.tensor(d["x"], dtype=torch.float32).unsqueeze(1)
    xt = torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d["y"], dtype=torch.int64)
    yt = torch.tensor(d["y_test"], dtype=torch.int64)
    return (x, y), (xt, yt)


def batches(split: Split, batch_size: int, *, shuffle: bool = False, seed: int = 0):
    """Iterate ``(x, y)`` mini-batches of a split, optionally shuffled with ``seed``."""
    x, y = split
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
    for b in idx.split(batch_size):
        yield x[b], y[b]
