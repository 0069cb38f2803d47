"""integer_params: integer reconstruction of a layer, save/load round trips; safe checkpoints."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

import torchquant as tq

S = tq.QModuleState


def _mlp(per_channel=True, bits=8):
    torch.manual_seed(0)
    wax = {"axis": 0} if per_channel else {}
    net = tq.quantize_model(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)),
        lambda m, n: tq.AffineQuantizer(bits, tq.BatchMinMax(**wax)),
        lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()),
        method="swap",
    )
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(torch.randn(128, 16))
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    return net


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("bits", [8, 4], ids=["w8", "w4"])
def test_integer_arithmetic_reconstructs_the_layer(per_channel, bits):
    net = _mlp(per_channel, bits)
    params = tq.export.integer_params(net, torch.randn(1, 16))
    w = params["2.weight_quantizer"]
    assert (w["kind"], w["n_bits"], w["granularity"]) == (
        "weight",
        bits,
        "per_channel" if per_channel else "per_tensor",
    )
    assert w["input_point"] == "0.acts_quantizer"
    assert w["int_weight"].min() >= w["qmin"] and w["int_weight"].max() <= w["qmax"]
    inp, out = params["0.acts_quantizer"], params["2.acts_quantizer"]
    x = torch.randn(64, 16)
    with torch.no_grad():
        a = net[0](x)
        y_sim = net(x).numpy()
        pre = torch.nn.functional.linear(a, net[2].quantized_weight(), net[2].layer.bias).numpy()
    x_int = np.clip(np.rint(a.numpy() / inp["scale"]) + inp["zero_point"], inp["qmin"], inp["qmax"]).astype(np.int64)
    # the codes dequantize exactly to the simulated activation
    assert np.array_equal(((x_int - inp["zero_point"]) * inp["scale"]).astype(np.float32), a.numpy())
    acc = (x_int - inp["zero_point"]) @ (w["int_weight"] - w["zero_point"].reshape(-1, 1)).T  # int64, exact
    assert acc.dtype == np.int64
    y = acc * w["bias_scale"] + w["bias"]
    np.testing.assert_allclose(y, pre, rtol=1e-6, atol=1e-6)
    codes = np.clip(np.rint(y / out["scale"]) + out["zero_point"], out["qmin"], out["qmax"])
    sim_codes = np.rint(y_sim / out["scale"]) + out["zero_point"]
    assert np.array_equal(codes, sim_codes)
    # integer bias: within half an accumulator unit of the float bias
    assert np.abs(w["int_bias"] * w["bias_scale"] - w["bias"]).max() <= 0.5 * w["bias_scale"].max() + 1e-9
    codes_int_bias = np.clip(
        np.rint((acc + w["int_bias"]) * w["bias_scale"] / out["scale"]) + out["zero_point"], out["qmin"], out["qmax"]
    )
    assert np.abs(codes_int_bias - sim_codes).max() <= 1


def test_without_inputs_biases_stay_float_and_activation_fields():
    params = tq.export.integer_params(_mlp())
    w = params["0.weight_quantizer"]
    assert "int_bias" not in w and w["bias"].dtype == np.float32
    a = params["0.acts_quantizer"]
    assert (a["kind"], a["granularity"], a["axis"]) == ("activation", "per_tensor", None)
    assert "int_weight" not in a and a["scale"].shape == ()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_load_round_trip(tmp_path, suffix):
    params = tq.export.integer_params(_mlp(), torch.randn(1, 16))
    path = tmp_path / f"p{suffix}"
    tq.export.save_integer_params(params, path)
    back = tq.export.load_integer_params(path)
    assert back.keys() == params.keys()
    for point, entry in params.items():
        assert back[point].keys() == entry.keys()
        for k, v in entry.items():
            if isinstance(v, np.ndarray):
                assert np.array_equal(back[point][k], v) and back[point][k].dtype == v.dtype
            else:
                assert back[point][k] == v
    with pytest.raises(ValueError, match=r"\.npz or \.safetensors"):
        tq.export.save_integer_params(params, tmp_path / "p.pkl")


def test_integer_params_errors():
    net = _mlp()
    net[2].qstate = S.QUANT_AWARE_TRAIN
    with pytest.raises(ValueError, match=r"module '2' \(QWrapper\) is in mode QUANT_AWARE_TRAIN"):
        tq.export.integer_params(net)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    with pytest.raises(ValueError, match=r"shapes \[\(1, 15\)\]"):
        tq.export.integer_params(net, torch.randn(1, 15))


def test_checkpoint_round_trip_and_refuses_pickled_code(tmp_path):
    net = _mlp()
    path = tmp_path / "net.pt"
    tq.export.save_checkpoint(net, path)
    fresh = tq.quantize_model(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)),
        lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)),
        lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()),
        method="swap",
    )
    tq.export.load_checkpoint(fresh, path)
    tq.set_qmodule_state(fresh, S.QUANT_EVAL)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(ValueError, match="not a weights-only checkpoint"):
        tq.export.load_checkpoint(fresh, bad)


def test_multihead_attention_weights_are_integer_weights():
    torch.manual_seed(0)
    net = tq.quantize_model(
        nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)),
        lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True),
        lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()),
        method="swap",
    ).eval()
    tq.calibrate(net, [torch.randn(2, 5, 8)], progress=False)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    params = tq.export.integer_params(net)
    mha = net[0].self_attn
    for role, (w, b) in {
        "in_proj": (mha.layer.in_proj_weight, mha.layer.in_proj_bias),  # (3 * E, E)
        "out_proj": (mha.layer.out_proj.weight, mha.layer.out_proj.bias),
    }.items():
        p = params[f"0.self_attn.{role}_quantizer"]
        assert p["kind"] == "weight" and p["int_weight"].shape == tuple(w.shape)
        dequant = (p["int_weight"] - p["zero_point"].reshape(-1, 1)) * p["scale"].reshape(-1, 1)
        q = getattr(mha, f"{role}_quantizer")
        np.testing.assert_allclose(dequant, q(w).detach().numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(p["bias"], b.detach().numpy())


@pytest.mark.parametrize(
    "make",
    [
        lambda: tq.MinifloatQuantizer("fp8_e4m3", tq.BatchMinMax(axis=0)),
        lambda: tq.MXQuantizer("fp4_e2m1", block_size=16),
        lambda: tq.MXQuantizer("fp8_e5m2"),  # 40 inputs: a last block of 8
    ],
    ids=["fp8-per-channel", "mxfp4", "mxfp8-partial-block"],
)
def test_float_formats_give_elements_and_scales_that_rebuild_the_weights(make, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 4))
    net = tq.quantize_model(net, lambda m, n: make(), lambda m, n: tq.MinifloatQuantizer("fp8_e5m2"), method="swap")
    with torch.no_grad(), tq.qmodule_state(net, S.CALIBRATION):
        net(torch.randn(32, 40))
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    params = tq.export.integer_params(net)
    for name, wrapper in (("0.weight_quantizer", net[0]), ("2.weight_quantizer", net[2])):
        p = params[name]
        fmt = wrapper.weight_quantizer.float_grid().fmt
        assert p["kind"] == "weight" and not p["affine"] and p["format"] == fmt.name
        assert np.isin(p["elements"], fmt.values().numpy()).all()
        scale = torch.from_numpy(p["scale"])
        if p["blocked"]:  # one scale per block of group_size along the axis, the last block shorter
            n = p["elements"].shape[p["axis"]]
            scale = scale.repeat_interleave(p["group_size"], dim=p["axis"]).narrow(p["axis"], 0, n)
        with torch.no_grad():
            simulated = wrapper.weight_quantizer(wrapper.weight_to_quantize())
        assert torch.equal(torch.from_numpy(p["elements"]) * scale, simulated)
    act = params["0.acts_quantizer"]
    assert act["kind"] == "activation" and act["format"] == "e5m2" and act["scale"] == 1.0
    path = tmp_path / "params.npz"
    tq.export.save_integer_params(params, path)
    loaded = tq.export.load_integer_params(path)
    assert loaded["0.weight_quantizer"]["special"] == params["0.weight_quantizer"]["special"]
    np.testing.assert_array_equal(loaded["0.weight_quantizer"]["elements"], params["0.weight_quantizer"]["elements"])


class _FedTwice(nn.Module):
    """``shared`` called on ``a``'s output, then on ``b``'s (or ``a``'s again); ``fc`` reads a product (a QOp in fx,
    which comes after ``fc`` in module order)."""

    def __init__(self, same: bool) -> None:
        super().__init__()
        self.a, self.b, self.shared, self.fc = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.same = same

    def forward(self, x):
        h, g = self.a(x), self.b(x) * 10.0
        y = self.shared(h) + self.shared(h if self.same else g)
        return self.fc(y * 2.0) + g[:, :4]


@pytest.mark.parametrize("method", ["fx", "swap"])
@pytest.mark.parametrize("same", [True, False], ids=["one-feeder", "two-feeders"])
def test_a_layer_called_twice_gets_an_int_bias_only_with_one_feeder(method, same):
    torch.manual_seed(0)
    q = tq.quantize_model(_FedTwice(same).eval(), lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)),
                          lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()), method=method)  # fmt: skip
    x = torch.randn(32, 16)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    if same:
        params = tq.export.integer_params(q, x)
        assert params["shared.weight_quantizer"]["input_point"] == "a.acts_quantizer"
    else:
        with pytest.warns(UserWarning, match="inputs from different quantizers.*: shared$"):
            params = tq.export.integer_params(q, x)
        assert "int_bias" not in params["shared.weight_quantizer"]
    if method == "fx":  # the product's QOp, after fc in module order, feeds fc
        assert params["fc.weight_quantizer"]["input_point"].startswith("mul")


def test_a_layer_with_its_own_input_quantizer_reads_its_codes():
    # Transformer-style W8A8: each layer quantizes its input itself, after whatever quantized the tensor before
    # (a norm's output point on another range); its integer bias is at its own input scale.
    torch.manual_seed(0)
    first = tq.QOp(nn.Identity(), tq.AffineQuantizer(8, tq.PercentileObserver(99.0)))
    layer = tq.QWrapper(nn.Linear(16, 8), weight_quantizer=tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)),
                        input_quantizer=tq.AffineQuantizer(8, tq.RunningMinMax()))  # fmt: skip
    net = nn.Sequential(first, layer)
    x = torch.randn(64, 16)
    tq.calibrate(net, [x], progress=False)
    tq.set_qmodule_state(net, tq.QModuleState.QUANT_EVAL)
    p = tq.export.integer_params(net, x)
    w, inp = p["1.weight_quantizer"], p["1.input_quantizer"]
    assert w["input_point"] == "1.input_quantizer"
    with torch.no_grad():
        x_in = first(x)
        y = net(x)
    x_int = np.clip(np.round(x_in.numpy() / inp["scale"]) + inp["zero_point"], inp["qmin"], inp["qmax"])
    acc = (x_int - inp["zero_point"]) @ (w["int_weight"] - w["zero_point"].reshape(-1, 1)).T + w["int_bias"]
    # up to half an accumulator unit: the integer bias is rounded
    np.testing.assert_allclose(acc * w["bias_scale"], y.numpy(), rtol=0, atol=0.5 * w["bias_scale"].max() + 1e-6)


def test_per_group_weights_get_no_int_bias_and_float_weights_keep_their_bias():
    torch.manual_seed(0)
    x = torch.randn(32, 32)
    for wq, act in ((lambda: tq.AffineQuantizer(4, tq.BatchMinMax(axis=1, group_size=16)), True),
                    (lambda: tq.MinifloatQuantizer("fp8_e4m3", tq.BatchMinMax(axis=0)), False)):  # fmt: skip
        net = nn.Sequential(tq.QOp(nn.Identity(), tq.AffineQuantizer(8, tq.RunningMinMax())),
                            tq.QWrapper(nn.Linear(32, 8), weight_quantizer=wq()))  # fmt: skip
        tq.calibrate(net, [x], progress=False)
        tq.set_qmodule_state(net, tq.QModuleState.QUANT_EVAL)
        entry = tq.export.integer_params(net, x)["1.weight_quantizer"]
        np.testing.assert_array_equal(entry["bias"], net[1].layer.bias.detach().numpy())
        assert "int_bias" not in entry and "input_point" not in entry
        assert entry["affine"] == act


def _layer_after_a_point(layer: nn.Module, wq: tq.Quantizer, fold_bn: bool = False, bn: nn.Module | None = None):
    """``input point -> QWrapper(layer[, bn])``, calibrated, in QUANT_EVAL."""
    torch.manual_seed(0)
    group = [layer] if bn is None else [layer, bn]
    net = nn.Sequential(tq.QOp(nn.Identity(), tq.AffineQuantizer(8, tq.RunningMinMax())),
                        tq.QWrapper(group, weight_quantizer=wq, fold_bn=fold_bn))  # fmt: skip
    return net


def test_weights_with_a_scale_per_input_channel_get_no_int_bias():
    # the scale of a per-input-channel weight is not the accumulator scale of an output channel
    for out in (16, 8):  # as many outputs as inputs: the scales would have broadcast against the bias
        net = _layer_after_a_point(nn.Linear(16, out), tq.AffineQuantizer(8, tq.BatchMinMax(axis=1)))
        x = torch.randn(32, 16)
        tq.calibrate(net, [x], progress=False)
        tq.set_qmodule_state(net, S.QUANT_EVAL)
        entry = tq.export.integer_params(net, x)["1.weight_quantizer"]
        assert entry["scale"].shape == (1, 16)
        assert "int_bias" not in entry and "bias_scale" not in entry and "input_point" not in entry
        np.testing.assert_array_equal(entry["bias"], net[1].layer.bias.detach().numpy())


def test_a_folded_batchnorm_gives_the_folded_bias_and_the_layer_is_rebuilt():
    bn = nn.BatchNorm1d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    net = _layer_after_a_point(nn.Linear(16, 8), tq.AffineQuantizer(8, tq.BatchMinMax(axis=0)), True, bn).eval()
    x = torch.randn(32, 16)
    tq.calibrate(net, [x], progress=False)
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    p = tq.export.integer_params(net, x)
    w, inp = p["1.weight_quantizer"], p["0.acts_quantizer"]
    assert w["input_point"] == "0.acts_quantizer"
    with torch.no_grad():
        x_in, y = net[0](x), net(x)
    x_int = np.clip(np.round(x_in.numpy() / inp["scale"]) + inp["zero_point"], inp["qmin"], inp["qmax"])
    acc = (x_int - inp["zero_point"]) @ (w["int_weight"] - w["zero_point"].reshape(-1, 1)).T
    np.testing.assert_allclose(acc * w["bias_scale"] + w["bias"], y.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose((acc + w["int_bias"]) * w["bias_scale"], y.numpy(), rtol=0,
                               atol=0.5 * w["bias_scale"].max() + 1e-5)  # fmt: skip


def test_weight_codes_are_those_of_the_quantizers_own_rounding():
    # AdaRound rounds each weight up or down as learned, not to the nearest point of its grid
    from torchquant.quantizers import AdaRoundQuantizer

    net = _layer_after_a_point(nn.Linear(16, 8), tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=True))
    x = torch.randn(32, 16)
    tq.calibrate(net, [x], progress=False)
    wrapper = net[1]
    ada = AdaRoundQuantizer(wrapper.weight_quantizer.grid(), wrapper.weight_to_quantize(), soft=False)
    with torch.no_grad():
        ada.alpha.copy_(torch.randn_like(ada.alpha))
    wrapper.weight_quantizer = ada
    tq.set_qmodule_state(net, S.QUANT_EVAL)
    entry = tq.export.integer_params(net, x)["1.weight_quantizer"]
    with torch.no_grad():
        simulated = wrapper.quantized_weight().numpy()
        nearest = torch.round(wrapper.weight_to_quantize() / ada.scale).numpy()
    assert not np.array_equal(entry["int_weight"], nearest)  # the learned rounding moved some codes
    codes = (entry["int_weight"] - entry["zero_point"]).astype(np.float32)
    np.testing.assert_array_equal(codes * entry["scale"], simulated)
