"""``aioaccel bench``: shapes, inputs, baselines and rounds, on models built in code (the real
models are in tests/test_real_models.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aioaccel.bench import bench_inputs, parse_shapes
from aioaccel.tensors import TensorSpec
from aioaccel.testing.models import dense_chain


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-W", "error", "-m", "aioaccel.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_shapes_parse_and_bad_ones_say_what_is_expected() -> None:
    assert parse_shapes(["x=1,3,640,640", "sr=", "a=b=2"]) == {"x": (1, 3, 640, 640),
                                                               "sr": (), "a=b": (2,)}
    for bad, message in (("x", "expected NAME=D1,D2"), ("x=1,a", "must be integers"),
                         ("x=0,3", ">= 1"), ("=1", "expected NAME")):
        with pytest.raises(ValueError, match=message):
            parse_shapes([bad])


def test_inputs_fill_fixed_shapes_and_refuse_a_shape_that_does_not_fit(tmp_path: Path) -> None:
    specs = [TensorSpec("x", "float32", (None, 3)), TensorSpec("n", "int64", (2,))]
    arrays = bench_inputs(specs, {"x": (4, 3)}, None)
    assert arrays["x"].shape == (4, 3) and arrays["x"].dtype == np.float32
    assert arrays["n"].tolist() == [0, 0]  # integers: zeros, not noise
    with pytest.raises(ValueError, match=r"--shape x=4,2 does not fit .* \(\?, 3\)"):
        bench_inputs(specs, {"x": (4, 2)}, None)
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.ones((2, 3), np.float32))
    assert bench_inputs(specs, {}, npz)["x"].shape == (2, 3)
    with pytest.raises(FileNotFoundError, match="input file not found"):
        bench_inputs(specs, {}, tmp_path / "missing.npz")


@pytest.mark.parametrize("backend,suffix", [("litert", "tflite"), ("onnx", "onnx")])
def test_bench_generic_segments_with_a_raw_baseline_chained_like_the_backend(
        backend: str, suffix: str, tmp_path: Path) -> None:
    chain = dense_chain(16, 4, inputs=8)
    write = chain.write_tflite_segments if suffix == "tflite" else chain.write_onnx_segments
    paths = write(tmp_path, 2, generic_names=True)
    proc = cli("bench", *map(str, paths), "--backend", backend, "--count", "20",
               "--rounds", "4", "--concurrency", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["stages"]) == 2 and report["rounds"] == 4
    assert report["results"]["raw vendor loop"]["items_per_s"] > 0
    assert report["inputs"] == {"input": {"dtype": "float32", "shape": [1, 8]}}


def test_bench_refuses_a_dynamic_model_without_shapes(tmp_path: Path) -> None:
    path = dense_chain(8, 2, dynamic_batch=True).write_onnx(tmp_path / "m.onnx")
    proc = cli("bench", str(path), "--count", "4")
    assert proc.returncode == 2
    assert "dynamic dimensions (input (?, 8))" in proc.stderr
    assert "--shape input=1,8" in proc.stderr
    ok = cli("bench", str(path), "--count", "4", "--rounds", "2", "--shape", "input=3,8")
    assert ok.returncode == 0, ok.stderr
    assert "inputs: input float32 (3, 8)" in " ".join(ok.stdout.split())


def test_bench_reports_the_latency_split_three_ways() -> None:
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "aioaccel", "bench", "builtin", "--count", "60",
                           "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    split = json.loads(proc.stdout[proc.stdout.index("{"):])["latency_split"]
    assert set(split) == {"queue_ms", "device_ms", "end_to_end_ms"}
    assert 0 < split["device_ms"]["p50"] <= split["end_to_end_ms"]["p99"]


def test_bench_batch_passes_through_and_the_loop_is_uvloop_unless_turned_off(
        tmp_path: Path) -> None:
    path = dense_chain(16, 2, inputs=8, dynamic_batch=True).write_onnx(tmp_path / "m.onnx")
    common = ("bench", str(path), "--shape", "input=1,8", "--count", "64", "--rounds", "2",
              "--concurrency", "8", "--json")
    proc = cli(*common, "--batch", "4")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["batch"] == 4 and report["loop"] == "uvloop"  # uvloop is in the test extra
    assert report["results"]["aioaccel"]["items_per_s"] > 0
    for flag in (("--loop", "asyncio"), ("--no-uvloop",)):
        off = cli(*common, *flag)
        assert off.returncode == 0, off.stderr
        assert json.loads(off.stdout)["loop"] == "asyncio"
    refused = cli("bench", str(path), "--shape", "input=1,8", "--batch", "0")
    assert refused.returncode == 2 and "--batch" in refused.stderr


def test_bench_prints_one_p50_figure_for_aioaccel() -> None:
    proc = cli("bench", "builtin", "--count", "40", "--rounds", "2")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    row = next(line for line in text.splitlines() if "aioaccel (" in line)
    assert len([cell for cell in row.split("│") if cell.strip()]) == 5  # mode, items/s, x, p50, p99
    assert "end to end" not in text  # the table's p50 is the only end-to-end figure
    assert "queued" in text and "on the device" in text


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="Linux only")
def test_bench_cpus_keeps_the_run_on_those_cpus_and_bad_ones_are_refused(
        tmp_path: Path) -> None:
    import os

    path = dense_chain(16, 2, inputs=8).write_onnx(tmp_path / "m.onnx")
    common = ("bench", str(path), "--count", "16", "--rounds", "2", "--concurrency", "2",
              "--json")
    first = min(os.sched_getaffinity(0))
    proc = cli(*common, "--cpus", str(first))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cpus"] == [first]
    free = json.loads(cli(*common).stdout)["cpus"]
    assert free == sorted(os.sched_getaffinity(0))  # without --cpus the affinity is left alone
    for bad, message in (("x", "comma-separated CPU numbers"), (",", "at least one CPU"),
                         ("4096", "CPU 4096 is not one this process may run on")):
        refused = cli(*common, "--cpus", bad)
        assert refused.returncode == 2, refused.stderr
        assert message in refused.stderr and "Traceback" not in refused.stderr
