"""The loop-side records: a :class:`Lane` per producer, a :class:`Ticket` per admitted item.

A lane: one producer's share of a runner (the default lane, or one per stream).

A lane has two halves, both touched only on the event loop:

* its admission share -- ``admitted`` (slots it holds), ``cap``, ``reserve``, ``weight``,
  ``priority`` and the ``push`` calls waiting for a slot (see :mod:`aioaccel.core.admission`);
* its ordered outbox -- ``tickets`` in push order; the consumer (``async for``) takes the head
  once it is done, which is the whole re-ordering: completions may arrive in any order.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from ..stats import LatencyWindow, StreamStats

if TYPE_CHECKING:
    from ..errors import AccelError, InferenceError
    from .async_library import Waiter
    from .jobs import Job

__all__ = ["Lane", "Outcome", "Ticket"]


class Outcome(Protocol):
    """Where a settled ``infer``-style item goes: a waiter of the hub (an ``asyncio.Future``
    or a :class:`~aioaccel.core.async_library.TrioFuture`), or one item's place
    in an ``infer_many`` call (:class:`aioaccel.core.bulk.Slot`)."""

    def done(self) -> bool: ...
    def cancelled(self) -> bool: ...
    def set_result(self, value: Any, /) -> None: ...
    def set_exception(self, error: BaseException, /) -> None: ...


class Lane:
    """Admission share and ordered outbox of one stream (internal)."""

    __slots__ = (
        "admitted",
        "cap",
        "closed",
        "completed",
        "consumers",
        "failed",
        "failure",
        "handle",
        "index",
        "key",
        "latency",
        "priority",
        "pushed",
        "reserve",
        "tickets",
        "vtime",
        "waiters",
        "weight",
    )

    def __init__(self, key: Any, index: int, cap: int, *, weight: float = 1.0,
                 priority: int = 0, reserve: int = 0):
        self.key = key
        self.index = index            #: small int, unique among open lanes (device stream id)
        self.cap = cap                #: most slots this lane may hold
        self.weight = weight          #: share of freed slots within its priority class
        self.priority = priority      #: a higher class is always served first
        self.reserve = reserve        #: slots kept free for this lane alone
        self.vtime = 0.0              #: weighted-fair virtual time (admission's bookkeeping)
        self.admitted = 0             #: slots held: admitted and not consumed (or released)
        self.waiters: deque[Waiter[None]] = deque()
        self.tickets: deque[Ticket] = deque()      # pushed items, in push order
        self.consumers: list[Waiter[None]] = []
        self.closed = False
        #: set when items of this lane had to be failed (a close that could not drain): its
        #: consumer gets it after the finished results
        self.failure: AccelError | None = None
        #: the Stream users hold (weakly): when it is collected an idle lane is reclaimed
        self.handle: weakref.ref[Any] | None = None  # of a Stream (this module is a leaf)
        self.pushed = self.completed = self.failed = 0
        self.latency = LatencyWindow(1024)

    def unused_reserve(self) -> int:
        return self.reserve - self.admitted if self.admitted < self.reserve else 0

    @property
    def orphaned(self) -> bool:
        """A stream whose every handle was dropped: nobody can push to it any more."""
        return self.handle is not None and self.handle() is None

    def idle(self) -> bool:
        return not self.tickets and not self.admitted and not self.waiters

    def wake(self) -> None:
        """Wake the consumers waiting on this outbox."""
        consumers, self.consumers = self.consumers, []
        for fut in consumers:
            if not fut.done():
                fut.set_result(None)

    def snapshot(self) -> StreamStats:
        p50, p99 = self.latency.percentiles()
        return StreamStats(key=self.key, index=self.index, pushed=self.pushed,
                           completed=self.completed, failed=self.failed,
                           in_flight=self.admitted, waiting=len(self.waiters), maxsize=self.cap,
                           latency_p50=p50, latency_p99=p99, weight=self.weight,
                           priority=self.priority, reserve=self.reserve)


class Ticket:
    """The loop-side half of one admitted item (only ever touched on the loop)."""

    __slots__ = (
        "done",
        "error",
        "future",
        "gen",
        "inputs",
        "job",
        "lane",
        "released",
        "retries",
        "seq",
        "t_admit",
        "tag",
        "withdrawn",
    )

    #: items it stands for, and how many of them were consumed: one and none, but for a
    #: streamed chunk (:class:`~aioaccel.core.streamed_chunk.ChunkTicket`)
    count = 1
    taken = 0

    def __init__(self, seq: int, tag: Any, lane: Lane, future: Outcome | None,
                 job: Job, t_admit: float):
        self.seq = seq
        self.tag = tag
        self.lane = lane
        self.future = future          # infer(): resolved with the outputs; None for streams
        self.job = job                # the thread-side half (the loop reads it once delivered)
        self.t_admit = t_admit
        self.done = False             # streamed: its result is ready in the lane's outbox
        self.error: InferenceError | None = None
        self.withdrawn = False        # infer() gave up before a worker took it
        self.released = False         # its slot was freed before it was consumed
        self.retries = 0              # times re-run after a device failure
        self.gen: Any = None          # the generation (model + pipeline) it was submitted to
        self.inputs: Any = None       # kept only when it may be re-run (retries > 0)
