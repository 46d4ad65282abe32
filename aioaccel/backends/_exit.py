"""Native calls that must not be running when the interpreter finalizes.

A runner never closed can leave a worker thread inside a runtime call (ONNX Runtime ``run``,
OpenVINO ``infer``, LiteRT ``invoke``) at exit. Finalization then ends daemon threads where
they stand, inside C++ frames, which aborts the process (``terminate called without an active
exception``). The exit hook (:mod:`aioaccel.core.exit_guard`, which runs while every thread
still runs) lets the call in progress finish and refuses later ones.
"""

from __future__ import annotations

import threading
from types import TracebackType

from ..core import exit_guard
from ..core.exit_guard import EXIT_WAIT

__all__ = ["EXIT_WAIT", "NativeCalls"]


class NativeCalls:
    """``with calls:`` around each native call of one stage (one worker thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        exit_guard.watch(self, exit_guard.STAGES)

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
        exit_guard.forget(self, exit_guard.STAGES)

    stop_at_exit = stop

    def forget(self) -> None:
        """The stage closed: nothing to wait for at exit."""
        exit_guard.forget(self, exit_guard.STAGES)
