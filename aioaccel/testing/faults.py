"""Stages that fail the way native runtimes do, for ``isolation="process"`` tests and demos.

Each is a picklable callable (a blocking stage) that a child process can receive by reference:

* :class:`Fault` -- on its ``at``-th call (0-based) it ``abort``\\ s (libcoral's ``CHECK``),
  ``segfault``\\ s (``ctypes.string_at(0)``), ``exit``\\ s (``os._exit(code)``), ``hang``\\ s
  holding the GIL in a C-level busy loop, or ``grow``\\ s its memory by ``megabytes`` per call
  from then on. With ``once=path`` it fires only if ``path`` does not exist yet (and creates
  it), so a restarted child and a retried item run clean: one fault per test.
* :class:`Work` -- ``ms`` milliseconds per call, sleeping (a runtime that releases the GIL) or
  spinning in Python (pre/post-processing that holds it); returns its input.

Never use these in a process you care about: they really crash it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import time
from typing import Any

__all__ = ["FAULTS", "Fault", "Work", "hang_holding_the_gil"]

FAULTS = ("abort", "segfault", "exit", "hang", "grow")

# a jump to itself: the tightest C-level loop there is
_SPIN = {"x86_64": b"\xeb\xfe", "amd64": b"\xeb\xfe", "aarch64": b"\x00\x00\x00\x14",
         "arm64": b"\x00\x00\x00\x14"}


def hang_holding_the_gil() -> None:
    """Spin forever in machine code called *with the GIL held* (``ctypes.PYFUNCTYPE``): no
    other thread of this process runs Python again. Falls back to a GIL-holding ``sleep``
    (``ctypes.PyDLL``) where executable memory cannot be had."""
    code = _SPIN.get(platform.machine().lower())
    if code is not None:
        try:
            page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                             | mmap.PROT_EXEC)
            page.write(code)
            address = ctypes.addressof(ctypes.c_char.from_buffer(page))
            ctypes.PYFUNCTYPE(None)(address)()
        except (OSError, ValueError, AttributeError):
            pass
    libc = ctypes.PyDLL(None)
    while True:
        libc.sleep(3600)


class Fault:
    """A blocking stage that returns its input, and fails as told on its ``at``-th call."""

    def __init__(self, kind: str, at: int = 0, *, code: int = 3, megabytes: int = 64,
                 once: str | os.PathLike[str] | None = None, ms: float = 0.0):
        if kind not in FAULTS:
            raise ValueError(f"kind must be one of {FAULTS}, got {kind!r}")
        self.kind = kind
        self.at = at
        self.code = code
        self.megabytes = megabytes
        self.once = None if once is None else os.fspath(once)
        self.ms = ms
        self.calls = 0
        self._hoard: list[bytearray] = []
        self.__name__ = f"fault_{kind}"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_hoard"] = []
        return state

    def _fires(self) -> bool:
        if self.once is None:
            return True
        try:
            fd = os.open(self.once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def __call__(self, inputs: Any) -> Any:
        n = self.calls
        self.calls += 1
        if self.ms:
            time.sleep(self.ms / 1e3)
        if self.kind == "grow" and n >= self.at and (self._hoard or self._fires()):
            chunk = bytearray(self.megabytes * 2**20)
            chunk[::4096] = b"\x01" * len(chunk[::4096])  # touch every page: resident
            self._hoard.append(chunk)
        elif n == self.at and self.kind != "grow" and self._fires():
            if self.kind == "abort":
                os.abort()
            elif self.kind == "segfault":
                ctypes.string_at(0)
            elif self.kind == "exit":
                os._exit(self.code)
            else:
                hang_holding_the_gil()
        return inputs


class Work:
    """``ms`` milliseconds of work per call: ``"sleep"`` releases the GIL (like a runtime's
    native call), ``"spin"`` holds it in pure Python (like pre/post-processing)."""

    def __init__(self, ms: float = 1.0, kind: str = "sleep"):
        if kind not in ("sleep", "spin"):
            raise ValueError(f"kind must be 'sleep' or 'spin', got {kind!r}")
        self.ms = ms
        self.kind = kind
        self.__name__ = f"work_{kind}"

    def __call__(self, inputs: Any) -> Any:
        if self.kind == "sleep":
            time.sleep(self.ms / 1e3)
        else:
            end = time.perf_counter() + self.ms / 1e3
            while time.perf_counter() < end:
                pass
        return inputs
