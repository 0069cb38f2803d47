"""Users' data and models: an ImageFolder made with PIL, torchvision models by name, float checkpoints."""

import csv

import pytest
import torch
from torch import nn

from torchquant.cli.main import main
from torchquant.cli.tasks import build_data, build_model, load_checkpoint

pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    n, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(det)


@pytest.fixture
def image_folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 3)):
        for c, cls in enumerate(("cat", "dog")):
            d = tmp_path / "imgs" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                px = (torch.rand(20, 24, 3, generator=g) * 127 + 128 * c).to(torch.uint8).numpy()
                Image.fromarray(px).save(d / f"{i}.png")
    return tmp_path / "imgs"


def test_imagefolder_standard_transforms(image_folder):
    data = build_data("imagefolder", data_dir=str(image_folder), image_size=16)
    assert data.num_classes == 2 and len(data.train) == 12 and len(data.test) == 6
    x, y = data.test[0]
    assert x.shape == (3, 16, 16) and y == 0
    assert x.mean() < 0.5  # normalised with the ImageNet mean and std
    (xb, yb), *_ = data.fetch("test", [torch.tensor([0, 5])])
    assert xb.shape == (2, 3, 16, 16) and yb.tolist() == [0, 1]


def test_imagefolder_layout_errors(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="imagefolder: expected"):
        build_data("imagefolder", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        build_data("imagefolder", data_dir=str(tmp_path / "nope"))


def test_build_model_by_name():
    assert build_model("digits_cnn", 10).fc.out_features == 10
    assert build_model("tv:resnet18", 3).fc.out_features == 3
    with pytest.raises(ValueError, match="unknown model 'tv:nope'"):
        build_model("tv:nope", 3)
    with pytest.raises(ValueError, match="prefix"):
        build_model("hf:bert", 3)


def test_checkpoint_loading(tmp_path):
    src = nn.Linear(3, 2)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = nn.Linear(3, 2)
    load_checkpoint(dst, str(path))
    assert torch.equal(dst.weight, src.weight)
    with pytest.raises(ValueError, match="does not fit the Linear model"):
        load_checkpoint(nn.Linear(4, 2), str(path))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(dst, str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_bench_on_imagefolder_with_torchvision_model_and_checkpoint(image_folder, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "resnet18.pt"
    torch.save(build_model("tv:resnet18", 2).state_dict(), ckpt)
    args = ["bench", "--dataset", "imagefolder", "--data-dir", str(image_folder), "--model", "tv:resnet18"]
    args += ["--checkpoint", str(ckpt), "--image-size", "16", "--recipes", "ptq-minmax", "--bits", "w8a8"]
    args += ["--calib-batches", "1", "--calib-batch-size", "4", "--quiet", "--no-plot", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    with open(tmp_path / "o" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert (rows[0]["recipe"], rows[0]["note"]) == ("float32", "checkpoint")
    assert rows[1]["recipe"] == "ptq-minmax" and rows[1]["status"] == "ok"
    assert 0.0 <= float(rows[1]["accuracy"]) <= 100.0
