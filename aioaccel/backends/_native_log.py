"""Keep LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." off the terminal.

LiteRT prints that line with ``fprintf(stderr, ...)`` from native code, once per process, on
the first ``allocate_tensors`` that applies the default XNNPACK delegate; no environment
variable or Python API turns it off. :func:`quiet_info` points file descriptor 2 at a
temporary file around that first call, then writes back everything captured except LiteRT's
INFO lines, so a warning or error printed meanwhile (by any thread) still reaches stderr.
Once the line has been seen, it costs nothing. ``AIOACCEL_NATIVE_LOGS=1`` keeps the native output as
it is.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["quiet_info"]

_lock = threading.Lock()
_seen = threading.Event()  # the line was printed (and dropped): later calls need no capture
#: the lines dropped: LiteRT's INFO lines (it prints each at most once per process)
_DROPPED = (b"INFO: Created TensorFlow Lite",)


@contextmanager
def quiet_info() -> Iterator[None]:
    """Around a LiteRT call that may print its one-time INFO line."""
    if _seen.is_set() or os.environ.get("AIOACCEL_NATIVE_LOGS") == "1":
        yield
        return
    with _lock:
        if _seen.is_set():
            yield
            return
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to speak of: nothing to keep quiet
            yield
            return
        sys.stderr.flush()
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                yield
            finally:
                try:
                    sys.stderr.flush()
                finally:
                    os.dup2(saved, 2)
                    os.close(saved)
                capture.seek(0)
                lines = capture.read().splitlines(keepends=True)
                kept = b"".join(line for line in lines if not line.startswith(_DROPPED))
                while kept:
                    kept = kept[os.write(2, kept):]
                if any(line.startswith(_DROPPED) for line in lines):
                    _seen.set()  # LiteRT prints it once per process
