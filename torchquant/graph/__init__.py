"""Whole-model rewriting: the torch.fx pass (:mod:`torchquant.graph.fx`) and the module swap
(:mod:`torchquant.graph.swap`). The entry point is :func:`torchquant.quantize_model`."""

from .concrete import BranchGuardError
from .fx import FunctionalOp, FxTraceError
from .modes import TrainingBranchWarning

__all__ = ["BranchGuardError", "FunctionalOp", "FxTraceError", "TrainingBranchWarning"]
