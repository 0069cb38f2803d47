"""torchquant.hf.trainer and torchquant.hf.lora: QAT under transformers.Trainer, LoRA on a quantized base.

Tiny random models of six families (decoders, an encoder, a vision transformer, an encoder-decoder with a
Conv1d front end), saved once per session; nothing is downloaded.
"""

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hf_tiny import VOCAB, bert_config, gpt2_config, llama_config, qwen2_config, vit_config, whisper_config  # noqa: E402

import torchquant as tq  # noqa: E402
from torchquant.distributed import observers  # noqa: E402
from torchquant.hf import (  # noqa: E402
    QuantizationCallback,
    QWrapperLoraLayer,
    TorchQuantConfig,
    enable_lora,
    lora_config,
    quantizer_parameter_names,
)
from torchquant.qmodules import QModuleState, QWrapper, iter_qmodules  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 8
S = QModuleState


def _llama():
    return transformers.LlamaForCausalLM(llama_config())


def _gpt2():
    return transformers.GPT2LMHeadModel(gpt2_config())


def _bert():
    return transformers.BertForSequenceClassification(bert_config(num_labels=2))


def _qwen2():
    return transformers.Qwen2ForCausalLM(qwen2_config())


def _vit():
    return transformers.ViTForImageClassification(vit_config(num_labels=2))


MELS, FRAMES = 8, 32  # Whisper's encoder wants 2 * max_source_positions frames (conv2 has stride 2)


def _whisper():
    return transformers.WhisperForConditionalGeneration(whisper_config())


# One training example of each kind, drawn from ``g``: the model's keyword inputs and its labels.
def _next_tokens(g):  # a causal LM shifts the labels itself
    ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
    return {"input_ids": ids, "labels": ids}


def _sentence_class(g):
    return {"input_ids": torch.randint(0, VOCAB, (SEQ,), generator=g), "labels": torch.randint(0, 2, (), generator=g)}


def _image_class(g):
    return {"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": torch.randint(0, 2, (), generator=g)}


def _transcript(g):
    """Log-mel features and a transcript; the decoder's inputs are the labels shifted right after
    decoder_start_token_id (as DataCollatorForSeq2Seq makes them), so that a batch without its labels
    (tq.calibrate drops them) still runs the decoder."""
    labels = torch.randint(0, VOCAB, (SEQ,), generator=g)
    start = torch.tensor([1])  # WhisperConfig.decoder_start_token_id
    return {
        "input_features": torch.randn(MELS, FRAMES, generator=g),
        "decoder_input_ids": torch.cat([start, labels[:-1]]),
        "labels": labels,
    }


class Family(NamedTuple):
    build: Callable[[], torch.nn.Module]
    auto: str  # the transformers Auto class that loads it
    lora_targets: list[str]
    watched: str  # a QWrapper whose mode and weight the tests follow
    example: Callable[[torch.Generator], dict[str, torch.Tensor]]  # one example, as the Trainer's dataset gives it


LM = "AutoModelForCausalLM"
FAMILIES = {
    "llama": Family(_llama, LM, ["q_proj", "v_proj"], "model.layers.0.self_attn.q_proj", _next_tokens),
    "gpt2": Family(_gpt2, LM, ["c_attn"], "transformer.h.0.attn.c_attn", _next_tokens),
    "bert": Family(
        _bert,
        "AutoModelForSequenceClassification",
        ["query", "value"],
        "bert.encoder.layer.0.attention.self.query",
        _sentence_class,
    ),
    "qwen2": Family(_qwen2, LM, ["q_proj", "v_proj"], "model.layers.0.self_attn.q_proj", _next_tokens),
    "vit": Family(
        _vit, "AutoModelForImageClassification", ["q_proj", "v_proj"], "vit.layers.0.attention.q_proj", _image_class
    ),
    "whisper": Family(  # the targets match the encoder's and decoder's self-attention and the cross-attention
        _whisper,
        "AutoModelForSpeechSeq2Seq",
        ["q_proj", "v_proj"],
        "model.encoder.layers.0.self_attn.q_proj",
        _transcript,
    ),
}


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """Each family's tiny float model, saved once: family -> directory."""
    root = tmp_path_factory.mktemp("hf_training")
    out = {}
    for name, family in FAMILIES.items():
        torch.manual_seed(0)
        path = root / name
        family.build().save_pretrained(path)
        out[name] = path
    return out


