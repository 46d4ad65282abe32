"""What the status page and ``/v1/status`` show: one JSON-ready snapshot of every model.

Per model: its health state, items/s now (over the last one to two sampling intervals, never
the average since open), in flight vs maxsize, latency percentiles (every ``*_p50`` /
``*_p99`` field the runner's stats have, so splits such as queue vs device time appear when
the core adds them), per-stage busy fraction, per-stream counters, and the recent history of
throughput and latency the page draws. The numbers are the same ``runner.stats()`` that
``/metrics`` exports.

The history is sampled by the server (:meth:`StatusHistory.sampling`, in the app's lifespan)
whether or not a page is open, so a page opened now draws the last minutes at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ..runner import Runner

__all__ = ["HEALTHY", "StatusFeed", "StatusHistory", "model_restarts", "model_state"]

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


class Sample(NamedTuple):
    """One model at one sampling instant."""

    at: float             #: time.monotonic()
    wall: float           #: time.time(), for the page's time axis
    completed: int
    items_per_s: float    #: completions since the previous sample, per second
    p50_ms: float | None  #: recent latency percentiles; None when nothing completed since
    p99_ms: float | None


class StatusHistory:
    """The last ``points`` samples of every model, one per ``interval`` seconds.

    :meth:`sample` takes one (the :meth:`sampling` task calls it every ``interval``);
    :meth:`rate` is the current items/s of a model: its completions since the newest sample at
    least ``interval`` old (else the oldest one), so it reflects the last one to two intervals.
    Memory is bounded: ``points`` samples per model.
    """

    def __init__(self, runners: Mapping[str, Runner], *, interval: float = 1.0,
                 points: int = 120, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        if interval <= 0 or points < 2:
            raise ValueError(f"StatusHistory needs interval > 0 and points >= 2, got "
                             f"interval={interval!r}, points={points!r}")
        self.runners = runners
        self.interval = interval
        self.points = points
        self._clock = clock
        self._wall = wall
        self._samples: dict[str, deque[Sample]] = {}

    def sample(self) -> None:
        now, wall = self._clock(), self._wall()
        for name, runner in self.runners.items():
            stats = runner.stats()
            samples = self._samples.setdefault(name, deque(maxlen=self.points))
            previous = samples[-1] if samples else None
            done = stats.completed - previous.completed if previous else 0
            rate = done / (now - previous.at) if previous and now > previous.at else 0.0
            # the runner's percentiles cover its recent items: a quiet interval has none new
            fresh = done > 0 or (previous is None and stats.completed > 0)
            p50, p99 = ((round(stats.latency_p50 * 1e3, 3), round(stats.latency_p99 * 1e3, 3))
                        if fresh else (None, None))
            samples.append(Sample(now, wall, stats.completed, rate, p50, p99))

    def rate(self, name: str, completed: int, now: float | None = None) -> float:
        """Items/s of ``name`` now, given its completed count now (0.0 before any sample)."""
        now = self._clock() if now is None else now
        samples = self._samples.get(name)
        if not samples:
            return 0.0
        ref = next((s for s in reversed(samples) if now - s.at >= self.interval), samples[0])
        return (completed - ref.completed) / (now - ref.at) if now > ref.at else 0.0

    def series(self, name: str) -> dict[str, list[Any]]:
        """The samples of ``name`` as columns: ``t`` (epoch seconds), ``items_per_s``,
        ``p50_ms``, ``p99_ms`` (None where nothing completed)."""
        samples = self._samples.get(name, ())
        return {"t": [round(s.wall, 2) for s in samples],
                "items_per_s": [round(s.items_per_s, 1) for s in samples],
                "p50_ms": [s.p50_ms for s in samples],
                "p99_ms": [s.p99_ms for s in samples]}

    @asynccontextmanager
    async def sampling(self) -> AsyncIterator[StatusHistory]:
        """Sample now and every ``interval`` while the block runs (the app's lifespan)."""
        async def every_interval() -> None:
            while True:
                self.sample()
                await asyncio.sleep(self.interval)

        task = asyncio.create_task(every_interval(), name="aioaccel-status-history")
        try:
            yield self
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task


class StatusFeed:
    """Snapshots of every model, with items/s now and the history from ``history``.

    Without a ``history`` (one sampled by the server), the feed keeps its own, sampled at each
    snapshot: its first snapshot then says 0.0 items/s (there is no "now" yet), never the
    average since open.
    """

    def __init__(self, runners: Mapping[str, Runner], history: StatusHistory | None = None):
        self.runners = runners
        self._own = history is None
        self.history = history if history is not None else StatusHistory(runners)

    def snapshot(self) -> dict[str, Any]:
        models = {}
        for name, runner in self.runners.items():
            stats = runner.stats()
            rate = self.history.rate(name, stats.completed)
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
                "history": self.history.series(name),
            }
        if self._own:
            self.history.sample()
        return {"time": time.time(), "interval": self.history.interval, "models": models}
