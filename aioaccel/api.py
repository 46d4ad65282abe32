"""``aioaccel.open``: the one entry point."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from itertools import count
from typing import TYPE_CHECKING, Any

from .backends import get_backend, resolve_backend
from .core.healing import Restart
from .errors import BatchingUnsupported
from .isolation import check_isolation
from .options import DEFAULT_OPEN_TIMEOUT, check_batch, check_count
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
    open_timeout: float | None = DEFAULT_OPEN_TIMEOUT,
    restart: Restart | None = None,
    retries: int = 0,
    warmup: int = 0,
    warmup_inputs: Any = None,
    batch: int | str | None = None,
    batch_wait: float | None = None,
    isolation: str = "thread",
    max_rss: int | None = None,
    **options: Any,
) -> Runner:
    """Make a runner for ``target``; open it with ``async with`` or ``await``.

    ``target`` is a blocking callable, a stage, a model file, or a list of them (a pipeline:
    each stage's outputs are the next one's inputs). ``maxsize`` bounds the items admitted and
    not yet consumed; ``replicas`` gives each blocking stage that many worker threads;
    ``call_timeout`` (seconds) breaks the runner with :class:`~aioaccel.DeviceTimeout` when a
    stage call hangs; ``close_timeout`` bounds the drain in ``aclose()``; ``open_timeout``
    bounds opening (loading, making the stages, the warm-up), and the same for the reopen of
    a restart and for :meth:`~aioaccel.Runner.reload` (:class:`~aioaccel.OpenTimeout`).

    Self-healing (see :mod:`aioaccel.core.healing`): ``restart=aioaccel.Restart(...)`` reopens the
    model after a fatal failure instead of breaking the runner. ``retries`` is how many more
    times an item is run after the device holding it failed (0: never; the item then fails
    with that failure). Here the items the failed device held run again on the model
    ``restart=`` reopened (or, during a :meth:`~aioaccel.Runner.reload`, on the new model);
    default 0, as without ``restart=`` there is no device to run them on. ``warmup`` runs that
    many inferences on synthetic inputs of the model's spec (or ``warmup_inputs``) before
    admitting work.

    Dynamic batching (see :mod:`aioaccel.core.batch_gather`): ``batch=N`` groups up to N
    admitted items into one call of the first stage (inputs joined along axis 0, outputs split
    back per item); ``batch="auto"`` measures the model at open and picks a size;
    ``batch_wait`` is the longest a partial batch waits for more items while the device is busy.

    Process isolation (see :mod:`aioaccel.isolation`): ``isolation="process"`` runs the
    stages in child processes, so a runtime that segfaults, aborts or hangs holding the GIL
    takes down one child, not the service; ``max_rss`` (bytes) kills a child whose resident
    memory grows past it. The target must be loadable in the child: a model path or a
    callable importable by reference.

    Other keyword options go to the backend. Nothing is loaded until the runner is opened.
    """
    batch, wait = check_batch(batch, batch_wait)
    check_count("replicas", replicas, 1)
    # [isolation] checked here, at open: a target the child cannot load is refused now
    process = check_isolation(isolation, target, backend, batch, max_rss, options)
    name = name or f"runner{next(_names)}"

    def make_load(new_target: Any, new_options: dict[str, Any]
                  ) -> tuple[Callable[[], Model], float]:
        """The load for ``target`` and ``options`` as given to open(), updated by what a
        reload gives (``batch``, ``batch_wait``, ``replicas`` and backend options are the
        model's; each is checked here), and the batch_wait to run it with."""
        new_target = target if new_target is None else new_target
        if process is not None and new_target is not target:  # [isolation] reload(target)
            from .isolation import check_target

            check_target(new_target)
        new_options = dict(new_options)
        new_batch = new_options.pop("batch", batch)
        new_wait = new_options.pop("batch_wait", None)
        if new_wait is None and new_batch is not None:
            new_wait = wait
        new_batch, new_wait = check_batch(new_batch, new_wait)
        new_replicas = check_count("replicas", new_options.pop("replicas", replicas), 1)
        merged = {**options, **new_options}
        chosen = merged.pop("backend", None) or (backend if new_target is target else None)
        size: list[int | str | None] = [new_batch]

        def load() -> Model:
            # batch="auto" measures once: a restart reopens with the size it chose
            model = _load(chosen, new_target, new_replicas, maxsize, name, size[0], new_wait,
                          merged, process)
            size[0] = model.batch
            return model

        return load, new_wait

    if backend is None:
        resolve_backend(target)  # a bad target is refused here, not at open
    load, _ = make_load(target, {})
    return Runner(load, maxsize=maxsize, name=name, call_timeout=call_timeout,
                  close_timeout=close_timeout, open_timeout=open_timeout, restart=restart,
                  retries=retries, warmup=warmup, warmup_inputs=warmup_inputs,
                  batch_wait=wait, reopen=make_load)


def _load(backend_name: str | None, target: Any, replicas: int, maxsize: int, runner_name: str,
          batch: int | str | None, batch_wait: float, options: dict[str, Any],
          process: dict[str, Any] | None = None) -> Model:
    """Runs on the runner's load thread: deciding the backend may import a runtime."""
    name = backend_name or resolve_backend(target)
    if process is not None:  # [isolation] the backend loads in child processes instead
        from .isolation import process_loader

        load = process_loader(name, **process)
    else:
        load = get_backend(name).load
    accepted = inspect.signature(load).parameters
    if "maxsize" in accepted:  # it bounds the vendor's own queues
        options = {**options, "maxsize": maxsize}
    if "runner_name" in accepted:  # it names its helper threads after the runner
        options = {**options, "runner_name": runner_name}

    def load_backend(size: int | None) -> Model:
        extra = {} if size is None or size == 1 else {"batch": size}
        if extra and "batch" not in accepted:
            raise BatchingUnsupported(f"the {name} backend cannot batch (batch={size} given): its "
                             f"runtime takes one item per call")
        model: Model = load(target, replicas=replicas, **options, **extra)
        model.batch = size or 1
        return model

    if batch is None or batch == 1:
        return load_backend(None)
    from .batching import load_model

    return load_model(load_backend, batch, batch_wait)
