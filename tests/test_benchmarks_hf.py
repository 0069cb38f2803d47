"""benchmarks/hf.py: every perplexity row and every MiniLM row runs on tiny random models.

The real-weight run is the benchmark itself; here each row builder must produce a model
whose quantizers are in the mode the row names and whose perplexity is finite.
"""

import math

import benchmark_script
import pytest
import torch

import torchquant as tq
from torchquant.bench import lm

transformers = pytest.importorskip("transformers")
from torchquant.hf import QAttention  # noqa: E402

hf = benchmark_script.load("hf")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=128,  # divisible by the W4 rows' group sizes; heads of 32 for the KV-cache rows' groups
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("row", hf.LM_ROWS, ids=[r.name for r in hf.LM_ROWS])
def test_lm_row_builds_and_evaluates(tiny_llama, row):
    ids = torch.randint(0, 64, (96,), generator=torch.Generator().manual_seed(1))
    calib = lm.calibration_batches(None, ids, 2, 16)
    model = row.build(hf.copy.deepcopy(tiny_llama), calib, False)
    ppl = lm.perplexity(model, None, ids, seq_len=32, progress=False)
    assert math.isfinite(ppl)
    wrappers = {n: m for n, m in model.named_modules() if isinstance(m, tq.QWrapper)}
    if row.name == "float":
        assert not wrappers
        return
    if row.name.startswith("config"):  # through TorchQuantConfig: every QModule ready to evaluate
        assert "lm_head" not in wrappers
        assert set(tq.get_qmodule_states(model).values()) == {tq.QModuleState.QUANT_EVAL}
        if "KV cache" in row.name:
            assert not wrappers
            assert sum(isinstance(m, QAttention) for m in model.modules()) == 2
        return
    assert "lm_head" not in wrappers and len(wrappers) == 2 * 7
    states = {m.qstate for m in wrappers.values()}
    want = tq.QModuleState.QUANT_EVAL if "A8" in row.name else tq.QModuleState.QUANT_EVAL_WEIGHT_ONLY
    assert states == {want}
    if "residual outputs float" in row.name:
        assert all((m.acts_quantizer is None) == n.endswith(("o_proj", "down_proj")) for n, m in wrappers.items())


def test_minilm_rows_and_closeness_on_a_tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    bert = transformers.BertModel(config).eval()
    batch = {"input_ids": torch.randint(0, 50, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long)}
    batch["attention_mask"][0, 7:] = 0
    ref = hf.hidden_and_embeddings(bert, [batch])
    assert ref[0].shape == (37, 32) and ref[1].shape == (4, 32)
    same = hf.closeness("float", ref, ref, 0.0)
    assert same.cosine_mean == pytest.approx(1.0) and same.sqnr_db == math.inf
    for name, acts in hf.MINILM_ROWS:
        q = tq.quantize_model(hf.copy.deepcopy(bert), hf.w8_per_channel, acts, method="swap")
        tq.calibrate(q, [batch], progress=False)
        tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
        r = hf.closeness(name, ref, hf.hidden_and_embeddings(q, [batch]), 0.0)
        assert r.cosine_mean > 0.9 and 0 < r.sqnr_db < math.inf, name  # close to float, yet quantized
