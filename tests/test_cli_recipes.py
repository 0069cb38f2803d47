"""Recipes: bit settings, the registry, spec recipes on a tiny task, recipe files with user quantizers."""

import contextlib
import sys
import textwrap

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.cli.engine import BenchData
from torchquant.cli.recipes import (
    RECIPES,
    Bits,
    CellSkipped,
    QuantizerSpec,
    RecipeError,
    RecipeResult,
    RecipeUnavailable,
    Settings,
    SpecRecipe,
    get_recipe,
    list_recipes,
    load_recipe_file,
    register_recipe,
)

BUILTIN = [
    "bnn",
    "ptq-adaround",
    "ptq-brecq",
    "ptq-minmax",
    "ptq-mse",
    "ptq-percentile",
    "ptq-qdrop",
    "qat-dorefa",
    "qat-lsq",
    "qat-minmax",
    "qat-pact",
    "twn",
    "xnor",
]

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread is fastest


def tiny_task(n: int = 96) -> BenchData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    ds = torch.utils.data.TensorDataset
    return BenchData("tiny", ds(x[: n // 2], y[: n // 2]), ds(x[n // 2 :], y[n // 2 :]), num_classes=2)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 2),
    )


SETTINGS = dict(calib_batches=2, calib_batch_size=16, qat_epochs=1, batch_size=16, progress=False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("w8a8", Bits(8, 8)), ("W4A8", Bits(4, 8)), ("w2a2", Bits(2, 2)), ("w1a8", Bits(1, 8)), ("w4", Bits(4, None))],
    ids=["w8a8", "upper-case", "w2a2", "w1a8", "weight-only"],
)
def test_bits_parse(text, expected):
    assert Bits.parse(text) == expected
    assert str(expected) == text.lower()


@pytest.mark.parametrize("text", ["8a8", "w8a", "w0a8", "w8a33", "a8w8", ""], ids=repr)
def test_bits_parse_rejects(text):
    with pytest.raises(ValueError, match="bit setting"):
        Bits.parse(text)


def test_builtin_recipes_registered():
    assert set(BUILTIN) <= set(list_recipes())


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_recipe_available_or_says_what_is_missing(name):
    recipe = get_recipe(name)
    assert recipe.description
    try:
        recipe.check_available()
    except RecipeUnavailable as e:
        assert name in str(e) and "not available in this build" in str(e)


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(KeyError, match=r"unknown recipe 'ptq-nope'; valid names: .*ptq-minmax.*qat-minmax"):
        get_recipe("ptq-nope")


def test_missing_method_raises_before_running():
    recipe = SpecRecipe("needs-missing", "test", weights=QuantizerSpec("no-such-quantizer"), acts=None)
    with pytest.raises(RecipeUnavailable, match=r"'no-such-quantizer'.*not available in this build; available"):
        recipe.check_available()
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeUnavailable):
        recipe(model, Bits(4, 8), tiny_task(), Settings(**SETTINGS))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    algo = SpecRecipe("needs-algo", "test", weights=QuantizerSpec("affine", "batch_minmax"), acts=None, algorithm="x")
    with pytest.raises(RecipeUnavailable, match=r"torchquant.ptq.x, which is not available in this build"):
        algo.check_available()


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_ptq_minmax_quantizes_with_first_last_at_8_bits(granularity):
    result = get_recipe("ptq-minmax")(
        tiny_model(), Bits(4, 4), tiny_task(), Settings(granularity=granularity, **SETTINGS)
    )
    model = result.model
    wrappers = dict(tq.iter_qmodules(model))
    assert list(wrappers) == ["0", "3", "6"]
    assert all(m.qstate is tq.QModuleState.QUANT_EVAL for m in wrappers.values())
    bits = {n: m.weight_quantizer.n_bits for n, m in wrappers.items()}
    assert bits == {"0": 8, "3": 4, "6": 8}
    assert wrappers["6"].acts_quantizer.n_bits == 8 and wrappers["3"].acts_quantizer.n_bits == 4
    axis = 0 if granularity == "channel" else None
    assert wrappers["3"].weight_quantizer.granularity.axis == axis
    assert wrappers["3"].acts_quantizer.range_observer.initialized
    assert result.info["granularity"] == f"per-{granularity}"
    # weights now lie on a 4-bit grid: at most 16 distinct values per output channel
    w = wrappers["3"].quantized_weight()
    assert max(len(torch.unique(c)) for c in w) <= 16


