"""Quantized attention for Hugging Face transformers models, through transformers' attention interface.

Hugging Face attention modules (``LlamaAttention``, ``GPT2Attention``, ``BertSelfAttention``,
``ViTAttention``, ``WhisperAttention``, ...) project queries, keys and values, update the
KV cache, then call the function registered under ``config._attn_implementation`` in
``transformers.AttentionInterface``. :func:`quantize_attention` attaches a
:class:`QAttention` to each of them (as ``attn_quantizer``) and switches their configs to
the implementation registered here as ``"torchquant"``, which quantizes the query, key
and value tensors ``(B, H, T, D)`` (keys and values possibly with fewer heads, GQA), and
optionally the attention probabilities, then runs the kernel the model used before
(``"sdpa"`` or ``"eager"``). No modelling code is copied: the model's own forward runs.

KV cache. In ``generate()`` the attention function receives the whole cache (past and
new tokens, in float, as transformers stores it) at every step, so quantizing keys and
values there simulates a quantized cache: a quantizer whose output for a stored token
depends only on stored values that no longer change (per-token ranges, ranges of
complete groups of tokens; :func:`kv_quantizers`) gives at every step exactly what a
cache that quantized each token, or each group once complete, would return. The prompt's
attention at prefill sees its keys and values quantized too. One forward pass over the
whole generated sequence is not the same computation when keys are grouped along tokens:
there every query sees the groups complete at the end, while in ``generate()`` a query
saw the keys as they were at its own step (its group's newest tokens still in the float
residual), and the later layers' keys and values inherit the difference. A reference for
``generate()`` quantizes, for each query, the cache as it was at that query's step.
A sliding-window layer's default cache keeps its last ``sliding_window - 1`` tokens only;
where a key or value quantizer ranges over tokens, :class:`QAttention` refuses it once
it has dropped one (give ``generate()`` ``cache=transformers.DynamicCache()``).

``transformers`` is imported on first use (``pip install torchquant[hf]``).
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..factories import QuantizerFactory, call_factory
from ..qmodules import QModule, _run_quantizer
from ..quantizers import DynamicAffineQuantizer, Quantizer, ResidualGroupQuantizer

__all__ = [
    "ATTN_IMPLEMENTATION",
    "QAttention",
    "attention_modules",
    "kv_quantizers",
    "quantize_attention",
    "torchquant_attention_forward",
]

ATTN_IMPLEMENTATION = "torchquant"
"""The name of the attention function registered in ``transformers.AttentionInterface``."""

BASE_IMPLEMENTATIONS = ("sdpa", "eager")
_ROLES = ("query", "key", "value", "probs")
_EAGER_UNSUPPORTED = ("s_aux", "sinks", "position_bias")


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("torchquant.hf needs transformers: pip install torchquant[hf]") from e
    return transformers


# ----------------------------------------------------------------------------- masks and kernels
def _additive_mask(mask: Tensor | None, query: Tensor, key: Tensor, is_causal: bool) -> Tensor | None:
    """The float mask eager attention adds to the scores, from what the ``sdpa`` mask function gives.

    ``None`` stands for a causal mask when ``is_causal`` and more than one query (what
    ``sdpa`` does with ``is_causal=True``: query ``i`` sees keys ``0..i``), else no mask.
    """
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if mask is None:
        if not (is_causal and q_len > 1):
            return None
        i = torch.arange(q_len, device=query.device)
        mask = (i[:, None] >= torch.arange(kv_len, device=query.device)[None, :]).view(1, 1, q_len, kv_len)
    if mask.dtype == torch.bool:
        zero = torch.zeros((), device=mask.device, dtype=query.dtype)
        mask = torch.where(mask, zero, torch.finfo(query.dtype).min)  # eager_mask's values
    return mask[..., :kv_len]


def _repeat_heads(x: Tensor, n_rep: int) -> Tensor:
    # (B, H_kv, T, D) -> (B, H_kv * n_rep, T, D), each key/value head serving n_rep query heads
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _eager(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scaling: float | None,
    dropout: float,
    probs: Callable[[Tensor], Tensor],
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Eager attention as transformers writes it (softmax in float32), with ``probs`` applied to the probabilities;
    ``softcap`` caps the scores at ``softcap * tanh(scores / softcap)`` before the mask (Gemma 2)."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_heads(key, n_rep), _repeat_heads(value, n_rep)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Tq, Tk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    p = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    p = probs(p)
    p = F.dropout(p, p=dropout, training=module.training)
    out = torch.matmul(p, value).transpose(1, 2).contiguous()  # (B, Tq, H, D)
    return out, p


def _model_eager(module: nn.Module) -> Callable | None:
    """The ``eager_attention_forward`` of the module's modelling file (what ``"eager"`` runs), if it has one."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _run_base(
    implementation: str,
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    kwargs: dict[str, Any],
) -> tuple[Tensor, Tensor | None]:
    if implementation == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    is_causal = kwargs.pop("is_causal", None)
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    mask = _additive_mask(attention_mask, query, key, is_causal)
    eager = _model_eager(module)
    if eager is not None:
        return eager(module, query, key, value, mask, **kwargs)
    return _eager_with_kwargs(module, query, key, value, mask, kwargs, lambda p: p)


