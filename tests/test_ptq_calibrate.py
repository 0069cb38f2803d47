import sys
import warnings

import pytest
import torch
from torch import nn

import torchquant as tq


def _net():
    return tq.quantize_model(
        nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)),
        lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax()),
        lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()),
        method="swap",
    )


def _acts(net):
    return [m.acts_quantizer.range_observer for _, m in tq.iter_qmodules(net)]


@pytest.mark.parametrize(
    "make_batch",
    [
        lambda x, y: x,
        lambda x, y: (x, y),
        lambda x, y: [x, y],
        lambda x, y: {"input": x, "labels": y},
    ],
    ids=["tensor", "tuple", "list", "dict"],
)
def test_calibrate_records_ranges_for_every_batch_type(make_batch):
    net = _net()
    if isinstance(make_batch(torch.zeros(1), 0), dict):
        inner = net

        class Kw(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = inner

            def forward(self, input):
                return self.net(input)

        net = Kw()
    x = torch.randn(32, 4)
    tq.calibrate(net, [make_batch(x, torch.zeros(32))], progress=False)
    obs = _acts(net)
    assert all(o.initialized for o in obs)


def test_calibrate_runs_in_eval_without_grad_and_restores_modes_and_flags():
    net = _net()
    tq.set_qmodule_state(net, tq.QModuleState.QUANT_EVAL_WEIGHT_ONLY)
    net.train()
    seen = []
    net[0].register_forward_pre_hook(
        lambda m, a: seen.append((torch.is_grad_enabled(), net.training, net[3].training, m.qstate))
    )
    mean_before = net[0].bn.running_mean.clone()
    tq.calibrate(net, [torch.randn(16, 4) + 3, torch.randn(16, 4)], progress=False)
    assert seen == [(False, False, False, tq.QModuleState.CALIBRATION)] * 2
    assert net.training and net[3].training
    assert all(m.qstate is tq.QModuleState.QUANT_EVAL_WEIGHT_ONLY for _, m in tq.iter_qmodules(net))
    assert torch.equal(net[0].bn.running_mean, mean_before)  # eval: BatchNorm statistics untouched


def test_calibrate_num_batches_and_generators():
    net = _net()
    calls = []
    net[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    tq.calibrate(net, (torch.randn(8, 4) for _ in range(10)), num_batches=3, progress=False)
    assert len(calls) == 3


def test_calibrate_weight_only_mode_leaves_act_ranges_empty():
    net = _net()
    tq.calibrate(net, [torch.randn(8, 4)], mode=tq.QModuleState.CALIBRATION_WEIGHT_ONLY, progress=False)
    assert net[0].weight_quantizer.range_observer.initialized
    assert not net[0].acts_quantizer.range_observer.initialized


def test_calibrate_progress_bar_and_fallback_without_tqdm(monkeypatch, capsys):
    net = _net()
    tq.calibrate(net, [torch.randn(8, 4)], progress=True)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails -> no bar
    tq.calibrate(net, [torch.randn(8, 4)], progress=True)
    assert all(o.initialized for o in _acts(net))


def test_calibrate_restores_modes_when_a_batch_fails():
    net = _net()
    with pytest.raises(RuntimeError):
        tq.calibrate(net, [torch.randn(8, 4), torch.randn(8, 5)], progress=False)
    assert all(m.qstate is tq.QModuleState.BYPASSED for _, m in tq.iter_qmodules(net))
    assert net.training


@pytest.mark.parametrize(
    ("model", "data", "kwargs", "err", "match"),
    [
        (nn.Linear(4, 4), [torch.randn(2, 4)], {}, ValueError, "no QModule"),
        (None, [], {}, ValueError, "empty"),
        (None, torch.randn(2, 4), {}, TypeError, "iterable of batches"),
        (None, [torch.randn(2, 4)], {"mode": tq.QModuleState.QUANT_EVAL}, ValueError, "observes nothing"),
        (None, [torch.randn(2, 4)], {"mode": "calibration"}, TypeError, "QModuleState"),
        (None, [torch.randn(2, 4)], {"num_batches": 0}, ValueError, "num_batches"),
        (None, [3], {}, TypeError, "batch must be"),
    ],
    ids=["no-qmodules", "empty-data", "bare-tensor", "non-observing-mode", "mode-string", "zero-batches", "int-batch"],
)
def test_calibrate_bad_input(model, data, kwargs, err, match):
    with pytest.raises(err, match=match):
        tq.calibrate(model if model is not None else _net(), data, progress=False, **kwargs)


class _ReadsWeight(nn.Module):
    """Calls ``a``; passes ``b``'s weight to ``F.linear`` itself, as torchvision's Swin attention does with ``qkv``;
    calls ``c`` only for inputs with more than 4 rows."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        x = nn.functional.linear(self.a(x), self.b.weight, self.b.bias)
        return self.c(x) if x.shape[0] > 4 else x


class _MatmulReader(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _ReadsWeight()
        self.d = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x) @ self.d.weight.t()  # not F.linear: nothing to redirect


def test_uncalled_warning_names_the_reader_to_redirect_and_only_for_linear_reads():
    af = lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax())  # noqa: E731
    net = tq.quantize_model(_MatmulReader(), None, af, method="swap")
    with pytest.warns(tq.UncalledQModulesWarning) as caught:
        tq.calibrate(net, [torch.randn(2, 4)], progress=False)
    (message,) = [str(w.message) for w in caught]
    assert "inner.b, d (the model reads" in message
    assert "register_weight_reader(_ReadsWeight) before quantize_model sends the F.linear reads of inner" in message
    tq.graph.readers.redirect_weight_reads(net.inner)
    with pytest.warns(tq.UncalledQModulesWarning) as caught:
        tq.calibrate(net, [torch.randn(2, 4)], progress=False)
    (message,) = [str(w.message) for w in caught]
    assert "inner.b" not in message and "d (the model reads" in message and "register_weight_reader" not in message
    assert net.inner.b.acts_quantizer.range_observer.initialized


def test_calibrate_warns_about_qmodules_the_forward_pass_never_called():
    net = tq.quantize_model(_ReadsWeight(), None, lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()), method="swap")
    with pytest.warns(tq.UncalledQModulesWarning) as caught:
        tq.calibrate(net, [torch.randn(2, 4)], progress=False)
    (message,) = [str(w.message) for w in caught]
    # b's weight is read directly (float), c is on a branch the batch did not take
    assert message.startswith("calibrate: 2 QModule(s) were never called by the forward pass: b (the model reads")
    assert "in float; tq.graph.readers.register_weight_reader(_ReadsWeight) before quantize_model sends" in message
    assert "to the wrappers); c (not reached: a branch" in message
    assert not net.b.acts_quantizer.range_observer.initialized
    assert not any(isinstance(m, tq.QModule) and m._forward_pre_hooks for m in net.modules())  # hooks removed
    with warnings.catch_warnings():
        warnings.simplefilter("error", tq.UncalledQModulesWarning)
        tq.calibrate(_net(), [torch.randn(8, 4)], progress=False)  # every QModule called: no warning


class _TiedUnused(nn.Module):
    """T5's shape: ``shared`` holds the embedding that ``embed`` (tied) is called with; ``shared`` is never called."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(10, 4)
        self.embed = nn.Embedding(10, 4)
        self.embed.weight = self.shared.weight

    def forward(self, ids):
        return self.embed(ids)


def test_an_uncalled_wrapper_whose_weight_a_called_one_quantizes_is_not_said_to_compute_in_float():
    wf = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))  # noqa: E731
    net = tq.quantize_model(_TiedUnused(), wf, lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()), method="swap")
    with pytest.warns(tq.UncalledQModulesWarning) as caught:
        tq.calibrate(net, [torch.randint(0, 10, (2, 5))], progress=False)
    (message,) = [str(w.message) for w in caught]
    assert "shared (not reached" in message and "computes in float" not in message


