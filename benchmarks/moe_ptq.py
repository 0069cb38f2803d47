"""GPTQ and AWQ on mixture-of-experts banks, measured on real weights: SmolLM2-135M upcycled into a Mixtral.

No mixture-of-experts model ships offline, so this builds one from SmolLM2-135M-Instruct
("sparse upcycling"): every decoder MLP becomes ``--experts`` identical experts of a
transformers ``MixtralForCausalLM`` (weight banks ``(E, 2 * 1536, 576)`` and ``(E, 576,
1536)``) with a random router choosing ``--top-k`` of them per token; the attention,
norms and embeddings are SmolLM2's. Mixtral renormalises the chosen experts' weights to
sum to one, so the float MoE computes SmolLM2's function (checked: the perplexities must
agree to 1e-3 relative) while every expert sees only the tokens routed to it.

Rows, all weights ``--bits`` (symmetric, per group of 64 by default), lm_head and
embedding float, perplexity on ``torchquant.bench.lm.default_texts``'s evaluation text:

* float, dense SmolLM2 and the MoE;
* round to nearest on the MoE;
* GPTQ, then AWQ, each three ways: on the dense model (what the experts' results should come
  close to); on the MoE with the expert banks left to round to nearest (their quantizers are
  detached while the algorithm runs and put back afterwards): how the algorithm behaved on an
  MoE before it handled the banks; on the MoE, every expert on its own routed tokens;
* W8A8 on the MoE (8-bit weights per channel, 8-bit static per-tensor activations: every
  layer's and expert product's input), without and with SmoothQuant (``--skip-w8a8`` leaves
  them out).

Targets (printed PASS/FAIL), for each algorithm: every expert's row below round to nearest
and below the row with the banks left to round to nearest; GPTQ's within 5% of dense GPTQ's
perplexity; SmoothQuant recovers at least half of W8A8's increase over float. (AWQ is not
held to the dense figure.)

Run: ``python benchmarks/moe_ptq.py [--experts 4] [--top-k 2] [--bits int4-g64] [--calib 32]
[--calib-len 256] [--eval-windows 4] [--threads N]``. About 30 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

import torchquant as tq
from torchquant.bench.lm import calibration_batches, default_texts, load_smollm2, perplexity
from torchquant.hf import TorchQuantConfig, quantize


def upcycle(dense: torch.nn.Module, experts: int, top_k: int, seed: int = 0) -> torch.nn.Module:
    """A ``MixtralForCausalLM`` whose every MLP is ``experts`` copies of ``dense``'s, with a random router."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    cfg = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    moe = MixtralForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in dense.state_dict().items():
        if ".mlp." not in k:
            state[k] = v
    for i, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])  # (2 * I, H): Mixtral's [gate; up]
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gate_up.expand(experts, -1, -1).clone()
        state[f"model.layers.{i}.mlp.experts.down_proj"] = mlp.down_proj.weight.expand(experts, -1, -1).clone()
        state[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(experts, c.hidden_size, generator=g) * 0.02
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"upcycle: missing {missing}, unexpected {unexpected}")
    moe.tie_weights()
    return moe


def _without_banks(algo):
    """``algo`` on the layers only: the banks' quantizers are detached meanwhile, then put back."""

    def run(model: torch.nn.Module, calib: list) -> None:
        held = []
        for _, m in tq.iter_qmodules(model):
            if isinstance(m, tq.QExperts):
                for bank in m.banks:
                    role = f"{m.ROLE_OF_BANK[bank]}_quantizer"
                    held.append((m, role, m._modules[role]))
                    m._modules[role] = None
        try:
            algo(model, calib)
        finally:
            for m, role, q in held:
                m._modules[role] = q
            for m in {m for m, _, _ in held}:
                m.observe_weight()  # AWQ rescaled the weights the ranges were observed on

    return run


def _gptq(model: torch.nn.Module, calib: list) -> None:
    tq.ptq.gptq(model, calib, progress=False)


def _smoothquant(model: torch.nn.Module, calib: list) -> None:
    tq.ptq.smoothquant(model, calib, progress=False)


