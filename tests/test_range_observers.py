import pytest
import torch

import torchquant as tq
from torchquant import BatchMinMax, ExpAvgMinMax, RunningMinMax

# The min/max observers; the checks every registered observer shares are in test_registry_contract.py.
OBSERVERS = [BatchMinMax, RunningMinMax, ExpAvgMinMax]


def test_batch_minmax_tracks_last_batch():
    o = BatchMinMax()
    o.observe_batch(torch.tensor([-1.0, 2.0]))
    o.observe_batch(torch.tensor([0.5, 1.0]))
    mn, mx = o.get_ranges()
    assert mn.item() == 0.5 and mx.item() == 1.0


def test_running_minmax():
    o = RunningMinMax()
    o.observe_batch(torch.tensor([-1.0, 2.0]))
    o.observe_batch(torch.tensor([0.5, 3.0]))
    mn, mx = o.get_ranges()
    assert mn.item() == -1.0 and mx.item() == 3.0
    assert o.num_batches.item() == 2


def test_exp_avg_bias_correction_hand_computed():
    m = 0.9
    o = ExpAvgMinMax(momentum=m)
    o.observe_batch(torch.tensor([-2.0, 4.0]))
    mn, mx = o.get_ranges()
    # first batch is exact thanks to the bias correction
    assert torch.allclose(mn, torch.tensor(-2.0)) and torch.allclose(mx, torch.tensor(4.0))
    o.observe_batch(torch.tensor([-1.0, 1.0]))
    ema_max = (1 - m) * 4.0 * m + (1 - m) * 1.0
    expected = ema_max / (1 - m**2)
    assert torch.allclose(o.get_ranges()[1], torch.tensor(expected))
    ema_min = (1 - m) * -2.0 * m + (1 - m) * -1.0
    assert torch.allclose(o.get_ranges()[0], torch.tensor(ema_min / (1 - m**2)))


@pytest.mark.parametrize("cls", OBSERVERS)
def test_per_channel_ranges_broadcast(cls):
    o = cls(axis=0)
    w = torch.randn(8, 4, 3, 3)
    o.observe_batch(w)
    mn, _mx = o.get_ranges()
    assert mn.shape == (8, 1, 1, 1)
    assert torch.allclose(mn.flatten(), w.flatten(1).min(1).values, rtol=1e-6, atol=0)


@pytest.mark.parametrize("cls", OBSERVERS)
def test_per_group_ranges_broadcast(cls):
    o = cls(axis=1, group_size=4)
    w = torch.randn(3, 8)
    o.observe_batch(w)
    mn, mx = o.get_ranges()
    assert mn.shape == w.shape
    assert torch.allclose(mx[:, :4], w[:, :4].max(1, keepdim=True).values.expand(3, 4), rtol=1e-6, atol=0)


def test_changing_shape_rejected():
    o = BatchMinMax(axis=0)
    o.observe_batch(torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        o.observe_batch(torch.randn(5, 2))


def test_bad_axis_names_observer_and_shapes():
    o = BatchMinMax(axis=2)
    with pytest.raises(ValueError, match=r"BatchMinMax.*\(4, 2\)"):
        o.observe_batch(torch.randn(4, 2))


def test_exp_avg_loads_a_state_dict_saved_before_decay_existed():
    o = ExpAvgMinMax(0.8)
    for _ in range(5):
        o.observe_batch(torch.randn(4, 6))
    assert o.decay.item() == pytest.approx(0.8**5, rel=1e-6)  # the running product
    old = {k: v for k, v in o.state_dict().items() if k != "decay"}
    fresh = ExpAvgMinMax(0.8)
    fresh.load_state_dict(old, strict=True)  # no missing key
    assert fresh.decay.item() == pytest.approx(0.8**5, rel=1e-6)
    x = torch.randn(4, 6)
    o.observe_batch(x)
    fresh.observe_batch(x)
    for a, b in zip(o.get_ranges(), fresh.get_ranges()):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)
    o.reset()
    assert o.decay.item() == 1.0 and o.num_batches.item() == 0


def test_exp_avg_continues_from_forced():
    o = ExpAvgMinMax(0.5)
    o.force_ranges(-1.0, 1.0)
    o.observe_batch(torch.tensor([-1.0, 1.0]))
    assert torch.allclose(o.get_ranges()[1], torch.tensor(1.0))


def test_reset():
    o = ExpAvgMinMax()
    o.observe_batch(torch.randn(5))
    o.reset()
    assert not o.initialized and o.num_batches.item() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    o = ExpAvgMinMax()
    o.observe_batch(torch.tensor([-1.0, 3.0], dtype=dtype))
    _mn, mx = o.get_ranges()
    assert torch.allclose(mx.double(), torch.tensor(3.0, dtype=torch.float64))


def test_bad_momentum():
    with pytest.raises(ValueError, match="momentum"):
        ExpAvgMinMax(momentum=1.0)


@pytest.mark.parametrize("cls", OBSERVERS)
def test_first_observation_under_torch_compile_has_no_graph_break(cls):
    # Observers allocate their state on the first batch; under torch.compile that must stay in the graph
    # (ExpAvgMinMax once read num_batches on the host there: four graph breaks).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    o = cls()

    def step(x):
        o.observe_batch(x)
        return x * 2

    compiled = torch.compile(step)
    for _ in range(2):
        compiled(torch.randn(4, 6))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert o.initialized
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "make", [BatchMinMax, ExpAvgMinMax, lambda: tq.PercentileObserver(99.0)], ids=["batch", "ema", "percentile"]
)
def test_float64_state_updates_under_torch_compile(make):
    # torch.compile before torch 2.14 lost in-place updates of 0-d float64 buffers (per-tensor ranges, ExpAvgMinMax's
    # decay): a float64 model's ranges never moved. The observers update outside the graph there (the floor job).
    torch._dynamo.reset()
    q_eager, q_compiled = tq.AffineQuantizer(8, make()), tq.AffineQuantizer(8, make())

    def step(q, x):
        q.pre_observe(x)
        return q(x)

    compiled = torch.compile(lambda x: step(q_compiled, x))
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 3.0, 0.5):
        x = torch.randn(64, dtype=torch.float64, generator=g) * scale
        assert torch.equal(compiled(x), step(q_eager, x))
    for (name, a), b in zip(q_eager.named_buffers(), q_compiled.buffers(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), (name, a, b)
    assert q_eager.range_observer.min_val.dtype == torch.float64 and q_eager.range_observer.min_val.dim() == 0
    torch._dynamo.reset()
