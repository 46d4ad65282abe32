"""What a first-time user of the ``aioaccel`` command sees: the demo's interleaved rounds and
what its ratio means, --version, --backend choices, devices without remote providers, no
traceback when piped into a reader that leaves, install hints that name the package."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import aioaccel
from aioaccel._optional import need
from aioaccel.backends import BACKENDS


def aioaccel_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-W", "error", "-m", "aioaccel", *args],
                          capture_output=True, text=True, timeout=300)


def test_demo_reports_the_median_of_interleaved_rounds_and_what_it_means() -> None:
    proc = aioaccel_cmd("demo", "--frames", "24", "--rounds", "3", "--depth", "2")
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "3 rounds of 8 frames, sequential and pipelined in turn" in out
    assert "median of 3 interleaved rounds" in out
    low, high = map(float, re.search(r"rounds: ([\d.]+)x to ([\d.]+)x", out).groups())  # type: ignore[union-attr]
    assert 0 < low <= high
    assert "The ratio is the pipeline's items/s over the sequential loop's" in out
    assert re.search(r"Pipelining needs free cores: up to \d+x here, on \d+ cores?", out)
    assert "outputs checked against NumPy: 4" in out
    usage = aioaccel_cmd("demo", "--frames", "2", "--rounds", "3")
    assert usage.returncode == 2 and "rounds <= frames" in usage.stderr


def test_version() -> None:
    proc = aioaccel_cmd("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"aioaccel {aioaccel.__version__}"


@pytest.mark.parametrize("command", ["info", "bench", "serve"])
def test_backend_lists_its_choices_with_help(command: str) -> None:
    proc = aioaccel_cmd(command, "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "{coral,function,litert,memryx,onnx,openvino,openvino-legacy}" in text
    assert "the runtime" in text
    wrong = aioaccel_cmd(command, "m.onnx", "--backend", "tensorrt")
    assert wrong.returncode == 2 and "invalid choice: 'tensorrt'" in wrong.stderr


def test_devices_lists_hardware_not_remote_providers() -> None:
    proc = aioaccel_cmd("devices", "--json")
    assert proc.returncode == 0, proc.stderr
    onnx = [d["device"] for d in json.loads(proc.stdout) if d["backend"] == "onnx"]
    assert "CPUExecutionProvider" in onnx
    assert "AzureExecutionProvider" not in onnx
    assert all(d.device != "AzureExecutionProvider" for d in aioaccel.devices())


def test_no_traceback_when_the_reader_leaves() -> None:
    # `true` exits at once, long before the devices are probed: every write hits a closed pipe
    for args in ("devices", "devices --json", "info --help"):
        proc = subprocess.run(f"{sys.executable} -m aioaccel {args} | true", shell=True,
                              capture_output=True, text=True, timeout=120)
        assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, args


def test_install_hints_name_the_package_and_work_from_a_checkout() -> None:
    assert BACKENDS["litert"].install.startswith("pip install ai-edge-litert")
    assert BACKENDS["onnx"].install.startswith("pip install onnxruntime")
    assert BACKENDS["openvino"].install.startswith("pip install openvino")
    for backend in ("litert", "onnx", "openvino"):
        assert f"pip install -e '.[{backend}]'" in BACKENDS[backend].install
    with pytest.raises(aioaccel.BackendUnavailable,
                       match=r"needs prometheus_client: pip install prometheus-client "
                             r"\(from an aioaccel checkout: pip install -e '\.\[metrics\]'"):
        need("prometheus_client.no_such_module", "metrics", "aioaccel.metrics")
