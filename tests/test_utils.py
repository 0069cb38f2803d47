import pytest
import torch
from torch import nn

from torchquant import QModuleState, QOp, QWrapper, get_qmodule_states, qmodule_state, set_qmodule_state
from torchquant.utils import restoring_states

S = QModuleState


def model():
    return nn.Sequential(QWrapper(nn.Linear(2, 2)), nn.ReLU(), nn.Sequential(QOp(torch.relu)))


def test_set_reaches_nested_modules():
    m = model()
    set_qmodule_state(m, S.QUANT_EVAL)
    assert set(get_qmodule_states(m).values()) == {S.QUANT_EVAL}
    assert list(get_qmodule_states(m)) == ["0", "2.0"]


def test_context_restores_each_modules_own_mode_even_on_error():
    m = model()
    set_qmodule_state(m[0], S.CALIBRATION)
    with pytest.raises(KeyError), qmodule_state(m, S.QUANT_AWARE_TRAIN):
        assert m[2][0].qstate == S.QUANT_AWARE_TRAIN
        raise KeyError("boom")
    assert m[0].qstate == S.CALIBRATION and m[2][0].qstate == S.BYPASSED


def test_mode_properties_table():
    expect = {
        S.BYPASSED: (False, False, False, False),
        S.QUANT_AWARE_TRAIN_WEIGHT_ONLY: (True, False, True, False),
        S.QUANT_AWARE_TRAIN_ACT_ONLY: (False, True, False, True),
        S.QUANT_AWARE_TRAIN: (True, True, True, True),
        S.CALIBRATION: (False, False, True, True),
        S.CALIBRATION_WEIGHT_ONLY: (False, False, True, False),
        S.CALIBRATION_ACT_ONLY: (False, False, False, True),
        S.QUANT_EVAL_WEIGHT_ONLY: (True, False, False, False),
        S.QUANT_EVAL_ACT_ONLY: (False, True, False, False),
        S.QUANT_EVAL: (True, True, False, False),
    }
    assert set(expect) == set(QModuleState)
    for mode, (wq, aq, wo, ao) in expect.items():
        assert (mode.is_weight_quantized, mode.is_act_quantized, mode.is_weight_observed, mode.is_act_observed) == (
            wq,
            aq,
            wo,
            ao,
        ), mode


def test_bad_mode():
    with pytest.raises(TypeError, match="QModuleState"):
        set_qmodule_state(model(), "QUANT_EVAL")


@pytest.mark.parametrize(
    ("fn", "who"),
    [
        (lambda m: set_qmodule_state(m, S.QUANT_EVAL), "set_qmodule_state"),
        (lambda m: get_qmodule_states(m), "get_qmodule_states"),
        (lambda m: qmodule_state(m, S.QUANT_EVAL).__enter__(), "qmodule_state"),
        (lambda m: restoring_states(m).__enter__(), "restoring_states"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_list_of_models_is_refused_by_name(fn, who):
    with pytest.raises(TypeError, match=f"{who}: expected an nn.Module, got list"):
        fn([model(), model()])
