"""ONNX export of torchquant.hf models: Q/DQ at every point, attention's included, in parity with the simulation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

from hf_tiny import VOCAB, bert_config, gpt2_config, llama_config  # noqa: E402

import torchquant as tq  # noqa: E402
from torchquant.hf import TorchQuantConfig, quantize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

W8A8_ATTENTION = TorchQuantConfig(weights="int8", activations="int8", attention="int8", attention_probs="int8")


class Logits(nn.Module):
    """What ONNX gets: token ids in, logits out; ``with_mask`` passes an all-ones attention mask."""

    def __init__(self, model: nn.Module, with_mask: bool = True) -> None:
        super().__init__()
        self.model, self.with_mask = model, with_mask

    def forward(self, input_ids):
        mask = torch.ones_like(input_ids) if self.with_mask else None
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def _calibrated(model: nn.Module, config: TorchQuantConfig) -> nn.Module:
    torch.manual_seed(0)
    model = quantize(model.eval(), config)
    tq.calibrate(model, [torch.randint(0, VOCAB, (4, 12)) for _ in range(3)])
    tq.set_qmodule_state(model, tq.QModuleState.QUANT_EVAL)
    return model


@pytest.mark.parametrize(
    ("family", "build", "n_points"),
    [
        ("llama", lambda: transformers.LlamaForCausalLM(llama_config()), 22),
        ("gpt2", lambda: transformers.GPT2LMHeadModel(gpt2_config()), 16),  # Conv1D layers
    ],
)
def test_a_causal_lm_with_attention_points_exports_in_parity(family, build, n_points):
    torch.manual_seed(0)
    model = Logits(_calibrated(build(), W8A8_ATTENTION))
    ids = torch.randint(0, VOCAB, (2, 12))
    proto = tq.export.to_onnx(model, ids[:1])
    report = tq.export.check_parity(model, proto, ids)
    assert report.passed(), report.failures()
    assert report.divergence is None and report.unchecked == []
    # The layers' inputs and the attention's own points (queries, keys, values, probabilities).
    names = set(report.points)
    assert any(n.endswith("input_quantizer") for n in names) and any(".attn_quantizer." in n for n in names)
    assert len(names) == n_points, sorted(names)
    assert all(a.max_steps == 0 for a in report.points.values())


def test_a_bfloat16_model_exports_as_its_float32_copy_in_parity():
    # A language model loaded in bfloat16: the graph computes in float32 with the model's grids.
    torch.manual_seed(0)
    model = quantize(transformers.LlamaForCausalLM(llama_config()).to(torch.bfloat16).eval(), W8A8_ATTENTION)
    tq.calibrate(model, [torch.randint(0, VOCAB, (4, 12)) for _ in range(3)], progress=False)
    tq.set_qmodule_state(model, tq.QModuleState.QUANT_EVAL)
    model = Logits(model)
    ids = torch.randint(0, VOCAB, (2, 12))
    with pytest.warns(UserWarning, match="torch.bfloat16; the ONNX graph computes in float32"):
        proto = tq.export.to_onnx(model, ids[:1])
    assert next(model.parameters()).dtype == torch.bfloat16
    report = tq.export.check_parity(model, proto, ids)
    assert report.passed(), report.failures()
    assert len(report.points) == 22 and report.unchecked == []


def test_a_sequence_axis_made_dynamic_serves_other_lengths():
    model = Logits(_calibrated(transformers.LlamaForCausalLM(llama_config()), W8A8_ATTENTION))
    axes = {"input0": {0: "batch", 1: "sequence"}, "output0": {0: "batch", 1: "sequence"}}
    proto = tq.export.to_onnx(model, torch.randint(0, VOCAB, (1, 12)), dynamic_axes=axes)
    for length in (5, 20):
        report = tq.export.check_parity(model, proto, torch.randint(0, VOCAB, (2, length)))
        assert report.passed(), (length, report.failures())
        assert report.outputs["output0"].size == 2 * length * VOCAB
    with pytest.raises(ValueError, match=r"dynamic_axes names \['ids'\]"):
        tq.export.to_onnx(model, torch.randint(0, VOCAB, (1, 12)), dynamic_axes={"ids": {1: "sequence"}})


def test_without_an_attention_mask_the_error_says_to_pass_one():
    model = Logits(_calibrated(transformers.LlamaForCausalLM(llama_config()), W8A8_ATTENTION), with_mask=False)
    with pytest.raises(RuntimeError, match=r"aten::diff.*attention_mask=torch.ones_like\(input_ids\)"):
        tq.export.to_onnx(model, torch.randint(0, VOCAB, (1, 12)))


def test_an_encoder_exports_in_parity_with_its_unused_pooler_listed_unchecked():
    torch.manual_seed(0)
    model = _calibrated(transformers.BertModel(bert_config()), TorchQuantConfig(weights="int8", activations="int8"))

    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids):
            return self.bert(input_ids=input_ids).last_hidden_state

    net = Hidden().eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    report = tq.export.check_parity(net, tq.export.to_onnx(net, ids[:1]), ids)
    assert report.passed(), report.failures()
    # The pooler runs in the simulation, but no output uses it: the exporter drops it, unchecked.
    assert report.unchecked == ["bert.pooler.dense.input_quantizer", "bert.pooler.dense.weight_quantizer"]
