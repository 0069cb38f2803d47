"""Histogram observers (percentile, MSE, entropy); the checks every observer shares are in test_registry_contract.py."""

import pytest
import torch

import torchquant as tq
from torchquant import AffineQuantizer, EntropyObserver, MSEObserver, PercentileObserver
from torchquant.range_observers import kl_divergences


def test_moving_average_alias():
    assert tq.registry.OBSERVERS.get("moving_avg_minmax") is tq.ExpAvgMinMax


# ------------------------------------------------------------------- histogram
def test_histogram_counts_rebinning_and_sampling():
    o = PercentileObserver(max_samples=None, bins=8)
    o.observe_batch(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    hist, lo, hi = o.histogram()
    assert hist.tolist() == [[1, 0, 1, 0, 0, 1, 0, 1]] and lo.item() == 0 and hi.item() == 3
    o.observe_batch(torch.tensor([-3.0, 3.0]))  # span doubles: old bin centres move to the new bins
    hist, lo, hi = o.histogram()
    assert hist.tolist() == [[1, 0, 0, 0, 1, 1, 1, 2]] and lo.item() == -3 and hi.item() == 3
    # sampling: at most max_samples values per range and batch, deterministic positions
    s = PercentileObserver(max_samples=100, axis=0)
    x = torch.randn(3, 1000)
    s.observe_batch(x)
    assert s.hist.sum(1).tolist() == [100.0] * 3
    s2 = PercentileObserver(max_samples=100, axis=0)
    s2.observe_batch(x)
    assert torch.equal(s.hist, s2.hist)


def test_lazy_search_runs_once_per_new_batch():
    o = MSEObserver(4)
    o.observe_batch(torch.randn(1000))
    assert o._stale and o.ranges_version.item() == 0
    r1 = o.get_ranges()
    assert not o._stale and o.ranges_version.item() == 1
    o.min_val.fill_(-123.0)  # a cached result is returned as is until the next batch
    assert o.get_ranges()[0].item() == -123.0
    o.observe_batch(torch.randn(1000))
    assert o.get_ranges()[0].item() != -123.0 and r1[0].item() != -123.0


def test_skip_zeros():
    x = torch.randn(10_000).relu()
    o = EntropyObserver(skip_zeros=True, max_samples=None)
    o.observe_batch(x)
    assert o.hist.sum().item() == (x != 0).sum().item()


def test_distributed_sync_single_process(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already initialised")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}")
    try:
        x = torch.randn(2, 500)
        synced, local = EntropyObserver(axis=0), EntropyObserver(axis=0)
        synced.distributed_sync = True
        synced.observe_batch(x)
        local.observe_batch(x)
        assert torch.equal(synced.hist, local.hist)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (PercentileObserver, {"percentile": 40.0}, "percentile"),
        (PercentileObserver, {"bins": 1}, "bins"),
        (PercentileObserver, {"max_samples": 0}, "max_samples"),
        (MSEObserver, {"n_bits": 0}, "n_bits"),
        (MSEObserver, {"n_candidates": 0}, "n_candidates"),
        (EntropyObserver, {"n_bits": 8, "bins": 128}, "bins"),
    ],
    ids=["percentile", "bins", "max-samples", "mse-bits", "mse-candidates", "entropy-bins"],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=f"{cls.__name__}.*{match}"):
        cls(**kwargs)


def test_too_many_histogram_cells():
    o = PercentileObserver(axis=1, group_size=1, bins=2048)
    with pytest.raises(ValueError, match="histogram cells"):
        o.observe_batch(torch.randn(256, 256))


# ------------------------------------------------------------------ percentile
def test_percentile_hand_computed():
    # 1001 evenly spaced values: the 99 % percentile of linspace(0, 1000) is 990 (+- one bin of 1000/2048)
    o = PercentileObserver(99.0, max_samples=None)
    o.observe_batch(torch.linspace(0, 1000, 1001))
    mn, mx = o.get_ranges()
    assert abs(mx.item() - 990.0) <= 1000 / 2048 and abs(mn.item() - 10.0) <= 1000 / 2048


def test_percentile_matches_quantile_per_channel_and_across_batches():
    batches = [torch.randn(3, 20_000) * torch.tensor([[1.0], [2.0], [0.1]]) for _ in range(3)]
    o = PercentileObserver(99.9, max_samples=None, axis=0)
    for b in batches:
        o.observe_batch(b)
    allx = torch.cat(batches, 1)
    q = torch.quantile(allx, torch.tensor([0.001, 0.999]), dim=1)  # (2, C)
    width = (allx.amax(1) - allx.amin(1)) / 2048
    mn, mx = o.get_ranges()
    assert ((mx.flatten() - q[1]).abs() <= 3 * width).all()  # a bin, plus the blur of re-binning
    assert ((mn.flatten() - q[0]).abs() <= 3 * width).all()


