import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.ptq import ChannelClip, expected_activation

W4 = lambda m, n: tq.AffineQuantizer(3, tq.BatchMinMax())  # noqa: E731 - coarse: a visible shift
A8 = lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax())  # noqa: E731


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 6, 1),
        nn.Flatten(),
        nn.Linear(6 * 25, 5),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(0.0, 1.0)
    return tq.quantize_model(net.eval(), W4, A8, method="swap")


def _layer_shift(q, wrapper, x):
    """Per-channel mean of (quantized - float weight) layer outputs on the wrapper's actual input."""
    seen = {}
    h = wrapper.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with tq.qmodule_state(q, tq.QModuleState.QUANT_EVAL), torch.no_grad():
        q(x)
        h.remove()
        xin = seen["x"]
        layer = wrapper.layer
        yq = layer._conv_forward(xin, wrapper.weight_quantizer(layer.weight), layer.bias)
    return yq, xin


def test_empirical_bias_correction_removes_the_mean_output_shift():
    q = _net()
    data = [torch.rand(16, 3, 5, 5) for _ in range(4)]
    tq.calibrate(q, data, progress=False)
    ref = [w.layer.weight.detach().clone() for w in (q[0], q[3], q[6])]
    ref_bias = [
        w.layer.bias.detach().clone() if w.layer.bias is not None else torch.zeros(w.layer.out_channels)
        for w in (q[0], q[3], q[6])
    ]
    x = torch.cat(data)

    def shifts():
        out = []
        for w, wf, bf in zip((q[0], q[3], q[6]), ref, ref_bias):
            yq, xin = _layer_shift(q, w, x)
            yf = w.layer._conv_forward(xin, wf, bf)
            out.append((yq - yf).mean(dim=(0, 2, 3)).abs().max().item())
        return out

    before = shifts()
    corrections = tq.ptq.bias_correction(q, data, progress=False)
    after = shifts()
    assert set(corrections) == {"0", "3", "6", "8"}
    assert before[0] > 1e-3
    for b, a in zip(before, after):
        assert a < 1e-4 + 0.05 * b, (before, after)
    assert q[3].layer.bias is not None  # created for the bias-free depthwise layer


def test_empirical_bias_correction_reduces_the_output_shift_of_the_model():
    q = _net()
    data = [torch.rand(32, 3, 5, 5) for _ in range(4)]
    tq.calibrate(q, data, progress=False)
    x = torch.cat(data)
    with torch.no_grad():
        fp = q(x)

    def logit_shift():
        with tq.qmodule_state(q, tq.QModuleState.QUANT_EVAL_WEIGHT_ONLY), torch.no_grad():
            return (q(x) - fp).mean(0).abs().mean().item()

    before = logit_shift()
    tq.ptq.bias_correction(q, data, mode=tq.QModuleState.QUANT_EVAL_WEIGHT_ONLY, progress=False)
    assert logit_shift() < 0.6 * before  # per layer it is removed; through the nonlinearities, reduced


@pytest.mark.parametrize(
    "act",
    [None, nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), ChannelClip(torch.tensor([1.0, 6.0, 0.5]))],
    ids=["identity", "relu", "relu6", "leaky", "channel-clip"],
)
def test_expected_activation_matches_monte_carlo(act):
    mean = torch.tensor([0.5, -1.0, 2.0])
    std = torch.tensor([1.0, 2.0, 0.3])
    torch.manual_seed(0)
    z = mean + std * torch.randn(400_000, 3)
    mc = (act(z) if act is not None else z).mean(0)
    assert torch.allclose(expected_activation(act, mean, std), mc, atol=1e-2)
    with pytest.raises(TypeError, match="no closed form"):
        expected_activation(nn.Sigmoid(), mean, std)


def test_analytic_bias_correction_reduces_the_shift_it_models():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2.0)
        net[1].bias.uniform_(-0.5, 1.0)
        net[1].running_mean.zero_()
        net[1].running_var.fill_(1.0)
    q = tq.quantize_model(net.eval(), W4, None, method="swap")
    # The first layer is the identity, so its pre-BN outputs are ~ N(0, 1) and the BN output N(beta, gamma^2).
    x = torch.randn(20000, 32)
    with torch.no_grad():
        q[0].layer.weight.copy_(torch.eye(32))
        q[0].layer.bias.zero_()
    tq.calibrate(q, [x[:256]], mode=tq.QModuleState.CALIBRATION_WEIGHT_ONLY, progress=False)
    b = q[3]
    w_fp = b.layer.weight.detach().clone()
    b_fp = b.layer.bias.detach().clone()
    with torch.no_grad():
        h = q[0](x)  # bypassed: float BN + ReLU output, the input of q[3]

        def shift():
            return (
                (
                    nn.functional.linear(h, b.weight_quantizer(b.layer.weight), b.layer.bias)
                    - nn.functional.linear(h, w_fp, b_fp)
                )
                .mean(0)
                .abs()
                .mean()
                .item()
            )

        before = shift()
        corr = tq.ptq.bias_correction(q, method="analytic", progress=False)
        after = shift()
    assert list(corr) == ["3"]
    assert after < 0.2 * before, (before, after)