def _eager_with_kwargs(module, query, key, value, mask, kwargs, probs) -> tuple[Tensor, Tensor]:
    bad = sorted(k for k in _EAGER_UNSUPPORTED if kwargs.get(k) is not None)
    if bad:
        raise NotImplementedError(
            f"torchquant attention: {type(module).__name__} passes {bad}, which the eager computation of "
            "QAttention (used to quantize attention probabilities) does not implement"
        )
    return _eager(
        module, query, key, value, mask, kwargs.get("scaling"), kwargs.get("dropout", 0.0), probs, kwargs.get("softcap")
    )


# ----------------------------------------------------------------------------- QAttention
class QAttention(QModule):
    """The quantizers of one attention module, and the attention computation that uses them.

    Attached as ``attn_quantizer`` to a Hugging Face attention module by
    :func:`quantize_attention`, and called by the ``"torchquant"`` attention function with
    that module and its query, key and value. Driven by :class:`~torchquant.QModuleState`
    like every QModule: the quantizers observe in the modes that observe activations
    (``CALIBRATION*``, ``QUANT_AWARE_TRAIN*``) and quantize in those that quantize them.

    Args:
        query_quantizer: for queries ``(B, H, Tq, D)`` (after rotary embeddings where the model has them).
        key_quantizer: for keys ``(B, H_kv, Tk, D)``: the whole cache at each generation step.
        value_quantizer: for values ``(B, H_kv, Tk, D)``.
        probs_quantizer: for the attention probabilities ``(B, H, Tq, Tk)`` after the
            softmax. In the modes where it observes or quantizes, attention runs as
            eager attention (softmax in float32, then this quantizer, dropout and the
            product with the values) whatever ``implementation`` is.
        implementation: the kernel otherwise: ``"sdpa"`` or ``"eager"`` (the model's own
            eager function), normally the one the model used before.

    ``head_rotation`` (``None`` at first) may be set to an orthogonal transform of the
    head dimension (a :class:`~torchquant.qmodules.HadamardTransform` of ``D``): it is
    applied to the queries and keys before their quantizers, in every mode, and cancels
    in ``q k^T``, so the float attention does not change while the key quantizer (the
    KV cache) sees rotated keys. QuaRot (:func:`torchquant.ptq.quarot`) sets it.

    Raises:
        TypeError: a quantizer that is not a :class:`~torchquant.Quantizer` or ``None``.
        ValueError: an unknown ``implementation``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torchquant as tq
        >>> qa = QAttention(key_quantizer=tq.DynamicAffineQuantizer(4, axis=-1, group_size=8), implementation="eager")
        >>> module = nn.Module()  # the attention module, for its is_causal and training flags
        >>> q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
        >>> out, probs = qa(module, q, k, v, None, scaling=8**-0.5)
        >>> out.shape, probs.shape  # (B, Tq, H, D), (B, H, Tq, Tk)
        (torch.Size([1, 5, 2, 8]), torch.Size([1, 2, 5, 5]))
    """

    head_rotation: nn.Module | None

    def __init__(
        self,
        query_quantizer: Quantizer | None = None,
        key_quantizer: Quantizer | None = None,
        value_quantizer: Quantizer | None = None,
        probs_quantizer: Quantizer | None = None,
        *,
        implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        given = (query_quantizer, key_quantizer, value_quantizer, probs_quantizer)
        for role, q in zip(_ROLES, given):
            if q is not None and not isinstance(q, Quantizer):
                raise TypeError(f"QAttention: {role}_quantizer must be a Quantizer or None, got {type(q).__name__}")
        if implementation not in BASE_IMPLEMENTATIONS:
            raise ValueError(
                f"QAttention: implementation must be one of {BASE_IMPLEMENTATIONS}, got {implementation!r}"
            )
        self.query_quantizer = query_quantizer
        self.key_quantizer = key_quantizer
        self.value_quantizer = value_quantizer
        self.probs_quantizer = probs_quantizer
        self.implementation = implementation
        # registered even while None, so restoring a module dict (ptq.Snapshot) keeps the name
        self.register_module("head_rotation", None)
        self._name_quantizers("QAttention")

    def _quantize(self, q: Quantizer | None, x: Tensor) -> Tensor:
        if q is None:
            return x
        s = self.qstate
        return _run_quantizer(q, x, s.is_act_observed, s.is_act_quantized)

    def forward(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of ``module`` with quantized inputs: transformers' attention-function contract.

        Args:
            module: the attention module (its ``is_causal``, ``training`` and, for GQA,
                ``num_key_value_groups`` are read).
            query: ``(B, H, Tq, D)``.
            key: ``(B, H_kv, Tk, D)``, ``H`` a multiple of ``H_kv``.
            value: ``(B, H_kv, Tk, D)``.
            attention_mask: what transformers' ``sdpa`` mask function gives (boolean
                ``(B, 1, Tq, Tk)``, True where attended, or ``None``), or a float mask
                added to the scores.
            kwargs: ``scaling``, ``dropout`` and what the model passes on to its kernel.

        Returns:
            ``(output (B, Tq, H, D), probabilities (B, H, Tq, Tk) or None)``, as the kernel returns them.
        """
        if self.head_rotation is not None:  # (B, H, T, D): rotates D; cancels in q k^T
            query, key = self.head_rotation(query), self.head_rotation(key)
        if kwargs.get("sliding_window") is not None and self.qstate.is_act_quantized:
            self._check_whole_cache(key, kwargs.get("position_ids"))
        query = self._quantize(self.query_quantizer, query)
        seen = self._tokens_seen(query, key, kwargs.get("position_ids"))
        key = self._quantize_seen(self.key_quantizer, key, seen)
        value = self._quantize_seen(self.value_quantizer, value, seen)
        s = self.qstate
        if self.probs_quantizer is None or not (s.is_act_observed or s.is_act_quantized):
            return _run_base(self.implementation, module, query, key, value, attention_mask, kwargs)
        is_causal = kwargs.pop("is_causal", None)
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        mask = _additive_mask(attention_mask, query, key, is_causal)
        return _eager_with_kwargs(
            module, query, key, value, mask, kwargs, lambda p: self._quantize(self.probs_quantizer, p)
        )

    def _tokens_seen(self, query: Tensor, key: Tensor, position_ids: Any) -> int | None:
        """The tokens the cache holds, where a key or value quantizer ranges over tokens and the keys may be
        a longer, preallocated buffer (a static cache: more keys than queries); else ``None``.

        A static cache passes its whole ``max_cache_len`` buffer, empty slots included: KIVI's groups would
        take their ranges over them and quantize the newest keys, which a KIVI cache keeps in float. The
        count reads ``position_ids`` on the host (one synchronisation per layer and step, for such
        quantizers only).
        """
        s = self.qstate
        if not (s.is_act_observed or s.is_act_quantized) or not isinstance(position_ids, Tensor):
            return None
        if torch.compiler.is_compiling():  # a data-dependent length: not under torch.compile (see docs)
            return None
        # without a cache there are as many keys as queries, whatever the positions (packed sequences restart
        # them); positions of several sections (multimodal rotary) are not a count
        if key.shape[-2] <= query.shape[-2] or position_ids.dim() != 2:
            return None
        if position_ids.numel() == 0 or not any(
            q is not None and _spans_tokens(q) for q in (self.key_quantizer, self.value_quantizer)
        ):
            return None
        seen = int(position_ids.max()) + 1  # a row without padding: the tokens seen so far
        return seen if seen < key.shape[-2] else None

    def _quantize_seen(self, q: Quantizer | None, x: Tensor, seen: int | None) -> Tensor:
        """``q`` on the first ``seen`` tokens of ``x`` ``(B, H, T, D)``; the empty slots after them (masked) as
        they are."""
        if seen is None or q is None:
            return self._quantize(q, x)
        return torch.cat([self._quantize(q, x[..., :seen, :]), x[..., seen:, :]], dim=-2)

    def _check_whole_cache(self, key: Tensor, position_ids: Any) -> None:
        """Refuse a sliding-window layer's cropped cache where a key or value quantizer ranges over tokens.

        Such a cache keeps its last ``sliding_window - 1`` tokens only, so token groups
        would form over the window and move with it, where a quantized cache fixes each
        group when it completes; the logits would silently differ from the full forward pass.
        """
        spanning = [q for q in (self.key_quantizer, self.value_quantizer) if q is not None and _spans_tokens(q)]
        if not spanning or not isinstance(position_ids, Tensor) or position_ids.numel() == 0:
            return
        seen = int(position_ids.max()) + 1  # a row without padding: the tokens seen so far
        kept = key.shape[-2]
        if kept < seen:
            q = spanning[0]
            raise RuntimeError(
                f"{getattr(q, '_tq_name', type(q).__name__)} ({q.extra_repr()}) takes its ranges over several "
                f"tokens, but this sliding-window layer's KV cache kept only its last {kept} of {seen} tokens: its "
                "groups would form over the window and move with it, unlike those of a quantized cache. Give "
                "generate() a cache that keeps every token, built without the model's config: "
                "cache=transformers.DynamicCache() (past_key_values= in older transformers); the attention mask "
                "still applies the window"
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "head_rotation" not in self._modules:  # pickled before QAttention had one
            self.register_module("head_rotation", None)

    def extra_repr(self) -> str:
        return f"implementation={self.implementation}, qstate={self.qstate.name}"


def _spans_tokens(q: Quantizer) -> bool:
    """Whether a dynamic quantizer of ``(B, H, T, D)`` keys or values takes a range over several tokens
    (per tensor, per channel, groups of tokens); one of fixed ranges, or per token, does not."""
    if isinstance(q, ResidualGroupQuantizer):
        return q.granularity.axis in (-2, 2)
    if not isinstance(q, DynamicAffineQuantizer) or q.per_token:
        return False
    axis, group = q.granularity.axis, q.granularity.group_size
    per_token = (axis in (-2, 2) and group is None) or (axis in (-1, 3) and group is not None)
    return not per_token


def torchquant_attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    """The ``"torchquant"`` attention function: ``module.attn_quantizer(module, query, key, value, ...)``.

    Raises:
        RuntimeError: ``module`` has no :class:`QAttention` and was not left in float by
            :func:`quantize_attention` (``skip``).
    """
    qattn = getattr(module, "attn_quantizer", None)
    if isinstance(qattn, QAttention):
        return qattn(module, query, key, value, attention_mask, **kwargs)
    base = getattr(module, "_tq_attn_implementation", None)
    if base is not None:  # skipped by quantize_attention, its config switched with the others
        return _run_base(base, module, query, key, value, attention_mask, kwargs)
    raise RuntimeError(
        f"{type(module).__name__} uses attn_implementation={ATTN_IMPLEMENTATION!r} but has no QAttention "
        "(attn_quantizer): its config is shared with a model whose attention torchquant converted (build each "
        "model from its own copy.deepcopy(config)), or call torchquant.hf.quantize_attention(model, ...) on it"
    )


def _register() -> None:
    """Register the ``"torchquant"`` attention function and its mask function (sdpa's) with transformers."""
    _transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, torchquant_attention_forward)
    # Without a mask function for the name, transformers builds no mask at all.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


# ----------------------------------------------------------------------------- finding and converting
def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules of a transformers model that call the attention interface, with their names.

    The rule: a module (not a ``PreTrainedModel``) holding a ``config`` that is a
    ``PretrainedConfig`` and the ``scaling`` (CLIP's, SigLIP's: ``scale``) and ``is_causal``
    attributes the interface's kernels read. It finds the attention of Llama, Mistral, Qwen2,
    GPT-2, BERT, ViT, CLIP, SigLIP and Whisper (self- and cross-attention) and of the models
    built like them.
    """
    tf = _transformers()
    return [
        (name, m)
        for name, m in model.named_modules()
        if not isinstance(m, (tf.PreTrainedModel, QModule))
        and isinstance(getattr(m, "config", None), tf.PretrainedConfig)
        and (hasattr(m, "scaling") or hasattr(m, "scale"))  # CLIP's and SigLIP's name it scale
        and hasattr(m, "is_causal")
    ]


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, glob) for glob in skip)


def quantize_attention(
    model: nn.Module,
    *,
    query: QuantizerFactory | None = None,
    key: QuantizerFactory | None = None,
    value: QuantizerFactory | None = None,
    probs: QuantizerFactory | None = None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Quantize the attention of a transformers ``PreTrainedModel`` in place.

    Every attention module (:func:`attention_modules`) whose qualified name matches no
    glob in ``skip`` gets a :class:`QAttention` child ``attn_quantizer`` with the
    quantizers the factories return for it (``factory(module, name) -> Quantizer | None``,
    as in :func:`torchquant.quantize_model`; ``name`` is the attention module's), starting
    ``BYPASSED``. The configs of all attention modules are switched to the ``"torchquant"``
    implementation (directly, not by ``set_attn_implementation``, which would also switch
    configs of modules this function does not handle); each QAttention, and each skipped
    module, keeps running the kernel its config named before, ``"sdpa"`` or ``"eager"``.
    The projections and the rest of the model are :func:`torchquant.quantize_model`'s
    (``method="swap"``), before or after this call. Code a model runs only when its
    config names ``"eager"`` itself (GPT-2's ``reorder_and_upcast_attn``) is no longer
    taken: such a model runs its eager attention function instead.

    Args:
        model: a transformers model, attention implementation ``"sdpa"`` or ``"eager"``.
        query: factory for query quantizers, or ``None``.
        key: factory for key quantizers, or ``None`` (:func:`kv_quantizers` gives KIVI's).
        value: factory for value quantizers, or ``None``.
        probs: factory for attention-probability quantizers, or ``None``.
        skip: ``fnmatch`` globs of attention-module names to leave in float.

    Returns:
        The qualified names of the attention modules that got a QAttention.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``, or a factory is not one.
        ValueError: the model has no attention module this function recognises, its
            attention was already quantized, or it uses another implementation
            (flash attention, flex attention): switch it first with
            ``model.set_attn_implementation("sdpa")``.

    Example:
        >>> import transformers, torch, torchquant as tq
        >>> from torchquant.hf import kv_quantizers, quantize_attention
        >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
        >>> model = transformers.LlamaForCausalLM(cfg).eval()
        >>> quantize_attention(model, key=lambda m, n: kv_quantizers(4, group_size=8)[0],
        ...                    value=lambda m, n: kv_quantizers(4, group_size=8)[1])
        ['model.layers.0.self_attn', 'model.layers.1.self_attn']
        >>> tq.set_qmodule_state(model, tq.QModuleState.QUANT_EVAL)
        >>> model(torch.randint(0, 100, (1, 12))).logits.shape
        torch.Size([1, 12, 100])
    """
    tf = _transformers()
    if not isinstance(model, tf.PreTrainedModel):
        raise TypeError(f"quantize_attention: expected a transformers PreTrainedModel, got {type(model).__name__}")
    found = attention_modules(model)
    if not found:
        raise ValueError(f"quantize_attention: found no attention module in {type(model).__name__}")
    done = [n for n, m in found if isinstance(getattr(m, "attn_quantizer", None), QAttention)]
    if done or any(getattr(m, "_tq_attn_implementation", None) for _, m in found):
        raise ValueError(
            f"quantize_attention: the attention of {type(model).__name__} is already quantized "
            f"({', '.join(done) or 'skipped modules only'}); build the model again to change its quantizers"
        )
    bases: dict[str, str] = {}
    for name, m in found:
        base = m.config._attn_implementation or "eager"  # None: transformers falls back to eager
        if base == ATTN_IMPLEMENTATION:
            raise ValueError(
                f"quantize_attention: {name} ({type(m).__name__}) has no QAttention but its config already selects "
                f"{ATTN_IMPLEMENTATION!r}: the config is shared with a model quantize_attention converted; give "
                "this model its own config (copy.deepcopy(model) copies it)"
            )
        if base not in BASE_IMPLEMENTATIONS:
            raise ValueError(
                f"quantize_attention: {name} ({type(m).__name__}) uses attn_implementation={base!r}; "
                f"torchquant quantizes {' or '.join(map(repr, BASE_IMPLEMENTATIONS))} attention: call "
                "model.set_attn_implementation('sdpa') first"
            )
        bases[name] = base
    skip = tuple(skip)
    factories = dict(zip(_ROLES, (query, key, value, probs)))
    built: list[tuple[str, nn.Module, QAttention | None]] = []
    for name, m in found:  # every factory runs before the model changes
        if _skipped(name, skip):
            built.append((name, m, None))
            continue
        qs = {f"{r}_quantizer": call_factory(factories[r], m, name, f"{r} quantizer") for r in _ROLES}
        built.append((name, m, QAttention(**qs, implementation=bases[name])))
    _register()
    for name, m, qattn in built:
        if qattn is None:
            m._tq_attn_implementation = bases[name]
            continue
        qattn.train(m.training)
        qattn._name_quantizers(f"{name}.attn_quantizer")
        m.attn_quantizer = qattn
        m.register_forward_pre_hook(_check_implementation)
    for _, m in found:
        m.config._attn_implementation_internal = ATTN_IMPLEMENTATION
    return [name for name, _, qattn in built if qattn is not None]


def _check_implementation(module: nn.Module, args: Any) -> None:
    """Refuse a forward pass whose config no longer selects torchquant's attention function while the
    QAttention quantizes (``model.set_attn_implementation("eager")`` after converting: the attention would
    run in float with no error)."""
    qattn = module._modules.get("attn_quantizer")
    config = getattr(module, "config", None)
    if not isinstance(qattn, QAttention) or config is None:
        return
    s = qattn.qstate
    if not (s.is_act_observed or s.is_act_quantized):  # nothing of the attention's is quantized now
        return
    impl = getattr(config, "_attn_implementation", None) or "eager"
    # transformers' own kernels ignore the QAttention (a function registered by the user may read it)
    if impl in BASE_IMPLEMENTATIONS or impl.startswith(("flash", "flex", "paged", "sdpa_")) or "|" in impl:
        raise RuntimeError(
            f"{type(module).__name__}: the model's attn_implementation is now {impl!r}, so its quantized "
            "attention would run in float; keep "
            f"{ATTN_IMPLEMENTATION!r} (set after quantize_attention; for output_attentions, quantized probabilities "
            "come from the eager softmax torchquant runs), or set the QAttention modes to BYPASSED"
        )


# ----------------------------------------------------------------------------- KIVI
def kv_quantizers(
    n_bits: int, group_size: int = 32, residual: bool = True, symmetric: bool = False
) -> tuple[Quantizer, Quantizer]:
    """KIVI's key and value quantizers (Liu et al. 2024).

    Keys ``(B, H, T, D)`` are quantized per channel: one range per (batch, head, channel)
    and group of ``group_size`` consecutive tokens; the last ``T % group_size`` tokens stay
    in float with ``residual=True`` (KIVI's residual), else form a shorter group
    (:class:`~torchquant.ResidualGroupQuantizer` along ``axis=-2``). Values are quantized
    per token: one range per (batch, head, token) and group of ``group_size`` channels
    (:class:`~torchquant.DynamicAffineQuantizer` with ``axis=-1``; ``group_size`` must
    divide the head dimension).

    Both are functions of the stored float values of each token or complete group alone,
    so inside the attention function they give at every ``generate()`` step what a KIVI
    cache holds (see the module docstring). Asymmetric grids are KIVI's: ``2 ** n_bits``
    levels from each group's min to its max (``include_zero=False``: zero need not be a
    level, so a group of one sign keeps all its levels).

    Args:
        n_bits: bits per element (KIVI: 2 or 4).
        group_size: tokens per key group and channels per value group.
        residual: keep the keys of the incomplete last group in float.
        symmetric: symmetric grids (KIVI's are asymmetric).

    Returns:
        ``(key_quantizer, value_quantizer)``, new instances.
    """
    zero = symmetric  # KIVI's asymmetric grid runs from min to max; a symmetric one is centred on zero
    keys = ResidualGroupQuantizer(
        n_bits, axis=-2, group_size=group_size, symmetric=symmetric, residual=residual, include_zero=zero
    )
    values = DynamicAffineQuantizer(n_bits, axis=-1, group_size=group_size, symmetric=symmetric, include_zero=zero)
    return keys, values
