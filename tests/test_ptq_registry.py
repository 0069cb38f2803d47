"""Contract of the PTQ algorithm registry: every registered algorithm goes through the same checks,
on a model of its ``model_kind`` (a small CNN for ``"any"``, a tiny Llama for ``"causal_lm"``)."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.bench.models import ResidualBlock, conv_bn
from torchquant.ptq import PTQ_ALGORITHMS, get_ptq_algorithm, list_ptq_algorithms, register_ptq_algorithm
from torchquant.ptq.registry import MODEL_KINDS

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


def _llama() -> nn.Module:
    """A tiny Llama (grouped-query attention), every Linear quantized (W4, A8 inputs)."""
    transformers = pytest.importorskip("transformers")
    from hf.hf_tiny import llama_config  # tests/hf, a namespace package beside this file

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    q = tq.quantize_model(model, W4, None, method="swap")
    for _, m in tq.iter_qmodules(q):
        if isinstance(m, tq.QWrapper) and isinstance(m.layer, nn.Linear):
            m.input_quantizer = A8(m, "")
    return q


def _llama_data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 100, (2, 8), generator=g) for _ in range(3)]


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


@dataclass(frozen=True)
class Case:
    """A model of one ``model_kind``: how to build it, its data, a submodule whose training flag
    differs from the rest, the module failures are injected into, and the output shape."""

    build: Callable[[], nn.Module]
    data: Callable[[], list]
    other_flag: Callable[[nn.Module], nn.Module]
    hooked: Callable[[nn.Module], nn.Module]
    out_shape: tuple[int, ...]


CASES = {
    "any": Case(_model, _data, lambda q: q[2], lambda q: q[-1], (8, 3)),
    "causal_lm": Case(_llama, _llama_data, lambda q: q.model.layers[0], lambda q: q.lm_head, (2, 8, 100)),
}


def _case(algorithm) -> Case:
    return CASES[algorithm.model_kind]


def _prepared(algorithm):
    """A model ready for ``algorithm``: calibrated unless it runs before calibration."""
    case = _case(algorithm)
    q = case.build()
    if not algorithm.before_calibration:
        tq.calibrate(q, case.data(), progress=False)
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
    return algorithm(model, _case(algorithm).data(), **algorithm.accepted(OPTIONS))


def _set_modes(model, algorithm):
    """Modes and a mix of training flags that the algorithm must hand back unchanged (a model
    not yet calibrated can only run bypassed)."""
    if not algorithm.before_calibration:
        tq.set_qmodule_state(model, tq.QModuleState.QUANT_EVAL_ACT_ONLY)
    model.train()
    _case(algorithm).other_flag(model).eval()


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


def test_every_model_kind_has_a_test_case():
    assert set(MODEL_KINDS) == set(CASES)
    with pytest.raises(ValueError, match="model_kind must be one of"):
        register_ptq_algorithm("test-bad-kind", model_kind="vision")(lambda model, data: model)


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
    # Modes and training flags of the modules still there (equalize folds BatchNorm modules away,
    # quarot adds Hadamard transforms).
    for b, a in zip(before[1:], after[1:]):
        kept = dict(b)
        assert {(n, f) for n, f in a if n in kept} <= set(b) and set(kept) & {n for n, _ in a}
    assert not _same_state(before, after)  # it did something to the weights or buffers
    case = _case(algorithm)
    if algorithm.before_calibration:
        tq.calibrate(q, case.data(), progress=False)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    out = _logits(q.eval()(case.data()[0]))
    assert out.shape == case.out_shape and torch.isfinite(out).all()


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

    hooked = _case(algorithm).hooked
    q = _prepared(algorithm)
    handle = hooked(q).register_forward_pre_hook(count)
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

        hooked(q).register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="injected failure"):
            _run(algorithm, q)
        assert _same_state(before, _state(q)), f"{name} left the model changed after failing at call {k}"
