"""The async front: push / push_nowait / infer / async for / stream / close / aclose / stats.

Everything here runs on the event loop (asyncio, uvloop or trio: the running library's
:class:`~aioaccel.core.async_library.Hub`, chosen at open) and never blocks. The runner is a
thin front over the parts of :mod:`aioaccel.core`, each with one job:

* :mod:`~aioaccel.core.admission`    -- maxsize, lanes, fair hand-over of slots, waiters;
* :mod:`~aioaccel.core.records`      -- a lane's share and ordered outbox; an item's ticket;
* :mod:`~aioaccel.core.completion`   -- settling finished items, failure fan-out, counters;
* :mod:`~aioaccel.core.stream_table` -- ``runner.stream(key)``: making, closing, reclaiming;
* :mod:`~aioaccel.core.healing`      -- restart, retries, reload;
* :mod:`~aioaccel.core.generation`   -- loading, starting, stopping and releasing the model;
* :mod:`~aioaccel.core.hang_watchdog` -- ``call_timeout``.

What stays here is the state machine (:class:`~aioaccel.State`) and the per-item front:
admitting an item, handing it to stage 0, and taking results from a lane's outbox.
``close()`` is not a state: it ends the input (``async for`` ends after the last result) while
results keep flowing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Generator
from itertools import count
from time import perf_counter
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .core import bulk
from .core.admission import Admission
from .core.async_library import Hub
from .core.calls import infer_bounded
from .core.completion import Completions
from .core.healing import Health, Restart
from .core.jobs import Job
from .core.lifecycle import State
from .core.records import Lane, Outcome, Ticket
from .core.results import Result
from .core.stream_table import StreamTable
from .core.streamed_chunk import ChunkTicket, take_one
from .core.supervision import Supervisor
from .errors import (
    DeviceError,
    WouldBlock,
    copy_for_waiter,
)
from .options import (
    DEFAULT_BATCH_WAIT,
    DEFAULT_OPEN_TIMEOUT,
    check_reload,
    check_runner,
)
from .stats import RunnerStats

if TYPE_CHECKING:
    from .backends import Model
    from .streams import Stream
    from .tensors import TensorSpec

__all__ = ["Result", "Runner", "State"]

log = logging.getLogger("aioaccel")
_names = count()


class Runner:
    """Runs a model (one or more stages) for async code (asyncio, uvloop, trio, anyio). Create
    it with :func:`aioaccel.open`. Use it as ``async with aioaccel.open(...) as runner`` (or
    ``runner = await aioaccel.open(...)`` and later ``await runner.aclose()``).
    """

    def __init__(self, load: Callable[[], Model], *, maxsize: int = 8, name: str | None = None,
                 call_timeout: float | None = None, close_timeout: float = 10.0,
                 open_timeout: float | None = DEFAULT_OPEN_TIMEOUT,
                 restart: Restart | None = None, retries: int = 0, warmup: int = 0,
                 warmup_inputs: Any = None, batch_wait: float = DEFAULT_BATCH_WAIT,
                 reopen: Callable[..., tuple[Callable[[], Model], float]] | None = None):
        check_runner(maxsize=maxsize, call_timeout=call_timeout, close_timeout=close_timeout,
                     open_timeout=open_timeout, retries=retries, warmup=warmup,
                     batch_wait=batch_wait)
        if restart is not None and not isinstance(restart, Restart):
            raise TypeError(f"restart must be an aioaccel.Restart or None, got {restart!r}")
        self.name = name or f"runner{next(_names)}"
        self._maxsize = maxsize
        self._seq = count()
        self._admission = Admission(maxsize)
        self._lane = Lane(None, 0, maxsize)       # plain push / infer / async for
        self._done = Completions(self._admission, self._lane)
        self._streams = StreamTable(self.name, maxsize, self._admission, self._done, self._lane,
                                    self, push=self._push_lane, push_nowait=self._push_lane_nowait,
                                    next=self._next)
        self._done.on_lane_released = self._streams.forget_if_done  # its key is free once done
        self._sup = Supervisor(self.name, load, self._done, self._streams, maxsize=maxsize,
                               call_timeout=call_timeout, close_timeout=close_timeout,
                               open_timeout=open_timeout, restart=restart, retries=retries,
                               warmup=warmup, warmup_inputs=warmup_inputs,
                               batch_wait=float(batch_wait), reopen=reopen)

    # ---- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> Runner:
        await self._sup.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        # Drain only on a normal exit: leaving on an error or a cancellation fails what is
        # pending at once instead of waiting for it.
        await self.aclose(timeout=None if exc_type is None else 0.0)

    def __await__(self) -> Generator[Any, None, Runner]:
        return self.__aenter__().__await__()

    def close(self) -> None:
        """No more input. ``async for`` ends after the last result; pending ``push`` calls fail
        with :class:`~aioaccel.RunnerClosed`. Items already admitted still complete."""
        self._sup.close()

    async def aclose(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Close, let admitted items finish for up to ``timeout`` seconds (default: the
        ``close_timeout`` given to open; 0 fails them at once), fail what is left with
        :class:`RunnerClosed`, stop and join every thread and release the devices. Finished
        results are still delivered by ``async for``, which then ends (with the error only
        where items had to be failed). Idempotent; safe to call concurrently. Cancelled, it
        still releases everything (the joining finishes on a reaper thread)."""
        await self._sup.aclose(timeout=timeout)

    def __del__(self) -> None:
        sup = self.__dict__.get("_sup")
        if sup is not None:
            sup.collected(self)

    def stop_now(self, timeout: float = 5.0) -> None:
        """With no loop left (test teardown, exit): stop, join, release; drop what is left."""
        self._sup.stop_now(timeout)

    def _opened_hub(self) -> Hub:
        """The running library's hub; before open, the error that says to open the runner."""
        hub = self._sup.hub
        if hub is None:
            self._sup.check_accepting(self._lane)
            raise RuntimeError(f"runner {self.name!r} is not open")
        return hub

    @property
    def threads_alive(self) -> bool:  # any of its worker threads still running
        return self._sup.threads_alive

    # ---- admission ----------------------------------------------------------------------
    async def _admit(self, lane: Lane) -> None:
        sup = self._sup
        sup.check_accepting(lane)
        while sup.is_in(State.RECOVERING):  # wait (bounded by the caller's timeouts)
            await sup.healer.recovered.wait(sup.hub)
            self._sup.check_accepting(lane)
        if self._admission.try_take(lane):
            return
        await self._admission.wait(lane, sup.new_future)
        try:
            while sup.is_in(State.RECOVERING):
                await sup.healer.recovered.wait(sup.hub)
        except BaseException:
            self._admission.release(lane)
            raise
        if not sup.accepting or lane.closed:  # closed or broken while we were woken
            self._admission.release(lane)
            self._sup.check_accepting(lane)

    def _enqueue(self, lane: Lane, inputs: Any, tag: Any, future: Outcome | None) -> Ticket:
        seq = next(self._seq)
        now = perf_counter()
        job = Job(seq, inputs, lane.index, now, lane.priority)
        ticket = Ticket(seq, tag, lane, future, job, now)
        sup = self._sup
        ticket.gen = sup.gen
        if sup.healer.retries:
            ticket.inputs = inputs  # kept to re-run it after a restart
        done = self._done
        done.pushed += 1
        lane.pushed += 1
        done.unfinished[seq] = ticket
        if future is None:
            lane.tickets.append(ticket)
        sup.submit(job)
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
        sup = self._sup
        if sup.accepting:
            if sup.prepare is not None:
                inputs = sup.prepare(inputs)
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
            self._sup.check_accepting(lane)
        return self._enqueue(lane, inputs, tag, None).seq

    def push_nowait(self, inputs: Any, *, tag: Any = None) -> int:
        """Like :meth:`push`, but raise :class:`~aioaccel.WouldBlock` instead of waiting."""
        return self._push_lane_nowait(self._lane, inputs, tag)

    async def _push_lane(self, lane: Lane, inputs: Any, tag: Any) -> int:
        self._sup.check_accepting(lane)
        prepare = self._sup.prepare
        if prepare is not None:
            inputs = prepare(inputs)
        if not (self._sup.accepting and self._admission.try_take(lane)):  # no room: wait
            await self._admit(lane)
        return self._enqueue(lane, inputs, tag, None).seq

    def _push_lane_nowait(self, lane: Lane, inputs: Any, tag: Any) -> int:
        self._sup.check_accepting(lane)
        prepare = self._sup.prepare
        if prepare is not None:
            inputs = prepare(inputs)
        if not self._admission.try_take(lane):
            raise WouldBlock(_full(self.name, self._admission, lane, lane is self._lane))
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
        sup = self._sup
        if timeout is not None or admit_timeout is not None or not sup.accepting:
            return await infer_bounded(self, inputs, timeout, admit_timeout)
        # the common call, inlined (no inner coroutine, no call while there is room)
        lane = self._lane
        adm = self._admission
        if sup.prepare is not None:
            inputs = sup.prepare(inputs)
        if adm.admitted < adm.maxsize and not lane.waiters and not adm.reserved:
            lane.admitted += 1
            adm.admitted += 1
            if adm.admitted > adm.peak:
                adm.peak = adm.admitted
        else:
            await self._admit(lane)
        future = sup.new_future()
        ticket = self._enqueue(lane, inputs, None, future)
        try:
            return await future
        except self._sup.cancelled:
            self._done.give_up(ticket)
            raise

    # bulk: infer_many(inputs), push_many(inputs, tags), results(max_items) (core/bulk.py)
    infer_many = bulk.infer_many
    push_many = bulk.push_many
    results = bulk.results

    # ---- streams ------------------------------------------------------------------------
    def stream(self, key: Any, *, maxsize: int | None = None, weight: float = 1,
               priority: int = 0, reserve: int = 0) -> Stream:
        """The stream named ``key`` (made on first use): its own push and ordered ``async for``.

        ``maxsize`` caps what this stream may hold admitted (default: the runner's maxsize).
        When the runner is full, freed slots go to the waiting stream of highest ``priority``;
        within a priority, in proportion to ``weight``; ``reserve`` slots are kept free for
        this stream alone. See :mod:`aioaccel.core.admission`. A stream nobody references any
        more is reclaimed once it is idle. An existing stream is found even after a close (to
        take its last results); a new one needs an open runner.
        """
        found = self._streams.find(key, maxsize)
        if found is not None:
            return found
        self._sup.check_accepting(self._lane)
        model = self._model
        return self._streams.make(key, maxsize=maxsize, weight=weight, priority=priority,
                                  reserve=reserve,
                                  max_streams=model.max_streams if model is not None else None)

    def streams(self) -> list[Stream]:
        """The streams made with :meth:`stream` that are still open or have results left."""
        return [self.stream(key) for key in self._streams.keys()]  # noqa: SIM118 - a list

    # ---- output -------------------------------------------------------------------------
    def __aiter__(self) -> Runner:
        return self

    def __anext__(self) -> Coroutine[Any, Any, Result]:  # _next itself: one frame per item
        return self._next(self._lane)

    async def _next(self, lane: Lane) -> Result:
        while True:
            tickets = lane.tickets
            if tickets:
                head = tickets[0]
                if head.done:
                    if type(head) is ChunkTicket:  # a streamed chunk: its next item
                        return take_one(self, lane, head)
                    tickets.popleft()
                    self._done.free(head)
                    job = head.job
                    if not tickets and lane is not self._lane:
                        self._streams.forget_if_done(lane)
                    return Result(job.value, head.tag, head.seq, job.t_done - head.t_admit,
                                  head.error)
            if not tickets:
                # a graceful close drains: only a lane whose items were failed ends in error
                failure = lane.failure or self._sup.failure
                if failure is not None and (lane.failure or isinstance(failure, DeviceError)):
                    raise copy_for_waiter(failure)
                if self._sup.input_closed or lane.closed:
                    self._streams.forget_if_done(lane)
                    raise StopAsyncIteration
            if self._sup.state is State.STARTING:
                raise RuntimeError(f"runner {self.name!r} is not open")
            fut = self._sup.new_future()
            lane.consumers.append(fut)
            try:
                await fut
            finally:
                if fut in lane.consumers:
                    lane.consumers.remove(fut)

    async def reload(self, target: Any = None, **options: Any) -> None:
        """Replace the model while serving: open the new one (``target`` and ``options`` as
        for :func:`aioaccel.open`; by default the same target, re-read) beside the old one,
        switch admission to it, let the old one finish what it holds, then close it. No item
        fails or is lost; results keep push order. Both models are in memory for a while.

        ``batch``, ``batch_wait``, ``replicas``, ``backend`` and backend options are honoured
        (the new model is opened with them); the runner's own options (``maxsize``,
        ``call_timeout``, ``restart``, ...) are refused with ``ValueError``. Opening the new
        model is bounded by ``open_timeout`` (:class:`~aioaccel.OpenTimeout`)."""
        await self._sup.reload(target, check_reload(options))

    # ---- introspection ------------------------------------------------------------------
    @property
    def state(self) -> State:
        """The lifecycle state (:class:`~aioaccel.State`, a ``str``): ``starting``, ``ready``,
        ``recovering``, ``broken``, ``closing`` or ``closed``."""
        return self._sup.state

    def health(self) -> Health:
        """The runner's health: state, restarts, last fatal error, since when, last result."""
        sup = self._sup
        return Health(state=sup.state, restarts=sup.healer.restarts,
                      last_error=sup.healer.last_error, since=sup.clock.since,
                      last_completion=self._done.last_completion,
                      state_seconds=sup.clock.seconds())

    @property
    def _model(self) -> Model | None:
        gen = self._sup.gen
        return gen.model if gen is not None else None

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
        sup = self._sup
        return sup.input_closed or sup.state in (State.CLOSED, State.BROKEN)

    def stats(self) -> RunnerStats:
        """A snapshot of the counters, queue depths, busy fractions and latency."""
        sup = self._sup
        gen = sup.gen
        elapsed, stages, duplicates = gen.pipeline.stage_stats() if gen else (0.0, (), 0)
        batching = gen.pipeline.batching if gen is not None else None
        model = gen.model if gen is not None else None
        return RunnerStats(
            name=self.name, maxsize=self._maxsize, elapsed=elapsed, stages=stages,
            duplicates=duplicates, **self._done.counters(), **self._admission.counters(),
            streams=tuple(lane.snapshot() for lane in self._streams.streams()),
            profile=model.profile() if model is not None and model.profile else None,
            state=sup.state, state_seconds=sup.clock.seconds(), **sup.healer.stats(),
            warmup_seconds=gen.warmup_seconds if gen is not None else 0.0,
            batching=batching.snapshot() if batching is not None else None)

    def __repr__(self) -> str:
        return (f"<Runner {self.name!r} {self._sup.state.value} "
                f"in_flight={self._admission.admitted}/{self._maxsize}>")


def _full(name: str, adm: Admission, lane: Lane, default: bool) -> str:
    where = "" if default else f"stream {lane.key!r} of "
    return (f"{where}runner {name!r} is full: {adm.admitted} of maxsize={adm.maxsize} admitted "
            f"and not consumed"
            + ("" if default else f", {lane.admitted} of this stream's maxsize={lane.cap}"))

