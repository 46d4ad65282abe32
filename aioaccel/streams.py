"""Multi-stream fan-in: many producers (cameras) sharing one runner, each with its own order.

``runner.stream(key)`` returns a :class:`Stream`: its own ``push`` and its own ``async for``,
which yields that stream's results in that stream's push order. All streams share the
runner's capacity (``maxsize``) and its stages.

Fairness: when the runner is full, freed slots go round-robin to the streams that are waiting
(FIFO within a stream), so a stream that floods cannot starve the others: each waiting stream
gets a slot at least once per rotation. A slot stays taken until its result is consumed; so
that one stream's slow consumer cannot hold the whole runner, give the stream a ``maxsize`` of
its own (``runner.stream(key, maxsize=2)``).

Internally every runner has a default lane (plain ``runner.push`` / ``infer`` / ``async for``);
a stream is one more lane.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .stats import LatencyWindow

if TYPE_CHECKING:
    from .pipeline import Item
    from .runner import Result, Runner

__all__ = ["Stream", "StreamStats"]


class Lane:
    """Admission and ordering state of one stream (internal; touched only on the loop)."""

    __slots__ = (
        "admitted",
        "cap",
        "closed",
        "completed",
        "consumers",
        "failed",
        "index",
        "items",
        "key",
        "latency",
        "pushed",
        "waiters",
    )

    def __init__(self, key: Any, index: int, cap: int):
        self.key = key
        self.index = index            #: small int, unique among open lanes (device stream id)
        self.cap = cap                #: most items this lane may hold admitted
        self.items: deque[Item] = deque()          # pushed items in push order
        self.consumers: list[asyncio.Future[None]] = []
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.admitted = 0
        self.closed = False
        self.pushed = self.completed = self.failed = 0
        self.latency = LatencyWindow(1024)

    def wake(self) -> None:
        consumers, self.consumers = self.consumers, []
        for fut in consumers:
            if not fut.done():
                fut.set_result(None)

    def snapshot(self) -> StreamStats:
        p50, p99 = self.latency.percentiles()
        return StreamStats(key=self.key, index=self.index, pushed=self.pushed,
                           completed=self.completed, failed=self.failed,
                           in_flight=self.admitted, waiting=len(self.waiters), maxsize=self.cap,
                           latency_p50=p50, latency_p99=p99)


@dataclass(frozen=True)
class StreamStats:
    key: Any
    index: int
    pushed: int
    completed: int
    failed: int
    in_flight: int       #: admitted and not yet consumed
    waiting: int         #: pushes of this stream waiting for space
    maxsize: int
    latency_p50: float
    latency_p99: float


class Stream:
    """One producer's view of a shared runner. Get it with ``runner.stream(key)``.

    ``push`` / ``push_nowait`` admit inputs for this stream; ``async for`` yields this stream's
    results (:class:`~aioaccel.Result`) in its push order; ``close()`` ends this stream only.
    ``async with runner.stream(key) as s:`` closes it on exit.
    """

    __slots__ = ("_lane", "_runner")

    def __init__(self, runner: Runner, lane: Lane):
        self._runner = runner
        self._lane = lane

    @property
    def key(self) -> Any:
        return self._lane.key

    @property
    def index(self) -> int:
        """A small integer, unique among the runner's open streams (MemryX ``stream_idx``)."""
        return self._lane.index

    @property
    def closed(self) -> bool:
        return self._lane.closed

    async def push(self, inputs: Any, *, tag: Any = None) -> int:
        """Admit one input for this stream; waits for this stream's fair share of space."""
        return await self._runner._push_lane(self._lane, inputs, tag)

    def push_nowait(self, inputs: Any, *, tag: Any = None) -> int:
        """Like :meth:`push`, but raise :class:`~aioaccel.WouldBlock` instead of waiting."""
        return self._runner._push_lane_nowait(self._lane, inputs, tag)

    def close(self) -> None:
        """No more input on this stream; its ``async for`` ends after its last result."""
        self._runner._close_lane(self._lane)

    def stats(self) -> StreamStats:
        return self._lane.snapshot()

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Result:
        return await self._runner._next(self._lane)

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        lane = self._lane
        return (f"<Stream {lane.key!r} of {self._runner.name!r} "
                f"{'closed' if lane.closed else 'open'} in_flight={lane.admitted}/{lane.cap}>")
