"""QuaRot (torchquant.ptq.rotate) and the Hadamard primitives (torchquant.hadamard)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math

import pytest
import torch
from torch import nn

import torchquant as tq
from torchquant.hadamard import hadamard, hadamard_factors, hadamard_transform, random_hadamard
from torchquant.layers import norm_gain_offset
from torchquant.qmodules import HadamardTransform

pytestmark = pytest.mark.usefixtures("one_thread")

ORDERS = [1, 2, 4, 12, 36, 64, 576, 1536]
W8 = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0), symmetric=True)  # noqa: E731


# ----------------------------------------------------------------------------- Hadamard matrices
@pytest.mark.parametrize("n", ORDERS, ids=lambda n: f"n{n}")
def test_hadamard_is_plus_minus_one_and_orthogonal(n):
    H = hadamard(n, dtype=torch.float64)
    assert H.shape == (n, n) and torch.equal(H.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_hadamard_factors_take_the_largest_power_of_two():
    assert hadamard_factors(576) == (36, 16)  # Paley II, q = 17
    assert hadamard_factors(1536) == (12, 128)  # Paley I, q = 11
    assert hadamard_factors(64) == (1, 64)
    assert hadamard_factors(20) == (20, 1)  # Paley I, q = 19


@pytest.mark.parametrize("n", [6, 3, 0, 10])
def test_hadamard_of_an_unsupported_order_raises(n):
    with pytest.raises(ValueError, match=f"order {n}|positive int"):
        hadamard(n)


@pytest.mark.parametrize("n", [2, 12, 36, 64, 576, 1536, 52, 100, 344, 688, 1376], ids=lambda n: f"n{n}")
def test_fast_transform_equals_the_matrix_product(n):  # 52 and later: bases over prime-power fields
    x = torch.randn(2, 3, n, dtype=torch.float64)
    expected = x @ hadamard(n, dtype=torch.float64) / n**0.5
    torch.testing.assert_close(hadamard_transform(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(HadamardTransform(n).double()(x), expected, rtol=0, atol=1e-12)


def test_random_hadamard_is_orthogonal_and_seeded():
    Q = random_hadamard(36, seed=5)
    torch.testing.assert_close(Q @ Q.T, torch.eye(36, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(Q, random_hadamard(36, seed=5)) and not torch.equal(Q, random_hadamard(36, seed=6))
    assert torch.equal((Q * 6).abs(), torch.ones(36, 36, dtype=torch.float64))


def test_hadamard_transform_module_traces_with_fx_and_stays_out_of_the_state_dict():
    t = HadamardTransform(12)
    gm = torch.fx.symbolic_trace(t)
    x = torch.randn(4, 12)
    torch.testing.assert_close(gm(x), t(x))
    assert t.state_dict() == {}
    assert repr(HadamardTransform(576)) == "HadamardTransform(n=576 (Paley 36 x Sylvester 16))"
    assert repr(HadamardTransform(64)) == "HadamardTransform(n=64 (Sylvester))"


def _smallest_prime_factors(limit: int) -> list[int]:
    spf = list(range(limit + 1))
    for d in range(2, math.isqrt(limit) + 1):
        if spf[d] == d:
            for k in range(d * d, limit + 1, d):
                spf[k] = min(spf[k], d)
    return spf


def test_hadamard_factors_of_every_order_up_to_2_to_the_14():
    # independent of torchquant: a base order is 1, q + 1 (q a prime power ≡ 3 mod 4) or 2 (q + 1) (≡ 1 mod 4)
    limit = 2**14
    spf = _smallest_prime_factors(limit)

    def prime_power(q: int) -> bool:
        while q > 1 and q % spf[q] == 0 and q // spf[q] % spf[q] == 0:
            q //= spf[q]
        return q > 1 and spf[q] == q

    def base_order(m: int) -> bool:
        if m == 1:
            return True
        q1, q2 = m - 1, m // 2 - 1
        return m % 4 == 0 and ((q1 % 4 == 3 and prime_power(q1)) or (q2 % 4 == 1 and prime_power(q2)))

    for n in range(1, limit + 1):
        twos = [2**k for k in range(15) if n % 2**k == 0][::-1]
        expected = next(((n // p, p) for p in twos if base_order(n // p)), None)
        if expected is None:
            with pytest.raises(ValueError, match=f"order {n}"):
                hadamard_factors(n)
        else:
            assert hadamard_factors(n) == expected, n
    assert hadamard_factors(11008) == (344, 32)  # Paley I over GF(7^3), not 5504 x 2 (Paley I over GF(5503))
    assert [hadamard_factors(n) for n in (52, 100, 688, 6400)] == [(52, 1), (100, 1), (344, 2), (100, 64)]


def test_every_base_matrix_up_to_1100_is_hadamard():
    # H = H_m (x) S_p and S_p S_p^T = p I, so this makes H H^T = n I for every order whose base is <= 1100
    bases = set()
    for n in range(1, 1101):
        with contextlib.suppress(ValueError):
            bases.add(hadamard_factors(n)[0])
    assert {52, 100, 244, 340, 344} <= bases  # over GF(5^2), GF(7^2), GF(3^5), GF(13^2), GF(7^3)
    for m in sorted(bases):
        H = hadamard(m)  # float32 sums of ±1 up to 1100 are exact
        assert hadamard_factors(m) == (m, 1) and torch.equal(H.abs(), torch.ones(m, m)), m
        assert torch.equal(H @ H.T, m * torch.eye(m)), m


@pytest.mark.parametrize(
    ("n", "digest"),
    [
        (12, "d1026a5e7abe32ab"),
        (28, "e9a79502895728a8"),
        (36, "41a3f7927fa274b5"),
        (108, "e9458e07a082d294"),
        (1536, "a5654473c09a83a2"),
    ],
)
def test_prime_field_matrices_are_the_ones_checkpoints_were_rotated_with(n, digest):
    # quarot checkpoints hold weights folded with H; the online transform is rebuilt from n on loading.
    # 28 stays Paley II over GF(13) rather than Paley I over GF(3^3)
    H = hadamard(n, dtype=torch.int8)
    assert hashlib.sha256(bytes((H.flatten() > 0).tolist())).hexdigest()[:16] == digest


def test_fast_transform_of_llama_2_7b_mlp_width_equals_the_matrix_product_in_float32():
    n = 11008
    H = hadamard(n, dtype=torch.int8)  # 121 MB; float64 would be 970 MB
    x = torch.randn(4, n, dtype=torch.float64)
    expected = torch.cat([x @ H[:, j : j + 1376].double() for j in range(0, n, 1376)], 1) / n**0.5
    torch.testing.assert_close(hadamard_transform(x.float()).double(), expected, rtol=0, atol=1e-5)
    t = HadamardTransform(n)
    assert t.base.shape == (344, 344)
    torch.testing.assert_close(torch.fx.symbolic_trace(t)(x.float()).double(), expected, rtol=0, atol=1e-5)


def test_qwrapper_input_transform_runs_before_the_input_quantizer():
    lin = nn.Linear(12, 3)
    w = tq.QWrapper(lin, input_quantizer=tq.AffineQuantizer(4, tq.RunningMinMax()))
    w.input_transform = HadamardTransform(12)
    seen = []
    w.input_quantizer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(5, 12)
    tq.set_qmodule_state(w, tq.QModuleState.CALIBRATION)
    w(x)
    tq.set_qmodule_state(w, tq.QModuleState.QUANT_EVAL)
    w(x)
    torch.testing.assert_close(seen[-1], hadamard_transform(x))
    with pytest.raises(TypeError, match=r"input_transform must be an nn\.Module"):
        w.input_transform = lambda x: x
    with pytest.raises(ValueError, match="takes no input_transform"):
        tq.QWrapper(nn.Embedding(4, 12)).input_transform = HadamardTransform(12)


def test_qwrapper_with_an_input_transform_exports_to_onnx_within_one_step(tmp_path):
    pytest.importorskip("onnxruntime")
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 4)).eval()
    q = tq.quantize_model(net, W8, lambda m, n: tq.AffineQuantizer(8, tq.RunningMinMax()), method="swap")
    q[2].input_transform = HadamardTransform(24)
    data = [torch.randn(16, 12) for _ in range(2)]
    tq.calibrate(q, data, progress=False)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    tq.export.to_onnx(q, data[0][:1], tmp_path / "m.onnx")
    assert tq.export.check_parity(q, tmp_path / "m.onnx", data[0]).failures() == []


# ----------------------------------------------------------------------------- tiny Llama models
transformers = pytest.importorskip("transformers")
from hf.hf_tiny import VOCAB, gemma2_config, gemma_config, llama_config, mistral_config, qwen2_config  # noqa: E402

import torchquant.hf as tqh  # noqa: E402

W4 = lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0), symmetric=True)  # noqa: E731


def _tiny(config_fn=llama_config, outliers: bool = False, **kw) -> nn.Module:
    """A tiny causal LM with norm weights away from one (so fusing them matters); with ``outliers``,
    as in trained LLMs: one residual channel and one intermediate channel of every MLP 30x larger
    than the rest, and one input column of the layers reading the residual 10x larger."""
    torch.manual_seed(0)
    base = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config_fn(**{**base, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        if outliers:
            model.model.embed_tokens.weight[:, 7] *= 30.0
            for layer in model.model.layers:
                layer.mlp.up_proj.weight[11] *= 30.0
                layer.mlp.gate_proj.weight[11] *= 3.0
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.up_proj):
                    lin.weight[:, 3] *= 10.0
    return model


def _ids(n: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max())


def _swap(model: nn.Module) -> nn.Module:
    return tq.quantize_model(model, W4, None, method="swap")


VARIANTS = {
    "llama": dict(),
    "llama-tied": dict(tie_word_embeddings=True),
    "llama-bias-mlp-bias": dict(attention_bias=True, mlp_bias=True),
    "qwen2": dict(config_fn=qwen2_config),
    "mistral": dict(config_fn=mistral_config),
    "gemma": dict(config_fn=gemma_config, head_dim=12, tie_word_embeddings=True),  # norms multiply by 1 + weight
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quarot_keeps_the_float_logits(variant):
    model = _tiny(**VARIANTS[variant])
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    q = _swap(model)
    res = tq.ptq.quarot(q, [ids])
    assert res.max_error < 1e-5
    assert len(res.online) == len(res.values) == 2 and res.keys == ()  # no QAttention: keys stay
    with torch.no_grad():
        out = q(ids).logits
    assert _close(out, ref)
    tied = VARIANTS[variant].get("tie_word_embeddings", False)
    assert res.untied == tied
    assert q.lm_head.weight is not q.model.embed_tokens.weight
    assert q.config.tie_word_embeddings is False
    gain = 1.0 - norm_gain_offset(q.model.layers[0].input_layernorm)  # the weight that makes the gain one
    for layer in q.model.layers:
        assert torch.equal(layer.input_layernorm.weight, torch.full((48,), gain))
        assert isinstance(layer.mlp.down_proj.input_transform, HadamardTransform)


def test_quarot_through_hf_quantize_rotates_queries_and_keys_in_qattention():
    model = _tiny(tie_word_embeddings=True)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    cfg = tqh.TorchQuantConfig(weights="int4", activations="int4-dynamic", kv_cache="int4-g4")
    q = tqh.quantize(model, cfg, initial_state=False)
    res = tq.ptq.quarot(q, [ids])
    assert res.keys == res.values == ("model.layers.0.self_attn", "model.layers.1.self_attn")
    assert isinstance(q.model.layers[0].self_attn.attn_quantizer.head_rotation, HadamardTransform)
    with torch.no_grad():
        assert _close(q(ids).logits, ref)
    assert "HadamardTransform+Linear" in tq.summary(q) and "after HadamardTransform(query, key)" in tq.summary(q)


@pytest.mark.parametrize("online, kv", [(False, False), (True, False), (False, True)])
def test_each_part_alone_keeps_the_logits(online, kv):
    model = _tiny()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    q = _swap(model)
    res = tq.ptq.quarot(q, [ids], online_down_proj=online, kv_hadamard=kv)
    assert bool(res.online) == online and bool(res.values) == kv
    assert (q.model.layers[0].mlp.down_proj.input_transform is not None) == online
    with torch.no_grad():
        assert _close(q(ids).logits, ref)


def test_residual_rotation_is_the_seeded_random_hadamard():
    model = _tiny()
    E = model.model.embed_tokens.weight.detach().clone().double()
    q = _swap(model)
    tq.ptq.quarot(q, seed=3)  # data-free
    Q = random_hadamard(48, seed=3)
    torch.testing.assert_close(q.model.embed_tokens.layer.weight.double(), (E @ Q).float().double())
    other = tq.ptq.quarot(_swap(_tiny()), seed=4)
    assert other.max_error < 1e-5  # checked on 16 random tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_data_free_check_tolerates_half_precision_rounding(dtype):
    """Without data the float logits of 16 random tokens are checked; a half-precision model's own rounding
    (about 0.006 relative in bfloat16, 0.001 in float16) is within the default tolerance, which follows the
    embedding's dtype, and an explicit tolerance below it still fails."""
    res = tq.ptq.quarot(_swap(_tiny().to(dtype)))
    assert 0 < res.max_error < 8 * torch.finfo(dtype).eps
    with pytest.raises(RuntimeError, match="changed by"):
        tq.ptq.quarot(_swap(_tiny().to(dtype)), check_tol=1e-6)


