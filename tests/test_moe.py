"""QExperts: mixture-of-experts banks (transformers 5's layout) with quantized weights and inputs."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchquant as tq
from torchquant.moe import QExperts, expert_banks, expert_inputs

S = tq.QModuleState


class Experts(nn.Module):
    """An expert bank as transformers 5 stores one: ``(E, out, in)`` banks, or ``(E, in, out)`` transposed;
    each token goes to the experts in ``index`` ``(T, k)`` with the weights ``scores`` ``(T, k)``."""

    def __init__(
        self, n: int = 3, d: int = 8, h: int = 12, *, transposed: bool = False, gate: bool = True, flag: bool = True
    ) -> None:
        super().__init__()
        if flag:  # transformers' experts say is_transposed; Llama 4's store (E, in, out) without saying so
            self.is_transposed = transposed
        self.transposed = transposed
        first = "gate_up_proj" if gate else "up_proj"
        shape1, shape2 = (
            ((n, d, 2 * h if gate else h), (n, h, d)) if transposed else ((n, 2 * h if gate else h, d), (n, d, h))
        )
        setattr(self, first, nn.Parameter(torch.randn(shape1) / d**0.5))
        self.down_proj = nn.Parameter(torch.randn(shape2) / h**0.5)
        self.first = first

    def _w(self, name: str, e: int) -> torch.Tensor:
        w = getattr(self, name)[e]
        return w.T if self.transposed else w  # (out, in)

    def forward(self, x, index, scores):
        out = torch.zeros_like(x)
        for e in range(self.down_proj.shape[0]):
            rows, slot = torch.where(index == e)
            if rows.numel() == 0:
                continue
            hidden = F.linear(x[rows], self._w(self.first, e))
            if self.first == "gate_up_proj":
                gate, up = hidden.chunk(2, dim=-1)
                hidden = F.silu(gate) * up
            out.index_add_(0, rows, F.linear(hidden, self._w("down_proj", e)) * scores[rows, slot, None])
        return out


def _routing(t: int = 10, n: int = 3, k: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, 8, generator=g)
    index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(t)])
    return x, index, torch.rand(t, k, generator=g).softmax(-1)


def w4():
    return tq.AffineQuantizer(4, tq.BatchMinMax(axis=1, group_size=4), symmetric=True)


def w8_per_channel():
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)


def test_expert_banks_are_found_by_their_parameters():
    assert expert_banks(Experts()) == ["gate_up_proj", "down_proj"]
    assert expert_banks(Experts(gate=False)) == ["up_proj", "down_proj"]
    assert expert_banks(nn.Linear(4, 4)) == []
    m = Experts()
    m.down_proj = nn.Parameter(torch.randn(2, 8, 12))  # another number of experts
    assert expert_banks(m) == []
    m = nn.Module()
    m.gate_up_proj = nn.Parameter(torch.randn(3, 4, 4))  # no down_proj
    assert expert_banks(m) == []
    m = Experts(gate=False)
    m.gate_proj = nn.Parameter(torch.randn(3, 12, 8))  # a third bank: a layout QExperts does not know
    assert expert_banks(m) == []
    assert "gate_proj (3, 12, 8)" in tq.convert.unconverted_weights(nn.Sequential(m))["0"]
    m = Experts(transposed=True)
    m.gate_up_proj_bias = nn.Parameter(torch.zeros(3, 24))  # biases are fine (GPT-OSS)
    assert expert_banks(m) == ["gate_up_proj", "down_proj"]


@pytest.mark.parametrize(
    ("transposed", "flag"), [(False, True), (True, True), (True, False)], ids=["out-in", "in-out", "in-out-unflagged"]
)
@pytest.mark.parametrize("make", [w4, w8_per_channel], ids=["w4-per-group", "w8-per-channel"])
def test_each_expert_is_quantized_as_a_linear_weight(transposed, flag, make):
    torch.manual_seed(0)
    layer = Experts(transposed=transposed, flag=flag)
    q = QExperts(copy.deepcopy(layer), {"gate_up_proj": make(), "down_proj": make()})
    x, index, scores = _routing()
    assert torch.equal(q(x, index, scores), layer(x, index, scores))  # BYPASSED: the module itself
    q.observe_weight()
    q.qstate = S.QUANT_EVAL_WEIGHT_ONLY
    # the reference: every expert's (out, in) matrix through its own quantizer, as a Linear's weight would be
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            for e in range(3):
                w = ref._w(name, e)
                one = make()
                one.pre_observe(w)
                w.copy_(one(w))
    y = q(x, index, scores)
    assert torch.equal(y, ref(x, index, scores))
    assert not torch.equal(y, layer(x, index, scores))
    banks = q.quantized_banks()
    assert torch.equal(banks["down_proj"], ref.down_proj)
    assert q.gate_up_quantizer.range_observer.min_val.shape[0] == 3 * 24  # E * out rows, in both layouts


def test_modes_observe_and_train():
    torch.manual_seed(0)
    layer = Experts()
    q = QExperts(layer, {"gate_up_proj": w4(), "down_proj": w4()}, tq.AffineQuantizer(8, tq.RunningMinMax()))
    x, index, scores = _routing()
    q.qstate = S.CALIBRATION
    with torch.no_grad():
        assert torch.equal(q(x, index, scores), layer(x, index, scores))  # observes, computes in float
    assert q.input_quantizer.range_observer.initialized and q.down_quantizer.range_observer.initialized
    q.qstate = S.QUANT_AWARE_TRAIN
    xg = x.clone().requires_grad_()
    q(xg, index, scores).square().sum().backward()
    assert layer.gate_up_proj.grad is not None and layer.gate_up_proj.grad.abs().sum() > 0
    assert layer.down_proj.grad.abs().sum() > 0 and xg.grad.abs().sum() > 0
    q.qstate = S.QUANT_EVAL
    with torch.no_grad():
        y = q(x, index, scores)
        fresh = QExperts(
            Experts(), {"gate_up_proj": w4(), "down_proj": w4()}, tq.AffineQuantizer(8, tq.RunningMinMax())
        )
        fresh.load_state_dict(q.state_dict())
        assert fresh.qstate is S.QUANT_EVAL and torch.equal(fresh(x, index, scores), y)


def test_bad_arguments_name_the_module():
    with pytest.raises(TypeError, match="QExperts: Linear is not an expert bank"):
        QExperts(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"has no bank \['up_proj'\]"):
        QExperts(Experts(), {"up_proj": w4()})
    with pytest.raises(TypeError, match="Quantizer instances or None, got BatchMinMax"):
        QExperts(Experts(), {"down_proj": tq.BatchMinMax()})


class _Moe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.router = nn.Linear(8, 3, bias=False)
        self.experts = Experts()

    def forward(self, x):
        x = self.proj(x)
        scores, index = self.router(x).softmax(-1).topk(2, dim=-1)
        return self.experts(x, index, scores)


def test_quantize_model_swap_replaces_the_bank_and_a_state_dict_reloads():
    torch.manual_seed(0)
    net = _Moe()
    x = torch.randn(10, 8)
    ref = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.FloatLayersWarning)
        q = tq.quantize_model(copy.deepcopy(net), lambda m, n: w4(), None, method="swap")
    assert isinstance(q.experts, QExperts) and q.experts.gate_up_quantizer._tq_name == "QExperts.gate_up_quantizer"
    rows = {r["name"]: r for r in tq.summary_rows(q)}
    assert rows["experts"]["kind"] == "QExperts" and rows["experts"]["weight_bits"] == 4
    assert "gate_up: per-group(axis=1, size=4)" in rows["experts"]["weight_granularity"]
    assert torch.equal(q(x), ref)  # BYPASSED
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    y = q(x)
    err = (y - ref).pow(2).mean() / ref.pow(2).mean()
    assert 0 < err < 0.05
    fresh = tq.quantize_model(copy.deepcopy(net), lambda m, n: w4(), None, method="swap")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), y)


@pytest.mark.parametrize("transposed", [False, True], ids=["out-in", "in-out"])
def test_save_and_load_rebuild_the_bank_quantizers_and_pack_the_banks(tmp_path, transposed):
    """Frozen banks are stored as 4-bit codes (two per byte) under their quantizers' names and load back
    bit-exactly; a bank still being observed (QAT) keeps its float weights."""
    from safetensors import safe_open

    torch.manual_seed(0)
    net = _Moe()
    net.experts = Experts(transposed=transposed)
    x = torch.randn(10, 8)
    q = tq.quantize_model(copy.deepcopy(net), lambda m, n: w4(), None, method="swap")
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    y = q(x)
    tq.save(q, tmp_path / "moe.safetensors")
    with safe_open(tmp_path / "moe.safetensors", framework="pt") as f:
        keys = set(f.keys())
        codes = f.get_tensor("experts.gate_up_quantizer.__tq_codes")
    assert {"experts.gate_up_quantizer.__tq_codes", "experts.down_quantizer.__tq_codes"} <= keys
    assert not {"experts.layer.gate_up_proj", "experts.layer.down_proj"} & keys
    assert codes.dtype == torch.uint8 and codes.numel() == q.experts.layer.gate_up_proj.numel() // 2
    loaded = tq.load(copy.deepcopy(net), tmp_path / "moe.safetensors")
    assert isinstance(loaded.experts, QExperts) and loaded.experts.down_quantizer is not None
    assert torch.equal(loaded(x), y)
    tq.set_qmodule_state(q, S.QUANT_AWARE_TRAIN)
    tq.save(q, tmp_path / "qat.safetensors")
    with safe_open(tmp_path / "qat.safetensors", framework="pt") as f:
        assert "experts.layer.gate_up_proj" in set(f.keys())


def test_onnx_export_refuses_an_expert_bank_by_name():
    pytest.importorskip("onnx")
    q = tq.quantize_model(_Moe(), lambda m, n: w4(), None, method="swap")
    x = torch.randn(10, 8)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    with pytest.raises(ValueError, match="to_onnx: experts is a QExperts"):
        tq.export.to_onnx(q, (x,), "unused.onnx")


def test_adaround_says_it_leaves_the_banks_alone():
    torch.manual_seed(0)
    q = tq.quantize_model(_Moe(), lambda m, n: w4(), None, method="swap")
    x = torch.randn(10, 8)
    tq.calibrate(q, [x], progress=False)
    with pytest.warns(UserWarning, match=r"reconstruct: 1 mixture-of-experts bank\(s\) keep .*brecq and qdrop learn"):
        tq.ptq.adaround(q, [x], iters=1, progress=False)


def test_brecq_leaves_banks_without_a_grid_at_round_to_nearest_and_names_them():
    torch.manual_seed(0)
    net = nn.Sequential(_Moe())
    x = torch.randn(64, 8)

    def factory(m, n):
        return tq.MXQuantizer("fp4_e2m1") if "experts" in n else tq.AffineQuantizer(4, tq.RunningMinMax(axis=0))

    q = tq.quantize_model(net, factory, None, method="swap")
    tq.calibrate(q, [x], progress=False)
    before = q[0].experts.layer.gate_up_proj.detach().clone()
    with pytest.warns(UserWarning, match=r"2 expert bank\(s\) keep .*0\.experts\.gate_up_quantizer \(MXQuantizer\)"):
        tq.ptq.brecq(q, [x], blocks=["0"], iters=5, loss="mse", progress=False)
    assert torch.equal(q[0].experts.layer.gate_up_proj, before)


@pytest.mark.parametrize("transposed", [False, True], ids=["out-in", "in-out"])
def test_brecq_learns_the_rounding_of_the_banks_inside_their_block(transposed):
    """A block holding a QExperts is reconstructed with every bank's rounding learned (AdaRound's soft
    rounding on the rows its quantizer sees): the banks end on their grid, the block's error below RTN's."""
    torch.manual_seed(0)
    net = _Moe()
    net.experts = Experts(transposed=transposed)
    net = nn.Sequential(net)
    x = torch.randn(64, 8)
    q = tq.quantize_model(copy.deepcopy(net), lambda m, n: w4(), None, method="swap")
    tq.calibrate(q, [x], progress=False)
    rtn = copy.deepcopy(q)
    before = q[0].experts.layer.gate_up_proj.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no bank is left: no warning
        tq.ptq.brecq(q, [x], blocks=["0"], iters=2000, loss="mse", progress=False)
    experts = q[0].experts
    assert not torch.equal(experts.layer.gate_up_proj, before)
    with torch.no_grad():
        for bank, quantizer, rows in experts._weights():  # hard-rounded: on the grid, unchanged by quantizing
            assert torch.equal(quantizer(rows), rows), bank
    errors = []
    for m in (rtn, q):
        tq.set_qmodule_state(m, S.QUANT_EVAL_WEIGHT_ONLY)
        with torch.no_grad():
            errors.append(float((m(x) - net(x)).pow(2).mean()))
    assert errors[1] < 0.8 * errors[0], errors  # 0.0017 vs 0.0028 (out-in), 0.0007 vs 0.0014 (in-out)


class _Bmm(nn.Module):
    """Llama 4's layout: (E, in, out) banks, every expert applied to its own slice of (E * T, in) rows."""

    def __init__(self, n: int = 3, d: int = 8, h: int = 12) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(n, d, 2 * h) / d**0.5)
        self.down_proj = nn.Parameter(torch.randn(n, h, d) / h**0.5)

    def forward(self, x):
        x = x.view(self.gate_up_proj.shape[0], -1, x.shape[-1])
        gate, up = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.down_proj).view(-1, x.shape[-1])


