"""The registry contract: every registered quantizer and observer passes the same checks.

Instances come from the registry itself (:meth:`torchquant.registry.Registry.examples`:
the examples an entry was registered with, or its default arguments), so an entry added
later is checked here without a test of its own. An observer is checked inside a 4-bit
:class:`~torchquant.AffineQuantizer`. Each case runs in the role its example names
(``weight``, ``act``, or both for ``any``): as a QWrapper's weight or activation
quantizer, in a QOp (activations), in a model converted by ``quantize_model`` (torch.fx),
under torch.compile, through ``state_dict`` and ``copy.deepcopy``, backward, and, where the
outputs lie on ``grid()``, ``levels()`` or ``float_grid()``, through their codes and an ONNX export.
"""

from __future__ import annotations

import copy
import io
import operator
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.registry import OBSERVERS, QUANTIZERS, Example

S = tq.QModuleState
WEIGHT_SHAPE = (8, 3, 3, 3)  # the weight of Conv2d(3, 8, 3): what a weight example is applied to by default
N_BITS_OBSERVED = 4  # an observer is checked inside an AffineQuantizer of this many bits


@dataclass(frozen=True)
class Case:
    """One registry example in one role."""

    kind: str  # "quantizer" or "observer"
    name: str
    example: Example
    role: str  # "weight" or "act"

    @property
    def id(self) -> str:
        prefix = "" if self.kind == "quantizer" else "observer-"
        suffix = f"-{self.role}" if self.example.role == "any" else ""
        return f"{prefix}{self.name}:{self.example.name}{suffix}"

    def build(self) -> tq.Quantizer:
        made = self.example.build()
        if self.kind == "observer":
            return tq.AffineQuantizer(N_BITS_OBSERVED, made)
        return made

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.example.weight_shape or WEIGHT_SHAPE

    def layer(self) -> nn.Module:
        """The float Conv2d whose weight (weight role) or ReLU output (act role) the case quantizes."""
        c_out, c_in, kh, kw = self.weight_shape if self.role == "weight" else WEIGHT_SHAPE
        return nn.Conv2d(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2))

    def inputs(self) -> torch.Tensor:
        """A batch for :meth:`layer`."""
        c_in = self.weight_shape[1] if self.role == "weight" else WEIGHT_SHAPE[1]
        return torch.randn(2, c_in, 6, 6)

    def tensor(self) -> torch.Tensor:
        """What the quantizer sees in its role: a weight, or a ReLU activation with a long tail."""
        if self.role == "weight":
            return torch.randn(self.weight_shape)
        return torch.randn(4, WEIGHT_SHAPE[0], 6, 6).relu() * 3

    def wrapper(self) -> tq.QWrapper:
        q = self.build()
        return tq.QWrapper(
            [
                self.layer(),
                nn.BatchNorm2d(self.weight_shape[0] if self.role == "weight" else WEIGHT_SHAPE[0]),
                nn.ReLU(),
            ],
            weight_quantizer=q if self.role == "weight" else None,
            acts_quantizer=q if self.role == "act" else None,
        )

    def quantizer_of(self, w: tq.QWrapper) -> tq.Quantizer:
        return w.weight_quantizer if self.role == "weight" else w.acts_quantizer


def registry_cases() -> list[Case]:
    """Every example of every registered quantizer and observer, in each of its roles."""
    cases = []
    for kind, registry in (("quantizer", QUANTIZERS), ("observer", OBSERVERS)):
        for name in registry.names():
            try:
                examples = registry.examples(name)
            except TypeError:
                continue  # test_every_registered_entry_can_be_built fails for it
            for e in examples:
                roles = ("weight", "act") if e.role == "any" else (e.role,)
                cases.extend(Case(kind, name, e, r) for r in roles)
    return cases


CASES = registry_cases()


def params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


