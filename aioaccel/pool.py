"""Device pools: several runners (accelerators of any kinds) behind one runner.

``aioaccel.pool(coral, igpu, cpu)`` returns a :class:`Pool`, which *is* a
:class:`~aioaccel.Runner`: push / push_nowait / ``async for`` in push order / infer / stream /
close / aclose / stats all keep their contracts. Underneath, the pool's pipeline has one
device stage (:class:`_Dispatch`) that hands each admitted item to a member runner, chosen by a
policy from :mod:`aioaccel.pool_policies`, and reports the member's result back as the device's
completion. The pool's own reordering puts results back in push order.

Threads and the loop: the stage's ``submit`` runs on the pool's feeder thread and only counts
capacity (under a lock) and queues the item in an inbox; one loop wake-up per burst moves the
inbox to the loop, where everything else happens -- routing, ``member.push_nowait``, one
consumer task per member reading that member's ``async for``, retries. Members are opened on
the loop while the pool's load (on its own thread) waits, and closed on the loop while the
feeder thread, leaving, waits.

A member that breaks gives back the items it still held (its ``async for`` yields the finished
prefix, then raises): each is re-run on another member, ``retries`` times at most (see
:data:`aioaccel.options.RETRIES`), so nothing is lost or answered twice.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from ._callable_module import make_callable
from .backends import Model
from .core import exit_guard
from .core.async_library import Flag, Hub, TaskHandle, current_hub, library_name
from .errors import AccelError, DeviceError, MemberLost, RunnerClosed, WouldBlock
from .options import check_count, check_seconds
from .pool_policies import FINAL, Balance, Failover, MemberView, NoMember, ServiceClock, make_policy
from .runner import Result, Runner
from .stages import Complete, DeviceStage, StageSpec, made
from .tensors import InputValidator, TensorSpec

__all__ = ["MemberLost", "MemberStats", "Pool", "agreed_specs", "pool"]

log = logging.getLogger("aioaccel")

#: how often the pool looks again at members that could not take an item (recovering ones)
_RECHECK = 0.005
#: the feeder may run this many times the members' capacity ahead: the items beyond it wait
#: on the loop, so a member that frees a slot is refilled at once, without the feeder's hop
_AHEAD = 2


@dataclass(frozen=True)
class MemberStats:
    """One member of a pool, as ``pool.member_stats()`` sees it."""

    index: int
    name: str
    state: str               #: "ready", "recovering", "broken", "closed" (member health)
    routed: int              #: items handed to this member (retries included)
    completed: int           #: results it gave back (successful or per-item failures)
    retried: int             #: items it held when it broke, handed to another member
    in_flight: int           #: items it holds now
    capacity: int            #: the member's maxsize
    service_time: float | None  #: measured seconds per item at load (None: not yet known)
    busy: float              #: fraction of the pool's open time it held at least one item
    latency_p50: float       #: the member's own latency (its admission to its completion)
    latency_p99: float


class _Job:
    __slots__ = ("attempts", "depth", "handed_at", "inputs", "token")

    def __init__(self, token: object, inputs: Any):
        self.token = token
        self.inputs = inputs
        self.attempts = 0     # members that broke while holding it
        self.handed_at = 0.0  # when it went to its current member
        self.depth = 0        # how many items that member held before it


class _Member:
    """The pool's book-keeping for one member runner (touched on the loop only)."""

    def __init__(self, index: int, runner: Runner):
        self.index = index
        self.runner = runner
        self.inflight: deque[_Job] = deque()   # in the member's push order = its result order
        self.clock = ServiceClock(runner.maxsize)
        self.lost: BaseException | None = None   # its async for raised: it is gone
        self.consumer: TaskHandle | None = None
        self.routed = self.completed = self.retried = 0
        self.busy_total = 0.0
        self.busy_since = 0.0

    @property
    def label(self) -> str:
        return f"member {self.index} ({self.runner.name!r})"

    def state(self) -> str:
        if self.lost is not None:
            return "broken"
        return str(self.runner.health().state)  # "recovering" while a self-healing one restarts

    def view(self) -> MemberView:
        return MemberView(self.index, self.state(), len(self.inflight), self.runner.maxsize,
                          self.clock.value, self.clock.latencies)

    def busy(self, now: float, elapsed: float) -> float:
        total = self.busy_total + (now - self.busy_since if self.inflight else 0.0)
        return min(1.0, total / elapsed) if elapsed > 0 else 0.0