def _first_inputs(layer: Experts, x, index, e: int) -> torch.Tensor:
    return x[torch.where(index == e)[0]]


def _reference(layer: Experts, x, index, scores, down_input=None) -> torch.Tensor:
    """``layer``'s forward with ``down_input`` applied to each expert's down_proj input."""
    out = torch.zeros_like(x)
    for e in range(layer.down_proj.shape[0]):
        rows, slot = torch.where(index == e)
        hidden = F.linear(x[rows], layer._w(layer.first, e))
        if layer.first == "gate_up_proj":
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        if down_input is not None:
            hidden = down_input(hidden)
        out.index_add_(0, rows, F.linear(hidden, layer._w("down_proj", e)) * scores[rows, slot, None])
    return out


def _intermediates(layer: Experts, x, index) -> torch.Tensor:
    seen = []
    _reference(layer, x, index, torch.ones(index.shape), lambda h: seen.append(h) or h)
    return torch.cat(seen)


@pytest.mark.parametrize("transposed", [False, True], ids=["out-in", "in-out"])
def test_down_input_quantizer_sees_every_experts_intermediate_at_once(transposed):
    torch.manual_seed(0)
    layer = Experts(transposed=transposed)
    a8 = lambda: tq.AffineQuantizer(4, tq.RunningMinMax())  # noqa: E731
    q = QExperts(copy.deepcopy(layer), {"gate_up_proj": w4(), "down_proj": w4()}, down_input_quantizer=a8())
    x, index, scores = _routing()
    q.observe_weight()
    q.qstate = S.CALIBRATION
    with torch.no_grad():
        assert torch.equal(q(x, index, scores), layer(x, index, scores))  # observes; computes in float
    mids = _intermediates(layer, x, index)
    obs = q.down_input_quantizer.range_observer
    assert torch.equal(obs.min_val, mids.min()) and torch.equal(obs.max_val, mids.max())
    q.qstate = S.QUANT_EVAL
    quantized = copy.deepcopy(layer)
    with torch.no_grad():
        for bank, w in q.quantized_banks().items():
            getattr(quantized, bank).copy_(w)
        y = q(x, index, scores)
    assert torch.equal(y, _reference(quantized, x, index, scores, q.down_input_quantizer))
    assert not torch.equal(y, _reference(quantized, x, index, scores))
    reported = []  # what GPTQ collects its down_proj Hessians from: the inputs as the products read them
    with torch.no_grad(), expert_inputs(q, lambda bank, e, rows: reported.append(rows), ["down_proj"]):
        q(x, index, scores)
    mids = _intermediates(quantized, x, index)
    assert torch.equal(torch.cat(reported), q.down_input_quantizer(mids))

    # QAT: one observation of all the experts' intermediates per call, then gradients through the STE
    qat = QExperts(
        copy.deepcopy(layer), {"down_proj": w4()}, down_input_quantizer=tq.AffineQuantizer(4, tq.ExpAvgMinMax())
    )
    qat.qstate = S.QUANT_AWARE_TRAIN
    xg = x.clone().requires_grad_()
    out = qat(xg, index, scores)
    mids = _intermediates(qat.layer, x, index)
    ema = qat.down_input_quantizer.range_observer
    assert torch.allclose(ema.get_ranges()[0], mids.min()) and torch.allclose(ema.get_ranges()[1], mids.max())
    out.square().sum().backward()
    assert qat.layer.gate_up_proj.grad.abs().sum() > 0 and xg.grad.abs().sum() > 0


