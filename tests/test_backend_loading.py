"""What backends do at open: no runtime import on the event loop, helper threads named after
the runner, OpenVINO IR weights judged by OpenVINO."""

from __future__ import annotations

import inspect
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import aioaccel
from aioaccel.backends import get_backend, resolve_backend
from aioaccel.testing.coral import simulate_coral
from aioaccel.testing.models import dense_chain


def test_opening_xml_does_not_import_openvino_on_the_event_loop() -> None:
    # aioaccel.open runs on the loop; only the load (on a worker thread) may import OpenVINO,
    # a package that takes a second or more to import
    code = ("import sys, aioaccel\n"
            "from aioaccel.backends import resolve_backend\n"
            "assert resolve_backend('model.xml') == 'openvino'\n"
            "runner = aioaccel.open('model.xml')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'openvino'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_xml_still_resolves_to_openvino() -> None:
    assert resolve_backend(["a.xml", "b.xml"]) == "openvino"


@pytest.mark.parametrize("backend", ["coral", "memryx", "openvino-legacy", "openvino"])
def test_loaders_that_start_threads_take_the_runner_name(backend: str) -> None:
    module = get_backend(backend)
    parameter = inspect.signature(module.load).parameters["runner_name"]
    assert parameter.default == "runner" and parameter.kind is parameter.KEYWORD_ONLY


def test_coral_helper_threads_are_named_after_the_runner(tmp_path: Path) -> None:
    chain = dense_chain(8, 2)
    paths = chain.write_tflite_segments(tmp_path, 2)
    with simulate_coral(tpus=2):
        model = get_backend("coral").load(paths, runner_name="camera-3")
        stage = model.stages[0].factory()
        done = threading.Event()
        stage.start(lambda token, outputs, error: done.set())  # type: ignore[union-attr]
        try:
            names = [t.name for t in threading.enumerate()]
            assert "aioaccel-camera-3-edgetpu-pop" in names
        finally:
            stage.close()  # type: ignore[union-attr]
            if model.close is not None:
                model.close()


# ---- OpenVINO IR and its weights -------------------------------------------------------------
def relu_ir(directory: Path) -> Path:
    """A valid IR with no constants: ``openvino.save_model`` writes a 0-byte ``.bin``."""
    ov = pytest.importorskip("openvino")
    import openvino.opset13 as ops

    x = ops.parameter([1, 4], np.float32, name="x")
    path = directory / "relu.xml"
    ov.save_model(ov.Model([ops.relu(x)], [x], "relu"), str(path))
    return path


def weighted_ir(directory: Path) -> Path:
    """An IR whose graph needs its weights (a MatMul by a constant)."""
    ov = pytest.importorskip("openvino")
    import openvino.opset13 as ops

    x = ops.parameter([1, 4], np.float32, name="x")
    w = ops.constant(np.arange(16, dtype=np.float32).reshape(4, 4))
    path = directory / "weighted.xml"
    ov.save_model(ov.Model([ops.matmul(x, w, False, False)], [x], "weighted"), str(path))
    return path



@pytest.mark.anyio
@pytest.mark.parametrize("api", ["sync", "async"])
async def test_an_ir_without_weights_loads_with_its_empty_bin_and_without_one(
        api: str, tmp_path: Path) -> None:
    path = relu_ir(tmp_path)
    assert path.with_suffix(".bin").stat().st_size == 0  # what this test is about
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    for _ in ("empty .bin", "no .bin"):
        async with aioaccel.open(path, api=api) as runner:
            out = await runner.infer(x)
        assert np.array_equal(next(iter(out.values())), np.maximum(x, 0))
        path.with_suffix(".bin").unlink(missing_ok=True)  # OpenVINO needs none: loads too


@pytest.mark.anyio
async def test_an_ir_that_needs_its_weights_names_them_when_missing_or_empty(
        tmp_path: Path) -> None:
    path = weighted_ir(tmp_path)
    weights = path.with_suffix(".bin")
    data = weights.read_bytes()
    weights.write_bytes(b"")  # empty, but the graph has a constant: OpenVINO refuses
    with pytest.raises(aioaccel.ModelLoadError) as info:
        async with aioaccel.open(path):
            pass
    message = str(info.value)
    assert not isinstance(info.value, aioaccel.ModelNotFound)
    assert "weighted.xml" in message and "weighted.bin" in message and "0 bytes" in message
    assert "OpenVINO" in message and "weights" in message.lower()  # OpenVINO's own reason
    assert isinstance(info.value.__cause__, RuntimeError) and "\n" not in message
    weights.unlink()
    with pytest.raises(aioaccel.ModelNotFound, match=r"weights file of weighted\.xml not found"):
        async with aioaccel.open(path):
            pass
    weights.mkdir()
    with pytest.raises(aioaccel.ModelLoadError, match="not a regular file"):
        async with aioaccel.open(path):
            pass
    weights.rmdir()
    weights.write_bytes(data)
    async with aioaccel.open(path) as runner:  # and the real thing loads
        out = await runner.infer(np.ones((1, 4), np.float32))
    assert np.array_equal(next(iter(out.values())),
                          np.ones((1, 4), np.float32) @ np.arange(16.0).reshape(4, 4))