def test_quarot_lowers_the_outlier_ratio_of_what_input_quantizers_see():
    model = _tiny(outliers=True)
    ids = _ids(4, 32)

    def per_token(x: torch.Tensor) -> torch.Tensor:
        """The largest ``max_c |x_c| / rms_c(x)`` over tokens: what a per-token grid spends on outliers."""
        return (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).max()

    def ratios(q):
        """Outlier ratios of the down_proj inputs and of the residual, as quantizers see them."""
        down, resid = [], []
        hooks = []
        for layer in q.model.layers:
            d = layer.mlp.down_proj

            def pre(m, args, out=down):
                x = args[0] if m.input_transform is None else m.input_transform(args[0])
                out.append(per_token(x))

            hooks.append(d.register_forward_pre_hook(pre))
            hooks.append(layer.register_forward_hook(lambda m, a, o: resid.append(per_token(o))))
        with torch.no_grad():
            q(ids)
        for h in hooks:
            h.remove()
        return float(max(down)), float(max(resid))

    plain = _swap(copy.deepcopy(model))
    rotated = _swap(model)
    tq.ptq.quarot(rotated, [ids])
    (d0, r0), (d1, r1) = ratios(plain), ratios(rotated)
    # One channel holding nearly all of a token's energy gives a ratio of sqrt(channels), the largest
    # possible: before, the outliers reach it (measured 9.8 of sqrt(96), 6.8 of sqrt(48)).
    assert d0 > 0.9 * 96**0.5 and r0 > 0.9 * 48**0.5
    # After, the energy is spread as in a Gaussian vector (measured 3.8, 3.5).
    assert d1 < d0 / 2.5 and r1 < r0 / 1.8 and max(d1, r1) < 4.5


