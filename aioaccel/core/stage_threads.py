"""Stages in order, each on its own worker threads, with hand-offs between them.

Data path of one job (the thread-side half of an admitted item)::

    Runner.push -> queue[0] -> stage 0 worker -> queue[1] -> ... -> last stage -> Bridge.deliver

Hand-offs are ``queue.SimpleQueue`` (C, lock-free for the caller). They need no bound of their
own: the runner admits at most ``maxsize`` items and a withdrawn item keeps its slot until a
stage-0 worker hands its empty shell back, so no queue ever holds more than ``maxsize``.
A failed job skips the remaining stages and goes straight to the bridge.

Stage 0's hand-off serves the highest priority first once the runner has streams of more than
one priority (:meth:`Pipeline.rank`, :mod:`aioaccel.core.priority_levels`); until then it is
the plain FIFO.

Worker threads never touch the event loop except through the
:class:`~aioaccel.core.loop_bridge.Bridge`, and never touch the loop-side ticket of a job: only
the :class:`Job` crosses threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from queue import Empty, SimpleQueue
from time import perf_counter
from typing import Any, Protocol

from ..errors import DeviceError
from ..stages import BlockingStage, DeviceStage, StageSpec
from ..stats import StageStats
from . import exit_guard
from .batch_gather import Batch, BatchCounters, batch_of, gather, run_alone, run_batch
from .jobs import QUEUED, RUNNING, WITHDRAWN, Job, Worker
from .loop_bridge import SHORT_CALL, Bridge
from .priority_levels import BELL, PriorityLevels

__all__ = ["Job", "Pipeline", "Worker"]  # Job, Worker: re-exported from .jobs

log = logging.getLogger("aioaccel")

_STOP = object()


def defer_depth(maxsize: int) -> int:
    """Queued input above which a worker that just finished a short call may defer the
    loop's wake-up (see :mod:`aioaccel.core.loop_bridge`): a quarter of the window, so a
    burst of up to three quarters of it shares one wake-up."""
    return maxsize // 4


class _Forward(Protocol):
    def __call__(self, job: Job, now: float, defer: bool = False) -> None: ...


class Pipeline:
    def __init__(self, specs: list[StageSpec], bridge: Bridge, runner_name: str, maxsize: int,
                 batch: int = 1, batch_wait: float = 0.0):
        self.specs = specs
        #: stage 0 groups up to ``batch`` rows per call (1: no batching); see .batch_gather
        self.batch = batch
        self.batch_wait = batch_wait
        self.batching = BatchCounters(batch) if batch > 1 else None
        # A worker may defer the loop's wake-up only while it has more than this much input
        # queued: that much keeps it busy while the loop consumes and refills (a batch of the
        # whole window would leave it idle during the loop's turn). A quarter of the window,
        # not half: each wake-up whose turn overlaps the worker's return from its native call
        # makes the two threads fight for the GIL (two futex hand-offs, ~10-20 us each on
        # this VM), and a 30 us stage at maxsize=8 lost more to those than to the shorter
        # cushion (docs/performance.md, "30 us streaming: the wake-ups").
        self.defer_depth = defer_depth(maxsize)
        self.bridge = bridge
        self.runner_name = runner_name
        self.queues: list[SimpleQueue[Any]] = [SimpleQueue() for _ in specs]
        #: stage 0's jobs by priority, once ranked (None: queues[0] holds the jobs, FIFO)
        self.ranks: PriorityLevels | None = None
        #: how a job enters stage 0: the FIFO's put, or the levels' once ranked
        self.put: Callable[[Job], None] = self.queues[0].put
        self.workers = [
            Worker(i, spec, r)
            for i, spec in enumerate(specs)
            for r in range(1 if spec.device else spec.replicas)
        ]
        self.stopping = False
        self._claim_lock = threading.Lock()
        self._shared: dict[int, Any] = {}   # stage objects shared by replicas: closed once
        self.started_at = 0.0

    # ---- called on the loop -------------------------------------------------------------
    def stage_stats(self) -> tuple[float, tuple[StageStats, ...], int]:
        """Seconds since start, each stage's figures, and the duplicate completions seen."""
        now = perf_counter()
        elapsed = now - self.started_at if self.started_at else 0.0
        stages = []
        duplicates = 0
        for i, spec in enumerate(self.specs):
            ws = [w for w in self.workers if w.index == i]
            busy = sum(w.busy for w in ws)
            if spec.device:  # include the current busy stretch
                busy += sum(now - w.busy_since for w in ws if w.in_device)
            duplicates += sum(w.duplicates for w in ws)
            stages.append(StageStats(
                name=spec.name, kind="device" if spec.device else "blocking", workers=len(ws),
                queue_depth=self.queues[i].qsize(),
                busy=min(1.0, busy / (elapsed * len(ws))) if elapsed and ws else 0.0,
                calls=sum(w.calls for w in ws), in_device=sum(w.in_device for w in ws)))
        return elapsed, tuple(stages), duplicates

    def start(self) -> None:
        self.started_at = perf_counter()
        for w in self.workers:
            name = f"aioaccel-{self.runner_name}-{w.spec.name}-{w.replica}"
            w.thread = threading.Thread(target=self._thread_main, args=(w,), name=name, daemon=True)
            w.thread.start()
        # stopped and joined at interpreter exit even if no runner holds it any more (still
        # opening, warming up, or left behind by a restart): its workers call into runtimes
        exit_guard.watch(self, exit_guard.PIPELINES)

    def submit(self, job: Job) -> None:
        self.put(job)

    def rank(self) -> None:
        """From now on stage 0 takes the highest-priority job first (FIFO within a priority).
        Called on the loop when the runner gets a stream of a second priority: the jobs
        already queued move to their levels, in their order; a job a worker is taking right
        now is simply run (it was first in line)."""
        if self.ranks is not None:
            return
        queue = self.queues[0]
        ranks = PriorityLevels(queue)
        moved: list[Any] = []
        while True:
            try:
                moved.append(queue.get_nowait())
            except Empty:
                break
        self.ranks = ranks  # before any bell: a worker that takes one finds the levels
        self.put = ranks.put
        for item in moved:
            if isinstance(item, Job) and not item.solo:
                ranks.put(item)
            else:  # the stop sentinel, a failed batch's member back to run alone
                queue.put(item)

    def _ranked(self) -> Job:
        """The job a bell stands for: the oldest of the highest priority waiting."""
        ranks = self.ranks
        assert ranks is not None  # bells are rung only once ranked
        return ranks.take()

    def _put_back(self, job: Job) -> None:
        ranks = self.ranks
        assert ranks is not None
        ranks.put_back(job)

    def withdraw(self, job: Job) -> bool:
        """Take back a job no stage-0 worker has claimed yet; False if one already has. Its
        empty shell still comes back through the bridge when a worker reaches it."""
        with self._claim_lock:
            if job.state == QUEUED:
                job.state = WITHDRAWN
                job.value = None  # free the input now
                return True
            return False

    def stop(self) -> None:
        """Ask every worker to exit; jobs still queued are skipped (the runner failed them)."""
        if self.stopping:
            return
        self.stopping = True
        for w in self.workers:
            self.queues[w.index].put(_STOP)

    @property
    def exited(self) -> bool:
        return all(w.exited for w in self.workers)

    def stop_at_exit(self, timeout: float) -> None:
        """Interpreter exit: stop the workers and join them (bounded)."""
        self.stop()
        self.join(timeout)

    def join(self, timeout: float | None = None) -> list[str]:
        """Join the worker threads (bounded); the names of those still running."""
        deadline = None if timeout is None else perf_counter() + timeout
        for w in self.workers:
            if w.thread is not None:
                w.thread.join(None if deadline is None else max(0.0, deadline - perf_counter()))
        return [w.thread.name for w in self.workers if w.thread is not None and w.thread.is_alive()]

    def close_shared(self) -> None:
        """Close the stage objects that several replicas shared, once, after they all exited."""
        shared, self._shared = self._shared, {}
        for name, stage in shared.values():
            _close_stage(stage, name, self.runner_name)

    # ---- worker threads -----------------------------------------------------------------
    def _claim(self, job: Job) -> bool:
        with self._claim_lock:
            if job.state != QUEUED:
                return False
            job.state = RUNNING
            return True

    def _claim_many(self, jobs: list[Job]) -> list[Job]:
        """Claim ``jobs`` under one lock (a batch's worth, not a lock per job); the withdrawn
        ones go back as shells. Returns the claimed ones, in order."""
        claimed: list[Job] = []
        shells: list[Job] = []
        with self._claim_lock:
            for job in jobs:
                if job.state == QUEUED:
                    job.state = RUNNING
                    claimed.append(job)
                else:
                    shells.append(job)
        for job in shells:
            self._return_shell(job)
        return claimed

    def _forward(self, index: int) -> _Forward:
        """Where jobs leaving stage ``index`` go: the next queue, or the bridge.

        ``defer``: the caller has more input queued and this call was short, so the loop's
        wake-up may wait for the next result (see ``bridge.COALESCE_WINDOW``).
        """
        deliver = self.bridge.deliver
        # a bridge without deliver_many (an isolated child's, which writes each result to
        # its pipe) gets the members one by one, each deferred but the last
        deliver_many = getattr(self.bridge, "deliver_many", None)

        def leave(job: Any, now: float, defer: bool = False) -> None:
            if type(job) is Batch:  # the split happens once, as the batch leaves
                members = job.unbatch(now)
                if deliver_many is not None:
                    deliver_many(members, now, defer)  # one append, one wake-up at most
                    return
                for member in members[:-1]:
                    deliver(member, now, True)
                deliver(members[-1], now, defer)
            else:
                job.t_done = now
                deliver(job, now, defer)

        if index == len(self.specs) - 1:
            return leave
        put = self.queues[index + 1].put

        def forward(job: Job, now: float, defer: bool = False) -> None:
            if job.error is not None:
                leave(job, now, defer)
            else:
                put(job)
        return forward

    def _fatal(self, exc: BaseException, stage: str) -> None:
        self.bridge.fatal(exc, stage)

    def _return_shell(self, job: Job) -> None:
        """A withdrawn job's empty shell goes straight back to the loop, which frees its slot
        then: no later stage may run it (its inputs are gone)."""
        self.bridge.deliver(job, perf_counter())

    def _make_stage(self, w: Worker) -> Any:
        spec = w.spec
        if not spec.shared or spec.replicas == 1:
            return spec.factory()
        with self._claim_lock:  # one object for every replica: made once, closed once
            if w.index not in self._shared:
                self._shared[w.index] = (spec.name, spec.factory())
            return self._shared[w.index][1]

    def _thread_main(self, w: Worker) -> None:
        stage: Any = None
        try:
            try:
                stage = self._make_stage(w)
                if isinstance(stage, DeviceStage):
                    stage.start(self._completion(w))
            except BaseException as exc:  # report, then leave: the runner fails its open
                self.bridge.ready(w, exc)
                return
            self.bridge.ready(w, None)
            run = stage.run if isinstance(stage, BlockingStage) else stage
            if isinstance(stage, DeviceStage):
                self._feed_device(w, stage)
            elif w.index == 0 and self.batching is not None:
                self._run_batched(w, run)
            else:
                self._run_blocking(w, run)
        except BaseException as exc:  # a bug here must not strand the waiters
            self._fatal(exc, w.spec.name)
        finally:
            try:
                if stage is not None and not (w.spec.shared and w.spec.replicas > 1):
                    _close_stage(stage, w.spec.name, self.runner_name)
            finally:
                w.exited = True  # whatever close did: aclose must not wait for this thread
                self.bridge.exited(w)

    def _next(self, w: Worker, queue: SimpleQueue[Any]) -> Any:
        """The next job for ``w``; before blocking on an empty queue, flush any deferred
        wake-up so that no finished result waits for input that may never come."""
        try:
            job = queue.get_nowait()
        except Empty:
            self.bridge.flush()
            job = queue.get()
        return self._ranked() if job is BELL else job

    def _take(self, w: Worker, job: Any, first: bool) -> bool:
        """Whether ``w`` should run ``job``; a withdrawn shell goes back to free its slot."""
        if job is _STOP:
            raise _Stopped
        if self.stopping:
            return False
        if first:
            if job.solo and job.state == RUNNING:
                return True  # a member of a failed batch, back to run on its own
            if not self._claim(job):
                self._return_shell(job)
                return False
            job.t_start = perf_counter()
        return True

    def _run_blocking(self, w: Worker, run: Callable[[Any], Any]) -> None:
        # The hot loop: everything it calls is bound to a local, nothing is a method call
        # that could be inlined (this thread competes with the loop for the GIL).
        queue = self.queues[w.index]
        get, get_nowait, pending, depth = queue.get, queue.get_nowait, queue.qsize, self.defer_depth
        flush, claim, shell = self.bridge.flush, self._claim, self._return_shell
        forward = self._forward(w.index)
        first = w.index == 0
        name = w.spec.name
        while True:
            try:
                job = get_nowait()
            except Empty:
                flush()  # about to wait: no deferred result may wait with us
                job = get()
            if job is BELL:
                job = self._ranked()
            elif job is _STOP:
                return
            if self.stopping:
                continue
            if first and not claim(job):
                shell(job)
                continue
            t0 = w.call_started = perf_counter()
            if first:
                job.t_start = t0
            try:
                job.value = run(job.value)
            except DeviceError as exc:
                self._fatal(exc, name)
                return
            except Exception as exc:
                if type(job) is Batch:  # a batch from stage 0: its members run alone now
                    try:
                        self._run_members(w, run, job, forward, t0)
                    except BaseException as fatal:  # DeviceError and the like
                        self._fatal(fatal, name)
                        return
                    continue
                job.error = exc
                job.failed_stage = name
            except BaseException as exc:  # SystemExit, KeyboardInterrupt: nothing sane remains
                self._fatal(exc, name)
                return
            t1 = perf_counter()
            w.call_started = 0.0
            w.busy += t1 - t0
            job.work += t1 - t0
            w.calls += 1
            job.at = w.index + 1
            forward(job, t1, t1 - t0 < SHORT_CALL and pending() > depth)

    def _run_members(self, w: Worker, run: Callable[[Any], Any], batch: Batch,
                     forward: _Forward, t0: float) -> None:
        """A batched call of a later stage failed: run each member on its own rows, so only
        the members that fail on their own fail (and the others keep their results)."""
        if self.batching is not None:
            self.batching.fallbacks += 1
        batch.work += perf_counter() - t0  # the failed call counts as the members' work
        members = batch.members_at(w.index)
        for member in members:
            if member.error is None:
                run_alone(run, member, w.spec.name)
            w.calls += 1
            member.at = w.index + 1
        now = perf_counter()
        w.call_started = 0.0
        w.busy += now - t0
        for member in members:
            forward(member, now)

    def _run_batched(self, w: Worker, run: Callable[[Any], Any]) -> None:
        """Stage 0 with batching: each call takes what is queued, up to ``batch`` rows."""
        queue = self.queues[0]
        get, get_nowait, flush, claim = queue.get, queue.get_nowait, self.bridge.flush, self._claim
        forward = self._forward(0)
        counters = self.batching
        assert counters is not None
        siblings = [o for o in self.workers if o.index == 0 and o is not w]

        shell = self._return_shell

        def device_busy() -> bool:
            return any(o.call_started for o in siblings)

        name = w.spec.name
        following: Any = None
        while True:
            if following is not None:
                job, following = following, None
            else:
                try:
                    job = get_nowait()
                except Empty:
                    flush()
                    job = get()
                if job is BELL:
                    job = self._ranked()
            if job is _STOP:
                return
            if self.stopping:
                continue
            if not claim(job):
                shell(job)
                continue
            jobs, following = gather(job, get_nowait, get, self.batch,
                                     job.t_admit + self.batch_wait, device_busy,
                                     self._claim_many, shell, _STOP, self._ranked,
                                     self._put_back)
            t0 = w.call_started = perf_counter()
            for j in jobs:
                j.t_start = t0
            try:
                out = run_batch(run, jobs, name, counters, t0)  # per-item errors stay inside
            except BaseException as exc:  # DeviceError, SystemExit, KeyboardInterrupt: fatal
                self._fatal(exc, name)
                return
            t1 = perf_counter()
            w.call_started = 0.0
            w.busy += t1 - t0
            w.calls += sum(job.items for job in jobs)  # items (a chunk's job holds several)
            for k, item in enumerate(out):
                forward(item, t1, k < len(out) - 1)

    def _feed_device(self, w: Worker, device: DeviceStage) -> None:
        queue = self.queues[w.index]
        forward = self._forward(w.index)
        first = w.index == 0
        batching = first and self.batching is not None
        name = w.spec.name
        by_stream = type(device).submit_stream is not DeviceStage.submit_stream
        following: Any = None
        try:
            while True:
                if following is not None:
                    job, following = following, None
                else:
                    job = self._next(w, queue)
                if not self._take(w, job, first):
                    continue
                tokens: list[Any] = [job]
                if batching and not job.solo:
                    jobs, following = gather(
                        job, queue.get_nowait, queue.get, self.batch,
                        job.t_admit + self.batch_wait, lambda: w.in_device > 0,
                        self._claim_many, self._return_shell, _STOP, self._ranked,
                        self._put_back)
                    tokens = batch_of(jobs, self.batching, perf_counter())  # type: ignore[arg-type]
                for token in tokens:
                    if not self._submit_one(w, device, token, by_stream, forward, name):
                        return
        except _Stopped:
            return

    def _submit_one(self, w: Worker, device: DeviceStage, job: Any, by_stream: bool,
                    forward: _Forward, name: str) -> bool:
        """Hand one job (or batch) to the device; False if the runner must stop (fatal)."""
        w.enter_device(job)
        job.work -= perf_counter()  # + the completion time: time on the device
        try:
            if by_stream:
                device.submit_stream(job, job.value, getattr(job, "stream", 0))
            else:
                device.submit(job, job.value)
        except DeviceError as exc:
            self._fatal(exc, name)
            return False
        except Exception as exc:  # the device refused this job only
            now = perf_counter()
            if w.leave_device(job, now):
                job.work += now
                if type(job) is Batch:  # only the members that fail on their own fail
                    self._rerun_alone(w, job)
                    return True
                job.error = exc
                job.failed_stage = name
                forward(job, now)
        except BaseException as exc:  # SystemExit, KeyboardInterrupt: fatal
            self._fatal(exc, name)
            return False
        return True

    def _completion(self, w: Worker) -> Callable[[object, Any, BaseException | None], None]:
        forward = self._forward(w.index)
        name = w.spec.name

        def complete(token: object, outputs: Any, error: BaseException | None) -> None:
            # Runs on the runtime's thread: it must never raise (an exception escaping an
            # OpenVINO callback makes a later start_async abort the process).
            try:
                if isinstance(error, DeviceError):  # the device is gone; token may be None
                    self._fatal(error, name)
                    return
                now = perf_counter()
                job: Any = token  # a Job, or a Batch of them
                if not w.leave_device(job, now):
                    log.warning("runner %r: stage %r completed item %s twice; ignored",
                                self.runner_name, name, getattr(job, "seq", "(a batch)"))
                    return
                job.work += now
                if error is not None and type(job) is Batch and not self.stopping:
                    self._rerun_alone(w, job)  # only the items that fail on their own fail
                    return
                if error is not None:
                    job.error = error
                    job.failed_stage = name
                else:
                    job.value = outputs
                if not self.stopping:
                    forward(job, now)
            except BaseException as exc:
                try:
                    self._fatal(exc, name)
                except BaseException:
                    pass

        return complete


    def _rerun_alone(self, w: Worker, batch: Batch) -> None:
        """A batched device call failed: its members go back to the same stage's queue, each
        with its own rows of what the batch brought to this stage, to run alone."""
        if self.batching is not None:
            self.batching.fallbacks += 1
        forward = self._forward(w.index)
        now = perf_counter()
        for member in batch.members_at(w.index):
            if member.error is not None:  # its rows could not be split out: it fails here
                member.failed_stage = w.spec.name
                forward(member, now)
            else:
                self.queues[w.index].put(member)


class _Stopped(Exception):
    """A worker took the stop sentinel."""


def _close_stage(stage: Any, name: str, runner_name: str) -> None:
    close = getattr(stage, "close", None)
    if close is None:
        return
    try:
        close()
    except BaseException:  # even KeyboardInterrupt: the thread ends either way
        log.exception("closing stage %r of runner %r failed", name, runner_name)
