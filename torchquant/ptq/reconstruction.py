"""One reconstruction engine for AdaRound, BRECQ and QDrop.

The engine walks the model's *units* in forward order and, for each, learns
how to round its weights (and optionally its activation step sizes) so that
the quantized unit reproduces the float unit's output:

``min_V  || unit_q(x_q) - unit_fp(x_fp) ||^2 + lambda * sum(1 - |2 h(V) - 1|^beta)``

* ``x_q`` is the unit's input in the quantized model (units before it already
  reconstructed), ``unit_fp(x_fp)`` the float model's output of the same unit.
  The squared error is summed over channels (dim 1; the hidden size, the last dimension,
  on a transformer stack) and averaged over the rest
  (each element weighted by the diagonal Fisher with ``loss="fisher"``, below).
* Weights use AdaRound's soft rounding (Nagel et al. 2020, "Up or Down? Adaptive
  Rounding for Post-Training Quantization"): ``W_q = s * (clamp(floor(W / s) + h(V)
  + z, qmin, qmax) - z)`` with the rectified sigmoid ``h`` (``zeta = 1.1``,
  ``gamma = -0.1``), on the grid any weight quantizer reports through
  :meth:`~torchquant.quantizers.Quantizer.grid` (:class:`AdaRoundQuantizer`). A
  non-uniform quantizer (NF4, APoT) reports its levels through
  :meth:`~torchquant.quantizers.Quantizer.levels` instead; then ``h(V)`` interpolates
  between the two levels around ``W / s``: ``W_q = s * (l_lo + h(V) (l_hi - l_lo))``. The
  regulariser's ``beta`` is annealed linearly from 20 to 2 after a warm-up of 20%
  of the iterations without it; ``lambda = 0.01``; Adam.
* Afterwards the rounding is made hard (``h = [V >= 0]``), the rounded grid values (or levels)
  are written into the layer's weight (with ``fold_bn=True`` the quantizer rounds the
  folded weight, and the layer gets the rounded values divided by BatchNorm's
  ``gamma / sigma``) and the original weight quantizer is put
  back: its grid is unchanged, so in ``QUANT_EVAL`` modes it reproduces them exactly,
  and the model saves and loads like any other quantized model. (Calibrating the
  weights again would recompute their ranges from the rounded weights; do not.)

The presets differ only by options:

=============  ===========  ==============================  =================  ==================  ========
preset         granularity  activations inside the unit     drop probability   learned act. steps  loss
=============  ===========  ==============================  =================  ==================  ========
``adaround``   layer        float (weight-only; loss on the  0                  no                  mse
                            layer output after BatchNorm
                            and activation, before its
                            output quantizer)
``brecq``      block        quantized                       0                  yes (default)       fisher
``qdrop``      block        quantized, each element kept     0.5 (also mixes    yes (default)       mse
                            float with probability ``p``     float inputs in)
=============  ===========  ==============================  =================  ==================  ========

Mixture-of-experts banks (:class:`~torchquant.QExperts`) inside a block unit get the same soft
rounding, each bank on the ``(E * out, in)`` rows its quantizer sees, written back into the bank
afterwards; a unit of one layer (AdaRound's) cannot run them without their routing, so AdaRound
leaves them at round to nearest and says so in a warning.

Blocks (BRECQ, Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training
Quantization by Block Reconstruction") are residual blocks: by default the types
in :data:`RECONSTRUCTION_BLOCKS` (model code adds its own blocks there, as
:mod:`torchquant.bench.models` does) and, when torchvision is loaded, its
``BasicBlock``, ``Bottleneck`` and ``InvertedResidual``; or the types /
qualified-name globs given as ``blocks``. Layers outside every block are
reconstructed on their own.

Transformer stacks: when :func:`~torchquant.ptq.sequential.find_blocks` finds a list of
repeated blocks in a Hugging Face-style model (one with a ``config``: a Llama's
``model.layers``), or ``blocks`` names it as a string (as for GPTQ), the stack is
reconstructed on the sequential engine (:mod:`torchquant.ptq.sequential`):
BRECQ and QDrop take each decoder layer as a unit, AdaRound each weighted layer inside it
(in forward order, with the layers before it in the block already rounded). The inputs of
decoder layer ``i`` are the outputs of layer ``i - 1`` after its reconstruction, in the
quantized mode; a float copy of the model runs alongside on its own float stream and gives
``x_fp`` and the targets ``unit_fp(x_fp)``, so only one layer's activations are held at a
time. The layer's keyword inputs (attention mask, rotary position embeddings) are captured
once and passed to every call, the key/value cache disabled; they must be the same for
every calibration sample (batches of one sequence length, no padding). Layers outside the
stack are reconstructed on their own with whole-model passes, those called before the first
decoder layer first. With ``loss="fisher"`` a language model's task loss is the next-token
``KL(softmax(float logits) || softmax(quantized logits))`` over the vocabulary, summed over
every position, through the rest of the model. Passing ``blocks`` as a tuple of types or
globs keeps the whole-model path.

The options are one frozen :class:`ReconstructionConfig`, checked when it is
built; the presets are the named configs :data:`ADAROUND`, :data:`BRECQ` and
:data:`QDROP` (the table above), and their functions :func:`adaround`,
:func:`brecq` and :func:`qdrop` accept the config's fields as keyword arguments.

``loss="fisher"`` is BRECQ's diagonal-Fisher weighting: each element of the squared
error is weighted by the squared gradient, w.r.t. the unit's output, of the task
loss, here ``KL(softmax(float logits) || softmax(quantized logits))`` (no labels
needed), computed once per unit on the calibration data in the model quantized up
to and including the unit (later QModules bypassed, the unit still rounded to
nearest). The weights are normalised to mean 1 and damped:
``(g^2 / mean(g^2) + fisher_damping) / (1 + fisher_damping)``.

QDrop (Wei et al. 2022, "QDrop: Randomly Dropping Quantization for Extremely
Low-bit Post-Training Quantization") replaces each quantized activation inside the
unit, and each element of the unit's input, by its float value with probability
``drop_prob`` at every iteration (no drop once reconstructed). The activations are those
of every QModule's ``acts_quantizer`` (its output) and ``input_quantizer`` (its layer's
input, as a Hugging Face model quantizes them).

Learned activation step sizes (``learn_act_step=True``, the default of both block
presets, whose papers learn them jointly with the rounding) follow LSQ (Esser et
al. 2020): the step of each per-tensor or per-channel
:class:`~torchquant.AffineQuantizer` inside the unit starts from its calibrated
value, is trained with the straight-through estimator by Adam at a learning rate
*relative* to that value (``act_lr`` times the quantizer's mean step), annealed to 0 with a cosine
as in both papers, and is written back into its observer's ranges. Dynamic quantizers
(:class:`~torchquant.StatelessQuantizer`, e.g. per-token ranges computed at run time) have
no step to learn and are left as they are (QDrop still drops their quantization), and so are
power-of-two grids (``power_of_two=True``: a learned step would be rounded to another grid when
written back), with a warning naming them.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers import bn_scale_shift
from ..moe import QExperts, _bank, _rows
from ..qmodules import QModule, QModuleState, QWrapper, iter_qmodules
from ..quantizers import AdaRoundQuantizer, AffineGrid, AffineQuantizer, LevelGrid, Quantizer, StatelessQuantizer
from ..quantizers_functional import compute_dtype, round_ste
from ..utils import call_model, progress_bar, restoring_states
from ._common import (
    Snapshot,
    capture,
    first_names,
    forward_order,
    materialize,
    require_qmodules,
    tied_weights,
    warn_experts_left,
    warn_tied,
)
from .registry import register_ptq_algorithm
from .sequential import Block, find_blocks, sequential_blocks

__all__ = [
    "ADAROUND",
    "BRECQ",
    "PRESETS",
    "QDROP",
    "RECONSTRUCTION_BLOCKS",
    "AdaRoundQuantizer",
    "ReconstructionConfig",
    "adaround",
    "brecq",
    "qdrop",
    "reconstruct",
    "reconstruction_block",
]


class _LearnedStep(Quantizer):
    """LSQ-style activation quantizer on a copy of an AffineQuantizer's grid, step trained by STE."""

    def __init__(self, inner: AffineQuantizer) -> None:
        super().__init__()
        grid = inner.grid()
        self.inner = inner
        self.step = nn.Parameter(grid.scale.detach().clone().float())  # float32: Adam's steps in float16 underflow
        self.register_buffer("zero_point", grid.zero_point.detach().clone())
        self.qmin, self.qmax = grid.qmin, grid.qmax

    def pre_observe(self, x: Tensor) -> None:
        pass

    def post_observe(self, x: Tensor) -> None:
        pass

    def quantize(self, x: Tensor) -> Tensor:
        s = self.step.abs().clamp(min=1e-8)
        q = torch.clamp(round_ste(x.to(compute_dtype(x)) / s) + self.zero_point, self.qmin, self.qmax)
        return ((q - self.zero_point) * s).to(x.dtype)

    def write_back(self) -> None:
        """Set the inner quantizer's ranges so that its step is the learned one (zero point unchanged)."""
        obs = self.inner.range_observer
        s = self.step.detach().abs().clamp(min=1e-8)
        if self.inner.symmetric:
            half = (self.qmax - self.qmin) / 2
            mn, mx = -s * half, s * half
        else:
            mn, mx = (self.qmin - self.zero_point) * s, (self.qmax - self.zero_point) * s
        obs.force_ranges(mn.reshape(obs.min_val.shape), mx.reshape(obs.max_val.shape))


