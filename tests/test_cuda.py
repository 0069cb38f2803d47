"""The CUDA path: every quantizer and observer, whole models, compile, AMP, PTQ, export and debugging on a GPU.

Each test compares the GPU against the CPU on the same inputs (or runs the GPU path and
checks its contract). The module is skipped where no GPU exists, as on CI; run it on a
machine with one (``pytest tests/test_cuda.py``). Float32 matrix units (TF32) are turned
off here so that the two devices differ only by the order of float sums.

``TORCHQUANT_TEST_GPU=cpu pytest tests/test_cuda.py`` runs the same tests with the CPU in
the GPU's place: a dry run of the tests' own logic on a machine without a GPU (``make test``
runs it after the suite).
"""

from __future__ import annotations

import contextlib
import copy
import operator
import os

import pytest
import torch
from test_registry_contract import CASES
from torch import nn

import torchquant as tq

CUDA = torch.device(os.environ.get("TORCHQUANT_TEST_GPU", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

S = tq.QModuleState


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.detach().double().cpu(), x.detach().double().cpu()
    noise = (ref - x).square().sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.square().sum() / noise))


# ------------------------------------------------------------------ quantizers and observers

# Every example of every registered quantizer, in each of its roles (observers are checked below).
QUANTIZER_CASES = [pytest.param(c, id=c.id) for c in CASES if c.kind == "quantizer"]


