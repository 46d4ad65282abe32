"""The runner's options, checked in one place: each is honoured or refused with a clear error."""

from __future__ import annotations

from typing import Any

from .healing import Restart

__all__ = ["check_options"]


def check_options(*, maxsize: Any, call_timeout: Any, restart: Any, retries: Any, warmup: Any,
                  batch_wait: Any) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first option that is not acceptable."""
    if not isinstance(maxsize, int) or isinstance(maxsize, bool) or maxsize < 1:
        raise ValueError(f"maxsize must be a positive int, got {maxsize!r}")
    if call_timeout is not None and call_timeout <= 0:
        raise ValueError(f"call_timeout must be > 0 seconds or None, got {call_timeout!r}")
    if restart is not None and not isinstance(restart, Restart):
        raise TypeError(f"restart must be an aioaccel.Restart or None, got {restart!r}")
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(batch_wait, (int, float)) or batch_wait < 0:
        raise ValueError(f"batch_wait must be a number of seconds >= 0, got {batch_wait!r}")
