"""The runner's streams: made on first use, closed, withdrawn, reclaimed when idle.

``runner.stream(key)`` asks the table for the lane named ``key`` and gets a
:class:`~aioaccel.Stream` handle back. The table is the :class:`~aioaccel.streams.LaneOps` those
handles call: closing and withdrawing are its own; pushing and taking results are the runner's
front (admission and the outbox), handed to it at construction.

A stream's index (MemryX ``stream_idx``) is the smallest one free: indices of reclaimed streams
are reused. A lane whose every handle was dropped is reclaimed once it is idle; the weakref
callback that notices may run on any thread, so it hops to the loop first.
"""

from __future__ import annotations

import heapq
import math
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from ..errors import RunnerClosed
from ..streams import Stream
from . import bulk
from .records import Lane

if TYPE_CHECKING:
    from .admission import Admission
    from .async_library import Hub
    from .completion import Completions
    from .results import Result

__all__ = ["StreamTable"]


class StreamTable:
    def __init__(self, name: str, maxsize: int, admission: Admission, done: Completions,
                 default: Lane, owner: object, *,
                 push: Callable[[Lane, Any, Any], Awaitable[int]],
                 push_nowait: Callable[[Lane, Any, Any], int],
                 next: Callable[[Lane], Awaitable[Result]]):
        self.name = name
        self._maxsize = maxsize
        self._admission = admission
        self._done = done
        self.default = default
        # LaneOps: the runner's front does these. Held weakly (the runner holds this table);
        # each Stream handle holds the runner, so a runner lives as long as its streams.
        self._owner = weakref.ref(owner)
        self._push = weakref.WeakMethod(push)
        self._push_nowait = weakref.WeakMethod(push_nowait)
        self._next = weakref.WeakMethod(next)
        self.hub: Hub | None = None  # the running async library, set at open
        self._lanes: dict[Any, Lane] = {}
        self._free_indices: list[int] = []   # indices given back, smallest first
        self._next_index = 0
        #: called once a stream's priority differs from the default lane's (stage 0 then
        #: serves the highest priority first: see aioaccel.core.priority_levels)
        self.on_priority: Callable[[], None] | None = None

    # ---- making and finding -------------------------------------------------------------
    def find(self, key: Any, maxsize: int | None) -> Stream | None:
        """The handle of the existing stream ``key`` (a new handle if all were dropped)."""
        lane = self._lanes.get(key)
        if lane is None:
            return None
        if maxsize is not None and maxsize != lane.cap:
            raise ValueError(f"stream {key!r} already exists with maxsize={lane.cap}")
        handle = lane.handle() if lane.handle is not None else None
        return handle if handle is not None else self._new_handle(lane)

    def make(self, key: Any, *, maxsize: int | None, weight: float, priority: int,
             reserve: int, max_streams: int | None) -> Stream:
        cap = self._maxsize if maxsize is None else maxsize
        if not isinstance(cap, int) or isinstance(cap, bool) or not 1 <= cap <= self._maxsize:
            raise ValueError(f"a stream's maxsize must be an int from 1 to the runner's "
                             f"maxsize ({self._maxsize}), got {maxsize!r}")
        if (isinstance(weight, bool) or not isinstance(weight, (int, float))
                or not 0 < weight < math.inf or math.isinf(1.0 / weight)):
            # its share is 1 / weight per slot: both must be finite numbers
            raise ValueError(f"a stream's weight must be a finite number > 0 (and not so "
                             f"small that 1 / weight overflows), got {weight!r}")
        if not isinstance(priority, int):
            raise ValueError(f"a stream's priority must be an int, got {priority!r}")
        if not isinstance(reserve, int) or not 0 <= reserve <= cap:
            raise ValueError(f"a stream's reserve must be an int from 0 to its maxsize ({cap}), "
                             f"got {reserve!r}")
        if max_streams is not None and len(self._lanes) >= max_streams:
            raise ValueError(f"runner {self.name!r} serves at most {max_streams} streams "
                             f"(open streams: {sorted(map(repr, self._lanes))})")
        if self._free_indices:
            index = heapq.heappop(self._free_indices)
        else:
            index = self._next_index
            self._next_index += 1
        lane = Lane(key, index, cap, weight=float(weight), priority=priority, reserve=reserve)
        try:
            self._admission.add_lane(lane)
        except ValueError:
            heapq.heappush(self._free_indices, index)
            raise
        self._lanes[key] = lane
        if priority != self.default.priority and self.on_priority is not None:
            self.on_priority()
        return self._new_handle(lane)

    def _new_handle(self, lane: Lane) -> Stream:
        stream = Stream(self, lane, self._owner())
        hub = self.hub
        table = weakref.ref(self)

        def dropped(ref: weakref.ref[Stream]) -> None:
            # Runs wherever the last reference went: hop to the loop before touching state.
            t = table()
            if t is not None and hub is not None:
                try:
                    hub.call_soon_threadsafe(t._dropped, lane, ref)
                except RuntimeError:  # the loop is closed, the trio run is over
                    pass

        lane.handle = weakref.ref(stream, dropped)
        return stream

    def _dropped(self, lane: Lane, ref: weakref.ref[Stream]) -> None:
        if lane.handle is not ref:
            return  # a new handle was made since
        self.release_closed(lane)
        self.forget_if_done(lane)

    # ---- what a Stream asks (LaneOps) ---------------------------------------------------
    def push(self, lane: Lane, inputs: Any, tag: Any) -> Awaitable[int]:
        return self._push()(lane, inputs, tag)  # type: ignore[misc]

    def push_nowait(self, lane: Lane, inputs: Any, tag: Any) -> int:
        return self._push_nowait()(lane, inputs, tag)  # type: ignore[misc]

    def next(self, lane: Lane) -> Awaitable[Result]:
        return self._next()(lane)  # type: ignore[misc]

    def push_many(self, lane: Lane, inputs: Iterable[Any],
                  tags: Iterable[Any] | None) -> Awaitable[list[int]]:
        return bulk.push_many_lane(self._owner(), lane, inputs, tags)

    def results(self, lane: Lane, max_items: int | None) -> bulk.ResultBatches:
        return bulk.ResultBatches(self._owner(), lane, max_items)

    def close(self, lane: Lane) -> None:
        if lane.closed:
            return
        lane.closed = True
        self._admission.fail_waiters(
            [lane], lambda: RunnerClosed(f"stream {lane.key!r} of runner {self.name!r} closed"))
        lane.wake()
        self.release_closed(lane)
        self.forget_if_done(lane)

    def withdraw(self, lane: Lane) -> int:
        """Take back every item of ``lane`` no worker has claimed yet (as a cancelled
        ``infer``): they leave its outbox, count as withdrawn, and free their slots when their
        empty shells come back. Returns how many."""
        done = self._done
        kept = type(lane.tickets)()
        count = 0
        for ticket in lane.tickets:
            gen = ticket.gen
            if (not ticket.done and done.unfinished.get(ticket.seq) is ticket
                    and gen is not None and gen.pipeline.withdraw(ticket.job)):
                ticket.withdrawn = True
                done.withdrawn += ticket.count  # items (a streamed chunk holds several)
                count += ticket.count
            else:
                kept.append(ticket)
        lane.tickets = kept
        lane.wake()
        return count

    # ---- reclaiming ---------------------------------------------------------------------
    def close_all(self) -> None:
        """The runner's input is closed: every stream is closed with it."""
        for lane in list(self._lanes.values()):
            lane.closed = True
            lane.wake()
            self.release_closed(lane)

    def release_closed(self, lane: Lane) -> None:
        """A closed or dropped stream cannot grow: its reserve is given up and its finished
        results stop holding slots."""
        if lane is self.default:
            return
        self._admission.drop_reserve(lane)
        for ticket in lane.tickets:
            if ticket.done:
                self._done.free(ticket)

    def forget_if_done(self, lane: Lane) -> None:
        """A closed (or dropped) stream with nothing left is dropped, so its key and index can
        be reused."""
        if (lane is not self.default and (lane.closed or lane.orphaned) and lane.idle()
                and self._lanes.get(lane.key) is lane):
            del self._lanes[lane.key]
            self._admission.remove_lane(lane)
            heapq.heappush(self._free_indices, lane.index)

    def keys(self) -> list[Any]:
        return list(self._lanes)

    def streams(self) -> list[Lane]:
        """The streams' lanes (not the default lane)."""
        return list(self._lanes.values())

    def lanes(self) -> list[Lane]:
        """Every lane: the default one first, then the streams'."""
        return [self.default, *self._lanes.values()]
