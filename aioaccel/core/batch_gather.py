"""Dynamic batching on the worker side: admitted items grouped into one call of stage 0.

A stage-0 worker that takes a job also takes, without waiting, the jobs already queued behind
it, up to ``limit`` rows: a burst of concurrent ``infer`` callers or streamed frames becomes one
runtime call. It waits for more only while another worker of the stage is busy (the device is
not idle) and at most until ``batch_wait`` after the first job was admitted, so a lone item
never waits while the device has nothing to do.

The :class:`Batch` travels through the later stages as one job; the split back into the items'
own results happens once, when it leaves the last stage. A batched call that fails with a
runtime error (not a DeviceError) is re-run item by item, so only the items that fail on their
own fail.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import Empty
from time import perf_counter
from typing import TYPE_CHECKING, Any

import numpy as np

from ..batching import join, rows, split
from ..errors import DeviceError
from ..stats import BatchStats
from .jobs import QUEUED
from .priority_levels import BELL

if TYPE_CHECKING:
    from .jobs import Job

__all__ = ["Batch", "BatchCounters", "batch_of", "gather", "run_alone", "run_batch"]


class BatchCounters:
    """What the batching workers of one pipeline did (thread-side; read by stats)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.batches = 0            # calls that carried more than one job... or one
        self.items = 0
        self.sizes: dict[int, int] = {}
        self.waited = 0.0           # seconds items spent waiting for their batch to fill
        self.fallbacks = 0          # batched calls re-run item by item
        self._lock = threading.Lock()

    def count(self, size: int, waited: float) -> None:
        with self._lock:
            self.batches += 1
            self.items += size
            self.sizes[size] = self.sizes.get(size, 0) + 1
            self.waited += waited

    def snapshot(self) -> BatchStats:
        with self._lock:
            return BatchStats(size=self.limit, batches=self.batches, items=self.items,
                              sizes=tuple(sorted(self.sizes.items())), fallbacks=self.fallbacks,
                              wait_mean=self.waited / self.items if self.items else 0.0)


class Batch:
    """Several jobs joined into one (the thread-side container; never seen by the loop)."""

    __slots__ = ("at", "counts", "error", "failed_stage", "members", "value", "work")

    def __init__(self, members: list[Job], value: Any, counts: list[int]):
        self.members = members
        self.value = value          # the joined inputs, then each stage's batched outputs
        self.counts = counts        # rows per member
        self.error: BaseException | None = None
        self.failed_stage = ""
        self.at = 0
        self.work = 0.0

    def members_at(self, stage: int) -> list[Job]:
        """The members, each with its own rows of the batch's current value (what the batch
        brought to ``stage``), marked to run alone from here on. If the rows cannot be split
        out, every member carries that error instead."""
        members = self.members
        if stage > 0:  # at stage 0 each member still holds its own inputs
            try:
                parts = split(self.value, self.counts)
            except ValueError as exc:
                parts = None
                for job in members:
                    job.error = exc
            if parts is not None:
                for job, part in zip(members, parts, strict=True):
                    job.value = part
        for job in members:
            job.solo = True
            job.work += self.work
            job.at = stage
        return members

    def unbatch(self, now: float) -> list[Job]:
        """The members with their own rows of the outputs (or the batch's error)."""
        members = self.members
        work, at = self.work, self.at
        if self.error is None:
            parts = _row_each(self.value, self.counts, len(members))
            if parts is None:
                try:
                    parts = split(self.value, self.counts)
                except ValueError as exc:
                    self.error = exc
            if parts is not None:
                for job, part in zip(members, parts, strict=True):
                    job.value = part
                    job.work += work
                    job.at = at
                    job.t_done = now
                return members
        for job in members:
            job.error = self.error
            job.failed_stage = self.failed_stage
            job.work += work
            job.at = at
            job.t_done = now
        return members


def _row_each(value: Any, counts: list[int], n: int) -> list[Any] | None:
    """:func:`~aioaccel.batching.split` for the hot case (one output by name, one row per
    member, as many rows as members): each member's row copied (as ``split`` does: a result
    never pins its batch-mates' memory); None for anything else, which ``split`` handles."""
    if type(value) is dict and len(value) == 1 and counts.count(1) == n:
        for name, array in value.items():
            if type(array) is np.ndarray and array.ndim and array.shape[0] == n:
                return [{name: array[i:i + 1].copy()} for i in range(n)]
    return None


