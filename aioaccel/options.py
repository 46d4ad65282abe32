"""Checking options: every option of ``open()``, ``pool()``, ``reload()`` and ``Restart`` is
checked here, the same way, before anything is loaded.

An option is either honoured or refused with a ``ValueError`` (``TypeError`` for a wrong kind
of object) that names it, says what came and what is expected; never silently ignored. Numbers
of seconds must be real numbers: NaN is refused everywhere (a NaN compares false with every
bound, so it would slip through ``< 0`` tests and then never time out, or never back off).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "DEFAULT_BATCH_WAIT",
    "DEFAULT_OPEN_TIMEOUT",
    "RELOAD_REFUSED",
    "RETRIES",
    "check_batch",
    "check_count",
    "check_reload",
    "check_runner",
    "check_seconds",
]

#: ``batch_wait`` when ``batch=`` is given without it (seconds)
DEFAULT_BATCH_WAIT = 0.002
#: the longest an open (load, stages, warm-up), a restart's reopen or a reload may take (s)
DEFAULT_OPEN_TIMEOUT = 120.0

#: What ``retries`` means, word for word the same in ``open()``, ``pool()`` and
#: ``integrations.ray.connect()`` (each docstring quotes it, then says where the re-run goes:
#: the model ``restart=`` reopened, another member, another replica). Checked everywhere with
#: ``check_count("retries", value)``. What a runtime reports about one input (a per-item
#: ``InferenceError``) is never re-run: the device did not fail, the item did.
RETRIES = ("``retries`` is how many more times an item is run after the device holding it "
           "failed (0: never; the item then fails with that failure).")

#: options of ``open()`` that belong to the runner itself, not to the model: ``reload()``
#: reopens the model only, so it refuses them rather than ignore them
RELOAD_REFUSED = {
    "maxsize": "the runner's capacity bound holds admitted items across the reload",
    "name": "the runner keeps its name",
    "call_timeout": "the watchdog belongs to the runner",
    "close_timeout": "it is the runner's own",
    "open_timeout": "it is the runner's own",
    "restart": "the restart policy belongs to the runner",
    "retries": "it is the runner's own",
    "warmup": "it is the runner's own",
    "warmup_inputs": "it is the runner's own",
}


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """An int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_seconds(name: str, value: Any, *, none: bool = False, zero: bool = True,
                  infinite: bool = False) -> float | None:
    """A number of seconds: a real number (not a bool, not NaN), > 0 or >= 0 (``zero``),
    finite unless ``infinite``; None too when ``none``."""
    if value is None and none:
        return None
    bound = ">= 0" if zero else "> 0"
    what = f"a number of seconds {bound}" + (" or None" if none else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    number = float(value)
    if math.isnan(number) or number < 0 or (number == 0 and not zero):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if math.isinf(number) and not infinite:
        raise ValueError(f"{name} must be {what} and finite, got {value!r}")
    return number


def check_batch(batch: Any, batch_wait: Any) -> tuple[int | str | None, float]:
    """``batch`` (None, an int >= 1 or ``"auto"``) and ``batch_wait`` (seconds, or None for
    the default), checked together: ``batch_wait`` without ``batch`` would do nothing, so it
    is refused."""
    if batch is not None and not (isinstance(batch, str) and batch == "auto") and (
            isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be None, an int >= 1 (items per call) or 'auto', "
                         f"got {batch!r}")
    if batch_wait is None:
        return batch, DEFAULT_BATCH_WAIT
    wait = check_seconds("batch_wait", batch_wait)
    assert wait is not None
    if batch is None:
        raise ValueError(f"batch_wait={batch_wait!r} has no effect without batch=: give "
                         f"batch=N (or 'auto') too, or leave batch_wait out")
    return batch, wait


def check_runner(*, maxsize: Any, call_timeout: Any, close_timeout: Any, open_timeout: Any,
                 retries: Any, warmup: Any, batch_wait: Any) -> None:
    """The numeric options of a :class:`~aioaccel.Runner` (``restart``'s type is checked by the
    runner: ``Restart`` checks its own fields with these helpers)."""
    check_count("maxsize", maxsize, 1)
    check_seconds("call_timeout", call_timeout, none=True, zero=False)
    check_seconds("close_timeout", close_timeout)
    check_seconds("open_timeout", open_timeout, none=True, zero=False)
    check_count("retries", retries)
    check_count("warmup", warmup)
    check_seconds("batch_wait", batch_wait)


def check_reload(options: dict[str, Any]) -> dict[str, Any]:
    """Refuse the options ``reload()`` cannot honour (the runner's own), naming each; returns
    ``options``."""
    refused = sorted(set(options) & set(RELOAD_REFUSED))
    if refused:
        reasons = "; ".join(f"{name}: {RELOAD_REFUSED[name]}" for name in refused)
        raise ValueError(f"reload() cannot change {', '.join(refused)} ({reasons}); it "
                         f"reopens the model only (target, backend, batch, batch_wait, "
                         f"replicas and backend options). Open a new runner to change them")
    return options