@pytest.mark.parametrize("case", QUANTIZER_CASES)
def test_every_quantizer_matches_the_cpu_forward_and_backward(case):
    """Observe, quantize and differentiate the same tensor on both devices: same values, same gradients."""
    torch.manual_seed(0)
    x = case.tensor()  # the registry contract's tensor for the role, a shape every example fits
    q_cpu = case.build()
    q_cpu.train()
    q_cpu.pre_observe(x)  # lazy parameters (LSQ, PACT) are created here
    q_gpu = copy.deepcopy(q_cpu).to(CUDA)
    outs = []
    for q, dev in ((q_cpu, "cpu"), (q_gpu, CUDA)):
        xi = x.to(dev, copy=True).requires_grad_()
        y = q(xi)
        q.post_observe(xi)
        y.backward(torch.linspace(-1, 1, y.numel(), device=dev).view_as(y))
        outs.append((y, xi.grad, [p.grad for p in q.parameters()], q.state_dict()))
    (y_c, g_c, pg_c, sd_c), (y_g, g_g, pg_g, sd_g) = outs
    assert y_g.device.type == CUDA.type
    torch.testing.assert_close(y_g.cpu(), y_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_g.cpu(), g_c, rtol=1e-5, atol=1e-6)
    for a, b in zip(pg_g, pg_c, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-6)
    assert sd_g.keys() == sd_c.keys()
    for k in sd_c:
        torch.testing.assert_close(sd_g[k].cpu(), sd_c[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("observer", tq.list_observers())
@pytest.mark.parametrize("axis", [None, 1])
def test_every_observer_finds_the_cpu_range(observer, axis):
    """Ranges over three batches agree with the CPU's (histogram observers within a bin)."""
    kw = {} if axis is None else {"axis": axis}
    if observer in ("mse", "entropy"):
        kw["n_bits"] = 8
    obs_cpu = tq.make_observer(observer, **kw)
    obs_gpu = copy.deepcopy(obs_cpu).to(CUDA)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(16, 8, 10, 10, generator=g) * (1 + i) for i in range(3)]
    for x in batches:
        obs_cpu.observe_batch(x)
        obs_gpu.observe_batch(x.to(CUDA))
    lo_c, hi_c = obs_cpu.get_ranges()
    lo_g, hi_g = (r.cpu() for r in obs_gpu.get_ranges())
    tol = (hi_c - lo_c).abs().max().item() * (2e-3 if isinstance(obs_cpu, tq.HistogramRangeObserver) else 1e-6)
    torch.testing.assert_close(lo_g, lo_c, rtol=0, atol=tol)
    torch.testing.assert_close(hi_g, hi_c, rtol=0, atol=tol)


def test_functional_primitives_are_bit_exact_on_cuda():
    x = torch.randn(4096) * 4
    for fn in (
        lambda t: tq.affine_quantize(
            t, torch.tensor(0.037, device=t.device), torch.tensor(131.0, device=t.device), 256
        ),
        lambda t: tq.affine_quantize(t, 0.25, 3, 16),
        lambda t: tq.qfmt_quantize(t, 2.0**-3, -128, 127),
        lambda t: tq.quantizers_functional.minifloat_quantize(t, 1.0, 3, 7, 448.0),
        lambda t: tq.quantizers_functional.mx_quantize(t.view(128, 32), 1, 1, 6.0, 2),
    ):
        assert torch.equal(fn(x.to(CUDA)).cpu(), fn(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_quantize_as_float32_on_cuda(dtype):
    x = torch.randn(64, 64, device=CUDA).to(dtype)
    q = tq.AffineQuantizer(8, tq.BatchMinMax()).to(CUDA)
    q.pre_observe(x.float())
    y = q(x)
    assert y.dtype == dtype
    assert torch.equal(y, q(x.float()).to(dtype))


# ------------------------------------------------------------------ whole models


def _w8(m, n):
    return tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)


def _a8(m, n):
    return tq.AffineQuantizer(8, tq.ExpAvgMinMax())


def _resnet18():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return tv.models.resnet18(num_classes=10).eval()


def _calibrated(model, x):
    tq.calibrate(model, [x], progress=False)
    return model


@pytest.mark.parametrize("converter", ["fx", "FusedResNet"])
def test_resnet18_calibrated_qat_and_eval_on_cuda_match_the_cpu(converter):
    net = _resnet18()
    if converter == "fx":
        q = tq.quantize_model(net, _w8, _a8)
    else:
        from torchquant.models import FusedResNet

        q = FusedResNet(net, _w8, _a8)
    x = torch.randn(4, 3, 64, 64)
    _calibrated(q, x)
    q_gpu = copy.deepcopy(q).to(CUDA)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    tq.set_qmodule_state(q_gpu, S.QUANT_EVAL)
    with torch.no_grad():
        y_c, y_g = q(x), q_gpu(x.to(CUDA))
    # Conv sums differ in order between devices, so a few activations round to the other code.
    assert sqnr_db(y_c, y_g) > 30
    tq.set_qmodule_state(q_gpu, S.QUANT_AWARE_TRAIN)
    q_gpu.train()
    opt = torch.optim.SGD(q_gpu.parameters(), lr=1e-3)
    for _ in range(2):
        loss = nn.functional.cross_entropy(q_gpu(x.to(CUDA)), torch.arange(4, device=CUDA))
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in q_gpu.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        opt.step()
    assert all(t.device.type == CUDA.type for t in [*q_gpu.parameters(), *q_gpu.buffers()])


@pytest.mark.slow
def test_every_quantizer_under_inductor_on_cuda_matches_eager():
    """One fullgraph inductor compile (Triton kernels on a GPU) of every registry case, against eager."""
    cases = [p.values[0] for p in QUANTIZER_CASES if p.values[0].example.weight_shape is None]
    qs = nn.ModuleList(c.build() for c in cases).to(CUDA)
    x = torch.randn(4, 24, 6, 6, device=CUDA)  # 24 channels: every example's group size divides them
    for q in qs:
        q.pre_observe(x)
    eager = [q(x) for q in qs]
    compiled = torch.compile(lambda t: [q(t) for q in qs], fullgraph=True, dynamic=False)(x)
    for c, a, b in zip(cases, compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=c.id)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_qat_step_under_torch_compile_on_cuda_matches_eager(dtype):
    """One QAT step (forward, backward, SGD) compiled by inductor computes what eager computes.

    In float32 the two are compared only loosely: inductor sums the train-mode BatchNorm
    statistics in another order, so a few pre-quantization values move by an ulp; those that
    sit on a rounding boundary (x / scale at k + 0.5) take the neighbouring code, and since the
    next quantizer's per-tensor range is the batch's min and max, one flip can shift that
    scale and flip many codes downstream (on the CPU: 1 of 32768 codes at the first
    quantizer, 60 % of them in the last block). The outputs then stay within one step of each
    other, but the gradients of the two steps are those of two slightly different networks:
    a BatchNorm bias gradient, a sum over the whole batch, came within 9.6 dB on an H200.
    In float64 the same step leaves the values 1e-13 of a step apart, no code flips, and
    every output, gradient, observer and BatchNorm buffer and updated parameter must agree
    to rounding (about 290 dB on the CPU; asserted at 150 dB).
    """
    from torchquant.bench.models import DigitsCNN

    torch.manual_seed(0)
    q = tq.quantize_model(DigitsCNN().eval(), _w8, _a8).to(CUDA, dtype)
    x = _digit_batches(1)[0].to(CUDA, dtype)
    _calibrated(q, x)
    tq.set_qmodule_state(q, S.QUANT_AWARE_TRAIN)
    q.train()
    q_c = copy.deepcopy(q)
    compiled = torch.compile(q_c)
    y_e, y_c = q(x), compiled(x)
    target = torch.arange(len(x), device=CUDA) % 10
    nn.functional.cross_entropy(y_e, target).backward()
    nn.functional.cross_entropy(y_c, target).backward()
    for m in (q, q_c):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    if dtype == torch.float32:
        # code flips (see above) move outputs by a step at most: 35 dB on the CPU
        assert sqnr_db(y_e, y_c) > 30
        for n, p in q_c.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and torch.isfinite(p).all(), n
        assert torch.isfinite(compiled(x)).all()
        return
    assert sqnr_db(y_e, y_c) > 150
    for (n, a), b in zip(q.named_parameters(), q_c.parameters(), strict=True):
        assert b.grad is not None and sqnr_db(a.grad, b.grad) > 150, n
        assert sqnr_db(a, b) > 150, n
    for (n, a), b in zip(q.named_buffers(), q_c.buffers(), strict=True):
        if a.is_floating_point():
            assert a.shape == b.shape and sqnr_db(a, b) > 150, n
        else:
            assert torch.equal(a, b), n


def test_autocast_bfloat16_qat_on_cuda():
    q = tq.quantize_model(_resnet18(), _w8, _a8).to(CUDA)
    x = torch.randn(4, 3, 64, 64, device=CUDA)
    _calibrated(q, x)
    tq.set_qmodule_state(q, S.QUANT_AWARE_TRAIN)
    q.train()
    with torch.autocast(CUDA.type, dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in q.parameters() if p.grad is not None)


def test_qop_add_on_cuda():
    op = tq.QOp(operator.add, acts_quantizer=tq.AffineQuantizer(8, tq.RunningMinMax())).to(CUDA)
    a, b = torch.randn(2, 8, 4, 4, device=CUDA), torch.randn(2, 8, 4, 4, device=CUDA)
    tq.set_qmodule_state(op, S.CALIBRATION)
    op(a, b)
    tq.set_qmodule_state(op, S.QUANT_EVAL)
    y = op(a, b)
    step = op.acts_quantizer.grid().scale
    assert y.device.type == CUDA.type and (y - (a + b)).abs().max() <= step / 2 + 1e-6


# ------------------------------------------------------------------ QAT without host syncs, in CUDA graphs
# Issue 16: the QAT path (observe, quantize, backward, optimizer step) makes no host-device
# synchronisation once the observers hold state, so a whole step can be captured in a CUDA graph.

needs_gpu = pytest.mark.skipif(
    CUDA.type != "cuda", reason="needs a real GPU (the CPU stand-in has no sync debug mode or CUDA graphs)"
)


@contextlib.contextmanager
def _host_syncs_raise():
    """Inside, any host-device synchronisation raises (``torch.cuda.set_sync_debug_mode("error")``);
    with the CPU stand-in (``TORCHQUANT_TEST_GPU=cpu``) it checks nothing and only dry-runs the test."""
    if CUDA.type != "cuda":
        yield
        return
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(old)


@needs_gpu
def test_sync_debug_mode_catches_a_host_sync():
    """The check the tests below rely on: ``.item()`` inside ``_host_syncs_raise`` raises."""
    t = torch.ones(2, device=CUDA)
    with _host_syncs_raise(), pytest.raises(RuntimeError, match="synchroniz"):
        t.sum().item()


_GRANULARITIES = {"per-tensor": {}, "per-channel": {"axis": 0}, "per-group": {"axis": -1, "group_size": 8}}
_QAT_OBSERVERS = {"batch": tq.BatchMinMax, "running": tq.RunningMinMax, "ema": tq.ExpAvgMinMax}


_QAT_QUANTIZERS = {
    "affine": lambda obs: tq.AffineQuantizer(8, obs),
    "qfmt": lambda obs: tq.QfmtQuantizer(8, True, obs, gradient_clip=True),
    "minifloat": lambda obs: tq.MinifloatQuantizer("fp8_e4m3", obs),
    "nf4": lambda obs: tq.NF4Quantizer(obs),  # a torch path that reads the ranges in its forward
}


@pytest.mark.parametrize("granularity", _GRANULARITIES)
@pytest.mark.parametrize("observer", _QAT_OBSERVERS)
@pytest.mark.parametrize("quantizer", _QAT_QUANTIZERS)
def test_qat_call_makes_no_host_sync(quantizer, observer, granularity):
    """``pre_observe`` + quantize + backward of one quantizer after its first call (which
    allocates the observer's state) raise nothing under sync debug mode "error"."""
    obs = _QAT_OBSERVERS[observer](**_GRANULARITIES[granularity])
    q = _QAT_QUANTIZERS[quantizer](obs).to(CUDA)
    q.train()
    x = torch.randn(16, 32, device=CUDA, requires_grad=True)
    g = torch.randn(16, 32, device=CUDA)
    q.pre_observe(x)
    q(x).backward(g)
    with _host_syncs_raise():
        for _ in range(2):
            q.pre_observe(x)
            y = q(x)
            y.backward(g)
    assert torch.equal(y, q(x))  # the call quantized with the state it had just observed
    assert not torch.equal(y, x)


@needs_gpu
@pytest.mark.parametrize("granularity", _GRANULARITIES)
@pytest.mark.parametrize("observer", _QAT_OBSERVERS)
@pytest.mark.parametrize("quantizer", ["affine", "minifloat"])
def test_qat_call_allocates_only_its_output(quantizer, observer, granularity):
    """After two warm-up calls, ``pre_observe`` + quantize allocates one block on the GPU: the
    output (the batch ranges go into the observer's staging buffers)."""
    obs = _QAT_OBSERVERS[observer](**_GRANULARITIES[granularity])
    q = _QAT_QUANTIZERS[quantizer](obs).to(CUDA).train()
    x = torch.randn(16, 32, device=CUDA)
    for _ in range(2):
        q.pre_observe(x)
        q(x)
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    q.pre_observe(x)
    y = q(x)
    assert torch.cuda.memory_stats()["allocation.all.allocated"] - before == 1
    assert not torch.equal(y, x)


class _SmallNet(nn.Module):
    """conv-BN-ReLU, conv-BN, residual add, ReLU, strided conv, pooling, linear: 8x3x16x16 -> 8x10."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.relu = nn.ReLU()
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.down(self.relu(x + self.conv(x)))
        return self.fc(x.mean((2, 3)))


def _small_qat_model(act_observer: str, fold_bn: bool | str = False) -> nn.Module:
    """``_SmallNet`` through ``tq.quantize_model``: 8-bit symmetric per-channel weights (BatchMinMax),
    8-bit per-tensor activations observed by ``act_observer``, BatchNorm folded as ``fold_bn`` says,
    QUANT_AWARE_TRAIN, on the GPU."""
    torch.manual_seed(0)
    aq = _QAT_OBSERVERS[act_observer]
    q = tq.quantize_model(_SmallNet().eval(), _w8, lambda m, n: tq.AffineQuantizer(8, aq()), fold_bn=fold_bn)
    tq.set_qmodule_state(q, S.QUANT_AWARE_TRAIN)
    return q.to(CUDA).train()


def _qat_step(model, opt, x, w):
    """One SGD step on the loss ``sum(model(x) * w)`` (no loss function of its own that could sync)."""
    opt.zero_grad(set_to_none=True)
    y = model(x)
    (y * w).sum().backward()
    opt.step()
    return y


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


@pytest.mark.parametrize("fold_bn", [False, True, "one_pass"])
@pytest.mark.parametrize("act_observer", ["ema", "running"])
def test_qat_step_makes_no_host_sync(act_observer, fold_bn):
    """After a warm-up step (observer state, momentum buffers, cuDNN and cuBLAS set-up), a whole
    QAT step of a quantized model raises nothing under sync debug mode "error"."""
    model = _small_qat_model(act_observer, fold_bn)
    opt = _sgd(model)
    x, w = torch.randn(8, 3, 16, 16, device=CUDA), torch.randn(8, 10, device=CUDA)
    _qat_step(model, opt, x, w)
    with _host_syncs_raise():
        for _ in range(2):
            _qat_step(model, opt, x, w)
    observers = [m for m in model.modules() if isinstance(m, _QAT_OBSERVERS[act_observer])]
    assert observers and all(int(o.num_batches) == 3 for o in observers)  # every step observed


@needs_gpu
@pytest.mark.parametrize("fold_bn", [False, True, "one_pass"])
@pytest.mark.parametrize("act_observer", ["ema", "running"])
def test_qat_step_captured_in_a_cuda_graph_replays_like_eager(act_observer, fold_bn):
    """A whole QAT step captured in a CUDA graph (the PyTorch docs' whole-network capture: warm-up
    on a side stream, static input, ``torch.cuda.graph``) and replayed on 3 new batches gives the
    outputs, gradients, parameters, observer state and BatchNorm statistics of the same steps run
    eagerly on a copy (deterministic cuDNN: the same kernels on the same data)."""
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        graphed = _small_qat_model(act_observer, fold_bn)
        opt_g = _sgd(graphed)
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randn(8, 3, 16, 16, generator=gen).to(CUDA) for _ in range(4)]
        static_x, w = batches[0].clone(), torch.randn(8, 10, generator=gen).to(CUDA)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                _qat_step(graphed, opt_g, static_x, w)
        torch.cuda.current_stream().wait_stream(side)

        eager = copy.deepcopy(graphed)
        opt_e = _sgd(eager)
        opt_e.load_state_dict(copy.deepcopy(opt_g.state_dict()))  # momentum buffers, not shared

        graph = torch.cuda.CUDAGraph()
        opt_g.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_y = graphed(static_x)
            (static_y * w).sum().backward()
            opt_g.step()

        for x in batches[1:]:
            static_x.copy_(x)
            graph.replay()
            y = _qat_step(eager, opt_e, x, w)
            torch.testing.assert_close(static_y, y, rtol=1e-6, atol=1e-6)
            for (n, p_g), p_e in zip(graphed.named_parameters(), eager.parameters(), strict=True):
                torch.testing.assert_close(p_g.grad, p_e.grad, rtol=1e-6, atol=1e-6, msg=n)
                torch.testing.assert_close(p_g, p_e, rtol=1e-6, atol=1e-6, msg=n)
            for (n, b_g), b_e in zip(graphed.named_buffers(), eager.buffers(), strict=True):
                torch.testing.assert_close(b_g, b_e, rtol=1e-6, atol=1e-6, msg=n)
        num_batches = [b for n, b in graphed.named_buffers() if n.endswith("acts_quantizer.range_observer.num_batches")]
        assert num_batches and all(int(b) == 6 for b in num_batches)  # 3 warm-up steps + 3 replays
    finally:
        torch.backends.cudnn.deterministic = deterministic


# ------------------------------------------------------------------ PTQ, export, debugging


def _digits_cnn(name="DigitsCNN", method="fx"):
    from torchquant.bench import models

    torch.manual_seed(0)
    net = getattr(models, name)().eval()
    return tq.quantize_model(
        net,
        lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)),
        lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()),
        method=method,
    )


def _digit_batches(n=4):
    g = torch.Generator().manual_seed(5)
    return [torch.rand(32, 1, 8, 8, generator=g) * 16 for _ in range(n)]


@pytest.mark.parametrize("algorithm", ["adaround", "brecq", "qdrop"])
def test_reconstruction_on_cuda_lowers_the_output_error(algorithm):
    q = _digits_cnn(method="swap").to(CUDA)
    data = [x.to(CUDA) for x in _digit_batches()]
    tq.calibrate(q, data, progress=False)
    float_model = copy.deepcopy(q)
    tq.set_qmodule_state(float_model, S.BYPASSED)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    with torch.no_grad():
        ref = torch.cat([float_model(x) for x in data])
        before = sqnr_db(ref, torch.cat([q(x) for x in data]))
    getattr(tq.ptq, algorithm)(q, data, iters=200, batch_size=32, lr=1e-2, progress=False, seed=0)
    with torch.no_grad():
        after = sqnr_db(ref, torch.cat([q(x) for x in data]))
    assert all(p.device.type == CUDA.type for p in q.parameters())
    assert after > before, (before, after)


def test_bias_correction_and_equalize_on_cuda():
    q = _digits_cnn("DigitsMobileNet", method="swap").to(CUDA)
    data = [x.to(CUDA) for x in _digit_batches()]
    with torch.no_grad(), tq.qmodule_state(q, S.BYPASSED):
        before = q(data[0])
    tq.ptq.equalize(q, example_input=data[0])
    with torch.no_grad(), tq.qmodule_state(q, S.BYPASSED):
        torch.testing.assert_close(q(data[0]), before, rtol=1e-4, atol=1e-4)
    tq.calibrate(q, data, progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    tq.ptq.bias_correction(q, data, progress=False)
    assert all(p.device.type == CUDA.type and torch.isfinite(p).all() for p in q.parameters())


def test_export_of_a_cuda_model_passes_check_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    q = _digits_cnn().to(CUDA)
    data = [x.to(CUDA) for x in _digit_batches()]
    tq.calibrate(q, data, progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    proto = tq.export.to_onnx(q, data[0][:2], tmp_path / "m.onnx")
    report = tq.export.check_parity(q, proto, data[1])
    assert report.passed(), str(report)
    params = tq.export.integer_params(q, data[0][:1])
    assert params and all(
        not isinstance(v, torch.Tensor) or v.device.type == "cpu" for p in params.values() for v in p.values()
    )


def test_debug_reports_on_cuda(tmp_path):
    q = _digits_cnn().to(CUDA)
    data = [x.to(CUDA) for x in _digit_batches()]
    tq.calibrate(q, data, progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    rep = tq.debug.sqnr_report(q, data)
    assert rep.rows and all(r["sqnr_db"] > 0 for r in rep.rows)
    sens = tq.debug.sensitivity(q, data[:1])
    assert sens.rows


def test_bench_command_on_cuda(tmp_path):
    pytest.importorskip("sklearn")
    from torchquant.cli.main import main

    args = ["bench", "--dataset", "digits", "--epochs", "2", "--recipes", "ptq-minmax,qat-lsq", "--bits", "w4a4"]
    args += ["--qat-epochs", "1", "--calib-batches", "2", "--quiet", "--no-plot", "--device", CUDA.type]
    n, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        assert main([*args, "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]) == 0
    finally:
        torch.set_num_threads(n)
        torch.use_deterministic_algorithms(det)
    doc = (tmp_path / "o" / "results.json").read_text()
    assert f'"{CUDA.type}' in doc


@pytest.mark.parametrize("method", ["fx", "swap", "FusedResNet"])
def test_converting_a_model_already_on_the_gpu_puts_its_quantizers_there(method):
    net = _resnet18().to(CUDA)
    if method == "FusedResNet":
        from torchquant.models import FusedResNet

        q = FusedResNet(net, _w8, _a8)
    else:
        q = tq.quantize_model(net, _w8, _a8, method=method)
    assert {t.device.type for t in [*q.parameters(), *q.buffers()]} == {CUDA.type}
    x = torch.randn(2, 3, 32, 32, device=CUDA)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, S.QUANT_EVAL)
    assert torch.isfinite(q(x)).all()