def _load(saved, family, **config):
    auto = getattr(transformers, FAMILIES[family].auto)
    config = config or {"weights": "int8", "activations": "int8"}
    return auto.from_pretrained(saved[family], quantization_config=TorchQuantConfig(**config))


class _Data(torch.utils.data.Dataset):
    """``n`` examples of ``family`` (the same on every call)."""

    def __init__(self, family: str, n: int = 8):
        g = torch.Generator().manual_seed(1)
        self.examples = [FAMILIES[family].example(g) for _ in range(n)]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        """The first ``n`` examples, stacked as the Trainer's default collator does."""
        return {k: torch.stack([e[k] for e in self.examples[:n]]) for k in self.examples[0]}


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    return transformers.TrainingArguments(**{**base, **kw})


class _Modes(transformers.TrainerCallback):
    """Records the watched QWrapper's mode at each step begin and each evaluation batch."""

    def __init__(self, name):
        self.name, self.steps, self.evals = name, [], []

    def _mode(self, model):
        return model.get_submodule(self.name).qstate

    def on_step_begin(self, args, state, control, model=None, **kw):
        self.steps.append(self._mode(model))

    def on_prediction_step(self, args, state, control, model=None, **kw):
        self.evals.append(self._mode(model))


def _modes(model):
    return {m.qstate for _, m in iter_qmodules(model)}


# ------------------------------------------------------------------ QAT
@pytest.mark.parametrize("family", list(FAMILIES))
def test_trainer_qat_calibrates_then_trains_quantized(saved, family, tmp_path):
    model = _load(saved, family)
    watched = FAMILIES[family].watched
    assert isinstance(model.get_submodule(watched), QWrapper)
    w0 = model.get_submodule(watched).layer.weight.detach().clone()
    probe = _Modes(watched)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_Data(family),
        callbacks=[QuantizationCallback(calibration_steps=2), probe],
    )
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and math.isfinite(out.training_loss)
    assert probe.steps == [S.CALIBRATION, S.CALIBRATION, S.QUANT_AWARE_TRAIN, S.QUANT_AWARE_TRAIN]
    assert _modes(model) == {S.QUANT_EVAL}
    assert not torch.equal(model.get_submodule(watched).layer.weight, w0)
    obs = observers(model)
    assert obs and all(o.initialized for _, o in obs)
    wrapper = model.get_submodule(watched)
    assert wrapper.input_quantizer is not None and wrapper.input_quantizer.range_observer.initialized


def test_lsq_parameters_train_and_weight_decay_warns(saved, tmp_path):
    """Lazily shaped LSQ steps are in the Trainer's optimizer and train; weight decay on them warns."""
    model = _load(
        saved,
        "llama",
        weights={"quantizer": "lsq", "args": {"n_bits": 4, "axis": 0}},
        activations={"quantizer": "lsq", "args": {"n_bits": 8}},
    )
    names = quantizer_parameter_names(model)
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert "model.layers.0.self_attn.q_proj.input_quantizer.step" in names
    assert q_proj.input_quantizer.step.numel() == 0  # shaped by the first observed batch
    w_step0 = q_proj.weight_quantizer.step.detach().clone()
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, weight_decay=0.1, learning_rate=1e-2),
        train_dataset=_Data("llama"),
        callbacks=[QuantizationCallback(calibration_steps=1)],
    )
    with pytest.warns(UserWarning, match="weight decay to learned quantizer parameters"):
        trainer.train()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for n, p in model.named_parameters() if n in set(names))
    a_step = q_proj.input_quantizer.step
    assert a_step.numel() == 1 and torch.isfinite(a_step).all()
    assert not torch.equal(q_proj.weight_quantizer.step, w_step0)