def _learns_step(q: Quantizer) -> bool:
    """Whether ``learn_act_step`` trains ``q``'s step: not a dynamic range (no step), not a power-of-two grid
    (its step rounds up to a power of two when written back: the rounding would be tuned to another grid)."""
    return not isinstance(q, StatelessQuantizer) and not getattr(q, "power_of_two", False)


_ACT_ATTRS = ("input_quantizer", "acts_quantizer")
"""The activation quantizers of a QModule: its layer's input (transformer-style W8A8) and its output."""


def _act_quantizers(m: QModule) -> list[tuple[str, Quantizer]]:
    own = m.quantizers()
    return [(attr, own[attr]) for attr in _ACT_ATTRS if own.get(attr) is not None]


class _Drop(Quantizer):
    """QDrop: each element of ``inner(x)`` is replaced by ``x`` with probability ``p``."""

    def __init__(self, inner: Quantizer, p: float, generator: torch.Generator) -> None:
        super().__init__()
        self.inner = inner
        self.p = p
        self.generator = generator

    def pre_observe(self, x: Tensor) -> None:
        pass

    def post_observe(self, x: Tensor) -> None:
        pass

    def quantize(self, x: Tensor) -> Tensor:
        drop = torch.rand(x.shape, generator=self.generator, device=x.device) < self.p
        return torch.where(drop, x, self.inner(x))


RECONSTRUCTION_BLOCKS: list[type[nn.Module]] = []
"""Module types that ``granularity="block"`` reconstructs as one unit by default.

Model code adds its residual blocks with :func:`reconstruction_block`;
torchvision's ``BasicBlock``, ``Bottleneck`` and ``InvertedResidual`` are added
when torchvision is loaded, without importing it.
"""


def reconstruction_block(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: reconstruct modules of this type as one unit by default (see :data:`RECONSTRUCTION_BLOCKS`)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"reconstruction_block: expected an nn.Module subclass, got {cls!r}")
    if cls not in RECONSTRUCTION_BLOCKS:
        RECONSTRUCTION_BLOCKS.append(cls)
    return cls


