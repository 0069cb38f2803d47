"""`torchquant bench` end to end on a tiny grid: outputs, reproducibility, errors, the default grid, torchrun."""

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchquant.cli.defaults import DEFAULT_BITS, DEFAULT_RECIPES
from torchquant.cli.main import main
from torchquant.cli.recipes import Bits, get_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "bench",
    "--dataset",
    "digits",
    "--epochs",
    "4",
    "--recipes",
    "ptq-minmax,qat-minmax",
    "--bits",
    "w8a8,w4a4",
    "--qat-epochs",
    "1",
    "--calib-batches",
    "2",
    "--quiet",
]


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    """run_bench sets threads and deterministic algorithms for its process; undo that for other tests."""
    n, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(det)


def accuracies(out: Path) -> list[tuple[str, str, str]]:
    with open(out / "results.csv") as f:
        return [(r["recipe"], r["bits"], r["accuracy"]) for r in csv.DictReader(f)]


def test_default_grid_is_available():
    for name in DEFAULT_RECIPES:
        get_recipe(name).check_available()
    for b in DEFAULT_BITS:
        Bits.parse(b)


@pytest.mark.slow
def test_bench_writes_results_and_repeats_exactly(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    runs = {}
    for run, extra in (("first", []), ("cached", []), ("retrained", ["--no-cache"])):
        out = tmp_path / run
        assert main([*TINY, "--out", str(out), "--cache-dir", cache, *extra]) == 0
        runs[run] = accuracies(out)
        printed = capsys.readouterr().out
        assert "ptq-minmax  w4a4" in printed and f"plot: {out / 'accuracy_vs_bits.png'}" in printed
    assert runs["first"] == runs["cached"] == runs["retrained"]
    assert [r[:2] for r in runs["first"]] == [
        ("float32", "-"),
        ("ptq-minmax", "w8a8"),
        ("ptq-minmax", "w4a4"),
        ("qat-minmax", "w8a8"),
        ("qat-minmax", "w4a4"),
    ]
    assert len(list((tmp_path / "cache").glob("digits-digits_cnn-*.pt"))) == 1
    doc = json.loads((tmp_path / "first" / "results.json").read_text())
    env = doc["environment"]
    assert env["seed"] == 0 and env["world_size"] == 1 and env["deterministic_algorithms"]
    assert {"torch", "torchquant", "python"} <= set(env["versions"])
    assert env["command"].startswith("torchquant bench --dataset digits")
    assert doc["config"]["recipes"] == ["ptq-minmax", "qat-minmax"]
    assert [r["status"] for r in doc["results"]] == ["ok"] * 5
    png = (tmp_path / "first" / "accuracy_vs_bits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    float_acc = float(runs["first"][0][2])
    assert float_acc > 50  # four epochs on digits already learn something
    # again into the same folder without a plot: the earlier run's plot does not stay beside the new results
    assert main([*TINY, "--out", str(tmp_path / "first"), "--cache-dir", cache, "--no-plot"]) == 0
    assert not (tmp_path / "first" / "accuracy_vs_bits.png").exists()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--recipes", "ptq-nope"], r"unknown recipe 'ptq-nope'; valid names: .*ptq-minmax"),
        (["--bits", "w8x8"], "bit setting 'w8x8'"),
        (["--dataset", "nope", "--data-dir", "."], "unknown dataset 'nope'"),
        (["--dataset", "imagefolder"], "needs --data-dir"),
        (["--model", "tv:no_such_model_xyz"], "unknown model 'tv:no_such_model_xyz'"),
    ],
    ids=["recipe", "bits", "dataset", "data-dir", "model"],
)
def test_bench_errors_name_the_valid_choices(args, match, tmp_path, capsys):
    if args[0] in ("--dataset", "--model") and importlib.util.find_spec("torchvision") is None:
        pytest.skip("names outside the built-ins are looked up in torchvision (torchquant[vision])")
    assert main(["bench", "--out", str(tmp_path), "--cache-dir", str(tmp_path), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchquant bench: error:")
    assert re.search(match, err), err


@pytest.mark.parametrize(
    "args",
    [["bench", "--batch-size", "0"], ["bench", "--epochs", "-1"], ["bench", "--calib-batch-size", "0"],
     ["lm", "--args", "[1]"], ["lm", "--args", '{"gptq": 1}'], ["lm", "--threads", "0"], ["lm", "--eval-windows", "0"]],
)  # fmt: skip
def test_bad_numbers_and_options_are_usage_errors_naming_the_option(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert f"argument {args[1]}: expected" in capsys.readouterr().err


def test_bench_unavailable_recipe_is_a_clear_error(tmp_path, capsys):
    from torchquant.cli.recipes import RECIPES, QuantizerSpec, SpecRecipe

    RECIPES.register("test-missing", overwrite=True)(
        SpecRecipe("test-missing", "test", weights=QuantizerSpec("no-such-q"), acts=None)
    )
    try:
        assert main(["bench", "--recipes", "test-missing", "--out", str(tmp_path), "--quiet"]) == 2
    finally:
        RECIPES._entries.pop("test-missing")
    assert "recipe 'test-missing' needs the quantizer 'no-such-q'" in capsys.readouterr().err


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "ptq-minmax" in out and "qat-minmax" in out and "digits" in out and "affine" in out
    (line,) = [x for x in out.splitlines() if x.startswith("PTQ algorithms: ")]
    assert {"adaround", "bias_correction", "brecq", "equalize", "qdrop"} <= set(line.split(": ")[1].split(", "))


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    """The same command under torchrun (gloo) gives the same table as one process, within noise."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [*TINY, "--bits", "w8a8", "--no-plot", "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0  # the reference, in this process
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*torchrun, "-m", "torchquant", *args, "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("torchquant bench:") == 1  # only rank 0 prints the table
    doc = json.loads((tmp_path / "two" / "results.json").read_text())
    assert doc["environment"]["world_size"] == 2
    for (r1, b1, a1), (r2, b2, a2) in zip(accuracies(tmp_path / "one"), accuracies(tmp_path / "two"), strict=True):
        assert (r1, b1) == (r2, b2)
        assert abs(float(a1) - float(a2)) <= 5.0, (r1, b1, a1, a2)


def test_console_script_and_module_entry_points():
    import tomllib

    import torchquant.__main__  # noqa: F401  (importable without running)

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["torchquant"].partition(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is main


def test_device_auto_uses_gpus_only_when_each_local_process_has_one(monkeypatch):
    from torchquant.cli.engine import init_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert init_runtime("auto", quiet=True).device == torch.device("cpu")  # two processes, one GPU
    with pytest.raises(ValueError, match="local rank 1 has no GPU of its own"):
        init_runtime("cuda", quiet=True)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert init_runtime("auto", quiet=True).device == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        init_runtime("cuda", quiet=True)


QUICK = ["bench", "--dataset", "digits", "--epochs", "0", "--quiet", "--no-plot"]


def test_recipe_that_cannot_be_built_stops_the_grid_before_anything_trains(tmp_path, capsys, monkeypatch):
    from torchquant.cli import bench
    from torchquant.cli.recipes import RECIPES

    def no_data(*args, **kwargs):
        raise AssertionError("the grid started although a recipe cannot be built")

    monkeypatch.setattr(bench, "build_data", no_data)
    path = tmp_path / "typo.toml"
    path.write_text('[recipe.test-typo]\nweights = { quantizer = "affine", args = { symetric = true } }\n')
    out = tmp_path / "out"
    args = ["--recipe-file", str(path), "--recipes", "ptq-minmax,test-typo", "--bits", "w8a8,w4a4", "--out", str(out)]
    try:
        assert main([*QUICK, *args]) == 2
    finally:
        RECIPES._entries.pop("test-typo", None)
    err = capsys.readouterr().err
    assert f"{path}:1: recipe 'test-typo' at w8a8, w4a4: weights: TypeError: quantizer 'affine' rejected" in err
    assert "unexpected keyword argument 'symetric'" in err and "nothing was trained" in err
    assert not out.exists()


def test_toml_syntax_error_names_the_file(tmp_path, capsys):
    path = tmp_path / "broken.toml"
    path.write_text("[recipe.x\n")
    assert main([*QUICK, "--recipe-file", str(path), "--out", str(tmp_path)]) == 2
    assert f"recipe file '{path}' is not valid TOML: Expected ']'" in capsys.readouterr().err


def test_a_cell_failing_at_run_time_is_reported_and_the_grid_goes_on(tmp_path, capsys):
    from torchquant.cli.recipes import RECIPES, RecipeResult, register_recipe

    @register_recipe("test-fails-at-w4", overwrite=True)
    def fails_at_w4(model, bits, data, settings):
        """Float model at 8 bits, an error at 4."""
        if bits.weight == 4:
            raise RuntimeError("boom at w4")
        return RecipeResult(model, {"steps": "none"})

    out = tmp_path / "out"
    args = ["--recipes", "test-fails-at-w4,bnn", "--bits", "w4a4,w8a8", "--out", str(out), "--cache-dir", str(out)]
    try:
        assert main([*QUICK, *args]) == 1
    finally:
        RECIPES._entries.pop("test-fails-at-w4")
    captured = capsys.readouterr()
    assert "FAILED: RuntimeError: boom at w4" in captured.out
    assert "1 cell(s) failed: test-fails-at-w4 w4a4" in captured.err
    with open(out / "results.csv") as f:
        rows = [(r["recipe"], r["bits"], r["status"], r["note"]) for r in csv.DictReader(f)]
    assert [r[:3] for r in rows] == [
        ("float32", "-", "ok"),
        ("test-fails-at-w4", "w4a4", "failed"),
        ("test-fails-at-w4", "w8a8", "ok"),
        ("bnn", "w4a4", "skipped"),
        ("bnn", "w8a8", "skipped"),
    ]
    assert rows[1][3] == "RuntimeError: boom at w4"
    results = json.loads((out / "results.json").read_text())["results"]
    assert results[1]["status"] == "failed" and results[1]["accuracy"] is None


def test_skipped_cells_alone_exit_zero(tmp_path):
    out = tmp_path / "out"
    assert main([*QUICK, "--recipes", "bnn", "--bits", "w8a8", "--out", str(out), "--cache-dir", str(out)]) == 0
    with open(out / "results.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok", "skipped"]
