"""QuaRot (Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs"):
orthogonal Hadamard rotations that remove activation outliers without changing the float model.

The inputs of a transformer's linear layers carry a few channels hundreds of times
larger than the rest, which ruins per-token 4-bit activation grids. An orthogonal ``Q``
with ``x Q`` spread over all channels (a Hadamard matrix: every output channel is
``±x_i / sqrt(n)`` summed) fixes that, and it can be folded into the weights so that the
float outputs stay the same. On a Llama-layout causal LM (``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``; decoder layers with ``input_layernorm``,
``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``
and RMSNorms), :func:`quarot` does, in place:

1. **Norm fusion.** Each RMSNorm's gain ``g`` (its weight, or Gemma's ``1 + weight``) is
   multiplied into the input columns of the layers that read its output (``W <- W diag(g)``:
   q, k, v after ``input_layernorm``; gate, up after ``post_attention_layernorm``; ``lm_head``
   after the final norm), and set to one. An RMSNorm without gain commutes with an
   orthogonal ``Q`` (``rms(x Q) = rms(x)``), which the next step needs. A decoder layer with
   another normalisation outside its attention (Gemma 2's and 3's sandwich norms) is refused.
2. **Residual rotation** by ``Q = H diag(s) / sqrt(d)`` (:func:`~torchquant.hadamard.random_hadamard`
   of the hidden size ``d``, signs from ``seed``): the residual stream becomes ``x Q``.
   Embedding rows ``E <- E Q``; layers that read the stream (q, k, v, gate, up,
   ``lm_head``) ``W <- W Q`` on their input side; layers that write it (o, down)
   ``W <- Q^T W`` and ``b <- b Q`` on their output side. Tied input and output
   embeddings are untied first (``lm_head`` gets its own copy and the config
   ``tie_word_embeddings=False``, so a saved model reloads untied).
3. **Online Hadamard before down_proj** (``online_down_proj=True``): the input of each
   ``down_proj`` (the intermediate activations, where the largest outliers live) is
   multiplied by ``H_I / sqrt(I)`` at run time, a :class:`~torchquant.qmodules.HadamardTransform`
   set as the wrapper's ``input_transform`` (applied before its ``input_quantizer``), and
   the weight by the same matrix on its input side, ``W <- W H_I / sqrt(I)``. A
   ``down_proj`` left in float (not a QWrapper) is left alone: nothing quantizes its input.
4. **Head-dimension Hadamard on the KV path** (``kv_hadamard=True``), ``H_D / sqrt(D)``
   with ``D`` the head dimension. Values: folded into ``v_proj``'s output rows per
   key/value head and ``o_proj``'s input columns per attention head (every head uses the
   same matrix, so with grouped-query attention each query head's columns match the
   rotation of the key/value head it reads), so the value cache and ``o_proj``'s input are
   rotated. Keys: queries and keys are rotated online after the rotary embedding, where
   they cancel in ``q k^T``; this needs the model's attention quantized through
   :func:`torchquant.hf.quantize_attention` (a ``kv_cache`` or ``attention`` field of
   ``TorchQuantConfig``), whose :class:`~torchquant.hf.QAttention` applies its
   ``head_rotation`` before the key quantizer. Attention modules without a QAttention keep
   their keys unrotated (they are not quantized there anyway; :class:`QuaRotResult` says
   which were rotated).

Run it on the converted model before calibration (``before_calibration=True``): the
weights and the layers' inputs change. Weight ranges already observed (``tq.hf.quantize``'s
initial state) are observed again from the rotated weights; activation ranges must come
from a calibration after it::

    tq.hf.quantize(model, TorchQuantConfig(weights="int4", activations="int4-dynamic"))
    tq.ptq.quarot(model, calib_batches[:1])        # the batch checks the float outputs
    tq.calibrate(model, calib_batches)
    tq.set_qmodule_state(model, tq.QModuleState.QUANT_EVAL)

The weight arithmetic runs in float64 and is cast back to each weight's dtype, so in
float32 the rotated model's logits match the original to about ``1e-5`` relative.
``tq.save``/``tq.load`` and ``save_pretrained``/``from_pretrained`` (after ``import torchquant.hf``)
record the rotation and rebuild the online transforms; the rotated weights are the checkpoint's.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..convert import CONVERSIONS_ATTR, record_conversion
from ..hadamard import hadamard_factors, hadamard_transform, random_hadamard, random_signs
from ..layers import is_normalization, norm_gain_offset
from ..qmodules import HadamardTransform, QModuleState, QOp, QWrapper
from ..quantizers import RangeQuantizer
from ..serialize import register_conversion
from ..utils import call_model, model_output, restoring_states
from ._common import SCALED_BY_ATTR, Snapshot, materialize, require_qmodules
from .calibrate import reset_activation_ranges
from .registry import register_ptq_algorithm

__all__ = ["QuaRotResult", "hadamard_factors", "hadamard_transform", "quarot", "random_hadamard"]

CONVERSION_KIND = "torchquant.ptq.quarot"


@dataclass(frozen=True)
class QuaRotResult:
    """What :func:`quarot` did.

    Attributes:
        hidden_size: ``d``, the order of the residual rotation.
        online: qualified names of the ``down_proj`` wrappers that got an online Hadamard.
        values: attention modules whose ``v_proj``/``o_proj`` got the head-dimension rotation.
        keys: attention modules whose QAttention rotates queries and keys online.
        untied: the output embedding was tied to the input embedding and got its own copy.
        max_error: ``max |after - before| / max |before|`` of the float logits on the first
            batch of ``data`` (16 random tokens without it).
    """

    hidden_size: int
    online: tuple[str, ...]
    values: tuple[str, ...]
    keys: tuple[str, ...]
    untied: bool
    max_error: float


@dataclass(frozen=True)
class _Decoder:
    """A decoder layer's modules, by role, with its qualified name."""

    name: str
    attn: nn.Module
    input_norm: nn.Module
    post_norm: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module


