"""The runner's options, checked in one place: each is honoured or refused with a clear error.

The checks themselves are :mod:`aioaccel.options` (shared with ``open()``, ``pool()``,
``reload()`` and ``Restart``); this is the runner's list of them.
"""

from __future__ import annotations

from typing import Any

from ..options import check_count, check_seconds
from .healing import Restart

__all__ = ["check_options"]


def check_options(*, maxsize: Any, call_timeout: Any, restart: Any, retries: Any, warmup: Any,
                  batch_wait: Any, close_timeout: Any = 10.0,
                  open_timeout: Any = None) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first option that is not acceptable
    (NaN seconds included)."""
    check_count("maxsize", maxsize, 1)
    check_seconds("call_timeout", call_timeout, none=True, zero=False)
    check_seconds("close_timeout", close_timeout)
    check_seconds("open_timeout", open_timeout, none=True, zero=False)
    if restart is not None and not isinstance(restart, Restart):
        raise TypeError(f"restart must be an aioaccel.Restart or None, got {restart!r}")
    check_count("retries", retries)
    check_count("warmup", warmup)
    check_seconds("batch_wait", batch_wait)
