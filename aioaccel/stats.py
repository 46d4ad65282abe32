"""Snapshots returned by ``Runner.stats()``."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .streams import StreamStats

__all__ = ["LatencyWindow", "RunnerStats", "StageStats"]


@dataclass(frozen=True)
class StageStats:
    name: str
    kind: str            #: "blocking" (run on worker threads) or "device" (runtime completes)
    workers: int         #: worker threads (replicas) of this stage
    queue_depth: int     #: items waiting in front of this stage
    busy: float          #: fraction of wall time the stage was working (mean over its workers)
    calls: int           #: items this stage finished
    in_device: int       #: device stages: items on the device right now


@dataclass(frozen=True)
class RunnerStats:
    name: str
    pushed: int          #: items admitted (push, push_nowait and infer)
    completed: int       #: items whose stages all succeeded
    failed: int          #: items that failed (per-item errors, or pending when closed/broken)
    discarded: int       #: results computed for an infer() whose caller had gone
    withdrawn: int       #: infer() items taken back before any worker started them
    in_flight: int       #: admitted and not yet consumed (never exceeds maxsize)
    peak_admitted: int   #: high-water mark of in_flight
    maxsize: int
    waiting: int         #: push/infer calls waiting for space
    latency_p50: float   #: seconds from admission to completion, recent successful items
    latency_p99: float
    elapsed: float       #: seconds since the runner opened
    stages: tuple[StageStats, ...]
    streams: tuple[StreamStats, ...] = ()  #: one per ``runner.stream(key)``
    #: per-layer timings, from backends opened with ``profile=True`` (else None)
    profile: dict[str, Any] | None = None

    @property
    def throughput(self) -> float:
        """Completed items per second since the runner opened."""
        return self.completed / self.elapsed if self.elapsed else 0.0


class LatencyWindow:
    """The most recent latencies (a bounded window, so memory stays flat)."""

    def __init__(self, size: int = 4096):
        self._values: deque[float] = deque(maxlen=size)
        self.add = self._values.append

    def percentiles(self) -> tuple[float, float]:
        if not self._values:
            return 0.0, 0.0
        ordered = sorted(self._values)
        last = len(ordered) - 1
        return ordered[round(0.50 * last)], ordered[round(0.99 * last)]