def test_quantizer_parameters_can_be_left_out_of_weight_decay(saved, tmp_path):
    class QATTrainer(transformers.Trainer):
        def get_decay_parameter_names(self, model):
            skip = set(quantizer_parameter_names(model))
            return [n for n in super().get_decay_parameter_names(model) if n not in skip]

    model = _load(saved, "llama", weights={"quantizer": "lsq", "args": {"n_bits": 4, "axis": 0}})
    trainer = QATTrainer(
        model=model,
        args=_args(tmp_path, max_steps=1, weight_decay=0.1),
        train_dataset=_Data("llama"),
        callbacks=[QuantizationCallback()],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*learned quantizer parameters.*")
        trainer.train()
    owned = {id(p) for n, p in model.named_parameters() if n in set(quantizer_parameter_names(model))}
    for group in trainer.optimizer.param_groups:
        if group["weight_decay"]:
            assert not any(id(p) in owned for p in group["params"])


def test_evaluation_during_training_runs_in_eval_mode(saved, tmp_path):
    model = _load(saved, "llama")
    watched = FAMILIES["llama"].watched
    probe = _Modes(watched)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4),
        train_dataset=_Data("llama"),
        eval_dataset=_Data("llama", n=4),
        callbacks=[QuantizationCallback(calibration_steps=1), probe],
    )
    trainer.train()
    assert probe.evals == [S.QUANT_EVAL, S.QUANT_EVAL]  # one batch at step 2, one at step 4
    assert probe.steps == [S.CALIBRATION, S.QUANT_AWARE_TRAIN, S.QUANT_AWARE_TRAIN, S.QUANT_AWARE_TRAIN]
    assert _modes(model) == {S.QUANT_EVAL}


@pytest.mark.parametrize("calibration_steps", [0, 1])
def test_an_evaluation_on_start_moves_no_range(saved, tmp_path, calibration_steps):
    model = _load(saved, "llama")
    if calibration_steps == 0:
        tq.calibrate(model, [_Data("llama").batch(4)], progress=False)
    probe = _Modes(FAMILIES["llama"].watched)
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, eval_on_start=True, per_device_eval_batch_size=4),
        train_dataset=_Data("llama"),
        eval_dataset=_Data("llama", n=4),
        callbacks=[QuantizationCallback(calibration_steps=calibration_steps), probe],
    )
    trainer.train()
    # it ran in QUANT_AWARE_TRAIN or CALIBRATION: the evaluation data moved the observers
    assert probe.evals[0] == (S.QUANT_EVAL if calibration_steps == 0 else S.BYPASSED)
    assert probe.steps[0] == (S.QUANT_AWARE_TRAIN if calibration_steps == 0 else S.CALIBRATION)


def test_qat_model_saves_reloads_and_resumes(saved, tmp_path):
    model = _load(saved, "llama")
    constant = {"learning_rate": 1e-2, "lr_scheduler_type": "constant"}  # the resumed schedule does not end at 0
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, **constant)
    callback = QuantizationCallback(calibration_steps=1)
    transformers.Trainer(model=model, args=args, train_dataset=_Data("llama"), callbacks=[callback]).train()
    ckpt = tmp_path / "checkpoint-2"
    batch = _Data("llama").batch(2)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    assert _modes(reloaded) == {S.QUANT_AWARE_TRAIN}  # a checkpoint keeps the mode it was saved in
    tq.set_qmodule_state(reloaded, S.QUANT_EVAL)
    assert torch.equal(_logits(reloaded, batch), _logits(model, batch))
    # Resuming: the model from from_pretrained(ckpt), the optimizer and step from the Trainer.
    trainer = transformers.Trainer(
        model=reloaded,
        args=_args(tmp_path, max_steps=3, **constant),
        train_dataset=_Data("llama"),
        callbacks=[QuantizationCallback(calibration_steps=1)],
    )
    w_ckpt = reloaded.get_submodule(FAMILIES["llama"].watched).layer.weight.detach().clone()
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 3
    assert not torch.equal(reloaded.get_submodule(FAMILIES["llama"].watched).layer.weight, w_ckpt)


def test_trainer_resume_alone_restores_quantized_weights(saved, tmp_path):
    model = _load(saved, "llama", weights="int8", activations="int8-minmax")
    args = _args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, learning_rate=1e-2)
    transformers.Trainer(model=model, args=args, train_dataset=_Data("llama")).train()
    fresh = _load(saved, "llama", weights="int8", activations="int8-minmax")
    trainer = transformers.Trainer(model=fresh, args=args, train_dataset=_Data("llama"))
    trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1"))
    watched = FAMILIES["llama"].watched
    assert torch.equal(fresh.get_submodule(watched).layer.weight, model.get_submodule(watched).layer.weight)


