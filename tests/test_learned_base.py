"""LearnedQuantizer, the public base of quantizers with learned parameters.

A minimal subclass (a learned step per range) goes through QWrapper QAT, a state dict
into a fresh instance, describe/build and tq.save/tq.load; it and the learned quantizer
of the custom-quantizer tutorial then get the registry contract checks
(tests/test_registry_contract.py) that registered entries of the package get.
"""

from __future__ import annotations

import copy
import re
import sys
import types
from pathlib import Path

import pytest
import test_registry_contract as contract
import torch
from torch import nn

import torchquant as tq
from torchquant.quantizers_functional import round_ste
from torchquant.registry import QUANTIZERS, Example
from torchquant.spec import QuantizerSpec, describe

S = tq.QModuleState
NAME = "test-learned-step"
TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "custom_quantizer.md"


class LearnedStep(tq.LearnedQuantizer):
    """Symmetric grid with a learned step per range, initialised to max |x| / qmax."""

    learned_params = ("step",)

    def __init__(self, n_bits: int = 4, *, axis: int | None = None, group_size: int | None = None) -> None:
        super().__init__(axis, group_size)
        self.qmax = 2 ** (n_bits - 1) - 1

    def init_params(self, x):
        return self.granularity.aggregate(x.abs(), "amax", self._tq_name).clamp(min=1e-8) / self.qmax

    def quantize(self, x):
        self.check_initialized()
        s = self.granularity.expand(self.step)
        return round_ste(torch.clamp(x / s, -self.qmax, self.qmax)) * s

    def grid(self):
        self.check_initialized()
        s = self.granularity.expand(self.step.detach())
        return tq.AffineGrid(s, torch.zeros_like(s), -self.qmax, self.qmax, self.granularity)


EXAMPLES = [
    Example("w4-per-channel", lambda: LearnedStep(4, axis=0), role="weight"),
    Example("a8", lambda: LearnedStep(8), role="act"),
]


def _tutorial_class():
    """The tutorial's LearnedClipQuantizer and its examples (the page's first block and the class's)."""
    blocks = re.findall(r"```python\n(.*?)```", TUTORIAL.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "class LearnedClipQuantizer" in b]
    entries, examples = dict(QUANTIZERS._entries), dict(QUANTIZERS._examples)
    # A real module, so that torch.compile can import the class's __module__ (dynamo does on torch 2.13).
    module = types.ModuleType("_tutorial_learned_quantizer")
    sys.modules[module.__name__] = module
    ns = module.__dict__
    try:
        exec(compile(blocks[0], str(TUTORIAL), "exec"), ns)
        exec(compile(block, str(TUTORIAL), "exec"), ns)
        return ns["LearnedClipQuantizer"], QUANTIZERS.examples("tutorial-learned-clip")
    finally:  # registered for this module's tests only (by the fixture below)
        QUANTIZERS._entries, QUANTIZERS._examples = entries, examples


TUTORIAL_CLASS, TUTORIAL_EXAMPLES = _tutorial_class()
ENTRIES = {NAME: (LearnedStep, EXAMPLES), "tutorial-learned-clip": (TUTORIAL_CLASS, TUTORIAL_EXAMPLES)}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    entries, examples = dict(QUANTIZERS._entries), dict(QUANTIZERS._examples)
    for name, (cls, ex) in ENTRIES.items():
        tq.register_quantizer(name, overwrite=True, examples=ex)(cls)
    yield
    QUANTIZERS._entries, QUANTIZERS._examples = entries, examples


# ------------------------------------------------------------------ the base on its own


def test_public_names_and_the_private_alias():
    from torchquant.quantizers import learned

    assert tq.LearnedQuantizer is tq.quantizers.LearnedQuantizer is learned._LazyParamQuantizer
    assert "LearnedQuantizer" in tq.__all__ and "LearnedQuantizer" in tq.quantizers.__all__
    for cls in (tq.LSQQuantizer, tq.LSQPlusQuantizer, tq.PACTQuantizer):
        assert issubclass(cls, tq.LearnedQuantizer)
    assert tq.LSQPlusQuantizer.learned_params == ("step", "offset")


@pytest.mark.parametrize(
    ("kw", "shape"),
    [({}, ()), ({"axis": 0}, (8, 1, 1, 1)), ({"axis": -1, "group_size": 3}, (8, 3, 3, 1))],
    ids=["per-tensor", "per-channel", "per-group"],
)
def test_parameters_exist_empty_and_are_filled_in_place(kw, shape):
    q = LearnedStep(4, **kw)
    step = q.step
    assert [n for n, _ in q.named_parameters()] == ["step"] and step.numel() == 0 and not q.initialized
    w = torch.randn(8, 3, 3, 3)
    q.pre_observe(w)
    assert q.step is step and step.shape == shape and q.initialized
    expected = q.granularity.aggregate(w.abs(), "amax") / 7
    assert torch.equal(step.detach(), expected)
    q.pre_observe(w * 10)  # later observations change nothing
    assert torch.equal(step.detach(), expected)
    q.reset()
    assert q.step is step and not q.initialized


