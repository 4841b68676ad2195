"""No import cycles inside a package: every import of every module (function-level ones included, relative
imports resolved) is an edge, and the graph of the package's own modules must have no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def modules_of(package: str, root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file under the package (``pkg.sub`` for ``pkg/sub/__init__.py``)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    # the packages that contain this module are always being imported before it: no edge back to them
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    edges: set[str] = set()

    def add(target: str) -> None:
        # `import a.b.c` runs a, a.b and a.b.c: each known prefix is an edge
        pieces = target.split(".")
        for i in range(1, len(pieces) + 1):
            prefix = ".".join(pieces[:i])
            if prefix in known and prefix != name and prefix not in ancestors:
                edges.add(prefix)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            add(module)
            for alias in node.names:  # `from pkg import sub` imports the submodule pkg.sub
                if f"{module}.{alias.name}" in known:
                    add(f"{module}.{alias.name}")
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    modules = modules_of(package, root)
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_the_checker_finds_a_cycle(tmp_path):
    """A cycle hidden in a function-level relative import is found (so the package tests below can fail); an
    import of a module's own package is no edge (Python always imports the package first)."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (package / "c.py").write_text("import pkg.a\n")
    graph = import_graph("pkg", tmp_path)
    assert graph["pkg.c"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    (package / "d.py").write_text("import os\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import d\n    from . import __name__\n")
    assert find_cycle(import_graph("pkg", tmp_path)) is None


def test_core_has_no_import_cycle():
    assert find_cycle(import_graph("core")) is None


# The bot's cycle (client -> delivery -> views -> cogs.music -> client) is removed in the bot half of the same
# change; once both halves are merged this marker goes (strict: it fails as soon as the cycle is gone).
@pytest.mark.xfail(strict=True, reason="bot/ still has an import cycle on this branch")
def test_bot_has_no_import_cycle():
    assert find_cycle(import_graph("bot")) is None