def observed(case: Case) -> tuple[tq.Quantizer, torch.Tensor]:
    torch.manual_seed(0)
    q = case.build()
    x = case.tensor()
    q.pre_observe(x)
    return q, x


def saved_and_loaded(module: nn.Module, fresh: nn.Module) -> nn.Module:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    return fresh


def test_every_registered_entry_can_be_built():
    for kind, registry, base in (("quantizer", QUANTIZERS, tq.Quantizer), ("observer", OBSERVERS, tq.RangeObserver)):
        for name in registry.names():
            examples = registry.examples(name)  # TypeError names the entry and says what to add
            assert examples, (kind, name)
            for e in examples:
                assert isinstance(e.build(), base), (kind, name, e.name)
                assert e.weight_shape is None or e.role == "weight", (kind, name, e.name)


def test_cases_cover_every_registered_name():
    covered = {(c.kind, c.name) for c in CASES}
    assert {("quantizer", n) for n in ("affine", "qfmt", "lsq", "adaround", "mxint8")} <= covered
    assert {("observer", n) for n in ("batch_minmax", "mse", "entropy", "percentile")} <= covered


# ------------------------------------------------------------- self-describing checkpoints


@pytest.mark.parametrize("case", params(CASES))
def test_described_rebuilt_and_saved(case, tmp_path):
    """describe() rebuilds the same class, and tq.save/tq.load reproduce a converted model exactly."""
    from torchquant.spec import QuantizerSpec, describe

    q = case.build()
    spec = describe(q)
    assert QuantizerSpec.from_dict(spec.to_dict()) == spec
    assert type(spec.build()) is type(q)

    def float_net():
        torch.manual_seed(0)
        return nn.Sequential(case.layer(), nn.ReLU())

    def factory(role):
        return (lambda module, name: case.build()) if case.role == role else None

    net = tq.quantize_model(float_net(), factory("weight"), factory("act"), method="swap")
    x = case.inputs()
    tq.set_qmodule_state(net, S.CALIBRATION)
    net(x)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    expected = net(x)
    tq.save(net, tmp_path / "net.safetensors")
    loaded = tq.load(float_net(), tmp_path / "net.safetensors")
    assert loaded[0].qstate is S.QUANT_EVAL
    assert torch.equal(loaded(x), expected)


# ------------------------------------------------------------------ QWrapper, QOp


@pytest.mark.parametrize("case", params(CASES))
def test_qwrapper_qat_eval_and_state_dict(case):
    torch.manual_seed(0)
    w = case.wrapper()
    x = case.inputs()
    tq.set_qmodule_state(w, S.QUANT_AWARE_TRAIN)
    y = w(x)
    y.square().mean().backward()
    assert y.shape == (2, w.layer.out_channels, 6, 6) and torch.isfinite(y).all()
    q = case.quantizer_of(w)
    for p in q.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    grad = w.layer.weight.grad
    assert torch.isfinite(grad).all()
    if case.example.ste:
        assert grad.abs().sum() > 0
    else:  # only the quantizer's own parameters learn
        assert any(p.grad.abs().sum() > 0 for p in q.parameters())
    w.eval()
    tq.set_qmodule_state(w, S.QUANT_EVAL)
    y_eval = w(x)
    with torch.no_grad():
        tq.set_qmodule_state(w, S.BYPASSED)
        assert not torch.equal(w(x), y_eval)  # quantization does something
    tq.set_qmodule_state(w, S.QUANT_EVAL)
    fresh = saved_and_loaded(w, case.wrapper().eval())
    tq.set_qmodule_state(fresh, S.QUANT_EVAL)
    assert torch.equal(fresh(x), y_eval)
    assert torch.equal(copy.deepcopy(w)(x), y_eval)