def _sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean()))


def test_w4a4_error_is_much_lower_after_quarot_and_calibration():
    model = _tiny(outliers=True)
    calib, ids = [_ids(4, 32, seed=s) for s in range(2)], _ids(4, 32, seed=9)
    with torch.no_grad():
        ref = model(ids).logits
    cfg = tqh.TorchQuantConfig(weights="int4", activations="int4-dynamic")
    results = {}
    for rotate in (False, True):
        q = tqh.quantize(copy.deepcopy(model), cfg, initial_state=False)
        if rotate:
            tq.ptq.quarot(q, calib[:1])
        tq.calibrate(q, calib, progress=False)
        tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
        with torch.no_grad():
            results[rotate] = _sqnr_db(q(ids).logits, ref)
    # measured: 10.2 dB -> 15.2 dB (W4 alone 10.9 -> 17.3, A4 alone 16.5 -> 20.6)
    assert results[True] > results[False] + 4, results  # at least 2.5x less error power


def test_save_and_load_rebuild_the_rotated_model(tmp_path):
    model = _tiny(tie_word_embeddings=True)
    ids = _ids()
    q = _swap(copy.deepcopy(model))
    tq.ptq.quarot(q, [ids])
    tq.calibrate(q, [ids], progress=False)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    with torch.no_grad():
        expected = q(ids).logits
    tq.save(q, tmp_path / "rotated.safetensors")
    loaded = tq.load(_tiny(tie_word_embeddings=True), tmp_path / "rotated.safetensors")
    assert isinstance(loaded.model.layers[1].mlp.down_proj.input_transform, HadamardTransform)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)


