"""What backends do at open: no runtime import on the event loop, helper threads named after
the runner."""

from __future__ import annotations

import inspect
import subprocess
import sys
import threading
from pathlib import Path

import pytest

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
