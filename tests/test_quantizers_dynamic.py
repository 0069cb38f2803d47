"""Dynamic quantizers: the grid of AffineQuantizer, with ranges from each input; KIVI's residual groups."""

import pytest
import torch

import torchquant as tq

GRANULARITIES = [
    pytest.param({}, id="per-tensor"),
    pytest.param({"axis": 1}, id="per-channel"),
    pytest.param({"axis": -1, "group_size": 4}, id="per-group"),
]


@pytest.mark.parametrize("kw", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize("n_bits", [4, 8])
def test_equals_affine_quantizer_observing_the_same_tensor(kw, symmetric, n_bits):
    x = torch.randn(3, 5, 8) * 2 + 0.5
    ref = tq.AffineQuantizer(n_bits, tq.BatchMinMax(**kw), symmetric=symmetric)
    ref.pre_observe(x)
    q = tq.DynamicAffineQuantizer(n_bits, symmetric=symmetric, **kw)
    assert torch.equal(q(x), ref(x))


def test_ranges_follow_each_input_and_nothing_is_stored():
    q = tq.DynamicAffineQuantizer(8, axis=-1, group_size=4)
    tq.QOp(torch.neg, acts_quantizer=q)  # owned like any quantizer
    # only the configuration entry: no ranges, no parameters
    assert list(q.state_dict()) == [tq.spec.CONFIG_KEY] and list(q.parameters()) == [] and list(q.buffers()) == []
    x = torch.randn(2, 8)
    q.pre_observe(x * 100)  # observing does nothing
    assert torch.equal(q(x), tq.DynamicAffineQuantizer(8, axis=-1, group_size=4)(x))
    assert torch.equal(q(x * 4), q(x) * 4)  # the step scales with the input (powers of two are exact)


def test_per_token_rows_are_independent():
    q = tq.DynamicAffineQuantizer(4, axis=-1, group_size=8)
    x = torch.randn(2, 3, 8)
    y = q(x)
    x2 = x.clone()
    x2[1, 2] *= 50  # another token's outlier
    y2 = q(x2)
    assert torch.equal(y2[0], y[0]) and torch.equal(y2[1, :2], y[1, :2])


def test_straight_through_gradient():
    x = torch.randn(4, 8, requires_grad=True)
    g = torch.randn(4, 8)
    tq.DynamicAffineQuantizer(4, axis=0)(x).backward(g)
    assert torch.equal(x.grad, g)


def test_bad_arguments_and_shapes_raise():
    with pytest.raises(ValueError, match="n_bits"):
        tq.DynamicAffineQuantizer(0)
    with pytest.raises(ValueError, match="group_size needs an axis"):
        tq.DynamicAffineQuantizer(8, group_size=4)
    with pytest.raises(ValueError, match="does not divide"):
        tq.DynamicAffineQuantizer(8, axis=-1, group_size=3)(torch.randn(2, 8))


@pytest.mark.parametrize("length", [3, 8, 11])
def test_residual_groups(length):
    q = tq.ResidualGroupQuantizer(4, axis=-2, group_size=4)
    x = torch.randn(2, 3, length, 5)
    y = q(x)
    full = length - length % 4
    ref = tq.DynamicAffineQuantizer(4, axis=-2, group_size=4)
    assert torch.equal(y[:, :, :full], ref(x[:, :, :full]))
    assert torch.equal(y[:, :, full:], x[:, :, full:])  # the residual stays float
    # a complete group does not change when the axis grows (what a quantized cache stores once)
    longer = torch.cat([x, torch.randn(2, 3, 6, 5)], dim=-2)
    assert torch.equal(q(longer)[:, :, :full], y[:, :, :full])


def test_no_residual_quantizes_the_tail_as_its_own_group():
    q = tq.ResidualGroupQuantizer(2, axis=0, group_size=4, residual=False)
    x = torch.randn(6, 3)
    y = q(x)
    assert torch.equal(y[4:], tq.DynamicAffineQuantizer(2, axis=0, group_size=2)(x[4:]))
    assert torch.equal(y[:4], tq.DynamicAffineQuantizer(2, axis=0, group_size=4)(x[:4]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: tq.quantizers.DynamicAffineQuantizer(8),
        lambda: tq.quantizers.DynamicAffineQuantizer(4, axis=-1, group_size=32),
        lambda: tq.quantizers.DynamicAffineQuantizer(8, per_token=True),
        lambda: tq.MXQuantizer("fp4_e2m1"),
    ],
    ids=["per-tensor", "groups", "per-token", "mx"],
)
def test_an_empty_tensor_called_directly_passes_through(make):
    # no values to range over (an expert routed no tokens): the per-tensor range and MX's CPU blocks failed
    x = torch.empty(0, 64, requires_grad=True)
    y = make()(x)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64)
