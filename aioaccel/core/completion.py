"""Completion routing and failure fan-out (loop side).

Each admitted item has a :class:`~aioaccel.core.records.Ticket` on the loop (seq, tag, lane,
future) and a :class:`~aioaccel.core.jobs.Job` on the threads (inputs, outputs, error, timing).
When the bridge hands finished jobs over, :meth:`Completions.on_jobs` finds each job's ticket
by seq and settles it: an ``infer`` future gets its value or error and frees its slot at once;
a streamed item is marked done in its lane's outbox and keeps its slot until ``async for``
consumes it.

A fatal failure or a close fails every unfinished ticket (:meth:`Completions.fail_pending`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from time import time
from typing import TYPE_CHECKING, Any

from ..errors import AccelError, InferenceError, copy_for_waiter, inference_error
from ..stats import LatencyHistogram, LatencyWindow
from .bulk import Slot
from .records import Lane, Ticket
from .streamed_chunk import ChunkTicket, settle_chunk

if TYPE_CHECKING:
    from .admission import Admission
    from .async_library import Waiter
    from .jobs import Job

__all__ = ["Completions", "Ticket"]  # Ticket: re-exported from .records

log = logging.getLogger("aioaccel")


class Completions:
    """Settles finished jobs, keeps the counters, fails what is pending on close or failure."""

    def __init__(self, admission: Admission, default_lane: Lane):
        self.admission = admission
        self.default_lane = default_lane
        self.unfinished: dict[int, Ticket] = {}   # seq -> ticket, admitted and not settled
        self.pushed = self.completed = self.failed = self.discarded = self.withdrawn = 0
        self.latency = LatencyWindow()            # admission -> completion
        self.queued = LatencyWindow()             # admission -> a worker took it
        self.working = LatencyWindow()            # time in stage calls / on the device
        self.histogram = LatencyHistogram()
        self.idle: Waiter[None] | None = None  # set when nothing is unfinished
        self.last_completion: float | None = None      # wall-clock time of the last result
        #: called with a stream's lane when a withdrawn item's shell gives its last slot back
        #: (the runner then forgets a closed stream with nothing left: its key is free again)
        self.on_lane_released: Callable[[Lane], None] | None = None

    # ---- settling ---------------------------------------------------------------------------
    def on_jobs(self, jobs: list[Job]) -> None:
        self.last_completion = time()
        unfinished = self.unfinished
        woken: set[Lane] = set()
        default = self.default_lane
        # the hot path's figures are gathered over the burst and added once at the end (one
        # call per figure per burst, not per item), and so are the slots it frees
        took: list[float] = []
        queued: list[float] = []
        working: list[float] = []
        freed = 0
        streamed = False
        for job in jobs:
            ticket = unfinished.pop(job.seq, None)
            if ticket is None or ticket.job is not job:
                continue  # already failed by close / a fatal error, or superseded by a retry
            fut = ticket.future
            if (fut is None and job.error is None and ticket.lane is default
                    and not ticket.withdrawn):
                # the common case of a streamed item, inlined: its result waits in the
                # default lane's outbox (which is never closed early nor orphaned)
                if type(ticket) is ChunkTicket:  # a run of push_many's items as one job
                    settle_chunk(self, ticket, job, woken)
                    continue
                took.append(job.t_done - ticket.t_admit)
                if job.t_start:
                    queued.append(job.t_start - ticket.t_admit)
                working.append(job.work)
                ticket.done = True
                streamed = True
                continue
            try:
                inline = (fut is not None and job.error is None and ticket.lane is default
                          and not ticket.withdrawn and not fut.done())
            except Exception:  # never lose the rest of the burst
                log.exception("aioaccel: settling item %s failed", job.seq)
                continue
            if inline and fut is not None:
                # the common case of an infer-style item, inlined (the loop's hot path)
                took.append(job.t_done - ticket.t_admit)
                if job.t_start:
                    queued.append(job.t_start - ticket.t_admit)
                working.append(job.work)
                try:
                    fut.set_result(job.value)
                except Exception:  # never lose the rest of the burst
                    log.exception("aioaccel: settling item %s failed", job.seq)
                freed += 1
                continue
            try:
                self._settle(ticket, job, woken)
            except Exception:  # never lose the rest of the burst
                log.exception("aioaccel: settling item %s failed", job.seq)
        if took:
            self.completed += len(took)
            self.latency.add_many(took)
            self.histogram.add_many(took)
            self.queued.add_many(queued)
            self.working.add_many(working)
        if freed:
            self.admission.release_many(default, freed)
        if streamed:
            woken.add(default)
        for lane in woken:
            if lane.tickets and lane.tickets[0].done:
                lane.wake()
        self.check_idle()

    def _settle(self, ticket: Ticket, job: Job, woken: set[Lane]) -> None:
        if type(ticket) is ChunkTicket:
            settle_chunk(self, ticket, job, woken)
            return
        lane = ticket.lane
        if ticket.withdrawn:  # the empty shell of a withdrawn infer: its slot is free now
            self.admission.release(lane)
            if lane is not self.default_lane and self.on_lane_released is not None:
                self.on_lane_released(lane)
            return
        if job.error is None:
            self.completed += 1
            latency = job.t_done - ticket.t_admit
            self.latency.add(latency)
            self.histogram.add(latency)
            if job.t_start:
                self.queued.add(job.t_start - ticket.t_admit)
            self.working.add(job.work)
            if lane is not self.default_lane:
                lane.completed += 1
                lane.latency.add(latency)
        else:
            self.failed += 1
            lane.failed += 1
            ticket.error = inference_error(job.error, seq=ticket.seq, tag=ticket.tag,
                                           stage=job.failed_stage)
        fut = ticket.future
        if fut is None:
            ticket.done = True
            woken.add(lane)
            if (lane.closed and lane is not self.default_lane) or lane.orphaned:
                self.free(ticket)
        else:
            if fut.done():
                self.discarded += 1  # its infer() was cancelled after the device took it
            elif ticket.error is not None:
                fut.set_exception(ticket.error)
            else:
                fut.set_result(job.value)
            self.admission.release(lane)

    def give_up(self, ticket: Ticket) -> None:
        """The ``infer`` waiting for ``ticket`` is gone (cancelled, timed out): withdraw the
        item if no worker took it yet, else mark its result as nobody's."""
        fut = ticket.future
        # an infer future (asyncio's or trio's; not an infer_many Slot) that has its result
        if (fut is not None and type(fut) is not Slot and fut.done()
                and not fut.cancelled()):
            fut.exception()  # type: ignore[attr-defined]  # retrieved: no "never retrieved" log
            self.discarded += 1  # it arrived, but nobody is left to take it
        elif (self.unfinished.get(ticket.seq) is ticket and ticket.gen is not None
              and ticket.gen.pipeline.withdraw(ticket.job)):
            # Its empty shell comes back when a worker reaches it and frees the slot then,
            # so the hand-off never holds more than maxsize jobs.
            ticket.withdrawn = True
            self.withdrawn += 1
        else:
            ticket.job.abandoned = True  # a device stage may cancel its remote work

    def counters(self) -> dict[str, Any]:
        """The item counters and latency figures, as :class:`~aioaccel.RunnerStats` fields."""
        p50, p99 = self.latency.percentiles()
        q50, q99 = self.queued.percentiles()
        w50, w99 = self.working.percentiles()
        return {"pushed": self.pushed, "completed": self.completed, "failed": self.failed,
                "discarded": self.discarded, "withdrawn": self.withdrawn,
                "latency_p50": p50, "latency_p99": p99, "queue_p50": q50, "queue_p99": q99,
                "device_p50": w50, "device_p99": w99,
                "latency_buckets": self.histogram.cumulative(), "latency_sum": self.histogram.sum}

    def free(self, ticket: Ticket) -> None:
        """Give back the slot of a streamed ticket, once: when it is consumed, or earlier when
        nobody can push behind it any more (its stream is closed or dropped: it cannot grow,
        so its finished results must not hold the runner's capacity)."""
        if not ticket.released:
            ticket.released = True
            if type(ticket) is ChunkTicket:  # the slots of the items not consumed yet
                self.admission.release_many(ticket.lane, ticket.count - ticket.taken)
            else:
                self.admission.release(ticket.lane)

    def check_idle(self) -> None:
        if not self.unfinished and self.idle is not None and not self.idle.done():
            self.idle.set_result(None)

    def fail_one(self, ticket: Ticket, failure: AccelError) -> None:
        """Fail one ticket that is no longer unfinished (a restart gave up on it): an infer
        caller gets a copy of ``failure``; a streamed item is yielded in its place with an
        InferenceError caused by it, and later items still flow."""
        self.failed += 1
        ticket.lane.failed += 1
        fut = ticket.future
        if fut is not None:
            if not fut.done():
                fut.set_exception(copy_for_waiter(failure))
            self.admission.release(ticket.lane)
            return
        error = InferenceError(f"item {ticket.seq} (tag={ticket.tag!r}) was on the device when "
                               f"it failed: {failure}", seq=ticket.seq, tag=ticket.tag)
        error.__cause__ = failure
        ticket.error = error
        ticket.done = True
        lane = ticket.lane
        if lane.tickets and lane.tickets[0].done:
            lane.wake()

    # ---- failure fan-out --------------------------------------------------------------------
    def fail_pending(self, failure: AccelError, lanes: list[Lane],
                     withdraw: Any = None) -> None:
        """Fail every unfinished ticket with (a copy of) ``failure``. A stream keeps its finished
        prefix (still delivered in order); everything after its first unfinished item is dropped
        and its consumer gets the failure when it reaches that point."""
        pending, self.unfinished = self.unfinished, {}
        for ticket in pending.values():
            if withdraw is not None:
                withdraw(ticket.job)
            if ticket.withdrawn:
                self.admission.release_many(ticket.lane, ticket.count)
                continue
            fut = ticket.future
            if fut is not None:
                if not fut.done():
                    fut.set_exception(copy_for_waiter(failure))
                self.admission.release(ticket.lane)
            self.failed += ticket.count  # items: a streamed chunk counts each of its own
            ticket.lane.failed += ticket.count
        for lane in lanes:
            tickets = lane.tickets
            kept: deque[Ticket] = deque()
            while tickets and tickets[0].done:
                kept.append(tickets.popleft())
            for ticket in tickets:
                if not ticket.released:
                    self.admission.release_many(lane, ticket.count - ticket.taken)
            if tickets:  # its consumer gets the failure after the finished prefix
                lane.failure = failure
            lane.tickets = kept
            lane.wake()
        self.check_idle()
