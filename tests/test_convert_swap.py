import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.bench.models import DigitsCNN

S = tq.QModuleState


def wf(m, name):
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))


def af(m, name):
    return tq.AffineQuantizer(8, tq.ExpAvgMinMax())


def test_swap_fuses_sequential_and_keeps_outputs():
    torch.manual_seed(0)
    net = DigitsCNN().eval()
    x = torch.rand(4, 1, 8, 8)
    ref = net(x)
    q = tq.quantize_model(net, wf, af, method="swap")
    assert q is net
    assert isinstance(q.stem[0], tq.QWrapper) and isinstance(q.stem[1], nn.Identity)
    assert isinstance(q.fc, tq.QWrapper)
    assert torch.equal(q(x), ref)
    with tq.qmodule_state(q, S.CALIBRATION):
        assert torch.equal(q(x), ref)
    with tq.qmodule_state(q, S.QUANT_EVAL):
        y = q(x)
    assert not torch.equal(y, ref) and torch.allclose(y, ref, atol=0.2)


def test_swap_skip_by_glob_and_type_and_names():
    net = DigitsCNN()
    seen = []

    def wf_named(m, name):
        seen.append(name)
        return tq.AffineQuantizer(8 if name in ("stem.0", "fc") else 4, tq.BatchMinMax(axis=0))

    tq.quantize_model(net, wf_named, None, skip=["block2.*", nn.Linear], method="swap")
    assert not isinstance(net.fc, tq.QWrapper)
    assert not any(isinstance(m, tq.QWrapper) for m in net.block2.modules())
    assert "stem.0" in seen and "block1.conv1.0" in seen
    assert net.stem[0].weight_quantizer.n_bits == 8 and net.block1.conv1[0].weight_quantizer.n_bits == 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        tq.quantize_model(nn.Linear(1, 1), wf, af, method="magic")
    with pytest.raises(TypeError, match="skip"):
        tq.quantize_model(nn.Linear(1, 1), wf, af, skip=[3], method="swap")
    with pytest.raises(TypeError, match="must be a factory"):
        tq.quantize_model(nn.Sequential(nn.Linear(1, 1)), tq.AffineQuantizer(8, tq.BatchMinMax()), None, method="swap")


def test_layers_left_in_float_are_named_in_a_warning():
    import warnings

    class Sub(nn.Linear):  # a subclass with its own forward: no adapter, so it stays in float
        def forward(self, x):
            return super().forward(x) * 2

    w8 = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))  # noqa: E731
    with pytest.warns(tq.FloatLayersWarning, match=r"1 layer\(s\) with weights stay in float: 1"):
        tq.quantize_model(nn.Sequential(nn.Linear(4, 4), Sub(4, 4)), w8, None, method="swap")
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.FloatLayersWarning)
        tq.quantize_model(nn.Sequential(nn.Linear(4, 4), Sub(4, 4)), w8, None, method="swap", skip=["1"])
        tq.quantize_model(nn.TransformerEncoderLayer(16, 2, 32), w8, None, method="swap")
