"""``aioaccel.open``: the one entry point."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from itertools import count
from typing import TYPE_CHECKING, Any

from .backends import get_backend, resolve_backend
from .recovery import Restart
from .runner import Runner

if TYPE_CHECKING:
    from .backends import Model

_names = count()

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
    restart: Restart | None = None,
    retries: int = 0,
    warmup: int = 0,
    warmup_inputs: Any = None,
    **options: Any,
) -> Runner:
    """Make a runner for ``target``; open it with ``async with`` or ``await``.

    ``target`` is a blocking callable, a stage, a model file, or a list of them (a pipeline:
    each stage's outputs are the next one's inputs). ``maxsize`` bounds the items admitted and
    not yet consumed; ``replicas`` gives each blocking stage that many worker threads;
    ``call_timeout`` (seconds) breaks the runner with :class:`~aioaccel.DeviceTimeout` when a
    stage call hangs; ``close_timeout`` bounds the drain in ``aclose()``.

    Self-healing (see :mod:`aioaccel.recovery`): ``restart=aioaccel.Restart(...)`` reopens the
    model after a fatal failure instead of breaking the runner; ``retries`` re-runs the items
    the failed device held (up to that many times each); ``warmup`` runs that many inferences
    on synthetic inputs of the model's spec (or ``warmup_inputs``) before admitting work.

    Other keyword options go to the backend. Nothing is loaded until the runner is opened.
    """
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")
    name = name or f"runner{next(_names)}"

    def make_load(new_target: Any, new_options: dict[str, Any]) -> Callable[[], Model]:
        new_target = target if new_target is None else new_target
        merged = {**options, **new_options}
        chosen = merged.pop("backend", None) or (backend if new_target is target else None)
        return functools.partial(_load, chosen, new_target, replicas, maxsize, name, merged)

    if backend is None:
        resolve_backend(target)  # a bad target is refused here, not at open
    load = make_load(target, {})
    return Runner(load, maxsize=maxsize, name=name, call_timeout=call_timeout,
                  close_timeout=close_timeout, restart=restart, retries=retries,
                  warmup=warmup, warmup_inputs=warmup_inputs, reopen=make_load)


def _load(backend_name: str | None, target: Any, replicas: int, maxsize: int, runner_name: str,
          options: dict[str, Any]) -> Any:
    """Runs on the runner's load thread: deciding the backend may import a runtime."""
    load = get_backend(backend_name or resolve_backend(target)).load
    accepted = inspect.signature(load).parameters
    if "maxsize" in accepted:  # it bounds the vendor's own queues
        options = {**options, "maxsize": maxsize}
    if "runner_name" in accepted:  # it names its helper threads after the runner
        options = {**options, "runner_name": runner_name}
    return load(target, replicas=replicas, **options)
