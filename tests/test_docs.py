"""Every ```python block in README.md and docs/ runs, and so does every example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def doc_blocks() -> list[object]:
    blocks = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for n, match in enumerate(BLOCK.finditer(path.read_text())):
            name = path.relative_to(ROOT).as_posix()
            blocks.append(pytest.param(match.group(1), id=f"{name}-{n}"))
    return blocks


@pytest.mark.parametrize("code", doc_blocks())
def test_doc_sample_runs(code: str) -> None:
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
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