@pytest.mark.parametrize("case", params(c for c in CASES if c.role == "act"))
def test_qop(case):
    op = tq.QOp(operator.add, acts_quantizer=case.build())
    a, b = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    tq.set_qmodule_state(op, S.QUANT_AWARE_TRAIN)
    y_qat = op(a, b)
    tq.set_qmodule_state(op, S.QUANT_EVAL)
    y = op(a, b)
    assert y.shape == a.shape and torch.isfinite(y).all() and torch.isfinite(y_qat).all()
    assert not torch.equal(y, a + b)  # quantization does something


def _state(q: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in q.state_dict().items()}


def _assert_same_state(q: nn.Module, before: dict[str, torch.Tensor], when: str) -> None:
    after = q.state_dict()
    assert after.keys() == before.keys(), when
    for k, v in after.items():
        assert v.shape == before[k].shape and torch.equal(v, before[k]), f"{when}: {k} changed"


@pytest.mark.parametrize("case", params(c for c in CASES if c.role == "act"))
def test_empty_batch_passes_through_and_changes_no_state(case):
    """A batch of no samples (an MoE expert routed no tokens, a detector with no proposals)."""
    torch.manual_seed(0)
    w = case.wrapper()
    q = case.quantizer_of(w)
    empty = case.inputs()[:0]
    tq.set_qmodule_state(w, S.QUANT_AWARE_TRAIN)
    before = _state(q)
    y = w(empty)  # before any data: nothing to start the ranges or parameters from
    y.sum().backward()
    assert y.shape == (0, w.layer.out_channels, 6, 6)
    _assert_same_state(q, before, "fresh")
    w(case.inputs()).square().mean().backward()
    before = _state(q)
    for mode in (S.CALIBRATION, S.QUANT_AWARE_TRAIN, S.QUANT_EVAL):
        tq.set_qmodule_state(w, mode)
        w.zero_grad(set_to_none=True)
        y = w(empty)
        assert y.shape == (0, w.layer.out_channels, 6, 6), mode
        if y.requires_grad:
            y.sum().backward()
        if mode is S.QUANT_AWARE_TRAIN:  # every parameter a non-empty batch trains gets a (zero) gradient: DDP
            for name, p in q.named_parameters():
                assert p.grad is not None and not p.grad.any(), name
        _assert_same_state(q, before, mode.name)


# ------------------------------------------------------------------ torch.fx


