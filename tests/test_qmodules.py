import copy
import io
import operator

import pytest
import torch
from torch import nn

from torchquant import (
    SUPPORTED_ACTIVATIONS,
    AffineQuantizer,
    BatchMinMax,
    ExpAvgMinMax,
    QfmtQuantizer,
    QModuleState,
    QOp,
    QWrapper,
    qmodule_state,
    set_qmodule_state,
)

S = QModuleState

LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), nn.BatchNorm1d, (4, 6)),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d, (2, 3, 9)),
    "conv2d": (
        lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2, groups=2, padding_mode="reflect"),
        nn.BatchNorm2d,
        (2, 4, 7, 7),
    ),
    "conv3d": (
        lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=1, padding_mode="circular"),
        nn.BatchNorm3d,
        (1, 2, 4, 5, 5),
    ),
}
ACTS = [None, *SUPPORTED_ACTIVATIONS]


def out_features(layer):
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def make(kind, bn, act):
    ctor, bn_cls, shape = LAYERS[kind]
    layer = ctor()
    seq = [layer]
    if bn:
        b = bn_cls(out_features(layer))
        b.running_mean.uniform_(-0.5, 0.5)
        b.running_var.uniform_(0.5, 2)
        b.weight.data.uniform_(0.5, 1.5)
        seq.append(b)
    if act is not None:
        seq.append(act())
    return seq, torch.randn(shape)


