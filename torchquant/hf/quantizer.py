"""torchquant inside ``from_pretrained``/``save_pretrained``: the conversion and the ``HfQuantizer``.

:func:`quantize` converts a loaded Hugging Face model as a :class:`TorchQuantConfig`
says; :class:`TorchQuantHfQuantizer` is registered with transformers under the
method name ``"torchquant"``, so ``from_pretrained(path, quantization_config=cfg)``
calls it after the float weights are loaded, and ``save_pretrained`` writes:

* the float model's weights under their usual names (packed as integer codes,
  ``<name>.__tq_codes``, where the outputs do not change, see :func:`torchquant.save`);
* every quantizer's state (ranges, learned steps, AdaRound roundings) under its own
  names (``...q_proj.weight_quantizer.range_observer.min_val``);
* in the safetensors header, the description :func:`torchquant.save` writes (quantizer
  specs and modes); in ``config.json``, the config.

``from_pretrained`` on that directory (after ``import torchquant.hf``, which registers
the method) loads the float weights as usual, converts the model by the config,
then loads the quantizer state and modes: no calibration data and no Python
factories are needed, and the logits equal the saved model's.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers.quantizers import HfQuantizer, register_quantizer
from transformers.quantizers.auto import register_quantization_config

from ..convert import CONVERSIONS_ATTR, quantize_model, record_conversion
from ..graph.common import check_skip
from ..layers import LAYER_TYPES, is_normalization
from ..moe import QExperts, expert_banks
from ..qmodules import QModuleState, QWrapper, iter_qmodules
from ..quantizers.base import RangeQuantizer
from ..serialize import (
    AMAX_KEY,
    CODES_SUFFIX,
    load_quantized_state,
    quantized_state_dict,
    register_conversion,
    replay_conversion,
    unwrap_undescribed,
)
from ..spec import CONFIG_KEY, QuantizerSpec
from .config import QUANT_METHOD, TorchQuantConfig

__all__ = ["TorchQuantHfQuantizer", "initial_mode", "quantize"]

FLOAT_NAMES_ATTR = "_tq_float_names"
_META_KEY = "torchquant"
# Names of state that a float model does not have: quantizers, QModule buffers and configurations, packed codes.
_OWN_KEYS = re.compile(
    r"(^|\.)(weight_quantizer|acts_quantizer|input_quantizer|down_input_quantizer|attn_quantizer"
    + "".join(f"|{role}_quantizer" for role in QExperts.WEIGHT_ROLES)
    + r")\.|\.__tq_codes$|__tq_amax$|(^|\.)bn_frozen$"
    rf"|(^|\.){CONFIG_KEY}$"
)

register_quantization_config(QUANT_METHOD)(TorchQuantConfig)


def _routers(model: nn.Module) -> list[str]:
    """Mixture-of-experts routers: modules beside an expert bank that hold a 2-d ``weight`` and are no plain
    layer (a bare weight, or a subclass of ``nn.Linear`` with a forward of its own, as PhiMoE's and Llama 4's
    return the routing too; a plain ``nn.Linear`` router is quantized like any layer)."""
    out = []
    for name, parent in model.named_modules():
        if not any(expert_banks(c) for c in parent.children()):
            continue
        for key, child in parent.named_children():
            w = child._parameters.get("weight")
            if isinstance(w, torch.Tensor) and w.dim() == 2 and type(child) not in LAYER_TYPES:
                out.append(f"{name}.{key}" if name else key)
    return out


def _skip_globs(model: nn.Module, names: list[str] | None) -> list[str]:
    if names is None:  # the output embedding and MoE routers, as other toolkits keep them
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in model.named_modules() if out is not None and m is out] + _routers(model)
    globs = []
    for n in names:
        if any(c in n for c in "*?["):
            globs.append(n)
        else:  # a name matches itself, its submodules, and names ending with it (Hugging Face's rule)
            globs += [n, f"{n}.*", f"*.{n}", f"*.{n}.*"]
    return globs


def _names_by_id(model: nn.Module) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name, t in _named_tensors(model):
        out.setdefault(id(t), []).append(name)
    return out


def _float_names(before: dict[int, list[str]], model: nn.Module) -> dict[str, str]:
    """Converted name -> the float model's name, for tensors the conversion moved (``q_proj.layer.weight``).

    A tied tensor has several float names; a moved name takes one that the converted
    model no longer uses (``wte.layer.weight`` -> ``wte.weight``, while ``lm_head.weight`` stays),
    its own where it has one (a wrapped, tied ``lm_head.layer.weight`` -> ``lm_head.weight``, not the
    embedding's: the two stay apart once a rotation unties them).
    """
    after = list(_named_tensors(model))
    converted = {n for n, _ in after}
    out = {}
    for name, t in after:
        names = before.get(id(t))
        if names is None or name in names:
            continue
        free = [f for f in names if f not in converted]
        own = [f for f in free if f in _unwrapped(name)]
        if own or free:
            out[name] = (own or free)[0]
    return out


def _unwrapped(name: str) -> set[str]:
    """``name`` with one wrapper step (``.layer``) taken out, at each place it occurs."""
    parts = name.split(".")
    return {".".join(parts[:i] + parts[i + 1 :]) for i, p in enumerate(parts[:-1]) if p == "layer"}


def _build(spec: QuantizerSpec | None, name: str, field: str):
    if spec is None:
        return None
    q = spec.build()
    q._tq_name = f"{name} ({field})"
    return q


def quantize(model: nn.Module, config: TorchQuantConfig, *, initial_state: bool = True) -> nn.Module:
    """Convert a (float, loaded) Hugging Face model in place as ``config`` describes.

    Args:
        model: a ``PreTrainedModel`` (any ``nn.Module`` works for the layer points;
            attention points need a transformers attention module).
        config: the scheme.
        initial_state: observe the weights, then put the model in ``QUANT_EVAL`` when
            nothing needs data, else in ``CALIBRATION`` (run :func:`torchquant.calibrate`,
            then set ``QUANT_EVAL``); ``False`` leaves every QModule ``BYPASSED``.

    Returns:
        ``model``.

    Example:
        >>> import transformers, torch
        >>> from torchquant.hf import TorchQuantConfig, quantize
        >>> cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> model = quantize(transformers.LlamaForCausalLM(cfg), TorchQuantConfig(weights="int4-g16"))
        >>> model.model.layers[0].mlp.down_proj.qstate.name
        'QUANT_EVAL'
    """
    if not isinstance(config, TorchQuantConfig):
        raise TypeError(f"quantize: expected a TorchQuantConfig, got {type(config).__name__}")
    history = list(getattr(model, CONVERSIONS_ATTR, []))
    before = _names_by_id(model)
    skip = _skip_globs(model, config.modules_to_not_convert)
    norm_spec = config.norm_outputs

    def weights(module: nn.Module, name: str):
        field = "embeddings" if isinstance(module, nn.Embedding) else "weights"
        return _build(config.point(field, name), name, field)

    def outputs(module: nn.Module, name: str):
        # quantize_model asks for every layer's output too; only normalisations get a quantizer here
        if norm_spec is None or not is_normalization(module):
            return None
        return _build(QuantizerSpec.from_dict(norm_spec), name, "norm_outputs")

    options: dict[str, Any] = {}
    if norm_spec is not None:
        options["norm_outputs"] = True
    layer_fields = ("weights", "embeddings", "activations", "norm_outputs")
    if any(getattr(config, f) is not None for f in layer_fields) or config.overrides:
        # entries already normalised: quantize_model leaves them unchecked (the defaults name lm_head and every
        # entry comes in several spellings, most of which match nothing)
        quantize_model(model, weights, outputs, method="swap", skip=check_skip(skip), **options)
    for name, m in iter_qmodules(model):
        # a layer's input; for QExperts the hidden states every expert's first product reads, and
        # the input of every expert's down_proj product
        if (isinstance(m, QWrapper) and not isinstance(m.layer, nn.Embedding)) or isinstance(m, QExperts):
            spec = config.point("activations", name)
            if spec is not None:
                device = next(m.layer.parameters()).device
                m.input_quantizer = _build(spec, name, "activations").to(device)
                if isinstance(m, QExperts):
                    m.down_input_quantizer = _build(spec, name, "activations").to(device)
                m._name_quantizers(name)  # errors name the quantizer and its observer by qualified name
    _quantize_attention(model, config, skip)
    setattr(model, CONVERSIONS_ATTR, history)
    record_conversion(model, {"kind": "torchquant.hf", "module": __name__, "config": config.to_dict()})
    setattr(model, FLOAT_NAMES_ATTR, _float_names(before, model))
    if not getattr(model, "_tq_float_name_hook", False):
        model.register_load_state_dict_pre_hook(_float_names_to_converted)
        model._tq_float_name_hook = True
    _attach(model, config)
    if initial_state:
        initial_mode(model)
    return model


def _attach(model: nn.Module, config: TorchQuantConfig) -> None:
    """Make ``save_pretrained`` write a model converted here as ``from_pretrained`` would have loaded it."""
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        return
    if not isinstance(getattr(model, "hf_quantizer", None), TorchQuantHfQuantizer):
        model.hf_quantizer = TorchQuantHfQuantizer(config, pre_quantized=False)
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def _float_names_to_converted(module, state_dict, prefix, *args) -> None:
    """``load_state_dict`` pre-hook: a state dict in the float model's names (what ``save_pretrained``
    writes, and what ``Trainer`` reloads when resuming) loads into the converted model."""
    back = {f"{prefix}{v}": f"{prefix}{k}" for k, v in getattr(module, FLOAT_NAMES_ATTR, {}).items()}
    for key in [k for k in state_dict if k in back and back[k] not in state_dict]:
        state_dict[back[key]] = state_dict.pop(key)
    if any(k.endswith((CODES_SUFFIX, AMAX_KEY)) for k in state_dict):
        raise ValueError(
            "load_state_dict: this checkpoint stores packed integer weights; load it with from_pretrained "
            "(or torchquant.load), which unpacks them"
        )


def _named_tensors(model: nn.Module):
    return itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))


def _quantize_attention(model: nn.Module, config: TorchQuantConfig, skip: list[str]) -> None:
    kv = config.kv_cache or {}
    roles = {
        "query": config.attention,
        "key": kv.get("key", config.attention),
        "value": kv.get("value", config.attention),
        "probs": config.attention_probs,
    }
    if all(v is None for v in roles.values()):
        return
    from .attention import quantize_attention

    def factory(role: str, raw: dict | None):
        if raw is None:
            return None
        spec = QuantizerSpec.from_dict(raw)

        def build(module: nn.Module, name: str):
            q = _build(spec, name, role)
            # (B, H, T, D) groups along D must divide the head dimension: refuse now, not at the first forward
            g = getattr(q, "granularity", None)
            head_dim = getattr(module, "head_dim", None)
            if (
                g is not None
                and g.axis in (-1, 3)
                and g.group_size
                and isinstance(head_dim, int)
                and head_dim % g.group_size
            ):
                raise ValueError(
                    f"torchquant.hf: {name}: the {role} quantizer groups {g.group_size} channels of the head "
                    f"dimension, {head_dim} here; choose a group that divides it (the kv_cache short form's -g<group>, "
                    "e.g. 'int4-g16')"
                )
            return q

        return build

    quantize_attention(model, skip=skip, **{role: factory(role, raw) for role, raw in roles.items()})


def _needs_data(q: nn.Module) -> bool:
    if isinstance(q, RangeQuantizer):
        return not q.range_observer.initialized
    initialized = getattr(q, "initialized", None)
    return initialized is False


def initial_mode(model: nn.Module) -> QModuleState:
    """Observe every weight; then ``QUANT_EVAL`` when no quantizer needs data, else ``CALIBRATION``.

    What :func:`quantize` does with ``initial_state=True``; callers that change the model
    between conversion and calibration (rotations, scale migration) call it afterwards.

    Returns:
        The mode every QModule of ``model`` is now in: ``CALIBRATION`` means run
        :func:`torchquant.calibrate` before evaluating.
    """
    with torch.no_grad():
        for name, m in iter_qmodules(model):
            if (isinstance(m, QWrapper) and m.weight_quantizer is not None) or isinstance(m, QExperts):
                key = f"{name}.*" if isinstance(m, QExperts) else name  # a bank's spec: "<name>.<bank>"
                try:
                    m.observe_weight()
                except ValueError as e:
                    raise ValueError(
                        f"{e}. Give {name!r} another spec (TorchQuantConfig(overrides={{{key!r}: "
                        "{'weights': 'int8'}})) or keep it in float (modules_to_not_convert)"
                    ) from e
    needs_data = any(_needs_data(q) for _, m in iter_qmodules(model) for q in m.quantizers().values())
    state = QModuleState.CALIBRATION if needs_data else QModuleState.QUANT_EVAL
    for _, m in iter_qmodules(model):
        m.qstate = state
    return state


@register_conversion("torchquant.hf")
def _replay(model: nn.Module, record: dict, build) -> nn.Module:
    model = quantize(model, TorchQuantConfig.from_dict(record["config"]), initial_state=False)
    _drop_undescribed(model, lambda name: build(name, "down_input_quantizer") is not None)
    return model


def _drop_undescribed(model: nn.Module, described: Callable[[str], bool]) -> None:
    """Remove the ``down_input_quantizer`` of experts whose checkpoint has none: saved before QExperts
    quantized their down_proj input, such a checkpoint keeps loading (and computing) as it did."""
    for name, m in iter_qmodules(model):
        if isinstance(m, QExperts) and m.down_input_quantizer is not None and not described(name):
            m.down_input_quantizer = None


# ------------------------------------------------------------------ transformers
@register_quantizer(QUANT_METHOD)
class TorchQuantHfQuantizer(HfQuantizer):
    """The ``HfQuantizer`` of :class:`TorchQuantConfig` (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: TorchQuantConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: list[str] = []
        self.description: dict[str, Any] | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.checkpoint_files = [f for f in (checkpoint_files or []) if str(f).endswith(".safetensors")]
        if self.pre_quantized:
            self.description = _read_description(self.checkpoint_files)
            packed = set(self.description.get("packed", {})) if self.description else set()
            ignore_missing = {re.escape(k) + "$" for k in packed}
            model._keys_to_ignore_on_load_unexpected = {
                *(model._keys_to_ignore_on_load_unexpected or ()),
                _OWN_KEYS.pattern,
            }
            model._keys_to_ignore_on_load_missing = {*(model._keys_to_ignore_on_load_missing or ()), *ignore_missing}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        quantize(model, self.quantization_config, initial_state=not self.pre_quantized)
        if self.pre_quantized:
            if self.description is None:
                raise ValueError(
                    "from_pretrained: the checkpoint's config names the torchquant method, but its safetensors files "
                    "carry no torchquant description; save it with save_pretrained from a torchquant model"
                )
            # Conversions recorded after the config's own (QuaRot's online transforms): weights need none
            modules = self.description.get("modules", {})
            _check_prefix(model, modules)
            _drop_undescribed(model, lambda name: "down_input_quantizer" in modules.get(name, {}).get("quantizers", {}))
            unwrap_undescribed(model, set(modules))
            for record in self.description.get("conversions", []):
                if record.get("kind") != "torchquant.hf":
                    replay_conversion(model, record, lambda name, attr: None)
            _load_own_state(model, self.checkpoint_files, self.description)
        return model

    def get_state_dict_and_metadata(self, model):
        tensors, desc = quantized_state_dict(model, pack=self.quantization_config.pack_weights)
        names = getattr(model, FLOAT_NAMES_ATTR, {})
        # Shared storage as in the model, so transformers' tied-weight handling sees the ties.
        live = dict(_named_tensors(model))
        state = {}
        for key, t in tensors.items():
            base = key.removesuffix(CODES_SUFFIX)
            float_key = names.get(base, base) + key[len(base) :]
            state[float_key] = live[key].detach() if key in live else t
        for alias, first in desc.pop("aliases").items():
            state[names.get(alias, alias)] = live[alias].detach() if alias in live else state[names.get(first, first)]
        desc["packed"] = {names.get(k, k): _rename_codes(v, names) for k, v in desc["packed"].items()}
        return state, {_META_KEY: json.dumps(desc)}

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _rename_codes(info: dict, names: dict[str, str]) -> dict:
    """A packed entry whose codes are another key's (a tied weight), with that key renamed."""
    return {**info, "codes": names.get(info["codes"], info["codes"])} if "codes" in info else info


def _read_description(files: list[str]) -> dict[str, Any] | None:
    from safetensors import safe_open

    for f in files:
        with safe_open(f, framework="pt") as h:
            meta = h.metadata() or {}
        if _META_KEY in meta:
            return json.loads(meta[_META_KEY])
    return None


def _check_prefix(model: nn.Module, modules: dict[str, Any]) -> None:
    """Refuse, saying why, a checkpoint saved from a model with (or without) the head around the base model
    that this one lacks (has): its quantized modules' names differ by ``base_model_prefix``."""
    prefix = getattr(model, "base_model_prefix", "")
    names = set(dict(model.named_modules()))
    if not prefix or not modules or set(modules) & names:
        return
    stored = any(n.startswith(prefix + ".") for n in modules)
    here = isinstance(getattr(model, prefix, None), nn.Module)
    if stored != here:
        kind = "a model with a head around its base model" if stored else "a base model without a head"
        raise ValueError(
            f"from_pretrained: the quantized checkpoint was saved from {kind} (its quantized modules are named "
            f"{sorted(modules)[0]!r}, ...), and {type(model).__name__} names them "
            f"{'with' if here else 'without'} the prefix {prefix + '.'!r}; load it with the class it was saved "
            "from, or quantize the float checkpoint for this class"
        )


def _load_own_state(model: nn.Module, files: list[str], desc: dict[str, Any]) -> None:
    from safetensors import safe_open

    names = getattr(model, FLOAT_NAMES_ATTR, {})
    back = {v: k for k, v in names.items()}
    rename = _checkpoint_renaming(model)
    tensors: dict[str, Tensor] = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for stored in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                if _OWN_KEYS.search(stored):
                    key = rename(stored)
                    base = key.removesuffix(CODES_SUFFIX)
                    tensors[back.get(base, base) + key[len(base) :]] = h.get_tensor(stored)
    packed = {back.get(k, k): _rename_codes(v, back) for k, v in desc.get("packed", {}).items()}
    desc = {**desc, "packed": packed, "aliases": {}}
    # Configuration entries are checked when present; checkpoints saved before them load without.
    own = {k for k in model.state_dict() if _OWN_KEYS.search(k) and not k.endswith(CONFIG_KEY)}
    provided = set(tensors) | {p + k for p in desc.get("magnitudes", []) for k in ("min_val", "max_val")}
    missing = sorted(own - provided)
    if missing:
        raise ValueError(f"from_pretrained: the checkpoint lacks torchquant state {missing[:10]}")
    load_quantized_state(model, tensors, desc, strict=False)


def _checkpoint_renaming(model: nn.Module):
    """Checkpoint key -> model key, by the renamings transformers applied when loading this model.

    ``save_pretrained`` writes some architectures' keys in their original checkpoint
    format (ViT's ``encoder.layer.0.attention.attention.key``); torchquant's keys there
    went through the same renaming and come back through it here.
    """
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [c for c in getattr(model, "_weight_conversions", None) or () if isinstance(c, WeightRenaming)]
    if not renamings:
        return lambda key: key
    return lambda key: apply_renamings(key, renamings)