class _Dispatch(DeviceStage):
    """The pool's one stage: routes items to members and completes them with their results."""

    def __init__(self, runners: Sequence[Runner], policy: Balance | Failover, retries: int):
        self.members = [_Member(i, r) for i, r in enumerate(runners)]
        self.policy = policy
        self.retries = retries
        self.pool_name = ""
        self.close_timeout = 10.0
        self.hub: Hub | None = None  # the running async library, set when the pool opens
        self._complete: Complete | None = None
        # feeder thread <-> loop: capacity, and the inbox of submitted jobs
        self._cond = threading.Condition()
        self._pending = 0            # submitted and not yet completed
        self._room = sum(r.maxsize for r in runners)  # capacity of the members still alive
        self._dead: AccelError | None = None
        self._inbox: deque[_Job] = deque()
        self._scheduled = False
        # loop side
        self._backlog: deque[_Job] = deque()   # submitted, waiting for a member
        self._recheck: Any = None              # a timer handle (hub.call_later)
        self._opened_at = 0.0
        self._members_closed = False
        self._closers: list[TaskHandle] = []
        self._opening: Flag | None = None      # set once opening the members has ended

    # ---- open: on the pool's load thread, members opened on the loop ---------------------
    def load(self) -> Model:
        hub = self.hub
        if hub is None:
            raise RuntimeError("open the pool with 'async with aioaccel.pool(...)' or "
                               "'await aioaccel.pool(...)'")
        inputs, outputs = hub.run_threadsafe(self._open_members).result()
        return Model(
            stages=[StageSpec("pool", made(self), device=True)],
            inputs=inputs, outputs=outputs,
            prepare=InputValidator(inputs) if inputs is not None else None,
            close=self._release,
            info={"backend": "pool", "policy": self.policy.name,
                  "members": [m.runner.name for m in self.members]},
            profile=self._profile,
        )

    async def _open_members(self) -> tuple[list[TensorSpec] | None, list[TensorSpec] | None]:
        hub = self.hub
        assert hub is not None
        opening = self._opening = Flag()
        try:
            return await self._open_all(hub)
        finally:
            opening.set()

    async def _open_all(self, hub: Hub) -> tuple[list[TensorSpec] | None,
                                                 list[TensorSpec] | None]:
        outcomes = await hub.gather(*(_open(m.runner) for m in self.members),
                                    return_exceptions=True)
        try:
            for member, outcome in zip(self.members, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    raise _named(outcome, f"pool {self.pool_name!r}: {member.label} failed "
                                          f"to open")
            runners = [m.runner for m in self.members]
            specs = agreed_specs(runners, "inputs"), agreed_specs(runners, "outputs")
        except BaseException:
            await hub.gather(*(m.runner.aclose() for m in self.members),
                             return_exceptions=True)
            self._members_closed = True
            raise
        self._opened_at = perf_counter()
        for m in self.members:
            m.consumer = hub.spawn(self._consume(m),
                                   name=f"aioaccel-{self.pool_name}-member{m.index}")
        return specs

    # ---- DeviceStage, on the pool's feeder thread -----------------------------------------
    def start(self, complete: Complete) -> None:
        self._complete = complete

    def submit(self, token: object, inputs: Any) -> None:
        with self._cond:
            while self._pending >= _AHEAD * self._room and self._dead is None:
                # every live member is full: the feeder waits (backpressure) for a completion
                if not self._cond.wait(0.5) and self.hub.closed():  # type: ignore[union-attr]
                    raise DeviceError(f"pool {self.pool_name!r}: its event loop is closed")
            if self._dead is not None:
                raise self._dead
            self._pending += 1
            self._inbox.append(_Job(token, inputs))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.hub.call_soon_threadsafe(self._take_inbox)  # type: ignore[union-attr]
        except RuntimeError as exc:  # the loop is gone
            raise DeviceError(f"pool {self.pool_name!r}: its event loop is closed") from exc

    def close(self) -> None:
        """Close every member (on the loop; this feeder thread waits for it)."""
        hub = self.hub
        if self._members_closed or hub is None:
            return
        # no loop left, or the interpreter is exiting (a loop on another thread would drain
        # them for close_timeout while the exit waits): stop their threads here
        if hub.closed() or not hub.running() or exit_guard.exiting():
            self._members_closed = True
            for m in self.members:
                m.runner.stop_now()
            return
        budget = self.close_timeout + 5.0  # the pool drained first: members have little left
        try:
            hub.run_threadsafe(self._close_members).result(budget)
        except Exception:
            log.exception("pool %r: closing its members failed", self.pool_name)

    # ---- loop side ------------------------------------------------------------------------
    def _take_inbox(self) -> None:
        with self._cond:
            self._scheduled = False
            jobs = list(self._inbox)
            self._inbox.clear()
        self._backlog.extend(jobs)
        self._route()

    def _route(self) -> None:
        """Hand waiting jobs to members, as the policy says, while the chosen member has room."""
        backlog = self._backlog
        members = self.members
        if any(m.lost is None and m.runner.closed and m.state() in FINAL for m in members):
            # A member broke and its consumer has not taken back what it held yet: wait for
            # that (it is already woken), so those items, the oldest, are placed first.
            return
        if backlog and self._dead is None:
            try:
                plan = self.policy.plan([m.view() for m in members], len(backlog))
            except NoMember:
                self._all_lost()
                return
            if any(target is not None for target in plan):
                kept: list[_Job] = []
                for target in plan:
                    job = backlog.popleft()
                    if target is None or not self._hand(members[target], job):
                        kept.append(job)  # for a member to finish one, or to be ready
                backlog.extendleft(reversed(kept))  # back in front, in their order
        if backlog and self._recheck is None and self._dead is None and self.hub is not None:
            self._recheck = self.hub.call_later(_RECHECK, self._recheck_now)

    def _recheck_now(self) -> None:
        self._recheck = None
        self._route()

    def _hand(self, member: _Member, job: _Job) -> bool:
        """Push ``job`` into ``member``; False if it could not take it now (job not consumed)."""
        try:
            member.runner.push_nowait(job.inputs, tag=job)
        except (WouldBlock, RunnerClosed, DeviceError):
            # full (a self-healing member holding its slots) or gone: its consumer reports
            # a loss; either way the job waits and the pool looks again shortly
            return False
        except Exception as exc:  # it refuses this input (InputError &c.): a per-item failure
            self._finish(job, None, exc)
            return True
        now = perf_counter()
        depth = len(member.inflight)
        if not depth:
            member.busy_since = now
        member.clock.started(now, depth)
        job.handed_at, job.depth = now, depth
        member.inflight.append(job)
        member.routed += 1
        return True

    async def _consume(self, member: _Member) -> None:
        """Read one member's results (its push order) and complete the pool's items."""
        try:
            async for result in member.runner:
                self._on_result(member, result)
            if not self._members_closed:  # closed behind the pool's back: it is gone too
                self._lose(member, RunnerClosed(f"{member.label} was closed"))
        except AccelError as exc:  # the member broke (its finished prefix came first)
            self._lose(member, exc)
        except Exception as exc:  # a bug here must not strand the pool's items
            log.exception("pool %r: reading %s failed", self.pool_name, member.label)
            self._lose(member, exc)

    def _on_result(self, member: _Member, result: Result) -> None:
        job = member.inflight.popleft()
        assert result.tag is job, "a member's results come in its push order"
        now = perf_counter()
        member.clock.finished(now, job.handed_at, job.depth)
        member.completed += 1
        if not member.inflight:
            member.busy_total += now - member.busy_since
        error = result.error
        if error is None:
            self._finish(job, result.outputs, None)
        elif isinstance(error.__cause__, DeviceError) and job.attempts < self.retries:
            # A self-healing member restarted while it held this item and gave up on it: the
            # device failed, not the input, so another member runs it again.
            job.attempts += 1
            member.retried += 1
            self._backlog.appendleft(job)
        else:
            self._finish(job, None, error)
        self._route()

    def _finish(self, job: _Job, outputs: Any, error: BaseException | None) -> None:
        with self._cond:
            self._pending -= 1
            self._cond.notify()
        if self._complete is not None:
            self._complete(job.token, outputs, error)

    def _lose(self, member: _Member, exc: BaseException) -> None:
        """``member`` is gone: re-run what it held elsewhere (oldest first), shrink the room."""
        if member.lost is not None:
            return
        member.lost = exc
        if self._dead is not None or self._members_closed:
            return
        now = perf_counter()
        if member.inflight:
            member.busy_total += now - member.busy_since
        held, member.inflight = list(member.inflight), deque()
        log.warning("pool %r: %s is lost (%s); %d items it held go to other members",
                    self.pool_name, member.label, exc, len(held))
        for job in reversed(held):
            job.attempts += 1
            if job.attempts > self.retries:
                lost = MemberLost(f"{member.label} of pool {self.pool_name!r} broke while "
                                  f"running this item (retries={self.retries} used up): {exc}")
                lost.__cause__ = exc
                self._finish(job, None, lost)
            else:
                member.retried += 1
                self._backlog.appendleft(job)
        with self._cond:
            self._room = sum(m.runner.maxsize for m in self.members
                             if m.lost is None and m.state() not in FINAL)
            self._cond.notify_all()
        if all(m.lost is not None or m.state() in FINAL for m in self.members):
            self._all_lost()
            return
        self._route()

    def _all_lost(self) -> None:
        causes = "; ".join(f"{m.label}: {m.lost or m.state()}" for m in self.members)
        dead: AccelError
        if exit_guard.exiting():  # the exit hook stopped the members: closed, not broken
            dead = RunnerClosed(f"pool {self.pool_name!r} was closed: the interpreter is "
                                f"exiting ({causes})")
        else:
            dead = DeviceError(f"every member of pool {self.pool_name!r} is broken or "
                               f"closed: {causes}")
        with self._cond:
            self._dead = dead
            self._cond.notify_all()
        self._backlog.clear()
        if self._complete is not None:
            self._complete(None, dead, dead)  # breaks the pool: every waiter gets ``dead``

    async def _close_members(self) -> None:
        if self._members_closed:
            return
        self._members_closed = True
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        # The pool has drained (or given up on) its items: what members still hold is
        # nobody's any more, so their drain is short.
        hub = self.hub
        assert hub is not None
        await hub.gather(*(m.runner.aclose(timeout=1.0) for m in self.members),
                         return_exceptions=True)
        consumers = [m.consumer for m in self.members if m.consumer is not None]
        for task in consumers:
            task.cancel()  # a no-op for those that ended with their member
        await hub.join(*consumers)

    async def abandon(self) -> None:
        """The pool's open failed or was cancelled: close whatever members it opened (their
        opening may still be under way on the loop, the load thread having been left)."""
        opening = self._opening
        if opening is not None and self.hub is not None:
            await opening.wait(self.hub)
        await self._close_members()

    def _release(self) -> None:
        """Model.close: members are normally closed by the feeder thread as it leaves; if it
        never got there (it hung and was abandoned), close them now without blocking."""
        if self._members_closed:
            return
        if library_name() is None or self.hub is None:  # not on the loop (a reaper thread)
            self.close()
            return
        # tasks are held until done (asyncio keeps only weak references to its tasks)
        self._closers = [task for task in self._closers if not task.done()]
        self._closers.append(self.hub.spawn(self._close_members(),
                                            name=f"aioaccel-{self.pool_name}-close"))

    # ---- stats ----------------------------------------------------------------------------
    def member_stats(self) -> tuple[MemberStats, ...]:
        now = perf_counter()
        elapsed = now - self._opened_at if self._opened_at else 0.0
        out = []
        for m in self.members:
            own = m.runner.stats()
            out.append(MemberStats(
                index=m.index, name=m.runner.name, state=m.state(), routed=m.routed,
                completed=m.completed, retried=m.retried, in_flight=len(m.inflight),
                capacity=m.runner.maxsize, service_time=m.clock.value,
                busy=m.busy(now, elapsed), latency_p50=own.latency_p50,
                latency_p99=own.latency_p99))
        return tuple(out)

    def _profile(self) -> dict[str, Any]:
        return {"policy": self.policy.name,
                "members": [_as_dict(s) for s in self.member_stats()]}


def _as_dict(stats: MemberStats) -> dict[str, Any]:
    return {name: getattr(stats, name) for name in MemberStats.__dataclass_fields__}


async def _open(runner: Runner) -> None:
    await runner


def _named(exc: BaseException, context: str) -> BaseException:
    """``exc`` with ``context`` in its message when its type allows, else as a note."""
    try:
        named = type(exc)(f"{context}: {exc}")
    except Exception:
        exc.add_note(context)
        return exc
    named.__cause__ = exc
    return named


class Pool(Runner):
    """A runner over member runners. Make it with :func:`aioaccel.pool`."""

    def __init__(self, members: Sequence[Runner], *, policy: str, maxsize: int,
                 name: str | None, retries: int, close_timeout: float):
        self._pool_router = _Dispatch(members, make_policy(policy), retries)
        super().__init__(self._pool_router.load, maxsize=maxsize, name=name,
                         close_timeout=close_timeout)
        self._pool_router.pool_name = self.name
        self._pool_router.close_timeout = close_timeout

    async def __aenter__(self) -> Pool:
        # The load (on its own thread) opens the members on this loop.
        if self._pool_router.hub is not None:
            raise RuntimeError(f"pool {self.name!r} was already opened")
        hub = self._pool_router.hub = current_hub()
        try:
            await super().__aenter__()
        except BaseException:
            await hub.shielded(self._pool_router.abandon())
            raise
        return self

    @property
    def policy(self) -> str:
        return self._pool_router.policy.name

    @property
    def members(self) -> tuple[Runner, ...]:
        """The member runners, in the order given (the failover priority order)."""
        return tuple(m.runner for m in self._pool_router.members)

    def member_stats(self) -> tuple[MemberStats, ...]:
        """Per member: state, items routed / completed / retried, in flight, measured
        service time, busy fraction and the member's latency. (``stats().profile`` holds the
        same as dicts, under ``"members"``.)"""
        return self._pool_router.member_stats()


def pool(*members: Runner, policy: str = "balance", maxsize: int | None = None,
         name: str | None = None, retries: int = 1, close_timeout: float = 10.0) -> Pool:
    """One runner over several member runners for the same logical model.

    Each member is a runner made with :func:`aioaccel.open` and not opened yet: the pool opens
    them when it opens (``async with`` / ``await``) and closes them when it closes. Members may
    use different files and runtimes, but must agree on input and output names, dtypes and
    shapes (up to dynamic dimensions), else opening raises ``ValueError`` naming both members.

    ``policy="balance"`` sends each item to the member expected to finish it soonest
    (measured service time x (queue depth + 1)); ``policy="failover"`` sends everything to the
    first member that is ready, the next one while it is broken or recovering, and returns to
    the first once it is ready again. ``retries`` is how many more times an item is run after
    the device holding it failed (0: never; the item then fails with that failure). Here an
    item held by a member that breaks runs again on another member (inference is
    idempotent); used up, it fails with :class:`~aioaccel.MemberLost`. ``maxsize`` bounds the
    pool's own admission (default: twice the sum of the members' maxsizes: their queues, and
    as much again for results waiting for their turn behind an item on a slower member).
    """
    if not members:
        raise ValueError("aioaccel.pool() needs at least one member runner")
    for i, member in enumerate(members):
        if not isinstance(member, Runner):
            raise TypeError(f"pool member {i} must be a runner made with aioaccel.open(...), "
                            f"got {type(member).__name__}")
    for i, member in enumerate(members):
        for j in range(i):
            if members[j] is member:
                raise ValueError(f"pool members {j} and {i} are the same runner "
                                 f"({member.name!r}): give each member its own aioaccel.open()")
    make_policy(policy)  # fail now on a bad name
    check_count("retries", retries)
    if maxsize is not None:
        check_count("maxsize", maxsize, 1)
    check_seconds("close_timeout", close_timeout)
    # Room for every member's queue, and as much again for results that wait for their turn
    # in push order behind an item still on a slower member.
    size = 2 * sum(m.maxsize for m in members) if maxsize is None else maxsize
    return Pool(members, policy=policy, maxsize=size, name=name, retries=retries,
                close_timeout=close_timeout)


def agreed_specs(runners: Sequence[Runner], which: str) -> list[TensorSpec] | None:
    """The spec every runner accepts (``which``: "inputs" or "outputs"): same names and
    dtypes, shapes equal where both are fixed; a dimension fixed by one member is fixed for
    the pool. Runners that describe no spec (plain callables) agree with anything. Raises
    ValueError naming the two members and the difference."""
    known = [(i, r, getattr(r, which)) for i, r in enumerate(runners)
             if getattr(r, which) is not None]
    if not known:
        return None
    first, base_runner, base = known[0]
    merged = {spec.name: spec for spec in base}
    for index, runner, specs in known[1:]:
        def differ(what: str, first: int = first, index: int = index,
                   runner: Runner = runner) -> ValueError:
            return ValueError(
                f"pool members disagree on {which}: member {first} ({base_runner.name!r}) and "
                f"member {index} ({runner.name!r}): {what}")

        names = [s.name for s in specs]
        if sorted(names) != sorted(merged):
            raise differ(f"names {sorted(merged)} vs {sorted(names)}")
        for spec in specs:
            mine = merged[spec.name]
            if mine.dtype != spec.dtype:
                raise differ(f"{spec.name!r} has dtype {mine.dtype} vs {spec.dtype}")
            if mine.shape is None or spec.shape is None:
                merged[spec.name] = mine if spec.shape is None else spec
                continue
            if len(mine.shape) != len(spec.shape) or any(
                    a is not None and b is not None and a != b
                    for a, b in zip(mine.shape, spec.shape, strict=True)):
                raise differ(f"{spec.name!r} has shape {_shape(mine)} vs {_shape(spec)}")
            shape = tuple(a if a is not None else b
                          for a, b in zip(mine.shape, spec.shape, strict=True))
            merged[spec.name] = TensorSpec(spec.name, mine.dtype, shape)
    return [merged[spec.name] for spec in base]


def _shape(spec: TensorSpec) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in spec.shape or ()) + ")"


# ``aioaccel.pool`` is this module, and calling it calls pool() (see aioaccel._callable_module)
make_callable(__name__, pool)
