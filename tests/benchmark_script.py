"""Load a script of ``benchmarks/`` as a module, for the tests that check it."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as the module ``benchmarks_<name>``."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the module runs
    spec.loader.exec_module(module)
    return module


def load_patching_kernels(name: str, monkeypatch) -> ModuleType:
    """``load(name)`` for a script that patches ``torchquant.kernels`` (its stand-in launches): ``monkeypatch``
    gives the test the kernels back afterwards."""
    from torchquant import kernels

    monkeypatch.setattr(kernels, "_impl", kernels._impl)
    monkeypatch.setattr(kernels, "_DEVICES", set(kernels._DEVICES))
    return load(name)