def test_percentile_sampled_close_to_exact():
    x = torch.randn(16, 64, 32, 32)  # 1M values, 65536 sampled
    o = PercentileObserver(99.9)
    o.observe_batch(x)
    q = torch.quantile(x.flatten()[::4], torch.tensor([0.001, 0.999]))
    mn, mx = o.get_ranges()
    assert abs(mx.item() - q[1].item()) < 0.1 and abs(mn.item() - q[0].item()) < 0.1


# ------------------------------------------------------------------------- MSE
def quant_mse(x, lo, hi, n_bits, symmetric):
    q = AffineQuantizer(n_bits, tq.BatchMinMax(), symmetric=symmetric)
    q.range_observer.force_ranges(lo, hi)
    return (q(x) - x).pow(2).mean().item()


@pytest.mark.parametrize(("n_bits", "symmetric"), [(2, True), (4, False), (8, False)], ids=str)
def test_mse_choice_near_brute_force_on_data(n_bits, symmetric):
    x = torch.cat([torch.randn(10_000), 0.3 * torch.randn(50).exp()])  # gaussian and a skewed tail
    o = MSEObserver(n_bits, symmetric, max_samples=None)
    o.observe_batch(x)
    mn, mx = o.get_ranges()
    chosen = quant_mse(x, mn.item(), mx.item(), n_bits, symmetric)
    lo, hi = x.min().item(), x.max().item()
    brute = min(quant_mse(x, a * lo, a * hi, n_bits, symmetric) for a in torch.linspace(0.02, 1, 50).tolist())
    assert chosen <= 1.05 * brute
    assert chosen <= quant_mse(x, lo, hi, n_bits, symmetric)


def test_mse_per_channel_vectorised():
    # uniform data is best unclipped; a heavy-tailed channel is clipped hard at 4 bits
    x = torch.stack([torch.rand(5000) * 2 - 1, torch.randn(5000) ** 3])
    o = MSEObserver(4, symmetric=True, axis=0, max_samples=None)
    o.observe_batch(x)
    _, mx = o.get_ranges()
    assert mx[0, 0] > 0.97 * x[0].abs().max()
    assert mx[1, 0] < 0.5 * x[1].abs().max()
    single = MSEObserver(4, symmetric=True, max_samples=None)
    single.observe_batch(x[1])
    assert torch.allclose(mx[1, 0], single.get_ranges()[1], rtol=0.02)


# --------------------------------------------------------------------- entropy
def reference_kl(h, levels):
    """TensorRT's loop, written out bin by bin."""
    h = h.double()
    out = []
    for i in range(levels, len(h) + 1):
        p = h[:i].clone()
        p[i - 1] += h[i:].sum()
        q = torch.zeros(i, dtype=torch.float64)
        for k in range(levels):
            a, b = k * i // levels, (k + 1) * i // levels
            seg = h[a:b]
            if (seg > 0).any():
                q[a:b] = torch.where(seg > 0, seg.sum() / (seg > 0).sum(), 0.0)
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        out.append(float("inf") if (q[m] == 0).any() else float((p[m] * (p[m] / q[m]).log()).sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("levels", [4, 8])
def test_kl_divergences_match_reference_loop(levels):
    h = torch.histc(torch.randn(3000).abs(), 48, 0, 4)
    h[30] = 0
    h[36:40] = 0
    ref, ours = reference_kl(h, levels), kl_divergences(h[None].double(), levels)[0]
    assert torch.equal(torch.isfinite(ref), torch.isfinite(ours))
    fin = torch.isfinite(ref)
    assert torch.allclose(ours[fin], ref[fin], atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_entropy_threshold_from_reference(signed):
    x = torch.randn(20_000) if signed else torch.randn(20_000).abs()
    o = EntropyObserver(4, bins=64, max_samples=None)
    o.observe_batch(x)
    hist, _, hi = o.histogram()
    levels = 8 if signed else 16
    i_best = levels + int(reference_kl(hist[0], levels).argmin())
    t = (i_best + 0.5) * hi.item() / 64
    mn, mx = o.get_ranges()
    assert mx.item() == pytest.approx(min(t, x.max().item()), rel=1e-6)
    assert mn.item() == pytest.approx(max(-t, x.min().item()), rel=1e-6)
