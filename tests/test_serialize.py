"""tq.save / tq.load: self-describing checkpoints (structure, state, modes, packed weights)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.registry import QUANTIZERS
from torchquant.serialize import quantized_state_dict, read
from torchquant.spec import QuantizerSpec, SpecError, describe

S = tq.QModuleState


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc1 = nn.Linear(16, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(y)) + 1.0)


class Tied(nn.Module):
    """Two layers sharing one weight (as an embedding and its head do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8, bias=False)
        self.b = nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def w4_group(module, name):
    axis, group = (1, 8) if isinstance(module, nn.Linear) else (0, None)
    return tq.AffineQuantizer(4, tq.BatchMinMax(axis=axis, group_size=group), symmetric=True)


def a8(module, name):
    return tq.AffineQuantizer(8, tq.ExpAvgMinMax())


def calibrated(model, mode=S.QUANT_EVAL):
    x = torch.randn(4, 3, 8, 8)
    tq.set_qmodule_state(model, S.CALIBRATION)
    model.eval()
    model(x)
    tq.set_qmodule_state(model, mode)
    return model, x


@pytest.mark.parametrize("method", ["fx", "swap"])
@pytest.mark.parametrize("mode", [S.QUANT_EVAL, S.QUANT_EVAL_WEIGHT_ONLY, S.CALIBRATION, S.BYPASSED])
def test_round_trip_is_exact_and_restores_modes(method, mode, tmp_path):
    model, x = calibrated(tq.quantize_model(Net(), w4_group, a8, method=method, fold_bn=True), mode)
    expected = model(x)
    tq.save(model, tmp_path / "m.safetensors")
    loaded = tq.load(Net().eval(), tmp_path / "m.safetensors")
    assert tq.get_qmodule_states(loaded) == tq.get_qmodule_states(model)
    assert torch.equal(loaded(x), expected)


def test_loads_into_a_model_converted_by_hand(tmp_path):
    model, x = calibrated(tq.quantize_model(Net(), w4_group, a8))
    tq.save(model, tmp_path / "m.safetensors")
    mine = tq.quantize_model(Net(), w4_group, a8).eval()
    assert torch.equal(tq.load(mine, tmp_path / "m.safetensors")(x), model(x))


def test_weight_only_int4_is_packed_two_per_byte(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    model = tq.quantize_model(net, w4_group, None, method="swap")
    tq.set_qmodule_state(model, S.CALIBRATION_WEIGHT_ONLY)
    x = torch.randn(2, 256)
    model(x)
    tq.set_qmodule_state(model, S.QUANT_EVAL_WEIGHT_ONLY)
    tensors, desc = quantized_state_dict(model)
    assert set(desc["packed"]) == {"0.layer.weight", "2.layer.weight"}
    assert tensors["0.layer.weight.__tq_codes"].dtype == torch.uint8
    assert tensors["0.layer.weight.__tq_codes"].numel() == 256 * 512 // 2
    tq.save(model, tmp_path / "packed.safetensors")
    tq.save(model, tmp_path / "float.safetensors", pack=False)
    ratio = (tmp_path / "packed.safetensors").stat().st_size / (tmp_path / "float.safetensors").stat().st_size
    # 4 bits per weight plus two float32 ranges per group of 8 (this test's small groups), vs 32 bits
    assert ratio < 0.4
    fresh = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    assert torch.equal(tq.load(fresh, tmp_path / "packed.safetensors")(x), model(x))


@pytest.mark.parametrize(
    ("make", "bits"),
    [(lambda m, n: tq.NF4Quantizer(), 4), (lambda m, n: tq.APoTQuantizer(5, tq.BatchMinMax(axis=0)), 8)],
    ids=["nf4-blocks64", "apot5-per-channel"],
)
def test_weights_on_levels_are_packed_as_codes(make, bits, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64))
    model = tq.quantize_model(net, make, None, method="swap")
    tq.set_qmodule_state(model, S.CALIBRATION_WEIGHT_ONLY)
    x = torch.randn(2, 128)
    model(x)
    tq.set_qmodule_state(model, S.QUANT_EVAL_WEIGHT_ONLY)
    tensors, desc = quantized_state_dict(model)
    assert set(desc["packed"]) == {"0.layer.weight", "2.layer.weight"}
    assert desc["packed"]["0.layer.weight"]["levels"] is True
    assert desc["packed"]["0.layer.weight"]["bits"] == bits  # NF4: 16 levels, two per byte; APoT 5 bits: 31
    assert tensors["0.layer.weight.__tq_codes"].numel() == 128 * 64 * bits // 8
    tq.save(model, tmp_path / "packed.safetensors")
    fresh = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64))
    assert torch.equal(tq.load(fresh, tmp_path / "packed.safetensors")(x), model(x))