def test_sync_observers_under_distributed(saved, tmp_path, monkeypatch):
    model = _load(saved, "llama", weights="int8", activations="int8-minmax")
    monkeypatch.setattr(transformers.TrainingArguments, "world_size", property(lambda self: 2))
    cb = QuantizationCallback()
    cb.on_train_begin(_args(tmp_path), transformers.TrainerState(), transformers.TrainerControl(), model=model)
    assert all(o.distributed_sync for _, o in observers(model))
    model2 = _load(saved, "llama", weights="int8", activations="int8-minmax")
    QuantizationCallback(sync_observers=False).on_train_begin(
        _args(tmp_path), transformers.TrainerState(), transformers.TrainerControl(), model=model2
    )
    assert not any(o.distributed_sync for _, o in observers(model2))


def test_callback_rejects_bad_arguments_and_float_models(tmp_path):
    with pytest.raises(ValueError, match="calibration_steps"):
        QuantizationCallback(calibration_steps=-1)
    with pytest.raises(TypeError, match="QModuleState"):
        QuantizationCallback(train_mode="qat")
    with pytest.raises(ValueError, match="no torchquant QModules"):
        QuantizationCallback().on_train_begin(
            _args(tmp_path), transformers.TrainerState(), transformers.TrainerControl(), model=torch.nn.Linear(2, 2)
        )


# ------------------------------------------------------------------ LoRA
def _quantized_eval(saved, family):
    """A W8A8 model of ``family``, calibrated on one batch, in QUANT_EVAL."""
    model = _load(saved, family)
    tq.calibrate(model, [_Data(family).batch(4)], progress=False)
    tq.set_qmodule_state(model, S.QUANT_EVAL)
    return model


def _logits(model, batch):
    """``model(**batch).logits`` in eval() and without gradients."""
    model.eval()  # the Trainer leaves the model in train(): dropout
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_on_quantized_base(saved, family, tmp_path):
    targets, watched = FAMILIES[family].lora_targets, FAMILIES[family].watched
    model = _quantized_eval(saved, family)
    pm = peft.get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=targets))
    layer = pm.base_model.model.get_submodule(watched)
    assert isinstance(layer, QWrapperLoraLayer) and isinstance(layer.base_layer, QWrapper)

    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    data = _Data(family)
    batch = data.batch(2)
    pm(**batch).loss.backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    pm.zero_grad(set_to_none=True)

    base_state = {k: v.clone() for k, v in pm.state_dict().items() if "lora_" not in k}
    before = _logits(pm, batch)
    lora_before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    transformers.Trainer(model=pm, args=_args(tmp_path, max_steps=1, learning_rate=1e-2), train_dataset=data).train()

    after_state = pm.state_dict()
    assert all(torch.equal(after_state[k], v) for k, v in base_state.items())  # weights and quantizer state
    assert _modes(pm) == {S.QUANT_EVAL}
    assert any(not torch.equal(p, lora_before[n]) for n, p in pm.named_parameters() if p.requires_grad)
    assert all(torch.equal(p, lora_before[n]) for n, p in pm.named_parameters() if "lora_A" in n)  # B was zero
    after = _logits(pm, batch)
    with pm.disable_adapter():
        base = _logits(pm, batch)
    assert torch.equal(base, before)  # LoRA B starts at zero: the untrained adapter changes nothing
    assert not torch.allclose(after, base)

    # Merging: the update goes into the float weight, the quantizer keeps its grid.
    merged = pm.merge_and_unload()
    assert isinstance(merged.get_submodule(watched), QWrapper)
    merged_logits = _logits(merged, batch)
    err = (merged_logits - after).pow(2).mean() / after.pow(2).mean()
    assert err < 1e-3  # the weight quantization of the merged update (SQNR > 30 dB)


