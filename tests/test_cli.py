"""The aioaccel command: the demo on each CPU backend, info, and exit codes scripts can use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aioaccel.testing.models import dense_chain


def aioaccel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-W", "error", "-m", "aioaccel.cli", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("backend", ["litert", "onnx", "openvino"])
def test_demo_runs_a_segmented_pipeline_and_checks_its_outputs(backend: str) -> None:
    proc = aioaccel("demo", "--backend", backend, "--frames", "24", "--depth", "3",
                    "--segments", "3")
    assert proc.returncode == 0, proc.stderr
    assert "aioaccel pipeline, 3 segments" in proc.stdout
    assert "whole model, sequential" in proc.stdout
    assert "outputs checked against NumPy: 4" in proc.stdout
    assert proc.stdout.count("segment_") >= 3 or proc.stdout.count("openvino") >= 3


def test_info_lists_inputs_and_outputs(tmp_path: Path) -> None:
    path = dense_chain(8, 2, dynamic_batch=True).write_onnx(tmp_path / "m.onnx")
    proc = aioaccel("info", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "input" in proc.stdout and "float32" in proc.stdout and "(?, 8)" in proc.stdout


def test_exit_codes(tmp_path: Path) -> None:
    missing = aioaccel("info", str(tmp_path / "none.onnx"))
    assert missing.returncode == 2 and "model file not found" in missing.stderr
    unknown = aioaccel("info", str(tmp_path / "model.pt"))
    assert unknown.returncode == 2 and "unknown file type '.pt'" in unknown.stderr
    usage = aioaccel("demo", "--segments", "9", "--depth", "2")
    assert usage.returncode == 2


def test_bench_builtin_json_compares_with_the_raw_vendor_loop() -> None:
    import json

    proc = aioaccel("bench", "builtin", "--segments", "2", "--count", "40", "--concurrency",
                    "4", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["backend"] == "litert" and len(report["stages"]) == 2
    raw, ours = report["results"]["raw vendor loop"], report["results"]["aioaccel"]
    assert raw["vs_raw"] == 1.0 and ours["items_per_s"] > 0
    assert ours["vs_raw"] == ours["items_per_s"] / raw["items_per_s"]
    assert 0 < ours["p50_ms"] <= ours["p99_ms"]


def test_bench_a_model_file_prints_a_table(tmp_path: Path) -> None:
    path = dense_chain(16, 2).write_onnx(tmp_path / "m.onnx")
    proc = aioaccel("bench", str(path), "--count", "30")
    assert proc.returncode == 0, proc.stderr
    assert "raw vendor loop" in proc.stdout and "aioaccel (8 callers)" in proc.stdout


def test_bench_usage_errors(tmp_path: Path) -> None:
    missing = aioaccel("bench", str(tmp_path / "none.onnx"))
    assert missing.returncode == 2 and "model file not found" in missing.stderr
    path = dense_chain(16, 2).write_onnx(tmp_path / "m.onnx")
    split = aioaccel("bench", str(path), "--segments", "2")
    assert split.returncode == 2 and "--segments splits the builtin model" in split.stderr
    zero = aioaccel("bench", "builtin", "--count", "0")
    assert zero.returncode == 2
