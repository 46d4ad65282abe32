"""The thread-side records: one :class:`Job` per admitted item, one :class:`Worker` per thread.

Both cross threads, so each field has one writer at a time: a job belongs to the worker or
device holding it, then to the loop once the bridge delivered it. The loop may write only
``Job.abandoned`` (an ``infer`` gave up) and ``Job.state`` through ``Pipeline.withdraw``'s
compare-and-set. A leaf module: the pipeline, the bridge, the batcher and the loop-side parts
all import it, and it imports none of them.
"""

from __future__ import annotations

import threading
from time import perf_counter
from typing import Any

from ..stages import StageSpec

__all__ = ["QUEUED", "RUNNING", "WITHDRAWN", "Job", "Worker"]

# Job states; a stage-0 worker *claims* a QUEUED job, a cancelled ``infer`` *withdraws* it.
QUEUED, RUNNING, WITHDRAWN = 0, 1, 2


class Job:
    """What travels through the stages for one admitted item (owned by one thread at a time:
    the worker or device holding it, then the loop once the bridge delivered it)."""

    __slots__ = ("abandoned", "at", "error", "failed_stage", "priority", "seq", "solo", "state",
                 "stream", "t_admit", "t_done", "t_start", "value", "work")

    #: items it carries: one, but for a streamed chunk's job (``streamed_chunk.ChunkJob``)
    items = 1

    def __init__(self, seq: int, value: Any, stream: int = 0, t_admit: float = 0.0,
                 priority: int = 0):
        self.seq = seq
        #: its stream's priority: stage 0 serves the highest first (see .priority_levels)
        self.priority = priority
        self.t_admit = t_admit        # when the runner admitted it (read-only here)
        self.solo = False             # run on its own, never in a batch (a failed batch's)
        #: set by the runner when the infer() waiting for it is gone (cancelled or timed out)
        #: after a worker took it: a device stage may drop it (its result would be discarded)
        self.abandoned = False
        self.value = value            # the inputs, then each stage's outputs
        self.stream = stream          # the runner's stream index (MemryX stream_idx)
        self.error: BaseException | None = None
        self.failed_stage = ""
        self.state = QUEUED
        self.at = 0                   # index of the stage holding it (device completions check)
        self.t_start = 0.0            # when a stage-0 worker took it (end of queueing)
        self.work = 0.0               # seconds spent in stage calls / on devices
        self.t_done = 0.0

    @property
    def withdrawn(self) -> bool:
        return self.state == WITHDRAWN


class Worker:
    """Book-keeping of one worker thread (read by stats and the watchdog)."""

    __slots__ = ("_lock", "busy", "busy_since", "call_started", "calls", "duplicates", "exited",
                 "in_device", "index", "progress_at", "replica", "spec", "thread")

    def __init__(self, index: int, spec: StageSpec, replica: int):
        self.index = index
        self.spec = spec
        self.replica = replica
        self.thread: threading.Thread | None = None
        self.busy = 0.0               # seconds spent in run() / with the device occupied
        self.calls = 0
        self.call_started = 0.0       # blocking stages: start of the call in progress, 0 if idle
        self.in_device = 0            # device stages: jobs submitted and not yet completed
        self.busy_since = 0.0
        self.progress_at = 0.0        # device stages: last completion (or first submit after idle)
        self.duplicates = 0           # completions of a job the device had already completed
        self.exited = False
        self._lock = threading.Lock()

    # Device occupancy: busy while at least one job is on the device.
    def enter_device(self, job: Job) -> None:
        with self._lock:
            if self.in_device == 0:
                self.busy_since = self.progress_at = perf_counter()
            self.in_device += 1
            job.at = self.index

    def leave_device(self, job: Job, now: float) -> bool:
        """Count a completion; False (and counted apart) if the job was already completed."""
        with self._lock:
            if job.at != self.index:
                self.duplicates += 1
                return False
            job.at = self.index + 1
            self.in_device -= 1
            self.calls += 1
            self.progress_at = now
            if self.in_device == 0:
                self.busy += now - self.busy_since
            return True