def test_a_failed_check_restores_the_model_and_its_config():
    model = _swap(_tiny(tie_word_embeddings=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="changed by"):
        tq.ptq.quarot(model, [_ids()], check_tol=1e-30)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.lm_head.weight is model.model.embed_tokens.layer.weight
    assert model.config.tie_word_embeddings is True
    assert model.model.layers[0].mlp.down_proj.input_transform is None


def test_quarot_refuses_models_it_does_not_understand():
    net = tq.quantize_model(nn.Sequential(nn.Linear(4, 4)), W4, None, method="swap")
    with pytest.raises(ValueError, match="Llama-layout"):
        tq.ptq.quarot(net)
    with pytest.raises(ValueError, match=r"the head_dim of model\.layers\.0\.self_attn is 10: .*no Hadamard matrix"):
        tq.ptq.quarot(_swap(_tiny(hidden_size=40, num_attention_heads=4)))  # 40 = 20 x 2 is fine, 10 is not
    tq.ptq.quarot(_swap(_tiny(hidden_size=40, num_attention_heads=4)), kv_hadamard=False)
    with pytest.raises(ValueError, match="seed must be an int"):
        tq.ptq.quarot(_swap(_tiny()), seed=1.5)
    gemma2 = _swap(_tiny(gemma2_config, head_dim=12))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.pre_feedforward_layernorm is a Gemma2RMSNorm outside"):
        tq.ptq.quarot(gemma2)


def test_save_pretrained_and_from_pretrained_rebuild_the_rotated_model(tmp_path):
    model = _tiny(tie_word_embeddings=True)
    ids = _ids()
    cfg = tqh.TorchQuantConfig(weights="int4", activations="int4-dynamic", kv_cache="int4-g4")
    q = tqh.quantize(model, cfg, initial_state=False)
    tq.ptq.quarot(q, [ids])
    tq.calibrate(q, [ids], progress=False)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    with torch.no_grad():
        expected = q(ids).logits
    q.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.tie_word_embeddings is False
    assert isinstance(loaded.model.layers[0].mlp.down_proj.input_transform, HadamardTransform)
    assert isinstance(loaded.model.layers[0].self_attn.attn_quantizer.head_rotation, HadamardTransform)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)


