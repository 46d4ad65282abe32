"""LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." is not printed when
aioaccel opens a model (issue 25 item 6); other native stderr output still is, and
``AIOACCEL_NATIVE_LOGS=1`` keeps the line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ai_edge_litert")

SCRIPT = r'''
import asyncio, os, sys
import numpy as np
import aioaccel
from aioaccel.testing.models import dense_chain
from pathlib import Path

path = dense_chain(8, 2).write_tflite(Path(sys.argv[1]) / "m.tflite")

async def main():
    for _ in range(2):
        async with aioaccel.open(str(path)) as runner:
            await runner.infer(np.zeros((1, 8), np.float32))
    os.write(2, b"native stderr still works\n")

asyncio.run(main())
'''


def run(tmp_path: Path, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_opening_a_litert_model_prints_no_xnnpack_info_line(tmp_path: Path) -> None:
    err = run(tmp_path)
    assert "XNNPACK" not in err
    assert "native stderr still works" in err


def test_native_logs_can_be_kept(tmp_path: Path) -> None:
    assert "XNNPACK delegate" in run(tmp_path, AIOACCEL_NATIVE_LOGS="1")
