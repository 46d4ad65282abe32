"""Native calls that must not be running when the interpreter finalizes.

A runner never closed can leave a worker thread inside a runtime call (ONNX Runtime ``run``,
OpenVINO ``infer``) at exit. Finalization then stops daemon threads where they stand, inside
C++ frames, which aborts the process (``terminate called without an active exception``). An
``atexit`` hook, which runs while every thread still runs, lets the call in progress finish
and refuses later ones.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from types import TracebackType

__all__ = ["EXIT_WAIT", "NativeCalls", "stop_all"]

#: seconds the exit hook waits for one call in progress
EXIT_WAIT = 10.0


class NativeCalls:
    """``with calls:`` around each native call of one stage (one worker thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        _live.add(self)

    def __enter__(self) -> None:
        self._lock.acquire()
        if self._stopped:
            self._lock.release()
            raise RuntimeError("the interpreter is exiting: the runtime takes no more calls")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._lock.release()

    def stop(self, timeout: float = EXIT_WAIT) -> None:
        """Wait (bounded) for the call in progress, then refuse later ones."""
        if self._lock.acquire(timeout=timeout):
            self._stopped = True
            self._lock.release()
        _live.discard(self)

    def forget(self) -> None:
        """The stage closed: nothing to wait for at exit."""
        _live.discard(self)


_live: weakref.WeakSet[NativeCalls] = weakref.WeakSet()


@atexit.register
def stop_all() -> None:
    """Let every native call in progress finish before the interpreter finalizes."""
    for calls in list(_live):
        calls.stop()
