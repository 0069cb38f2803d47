"""The package's layering, read from the source: the library never imports the experiment
layer (``torchquant.bench`` and, above it, ``torchquant.cli``), a package's private
``_common`` helpers stay inside it, and no torchquant modules import each other in a
circle (see docs/architecture.md).

Imports are read with ``ast`` from every module under ``torchquant/``, including imports
inside functions and under ``TYPE_CHECKING``: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "torchquant"
# The experiment layer: it may import the library, never the reverse.
EXPERIMENT = ("torchquant.bench", "torchquant.cli", "torchquant.__main__")


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is_package) of every module under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def _imports(name: str, path: Path, is_package: bool, known: set[str]) -> set[str]:
    """The torchquant modules that ``name`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                # `from pkg import sub` depends on the submodule; pkg's __init__ runs for any
                # submodule import (its parent), so it is not counted as an edge of its own.
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in known else module)
    return {m for m in found if m in known and m != name}


def _graph(root: Path) -> dict[str, set[str]]:
    modules = _modules(root)
    return {name: _imports(name, path, pkg, set(modules)) for name, (path, pkg) in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _in_experiment_layer(name: str) -> bool:
    return any(name == e or name.startswith(e + ".") for e in EXPERIMENT)


GRAPH = _graph(PACKAGE)


def test_the_graph_sees_the_package():
    assert {"torchquant.qmodules", "torchquant.ptq.reconstruction", "torchquant.cli.recipes"} <= set(GRAPH)
    assert "torchquant.qmodules" in GRAPH["torchquant.folding"]  # a plain relative import
    assert "torchquant.bench.models" in GRAPH["torchquant.bench.ptq"]  # `from . import models as bmodels`
    assert "torchquant.distributed" in GRAPH["torchquant.cli.engine"]  # `from ..distributed import sync_observers`
    assert "torchquant.ptq" in GRAPH["torchquant.cli.recipes"]  # `from ..ptq import PTQ_ALGORITHMS, ...`


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if not _in_experiment_layer(n)))
def test_library_module_does_not_import_the_experiment_layer(name):
    bad = sorted(m for m in GRAPH[name] if _in_experiment_layer(m))
    assert not bad, f"{name} imports {bad}; the library must not depend on torchquant.bench / torchquant.cli"


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("torchquant.bench")))
def test_experiment_package_does_not_import_the_command_line(name):
    bad = sorted(m for m in GRAPH[name] if m.startswith("torchquant.cli") or m == "torchquant.__main__")
    assert not bad, f"{name} imports {bad}; torchquant.cli is built on torchquant.bench, not the reverse"


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.endswith("._common")))
def test_private_helper_module_is_imported_only_inside_its_package(name):
    package = name.rpartition(".")[0]
    outside = sorted(m for m, deps in GRAPH.items() if name in deps and not m.startswith(package + "."))
    assert not outside, f"{outside} import {name}; helpers shared across packages live in a public module"


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_import_reader_resolves_relative_and_lazy_imports(tmp_path):
    pkg = tmp_path / "torchquant"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import x\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from ..core import y\n    from .. import cli\n")
    (pkg / "cli.py").write_text("import torchquant.core\n")
    graph = _graph(pkg)
    assert graph["torchquant.sub"] == {"torchquant.sub.leaf"}
    assert graph["torchquant.sub.leaf"] == {"torchquant.core", "torchquant.cli"}
    assert graph["torchquant.cli"] == {"torchquant.core"}
