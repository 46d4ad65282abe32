"""The asyncio front: push / push_nowait / infer / async for / close / aclose / stats.

Everything here runs on the event loop and never blocks. Invariants:

* ``_admitted`` counts items admitted and not yet consumed (plus slots handed to a waiting
  ``push`` that has not resumed yet); it never exceeds ``maxsize``. Each lane (the default
  one, and one per :class:`~aioaccel.Stream`) counts its own share and has its own ``cap``.
* Slots are handed over, never grabbed: a freed slot goes to the next lane with waiters in
  round-robin order (``_ring``), FIFO within the lane, so a cancelled waiter leaves no trace,
  a woken-but-cancelled waiter passes its slot on, and no stream starves another. Invariant:
  while the runner has free capacity, every waiter left belongs to a lane at its ``cap``.
* ``lane.items`` holds ``push``-ed items in push order; the consumer takes the head once the
  bridge marked it done. That is the whole re-ordering: completions may arrive in any order.
* ``_unfinished`` maps seq -> item for everything admitted whose result has not come back.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from itertools import count
from time import perf_counter
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .bridge import Bridge
from .errors import (
    AccelError,
    DeviceError,
    DeviceTimeout,
    InferenceError,
    InferTimeout,
    RunnerClosed,
    WouldBlock,
)
from .pipeline import Item, Pipeline, Worker
from .stats import LatencyHistogram, LatencyWindow, RunnerStats, StageStats
from .streams import Lane, Stream

if TYPE_CHECKING:
    from .backends import Model
    from .tensors import TensorSpec

__all__ = ["Result", "Runner"]

log = logging.getLogger("aioaccel")
_names = count()
_NEW, _OPENING, _OPEN, _CLOSING, _CLOSED = range(5)


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


@dataclass
class _Options:
    call_timeout: float | None
    close_timeout: float


class Runner:
    """Runs a model (one or more stages) for asyncio code. Create it with :func:`aioaccel.open`.

    Use it as ``async with aioaccel.open(...) as runner`` (or ``runner = await aioaccel.open(...)``
    and later ``await runner.aclose()``).
    """

    _state = _NEW  # class default: __del__ must work even if __init__ raised

    def __init__(self, load: Callable[[], Model], *, maxsize: int = 8, name: str | None = None,
                 call_timeout: float | None = None, close_timeout: float = 10.0):
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive int, got {maxsize!r}")
        if call_timeout is not None and call_timeout <= 0:
            raise ValueError(f"call_timeout must be > 0 seconds or None, got {call_timeout!r}")
        self.name = name or f"runner{next(_names)}"
        self._load = load
        self._opt = _Options(call_timeout, close_timeout)
        self._state = _NEW
        self._model: Model | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pipeline: Pipeline | None = None
        self._prepare: Callable[[Any], Any] | None = None
        # admission
        self._admitted = 0
        self._peak = 0
        self._lane = Lane(None, 0, maxsize)       # plain push / infer / async for
        self._streams: dict[Any, Lane] = {}       # runner.stream(key)
        self._ring: dict[Lane, None] = {}         # lanes with waiters, in round-robin order
        # results
        self._seq = count()
        self._unfinished: dict[int, Item] = {}
        self._idle: asyncio.Future[None] | None = None
        self._closed = False                      # no more input
        self._accepting = False                   # open, not closed, not broken: the fast path
        self._maxsize = maxsize
        self._submit: Callable[[Item], None] = _not_open  # pipeline.submit once open
        self._failure: AccelError | None = None   # broken, or closed with items pending
        self._watchdog: asyncio.TimerHandle | None = None
        self._workers_ready: asyncio.Future[None] | None = None
        self._ready_count = 0
        self._workers_exited: asyncio.Future[None] | None = None
        self._close_done: asyncio.Future[None] | None = None
        # counters
        self._pushed = self._completed = self._failed = self._discarded = self._withdrawn = 0
        self._latency = LatencyWindow()
        self._histogram = LatencyHistogram()

    # ---- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Runner:
        await self._open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __await__(self) -> Generator[Any, None, Runner]:
        return self.__aenter__().__await__()

    async def _open(self) -> None:
        if self._state != _NEW:
            raise RuntimeError(f"runner {self.name!r} was already opened")
        self._state = _OPENING
        loop = self._loop = asyncio.get_running_loop()
        try:
            # Loading compiles models and imports runtimes: seconds of blocking work, so it
            # runs on a thread of its own, never on the loop.
            model = self._model = await _in_thread(self._load, f"aioaccel-{self.name}-load")
            self._prepare = model.prepare
            bridge = Bridge(loop, self)
            pipeline = self._pipeline = Pipeline(model.stages, bridge, self.name, self._maxsize)
            self._workers_ready = loop.create_future()
            self._workers_exited = loop.create_future()
            self._submit = pipeline.submit
            pipeline.start()
            await self._workers_ready
        except BaseException:
            self._state = _CLOSING
            await self._shutdown(grace=self._opt.close_timeout)
            raise
        self._state = _OPEN
        self._accepting = True
        if self._opt.call_timeout is not None:
            self._arm_watchdog()

    def close(self) -> None:
        """No more input. ``async for`` ends after the last result; pending ``push`` calls fail
        with :class:`~aioaccel.RunnerClosed`. Items already admitted still complete."""
        if self._closed:
            return
        self._closed = True
        self._accepting = False
        self._fail_push_waiters(lambda: RunnerClosed(f"runner {self.name!r} closed"))
        for lane in self._lanes():
            lane.closed = True
            lane.wake()

    async def aclose(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Close, let admitted items finish for up to ``timeout`` seconds (default: the
        ``close_timeout`` given to open), fail what is left with :class:`RunnerClosed`, stop
        and join every thread and release the devices. Idempotent; safe to call concurrently.
        """
        if self._close_done is not None:
            await asyncio.shield(self._close_done)
            return
        loop = asyncio.get_running_loop()
        self._close_done = loop.create_future()
        try:
            self.close()
            if self._state == _OPEN:
                self._state = _CLOSING
                budget = self._opt.close_timeout if timeout is None else timeout
                started = perf_counter()
                if self._unfinished and self._failure is None:
                    self._idle = loop.create_future()
                    try:
                        await asyncio.wait_for(asyncio.shield(self._idle), budget)
                    except TimeoutError:
                        pass
                grace = max(1.0, budget - (perf_counter() - started))
                await self._shutdown(grace=grace)
            self._state = _CLOSED
        finally:
            if self._state != _CLOSED:  # cancelled mid-way: still stop every thread
                self._fail_pending(RunnerClosed(f"runner {self.name!r} closed"))
                if self._pipeline is not None:
                    self._pipeline.stop()
                self._state = _CLOSED
            self._close_done.set_result(None)

    async def _shutdown(self, grace: float) -> None:
        """Fail what is still pending, stop the workers, wait for them (bounded), join them."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._failure is None and (self._unfinished or self._streams_unfinished()):
            self._fail_pending(RunnerClosed(
                f"runner {self.name!r} closed with {len(self._unfinished)} items unfinished"))
        pipeline = self._pipeline
        if pipeline is None:
            return
        pipeline.stop()
        if isinstance(self._failure, DeviceTimeout):
            grace = min(grace, 0.5)  # a hung call will not come back: do not wait for it
        if not all(w.exited for w in pipeline.workers):
            try:
                await asyncio.wait_for(asyncio.shield(self._workers_exited), grace)  # type: ignore[arg-type]
            except TimeoutError:
                hung = [w.thread.name for w in pipeline.workers if not w.exited and w.thread]
                log.warning("runner %r: threads %s did not stop; abandoned (daemon threads)",
                            self.name, hung)
        for w in pipeline.workers:
            if w.exited and w.thread is not None:
                w.thread.join()  # it has signalled its exit: returns at once
        if self._model is not None and self._model.close is not None:
            try:
                self._model.close()
            except Exception:
                log.exception("runner %r: releasing the model failed", self.name)

    def __del__(self) -> None:
        if self._state in (_OPENING, _OPEN):
            warnings.warn(f"runner {self.name!r} was never closed: use 'async with "
                          f"aioaccel.open(...)' or 'await runner.aclose()'",
                          ResourceWarning, source=self, stacklevel=1)
            if self._pipeline is not None:
                self._pipeline.stop()

    def _stop_threads(self, timeout: float = 5.0) -> None:
        """Without a loop (it is gone): stop and join the worker threads, release the model.
        For test teardown; items still pending are dropped."""
        self._closed = True
        self._accepting = False
        self._state = _CLOSED
        pipeline = self._pipeline
        if pipeline is not None:
            pipeline.stop()
            for w in pipeline.workers:
                if w.thread is not None:
                    w.thread.join(timeout)
        if self._model is not None and self._model.close is not None:
            self._model.close()

    # ---- admission ----------------------------------------------------------------------
    def _check_accepting(self, lane: Lane) -> None:
        if self._failure is not None:
            raise self._failure_for_waiter()
        if self._closed:
            raise RunnerClosed(f"runner {self.name!r} is closed")
        if lane.closed:
            raise RunnerClosed(f"stream {lane.key!r} of runner {self.name!r} is closed")
        if self._state != _OPEN:
            raise RuntimeError(f"runner {self.name!r} is not open: use 'async with "
                               f"aioaccel.open(...) as runner' or 'await aioaccel.open(...)'")

    def _take_slot(self, lane: Lane) -> None:
        self._admitted += 1
        lane.admitted += 1
        if self._admitted > self._peak:
            self._peak = self._admitted

    def _try_admit(self, lane: Lane) -> bool:
        if self._admitted < self._maxsize and lane.admitted < lane.cap and not lane.waiters:
            self._take_slot(lane)
            return True
        return False

    async def _admit(self, lane: Lane) -> None:
        self._check_accepting(lane)
        if self._try_admit(lane):
            return
        fut: asyncio.Future[None] = self._loop.create_future()  # type: ignore[union-attr]
        lane.waiters.append(fut)
        self._ring.setdefault(lane)
        try:
            await fut  # resolves when a slot is handed to us (already counted for us)
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release(lane)  # handed a slot but cancelled before resuming: pass it on
            else:
                try:
                    lane.waiters.remove(fut)
                except ValueError:
                    pass
                if not lane.waiters:
                    self._ring.pop(lane, None)
            raise
        if self._closed or lane.closed or self._failure is not None:  # closed while woken
            self._release(lane)
            self._check_accepting(lane)

    def _release(self, lane: Lane) -> None:
        """One admitted item of ``lane`` was consumed (or withdrawn): free its slot."""
        self._admitted -= 1
        lane.admitted -= 1
        if self._ring:
            self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to waiters: lanes in round-robin order, FIFO within a lane."""
        ring = self._ring
        while self._admitted < self._maxsize and ring:
            for lane in ring:
                if lane.admitted < lane.cap:
                    break
            else:
                return  # every waiting lane is at its own cap
            fut = lane.waiters.popleft()
            del ring[lane]
            if lane.waiters:
                ring[lane] = None  # to the back of the rotation
            if fut.done():  # cancelled; its task has not run its clean-up yet
                continue
            self._take_slot(lane)
            fut.set_result(None)

    def _enqueue(self, lane: Lane, inputs: Any, tag: Any,
                 future: asyncio.Future[Any] | None) -> Item:
        seq = next(self._seq)
        item = Item(seq, tag, inputs, future, perf_counter())
        item.lane = lane
        self._pushed += 1
        lane.pushed += 1
        self._unfinished[seq] = item
        if future is None:
            lane.items.append(item)
        self._submit(item)
        return item

    # ---- input --------------------------------------------------------------------------
    async def push(self, inputs: Any, *, tag: Any = None) -> int:
        """Admit one input for the ``async for`` stream and return its sequence number.

        Waits while ``maxsize`` items are admitted and not consumed. Bad input raises
        :class:`~aioaccel.InputError` at once and admits nothing. A cancelled ``push`` leaves
        the runner exactly as it was.
        """
        if self._prepare is not None:
            inputs = self._prepare(inputs)
        lane = self._lane
        if self._accepting and self._admitted < self._maxsize and not lane.waiters:
            # the uncontended fast path of _admit(), inlined: no coroutine, no call (the
            # default lane's cap is maxsize, so the global bound is its bound too)
            self._admitted += 1
            lane.admitted += 1
            if self._admitted > self._peak:
                self._peak = self._admitted
        else:
            await self._admit(lane)
        return self._enqueue(lane, inputs, tag, None).seq

    def push_nowait(self, inputs: Any, *, tag: Any = None) -> int:
        """Like :meth:`push`, but raise :class:`~aioaccel.WouldBlock` instead of waiting."""
        return self._push_lane_nowait(self._lane, inputs, tag)

    async def _push_lane(self, lane: Lane, inputs: Any, tag: Any) -> int:
        if self._prepare is not None:
            inputs = self._prepare(inputs)
        await self._admit(lane)
        return self._enqueue(lane, inputs, tag, None).seq

    def _push_lane_nowait(self, lane: Lane, inputs: Any, tag: Any) -> int:
        self._check_accepting(lane)
        if self._prepare is not None:
            inputs = self._prepare(inputs)
        if not self._try_admit(lane):
            where = "" if lane is self._lane else f"stream {lane.key!r} of "
            raise WouldBlock(f"{where}runner {self.name!r} is full: {self._admitted} of "
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
            async with asyncio.timeout(timeout):
                return await self._infer(inputs, admit_timeout)
        except TimeoutError as exc:
            if isinstance(exc, AccelError):
                raise
            raise InferTimeout(f"no result within {timeout} s from runner {self.name!r}") from None

    async def _infer(self, inputs: Any, admit_timeout: float | None = None) -> Any:
        if self._prepare is not None:
            inputs = self._prepare(inputs)
        lane = self._lane
        if admit_timeout is None:
            await self._admit(lane)
        else:
            try:
                async with asyncio.timeout(admit_timeout):
                    await self._admit(lane)
            except TimeoutError as exc:
                if isinstance(exc, AccelError):
                    raise
                raise WouldBlock(f"runner {self.name!r} stayed full for {admit_timeout} s "
                                 f"(maxsize={self._maxsize}, {len(lane.waiters)} waiting)"
                                 ) from None
        future: asyncio.Future[Any] = self._loop.create_future()  # type: ignore[union-attr]
        item = self._enqueue(lane, inputs, None, future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" log
                self._discarded += 1  # it arrived, but nobody is left to take it
            elif self._unfinished.get(item.seq) is item and self._pipeline.withdraw(item):  # type: ignore[union-attr]
                del self._unfinished[item.seq]
                self._withdrawn += 1
                self._release(lane)
                self._check_idle()
            raise

    # ---- streams ------------------------------------------------------------------------
    def stream(self, key: Any, *, maxsize: int | None = None) -> Stream:
        """The stream named ``key`` (made on first use): its own push and ordered ``async for``.

        ``maxsize`` caps what this stream may hold admitted (default: the runner's maxsize).
        Streams share the runner's capacity fairly; see :mod:`aioaccel.streams`.
        """
        lane = self._streams.get(key)
        if lane is not None:
            if maxsize is not None and maxsize != lane.cap:
                raise ValueError(f"stream {key!r} already exists with maxsize={lane.cap}")
            return Stream(self, lane)
        if self._state != _OPEN:
            raise RuntimeError(f"runner {self.name!r} is not open")
        cap = self._maxsize if maxsize is None else maxsize
        if not isinstance(cap, int) or not 1 <= cap <= self._maxsize:
            raise ValueError(f"a stream's maxsize must be an int from 1 to the runner's "
                             f"maxsize ({self._maxsize}), got {maxsize!r}")
        used = {lane.index for lane in self._streams.values()}
        index = next(i for i in range(len(used) + 1) if i not in used)
        lane = self._streams[key] = Lane(key, index, cap)
        if self._closed:
            lane.closed = True
        limit = self._model.max_streams if self._model is not None else None
        if limit is not None and len(self._streams) > limit:
            del self._streams[key]
            raise ValueError(f"runner {self.name!r} serves at most {limit} streams "
                             f"(open streams: {sorted(map(repr, self._streams))})")
        return Stream(self, lane)

    def streams(self) -> list[Stream]:
        """The streams made with :meth:`stream` that are still open or have results left."""
        return [Stream(self, lane) for lane in self._streams.values()]

    def _close_lane(self, lane: Lane) -> None:
        if lane.closed:
            return
        lane.closed = True
        waiters, lane.waiters = lane.waiters, deque()
        self._ring.pop(lane, None)
        for fut in waiters:
            if not fut.done():
                fut.set_exception(RunnerClosed(
                    f"stream {lane.key!r} of runner {self.name!r} closed"))
        lane.wake()
        self._forget_if_done(lane)

    def _forget_if_done(self, lane: Lane) -> None:
        """A closed stream with nothing left is dropped, so its key (and index) can be reused."""
        if (lane.closed and not lane.items and not lane.admitted and lane is not self._lane
                and self._streams.get(lane.key) is lane):
            del self._streams[lane.key]

    def _lanes(self) -> list[Lane]:
        return [self._lane, *self._streams.values()]

    # ---- output -------------------------------------------------------------------------
    def __aiter__(self) -> Runner:
        return self

    async def __anext__(self) -> Result:
        return await self._next(self._lane)

    async def _next(self, lane: Lane) -> Result:
        while True:
            items = lane.items
            if items:
                head = items[0]
                if head.done:
                    items.popleft()
                    self._release(lane)
                    return Result(head.value, head.tag, head.seq, head.t_done - head.t_admit,
                                  head.error)  # type: ignore[arg-type]
            if self._failure is not None:
                raise self._failure_for_waiter()
            if not items and (self._closed or lane.closed):
                self._forget_if_done(lane)
                raise StopAsyncIteration
            if self._state < _OPEN:
                raise RuntimeError(f"runner {self.name!r} is not open")
            fut: asyncio.Future[None] = self._loop.create_future()  # type: ignore[union-attr]
            lane.consumers.append(fut)
            try:
                await fut
            finally:
                if fut in lane.consumers:
                    lane.consumers.remove(fut)

    # ---- completions (called by the bridge, on the loop) --------------------------------
    def _on_items(self, items: list[Item]) -> None:
        unfinished = self._unfinished
        touched: set[Lane] | None = None
        for item in items:
            if unfinished.pop(item.seq, None) is None:
                continue  # already failed by close / a fatal error
            lane = item.lane
            if item.error is None:
                self._completed += 1
                latency = item.t_done - item.t_admit
                self._latency.add(latency)
                self._histogram.add(latency)
                if lane is not self._lane:
                    lane.completed += 1
                    lane.latency.add(latency)
            else:
                self._failed += 1
                lane.failed += 1
                item.error = _item_error(item)
            fut = item.future
            if fut is None:
                item.done = True
                if lane is not self._lane:
                    if touched is None:
                        touched = set()
                    touched.add(lane)
            else:
                if fut.done():
                    self._discarded += 1  # its infer() was cancelled after the device took it
                elif item.error is not None:
                    fut.set_exception(item.error)
                else:
                    fut.set_result(item.value)
                self._release(lane)
        default = self._lane.items
        if default and default[0].done:
            self._lane.wake()
        if touched:
            for lane in touched:
                if lane.items and lane.items[0].done:
                    lane.wake()
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._unfinished and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _on_ready(self, worker: Worker, error: BaseException | None) -> None:
        fut = self._workers_ready
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
            return
        self._ready_count += 1
        if self._ready_count == len(self._pipeline.workers):  # type: ignore[union-attr]
            fut.set_result(None)

    def _on_worker_exit(self, worker: Worker) -> None:
        fut = self._workers_exited
        if fut is not None and not fut.done() and all(w.exited for w in self._pipeline.workers):  # type: ignore[union-attr]
            fut.set_result(None)

    def _on_fatal(self, exc: BaseException, stage: str) -> None:
        if self._failure is not None and not isinstance(self._failure, RunnerClosed):
            return
        if isinstance(exc, DeviceError):
            err = exc
        else:
            err = DeviceError(f"stage {stage!r} of runner {self.name!r} failed fatally: {exc!r}")
            err.__cause__ = exc
        self._break(err)

    def _break(self, err: DeviceError) -> None:
        """A fatal failure: every waiter gets ``err`` now; the threads are stopped."""
        log.error("runner %r is broken: %s", self.name, err)
        self._failure = err
        self._closed = True
        self._accepting = False
        self._fail_push_waiters(self._failure_for_waiter)
        self._fail_pending(err)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._pipeline is not None:
            self._pipeline.stop()

    def _fail_push_waiters(self, make_error: Callable[[], BaseException]) -> None:
        self._ring.clear()
        for lane in self._lanes():
            waiters, lane.waiters = lane.waiters, deque()
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(make_error())

    def _streams_unfinished(self) -> bool:
        return any(not item.done for lane in self._lanes() for item in lane.items)

    def _fail_pending(self, err: AccelError) -> None:
        """Fail every unfinished item. The stream keeps its finished prefix (still delivered
        in order); everything after the first unfinished item is dropped and the consumer
        gets ``err`` when it reaches that point."""
        if self._failure is None or isinstance(err, DeviceError):
            self._failure = err
        for item in self._unfinished.values():
            if self._pipeline is not None:
                self._pipeline.withdraw(item)
            fut = item.future
            if fut is not None:
                if not fut.done():
                    fut.set_exception(self._failure_for_waiter())
                self._release(item.lane)
            self._failed += 1
            item.lane.failed += 1
        self._unfinished.clear()
        for lane in self._lanes():
            items = lane.items
            kept: deque[Item] = deque()
            while items and items[0].done:
                kept.append(items.popleft())
            for _ in items:
                self._release(lane)
            lane.items = kept
            lane.wake()
        self._check_idle()

    def _failure_for_waiter(self) -> AccelError:
        """A fresh exception per waiter (one instance raised in many tasks tangles tracebacks)."""
        base = self._failure
        assert base is not None
        err = type(base)(str(base))
        err.__cause__ = base.__cause__ or base
        return err

    # ---- watchdog -----------------------------------------------------------------------
    def _arm_watchdog(self) -> None:
        timeout = self._opt.call_timeout
        assert timeout is not None and self._loop is not None
        ref = weakref.ref(self)  # the loop's timer must not keep an abandoned runner alive
        period = min(max(timeout / 4, 0.005), 0.5)

        def tick() -> None:
            runner = ref()
            if runner is None or runner._failure is not None or runner._state == _CLOSED:
                return
            now = perf_counter()
            for item in runner._unfinished.values():
                started = item.call_started
                if started and now - started > timeout:
                    runner._break(DeviceTimeout(
                        f"stage {item.call_stage!r} of runner {runner.name!r} has been busy with "
                        f"item {item.seq} for {now - started:.3f} s, "
                        f"past call_timeout={timeout} s"))
                    return
            runner._watchdog = runner._loop.call_later(period, tick)  # type: ignore[union-attr]

        self._watchdog = self._loop.call_later(period, tick)

    # ---- introspection ------------------------------------------------------------------
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
        return self._closed

    def stats(self) -> RunnerStats:
        """A snapshot of the counters, queue depths, busy fractions and latency."""
        pipeline = self._pipeline
        stages: list[StageStats] = []
        elapsed = 0.0
        if pipeline is not None:
            elapsed = perf_counter() - pipeline.started_at if pipeline.started_at else 0.0
            for i, spec in enumerate(pipeline.specs):
                ws = [w for w in pipeline.workers if w.index == i]
                busy = sum(w.busy for w in ws)
                if spec.device:  # include the current busy stretch
                    busy += sum(perf_counter() - w.busy_since for w in ws if w.in_device)
                stages.append(StageStats(
                    name=spec.name,
                    kind="device" if spec.device else "blocking",
                    workers=len(ws),
                    queue_depth=pipeline.queues[i].qsize(),
                    busy=min(1.0, busy / (elapsed * len(ws))) if elapsed and ws else 0.0,
                    calls=sum(w.calls for w in ws),
                    in_device=sum(w.in_device for w in ws),
                ))
        p50, p99 = self._latency.percentiles()
        return RunnerStats(
            name=self.name, pushed=self._pushed, completed=self._completed, failed=self._failed,
            discarded=self._discarded, withdrawn=self._withdrawn, in_flight=self._admitted,
            peak_admitted=self._peak, maxsize=self._maxsize,
            waiting=sum(len(lane.waiters) for lane in self._lanes()),
            latency_p50=p50, latency_p99=p99, elapsed=elapsed, stages=tuple(stages),
            streams=tuple(lane.snapshot() for lane in self._streams.values()),
            profile=(self._model.profile() if self._model is not None
                     and self._model.profile is not None else None),
            latency_buckets=self._histogram.cumulative(), latency_sum=self._histogram.sum,
        )

    def __repr__(self) -> str:
        state = ("new", "opening", "open", "closing", "closed")[self._state]
        return f"<Runner {self.name!r} {state} in_flight={self._admitted}/{self._maxsize}>"


def _not_open(item: Item) -> None:
    raise RuntimeError("the runner is not open")


def _item_error(item: Item) -> InferenceError:
    cause = item.error
    err = InferenceError(
        f"item {item.seq} (tag={item.tag!r}) failed in stage {item.failed_stage!r}: {cause!r}",
        seq=item.seq, tag=item.tag, stage=item.failed_stage)
    err.__cause__ = cause
    return err


async def _in_thread(fn: Callable[[], Any], name: str) -> Any:
    """Run a one-off blocking call on a named daemon thread, without the default executor."""
    import threading

    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def main() -> None:
        try:
            outcome = (True, fn())
        except BaseException as exc:
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is gone: nobody waits for this any more
            pass

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    try:
        return await fut
    finally:
        if fut.done() and not fut.cancelled():
            thread.join()  # it has delivered its outcome: returns at once
        # cancelled: the call still runs to its end on its daemon thread; its outcome is
        # dropped, and joining here would block the loop for as long as it takes