@pytest.mark.parametrize("cls", [tq.LSQQuantizer, tq.LSQPlusQuantizer, tq.PACTQuantizer])
def test_an_empty_tensor_initialises_nothing(cls):
    q = cls(4, signed=False) if cls is not tq.PACTQuantizer else cls(4, axis=1)  # per tensor: set at construction
    q.pre_observe(torch.empty(0, 6))  # no statistics: mean(|x|) of nothing would be NaN
    assert not q.initialized
    q.pre_observe(torch.rand(4, 6))
    values = [p.detach().clone() for p in q.parameters()]
    assert values and all(torch.isfinite(v).all() for v in values)
    x = torch.empty(0, 6, requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert y.shape == (0, 6)
    for p in q.parameters():  # LSQ's gradient scale 1 / sqrt(N * Q_P) with N = 0 elements
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p))


def test_before_initialisation_raises_naming_the_quantizer():
    w = tq.QWrapper(nn.Linear(4, 3), weight_quantizer=LearnedStep(4, axis=0))
    tq.set_qmodule_state(w, S.QUANT_EVAL)
    with pytest.raises(RuntimeError, match=r"weight_quantizer: learned parameters step are not initialised"):
        w(torch.randn(2, 4))


def test_values_follow_the_module_device_and_dtype(device):
    q = LearnedStep(4, axis=0).to(device=device, dtype=torch.float64)
    q.pre_observe(torch.randn(8, 3))  # float32, on the CPU
    assert q.step.dtype == torch.float64 and q.step.device.type == device.type


def test_qat_in_a_qwrapper_trains_the_same_parameter():
    torch.manual_seed(0)
    w = tq.QWrapper(nn.Linear(16, 4), weight_quantizer=LearnedStep(3, axis=0), acts_quantizer=LearnedStep(8))
    step = w.weight_quantizer.step
    opt = torch.optim.SGD(w.parameters(), lr=0.05)  # built before the first forward: holds the empty step
    tq.set_qmodule_state(w, S.QUANT_AWARE_TRAIN)
    x = torch.randn(64, 16)
    target = x @ torch.randn(16, 4)
    losses = []
    for i in range(10):
        loss = (w(x) - target).square().mean()
        if i == 0:
            first = step.detach().clone()
        opt.zero_grad()
        loss.backward()
        assert step.grad is not None and step.grad.shape == (4, 1)
        opt.step()
        losses.append(loss.item())
    assert w.weight_quantizer.step is step and not torch.equal(step.detach(), first)
    assert losses[-1] < losses[0]


def test_state_dict_loads_into_a_fresh_instance():
    w = tq.QWrapper(nn.Conv2d(3, 8, 3), weight_quantizer=LearnedStep(4, axis=0), acts_quantizer=LearnedStep(8))
    x = torch.randn(2, 3, 6, 6)
    with tq.qmodule_state(w, S.CALIBRATION):
        w(x)
    tq.set_qmodule_state(w, S.QUANT_EVAL)
    expected = w(x)
    fresh = tq.QWrapper(nn.Conv2d(3, 8, 3), weight_quantizer=LearnedStep(4, axis=0), acts_quantizer=LearnedStep(8))
    assert fresh.weight_quantizer.step.numel() == 0
    fresh.load_state_dict(w.state_dict(), strict=True)
    tq.set_qmodule_state(fresh, S.QUANT_EVAL)
    assert fresh.weight_quantizer.step.shape == (8, 1, 1, 1)
    assert torch.equal(fresh(x), expected)
    assert torch.equal(copy.deepcopy(w)(x), expected)


def test_constructor_arguments_are_recorded_and_described():
    q = LearnedStep(3, axis=0)
    assert q._tq_init == ((3,), {"axis": 0})
    spec = describe(q)
    assert spec == QuantizerSpec(NAME, None, {"n_bits": 3, "axis": 0})
    built = QuantizerSpec.from_dict(spec.to_dict()).build()
    assert type(built) is LearnedStep and built.qmax == 3 and built.granularity == tq.Granularity(axis=0)


def test_save_and_load_a_converted_model(tmp_path):
    def float_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)).eval()

    net = tq.quantize_model(
        float_net(), lambda m, n: LearnedStep(4, axis=0), lambda m, n: LearnedStep(8), method="swap"
    )
    x = torch.randn(2, 3, 6, 6)
    with tq.qmodule_state(net, S.CALIBRATION):
        net(x)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    tq.save(net, tmp_path / "net.safetensors")
    loaded = tq.load(float_net(), tmp_path / "net.safetensors")
    assert type(loaded[0].weight_quantizer) is LearnedStep
    assert torch.equal(loaded(x), net(x))


