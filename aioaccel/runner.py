"""The async front: push / push_nowait / infer / async for / stream / close / aclose / stats.

Everything here runs on the event loop (asyncio, uvloop or trio: the running library's
:class:`~aioaccel.core.async_library.Hub`, chosen at open) and never blocks. The runner is a
thin front over loop-side parts, each in its own module:

* :mod:`aioaccel.core.admission`  -- maxsize, lanes, fair hand-over of slots, waiters;
* :mod:`aioaccel.core.records`      -- a lane's share and its ordered outbox (re-ordering);
* :mod:`aioaccel.completion` -- tickets, completion routing, failure fan-out, counters;
* :mod:`aioaccel.watchdog`   -- ``call_timeout``;
* :mod:`aioaccel.supervisor` -- loading the model, starting, stopping and releasing it.

Lifecycle (:class:`State`): ``NEW -> STARTING -> READY -> CLOSING -> CLOSED``; a fatal failure
goes to ``BROKEN`` (then ``CLOSED`` on ``aclose``). ``close()`` is separate: it ends the input
(``async for`` ends after the last result) while results keep flowing.
"""

from __future__ import annotations

import atexit
import enum
import heapq
import logging
import sys
import warnings
import weakref
from collections.abc import Callable, Generator
from itertools import count
from time import perf_counter, time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .core.admission import Admission
from .core.async_library import Flag, Hub, TaskHandle, Waiter, current_hub
from .core.completion import Completions, Ticket
from .core.generation import Generation, load_model
from .core.hang_watchdog import Watchdog
from .core.healing import Health, HealthState, Restart, RestartBudget
from .core.records import Lane
from .core.stage_threads import Job
from .errors import (
    AccelError,
    DeviceError,
    DeviceTimeout,
    InferenceError,
    InferTimeout,
    RunnerClosed,
    WouldBlock,
    copy_for_waiter,
    device_error,
    open_error,
)
from .stats import BatchStats, LatencyHistogram, RunnerStats, StageStats
from .streams import Stream

if TYPE_CHECKING:
    import asyncio

    from .backends import Model
    from .core.stage_threads import Worker
    from .tensors import TensorSpec

__all__ = ["Result", "Runner", "State"]

log = logging.getLogger("aioaccel")
_names = count()
_live: weakref.WeakSet[Runner] = weakref.WeakSet()


class State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    RECOVERING = "recovering"
    BROKEN = "broken"
    CLOSING = "closing"
    CLOSED = "closed"


_HEALTH: dict[State, HealthState] = {
    State.NEW: "starting", State.STARTING: "starting", State.READY: "ready",
    State.RECOVERING: "recovering", State.BROKEN: "broken", State.CLOSING: "closed",
    State.CLOSED: "closed",
}
#: upper bounds (seconds) of the recovery-time histogram
RECOVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Result:
    """One streamed result, yielded by ``async for`` in push order.

    ``outputs`` raises the item's :class:`~aioaccel.InferenceError` if it failed; check ``ok``
    (or ``error``) to handle failures without an exception.
    """

    __slots__ = ("_outputs", "error", "latency", "seq", "tag")

    def __init__(self, outputs: Any, tag: Any, seq: int, latency: float,
                 error: InferenceError | None):
        self._outputs = outputs
        self.tag = tag
        self.seq = seq
        self.latency = latency  #: seconds from admission to completion
        self.error = error

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def outputs(self) -> Any:
        if self.error is not None:
            raise self.error
        return self._outputs

    def __repr__(self) -> str:
        state = "ok" if self.error is None else f"error={self.error!r}"
        return f"<Result seq={self.seq} tag={self.tag!r} {state} latency={self.latency:.6f}>"


