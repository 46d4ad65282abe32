"""Supervision: a runner's state machine and the life of what it runs.

The :class:`Supervisor` owns the current :class:`~aioaccel.core.generation.Generation` (a
loaded model and its running pipeline) and everything that happens to it: opening, the
switch to a new one (restart, reload), a fatal failure (recover through the
:class:`~aioaccel.core.healing.Healer`, or break), and the one teardown path of ``aclose``.
The runner's front reads three of its fields on every item: ``accepting`` (READY and input
open: the fast path's test), ``prepare`` (the model's input check) and ``submit`` (stage 0's
hand-off), so a switch of generation is one assignment of each.
"""

from __future__ import annotations

import logging
import sys
import warnings
import weakref
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ..errors import (
    AccelError,
    DeviceError,
    DeviceTimeout,
    RunnerClosed,
    copy_for_waiter,
    device_error,
    open_error,
)
from . import exit_guard
from .async_library import Flag, Hub, Waiter, current_hub
from .generation import Generation, open_generation
from .hang_watchdog import Watchdog
from .healing import Healer, Restart
from .lifecycle import State, StateClock

if TYPE_CHECKING:
    import asyncio

    from ..backends import Model
    from .completion import Completions
    from .jobs import Job
    from .records import Lane
    from .stream_table import StreamTable

__all__ = ["Supervisor"]

log = logging.getLogger("aioaccel")


def _not_open(job: Job) -> None:
    raise RuntimeError("the runner is not open")


