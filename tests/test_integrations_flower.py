"""torchquant.integrations.flower: the update codec, byte counting, observer merging and a small federation."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.distributed import merge_ranges, observers

flower = pytest.importorskip("torchquant.integrations.flower", exc_type=ImportError)

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- codec
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 12])
def test_pack_bits_round_trip_and_size(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (37,), generator=g)
    packed = flower.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(37 * bits / 8)
    assert torch.equal(flower.unpack_bits(packed, bits, 37), codes)


def test_pack_bits_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match=r"pack_bits: codes must lie in \[0, 4\)"):
        flower.pack_bits(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="bits must be an int in"):
        flower.pack_bits(torch.tensor([0]), 0)


def test_unpack_bits_takes_exactly_the_bytes_pack_bits_makes():
    codes = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="40 bytes, where n=40 codes of 4 bits take 20"):
        flower.unpack_bits(flower.pack_bits(codes, 8), 4, 40)  # int8 codes read as int4
    arrays = flower.encode_update({"w": torch.randn(4, 10)}, "int8")
    with pytest.raises(ValueError, match="update 'w' do not fit"):
        flower.decode_update(arrays, {"w": (4, 10)}, "int4")


def _step(x: torch.Tensor, bits: int, group: int | None, symmetric: bool) -> torch.Tensor:
    """The grid step of every element of ``x`` viewed as (rows, cols), by hand: one range per row or group."""
    m = x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)
    rows, cols = m.shape
    if group is not None:
        m = torch.cat([m, m.new_zeros(rows, (-cols) % group)], dim=1).reshape(rows, -1, group)
    else:
        m = m.reshape(rows, 1, cols)
    lo, hi = m.amin(dim=2, keepdim=True).clamp(max=0), m.amax(dim=2, keepdim=True).clamp(min=0)
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    step = ((hi - lo) / (2**bits - 1)).expand_as(m).reshape(rows, -1)[:, :cols]
    return step.reshape(x.shape)


CODEC_CASES = [
    ("int8", 8, None, True),
    ("int4", 4, None, True),
    ("int2", 2, None, True),
    ("int4-g16", 4, 16, True),
    ("int8-asym", 8, None, False),
    ("int3-g8-asym", 3, 8, False),
]
SHAPES = {"conv": (6, 4, 3, 3), "linear-padded": (5, 37), "bias": (7,), "scalar": ()}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize(("spec", "bits", "group", "symmetric"), CODEC_CASES, ids=[c[0] for c in CODEC_CASES])
def test_nearest_round_trip_is_within_half_a_step_and_matches_the_quantizer(spec, bits, group, symmetric, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    arrays = flower.encode_update({"w": x}, spec)
    y = flower.decode_update(arrays, {"w": x.shape}, spec)["w"]
    assert y.shape == x.shape and y.dtype == torch.float32
    step = _step(x, bits, group, symmetric)
    assert ((y - x).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()  # up to float rounding
    # the same values as the registered quantizer's own fake quantization of the (rows, cols) view
    q = flower.update_spec(spec).build()
    m = flower._as_rows(x, q.granularity)
    q.pre_observe(m)
    expected = q(m)[:, : (x.numel() // (x.shape[0] if x.dim() >= 2 else 1))].reshape(x.shape)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


def test_encoded_arrays_are_codes_scales_and_zero_points_of_exact_size():
    x = torch.randn(16, 40)
    a = flower.encode_update({"w": x}, "int8")
    assert {k: (v.dtype, v.shape) for k, v in a.items()} == {
        "w/codes": (np.uint8, (640,)),
        "w/scale": (np.float32, (16,)),
        "w/zero_point": (np.uint8, (1,)),  # symmetric: one zero point
    }
    b = flower.encode_update({"w": torch.randn(10, 12)}, "int2-g8-asym")  # 12 columns padded to 16
    assert b["w/codes"].nbytes == 10 * 16 * 2 // 8 and b["w/scale"].shape == (20,)
    assert b["w/zero_point"].shape in ((1,), (20,))
    c = flower.encode_update({"w": x}, None)
    assert c["w"].dtype == np.float32 and c["w"].nbytes == 4 * x.numel()


SPEC_DICTS = {
    "affine-per-tensor-asym": {"quantizer": "affine", "observer": "batch_minmax", "args": {"n_bits": 6}},
    "lsq-per-row": {"quantizer": "lsq", "args": {"n_bits": 4, "axis": 0}},
    "qfmt-per-tensor": {"quantizer": "qfmt", "observer": "batch_minmax", "args": {"n_bits": 8, "signed": True}},
}


@pytest.mark.parametrize("spec", list(SPEC_DICTS.values()), ids=list(SPEC_DICTS))
def test_any_affine_quantizer_spec_round_trips_to_its_own_fake_quantization(spec):
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(4))
    y = flower.decode_update(flower.encode_update({"w": x}, spec), {"w": x.shape}, spec)["w"]
    q = flower.update_spec(spec).build()
    q.pre_observe(x)
    torch.testing.assert_close(y, q(x).detach(), rtol=0, atol=1e-6)


def test_zero_and_empty_updates_decode_to_zero():
    x, e = torch.zeros(3, 5), torch.empty(0)
    arrays = flower.encode_update({"w": x, "e": e}, "int4")
    assert not any(k.startswith("e/") for k in arrays)  # nothing sent for an empty tensor
    y = flower.decode_update(arrays, {"w": x.shape, "e": e.shape}, "int4")
    assert torch.equal(y["w"], x) and y["e"].shape == (0,)


def test_decoding_arrays_of_another_shape_names_the_tensor():
    arrays = flower.encode_update({"w": torch.randn(4, 8)}, "int8")
    with pytest.raises(ValueError, match=r"update 'w' do not fit its shape \(5, 8\)"):
        flower.decode_update(arrays, {"w": (5, 8)}, "int8")
    with pytest.raises(KeyError, match="w/codes"):
        flower.decode_update({}, {"w": (4, 8)}, "int8")


def test_stochastic_rounding_primitive_is_unbiased_floor_or_ceil():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-3.0, 3.0, 25)
    draws = torch.stack([flower.stochastic_round(x, g) for _ in range(4000)])
    assert ((draws == x.floor()) | (draws == x.ceil())).all()
    # each draw is Bernoulli(frac) around floor(x): std <= 1/2, so the mean's std <= 1 / (2 sqrt(4000))
    assert (draws.mean(0) - x).abs().max() <= 5 / (2 * math.sqrt(4000))


def test_stochastic_updates_are_unbiased_where_nearest_is_not():
    # Every row's range is fixed by its first two entries (-7 and +7 steps of 1 at 4 bits asymmetric
    # after widening to include 0: [-7, 8], step 1); the other entries sit 0.3 steps off the grid.
    rows = 4
    fixed = torch.tensor([-7.0, 8.0]).repeat(rows, 1)
    probe = torch.arange(-6.0, 7.0).repeat(rows, 1) + 0.3
    x = torch.cat([fixed, probe], dim=1)  # (4, 15)
    spec, n = "int4-asym", 2000
    g = torch.Generator().manual_seed(1)
    mean = torch.zeros_like(x)
    for _ in range(n):
        a = flower.encode_update({"w": x}, spec, rounding="stochastic", generator=g)
        y = flower.decode_update(a, {"w": x.shape}, spec)["w"]
        assert ((y - x).abs() < 1.0 + 1e-6).all()  # floor or ceil on the grid
        mean += y / n
    nearest = flower.decode_update(flower.encode_update({"w": x}, spec), {"w": x.shape}, spec)["w"]
    tol = 5 * 1.0 / (2 * math.sqrt(n))  # 5 standard deviations of the mean at step 1
    assert (mean - x).abs().max() <= tol
    assert (nearest - x)[:, 2:].abs().min() >= 0.3 - 1e-5 > tol  # nearest: biased by 0.3 steps everywhere


def test_update_spec_errors_name_the_spec():
    with pytest.raises(ValueError, match=r"'nf4'.*no affine grid"):
        flower.update_spec("nf4")
    with pytest.raises(ValueError, match="'nope'"):
        flower.update_spec("nope")
    assert flower.update_spec("float32") is None and flower.update_spec(None) is None
    with pytest.raises(ValueError, match="rounding must be one of"):
        flower.FederatedConfig(rounding="up")
    with pytest.raises(ValueError, match="local_epochs must be a positive int, got 0"):
        flower.FederatedConfig(local_epochs=0)
    with pytest.raises(ValueError, match="'int32': codes of 32 bits"):
        flower.FederatedConfig(update="int32")
    with pytest.raises(ValueError, match=r"'mse'.*MSEObserver.*use batch_minmax"):
        flower.FederatedConfig(update={"quantizer": "affine", "observer": "mse", "args": {"n_bits": 8}})
    with pytest.raises(ValueError, match=r"'pact'.*PACTQuantizer's grid misses values of \[-1, 1\]"):
        flower.FederatedConfig(update={"quantizer": "pact", "args": {"n_bits": 8}})  # unsigned: drops negatives


def test_payload_bytes_is_the_sum_of_array_nbytes():
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    arrays = flower.encode_update({"a": torch.randn(6, 9), "b": torch.randn(5)}, "int4-g4")
    rec = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    content = RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": 3})})
    expected = sum(v.nbytes for v in arrays.values())
    assert flower.payload_bytes(rec) == flower.payload_bytes(content) == expected
    assert expected == sum(a.numpy().nbytes for a in rec.values())
    # the serialised arrays carry .npy headers on top: payload_bytes counts what the arrays hold
    assert sum(len(a.data) for a in rec.values()) > expected


# ------------------------------------------------------------------- observers
def test_merge_ranges_is_min_of_mins_and_max_of_maxes_with_non_finite_widened():
    lo, hi = merge_ranges(
        [torch.tensor([0.0, -1.0]), torch.tensor([-2.0, float("nan")])],
        [torch.tensor([1.0, 5.0]), torch.tensor([3.0, 2.0])],
    )
    assert lo.tolist() == [-2.0, -math.inf] and hi.tolist() == [3.0, 5.0]
    with pytest.raises(ValueError, match="same shape"):
        merge_ranges([torch.zeros(2), torch.zeros(3)], [torch.zeros(2), torch.zeros(3)])


def _shards(n: int = 3):
    g = torch.Generator().manual_seed(5)
    return [[torch.randn(4, 6, generator=g) * (1 + c) for _ in range(n)] for c in range(2)]


@pytest.mark.parametrize("kind", ["running", "batch"])
def test_merged_observers_equal_one_process_on_all_batches(kind):
    """What sync_observers gives across ranks (tests/test_distributed.py: one process on the concatenated batches)."""
    make = {"running": lambda: tq.RunningMinMax(axis=1), "batch": lambda: tq.BatchMinMax(axis=1)}[kind]
    shards = _shards()
    clients = []
    for shard in shards:
        m = nn.Module()
        m.obs = make()
        for x in shard:
            m.obs.observe_batch(x)
        clients.append(flower.observer_state(m))
    server = nn.Module()
    server.obs = make()
    assert flower.merge_observer_states(server, clients) == 1
    single = make()
    batches = [torch.cat([a, b]) for a, b in zip(*shards)]  # step i: both clients' batch i
    for x in batches:
        single.observe_batch(x)
    assert torch.equal(server.obs.min_val, single.min_val) and torch.equal(server.obs.max_val, single.max_val)


def test_merged_ema_observer_keeps_counting_from_the_largest_count():
    states = []
    for i, n in enumerate((2, 5)):
        m = nn.Module()
        m.obs = tq.ExpAvgMinMax()
        for _ in range(n):
            m.obs.observe_batch(torch.randn(8) * (i + 1))
        states.append(flower.observer_state(m))
    server = nn.Module()
    server.obs = tq.ExpAvgMinMax()
    flower.merge_observer_states(server, states)
    lo, hi = merge_ranges([s["obs/min_val"] for s in states], [s["obs/max_val"] for s in states])
    assert int(server.obs.num_batches) == 5
    torch.testing.assert_close(server.obs.get_ranges(), (lo, hi))
    torch.testing.assert_close(server.obs.ema_min, lo * (1 - 0.9**5))


class _Observed(nn.Module):
    """Two observers fed by the forward: the two rules sync_observers covers exactly."""

    def __init__(self):
        super().__init__()
        self.running = tq.RunningMinMax(axis=1)
        self.batch = tq.BatchMinMax(axis=1)

    def forward(self, x):
        self.running.observe_batch(x)
        self.batch.observe_batch(x)
        return x


def _sync_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        synced, local = _Observed(), _Observed()
        tq.distributed.sync_observers(synced)
        for x in _shards()[rank]:
            synced(x)
            local(x)
        torch.save(
            {"synced": flower.observer_state(synced), "local": flower.observer_state(local)}, f"{out}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_merging_client_observers_equals_sync_observers_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(
        _sync_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    server = _Observed()
    assert flower.merge_observer_states(server, [r["local"] for r in ranks]) == 2
    merged = flower.observer_state(server)
    assert merged.keys() == ranks[0]["synced"].keys()
    for k, v in ranks[0]["synced"].items():
        assert torch.equal(merged[k], v), k
        assert torch.equal(ranks[1]["synced"][k], v), k


def test_histogram_observers_are_refused_by_name():
    m = nn.Module()
    m.act = tq.PercentileObserver(99.9)
    with pytest.raises(TypeError, match="observer 'act' is a PercentileObserver"):
        flower.observer_state(m)


# ------------------------------------------------------------------ federation
N_FEATURES, N_CLASSES = 8, 4


def model_fn() -> nn.Module:
    net = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU(), nn.Linear(16, N_CLASSES))

    def weights(module, name):  # LSQ on the last layer: a learned step averaged like a weight
        if name == "2":
            return tq.LSQQuantizer(8, axis=0)
        return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)

    return tq.quantize_model(net, weights, lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax()), method="swap")


CENTERS = torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(0)) * 2


def blobs(seed: int, n: int, classes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    x = CENTERS[y] + torch.randn(n, N_FEATURES, generator=g)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def data_fn(partition: int, partitions: int):
    classes = [[0, 1, 2], [1, 2, 3], [2, 3, 0]][partition]  # non-IID: three classes per client
    return blobs(10 + partition, 64, classes), blobs(20 + partition, 32, classes)


class RecordingGrid(flower.InProcessGrid):
    """Keeps every reply, to count its arrays independently of the strategy."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replies = []

    def pull_messages(self, message_ids):
        out = super().pull_messages(message_ids)
        self.replies.extend(out)
        return out


