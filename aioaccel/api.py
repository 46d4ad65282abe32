"""``aioaccel.open``: the one entry point."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from .backends import get_backend, resolve_backend
from .runner import Runner

__all__ = ["open"]


def open(
    target: Any,
    *,
    backend: str | None = None,
    maxsize: int = 8,
    replicas: int = 1,
    name: str | None = None,
    call_timeout: float | None = None,
    close_timeout: float = 10.0,
    **options: Any,
) -> Runner:
    """Make a runner for ``target``; open it with ``async with`` or ``await``.

    ``target`` is a blocking callable, a stage, a model file, or a list of them (a pipeline:
    each stage's outputs are the next one's inputs). ``maxsize`` bounds the items admitted and
    not yet consumed; ``replicas`` gives each blocking stage that many worker threads;
    ``call_timeout`` (seconds) breaks the runner with :class:`~aioaccel.DeviceTimeout` when a
    stage call hangs; ``close_timeout`` bounds the drain in ``aclose()``. Other keyword
    options go to the backend. Nothing is loaded until the runner is opened.
    """
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")
    backend_name = backend or resolve_backend(target)
    load = functools.partial(_load, backend_name, target, replicas, maxsize, options)
    return Runner(load, maxsize=maxsize, name=name, call_timeout=call_timeout,
                  close_timeout=close_timeout)


def _load(backend_name: str, target: Any, replicas: int, maxsize: int,
          options: dict[str, Any]) -> Any:
    load = get_backend(backend_name).load
    if "maxsize" in inspect.signature(load).parameters:  # it bounds the vendor's own queues
        options = {**options, "maxsize": maxsize}
    return load(target, replicas=replicas, **options)