def _default_blocks() -> tuple[type[nn.Module], ...]:
    types = list(RECONSTRUCTION_BLOCKS)
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is not None:
        types += [resnet.BasicBlock, resnet.Bottleneck]
    mbv2 = sys.modules.get("torchvision.models.mobilenetv2")
    if mbv2 is not None:
        types.append(mbv2.InvertedResidual)
    return tuple(types)


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"reconstruct: {name} must be an int >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class ReconstructionConfig:
    """The options of :func:`reconstruct`, checked once when the config is built.

    Attributes:
        granularity: ``"layer"`` (each QWrapper) or ``"block"`` (see ``blocks``).
        blocks: a string: the qualified name of the ``nn.ModuleList`` of a transformer's
            decoder layers (``"model.layers"``), reconstructed on the sequential engine (any
            granularity; see "Transformer stacks" in the module docstring). A tuple, for
            ``"block"``: module types and/or qualified-name globs of the blocks. ``None``: on a
            model with a ``config`` (Hugging Face), the stack that
            :func:`~torchquant.ptq.sequential.find_blocks` finds, else
            :data:`RECONSTRUCTION_BLOCKS` and torchvision's residual blocks.
        act_quant: quantize activations inside the unit while reconstructing it.
        drop_prob: QDrop's probability of keeping an activation (and an input element) float.
        learn_act_step: also learn the steps of the unit's activation AffineQuantizers (LSQ).
        loss: ``"mse"`` (squared error summed over channels) or ``"fisher"`` (each element
            weighted by BRECQ's diagonal Fisher; the model must return logits ``(N, C, ...)``,
            or a Hugging Face output whose ``logits`` are ``(N, T, vocab)``).
        fisher_damping: with ``loss="fisher"``: added to the normalised Fisher weights (default 1.0).
        iters: optimisation steps per unit.
        batch_size: samples per step, drawn at random from the unit's cached inputs.
        lr: Adam learning rate of the rounding variables.
        act_lr: Adam learning rate of the activation steps, relative to each step's calibrated
            value, annealed to 0 with a cosine. The default 4e-4 corresponds to the papers'
            4e-5 for steps of about 0.1 over their 20k iterations; short runs need about 1e-2.
        reg_weight: ``lambda``, weight of the rounding regulariser.
        beta: ``(start, end)`` of the annealed regulariser exponent.
        warmup: fraction of ``iters`` without the regulariser.
        mode: the quantized mode the model is used in: ``QUANT_EVAL`` or ``QUANT_EVAL_WEIGHT_ONLY``.

    Raises:
        ValueError: an option out of range or options that do not go together.
        TypeError: a ``blocks`` entry that is neither a module type nor a string.

    Example:
        >>> import dataclasses
        >>> from torchquant.ptq import BRECQ, ReconstructionConfig
        >>> short = dataclasses.replace(BRECQ, iters=200, lr=1e-2)  # checked again
        >>> short.loss, short.iters
        ('fisher', 200)
        >>> ReconstructionConfig(drop_prob=0.5)
        Traceback (most recent call last):
        ...
        ValueError: reconstruct: drop_prob > 0 and learn_act_step need act_quant=True
    """

    granularity: str = "layer"
    blocks: str | tuple[type[nn.Module] | str, ...] | None = None
    act_quant: bool = False
    drop_prob: float = 0.0
    learn_act_step: bool = False
    loss: str = "mse"
    fisher_damping: float | None = None
    iters: int = 10000
    batch_size: int = 32
    lr: float = 1e-3
    act_lr: float = 4e-4
    reg_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    mode: QModuleState = QModuleState.QUANT_EVAL

    def __post_init__(self) -> None:
        if self.granularity not in ("layer", "block"):
            raise ValueError(f"reconstruct: granularity must be 'layer' or 'block', got {self.granularity!r}")
        if isinstance(self.blocks, str):
            if not self.blocks:
                raise ValueError("reconstruct: blocks='' names no module list; pass its qualified name")
        elif self.blocks is not None:
            if self.granularity != "block":
                raise ValueError("reconstruct: blocks is only used with granularity='block'")
            object.__setattr__(self, "blocks", tuple(self.blocks))
            for s in self.blocks:
                if not (isinstance(s, str) or (isinstance(s, type) and issubclass(s, nn.Module))):
                    raise TypeError(f"reconstruct: blocks entries must be nn.Module types or name globs, got {s!r}")
        valid_modes = (QModuleState.QUANT_EVAL, QModuleState.QUANT_EVAL_WEIGHT_ONLY)
        if not isinstance(self.mode, QModuleState) or self.mode not in valid_modes:
            raise ValueError(f"reconstruct: mode must be QUANT_EVAL or QUANT_EVAL_WEIGHT_ONLY, got {self.mode!r}")
        if not 0.0 <= float(self.drop_prob) < 1.0:
            raise ValueError(f"reconstruct: drop_prob must be in [0, 1), got {self.drop_prob!r}")
        object.__setattr__(self, "drop_prob", float(self.drop_prob))
        if (self.drop_prob > 0 or self.learn_act_step) and not self.act_quant:
            raise ValueError("reconstruct: drop_prob > 0 and learn_act_step need act_quant=True")
        if self.act_quant and self.mode is not QModuleState.QUANT_EVAL:
            raise ValueError("reconstruct: act_quant=True needs mode=QUANT_EVAL (activations quantized)")
        if self.loss not in ("mse", "fisher"):
            raise ValueError(f"reconstruct: loss must be 'mse' or 'fisher', got {self.loss!r}")
        if self.fisher_damping is not None and self.loss != "fisher":
            raise ValueError("reconstruct: fisher_damping is only used with loss='fisher'")
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not d >= 0:
            raise ValueError(f"reconstruct: fisher_damping must be a number >= 0, got {self.fisher_damping!r}")
        _check_positive_int(self.iters, "iters")
        _check_positive_int(self.batch_size, "batch_size")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"reconstruct: warmup must be in [0, 1), got {self.warmup!r}")
        if len(self.beta) != 2 or not self.beta[0] >= self.beta[1] > 0:
            raise ValueError(f"reconstruct: beta must be (start, end) with start >= end > 0, got {self.beta!r}")
        object.__setattr__(self, "beta", tuple(self.beta))

    @property
    def damping(self) -> float:
        """``fisher_damping``, or its default 1.0 when unset."""
        return 1.0 if self.fisher_damping is None else self.fisher_damping


ADAROUND = ReconstructionConfig()
"""AdaRound (Nagel et al. 2020): each layer, weights only, squared error."""
BRECQ = ReconstructionConfig(granularity="block", act_quant=True, learn_act_step=True, loss="fisher")
"""BRECQ (Li et al. 2021): each block, activations quantized, steps learned, Fisher-weighted error."""
QDROP = ReconstructionConfig(granularity="block", act_quant=True, drop_prob=0.5, learn_act_step=True)
"""QDrop (Wei et al. 2022): as BRECQ, each activation element kept float with probability 0.5, squared error."""
PRESETS: dict[str, ReconstructionConfig] = {"adaround": ADAROUND, "brecq": BRECQ, "qdrop": QDROP}
"""The named configs of the table in the module docstring (and in ``docs/ptq.md``)."""

# What makes each preset that method: its function refuses to change these (reconstruct can).
_FIXED: dict[str, frozenset[str]] = {
    "adaround": frozenset({"granularity", "act_quant", "drop_prob", "learn_act_step"}),
    "brecq": frozenset({"granularity", "act_quant", "drop_prob"}),
    "qdrop": frozenset({"granularity", "act_quant"}),
}
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(ReconstructionConfig))
_RUN_OPTIONS = frozenset({"num_batches", "seed", "progress"})


def _configure(who: str, config: ReconstructionConfig, options: dict[str, Any]) -> ReconstructionConfig:
    """``config`` with ``options`` (config fields given as keyword arguments) replaced, checked again."""
    if not isinstance(config, ReconstructionConfig):
        raise TypeError(f"{who}: config must be a ReconstructionConfig, got {type(config).__name__}")
    unknown = sorted(set(options) - _CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"{who}: unknown options {unknown}; valid: {sorted(_CONFIG_FIELDS | _RUN_OPTIONS)}")
    return dataclasses.replace(config, **options) if options else config