def federate(update, rounds: int = 2, clients: int = 3):
    from flwr.app import Context, RecordDict

    config = flower.FederatedConfig(update=update, lr=0.05, local_epochs=1)
    test = blobs(99, 96, [0, 1, 2, 3])
    server = flower.server_app(model_fn, config, num_rounds=rounds, test_data=test, fraction_evaluate=1.0)
    grid = RecordingGrid(flower.client_app(model_fn, data_fn, config), clients)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with flower._server_task(1, 30):
        server(grid, ctx)
    fed = flower.Federation(ctx, list(grid.contexts.values()), grid.wire_bytes_down, grid.wire_bytes_up)
    return fed, grid


def _quantizer_keys(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, tq.Quantizer)]
    return [k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)]


@pytest.fixture(scope="module")
def int8_run():
    return federate("int8")


def test_federation_improves_accuracy(int8_run):
    fed, _ = int8_run
    h = flower.history(fed)
    assert len(h["accuracy"]) == 3 and len(h["bytes-up"]) == 2
    assert h["accuracy"][-1] >= h["accuracy"][0] + 0.2, h["accuracy"]


def test_all_clients_end_with_the_servers_quantizer_state(int8_run):
    fed, _ = int8_run
    keys = _quantizer_keys(model_fn())
    assert any(k.endswith("range_observer.min_val") for k in keys) and any(k.endswith(".step") for k in keys)
    final = fed.server.state["torchquant.global"]
    for ctx in fed.clients:
        state = ctx.state["torchquant.model"]
        for k in keys:
            assert np.array_equal(state[k].numpy(), final[k].numpy()), k
    # ... and every observer has ranges: the grid is defined and shared
    model = model_fn()
    model.load_state_dict({k: torch.from_numpy(a.numpy()) for k, a in final.items()})
    assert all(o.initialized for _, o in observers(model))