def test_down_input_quantizer_of_a_batched_product_and_one_it_cannot_follow():
    torch.manual_seed(0)
    q = QExperts(_Bmm(), down_input_quantizer=tq.AffineQuantizer(3, tq.RunningMinMax()))
    x = torch.randn(3 * 5, 8)
    q.qstate = S.CALIBRATION
    q(x)
    q.qstate = S.QUANT_EVAL
    ref = q.layer(x)
    assert not torch.equal(q(x), ref)

    class Einsum(Experts):
        def forward(self, x, index, scores):
            g, u = torch.einsum("td,eod->teo", x, self.gate_up_proj).chunk(2, dim=-1)
            return torch.einsum("teh,edh->td", F.silu(g) * u, self.down_proj)

    q = QExperts(Einsum(), down_input_quantizer=tq.AffineQuantizer(8, tq.RunningMinMax()))
    q.qstate = S.CALIBRATION
    with pytest.raises(RuntimeError, match=r"QExperts\[Einsum\]: down_input_quantizer is set, but"):
        q(*_routing())


@pytest.mark.parametrize(("transposed", "gate"), [(False, True), (True, True), (False, False)])
def test_expert_inputs_are_the_rows_each_expert_reads(transposed, gate):
    torch.manual_seed(0)
    layer = Experts(transposed=transposed, gate=gate)
    q = QExperts(layer, {layer.first: w4(), "down_proj": w4()})
    x, index, scores = _routing()
    seen: dict = {}
    with expert_inputs(q, lambda bank, e, rows: seen.setdefault((bank, e), rows.clone())):
        q(x, index, scores)
    assert sorted(seen) == sorted((b, e) for b in (layer.first, "down_proj") for e in range(3))
    for e in range(3):
        first = _first_inputs(layer, x, index, e)
        assert torch.equal(seen[(layer.first, e)], first)
        hidden = F.linear(first, layer._w(layer.first, e))
        if gate:
            g, u = hidden.chunk(2, dim=-1)
            hidden = F.silu(g) * u
        assert torch.equal(seen[("down_proj", e)], hidden)
    seen.clear()
    with expert_inputs(q, lambda bank, e, rows: seen.setdefault((bank, e), rows), banks=["down_proj"]):
        q(x, index, scores)
    assert {b for b, _ in seen} == {"down_proj"}
    q(x, index, scores)  # the listener is gone: nothing more is reported
    assert len(seen) == 3
    with (
        pytest.raises(ValueError, match=r"expert_inputs: Experts has no bank \['w1'\]"),
        expert_inputs(q, print, ["w1"]),
    ):
        pass