def test_weight_ranges_observed_before_quarot_are_observed_again():
    model = _tiny(outliers=True)
    ids = _ids()
    cfg = tqh.TorchQuantConfig(weights="int4")
    observed = tqh.quantize(copy.deepcopy(model), cfg)  # weights observed, QUANT_EVAL
    tq.ptq.quarot(observed, [ids])
    later = tqh.quantize(copy.deepcopy(model), cfg, initial_state=False)
    tq.ptq.quarot(later, [ids])
    tq.calibrate(later, [ids], progress=False)
    tq.set_qmodule_state(later, tq.QModuleState.QUANT_EVAL)
    with torch.no_grad():
        torch.testing.assert_close(observed(ids).logits, later(ids).logits)


def test_awq_after_quarot_clips_down_proj_on_the_rotated_rows_it_reads(monkeypatch):
    import sys

    awq_module = sys.modules["torchquant.ptq.awq"]
    model = tqh.quantize(_tiny(outliers=True), tqh.TorchQuantConfig(weights="int4-g16"), initial_state=False)
    ids = _ids()
    tq.ptq.quarot(model, [ids])
    down = model.model.layers[0].mlp.down_proj
    read = []
    down.register_forward_pre_hook(lambda m, a: read.append(m.input_transform(a[0]).reshape(-1, a[0].shape[-1])))
    with tq.qmodule_state(model, tq.QModuleState.BYPASSED), torch.no_grad():
        model(ids)
    scored = {}
    search = awq_module._search_clip
    monkeypatch.setattr(awq_module, "_search_clip", lambda w, X, *a: (scored.setdefault(w, X), search(w, X, *a))[1])
    res = tq.ptq.awq(model, [ids], progress=False)
    assert "transforms its input online (HadamardTransform" in res.skipped["model.layers.0.mlp.down_proj"]
    X, R = scored[down].double(), read[0].double()  # every token sampled: the same rows, reordered
    assert X.shape == R.shape
    torch.testing.assert_close(X.T @ X, R.T @ R, rtol=1e-5, atol=1e-6)


