"""Snapshots returned by ``Runner.stats()``."""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["LATENCY_BUCKETS", "BatchStats", "LatencyHistogram", "LatencyWindow", "RunnerStats",
           "StageStats", "StreamStats"]

#: upper bounds (seconds) of the cumulative latency histogram (Prometheus-style ``le``)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


@dataclass(frozen=True)
class StreamStats:
    key: Any
    index: int
    pushed: int
    completed: int
    failed: int
    in_flight: int       #: slots held: admitted and not yet consumed
    waiting: int         #: pushes of this stream waiting for space
    maxsize: int
    latency_p50: float
    latency_p99: float
    weight: float = 1.0
    priority: int = 0
    reserve: int = 0


@dataclass(frozen=True)
class BatchStats:
    """What dynamic batching did (``open(batch=...)``)."""

    size: int            #: most rows per call
    batches: int         #: calls of the first stage
    items: int           #: items they carried
    #: calls per batch size, as (size, calls), smallest first
    sizes: tuple[tuple[int, int], ...]
    fallbacks: int       #: batched calls that failed and were re-run item by item
    wait_mean: float     #: mean seconds an item waited, from admission, for its call

    @property
    def fill(self) -> float:
        """Mean items per call as a fraction of ``size``."""
        return self.items / (self.batches * self.size) if self.batches else 0.0


@dataclass(frozen=True)
class StageStats:
    name: str
    kind: str            #: "blocking" (run on worker threads) or "device" (runtime completes)
    workers: int         #: worker threads (replicas) of this stage
    queue_depth: int     #: items waiting in front of this stage
    busy: float          #: fraction of wall time the stage was working (mean over its workers)
    calls: int           #: items this stage finished
    in_device: int       #: device stages: items on the device right now


@dataclass(frozen=True, repr=False)
class RunnerStats:
    """A snapshot of a runner. ``print(stats)`` (and ``repr``) shows it on a few labelled
    lines; every number is also a field, for programs."""

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
    #: every successful item since open: (upper bound, cumulative count) per bucket, the
    #: last bound being +inf; and the sum of their latencies (what Prometheus exports)
    latency_buckets: tuple[tuple[float, int], ...] = ()
    latency_sum: float = 0.0
    #: completions a device reported twice for one item (ignored)
    duplicates: int = 0
    #: seconds from admission until a worker took the item (time queued), recent items
    queue_p50: float = 0.0
    queue_p99: float = 0.0
    #: seconds in stage calls / on the device, recent items
    device_p50: float = 0.0
    device_p99: float = 0.0
    #: health state: starting, ready, recovering, broken or closed
    state: str = "ready"
    restarts: int = 0    #: successful recoveries from fatal failures
    retried: int = 0     #: items re-run after a device failure
    #: recovery times so far, as cumulative (upper bound, count) buckets, and their sum
    recovery_buckets: tuple[tuple[float, int], ...] = ()
    recovery_sum: float = 0.0
    warmup_seconds: float = 0.0  #: time the warm-up inferences took at open
    #: seconds spent in each lifecycle state since the runner was made
    state_seconds: dict[str, float] | None = None
    #: dynamic batching, when the runner was opened with ``batch=``
    batching: BatchStats | None = None

    @property
    def throughput(self) -> float:
        """Completed items per second since the runner opened."""
        return self.completed / self.elapsed if self.elapsed else 0.0

    def __repr__(self) -> str:
        return "\n".join(_runner_lines(self))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _runner_lines(s: RunnerStats) -> list[str]:
    """The labelled lines of ``repr(RunnerStats)``: one topic a line, then a line per stage
    and per stream."""
    lines = [
        f"RunnerStats({s.name!r}, state={s.state!r}, open {s.elapsed:.3g} s, "
        f"{s.throughput:.4g} items/s)",
        f"  items     pushed {s.pushed}, completed {s.completed}, failed {s.failed}, "
        f"withdrawn {s.withdrawn}, discarded {s.discarded}"
        + (f", duplicates {s.duplicates}" if s.duplicates else ""),
        f"  capacity  in flight {s.in_flight}/{s.maxsize} (peak {s.peak_admitted}), "
        f"waiting {s.waiting}",
        f"  latency   p50 {_ms(s.latency_p50)}, p99 {_ms(s.latency_p99)} (admission to "
        f"result)",
        f"    queued  p50 {_ms(s.queue_p50)}, p99 {_ms(s.queue_p99)}; on the device p50 "
        f"{_ms(s.device_p50)}, p99 {_ms(s.device_p99)}",
    ]
    if s.restarts or s.retried or s.warmup_seconds:
        lines.append(f"  recovery  restarts {s.restarts}, retried {s.retried}, warm-up "
                     f"{s.warmup_seconds:.3g} s")
    if s.batching is not None:
        b = s.batching
        lines.append(f"  batching  size {b.size}, {b.batches} calls for {b.items} items "
                     f"(fill {b.fill:.0%}), fallbacks {b.fallbacks}, wait {_ms(b.wait_mean)}")
    for stage in s.stages:
        lines.append(f"  stage     {stage.name!r} ({stage.kind}, {stage.workers} worker"
                     f"{'s' if stage.workers != 1 else ''}): busy {stage.busy:.0%}, "
                     f"queue {stage.queue_depth}, calls {stage.calls}"
                     + (f", on the device {stage.in_device}" if stage.kind == "device" else ""))
    for stream in s.streams:
        lines.append(f"  stream    {stream.key!r}: pushed {stream.pushed}, completed "
                     f"{stream.completed}, failed {stream.failed}, in flight "
                     f"{stream.in_flight}/{stream.maxsize}, waiting {stream.waiting}, p50 "
                     f"{_ms(stream.latency_p50)}")
    if s.profile:
        lines.append(f"  profile   {len(s.profile)} entries (see .profile)")
    return lines


class LatencyHistogram:
    """Counts of all latencies since open, per bucket (cheap enough for every item)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def add_many(self, values: list[float]) -> None:
        """:meth:`add` of each (a burst of completions: one call, not one per item)."""
        counts, bounds = self.counts, self.bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1
        self.sum += sum(values)

    def add_repeated(self, value: float, count: int) -> None:
        """:meth:`add` of ``value``, ``count`` times (the items of a streamed chunk)."""
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        total, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append((bound, total))
        return tuple(out)


class LatencyWindow:
    """The most recent latencies (a bounded window, so memory stays flat)."""

    def __init__(self, size: int = 4096):
        self._values: deque[float] = deque(maxlen=size)
        self.add = self._values.append
        self.add_many = self._values.extend

    def percentiles(self) -> tuple[float, float]:
        if not self._values:
            return 0.0, 0.0
        ordered = sorted(self._values)
        last = len(ordered) - 1
        return ordered[round(0.50 * last)], ordered[round(0.99 * last)]