@pytest.mark.parametrize("act", ACTS, ids=lambda a: "none" if a is None else a.__name__)
@pytest.mark.parametrize("bn", [False, True], ids=["nobn", "bn"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_pattern_bypassed_identical_and_quantized_close(kind, bn, act):
    seq, x = make(kind, bn, act)
    ref_model = nn.Sequential(*seq).eval()
    w = QWrapper(
        seq,
        weight_quantizer=AffineQuantizer(8, BatchMinMax(axis=0)),
        acts_quantizer=AffineQuantizer(8, ExpAvgMinMax()),
    ).eval()
    ref = ref_model(x)
    assert torch.equal(w(x), ref)
    # the wrapper uses the very same parameter tensors
    assert w.layer.weight is seq[0].weight
    with qmodule_state(w, S.CALIBRATION):
        assert torch.equal(w(x), ref)
    with qmodule_state(w, S.QUANT_EVAL):
        y = w(x)
    err = (y - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-12)
    assert 10 * torch.log10(1 / err.clamp_min(1e-20)) > 25  # SQNR in dB


@pytest.mark.parametrize(
    "layers",
    [
        [nn.ReLU()],
        [nn.Linear(2, 2), nn.BatchNorm2d(2)],
        [nn.Conv2d(2, 2, 1), nn.ReLU(), nn.BatchNorm2d(2)],
        [nn.Conv2d(2, 2, 1), nn.ReLU(), nn.ReLU()],
        [nn.Conv2d(2, 2, 1), nn.Dropout()],
        [],
    ],
    ids=["act-only", "linear-bn2d", "act-before-bn", "two-acts", "dropout", "empty"],
)
def test_unsupported_sequence_names_it(layers):
    with pytest.raises(TypeError, match=r"unsupported layer sequence \[.*\]; supported: Linear"):
        QWrapper(layers, None, None)


def test_bn_size_mismatch():
    with pytest.raises(ValueError, match="normalises 3"):
        QWrapper([nn.Conv2d(2, 4, 1), nn.BatchNorm2d(3)])


def test_fold_bn_without_batchnorm_raises():
    # fold_bn=True works with a BatchNorm (tests/test_bn_folding.py) and is refused without one
    with pytest.raises(ValueError, match=r"fold_bn.*Conv2d\+ReLU"):
        QWrapper([nn.Conv2d(2, 4, 1), nn.ReLU()], fold_bn=True)


def test_bad_quantizer_type():
    with pytest.raises(TypeError, match="weight_quantizer"):
        QWrapper(nn.Linear(2, 2), weight_quantizer=nn.ReLU())


def test_accepts_module_list_and_sequential():
    lin = nn.Linear(3, 3)
    for layers in (lin, [lin], nn.Sequential(lin)):
        assert QWrapper(layers).layer is lin


def make_wrapper():
    return QWrapper(
        [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()],
        weight_quantizer=AffineQuantizer(4, BatchMinMax(axis=0)),
        acts_quantizer=AffineQuantizer(4, ExpAvgMinMax()),
    )


def counters(w):
    o = w.acts_quantizer.range_observer
    return int(o.num_batches), w.weight_quantizer.range_observer.initialized


@pytest.mark.parametrize("mode", list(QModuleState), ids=lambda m: m.name)
def test_each_mode_observe_and_quantize_behaviour(mode):
    torch.manual_seed(0)
    w = make_wrapper().eval()
    x = torch.randn(2, 3, 6, 6)
    ref = w(x)
    # prime the observers so every mode can quantize
    with qmodule_state(w, S.CALIBRATION):
        w(x * 2)
    wq_ranges = w.weight_quantizer.range_observer.min_val.clone()
    n_act = int(w.acts_quantizer.range_observer.num_batches)
    with qmodule_state(w, mode):
        y = w(x)
    # activation observation happens exactly in the act-observing modes
    assert int(w.acts_quantizer.range_observer.num_batches) == n_act + int(mode.is_act_observed)
    # quantization, in any part, is visible in the output
    if mode == S.BYPASSED or mode.name.startswith("CALIBRATION"):
        assert torch.equal(y, ref)
    else:
        assert not torch.equal(y, ref)
    if mode.is_act_quantized:
        d, z = w.acts_quantizer.qparams()
        ints = y / d + z
        assert torch.allclose(ints, ints.round(), atol=1e-3)
    assert torch.equal(w.weight_quantizer.range_observer.min_val, wq_ranges)  # same weights


def test_quant_eval_freezes_ranges_and_calibration_moves_them():
    w = make_wrapper()
    x = torch.randn(2, 3, 6, 6)
    with qmodule_state(w, S.CALIBRATION):
        w(x)
    before = w.acts_quantizer.range_observer.max_val.clone()
    with qmodule_state(w, S.QUANT_EVAL):
        w(x * 10)
    assert torch.equal(w.acts_quantizer.range_observer.max_val, before)
    with qmodule_state(w, S.CALIBRATION):
        w(x * 10)
    assert not torch.equal(w.acts_quantizer.range_observer.max_val, before)


def test_train_eval_never_change_mode():
    w = make_wrapper()
    set_qmodule_state(w, S.QUANT_AWARE_TRAIN)
    w.eval()
    assert w.qstate == S.QUANT_AWARE_TRAIN
    w.train()
    assert w.qstate == S.QUANT_AWARE_TRAIN


def test_uncalibrated_quantization_names_module():
    w = make_wrapper()
    with qmodule_state(w, S.QUANT_EVAL), pytest.raises(RuntimeError, match=r"QWrapper\[Conv2d\+BatchNorm2d\+ReLU\]"):
        w(torch.randn(1, 3, 5, 5))


def test_qat_backward_reaches_weights():
    w = make_wrapper()
    set_qmodule_state(w, S.QUANT_AWARE_TRAIN)
    w(torch.randn(2, 3, 6, 6)).sum().backward()
    assert w.layer.weight.grad is not None and torch.isfinite(w.layer.weight.grad).all()
    assert w.bn.weight.grad is not None


def test_none_quantizers_stay_float():
    lin = nn.Linear(4, 3)
    w = QWrapper(lin, weight_quantizer=None, acts_quantizer=AffineQuantizer(8, BatchMinMax()))
    x = torch.randn(2, 4)
    set_qmodule_state(w, S.QUANT_AWARE_TRAIN)
    y = w(x)
    # weight float: only activations rounded
    assert (y - lin(x)).abs().max() <= (y.max() - y.min().clamp(max=0)) / 255 / 2 + 1e-6


def test_quantizers_assigned_after_construction_are_used_and_removed_ones_are_not():
    # A quantizer built as None lives in the instance dict, one assigned later in _modules:
    # the forward pass reads both places alike.
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    w = QWrapper([nn.Linear(4, 3), nn.ReLU()])
    op = QOp(operator.add)
    set_qmodule_state(w, S.QUANT_AWARE_TRAIN)
    set_qmodule_state(op, S.QUANT_AWARE_TRAIN)
    float_w, float_op = w(x), op(x, x)
    assert torch.equal(float_w, torch.relu(w.layer(x))) and torch.equal(float_op, x + x)
    w.weight_quantizer = AffineQuantizer(2, BatchMinMax(axis=0))
    w.acts_quantizer = AffineQuantizer(2, BatchMinMax())
    w.input_quantizer = AffineQuantizer(2, BatchMinMax())
    op.acts_quantizer = AffineQuantizer(2, BatchMinMax())
    xq = AffineQuantizer(2, BatchMinMax())
    xq.pre_observe(x)
    wq = AffineQuantizer(2, BatchMinMax(axis=0))
    wq.pre_observe(w.layer.weight)
    y = torch.relu(nn.functional.linear(xq(x), wq(w.layer.weight), w.layer.bias))
    yq = AffineQuantizer(2, BatchMinMax())
    yq.pre_observe(y)
    assert torch.equal(w(x), yq(y))
    assert len(op(x, x).unique()) <= 4  # 2 bits
    w.weight_quantizer = w.acts_quantizer = w.input_quantizer = None
    op.acts_quantizer = None
    assert torch.equal(w(x), float_w) and torch.equal(op(x, x), float_op)


def test_assigning_a_non_module_to_a_wrapper_slot_names_the_wrapper():
    w = QWrapper([nn.Linear(4, 3), nn.ReLU()])
    with pytest.raises(TypeError, match=r"QWrapper\[Linear\+ReLU\]: act must be an nn.Module or None, got builtin"):
        w.act = torch.relu
    with pytest.raises(TypeError, match=r"QWrapper\[Linear\+ReLU\]: acts_quantizer must be an nn.Module or None"):
        w.acts_quantizer = lambda y: y
    assert isinstance(w.act, nn.ReLU) and w.acts_quantizer is None  # nothing changed


def test_a_subclass_weight_view_and_layer_call_are_what_forward_uses():
    class Halved(QWrapper):
        def weight_view(self):
            return super().weight_view() / 2

        def _layer_with(self, x, w, b):
            return super()._layer_with(x, w, b) + 1

    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    torch.testing.assert_close(Halved(lin)(x), nn.functional.linear(x, lin.weight / 2, lin.bias) + 1)


def test_qop():
    add = QOp(operator.add, acts_quantizer=AffineQuantizer(2, BatchMinMax()))
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([0.4, 2.0])
    assert torch.equal(add(a, b), a + b)
    with qmodule_state(add, S.QUANT_AWARE_TRAIN):
        y = add(a, b)
    # range [0, 3], 2 bits: delta 1
    assert y.tolist() == [0.0, 3.0]
    cat = QOp(torch.cat, acts_quantizer=AffineQuantizer(8, BatchMinMax()))
    assert torch.equal(cat([a, b], dim=0), torch.cat([a, b]))
    pool = QOp(nn.AdaptiveAvgPool2d(1), None)
    assert pool(torch.ones(1, 2, 3, 3)).shape == (1, 2, 1, 1)
    with pytest.raises(TypeError):
        QOp(3)


def test_a_qop_on_an_operation_that_returns_a_number_passes_it_through():
    # torch.fx puts a QOp on `H + 1` when a leaf module gets sizes (timm's XCiT positional encoding)
    add = QOp(operator.add, acts_quantizer=AffineQuantizer(8, BatchMinMax()))
    for state in (S.CALIBRATION, S.QUANT_AWARE_TRAIN, S.QUANT_EVAL):
        with qmodule_state(add, state):
            assert add(2, 1) == 3
    assert not add.acts_quantizer.range_observer.initialized


def test_state_dict_round_trip_every_mode_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(make_wrapper(), QOp(torch.flatten, AffineQuantizer(8, ExpAvgMinMax())))
    x = torch.randn(4, 3, 6, 6)
    with qmodule_state(model, S.QUANT_AWARE_TRAIN):
        for _ in range(3):
            model(torch.randn(4, 3, 6, 6))
    model.eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    torch.manual_seed(1)
    fresh = nn.Sequential(make_wrapper(), QOp(torch.flatten, AffineQuantizer(8, ExpAvgMinMax()))).eval()
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
    twin = copy.deepcopy(model)
    for mode in QModuleState:
        set_qmodule_state(model, mode)
        set_qmodule_state(fresh, mode)
        set_qmodule_state(twin, mode)
        a, b, c = model(x), fresh(x), twin(x)
        assert torch.equal(a, b), mode
        assert torch.equal(a, c), mode


def test_qfmt_in_wrapper():
    w = QWrapper(nn.Linear(4, 4), QfmtQuantizer(8, True, BatchMinMax()), QfmtQuantizer(8, True, ExpAvgMinMax()))
    set_qmodule_state(w, S.QUANT_AWARE_TRAIN)
    y = w(torch.randn(3, 4))
    assert torch.isfinite(y).all()


def test_torch_compile_fullgraph_matches_eager():
    w = make_wrapper().eval()
    x = torch.randn(2, 3, 6, 6)
    with qmodule_state(w, S.CALIBRATION):
        w(x)
    for mode in (S.QUANT_EVAL, S.BYPASSED):
        set_qmodule_state(w, mode)
        eager = w(x)
        compiled = torch.compile(w, fullgraph=True, dynamic=False)
        assert torch.allclose(compiled(x), eager, atol=1e-6)
        torch._dynamo.reset()


def test_torch_compile_qat_training_step_matches_eager():
    w = make_wrapper()
    twin = copy.deepcopy(w)
    set_qmodule_state(w, S.QUANT_AWARE_TRAIN)
    set_qmodule_state(twin, S.QUANT_AWARE_TRAIN)
    x = torch.randn(2, 3, 6, 6)
    w(x), twin(x)  # materialise per-channel ranges
    compiled = torch.compile(w, fullgraph=True, dynamic=False)
    y1 = compiled(x)
    y2 = twin(x)
    assert torch.allclose(y1, y2, atol=1e-5)
    y1.sum().backward()
    y2.sum().backward()
    assert torch.allclose(w.layer.weight.grad, twin.layer.weight.grad, atol=1e-4)
    assert torch.equal(w.acts_quantizer.range_observer.num_batches, twin.acts_quantizer.range_observer.num_batches)
    torch._dynamo.reset()


def test_fx_symbolic_trace_matches_eager():
    w = make_wrapper().eval()
    x = torch.randn(2, 3, 6, 6)
    with qmodule_state(w, S.CALIBRATION):
        w(x)
    for mode in (S.QUANT_EVAL, S.BYPASSED, S.QUANT_EVAL_WEIGHT_ONLY):
        set_qmodule_state(w, mode)
        gm = torch.fx.symbolic_trace(w)
        assert torch.equal(gm(x), w(x))


def test_save_whole_quantized_model_weights_only_state(tmp_path):
    w = make_wrapper()
    with qmodule_state(w, S.CALIBRATION):
        w(torch.randn(2, 3, 6, 6))
    buf = io.BytesIO()
    torch.save(w.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert "acts_quantizer.range_observer.ema_min" in sd


def test_mode_is_an_alias_of_qstate():
    # code written against the original torchquant reads and sets `.mode`
    w = QWrapper(nn.Linear(2, 2))
    w.mode = QModuleState.QUANT_EVAL
    assert w.qstate is QModuleState.QUANT_EVAL and w.mode is QModuleState.QUANT_EVAL
    w.qstate = QModuleState.CALIBRATION
    assert w.mode is QModuleState.CALIBRATION
    with pytest.raises(TypeError, match=r"QWrapper\.mode must be a QModuleState"):
        w.mode = "quant_eval"


def test_wrapper_reads_through_to_its_layer_and_quantizes_its_input():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    w = QWrapper(layer, input_quantizer=AffineQuantizer(2, BatchMinMax()))
    assert w.weight is layer.weight and w.in_features == 4
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        w.nothing  # noqa: B018
    x = torch.randn(5, 4)
    assert torch.equal(w(x), layer(x))  # BYPASSED
    w.qstate = QModuleState.QUANT_AWARE_TRAIN
    q = w.input_quantizer
    assert torch.equal(w(x), layer(q(x)))
    with pytest.raises(ValueError, match="token ids"):
        QWrapper(nn.Embedding(4, 2), input_quantizer=AffineQuantizer(8, BatchMinMax()))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_observes_each_batch_once(reentrant):
    # The recomputation in backward runs the forward again: observing there counted the batch twice and
    # quantized the recomputed activations on ranges the forward did not use (silently other gradients).
    from torch.utils.checkpoint import checkpoint

    import torchquant as tq

    class Net(nn.Module):
        def __init__(self, ckpt: bool) -> None:
            super().__init__()
            self.a, self.b, self.ckpt = nn.Linear(8, 8), nn.Linear(8, 8), ckpt

        def forward(self, x):
            f = lambda t: self.b(torch.relu(self.a(t)))  # noqa: E731
            return checkpoint(f, x, use_reentrant=reentrant) if self.ckpt else f(x)

    runs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        q = tq.quantize_model(Net(ckpt), lambda m, n: tq.make_quantizer("lsq", n_bits=4, axis=0),
                              lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax(0.9)), method="swap")  # fmt: skip
        tq.set_qmodule_state(q, tq.QModuleState.QUANT_AWARE_TRAIN)
        grads = []
        for i in range(3):
            x = (torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) * (i + 1)).requires_grad_(reentrant)
            q.zero_grad()
            q(x).pow(2).sum().backward()
            grads += [p.grad.clone() for p in q.parameters()]
        runs.append((q.state_dict(), grads))
    (state, grads), (state_ckpt, grads_ckpt) = runs
    assert int(state_ckpt["a.acts_quantizer.range_observer.num_batches"]) == 3
    assert all(torch.equal(state[k], state_ckpt[k]) for k in state)
    assert all(torch.equal(g, h) for g, h in zip(grads, grads_ckpt))
