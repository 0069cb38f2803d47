"""The research quantizers: hand-computed forwards and the papers' gradients.

The checks every registered quantizer shares (QWrapper, QOp, fx, compile, state_dict...) are in
``test_registry_contract.py``."""

import math

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant import (
    AffineQuantizer,
    BatchMinMax,
    BinaryQuantizer,
    DoReFaActQuantizer,
    DoReFaWeightQuantizer,
    LSQPlusQuantizer,
    LSQQuantizer,
    MinifloatQuantizer,
    MXQuantizer,
    PACTQuantizer,
    QModuleState,
    QWrapper,
    TernaryQuantizer,
    XNORWeightQuantizer,
    set_qmodule_state,
)

# ----------------------------------------------------------------------------- LSQ / LSQ+


def test_lsq_init_per_tensor_and_per_channel():
    x = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    q = LSQQuantizer(4)
    q.pre_observe(x)
    assert q.step.item() == pytest.approx(2 * 1.25 / math.sqrt(7))
    qc = LSQQuantizer(3, signed=False, axis=0)
    qc.pre_observe(x)
    assert torch.allclose(qc.step.detach(), torch.tensor([[2 * 2.0], [2 * 0.5]]) / math.sqrt(7))
    q.pre_observe(x * 100)  # later observations do not re-initialise
    assert q.step.item() == pytest.approx(2 * 1.25 / math.sqrt(7))


def test_lsq_forward_by_hand_signed_and_unsigned():
    q = LSQQuantizer(2)  # levels -2..1
    q.step.data = torch.tensor(0.5)
    assert q(torch.tensor([0.3, -1.2, 0.9, 0.1])).tolist() == [0.5, -1.0, 0.5, 0.0]
    u = LSQQuantizer(2, signed=False)  # levels 0..3
    u.step.data = torch.tensor(0.5)
    assert u(torch.tensor([-0.3, 0.6, 1.2, 9.0])).tolist() == [0.0, 0.5, 1.0, 1.5]


