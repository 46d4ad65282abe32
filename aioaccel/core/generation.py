"""The lifecycle of what a runner runs: load the model, start its pipeline, stop and release.

One :class:`Generation` is one loaded model with its running pipeline (a restart or a reload
makes a new one). Every way a generation ends goes through :meth:`Generation.stop` and
:meth:`Generation.release`:

* ``aclose`` / a failed open        -- on the loop: stop, wait (bounded) for the workers, join;
* cancellation, garbage collection  -- stop now; a reaper thread joins (bounded) and releases;
* no loop any more (pytest plugin, interpreter exit) -- :meth:`Generation.stop_sync`.

``release`` closes the shared stage objects and the model exactly once, whichever path gets
there first; threads that never stopped (a hung native call) are abandoned (daemon threads).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AccelError, DeviceError, DeviceTimeout, OpenTimeout, open_error
from . import exit_guard
from .async_library import Hub, Waiter, current_hub
from .exit_guard import native_thread
from .hang_watchdog import Watchdog
from .jobs import Job
from .loop_bridge import Bridge
from .stage_threads import Pipeline

if TYPE_CHECKING:
    from ..backends import Model
    from .jobs import Worker

__all__ = ["Generation", "load_on_thread", "open_generation", "zero_inputs"]

log = logging.getLogger("aioaccel")


class Generation:
    """One loaded model and its pipeline. It receives its own bridge's signals (so that two
    generations can run side by side during a reload) and passes finished jobs and fatal
    failures on to the runner."""

    def __init__(self, runner_name: str, model: Model, hub: Hub,
                 on_jobs: Callable[[list[Job]], None],
                 on_fatal: Callable[[BaseException, str, Generation], None],
                 maxsize: int, batch_wait: float = 0.0):
        self.runner_name = runner_name
        self.model = model
        self.hub = hub
        # weak: worker threads hold the bridge, which holds this; an abandoned runner must
        # stay collectable (to warn and stop its threads)
        self._on_jobs = weakref.WeakMethod(on_jobs)
        self._on_fatal = weakref.WeakMethod(on_fatal)
        self.bridge = Bridge(hub.call_soon_threadsafe, self, hub.call_later)
        self.pipeline = Pipeline(model.stages, self.bridge, runner_name, maxsize,
                                 batch=model.batch, batch_wait=batch_wait)
        self.ready: Waiter[None] = hub.create_future()
        self.exited: Waiter[None] = hub.create_future()
        #: jobs not handed back yet; counted down here, set by the runner when it matters
        #: (a reload waits for the old generation to drain), so submitting costs nothing
        self.outstanding = 0
        self.drained: Waiter[None] | None = None  # set when outstanding drops to 0
        self.warmup_seconds = 0.0
        self._warmups: dict[int, Waiter[None]] = {}
        #: until the warm-up is over, a fatal failure fails the start (open, reopen, reload)
        #: instead of reaching the runner
        self.starting = True
        self._start_failure: BaseException | None = None
        self._ready_count = 0
        self._release_lock = threading.Lock()
        self._released = False

    # ---- the runner's side ------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        self.pipeline.submit(job)

    def on_jobs(self, jobs: list[Job]) -> None:
        self.outstanding -= len(jobs)
        if self._warmups:
            jobs = [job for job in jobs if not self._warmed(job)]
        on_jobs = self._on_jobs()
        if on_jobs is not None and jobs:
            on_jobs(jobs)
        if self.outstanding <= 0 and self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def on_fatal(self, error: BaseException, stage: str) -> None:
        if self.starting:
            failure = DeviceError(f"stage {stage!r} of runner {self.runner_name!r} failed "
                                  f"fatally while it started (warm-up): {error!r}")
            failure.__cause__ = error
            self.fail_start(failure)
            return
        on_fatal = self._on_fatal()
        if on_fatal is not None:
            on_fatal(error, stage, self)

    def fail_start(self, error: BaseException) -> None:
        """A fatal failure (or a hang) while starting: whoever waits for the stages or the
        warm-up gets ``error`` now; the workers stop."""
        if self._start_failure is not None:
            return
        self._start_failure = error
        for fut in (self.ready, *self._warmups.values()):
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: a waiter that is gone logs nothing
        self.pipeline.stop()

    async def warm_up(self, count: int, inputs: Any = None,
                      call_timeout: float | None = None) -> float:
        """Run ``count`` inferences on ``inputs`` (default: zeros of the model's input spec)
        before any user item; returns the seconds it took. A per-item failure is logged; a
        fatal one, or a call hung past ``call_timeout``, raises."""
        if count <= 0:
            return 0.0
        if self._start_failure is not None:
            raise self._start_failure
        sample = zero_inputs(self.model) if inputs is None else inputs
        if self.model.prepare is not None and sample is not None:
            sample = self.model.prepare(sample)
        started = perf_counter()
        futures = []
        for n in range(count):
            seq = -1 - n  # never a user item's seq
            fut: Waiter[None] = self.hub.create_future()
            self._warmups[seq] = fut
            futures.append(fut)
            self.outstanding += 1
            self.submit(Job(seq, sample))
        watchdog = None
        if call_timeout is not None:
            watchdog = Watchdog(self.hub, call_timeout, self.runner_name, self._on_hang)
            watchdog.watch(self.pipeline)
        try:
            # every future's outcome is retrieved (a failure is set on all of them at once,
            # by fail_start); the first failure wins
            outcomes = await self.hub.gather(*futures, return_exceptions=True)
        finally:
            if watchdog is not None:
                watchdog.stop()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return perf_counter() - started

    def _on_hang(self, error: DeviceTimeout) -> None:
        self.fail_start(DeviceTimeout(f"during the warm-up: {error}"))

    def _warmed(self, job: Job) -> bool:
        fut = self._warmups.pop(job.seq, None)
        if fut is None:
            return False
        if job.error is not None:
            log.warning("runner %r: warm-up inference failed: %r", self.runner_name, job.error)
        if not fut.done():
            fut.set_result(None)
        return True

    # ---- starting ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the workers and wait until every stage object is made (or one failed)."""
        self.pipeline.start()
        await self.hub.shield(self.ready)

    def on_ready(self, worker: Worker, error: BaseException | None) -> None:
        if self.ready.done():
            return
        if error is not None:
            self.ready.set_exception(open_error(
                error, f"making stage {worker.spec.name!r} of runner {self.runner_name!r}"))
            return
        self._ready_count += 1
        if self._ready_count == len(self.pipeline.workers):
            self.ready.set_result(None)

    def on_worker_exit(self, worker: Worker) -> None:
        if not self.exited.done() and self.pipeline.exited:
            self.exited.set_result(None)

    # ---- stopping ---------------------------------------------------------------------------
    async def stop(self, wait: float) -> None:
        """Stop the workers, wait up to ``wait`` seconds for them, join, release. Cancelled, it
        still releases (a reaper thread finishes the job)."""
        self.pipeline.stop()
        try:
            if not self.pipeline.exited:
                await self.hub.wait(self.exited, max(wait, 0.0))
        except BaseException:
            self.stop_soon()
            raise
        self._finish()

    def stop_soon(self, join: float = 0.1) -> None:
        """Stop without awaiting: join briefly here, and if threads are still running let a
        reaper thread wait for them and release."""
        self.pipeline.stop()
        if not self.pipeline.join(join):
            self._finish()
            return
        # a plain daemon thread, not joined at exit: it waits for workers the runner gave up on
        # (a hung call), which must not hold the exit; native calls in progress are waited for
        # by the exit hook itself (exit_guard's STAGES phase)
        threading.Thread(target=self.stop_sync, name=f"aioaccel-{self.runner_name}-reaper",
                         daemon=True).start()

    def stop_sync(self, timeout: float = 5.0) -> None:
        """Without the loop: stop, join (bounded), release."""
        self.pipeline.stop()
        self.pipeline.join(timeout)
        self._finish()

    def _finish(self) -> None:
        # Workers that signalled their exit are past every stage call: joining them returns
        # at once. The others are stuck in a call and are abandoned.
        for w in self.pipeline.workers:
            if w.exited and w.thread is not None:
                w.thread.join(1.0)
        hung = [w.thread.name for w in self.pipeline.workers
                if not w.exited and w.thread is not None]
        if hung:
            log.warning("runner %r: threads %s did not stop; abandoned (daemon threads)",
                        self.runner_name, hung)
        else:
            exit_guard.forget(self.pipeline, exit_guard.PIPELINES)
        self.release(stages=not hung)

    def release(self, stages: bool = True) -> None:
        """Close the shared stage objects (only when no worker can still be inside them) and
        the model, once."""
        with self._release_lock:
            if self._released:
                return
            self._released = True
        if stages:
            self.pipeline.close_shared()
        close = self.model.close
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("runner %r: releasing the model failed", self.runner_name)


def zero_inputs(model: Model) -> Any:
    """Zeros shaped by the model's input spec (dynamic dimensions as 1); None without a spec."""
    specs = model.inputs
    if not specs or any(spec.shape is None for spec in specs):
        return None
    return {spec.name: np.zeros([1 if d is None else d for d in spec.shape or ()], spec.dtype)
            for spec in specs}


async def load_on_thread(load: Callable[[], Model], runner_name: str,
                         hub: Hub | None = None) -> Model:
    """Run a backend's ``load`` on a named thread (it imports runtimes and compiles models:
    seconds of blocking work). If the caller is cancelled meanwhile, the model is closed as soon
    as the load finishes, on that thread: an abandoned load leaks nothing."""
    if hub is None:
        hub = current_hub()
    wake = hub.call_soon_threadsafe
    fut: Waiter[Any] = hub.create_future()
    lock = threading.Lock()
    abandoned = False

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def main() -> None:
        try:
            outcome: tuple[bool, Any] = (True, load())
        except BaseException as exc:  # any type: StopIteration cannot be set on a Future
            outcome = (False, open_error(exc, f"loading the model of runner {runner_name!r}"))
        with lock:
            if abandoned:
                if outcome[0] and outcome[1].close is not None:
                    try:
                        outcome[1].close()
                    except Exception:
                        log.exception("runner %r: releasing an abandoned model failed",
                                      runner_name)
                return
        try:
            wake(settle, *outcome)
        except RuntimeError:  # the loop is gone
            if outcome[0] and outcome[1].close is not None:
                outcome[1].close()

    started = perf_counter()
    # joined at interpreter exit: a program may leave while the model compiles (native code)
    thread = native_thread(main, name=f"aioaccel-{runner_name}-load")
    try:
        model: Model = await fut
    except BaseException:
        with lock:
            abandoned = True
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            model = fut.result()  # it arrived as we were cancelled: release it here
            if model.close is not None:
                model.close()
        raise
    thread.join()  # it has delivered its outcome: returns at once
    model.info.setdefault("load_seconds", perf_counter() - started)
    return model


async def open_generation(runner_name: str, load: Callable[[], Model], hub: Hub,
                          on_jobs: Callable[[list[Job]], None],
                          on_fatal: Callable[[BaseException, str, Generation], None], *,
                          maxsize: int, batch_wait: float, warmup: int = 0,
                          warmup_inputs: Any = None, open_timeout: float | None = None,
                          call_timeout: float | None = None) -> Generation:
    """Load the model (on a thread), start its pipeline and warm it up: a runner's open, a
    restart's reopen and a reload all go through here. Whatever fails, nothing is left
    running (a load still running is abandoned and releases its model when it ends).

    Every step is bounded: the whole by ``open_timeout`` (:class:`~aioaccel.OpenTimeout`,
    naming the step), each warm-up call by ``call_timeout`` (:class:`~aioaccel.DeviceTimeout`);
    a fatal failure while starting raises at once."""
    step = "loading the model"
    gen: Generation | None = None
    try:
        async with hub.timeout(open_timeout):
            model = await load_on_thread(load, runner_name, hub)
            gen = Generation(runner_name, model, hub, on_jobs, on_fatal, maxsize, batch_wait)
            step = "making the stages"
            await gen.start()
            step = f"the warm-up ({warmup} inferences)"
            gen.warmup_seconds = await gen.warm_up(warmup, warmup_inputs, call_timeout)
    except BaseException as exc:
        if gen is not None:
            gen.stop_soon()
        if isinstance(exc, TimeoutError) and not isinstance(exc, AccelError):
            raise OpenTimeout(f"opening runner {runner_name!r}: {step} did not finish within "
                              f"open_timeout={open_timeout} s") from None
        raise
    gen.starting = False  # fatal failures go to the runner from now on
    return gen
