"""The watchdog behind ``call_timeout``: a hung stage breaks (or restarts) the runner.

What the timeout measures, per kind of stage:

* blocking stage -- the duration of one ``run`` call (a batch counts as one call);
* device stage   -- progress: the device holds items and has completed none of them for
  ``call_timeout`` seconds (since its last completion, or since it went from idle to busy).
  Time an item spends in the vendor's own queue behind others therefore does not count, so a
  healthy device under backpressure never trips it, however deep its queue.

It ticks on the loop (a timer, no thread) every ``call_timeout / 4`` (5 ms to 0.5 s) and looks
at the workers only, so a tick costs the same whatever ``maxsize`` is.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING

from ..errors import DeviceTimeout

if TYPE_CHECKING:
    from .async_library import Cancellable, Hub
    from .stage_threads import Pipeline

__all__ = ["Watchdog"]


class Watchdog:
    def __init__(self, hub: Hub, timeout: float, runner_name: str,
                 on_hang: Callable[[DeviceTimeout], None]):
        self._hub = hub
        self.timeout = timeout
        self._name = runner_name
        # weak: the loop's timer must not keep an abandoned runner alive
        self._on_hang = weakref.WeakMethod(on_hang)
        self._pipeline: weakref.ref[Pipeline] | None = None
        self._handle: Cancellable | None = None
        self._period = min(max(timeout / 4, 0.005), 0.5)

    def watch(self, pipeline: Pipeline) -> None:
        self.stop()
        self._pipeline = weakref.ref(pipeline)
        self._handle = self._hub.call_later(self._period, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def hung(self, pipeline: Pipeline, now: float) -> DeviceTimeout | None:
        timeout = self.timeout
        for w in pipeline.workers:
            if w.exited:
                continue
            if w.spec.device:
                if w.in_device and now - w.progress_at > timeout:
                    return DeviceTimeout(
                        f"stage {w.spec.name!r} of runner {self._name!r} holds {w.in_device} "
                        f"items and completed none for {now - w.progress_at:.3f} s, past "
                        f"call_timeout={timeout} s")
            else:
                started = w.call_started
                if started and now - started > timeout:
                    return DeviceTimeout(
                        f"stage {w.spec.name!r} of runner {self._name!r} has been busy with one "
                        f"call for {now - started:.3f} s, past call_timeout={timeout} s")
        return None

    def _tick(self) -> None:
        self._handle = None
        pipeline = self._pipeline() if self._pipeline is not None else None
        on_hang = self._on_hang()
        if pipeline is None or on_hang is None or pipeline.stopping:
            return
        err = self.hung(pipeline, perf_counter())
        if err is not None:
            on_hang(err)
            return
        self._handle = self._hub.call_later(self._period, self._tick)