def test_analytic_uses_bn_stats_from_equalize():
    q = _net()
    res = tq.ptq.equalize(q, absorb_bias=False)
    tq.calibrate(q, [torch.rand(8, 3, 5, 5)], progress=False)
    with pytest.raises(ValueError, match="no layer preceded"):
        tq.ptq.bias_correction(q, method="analytic", progress=False)  # BatchNorm folded, no stats given
    corr = tq.ptq.bias_correction(q, method="analytic", bn_stats=res.bn_stats, progress=False)
    assert set(corr) == {"3", "6"}


def test_bias_correction_bad_input_leaves_model_untouched():
    q = _net()
    data = [torch.rand(4, 3, 5, 5)]
    with pytest.raises(ValueError, match="no QModule"):
        tq.ptq.bias_correction(nn.Linear(2, 2), data)
    with pytest.raises(ValueError, match="mode"):
        tq.ptq.bias_correction(q, data, mode=tq.QModuleState.CALIBRATION)
    with pytest.raises(ValueError, match="method"):
        tq.ptq.bias_correction(q, data, method="magic")
    with pytest.raises(ValueError, match="needs calibration data"):
        tq.ptq.bias_correction(q)
    with pytest.raises(ValueError, match="data-free"):
        tq.ptq.bias_correction(q, data, method="analytic")
    with pytest.raises(ValueError, match="empty"):
        tq.ptq.bias_correction(q, [])
    with pytest.raises(ValueError, match="no QWrapper with a weight quantizer"):
        tq.ptq.bias_correction(tq.quantize_model(nn.Sequential(nn.Linear(2, 2)), None, A8, method="swap"), data)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(RuntimeError, match="calibrate first"):  # not calibrated
        tq.ptq.bias_correction(q, data, progress=False)
    after = q.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_wrappers_sharing_one_layer_keep_its_bias():
    # A module listed twice in a Sequential, converted by swap: two wrappers of one layer, whose one bias
    # each would correct by the whole shift (twice in all).
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    q = tq.quantize_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), shared, nn.ReLU(), shared).eval(),
                          lambda m, n: tq.AffineQuantizer(3, tq.BatchMinMax(axis=0)), None, method="swap")  # fmt: skip
    x = torch.randn(64, 8)
    tq.calibrate(q, [x], progress=False)
    bias = shared.bias.detach().clone()
    with pytest.warns(UserWarning, match="2 wrappers share their layer.*: 2, 4"):
        tq.ptq.bias_correction(q, [x], progress=False)
    assert torch.equal(shared.bias, bias)


def _mean_shift(m, x, ref, mode):
    with torch.no_grad(), tq.qmodule_state(m, mode):
        q = torch.cat([m(b) for b in x])
    dims = [d for d in range(q.dim()) if d != (1 if q.dim() > 2 else q.dim() - 1)]
    return (q - ref).mean(dims).abs().max().item()


@pytest.mark.parametrize("fold_bn", [True, False], ids=["fold_bn", "folded-before"])
def test_a_batchnorm_folded_by_the_wrapper_is_corrected_in_folded_units(fold_bn):
    # the quantizer sees W * gamma / sigma, and the layer's bias reaches the output times gamma / sigma
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.01, 0.05)
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
        bn.weight[0] = 0.0  # a dead channel: nothing to correct, its bias untouched
    w = tq.QWrapper([conv, bn], weight_quantizer=tq.AffineQuantizer(3, tq.BatchMinMax()), fold_bn=fold_bn)
    m = nn.Sequential(w).eval()
    if not fold_bn:
        m = tq.fold_batchnorm(m)
    x = [torch.rand(32, 3, 8, 8) * 2 for _ in range(2)]
    with torch.no_grad(), tq.qmodule_state(m, tq.QModuleState.BYPASSED):
        ref = torch.cat([m(b) for b in x])
    mode = tq.QModuleState.QUANT_EVAL_WEIGHT_ONLY
    tq.calibrate(m, x, mode=tq.QModuleState.CALIBRATION_WEIGHT_ONLY, progress=False)
    before = _mean_shift(m, x, ref, mode)
    bias0 = m[0].layer.bias[0].item()
    tq.ptq.bias_correction(m, x, mode=mode, progress=False)
    assert before > 0.3
    assert _mean_shift(m, x, ref, mode) < 1e-4 * before  # it tripled the shift (0.67 -> 1.95) when unfolded
    if fold_bn:
        assert m[0].layer.bias[0].item() == bias0