def test_bytes_up_are_the_arrays_of_the_train_replies(int8_run):
    fed, grid = int8_run
    train = [m for m in grid.replies if m.metadata.message_type == "train"]
    calib = [m for m in grid.replies if m.metadata.message_type == flower.CALIBRATE]
    h = flower.history(fed)
    assert len(train) == 6 and len(calib) == 3
    counted = sum(a.numpy().nbytes for m in train for r in m.content.array_records.values() for a in r.values())
    assert sum(h["bytes-up"]) == counted
    assert h["bytes-calibration"] == [
        sum(a.numpy().nbytes for m in calib for r in m.content.array_records.values() for a in r.values())
    ]


def test_float_updates_cost_four_bytes_per_parameter_and_int8_far_less(int8_run):
    fed_float, _ = federate(None, rounds=1)
    model = model_fn()
    tq.calibrate(model, [x for x, _ in data_fn(0, 3)[0]], progress=False)
    n_params = sum(p.numel() for p in model.parameters())
    obs = sum(8 * o.min_val.numel() + (8 if hasattr(o, "num_batches") else 0) for _, o in observers(model))
    assert flower.history(fed_float)["bytes-up"] == [3 * (4 * n_params + obs)]
    int8 = flower.history(int8_run[0])["bytes-up"][0] - 3 * obs
    assert int8 < 0.4 * 3 * 4 * n_params  # codes, one scale per row, one zero point