def test_training_modes_keep_float_weights():
    model, _ = calibrated(tq.quantize_model(Net(), w4_group, a8), S.QUANT_AWARE_TRAIN)
    tensors, desc = quantized_state_dict(model)
    assert desc["packed"] == {}
    assert torch.equal(tensors["fc1.layer.weight"], model.fc1.layer.weight)


def test_tied_weights_with_one_grid_share_their_codes(tmp_path):
    wf = lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))  # noqa: E731
    model = tq.quantize_model(Tied(), wf, None, method="swap")
    tq.set_qmodule_state(model, S.CALIBRATION)
    x = torch.randn(2, 8)
    model(x)
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    _, desc = quantized_state_dict(model)
    # each layer observed the shared weight through its own quantizer: same grid, one set of codes
    assert set(desc["packed"]) == {"a.layer.weight", "b.layer.weight"}
    assert desc["packed"]["b.layer.weight"]["codes"] == "a.layer.weight"
    tq.save(model, tmp_path / "t.safetensors")
    loaded = tq.load(Tied(), tmp_path / "t.safetensors")
    assert loaded.a.layer.weight is loaded.b.layer.weight
    assert torch.equal(loaded(x), model(x))


def test_learned_and_replaced_quantizers_round_trip(tmp_path):
    # LSQ's lazily shaped step and an AdaRound quantizer put in after conversion
    model = tq.quantize_model(Net(), lambda m, n: tq.LSQQuantizer(4, axis=0), a8)
    model, x = calibrated(model)
    ada = tq.ptq.AdaRoundQuantizer(model.fc1.weight_quantizer.grid(), model.fc1.layer.weight)
    with torch.no_grad():
        ada.alpha.normal_()
    model.fc1.weight_quantizer = ada
    expected = model(x)
    tq.save(model, tmp_path / "m.safetensors")
    loaded = tq.load(Net().eval(), tmp_path / "m.safetensors")
    assert isinstance(loaded.fc1.weight_quantizer, tq.ptq.AdaRoundQuantizer)
    assert torch.equal(loaded(x), expected)


def test_skip_by_type_and_glob_is_replayed(tmp_path):
    model = tq.quantize_model(Net(), w4_group, a8, method="swap", skip=["fc2", nn.Conv2d])
    model, x = calibrated(model)
    tq.save(model, tmp_path / "m.safetensors")
    _, desc = read(tmp_path / "m.safetensors")
    assert desc["conversions"][0]["skip"] == ["fc2", {"type": "torch.nn.modules.conv:Conv2d"}]
    loaded = tq.load(Net().eval(), tmp_path / "m.safetensors")
    assert isinstance(loaded.fc2, nn.Linear) and isinstance(loaded.conv[0], nn.Conv2d)
    assert torch.equal(loaded(x), model(x))


def test_mismatched_model_is_refused(tmp_path):
    model, _ = calibrated(tq.quantize_model(Net(), w4_group, a8))
    tq.save(model, tmp_path / "m.safetensors")
    other = tq.quantize_model(Net(), lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)), a8)
    with pytest.raises(ValueError, match=r"'conv\.0' has quantizers .*'n_bits': 8.*checkpoint describes.*'n_bits': 4"):
        tq.load(other, tmp_path / "m.safetensors")


class Tail(Net):
    """A layer the forward never calls (a tied input embedding, a training-only head)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(10, 10)


def test_a_wrapper_never_called_keeps_its_float_weight_and_saves(tmp_path):
    model = tq.quantize_model(Tail(), w4_group, a8, method="swap")
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(tq.ptq.UncalledQModulesWarning, match="unused"):
        tq.calibrate(model, [x], progress=False)
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    tq.save(model, tmp_path / "m.safetensors")  # failed: unused.weight_quantizer had no ranges
    loaded = tq.load(Tail(), tmp_path / "m.safetensors")
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded.unused.layer.weight, model.unused.layer.weight)


class Versioned(nn.Module):
    """Reads its state-dict version on load, as torchvision's MNASNet does (None is refused)."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") is None:
            raise ValueError("version should be set to 1 or 2 instead of None")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_modules_that_read_their_state_dict_version_load(tmp_path):
    model = tq.quantize_model(Versioned(), w4_group, a8, method="swap")
    x = torch.randn(2, 8)
    tq.calibrate(model, [x], progress=False)
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    tq.save(model, tmp_path / "m.safetensors")
    assert torch.equal(tq.load(Versioned(), tmp_path / "m.safetensors")(x), model(x))


