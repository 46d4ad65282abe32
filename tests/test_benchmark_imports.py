"""The benchmarks are not run by the suite (speed is not asserted), so a module they import
from aioaccel could move without a test noticing (bench_v2's gRPC floor did). Every
``import aioaccel...`` / ``from aioaccel... import name`` in benchmarks/ and examples/,
including those inside functions, must resolve."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("examples/*.py")])


def aioaccel_imports(path: Path) -> list[tuple[int, str, str | None]]:
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names
                      if alias.name.split(".")[0] == "aioaccel"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "aioaccel":
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_aioaccel_import_of_a_script_resolves(path: Path) -> None:
    missing = []
    for line, module, name in aioaccel_imports(path):
        try:
            imported = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"line {line}: {module}: {exc}")
            continue
        if name is not None and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"line {line}: {module} has no {name}")
    assert not missing, f"{path.name}: " + "; ".join(missing)


def test_the_scripts_are_found() -> None:
    assert any(p.name == "bench_v2.py" for p in SCRIPTS) and len(SCRIPTS) > 10
