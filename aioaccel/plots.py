"""Figures of measurements: throughput against concurrency (or batch size) and the latency
distribution, the raw vendor loop beside aioaccel. ``pip install 'aioaccel[plot]'``
(matplotlib, drawn off-screen: no display needed).

    from aioaccel.plots import bench_figure
    bench_figure("out.png", throughput={"aioaccel": [(1, 900.0), (8, 2400.0)]},
                 baseline={"raw vendor loop": 1000.0},
                 latencies={"aioaccel": [0.001, ...], "raw vendor loop": [...]})
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from ._optional import need

__all__ = ["bench_figure"]


def bench_figure(path: str | os.PathLike[str], *,
                 throughput: Mapping[str, Sequence[tuple[float, float]]],
                 latencies: Mapping[str, Sequence[float]],
                 baseline: Mapping[str, float] | None = None,
                 x_label: str = "concurrent callers", title: str = "") -> Path:
    """Write a two-panel figure to ``path`` (the format follows the suffix: .png, .svg ...).

    ``throughput``: per series, (x, items/s) points (x: concurrency or batch size).
    ``baseline``: per series, one items/s drawn as a horizontal line (a raw sequential loop).
    ``latencies``: per series, per-item latencies in seconds, drawn as a CDF.
    """
    need("matplotlib", "plot", "aioaccel.plots")
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    rate, cdf = figure.subplots(1, 2)
    series = [*throughput, *(baseline or {})]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]

    def color(label: str) -> str:
        """One colour per series in both panels: a CDF label starting with a series' name
        (before any " (...)") is that series."""
        for n, name in enumerate(series):
            if label.startswith(name.split(" (")[0]):
                return palette[n % len(palette)]
        series.append(label)  # a series of its own, with the next colour
        return palette[(len(series) - 1) % len(palette)]

    for label, points in throughput.items():
        ordered = sorted(points)
        rate.plot([x for x, _ in ordered], [y for _, y in ordered], marker="o", label=label,
                  color=color(label))
    for label, value in (baseline or {}).items():
        rate.axhline(value, linestyle="--", color=color(label), label=label)
    xs = sorted({x for points in throughput.values() for x, _ in points})
    if xs and xs[-1] / max(xs[0], 1e-9) >= 8:
        rate.set_xscale("log", base=2)
        rate.set_xticks(xs, [f"{x:g}" for x in xs])
    rate.set_xlabel(x_label)
    rate.set_ylabel("items/s")
    tops = [y for points in throughput.values() for _, y in points]
    tops += list((baseline or {}).values())
    rate.set_ylim(0, max(tops, default=1.0) * 1.25)  # room for the legend above the lines
    rate.set_title("throughput")
    rate.grid(alpha=0.3)
    rate.legend(loc="upper left")
    for label, values in latencies.items():
        if not values:
            continue
        ordered_ms = sorted(v * 1e3 for v in values)
        n = len(ordered_ms)
        cdf.step(ordered_ms, [(i + 1) / n for i in range(n)], where="post", color=color(label),
                 label=f"{label} (p50 {statistics.median(ordered_ms):.2f} ms)")
    cdf.set_xscale("log")
    # 0.1, 0.2, 0.5, 1, 2, 5 ... in plain numbers: readable over a narrow range too
    cdf.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    cdf.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    cdf.xaxis.set_minor_formatter(NullFormatter())
    cdf.set_xlabel("latency (ms, log scale)")
    cdf.set_ylabel("fraction of items")
    cdf.set_ylim(0, 1.01)
    cdf.set_title("latency distribution (CDF)")
    cdf.grid(alpha=0.3, which="both")
    cdf.legend(loc="lower right")
    if title:
        figure.suptitle(title)
    out = Path(path)
    figure.savefig(out, dpi=110)
    return out
