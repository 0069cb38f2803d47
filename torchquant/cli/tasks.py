"""Datasets and models by name for ``torchquant bench``.

Datasets:

* ``digits``, ``mnist1d``: built in, no download (:mod:`torchquant.bench.data`);
* ``imagefolder``: an ImageNet-style folder ``DIR/train/<class>/*`` and
  ``DIR/val/<class>/*`` (``--data-dir DIR``), with the standard ImageNet
  transforms (random resized crop and flip for training; resize and center crop
  for evaluation; ImageNet mean and std);
* any torchvision dataset class found on disk under ``--data-dir``
  (``CIFAR10``, ``MNIST``, ``FashionMNIST``, ...; never downloaded), with
  ``ToTensor`` and normalisation to ``[-1, 1]``.

Models: the built-in small CNNs (:mod:`torchquant.bench.models`) for the
built-in datasets, and any torchvision or timm model by name (random
initialisation; ``--checkpoint`` loads float weights, with ``weights_only=True``).
Prefix ``tv:`` or ``timm:`` to choose the library explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bench import models as builtin_models
from .engine import BenchData

__all__ = ["BUILTIN_DATASETS", "DEFAULT_MODELS", "build_data", "build_model", "load_checkpoint"]

BUILTIN_DATASETS = ("digits", "mnist1d")
DEFAULT_MODELS = {"digits": "digits_cnn", "mnist1d": "mnist1d_cnn"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - optional
        raise ImportError("this dataset or model needs torchvision: pip install torchquant[vision]") from e
    return torchvision


def build_data(
    name: str, *, data_dir: str | None = None, seed: int = 0, image_size: int = 224, workers: int = 0
) -> BenchData:
    """Build a task by name (see the module docstring).

    Args:
        name: ``digits``, ``mnist1d``, ``imagefolder`` or a torchvision dataset class name.
        data_dir: where user data lives (needed except for the built-in datasets).
        seed: the split and generation seed of the built-in datasets.
        image_size: crop size of the ImageFolder transforms.
        workers: DataLoader workers for image datasets.

    Returns:
        The :class:`~torchquant.cli.engine.BenchData`.

    Raises:
        ValueError: an unknown dataset name (the message lists the valid ones), or a
            missing / malformed ``data_dir``.
    """
    key = name.lower()
    if key in BUILTIN_DATASETS:
        from ..bench import data as builtin

        (xtr, ytr), (xte, yte) = builtin.digits(seed) if key == "digits" else builtin.mnist1d(seed)
        ds = torch.utils.data.TensorDataset
        return BenchData(key, ds(xtr, ytr), ds(xte, yte), num_classes=int(ytr.max()) + 1)
    if data_dir is None:
        raise ValueError(
            f"dataset {name!r} needs --data-dir; the built-in datasets ({', '.join(BUILTIN_DATASETS)}) need none"
        )
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"--data-dir {data_dir!r} is not a directory")
    tv = _torchvision()
    T = tv.transforms
    if key == "imagefolder":
        splits = {s: root / s for s in ("train", "val")}
        if not splits["val"].is_dir() and (root / "test").is_dir():
            splits["val"] = root / "test"
        missing = [str(p) for p in splits.values() if not p.is_dir()]
        if missing:
            raise ValueError(f"imagefolder: expected {root}/train/<class>/ and {root}/val/<class>/; missing {missing}")
        norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        resize = max(image_size, round(image_size * 256 / 224))
        train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        test_tf = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), norm])
        train = tv.datasets.ImageFolder(str(splits["train"]), transform=train_tf)
        test = tv.datasets.ImageFolder(str(splits["val"]), transform=test_tf)
        if train.classes != test.classes:
            raise ValueError(f"imagefolder: train classes {train.classes} differ from val classes {test.classes}")
        return BenchData("imagefolder", train, test, num_classes=len(train.classes), workers=workers)
    names = {n.lower(): n for n in tv.datasets.__all__ if n[0].isupper()}
    if key not in names:
        valid = ", ".join([*BUILTIN_DATASETS, "imagefolder", "or a torchvision dataset (CIFAR10, MNIST, ...)"])
        raise ValueError(f"unknown dataset {name!r}; valid: {valid}")
    cls = getattr(tv.datasets, names[key])
    tf = T.Compose([T.ToTensor(), T.Normalize((0.5,), (0.5,))])
    try:
        try:
            train = cls(str(root), train=True, download=False, transform=tf)
            test = cls(str(root), train=False, download=False, transform=tf)
        except TypeError:  # datasets with a split argument (SVHN, ...)
            train = cls(str(root), split="train", download=False, transform=tf)
            test = cls(str(root), split="test", download=False, transform=tf)
    except RuntimeError as e:
        raise ValueError(f"dataset {names[key]} not found under {root} (nothing is downloaded): {e}") from e
    classes = getattr(train, "classes", None)
    num = len(classes) if classes else int(max(int(t) for _, t in torch.utils.data.Subset(train, range(1000)))) + 1
    return BenchData(names[key], train, test, num_classes=num, workers=workers)


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load float weights into ``model`` from ``path`` (``torch.load(..., weights_only=True)``).

    Accepts a state dict or a dict holding one under ``"state_dict"`` or ``"model"``;
    keys prefixed ``"module."`` (saved from DDP) are accepted.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the state dict does not match the model (strict loading), with torch's list of keys.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"--checkpoint {path!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"--checkpoint {path!r} does not fit the {type(model).__name__} model: {e}") from None


def build_model(name: str, num_classes: int) -> nn.Module:
    """A float model by name: built-in (``digits_cnn``, ...), torchvision (``tv:``) or timm (``timm:``).

    Without a prefix the built-ins are tried first, then torchvision, then timm.
    Weights are randomly initialised (nothing is downloaded).

    Raises:
        ValueError: no library has a model of that name.
    """
    lib, _, short = name.rpartition(":")
    if lib not in ("", "tv", "timm"):
        raise ValueError(f"model {name!r}: prefix must be 'tv:' or 'timm:'")
    if not lib and short in builtin_models.MODELS:
        return builtin_models.build_model(short, num_classes=num_classes)
    if lib in ("", "tv"):
        tv = _torchvision()
        if short in tv.models.list_models():
            return tv.models.get_model(short, weights=None, num_classes=num_classes)
    if lib in ("", "timm"):
        try:
            import timm
        except ImportError as e:  # pragma: no cover - optional
            if lib == "timm":
                raise ImportError("timm models need timm: pip install torchquant[vision]") from e
            timm = None
        if timm is not None and timm.is_model(short):
            return timm.create_model(short, pretrained=False, num_classes=num_classes)
    raise ValueError(
        f"unknown model {name!r}; valid: {', '.join(sorted(builtin_models.MODELS))}, "
        "or a torchvision / timm model name (torchvision.models.list_models(), timm.list_models())"
    )
