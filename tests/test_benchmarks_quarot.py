"""benchmarks/quarot.py: every row builds, on a tiny random Llama, a model in QUANT_EVAL with finite perplexity.

The real-weight run (SmolLM2-135M) is the benchmark itself.
"""

import math

import benchmark_script
import pytest
import torch

import torchquant as tq
from torchquant.bench import lm

transformers = pytest.importorskip("transformers")
from hf.hf_tiny import VOCAB, llama_config  # noqa: E402  (tests/hf, a namespace package)

bench = benchmark_script.load("quarot")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("row", bench.ROWS, ids=lambda r: r[0])
def test_row_builds_a_quantized_model_with_finite_perplexity(row):
    _, weights, activations, rotate, gptq = row
    torch.manual_seed(0)
    # widths that groups of 64 divide
    model = transformers.LlamaForCausalLM(llama_config(hidden_size=128, intermediate_size=256)).eval()
    ids = torch.randint(0, VOCAB, (64,), generator=torch.Generator().manual_seed(1))
    calib = lm.calibration_batches(None, ids, 1, 16)
    q = bench.quantized(model, weights, activations, rotate, gptq, calib)
    modes = {m.qstate for _, m in tq.iter_qmodules(q)}
    assert modes == (set() if weights is None and activations is None else {tq.QModuleState.QUANT_EVAL})
    assert (getattr(q.model.layers[0].mlp.down_proj, "input_transform", None) is not None) == rotate
    assert math.isfinite(lm.perplexity(q, None, ids, seq_len=32, progress=False))
