"""Stages in order, each on its own worker threads, with hand-offs between them.

Data path of one item::

    Runner.push -> queue[0] -> stage 0 worker -> queue[1] -> ... -> last stage -> Bridge.deliver

Hand-offs are ``queue.SimpleQueue`` (C, lock-free for the caller). They need no bound of their
own: the runner admits at most ``maxsize`` items, so no queue can ever hold more than that.
A failed item skips the remaining stages and goes straight to the bridge.

Worker threads never touch the event loop except through the :class:`~aioaccel.bridge.Bridge`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from queue import SimpleQueue
from time import perf_counter
from typing import Any, Protocol

from .bridge import SHORT_CALL, Bridge
from .errors import DeviceError
from .stages import BlockingStage, DeviceStage, StageSpec

__all__ = ["Item", "Pipeline", "Worker"]

log = logging.getLogger("aioaccel")

# Item states; a stage-0 worker *claims* a QUEUED item, a cancelled ``infer`` *withdraws* it.
QUEUED, RUNNING, WITHDRAWN = 0, 1, 2
_STOP = object()


class _Forward(Protocol):
    def __call__(self, item: Item, now: float, defer: bool = False) -> None: ...


class Item:
    """One admitted input travelling through the pipeline (internal)."""

    __slots__ = (
        "call_stage",
        "call_started",
        "done",
        "error",
        "failed_stage",
        "future",
        "lane",
        "seq",
        "state",
        "t_admit",
        "t_done",
        "tag",
        "value",
    )

    def __init__(self, seq: int, tag: Any, value: Any, future: Any, t_admit: float):
        self.seq = seq
        self.tag = tag
        self.value = value            # the inputs, then each stage's outputs
        self.error: BaseException | None = None
        self.future = future          # asyncio.Future for infer(); None for the stream
        self.state = QUEUED
        self.done = False             # set on the loop when the bridge delivered it
        self.lane: Any = None         # the runner's lane (stream) it was admitted on
        self.t_admit = t_admit
        self.t_done = 0.0
        self.call_started = 0.0       # non-zero while a stage call (or device) holds it
        self.call_stage = ""
        self.failed_stage = ""


class Worker:
    """Book-keeping of one worker thread (read by stats and the watchdog)."""

    __slots__ = (
        "_lock",
        "busy",
        "busy_since",
        "calls",
        "exited",
        "in_device",
        "index",
        "replica",
        "spec",
        "thread",
    )

    def __init__(self, index: int, spec: StageSpec, replica: int):
        self.index = index
        self.spec = spec
        self.replica = replica
        self.thread: threading.Thread | None = None
        self.busy = 0.0               # seconds spent in run() / with the device occupied
        self.calls = 0
        self.in_device = 0            # device stages: items submitted and not yet completed
        self.busy_since = 0.0
        self.exited = False
        self._lock = threading.Lock()

    # Device occupancy: busy while at least one item is on the device.
    def enter_device(self) -> None:
        with self._lock:
            if self.in_device == 0:
                self.busy_since = perf_counter()
            self.in_device += 1

    def leave_device(self, now: float) -> None:
        with self._lock:
            self.in_device -= 1
            self.calls += 1
            if self.in_device == 0:
                self.busy += now - self.busy_since


class Pipeline:
    def __init__(self, specs: list[StageSpec], bridge: Bridge, runner_name: str, maxsize: int):
        self.specs = specs
        # A worker may defer the loop's wake-up only while it has more than this much input
        # queued: the other half keeps it busy while the loop consumes and refills (a batch of
        # the whole window would leave it idle during the loop's turn).
        self.defer_depth = maxsize // 2
        self.bridge = bridge
        self.runner_name = runner_name
        self.queues: list[SimpleQueue[Any]] = [SimpleQueue() for _ in specs]
        self.workers = [
            Worker(i, spec, r)
            for i, spec in enumerate(specs)
            for r in range(1 if spec.device else spec.replicas)
        ]
        self.stopping = False
        self._claim_lock = threading.Lock()
        self.started_at = 0.0

    # ---- called on the loop -------------------------------------------------------------
    def start(self) -> None:
        self.started_at = perf_counter()
        for w in self.workers:
            name = f"aioaccel-{self.runner_name}-{w.spec.name}-{w.replica}"
            w.thread = threading.Thread(target=self._thread_main, args=(w,), name=name, daemon=True)
            w.thread.start()

    def submit(self, item: Item) -> None:
        self.queues[0].put(item)

    def withdraw(self, item: Item) -> bool:
        """Take back an item no stage-0 worker has claimed yet; False if one already has."""
        with self._claim_lock:
            if item.state == QUEUED:
                item.state = WITHDRAWN
                item.value = None  # free the input now, the shell may wait in a queue
                return True
            return False

    def stop(self) -> None:
        """Ask every worker to exit; items still queued are skipped (the runner failed them)."""
        if self.stopping:
            return
        self.stopping = True
        for w in self.workers:
            self.queues[w.index].put(_STOP)

    # ---- worker threads -----------------------------------------------------------------
    def _claim(self, item: Item) -> bool:
        with self._claim_lock:
            if item.state != QUEUED:
                return False
            item.state = RUNNING
            return True

    def _forward(self, index: int) -> _Forward:
        """Where items leaving stage ``index`` go: the next queue, or the bridge.

        ``defer``: the caller has more input queued and this call was short, so the loop's
        wake-up may wait for the next result (see ``bridge.COALESCE_WINDOW``).
        """
        deliver = self.bridge.deliver
        if index == len(self.specs) - 1:
            def forward(item: Item, now: float, defer: bool = False) -> None:
                item.t_done = now
                deliver(item, now, defer)
        else:
            put = self.queues[index + 1].put

            def forward(item: Item, now: float, defer: bool = False) -> None:
                if item.error is not None:
                    item.t_done = now
                    deliver(item, now, defer)
                else:
                    put(item)
        return forward

    def _fatal(self, exc: BaseException, stage: str) -> None:
        self.bridge.signal("_on_fatal", exc, stage)

    def _thread_main(self, w: Worker) -> None:
        stage: Any = None
        try:
            try:
                stage = w.spec.factory()
                if isinstance(stage, DeviceStage):
                    stage.start(self._completion(w))
            except BaseException as exc:  # report, then leave: the runner fails its open
                self.bridge.signal("_on_ready", w, exc)
                return
            self.bridge.signal("_on_ready", w, None)
            if isinstance(stage, DeviceStage):
                self._feed_device(w, stage)
            else:
                self._run_blocking(w, stage.run if isinstance(stage, BlockingStage) else stage)
        finally:
            if stage is not None and hasattr(stage, "close"):
                try:
                    stage.close()
                except Exception:
                    log.exception("closing stage %r of runner %r failed", w.spec.name,
                                  self.runner_name)
            w.exited = True
            self.bridge.signal("_on_worker_exit", w)

    def _run_blocking(self, w: Worker, run: Callable[[Any], Any]) -> None:
        queue = self.queues[w.index]
        get, pending, depth = queue.get, queue.qsize, self.defer_depth
        forward = self._forward(w.index)
        first = w.index == 0
        name = w.spec.name
        while True:
            item = get()
            if item is _STOP:
                return
            if self.stopping or (first and not self._claim(item)):
                continue
            t0 = perf_counter()
            item.call_stage = name
            item.call_started = t0
            try:
                item.value = run(item.value)
            except DeviceError as exc:
                self._fatal(exc, name)
                return
            except Exception as exc:
                item.error = exc
                item.failed_stage = name
            except BaseException as exc:  # SystemExit & co. from a stage: nothing sane remains
                self._fatal(exc, name)
                return
            t1 = perf_counter()
            item.call_started = 0.0
            w.busy += t1 - t0
            w.calls += 1
            forward(item, t1, t1 - t0 < SHORT_CALL and pending() > depth)

    def _feed_device(self, w: Worker, device: DeviceStage) -> None:
        get = self.queues[w.index].get
        forward = self._forward(w.index)
        first = w.index == 0
        name = w.spec.name
        while True:
            item = get()
            if item is _STOP:
                return
            if self.stopping or (first and not self._claim(item)):
                continue
            item.call_stage = name
            item.call_started = perf_counter()
            w.enter_device()
            try:
                device.submit(item, item.value)
            except DeviceError as exc:
                self._fatal(exc, name)
                return
            except Exception as exc:  # the device refused this item only
                now = perf_counter()
                w.leave_device(now)
                item.call_started = 0.0
                item.error = exc
                item.failed_stage = name
                forward(item, now)

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
                w.leave_device(now)
                item: Item = token  # type: ignore[assignment]
                item.call_started = 0.0
                if error is not None:
                    item.error = error
                    item.failed_stage = name
                else:
                    item.value = outputs
                if not self.stopping:
                    forward(item, now)
            except BaseException as exc:
                try:
                    self._fatal(exc, name)
                except BaseException:
                    pass

        return complete