def test_expert_inputs_runs_transformers_experts_in_their_eager_loop_meanwhile():
    """transformers picks the experts' implementation from config._experts_implementation (grouped_mm by default),
    whose grouped products hide the per-expert inputs: while reporting, the forward runs the eager loop."""
    from types import SimpleNamespace

    class Recording(Experts):
        def forward(self, x, index, scores):
            self.used.append(self.config._experts_implementation_internal)
            if self.used[-1] != "eager":
                raise KeyError("grouped_mm")  # stands for an implementation whose products cannot be followed
            return super().forward(x, index, scores)

    layer = Recording()
    layer.used = []
    layer.config = SimpleNamespace(_experts_implementation_internal="grouped_mm")
    q = QExperts(layer, {"gate_up_proj": w4(), "down_proj": w4()})
    q.observe_weight()
    x, index, scores = _routing()
    seen = []
    for state in (S.BYPASSED, S.QUANT_EVAL):
        q.qstate = state
        with expert_inputs(q, lambda *a: seen.append(a[:2])):
            q(x, index, scores)
    assert layer.used == ["eager", "eager"] and len(seen) == 12
    assert layer.config._experts_implementation_internal == "grouped_mm"
    with pytest.raises(KeyError):  # outside expert_inputs: the model's own implementation
        q(x, index, scores)