def _inner(m: nn.Module) -> nn.Module:
    """The float module behind a QWrapper (its layer) or a QOp (its module op)."""
    if isinstance(m, QWrapper):
        return m.layer
    if isinstance(m, QOp) and isinstance(m.op, nn.Module):
        return m.op
    return m


def _get(module: nn.Module, path: str, owner: str) -> nn.Module:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(
                f"quarot: {owner} has no {path!r}; quarot needs a Llama-layout causal LM "
                "(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
            )
    return obj


def _layout(model: nn.Module) -> tuple[nn.Module, list[_Decoder], nn.Module, nn.Module]:
    """``(embed_tokens, decoder layers, final norm, lm_head)`` of a Llama-layout model."""
    kind = type(model).__name__
    embed = _get(model, "model.embed_tokens", kind)
    layers = _get(model, "model.layers", kind)
    norm = _get(model, "model.norm", kind)
    head = _get(model, "lm_head", kind)
    decoders = []
    for i, layer in enumerate(layers):
        name = f"model.layers.{i}"
        g = {r: _get(layer, p, f"{kind}.{name}") for r, p in _ROLES.items()}
        decoders.append(_Decoder(name=name, **g))
        for sub, m in layer.named_modules():
            if sub and is_normalization(m) and not sub.startswith("self_attn.") and sub.split(".")[0] not in _NORMS:
                raise ValueError(
                    f"quarot: {name}.{sub} is a {type(m).__name__} outside the Llama layout (Gemma 2's sandwich "
                    "norms, for one): the residual rotation does not commute with its per-channel gain"
                )
    if not decoders:
        raise ValueError(f"quarot: {kind} has no decoder layers")
    return embed, decoders, norm, head


