"""The package's import graph has no cycle.

Every module of ``moe_theory`` is parsed with ``ast`` (nothing is imported), and every import
statement, at module level or inside a function, becomes an edge to the module that defines what
it imports: relative imports are resolved against the importing module, ``from package import name``
goes to the submodule ``package.name`` when there is one, and a name that a package's
``__init__`` re-exports (``from .api import fit``) is followed to the module that defines it. A
cycle means some module needs, directly or through others, a module that needs it back, which
Python resolves only by the order of execution or by imports hidden inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moe_theory

PACKAGE = "moe_theory"
ROOT = Path(moe_theory.__file__).resolve().parent


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


MODULES = _module_files()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of ``from <node.module> import ...`` inside ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _reexports(package: str) -> dict[str, tuple[str, str]]:
    """Names a package's ``__init__`` imports at module level: name → (source module, its name there)."""
    found = {}
    for node in TREES[package].body:
        if isinstance(node, ast.ImportFrom):
            source = _absolute(package, node)
            for alias in node.names:
                found[alias.asname or alias.name] = (source, alias.name)
    return found


def _defining_module(module: str, name: str, seen: frozenset = frozenset()) -> str:
    """The module that defines ``module.name``: a submodule, a re-export's source, or ``module`` itself."""
    if f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    if _is_package(module) and (module, name) not in seen:
        source = _reexports(module).get(name)
        if source is not None and source[0] in MODULES:
            return _defining_module(source[0], source[1], seen | {(module, name)})
    return module


def _import_edges(module: str) -> set[str]:
    edges = set()
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            edges |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            if source in MODULES:
                edges |= {_defining_module(source, alias.name) for alias in node.names}
    return edges - {module}


GRAPH = {module: _import_edges(module) for module in MODULES}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first = last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_package():
    assert {"moe_theory.fit.api", "moe_theory.fit.solver", "moe_theory.sweep"} <= set(GRAPH)
    assert "moe_theory.fit.solver" in GRAPH["moe_theory.fit.em"]
    # Re-exports are followed to the defining module, relative imports resolved.
    assert "moe_theory.fit.settings" in GRAPH["moe_theory.config"]
    assert _defining_module("moe_theory.fit", "fit_batch") == "moe_theory.fit.api"


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("solver_module", ["moe_theory.fit.em", "moe_theory.fit.fast", "moe_theory.fit.mle"])
def test_the_solver_protocol_imports_no_solver(solver_module):
    assert solver_module not in GRAPH["moe_theory.fit.solver"]
