"""The LiteRT backend and the Coral simulator on whichever TFLite interpreter is installed.

In the main environment that is ``ai_edge_litert``. ``.ci/run`` also runs this module in an
environment with NumPy < 2 and ``tflite-runtime`` 2.14 (what pycoral builds its interpreters
with) and no ``ai_edge_litert``, with ``AIOACCEL_EXPECT_INTERPRETER=tflite_runtime`` so that a
silent fallback cannot pass, and the models written beforehand by tests/write_tflite_models.py
(``AIOACCEL_TFLITE_MODELS``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import close, stream_all

import aioaccel
from aioaccel.backends.litert import interpreter_module, interpreter_name

pytestmark = pytest.mark.anyio

EXPECTED = os.environ.get("AIOACCEL_EXPECT_INTERPRETER")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("AIOACCEL_TFLITE_MODELS")
    if given:
        return Path(given)
    from write_tflite_models import write_all

    return write_all(tmp_path_factory.mktemp("tflite-models"))


def data(models: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(models / f"{name}.npz") as arrays:
        return arrays["x"], arrays["y"]


def test_the_interpreter_in_use_is_the_expected_one() -> None:
    name = interpreter_name(interpreter_module())
    if EXPECTED:
        assert name.split()[0] == EXPECTED, f"expected {EXPECTED}, got {name}"
    assert name.split()[0] in ("ai_edge_litert", "tflite_runtime")


@pytest.mark.parametrize("name", ["dense", "conv"])
async def test_a_single_model_matches_numpy(models: Path, name: str) -> None:
    xs, ys = data(models, name)
    async with aioaccel.open(models / f"{name}.tflite", maxsize=4) as runner:
        results = await stream_all(runner, list(xs))
        info = runner._model.info  # type: ignore[union-attr]
    assert info["interpreter"] == interpreter_name(interpreter_module())
    for r, y in zip(results, ys):
        assert close(r.outputs["output"], y)


@pytest.mark.parametrize("segments", [2, 3])
@pytest.mark.parametrize("kind", ["dense", "generic"])
async def test_segments_named_and_generic_match_numpy(models: Path, segments: int,
                                                      kind: str) -> None:
    xs, ys = data(models, kind)
    paths = sorted((models / f"{kind}-{segments}").glob("*.tflite"))
    assert len(paths) == segments
    async with aioaccel.open(paths, maxsize=4, replicas=2) as runner:
        assert len(runner.stats().stages) == segments
        outs = await asyncio.gather(*(runner.infer(x) for x in xs))
    for out, y in zip(outs, ys):
        assert close(out["output"], y)


async def test_validation_and_dynamic_batches(models: Path) -> None:
    xs, ys = data(models, "dynamic")
    async with aioaccel.open(models / "dynamic.tflite", cast=True) as runner:
        assert runner.inputs[0].shape == (None, 8)
        batch = np.concatenate(list(xs))  # (6, 8): the interpreter is resized for it
        out = await runner.infer(batch.astype(np.float64))
        assert close(out["output"], np.concatenate(list(ys)))
    async with aioaccel.open(models / "dense.tflite") as runner:
        with pytest.raises(aioaccel.InputError, match="expected dtype float32, got float64"):
            await runner.infer(np.zeros((1, 8)))
        with pytest.raises(aioaccel.InputError, match=r"expected shape \(1, 8\), got \(1, 9\)"):
            await runner.infer(np.zeros((1, 9), np.float32))
    async with aioaccel.open(models / "two.tflite") as runner:
        a = np.ones((1, 4), np.float32)
        out = await runner.infer({"b": a * 2, "a": a})  # by name, in any order
        assert close(out["sum"], a * 3)


async def test_errors_name_the_file_and_the_interpreter(models: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.tflite"):
        async with aioaccel.open(tmp_path / "nope.tflite"):
            pass
    with pytest.raises(aioaccel.ModelLoadError, match="broken.tflite") as info:
        async with aioaccel.open(models / "broken.tflite"):
            pass
    assert interpreter_name(interpreter_module()) in str(info.value)
    paths = sorted((models / "dense-2").glob("*.tflite"))
    with pytest.raises(ValueError, match="segment 1 .*needs tensor 'input'"):
        async with aioaccel.open(paths[::-1]):
            pass


async def test_the_coral_simulator_runs_on_this_interpreter(models: Path) -> None:
    from aioaccel.testing.coral import simulate_coral

    xs, ys = data(models, "dense")
    paths = sorted((models / "dense-3").glob("*.tflite"))
    with simulate_coral(tpus=3, latency=0.001) as sim:
        async with aioaccel.open(paths, backend="coral", maxsize=4) as runner:
            engine = sim.engines[0]
            made_by = type(engine.interpreters[0]).__module__.split(".")[0]
            results = await stream_all(runner, list(xs))
        assert made_by == interpreter_module().__name__.split(".")[0]
    assert [q.peak for q in engine.links] == [1, 1]  # libcoral's internal queues
    for r, y in zip(results, ys):
        assert close(r.outputs["output"], y)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-W", "error", "-m", "aioaccel.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_devices_and_info_say_which_interpreter_runs(models: Path) -> None:
    name = interpreter_name(interpreter_module())
    listed = cli("devices", "--json")
    assert listed.returncode == 0, listed.stderr
    litert = [d for d in json.loads(listed.stdout) if d["backend"] == "litert"]
    assert litert and litert[0]["available"] and name in litert[0]["description"]
    info = cli("info", str(models / "dense.tflite"))
    assert info.returncode == 0, info.stderr
    assert f"runtime: {name}" in info.stdout
