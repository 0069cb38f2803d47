"""sync_observers: two gloo processes hold identical quantizer state, equal to one process on the whole batch."""

import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torchquant as tq
from torchquant.distributed import observers, sync_observers

ACT_OBSERVERS = {"0": tq.BatchMinMax, "3": tq.RunningMinMax, "6": tq.ExpAvgMinMax}


def build(act_observer: type | None = None) -> nn.Module:
    """A small quantized CNN; ``act_observer`` replaces every activation observer's class."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 2, 3, padding=1),
        nn.Flatten(),
        nn.Linear(2 * 6 * 6, 3),
    )
    return tq.quantize_model(
        net,
        lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=True),
        lambda m, n: tq.AffineQuantizer(4, (act_observer or ACT_OBSERVERS.get(n, tq.ExpAvgMinMax))()),
        method="swap",
    )


def global_batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    # rank-dependent scales so that each rank's shard has different ranges
    return [(torch.randn(8, 1, 6, 6, generator=g) * (1 + torch.arange(8) % 2).view(8, 1, 1, 1), torch.arange(8) % 3)]


def build_grouped() -> nn.Module:
    """A Linear whose output ranges are per group of 4 features of each sample."""
    torch.manual_seed(0)
    return tq.quantize_model(
        nn.Sequential(nn.Linear(8, 8)),
        None,
        lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=-1, group_size=4)),
        method="swap",
    )


def grouped_batch() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(3))


def calib_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(8, 1, 6, 6, generator=g) * (1 + torch.arange(8) % 2).view(8, 1, 1, 1) for _ in range(3)]


def calibrate(model: nn.Module, shards: list[torch.Tensor]) -> None:
    with tq.qmodule_state(model, tq.QModuleState.CALIBRATION), torch.no_grad():
        model.eval()
        for x in shards:
            model(x)


def observer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, o in observers(model) for k, v in o.state_dict().items()}


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of every quantizer (BatchNorm statistics are DDP's business)."""
    return {
        f"{n}.{k}": v.detach().clone()
        for n, q in model.named_modules()
        if isinstance(q, tq.Quantizer)
        for k, v in q.state_dict().items()
    }


def worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        synced, unsynced = build(), build()
        assert sync_observers(synced) == 8
        shards = [x[rank::world] for x in calib_batches()]
        calibrate(synced, shards)
        calibrate(unsynced, shards)
        after_calib = observer_state(synced)
        # Rank 1 gets no samples at all (its shard of a batch may be empty): it still joins every
        # all-reduce and ends with rank 0's ranges. A histogram observer all-reduces three times
        # (min, max, counts); a bfloat16 model all-reduces bfloat16 ranges on both ranks.
        uneven = {"minmax": build(), "histogram": build(tq.PercentileObserver), "bfloat16": build().bfloat16()}
        for kind, model in uneven.items():
            sync_observers(model)
            dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32
            calibrate(model, [(x if rank == 0 else x[:0]).to(dtype) for x in calib_batches()])
        uneven_state = {k: observer_state(m) for k, m in uneven.items()}
        # per-group activation ranges are each sample's own: shards of different sizes are not reduced
        grouped = build_grouped()
        sync_observers(grouped)
        calibrate(grouped, [grouped_batch()[: 4 if rank == 0 else 2]])
        grouped_state = observer_state(grouped)
        # a few QAT steps under DDP: observers keep all-reducing inside the forward
        tq.set_qmodule_state(synced, tq.QModuleState.QUANT_AWARE_TRAIN)
        ddp = nn.parallel.DistributedDataParallel(synced)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        ddp.train()
        for x, y in global_batches() * 2:
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x[rank::world]), y[rank::world]).backward()
            opt.step()
        torch.save(
            {
                "calib": after_calib,
                "unsynced": observer_state(unsynced),
                "qat": quantizer_state(synced),
                "uneven": uneven_state,
                "grouped": grouped_state,
            },
            f"{out}/rank{rank}.pt",
        )
        # DDP's reducer freed while the group is still registered: freed at the process's exit after
        # destroy_process_group, it takes the last reference to the gloo group, whose destructor then waits
        # for its work thread while holding the GIL that thread needs (a hang seen on torch 2.13).
        del ddp, opt
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.start_processes(worker, args=(2, f"file://{tmp}/rendezvous", str(tmp)), nprocs=2, start_method="spawn")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow
def test_ranks_hold_identical_quantizer_state(two_ranks):
    r0, r1 = two_ranks
    for part in ("calib", "qat"):
        assert r0[part].keys() == r1[part].keys()
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part}: {k} differs between ranks"


@pytest.mark.slow
def test_without_sync_ranks_differ(two_ranks):
    r0, r1 = two_ranks
    differing = [
        k for k in r0["unsynced"] if k.endswith("max_val") and not torch.equal(r0["unsynced"][k], r1["unsynced"][k])
    ]
    assert any(k.startswith(("0.", "3.", "6.")) for k in differing)


@pytest.mark.slow
def test_synced_ranks_equal_single_process_on_concatenated_batches(two_ranks):
    single = build()
    calibrate(single, calib_batches())  # the whole batch in one process, no process group
    expected = observer_state(single)
    kinds = {type(o).__name__ for _, o in observers(single)}
    assert {"BatchMinMax", "RunningMinMax", "ExpAvgMinMax"} <= kinds
    got = two_ranks[0]["calib"]
    assert got.keys() == expected.keys()
    for k in expected:
        # Activation ranges come from convolutions run on half the batch per rank, whose float
        # sums may round differently from the full batch's in the last bit.
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["minmax", "histogram", "bfloat16"])
def test_a_rank_with_an_empty_batch_joins_the_all_reduce(two_ranks, kind):
    single = build(tq.PercentileObserver if kind == "histogram" else None)
    dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32
    calibrate(single.to(dtype), [x.to(dtype) for x in calib_batches()])  # what rank 0 saw, in one process
    expected = observer_state(single)
    r0, r1 = (r["uneven"][kind] for r in two_ranks)
    assert r0.keys() == r1.keys() == expected.keys()
    for k in expected:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
        assert torch.equal(r0[k], expected[k]), k


def test_sync_observers_toggles_and_counts():
    model = build()
    assert sync_observers(model, enabled=True) == 8
    assert all(o.distributed_sync and o.process_group is None for _, o in observers(model))
    assert sync_observers(model, enabled=False) == 8
    assert not any(o.distributed_sync for _, o in observers(model))
    assert sync_observers(nn.Linear(2, 2)) == 0
    with pytest.raises(TypeError, match="sync_observers"):
        sync_observers("model")


def test_synced_observer_without_process_group_is_unchanged():
    x = torch.randn(4, 5)
    a, b = tq.RunningMinMax(axis=1), tq.RunningMinMax(axis=1)
    sync_observers(a)
    a.observe_batch(x)
    b.observe_batch(x)
    assert torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val)


@pytest.mark.slow
def test_per_group_ranges_are_each_ranks_own(two_ranks):
    """Rank 0 saw 4 samples and rank 1 the first 2: each holds its samples' ranges (no collective over
    unrelated samples, none over shapes that differ, which hung)."""
    for rank, n in ((0, 4), (1, 2)):
        single = build_grouped()
        calibrate(single, [grouped_batch()[:n]])
        expected = observer_state(single)
        got = two_ranks[rank]["grouped"]
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), (rank, k)