def _learnable(m: nn.Module, tied: frozenset[int] = frozenset()) -> bool:
    # A computed weight (weight standardisation, a parametrization) has no parameter to write the rounding into,
    # and a weight other modules share (``tied``, ids: tied embeddings) would change them too: such a layer
    # keeps its round-to-nearest weight quantizer.
    return isinstance(m, QWrapper) and m.weight_quantizer is not None and not m.weight_is_computed and id(m) not in tied


def _units(model: nn.Module, config: ReconstructionConfig, tied: frozenset[int]) -> list[tuple[str, nn.Module]]:
    wrappers = [(n, m) for n, m in model.named_modules() if _learnable(m, tied)]
    if config.granularity == "layer":
        return wrappers
    specs = config.blocks if config.blocks is not None else _default_blocks()

    def is_block(name: str, m: nn.Module) -> bool:
        return any(
            (isinstance(s, str) and fnmatch.fnmatchcase(name, s)) or (isinstance(s, type) and isinstance(m, s))
            for s in specs
        )

    units: list[tuple[str, nn.Module]] = []
    covered: set[int] = set()
    for name, m in model.named_modules():
        if name and id(m) not in covered and is_block(name, m):
            inner = [w for w in m.modules() if _learnable(w, tied)]
            if inner:
                units.append((name, m))
                covered.update(id(x) for x in m.modules())
    if not units:
        raise ValueError(
            f"reconstruct: granularity='block' found no block in {type(model).__name__} among "
            f"{[getattr(s, '__name__', s) for s in specs]}; pass blocks=[BlockType or 'name.glob']"
        )
    units += [(n, w) for n, w in wrappers if id(w) not in covered]
    return units


