"""Strict priority in stage 0's hand-off, once streams of more than one priority exist.

Admission orders who gets a slot; this orders what the device runs among the items already
admitted. Without it a priority stream's item, once admitted, waits in stage 0's FIFO behind
every item a flooding stream had admitted before it (with ``batch=8`` that is several batches).

The common case pays nothing: while every item has the same priority, stage 0's hand-off is
the plain ``SimpleQueue`` of jobs. When the runner first gets a stream of another priority,
the pipeline switches (:meth:`aioaccel.core.stage_threads.Pipeline.rank`) to
:class:`PriorityLevels`: one FIFO (a ``deque``) per priority level present, and the
``SimpleQueue`` only carries a :data:`BELL` per job put -- a worker that takes a bell takes the
oldest job of the highest level that has one. So a batch is filled from the highest priority
present, lower ones only fill what is left, and each level (each stream within it) stays FIFO.
No heap, no per-item sort: a put is an append and a bell, a take scans the few levels present.

Counting argument (why a bell always finds a job): a job is appended *before* its bell is put,
and each bell taken pops exactly one job, under one lock shared by the takers; so when a taker
holds the lock, fewer jobs were popped than bells were taken, which is at most the jobs put.
"""

from __future__ import annotations

import threading
from collections import deque
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .jobs import Job

__all__ = ["BELL", "PriorityLevels"]


class _Bell:
    """A job waits in :class:`PriorityLevels`: take the best one there."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "BELL"


#: what stage 0's SimpleQueue carries for each job put in the levels
BELL: Any = _Bell()


class PriorityLevels:
    """Stage 0's jobs by priority: FIFO within a level, the highest level first.

    ``put`` runs on the loop (and on a runtime thread that puts a job back), ``take`` on the
    stage-0 workers, each after taking a :data:`BELL` from ``bells``.
    """

    __slots__ = ("_bells", "_levels", "_lock", "_order")

    def __init__(self, bells: SimpleQueue[Any]):
        self._bells = bells
        self._levels: dict[int, deque[Job]] = {}
        #: the levels' FIFOs, highest priority first (replaced whole when a level is added,
        #: so a taker iterating it never sees it change)
        self._order: tuple[deque[Job], ...] = ()
        self._lock = threading.Lock()

    def put(self, job: Job) -> None:
        """Queue ``job`` behind the jobs of its priority (and ring for a worker)."""
        level = self._levels.get(job.priority)
        if level is None:
            level = self._add(job.priority)
        level.append(job)  # before the bell: a taker of this bell finds a job
        self._bells.put(BELL)

    def put_back(self, job: Job) -> None:
        """``job`` was taken but not run (it did not fit in a batch): back to the head of its
        level, so it goes first among its equals, as it would have."""
        level = self._levels.get(job.priority)
        if level is None:
            level = self._add(job.priority)
        level.appendleft(job)
        self._bells.put(BELL)

    def take(self) -> Job:
        """The oldest job of the highest priority present (the caller took a bell)."""
        with self._lock:
            for level in self._order:
                if level:
                    return level.popleft()
        raise RuntimeError("aioaccel: a stage-0 bell without a job (a bug)")

    def __len__(self) -> int:
        return sum(len(level) for level in self._order)

    def levels(self) -> dict[int, int]:
        """Jobs waiting per priority (for stats and tests)."""
        return {priority: len(level) for priority, level in self._levels.items()}

    def _add(self, priority: int) -> deque[Job]:
        with self._lock:
            level = self._levels.get(priority)
            if level is None:
                level = self._levels[priority] = deque()
                ranked = sorted(self._levels.items(), key=lambda kv: -kv[0])
                self._order = tuple(fifo for _, fifo in ranked)
            return level