def _awq(model: torch.nn.Module, calib: list) -> None:
    tq.set_qmodule_state(model, tq.QModuleState.BYPASSED)
    tq.ptq.awq(model, calib, progress=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--bits", default="int4-g64", help="TorchQuantConfig weights spec (default int4-g64)")
    p.add_argument("--calib", type=int, default=32, help="calibration windows")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--eval-windows", type=int, default=4, help="evaluation windows of 512 tokens")
    p.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers (quick runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-w8a8", action="store_true", help="leave out the W8A8 rows (static per-tensor activations)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense, tok = load_smollm2()
    if args.layers:
        from torchquant.cli.lm import keep_layers

        keep_layers(dense, args.layers)
    moe = upcycle(dense, args.experts, args.top_k)
    calib_text, eval_text = default_texts()
    calib = calibration_batches(tok, calib_text, args.calib, args.calib_len)

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, tok, eval_text, seq_len=512, max_windows=args.eval_windows, progress=False)

    rows: dict[str, tuple[float, float]] = {}

    def row(name: str, base: torch.nn.Module, algo=None, w8a8: bool = False) -> None:
        t0 = time.perf_counter()
        if algo is None and name.startswith("float"):
            rows[name] = (ppl(base), 0.0)
        else:
            q = copy.deepcopy(base)
            config = (
                TorchQuantConfig(weights="int8", activations="int8") if w8a8 else TorchQuantConfig(weights=args.bits)
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", tq.FloatLayersWarning)  # the routers stay float, by design
                quantize(q, config, initial_state=not w8a8)
            if algo is not None:
                algo(q, calib)
            if w8a8:  # static activation ranges come from the calibration batches
                tq.calibrate(q, calib, progress=False)
            tq.set_qmodule_state(q, tq.QModuleState.QUANT_EVAL)
            seconds = time.perf_counter() - t0
            rows[name] = (ppl(q), seconds)
        print(f"{name:40s} perplexity {rows[name][0]:8.3f}   quantize {rows[name][1]:6.1f} s", flush=True)

    row("float, dense", dense)
    row("float, MoE", moe)
    row("round to nearest, MoE", moe)
    for algo, fn in (("GPTQ", _gptq), ("AWQ", _awq)):
        row(f"{algo}, dense", dense, fn)
        row(f"{algo}, MoE, banks round to nearest", moe, _without_banks(fn))
        row(f"{algo}, MoE, every expert", moe, fn)
    if not args.skip_w8a8:
        row("W8A8, MoE", moe, w8a8=True)
        row("W8A8 SmoothQuant, MoE", moe, _smoothquant, w8a8=True)

    f_dense, f_moe = rows["float, dense"][0], rows["float, MoE"][0]
    rtn = rows["round to nearest, MoE"][0]
    checks = [
        (
            "the float MoE computes the dense model",
            abs(f_moe - f_dense) <= 1e-3 * f_dense,
            f"{f_moe:.3f} vs {f_dense:.3f}",
        )
    ]
    for algo in ("GPTQ", "AWQ"):
        full, dense_algo = rows[f"{algo}, MoE, every expert"][0], rows[f"{algo}, dense"][0]
        checks += [
            (f"{algo} on every expert < round to nearest", full < rtn, f"{full:.3f} vs {rtn:.3f}"),
            (
                f"{algo} on every expert < {algo} with the banks at round to nearest",
                full < rows[f"{algo}, MoE, banks round to nearest"][0],
                "",
            ),
        ]
        if algo == "GPTQ":
            checks.append(
                ("GPTQ on every expert within 5% of dense GPTQ", full <= 1.05 * dense_algo, f"{full / dense_algo:.3f}x")
            )
    if not args.skip_w8a8:
        plain, smooth = rows["W8A8, MoE"][0], rows["W8A8 SmoothQuant, MoE"][0]
        checks.append(
            (
                "W8A8: SmoothQuant recovers at least half of the increase over float",
                smooth - f_moe <= 0.5 * (plain - f_moe),
                f"{smooth:.3f} vs {plain:.3f}",
            )
        )
    print(f"\n{args.experts} experts, top-{args.top_k}, weights {args.bits}, {args.calib} x {args.calib_len} tokens")
    for what, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {what} {detail}".rstrip())
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
