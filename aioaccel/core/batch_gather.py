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

from ..batching import join, rows, split
from ..errors import DeviceError
from ..stats import BatchStats
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
        if self.error is None:
            try:
                parts = split(self.value, self.counts)
            except ValueError as exc:
                self.error = exc
            else:
                for job, part in zip(members, parts, strict=True):
                    job.value = part
        for job in members:
            if self.error is not None:
                job.error = self.error
                job.failed_stage = self.failed_stage
            job.work += self.work
            job.at = self.at
            job.t_done = now
        return members


def gather(first: Job, get_nowait: Callable[[], Any], get: Callable[..., Any], limit: int,
           wait_until: float, device_busy: Callable[[], bool], claim: Callable[[Any], bool],
           shell: Callable[[Any], None], stop: object, ranked: Callable[[], Job],
           put_back: Callable[[Job], None]) -> tuple[list[Job], Any]:
    """``first`` (claimed) and the jobs queued behind it, up to ``limit`` rows; and the next
    job not taken (the stop sentinel, one that would overflow the batch, or a member of a
    failed batch back to run alone), if any. Withdrawn shells met on the way go to
    ``shell``. Waits for more only while ``device_busy()`` and before ``wait_until``.

    Once stage 0 is ranked by priority, the queue yields a ``BELL`` per job and ``ranked()``
    gives the best job waiting, so the batch fills from the highest priority present and
    lower ones only fill what is left. A ranked job that does not fit goes back to the head
    of its level (``put_back``) rather than being held for the next batch, so a higher one
    arriving meanwhile still goes first."""
    taken = [first]
    total = _rows(first)
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
                return taken, None
        elif job is stop or job.solo:
            return taken, job
        else:
            n = _rows(job)
            if total + n > limit:
                return taken, job
        if not claim(job):
            shell(job)  # withdrawn: only its empty shell goes back
            continue
        taken.append(job)
        total += n
    return taken, None


def batch_of(jobs: list[Job], counters: BatchCounters, now: float) -> list[Any]:
    """``jobs`` as one :class:`Batch` to hand to a device (or each on its own when there
    is one, or they cannot be joined)."""
    if len(jobs) > 1:
        try:
            value, counts = join([job.value for job in jobs])
        except ValueError:
            pass
        else:
            counters.count(len(jobs), sum(now - job.t_admit for job in jobs))
            return [Batch(jobs, value, counts)]
    for job in jobs:
        counters.count(1, now - job.t_admit)
    return list(jobs)


def _rows(job: Job) -> int:
    try:
        return rows(job.value)
    except ValueError:
        return 1


def run_batch(run: Callable[[Any], Any], jobs: list[Job], stage: str,
              counters: BatchCounters, now: float) -> list[Any]:
    """Run ``jobs`` as one call; returns what to forward: one :class:`Batch`, or (after a
    failed batched call, or inputs that cannot be joined) each job on its own. DeviceError
    propagates: the device is gone."""
    if len(jobs) == 1:
        return [_solo(run, jobs[0], stage, counters, now)]
    try:
        value, counts = join([job.value for job in jobs])
    except ValueError:
        return [_solo(run, job, stage, counters, now) for job in jobs]
    batch = Batch(jobs, value, counts)
    counters.count(len(jobs), sum(now - job.t_admit for job in jobs))
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
        counters.count(1, now - job.t_admit)
    run_alone(run, job, stage)
    job.at = 1
    return job
