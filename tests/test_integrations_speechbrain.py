"""torchquant.integrations.speechbrain: SpeechBrain lobes quantized, QAT in a Brain with checkpoints,
PTQ on a speechbrain model, and the espeak-ng spoken-digit set."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
from torch import nn

import torchquant as tq

sb = pytest.importorskip("speechbrain", reason="needs speechbrain (torchquant[speechbrain])")
pytest.importorskip("torchaudio", reason="needs torchaudio (torchquant[speechbrain])")

from speechbrain.lobes.features import Fbank  # noqa: E402
from speechbrain.lobes.models.CRDNN import CRDNN  # noqa: E402
from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN  # noqa: E402
from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder  # noqa: E402
from speechbrain.lobes.models.transformer.Transformer import TransformerEncoder  # noqa: E402
from speechbrain.nnet.attention import RelPosEncXL  # noqa: E402
from speechbrain.nnet.RNN import LSTM  # noqa: E402
from speechbrain.utils.checkpoints import Checkpointer  # noqa: E402

from torchquant.integrations.speechbrain import (  # noqa: E402
    QATBrainMixin,
    QATSchedule,
    quantize_speechbrain,
    raw_weight_reasons,
)
from torchquant.integrations.speechbrain import data as sd  # noqa: E402
from torchquant.integrations.speechbrain.models import KWSNet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng on PATH")

WF = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)  # noqa: E731
AF = lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax())  # noqa: E731


def _conformer_relpos():
    enc = ConformerEncoder(num_layers=1, d_model=40, d_ffn=64, nhead=4, attention_type="RelPosMHAXL")
    pos = RelPosEncXL(40)

    def call(m, x):
        return m(x, pos_embs=pos(x))[0]

    return enc, call


def _first(m, x):
    out = m(x)
    return out[0] if isinstance(out, tuple) else out


LOBES = {
    "ecapa-tdnn": lambda: (ECAPA_TDNN(40, channels=[32, 32, 32, 32, 96], lin_neurons=16), _first),
    "crdnn-ligru": lambda: (
        CRDNN(
            input_shape=[2, 50, 40], cnn_channels=(8, 16), rnn_neurons=32, dnn_neurons=32, rnn_layers=1, dnn_blocks=1
        ),
        _first,
    ),
    "crdnn-lstm": lambda: (
        CRDNN(
            input_shape=[2, 50, 40],
            cnn_channels=(8, 16),
            rnn_class=LSTM,
            rnn_neurons=32,
            dnn_neurons=32,
            rnn_layers=2,
            dnn_blocks=1,
        ),
        _first,
    ),
    "transformer-encoder": lambda: (TransformerEncoder(num_layers=2, nhead=4, d_ffn=64, d_model=40), _first),
    "conformer-regular-mha": lambda: (
        ConformerEncoder(num_layers=1, d_model=40, d_ffn=64, nhead=4, attention_type="regularMHA"),
        _first,
    ),
    "conformer-relpos": _conformer_relpos,
    "kws-cnn": lambda: (KWSNet(n_mels=40, n_classes=10, channels=16), _first),
}

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.MultiheadAttention, nn.RNNBase)


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach(), out.detach()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum().clamp_min(1e-20)))


@pytest.mark.parametrize("lobe", list(LOBES))
def test_every_conv_linear_attention_and_rnn_is_quantized_or_reported(lobe):
    torch.manual_seed(0)
    model, call = LOBES[lobe]()
    model.eval()
    x = torch.randn(2, 50, 40)
    ref = call(model, x).detach()
    layers = [n for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", tq.FloatLayersWarning)
        q = quantize_speechbrain(model, WF, AF)
    assert q is model
    # the warning names the modules that use weights of their own (LSTM, relative-position attention), no layer
    want_warned = tq.convert.unconverted_weights(q)
    messages = [str(w.message) for w in record if issubclass(w.category, tq.FloatLayersWarning)]
    assert len(messages) == bool(want_warned)
    if want_warned:
        assert f"{len(want_warned)} layer(s) with weights stay in float: {', '.join(want_warned)};" in messages[0]
    torch.testing.assert_close(call(q, x), ref)  # every QModule starts BYPASSED
    rows = tq.summary_rows(q)
    quantized = [r["name"] for r in rows if r["kind"] != "float"]
    floats = {r["name"]: r["note"] for r in rows if r["kind"] == "float"}
    assert quantized, lobe
    for name in layers:
        held = any(name == p or name.startswith(p + ".") for p in quantized)
        reported = any(name == p or name.startswith(p + ".") for p in floats)
        assert held or reported, f"{lobe}: {name} neither quantized nor reported"
    assert "not converted" not in floats.values()
    # nn.LSTM and relative-position attention stay float with the reason; nothing else does
    want_float = {n for n, m in q.named_modules() if isinstance(m, nn.RNNBase) or type(m).__name__ == "RelPosMHAXL"}
    assert set(floats) == want_float
    assert all("itself" in note for note in floats.values())
    tq.set_qmodule_state(q, tq.QModuleState.CALIBRATION)
    call(q, x)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    assert _sqnr_db(ref, call(q, x).detach()) > 15.0


def test_summary_names_the_lstm_and_why():
    model, _ = LOBES["crdnn-lstm"]()
    text = tq.summary(quantize_speechbrain(model, WF, AF))
    assert "RNN.rnn  " in text and "LSTM keeps float weights" in text
    assert text.splitlines()[-1] == "5 quantization points (5 QWrapper, 0 QOp), 1 left in float"


def test_feature_extraction_is_skipped():
    model = nn.Sequential(Fbank(n_mels=40), KWSNet(n_mels=40, channels=16)).eval()
    wav = torch.randn(2, 16000)
    ref = model(wav)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the feature types skipped for the caller match nothing here
        quantize_speechbrain(model, WF, AF)
    assert not any(isinstance(m, tq.QModule) for m in model[0].modules())
    assert sum(isinstance(m, tq.QWrapper) for m in model[1].modules()) == 6
    with pytest.warns(UserWarning, match=r"quantize_speechbrain: skip entries matched no module .*'head'"):
        quantize_speechbrain(nn.Sequential(Fbank(n_mels=40), KWSNet(n_mels=40, channels=16)).eval(), WF, AF,
                             skip=["head"])  # fmt: skip
    torch.testing.assert_close(model(wav), ref, atol=1e-4, rtol=1e-4)  # fbank values are large


def test_max_norm_linear_is_refused():
    from speechbrain.nnet.linear import Linear

    model = nn.Sequential(Linear(4, input_size=8, max_norm=1.0))
    with pytest.raises(ValueError, match=r"0 \(speechbrain Linear\) has max_norm=1.0"):
        quantize_speechbrain(model, WF, AF)


def test_raw_weight_reasons_of_a_plain_model():
    from speechbrain.nnet.CNN import SincConv

    model = nn.Sequential(nn.GRU(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4), SincConv(8, 31, in_channels=1))
    reasons = raw_weight_reasons(model)
    assert list(reasons) == ["0", "3"]
    assert reasons["3"] == (
        "SincConv uses its parameters low_hz_ (8, 1), band_hz_ (8, 1) itself, not through a layer torchquant converts"
    )
    assert reasons["0"].startswith("GRU keeps float weights") and "use speechbrain's LiGRU/QuasiRNN" in reasons["0"]


def test_schedule_modes_and_errors():
    net = tq.quantize_model(nn.Sequential(nn.Linear(4, 2)), WF, AF)
    s = QATSchedule(2, train_mode=tq.QModuleState.QUANT_AWARE_TRAIN_WEIGHT_ONLY)
    assert s.evaluation(net) == tq.QModuleState.BYPASSED
    modes = [s.train_step(net) for _ in range(3)]
    assert modes == [tq.QModuleState.CALIBRATION] * 2 + [tq.QModuleState.QUANT_AWARE_TRAIN_WEIGHT_ONLY]
    assert s.evaluation(net) == tq.QModuleState.QUANT_EVAL and set(tq.get_qmodule_states(net).values()) == {
        tq.QModuleState.QUANT_EVAL
    }
    assert "steps=3" in repr(s)
    with pytest.raises(ValueError, match="calibration_steps must be an int >= 0, got -1"):
        QATSchedule(-1)
    with pytest.raises(ValueError, match="train_mode must be a QUANT_AWARE_TRAIN"):
        QATSchedule(1, train_mode=tq.QModuleState.CALIBRATION)
    with pytest.raises(ValueError, match="eval_mode must be a QUANT_EVAL"):
        QATSchedule(1, eval_mode=tq.QModuleState.BYPASSED)


class _Brain(sb.Brain):
    def compute_forward(self, batch, stage):
        return self.modules.model(batch[0])

    def compute_objectives(self, logits, batch, stage):
        return nn.functional.cross_entropy(logits, batch[1])


class _QATBrain(QATBrainMixin, _Brain):
    pass


def _kws(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    wf = lambda m, n: tq.LSQQuantizer(4, axis=0)  # noqa: E731
    af = lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax())  # noqa: E731
    return quantize_speechbrain(KWSNet(n_mels=20, n_classes=4, channels=8), wf, af)


def _loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 30, 20, generator=g), torch.randint(0, 4, (24,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)


def _brain(model: nn.Module, folder, schedule: QATSchedule) -> _QATBrain:
    ckpt = Checkpointer(folder, recoverables={"model": model})
    return _QATBrain(
        modules={"model": model},
        opt_class=lambda p: torch.optim.Adam(p, 1e-3),
        run_opts={"device": "cpu", "noprogressbar": True},
        checkpointer=ckpt,
        qat_schedule=schedule,
    )


def test_brain_calibrates_then_trains_quantized_and_checkpoints_keep_the_quantizers(tmp_path):
    model = _kws()
    brain = _brain(model, tmp_path, QATSchedule(calibration_steps=2))
    seen = []
    model.fc2.w.register_forward_pre_hook(lambda m, args: seen.append(m.qstate))
    brain.fit(range(1), _loader(), _loader())  # 4 training steps, then 4 validation batches
    S = tq.QModuleState
    assert seen == [S.CALIBRATION] * 2 + [S.QUANT_AWARE_TRAIN] * 2 + [S.QUANT_EVAL] * 4
    assert int(brain.qat_schedule.steps) == 4
    brain.checkpointer.save_checkpoint()

    fresh = _kws(seed=1)  # other float weights, quantizers not initialised
    brain2 = _brain(fresh, tmp_path, QATSchedule(calibration_steps=2))
    assert brain2.checkpointer.recover_if_possible() is not None
    assert int(brain2.qat_schedule.steps) == 4
    assert tq.get_qmodule_states(fresh) == tq.get_qmodule_states(model)
    x = torch.randn(3, 30, 20)
    model.eval(), fresh.eval()
    brain.qat_schedule.evaluation(model), brain2.qat_schedule.evaluation(fresh)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_mixin_needs_a_schedule():
    with pytest.raises(TypeError, match="qat_schedule must be a QATSchedule, got int"):
        _QATBrain(modules={"model": _kws()}, qat_schedule=3)


def test_ptq_calibrate_and_adaround_on_a_speechbrain_model():
    torch.manual_seed(0)
    float_model = KWSNet(n_mels=20, n_classes=4, channels=8).eval()
    wf = lambda m, n: tq.AffineQuantizer(4, tq.MSEObserver(4, True, axis=0), symmetric=True)  # noqa: E731
    q = quantize_speechbrain(copy.deepcopy(float_model), wf, None)
    data = [torch.randn(8, 30, 20) for _ in range(2)]
    tq.calibrate(q, data, progress=False)
    before = {n: m.layer.weight.clone() for n, m in q.named_modules() if isinstance(m, tq.QWrapper)}
    losses = tq.ptq.adaround(q, data, iters=10, progress=False)
    assert sorted(losses) == sorted(before)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL_WEIGHT_ONLY)
    ref = float_model(data[0])
    assert _sqnr_db(ref, q(data[0])) > 5.0


def test_save_and_load_a_quantized_speechbrain_model(tmp_path):
    torch.manual_seed(0)
    float_model = KWSNet(n_mels=20, n_classes=4, channels=8).eval()
    wf = lambda m, n: tq.AffineQuantizer(4, tq.MSEObserver(4, True, axis=0), symmetric=True)  # noqa: E731
    af = lambda m, n: tq.AffineQuantizer(8, tq.MSEObserver(8))  # noqa: E731
    q = quantize_speechbrain(copy.deepcopy(float_model), wf, af)
    x = torch.randn(4, 30, 20)
    tq.calibrate(q, [x], progress=False)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    tq.save(q, tmp_path / "kws.safetensors")
    q2 = tq.load(copy.deepcopy(float_model), tmp_path / "kws.safetensors")  # packed 4-bit weights
    assert tq.get_qmodule_states(q2) == tq.get_qmodule_states(q)
    torch.testing.assert_close(q2(x), q(x), rtol=0, atol=0)


# --- the spoken-digit set --------------------------------------------------------------------

TINY = sd.SpeechDigitsRecipe(words=("zero", "one"), accents=("en-us",), train_variants=("m1", "f1"),
                             test_variants=("m3",), takes=2)  # fmt: skip


def test_recipe_checks():
    with pytest.raises(ValueError, match=r"share \['m1'\]"):
        sd.SpeechDigitsRecipe(train_variants=("m1",), test_variants=("m1",))
    with pytest.raises(ValueError, match="takes < 1"):
        sd.SpeechDigitsRecipe(takes=0)
    for bad, match in [
        (dict(speed=(200, 120)), "speed must be a"),
        (dict(pitch=(75, 25)), "pitch must be a"),
        (dict(pitch=(25, 120)), r"pitch must lie in \[0, 99\]"),
        (dict(snr_db=(30.0,)), "snr_db must be a"),
        (dict(seconds=0.0), "seconds must be positive"),
        (dict(speed=(0, 100)), "speed must be positive"),
    ]:
        with pytest.raises(ValueError, match=match):
            sd.SpeechDigitsRecipe(**bad)
    assert TINY.key() != sd.SpeechDigitsRecipe().key() and len(TINY.key()) == 16


def test_missing_espeak_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(sd.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="espeak-ng is not on PATH; install it"):
        sd.speech_digits(TINY, cache_dir=tmp_path)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHQUANT_CACHE", str(tmp_path))
    assert sd.cache_root() == tmp_path


@needs_espeak
def test_speech_digits_synthesised_split_by_voice_and_cached(monkeypatch, tmp_path):
    (xtr, ytr), (xte, yte) = sd.speech_digits(TINY, cache_dir=tmp_path)
    assert xtr.shape == (2 * 2 * 2, 16000) and xte.shape == (1 * 2 * 2, 16000)
    assert xtr.dtype == torch.float32 and xtr.abs().max() <= 1
    assert ytr.tolist() == [0, 0, 1, 1] * 2 and yte.tolist() == [0, 0, 1, 1]
    folder = tmp_path / "speech_digits" / TINY.key()
    import json

    voices = json.loads((folder / "voices.json").read_text())
    assert voices == ["en-us+m1"] * 4 + ["en-us+f1"] * 4 + ["en-us+m3"] * 4
    assert json.loads((folder / "recipe.json").read_text())["test_variants"] == ["m3"]
    assert not torch.equal(xtr[0], xtr[1])  # two takes differ (rate, pitch, offset, noise)
    monkeypatch.setattr(sd, "_synthesise", lambda recipe: pytest.fail("synthesised again"))
    (xtr2, _), _ = sd.speech_digits(TINY, cache_dir=tmp_path)
    torch.testing.assert_close(xtr2, xtr)
    feats = sd.fbank_features(xtr, n_mels=20)
    assert feats.shape == (8, 101, 20)
    torch.testing.assert_close(feats.mean(1), torch.zeros(8, 20), atol=1e-4, rtol=0)