def reconstruct(
    model: nn.Module,
    data: Iterable,
    config: ReconstructionConfig | None = None,
    *,
    num_batches: int | None = None,
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> dict[str, float]:
    """Learn the weight rounding of a calibrated model unit by unit (see the module docstring).

    The model must be calibrated (every quantizer has its ranges) and runs in ``config.mode``
    while the inputs of each unit are collected; a float copy gives the targets. A transformer
    stack runs one decoder layer at a time on the sequential engine (module docstring). On
    success the weights hold the hard-rounded grid values; if anything fails
    part-way, the model is restored exactly as it was.

    Args:
        model: a calibrated model with QWrappers whose weight quantizers report a grid.
        data: calibration batches (as for :func:`~torchquant.ptq.calibrate`); all of them
            (or ``num_batches``) are kept in memory as unit inputs.
        config: the options (default: ``ReconstructionConfig()``, AdaRound's).
        num_batches: use at most this many batches of ``data``.
        seed: seeds the sampling and QDrop's masks (results are reproducible for a seed).
        progress: show a progress bar over units.
        **options: fields of :class:`ReconstructionConfig` replacing those of ``config``
            (``granularity``, ``iters``, ``lr``, ``loss``, ...).

    Returns:
        The final reconstruction loss of each unit, by qualified name.

    Raises:
        ValueError: no QModule, empty data, a wrong mode or option, no unit found,
            a unit not called with one tensor, or, on a transformer stack, calibration
            batches whose shapes or keyword inputs (masks, positions) differ.
        TypeError: an unknown option, a weight quantizer with neither an affine grid nor levels (or, with
            ``learn_act_step``, an activation quantizer that is not an AffineQuantizer).
        RuntimeError: the model does not run on ``data`` in ``mode`` (e.g. not calibrated).
    """
    qmodules = require_qmodules(model, "reconstruct")
    c = _configure("reconstruct", ReconstructionConfig() if config is None else config, options)
    batches = materialize(data, num_batches, "reconstruct")
    stack = _stack(model, c)
    shared = tied_weights(model, [(n, m) for n, m in qmodules if isinstance(m, QWrapper)])
    tied = frozenset(id(w) for w in shared)
    warn_tied({w: h for w, h in shared.items() if _learnable(w)}, {m: n for n, m in qmodules}, "reconstruct")
    units = stack + _outside(model, stack, tied) if stack else _units(model, c, tied)
    # Expert banks are learned inside block units; a unit of one layer cannot run them (they need the routing).
    inside = {id(m) for _, u in units if c.granularity == "block" and not isinstance(u, QWrapper) for m in u.modules()}
    warn_experts_left(
        [(n, m) for n, m in qmodules if id(m) not in inside],
        "reconstruct",
        "; brecq and qdrop learn them inside the blocks that hold them" if c.granularity == "layer" else "",
    )
    gridless = [
        f"{n}.{QExperts.ROLE_OF_BANK[bank]}_quantizer ({type(q).__name__})"
        for n, m in qmodules
        if isinstance(m, QExperts) and id(m) in inside
        for bank, q, _ in m._weights()
        if not _reports_grid(q)
    ]
    if gridless:
        warnings.warn(
            f"reconstruct: {len(gridless)} expert bank(s) keep their round-to-nearest weights: their quantizers "
            f"report neither an affine grid nor levels to round on ({first_names(gridless)})",
            UserWarning,
            stacklevel=2,
        )
    names = {m: n for n, m in model.named_modules()}
    pow2: list[str] = []
    for name, unit in units:
        for w in [unit] if isinstance(unit, QWrapper) else unit.modules():
            if _learnable(w, tied):
                _grid_of(w.weight_quantizer, f"the weight quantizer of {name}")
            if c.learn_act_step and isinstance(w, QModule):
                for attr, q in _act_quantizers(w):
                    if not isinstance(q, (AffineQuantizer, StatelessQuantizer)):
                        raise TypeError(
                            f"reconstruct: learn_act_step needs AffineQuantizer activation quantizers; "
                            f"{name}.{attr} is {type(q).__name__} (pass learn_act_step=False to keep its ranges)"
                        )
                    if getattr(q, "power_of_two", False):
                        pow2.append(f"{names.get(w, name)}.{attr}")
    if pow2:
        warnings.warn(
            f"reconstruct: {len(pow2)} activation quantizer(s) keep their calibrated steps: a learned step is not a "
            f"power of two, and writing it back would round it to another grid ({first_names(pow2)})",
            UserWarning,
            stacklevel=2,
        )

    snapshot = Snapshot(model)
    with restoring_states(model):
        try:
            float_model = copy.deepcopy(model)
            for _, m in iter_qmodules(float_model):
                m.qstate = QModuleState.BYPASSED
            float_model.eval()
            model.eval()
            for _, m in qmodules:
                m.qstate = c.mode
            _check_runs(model, batches, c)
            fisher = _fisher(model, float_model, qmodules, batches, c)
            if stack:
                losses = _reconstruct_stack(model, float_model, stack, batches, c, seed, progress, fisher, tied)
            else:
                losses = _reconstruct_units(model, float_model, units, batches, c, seed, progress, fisher, tied)
        except BaseException:
            snapshot.restore()
            raise
    return losses


def _stack(model: nn.Module, c: ReconstructionConfig) -> list[tuple[str, nn.Module]]:
    """The decoder layers to reconstruct on the sequential engine, or ``[]`` for the whole-model path."""
    if isinstance(c.blocks, str):
        return find_blocks(model, c.blocks, "reconstruct")
    if c.blocks is not None or getattr(model, "config", None) is None:
        # Found automatically only on Hugging Face-style models (they carry a ``config``): a CNN
        # that keeps its blocks in a ModuleList (EfficientNet) stays on the whole-model path,
        # whose error sums over channels.
        return []
    return find_blocks(model, None, "reconstruct")


def _outside(model: nn.Module, stack: list[tuple[str, nn.Module]], tied: frozenset[int]) -> list[tuple[str, nn.Module]]:
    """The learnable layers of ``model`` outside every block of ``stack`` (a head, a stem)."""
    inside = {id(m) for _, b in stack for m in b.modules()}
    return [(n, m) for n, m in model.named_modules() if _learnable(m, tied) and id(m) not in inside]


def _check_runs(model: nn.Module, batches: list, c: ReconstructionConfig) -> None:
    try:
        with torch.no_grad():
            call_model(model, batches[0], "reconstruct")
    except Exception as e:
        raise RuntimeError(
            f"reconstruct: the model does not run on the first batch in {c.mode.name} "
            f"(calibrate it first and check the input shape): {e}"
        ) from e


def _fisher(
    model: nn.Module,
    float_model: nn.Module,
    qmodules: list[tuple[str, QModule]],
    batches: list,
    c: ReconstructionConfig,
) -> Callable[[nn.Module], Tensor | None]:
    """``fisher(unit)``: BRECQ's Fisher weights of ``unit``'s outputs (``None`` unless ``c.loss == "fisher"``),
    computed when asked, in the model as reconstructed up to then; the float logits once for all units."""
    if c.loss != "fisher":
        return lambda unit: None
    all_order = forward_order(model, [m for _, m in qmodules], batches[0], "reconstruct")
    with torch.no_grad():
        refs = [_logits(call_model(float_model, b, "reconstruct")) for b in batches]

    def fisher(unit: nn.Module) -> Tensor:
        inside = {id(m) for m in unit.modules()}
        last = max(k for k, m in enumerate(all_order) if id(m) in inside)
        return _fisher_weights(model, unit, all_order[last + 1 :], batches, refs, float(c.damping))

    return fisher


def _reconstruct_units(
    model: nn.Module,
    float_model: nn.Module,
    units: list[tuple[str, nn.Module]],
    batches: list,
    c: ReconstructionConfig,
    seed: int,
    progress: bool,
    fisher: Callable[[nn.Module], Tensor | None],
    tied: frozenset[int],
    first_index: int = 0,
    channel_dim: int = 1,
) -> dict[str, float]:
    """The body of :func:`reconstruct` once everything is checked and the modes set: each unit in forward order.

    ``float_model`` is the float copy (every QModule ``BYPASSED``) that gives the targets;
    unit ``i`` of the forward order draws its samples with the seed ``seed * 100003 + first_index + i``;
    the squared error is summed over ``channel_dim``.
    """
    float_modules = dict(float_model.named_modules())
    names = {m: n for n, m in units}
    calls: dict[nn.Module, int] = {}  # a unit called several times per forward pass learns from every call
    order = forward_order(model, [m for _, m in units], batches[0], "reconstruct", calls)
    missing = [n for n, m in units if m not in order]
    if missing:
        raise ValueError(f"reconstruct: units never called by the forward pass: {missing}")
    losses: dict[str, float] = {}
    for i, unit in enumerate(progress_bar(order, len(order), "reconstruct", progress)):
        name = names[unit]
        n = calls[unit]
        x_q, _, kwargs = capture(model, unit, batches, "reconstruct", name, want_output=False, calls=n)
        x_fp, y_fp, _ = capture(float_model, float_modules[name], batches, "reconstruct", name, True, calls=n)
        gen = torch.Generator(device=x_q.device).manual_seed(seed * 100003 + first_index + i)
        # a bias the model passes (weight_reads): the unit is replayed with it, as its targets were computed
        call = (lambda x, unit=unit, kwargs=kwargs: unit(x, **kwargs)) if kwargs else None
        losses[name] = _reconstruct_unit(unit, x_q, x_fp, y_fp, fisher(unit), gen, c, call, channel_dim, tied)
    return losses


def _reconstruct_stack(
    model: nn.Module,
    float_model: nn.Module,
    stack: list[tuple[str, nn.Module]],
    batches: list,
    c: ReconstructionConfig,
    seed: int,
    progress: bool,
    fisher: Callable[[nn.Module], Tensor | None],
    tied: frozenset[int],
) -> dict[str, float]:
    """:func:`reconstruct` on a transformer stack: the decoder layers of ``stack`` on the sequential
    engine, the layers outside them on their own with whole-model passes (those called before the
    first decoder layer first, the others last)."""
    outside = _outside(model, stack, tied)
    first = stack[0][1]
    order = forward_order(model, [m for _, m in outside] + [first], batches[0], "reconstruct")
    if first not in order:
        raise ValueError(f"reconstruct: the decoder layer {stack[0][0]} is never called by the forward pass")
    early = set(order[: order.index(first)])
    before = [(n, m) for n, m in outside if m in early]
    after = [(n, m) for n, m in outside if m not in early]
    losses: dict[str, float] = {}
    if before:
        losses.update(
            _reconstruct_units(model, float_model, before, batches, c, seed, False, fisher, tied, channel_dim=-1)
        )

    stack_name = stack[0][0].rsplit(".", 1)[0]
    float_modules = dict(float_model.named_modules())
    index = len(losses)
    blocks_q = sequential_blocks(model, batches, blocks=stack_name, mode=c.mode, who="reconstruct", progress=progress)
    blocks_fp = sequential_blocks(
        float_model, batches, blocks=stack_name, mode=QModuleState.BYPASSED, who="reconstruct", progress=False
    )
    for bq, bf in zip(blocks_q, blocks_fp):
        x_q, args, kwargs = _stacked_inputs(bq)  # checks that every batch has the same shape and keywords
        if c.granularity == "block":
            x_fp, _, _ = _stacked_inputs(bf)
            y_fp = torch.cat([o.detach() for o in bf.run()])
            gen = torch.Generator(device=x_q.device).manual_seed(seed * 100003 + index)

            def call(x: Tensor, block: nn.Module = bq.module, args: tuple = args, kwargs: dict = kwargs) -> Tensor:
                out = block(x, *args, **kwargs)
                return out[0] if isinstance(out, (tuple, list)) else out

            losses[bq.name] = _reconstruct_unit(bq.module, x_q, x_fp, y_fp, fisher(bq.module), gen, c, call, -1, tied)
            index += 1
            continue
        layers = [w for g in bq.groups() for w in g if _learnable(w, tied)]
        names = {m: n for n, m in bq.layers}
        missing = [n for n, m in bq.layers if _learnable(m, tied) and m not in layers]
        if missing:
            raise ValueError(f"reconstruct: units never called by the forward pass: {missing}")
        for w in layers:
            name = names[w]
            fw = float_modules[name]
            x_q = _layer_inputs(bq, w)
            x_fp = _layer_inputs(bf, fw)
            with torch.no_grad():
                y_fp = fw(x_fp)  # the float copy runs BYPASSED
            gen = torch.Generator(device=x_q.device).manual_seed(seed * 100003 + index)
            losses[name] = _reconstruct_unit(w, x_q, x_fp, y_fp, fisher(w), gen, c, channel_dim=-1, tied=tied)
            index += 1
    if after:
        losses.update(
            _reconstruct_units(model, float_model, after, batches, c, seed, False, fisher, tied, index, channel_dim=-1)
        )
    return losses


def _stacked_inputs(block: Block) -> tuple[Tensor, tuple, dict[str, Any]]:
    """A decoder layer's captured hidden states over all batches ``(N, T, H)`` and the other inputs,
    which must be the same for every sample (one attention mask, one set of positions) so that
    any mini-batch of samples can be run with them.

    A tensor input of two or more dimensions whose first dimension is the batch's (a mask
    ``(B, 1, T, T)``, rotary embeddings ``(B, T, d)``) must hold the same values for every sample and is
    kept as ``(1, ...)``, broadcast over any mini-batch.
    """
    calls = block.inputs()
    hidden = [a[0] for a, _ in calls]
    shapes = {tuple(h.shape[1:]) for h in hidden}
    if len(shapes) != 1:
        raise ValueError(
            f"reconstruct: the inputs of {block.name} differ in shape across batches ({sorted(shapes)}); "
            "give calibration batches of one sequence length"
        )
    reduced = [_per_sample_free((a[1:], kw), h.shape[0], block.name) for (a, kw), h in zip(calls, hidden)]
    ref = reduced[0]
    for other in reduced[1:]:
        if not _equal_inputs(ref, other):
            raise ValueError(
                f"reconstruct: {block.name} gets different keyword inputs (attention masks, positions) "
                "in different batches; give calibration batches of one sequence length without padding"
            )
    args, kwargs = ref
    return torch.cat(hidden), args, kwargs


def _per_sample_free(value: Any, n: int, name: str) -> Any:
    """``value`` with each tensor of batch size ``n`` (two or more dimensions) cut to its first sample."""
    if isinstance(value, Tensor):
        if value.dim() >= 2 and value.shape[0] == n and n > 1:
            if not (value == value[:1]).all():
                raise ValueError(
                    f"reconstruct: {name} gets per-sample inputs besides its hidden states (a padding mask?); "
                    "give calibration batches without padding"
                )
            return value[:1]
        return value
    if isinstance(value, tuple):
        return tuple(_per_sample_free(v, n, name) for v in value)
    if isinstance(value, dict):
        return {k: _per_sample_free(v, n, name) for k, v in value.items()}
    return value


def _equal_inputs(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal_inputs(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal_inputs(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and a == b)


def _layer_inputs(block: Block, layer: QWrapper) -> Tensor:
    """The inputs of ``layer`` in ``block`` over all of the block's batches, ``(N, ..., in)``."""
    xs: list[Tensor] = []

    def grab(mod: QWrapper, x: Tensor, i: int) -> None:
        xs.append(x.detach().clone())

    block.run({layer: grab}, stop_after=layer if block.called_once() else None)
    if not xs:
        raise RuntimeError(f"reconstruct: a {type(layer.layer).__name__} layer of {block.name} was never called")
    return torch.cat(xs)


def _logits(out: Any) -> Tensor:
    """The model's class logits with the classes in dim 1: a tensor ``(N, C, ...)`` as it is, a Hugging
    Face language model's ``logits`` ``(N, T, vocab)`` moved to ``(N, vocab, T)`` (next-token KL per position)."""
    lm = getattr(out, "logits", None)
    if not isinstance(out, Tensor) and isinstance(lm, Tensor) and lm.dim() == 3:
        return lm.movedim(-1, 1)  # (N, T, vocab) -> (N, vocab, T)
    if not isinstance(out, Tensor) or out.dim() < 2:
        raise ValueError(
            "reconstruct: loss='fisher' needs a model that returns class logits (a tensor of shape (N, C, ...)) "
            "or a language model's output with logits of shape (N, T, vocab), "
            f"got {type(out).__name__}{'' if not isinstance(out, Tensor) else ' of shape ' + str(tuple(out.shape))}; "
            "pass loss='mse'"
        )
    return out


def _fisher_weights(
    model: nn.Module, unit: nn.Module, later: list[nn.Module], batches: list, refs: list[Tensor], damping: float
) -> Tensor:
    """BRECQ's diagonal Fisher weights of ``unit``'s output, one per output element.

    ``g`` is the gradient w.r.t. the unit's output of ``KL(softmax(float logits) || softmax(model logits))``
    summed over the batch (and over the positions of a language model), in the model quantized up to
    and including the unit (the QModules called after it run in ``BYPASSED``). Returns
    ``(g ** 2 / mean(g ** 2) + damping) / (1 + damping)``, shaped like the unit's outputs over all
    batches (mean 1).
    """
    saved = [(m, m.qstate) for m in later]
    store: list[Tensor] = []  # the unit's outputs in this batch, one per call

    def hook(mod: nn.Module, args: Any, out: Any) -> Any:
        first = out[0] if isinstance(out, tuple) else out  # a decoder layer may return (hidden states, ...)
        # The gradient at this call's output is the gradient w.r.t. a zero added to it (a new tensor: the
        # model may modify it in place). The graph starts at the first call; a later call of a unit
        # called several times stays connected to the earlier ones, whose gradients flow through it.
        probe = torch.zeros_like(first, requires_grad=True)
        store.append(probe)
        added = (first if len(store) > 1 else first.detach()) + probe
        return (added, *out[1:]) if isinstance(out, tuple) else added

    grads = []
    handle = unit.register_forward_hook(hook)
    try:
        for m in later:
            m.qstate = QModuleState.BYPASSED
        with torch.enable_grad():
            for batch, ref in zip(batches, refs):
                store.clear()
                out = _logits(call_model(model, batch, "reconstruct"))
                kl = F.kl_div(out.log_softmax(1), ref.log_softmax(1), reduction="sum", log_target=True)
                grads.extend(torch.autograd.grad(kl, store))  # in call order, as the unit's inputs are captured
    finally:
        handle.remove()
        for m, s in saved:
            m.qstate = s
    g2 = torch.cat(grads).pow(2)
    mean = g2.mean()
    g2 = g2 / mean if mean > 0 else torch.ones_like(g2)
    return (g2 + damping) / (1 + damping)


def _reports_grid(q: Quantizer) -> bool:
    """Whether ``q`` gives AdaRound something to round on (:func:`_grid_of` says why not, when asked)."""
    try:
        _grid_of(q, "")
    except TypeError:
        return False
    except RuntimeError:  # no ranges yet: the unit's own _grid_of call reports it
        return True
    return True


def _grid_of(q: Quantizer, who: str) -> AffineGrid | LevelGrid:
    """The affine grid of ``q``, else its levels: what AdaRound rounds on."""
    try:
        grid = q.grid()
        if grid is None:
            grid = q.levels()
    except RuntimeError as e:
        raise RuntimeError(f"reconstruct: {who} has no ranges; calibrate the model first ({e})") from e
    if grid is None:
        raise TypeError(
            f"reconstruct: {who} ({type(q).__name__}) reports neither an affine grid (grid()) nor levels "
            "(levels()); AdaRound needs one of them"
        )
    return grid


def _reconstruct_unit(
    unit: nn.Module,
    x_q: Tensor,
    x_fp: Tensor,
    y_fp: Tensor,
    weight: Tensor | None,
    gen: torch.Generator,
    config: ReconstructionConfig,
    call: Callable[[Tensor], Tensor] | None = None,
    channel_dim: int = 1,
    tied: frozenset[int] = frozenset(),
) -> float:
    """Learn the rounding (and, if configured, the activation steps) of one unit; return its final loss.

    Args:
        unit: a QWrapper or a block of them, in the quantized model.
        x_q: ``(N, ...)`` inputs of the unit in the quantized model.
        x_fp: ``(N, ...)`` inputs of the same unit in the float model (QDrop mixes them in).
        y_fp: ``(N, C, ...)`` outputs of the float unit, the targets.
        weight: BRECQ's Fisher weights shaped like ``y_fp``, or ``None`` for the plain squared error.
        gen: draws the mini-batches and QDrop's masks.
        config: the options; ``config.mode`` is the mode the unit's QModules are left in.
        call: runs the unit on a mini-batch of inputs (default ``unit(x)``; a decoder layer gets
            its captured keyword arguments).
        channel_dim: the dimension the squared error is summed over (1: ``(N, C, ...)``
            feature maps; -1: ``(N, T, hidden)`` token sequences).
        tied: ids of the QWrappers whose weights other modules share (kept at round to nearest).

    Returns:
        The reconstruction error of the last iteration.
    """
    c = config
    if x_q.shape != x_fp.shape:
        raise ValueError(
            f"reconstruct: quantized and float inputs of {type(unit).__name__} differ in shape: "
            f"{tuple(x_q.shape)} vs {tuple(x_fp.shape)}"
        )
    qmods = [m for m in unit.modules() if isinstance(m, QModule)]
    wrappers = [m for m in qmods if _learnable(m, tied)]
    saved_q: list[tuple[QModule, str, Quantizer]] = []
    saved_grad = [(p, p.requires_grad) for p in unit.parameters()]
    ada: dict[QWrapper, AdaRoundQuantizer] = {}
    banks: dict[tuple[QExperts, str], AdaRoundQuantizer] = {}
    learned: list[_LearnedStep] = []
    try:
        for p, _ in saved_grad:
            p.requires_grad_(False)
        for w in wrappers:
            # the weight the quantizer rounds: with fold_bn=True the folded one, for which its grid was computed
            ada[w] = AdaRoundQuantizer(_grid_of(w.weight_quantizer, "weight quantizer"), w.weight_to_quantize())
            saved_q.append((w, "weight_quantizer", w.weight_quantizer))
            w.weight_quantizer = ada[w]
        for qe in (m for m in qmods if isinstance(m, QExperts)):
            for bank, q, rows in qe._weights():  # each bank as the (E * out, in) rows its quantizer rounds
                if not _reports_grid(q):  # (reconstruct warned)
                    continue
                attr = f"{QExperts.ROLE_OF_BANK[bank]}_quantizer"
                banks[(qe, bank)] = AdaRoundQuantizer(_grid_of(q, f"{attr} of an experts module"), rows.detach())
                saved_q.append((qe, attr, q))
                setattr(qe, attr, banks[(qe, bank)])
        if c.act_quant:
            for m in qmods:
                for attr, q in _act_quantizers(m):
                    saved_q.append((m, attr, q))
                    new: Quantizer = q
                    if c.learn_act_step and _learns_step(q):
                        new = _LearnedStep(q)
                        learned.append(new)
                    if c.drop_prob > 0:
                        new = _Drop(new, c.drop_prob, gen)
                    setattr(m, attr, new)
        unit_mode = QModuleState.QUANT_EVAL if c.act_quant else QModuleState.QUANT_EVAL_WEIGHT_ONLY
        for m in qmods:
            m.qstate = unit_mode
        rounders = [*ada.values(), *banks.values()]
        groups = [{"params": [a.alpha for a in rounders], "lr": c.lr}]
        # act_lr is relative: each step moves by about act_lr times its calibrated value per iteration.
        groups += [{"params": [s.step], "lr": c.act_lr * float(s.step.detach().abs().mean())} for s in learned]
        opt = torch.optim.Adam(groups)
        # Both papers anneal the activation steps' learning rate to 0 with a cosine.
        act_lrs = [g["lr"] for g in opt.param_groups[1:]]
        n = x_q.shape[0]
        warm = int(c.warmup * c.iters)
        rec = torch.zeros(())
        for it in range(c.iters):
            idx = torch.randint(n, (min(c.batch_size, n),), generator=gen, device=x_q.device)
            x = x_q[idx]
            if c.drop_prob > 0:
                x = torch.where(torch.rand(x.shape, generator=gen, device=x.device) < c.drop_prob, x_fp[idx], x)
            y = unit(x) if call is None else call(x)
            err = (y - y_fp[idx]).pow(2)
            if weight is not None:
                err = err * weight[idx]
            rec = err.sum(channel_dim).mean()
            loss = rec
            if it >= warm and c.reg_weight > 0:
                t = (it - warm) / max(c.iters - warm, 1)
                b = c.beta[1] + (c.beta[0] - c.beta[1]) * (1 - t)
                loss = loss + c.reg_weight * sum(a.regularizer(b) for a in rounders)
            for g, base in zip(opt.param_groups[1:], act_lrs):
                g["lr"] = base * 0.5 * (1 + math.cos(math.pi * it / c.iters))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            for w, a in ada.items():
                a.soft = False
                _write_rounded(w, a(w.weight_to_quantize()))
            for (qe, bank), a in banks.items():
                a.soft = False
                param = qe.layer._parameters[bank]
                rows = _rows(param, qe.transposed)
                param.copy_(_bank(a(rows), param.shape[0], qe.transposed))
            for s in learned:
                s.write_back()
        return float(rec.detach())
    finally:
        for m, attr, q in reversed(saved_q):
            setattr(m, attr, q)
        for m in qmods:
            m.qstate = c.mode
        for p, g in saved_grad:
            p.requires_grad_(g)


def _write_rounded(w: QWrapper, rounded: Tensor) -> None:
    """Write hard-rounded weights ``(out, in, ...)`` into ``w``'s layer.

    With ``fold_bn=True`` they are the folded weight's values: the layer gets them divided
    by BatchNorm's per-channel factor ``gamma / sigma``, so that folding gives them back (to
    the last bit of float rounding, which the weight quantizer removes). A channel whose
    factor is 0 keeps its weight (folded, it is 0 whatever it holds).
    """
    if w.fold_bn:
        factor, _ = bn_scale_shift(w.bn)  # (C_out,)
        factor = factor.reshape(-1, *[1] * (rounded.dim() - 1))
        rounded = torch.where(factor != 0, rounded / factor, w.weight_view())
    w.weight_view().copy_(rounded)  # (out, in, ...) view: writes the parameter


def _run_preset(name: str, model: nn.Module, data: Iterable, options: dict[str, Any]) -> dict[str, float]:
    clash = sorted(_FIXED[name] & set(options))
    if clash:
        raise TypeError(f"{name}: {clash} are fixed by this preset; call torchquant.ptq.reconstruct to change them")
    run = {k: options.pop(k) for k in _RUN_OPTIONS & set(options)}
    return reconstruct(model, data, _configure(name, PRESETS[name], options), **run)


def _preset_options(name: str) -> frozenset[str]:
    """The keyword options a preset function takes: the config fields it does not fix and the run options."""
    return (_CONFIG_FIELDS - _FIXED[name]) | _RUN_OPTIONS


@register_ptq_algorithm("adaround", options=_preset_options("adaround"))
def adaround(model: nn.Module, data: Iterable, **kwargs: Any) -> dict[str, float]:
    """AdaRound (Nagel et al. 2020): layer-wise, weight-only reconstruction of the rounding.

    :func:`reconstruct` with the :data:`ADAROUND` config (``granularity="layer"``,
    ``act_quant=False``, ``drop_prob=0``, ``learn_act_step=False``: fixed).
    Each layer's inputs come from the quantized model (activations quantized in
    ``QUANT_EVAL``, earlier layers already rounded); the loss is on its output
    after BatchNorm and activation, before its output quantizer. On a transformer
    stack the layers of one decoder layer at a time, on the sequential engine.

    Args:
        model: a calibrated quantizable model.
        data: calibration batches.
        **kwargs: the other fields of :class:`ReconstructionConfig` (``iters``, ``batch_size``, ``lr``,
            ``reg_weight``, ``beta``, ``warmup``, ``mode``) and ``num_batches``, ``seed``, ``progress``.

    Returns:
        The final reconstruction loss of each layer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import torchquant as tq
        >>> net = tq.quantize_model(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
        ...                         lambda m, n: tq.AffineQuantizer(4, tq.BatchMinMax()), None, method="swap")
        >>> data = [torch.randn(16, 8)]
        >>> _ = tq.calibrate(net, data, progress=False)
        >>> sorted(tq.ptq.adaround(net, data, iters=20, progress=False))
        ['0', '2']
    """
    return _run_preset("adaround", model, data, kwargs)


@register_ptq_algorithm("brecq", options=_preset_options("brecq"))
def brecq(model: nn.Module, data: Iterable, **kwargs: Any) -> dict[str, float]:
    """BRECQ (Li et al. 2021): block-wise reconstruction with activations quantized inside the block.

    :func:`reconstruct` with the :data:`BRECQ` config: ``granularity="block"``, ``act_quant=True``,
    ``drop_prob=0`` (fixed) and, unless given, the paper's ``loss="fisher"`` (block outputs
    weighted by the diagonal Fisher) and ``learn_act_step=True`` (activation steps learned jointly).
    On a transformer stack each decoder layer is a unit and the Fisher weights come from the
    next-token KL of the model's logits.

    Args:
        model: a calibrated quantizable model.
        data: calibration batches.
        **kwargs: the other fields of :class:`ReconstructionConfig` (``blocks``, ``learn_act_step``,
            ``loss``, ``fisher_damping``, ``act_lr``, ``iters``, ``batch_size``, ``lr``, ...) and
            ``num_batches``, ``seed``, ``progress``.

    Returns:
        The final reconstruction loss of each unit.
    """
    return _run_preset("brecq", model, data, kwargs)


@register_ptq_algorithm("qdrop", options=_preset_options("qdrop"))
def qdrop(model: nn.Module, data: Iterable, drop_prob: float = QDROP.drop_prob, **kwargs: Any) -> dict[str, float]:
    """QDrop (Wei et al. 2022): block-wise reconstruction that randomly drops activation quantization.

    :func:`reconstruct` with the :data:`QDROP` config: ``granularity="block"``, ``act_quant=True``
    (fixed), ``drop_prob`` and, unless given, ``learn_act_step=True`` (activation steps learned
    jointly, as in the paper); the loss is the plain squared error (``loss="mse"``), as in the paper.
    On a transformer stack each decoder layer is a unit.

    Args:
        model: a calibrated quantizable model.
        data: calibration batches.
        drop_prob: probability of keeping each activation element float (the paper's 0.5).
        **kwargs: the other fields of :class:`ReconstructionConfig` and ``num_batches``, ``seed``, ``progress``.

    Returns:
        The final reconstruction loss of each unit.
    """
    return _run_preset("qdrop", model, data, {"drop_prob": drop_prob, **kwargs})