def test_a_quantizer_the_checkpoint_cannot_rebuild_is_named(tmp_path):
    model, _ = calibrated(tq.quantize_model(Net(), lambda m, n: tq.QfmtQuantizer(8, True, tq.BatchMinMax()), a8))
    model.get_submodule("conv.0").weight_quantizer.n_bits = 1  # set by hand below what a signed Q-format takes
    tq.save(model, tmp_path / "m.safetensors")
    with pytest.raises(SpecError, match=r"checkpoint: conv\.0\.weight_quantizer: .*n_bits must be in \[2, 32\], got 1"):
        tq.load(Net(), tmp_path / "m.safetensors")


def test_a_file_without_a_description_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a torchquant checkpoint"):
        tq.load(Net(), tmp_path / "plain.safetensors")


def test_unregistered_quantizer_gives_an_error_saying_what_to_register(tmp_path):
    class MySign(tq.Quantizer):
        def pre_observe(self, x):
            pass

        def quantize(self, x):
            return x + (torch.sign(x) - x).detach()

        def post_observe(self, x):
            pass

    model = tq.quantize_model(Net(), lambda m, n: MySign(), None, method="swap")
    message = r"conv\.0\.weight_quantizer: .*MySign is not in the quantizer registry.*register"
    with pytest.raises(SpecError, match=message):
        tq.save(model, tmp_path / "m.safetensors")


def test_arguments_that_are_not_plain_values_are_named():
    @tq.register_quantizer("test-tensor-arg", overwrite=True)
    class WithTensor(tq.Quantizer):
        def __init__(self, table: torch.Tensor) -> None:
            super().__init__()
            self.table = table

        def pre_observe(self, x):
            pass

        def quantize(self, x):
            return x

        def post_observe(self, x):
            pass

    try:
        with pytest.raises(SpecError, match="argument 'table' is Tensor"):
            describe(WithTensor(torch.zeros(2)), who="layer.weight_quantizer")
    finally:
        QUANTIZERS._entries.pop("test-tensor-arg")


def test_spec_json_form_and_errors():
    raw = {
        "quantizer": "affine",
        "observer": "batch_minmax",
        "args": {"n_bits": 8, "symmetric": True},
        "observer_args": {"axis": 0},
    }
    spec = QuantizerSpec.from_dict(json.loads(json.dumps(raw)))
    q = spec.build()
    assert isinstance(q, tq.AffineQuantizer) and q.n_bits == 8 and q.granularity == tq.per_channel(0)
    assert describe(q) == spec
    assert spec.replace(args={"n_bits": 4}).args == {"n_bits": 4, "symmetric": True}
    with pytest.raises(SpecError, match="unknown keys"):
        QuantizerSpec.from_dict({"quantizer": "affine", "bits": 4})
    with pytest.raises(SpecError, match="missing 'quantizer'"):
        QuantizerSpec.from_dict({"observer": "batch_minmax"})
    with pytest.raises(SpecError, match="rejected the arguments"):
        QuantizerSpec("affine", "batch_minmax", {"n_bitz": 4}).build()
    with pytest.raises(KeyError, match="valid names"):
        QuantizerSpec("affine", "no-such-observer").check()


def test_tied_weights_with_different_grids_stay_float(tmp_path):
    def wf(module, name):
        return tq.AffineQuantizer(4, tq.BatchMinMax(axis=0 if name == "a" else None))

    model = tq.quantize_model(Tied(), wf, None, method="swap")
    tq.set_qmodule_state(model, S.CALIBRATION)
    x = torch.randn(2, 8)
    model(x)
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    _, desc = quantized_state_dict(model)
    assert desc["packed"] == {} and desc["aliases"] == {"b.layer.weight": "a.layer.weight"}
    tq.save(model, tmp_path / "t.safetensors")
    loaded = tq.load(Tied(), tmp_path / "t.safetensors")
    assert loaded.a.layer.weight is loaded.b.layer.weight
    assert torch.equal(loaded(x), model(x))