def test_run_federation_and_stochastic_rounding_run_end_to_end():
    config = flower.FederatedConfig(update="int4-g8", rounding="stochastic", lr=0.05)
    fed = flower.run_federation(
        flower.server_app(model_fn, config, num_rounds=1, test_data=blobs(99, 64, [0, 1, 2, 3])),
        flower.client_app(model_fn, data_fn, config),
        num_clients=2,
    )
    h = flower.history(fed)
    assert len(h["bytes-up"]) == 1 and fed.wire_bytes_up > h["bytes-up"][0] + h["bytes-calibration"][0]
    assert all(math.isfinite(a) for a in h["loss"])


def test_client_app_needs_partition_config():
    from flwr.app import Context, RecordDict

    grid = flower.InProcessGrid(flower.client_app(model_fn, data_fn), 1)
    grid.contexts[1001] = Context(run_id=1, node_id=1001, node_config={}, state=RecordDict(), run_config={})
    app = flower.server_app(model_fn, num_rounds=1, min_nodes=1)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(KeyError, match="partition-id"), flower._server_task(1, 30):
        app(grid, ctx)


def test_server_refuses_updates_in_another_format_than_it_decodes():
    from flwr.app import Context, RecordDict

    server = flower.server_app(model_fn, flower.FederatedConfig(update="int4"), num_rounds=1)
    grid = flower.InProcessGrid(flower.client_app(model_fn, data_fn, flower.FederatedConfig(update="int8")), 2)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with (
        pytest.raises(ValueError, match=r"node 1001 sent its update as .*\"n_bits\": 8.*this server decodes .*4"),
        flower._server_task(1, 30),
    ):
        server(grid, ctx)