def test_first_last_bits_none_and_weight_only():
    settings = Settings(first_last_bits=None, **SETTINGS)
    model = get_recipe("ptq-minmax")(tiny_model(), Bits(4, None), tiny_task(), settings).model
    wrappers = dict(tq.iter_qmodules(model))
    assert {m.weight_quantizer.n_bits for m in wrappers.values()} == {4}
    assert all(m.acts_quantizer is None for m in wrappers.values())


def test_qat_minmax_trains_weights():
    model = tiny_model()
    w0 = model[3].weight.detach().clone()
    result = get_recipe("qat-minmax")(model, Bits(8, 8), tiny_task(), Settings(**SETTINGS))
    assert not torch.equal(dict(result.model.named_modules())["3"].layer.weight, w0)
    assert "QAT 1 epochs" in result.info["steps"]
    assert isinstance(dict(result.model.named_modules())["3"].acts_quantizer.range_observer, tq.ExpAvgMinMax)


def test_relu_only_acts_fall_back_off_relu_outputs():
    spec = QuantizerSpec("affine", "running_minmax", args={"symmetric": True}, relu_only=True)
    recipe = SpecRecipe("relu-only", "test", weights=QuantizerSpec("affine", "batch_minmax"), acts=spec)
    model = recipe(tiny_model(), Bits(8, 8), tiny_task(), Settings(**SETTINGS)).model
    wrappers = dict(tq.iter_qmodules(model))
    assert wrappers["0"].acts_quantizer.symmetric and wrappers["3"].acts_quantizer.symmetric  # Conv(+BN)+ReLU
    assert not wrappers["6"].acts_quantizer.symmetric  # logits: the affine min/max fallback
    assert isinstance(wrappers["6"].acts_quantizer.range_observer, tq.ExpAvgMinMax)


def test_fixed_bit_method_skips_other_settings():
    recipe = SpecRecipe("fixed", "test", weights=QuantizerSpec("affine", bits_arg=None, fixed_bits=1), acts=None)
    with pytest.raises(CellSkipped, match="quantizes weights to 1 bit"):
        recipe(tiny_model(), Bits(8, 8), tiny_task(), Settings(**SETTINGS))


def test_settings_reject_unknown_granularity():
    with pytest.raises(ValueError, match="granularity"):
        Settings(granularity="group")


def test_register_recipe_function():
    @register_recipe("test-float-copy", overwrite=True)
    def float_copy(model, bits, data, settings):
        """Leaves the model in float (a control)."""
        return RecipeResult(model, {"steps": "none"})

    recipe = get_recipe("test-float-copy")
    assert recipe.description == "Leaves the model in float (a control)."
    assert recipe(nn.Linear(2, 2), Bits(8, 8), None, Settings()).info == {"steps": "none"}

    @register_recipe("test-bad-return", overwrite=True)
    def bad(model, bits, data, settings):
        return model

    with pytest.raises(TypeError, match="expected a RecipeResult"):
        get_recipe("test-bad-return")(nn.Linear(2, 2), Bits(8, 8), None, Settings())


USER_MODULE = '''
import torch
import torchquant as tq


@tq.register_quantizer("test-sign", overwrite=True)
class TestSign(tq.Quantizer):
    """Sign with a straight-through gradient, scaled by the mean magnitude."""

    def pre_observe(self, x):
        pass

    def quantize(self, x):
        q = torch.sign(x) * x.abs().mean()
        return x + (q - x).detach()

    def post_observe(self, x):
        pass
'''