class _Residual(nn.Module):
    """conv-bn-relu, then a residual add: one QWrapper and one QOp after conversion."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU()
        self.proj = nn.Conv2d(conv.in_channels, conv.out_channels, 1)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x))) + self.proj(x)


@pytest.mark.parametrize("case", params(CASES))
def test_quantize_model_fx_and_symbolic_trace(case):
    torch.manual_seed(0)
    net = _Residual(case.layer()).eval()
    x = case.inputs()
    shape = torch.Size(case.weight_shape)

    def weights(m, n):
        return case.build() if m.weight.shape == shape else None

    q = tq.quantize_model(
        net, weights if case.role == "weight" else None, None if case.role == "weight" else lambda m, n: case.build()
    )
    n_quantizers = sum(isinstance(m, tq.Quantizer) for m in q.modules())
    assert n_quantizers == (1 if case.role == "weight" else 3)  # weights of conv; or outputs of conv, proj, add
    with torch.no_grad():
        ref = net(x)
        with tq.qmodule_state(q, S.CALIBRATION):
            q(x)
        tq.set_qmodule_state(q, S.QUANT_EVAL)
        y = q(x)
    assert torch.isfinite(y).all() and not torch.equal(y, ref)
    # a QWrapper traced by torch.fx runs what eager runs
    w = case.wrapper().eval()
    tq.set_qmodule_state(w, S.CALIBRATION)
    w(x)
    tq.set_qmodule_state(w, S.QUANT_EVAL)
    gm = torch.fx.symbolic_trace(w)
    assert torch.equal(gm(x), w(x))


# ------------------------------------------------------------------ torch.compile


class _AllCases(nn.Module):
    """Every case applied to the tensor of its role: one torch.compile for all (compilation is slow on CPU)."""

    def __init__(self, cases):
        super().__init__()
        self.roles = [c.role for c in cases]
        self.qs = nn.ModuleList(c.build() for c in cases)

    def forward(self, weight, act):
        return [q(weight if r == "weight" else act) for q, r in zip(self.qs, self.roles)]


# Every case is captured whole by dynamo (fullgraph, no graph break); a few cases also
# go through inductor's code generation, which costs seconds per kernel on CPU.
INDUCTOR_CASES = {"lsq:w4-per-channel", "fp8_e4m3:scaled-ema", "mxfp4:axis1-act"}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch.manual_seed(0)
    cases = [c for c in CASES if backend == "eager" or c.id in INDUCTOR_CASES]
    assert backend == "eager" or len(cases) == len(INDUCTOR_CASES)
    cases = [c for c in cases if c.example.weight_shape in (None, WEIGHT_SHAPE)]
    model = _AllCases(cases)
    weight, act = torch.randn(WEIGHT_SHAPE), torch.randn(4, 8, 6, 6).relu() * 3
    for q, r in zip(model.qs, model.roles):
        q.pre_observe(weight if r == "weight" else act)
    eager = model(weight, act)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    for c, a, b in zip(cases, compiled(weight, act), eager, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), c.id


# ------------------------------------------------------------------ backward, idempotence, grid, ONNX


@pytest.mark.parametrize("case", params(CASES))
def test_backward_gradients_are_finite_and_shaped(case):
    q, x = observed(case)
    x = x.clone().requires_grad_()
    y = q(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    for p in q.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all()
    if case.example.ste:
        assert x.grad.abs().sum() > 0
    else:
        assert any(p.grad.abs().sum() > 0 for p in q.parameters())


@pytest.mark.parametrize("case", params(CASES))
def test_half_precision_is_the_float32_simulation_cast_back(case):
    # A bfloat16 tensor through a quantizer with float32 state (a model cast before conversion): output and
    # input gradient are the float32 simulation of the same values, cast back (grid arithmetic in float32).
    q, x = observed(case)
    ref = copy.deepcopy(q)
    xh = x.to(torch.bfloat16).requires_grad_()
    xr = xh.detach().float().requires_grad_()
    g = torch.linspace(-1, 1, x.numel()).view_as(x)
    torch.manual_seed(1)  # stochastic rounding draws the same numbers
    y = q(xh)
    y.backward(g.to(torch.bfloat16))
    torch.manual_seed(1)
    yr = ref(xr)
    yr.backward(g.to(torch.bfloat16).float())
    assert y.dtype == torch.bfloat16 and xh.grad.dtype == torch.bfloat16
    assert torch.equal(y, yr.to(torch.bfloat16)), int((y != yr.to(torch.bfloat16)).sum())
    assert torch.equal(xh.grad, xr.grad.to(torch.bfloat16)), int((xh.grad != xr.grad.to(torch.bfloat16)).sum())


@pytest.mark.parametrize("case", params(c for c in CASES if c.example.idempotent))
def test_idempotent(case):
    q, x = observed(case)
    with torch.no_grad():
        y = q(x)
        assert torch.equal(q(y), y)


GRID_CASES = [c for c in CASES if c.example.on_grid and observed(c)[0].grid() is not None]


def test_grid_cases_include_every_affine_family():
    names = {c.name for c in GRID_CASES if c.kind == "quantizer"}
    assert {"affine", "qfmt", "lsq", "pact", "dorefa_act"} <= names
    # every observer collected (entries registered later by other tests, e.g. doc pages, are not parametrized)
    assert {c.name for c in GRID_CASES if c.kind == "observer"} == {c.name for c in CASES if c.kind == "observer"}


@pytest.mark.parametrize("case", params(GRID_CASES))
def test_outputs_lie_on_the_grid(case):
    q, x = observed(case)
    with torch.no_grad():
        y = q(x)
    g = q.grid()
    codes = g.to_int(y)
    assert codes.min() >= g.qmin and codes.max() <= g.qmax
    steps = (g.from_int(codes) - y).abs() / g.scale
    assert steps.max() < 1e-3  # the same value up to float rounding of code * scale


@pytest.mark.parametrize("case", params(GRID_CASES))
def test_onnx_export_matches_in_steps(case):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    w = case.wrapper().eval()
    x = case.inputs()
    with torch.no_grad(), tq.qmodule_state(w, S.CALIBRATION):
        w(x)
    tq.set_qmodule_state(w, S.QUANT_EVAL)
    proto = tq.export.to_onnx(w, x[:1], opset=21)
    report = tq.export.check_parity(w, proto, x)
    assert report.passed(), str(report)


def _a8() -> tq.Quantizer:
    return tq.AffineQuantizer(8, tq.RunningMinMax())


# A layer between quantized activations is where onnxruntime's optimizer fuses kernels (QLinearConv, a float
# weight quantized again on its own int8 grid, MatMulNBits): there too, every example agrees with the
# simulation, as the layer's weight or output quantizer, or its export fails with an error naming it.
EXPORT_CASES = [c for c in CASES if c.example.on_grid]


@pytest.mark.parametrize("case", params(EXPORT_CASES))
def test_onnx_export_between_quantized_activations_agrees_in_the_optimized_run(case):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    w = case.wrapper()
    tail = tq.QWrapper(
        [nn.Conv2d(w.layer.out_channels, 4, 1)],
        weight_quantizer=tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True),
        acts_quantizer=_a8(),
    )
    net = nn.Sequential(tq.QOp(nn.Identity(), _a8()), w, tail).eval()
    x = case.inputs()
    x = torch.cat([x, -x, 2 * x])
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(x)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "exported as its float-valued simulation"
        proto = tq.export.to_onnx(net, x[:1], opset=21)
    report = tq.export.check_parity(net, proto, x)
    assert report.passed(), str(report)
    assert report.divergence is None, report.divergence


LEVEL_CASES = [
    c for c in CASES if c.example.on_grid and observed(c)[0].grid() is None and observed(c)[0].levels() is not None
]


def test_level_cases_include_every_non_uniform_family():
    assert {"nf4", "apot"} <= {c.name for c in LEVEL_CASES}
    assert not {c.id for c in LEVEL_CASES} & {c.id for c in GRID_CASES}  # one contract per quantizer


@pytest.mark.parametrize("case", params(LEVEL_CASES))
def test_outputs_lie_on_the_levels(case):
    q, x = observed(case)
    with torch.no_grad():
        y = q(x)
    lv = q.levels()
    codes = lv.codes(y)
    assert codes.dtype == torch.int64 and codes.min() >= 0 and codes.max() < lv.n_levels
    assert torch.equal(lv.dequantize(codes), y)  # bit-exact: the outputs are the levels themselves
    assert torch.equal(lv.quantize(x), y)  # and levels() says how the inputs were rounded
    lo, hi = (lv.dequantize(c) for c in lv.neighbours(x))
    assert ((y == lo) | (y == hi)).all()  # the nearest level is one of the two around the input


@pytest.mark.parametrize("case", params(LEVEL_CASES))
def test_onnx_export_of_levels_matches(case):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    w = case.wrapper().eval()
    x = case.inputs()
    with torch.no_grad(), tq.qmodule_state(w, S.CALIBRATION):
        w(x)
    tq.set_qmodule_state(w, S.QUANT_EVAL)
    proto = tq.export.to_onnx(w, x[:1], opset=21)
    report = tq.export.check_parity(w, proto, x)
    assert report.passed(), str(report)
    assert not report.raw_outputs["output0"].max_abs > 1e-5 * max(report.output_scale["output0"], 1.0)


FLOAT_CASES = [
    c for c in CASES if c.example.on_grid and observed(c)[0].grid() is None and observed(c)[0].float_grid() is not None
]


def test_float_cases_include_every_float_family():
    assert {"minifloat", "mx", "fp8_e4m3", "fp4_e2m1", "mxfp4", "mxint8"} <= {c.name for c in FLOAT_CASES}
    assert not {c.id for c in FLOAT_CASES} & {c.id for c in LEVEL_CASES}  # one contract per quantizer


@pytest.mark.parametrize("case", params(FLOAT_CASES))
def test_outputs_lie_on_the_float_grid(case):
    q, x = observed(case)
    with torch.no_grad():
        y = q(x)
    fg = q.float_grid()
    fg.check(x.shape)
    elements = fg.elements(x)
    assert torch.isin(elements, fg.fmt.values()).all()  # values of the format
    assert torch.equal(elements * fg.scale_for(x), y)  # bit-exact: those values times the scales
    assert torch.equal(fg.quantize(x), y)  # and float_grid() says how the inputs were rounded


# ------------------------------------------------------------------ observers on their own
# Every observer takes the granularity options (axis, group_size) and needs no other argument.

OBSERVER_NAMES = tq.list_observers()


@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_registered_contract_not_observed_raises(name):
    with pytest.raises(RuntimeError, match="calibrate first"):
        tq.make_observer(name).get_ranges()


@pytest.mark.parametrize("name", OBSERVER_NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_registered_contract_nonfinite_rejected_state_untouched(name, bad):
    o = tq.make_observer(name)
    o.observe_batch(torch.randn(50))
    before = {k: v.clone() for k, v in o.state_dict().items()}
    with pytest.raises(ValueError, match=type(o).__name__ + ".*NaN or Inf"):
        o.observe_batch(torch.tensor([0.0, bad]))
    for k, v in o.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_registered_contract_ranges_of_one_value(name):
    # a pruned channel, a dead ReLU channel, one element: the range is that value (histogram ones included)
    o = tq.make_observer(name, axis=0)
    x = torch.randn(4, 64)
    x[2] = 0.0
    x[3] = 1.5
    o.observe_batch(x)
    o.observe_batch(x)
    mn, mx = o.get_ranges()
    # (an EMA's bias correction divides by 1 - decay ** t: 1.5 up to float rounding)
    torch.testing.assert_close(mn.flatten()[2:], torch.tensor([0.0, 1.5]))
    torch.testing.assert_close(mx.flatten()[2:], torch.tensor([0.0, 1.5]))
    assert (mn.flatten()[:2] < 0).all() and (mx.flatten()[:2] > 0).all()
    one = tq.make_observer(name)
    one.observe_batch(torch.tensor([2.5]))
    assert one.get_ranges()[1].item() == pytest.approx(2.5, rel=1e-6)


N_BITS_CASES = [c for c in CASES if c.kind == "quantizer" and isinstance(getattr(c.build(), "n_bits", None), int)]


@pytest.mark.parametrize("case", params(N_BITS_CASES))
def test_setting_n_bits_is_honoured_and_described(case):
    """A mixed-precision search sets ``n_bits`` after construction: the grid and the description follow it."""
    from torchquant.spec import describe

    q, x = observed(case)
    before = q(x)
    q.n_bits = q.n_bits - 1 if q.n_bits > 2 else q.n_bits + 1
    assert not torch.equal(q(x), before)
    spec = describe(q)
    assert spec.args["n_bits"] == q.n_bits and spec.build().n_bits == q.n_bits


@pytest.mark.parametrize("name", OBSERVER_NAMES)
@pytest.mark.parametrize(
    ("kw", "shape", "range_shape"),
    [({}, (4, 6, 5), ()), ({"axis": 1}, (4, 6, 5), (1, 6, 1)), ({"axis": 1, "group_size": 3}, (2, 6, 2), (2, 6, 2))],
    ids=["per-tensor", "per-channel", "per-group"],
)
def test_registered_contract_granularity(name, kw, shape, range_shape):
    o = tq.make_observer(name, **kw)
    x = torch.randn(shape)
    o.observe_batch(x)
    mn, mx = o.get_ranges()
    assert mn.shape == range_shape and mx.shape == range_shape
    assert (mn <= mx).all()
    # inside the observed range of each slice
    g = tq.Granularity(**kw)
    lo, hi = (g.expand(r) for r in g.reduce(x))
    assert (mn >= lo - 1e-6).all() and (mx <= hi + 1e-6).all()


@pytest.mark.parametrize("name", OBSERVER_NAMES)
@pytest.mark.parametrize("axis", [None, 0], ids=["per-tensor", "per-channel"])
def test_registered_contract_state_dict_round_trip(name, axis):
    o = tq.make_observer(name, axis=axis)
    for s in (1.0, 2.0, 0.5):
        o.observe_batch(torch.randn(3, 300) * s)
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)  # saved before the (lazy) ranges were computed
    buf.seek(0)
    fresh = tq.make_observer(name, axis=axis)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    for a, b in zip(o.get_ranges(), fresh.get_ranges()):
        assert torch.equal(a, b)
    x = torch.randn(3, 300) * 3
    o.observe_batch(x)
    fresh.observe_batch(x)
    for a, b in zip(o.get_ranges(), fresh.get_ranges()):
        assert torch.equal(a, b)
    c = copy.deepcopy(o)
    assert torch.equal(c.get_ranges()[1], o.get_ranges()[1])


@pytest.mark.parametrize("name", OBSERVER_NAMES)
@pytest.mark.parametrize("axis", [None, 1], ids=["per-tensor", "per-channel"])
def test_registered_contract_empty_batch_observes_nothing(name, axis):
    o = tq.make_observer(name, axis=axis)
    o.observe_batch(torch.empty(0, 4))
    assert not o.initialized
    o.observe_batch(torch.randn(5, 4))
    ranges = o.get_ranges()  # first: a histogram observer computes its ranges when asked
    before = _state(o)
    o.observe_batch(torch.empty(0, 4))
    _assert_same_state(o, before, "observed")
    for a, b in zip(o.get_ranges(), ranges):
        assert torch.equal(a, b)
    if axis is not None:  # the shape is still checked against the granularity
        with pytest.raises(ValueError, match=type(o).__name__):
            o.observe_batch(torch.empty(0))


@pytest.mark.parametrize("name", OBSERVER_NAMES)
def test_registered_contract_integer_rejected(name):
    with pytest.raises(TypeError, match="dtype"):
        tq.make_observer(name).observe_batch(torch.arange(3))


@pytest.mark.parametrize("name", OBSERVER_NAMES)
@pytest.mark.parametrize("observed_first", [False, True], ids=["fresh", "observed"])
def test_registered_contract_force_ranges(name, observed_first):
    o = tq.make_observer(name)
    if observed_first:
        o.observe_batch(torch.randn(100))
    o.force_ranges(-1.0, 2.0)
    mn, mx = o.get_ranges()
    assert mn.item() == -1.0 and mx.item() == 2.0
    with pytest.raises(ValueError, match="exceeds"):
        o.force_ranges(3.0, 2.0)
    with pytest.raises(ValueError, match="finite"):
        o.force_ranges(float("nan"), 2.0)
    grouped = tq.make_observer(name, axis=1, group_size=4)
    with pytest.raises(ValueError, match="compact shape"):  # a number gives no groups (it failed at the forward)
        grouped.force_ranges(-1.0, 2.0)
    grouped.force_ranges(-torch.ones(3, 2), torch.ones(3, 2))  # a (3, 8) tensor in groups of 4
    buf = io.BytesIO()
    torch.save(o.state_dict(), buf)
    buf.seek(0)
    fresh = tq.make_observer(name)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert fresh.get_ranges()[1].item() == 2.0