def test_expert_inputs_of_a_batched_product_over_the_whole_bank():
    torch.manual_seed(0)
    q = QExperts(_Bmm())
    x = torch.randn(3 * 5, 8)
    seen = {}
    with expert_inputs(q, lambda bank, e, rows: seen.setdefault((bank, e), rows.clone())):
        q(x)
    for e in range(3):
        assert torch.equal(seen[("gate_up_proj", e)], x.view(3, 5, 8)[e])
    assert seen[("down_proj", 0)].shape == (5, 12)


class _Routed(nn.Module):
    """Experts on a fixed routing: the Hessians of a GPTQ run can be computed by hand."""

    def __init__(self, layer: nn.Module, index, scores) -> None:
        super().__init__()
        self.experts = layer
        self.index, self.scores = index, scores

    def forward(self, x):
        return self.experts(x, self.index, self.scores)


def _gptq_reference(layer: Experts, x, index, quantizers: dict, e: int):
    """GPTQ of expert ``e`` done by hand: its routed rows, its rows of each bank's grid, the first bank before down."""
    from torchquant.ptq.gptq import gptq_quantize_weight

    rows = _first_inputs(layer, x, index, e)
    out = []
    for name in (layer.first, "down_proj"):
        w = layer._w(name, e)
        n_out = w.shape[0]
        grid = quantizers[name].grid()
        full = torch.Size((3 * n_out, w.shape[1]))
        scale = grid.scale.expand(full)[e * n_out : (e + 1) * n_out]
        zero = grid.zero_point.expand(full)[e * n_out : (e + 1) * n_out]
        sub = tq.quantizers.AffineGrid(scale, zero, grid.qmin, grid.qmax, grid.granularity)
        hessian = 2.0 * rows.t() @ rows / rows.shape[0]
        q, _ = gptq_quantize_weight(w, hessian, sub)
        out.append(q)
        if name == layer.first:
            g, u = F.linear(rows, q).chunk(2, dim=-1)
            rows = F.silu(g) * u
    return out


@pytest.mark.parametrize("transposed", [False, True], ids=["out-in", "in-out"])
def test_gptq_quantizes_each_expert_on_the_tokens_routed_to_it(transposed):
    torch.manual_seed(0)
    x, index, scores = _routing(t=40)
    x = x @ torch.randn(8, 8) * torch.logspace(0, -1, 8)  # correlated channels of unequal size, as in a network
    layer = Experts(transposed=transposed)
    net = tq.quantize_model(_Routed(copy.deepcopy(layer), index, scores), lambda m, n: w4(), None, method="swap")
    qe = net.experts
    assert isinstance(qe, QExperts)
    tq.calibrate(net, [x], progress=False)
    quantizers = {b: qe.bank_quantizer(b) for b in qe.banks}
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with torch.no_grad():
        rtn = net(x)
    result = tq.ptq.gptq(net, [x], progress=False)
    assert sorted(result.losses) == sorted(f"experts.{b}[{e}]" for b in qe.banks for e in range(3))
    assert result.skipped == {}
    for e in range(3):
        first, down = _gptq_reference(layer, x, index, quantizers, e)
        assert torch.equal(qe.layer._w("gate_up_proj", e), first)  # bit-exact: the same Hessian and grid rows
        assert torch.equal(qe.layer._w("down_proj", e), down)
    with torch.no_grad():
        ref, y = layer(x, index, scores), net(x)
    assert (y - ref).square().mean() < 0.5 * (rtn - ref).square().mean()  # calibration tokens: 0.30x, 0.34x