_NORMS = ("input_layernorm", "post_attention_layernorm")
_ROLES = {
    "attn": "self_attn",
    "input_norm": "input_layernorm",
    "post_norm": "post_attention_layernorm",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _check_norm(norm: nn.Module, name: str, d: int) -> None:
    inner = _inner(norm)
    w = getattr(inner, "weight", None)
    ok = type(inner).__name__.endswith("RMSNorm") and isinstance(w, Tensor) and w.shape == (d,)
    if not ok or getattr(inner, "bias", None) is not None or norm_gain_offset(inner) is None:
        raise ValueError(
            f"quarot: {name} is a {type(inner).__name__}; quarot fuses RMSNorms with a ({d},) weight and no bias "
            "(a LayerNorm's mean subtraction does not commute with the rotation)"
        )


def _linear(m: nn.Module, name: str) -> nn.Linear:
    inner = _inner(m)
    if not isinstance(inner, nn.Linear):
        raise ValueError(f"quarot: {name} is a {type(inner).__name__}, expected a Linear (or a QWrapper around one)")
    return inner


def _set(p: Tensor, value: Tensor) -> None:
    p.copy_(value.to(p.dtype))


def _in_side(lin: nn.Linear, fn) -> None:
    """``W <- fn(W)``: ``fn`` acts on the input dimension (the rows of ``W`` are inputs' coefficients)."""
    _set(lin.weight, fn(lin.weight.double()))


def _out_side(lin: nn.Linear, fn) -> None:
    """``W <- fn(W^T)^T``, ``b <- fn(b)``: ``fn`` acts on the output dimension."""
    _set(lin.weight, fn(lin.weight.double().t()).t())
    if lin.bias is not None:
        _set(lin.bias, fn(lin.bias.double()))


def _fuse_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    inner = _inner(norm)
    offset = norm_gain_offset(inner)  # Gemma's RMSNorm multiplies by 1 + weight
    assert offset is not None  # _check_norm
    g = inner.weight.double() + offset  # (d,)
    for lin in readers:
        _set(lin.weight, lin.weight.double() * g[None, :])
    inner.weight.fill_(1.0 - offset)


def _untie(model: nn.Module, embed: nn.Module, head: nn.Module) -> bool:
    e, h = _inner(embed), _inner(head)
    if h.weight is not e.weight:
        return False
    h.weight = nn.Parameter(e.weight.detach().clone(), requires_grad=e.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        text.tie_word_embeddings = False
    return True


def _head_dim(attn: nn.Module, name: str) -> int:
    d = getattr(attn, "head_dim", None)
    if not isinstance(d, int):
        raise ValueError(f"quarot: {name} ({type(attn).__name__}) has no integer head_dim")
    return d


def _order(n: int, what: str) -> None:
    try:
        hadamard_factors(n)
    except ValueError as e:
        raise ValueError(f"quarot: {what} is {n}: {e}") from e


def _float_logits(model: nn.Module, batch: Any, qmodules) -> Tensor:
    with torch.no_grad():
        for _, m in qmodules:
            m.qstate = QModuleState.BYPASSED
        return model_output(call_model(model, batch, "quarot"), "quarot").detach().to(torch.float64)


def _attach_transform(wrapper: QWrapper, n: int, base_order: int | None = None) -> None:
    t = HadamardTransform(n, base_order).to(wrapper.layer.weight.device)
    t.train(wrapper.training)
    wrapper.input_transform = t


def _attach_head_rotation(qattn: nn.Module, d: int, device: torch.device, base_order: int | None = None) -> None:
    t = HadamardTransform(d, base_order).to(device)
    t.train(qattn.training)
    qattn.head_rotation = t


def _base_orders(model: nn.Module) -> dict[str, int]:
    """The base order of every online transform, by its size (what a checkpoint needs to rebuild them)."""
    return {str(m.n): m.base_order for m in model.modules() if isinstance(m, HadamardTransform)}


def _qattention(attn: nn.Module) -> nn.Module | None:
    """The attention module's QAttention (``torchquant.hf``), found by its ``head_rotation`` slot."""
    qa = getattr(attn, "attn_quantizer", None)
    return qa if isinstance(qa, nn.Module) and "head_rotation" in qa._modules else None


@register_ptq_algorithm("quarot", before_calibration=True, model_kind="causal_lm")
def quarot(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    seed: int = 0,
    online_down_proj: bool = True,
    kv_hadamard: bool = True,
    check_tol: float | None = None,
) -> QuaRotResult:
    """QuaRot (Ashkboos et al. 2024): fold Hadamard rotations into a Llama-layout LM, float outputs unchanged.

    See the module docstring for what is rotated. The model must come from
    :func:`torchquant.quantize_model` (``method="swap"``) or :func:`torchquant.hf.quantize`;
    run it before calibration. If anything fails part-way, the model (weights, modules,
    modes, training flags, the config's ``tie_word_embeddings``) is restored exactly.

    Args:
        model: a converted ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM``
            (any model with that module layout and RMSNorms).
        data: optional batches (token ids ``(B, T)`` or dicts of model inputs); the first
            one checks that the float logits did not change (without ``data``, 16 random tokens
            seeded by ``seed`` do). QuaRot itself is data-free.
        seed: seeds the signs of the residual rotation.
        online_down_proj: put an online Hadamard before each ``down_proj``'s input quantizer.
        kv_hadamard: rotate the head dimension of values (folded) and of queries and keys
            (online, in the QAttention where the model has one).
        check_tol: the largest ``max |after - before| / max |before|`` of the float logits accepted
            (``None``: ``1e-3``, or 8 rounding steps of a half-precision model's embedding dtype:
            0.0625 in bfloat16, 0.0078 in float16; a model quarot does not fit changes them by
            about 1).

    Returns:
        A :class:`QuaRotResult`.

    Raises:
        ValueError: not a Llama-layout model, a norm that is not an RMSNorm, a size with no
            Hadamard matrix, or a bad option.
        RuntimeError: the float logits changed by more than ``check_tol`` (the model's
            architecture is not the one assumed; it is restored).

    Example:
        >>> import torch, transformers, torchquant as tq
        >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> model = tq.quantize_model(transformers.LlamaForCausalLM(cfg).eval(),
        ...                           lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax(axis=0)), None, method="swap")
        >>> ids = torch.randint(0, 64, (1, 8))
        >>> res = tq.ptq.quarot(model, [ids])
        >>> res.online, res.max_error < 1e-5
        (('model.layers.0.mlp.down_proj',), True)
    """
    qmodules = require_qmodules(model, "quarot")
    if any(r.get("kind") == CONVERSION_KIND for r in getattr(model, CONVERSIONS_ATTR, [])):
        raise ValueError(
            "quarot: the model is already rotated (its conversions record quarot); rotating again would replace "
            "its online Hadamard transforms rather than compose with them: start from the unrotated model"
        )
    scaled = getattr(model, SCALED_BY_ATTR, [])
    if scaled:
        warnings.warn(
            f"quarot: {' and '.join(dict.fromkeys(scaled))} ran before: quarot fuses the norms' gains, which "
            "carry their scales, back into the layers reading them, undoing that scaling of q/k/v and gate/up "
            "(down_proj keeps its own); run quarot first",
            stacklevel=2,
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"quarot: seed must be an int, got {seed!r}")
    for name, flag in (("online_down_proj", online_down_proj), ("kv_hadamard", kv_hadamard)):
        if not isinstance(flag, bool):
            raise ValueError(f"quarot: {name} must be a bool, got {flag!r}")
    if check_tol is not None and (
        isinstance(check_tol, bool) or not isinstance(check_tol, (int, float)) or not check_tol > 0
    ):
        raise ValueError(f"quarot: check_tol must be a number > 0 or None, got {check_tol!r}")
    embed, decoders, final_norm, head = _layout(model)
    if check_tol is None:
        check_tol = max(1e-3, 8 * torch.finfo(_inner(embed).weight.dtype).eps)
    if data is not None:
        batch = materialize(data, 1, "quarot")[0]
    else:  # data-free, but not unchecked: the float logits of random tokens must not change either
        table = _inner(embed).weight
        gen = torch.Generator().manual_seed(seed)
        batch = torch.randint(0, table.shape[0], (1, 16), generator=gen).to(table.device)
    d = _inner(embed).weight.shape[1]
    _order(d, "the hidden size")  # fail before changing anything when a size has no Hadamard matrix
    for dec in decoders:
        _check_norm(dec.input_norm, f"{dec.name}.input_layernorm", d)
        _check_norm(dec.post_norm, f"{dec.name}.post_attention_layernorm", d)
        for role in ("q", "k", "v", "o", "gate", "up", "down"):
            _linear(getattr(dec, role), f"{dec.name}.{_ROLES[role]}")
        if online_down_proj:
            _order(_linear(dec.down, dec.name).in_features, f"the input size of {dec.name}.mlp.down_proj")
        if kv_hadamard:
            _order(_head_dim(dec.attn, f"{dec.name}.self_attn"), f"the head_dim of {dec.name}.self_attn")
    _check_norm(final_norm, "model.norm", d)
    _linear(head, "lm_head")

    config = getattr(model, "config", None)
    tie_before = getattr(config, "tie_word_embeddings", None)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else None
    text_tie_before = getattr(text_config, "tie_word_embeddings", None)
    names = {m: n for n, m in model.named_modules()}
    snapshot = Snapshot(model)
    with restoring_states(model):
        try:
            model.eval()
            before = _float_logits(model, batch, qmodules)
            result = _rotate(model, embed, decoders, final_norm, head, d, seed, online_down_proj, kv_hadamard, names)
            after = _float_logits(model, batch, qmodules)
            max_error = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
            if not max_error <= check_tol:
                raise RuntimeError(
                    f"quarot: the float logits of {type(model).__name__} changed by {max_error:.3g} (relative) "
                    f"> check_tol={check_tol}; its layers do not compute what quarot assumes (model restored)"
                )
        except BaseException:
            snapshot.restore()
            if config is not None and tie_before is not None:
                config.tie_word_embeddings = tie_before
            if text_config is not None and text_tie_before is not None:
                text_config.tie_word_embeddings = text_tie_before
            raise
    record_conversion(
        model,
        {
            "kind": CONVERSION_KIND,
            "module": __name__,
            "untied": result.untied,
            "online": list(result.online),
            "keys": list(result.keys),
            "bases": _base_orders(model),
        },
    )
    reset_activation_ranges(model, "quarot")
    return QuaRotResult(**{**result.__dict__, "max_error": max_error})


def _rotate(
    model: nn.Module,
    embed: nn.Module,
    decoders: list[_Decoder],
    final_norm: nn.Module,
    head: nn.Module,
    d: int,
    seed: int,
    online_down_proj: bool,
    kv_hadamard: bool,
    names: dict[nn.Module, str],
) -> QuaRotResult:
    signs = random_signs(d, seed).to(_inner(embed).weight.device)

    def rot(x: Tensor) -> Tensor:  # (..., d) -> x Q, Q = H diag(s) / sqrt(d)
        return hadamard_transform(x) * signs.to(x.device)

    online: list[str] = []
    values: list[str] = []
    keys: list[str] = []
    with torch.no_grad():
        untied = _untie(model, embed, head)
        lm_head = _linear(head, "lm_head")
        _fuse_norm(final_norm, [lm_head])
        emb = _inner(embed)
        _set(emb.weight, rot(emb.weight.double()))  # (vocab, d): rows E <- E Q
        _in_side(lm_head, rot)
        for dec in decoders:
            roles = ("q", "k", "v", "o", "gate", "up", "down")
            q, k, v, o, gate, up, down = (_linear(getattr(dec, r), f"{dec.name}.{_ROLES[r]}") for r in roles)
            _fuse_norm(dec.input_norm, [q, k, v])
            _fuse_norm(dec.post_norm, [gate, up])
            for lin in (q, k, v, gate, up):
                _in_side(lin, rot)
            for lin in (o, down):
                _out_side(lin, rot)
            if online_down_proj and isinstance(dec.down, QWrapper):
                _in_side(down, hadamard_transform)  # W <- W H / sqrt(I), undone by the online transform
                _attach_transform(dec.down, down.in_features)
                online.append(names[dec.down])
            if kv_hadamard:
                hd = _head_dim(dec.attn, f"{dec.name}.self_attn")
                n_kv, n_heads = v.out_features // hd, o.in_features // hd
                # v_proj rows per kv head: W_j <- H^T W_j, i.e. (d, D) columns of W_j^T times H
                wv = v.weight.double().reshape(n_kv, hd, v.in_features).transpose(1, 2)  # (n_kv, d, D)
                _set(v.weight, hadamard_transform(wv).transpose(1, 2).reshape(v.weight.shape))
                if v.bias is not None:
                    _set(v.bias, hadamard_transform(v.bias.double().reshape(n_kv, hd)).reshape(-1))
                wo = o.weight.double().reshape(o.out_features, n_heads, hd)  # (d, H, D): columns per head
                _set(o.weight, hadamard_transform(wo).reshape(o.weight.shape))
                values.append(names[dec.attn])
                qattn = _qattention(dec.attn)
                if qattn is not None:
                    _attach_head_rotation(qattn, hd, o.weight.device)
                    keys.append(names[dec.attn])
        for m in [
            embed,
            head,
            *(getattr(dec, r) for dec in decoders for r in ("q", "k", "v", "o", "gate", "up", "down")),
        ]:
            _reobserve(m)
    return QuaRotResult(
        hidden_size=d,
        online=tuple(online),
        values=tuple(values),
        keys=tuple(keys),
        untied=untied,
        max_error=float("nan"),
    )


def _reobserve(m: nn.Module) -> None:
    """Weight ranges observed before the rotation (``hf.quantize``'s initial state) describe the old
    weights: observe the new ones instead. Unobserved quantizers are left for calibration."""
    wq = m.weight_quantizer if isinstance(m, QWrapper) else None
    if isinstance(wq, RangeQuantizer) and wq.range_observer.initialized:
        wq.range_observer.reset()
        m.observe_weight()


@register_conversion(CONVERSION_KIND)
def _replay(model: nn.Module, record: dict, build) -> nn.Module:
    """``tq.load``: untie and attach the online transforms; the rotated weights come from the checkpoint."""
    if record.get("untied"):
        embed, _, _, head = _layout(model)
        _untie(model, embed, head)
    modules = dict(model.named_modules())
    bases = record.get("bases")

    def base_order(n: int) -> int:
        # checkpoints that record no base orders were rotated before bases over prime powers existed
        return int(bases[str(n)]) if bases is not None else hadamard_factors(n, prime_fields=True)[0]

    for name in record.get("online", []):
        wrapper = modules[name]
        n = wrapper.layer.in_features
        _attach_transform(wrapper, n, base_order(n))
    for name in record.get("keys", []):
        attn = modules[name]
        qattn = _qattention(attn)
        if qattn is None:
            raise ValueError(f"quarot: the checkpoint rotates the keys of {name}, which has no QAttention")
        d = _head_dim(attn, name)
        _attach_head_rotation(qattn, d, next(attn.parameters()).device, base_order(d))
    record_conversion(model, record)  # a model loaded this way saves the same record again
    return model
