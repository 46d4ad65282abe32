"""Figures: ``aioaccel bench --plot`` and :func:`aioaccel.plots.bench_figure`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import aioaccel
from aioaccel.plots import bench_figure

PNG = b"\x89PNG\r\n\x1a\n"


def test_bench_figure_draws_throughput_and_latency_cdf(tmp_path: Path) -> None:
    out = bench_figure(tmp_path / "f.png",
                       throughput={"aioaccel": [(1, 900.0), (4, 2000.0), (16, 2500.0)]},
                       baseline={"raw vendor loop": 1000.0},
                       latencies={"aioaccel": [0.001, 0.002, 0.004], "raw": [0.0009] * 5})
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 20_000
    svg = bench_figure(tmp_path / "f.svg", throughput={"a": [(1, 1.0)]}, latencies={"a": [1.0]})
    text = svg.read_text()
    assert "<svg" in text and "throughput" in text and "latency distribution" in text


def test_bench_plot_writes_the_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.png"
    proc = subprocess.run([sys.executable, "-W", "error", "-m", "aioaccel", "bench", "builtin",
                           "--count", "40", "--concurrency", "4", "--plot", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"plot written to {out}" in " ".join(proc.stdout.split())
    assert out.read_bytes().startswith(PNG)


def test_without_matplotlib_the_error_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(aioaccel.BackendUnavailable, match=r"pip install matplotlib"):
        bench_figure(tmp_path / "x.png", throughput={}, latencies={})
