"""State dicts carry the configuration: quantizers their grid, QModules their mode (``<prefix>_extra_state``)."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.quantizers import AdaRoundQuantizer
from torchquant.registry import QUANTIZERS
from torchquant.spec import CONFIG_KEY, decode_entry, encode_entry

S = tq.QModuleState


def model(weight_quantizer: tq.Quantizer, acts: bool = True) -> nn.Module:
    """A wrapper nested two levels deep, so errors must name it ``1.0``."""
    torch.manual_seed(0)
    acts_quantizer = tq.AffineQuantizer(8, tq.ExpAvgMinMax()) if acts else None
    wrapper = tq.QWrapper([nn.Linear(8, 4), nn.ReLU()], weight_quantizer, acts_quantizer)
    return nn.Sequential(nn.Identity(), nn.Sequential(wrapper))


def calibrated(m: nn.Module, mode: S = S.QUANT_EVAL) -> nn.Module:
    tq.set_qmodule_state(m, S.CALIBRATION)
    m(torch.randn(16, 8))
    tq.set_qmodule_state(m, mode)
    return m


def without_config(state: dict) -> dict:
    """A state dict as torchquant wrote it before configurations were recorded."""
    return {k: v for k, v in state.items() if not k.endswith(CONFIG_KEY)}


# ------------------------------------------------------------------ mismatches
# (id, saved quantizer, model's quantizer, text naming the saved one, text naming the model's, field)
MISMATCHES = [
    (
        "bits-4-vs-8",
        lambda: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)),
        lambda: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)),
        "affine(n_bits=4",
        "affine(n_bits=8",
        "n_bits",
    ),
    (
        "per-channel-vs-per-tensor",
        lambda: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)),
        lambda: tq.AffineQuantizer(4, tq.BatchMinMax()),
        "per-channel(axis=0))",
        "per-tensor)",
        "granularity",
    ),
    (
        "per-group-vs-per-channel",
        lambda: tq.AffineQuantizer(4, tq.BatchMinMax(axis=1, group_size=4)),
        lambda: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)),
        "per-group(axis=1, size=4))",
        "per-channel(axis=0))",
        "granularity",
    ),
    (
        "group-size-4-vs-2",
        lambda: tq.LSQQuantizer(4, axis=1, group_size=4),
        lambda: tq.LSQQuantizer(4, axis=1, group_size=2),
        "per-group(axis=1, size=4))",
        "per-group(axis=1, size=2))",
        "granularity",
    ),
    (
        "asymmetric-vs-symmetric",
        lambda: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)),
        lambda: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=True),
        "symmetric=False",
        "symmetric=True",
        "symmetric",
    ),
    (
        "minifloat-e4m3-vs-e5m2",
        lambda: tq.MinifloatQuantizer("fp8_e4m3", tq.BatchMinMax(axis=0)),
        lambda: tq.MinifloatQuantizer("fp8_e5m2", tq.BatchMinMax(axis=0)),
        "fmt='e4m3(bias=7, nan_only)'",
        "fmt='e5m2(bias=15, ieee)'",
        "fmt",
    ),
    (
        "mx-block-32-vs-4",
        lambda: tq.MXQuantizer("fp4_e2m1", block_size=8, axis=1),
        lambda: tq.MXQuantizer("fp4_e2m1", block_size=4, axis=1),
        "block_size=8",
        "block_size=4",
        "block_size",
    ),
    (
        "affine-vs-lsq",
        lambda: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)),
        lambda: tq.LSQQuantizer(4, axis=0),
        "affine(",
        "lsq(",
        "quantizer",
    ),
]


@pytest.mark.parametrize(
    "saved, target, saved_text, target_text, field", [m[1:] for m in MISMATCHES], ids=[m[0] for m in MISMATCHES]
)
@pytest.mark.parametrize("strict", [True, False], ids=["strict", "not-strict"])
def test_a_differently_configured_quantizer_refuses_the_state(saved, target, saved_text, target_text, field, strict):
    state = calibrated(model(saved())).state_dict()
    other = model(target())
    with pytest.raises(RuntimeError, match=r"1\.0\.weight_quantizer: ") as info:
        other.load_state_dict(state, strict=strict)
    message = next(line for line in str(info.value).splitlines() if "1.0.weight_quantizer: " in line)
    before, after = message.split("but this model's quantizer is")
    assert saved_text in before and target_text in after
    assert f"differ in {field}" in after
    assert "1.0.weight_quantizer._extra_state" in after  # how to load it anyway
    assert "acts_quantizer" not in str(info.value)  # the matching quantizer is not reported


def test_the_error_lists_every_mismatched_quantizer():
    state = calibrated(model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)))).state_dict()
    other = model(tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)))
    other[1][0].acts_quantizer = tq.AffineQuantizer(4, tq.ExpAvgMinMax())
    with pytest.raises(RuntimeError) as info:
        other.load_state_dict(state)
    assert "1.0.weight_quantizer: " in str(info.value) and "1.0.acts_quantizer: " in str(info.value)


def test_set_extra_state_checks_too():
    q = tq.AffineQuantizer(4, tq.BatchMinMax())
    q.set_extra_state(tq.AffineQuantizer(4, tq.BatchMinMax()).get_extra_state())
    with pytest.raises(ValueError, match="differ in n_bits"):
        q.set_extra_state(tq.AffineQuantizer(2, tq.BatchMinMax()).get_extra_state())
    with pytest.raises(ValueError, match="not a quantizer configuration"):
        q.set_extra_state(torch.zeros(3))


# ------------------------------------------------------------ what may differ
@pytest.mark.parametrize(
    "saved, target",
    [
        pytest.param(
            lambda: tq.AffineQuantizer(4, tq.ExpAvgMinMax(axis=0)),
            lambda: tq.AffineQuantizer(4, tq.ExpAvgMinMax(0.5, axis=0), gradient_clip=True),
            id="gradient-clip-and-momentum",
        ),
        pytest.param(
            lambda: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=False),
            lambda: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)),
            id="default-given-or-not",
        ),
        pytest.param(
            lambda: tq.MinifloatQuantizer("e4m3", tq.BatchMinMax()),
            lambda: tq.make_quantizer("fp8_e4m3", range_observer=tq.BatchMinMax()),
            id="format-alias-and-factory",
        ),
        pytest.param(
            lambda: tq.LSQPlusQuantizer(4, axis=0, init="std"),
            lambda: tq.LSQPlusQuantizer(4, axis=0, grad_scale=False),
            id="lsq+-init-and-grad-scale",
        ),
        pytest.param(lambda: tq.PACTQuantizer(4, 6.0), lambda: tq.PACTQuantizer(4, 2.0, 1e-4), id="pact-init"),
    ],
)
def test_arguments_that_do_not_change_the_grid_may_differ(saved, target):
    state = calibrated(model(saved())).state_dict()
    other = model(target())
    assert not other.load_state_dict(state).missing_keys


def test_learned_values_and_adaround_hardening_load():
    m = calibrated(model(tq.LSQQuantizer(4, axis=0)), S.QUANT_AWARE_TRAIN)
    with torch.no_grad():
        m[1][0].weight_quantizer.step.mul_(1.5)  # a trained step
    other = model(tq.LSQQuantizer(4, axis=0))
    other.load_state_dict(m.state_dict())
    assert torch.equal(other[1][0].weight_quantizer.step, m[1][0].weight_quantizer.step)

    w = torch.randn(4, 8)
    ref = tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))
    ref.pre_observe(w)
    soft = AdaRoundQuantizer(ref.grid(), w, soft=True)
    hard = AdaRoundQuantizer(ref.grid(), w, soft=False)
    hard.load_state_dict(soft.state_dict())  # soft rounding turns hard at the end of AdaRound


def test_the_configuration_follows_changes_after_construction():
    m = calibrated(model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))))
    m[1][0].weight_quantizer.n_bits = 6  # a mixed-precision search
    state = m.state_dict()
    model(tq.AffineQuantizer(6, tq.BatchMinMax(axis=0))).load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"n_bits=6.*but this model's quantizer is affine\(n_bits=4"):
        model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))).load_state_dict(state)


def test_an_uncalibrated_state_loads_into_the_same_configuration():
    for make in (lambda: tq.AffineQuantizer(4, tq.RunningMinMax(axis=0)), lambda: tq.LSQQuantizer(4, axis=0)):
        state = model(make()).state_dict()
        other = model(make())
        result = other.load_state_dict(state)
        assert not result.missing_keys and not result.unexpected_keys
        assert tq.get_qmodule_states(other) == {"1.0": S.BYPASSED}


def test_an_argument_one_side_lacks_is_not_compared():
    q = tq.AffineQuantizer(4, tq.BatchMinMax())
    saved = decode_entry(q.get_extra_state())
    del saved["args"]["power_of_two"]  # saved before the argument existed
    q.set_extra_state(encode_entry(saved))


@pytest.mark.parametrize("name", QUANTIZERS.names())
def test_every_registered_quantizer_records_a_json_configuration(name):
    for example in QUANTIZERS.examples(name):
        q = example.build()
        config = decode_entry(q.get_extra_state())
        assert config == json.loads(json.dumps(q.grid_config()))
        assert config["quantizer"] in QUANTIZERS.names()
        example.build().set_extra_state(q.get_extra_state())


# ----------------------------------------------------------------------- modes
def test_a_matching_load_restores_the_mode_and_the_outputs():
    m = calibrated(model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))), S.QUANT_EVAL_WEIGHT_ONLY)
    other = model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)))
    assert tq.get_qmodule_states(other) == {"1.0": S.BYPASSED}
    assert not other.load_state_dict(m.state_dict()).missing_keys
    assert tq.get_qmodule_states(other) == {"1.0": S.QUANT_EVAL_WEIGHT_ONLY}
    x = torch.randn(5, 8)
    assert torch.equal(other(x), m(x))


def test_the_saved_mode_replaces_the_models():
    m = calibrated(model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))), S.QUANT_EVAL)
    other = calibrated(model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))), S.CALIBRATION_ACT_ONLY)
    other.load_state_dict(m.state_dict())
    assert other[1][0].mode is S.QUANT_EVAL


def test_an_invalid_mode_entry_is_an_error_naming_the_module():
    state = calibrated(model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)))).state_dict()
    state["1.0._extra_state"] = encode_entry({"qstate": "quantized"})
    other = model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)))
    with pytest.raises(
        RuntimeError, match=r"1\.0: the state dict's '1\.0\._extra_state' holds no valid mode.*quant_eval"
    ):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"QWrapper: .*holds no valid mode"):
        other[1][0].set_extra_state(encode_entry({"qstate": "quantized"}))


def test_an_old_state_dict_loads_with_the_mode_left_as_it_is():
    m = calibrated(model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))))
    old = without_config(m.state_dict())
    assert len(old) == len(m.state_dict()) - 3  # the QWrapper and its two quantizers
    other = calibrated(model(tq.AffineQuantizer(8, tq.BatchMinMax())), S.CALIBRATION_WEIGHT_ONLY)
    result = other.load_state_dict(old)  # strict: no missing key, no check
    assert not result.missing_keys and not result.unexpected_keys
    assert other[1][0].qstate is S.CALIBRATION_WEIGHT_ONLY


# ------------------------------------------------------ consumers of state dicts
def test_torch_save_deepcopy_and_device_or_dtype_moves_keep_the_entries():
    m = calibrated(model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))))
    moved = copy.deepcopy(m).to(torch.float64)
    state = moved.state_dict()
    assert state["1.0._extra_state"].dtype == torch.uint8
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    other = model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)))
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other[1][0].qstate is S.QUANT_EVAL
    assert "_extra_state" not in dict(m.named_buffers())  # nothing for DDP to broadcast, nothing to move


def test_safetensors_holds_the_entries(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    m = calibrated(model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))))
    safetensors.save_file(m.state_dict(), tmp_path / "m.safetensors")
    other = model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)))
    other.load_state_dict(safetensors.load_file(tmp_path / "m.safetensors"))
    assert other[1][0].qstate is S.QUANT_EVAL
    with pytest.raises(RuntimeError, match="differ in n_bits"):
        model(tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))).load_state_dict(
            safetensors.load_file(tmp_path / "m.safetensors")
        )


def test_torch_distributed_checkpoint_state_dict_helpers():
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    m = calibrated(model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0))))
    state = get_model_state_dict(m)
    assert "1.0.weight_quantizer._extra_state" in state
    other = model(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)))
    set_model_state_dict(other, state)
    assert other[1][0].qstate is S.QUANT_EVAL
