"""Recipes: named ways of turning a float model into a quantized one.

A recipe is a callable ``(float_model, bits, data, settings) -> RecipeResult``
registered by name. Most are a :class:`SpecRecipe`: a small record saying
which quantizer (and observer) to put on weights and on activations, by their
registry names, and which steps to run: calibration, a PTQ algorithm from
:data:`torchquant.ptq.PTQ_ALGORITHMS`, quantization-aware training. The same
record is what a recipe file (TOML) describes, so built-in and user recipes
are one thing.

Quantizers, observers and PTQ algorithms are looked up in their registries when
a recipe runs (a recipe file may name one that a module it imports registers);
a recipe that needs a missing one raises :class:`RecipeUnavailable` naming it,
before anything runs.

A recipe written as a function joins with :func:`register_recipe`::

    @register_recipe("ptq-my-method")
    def my_method(model, bits, data, settings):
        ...
        return RecipeResult(model, {"steps": "..."})
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..layers import BN_FOR_LAYER, layer_adapter
from ..ptq import PTQ_ALGORITHMS, PTQAlgorithm, get_ptq_algorithm, list_ptq_algorithms
from ..qmodules import QModule, QModuleState
from ..registry import OBSERVERS, QUANTIZERS, Registry
from ..spec import QuantizerSpec as LibrarySpec
from ..spec import SpecError
from ..utils import set_qmodule_state
from .engine import Settings, calibrate, calibration_inputs, train

__all__ = [
    "RECIPES",
    "Bits",
    "CellSkipped",
    "FunctionRecipe",
    "QuantizerSpec",
    "Recipe",
    "RecipeError",
    "RecipeResult",
    "RecipeUnavailable",
    "Settings",
    "SpecRecipe",
    "error_text",
    "get_recipe",
    "list_recipes",
    "load_recipe_file",
    "register_recipe",
]


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Bits:
    """A bit setting: weight bits and activation bits (``None``: float activations).

    Written ``w8a8``, ``w4a8``, ``w1a8``, or ``w4`` for weight-only quantization.

    Example:
        >>> Bits.parse("w4a8")
        Bits(weight=4, act=8)
        >>> str(Bits(4, None))
        'w4'
    """

    weight: int
    act: int | None

    @classmethod
    def parse(cls, text: str) -> Bits:
        """Parse ``"wNaM"`` or ``"wN"`` (case-insensitive).

        Raises:
            ValueError: the text is not of that form or a bit-width is outside ``[1, 32]``.
        """
        m = re.fullmatch(r"w(\d+)(?:a(\d+))?", text.strip().lower())
        if m is None:
            raise ValueError(f"bit setting {text!r}: expected wNaM (e.g. w8a8, w4a8, w2a2) or wN (weight-only)")
        w, a = int(m.group(1)), None if m.group(2) is None else int(m.group(2))
        for b in (w, a):
            if b is not None and not 1 <= b <= 32:
                raise ValueError(f"bit setting {text!r}: bit-widths must be in [1, 32]")
        return cls(w, a)

    def __str__(self) -> str:
        return f"w{self.weight}" if self.act is None else f"w{self.weight}a{self.act}"


@dataclass
class RecipeResult:
    """What a recipe returns: the quantized model (in ``QUANT_EVAL``) and how it was obtained."""

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


class RecipeUnavailable(RuntimeError):
    """A recipe needs a method (quantizer, observer, PTQ algorithm) that this build does not have."""


class CellSkipped(Exception):
    """A recipe does not apply to a bit setting (e.g. ``bnn`` at ``w8a8``); the cell is reported as skipped."""


class RecipeError(ValueError):
    """A recipe file, or a recipe at a cell of the grid, is malformed (the message says where and why)."""


class Recipe:
    """Base class of recipes: a name, a one-line description, a check and a call."""

    name: str
    description: str

    def check_available(self) -> None:
        """Raise :class:`RecipeUnavailable` if a method the recipe needs is missing."""

    def check_cell(self, bits: Bits, settings: Settings) -> None:
        """Check, without a model or data, that the recipe can run at ``bits``.

        Raises:
            CellSkipped: the recipe does not apply to ``bits`` (the cell will be skipped).
            Exception: anything else means the cell would fail (the message says why).
        """

    def __call__(self, model: nn.Module, bits: Bits, data: Any, settings: Settings) -> RecipeResult:
        raise NotImplementedError


RECIPES = Registry("recipe")


class FunctionRecipe(Recipe):
    """A recipe written as a plain function ``(model, bits, data, settings) -> RecipeResult``."""

    def __init__(self, name: str, fn: Callable[..., RecipeResult], description: str = "") -> None:
        self.name = name
        self.fn = fn
        self.description = description or (inspect.getdoc(fn) or "").split("\n")[0]

    def __call__(self, model: nn.Module, bits: Bits, data: Any, settings: Settings) -> RecipeResult:
        out = self.fn(model, bits, data, settings)
        if not isinstance(out, RecipeResult):
            raise TypeError(f"recipe {self.name!r} returned {type(out).__name__}; expected a RecipeResult")
        return out


def register_recipe(name: str, *, overwrite: bool = False) -> Callable:
    """Decorator: register a recipe function (or a :class:`Recipe` instance/subclass) under ``name``."""

    def deco(obj):
        if isinstance(obj, SpecRecipe):
            recipe = dataclasses.replace(obj, name=name)
        elif isinstance(obj, Recipe):
            recipe = obj
            recipe.name = name
        elif inspect.isclass(obj) and issubclass(obj, Recipe):
            recipe = obj()
            recipe.name = name
        else:
            recipe = FunctionRecipe(name, obj)
        RECIPES.register(name, overwrite=overwrite)(recipe)
        return obj

    return deco


def get_recipe(name: str) -> Recipe:
    """The recipe registered as ``name``; ``KeyError`` listing the valid names otherwise."""
    return RECIPES.get(name)


def list_recipes() -> list[str]:
    """Names of all registered recipes."""
    return RECIPES.names()


# ------------------------------------------------------------------- spec recipes
@dataclass(frozen=True)
class QuantizerSpec:
    """How to build the quantizer of one side (weights or activations) from registry names.

    Attributes:
        quantizer: name in the quantizer registry (``tq.list_quantizers()``).
        observer: name in the observer registry, or ``None``; when given it is
            built with the granularity (``axis``) and passed as ``range_observer=``.
        args: extra keyword arguments of the quantizer.
        observer_args: extra keyword arguments of the observer.
        bits_arg: keyword receiving the bit-width (``"n_bits"``), or ``None`` for
            methods whose bit-width is fixed (binary, ternary): see ``fixed_bits``.
        axis_arg: for quantizers without an observer, the keyword receiving the
            per-channel axis (``None``: the method has one granularity of its own).
        fixed_bits: the bit-width such a method implies; grid cells asking for
            another one are skipped.
        relu_only: for one-sided activation methods (PACT, DoReFa clip to
            ``[0, alpha]``): use this quantizer only on outputs of a ReLU/ReLU6;
            other outputs (residual branches, logits) get the affine min/max one.
    """

    quantizer: str
    observer: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    observer_args: dict[str, Any] = field(default_factory=dict)
    bits_arg: str | None = "n_bits"
    axis_arg: str | None = None
    fixed_bits: int | None = None
    relu_only: bool = False

    def needs(self) -> list[tuple[str, Registry, str]]:
        out = [("quantizer", QUANTIZERS, self.quantizer)]
        if self.observer is not None:
            out.append(("observer", OBSERVERS, self.observer))
        return out

    def resolve(self, n_bits: int, axis: int | None) -> LibrarySpec:
        """The library's :class:`~torchquant.spec.QuantizerSpec` for ``n_bits`` at ``axis`` (``None``: per-tensor).

        The same description a ``TorchQuantConfig`` and a checkpoint use.
        """
        kwargs = dict(self.args)
        if self.bits_arg is not None:
            kwargs[self.bits_arg] = n_bits
        observer_args = dict(self.observer_args)
        if self.observer is not None:
            observer_args = {"axis": axis, **observer_args}
            # an observer that searches ranges for a grid (MSE) searches them for this cell's grid
            takes = inspect.signature(OBSERVERS.get(self.observer)).parameters
            if "n_bits" in takes and "n_bits" not in observer_args:
                observer_args["n_bits"] = n_bits
            if "symmetric" in takes and "symmetric" not in observer_args:
                observer_args["symmetric"] = bool(kwargs.get("symmetric", False))
        elif self.axis_arg is not None:
            kwargs[self.axis_arg] = axis
        return LibrarySpec(self.quantizer, self.observer, kwargs, observer_args)

    def build(self, n_bits: int, axis: int | None) -> nn.Module:
        """Build the quantizer for ``n_bits`` at ``axis`` (``None``: per-tensor)."""
        spec = self.resolve(n_bits, axis)
        try:
            return spec.build()
        except SpecError as e:
            if isinstance(e.__cause__, ValueError) and not isinstance(e.__cause__, SpecError):
                # the quantizer's own check (a bit-width the method does not support): that cell is skipped
                raise CellSkipped(str(e.__cause__)) from e
            raise TypeError(str(e)) from e
        except ValueError as e:
            raise CellSkipped(str(e)) from e

    def granularity_text(self, axis: int | None) -> str:
        if self.observer is None and self.axis_arg is None:
            return "method's own"
        return "per-tensor" if axis is None else "per-channel"


_WEIGHT_MINMAX = QuantizerSpec("affine", "batch_minmax", args={"symmetric": True})
_ACT_RUNNING = QuantizerSpec("affine", "running_minmax")
_ACT_EMA = QuantizerSpec("affine", "ema_minmax")


@dataclass(frozen=True)
class SpecRecipe(Recipe):
    """A recipe described by data (the form of recipe files).

    ``source`` says where a recipe file defined it (``"mine.toml:12"``), for error messages.

    Steps, in order: quantize the model with ``weights`` / ``acts`` quantizers;
    if ``calibrate``, run calibration batches; if ``algorithm``, call
    ``torchquant.ptq.<algorithm>(model, calibration_inputs, **algorithm_args)``;
    if ``qat``, train in ``QUANT_AWARE_TRAIN`` for ``epochs`` (default: the
    settings'); finally set ``QUANT_EVAL``.
    """

    name: str
    description: str
    weights: QuantizerSpec
    acts: QuantizerSpec | None
    calibrate: bool = True
    algorithm: str | None = None
    algorithm_args: dict[str, Any] = field(default_factory=dict)
    qat: bool = False
    epochs: int | None = None
    lr: float | None = None
    convert: str | None = None  # overrides Settings.convert (block reconstruction needs module blocks)
    source: str | None = field(default=None, compare=False)  # "file:line" of a recipe file's recipe

    def check_available(self) -> None:
        sides = [("weights", self.weights), ("activations", self.acts)]
        for side, spec in sides:
            if spec is None:
                continue
            for kind, registry, name in spec.needs():
                if name not in registry:
                    raise RecipeUnavailable(
                        f"recipe {self.name!r} needs the {kind} {name!r} (for {side}), which is not available "
                        f"in this build; available {kind}s: {', '.join(registry.names())}"
                    )
        if self.algorithm is not None:
            _ptq_algorithm(self.algorithm, self.name)

    def __call__(self, model: nn.Module, bits: Bits, data: Any, settings: Settings) -> RecipeResult:
        from ..convert import quantize_model

        self.check_available()
        self._check_fixed_bits(bits)
        w_spec = self.weights
        if any(isinstance(m, QModule) for m in model.modules()):
            raise ValueError(f"recipe {self.name!r} expects a float model; this one already contains QModules")
        first, last = _first_last_layers(model)
        edge_bits = settings.first_last_bits
        w_axis = 0 if settings.granularity == "channel" else None
        info: dict[str, Any] = {}

        def weights(module: nn.Module, name: str):
            if edge_bits is not None and name in (first, last):
                spec = w_spec if w_spec.bits_arg is not None else _WEIGHT_MINMAX
                return spec.build(edge_bits, w_axis)
            return w_spec.build(bits.weight, w_axis)

        relu_fed = _layers_before_relu(model)

        def acts(module: nn.Module, name: str):
            if self.acts is None or bits.act is None:
                return None
            spec = _ACT_EMA if self.acts.relu_only and name not in relu_fed else self.acts
            if edge_bits is not None and name == last:
                return spec.build(max(edge_bits, bits.act), None)
            return spec.build(bits.act, None)

        method = self.convert or settings.convert
        model = quantize_model(model, weights, acts, method=method)
        info["granularity"] = w_spec.granularity_text(w_axis)
        info["weights"] = f"{w_spec.quantizer} ({info['granularity']})"
        info["acts"] = "float" if self.acts is None or bits.act is None else f"{self.acts.quantizer} (per-tensor)"
        if edge_bits is not None:
            info["first_last"] = f"{first}, {last} at {edge_bits} bits"
        steps = []
        algorithm = None if self.algorithm is None else _ptq_algorithm(self.algorithm, self.name)
        if algorithm is not None and algorithm.before_calibration:
            model = self._run_algorithm(algorithm, model, data, settings)
            steps.append(self._algorithm_text())
        if self.calibrate:
            calibrate(model, data, settings)
            steps.append(f"calibration {settings.calib_batches}x{settings.calib_batch_size}")
        if algorithm is not None and not algorithm.before_calibration:
            model = self._run_algorithm(algorithm, model, data, settings)
            steps.append(self._algorithm_text())
        if self.qat:
            epochs = settings.qat_epochs if self.epochs is None else self.epochs
            lr = settings.qat_lr if self.lr is None else self.lr
            set_qmodule_state(model, QModuleState.QUANT_AWARE_TRAIN)
            train(model, data, settings, epochs=epochs, lr=lr, desc=f"{self.name} {bits}: QAT")
            steps.append(f"QAT {epochs} epochs lr {lr}")
        set_qmodule_state(model, QModuleState.QUANT_EVAL)
        info["steps"] = "; ".join(steps)
        return RecipeResult(model, info)

    def _check_fixed_bits(self, bits: Bits) -> None:
        w_spec = self.weights
        if w_spec.fixed_bits is not None and bits.weight != w_spec.fixed_bits:
            raise CellSkipped(
                f"{self.name} quantizes weights to {w_spec.fixed_bits} bit(s); use w{w_spec.fixed_bits}aN"
            )
        if self.acts is not None and self.acts.fixed_bits is not None and bits.act != self.acts.fixed_bits:
            raise CellSkipped(f"{self.name} quantizes activations to {self.acts.fixed_bits} bit(s)")

    def check_cell(self, bits: Bits, settings: Settings) -> None:
        """Build once every quantizer the cell would use (weights, first/last layers, activations)
        and check the PTQ algorithm's arguments; see :meth:`Recipe.check_cell`."""
        self.check_available()
        self._check_fixed_bits(bits)
        edge = settings.first_last_bits
        w_axis = 0 if settings.granularity == "channel" else None
        builds = [("weights", self.weights, bits.weight, w_axis)]
        if edge is not None:
            spec = self.weights if self.weights.bits_arg is not None else _WEIGHT_MINMAX
            builds.append(("first/last layer weights", spec, edge, w_axis))
        if self.acts is not None and bits.act is not None:
            builds.append(("activations", self.acts, bits.act, None))
            if edge is not None:
                last = _ACT_EMA if self.acts.relu_only else self.acts  # as in __call__: logits follow no ReLU
                builds.append(("last layer activations", last, max(edge, bits.act), None))
        for side, spec, n_bits, axis in builds:
            try:
                spec.build(n_bits, axis)
            except CellSkipped:
                raise
            except Exception as e:
                raise RecipeError(f"{side}: {error_text(e)}") from e
        if self.algorithm is not None:
            algorithm = _ptq_algorithm(self.algorithm, self.name)
            params = list(inspect.signature(algorithm.fn).parameters.values())[2:]
            named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            # options read from a signature with **kwargs are not the whole list: nothing to check
            open_ended = any(p.kind is p.VAR_KEYWORD for p in params) and algorithm.options == named
            unknown = set(self.algorithm_args) - algorithm.options
            if unknown and not open_ended:
                raise RecipeError(
                    f"algorithm_args: torchquant.ptq.{self.algorithm} takes no {sorted(unknown)}; "
                    f"it takes {sorted(algorithm.options)}"
                )

    def _run_algorithm(self, algorithm: PTQAlgorithm, model: nn.Module, data: Any, settings: Settings) -> nn.Module:
        kwargs = dict(self.algorithm_args)
        defaults = {"seed": settings.seed, "progress": settings.progress and settings.runtime.is_main}
        for key, value in algorithm.accepted(defaults).items():
            kwargs.setdefault(key, value)
        # every rank runs the algorithm on the same data, so all end with the same weights
        out = algorithm(model, calibration_inputs(data, settings, shard=False), **kwargs)
        return out if isinstance(out, nn.Module) else model

    def _algorithm_text(self) -> str:
        return f"{self.algorithm}({', '.join(f'{k}={v}' for k, v in sorted(self.algorithm_args.items()))})"


def error_text(e: BaseException) -> str:
    """An exception as one message: ``"TypeError: ..."``; a :class:`RecipeError`'s or ``KeyError``'s own text."""
    if isinstance(e, RecipeError):
        return str(e)
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return f"{type(e).__name__}: {text}"


def _ptq_algorithm(name: str, recipe: str) -> PTQAlgorithm:
    if name not in PTQ_ALGORITHMS:
        raise RecipeUnavailable(
            f"recipe {recipe!r} needs the PTQ algorithm torchquant.ptq.{name}, which is not available in this build; "
            f"available: {', '.join(list_ptq_algorithms())}"
        )
    return get_ptq_algorithm(name)


def _layers_before_relu(model: nn.Module) -> set[str]:
    """Names of layers that ``quantize_model`` fuses with a following ReLU/ReLU6 (inside an nn.Sequential)."""
    out = set()
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        items = list(seq.named_children())
        for i, (key, child) in enumerate(items):
            if type(child) not in BN_FOR_LAYER:
                continue
            rest = [m for _, m in items[i + 1 : i + 3]]
            if rest and isinstance(rest[0], nn.modules.batchnorm._BatchNorm):
                rest = rest[1:]
            if rest and type(rest[0]) in (nn.ReLU, nn.ReLU6):
                out.add(f"{prefix}.{key}" if prefix else key)
    return out


def _first_last_layers(model: nn.Module) -> tuple[str | None, str | None]:
    names = [n for n, m in model.named_modules() if layer_adapter(m) is not None]  # an LM's first is its embedding
    return (names[0], names[-1]) if names else (None, None)


def _spec(name: str, description: str, **kw: Any) -> SpecRecipe:
    recipe = SpecRecipe(name=name, description=description, **kw)
    RECIPES.register(name)(recipe)
    return recipe


# Reconstruction budget of the built-in PTQ recipes: the papers' 10k-20k iterations per unit are
# sized for ImageNet; on the built-in tasks a few hundred reach the same plateau (benchmarks/ptq.py).
_RECONSTRUCTION_ARGS: dict[str, Any] = {"iters": 200, "progress": False}

# ----------------------------------------------------------------- built-in recipes
_spec(
    "ptq-minmax",
    "PTQ: min/max ranges (per-channel symmetric weights, running min/max activations)",
    weights=_WEIGHT_MINMAX,
    acts=_ACT_RUNNING,
)
_spec(
    "ptq-mse",
    "PTQ: MSE-optimal clipping ranges for weights and activations",
    weights=QuantizerSpec("affine", "mse", args={"symmetric": True}),
    acts=QuantizerSpec("affine", "mse"),
)
_spec(
    "ptq-percentile",
    "PTQ: min/max weights, 99.99th-percentile activation ranges",
    weights=_WEIGHT_MINMAX,
    acts=QuantizerSpec("affine", "percentile"),
)
_spec(
    "ptq-adaround",
    "PTQ: min/max ranges, then AdaRound learned rounding (Nagel et al. 2020)",
    weights=_WEIGHT_MINMAX,
    acts=_ACT_RUNNING,
    algorithm="adaround",
    algorithm_args=_RECONSTRUCTION_ARGS,
)
_spec(
    "ptq-brecq",
    "PTQ: min/max ranges, then BRECQ block reconstruction (Li et al. 2021)",
    weights=_WEIGHT_MINMAX,
    acts=_ACT_RUNNING,
    algorithm="brecq",
    algorithm_args=_RECONSTRUCTION_ARGS,
    convert="swap",  # blocks must stay modules; fx flattens them into one graph
)
_spec(
    "ptq-qdrop",
    "PTQ: min/max ranges, then QDrop reconstruction (Wei et al. 2022)",
    weights=_WEIGHT_MINMAX,
    acts=_ACT_RUNNING,
    algorithm="qdrop",
    algorithm_args=_RECONSTRUCTION_ARGS,
    convert="swap",  # blocks must stay modules; fx flattens them into one graph
)
_spec(
    "qat-minmax",
    "QAT: min/max weights, moving-average activation ranges, straight-through estimator",
    weights=_WEIGHT_MINMAX,
    acts=_ACT_EMA,
    qat=True,
)
_spec(
    "qat-lsq",
    "QAT: LSQ learned step sizes for weights (Esser et al. 2020), LSQ+ for activations (Bhalgat et al. 2020)",
    weights=QuantizerSpec("lsq", axis_arg="axis"),
    acts=QuantizerSpec("lsq+"),
    qat=True,
)
_spec(
    "qat-pact",
    "QAT: PACT learned clipping after ReLUs (Choi et al. 2018), DoReFa weights as in the paper",
    weights=QuantizerSpec("dorefa_weight", axis_arg="axis"),
    acts=QuantizerSpec("pact", relu_only=True),
    qat=True,
)
_spec(
    "qat-dorefa",
    "QAT: DoReFa weight and activation quantizers (Zhou et al. 2016), activations clipped after ReLUs",
    weights=QuantizerSpec("dorefa_weight", axis_arg="axis"),
    acts=QuantizerSpec("dorefa_act", relu_only=True),
    qat=True,
)
_spec(
    "bnn",
    "QAT: binary weights, sign with clipped STE (Courbariaux et al. 2016), affine activations",
    weights=QuantizerSpec("bnn", bits_arg=None, fixed_bits=1),
    acts=_ACT_EMA,
    qat=True,
)
_spec(
    "xnor",
    "QAT: binary weights scaled by mean |W| per channel (XNOR-Net, Rastegari et al. 2016), affine activations",
    weights=QuantizerSpec("xnor", bits_arg=None, axis_arg="axis", fixed_bits=1),
    acts=_ACT_EMA,
    qat=True,
)
_spec(
    "twn",
    "QAT: ternary weights (TWN, Li et al. 2016), affine activations",
    weights=QuantizerSpec("twn", bits_arg=None, axis_arg="axis", fixed_bits=2),
    acts=_ACT_EMA,
    qat=True,
)


# --------------------------------------------------------------------- recipe files
_RECIPE_KEYS = {f.name for f in dataclasses.fields(SpecRecipe)} - {"name", "source"} | {"base"}
_SPEC_KEYS = {f.name for f in dataclasses.fields(QuantizerSpec)}


def _load_toml(path: Path) -> tuple[dict[str, Any], str]:
    """The parsed file and its text; syntax errors name the file."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise ImportError("reading recipe files on Python 3.10 needs tomli: pip install torchquant[bench]") from e
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe file {str(path)!r} is not UTF-8 text: {e}") from e
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe file {str(path)!r} is not valid TOML: {e}") from e


def _header_line(text: str, name: str) -> int | None:
    """Line number (from 1) of the ``[recipe.<name>]`` header in ``text``, if the file has one."""
    key = re.escape(name)
    header = rf"""^[ \t]*\[[ \t]*recipe[ \t]*\.[ \t]*(?:{key}|"{key}"|'{key}')[ \t]*\]"""
    m = re.search(header, text, flags=re.MULTILINE)
    return None if m is None else text.count("\n", 0, m.start()) + 1


def import_modules(names: Iterable[str], folder: str | Path | None = None) -> None:
    """Import user modules (which register quantizers, observers or recipes as a side effect).

    ``folder`` (a recipe file's folder) is searched first, then the current
    directory, then installed packages: ``--import my_quantizers`` finds
    ``./my_quantizers.py`` and a recipe file's ``import = ["my_quantizers"]`` finds
    ``my_quantizers.py`` next to the file.

    Raises:
        ImportError: a module cannot be imported, or another module of the same name
            was imported before from elsewhere (the message names it).
    """
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    where = "--import" if folder is None else f"a recipe file in {str(folder)!r}"
    search = None if folder is None else str(Path(folder).resolve())
    for name in names:
        if search is not None:
            sys.path.insert(0, search)
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"cannot import {name!r} (from {where}): {e}") from e
        finally:
            if search is not None:
                sys.path.remove(search)
        if search is not None:
            _check_found_in(module, name, Path(search))


def _check_found_in(module: Any, name: str, folder: Path) -> None:
    top = name.split(".")[0]
    local = folder / f"{top}.py" if (folder / f"{top}.py").is_file() else folder / top
    if not local.exists():
        return
    origin = getattr(sys.modules.get(top), "__file__", None)
    if origin is None or Path(origin).resolve() in (local.resolve(), (local / "__init__.py").resolve()):
        return
    raise ImportError(
        f"cannot import {name!r} from {str(local)!r}: a module {top!r} was already imported from {origin!r}; "
        "rename one of them"
    )


def _quantizer_spec(raw: Any, where: str) -> QuantizerSpec | None:
    if raw is False or raw == "none":
        return None
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a table with at least 'quantizer', got {raw!r}")
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(_SPEC_KEYS)}")
    if "quantizer" not in raw:
        raise RecipeError(f"{where}: missing 'quantizer' (a name from tq.list_quantizers())")
    raw = dict(raw)
    for key in ("bits_arg", "axis_arg"):
        if raw.get(key) is False:
            raw[key] = None
    return QuantizerSpec(**raw)


def load_recipe_file(path: str | Path) -> list[str]:
    """Register the recipes of a TOML file; return their names.

    The file may import modules (``import = ["my_module"]``, found next to the
    file first, then in the current directory, then among installed packages)
    that register quantizers, then describe recipes as ``[recipe.<name>]`` tables
    with the fields of :class:`SpecRecipe` (``weights`` and ``acts`` are tables
    with the fields of :class:`QuantizerSpec`; ``acts = false`` keeps
    activations in float), optionally starting from a registered spec recipe
    with ``base = "qat-minmax"``::

        import = ["my_quantizers"]

        [recipe.qat-mysign]
        base = "qat-minmax"
        description = "my sign quantizer for weights"
        weights = { quantizer = "my-sign", bits_arg = false, fixed_bits = 1 }

    Each recipe records where it was defined (``SpecRecipe.source``, ``"file:line"``).
    Whether its quantizers accept their arguments is checked per grid cell
    (:meth:`SpecRecipe.check_cell`), since it can depend on the bit setting.

    Raises:
        FileNotFoundError: no such file.
        RecipeError: invalid TOML, unknown keys or a malformed recipe (the message names
            the file and the key).
        ImportError: a module of ``import`` cannot be imported.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
    doc, text = _load_toml(path)
    unknown = set(doc) - {"import", "recipe"}
    if unknown:
        raise RecipeError(f"{path}: unknown top-level keys {sorted(unknown)}; valid: ['import', 'recipe']")
    imports = doc.get("import", [])
    if isinstance(imports, str):
        imports = [imports]
    if not isinstance(imports, list) or not all(isinstance(m, str) for m in imports):
        raise RecipeError(f"{path}: 'import' must be a module name or a list of them, got {imports!r}")
    import_modules(imports, folder=path.parent)
    names = []
    for name, raw in doc.get("recipe", {}).items():
        line = _header_line(text, name)
        source = str(path) if line is None else f"{path}:{line}"
        where = f"{source}: recipe {name!r}"
        if not isinstance(raw, dict):
            raise RecipeError(f"{where}: expected a table")
        unknown = set(raw) - _RECIPE_KEYS
        if unknown:
            raise RecipeError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(_RECIPE_KEYS)}")
        raw = dict(raw)
        fields: dict[str, Any] = {}
        if "base" in raw:
            try:
                base = get_recipe(raw.pop("base"))
            except KeyError as e:
                raise RecipeError(f"{where}: base: {e.args[0]}") from e
            if not isinstance(base, SpecRecipe):
                raise RecipeError(f"{where}: base recipe {base.name!r} is not a spec recipe")
            fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(SpecRecipe)}
        for side in ("weights", "acts"):
            if side in raw:
                raw[side] = _quantizer_spec(raw[side], f"{where}.{side}")
        fields.update(raw)
        fields["name"] = name
        fields["source"] = source
        fields.setdefault("description", f"recipe from {path.name}")
        if "weights" not in fields:
            raise RecipeError(f"{where}: missing 'weights' (or 'base')")
        fields.setdefault("acts", None)
        existing = RECIPES.get(name) if name in RECIPES else None
        if existing is not None and getattr(existing, "source", None) is None:
            # a file that took a built-in's name would change what that name reports, in this run and later ones
            raise RecipeError(
                f"{where}: {name!r} is a built-in recipe; give yours another name (base = {name!r} starts from it)"
            )
        RECIPES.register(name, overwrite=True)(SpecRecipe(**fields))
        names.append(name)
    return names