def test_a_quantizer_changed_after_construction_is_described_as_it_is(tmp_path):
    # a mixed-precision search sets n_bits on built quantizers; the checkpoint must follow
    model = tq.quantize_model(Net(), lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)), a8)
    model.fc1.weight_quantizer.n_bits = 3
    model.fc2.weight_quantizer.range_observer = tq.RunningMinMax(axis=0)
    model, x = calibrated(model)
    assert describe(model.fc1.weight_quantizer).args["n_bits"] == 3
    tq.save(model, tmp_path / "m.safetensors")
    loaded = tq.load(Net().eval(), tmp_path / "m.safetensors")
    assert loaded.fc1.weight_quantizer.n_bits == 3
    assert dict(tq.iter_qmodules(loaded))["conv.0"].weight_quantizer.n_bits == 8
    assert isinstance(loaded.fc2.weight_quantizer.range_observer, tq.RunningMinMax)
    assert torch.equal(loaded(x), model(x))


def test_a_layer_the_saving_version_left_float_is_put_back_float(tmp_path):
    """A layer type quantized now (a scaled embedding) but not described by the checkpoint loads float, with the
    checkpoint's float weight, as it was saved."""
    from safetensors.torch import save_file

    from torchquant.serialize import _META_KEY

    class Scaled(nn.Embedding):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.embed_scale = 2.0

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    def make():
        torch.manual_seed(0)
        return nn.Sequential(Scaled(10, 8), nn.Linear(8, 4)).eval()

    q = tq.quantize_model(make(), w4_group, None, method="swap")
    ids = torch.randint(0, 10, (2, 5))
    tq.calibrate(q, [ids], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    tq.save(q, tmp_path / "m.safetensors")
    tensors, desc = read(tmp_path / "m.safetensors")  # rewritten as if the embedding had stayed float
    del desc["modules"]["0"]
    desc["packed"].pop("0.layer.weight")
    desc["magnitudes"] = [m for m in desc["magnitudes"] if not m.startswith("0.")]
    old = {k: v for k, v in tensors.items() if not k.startswith("0.")}
    old["0.weight"] = make()[0].weight.detach().clone()
    save_file(old, tmp_path / "old.safetensors", metadata={_META_KEY: json.dumps(desc)})
    loaded = tq.load(make(), tmp_path / "old.safetensors")
    assert type(loaded[0]) is Scaled and isinstance(loaded[1], tq.QWrapper)
    with torch.no_grad():
        assert torch.equal(loaded(ids), q[1](make()[0](ids)))


def test_a_skipped_type_defined_where_it_cannot_be_imported_is_found_in_the_model(tmp_path):
    # a class of the training script's __main__ (or a function's) is recorded by a name no other script imports
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(x)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Head()).eval()

    wq = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))  # noqa: E731
    q = tq.quantize_model(build(), wq, None, skip=[Head])
    tq.calibrate(q, [torch.randn(16, 4)], progress=False)
    tq.save(q, tmp_path / "m.safetensors")
    loaded = tq.load(build(), tmp_path / "m.safetensors")
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), q(x)) and not isinstance(loaded.get_submodule("2.fc"), tq.QWrapper)
    with pytest.raises(ValueError, match=r"names '.*<locals>\.Head' as a skip type, which cannot be imported here"):
        tq.load(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), tmp_path / "m.safetensors")


def test_a_checkpoint_that_spells_out_default_arguments_loads(tmp_path):
    """Descriptions leave arguments equal to their defaults out; files written when they listed every argument
    given (symmetric=False, momentum=0.9) still load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def wf(m, n):
        return tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=False)

    def af(m, n):
        return tq.AffineQuantizer(8, tq.ExpAvgMinMax(0.9))

    model, x = calibrated(tq.quantize_model(Net(), wf, af, method="swap"))
    expected = model(x)
    path = tmp_path / "m.safetensors"
    tq.save(model, path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    desc = json.loads(meta["torchquant"])
    spelt = 0
    for info in desc["modules"].values():
        for spec in info["quantizers"].values():
            if spec.get("observer") == "ema_minmax":
                spec["observer_args"] = {"momentum": 0.9, **spec.get("observer_args", {})}
                spelt += 1
            if spec.get("observer") == "batch_minmax":
                spec["args"] = {**spec["args"], "symmetric": False}
                spelt += 1
    assert spelt >= 2
    save_file(tensors, str(path), metadata={"torchquant": json.dumps(desc)})
    loaded = tq.load(Net().eval(), path)
    assert torch.equal(loaded(x), expected)
