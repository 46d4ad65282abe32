"""Interpreter exit: whatever a program left open is stopped and joined before Python finalizes.

Why it matters: once finalization starts, a daemon thread that comes back from native code and
asks for the GIL is ended where it stands (``pthread_exit``, which unwinds its stack). A thread
returning from a runtime's C++ (OpenVINO's ``compile_model`` or ``InferRequest.wait``, ONNX
Runtime's ``run``) unwinds through C++ frames that forbid it, and the whole process aborts:
``terminate called without an active exception`` (exit code -6). The runtimes' own static
destructors, run after finalization, may also pull their thread pools from under a call in
progress. So, at exit, no thread of ours may still be inside a runtime.

One ``atexit`` hook does it, while every thread still runs, in this order and within one
deadline (:data:`EXIT_WAIT`):

1. :data:`STAGES`    -- stages that guard their native calls refuse new ones and wait for the
   one in progress (OpenVINO's requests, the blocking stages' calls);
2. :data:`RUNNERS`   -- every runner still open is stopped: admission closed (a push says
   ``RunnerClosed``), pending items dropped, worker threads joined, devices released;
3. :data:`PIPELINES` -- pipelines no runner holds any more (a generation still opening or
   warming up, one abandoned by a restart) are stopped and joined;
4. threads started with :func:`native_thread` (a model's load, compiling) are joined.

The hook is re-registered whenever something registers here (:func:`arm`), so it runs *before*
the ``atexit`` hooks of modules imported since: ``multiprocessing`` terminates daemon child
processes in its own hook (a process-isolated runner would see its child killed instead of
being closed) and a runtime may register one that unloads it.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable
from time import perf_counter
from typing import Any, Protocol

__all__ = ["EXIT_WAIT", "PIPELINES", "RUNNERS", "STAGES", "Stoppable", "arm", "exiting",
           "forget", "native_thread", "stop_everything", "watch"]

log = logging.getLogger("aioaccel")

#: seconds the exit hook may spend in all (calls in progress finish; a hung one is abandoned)
EXIT_WAIT = 10.0

#: the phases of the exit, in the order they run
STAGES, RUNNERS, PIPELINES = 0, 1, 2


class Stoppable(Protocol):
    def stop_at_exit(self, timeout: float) -> None:
        """Stop, and wait up to ``timeout`` seconds for what is running to finish."""


_watched: tuple[weakref.WeakSet[Stoppable], ...] = (
    weakref.WeakSet(), weakref.WeakSet(), weakref.WeakSet())
_threads: set[threading.Thread] = set()
_lock = threading.Lock()  # guards both (watched from any thread, snapshotted at exit)
_exiting = False


def exiting() -> bool:
    """Whether the exit hook has started (nothing new may enter a runtime)."""
    return _exiting


def watch(obj: Stoppable, phase: int) -> None:
    """Have ``obj.stop_at_exit`` called at interpreter exit, in ``phase`` (held weakly: an
    object collected, or one that is done and :func:`forget` s itself, is not called)."""
    with _lock:  # against a snapshot being taken on another thread (the exit)
        _watched[phase].add(obj)
    arm()


def forget(obj: Stoppable, phase: int) -> None:
    """``obj`` has nothing running any more: no need to stop it at exit."""
    with _lock:
        _watched[phase].discard(obj)


def native_thread(target: Callable[[], Any], name: str) -> threading.Thread:
    """Start a daemon thread that may spend long in native code (a model's load); the exit
    waits for it (bounded) before the interpreter finalizes."""

    def main() -> None:
        try:
            target()
        finally:
            with _lock:
                _threads.discard(thread)

    thread = threading.Thread(target=main, name=name, daemon=True)
    with _lock:
        _threads.add(thread)
    arm()
    thread.start()
    return thread


def arm() -> None:
    """(Re-)register the exit hook as the latest ``atexit`` hook, so that it runs first."""
    if _exiting:
        return
    atexit.unregister(stop_everything)
    atexit.register(stop_everything)


def stop_everything(timeout: float = EXIT_WAIT) -> None:
    """The exit hook: stop every watched object, phase by phase, then join the native
    threads, all within ``timeout`` seconds. Once: later calls return at once."""
    global _exiting
    with _lock:
        if _exiting:
            return
        _exiting = True
    deadline = perf_counter() + timeout

    def left() -> float:
        return max(0.0, deadline - perf_counter())

    for phase in _watched:
        with _lock:
            objs = list(phase)
        for obj in objs:
            try:
                obj.stop_at_exit(left())
            except Exception:  # one failure must not leave the others running
                log.exception("stopping %r at interpreter exit failed", obj)
    with _lock:
        threads = list(_threads)
    for thread in threads:
        thread.join(left())
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        log.warning("interpreter exit: threads %s still inside a runtime after %.0f s; the "
                    "process may abort when Python finalizes", stuck, timeout)