def test_calibrate_reads_the_data_one_batch_at_a_time():
    """A loader is not loaded whole into memory: each batch is used and dropped (the first is kept, for the
    check of layers the forward never called)."""
    import gc
    import weakref

    net = tq.quantize_model(
        nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
        None,
        lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()),
        method="swap",
    )
    alive = []

    def loader():
        for _ in range(4):
            batch = torch.randn(8, 4)
            yield batch
            gc.collect()
            alive.append(sum(r() is not None for r in refs))
            refs.append(weakref.ref(batch))

    refs: list = []
    tq.calibrate(net, loader(), progress=False)
    assert alive == [0, 1, 1, 1]  # only the first batch outlives its step
    assert net[0].acts_quantizer.range_observer.initialized
    with pytest.raises(ValueError, match="calibrate: the calibration data is empty"):
        tq.calibrate(net, iter([]), progress=False)


def test_calibrate_reads_no_batch_beyond_num_batches_and_takes_unsized_loaders():
    from torch.utils.data import DataLoader, IterableDataset

    net = tq.quantize_model(
        nn.Sequential(nn.Linear(4, 4)), None, lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()), method="swap"
    )
    pulled = []

    def gen():
        for i in range(6):
            pulled.append(i)
            yield torch.randn(2, 4)

    tq.calibrate(net, gen(), num_batches=3, progress=False)
    assert pulled == [0, 1, 2]

    class Stream(IterableDataset):  # no __len__: len(DataLoader(...)) raises TypeError
        def __iter__(self):
            yield from (torch.randn(4) for _ in range(8))

    tq.calibrate(net, DataLoader(Stream(), batch_size=2), progress=False)
    assert len(tq.ptq._common.materialize(DataLoader(Stream(), batch_size=2), 2, "gptq")) == 2
