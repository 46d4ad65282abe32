"""The core's shape: no module imports one that imports it back, and Runner stays a thin front.

Imports are read from the source (type-only imports under ``TYPE_CHECKING`` and imports inside
functions included), so a circle cannot hide behind a deferred import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import aioaccel

PACKAGE = Path(aioaccel.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            root = (f"{base}.{node.module}" if node.module else base) if node.level else (
                node.module or "")
            targets = [root] + [f"{root}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target != "aioaccel":
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    paths = list(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(edges: dict[str, set[str]], within: str) -> list[list[str]]:
    nodes = {n for n in edges if n.startswith(within)}
    found: list[list[str]] = []
    for start in sorted(nodes):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    found.append(path)
                elif nxt in nodes and nxt not in path and nxt > start:
                    stack.append((nxt, [*path, nxt]))
    return found


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert cycles(graph(), "aioaccel") == []


def test_the_finder_sees_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "") == [["a", "b", "c"]]


def test_runner_is_a_thin_front() -> None:
    tree = ast.parse((PACKAGE / "runner.py").read_text())
    (runner,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Runner"]
    assert runner.end_lineno is not None
    assert runner.end_lineno - runner.lineno + 1 <= 350
