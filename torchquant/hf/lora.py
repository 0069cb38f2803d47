"""LoRA adapters on a torchquant-quantized, frozen base (QLoRA with torchquant formats), through peft.

peft does not know :class:`~torchquant.QWrapper`; :func:`lora_config` builds a
``peft.LoraConfig`` that maps it to :class:`QWrapperLoraLayer` through peft's
custom-module extension point (``LoraConfig._register_custom_module``)::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=TorchQuantConfig(weights="int4-g32"))
    model = peft.get_peft_model(model, lora_config(r=8, target_modules=["q_proj", "v_proj"]))

The layer's output is ``base(x) + scaling * B(A(dropout(x)))``: ``base`` is the
QWrapper as it is (quantized weight, quantized input, in its current mode) and the
low-rank update is float, computed from the float input. Only ``lora_A``/``lora_B``
train (peft freezes everything else, quantizer parameters included); keep the base
in ``QUANT_EVAL`` (no observation) so training moves no range.

Merging (``merge_and_unload``) adds ``scaling * B @ A`` to the QWrapper's *float*
weight and leaves its quantizer state as it is: the merged weight is then quantized
on the base's grid (the ranges observed from the unmerged weight), so merged
outputs equal the adapter's only up to that weight quantization. To refit weight
ranges to the merged weight, call ``observe_weight()`` on each QWrapper (min/max
weight observers replace their ranges) or calibrate again. ``unmerge`` subtracts
the same update.

An initialisation that rewrites the base weight (``init_lora_weights="pissa"``, ``"olora"``,
``"corda"``, ``"loftq"``) leaves the residual ``W - scaling * B @ A`` in the QWrapper; the
ranges of a weight quantizer with a range observer are then observed again from the residual
(ranges observed on ``W`` would clip it; a learned step, LSQ's, is kept). On a GPT-2
``Conv1D`` only PiSSA is supported (peft's OLoRA and CorDA read its ``(in, out)`` weight as
``(out, in)``): the others are refused.

A saved adapter loaded with ``PeftModel.from_pretrained`` needs the mapping too:
pass ``config=lora_config(...)`` built from the saved settings, or register it on the
loaded config with :func:`enable_lora` before the adapter is injected.

Only ``QWrapper`` s around a ``Linear`` or Hugging Face ``Conv1D``, with no BatchNorm or
activation after it, take an adapter. Target the QWrappers by name
(``target_modules=["q_proj", "v_proj"]``); ``"all-linear"`` would match the float
layer inside each QWrapper, which peft cannot wrap there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..layers import LAYER_ADAPTERS_BY_NAME
from ..ptq.calibrate import reobserve_weights
from ..qmodules import QWrapper

try:
    import peft
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("torchquant.hf.lora needs peft: pip install 'torchquant[hf]'") from e

__all__ = ["QWrapperLoraLayer", "enable_lora", "lora_config"]


def _check_target(qw: QWrapper) -> None:
    layer = qw.layer
    cls = type(layer)
    if not (isinstance(layer, nn.Linear) or f"{cls.__module__}.{cls.__qualname__}" in LAYER_ADAPTERS_BY_NAME):
        raise ValueError(
            f"torchquant LoRA: a QWrapper around {type(layer).__name__} takes no adapter; "
            "only QWrappers around a Linear or a Hugging Face Conv1D do"
        )
    if qw.bn is not None or qw.act is not None or qw.fold_bn:
        raise ValueError(
            f"torchquant LoRA: QWrapper[{qw._describe()}] has a BatchNorm or an activation after its layer, "
            "so a low-rank update of the layer is not an update of its output; target a QWrapper around a lone layer"
        )


class QWrapperLoraLayer(nn.Module, LoraLayer):
    """peft LoRA layer around a :class:`~torchquant.QWrapper` (``Linear`` or HF ``Conv1D``).

    Built by peft (``get_peft_model``) from a config made by :func:`lora_config`;
    not meant to be built by hand. Input ``x``: ``(..., in_features)``; output
    ``(..., out_features)``: the QWrapper's output plus the float low-rank updates
    of the active adapters. ``merge``/``unmerge`` change the QWrapper's float weight
    (see the module docstring). DoRA, ``lora_bias`` and per-call ``adapter_names``
    are not supported and raise.

    Raises:
        ValueError: a QWrapper that is not a lone ``Linear``/``Conv1D``, or an
            unsupported LoRA option.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1, **kwargs: Any
    ) -> None:
        for option in ("use_dora", "lora_bias"):
            if getattr(config, option, False):
                raise ValueError(f"torchquant LoRA: {option}=True is not supported on a quantized base")
        if getattr(config, "velora_config", None) is not None:
            raise ValueError("torchquant LoRA: VeLoRA is not supported on a quantized base")
        qw = base_layer.get_base_layer() if isinstance(base_layer, LoraLayer) else base_layer
        if not isinstance(qw, QWrapper):
            raise TypeError(f"torchquant LoRA: expected a QWrapper, got {type(qw).__name__}")
        _check_target(qw)
        init = getattr(config, "init_lora_weights", True)
        conv1d = type(qw.layer).__name__ == "Conv1D"
        if conv1d and isinstance(init, str) and init.startswith(("olora", "corda", "loftq")):
            # peft's OLoRA and LoftQ read base.weight as (out, in) whatever the layout, CorDA checks for a Conv1D
            raise ValueError(
                f"torchquant LoRA: init_lora_weights={init!r} on QWrapper[{qw._describe()}] (a Conv1D, stored "
                "(in, out)) would decompose the transposed weight; use 'pissa' or the default initialisation"
            )
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        before = qw.weight_view().detach().clone()
        # An initialisation that rewrites the base weight (PiSSA, OLoRA, CorDA, LoftQ) reads and writes
        # ``base.weight``, the layer's own parameter: (in, out) for a Conv1D.
        self.fan_in_fan_out = type(qw.layer).__name__ == "Conv1D"
        try:
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)
        finally:
            self.fan_in_fan_out = False  # the update is computed in the (out, in) layout of QWrapper.weight_view()
        if not torch.equal(before, qw.weight_view()):
            # the residual W - scaling * B A is what is quantized now: ranges observed on W would clip it
            reobserve_weights([qw])

    # peft reads features, device and dtype from the base layer's attributes; a QWrapper keeps them in .layer.
    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        out_features, in_features = module.weight_view().shape  # (out, in)
        return in_features, out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        w = base_layer.layer.weight
        return w.device, w.dtype

    def get_delta_weight(self, adapter: str) -> Tensor:
        """``scaling * B @ A`` of ``adapter``, ``(out_features, in_features)``, in the base weight's dtype."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight  # (r, in), (out, r)
        w = self.get_base_layer().layer.weight
        return ((b.float() @ a.float()) * self.scaling[adapter]).to(w.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' updates to the QWrapper's float weight (its quantizer state is left as it is).

        Raises:
            ValueError: ``safe_merge`` and the merged weight has non-finite values (nothing is changed).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        view = self.get_base_layer().weight_view()  # (out, in); a view of the parameter, also for Conv1D
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            delta = self.get_delta_weight(name)
            with torch.no_grad():
                if safe_merge and not torch.isfinite(view + delta).all():
                    raise ValueError(f"torchquant LoRA: merging adapter {name!r} gives non-finite weights")
                view.add_(delta)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged adapters' updates from the QWrapper's float weight."""
        view = self.get_base_layer().weight_view()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                with torch.no_grad():
                    view.sub_(self.get_delta_weight(name))

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("torchquant LoRA: per-call adapter_names (mixed adapter batches) is not supported")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, lora_a.weight.dtype)
            update = lora_b(lora_a(self.lora_dropout[name](h))) * self.scaling[name]  # (..., out)
            result = result + update.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def enable_lora(config: peft.LoraConfig) -> peft.LoraConfig:
    """Register :class:`QWrapperLoraLayer` for ``QWrapper`` targets on ``config`` (in place); returns ``config``.

    Raises:
        TypeError: ``config`` is not a ``peft.LoraConfig``.
    """
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"enable_lora: expected a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QWrapper: QWrapperLoraLayer})
    return config


def lora_config(**lora_kwargs: Any) -> peft.LoraConfig:
    """``peft.LoraConfig(**lora_kwargs)`` that also adapts torchquant ``QWrapper`` layers.

    Args:
        **lora_kwargs: any ``peft.LoraConfig`` arguments (``r``, ``lora_alpha``,
            ``target_modules``, ``lora_dropout``, ``task_type``, ...).

    Example:
        >>> cfg = lora_config(r=4, target_modules=["q_proj", "v_proj"])
        >>> cfg.r
        4
    """
    return enable_lora(peft.LoraConfig(**lora_kwargs))
