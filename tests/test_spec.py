"""torchquant.spec: describing quantizers by registry names and arguments, and reading such descriptions."""

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.spec import QuantizerSpec, SpecError, describe


def test_a_setting_changed_after_construction_is_described():
    q = tq.AffineQuantizer(8, tq.ExpAvgMinMax())
    q.gradient_clip = True  # left at its default by the constructor, changed afterwards
    q.range_observer.momentum = 0.5
    spec = describe(q)
    assert spec.args["gradient_clip"] is True and spec.observer_args["momentum"] == 0.5
    rebuilt = spec.build()
    assert rebuilt.gradient_clip is True and rebuilt.range_observer.momentum == 0.5


def test_a_checkpoint_keeps_settings_changed_after_construction(tmp_path):
    def af(m, name):
        q = tq.AffineQuantizer(8, tq.ExpAvgMinMax())
        q.gradient_clip = True
        q.range_observer.momentum = 0.5
        return q

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    q = tq.quantize_model(net(), None, af, method="swap")
    tq.calibrate(q, [torch.randn(8, 4)], progress=False)
    tq.save(q, tmp_path / "m.safetensors")
    loaded = tq.load(net(), tmp_path / "m.safetensors")
    for m in (loaded[0], loaded[2]):
        assert m.acts_quantizer.gradient_clip is True and m.acts_quantizer.range_observer.momentum == 0.5


def test_equal_configurations_are_described_alike():
    a = describe(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=False))
    b = describe(tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)))
    assert a == b and "symmetric" not in a.args
    assert describe(tq.AffineQuantizer(8, tq.ExpAvgMinMax(0.9))) == describe(tq.AffineQuantizer(8, tq.ExpAvgMinMax()))


def test_observer_arguments_without_an_observer_are_refused():
    with pytest.raises(SpecError, match=r"recipe x: .*observer_args \{'axis': 0\} without an 'observer'"):
        QuantizerSpec.from_dict({"quantizer": "nf4", "observer_args": {"axis": 0}}, where="recipe x")
    spec = QuantizerSpec("affine", "batch_minmax", {"n_bits": 8}, {"axis": 0})
    assert spec.replace(observer=None).observer_args == {}  # dropping the observer drops its arguments


@pytest.mark.parametrize("bad", ["n_bits=8", 5, [("n_bits", 8)]])
def test_arguments_that_are_not_a_table_are_refused_naming_the_source(bad):
    with pytest.raises(SpecError, match=r"recipe x: 'args' must be a table of keyword arguments"):
        QuantizerSpec.from_dict({"quantizer": "affine", "args": bad}, where="recipe x")


def test_canonical_forms_compare_aliases_and_spelt_out_defaults_equal():
    from torchquant.spec import canonical

    a = {"quantizer": "affine", "observer": "moving_avg_minmax", "args": {"n_bits": 8, "symmetric": False}}
    b = {"quantizer": "affine", "observer": "ema_minmax", "args": {"n_bits": 8}, "observer_args": {"momentum": 0.9}}
    assert canonical(a) == canonical(b) == {"quantizer": "affine", "observer": "ema_minmax", "args": {"n_bits": 8}}
    q = tq.AffineQuantizer(8, tq.make_observer("moving_avg_minmax"))
    assert describe(q).observer == "moving_avg_minmax" and canonical(describe(q).to_dict()) == canonical(b)
