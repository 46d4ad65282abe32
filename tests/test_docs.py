"""Every ```python block in docs/ runs, and so does every example; every test project the docs
show (a ``pyproject.toml`` block, then a ``test_*.py`` block) passes. README.md's blocks, shell
commands included, are run by tests/test_readme.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
# a block with a file name: ```toml title="pyproject.toml"
TITLED = re.compile(r'^```\w+ title="([^"]+)"\n(.*?)^```', re.MULTILINE | re.DOTALL)


def doc_blocks() -> list[object]:
    blocks = []
    for path in sorted((ROOT / "docs").rglob("*.md")):
        for n, match in enumerate(BLOCK.finditer(path.read_text())):
            name = path.relative_to(ROOT).as_posix()
            blocks.append(pytest.param(match.group(1), id=f"{name}-{n}"))
    return blocks


def doc_test_projects() -> list[tuple[str, str, str, str]]:
    """(id, pyproject.toml, test file name, test code) for each test file the docs show
    after its pyproject.toml."""
    projects = []
    for path in sorted((ROOT / "docs").rglob("*.md")):
        ini = None
        for n, match in enumerate(TITLED.finditer(path.read_text())):
            name, text = match.groups()
            if name == "pyproject.toml":
                ini = text
            elif re.fullmatch(r"test_\w+\.py", name):
                assert ini is not None, f"{path}: {name} has no pyproject.toml before it"
                projects.append((f"{path.relative_to(ROOT).as_posix()}-{n}", ini, name, text))
                ini = None
    return projects


@pytest.mark.parametrize("ini, name, code",
                         [pytest.param(*rest, id=ident) for ident, *rest in doc_test_projects()])
def test_doc_test_project_passes(pytester: pytest.Pytester, ini: str, name: str,
                                 code: str) -> None:
    pytester.makefile(".toml", pyproject=ini)
    pytester.makepyfile(**{name.removesuffix(".py"): code})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    outcomes = result.parseoutcomes()
    assert result.ret == 0 and outcomes.get("passed", 0) >= 1, result.stdout.str()
    assert set(outcomes) <= {"passed"}, result.stdout.str()  # no skip, error or warning


def test_the_docs_show_a_first_test_for_each_async_plugin() -> None:
    projects = doc_test_projects()
    assert any('asyncio_mode = "strict"' in ini for _, ini, _, _ in projects)
    assert any('asyncio_mode = "auto"' in ini for _, ini, _, _ in projects)
    assert any("pytest.mark.anyio" in code for _, _, _, code in projects)


@pytest.mark.parametrize("code", doc_blocks())
def test_doc_sample_runs(code: str) -> None:
    # a hang guard: the scale-out sample starts a Ray cluster (~20 s idle, minutes under load)
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "a sample should show what it did"


def test_camera_pipeline_example_runs() -> None:
    proc = subprocess.run([sys.executable, "-W", "error", "examples/camera_pipeline.py", "50"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("50 frames")


def test_multi_camera_example_runs() -> None:
    proc = subprocess.run([sys.executable, "-W", "error", "examples/multi_camera.py", "3", "20"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "60 frames from 3 cameras" in proc.stdout
    assert proc.stdout.count(": 20 frames") == 3


def test_service_testing_example_passes() -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-rs", "examples/test_service.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 passed, 2 skipped" in proc.stdout  # on asyncio and on trio
    assert "needs coral" in proc.stdout