def test_lsq_step_gradient_with_grad_scale_per_channel():
    w = torch.randn(3, 2, 2, 2, requires_grad=True)
    q = LSQQuantizer(4, axis=0)
    q.pre_observe(w)
    g = torch.randn(3, 2, 2, 2)
    q(w).backward(g)
    s = q.step.detach()
    v = w.detach() / s
    inside = (v >= -8) & (v <= 7)
    d = torch.where(inside, torch.round(v) - v, torch.clamp(torch.round(v), -8, 7))
    gscale = 1 / math.sqrt(8 * 7)  # N = 8 weights per channel, Q_P = 7
    expected = (g * d).sum(dim=(1, 2, 3), keepdim=True) * gscale
    assert torch.allclose(q.step.grad, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(w.grad, g * inside)


def test_lsq_per_group():
    w = torch.randn(2, 8)
    q = LSQQuantizer(4, axis=1, group_size=4)
    q.pre_observe(w)
    assert q.step.shape == (2, 2)
    y = q(w)
    for r in range(2):
        for k in range(2):
            blk = w[r, 4 * k : 4 * k + 4]
            s = 2 * blk.abs().mean() / math.sqrt(7)
            assert torch.allclose(y[r, 4 * k : 4 * k + 4], torch.clamp(torch.round(blk / s), -8, 7) * s)


@pytest.mark.parametrize("cls", [LSQQuantizer, LSQPlusQuantizer], ids=["lsq", "lsq+"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_lsq_per_group_matches_the_repeated_parameters_and_keeps_them_compact(cls, axis, monkeypatch):
    from torchquant.quantizers import learned
    from torchquant.quantizers_functional import lsq_quantize

    torch.manual_seed(0)
    w = (torch.randn(8, 12) * 2).requires_grad_()
    q = cls(4, axis=axis, group_size=4)
    q.pre_observe(w.detach())
    g = torch.randn(8, 12)
    seen = []
    monkeypatch.setattr(
        learned, "lsq_quantize", lambda x, step, *a, **kw: seen.append(step.numel()) or lsq_quantize(x, step, *a, **kw)
    )
    y = q(w)
    y.backward(g)
    # reference: the parameters repeated to w's size, the paper's per-element formula
    params = {n: p.detach().clone().requires_grad_() for n, p in q.named_parameters()}
    gr = q.granularity
    n_per_step = w.numel() // q.step.numel()
    wr = w.detach().clone().requires_grad_()
    off = gr.expand(params["offset"]) if "offset" in params else None
    ref = lsq_quantize(wr, gr.expand(params["step"]), off, q.qn, q.qp, 1 / math.sqrt(n_per_step * q.qp))
    ref.backward(g)
    assert torch.equal(y, ref)
    assert torch.equal(w.grad, wr.grad)
    for n, p in q.named_parameters():
        torch.testing.assert_close(p.grad, params[n].grad, rtol=1e-5, atol=1e-7)
    # along the last axis the parameters reach the primitive one per group, not repeated to w's size
    assert seen == [q.step.numel() if axis == -1 else w.numel()]


def test_lsq_before_initialisation_raises_naming_the_module():
    w = QWrapper(nn.Linear(4, 4), weight_quantizer=LSQQuantizer(4))
    set_qmodule_state(w, QModuleState.QUANT_EVAL)
    with pytest.raises(RuntimeError, match=r"QWrapper\[Linear\]\.weight_quantizer.*calibrate first"):
        w(torch.randn(2, 4))


def test_optimizer_built_before_first_forward_trains_lazy_parameters():
    model = QWrapper(
        [nn.Conv2d(3, 4, 3), nn.ReLU()],
        weight_quantizer=LSQQuantizer(4, axis=0),
        acts_quantizer=LSQPlusQuantizer(4),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step_param = model.weight_quantizer.step
    set_qmodule_state(model, QModuleState.QUANT_AWARE_TRAIN)
    model(torch.randn(2, 3, 6, 6)).square().mean().backward()
    assert model.weight_quantizer.step is step_param and step_param.shape == (4, 1, 1, 1)
    assert model.acts_quantizer.offset.grad is not None  # zero here: nothing below the ReLU's min is clipped
    before = [p.detach().clone() for p in (step_param, model.acts_quantizer.step)]
    opt.step()
    assert all(not torch.equal(b, a) for b, a in zip(before, (step_param, model.acts_quantizer.step)))


def test_lsq_grid():
    q = LSQQuantizer(4, axis=0)
    w = torch.randn(3, 5)
    q.pre_observe(w)
    grid = q.grid()
    assert (grid.qmin, grid.qmax) == (-8, 7)
    assert torch.equal(grid.from_int(grid.to_int(w)), q(w).detach())


def test_lsq_plus_init_minmax_and_std():
    x = torch.tensor([-0.5, 0.0, 2.5])
    q = LSQPlusQuantizer(2)
    q.pre_observe(x)
    assert q.step.item() == pytest.approx(1.0) and q.offset.item() == pytest.approx(-0.5)
    qs = LSQPlusQuantizer(4, signed=True, init="std")
    w = torch.randn(1000)
    qs.pre_observe(w)
    mu, sigma = w.mean(), w.std(unbiased=False)
    expected = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / 8
    assert qs.step.item() == pytest.approx(expected.item(), rel=1e-5) and qs.offset.item() == 0.0


def test_lsq_plus_gradients_with_grad_scale():
    q = LSQPlusQuantizer(2)  # levels 0..3
    q.pre_observe(torch.tensor([-0.25, 1.25]))  # s = 0.5, beta = -0.25
    x = torch.tensor([-1.0, 0.2, 0.7, 5.0], requires_grad=True)
    y = q(x)
    assert y.tolist() == [-0.25, 0.25, 0.75, 1.25]
    y.backward(torch.tensor([1.0, 2.0, 4.0, 8.0]))
    g = 1 / math.sqrt(4 * 3)
    assert q.offset.grad.item() == pytest.approx(g * (1 + 8))
    assert q.step.grad.item() == pytest.approx(g * (2 * 0.1 + 4 * 0.1 + 8 * 3), rel=1e-5)


def test_lsq_plus_bad_init_raises():
    with pytest.raises(ValueError, match="LSQPlusQuantizer: init"):
        LSQPlusQuantizer(4, init="mse")


# ----------------------------------------------------------------------------- PACT


def test_pact_forward_gradient_and_regularisation():
    q = PACTQuantizer(2, alpha_init=3.0, reg_lambda=0.01)
    x = torch.tensor([-1.0, 0.4, 1.6, 3.0, 5.0], requires_grad=True)
    y = q(x)
    assert y.tolist() == [0.0, 0.0, 2.0, 3.0, 3.0]
    y.backward(torch.tensor([1.0, 1.0, 1.0, 2.0, 4.0]))
    assert q.alpha.grad.item() == 6.0  # x >= alpha: 3.0 and 5.0
    assert x.grad.tolist() == [0, 1, 1, 0, 0]
    assert q.regularization().item() == pytest.approx(0.01 * 9)


def test_pact_grid_matches_forward():
    q = PACTQuantizer(3, alpha_init=2.5)
    x = torch.linspace(-1, 4, 101)
    grid = q.grid()
    assert (grid.qmin, grid.qmax) == (0, 7)
    assert torch.allclose(grid.from_int(grid.to_int(x)), q(x).detach(), rtol=0, atol=1e-6)


def test_lazy_parameters_follow_the_module_dtype():
    q = LSQQuantizer(4).double()
    q.pre_observe(torch.randn(10))
    assert q.step.dtype == torch.float64


def test_pact_regularization_over_a_model():
    model = nn.Sequential(
        QWrapper([nn.Linear(2, 2), nn.ReLU()], acts_quantizer=PACTQuantizer(4, alpha_init=2.0, reg_lambda=0.5)),
        QWrapper([nn.Linear(2, 2), nn.ReLU()], acts_quantizer=PACTQuantizer(4, alpha_init=3.0, reg_lambda=0.1)),
    )
    assert tq.pact_regularization(model).item() == pytest.approx(0.5 * 4 + 0.1 * 9)
    assert tq.pact_regularization(nn.Linear(2, 2)).item() == 0.0


def test_pact_per_channel_alpha_is_lazy_and_round_trips():
    q = PACTQuantizer(4, alpha_init=2.0, axis=1)
    with pytest.raises(RuntimeError, match="calibrate first"):
        q(torch.randn(2, 3, 4))
    q.pre_observe(torch.randn(2, 3, 4))
    assert q.alpha.shape == (1, 3, 1) and torch.all(q.alpha == 2.0)
    fresh = PACTQuantizer(4, alpha_init=2.0, axis=1)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.alpha, q.alpha)


@pytest.mark.parametrize("kwargs", [dict(alpha_init=0.0), dict(alpha_init=float("nan")), dict(reg_lambda=-1.0)])
def test_pact_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="PACTQuantizer"):
        PACTQuantizer(4, **kwargs)


# ----------------------------------------------------------------------------- DoReFa


def test_dorefa_weight_forward_by_hand():
    w = torch.tensor([-2.0, 0.0, 0.1, 2.0])
    t = torch.tanh(w)
    w01 = t / (2 * t.abs().max()) + 0.5  # [0, .5, .55, 1]
    expected = 2 * torch.round(w01 * 3) / 3 - 1
    y = DoReFaWeightQuantizer(2)(w)
    assert torch.equal(y, expected)
    assert torch.allclose(y * 3, torch.tensor([-3.0, 1.0, 1.0, 3.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_dorefa_weight_of_half_precision_is_the_float32_simulation_cast_back(dtype):
    # In bfloat16, tanh and w01 * n rounded 35 % of 8-bit weights to another level.
    w = torch.randn(64, 256).to(dtype)
    for bits in (2, 4, 8):
        y = DoReFaWeightQuantizer(bits, axis=0)(w)
        assert y.dtype == dtype and torch.equal(y, DoReFaWeightQuantizer(bits, axis=0)(w.float()).to(dtype))


def test_dorefa_weight_gradient_is_that_of_the_normalisation():
    # With rounding passed straight through, 2 * w' - 1 = tanh(w) / max|tanh(w)|.
    w = torch.randn(4, 6, requires_grad=True)
    g = torch.randn(4, 6)
    DoReFaWeightQuantizer(3, axis=0)(w).backward(g)
    got = w.grad.clone()
    w.grad = None
    t = torch.tanh(w)
    (t / t.abs().amax(dim=1, keepdim=True)).backward(g)
    assert torch.allclose(got, w.grad, rtol=1e-5, atol=1e-6)


def test_dorefa_weight_one_bit():
    w = torch.tensor([[1.0, -3.0], [0.5, 0.0]], requires_grad=True)
    y = DoReFaWeightQuantizer(1, axis=0)(w)
    assert y.tolist() == [[2.0, -2.0], [0.25, 0.25]]
    y.backward(torch.ones(2, 2))
    assert torch.equal(w.grad, torch.ones(2, 2))


def test_dorefa_act_forward_gradient_and_grid():
    q = DoReFaActQuantizer(2)
    x = torch.tensor([-1.0, 0.2, 0.5, 1.0, 3.0], requires_grad=True)
    y = q(x)
    assert torch.equal(y.detach().abs(), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0, 1.0]))
    y.backward(torch.ones(5))
    assert x.grad.tolist() == [0, 1, 1, 1, 0]
    grid = q.grid()
    assert torch.equal(grid.from_int(grid.to_int(x.detach())).abs(), y.detach().abs())


# ----------------------------------------------------------------------------- binary / ternary


def test_bnn_forward_and_clipped_gradient():
    x = torch.tensor([-1.5, -0.5, 0.0, 0.9, 1.1], requires_grad=True)
    y = BinaryQuantizer()(x)
    assert y.tolist() == [-1, -1, 1, 1, 1]
    y.backward(torch.ones(5))
    assert x.grad.tolist() == [0, 1, 1, 1, 0]


def test_xnor_per_channel_scale_and_gradient():
    w = torch.tensor([[1.0, -3.0, 0.5, 0.5], [0.2, -0.2, 0.2, 1.4]], requires_grad=True)
    y = XNORWeightQuantizer(axis=0)(w)
    alpha = torch.tensor([[1.25], [0.5]])
    assert torch.equal(y, alpha * torch.tensor([[1.0, -1, 1, 1], [1, -1, 1, 1]]))
    g = torch.arange(8.0).reshape(2, 4)
    y.backward(g)
    assert torch.allclose(w.grad, g * (1 / 4 + alpha * (w.detach().abs() <= 1)))
    per_tensor = XNORWeightQuantizer(axis=None)(w.detach())
    assert torch.allclose(per_tensor.abs(), torch.full((2, 4), w.detach().abs().mean().item()))


def test_twn_per_tensor_by_hand():
    w = torch.tensor([-2.0, 0.1, 0.3, 1.6], requires_grad=True)
    # mean|w| = 1.0 -> Delta = 0.7; above: 2.0, 1.6 -> alpha = 1.8
    y = TernaryQuantizer()(w)
    assert torch.allclose(y, torch.tensor([-1.8, 0.0, 0.0, 1.8]))
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert w.grad.tolist() == [1, 2, 3, 4]


def test_twn_per_channel_equals_per_tensor_per_row():
    w = torch.randn(5, 3, 3, 3)
    y = TernaryQuantizer(axis=0)(w)
    for c in range(5):
        assert torch.equal(y[c], TernaryQuantizer()(w[c]))
        assert len(y[c].abs().unique()) <= 2  # {0, alpha_c}


def test_twn_all_zero_channel():
    w = torch.zeros(2, 4)
    w[1] = torch.tensor([1.0, -1.0, 1.0, 1.0])
    y = TernaryQuantizer(axis=0)(w)
    assert torch.equal(y, w)


# ----------------------------------------------------------------------------- power of two


def test_affine_power_of_two_rounds_delta_up():
    x = torch.tensor([-1.0, 2.0])
    q = AffineQuantizer(2, BatchMinMax(), power_of_two=True)
    q.pre_observe(torch.tensor([-1.0, 2.2]))  # delta 3.2 / 3 = 1.0667 -> 2
    d, z = q.qparams()
    assert d.item() == 2.0 and z.item() == 0.0  # round(1 / 2) = 0, half to even
    q.pre_observe(torch.tensor([-1.0, 2.0]))  # delta exactly 1 stays 1
    d, z = q.qparams()
    assert d.item() == 1.0 and z.item() == 1.0
    assert q(x).tolist() == [-1.0, 2.0]
    grid = q.grid()
    assert grid.scale.item() == 1.0 and grid.zero_point.item() == 1.0


def test_affine_power_of_two_per_channel_and_default_unchanged():
    w = torch.randn(6, 10)
    q = AffineQuantizer(4, BatchMinMax(axis=0), symmetric=True, power_of_two=True)
    q.pre_observe(w)
    d, _ = q.qparams()
    ref = AffineQuantizer(4, BatchMinMax(axis=0), symmetric=True)
    ref.pre_observe(w)
    d_ref, _ = ref.qparams()
    assert torch.all(d >= d_ref) and torch.all(d < 2 * d_ref)
    assert torch.equal(torch.log2(d), torch.log2(d).round())
    assert "power_of_two=True" in repr(q) and "power_of_two" not in repr(ref)


# ----------------------------------------------------------------------------- minifloat / MX


def test_minifloat_quantizer_scaled_per_channel():
    w = torch.randn(3, 20) * torch.tensor([[1.0], [100.0], [0.01]])
    q = MinifloatQuantizer("fp8_e4m3", BatchMinMax(axis=0))
    q.pre_observe(w)
    s = w.abs().amax(dim=1, keepdim=True) / 448
    assert torch.equal(q(w), (w / s).to(torch.float8_e4m3fn).float() * s)
    assert q.grid() is None


def test_minifloat_quantizer_unscaled_is_a_cast():
    x = torch.randn(100) * 100
    assert torch.equal(MinifloatQuantizer("e5m2")(x), x.to(torch.float8_e5m2).float())
    with pytest.raises(ValueError, match="unknown format 'e9m9'"):
        MinifloatQuantizer("e9m9")


def test_mx_quantizer_matches_primitive_and_checks_axis():
    x = torch.randn(2, 64)
    q = MXQuantizer("fp4_e2m1", axis=-1)
    f = tq.FORMATS["fp4_e2m1"]
    ref = tq.quantizers_functional.mx_quantize(x, f.man_bits, f.bias, f.max_value, f.emax)
    assert torch.equal(q(x), ref)
    with pytest.raises(ValueError, match="axis 3 does not exist"):
        MXQuantizer(axis=3)(x)
    with pytest.raises(ValueError, match="block_size"):
        MXQuantizer(block_size=0)


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_torch_compile_qat_step_of_learned_quantizers():
    torch.manual_seed(0)
    model = QWrapper([nn.Linear(8, 8), nn.ReLU()], LSQQuantizer(4, axis=0), PACTQuantizer(4, alpha_init=0.5))
    model2 = QWrapper(nn.Linear(8, 8), DoReFaWeightQuantizer(4), LSQPlusQuantizer(4, signed=True))
    model = nn.Sequential(model, model2)
    x = torch.randn(16, 8)
    set_qmodule_state(model, QModuleState.QUANT_AWARE_TRAIN)
    model(x)  # initialise the lazy parameters eagerly
    params = list(model.parameters())
    eager_grads = torch.autograd.grad(model(x).square().mean(), params)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    grads = torch.autograd.grad(compiled(x).square().mean(), params)
    for a, b in zip(grads, eager_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
