"""Contract of the PTQ algorithm registry: every registered algorithm goes through the same checks."""

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.bench.models import ResidualBlock, conv_bn
from torchquant.ptq import PTQ_ALGORITHMS, get_ptq_algorithm, list_ptq_algorithms, register_ptq_algorithm

W4 = lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax())  # noqa: E731
A8 = lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax())  # noqa: E731
# Offered to every algorithm; each takes the ones it accepts (PTQAlgorithm.accepted).
OPTIONS = dict(iters=4, batch_size=8, lr=1e-2, act_lr=1e-2, seed=0, progress=False)


def _model() -> nn.Module:
    """Conv+BN+ReLU, a residual block (a default reconstruction block) and a normalised classifier
    (a LayerNorm feeding a Linear, as in a transformer), quantized."""
    torch.manual_seed(0)
    net = nn.Sequential(
        conv_bn(1, 4), ResidualBlock(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 3)
    )
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding changes the weights
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return tq.quantize_model(net.eval(), W4, A8, method="swap")


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 1, 6, 6, generator=g) for _ in range(3)]


def _prepared(algorithm):
    """A model ready for ``algorithm``: calibrated unless it runs before calibration."""
    q = _model()
    if not algorithm.before_calibration:
        tq.calibrate(q, _data(), progress=False)
    return q


def _state(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, m.qstate) for n, m in tq.iter_qmodules(model)],
        [(n, m.training) for n, m in model.named_modules()],
    )


def _same_state(a, b):
    (sa, qa, ta), (sb, qb, tb) = a, b
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and qa == qb and ta == tb


def _run(algorithm, model):
    return algorithm(model, _data(), **algorithm.accepted(OPTIONS))


def _set_modes(model, algorithm):
    """Modes and a mix of training flags that the algorithm must hand back unchanged (a model
    not yet calibrated can only run bypassed)."""
    if not algorithm.before_calibration:
        tq.set_qmodule_state(model, tq.QModuleState.QUANT_EVAL_ACT_ONLY)
    model.train()
    model[2].eval()


ALGORITHMS = list_ptq_algorithms()


def test_every_algorithm_is_in_the_public_namespace_and_found_by_alias_and_case():
    assert {"adaround", "brecq", "qdrop", "bias_correction", "equalize"} <= set(ALGORITHMS)
    for name in ALGORITHMS:
        entry = get_ptq_algorithm(name)
        assert entry.name == name and entry.description
        assert callable(getattr(tq.ptq, name))
        assert get_ptq_algorithm(name.upper()) is entry
        for alias in entry.aliases:
            assert get_ptq_algorithm(alias) is entry
    assert get_ptq_algorithm("bc") is get_ptq_algorithm("bias_correction")
    assert get_ptq_algorithm("CLE") is get_ptq_algorithm("equalize")


def test_unknown_algorithm_lists_the_valid_names():
    with pytest.raises(KeyError, match=r"unknown PTQ algorithm 'no-such-algorithm'; valid names: .*adaround.*qdrop"):
        get_ptq_algorithm("no-such-algorithm")


def test_register_reads_options_from_the_signature_and_refuses_duplicates():
    try:

        @register_ptq_algorithm("test-noop", aliases=("test-nothing",))
        def noop(model, data, *, strength=1.0, progress=True):
            """Do nothing."""
            return model

        entry = get_ptq_algorithm("test-nothing")
        assert entry.options == {"strength", "progress"} and entry.description == "Do nothing."
        assert entry.accepted({"strength": 2.0, "iters": 5}) == {"strength": 2.0}
        assert "test-noop" in list_ptq_algorithms() and "test-nothing" not in list_ptq_algorithms()
        with pytest.raises(ValueError, match="already registered"):
            register_ptq_algorithm("test-noop")(lambda model, data: model)
    finally:
        for key in ("test-noop", "test-nothing"):
            PTQ_ALGORITHMS._entries.pop(key, None)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_changes_the_model_and_keeps_modes_and_training_flags(name):
    algorithm = get_ptq_algorithm(name)
    q = _prepared(algorithm)
    _set_modes(q, algorithm)
    before = _state(q)
    _run(algorithm, q)
    after = _state(q)
    # Modes and training flags of the modules still there (equalize folds BatchNorm modules away).
    for b, a in zip(before[1:], after[1:]):
        assert set(a) <= set(b)
    assert not _same_state(before, after)  # it did something to the weights or buffers
    if algorithm.before_calibration:
        tq.calibrate(q, _data(), progress=False)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    out = q.eval()(_data()[0])
    assert out.shape == (8, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_is_reproducible(name):
    algorithm = get_ptq_algorithm(name)
    a, b = _prepared(algorithm), _prepared(algorithm)
    _run(algorithm, a)
    _run(algorithm, b)
    assert _same_state(_state(a), _state(b))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithm_restores_the_model_when_a_forward_pass_fails(name):
    algorithm = get_ptq_algorithm(name)
    calls = [0]

    def count(mod, args):
        calls[0] += 1

    q = _prepared(algorithm)
    handle = q[-1].register_forward_pre_hook(count)
    _run(algorithm, q)
    handle.remove()
    assert calls[0] >= 1, f"{name} never ran the model"
    # Fail at the first, a middle and the last forward pass of the classifier: the model,
    # its modes and training flags must be exactly as before each time.
    for k in sorted({1, calls[0] // 2 + 1, calls[0]}):
        q = _prepared(algorithm)
        _set_modes(q, algorithm)
        before = _state(q)
        seen = [0]

        def fail(mod, args, k=k, seen=seen):
            seen[0] += 1
            if seen[0] == k:
                raise RuntimeError("injected failure")

        q[-1].register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="injected failure"):
            _run(algorithm, q)
        assert _same_state(before, _state(q)), f"{name} left the model changed after failing at call {k}"