def gather(first: Job, get_nowait: Callable[[], Any], get: Callable[..., Any], limit: int,
           wait_until: float, device_busy: Callable[[], bool],
           claim_many: Callable[[list[Any]], list[Job]], shell: Callable[[Any], None],
           stop: object, ranked: Callable[[], Job],
           put_back: Callable[[Job], None]) -> tuple[list[Job], Any]:
    """``first`` (claimed) and the jobs queued behind it, up to ``limit`` rows; and the next
    job not taken (the stop sentinel, one that would overflow the batch, or a member of a
    failed batch back to run alone), if any. The jobs taken behind ``first`` are claimed
    together at the end (``claim_many``: one lock for the lot, not one per job; it sends
    the withdrawn ones back as shells and returns the others, in order); a job seen withdrawn
    already goes to ``shell`` at once and leaves its place to the next. Waits for more only
    while ``device_busy()`` and before ``wait_until``.

    Once stage 0 is ranked by priority, the queue yields a ``BELL`` per job and ``ranked()``
    gives the best job waiting, so the batch fills from the highest priority present and
    lower ones only fill what is left. A ranked job that does not fit goes back to the head
    of its level (``put_back``) rather than being held for the next batch, so a higher one
    arriving meanwhile still goes first."""
    taken = [first]
    total = _rows(first)
    queued: list[Any] = []
    following: Any = None
    while total < limit:
        try:
            job = get_nowait()
        except Empty:
            remaining = wait_until - perf_counter()
            if remaining <= 0 or not device_busy():
                break
            try:
                job = get(timeout=min(remaining, 0.0005))
            except Empty:
                continue
        if job is BELL:
            job = ranked()
            n = _rows(job)
            if total + n > limit:
                put_back(job)
                break
        elif job is stop or job.solo:
            following = job
            break
        else:
            n = _rows(job)
            if total + n > limit:
                following = job
                break
        if job.state != QUEUED:  # withdrawn already (a state that never goes back): its
            shell(job)           # shell frees its slot, and it takes no place in the batch
            continue
        queued.append(job)
        total += n  # one withdrawn between this look and the claim makes the batch smaller
    if queued:
        taken += claim_many(queued)
    return taken, following


def batch_of(jobs: list[Job], counters: BatchCounters, now: float) -> list[Any]:
    """``jobs`` as one :class:`Batch` to hand to a device (or each on its own when there
    is one, or they cannot be joined)."""
    if len(jobs) > 1:
        values = [job.value for job in jobs]
        try:
            value, counts = _join_named(values) or join(values)
        except ValueError:
            pass
        else:
            counters.count(*_items_waited(jobs, now))
            return [Batch(jobs, value, counts)]
    for job in jobs:
        counters.count(job.items, (now - job.t_admit) * job.items)
    return list(jobs)


def _join_named(values: list[Any]) -> tuple[dict[str, np.ndarray], list[int]] | None:
    """:func:`~aioaccel.batching.join` for the hot case (what a one-input model's validator
    hands on: a dict of one array under the same name): one concatenation, with ``casting=
    "no"`` checking the dtypes in C. None for anything else (``join`` then checks it all and
    names what differs)."""
    first = values[0]
    if type(first) is not dict or len(first) != 1:
        return None
    (name,) = first
    column = []
    try:
        for value in values:
            if type(value) is not dict or len(value) != 1:
                return None
            column.append(value[name])
        counts = [array.shape[0] for array in column]  # not an array / no axis 0: raises
        return {name: np.concatenate(column, casting="no")}, counts
    except (KeyError, AttributeError, IndexError, TypeError, ValueError):
        return None


def _rows(job: Job) -> int:
    value = job.value
    # the hot cases inline (per job on the batching worker, holding the GIL): what the
    # validators hand on (a dict of arrays by name), or one array
    if type(value) is dict:
        for array in value.values():
            if type(array) is np.ndarray and array.ndim:
                return array.shape[0]  # type: ignore[no-any-return]
            break
    elif type(value) is np.ndarray and value.ndim:
        return value.shape[0]  # type: ignore[no-any-return]
    try:
        return rows(value)
    except ValueError:
        return 1


def run_batch(run: Callable[[Any], Any], jobs: list[Job], stage: str,
              counters: BatchCounters, now: float) -> list[Any]:
    """Run ``jobs`` as one call; returns what to forward: one :class:`Batch`, or (after a
    failed batched call, or inputs that cannot be joined) each job on its own. DeviceError
    propagates: the device is gone."""
    if len(jobs) == 1:
        return [_solo(run, jobs[0], stage, counters, now)]
    values = [job.value for job in jobs]
    joined = _join_named(values)
    if joined is None:
        try:
            joined = join(values)
        except ValueError:
            return [_solo(run, job, stage, counters, now) for job in jobs]
    value, counts = joined
    batch = Batch(jobs, value, counts)
    counters.count(*_items_waited(jobs, now))
    t0 = perf_counter()
    try:
        batch.value = run(value)
    except DeviceError:
        raise
    except Exception:
        counters.fallbacks += 1
        return [_solo(run, job, stage, counters, now, counted=True) for job in jobs]
    batch.work += perf_counter() - t0
    batch.at = 1
    return [batch]


def _items_waited(jobs: list[Job], now: float) -> tuple[int, float]:
    """The items ``jobs`` carry (a streamed chunk's job carries several) and the seconds they
    waited for this call, as :meth:`BatchCounters.count` takes them."""
    items, waited = 0, 0.0
    for job in jobs:
        items += job.items
        waited += (now - job.t_admit) * job.items
    return items, waited


def run_alone(run: Callable[[Any], Any], job: Job, stage: str) -> None:
    """Run one job's call in place: its outputs, or its own error. DeviceError (and anything
    not an Exception) propagates: the device is gone."""
    t0 = perf_counter()
    try:
        job.value = run(job.value)
    except DeviceError:
        raise
    except Exception as exc:
        job.error = exc
        job.failed_stage = stage
    job.work += perf_counter() - t0


def _solo(run: Callable[[Any], Any], job: Job, stage: str, counters: BatchCounters,
          now: float, counted: bool = False) -> Job:
    if not counted:
        counters.count(job.items, (now - job.t_admit) * job.items)
    run_alone(run, job, stage)
    job.at = 1
    return job