def test_declaration_errors_name_the_class():
    class NoParams(tq.LearnedQuantizer):
        def quantize(self, x):
            return x

    with pytest.raises(TypeError, match=r"NoParams: .*learned_params = \("):
        NoParams()

    class TwoParams(LearnedStep):
        learned_params = ("step", "offset")

    q = TwoParams()
    with pytest.raises(ValueError, match=r"TwoParams: init_params\(\) must return one tensor per learned parameter"):
        q.pre_observe(torch.randn(3))
    assert not q.initialized


def test_subclass_written_for_the_private_base_still_works():
    from torchquant.quantizers.learned import _LazyParamQuantizer

    class Old(_LazyParamQuantizer):
        _lazy_params = ("scale",)

        def __init__(self):
            super().__init__(None, None)

        def _init_params(self, x):
            return (x.abs().amax(),)

        def quantize(self, x):
            self._check_initialized()
            return torch.round(x / self.scale) * self.scale

    q = Old()
    q.pre_observe(torch.tensor([-2.0, 1.0]))
    assert q.learned_params == ("scale",) and q.scale.item() == 2.0
    assert q(torch.tensor([1.2])).item() == 2.0


# ------------------------------------------------------------------ the registry contract

CASES = [
    contract.Case("quantizer", name, e, r)
    for name, (_, examples) in ENTRIES.items()
    for e in examples
    for r in (("weight", "act") if e.role == "any" else (e.role,))
]
CHECKS = [
    contract.test_qwrapper_qat_eval_and_state_dict,
    contract.test_quantize_model_fx_and_symbolic_trace,
    contract.test_backward_gradients_are_finite_and_shaped,
    contract.test_idempotent,
    contract.test_outputs_lie_on_the_grid,
    contract.test_onnx_export_matches_in_steps,
]


@pytest.mark.parametrize("case", contract.params(CASES))
@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__.removeprefix("test_"))
def test_registry_contract(check, case):
    check(case)


@pytest.mark.parametrize("case", contract.params(CASES))
def test_registry_contract_described_rebuilt_and_saved(case, tmp_path):
    contract.test_described_rebuilt_and_saved(case, tmp_path)


@pytest.mark.parametrize("case", contract.params([c for c in CASES if c.role == "act"]))
def test_registry_contract_qop(case):
    contract.test_qop(case)


def test_registry_contract_compiles_fullgraph():
    model = contract._AllCases(CASES)
    weight, act = torch.randn(contract.WEIGHT_SHAPE), torch.randn(4, 8, 6, 6).relu() * 3
    for q, r in zip(model.qs, model.roles):
        q.pre_observe(weight if r == "weight" else act)
    eager = model(weight, act)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    for a, b in zip(compiled(weight, act), eager, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_model_compiled_before_its_first_batch_initializes_eagerly_and_matches():
    # Quantize, compile, train: the first batch initializes LSQ's steps, resizing them from (0,), which the
    # inductor graph could not do ("wrong number of dimensions" in its input checks).
    torch.manual_seed(0)
    m = tq.QWrapper(nn.Linear(16, 8), weight_quantizer=tq.make_quantizer("lsq", n_bits=4, axis=0),
                    acts_quantizer=tq.make_quantizer("lsq", n_bits=8))  # fmt: skip
    tq.set_qmodule_state(m, tq.QModuleState.QUANT_AWARE_TRAIN)
    eager = copy.deepcopy(m)
    compiled = torch.compile(m)
    x = torch.randn(4, 16)
    for step in range(2):
        y, y_eager = compiled(x * (step + 1)), eager(x * (step + 1))
        assert torch.allclose(y, y_eager, atol=1e-6)
        y.sum().backward()
        y_eager.sum().backward()
    for p, q in zip(m.parameters(), eager.parameters(), strict=True):
        assert p.shape == q.shape and torch.allclose(p.grad, q.grad, atol=1e-5)


@pytest.mark.parametrize(
    "make", [lambda: tq.LSQQuantizer(4), lambda: tq.LSQPlusQuantizer(3), lambda: tq.APoTQuantizer(4, tq.BatchMinMax())]
)
def test_an_object_pickled_with_n_bits_as_a_plain_attribute_loads(make):
    q = make()
    state = dict(q.__dict__)
    state["n_bits"] = state.pop("_n_bits")  # how it was pickled before n_bits became a checked property
    old = type(q).__new__(type(q))
    old.__setstate__(state)
    assert old.n_bits == q.n_bits
    old.n_bits = 2
    assert old.n_bits == 2
