"""Simulated accelerators for testing services without hardware.

* :class:`SimulatedStage` -- a blocking stage (like LiteRT ``invoke``): use it directly as
  ``aioaccel.open(SimulatedStage(latency=0.002))`` or as one stage of a list.
* :class:`SimulatedDevice` -- a callback device (like OpenVINO ``AsyncInferQueue``): items
  complete on the device's own threads, out of order, at most ``capacity`` at a time.

Both compute ``fn(inputs)`` (identity by default) after a latency spent in ``time.sleep``, which
releases the GIL as a real runtime does, and inject faults by call index (0-based, in the order
the stage is called) or by predicate on the inputs:

* ``fail_at`` / ``fail_if``: that item fails with :class:`SimulatedFailure`; others carry on.
* ``fatal_at``: raises :class:`~aioaccel.DeviceError` -- the runner breaks.
* ``hang_at``: that call never returns until :meth:`release` is called -- ``call_timeout``
  catches it. ``hanging`` is a ``threading.Event`` set when the hang begins.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from queue import SimpleQueue
from typing import Any

from ..errors import DeviceError
from ..stages import Complete, DeviceStage

__all__ = ["SimulatedDevice", "SimulatedFailure", "SimulatedStage"]


#: a submit blocked this long on a full, hung device gives up (a DeviceError)
_ABANDON_AFTER = 5.0


class SimulatedFailure(RuntimeError):
    """The per-item failure a simulator raises for ``fail_at`` / ``fail_if``."""


def _as_set(value: int | Iterable[int] | None) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset((value,))
    return frozenset(value)


class _Faults:
    """Shared call counting and fault injection."""

    def __init__(self, fn: Callable[[Any], Any] | None, latency: float, jitter: float,
                 fail_at: int | Iterable[int] | None, fail_if: Callable[[Any], bool] | None,
                 fatal_at: int | Iterable[int] | None, hang_at: int | Iterable[int] | None,
                 seed: int | None):
        if latency < 0 or not 0 <= jitter <= 1:
            raise ValueError("latency must be >= 0 and jitter within [0, 1]")
        self.fn = fn
        self.latency = latency
        self.jitter = jitter
        self.fail_at = _as_set(fail_at)
        self.fail_if = fail_if
        self.fatal_at = _as_set(fatal_at)
        self.hang_at = _as_set(hang_at)
        self.hanging = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.calls = 0

    def release(self) -> None:
        """Let every hung call (and any later hang) return."""
        self._released.set()

    def _next_call(self) -> tuple[int, float]:
        with self._lock:
            index = self.calls
            self.calls += 1
            spread = self._random.uniform(-self.jitter, self.jitter) if self.jitter else 0.0
        return index, self.latency * (1.0 + spread)

    def _compute(self, index: int, inputs: Any, latency: float) -> Any:
        if index in self.hang_at:
            self.hanging.set()
            self._released.wait()
        if index in self.fatal_at:
            raise DeviceError(f"simulated device failure at call {index}")
        if latency:
            time.sleep(latency)  # releases the GIL, as a runtime's native call does
        if index in self.fail_at or (self.fail_if is not None and self.fail_if(inputs)):
            raise SimulatedFailure(f"simulated failure at call {index} (inputs={inputs!r})")
        return self.fn(inputs) if self.fn is not None else inputs


class SimulatedStage(_Faults):
    """A blocking stage: calling it computes one item on the caller's thread.

    It is a plain callable, so ``aioaccel.open(SimulatedStage(...), replicas=2)`` works; the
    call counter is shared by all replicas.
    """

    def __init__(self, fn: Callable[[Any], Any] | None = None, *, latency: float = 0.0,
                 jitter: float = 0.0, fail_at: int | Iterable[int] | None = None,
                 fail_if: Callable[[Any], bool] | None = None,
                 fatal_at: int | Iterable[int] | None = None,
                 hang_at: int | Iterable[int] | None = None, seed: int | None = None,
                 name: str = "simulated"):
        super().__init__(fn, latency, jitter, fail_at, fail_if, fatal_at, hang_at, seed)
        self.__name__ = name

    def __call__(self, inputs: Any) -> Any:
        index, latency = self._next_call()
        return self._compute(index, inputs, latency)


class SimulatedDevice(_Faults, DeviceStage):
    """A device that queues work and completes it on its own ``capacity`` threads.

    ``submit`` blocks while ``capacity`` items are on the device. With ``jitter`` > 0 items
    finish out of order (``completion_order`` records the call indices as they complete).
    ``peak_in_flight`` is the most items the device ever held.
    """

    def __init__(self, fn: Callable[[Any], Any] | None = None, *, latency: float = 0.001,
                 jitter: float = 0.5, capacity: int = 4,
                 fail_at: int | Iterable[int] | None = None,
                 fail_if: Callable[[Any], bool] | None = None,
                 fatal_at: int | Iterable[int] | None = None,
                 hang_at: int | Iterable[int] | None = None, seed: int | None = None,
                 name: str = "simdevice"):
        super().__init__(fn, latency, jitter, fail_at, fail_if, fatal_at, hang_at, seed)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.__name__ = name
        self.capacity = capacity
        self.completion_order: list[int] = []
        self.peak_in_flight = 0
        self._in_flight = 0
        self._slots = threading.Semaphore(capacity)
        self._jobs: SimpleQueue[Any] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._complete: Complete | None = None

    def start(self, complete: Complete) -> None:
        # Started again (a runner restarting after a fault): the old threads keep their own
        # queue and slots and end (a hung one once release() is called); the device starts
        # afresh, as a reset one would.
        for _ in self._threads:
            self._jobs.put(None)
        self._jobs = SimpleQueue()
        self._slots = threading.Semaphore(self.capacity)
        self._in_flight = 0
        self._complete = complete
        self._threads = []
        for n in range(self.capacity):
            t = threading.Thread(target=self._serve, args=(self._jobs, self._slots, complete),
                                 name=f"aioaccel-{self.__name__}-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, token: object, inputs: Any) -> None:
        if not self._slots.acquire(timeout=_ABANDON_AFTER):  # full: the feeder blocks, as
            raise DeviceError("simulated device stopped taking work")  # runtimes do

        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        index, latency = self._next_call()
        self._jobs.put((token, inputs, index, latency))

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._threads = []

    def _serve(self, jobs: SimpleQueue[Any], slots: threading.Semaphore,
               complete: Complete) -> None:
        while (job := jobs.get()) is not None:
            token, inputs, index, latency = job
            try:
                outputs, error = self._compute(index, inputs, latency), None
            except Exception as exc:
                outputs, error = None, exc
            with self._lock:
                self._in_flight -= 1
                self.completion_order.append(index)
            slots.release()
            complete(token, outputs, error)