def weakly(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method``, without keeping its object alive (it must still be alive when called)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        if bound is None:
            raise RuntimeError("the runner is gone")
        return bound(*args)

    return call


def _not_open_future() -> Waiter[Any]:
    raise RuntimeError("the runner is not open")


class _NeverRaised(BaseException):
    """Before open there is no async library, so nothing is a cancellation yet."""


class Supervisor:
    def __init__(self, name: str, load: Callable[[], Model], done: Completions,
                 streams: StreamTable, *, maxsize: int, call_timeout: float | None,
                 close_timeout: float, restart: Restart | None, retries: int, warmup: int,
                 warmup_inputs: Any, batch_wait: float, open_timeout: float | None = None,
                 reopen: Callable[..., tuple[Callable[[], Model], float]] | None = None):
        self.name = name
        self.done = done
        self.admission = done.admission
        self.lane = done.default_lane
        self.streams = streams
        self.maxsize = maxsize
        self.call_timeout = call_timeout
        self.close_timeout = close_timeout
        self.open_timeout = open_timeout
        self.warmup = (warmup, warmup_inputs)
        self.batch_wait = batch_wait
        self.state = State.STARTING
        self.clock = StateClock()
        self.opening = False                     # open() was called
        self.input_closed = False                # close(): no more input
        self.accepting = False                   # READY and input open: the fast path's test
        self.failure: AccelError | None = None   # broken, or closed with items unfinished
        self.hub: Hub | None = None              # the running async library, from open
        self.loop: asyncio.AbstractEventLoop | None = None  # its asyncio loop (None: trio)
        #: the hot path's waiter factory and cancellation class, the running library's own
        #: (``loop.create_future`` and ``asyncio.CancelledError`` on asyncio)
        self.new_future: Callable[[], Waiter[Any]] = _not_open_future
        self.cancelled: type[BaseException] = _NeverRaised
        self.gen: Generation | None = None
        self.prepare: Callable[[Any], Any] | None = None
        self.submit: Callable[[Job], None] = _not_open
        #: stage 0 ranks jobs by priority (streams of more than one priority exist)
        self.ranked = False
        streams.on_priority = weakly(self.rank_priorities)
        self.watchdog: Watchdog | None = None
        self.closing: Waiter[None] | None = None  # set once aclose() started
        self.opened = Flag()                     # open() finished, either way
        self.reopen = reopen  # (target, options) -> (load, batch_wait), for reload()
        # weakly: no reference cycle, so a dropped runner is freed (and its devices released)
        # at once, not at the next garbage collection
        self.healer = Healer(name, done, load, restart=restart, retries=retries,
                             close_timeout=close_timeout, set_state=weakly(self.set_state),
                             state=weakly(self._state), break_=weakly(self.break_),
                             open_generation=weakly(self.open_generation),
                             switch_to=weakly(self.switch_to), current=weakly(self._current),
                             set_submit=weakly(self._set_submit))

    def _state(self) -> State:
        return self.state

    def _current(self) -> Generation | None:
        return self.gen

    async def reload(self, target: Any, options: dict[str, Any]) -> None:
        """``runner.reload``: the new model's load (and batch_wait), then the healer's switch."""
        state = self.state
        if state is not State.READY:
            raise RuntimeError(f"runner {self.name!r} can reload only while ready "
                               f"(it is {state.value})")
        batch_wait = self.batch_wait
        if target is None and not options:
            load = self.healer.load
        elif self.reopen is None:
            raise RuntimeError(f"runner {self.name!r} was not made by aioaccel.open(): it can "
                               f"reload only its own model")
        else:
            load, batch_wait = self.reopen(target, options)
        previous, self.batch_wait = self.batch_wait, batch_wait  # the new model runs with it
        try:
            await self.healer.reload(load)
        except BaseException:
            self.batch_wait = previous
            raise

    def set_state(self, state: State) -> None:
        self.clock.enter(state)
        self.state = state
        self.accepting = state is State.READY and not self.input_closed

    async def open(self) -> None:
        if self.opening or self.state is not State.STARTING:
            raise RuntimeError(f"runner {self.name!r} was already opened")
        hub = current_hub()  # the library is chosen here, once, not per item
        self.opening = True
        self.hub = self.streams.hub = self.healer.hub = hub
        self.loop = hub.loop
        self.new_future = hub.create_future
        self.cancelled = hub.cancelled
        exit_guard.watch(self, exit_guard.RUNNERS)  # a program may exit leaving it open
        try:
            gen = await self.open_generation(self.healer.load)
        except BaseException as exc:
            self.fail_pending(RunnerClosed(f"runner {self.name!r} failed to open"))
            self.set_state(State.CLOSED)
            if isinstance(exc, (hub.cancelled, KeyboardInterrupt, SystemExit)):
                raise
            raise open_error(exc, f"opening runner {self.name!r}")  # noqa: B904 - it chains
        finally:
            self.opened.set()
        self.switch_to(gen)
        if self.closing is not None:  # aclose() was called while we were opening
            gen.stop_soon()
            self.set_state(State.CLOSED)
            raise RunnerClosed(f"runner {self.name!r} was closed while it opened")
        self.set_state(State.READY)
        if self.call_timeout is not None:
            self.watchdog = Watchdog(hub, self.call_timeout, self.name, self.on_hang)
            self.watchdog.watch(gen.pipeline)

    def open_generation(self, load: Callable[[], Model]) -> Any:
        """Load, start and warm up a generation, bounded by ``open_timeout`` (each warm-up
        call by ``call_timeout``): for the open, a restart's reopen and a reload."""
        assert self.hub is not None
        warmup, warmup_inputs = self.warmup
        return open_generation(self.name, load, self.hub, self.on_jobs, self.on_fatal,
                               maxsize=self.maxsize, batch_wait=self.batch_wait,
                               warmup=warmup, warmup_inputs=warmup_inputs,
                               open_timeout=self.open_timeout,
                               call_timeout=self.call_timeout)

    def _set_submit(self, submit: Callable[[Job], None]) -> None:
        self.submit = submit

    def rank_priorities(self) -> None:
        """The runner got a stream of a second priority: from now on (this generation and
        every later one) stage 0 serves the highest priority first, not FIFO."""
        if self.ranked:
            return
        self.ranked = True
        gen = self.gen
        if gen is not None:
            fifo = gen.pipeline.put
            gen.pipeline.rank()
            if self.submit == fifo:  # not while a probation holds new jobs back
                self.submit = gen.pipeline.put

    def switch_to(self, gen: Generation) -> None:
        self.gen = gen
        self.prepare = gen.model.prepare
        if self.ranked:
            gen.pipeline.rank()
        self.submit = gen.pipeline.put  # the job goes to stage 0's hand-off
        if self.watchdog is not None:
            self.watchdog.watch(gen.pipeline)

    def close(self) -> None:
        """No more input. ``async for`` ends after the last result; pending ``push`` calls fail
        with :class:`~aioaccel.RunnerClosed`. Items already admitted still complete."""
        if self.input_closed:
            return
        self.input_closed = True
        self.accepting = False
        lanes = self.streams.lanes()
        self.admission.fail_waiters(lanes, lambda: RunnerClosed(f"runner {self.name!r} closed"))
        self.lane.closed = True
        self.lane.wake()
        self.streams.close_all()

    async def aclose(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Close, let admitted items finish for up to ``timeout`` seconds (default: the
        ``close_timeout`` given to open; 0 fails them at once), fail what is left with
        :class:`RunnerClosed`, stop and join every thread and release the devices. Finished
        results are still delivered by ``async for``, which then ends (with the error only
        where items had to be failed). Idempotent; safe to call concurrently. Cancelled, it
        still releases everything (the joining finishes on a reaper thread)."""
        hub = self.hub if self.hub is not None else current_hub()
        if self.closing is not None:
            await hub.shield(self.closing)
            return
        self.closing = closing = hub.create_future()
        budget = self.close_timeout if timeout is None else timeout
        started = perf_counter()
        try:
            self.close()
            if self.state is State.STARTING:
                if self.opening:  # _open() sees the request and cleans up
                    await self.opened.wait(hub, budget)
                self.set_state(State.CLOSED)
                return
            if self.healer.recovering:  # closing beats recovering: fail what waits for it
                await self.healer.stop()
                if self.state is State.RECOVERING:  # nothing it held can finish now
                    self.healer.broken()
                    self.set_state(State.BROKEN)
                    self.fail_pending(RunnerClosed(f"runner {self.name!r} closed while "
                                                    f"recovering"))
            if self.state in (State.READY, State.BROKEN):
                if self.state is State.READY:
                    self.set_state(State.CLOSING)
                if budget > 0 and self.done.unfinished and self.failure is None:
                    self.done.idle = hub.create_future()
                    await hub.wait(self.done.idle, budget)
                self.stop_watchdog()
                if self.done.unfinished:
                    self.fail_pending(RunnerClosed(
                        f"runner {self.name!r} closed with {len(self.done.unfinished)} items "
                        f"unfinished"))
                if self.gen is not None:
                    left = budget - (perf_counter() - started)
                    hung = isinstance(self.failure, DeviceTimeout)
                    await self.gen.stop(0.1 if hung else max(left, 0.25))
            self.set_state(State.CLOSED)
        except BaseException:
            self.abort()
            raise
        finally:
            if not closing.done():
                closing.set_result(None)

    def abort(self) -> None:
        """Close now, without awaiting (cancelled aclose, garbage collection): fail what is
        pending, stop the threads, and release on a reaper thread if they need time."""
        self.input_closed = True
        self.stop_watchdog()
        self.fail_pending(RunnerClosed(f"runner {self.name!r} closed"))
        if self.gen is not None:
            self.gen.stop_soon()
        self.set_state(State.CLOSED)

    def stop_watchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()

    def collected(self, runner: object) -> None:
        """The runner was garbage-collected: warn if it was never closed, stop its threads."""
        if self.opening and self.state is not State.CLOSED:
            warnings.warn(f"runner {self.name!r} was never closed: use 'async with "
                          f"aioaccel.open(...)' or 'await runner.aclose()'",
                          ResourceWarning, source=runner, stacklevel=2)
            gen = self.gen
            if gen is not None:
                if sys.is_finalizing():
                    gen.pipeline.stop()
                else:
                    gen.stop_soon(join=0.0)

    def stop_now(self, timeout: float = 5.0) -> None:
        """Without a loop (it is gone): stop and join the worker threads, release the model.
        For test teardown and interpreter exit; items still pending are dropped."""
        self.input_closed = True
        self.set_state(State.CLOSED)
        if self.gen is not None:
            self.gen.stop_sync(timeout)

    def stop_at_exit(self, timeout: float) -> None:
        """Interpreter exit with the runner still open: stop it as :meth:`stop_now` does."""
        if self.state is not State.CLOSED:
            self.stop_now(timeout)
        exit_guard.forget(self, exit_guard.RUNNERS)

    @property
    def threads_alive(self) -> bool:
        """Whether any of the runner's worker threads is still running."""
        return self.gen is not None and not self.gen.pipeline.exited

    def is_in(self, state: State) -> bool:
        """``self.state is state``, re-read after an await (a plain test would be narrowed)."""
        return self.state is state

    def check_accepting(self, lane: Lane) -> None:
        if self.failure is not None:
            raise copy_for_waiter(self.failure)
        if self.input_closed:
            raise RunnerClosed(f"runner {self.name!r} is closed")
        if lane.closed:
            raise RunnerClosed(f"stream {lane.key!r} of runner {self.name!r} is closed")
        if self.state is not State.READY and self.state is not State.RECOVERING:
            raise RuntimeError(f"runner {self.name!r} is not open: use 'async with "
                               f"aioaccel.open(...) as runner' or 'await aioaccel.open(...)'")

    # ---- what the generation reports (on the loop) --------------------------------------
    def on_jobs(self, jobs: list[Job]) -> None:
        self.done.on_jobs(jobs)
        if self.healer.trial is not None:  # only on probation, after a failure
            self.healer.check_trial()
        default = self.lane
        if default.tickets and default.tickets[0].done:
            default.wake()

    def on_fatal(self, error: BaseException, stage: str, gen: Generation) -> None:
        if self.failure is not None and not isinstance(self.failure, RunnerClosed):
            return
        err = device_error(error, f"stage {stage!r} of runner {self.name!r}")
        if gen is not self.gen:  # a generation being replaced by reload
            self.healer.stale_fatal(err, gen)
        else:
            self.fatal(err)

    def on_hang(self, err: DeviceTimeout) -> None:
        if self.failure is None:
            self.fatal(err)

    def fatal(self, err: DeviceError) -> None:
        if self.healer.may_recover():
            self.stop_watchdog()
            self.healer.recover(err, self.gen)
        else:
            self.break_(err)

    def break_(self, err: DeviceError) -> None:
        """A fatal failure: every waiter gets ``err`` now; the threads are stopped."""
        log.error("runner %r is broken: %s", self.name, err)
        self.failure = err
        self.healer.last_error = err
        self.input_closed = True
        self.set_state(State.BROKEN)
        self.admission.fail_waiters(self.streams.lanes(), lambda: copy_for_waiter(err))
        self.healer.broken()
        self.fail_pending(err)
        self.stop_watchdog()
        if self.gen is not None:
            self.gen.pipeline.stop()

    def fail_pending(self, err: AccelError) -> None:
        lanes = self.streams.lanes()
        if not self.done.unfinished and not any(lane.tickets for lane in lanes):
            return
        if self.failure is None or isinstance(err, DeviceError):
            self.failure = err
        withdraw = self.gen.pipeline.withdraw if self.gen is not None else None
        self.done.fail_pending(self.failure, lanes, withdraw)
