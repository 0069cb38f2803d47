"""SpeechBrain models and training loops with torchquant quantizers.

SpeechBrain's layers (``speechbrain.nnet.CNN.Conv1d``/``Conv2d``, ``speechbrain.nnet.linear.Linear``,
``speechbrain.nnet.attention.MultiheadAttention``, the lobes built from them: ECAPA-TDNN, CRDNN,
Transformer and Conformer encoders) keep a torch layer inside (``.conv``, ``.w``, ``.att``), reshape
around it and branch on shapes in ``forward``, so torch.fx cannot trace them; the module swap of
:func:`torchquant.quantize_model` replaces the torch layer inside each wrapper.
:func:`quantize_speechbrain` is that swap plus what is particular to SpeechBrain: feature
extraction (``speechbrain.lobes.features``) stays untouched, and modules that use their weights
directly (``nn.LSTM``/``nn.GRU`` inside ``speechbrain.nnet.RNN``, relative-position attention's
projections, ``SincConv``) are listed with the reason in :func:`torchquant.print_summary`.

:class:`QATSchedule` and :class:`QATBrainMixin` run quantization-aware training inside a
``speechbrain.Brain``: calibration for the first steps, QAT after, quantized evaluation, and the
schedule saved by SpeechBrain's ``Checkpointer`` beside the model (whose state dict holds the
quantizers' ranges and every QModule's mode).

:mod:`~torchquant.integrations.speechbrain.data` synthesises a spoken-digit set offline with
espeak-ng; :class:`~torchquant.integrations.speechbrain.models.KWSNet` is a keyword-spotting
network of speechbrain layers.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from ...convert import quantize_model, unconverted_weights
from ...factories import QuantizerFactory
from ...graph.common import FLOAT_REASONS_ATTR, Skip, SkipSpec, check_skip, warn_unmatched_skip
from ...qmodules import QModuleState
from ...utils import set_qmodule_state

__all__ = ["QATBrainMixin", "QATSchedule", "feature_types", "quantize_speechbrain", "raw_weight_reasons"]

FEATURE_MODULES = ("speechbrain.lobes.features", "speechbrain.processing.features")
"""Modules whose ``nn.Module`` classes :func:`quantize_speechbrain` skips (feature extraction)."""


def _speechbrain() -> Any:
    try:
        return importlib.import_module("speechbrain")
    except ImportError as e:
        raise ImportError(
            "torchquant.integrations.speechbrain needs speechbrain and torchaudio: pip install torchquant[speechbrain]"
        ) from e


def feature_types() -> tuple[type[nn.Module], ...]:
    """The ``nn.Module`` classes defined in :data:`FEATURE_MODULES` (``Fbank``, ``MFCC``, ``STFT``, ...)."""
    _speechbrain()
    out = []
    for modname in FEATURE_MODULES:
        mod = importlib.import_module(modname)
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, nn.Module) and cls.__module__ == modname:
                out.append(cls)
    return tuple(out)


def raw_weight_reasons(model: nn.Module) -> dict[str, str]:
    """Modules outside any QModule that use weight Parameters of their own (not a layer's), with why
    they stay in float.

    :func:`torchquant.convert.unconverted_weights` with every parameter of two or more
    dimensions counted as a weight (relative-position attention's input projection,
    ``SincConv``'s ``(out, 1)`` band edges), and, for ``nn.RNNBase`` (LSTM, GRU, RNN: fused
    recurrent kernels), the SpeechBrain layers that do quantize.

    Args:
        model: any model, typically after :func:`quantize_speechbrain`.

    Returns:
        ``{qualified name: reason}``.

    Example:
        >>> from torch import nn
        >>> sorted(raw_weight_reasons(nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 4), nn.LayerNorm(4))))
        ['1']
    """
    reasons = unconverted_weights(model, weight_like=lambda name, t: t.dim() >= 2)
    for name, m in model.named_modules():
        if name in reasons and isinstance(m, nn.RNNBase):
            reasons[name] += " (use speechbrain's LiGRU/QuasiRNN, built on Linear, to quantize)"
    return reasons


def quantize_speechbrain(
    model: nn.Module,
    weight_quantizer: QuantizerFactory | None,
    acts_quantizer: QuantizerFactory | None,
    *,
    skip: SkipSpec = (),
    fold_bn: bool | str = False,
    norm_outputs: bool = False,
) -> nn.Module:
    """Quantize a SpeechBrain model in place: :func:`torchquant.quantize_model` with ``method="swap"``.

    The torch layer inside every SpeechBrain wrapper (``Conv1d.conv``, ``Linear.w``,
    ``MultiheadAttention.att``, ...) becomes a ``QWrapper`` (a ``QMultiheadAttention``),
    feature extraction (:func:`feature_types`) is skipped, and modules that use their own
    weight Parameters (:func:`raw_weight_reasons`) are recorded for
    :func:`torchquant.print_summary` with the reason they stay in float. Every QModule starts
    ``BYPASSED``.

    Args:
        model: a float SpeechBrain model (a lobe, a ``Brain``'s module, any ``nn.Module``).
        weight_quantizer: factory ``(layer, name) -> Quantizer | None`` for weights.
        acts_quantizer: factory ``(layer, name) -> Quantizer | None`` for layer outputs.
        skip: more name globs or module types to keep in float.
        fold_bn: passed to :func:`torchquant.quantize_model`.
        norm_outputs: quantize normalisation outputs too (see :func:`torchquant.quantize_model`).

    Returns:
        ``model``, converted.

    Raises:
        ImportError: speechbrain is not installed.
        ValueError: a ``speechbrain.nnet.linear.Linear`` has ``max_norm`` set (it renormalises
            ``.w.weight`` in ``forward``, which would bypass the quantized weight).

    Example:
        >>> import torch
        >>> import torchquant as tq
        >>> from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN
        >>> net = ECAPA_TDNN(40, channels=[32, 32, 32, 32, 96], lin_neurons=16).eval()
        >>> wf = lambda m, n: tq.AffineQuantizer(8, tq.BatchMinMax(axis=0))
        >>> af = lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax())
        >>> q = quantize_speechbrain(net, wf, af)
        >>> tq.summary(q).splitlines()[-1]
        '38 quantization points (38 QWrapper, 0 QOp), 0 left in float'
    """
    _speechbrain()
    from speechbrain.nnet.linear import Linear as SBLinear

    for name, m in model.named_modules():
        if isinstance(m, SBLinear) and m.max_norm is not None:
            raise ValueError(
                f"quantize_speechbrain: {name or 'model'} (speechbrain Linear) has max_norm={m.max_norm}: it "
                "renormalises .w.weight in forward, outside the quantized weight; build it with max_norm=None"
            )
    user = check_skip(skip)
    # the feature extractors are skipped too; only the caller's own entries are checked for a match
    full = Skip((*user, *feature_types()))
    full.matched = user.matched
    quantize_model(model, weight_quantizer, acts_quantizer, skip=full, method="swap", fold_bn=fold_bn,
                   norm_outputs=norm_outputs)  # fmt: skip
    warn_unmatched_skip(user, "quantize_speechbrain")
    reasons = raw_weight_reasons(model)
    setattr(model, FLOAT_REASONS_ATTR, {**getattr(model, FLOAT_REASONS_ATTR, {}), **reasons})
    return model


class QATSchedule(nn.Module):
    """Which mode a quantized model trains and evaluates in: calibration for the first steps, then QAT.

    An ``nn.Module`` whose one buffer, ``steps`` (training steps taken), is its state, so
    SpeechBrain's ``Checkpointer`` (and any ``state_dict``) saves and restores it.

    Args:
        calibration_steps: training steps run in ``QModuleState.CALIBRATION`` (float forward,
            observers record ranges, the float weights still train) before ``train_mode``.
        train_mode: the mode after calibration (a ``QUANT_AWARE_TRAIN*`` mode).
        eval_mode: the mode evaluation uses once calibration is over; before that it runs
            ``BYPASSED`` (float).

    Example:
        >>> import torch
        >>> import torchquant as tq
        >>> net = tq.quantize_model(torch.nn.Linear(4, 2), None, lambda m, n: tq.AffineQuantizer(8, tq.ExpAvgMinMax()))
        >>> s = QATSchedule(calibration_steps=1)
        >>> s.train_step(net).name, s.train_step(net).name, s.evaluation(net).name, int(s.steps)
        ('CALIBRATION', 'QUANT_AWARE_TRAIN', 'QUANT_EVAL', 2)
    """

    def __init__(
        self,
        calibration_steps: int,
        *,
        train_mode: QModuleState = QModuleState.QUANT_AWARE_TRAIN,
        eval_mode: QModuleState = QModuleState.QUANT_EVAL,
    ) -> None:
        super().__init__()
        if not isinstance(calibration_steps, int) or calibration_steps < 0:
            raise ValueError(f"QATSchedule: calibration_steps must be an int >= 0, got {calibration_steps!r}")
        if not (isinstance(train_mode, QModuleState) and train_mode.name.startswith("QUANT_AWARE_TRAIN")):
            raise ValueError(f"QATSchedule: train_mode must be a QUANT_AWARE_TRAIN* QModuleState, got {train_mode!r}")
        if not (isinstance(eval_mode, QModuleState) and eval_mode.name.startswith("QUANT_EVAL")):
            raise ValueError(f"QATSchedule: eval_mode must be a QUANT_EVAL* QModuleState, got {eval_mode!r}")
        self.calibration_steps = calibration_steps
        self.train_mode = train_mode
        self.eval_mode = eval_mode
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def calibrating(self) -> bool:
        """Whether the next training step calibrates."""
        return int(self.steps) < self.calibration_steps

    def train_step(self, model: nn.Module) -> QModuleState:
        """Set the mode of the next training step on every QModule of ``model``, count the step, return the mode."""
        mode = QModuleState.CALIBRATION if self.calibrating else self.train_mode
        set_qmodule_state(model, mode)
        self.steps += 1
        return mode

    def evaluation(self, model: nn.Module) -> QModuleState:
        """Set the evaluation mode on every QModule of ``model`` (``BYPASSED`` while calibrating) and return it."""
        mode = QModuleState.BYPASSED if self.calibrating else self.eval_mode
        set_qmodule_state(model, mode)
        return mode

    def extra_repr(self) -> str:
        return (
            f"calibration_steps={self.calibration_steps}, train_mode={self.train_mode.name}, "
            f"eval_mode={self.eval_mode.name}, steps={int(self.steps)}"
        )


class QATBrainMixin:
    """QAT inside a ``speechbrain.Brain``: put it first among the bases, pass ``qat_schedule=``.

    ``fit_batch`` sets the schedule's training mode on ``self.modules`` before each step
    (calibration for the first ``calibration_steps`` steps, QAT after), ``evaluate_batch``
    its evaluation mode. With a ``checkpointer``, the schedule is added to it as the
    recoverable ``"torchquant_qat_schedule"``, so a recovered run continues where it stopped;
    the quantizers' ranges and the modes are in the model's state dict, which the
    checkpointer saves as any module's. A subclass that overrides ``fit_batch`` or
    ``evaluate_batch`` without calling ``super()`` calls ``self.qat_schedule.train_step(self.modules)``
    / ``.evaluation(self.modules)`` itself.

    Args:
        *args: ``speechbrain.Brain``'s arguments (``modules``, ``opt_class``, ``hparams``, ...).
        qat_schedule: the schedule.
        **kwargs: ``speechbrain.Brain``'s keyword arguments.

    Example::

        class KWSBrain(QATBrainMixin, sb.Brain):
            def compute_forward(self, batch, stage):
                return self.modules.model(batch[0].to(self.device))

            def compute_objectives(self, logits, batch, stage):
                return F.cross_entropy(logits, batch[1].to(self.device))

        q = quantize_speechbrain(model, wf, af)
        brain = KWSBrain(modules={"model": q}, opt_class=lambda p: torch.optim.Adam(p, 1e-3),
                         qat_schedule=QATSchedule(calibration_steps=20), checkpointer=checkpointer)
        brain.fit(range(3), train_loader, valid_loader)
    """

    def __init__(self, *args: Any, qat_schedule: QATSchedule, **kwargs: Any) -> None:
        if not isinstance(qat_schedule, QATSchedule):
            raise TypeError(f"QATBrainMixin: qat_schedule must be a QATSchedule, got {type(qat_schedule).__name__}")
        super().__init__(*args, **kwargs)
        self.qat_schedule = qat_schedule
        if getattr(self, "checkpointer", None) is not None:
            self.checkpointer.add_recoverable("torchquant_qat_schedule", qat_schedule)

    def fit_batch(self, batch: Any) -> torch.Tensor:
        """Set the schedule's training mode, then run ``Brain.fit_batch``."""
        self.qat_schedule.train_step(self.modules)
        return super().fit_batch(batch)

    def evaluate_batch(self, batch: Any, stage: Any) -> torch.Tensor:
        """Set the schedule's evaluation mode, then run ``Brain.evaluate_batch``."""
        self.qat_schedule.evaluation(self.modules)
        return super().evaluate_batch(batch, stage)
