"""Self-healing: the restart policy, its budget, the :class:`Healer` that runs a recovery or a
reload, and the health a runner reports.

With ``aioaccel.open(..., restart=Restart(...))`` a fatal failure (device lost, runtime
aborted, a hung call past ``call_timeout``) no longer breaks the runner for good. It enters
the *recovering* state: the failed pipeline is stopped (a hung thread is abandoned), the model
released, and after a backoff the model is opened again with the same options (which re-runs
device discovery: a USB Edge TPU changes its id after a reset). Items the failed device held are
re-run (``retries=N``) or fail with :class:`~aioaccel.DeviceError`; ``push`` and ``infer`` wait
meanwhile (bounded by their own timeouts). More than ``limit`` restart attempts within
``window`` seconds and the runner breaks as it would without a policy.

Poison items. The items a failed device held are *suspects*: after the reopen they are re-run
one at a time, in push order, with new items held back meanwhile (a short probation, only
after a failure). A suspect that breaks the device again while it runs alone has broken it
twice: it is failed alone as the poison item, never retried again, and the probation goes on
with the next suspect after the next reopen. So one poison item costs two restarts and fails
nobody else; without probation every item re-run beside it would share its fate.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import monotonic, perf_counter
from typing import TYPE_CHECKING, Any

from ..errors import DeviceError, DeviceTimeout, RunnerClosed
from ..options import check_count, check_seconds
from ..stats import LatencyHistogram
from .async_library import Flag
from .jobs import Job
from .lifecycle import State
from .streamed_chunk import expand_chunks

if TYPE_CHECKING:
    from ..backends import Model
    from .async_library import Hub, TaskHandle
    from .completion import Completions
    from .generation import Generation
    from .records import Ticket

__all__ = ["Healer", "Health", "Restart", "RestartBudget"]

log = logging.getLogger("aioaccel")

#: upper bounds (seconds) of the recovery-time histogram
RECOVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class Restart:
    """How a runner recovers from fatal failures.

    ``limit`` restart attempts within ``window`` seconds; the n-th consecutive attempt waits
    ``backoff * 2**(n-1)`` seconds first, at most ``max_backoff``.
    """

    limit: int = 3
    window: float = 60.0
    backoff: float = 0.2
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        check_count("Restart.limit", self.limit, 1)
        check_seconds("Restart.window", self.window, zero=False, infinite=True)
        check_seconds("Restart.backoff", self.backoff)
        check_seconds("Restart.max_backoff", self.max_backoff)


class RestartBudget:
    """Counts restart attempts in a sliding window and says how long to back off."""

    def __init__(self, policy: Restart):
        self.policy = policy
        self._attempts: deque[float] = deque()
        self.consecutive = 0  # attempts since the last successful recovery

    def allow(self, now: float | None = None) -> bool:
        """Record one attempt if the budget allows it."""
        now = monotonic() if now is None else now
        window = self.policy.window
        while self._attempts and now - self._attempts[0] > window:
            self._attempts.popleft()
        if len(self._attempts) >= self.policy.limit:
            return False
        self._attempts.append(now)
        self.consecutive += 1
        return True

    def delay(self) -> float:
        p = self.policy
        return float(min(p.max_backoff, p.backoff * 2 ** max(0, self.consecutive - 1)))

    def recovered(self) -> None:
        self.consecutive = 0


@dataclass(frozen=True)
class Health:
    """What ``runner.health()`` reports."""

    state: State                             #: the runner's state (see aioaccel.State)
    restarts: int = 0                        #: successful recoveries since open
    last_error: BaseException | None = None  #: the last fatal failure, if any
    since: float = 0.0                       #: wall-clock time the state began (time.time())
    last_completion: float | None = None     #: wall-clock time of the last result, if any
    #: seconds spent in each state since the runner was made
    state_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "ready"


class Healer:
    """Runs what a fatal failure or a reload sets off, on the loop: the items the failed
    generation held are re-run (``retries``) or failed; a task reopens the model after the
    policy's backoff and switches the runner to it; a reload opens the new model beside the old
    one and lets the old one drain.

    It acts on the runner only through the callables it is given (the runner's state machine
    stays in the runner): ``set_state``, ``break_`` (a failure it cannot recover from),
    ``open_generation(load)`` (load, start and warm up a model), ``switch_to(gen)`` (admission
    goes to it) and ``current()`` (the generation admission goes to now).
    """

    def __init__(self, name: str, done: Completions, load: Callable[[], Model], *,
                 restart: Restart | None, retries: int, close_timeout: float,
                 set_state: Callable[[State], None],
                 state: Callable[[], State], break_: Callable[[DeviceError], None],
                 open_generation: Callable[[Callable[[], Model]], Awaitable[Generation]],
                 switch_to: Callable[[Generation], None],
                 current: Callable[[], Generation | None],
                 set_submit: Callable[[Callable[[Job], None]], None] | None = None):
        self.name = name
        self._done = done
        self.load = load                          # a recovery reopens with it; reload replaces it
        self.budget = RestartBudget(restart) if restart is not None else None
        self.retries = retries
        self._close_timeout = close_timeout
        self._set_state = set_state
        self._state = state
        self._break = break_
        self._open_generation = open_generation
        self._switch_to = switch_to
        self._current = current
        self._set_submit = set_submit             # where admitted jobs go (held on probation)
        # probation (see the module docstring): suspects waiting to run alone, the one on
        # the device now, and the new jobs held back until the probation ends
        self._suspects: list[Ticket] = []
        self.trial: Ticket | None = None
        self._held: list[Job] = []
        self._held_seqs: set[int] = set()
        self.recovered = Flag(True)              # set while not recovering
        self.hub: Hub | None = None              # the running async library, set at open
        self._task: TaskHandle | None = None
        self._retry_queue: list[Ticket] = []      # held by a failed device, re-run next
        self.restarts = self.retried = self.poisoned = 0
        self.last_error: BaseException | None = None
        self.times = LatencyHistogram(RECOVERY_BUCKETS)

    def may_recover(self) -> bool:
        """A fatal failure now: recover (True, one attempt counted) or break (False)?"""
        return (self.budget is not None and self._state() in (State.READY, State.CLOSING)
                and self.budget.allow())

    # ---- recovering ---------------------------------------------------------------------
    def recover(self, err: DeviceError, old: Generation | None) -> None:
        """The failed generation stops at once, what it held is kept for a retry or failed,
        and a task reopens the model."""
        log.warning("runner %r: %s; recovering", self.name, err)
        self.last_error = err
        self._set_state(State.RECOVERING)
        self.recovered.clear()
        if old is not None:
            old.bridge.detach()
            old.pipeline.stop()
        self.retry_or_fail(err, old)
        assert self.hub is not None
        self._task = self.hub.spawn(self._reopen_after(err, old),
                                    name=f"aioaccel-{self.name}-recovery")

    def retry_or_fail(self, err: DeviceError, gen: Generation | None) -> None:
        """The items ``gen`` held: re-run (``retries``) on the next generation, or failed; a
        suspect that broke it while on probation alone is failed as the poison item."""
        done = self._done
        retry: list[Ticket] = []
        trial, self.trial = self.trial, None
        waiting = {t.seq for t in self._suspects} | self._held_seqs  # never on the device
        # a streamed chunk the device held: its items, each retried (or failed) on its own
        expand_chunks(done, lambda t: (t.gen is gen or gen is None) and t.seq not in waiting)
        for seq, ticket in list(done.unfinished.items()):
            if (ticket.gen is not gen and gen is not None) or seq in waiting:
                continue
            if ticket.withdrawn:
                del done.unfinished[seq]
                done.admission.release_many(ticket.lane, ticket.count)
                if ticket.lane is not done.default_lane and done.on_lane_released is not None:
                    done.on_lane_released(ticket.lane)  # a closed stream may be done now
            elif ticket is trial:
                del done.unfinished[seq]
                poison = DeviceError(
                    f"item {seq} broke the device twice (the second time re-run alone after "
                    f"a failure): failed as a poison item, not retried again: {err}")
                poison.__cause__ = err
                done.fail_one(ticket, poison)
                self.poisoned += 1
            elif ticket.retries < self.retries:
                ticket.retries += 1
                retry.append(ticket)
            else:
                del done.unfinished[seq]
                done.fail_one(ticket, err)
        self._retry_queue.extend(retry)
        if self._state() is State.READY:
            self._resubmit()
        done.check_idle()

    def _resubmit(self) -> None:
        """The items a failed device held go on probation: re-run one at a time, new jobs
        held back meanwhile (see the module docstring)."""
        queue, self._retry_queue = self._retry_queue, []
        gen = self._current()
        if gen is None:
            return
        for ticket in self._suspects:
            ticket.gen = gen
        for job in self._held:
            held = self._done.unfinished.get(job.seq)
            if held is not None:
                held.gen = gen
        self._suspects.extend(queue)
        self._suspects.sort(key=lambda t: t.seq)
        if self._suspects and self._set_submit is not None:
            self._set_submit(self._hold)
        self._next_trial()

    def _hold(self, job: Job) -> None:
        self._held.append(job)
        self._held_seqs.add(job.seq)

    def _next_trial(self) -> None:
        """Run the next suspect alone, or end the probation: the held jobs go on, in order."""
        gen = self._current()
        if gen is None:
            return
        unfinished = self._done.unfinished
        while self._suspects:
            ticket = self._suspects.pop(0)
            if unfinished.get(ticket.seq) is not ticket:
                continue  # failed or settled meanwhile (a close)
            job = Job(ticket.seq, ticket.inputs, ticket.lane.index, ticket.t_admit,
                      ticket.lane.priority)
            ticket.job = job
            ticket.gen = gen
            self.retried += 1
            if self._set_submit is not None:
                self.trial = ticket
            gen.submit(job)
            if self._set_submit is not None:
                return  # the next one when this one is settled (check_trial)
        self.trial = None
        if self._set_submit is not None:
            self._set_submit(gen.pipeline.put)
        held, self._held = self._held, []
        self._held_seqs.clear()
        for job in held:
            gen.submit(job)

    def check_trial(self) -> None:
        """After a burst of results: the suspect on probation settled? Then the next one."""
        trial = self.trial
        if trial is not None and self._done.unfinished.get(trial.seq) is not trial:
            self.trial = None
            self._next_trial()

    async def _reopen_after(self, err: DeviceError, old: Generation | None) -> None:
        started = perf_counter()
        budget, hub = self.budget, self.hub
        assert budget is not None and hub is not None
        if old is not None:  # release the device; a hung thread is abandoned, not awaited
            await old.stop(0.05 if isinstance(err, DeviceTimeout) else 0.5)
        while True:
            await hub.sleep(budget.delay())
            try:
                gen = await self._open_generation(self.load)
                break
            except hub.cancelled:
                raise
            except Exception as exc:
                log.warning("runner %r: reopening failed: %s", self.name, exc)
                self.last_error = exc
                if not budget.allow():
                    failure = DeviceError(f"runner {self.name!r} could not recover from {err}: "
                                          f"reopening failed: {exc}")
                    failure.__cause__ = exc
                    self._break(failure)
                    self.recovered.set()
                    return
        self._switch_to(gen)
        self.restarts += 1
        budget.recovered()
        self.times.add(perf_counter() - started)
        self._set_state(State.CLOSING if self._state() is State.CLOSING else State.READY)
        self._resubmit()
        self.recovered.set()
        log.warning("runner %r recovered in %.3f s", self.name, perf_counter() - started)

    @property
    def recovering(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Closing beats recovering: stop the recovery now (what waits for it fails)."""
        task = self._task
        if task is not None and not task.done() and self.hub is not None:
            task.cancel()
            await self.hub.join(task)

    def broken(self) -> None:
        """The runner broke: nothing will be re-run, whoever waited for a recovery wakes."""
        self._retry_queue.clear()
        self._suspects.clear()
        self._held.clear()
        self._held_seqs.clear()
        self.trial = None
        self.recovered.set()

    # ---- reloading ----------------------------------------------------------------------
    async def reload(self, load: Callable[[], Model]) -> None:
        """Open ``load``'s model beside the current one, switch admission to it, let the old
        one finish what it holds (bounded by ``close_timeout``), then close it."""
        gen = await self._open_generation(load)
        if self._state() is not State.READY:  # closed or failed meanwhile
            await gen.stop(1.0)
            raise RunnerClosed(f"runner {self.name!r} closed during the reload")
        old = self._current()
        self.load = load
        self._switch_to(gen)
        if old is None:
            return
        old.outstanding = sum(1 for t in self._done.unfinished.values() if t.gen is old)
        if old.outstanding > 0:
            hub = self.hub
            assert hub is not None
            old.drained = hub.create_future()
            if not await hub.wait(old.drained, self._close_timeout):
                log.warning("runner %r: the old model still held %d items after %s s",
                            self.name, old.outstanding, self._close_timeout)
        await old.stop(1.0)

    def stale_fatal(self, err: DeviceError, gen: Generation) -> None:
        """A generation being replaced by a reload failed: its items go to the new one."""
        gen.bridge.detach()
        gen.stop_soon()
        self.retry_or_fail(err, gen)

    def stats(self) -> dict[str, Any]:
        return {"restarts": self.restarts, "retried": self.retried,
                "recovery_buckets": self.times.cumulative(), "recovery_sum": self.times.sum}