def test_rotating_a_rotated_model_is_refused():
    model = _swap(_tiny(num_hidden_layers=1))
    tq.ptq.quarot(model, [_ids()])
    with pytest.raises(ValueError, match="quarot: the model is already rotated"):
        tq.ptq.quarot(model, [_ids()])


def test_quarot_after_smoothquant_warns_that_it_undoes_the_scaling():
    model = tq.quantize_model(
        _tiny(num_hidden_layers=1),
        W4,
        lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax()) if n.endswith("proj") else None,
        method="swap",
    )
    for _, m in tq.iter_qmodules(model):  # the inputs of the layers are what SmoothQuant balances
        if isinstance(m, tq.QWrapper):
            m.input_quantizer, m.acts_quantizer = m.acts_quantizer, None
    tq.ptq.smoothquant(model, [_ids()], progress=False)
    with pytest.warns(UserWarning, match="quarot: smoothquant ran before"):
        tq.ptq.quarot(model, [_ids()])


def test_a_model_on_the_meta_device_is_refused_naming_a_parameter():
    with torch.device("meta"):
        model = _swap(_tiny(num_hidden_layers=1))
    for algorithm in (tq.ptq.quarot, tq.calibrate):
        with pytest.raises(ValueError, match=r"model\.embed_tokens\..*weight .*meta device"):
            algorithm(model, [_ids()])


def test_checkpoints_rebuild_online_transforms_with_the_base_orders_they_were_rotated_with(tmp_path):
    """104 = 52 * 2 over GF(25) now, 104 * 1 over GF(103) before prime powers: a checkpoint records its base
    orders, and one without them (written before) gets the prime-field factorisation it was rotated with."""
    from torchquant.ptq import rotate

    assert hadamard_factors(104) == (52, 2) and hadamard_factors(104, prime_fields=True) == (104, 1)
    ids = _ids()
    q = _swap(_tiny(num_hidden_layers=1, intermediate_size=104))
    tq.ptq.quarot(q, [ids])
    (record,) = [r for r in q._tq_conversions if r["kind"] == rotate.CONVERSION_KIND]
    assert record["bases"] == {"104": 52}
    tq.calibrate(q, [ids], progress=False)
    tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
    with torch.no_grad():
        expected = q(ids).logits
    tq.save(q, tmp_path / "rotated.safetensors")
    loaded = tq.load(_tiny(num_hidden_layers=1, intermediate_size=104), tmp_path / "rotated.safetensors")
    assert loaded.model.layers[0].mlp.down_proj.input_transform.base_order == 52
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
    old = _swap(_tiny(num_hidden_layers=1, intermediate_size=104))
    rotate._replay(old, {k: v for k, v in record.items() if k != "bases"}, None)
    legacy = old.model.layers[0].mlp.down_proj.input_transform
    assert legacy.base_order == 104
    x = torch.randn(3, 104, dtype=torch.float64)
    torch.testing.assert_close(legacy.double()(x), x @ hadamard(104, dtype=torch.float64, base_order=104) / 104**0.5)