class Runner:
    """Runs a model (one or more stages) for async code (asyncio, uvloop, trio, anyio). Create
    it with :func:`aioaccel.open`.

    Use it as ``async with aioaccel.open(...) as runner`` (or ``runner = await aioaccel.open(...)``
    and later ``await runner.aclose()``).
    """

    _state = State.NEW  # class default: __del__ must work even if __init__ raised
    _gen: Generation | None = None

    def __init__(self, load: Callable[[], Model], *, maxsize: int = 8, name: str | None = None,
                 call_timeout: float | None = None, close_timeout: float = 10.0,
                 restart: Restart | None = None, retries: int = 0, warmup: int = 0,
                 warmup_inputs: Any = None, batch_wait: float = 0.002,
                 reopen: Callable[..., Callable[[], Model]] | None = None):
        if not isinstance(maxsize, int) or isinstance(maxsize, bool) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive int, got {maxsize!r}")
        if call_timeout is not None and call_timeout <= 0:
            raise ValueError(f"call_timeout must be > 0 seconds or None, got {call_timeout!r}")
        if restart is not None and not isinstance(restart, Restart):
            raise TypeError(f"restart must be an aioaccel.Restart or None, got {restart!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        self.name = name or f"runner{next(_names)}"
        self._load = load
        self._reopen = reopen                     # (target, options) -> load, for reload()
        self._restart = RestartBudget(restart) if restart is not None else None
        self._retries = retries
        self._warmup = warmup
        self._warmup_inputs = warmup_inputs
        if not isinstance(batch_wait, (int, float)) or batch_wait < 0:
            raise ValueError(f"batch_wait must be a number of seconds >= 0, got {batch_wait!r}")
        self._batch_wait = float(batch_wait)
        self._recovered = Flag(True)              # set while not recovering
        self._recovery: TaskHandle | None = None
        self._restarts = self._retried = 0
        self._last_error: BaseException | None = None
        self._recovery_times = LatencyHistogram(RECOVERY_BUCKETS)
        self._state_seconds: dict[str, float] = {}
        self._warmup_seconds = 0.0
        self._call_timeout = call_timeout
        self._close_timeout = close_timeout
        self._maxsize = maxsize
        self._state = State.NEW
        self._since = time()
        self._input_closed = False                # close(): no more input
        self._accepting = False                   # READY and input open: the fast path's test
        self._failure: AccelError | None = None   # broken, or closed with items pending
        self._hub: Hub | None = None              # the running async library, from open
        self._loop: asyncio.AbstractEventLoop | None = None  # its asyncio loop (None: trio)
        self._new_future: Callable[[], Waiter[Any]] = _not_open_future
        self._cancelled: type[BaseException] = _NeverRaised  # what cancellation raises here
        self._gen: Generation | None = None
        self._model: Model | None = None
        self._prepare: Callable[[Any], Any] | None = None
        self._submit: Callable[[Job], None] = _not_open
        self._watchdog: Watchdog | None = None
        self._closing: Waiter[None] | None = None  # set once aclose() started
        self._opened = Flag()                     # _open() finished, either way
        self._seq = count()
        self._admission = Admission(maxsize)
        self._lane = Lane(None, 0, maxsize)       # plain push / infer / async for
        self._streams: dict[Any, Lane] = {}       # runner.stream(key)
        self._free_indices: list[int] = []        # stream indices given back, smallest first
        self._next_index = 0
        self._done = Completions(self._admission, self._lane)
        self._retry_queue: list[Ticket] = []      # held by a failed device, re-run next

    # ---- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Runner:
        await self._open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        # Drain only on a normal exit: leaving on an error or a cancellation fails what is
        # pending at once instead of waiting for it.
        await self.aclose(timeout=None if exc_type is None else 0.0)

    def __await__(self) -> Generator[Any, None, Runner]:
        return self.__aenter__().__await__()

    def _set_state(self, state: State) -> None:
        now = time()
        previous = self._state.value
        self._state_seconds[previous] = self._state_seconds.get(previous, 0.0) + now - self._since
        self._state = state
        self._since = now
        self._accepting = state is State.READY and not self._input_closed

    async def _open(self) -> None:
        if self._state is not State.NEW:
            raise RuntimeError(f"runner {self.name!r} was already opened")
        hub = self._hub = current_hub()  # the library is chosen here, once, not per item
        self._loop = hub.loop
        self._new_future = hub.create_future
        self._cancelled = hub.cancelled
        self._set_state(State.STARTING)
        _live.add(self)
        gen: Generation | None = None
        try:
            model = self._model = await load_model(self._load, self.name, hub)
            gen = self._gen = Generation(self.name, model, hub, self, self._maxsize,
                                         self._batch_wait)
            self._prepare = model.prepare
            self._submit = gen.pipeline.queues[0].put
            await gen.start()
            self._warmup_seconds = await gen.warm_up(self._warmup, self._warmup_inputs)
        except BaseException as exc:
            if gen is not None:
                gen.stop_soon()
            self._fail_pending(RunnerClosed(f"runner {self.name!r} failed to open"))
            self._set_state(State.CLOSED)
            if isinstance(exc, (hub.cancelled, KeyboardInterrupt, SystemExit)):
                raise
            raise open_error(exc, f"opening runner {self.name!r}")  # noqa: B904 - it chains
        finally:
            self._opened.set()
        if self._closing is not None:  # aclose() was called while we were opening
            gen.stop_soon()
            self._set_state(State.CLOSED)
            raise RunnerClosed(f"runner {self.name!r} was closed while it opened")
        self._set_state(State.READY)
        if self._call_timeout is not None:
            self._watchdog = Watchdog(hub, self._call_timeout, self.name, self._on_hang)
            self._watchdog.watch(gen.pipeline)

    async def _start_generation(self, load: Callable[[], Model]) -> Generation:
        """Load, start and warm up a new generation (for a restart or a reload)."""
        hub = self._hub
        assert hub is not None
        model = await load_model(load, self.name, hub)
        gen = Generation(self.name, model, hub, self, self._maxsize, self._batch_wait)
        try:
            await gen.start()
            await gen.warm_up(self._warmup, self._warmup_inputs)
        except BaseException:
            gen.stop_soon()
            raise
        return gen

    def _switch_to(self, gen: Generation) -> None:
        self._gen = gen
        self._model = gen.model
        self._prepare = gen.model.prepare
        self._submit = gen.pipeline.queues[0].put  # (C) the job goes to stage 0's hand-off
        if self._watchdog is not None:
            self._watchdog.watch(gen.pipeline)

    def close(self) -> None:
        """No more input. ``async for`` ends after the last result; pending ``push`` calls fail
        with :class:`~aioaccel.RunnerClosed`. Items already admitted still complete."""
        if self._input_closed:
            return
        self._input_closed = True
        self._accepting = False
        self._admission.fail_waiters(self._lanes(),
                                     lambda: RunnerClosed(f"runner {self.name!r} closed"))
        for lane in self._lanes():
            lane.closed = True
            lane.wake()
        for lane in list(self._streams.values()):
            self._release_closed(lane)

    async def aclose(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Close, let admitted items finish for up to ``timeout`` seconds (default: the
        ``close_timeout`` given to open; 0 fails them at once), fail what is left with
        :class:`RunnerClosed`, stop and join every thread and release the devices.
        Idempotent; safe to call concurrently. Cancelled, it still releases everything (the
        joining finishes on a reaper thread) and fails what was pending."""
        hub = self._hub if self._hub is not None else current_hub()
        if self._closing is not None:
            await hub.shield(self._closing)
            return
        self._closing = closing = hub.create_future()
        budget = self._close_timeout if timeout is None else timeout
        started = perf_counter()
        try:
            self.close()
            if self._state is State.STARTING:  # _open() sees the request and cleans up
                await self._opened.wait(hub, budget)
                return
            if self._recovery is not None and not self._recovery.done():
                self._recovery.cancel()  # closing beats recovering: fail what waits for it
                await hub.join(self._recovery)
                if self._state is State.RECOVERING:
                    self._set_state(State.BROKEN)
            if self._state in (State.READY, State.BROKEN):
                if self._state is State.READY:
                    self._set_state(State.CLOSING)
                if budget > 0 and self._done.unfinished and self._failure is None:
                    self._done.idle = hub.create_future()
                    await hub.wait(self._done.idle, budget)
                self._stop_watchdog()
                self._fail_pending(RunnerClosed(
                    f"runner {self.name!r} closed with {len(self._done.unfinished)} items "
                    f"unfinished"))
                if self._gen is not None:
                    left = budget - (perf_counter() - started)
                    hung = isinstance(self._failure, DeviceTimeout)
                    await self._gen.stop(0.1 if hung else max(left, 0.25))
            self._set_state(State.CLOSED)
        except BaseException:
            self._abort()
            raise
        finally:
            if not closing.done():
                closing.set_result(None)

    def _abort(self) -> None:
        """Close now, without awaiting (cancelled aclose, garbage collection): fail what is
        pending, stop the threads, and release on a reaper thread if they need time."""
        self._input_closed = True
        self._stop_watchdog()
        self._fail_pending(RunnerClosed(f"runner {self.name!r} closed"))
        if self._gen is not None:
            self._gen.stop_soon()
        self._set_state(State.CLOSED)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()

    def __del__(self) -> None:
        if self._state in (State.STARTING, State.READY, State.RECOVERING, State.BROKEN,
                           State.CLOSING):
            warnings.warn(f"runner {self.name!r} was never closed: use 'async with "
                          f"aioaccel.open(...)' or 'await runner.aclose()'",
                          ResourceWarning, source=self, stacklevel=1)
            gen = self._gen
            if gen is not None:
                if sys.is_finalizing():
                    gen.pipeline.stop()
                else:
                    gen.stop_soon(join=0.0)

    def _stop_threads(self, timeout: float = 5.0) -> None:
        """Without a loop (it is gone): stop and join the worker threads, release the model.
        For test teardown and interpreter exit; items still pending are dropped."""
        self._input_closed = True
        self._set_state(State.CLOSED)
        if self._gen is not None:
            self._gen.stop_sync(timeout)

    def _opened_hub(self) -> Hub:
        """The running library's hub; before open, the error that says to open the runner."""
        hub = self._hub
        if hub is None:
            self._check_accepting(self._lane)
            raise RuntimeError(f"runner {self.name!r} is not open")
        return hub

    def _in(self, state: State) -> bool:
        """``self._state is state``, re-read after an await (a plain test would be narrowed)."""
        return self._state is state

    def _threads_alive(self) -> bool:
        return self._gen is not None and not self._gen.pipeline.exited

    # ---- admission ----------------------------------------------------------------------
    def _check_accepting(self, lane: Lane) -> None:
        if self._failure is not None:
            raise copy_for_waiter(self._failure)
        if self._input_closed:
            raise RunnerClosed(f"runner {self.name!r} is closed")
        if lane.closed:
            raise RunnerClosed(f"stream {lane.key!r} of runner {self.name!r} is closed")
        if self._state is not State.READY and self._state is not State.RECOVERING:
            raise RuntimeError(f"runner {self.name!r} is not open: use 'async with "
                               f"aioaccel.open(...) as runner' or 'await aioaccel.open(...)'")

    async def _admit(self, lane: Lane) -> None:
        self._check_accepting(lane)
        while self._in(State.RECOVERING):  # wait (bounded by the caller's timeouts)
            await self._recovered.wait(self._hub)  # type: ignore[arg-type]
            self._check_accepting(lane)
        if self._admission.try_take(lane):
            return
        await self._admission.wait(lane, self._new_future)
        try:
            while self._in(State.RECOVERING):
                await self._recovered.wait(self._hub)  # type: ignore[arg-type]
        except BaseException:
            self._admission.release(lane)
            raise
        if not self._accepting or lane.closed:  # closed or broken while we were woken
            self._admission.release(lane)
            self._check_accepting(lane)

    def _enqueue(self, lane: Lane, inputs: Any, tag: Any,
                 future: Waiter[Any] | None) -> Ticket:
        seq = next(self._seq)
        now = perf_counter()
        job = Job(seq, inputs, lane.index, now)
        ticket = Ticket(seq, tag, lane, future, job, now)
        ticket.gen = self._gen
        if self._retries:
            ticket.inputs = inputs  # kept to re-run it after a restart
        done = self._done
        done.pushed += 1
        lane.pushed += 1
        done.unfinished[seq] = ticket
        if future is None:
            lane.tickets.append(ticket)
        self._submit(job)
        return ticket

    # ---- input --------------------------------------------------------------------------
    async def push(self, inputs: Any, *, tag: Any = None) -> int:
        """Admit one input for the ``async for`` stream and return its sequence number.

        Waits while ``maxsize`` items are admitted and not consumed. Bad input raises
        :class:`~aioaccel.InputError` at once and admits nothing. A cancelled ``push`` leaves
        the runner exactly as it was.
        """
        lane = self._lane
        adm = self._admission
        if self._accepting:
            if self._prepare is not None:
                inputs = self._prepare(inputs)
            if adm.admitted < adm.maxsize and not lane.waiters and not adm.reserved:
                # the uncontended fast path of _admit(), inlined: no coroutine, no call (the
                # default lane's cap is maxsize, so the global bound is its bound too)
                lane.admitted += 1
                adm.admitted += 1
                if adm.admitted > adm.peak:
                    adm.peak = adm.admitted
            else:
                await self._admit(lane)
        else:
            self._check_accepting(lane)
        return self._enqueue(lane, inputs, tag, None).seq

    def push_nowait(self, inputs: Any, *, tag: Any = None) -> int:
        """Like :meth:`push`, but raise :class:`~aioaccel.WouldBlock` instead of waiting."""
        return self._push_lane_nowait(self._lane, inputs, tag)

    async def _push_lane(self, lane: Lane, inputs: Any, tag: Any) -> int:
        self._check_accepting(lane)
        if self._prepare is not None:
            inputs = self._prepare(inputs)
        await self._admit(lane)
        return self._enqueue(lane, inputs, tag, None).seq

    def _push_lane_nowait(self, lane: Lane, inputs: Any, tag: Any) -> int:
        self._check_accepting(lane)
        if self._prepare is not None:
            inputs = self._prepare(inputs)
        if not self._admission.try_take(lane):
            adm = self._admission
            where = "" if lane is self._lane else f"stream {lane.key!r} of "
            raise WouldBlock(f"{where}runner {self.name!r} is full: {adm.admitted} of "
                             f"maxsize={self._maxsize} admitted and not consumed"
                             + ("" if lane is self._lane else
                                f", {lane.admitted} of this stream's maxsize={lane.cap}"))
        return self._enqueue(lane, inputs, tag, None).seq

    async def infer(self, inputs: Any, *, timeout: float | None = None,  # noqa: ASYNC109
                    admit_timeout: float | None = None) -> Any:
        """Run one input and return its outputs; for many concurrent callers (web handlers).

        The item never shows up in ``async for``. A per-item failure raises
        :class:`~aioaccel.InferenceError`. On ``timeout`` (seconds, covering the wait for
        space too) raises :class:`~aioaccel.InferTimeout`. ``admit_timeout`` bounds only the
        wait for space: past it, :class:`~aioaccel.WouldBlock` (a web service answers 503).
        If the call is cancelled or times out before a worker took the item, it is withdrawn;
        after that its result is discarded.
        """
        if timeout is None:
            return await self._infer(inputs, admit_timeout)
        try:
            async with self._opened_hub().timeout(timeout):
                return await self._infer(inputs, admit_timeout)
        except TimeoutError as exc:
            if isinstance(exc, AccelError):
                raise
            raise InferTimeout(f"no result within {timeout} s from runner {self.name!r}") from None

    async def _infer(self, inputs: Any, admit_timeout: float | None = None) -> Any:
        lane = self._lane
        self._check_accepting(lane)
        if self._prepare is not None:
            inputs = self._prepare(inputs)
        if admit_timeout is None:
            await self._admit(lane)
        else:
            try:
                async with self._opened_hub().timeout(admit_timeout):
                    await self._admit(lane)
            except TimeoutError as exc:
                if isinstance(exc, AccelError):
                    raise
                raise WouldBlock(f"runner {self.name!r} stayed full for {admit_timeout} s "
                                 f"(maxsize={self._maxsize}, {len(lane.waiters)} waiting)"
                                 ) from None
        future = self._new_future()
        ticket = self._enqueue(lane, inputs, None, future)
        try:
            return await future
        except self._cancelled:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" log
                self._done.discarded += 1  # it arrived, but nobody is left to take it
            elif (self._done.unfinished.get(ticket.seq) is ticket and self._gen is not None
                  and self._gen.pipeline.withdraw(ticket.job)):
                # Its empty shell comes back when a worker reaches it and frees the slot then,
                # so the hand-off never holds more than maxsize jobs.
                ticket.withdrawn = True
                self._done.withdrawn += 1
            else:
                ticket.job.abandoned = True  # a device stage may cancel its remote work
            raise

    # ---- streams ------------------------------------------------------------------------
    def stream(self, key: Any, *, maxsize: int | None = None, weight: float = 1,
               priority: int = 0, reserve: int = 0) -> Stream:
        """The stream named ``key`` (made on first use): its own push and ordered ``async for``.

        ``maxsize`` caps what this stream may hold admitted (default: the runner's maxsize).
        When the runner is full, freed slots go to the waiting stream of highest ``priority``;
        within a priority, in proportion to ``weight``; ``reserve`` slots are kept free for
        this stream alone. See :mod:`aioaccel.core.admission`. A stream nobody references any
        more is reclaimed once it is idle.
        """
        lane = self._streams.get(key)
        if lane is not None:
            if maxsize is not None and maxsize != lane.cap:
                raise ValueError(f"stream {key!r} already exists with maxsize={lane.cap}")
            handle = lane.handle() if lane.handle is not None else None
            if handle is None:
                handle = self._new_handle(lane)
            return handle
        if self._state is not State.READY:
            raise RuntimeError(f"runner {self.name!r} is not open")
        cap = self._maxsize if maxsize is None else maxsize
        if not isinstance(cap, int) or not 1 <= cap <= self._maxsize:
            raise ValueError(f"a stream's maxsize must be an int from 1 to the runner's "
                             f"maxsize ({self._maxsize}), got {maxsize!r}")
        if not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"a stream's weight must be a number > 0, got {weight!r}")
        if not isinstance(priority, int):
            raise ValueError(f"a stream's priority must be an int, got {priority!r}")
        if not isinstance(reserve, int) or not 0 <= reserve <= cap:
            raise ValueError(f"a stream's reserve must be an int from 0 to its maxsize ({cap}), "
                             f"got {reserve!r}")
        limit = self._model.max_streams if self._model is not None else None
        if limit is not None and len(self._streams) >= limit:
            raise ValueError(f"runner {self.name!r} serves at most {limit} streams "
                             f"(open streams: {sorted(map(repr, self._streams))})")
        index = heapq.heappop(self._free_indices) if self._free_indices else self._take_index()
        lane = Lane(key, index, cap, weight=float(weight), priority=priority, reserve=reserve)
        try:
            self._admission.add_lane(lane)
        except ValueError:
            heapq.heappush(self._free_indices, index)
            raise
        self._streams[key] = lane
        if self._input_closed:
            lane.closed = True
        return self._new_handle(lane)

    def _take_index(self) -> int:
        index = self._next_index
        self._next_index += 1
        return index

    def _new_handle(self, lane: Lane) -> Stream:
        stream = Stream(self, lane)
        hub = self._hub
        runner = weakref.ref(self)

        def dropped(ref: weakref.ref[Stream]) -> None:
            # Runs wherever the last reference went: hop to the loop before touching state.
            r = runner()
            if r is not None and hub is not None:
                try:
                    hub.call_soon_threadsafe(r._on_stream_dropped, lane, ref)
                except RuntimeError:  # the loop is closed, the trio run is over
                    pass

        lane.handle = weakref.ref(stream, dropped)
        return stream

    def _on_stream_dropped(self, lane: Lane, ref: weakref.ref[Stream]) -> None:
        if lane.handle is not ref:
            return  # a new handle was made since
        self._release_closed(lane)
        self._forget_if_done(lane)

    def streams(self) -> list[Stream]:
        """The streams made with :meth:`stream` that are still open or have results left."""
        return [self.stream(key) for key in list(self._streams)]

    def _close_lane(self, lane: Lane) -> None:
        if lane.closed:
            return
        lane.closed = True
        self._admission.fail_waiters(
            [lane], lambda: RunnerClosed(f"stream {lane.key!r} of runner {self.name!r} closed"))
        lane.wake()
        self._release_closed(lane)
        self._forget_if_done(lane)

    def _withdraw_lane(self, lane: Lane) -> int:
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
                done.withdrawn += 1
                count += 1
            else:
                kept.append(ticket)
        lane.tickets = kept
        lane.wake()
        return count

    def _release_closed(self, lane: Lane) -> None:
        """A closed or dropped stream cannot grow: its finished results stop holding slots."""
        if lane is self._lane:
            return
        for ticket in lane.tickets:
            if ticket.done:
                self._done.free(ticket)

    def _forget_if_done(self, lane: Lane) -> None:
        """A closed (or dropped) stream with nothing left is dropped, so its key and index can
        be reused."""
        if (lane is not self._lane and (lane.closed or lane.orphaned) and lane.idle()
                and self._streams.get(lane.key) is lane):
            del self._streams[lane.key]
            self._admission.remove_lane(lane)
            heapq.heappush(self._free_indices, lane.index)

    def _lanes(self) -> list[Lane]:
        return [self._lane, *self._streams.values()]

    # ---- output -------------------------------------------------------------------------
    def __aiter__(self) -> Runner:
        return self

    async def __anext__(self) -> Result:
        return await self._next(self._lane)

    async def _next(self, lane: Lane) -> Result:
        while True:
            tickets = lane.tickets
            if tickets:
                head = tickets[0]
                if head.done:
                    tickets.popleft()
                    self._done.free(head)
                    job = head.job
                    if not tickets and lane is not self._lane:
                        self._forget_if_done(lane)
                    return Result(job.value, head.tag, head.seq, job.t_done - head.t_admit,
                                  head.error)
            if self._failure is not None:
                raise copy_for_waiter(self._failure)
            if not tickets and (self._input_closed or lane.closed):
                self._forget_if_done(lane)
                raise StopAsyncIteration
            if self._state in (State.NEW, State.STARTING):
                raise RuntimeError(f"runner {self.name!r} is not open")
            fut = self._new_future()
            lane.consumers.append(fut)
            try:
                await fut
            finally:
                if fut in lane.consumers:
                    lane.consumers.remove(fut)

    # ---- what the bridge calls (on the loop) --------------------------------------------
    def on_jobs(self, jobs: list[Job]) -> None:
        done = self._done
        done.on_jobs(jobs)
        default = self._lane
        if default.tickets and default.tickets[0].done:
            default.wake()

    def on_ready(self, worker: Worker, error: BaseException | None) -> None:
        if self._gen is not None:
            self._gen.on_ready(worker, error)

    def on_worker_exit(self, worker: Worker) -> None:
        if self._gen is not None:
            self._gen.on_worker_exit(worker)

    def on_fatal(self, error: BaseException, stage: str, gen: Generation | None = None) -> None:
        if self._failure is not None and not isinstance(self._failure, RunnerClosed):
            return
        err = device_error(error, f"stage {stage!r} of runner {self.name!r}")
        if gen is not None and gen is not self._gen:  # a generation being replaced by reload
            gen.bridge.detach()
            gen.stop_soon()
            self._retry_or_fail(err, gen)
            return
        self._fatal(err)

    def _on_hang(self, err: DeviceTimeout) -> None:
        if self._failure is None:
            self._fatal(err)

    def _fatal(self, err: DeviceError) -> None:
        if (self._restart is None or (self._state is not State.READY
                and self._state is not State.CLOSING) or not self._restart.allow()):
            self._break(err)
            return
        self._recover(err)

    # ---- self-healing -------------------------------------------------------------------
    def _recover(self, err: DeviceError) -> None:
        """Start recovering from a fatal failure: the failed generation stops at once, what
        it held is kept for a retry or failed, and a task reopens the model."""
        log.warning("runner %r: %s; recovering", self.name, err)
        self._last_error = err
        self._set_state(State.RECOVERING)
        self._recovered.clear()
        self._stop_watchdog()
        old = self._gen
        if old is not None:
            old.bridge.detach()
            old.pipeline.stop()
        self._retry_or_fail(err, old)
        self._recovery = self._opened_hub().spawn(self._reopen_after(err, old),
                                                  name=f"aioaccel-{self.name}-recovery")

    def _retry_or_fail(self, err: DeviceError, gen: Generation | None) -> None:
        """The items ``gen`` held: re-run (``retries``) on the next generation, or failed."""
        done = self._done
        retry: list[Ticket] = []
        for seq, ticket in list(done.unfinished.items()):
            if ticket.gen is not gen and gen is not None:
                continue
            if ticket.withdrawn:
                del done.unfinished[seq]
                self._admission.release(ticket.lane)
            elif ticket.retries < self._retries:
                ticket.retries += 1
                retry.append(ticket)
            else:
                del done.unfinished[seq]
                done.fail_one(ticket, err)
        self._retry_queue.extend(retry)
        if self._state is State.READY:
            self._resubmit()
        done.check_idle()

    def _resubmit(self) -> None:
        queue, self._retry_queue = self._retry_queue, []
        gen = self._gen
        for ticket in sorted(queue, key=lambda t: t.seq):
            job = Job(ticket.seq, ticket.inputs, ticket.lane.index, ticket.t_admit)
            ticket.job = job
            ticket.gen = gen
            self._retried += 1
            self._submit(job)

    async def _reopen_after(self, err: DeviceError, old: Generation | None) -> None:
        started = perf_counter()
        budget = self._restart
        assert budget is not None
        if old is not None:  # release the device; a hung thread is abandoned, not awaited
            await old.stop(0.05 if isinstance(err, DeviceTimeout) else 0.5)
        while True:
            await self._opened_hub().sleep(budget.delay())
            try:
                gen = await self._start_generation(self._load)
                break
            except self._cancelled:
                raise
            except Exception as exc:
                log.warning("runner %r: reopening failed: %s", self.name, exc)
                self._last_error = exc
                if not budget.allow():
                    failure = DeviceError(f"runner {self.name!r} could not recover from {err}: "
                                          f"reopening failed: {exc}")
                    failure.__cause__ = exc
                    self._break(failure)
                    self._recovered.set()
                    return
        self._switch_to(gen)
        for ticket in self._retry_queue:
            ticket.gen = gen
        self._restarts += 1
        budget.recovered()
        self._recovery_times.add(perf_counter() - started)
        self._set_state(State.READY if not self._closing else State.CLOSING)
        self._resubmit()
        self._recovered.set()
        log.warning("runner %r recovered in %.3f s", self.name, perf_counter() - started)

    async def reload(self, target: Any = None, **options: Any) -> None:
        """Replace the model while serving: open the new one (``target`` and ``options`` as
        for :func:`aioaccel.open`; by default the same target, re-read) beside the old one,
        switch admission to it, let the old one finish what it holds, then close it. No item
        fails or is lost; results keep push order. Both models are in memory for a while."""
        if self._state is not State.READY:
            raise RuntimeError(f"runner {self.name!r} can reload only while ready "
                               f"(it is {self._state.value})")
        if target is None and not options:
            load = self._load
        elif self._reopen is None:
            raise RuntimeError(f"runner {self.name!r} was not made by aioaccel.open(): it can "
                               f"reload only its own model")
        else:
            load = self._reopen(target, options)
        gen = await self._start_generation(load)
        if not self._in(State.READY):  # closed or failed meanwhile
            await gen.stop(1.0)
            raise RunnerClosed(f"runner {self.name!r} closed during the reload")
        old = self._gen
        self._load = load
        self._switch_to(gen)
        if old is not None:
            old.outstanding = sum(1 for t in self._done.unfinished.values() if t.gen is old)
            if old.outstanding > 0:
                old.drained = self._new_future()
                if not await self._opened_hub().wait(old.drained, self._close_timeout):
                    log.warning("runner %r: the old model still held %d items after %s s",
                                self.name, old.outstanding, self._close_timeout)
            await old.stop(1.0)

    def health(self) -> Health:
        """The runner's health: state, restarts, last fatal error, since when, last result."""
        state = _HEALTH[self._state]
        if state == "ready" and self._input_closed:
            state = "closed"
        seconds = dict(self._state_seconds)
        seconds[self._state.value] = seconds.get(self._state.value, 0.0) + time() - self._since
        return Health(state=state, restarts=self._restarts, last_error=self._last_error,
                      since=self._since, last_completion=self._done.last_completion,
                      state_seconds=seconds)

    def _break(self, err: DeviceError) -> None:
        """A fatal failure: every waiter gets ``err`` now; the threads are stopped."""
        log.error("runner %r is broken: %s", self.name, err)
        self._failure = err
        self._last_error = err
        self._input_closed = True
        self._set_state(State.BROKEN)
        self._admission.fail_waiters(self._lanes(), lambda: copy_for_waiter(err))
        self._retry_queue.clear()
        self._fail_pending(err)
        self._recovered.set()  # whoever waited for a recovery sees the failure
        self._stop_watchdog()
        if self._gen is not None:
            self._gen.pipeline.stop()

    def _fail_pending(self, err: AccelError) -> None:
        done = self._done
        if not done.unfinished and not any(lane.tickets for lane in self._lanes()):
            return
        if self._failure is None or isinstance(err, DeviceError):
            self._failure = err
        withdraw = self._gen.pipeline.withdraw if self._gen is not None else None
        done.fail_pending(self._failure, self._lanes(), withdraw)

    # ---- introspection ------------------------------------------------------------------
    @property
    def state(self) -> str:
        """The lifecycle state: ``new``, ``starting``, ``ready``, ``broken``, ``closing`` or
        ``closed``."""
        return self._state.value

    @property
    def info(self) -> dict[str, Any]:
        """What the backend reports about the model (runtime, device, files, ...)."""
        return dict(self._model.info) if self._model is not None else {}

    @property
    def inputs(self) -> list[TensorSpec] | None:
        """The model's input spec (names, dtypes, shapes), or None when the backend has none."""
        return self._model.inputs if self._model is not None else None

    @property
    def outputs(self) -> list[TensorSpec] | None:
        """The model's output spec, or None when the backend has none."""
        return self._model.outputs if self._model is not None else None

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @property
    def closed(self) -> bool:
        """True once no more input is accepted."""
        return self._input_closed or self._state in (State.CLOSED, State.BROKEN)

    def stats(self) -> RunnerStats:
        """A snapshot of the counters, queue depths, busy fractions and latency."""
        gen = self._gen
        stages: list[StageStats] = []
        elapsed = 0.0
        duplicates = 0
        if gen is not None:
            pipeline = gen.pipeline
            now = perf_counter()
            elapsed = now - pipeline.started_at if pipeline.started_at else 0.0
            for i, spec in enumerate(pipeline.specs):
                ws = [w for w in pipeline.workers if w.index == i]
                busy = sum(w.busy for w in ws)
                if spec.device:  # include the current busy stretch
                    busy += sum(now - w.busy_since for w in ws if w.in_device)
                duplicates += sum(w.duplicates for w in ws)
                stages.append(StageStats(
                    name=spec.name,
                    kind="device" if spec.device else "blocking",
                    workers=len(ws),
                    queue_depth=pipeline.queues[i].qsize(),
                    busy=min(1.0, busy / (elapsed * len(ws))) if elapsed and ws else 0.0,
                    calls=sum(w.calls for w in ws),
                    in_device=sum(w.in_device for w in ws),
                ))
        done = self._done
        p50, p99 = done.latency.percentiles()
        q50, q99 = done.queued.percentiles()
        w50, w99 = done.working.percentiles()
        model = self._model
        return RunnerStats(
            name=self.name, pushed=done.pushed, completed=done.completed, failed=done.failed,
            discarded=done.discarded, withdrawn=done.withdrawn,
            in_flight=self._admission.admitted, peak_admitted=self._admission.peak,
            maxsize=self._maxsize, waiting=self._admission.waiting,
            latency_p50=p50, latency_p99=p99, elapsed=elapsed, stages=tuple(stages),
            streams=tuple(lane.snapshot() for lane in self._streams.values()),
            profile=(model.profile() if model is not None and model.profile is not None
                     else None),
            latency_buckets=done.histogram.cumulative(), latency_sum=done.histogram.sum,
            duplicates=duplicates, queue_p50=q50, queue_p99=q99, device_p50=w50,
            device_p99=w99, state=_HEALTH[self._state], restarts=self._restarts,
            retried=self._retried, recovery_buckets=self._recovery_times.cumulative(),
            recovery_sum=self._recovery_times.sum, warmup_seconds=self._warmup_seconds,
            state_seconds=self.health().state_seconds,
            batching=self._batch_stats(),
        )

    def _batch_stats(self) -> BatchStats | None:
        counters = self._gen.pipeline.batching if self._gen is not None else None
        if counters is None:
            return None
        return BatchStats(size=counters.limit, batches=counters.batches, items=counters.items,
                          sizes=tuple(sorted(counters.sizes.items())),
                          fallbacks=counters.fallbacks,
                          wait_mean=counters.waited / counters.items if counters.items else 0.0)

    def __repr__(self) -> str:
        return (f"<Runner {self.name!r} {self._state.value} "
                f"in_flight={self._admission.admitted}/{self._maxsize}>")


def _not_open(job: Job) -> None:
    raise RuntimeError("the runner is not open")


def _not_open_future() -> Waiter[Any]:
    raise RuntimeError("the runner is not open")


class _NeverRaised(BaseException):
    """Before open there is no library, so nothing is a cancellation yet."""


@atexit.register
def _stop_all_at_exit() -> None:
    """Interpreter exit with runners never closed: stop their threads and release their
    devices while the runtimes still exist (a native call cut off mid-way can abort)."""
    for runner in list(_live):
        if runner._state is not State.CLOSED:
            runner._stop_threads(timeout=2.0)