def test_gptq_leaves_an_expert_no_token_reached_to_round_to_nearest():
    torch.manual_seed(0)
    x, index, scores = _routing(t=20)
    index = index.clamp(max=1)  # experts 0 and 1 only
    layer = Experts()
    net = tq.quantize_model(_Routed(copy.deepcopy(layer), index, scores), lambda m, n: w4(), None, method="swap")
    tq.calibrate(net, [x], progress=False)
    with pytest.warns(UserWarning, match=r"gptq: 2 expert matrices received no calibration token .*experts\.gate_up"):
        result = tq.ptq.gptq(net, [x], progress=False)
    assert set(result.skipped) == {"experts.gate_up_proj[2]", "experts.down_proj[2]"}
    assert "no calibration token" in result.skipped["experts.down_proj[2]"]
    assert torch.equal(net.experts.layer.gate_up_proj[2], layer.gate_up_proj[2])  # float, rounded by its quantizer
    assert not torch.equal(net.experts.layer.gate_up_proj[1], layer.gate_up_proj[1])


def test_gptq_on_experts_with_layers_around_them_and_without_true_sequential():
    torch.manual_seed(0)
    net = tq.quantize_model(_Moe(), lambda m, n: w4(), None, method="swap")
    data = [torch.randn(16, 8) for _ in range(2)]
    tq.calibrate(net, data, progress=False)
    for sequential in (True, False):
        q = copy.deepcopy(net)
        result = tq.ptq.gptq(q, data, progress=False, true_sequential=sequential)
        assert {"proj", "router", "experts.gate_up_proj[0]", "experts.down_proj[2]"} <= set(result.losses)


def test_gptq_names_experts_whose_forward_it_cannot_follow():
    class Einsum(Experts):
        def forward(self, x, index, scores):  # every token through every expert, by einsum over the banks
            g, u = torch.einsum("td,eod->teo", x, self.gate_up_proj).chunk(2, dim=-1)
            return torch.einsum("teh,edh->td", F.silu(g) * u, self.down_proj)

    x, index, scores = _routing()
    net = tq.quantize_model(_Routed(Einsum(), index, scores), lambda m, n: w4(), None, method="swap")
    tq.calibrate(net, [x], progress=False)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(RuntimeError, match=r"could not see which inputs the experts' banks \['experts.gate_up_proj'\]"):
        tq.ptq.gptq(net, [x], progress=False)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # left as it was


def test_sqnr_report_lists_the_banks_as_weights():
    torch.manual_seed(0)
    q = tq.quantize_model(_Moe(), lambda m, n: w4(), None, method="swap")
    x = torch.randn(10, 8)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    kinds = {r["point"]: r["kind"] for r in tq.debug.sqnr_report(q, x).rows}
    assert kinds["experts.gate_up_quantizer"] == kinds["experts.down_quantizer"] == "weight"


