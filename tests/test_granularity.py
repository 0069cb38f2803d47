import pytest
import torch

from torchquant.granularity import PER_TENSOR, Granularity, per_channel, per_group


def test_per_tensor_reduce():
    x = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    mn, mx = PER_TENSOR.reduce(x)
    assert mn.shape == () and mn.item() == -2.0 and mx.item() == 3.0


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_reduce_matches_loop(axis):
    x = torch.randn(4, 5, 3)
    g = per_channel(axis)
    mn, mx = g.reduce(x)
    ax = axis % 3
    assert mn.shape == tuple(s if i == ax else 1 for i, s in enumerate(x.shape))
    for i in range(x.shape[ax]):
        sl = x.select(ax, i)
        assert mn.flatten()[i] == sl.min() and mx.flatten()[i] == sl.max()
    # broadcastable as is
    assert g.expand(mn).shape == mn.shape
    assert (x >= g.expand(mn)).all()


def test_per_channel_non_contiguous_axis0():
    x = torch.randn(5, 4).t()  # (4, 5) non-contiguous
    mn, _mx = per_channel(0).reduce(x)
    assert torch.equal(mn.flatten(), x.min(dim=1).values)


def test_per_group_reduce_and_expand():
    x = torch.arange(12.0).reshape(2, 6)
    g = per_group(3, axis=1)
    mn, mx = g.reduce(x)
    assert mn.tolist() == [[0.0, 3.0], [6.0, 9.0]]
    assert mx.tolist() == [[2.0, 5.0], [8.0, 11.0]]
    e = g.expand(mn)
    assert e.shape == x.shape
    assert e.tolist() == [[0.0, 0.0, 0.0, 3.0, 3.0, 3.0], [6.0, 6.0, 6.0, 9.0, 9.0, 9.0]]


def test_bad_axis_names_shapes():
    with pytest.raises(ValueError, match=r"per-channel\(axis=3\).*\(2, 3\)"):
        per_channel(3).reduce(torch.zeros(2, 3), who="myobs")
    with pytest.raises(ValueError, match=r"myobs.*\(2, 6\).*group size 4 does not divide"):
        per_group(4, axis=1).reduce(torch.zeros(2, 6), who="myobs")


def test_construction_errors():
    with pytest.raises(ValueError):
        Granularity(group_size=4)
    with pytest.raises(ValueError):
        Granularity(axis=0, group_size=0)
    with pytest.raises(TypeError):
        Granularity(axis=1.0)


def test_kind_and_str():
    assert PER_TENSOR.kind == "per_tensor" and str(PER_TENSOR) == "per-tensor"
    assert per_channel(0).kind == "per_channel"
    assert per_group(32).kind == "per_group"


def test_grouped_splits_the_axis_and_needs_groups():
    x = torch.arange(24.0).reshape(2, 6, 2)
    g = per_group(3, axis=1)
    grouped = g.grouped(x)
    assert grouped.shape == (2, 2, 3, 2)
    assert torch.equal(grouped[1, 1, :, 0], x[1, 3:6, 0])
    with pytest.raises(ValueError, match=r"myobs: grouped\(\) needs a per-group granularity, got per-channel"):
        per_channel(1).grouped(x, who="myobs")
    with pytest.raises(ValueError, match="group size 4 does not divide"):
        per_group(4, axis=1).grouped(x)


@pytest.mark.parametrize("op", ["sum", "mean", "amax"])
@pytest.mark.parametrize(
    "g", [PER_TENSOR, per_channel(1), per_group(3, axis=1)], ids=["per-tensor", "per-channel", "per-group"]
)
def test_aggregate_matches_slices(op, g):
    x = torch.randn(2, 6, 4)
    fn = {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax}[op]
    r = g.aggregate(x, op)
    assert r.shape == g.compact_shape(x.shape)
    e = g.expand(r) if g.kind == "per_group" else r.expand_as(x)
    slices = {
        "per_tensor": [(slice(None), slice(None))],
        "per_channel": [(slice(None), slice(c, c + 1)) for c in range(6)],
        "per_group": [(slice(None), slice(k, k + 3)) for k in (0, 3)],
    }[g.kind]
    for sl in slices:
        if g.kind == "per_group":  # per group: separately for every index of the other axes
            for i in range(2):
                for j in range(4):
                    ref = fn(x[i, sl[1], j])
                    assert torch.allclose(e[i, sl[1], j], ref.expand(3), rtol=1e-6, atol=1e-6)
        else:
            ref = fn(x[sl])
            assert torch.allclose(e[sl], ref.expand_as(e[sl]), rtol=1e-6, atol=1e-6)
    assert torch.equal(per_channel(0).aggregate(torch.tensor([1.0, -2.0]), op), torch.tensor([1.0, -2.0]))
