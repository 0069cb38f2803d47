"""benchmarks/moe_ptq.py: the upcycled Mixtral computes the dense model; the banks-at-RTN rows leave them alone.

The real-weight run (SmolLM2-135M) is the benchmark itself.
"""

import copy
import warnings

import benchmark_script
import pytest
import torch

import torchquant as tq
from torchquant.hf import TorchQuantConfig, quantize

transformers = pytest.importorskip("transformers")
from hf.hf_tiny import VOCAB, llama_config  # noqa: E402  (tests/hf, a namespace package)

bench = benchmark_script.load("moe_ptq")


def _dense():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config(hidden_size=64, intermediate_size=128)).eval()


def test_the_upcycled_mixtral_computes_the_dense_model():
    dense = _dense()
    moe = bench.upcycle(dense, experts=4, top_k=2)
    assert isinstance(moe, transformers.MixtralForCausalLM)
    experts = moe.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 256, 64) and experts.down_proj.shape == (4, 64, 128)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.allclose(moe(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)


def test_gptq_without_banks_leaves_the_banks_to_round_to_nearest():
    moe = bench.upcycle(_dense(), experts=4, top_k=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tq.FloatLayersWarning)
        quantize(moe, TorchQuantConfig(weights="int4-g32"))
    experts = moe.model.layers[0].mlp.experts
    banks = copy.deepcopy(experts.layer.state_dict())
    quantizers = dict(experts.quantizers())
    calib = [torch.randint(0, VOCAB, (1, 16))]
    bench._without_banks(bench._gptq)(moe, calib)
    assert dict(experts.quantizers()) == quantizers  # put back
    assert all(torch.equal(v, experts.layer.state_dict()[k]) for k, v in banks.items())
    assert not torch.equal(
        moe.model.layers[0].self_attn.q_proj.layer.weight, _dense().model.layers[0].self_attn.q_proj.weight
    )


def test_the_w8a8_rows_calibrate_activations_and_smoothquant_reaches_the_experts(monkeypatch):
    """The W8A8 rows run on a tiny upcycled model (the real run is the benchmark): SmoothQuant folds the
    experts' first input with the router and every expert's down_proj input."""
    seen = {}

    def spy(model, calib):
        seen["result"] = tq.ptq.smoothquant(model, calib, progress=False)

    moe = bench.upcycle(_dense(), experts=4, top_k=2)
    calib = [torch.randint(0, VOCAB, (1, 16)) for _ in range(2)]
    q = copy.deepcopy(moe)
    quantize(q, TorchQuantConfig(weights="int8", activations="int8"), initial_state=False)
    spy(q, calib)
    tq.calibrate(q, calib, progress=False)
    folded = seen["result"].folded
    assert "model.layers.0.mlp.experts.gate_up_proj" in folded
    assert {f"model.layers.0.mlp.experts.down_proj[{e}]" for e in range(4)} <= set(folded)