def test_plot_ranges_shows_the_banks(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    q = tq.quantize_model(_Moe(), lambda m, n: w4(), None, method="swap")
    tq.calibrate(q, [torch.randn(10, 8)], progress=False)
    names = tq.debug.plot_ranges(q, tmp_path / "ranges.png")
    assert {"experts.gate_up_quantizer", "experts.down_quantizer"} <= set(names)


class _MmDown(Experts):
    """The first product by F.linear with gate_up_proj[e], the second by torch.mm (expert_inputs does not follow it)."""

    def forward(self, x, index, scores):
        out = torch.zeros_like(x)
        for e in range(self.down_proj.shape[0]):
            rows, slot = torch.where(index == e)
            gate, up = F.linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
            out.index_add_(0, rows, torch.mm(F.silu(gate) * up, self.down_proj[e].t()) * scores[rows, slot, None])
        return out


def test_a_down_proj_product_that_cannot_be_followed_is_an_error_not_a_float_path():
    x, index, scores = _routing()
    q = QExperts(_MmDown(), down_input_quantizer=tq.AffineQuantizer(8, tq.RunningMinMax()))
    for state in (S.CALIBRATION, S.QUANT_EVAL, S.QUANT_AWARE_TRAIN):
        q.qstate = state
        with pytest.raises(RuntimeError, match=r"QExperts\[_MmDown\]: down_input_quantizer is set, but"):
            q(x, index, scores)
    net = tq.quantize_model(_Routed(_MmDown(), index, scores), lambda m, n: w4(), None, method="swap")
    tq.calibrate(net, [x], progress=False)
    with pytest.raises(RuntimeError, match=r"experts' banks \['experts.down_proj'\] receive"):
        tq.ptq.gptq(net, [x], progress=False, true_sequential=False)


def test_gptq_collects_only_the_banks_it_quantizes(monkeypatch):
    import sys

    gptq_module = sys.modules["torchquant.ptq.gptq"]  # the package's gptq is the function
    x, index, scores = _routing(t=20)
    requested = []

    def spy(qe, report, banks=None):
        requested.append(list(banks))
        return expert_inputs(qe, report, banks)

    monkeypatch.setattr(gptq_module, "expert_inputs", spy)
    net = tq.quantize_model(_Routed(Experts(), index, scores), lambda m, n: w4(), None, method="swap")
    net.experts.gate_up_quantizer = None
    tq.calibrate(net, [x], progress=False)
    for sequential in (True, False):
        result = tq.ptq.gptq(copy.deepcopy(net), [x], progress=False, true_sequential=sequential)
        assert sorted(result.losses) == [f"experts.down_proj[{e}]" for e in range(3)]
    assert requested == [["down_proj"], ["down_proj"]]  # one collection each way, no gate_up_proj Hessians


def test_copies_made_inside_expert_inputs_do_not_report():
    import pickle

    q = QExperts(Experts(), {"down_proj": w4()})
    q.observe_weight()
    seen = []
    with expert_inputs(q, lambda *a: seen.append(a[0])):
        copied, pickled = copy.deepcopy(q), pickle.loads(pickle.dumps(q))
    x, index, scores = _routing()
    with expert_inputs(q, lambda *a: None):
        copied(x, index, scores)
        pickled(x, index, scores)
    assert seen == [] and copied._listener is None and pickled._listener is None


class _PlusOne(Experts):
    """GPT-OSS' gating: ``(up + 1) * act(gate)``, which no scale of the up rows passes through one for one."""

    def forward(self, x, index, scores):
        out = torch.zeros_like(x)
        for e in range(self.down_proj.shape[0]):
            rows, slot = torch.where(index == e)
            gate, up = F.linear(x[rows], self._w("gate_up_proj", e)).chunk(2, dim=-1)
            out.index_add_(
                0, rows, F.linear((up + 1) * F.silu(gate), self._w("down_proj", e)) * scores[rows, slot, None]
            )
        return out


@pytest.mark.parametrize("transposed", [False, True], ids=["out-in", "in-out"])
def test_awq_scales_each_experts_down_input_into_its_up_rows(transposed):
    torch.manual_seed(0)
    x, index, scores = _routing(t=40)
    x = x @ torch.randn(8, 8) * torch.logspace(0, -1, 8)
    layer = Experts(transposed=transposed)
    net = tq.quantize_model(_Routed(copy.deepcopy(layer), index, scores), lambda m, n: w4(), None, method="swap")
    rtn = copy.deepcopy(net)
    net.experts.observe_weight()  # ranges seen before AWQ: recomputed from the rescaled banks
    result = tq.ptq.awq(net, [x], progress=False, clip=False)
    fresh = w4()
    fresh.pre_observe(torch.cat([net.experts.matrix("down_proj", e) for e in range(3)]).detach())
    assert torch.equal(net.experts.down_quantizer.range_observer.max_val, fresh.range_observer.max_val)
    assert sorted(result.exponents) == [f"experts.down_proj[{e}]" for e in range(3)]
    assert result.skipped == {
        "experts.gate_up_proj": "its input is not a normalisation's output (no module takes its inverse scale)"
    }
    assert not torch.equal(net.experts.layer.down_proj, layer.down_proj)
    tq.set_qmodule_state(net, S.BYPASSED)
    with torch.no_grad():
        ref = layer(x, index, scores)
        assert torch.allclose(net(x), ref, rtol=0, atol=1e-5)  # the scales are folded: the float experts unchanged
    full = copy.deepcopy(rtn)
    clipped = tq.ptq.awq(full, [x], progress=False)
    assert set(clipped.clip_ratios) == {f"experts.{b}[{e}]" for b in ("gate_up_proj", "down_proj") for e in range(3)}
    errors = []
    for q in (rtn, net, full):
        tq.calibrate(q, [x], progress=False)
        tq.set_qmodule_state(q, S.QUANT_EVAL)
        with torch.no_grad():
            errors.append(float((q(x) - ref).square().mean()))
    # on the calibration tokens: scaling 0.0282 vs RTN 0.0292 (out-in), 0.0114 vs 0.0175 (in-out); the clipping
    # search, which treats each range cell on its own, does not help on these 8-wide toy experts
    assert errors[1] < errors[0] and math.isfinite(errors[2])


def test_awq_leaves_a_gating_it_cannot_scale_through_unscaled():
    torch.manual_seed(0)
    x, index, scores = _routing(t=20)
    net = tq.quantize_model(_Routed(_PlusOne(), index, scores), lambda m, n: w4(), None, method="swap")
    before = net.experts.layer.down_proj.detach().clone()
    result = tq.ptq.awq(net, [x], progress=False, clip=False)
    assert set(result.skipped) == {f"experts.down_proj[{e}]" for e in range(3)} | {"experts.gate_up_proj"}
    assert "no gate_up_proj rows scale down_proj's input" in result.skipped["experts.down_proj[0]"]
    assert torch.equal(net.experts.layer.down_proj, before)


class _ClampedUp(Experts):
    """DeepSeek-V4's gating, ``act(gate.clamp(max=L)) * up.clamp(-L, L)``: no scale passes the clamp one for one."""

    def forward(self, x, index, scores):
        out = torch.zeros_like(x)
        for e in range(self.down_proj.shape[0]):
            rows, slot = torch.where(index == e)
            gate, up = F.linear(x[rows], self._w("gate_up_proj", e)).chunk(2, dim=-1)
            hidden = F.silu(gate.clamp(max=10.0)) * up.clamp(-10.0, 10.0)
            out.index_add_(0, rows, F.linear(hidden, self._w("down_proj", e)) * scores[rows, slot, None])
        return out


def test_awq_refuses_a_clamped_up_and_finds_the_rows_in_bfloat16():
    torch.manual_seed(0)
    x, index, scores = _routing(t=20)
    net = tq.quantize_model(_Routed(_ClampedUp(), index, scores), lambda m, n: w4(), None, method="swap")
    result = tq.ptq.awq(net, [x], progress=False, clip=False)  # |up| stays far below 10 on these tokens
    assert set(result.skipped) == {f"experts.down_proj[{e}]" for e in range(3)} | {"experts.gate_up_proj"}
    assert not result.exponents
    half = tq.quantize_model(
        _Routed(Experts().to(torch.bfloat16), index, scores.bfloat16()), lambda m, n: w4(), None, method="swap"
    )
    result = tq.ptq.awq(half, [x.bfloat16()], progress=False, clip=False)
    assert sorted(result.exponents) == [f"experts.down_proj[{e}]" for e in range(3)]


def test_awq_says_which_experts_it_could_not_reach():
    x, index, scores = _routing(t=20)
    net = tq.quantize_model(_Routed(Experts(), index.clamp(max=1), scores), lambda m, n: w4(), None, method="swap")
    with pytest.warns(UserWarning, match=r"awq: 2 expert matrices received no calibration token"):
        result = tq.ptq.awq(net, [x], progress=False)
    assert result.skipped["experts.gate_up_proj[2]"] == "no calibration token was routed to this expert"

    class Einsum(Experts):
        def forward(self, x, index, scores):
            g, u = torch.einsum("td,eod->teo", x, self.gate_up_proj).chunk(2, dim=-1)
            return torch.einsum("teh,edh->td", F.silu(g) * u, self.down_proj)

    net = tq.quantize_model(_Routed(Einsum(), index, scores), lambda m, n: w4(), None, method="swap")
    with pytest.warns(UserWarning, match=r"awq: 6 expert matrices could not be followed"):
        result = tq.ptq.awq(net, [x], progress=False)
    assert len(result.skipped) == 7 and not result.clip_ratios  # 6 matrices, and the first input


@pytest.mark.parametrize("transposed", [False, True], ids=["out-in", "in-out"])
def test_smoothquant_smooths_each_experts_down_input_into_its_up_rows(transposed):
    torch.manual_seed(0)
    x, index, scores = _routing(t=40)
    layer = Experts(transposed=transposed)
    a8 = lambda: tq.AffineQuantizer(8, tq.RunningMinMax())  # noqa: E731
    net = tq.quantize_model(_Routed(copy.deepcopy(layer), index, scores), lambda m, n: w4(), None, method="swap")
    net.experts.down_input_quantizer = a8()
    result = tq.ptq.smoothquant(net, [x], progress=False)
    assert result.folded == {f"experts.down_proj[{e}]": f"experts.gate_up_proj[{e}]" for e in range(3)}
    assert all(v > 0 for v in result.max_scale.values())
    tq.set_qmodule_state(net, S.BYPASSED)
    with torch.no_grad():
        assert torch.allclose(net(x), layer(x, index, scores), rtol=0, atol=1e-5)  # folded: the float model unchanged
    norms = tq.quantize_model(_Routed(copy.deepcopy(layer), index, scores), lambda m, n: w4(), None, method="swap")
    result = tq.ptq.smoothquant(norms, [x], progress=False, targets="norms")
    assert not result.folded and "targets='norms'" in result.skipped["experts.down_proj"]
    plus = tq.quantize_model(_Routed(_PlusOne(), index, scores), lambda m, n: w4(), None, method="swap")
    assert "no gate_up_proj rows" in tq.ptq.smoothquant(plus, [x], progress=False).skipped["experts.down_proj"]
