"""Admission: one capacity bound (``maxsize``) shared by lanes, handed over fairly.

Everything here runs on the event loop, has no threads and no I/O, and is tested on its own.

* ``admitted`` counts slots held: items admitted and not yet consumed, plus slots handed to a
  waiting ``push`` that has not resumed yet. It never exceeds ``maxsize``; a lane never holds
  more than its ``cap``.
* Slots are handed over, never grabbed: a freed slot goes straight to a chosen waiter (counted
  for it at once), so a newcomer cannot overtake the queue, a cancelled waiter leaves no trace,
  and a woken-but-cancelled waiter passes its slot on.
* Who gets a freed slot: among lanes with waiters that may take one (below their cap, and not
  eating into another lane's reserve), the highest ``priority`` class first; within a class,
  weighted fair shares (the lane with the least virtual time, which grows by ``1 / weight``
  per slot, so weights 3:1 get 3:1 of the slots; equal weights take turns); FIFO within a lane.
* ``reserve``: slots kept free for a lane while it holds fewer than that, so a critical stream
  is admitted at once even when a burst arrived first and holds everything else.

Invariant: while a slot is free, every waiter left is in a lane that may not take it (at its
cap, or only reserved slots are free).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .records import Lane

if TYPE_CHECKING:
    from .async_library import Waiter

__all__ = ["Admission"]

#: virtual time past which the clock is shifted back to 0 (:meth:`Admission._rebase`)
_REBASE_AT = 1e6


class Admission:
    """The capacity bound over every lane of a runner (internal; loop-side only)."""

    __slots__ = ("_lanes", "_unused_reserve", "_vclock", "admitted", "maxsize", "peak",
                 "reserved", "ring")

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self.admitted = 0
        self.peak = 0
        self.reserved = 0          #: sum of every lane's reserve (0: the plain fast path holds)
        self._unused_reserve = 0   # sum over lanes of reserve slots they do not hold yet
        self._vclock = 0.0         # virtual time of the last slot handed over
        self._lanes: dict[Lane, None] = {}  # every lane with a virtual time (for _rebase)
        #: lanes with waiters, in the order they started waiting (ties go to the oldest)
        self.ring: dict[Lane, None] = {}

    # ---- lanes ------------------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        """Occupancy, as :class:`~aioaccel.RunnerStats` fields."""
        return {"in_flight": self.admitted, "peak_admitted": self.peak, "waiting": self.waiting}

    def add_lane(self, lane: Lane) -> None:
        self._lanes[lane] = None
        if lane.reserve:
            if self.reserved + lane.reserve >= self.maxsize:
                # at least one slot stays for everyone without a reserve (plain push and
                # infer, streams without one): reserving it all would starve them
                del self._lanes[lane]
                raise ValueError(
                    f"reserve={lane.reserve} for stream {lane.key!r} does not fit: "
                    f"{self.reserved} of maxsize={self.maxsize} slots are already reserved, "
                    f"and reserves may take at most {self.maxsize - 1} in all (one slot stays "
                    f"for streams without a reserve)")
            self.reserved += lane.reserve
            self._unused_reserve += lane.unused_reserve()

    def drop_reserve(self, lane: Lane) -> None:
        """``lane`` gives its reserve up (it is closed or dropped: it cannot push any more),
        so the slots kept for it go back to everyone at once."""
        if lane.reserve:
            self.reserved -= lane.reserve
            self._unused_reserve -= lane.unused_reserve()
            lane.reserve = 0
            if self.ring:
                self.dispatch()

    def remove_lane(self, lane: Lane) -> None:
        self.drop_reserve(lane)
        self.ring.pop(lane, None)
        self._lanes.pop(lane, None)

    # ---- taking and freeing slots -----------------------------------------------------------
    def may_take(self, lane: Lane) -> bool:
        """Whether ``lane`` may take a slot now (ignoring who is waiting)."""
        free = self.maxsize - self.admitted
        if free <= 0 or lane.admitted >= lane.cap:
            return False
        if not self._unused_reserve:
            return True
        return free - (self._unused_reserve - lane.unused_reserve()) >= 1

    def take(self, lane: Lane) -> None:
        if lane.reserve:
            before = lane.unused_reserve()
            lane.admitted += 1
            self._unused_reserve += lane.unused_reserve() - before
        else:
            lane.admitted += 1
        self.admitted += 1
        if self.admitted > self.peak:
            self.peak = self.admitted

    def try_take(self, lane: Lane) -> bool:
        """Take a slot for ``lane`` if one is free and nobody of that lane waits before it."""
        if not lane.waiters and self.may_take(lane):
            self.take(lane)
            return True
        return False

    def take_many(self, lane: Lane, want: int) -> int:
        """Take up to ``want`` slots for ``lane`` at once, as many as are free for it now and
        none while somebody of that lane waits before it; returns how many (bulk admission)."""
        if lane.waiters:
            return 0
        if self._unused_reserve or lane.reserve:  # reserves: slot by slot, as try_take does
            taken = 0
            while taken < want and self.may_take(lane):
                self.take(lane)
                taken += 1
            return taken
        free = min(self.maxsize - self.admitted, lane.cap - lane.admitted, want)
        if free <= 0:
            return 0
        lane.admitted += free
        self.admitted += free
        if self.admitted > self.peak:
            self.peak = self.admitted
        return free

    def release_many(self, lane: Lane, count: int) -> None:
        """``lane`` gives ``count`` slots back at once."""
        if count <= 0:
            return
        if lane.reserve:
            before = lane.unused_reserve()
            lane.admitted -= count
            self._unused_reserve += lane.unused_reserve() - before
        else:
            lane.admitted -= count
        self.admitted -= count
        if self.ring:
            self.dispatch()

    def release(self, lane: Lane) -> None:
        """``lane`` gives a slot back (its item was consumed, withdrawn or failed)."""
        if lane.reserve:
            before = lane.unused_reserve()
            lane.admitted -= 1
            self._unused_reserve += lane.unused_reserve() - before
        else:
            lane.admitted -= 1
        self.admitted -= 1
        if self.ring:
            self.dispatch()

    async def wait(self, lane: Lane, new_future: Callable[[], Waiter[None]] | Any) -> None:
        """Wait until a slot is handed to ``lane`` (already counted when this returns).
        ``new_future`` makes the running library's waiter (``loop.create_future``; an asyncio
        loop itself is taken too). Cancelled, it leaves no trace: a slot handed over
        meanwhile is passed on."""
        fut = getattr(new_future, "create_future", new_future)()
        if not lane.waiters:
            lane.vtime = max(lane.vtime, self._vclock)  # no credit for the time it was idle
            self._lanes.setdefault(lane)
        lane.waiters.append(fut)
        self.ring.setdefault(lane)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(lane)  # handed a slot but cancelled before resuming: pass it on
            else:
                try:
                    lane.waiters.remove(fut)
                except ValueError:
                    pass
                if not lane.waiters:
                    self.ring.pop(lane, None)
            raise

    def dispatch(self) -> None:
        """Hand free slots to waiters: priority class, then weighted fair share, then FIFO."""
        ring = self.ring
        while self.admitted < self.maxsize and ring:
            best: Lane | None = None
            for lane in ring:
                if not self.may_take(lane):
                    continue
                if (best is None or lane.priority > best.priority
                        or (lane.priority == best.priority and lane.vtime < best.vtime)):
                    best = lane
            if best is None:
                return  # every waiting lane is at its cap or would eat another's reserve
            fut = best.waiters.popleft()
            del ring[best]
            if best.waiters:
                ring[best] = None  # to the back: equal virtual times take turns
            if fut.done():  # cancelled; its task has not run its clean-up yet
                continue
            self._vclock = best.vtime
            best.vtime += 1.0 / best.weight
            if self._vclock > _REBASE_AT:
                self._rebase()
            self.take(best)
            fut.set_result(None)

    def _rebase(self) -> None:
        """Shift every virtual time back by the clock's: only their differences matter, and
        left to grow (a weight of 1e-9 adds 1e9 per slot) they would reach magnitudes where
        adding ``1 / weight`` rounds away, and every later weighting with it."""
        shift = self._vclock
        for lane in self._lanes:
            lane.vtime -= shift
        self._vclock = 0.0

    def fail_waiters(self, lanes: Iterable[Lane], make_error: Callable[[], BaseException]) -> None:
        """Every waiting ``push`` of ``lanes`` raises ``make_error()``."""
        for lane in lanes:
            self.ring.pop(lane, None)
            waiters, lane.waiters = lane.waiters, type(lane.waiters)()
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(make_error())

    @property
    def waiting(self) -> int:
        return sum(len(lane.waiters) for lane in self.ring)