def test_recipe_file_with_user_quantizer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "user_quantizers_cli.py").write_text(USER_MODULE)
    (tmp_path / "recipes.toml").write_text(
        textwrap.dedent(
            """
            import = ["user_quantizers_cli"]

            [recipe.test-sign-qat]
            base = "qat-minmax"
            description = "binary weights from a user module"
            epochs = 1
            weights = { quantizer = "test-sign", bits_arg = false, fixed_bits = 1 }

            [recipe.test-ptq-tensor]
            weights = { quantizer = "affine", observer = "batch_minmax", args = { symmetric = true } }
            acts = false
            """
        )
    )
    assert load_recipe_file(tmp_path / "recipes.toml") == ["test-sign-qat", "test-ptq-tensor"]
    recipe = get_recipe("test-sign-qat")
    assert recipe.qat and recipe.epochs == 1 and recipe.acts.observer == "ema_minmax"  # inherited
    model = recipe(tiny_model(), Bits(1, 8), tiny_task(), Settings(first_last_bits=None, **SETTINGS)).model
    w = dict(model.named_modules())["3"].quantized_weight()
    assert torch.allclose(w.abs(), w.abs().mean().expand_as(w))  # sign times one scale
    ptq = get_recipe("test-ptq-tensor")(tiny_model(), Bits(8, 8), tiny_task(), Settings(**SETTINGS)).model
    assert all(m.acts_quantizer is None for _, m in tq.iter_qmodules(ptq))
    for name in ("test-sign-qat", "test-ptq-tensor"):
        RECIPES._entries.pop(name)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('[recipe.x]\nweights = { quantizer = "affine", color = 1 }', r"unknown keys \['color'\]"),
        ('[recipe.x]\nweigths = { quantizer = "affine" }', r"unknown keys \['weigths'\]"),
        ("[recipe.x]\nqat = true", "missing 'weights'"),
        ("[recipe.x]\nweights = { observer = 'batch_minmax' }", "missing 'quantizer'"),
        ("colour = 1", "unknown top-level keys"),
        ('import = ["no_such_module_xyz"]', "cannot import 'no_such_module_xyz'"),
        ('[recipe.x]\nbase = "ptq-nope"', "unknown recipe 'ptq-nope'"),
        ('[recipe.ptq-minmax]\nbase = "ptq-minmax"\nacts = false', "'ptq-minmax' is a built-in recipe"),
    ],
    ids=[
        "unknown-spec-key",
        "unknown-recipe-key",
        "no-weights",
        "no-quantizer",
        "top-level",
        "import",
        "base",
        "built-in-name",
    ],
)
def test_recipe_file_errors(tmp_path, body, match):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises((ValueError, ImportError, KeyError), match=match):
        load_recipe_file(path)


def test_recipe_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe_file(tmp_path / "nope.toml")


def test_spec_recipe_rejects_an_already_quantized_model():
    model = get_recipe("ptq-minmax")(tiny_model(), Bits(8, 8), tiny_task(), Settings(**SETTINGS)).model
    with pytest.raises(ValueError, match="expects a float model"):
        get_recipe("ptq-minmax")(model, Bits(8, 8), tiny_task(), Settings(**SETTINGS))


def test_unsupported_bit_width_skips_the_cell():
    weights = QuantizerSpec("qfmt", "batch_minmax", args={"signed": True})  # signed Q-format needs >= 2 bits
    recipe = SpecRecipe("qfmt-w1", "test", weights=weights, acts=None)
    with pytest.raises(CellSkipped, match="n_bits"):
        recipe(tiny_model(), Bits(1, 8), tiny_task(), Settings(**SETTINGS))


def test_lsq_at_one_bit_skips_the_cell():
    recipe = get_recipe("qat-lsq")
    with pytest.raises(CellSkipped, match=r"LSQQuantizer: n_bits must be in \[2, 16\], got 1"):
        recipe(tiny_model(), Bits(1, 8), tiny_task(), Settings(**SETTINGS))


def test_mse_ranges_are_searched_for_the_cells_grid():
    spec = QuantizerSpec("affine", "mse", args={"symmetric": True})
    q = spec.build(2, 0)
    assert (q.range_observer.n_bits, q.range_observer.symmetric) == (2, True)
    q = QuantizerSpec("affine", "mse").build(4, None)
    assert (q.range_observer.n_bits, q.range_observer.symmetric) == (4, False)
    assert QuantizerSpec("affine", "mse", observer_args={"n_bits": 8}).build(4, None).range_observer.n_bits == 8


@pytest.mark.parametrize(
    ("algorithm", "first"),
    [("equalize", "equalize()"), ("bias_correction", "calibration 2x16")],
    ids=["before-calibration", "after-calibration"],
)
def test_spec_recipe_runs_a_registered_ptq_algorithm_at_its_stage(algorithm, first):
    recipe = SpecRecipe(
        f"test-{algorithm}",
        "test",
        weights=QuantizerSpec("affine", "batch_minmax", args={"symmetric": True}),
        acts=QuantizerSpec("affine", "running_minmax"),
        algorithm=algorithm,
        convert="swap",
    )
    settings = Settings(**SETTINGS, first_last_bits=None)
    result = recipe(tiny_model().eval(), Bits(8, 8), tiny_task(), settings)
    steps = result.info["steps"].split("; ")
    assert steps[0] == first and len(steps) == 2
    assert all(m.qstate is tq.QModuleState.QUANT_EVAL for _, m in tq.iter_qmodules(result.model))
    assert torch.isfinite(result.model(tiny_task().test.tensors[0])).all()


