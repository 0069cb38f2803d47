"""``TorchQuantConfig``: a torchquant quantization scheme as a Hugging Face quantization config.

Every field is a quantizer description in the form recipe files and checkpoints use
(:class:`torchquant.spec.QuantizerSpec` as a dict), or a short form for the common
cases, or ``None`` (that point stays in float)::

    TorchQuantConfig(
        weights={"quantizer": "affine", "observer": "batch_minmax",
                 "args": {"n_bits": 8, "symmetric": True}, "observer_args": {"axis": 0}},
        modules_to_not_convert=["lm_head"],
    )
    TorchQuantConfig(weights="int4-g128")                       # 4-bit weights, groups of 128
    TorchQuantConfig(weights="int8", activations="int8")        # W8A8, static activation ranges
    TorchQuantConfig(weights="int8", kv_cache="int4")           # 4-bit KIVI-style KV cache

Short forms:

* weights and embeddings: ``"int<b>"`` symmetric per output channel (per row for an
  embedding), ``"int<b>-g<G>"`` symmetric per group of ``G`` inputs; add ``-asym`` for
  a zero point and ``-mse`` for ranges that minimise each range cell's squared rounding
  error (:class:`~torchquant.MSEObserver` on a histogram of ``WEIGHT_MSE_BINS`` bins)
  instead of its min/max: ``"int3-g64-mse"``. Rounded to nearest, MSE ranges clip the
  large weights that matter; under GPTQ, which feeds the clipping error forward, they
  pay (SmolLM2 W3 g64 symmetric, ``benchmarks/llm.py``: GPTQ 46.10 with min/max ranges,
  24.2 with MSE ranges). Any registered quantizer name that needs no arguments
  (``"fp8_e4m3"``, ``"mxfp4"``) is accepted too.
* activations, attention inputs, attention probabilities and norm outputs:
  ``"int<b>"`` (or ``"int<b>-minmax"``) static per-tensor ranges, the minimum and
  maximum seen in calibration; ``"int<b>-percentile"`` the 99.99th percentile instead;
  ``"int<b>-dynamic"`` per-token ranges computed at run time (no calibration). Min/max
  is the default because the inputs of a transformer's linear layers carry a few
  outlier channels that matter: clipping them at a percentile costs more than the
  levels min/max spends on them (``benchmarks/hf.py``: on all-MiniLM-L6-v2, W8A8 with
  min/max input ranges keeps a mean cosine similarity of 0.993 to the float sentence
  embeddings, 0.896 with the percentile, optimum-quanto's default 0.982).
* KV cache: ``"int<b>"`` or ``"int<b>-g<G>"`` (default ``G = 32``): keys per channel and
  values per token in groups of ``G``, the newest ``T mod G`` keys in float (KIVI).

Where the points are:

* ``weights``: every ``Linear``, ``Conv*`` and GPT-2 ``Conv1D`` weight;
* ``activations``: the inputs of those layers (the usual meaning of "W8A8");
* ``embeddings``: ``nn.Embedding`` weights (default: float);
* ``attention``: the query, key and value inputs of the attention matmuls;
* ``kv_cache``: the keys and values (replaces ``attention`` for them);
* ``attention_probs``: the softmax output;
* ``norm_outputs``: the outputs of LayerNorm/RMSNorm modules.

``overrides`` maps a module-name glob to field values for the modules it matches
(first match wins): ``{"*.mlp.down_proj": {"weights": "int8"}, "model.layers.0.*":
{"weights": None}}``. ``modules_to_not_convert`` lists modules left in float, as
in other Hugging Face quantization configs (a name matches itself, its
submodules and any module whose dotted name ends with it); ``None`` (the default)
leaves the output embedding (``lm_head``) and mixture-of-experts routers (a bare
``weight`` beside an expert bank) in float, ``[]`` quantizes everything.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..registry import QUANTIZERS, _callable_without_arguments
from ..spec import QuantizerSpec, SpecError

__all__ = ["FIELDS", "TorchQuantConfig", "expand_spec"]

QUANT_METHOD = "torchquant"

FIELDS = ("weights", "activations", "embeddings", "attention", "kv_cache", "attention_probs", "norm_outputs")
"""The quantization points a :class:`TorchQuantConfig` describes."""

_WEIGHT_FIELDS = ("weights", "embeddings")
_SHORT = re.compile(r"^int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?P<rest>(?:-[a-z]+)*)$")
PERCENTILE = 99.99
KV_GROUP = 32
WEIGHT_MSE_BINS = 128
"""Histogram bins of the ``-mse`` weight short form: a range cell holds one row or a group of
tens of weights, and every layer keeps its histograms (``(cells, bins)``), so 2,048 bins
(the observer's default, meant for activations) would hold 1.56M cells x 2,048 x 4 bytes =
12.8 GB on SmolLM2-135M at g64 (a run was killed for memory at 24 GB)."""


def _weight_short(bits: int, group: int | None, flags: set[str]) -> QuantizerSpec:
    observer_args: dict[str, Any] = {"axis": 0} if group is None else {"axis": 1, "group_size": group}
    symmetric = "asym" not in flags
    if "mse" in flags:
        observer_args.update(n_bits=bits, symmetric=symmetric, bins=WEIGHT_MSE_BINS)
        return QuantizerSpec("affine", "mse", {"n_bits": bits, "symmetric": symmetric}, observer_args=observer_args)
    return QuantizerSpec(
        "affine", "batch_minmax", {"n_bits": bits, "symmetric": symmetric}, observer_args=observer_args
    )


def _act_short(bits: int, group: int | None, flags: set[str], where: str) -> QuantizerSpec:
    if group is not None:
        raise SpecError(f"{where}: groups ('-g') apply to weights and the KV cache, not activations")
    if "dynamic" in flags:
        return QuantizerSpec("dynamic_affine", None, {"n_bits": bits, "per_token": True})
    if "percentile" in flags:
        return QuantizerSpec("affine", "percentile", {"n_bits": bits}, {"percentile": PERCENTILE})
    return QuantizerSpec("affine", "running_minmax", {"n_bits": bits})


def _kv_short(bits: int, group: int | None, flags: set[str], where: str) -> dict[str, Any]:
    from ..spec import describe
    from .attention import kv_quantizers

    key, value = kv_quantizers(bits, group_size=KV_GROUP if group is None else group)
    return {"key": describe(key).to_dict(), "value": describe(value).to_dict()}


def expand_spec(field: str, value: Any, where: str | None = None) -> Any:
    """The JSON description of ``value`` for ``field``: a spec dict (``{"key": ..., "value": ...}`` for
    ``kv_cache``), or ``None``.

    Raises:
        SpecError: an unknown short form, field or spec key (the message names ``where``).
    """
    where = where or f"TorchQuantConfig.{field}"
    if field not in FIELDS:
        raise SpecError(f"{where}: unknown field {field!r}; valid: {list(FIELDS)}")
    if value is None:
        return None
    if isinstance(value, QuantizerSpec):
        value = value.to_dict()
    if isinstance(value, str):
        m = _SHORT.match(value.strip().lower())
        if m is None:
            if (
                field != "kv_cache"
                and value.lower() in QUANTIZERS
                and _callable_without_arguments(QUANTIZERS.get(value))
            ):
                return QuantizerSpec(value.lower()).to_dict()
            raise SpecError(
                f"{where}: unknown short form {value!r}; use 'int<bits>' with '-g<group>', '-asym', '-mse', "
                "'-minmax', '-percentile' or '-dynamic' as the field allows, a quantizer spec dict, "
                "or a registered quantizer name"
            )
        bits, group = int(m["bits"]), (int(m["group"]) if m["group"] else None)
        flags = set(filter(None, m["rest"].split("-")))
        allowed = (
            {"asym", "mse"}
            if field in _WEIGHT_FIELDS
            else set()
            if field == "kv_cache"
            else {"minmax", "percentile", "dynamic"}
        )
        if flags - allowed:
            raise SpecError(f"{where}: {value!r}: unknown options {sorted(flags - allowed)}; valid: {sorted(allowed)}")
        ranges = flags & {"minmax", "percentile", "dynamic"}
        if len(ranges) > 1:
            raise SpecError(f"{where}: {value!r}: choose one of {sorted(ranges)} (each sets how ranges are found)")
        if group is not None and group < 1:
            raise SpecError(f"{where}: {value!r}: a group holds at least one element, got -g{group}")
        if bits < 1:
            raise SpecError(f"{where}: {value!r}: at least 1 bit")
        if field in _WEIGHT_FIELDS and bits < 2 and "asym" not in flags:
            # a signed 1-bit grid symmetric around 0 has the levels -1 and 0: every weight rounds to 0 or -s
            raise SpecError(f"{where}: {value!r}: symmetric weights need at least 2 bits; 1 bit only with '-asym'")
        if field in _WEIGHT_FIELDS:
            return _weight_short(bits, group, flags).to_dict()
        if field == "kv_cache":
            return _kv_short(bits, group, flags, where)
        return _act_short(bits, group, flags, where).to_dict()
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected a short form, a quantizer spec dict or None, got {value!r}")
    if field == "kv_cache":
        unknown = set(value) - {"key", "value"}
        if unknown:
            raise SpecError(f"{where}: a KV-cache table has 'key' and 'value' specs; unknown keys {sorted(unknown)}")
        # a role left out falls back to the attention field, as it does without a table; None is no quantizer
        return {k: expand_spec("attention", value[k], f"{where}.{k}") for k in ("key", "value") if k in value}
    spec = QuantizerSpec.from_dict(value, where)
    spec.check()
    return spec.to_dict()


class TorchQuantConfig(QuantizationConfigMixin):
    """torchquant quantization for ``from_pretrained(..., quantization_config=TorchQuantConfig(...))``.

    See the module docstring for the fields and their short forms. The config
    serialises to JSON (``to_dict``) with every field expanded to its full spec, so a
    saved model's ``config.json`` says exactly which quantizers it uses.

    Args:
        weights: layer weights (``Linear``, ``Conv*``, GPT-2 ``Conv1D``).
        activations: inputs of those layers.
        embeddings: ``nn.Embedding`` weights.
        attention: query/key/value inputs of the attention matmuls.
        kv_cache: keys and values (KIVI granularity for the short forms).
        attention_probs: attention probabilities.
        norm_outputs: LayerNorm/RMSNorm outputs.
        overrides: module-name glob -> ``{field: value}`` for the modules it matches.
        modules_to_not_convert: modules kept in float (``None``: the output embedding and MoE routers).
        pack_weights: ``save_pretrained`` stores quantized weights as integers where the
            outputs do not change (see :func:`torchquant.save`).

    Example:
        >>> cfg = TorchQuantConfig(weights="int4-g64", modules_to_not_convert=["lm_head"])
        >>> cfg.weights["observer_args"]
        {'axis': 1, 'group_size': 64}
        >>> TorchQuantConfig.from_dict(cfg.to_dict()).weights == cfg.weights
        True
    """

    def __init__(
        self,
        weights: Any = None,
        activations: Any = None,
        embeddings: Any = None,
        attention: Any = None,
        kv_cache: Any = None,
        attention_probs: Any = None,
        norm_outputs: Any = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        modules_to_not_convert: list[str] | None = None,
        pack_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        if kwargs:
            raise TypeError(f"TorchQuantConfig: unknown arguments {sorted(kwargs)}; fields: {list(FIELDS)}")
        self.quant_method = QUANT_METHOD
        given = {
            "weights": weights,
            "activations": activations,
            "embeddings": embeddings,
            "attention": attention,
            "kv_cache": kv_cache,
            "attention_probs": attention_probs,
            "norm_outputs": norm_outputs,
        }
        for field, value in given.items():
            setattr(self, field, expand_spec(field, value))
        self.overrides: dict[str, dict[str, Any]] = {}
        for glob, table in (overrides or {}).items():
            if not isinstance(table, Mapping):
                raise SpecError(f"TorchQuantConfig.overrides[{glob!r}]: expected a table of fields, got {table!r}")
            bad = set(table) - {"weights", "activations", "embeddings"}
            if bad:
                raise SpecError(
                    f"TorchQuantConfig.overrides[{glob!r}]: per-module overrides set 'weights', 'activations' or "
                    f"'embeddings'; got {sorted(bad)}"
                )
            self.overrides[glob] = {
                f: expand_spec(f, v, f"TorchQuantConfig.overrides[{glob!r}].{f}") for f, v in table.items()
            }
        if modules_to_not_convert is not None and (
            isinstance(modules_to_not_convert, str) or not all(isinstance(m, str) for m in modules_to_not_convert)
        ):
            raise TypeError(
                f"TorchQuantConfig: modules_to_not_convert must be a list of names, got {modules_to_not_convert!r}"
            )
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.pack_weights = bool(pack_weights)

    def point(self, field: str, name: str) -> QuantizerSpec | None:
        """The spec of ``field`` for the module called ``name`` (overrides applied), or ``None``."""
        from fnmatch import fnmatchcase

        for glob, table in self.overrides.items():
            if field in table and fnmatchcase(name, glob):
                raw = table[field]
                return None if raw is None else QuantizerSpec.from_dict(raw)
        raw = getattr(self, field)
        return None if raw is None else QuantizerSpec.from_dict(raw)

    @property
    def quantizes_activations(self) -> bool:
        """Whether any point other than weights and embeddings is quantized."""
        return any(getattr(self, f) is not None for f in FIELDS if f not in _WEIGHT_FIELDS) or any(
            t.get("activations") is not None for t in self.overrides.values()
        )
