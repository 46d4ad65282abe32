"""What the status page and ``/v1/status`` show: one JSON-ready snapshot of every model.

Per model: its health state, items/s over the last interval, in flight vs maxsize, latency
percentiles (every ``*_p50`` / ``*_p99`` field the runner's stats have, so splits such as
queue vs device time appear when the core adds them), per-stage busy fraction and per-stream
counters. The numbers are the same ``runner.stats()`` that ``/metrics`` exports.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..runner import Runner

__all__ = ["HEALTHY", "StatusFeed", "model_restarts", "model_state"]

#: states in which a model answers requests
HEALTHY = frozenset({"ready"})


def model_state(runner: Runner) -> str:
    """``starting|ready|recovering|broken|closed``: ``runner.health().state`` where the core
    has it, else what the runner's public state tells."""
    health = getattr(runner, "health", None)
    if callable(health):
        return str(health().state)
    if runner.closed:
        return "closed"
    return "ready"


def model_restarts(runner: Runner) -> int | None:
    """Recoveries since open, where the core reports them (self-healing), else None."""
    health = getattr(runner, "health", None)
    if callable(health):
        restarts = getattr(health(), "restarts", None)
        return restarts if isinstance(restarts, int) else None
    return None


def _latencies(stats: Any) -> dict[str, float]:
    """Every latency percentile of a stats snapshot, in milliseconds."""
    found = {}
    for field in dataclasses.fields(stats):
        if field.name.endswith(("_p50", "_p99")):
            value = getattr(stats, field.name)
            if isinstance(value, int | float):
                found[field.name.removeprefix("latency_") if field.name.startswith("latency_")
                      else field.name] = round(value * 1e3, 3)
    return found


class StatusFeed:
    """Successive snapshots; items/s is the completions between two of them over the time."""

    def __init__(self, runners: Mapping[str, Runner]):
        self.runners = runners
        self._last: dict[str, tuple[float, int]] = {}

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        models = {}
        for name, runner in self.runners.items():
            stats = runner.stats()
            before = self._last.get(name)
            if before is None or now <= before[0]:
                rate = stats.throughput
            else:
                rate = (stats.completed - before[1]) / (now - before[0])
            self._last[name] = (now, stats.completed)
            models[name] = {
                "state": model_state(runner),
                "restarts": model_restarts(runner),
                "items_per_s": round(rate, 1),
                "pushed": stats.pushed, "completed": stats.completed, "failed": stats.failed,
                "withdrawn": stats.withdrawn, "discarded": stats.discarded,
                "in_flight": stats.in_flight, "maxsize": stats.maxsize,
                "waiting": stats.waiting, "peak_admitted": stats.peak_admitted,
                "latency_ms": _latencies(stats),
                "stages": [{"name": s.name, "kind": s.kind, "workers": s.workers,
                            "busy": round(s.busy, 4), "queue_depth": s.queue_depth,
                            "calls": s.calls} for s in stats.stages],
                "streams": [{"key": str(s.key), "pushed": s.pushed, "completed": s.completed,
                             "failed": s.failed, "in_flight": s.in_flight,
                             "maxsize": s.maxsize, "waiting": s.waiting,
                             "latency_ms": _latencies(s)} for s in stats.streams],
            }
        return {"time": time.time(), "models": models}