BITS_GRID = [Bits(8, 8), Bits(4, 4), Bits(2, 2), Bits(1, 8), Bits(4, None)]


@pytest.mark.parametrize("first_last_bits", [8, None], ids=["first-last-8", "first-last-none"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_builtin_recipes_pass_the_cell_check_or_skip(granularity, first_last_bits):
    settings = Settings(granularity=granularity, first_last_bits=first_last_bits, **SETTINGS)
    for name in BUILTIN:
        for bits in BITS_GRID:
            with contextlib.suppress(CellSkipped, RecipeUnavailable):
                get_recipe(name).check_cell(bits, settings)


TYPO = """
[recipe.test-other]
weights = { quantizer = "affine", observer = "batch_minmax" }

[recipe.test-typo]
weights = { quantizer = "affine", observer = "batch_minmax", args = { symetric = true } }
acts = false
"""


def test_cell_check_names_file_line_recipe_and_the_quantizer_error(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text(TYPO)
    try:
        load_recipe_file(path)
        recipe = get_recipe("test-typo")
        assert recipe.source == f"{path}:5"
        get_recipe("test-other").check_cell(Bits(8, 8), Settings(**SETTINGS))
        with pytest.raises(RecipeError, match=r"^weights: TypeError: quantizer 'affine' rejected .*'symetric'"):
            recipe.check_cell(Bits(8, 8), Settings(**SETTINGS))
    finally:
        for name in ("test-other", "test-typo"):
            RECIPES._entries.pop(name, None)


def test_cell_check_covers_activations_and_ptq_algorithm_arguments():
    settings = Settings(**SETTINGS)
    acts = SpecRecipe(
        "acts-typo",
        "test",
        weights=QuantizerSpec("affine", "batch_minmax"),
        acts=QuantizerSpec("affine", "running_minmax", observer_args={"momentun": 0.1}),
    )
    acts.check_cell(Bits(8, None), settings)  # float activations: nothing to build
    with pytest.raises(RecipeError, match=r"^activations: .*'momentun'"):
        acts.check_cell(Bits(8, 8), settings)
    algo = SpecRecipe(
        "algo-typo",
        "test",
        weights=QuantizerSpec("affine", "batch_minmax"),
        acts=None,
        algorithm="adaround",
        algorithm_args={"iter": 10},
    )
    with pytest.raises(RecipeError, match=r"algorithm_args: torchquant.ptq.adaround takes no \['iter'\]; .*'iters'"):
        algo.check_cell(Bits(4, 8), settings)


def test_recipe_header_line_is_found_for_quoted_names(tmp_path):
    path = tmp_path / "quoted.toml"
    path.write_text('# comment\n\n[ recipe . "test.dotted" ]\nweights = { quantizer = "affine" }\n')
    try:
        assert load_recipe_file(path) == ["test.dotted"]
        assert get_recipe("test.dotted").source == f"{path}:3"
    finally:
        RECIPES._entries.pop("test.dotted", None)


def test_recipe_file_imports_modules_next_to_it(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (folder / "user_quantizers_next_to_file.py").write_text(USER_MODULE.replace("test-sign", "test-sign-next"))
    (folder / "r.toml").write_text(
        'import = ["user_quantizers_next_to_file", "json"]  # json: an installed module\n'
        '[recipe.test-next]\nweights = { quantizer = "test-sign-next", bits_arg = false }\n'
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        assert load_recipe_file(folder / "r.toml") == ["test-next"]
        get_recipe("test-next").check_cell(Bits(1, 8), Settings(first_last_bits=None, **SETTINGS))
    finally:
        RECIPES._entries.pop("test-next", None)
        sys.modules.pop("user_quantizers_next_to_file", None)
    assert str(folder) not in sys.path  # searched only for the file's imports


def test_recipe_file_import_refuses_another_module_of_the_same_name(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test_clash_mod.py").write_text("")
        (tmp_path / folder / "r.toml").write_text('import = ["test_clash_mod"]\n')
    try:
        assert load_recipe_file(tmp_path / "a" / "r.toml") == []
        with pytest.raises(ImportError, match=r"'test_clash_mod' was already imported from .*a.test_clash_mod.py"):
            load_recipe_file(tmp_path / "b" / "r.toml")
    finally:
        sys.modules.pop("test_clash_mod", None)


def test_toml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[recipe.x\nweights = { quantizer = "affine" }\n')
    with pytest.raises(RecipeError, match=r"recipe file '.*broken.toml' is not valid TOML: .*\(at line 1, column 10\)"):
        load_recipe_file(path)