def test_saved_adapter_loads_with_enable_lora(saved, tmp_path):
    model = _quantized_eval(saved, "llama")
    pm = peft.get_peft_model(model, lora_config(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = _Data("llama").batch(2)
    expected = _logits(pm, batch)
    pm.save_pretrained(tmp_path / "adapter")
    base = _quantized_eval(saved, "llama")
    config = enable_lora(peft.LoraConfig.from_pretrained(tmp_path / "adapter"))
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter", config=config)
    assert torch.equal(_logits(loaded, batch), expected)


def test_lora_unmerge_restores_the_float_weight(saved):
    model = _quantized_eval(saved, "gpt2")  # Conv1D: the update is written through the transposed view
    pm = peft.get_peft_model(model, lora_config(r=2, target_modules=["c_attn"], init_lora_weights=False))
    layer = pm.base_model.model.get_submodule("transformer.h.0.attn.c_attn")
    w0 = layer.base_layer.layer.weight.detach().clone()
    layer.merge()
    assert torch.allclose(layer.base_layer.weight_view() - w0.t(), layer.get_delta_weight("default"))
    layer.unmerge()
    assert torch.allclose(layer.base_layer.layer.weight, w0, atol=1e-6)


@pytest.mark.parametrize(("family", "targets"), [("gpt2", ["c_attn", "attn.c_proj"]), ("llama", ["q_proj", "o_proj"])])
def test_an_initialisation_that_rewrites_the_base_weight_keeps_the_output(saved, family, targets):
    # PiSSA writes the residual W - s B A into the base: in the Conv1D's own (in, out) layout (it was computed on
    # the transposed matrix: a non-square c_attn failed, a square c_proj moved the logits by 0.14), and observed
    # again (ranges of W clipped the residual)
    w16 = {"quantizer": "affine", "observer": "batch_minmax", "args": {"n_bits": 16, "symmetric": True}}
    model = _load(saved, family, weights={**w16, "observer_args": {"axis": 0}})
    tq.set_qmodule_state(model, S.QUANT_EVAL_WEIGHT_ONLY)
    batch = _Data(family).batch(2)
    before = _logits(model, batch)
    pm = peft.get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa"))
    layer = pm.base_model.model.get_submodule(FAMILIES[family].watched)
    w, residual = layer.base_layer.weight_view(), layer.get_delta_weight("default")
    assert w.shape == residual.shape
    err = (_logits(pm, batch) - before).abs().max() / before.abs().max()
    assert err < 1e-4, float(err)


@pytest.mark.parametrize("init", ["olora", "corda"])
def test_initialisations_that_misread_a_conv1d_are_refused_there(saved, init):
    # peft's OLoRA reads the (in, out) weight as (out, in): logits moved by 16%, a non-square c_attn failed
    model = _load(saved, "gpt2", weights="int8")
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' on QWrapper\\[Conv1D\\]"):
        peft.get_peft_model(model, lora_config(r=4, target_modules=["c_attn"], init_lora_weights=init))


def test_lora_config_is_a_peft_config_and_rejects_what_it_cannot_do():
    cfg = lora_config(r=4, target_modules=["0"])
    assert isinstance(cfg, peft.LoraConfig) and cfg._custom_modules == {QWrapper: QWrapperLoraLayer}
    assert enable_lora(peft.LoraConfig(r=2))._custom_modules == {QWrapper: QWrapperLoraLayer}
    with pytest.raises(TypeError, match="LoraConfig"):
        enable_lora({"r": 2})

    def net():
        return torch.nn.Sequential(
            tq.QWrapper(torch.nn.Linear(4, 4)), tq.QWrapper([torch.nn.Linear(4, 4), torch.nn.ReLU()])
        )

    with pytest.raises(ValueError, match="use_dora"):
        peft.get_peft_model(net(), lora_config(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(ValueError, match="activation after its layer"):
        peft.get_peft_model(net(), lora_config(r=2, target_modules=["1"]))
    conv = torch.nn.Sequential(tq.QWrapper(torch.nn.Conv2d(2, 2, 1)))
    with pytest.raises(ValueError, match="Conv2d takes no adapter"):
        peft.get_peft_model(conv, lora_config(r=2, target_modules=["0"]))


def test_gradient_checkpointing_observes_each_batch_once():
    # transformers' gradient_checkpointing_enable() recomputes each decoder layer in backward: its observers
    # must not see the batch again, and the gradients are those of the run without checkpointing.
    from torchquant.hf import quantize

    runs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = quantize(_llama(), TorchQuantConfig(weights="int4", activations="int8"), initial_state=False)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tq.set_qmodule_state(model, S.QUANT_AWARE_TRAIN)
        model.train()
        grads = []
        for i in range(2):
            ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(i))
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            grads += [p.grad.clone() for p in model.parameters() if p.grad is not None]
        runs.append((model.state_dict(), grads))
    (state, grads), (state_ckpt, grads_ckpt) = runs
    counts = [k for k in state if k.endswith("num_batches")]
    assert counts and all(int(state_ckpt[k]) == int(state[k]) for k in counts)
    assert len(grads) == len(grads_ckpt) and all(torch.allclose(g, h, atol=1e-6) for g, h in zip(grads, grads_ckpt))