def test_the_correction_is_measured_on_the_input_the_product_reads():
    # an input transform (QuaRot's online Hadamard) and an input quantizer come before the product
    from torchquant.qmodules import HadamardTransform

    torch.manual_seed(0)
    w = tq.QWrapper(nn.Linear(16, 8), weight_quantizer=tq.AffineQuantizer(3, tq.BatchMinMax()),
                    input_quantizer=tq.AffineQuantizer(4, tq.RunningMinMax()))  # fmt: skip
    w.input_transform = HadamardTransform(16)
    m = nn.Sequential(w).eval()
    x = [torch.rand(128, 16) * 3 + 1 for _ in range(2)]
    tq.calibrate(m, x, progress=False)
    tq.set_qmodule_state(m, tq.QModuleState.QUANT_EVAL)
    # the reference: the float weight on the quantized, transformed input (only the weight's error is removed)
    with torch.no_grad():
        ref = torch.cat([torch.nn.functional.linear(w._quantize_input(w.input_transform(b)), w.layer.weight,
                                                    w.layer.bias) for b in x])  # fmt: skip
    before = _mean_shift(m, x, ref, tq.QModuleState.QUANT_EVAL)
    tq.ptq.bias_correction(m, x, progress=False)
    assert before > 0.05
    assert _mean_shift(m, x, ref, tq.QModuleState.QUANT_EVAL) < 1e-4 * before


def test_the_registered_entry_runs_the_analytic_method_with_the_data_a_recipe_passes():
    # recipes call fn(model, data, **options): method="analytic" is data-free and refused data
    torch.manual_seed(0)
    f = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    q = tq.quantize_model(f, lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax()), None, method="swap")
    data = [torch.rand(8, 3, 10, 10)]
    tq.calibrate(q, data, progress=False)
    entry = tq.ptq.get_ptq_algorithm("bias_correction")
    assert {"method", "bn_stats", "mode", "num_batches", "progress"} <= entry.options
    assert sorted(entry(q, data, method="analytic", progress=False)) == ["3"]
    with pytest.raises(ValueError, match="data-free"):  # a direct call still says so
        tq.ptq.bias_correction(q, data, method="analytic")


def test_weights_already_rounded_by_adaround_are_named_in_a_warning():
    # AdaRound writes the rounded values into the weights: bias correction then measures no error at all
    torch.manual_seed(0)
    q = tq.quantize_model(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(),
                          lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)), None, method="swap")  # fmt: skip
    data = [torch.randn(32, 8) for _ in range(2)]
    tq.calibrate(q, data, progress=False)
    tq.ptq.adaround(q, data, iters=5, batch_size=16, progress=False)
    with pytest.warns(UserWarning, match=r"0, 2 have weights already on their quantization grid"):
        shifts = tq.ptq.bias_correction(q, data, mode=tq.QModuleState.QUANT_EVAL_WEIGHT_ONLY, progress=False)
    assert all(not s.any() for s in shifts.values())


def test_analytic_correction_reads_the_transformed_expectation():
    # a layer whose input is transformed (QuaRot's online Hadamard) sees E[T x] = T E[x]
    from torchquant.qmodules import HadamardTransform

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2.0), net[1].bias.uniform_(-0.5, 1.0)
    q = tq.quantize_model(net.eval(), lambda m, n: tq.AffineQuantizer(3, tq.BatchMinMax()), None, method="swap")
    q[3].input_transform = HadamardTransform(16)
    tq.calibrate(q, [torch.randn(64, 16)], mode=tq.QModuleState.CALIBRATION_WEIGHT_ONLY, progress=False)
    b = q[3]
    with torch.no_grad():
        w = b.weight_to_quantize()
        dw = b.weight_quantizer(w) - w
        ex = expected_activation(q[0].act, q[0].bn.bias, q[0].bn.weight.abs())
        expected = dw @ b.input_transform(ex.reshape(1, -1)).reshape(-1)
    shifts = tq.ptq.bias_correction(q, method="analytic", progress=False)
    torch.testing.assert_close(shifts["3"], expected)