def test_too_few_clients_for_min_nodes_fail_at_once():
    config = flower.FederatedConfig()
    with pytest.raises(ValueError, match=r"min_nodes=2 nodes .* has 1"):
        flower.run_federation(
            flower.server_app(model_fn, config, num_rounds=1), flower.client_app(model_fn, data_fn, config), 1
        )


def test_a_client_without_data_is_left_out_of_the_merges_and_the_callers_rng_is_kept():
    def with_empty(partition, partitions):
        return ([], []) if partition == 2 else data_fn(partition, partitions)

    config = flower.FederatedConfig(update="int8")
    torch.manual_seed(0)
    strategy = flower.QuantizedFedAvg(model_fn(), config, min_available_nodes=3)
    initial = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    with flower._server_task(1, 30):
        assert strategy.calibrate(flower.InProcessGrid(flower.client_app(model_fn, with_empty, config), 3))
    states, steps = [], []
    for p in (0, 1):  # what the two clients with data calibrate
        m = model_fn()
        m.load_state_dict(initial)
        flower._calibrate(m, data_fn(p, 3)[0], config.calibration_batches)
        states.append(flower.observer_state(m))
        steps.append(m.state_dict()["2.weight_quantizer.step"])
    expected = model_fn()
    expected.load_state_dict(initial)
    flower.merge_observer_states(expected, states)
    for (name, got), (_, want) in zip(observers(strategy.model), observers(expected)):
        assert torch.equal(got.min_val, want.min_val) and torch.equal(got.max_val, want.max_val), name
    torch.testing.assert_close(strategy.model.state_dict()["2.weight_quantizer.step"], (steps[0] + steps[1]) / 2)

    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    fed = flower.run_federation(
        flower.server_app(model_fn, config, num_rounds=1), flower.client_app(model_fn, with_empty, config), 3
    )
    assert torch.equal(torch.rand(3), expected_draw)  # the apps seed their own random state
    assert len(flower.history(fed)["bytes-up"]) == 1


