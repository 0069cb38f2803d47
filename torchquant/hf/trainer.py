"""Quantization-aware training under ``transformers.Trainer``.

:class:`QuantizationCallback` drives the :class:`~torchquant.QModuleState` of the
model a ``Trainer`` trains: ``CALIBRATION`` for the first ``calibration_steps``
optimizer steps (the float model trains while the observers record ranges), then
``train_mode`` (``QUANT_AWARE_TRAIN``: fake quantization in the forward pass,
straight-through gradients), and ``eval_mode`` (``QUANT_EVAL``) for every evaluation
during training and at the end::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=TorchQuantConfig(weights="int8"))
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[QuantizationCallback(calibration_steps=100)])
    trainer.train()          # model ends in QUANT_EVAL

The ``Trainer`` builds its optimizer from ``model.parameters()``, so learned
quantizer parameters (LSQ steps, PACT clipping values) train with the weights. It
applies weight decay to every parameter whose name does not look like a bias or a
norm, quantizer parameters included; :func:`quantizer_parameter_names` lists them,
to leave them out::

    class QATTrainer(Trainer):
        def get_decay_parameter_names(self, model):
            skip = set(quantizer_parameter_names(model))
            return [n for n in super().get_decay_parameter_names(model) if n not in skip]
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..distributed import sync_observers as _sync_observers
from ..qmodules import QModuleState, iter_qmodules
from ..quantizers import Quantizer
from ..utils import set_qmodule_state

__all__ = ["QuantizationCallback", "quantizer_parameter_names"]


def quantizer_parameter_names(model: nn.Module) -> list[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters that quantizers own.

    Learned steps, offsets and clipping values (LSQ, LSQ+, PACT); empty for quantizers
    whose state is only ranges. Use it to leave them out of weight decay (see the
    module docstring).

    Example:
        >>> import torchquant as tq
        >>> from torch import nn
        >>> m = nn.Sequential(tq.QWrapper(nn.Linear(4, 4), weight_quantizer=tq.LSQQuantizer(4, axis=0)))
        >>> quantizer_parameter_names(m)
        ['0.weight_quantizer.step']
    """
    owned = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in owned]


def _distributed(args: Any) -> bool:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    return getattr(args, "world_size", 1) > 1 or initialised


class QuantizationCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that sets the quantization mode of the trained model.

    * train begin: under ``torch.distributed`` (``args.world_size > 1`` or an
      initialised process group) and with ``sync_observers``,
      :func:`torchquant.distributed.sync_observers` on the model, so that every
      rank holds the ranges of the whole batch; then ``CALIBRATION`` if
      ``calibration_steps > 0`` (counted from ``state.global_step``, so a resumed run
      continues where it stopped), else ``train_mode``.
    * after optimizer step ``calibration_steps``: ``train_mode``.
    * evaluation during training (``eval_strategy``): ``eval_mode`` from the end of
      the step that triggers it until ``on_evaluate``, then back, so the
      evaluation measures the quantized model and its data never moves a range.
      With ``eval_on_start``, the evaluation before the first step runs in ``eval_mode``
      too, or in ``BYPASSED`` (the float model) when calibration steps are still to come.
      The callback API has no "evaluation begins" event: an evaluation started by
      another callback's ``on_step_end`` that runs after this one, or
      ``trainer.evaluate()`` called outside ``train()``, runs in whatever mode the
      model is in (``eval_mode`` after training).
    * train end: ``eval_mode``; observer synchronisation, if it switched it on, off again (a later
      calibration on one rank alone would otherwise wait for the others).

    Every QModule of the model gets the same mode, set when the phase changes.
    With gradient checkpointing the forward runs again in the backward pass; that
    recomputation observes nothing, so each batch is observed once. With a PEFT model, LoRA on a frozen quantized base
    (:func:`torchquant.hf.lora_config`), leave this callback out: the base should stay
    in ``QUANT_EVAL`` so that training moves no range.

    Resuming: ``trainer.train(resume_from_checkpoint=ckpt)`` works as usual (a model
    converted by :func:`torchquant.hf.quantize` loads the float weight names that
    ``save_pretrained`` writes into its quantized layers).

    Args:
        calibration_steps: optimizer steps in ``CALIBRATION`` before ``train_mode``
            (``0``: ranges come from ``from_pretrained``/:func:`torchquant.calibrate`).
        train_mode: the mode of the remaining training steps.
        eval_mode: the mode for evaluation and after training.
        sync_observers: under ``torch.distributed``, synchronise range observers.

    Raises:
        TypeError: a mode that is not a :class:`~torchquant.QModuleState`.
        ValueError: a negative ``calibration_steps``; at train begin, a model without QModules.
    """

    def __init__(
        self,
        calibration_steps: int = 0,
        train_mode: QModuleState = QModuleState.QUANT_AWARE_TRAIN,
        eval_mode: QModuleState = QModuleState.QUANT_EVAL,
        sync_observers: bool = True,
    ) -> None:
        if isinstance(calibration_steps, bool) or not isinstance(calibration_steps, int) or calibration_steps < 0:
            raise ValueError(f"QuantizationCallback: calibration_steps must be an int >= 0, got {calibration_steps!r}")
        for what, mode in (("train_mode", train_mode), ("eval_mode", eval_mode)):
            if not isinstance(mode, QModuleState):
                raise TypeError(
                    f"QuantizationCallback: {what} must be a QModuleState, got {mode!r}; "
                    f"valid: {[m.name for m in QModuleState]}"
                )
        self.calibration_steps = calibration_steps
        self.train_mode = train_mode
        self.eval_mode = eval_mode
        self.sync_observers = bool(sync_observers)
        self._training = False
        self._mode: QModuleState | None = None  # the mode this callback last set
        self._warned_decay = False

    def _phase(self, step: int) -> QModuleState:
        return QModuleState.CALIBRATION if step < self.calibration_steps else self.train_mode

    def _set(self, model: nn.Module, mode: QModuleState) -> None:
        if mode is not self._mode:
            set_qmodule_state(model, mode)
            self._mode = mode

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or not iter_qmodules(model):
            raise ValueError(
                "QuantizationCallback: the model has no torchquant QModules; load it with "
                "from_pretrained(..., quantization_config=TorchQuantConfig(...)) or torchquant.hf.quantize() first"
            )
        self._synced = bool(self.sync_observers and _distributed(args))
        if self._synced:
            _sync_observers(model)
        self._check_weight_decay(model, optimizer)
        self._training = True
        self._mode = None  # set every QModule, whatever modes they hold now
        start = self._phase(state.global_step)
        if getattr(args, "eval_on_start", False):
            # the Trainer evaluates right after this callback, before any step (on_evaluate then sets the
            # phase): the quantized model, or the float one while calibration steps are still to come
            start = QModuleState.BYPASSED if start is QModuleState.CALIBRATION else self.eval_mode
        self._set(model, start)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # An evaluation triggered by this step runs right after the step-end callbacks.
        self._set(model, self.eval_mode if control.should_evaluate else self._phase(state.global_step))

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_evaluate:
            self._set(model, self.eval_mode)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self._training:
            self._set(model, self._phase(state.global_step))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._training = False
        self._set(model, self.eval_mode)
        if getattr(self, "_synced", False):
            # A later calibration on one rank alone would otherwise wait for the others.
            _sync_observers(model, enabled=False)
            self._synced = False

    def _check_weight_decay(self, model: nn.Module, optimizer: Any) -> None:
        if optimizer is None or self._warned_decay:
            return
        owned = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
        decayed = any(
            group.get("weight_decay", 0.0) and any(id(p) in owned for p in group["params"])
            for group in optimizer.param_groups
        )
        if decayed:
            self._warned_decay = True
            warnings.warn(
                "QuantizationCallback: the optimizer applies weight decay to learned quantizer parameters "
                "(LSQ steps, PACT clipping values), which shrinks them; leave them out with "
                "torchquant.hf.quantizer_parameter_names (see the torchquant.hf.trainer docstring)",
                stacklevel=2,
            )
