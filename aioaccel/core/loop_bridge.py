"""Worker threads -> event loop, with one loop wake-up per burst of results.

A wake-up (``call_soon_threadsafe``) costs a self-pipe write and a loop iteration; done per job
it caps the default loop near 90k items/s. Here workers append finished jobs to a deque and
schedule a drain only when none is pending, so a burst of completions costs one wake-up.

When the loop is quick, bursts are short: with ~30 us work items the loop drains every single
result, and each wake-up holds the GIL the worker needs back. So a worker that has just
finished a *short* call and still has more than a quarter of the window of input queued
(see :func:`~aioaccel.core.stage_threads.defer_depth`) may ``defer`` the wake-up: its next
completion comes within microseconds. Deferral is bounded by ``COALESCE_WINDOW`` from the
oldest undelivered job, and a worker about to block on an empty queue calls
:meth:`Bridge.flush` first, so a deferred result never waits for input that may not come.
Those two bounds are checked by the worker, so they hold only if its *next* call is short; a
next call that is slow (or hangs) would hold the deferred results with it. So while workers
defer, a loop-side timer (``HOLD_LIMIT``, re-armed while results keep coming, stopped once
the bridge is idle) drains what was held: no result waits longer than that, whatever the
worker does next. The worker arms it (one wake-up) only when it defers while no timer runs.

Race analysis: the drain clears ``_scheduled`` *before* it empties the deque, so a job
appended after the flag was cleared either is taken by this drain or schedules the next one;
an extra drain is harmless. A deferred job is always followed, from the worker that deferred
it, by another delivery or by a flush before that worker waits, or else by the timer: the
timer's check clears ``_armed`` *before* it looks at the deque, and a deferring worker reads
``_armed`` *after* its append, so a job the check did not see arms a new timer.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .jobs import Job, Worker

__all__ = ["COALESCE_WINDOW", "HOLD_LIMIT", "SHORT_CALL", "Bridge", "Receiver"]

log = logging.getLogger("aioaccel")

#: longest a deferred result waits for the next wake-up (seconds)
COALESCE_WINDOW = 500e-6
#: calls shorter than this may defer their wake-up (longer ones amortise it anyway)
SHORT_CALL = 50e-6
#: longest a deferred result waits whatever the worker's next call does (the loop's timer)
HOLD_LIMIT = 2e-3


class Receiver(Protocol):
    """What the bridge calls on the loop (the runner)."""

    def on_jobs(self, jobs: list[Job]) -> None: ...
    def on_ready(self, worker: Worker, error: BaseException | None) -> None: ...
    def on_worker_exit(self, worker: Worker) -> None: ...
    def on_fatal(self, error: BaseException, stage: str) -> None: ...


class Bridge:
    """Carries finished jobs and rare signals (ready, exit, fatal) to a receiver on the loop.

    The receiver is held weakly, so that worker threads (which hold the bridge) do not keep an
    abandoned runner alive: it must be collectable to warn and stop its threads.
    """

    def __init__(self, wake: Callable[..., Any], receiver: Receiver,
                 call_later: Callable[..., Any] | None = None):
        #: ``call_soon_threadsafe`` of the running library (asyncio's loop method itself, or
        #: trio's ``TrioToken.run_sync_soon``: see :mod:`aioaccel.core.async_library`)
        self._wake = wake
        self._jobs: deque[Any] = deque()
        self._scheduled = False
        self._oldest = 0.0  # completion time of the oldest deferred job, 0 if none
        self._receiver: Callable[[], Receiver | None] = weakref.ref(receiver)
        self._detached = False
        #: the loop's ``call_later`` (None: no timer; deferral is bounded by the worker only)
        self._call_later = call_later
        self._armed = call_later is None  # a hold timer runs (or is being started)
        self._drains = 0       # drains run so far (the timer's measure of activity)
        self._drains_seen = 0  # ... as of the timer's last check

    def detach(self) -> None:
        """Drop the jobs and fatal errors that arrive from now on (the pipeline behind it was
        replaced); its workers' exits still arrive, so stopping it can wait for them."""
        self._detached = True

    # ---- called from any thread ---------------------------------------------------------
    def deliver(self, job: Any, now: float = 0.0, defer: bool = False) -> None:
        """Hand one finished job to the loop. ``defer`` (with ``now``, the completion time)
        lets the wake-up wait for the next delivery, within ``COALESCE_WINDOW``."""
        self._jobs.append(job)
        if self._scheduled:
            return
        if defer:
            oldest = self._oldest or now
            if now - oldest < COALESCE_WINDOW:
                self._oldest = oldest
                if not self._armed:  # read after the append (see the race analysis)
                    self._armed = True
                    self.call_soon(self._arm)
                return
        self._oldest = 0.0
        self._scheduled = True
        self.call_soon(self._drain)

    def deliver_many(self, jobs: list[Any], now: float = 0.0, defer: bool = False) -> None:
        """Hand several finished jobs to the loop at once (a batch's members): one append
        of the lot and at most one wake-up, as :meth:`deliver` of each with ``defer`` for
        all but the last would give."""
        self._jobs.extend(jobs)
        if self._scheduled:
            return
        if defer:
            oldest = self._oldest or now
            if now - oldest < COALESCE_WINDOW:
                self._oldest = oldest
                if not self._armed:  # read after the append (see the race analysis)
                    self._armed = True
                    self.call_soon(self._arm)
                return
        self._oldest = 0.0
        self._scheduled = True
        self.call_soon(self._drain)

    def flush(self) -> None:
        """Schedule the drain of deferred jobs now (a worker is about to wait)."""
        if self._jobs and not self._scheduled:
            self._oldest = 0.0
            self._scheduled = True
            self.call_soon(self._drain)

    def ready(self, worker: Worker, error: BaseException | None) -> None:
        self.call_soon(self._ready, worker, error)

    def exited(self, worker: Worker) -> None:
        self.call_soon(self._exited, worker)

    def fatal(self, error: BaseException, stage: str) -> None:
        self.call_soon(self._fatal, error, stage)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback`` on the loop; a closed loop is ignored (nobody is left to tell)."""
        try:
            self._wake(callback, *args)
        except RuntimeError:
            pass

    # ---- on the loop --------------------------------------------------------------------
    def _ready(self, worker: Worker, error: BaseException | None) -> None:
        receiver = self._receiver()
        if receiver is not None:
            receiver.on_ready(worker, error)

    def _exited(self, worker: Worker) -> None:
        receiver = self._receiver()
        if receiver is not None:
            receiver.on_worker_exit(worker)

    def _fatal(self, error: BaseException, stage: str) -> None:
        receiver = self._receiver()
        if receiver is not None and not self._detached:
            if self._jobs:  # results a worker deferred finished before the fault: deliver
                self._oldest = 0.0  # them first, or the fault would fail them as unfinished
                self._drain()
            receiver.on_fatal(error, stage)

    def _arm(self) -> None:
        assert self._call_later is not None
        try:
            self._call_later(HOLD_LIMIT, self._check)
        except RuntimeError:  # the loop is closing: nobody is left to deliver to
            pass

    def _check(self) -> None:
        """The hold timer: drain what workers deferred if no drain is on its way; run again
        while results keep coming, stop once the bridge has been idle for a whole period."""
        self._armed = False  # before looking: a job appended from now on arms a new timer
        active = self._drains != self._drains_seen
        if self._jobs and not self._scheduled:
            self._oldest = 0.0
            self._drain()
            active = True
        self._drains_seen = self._drains
        if active or self._jobs:
            self._armed = True
            self._arm()

    def _drain(self) -> None:
        self._drains += 1
        self._scheduled = False
        jobs = []
        pop = self._jobs.popleft
        while True:
            try:
                jobs.append(pop())
            except IndexError:
                break
        receiver = self._receiver()
        if receiver is not None and jobs and not self._detached:
            receiver.on_jobs(jobs)