def test_tied_weights_travel_once_and_weight_ranges_fit_the_averaged_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(N_FEATURES, N_FEATURES)
            self.b = nn.Linear(N_FEATURES, N_FEATURES)
            self.b.weight = self.a.weight
            self.out = nn.Linear(N_FEATURES, N_CLASSES)

        def forward(self, x):
            return self.out(torch.relu(self.b(torch.relu(self.a(x)))))

    def tied_fn():
        torch.manual_seed(0)
        w = lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=True)  # noqa: E731
        return tq.quantize_model(Tied(), w, lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()), method="swap")

    config = flower.FederatedConfig(update="int8")
    server = flower.server_app(tied_fn, config, num_rounds=2)
    grid = RecordingGrid(flower.client_app(tied_fn, data_fn, config), 2)
    from flwr.app import Context, RecordDict

    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with flower._server_task(1, 30):
        server(grid, ctx)
    train = [m for m in grid.replies if m.metadata.message_type == "train"]
    keys = set(train[0].content["arrays"].keys())
    assert "delta/a.layer.weight/codes" in keys and not any(k.startswith("delta/b.layer.weight") for k in keys)
    final = tied_fn()
    final.load_state_dict({k: torch.from_numpy(a.numpy()) for k, a in ctx.state["torchquant.global"].items()})
    start = tied_fn()
    assert not torch.equal(final.a.layer.weight, start.a.layer.weight)
    for layer in (final.a, final.b, final.out):  # per-row ranges of the global weights, not the clients' union
        obs = layer.weight_quantizer.range_observer
        w = layer.layer.weight.detach()
        assert torch.equal(obs.min_val.flatten(), w.amin(1)) and torch.equal(obs.max_val.flatten(), w.amax(1))


def test_a_stock_strategy_is_refused_by_the_client():
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    app = ServerApp()

    @app.main()
    def main(grid, context):
        model = model_fn()
        tq.calibrate(model, [x for x, _ in data_fn(0, 3)[0]], progress=False)
        FedAvg(min_available_nodes=2, min_train_nodes=2, fraction_evaluate=0.0).start(
            grid, initial_arrays=flower._record(model.state_dict()), num_rounds=2
        )

    with pytest.raises(ValueError, match="must aggregate them with QuantizedFedAvg"):
        flower.run_federation(app, flower.client_app(model_fn, data_fn, flower.FederatedConfig()), num_clients=2)


# ------------------------------------------------------- Flower's deployment engine
DEPLOYED_APP = """
import json
import os

from flwr.serverapp import ServerApp

import test_integrations_flower as t
from torchquant.integrations import flower

config = flower.FederatedConfig(update="int4", lr=0.05)
client = flower.client_app(t.model_fn, t.data_fn, config)
_server = flower.server_app(t.model_fn, config, num_rounds=2, test_data=t.blobs(99, 96, [0, 1, 2, 3]))
server = ServerApp()


@server.main()
def main(grid, context):
    _server(grid, context)
    history = {k: list(v) for k, v in context.state["torchquant.history"].items()}
    with open(os.environ["TQ_FLOWER_OUT"], "w") as f:
        json.dump(history, f)
"""

DEPLOYED_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tqflowertest"
version = "1.0.0"
description = "torchquant's Flower apps under the deployment engine"
license = "MIT"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "torchquant"

[tool.flwr.app.components]
serverapp = "tqapp:server"
clientapp = "tqapp:client"

[tool.flwr.app.config]
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, seconds: float) -> None:
    import socket
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


@pytest.mark.slow
def test_the_apps_run_on_flowers_deployment_engine(tmp_path):
    """A SuperLink and two SuperNodes on loopback, started here, and `flwr run`: the same apps, Flower's runtime."""
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    if not all((bin_dir / c).exists() for c in ("flwr", "flower-superlink", "flower-supernode")):
        pytest.skip("Flower's commands are not installed next to this Python")
    app, home = tmp_path / "app", tmp_path / "home"
    app.mkdir()
    home.mkdir()
    (app / "pyproject.toml").write_text(DEPLOYED_PYPROJECT)
    (app / "tqapp.py").write_text(DEPLOYED_APP)
    link = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    here = Path(__file__).resolve().parent
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",  # no network beyond loopback
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]),
        "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),  # they start flower-superexec
        "TQ_FLOWER_OUT": str(tmp_path / "history.json"),
    }
    procs = []

    def start(command: str, *args: str) -> None:
        log = open(tmp_path / f"{command}-{len(procs)}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [str(bin_dir / command), *args],
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    try:
        start("flower-superlink", "--insecure", "--port", str(link), "--database", ":flwr-in-memory:")
        _wait_for_port(link, 60)
        for i in range(2):
            start(
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link}",
                "--port",
                str(_free_port()),
                "--node-config",
                f"partition-id={i} num-partitions=2",
            )
        run = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(app), "local", "--stream"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=480,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        history = json.loads((tmp_path / "history.json").read_text())
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)  # the process and what it started in its session
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert len(history["bytes-up"]) == 2 and history["bytes-calibration"][0] > 0
    assert history["accuracy"][-1] > history["accuracy"][0]
