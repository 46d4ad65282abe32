"""Process isolation: ``aioaccel.open(target, isolation="process")``.

The runner's stages run in child processes; the parent keeps the event loop, admission,
ordering, streams, batching and the whole API. A native runtime that segfaults, aborts
(libcoral's ``CHECK``), calls ``exit`` or hangs holding the GIL takes one child down: the
parent notices (the child's pipe closes at once; a hang trips ``call_timeout``), names the
cause in a :class:`~aioaccel.DeviceError`, and the runner's ``restart=`` / ``retries=``
policy starts a new child and re-runs what the old one held.

* :mod:`.shm`   -- the ring of shared-memory slots tensors travel in (headers on a pipe);
* :mod:`.child` -- the child's main: load by reference, watch the parent, run the stages;
* :mod:`.stage` -- the parent's side: a child as a device stage, and the ``load`` behind it.

What crosses to the child is a *reference*: model paths, or callables and stage classes that
the child can import (``module.function``). A lambda, a closure or a function defined inside
another one cannot be imported and is refused at open.

Options (keywords of ``aioaccel.open`` when ``isolation="process"``): ``max_rss`` (bytes: a
child whose resident memory passes it is killed and restarted), ``child_setup``
(``"module:function"`` run in each child before it loads: install a simulator, configure a
vendor runtime), ``slot_bytes`` (the size of a slot region when the model's specs do not tell,
1 MiB by default), ``load_timeout`` (seconds a child may take to load, 300 by default).
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable
from typing import Any

__all__ = ["ISOLATIONS", "check_isolation", "child_pids", "process_loader"]

#: the values ``aioaccel.open(isolation=...)`` takes
ISOLATIONS = ("thread", "process")
#: open()'s keywords that only process isolation takes (they never reach a backend)
_PROCESS_OPTIONS = ("child_setup", "slot_bytes", "load_timeout")


def check_isolation(isolation: Any, target: Any, backend: str | None, batch: Any,
                    max_rss: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    """Validate ``isolation=`` and what goes with it, at open. Returns the options of the
    process loader (removed from ``options``), or None for in-process stages."""
    if not isinstance(isolation, str) or isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {', '.join(map(repr, ISOLATIONS))}, "
                         f"got {isolation!r}")
    if isolation == "thread":
        given = [k for k in ("max_rss", *_PROCESS_OPTIONS)
                 if (max_rss if k == "max_rss" else options.get(k)) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with isolation='process' "
                             f"(stages in a child process); this runner has isolation='thread'")
        return None
    if max_rss is not None and (isinstance(max_rss, bool) or not isinstance(max_rss, int)
                                or max_rss <= 0):
        raise ValueError(f"max_rss must be a number of bytes > 0 (e.g. 512 * 2**20), "
                         f"got {max_rss!r}")
    if batch == "auto":
        raise ValueError("batch='auto' is not available with isolation='process' (the "
                         "measurement would run the model in this process); give batch=N")
    setup = options.pop("child_setup", None)
    if setup is not None and (not isinstance(setup, str) or not _importable_name(setup)):
        raise ValueError(f"child_setup must be an importable 'module:function' string, got "
                         f"{setup!r}")
    slot_bytes = options.pop("slot_bytes", None)
    if slot_bytes is not None and (isinstance(slot_bytes, bool) or not isinstance(
            slot_bytes, int) or slot_bytes <= 0):
        raise ValueError(f"slot_bytes must be a number of bytes > 0, got {slot_bytes!r}")
    load_timeout = options.pop("load_timeout", None)
    if load_timeout is not None and (isinstance(load_timeout, bool) or not isinstance(
            load_timeout, (int, float)) or load_timeout <= 0):
        raise ValueError(f"load_timeout must be a number of seconds > 0, got {load_timeout!r}")
    check_target(target)
    for key, value in options.items():
        _check_crossing(value, f"option {key}=")
    loader: dict[str, Any] = {"max_rss": max_rss, "setup": setup, "slot_bytes": slot_bytes}
    if load_timeout is not None:
        loader["load_timeout"] = float(load_timeout)
    return loader


def check_target(target: Any) -> None:
    """Refuse, with the reason, a target a child process cannot load."""
    items = list(target) if isinstance(target, (list, tuple)) else [target]
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            continue
        _check_crossing(item, "the target" if len(items) == 1 else "a stage of the target")


def _importable_name(ref: str) -> bool:
    module, sep, name = ref.partition(":")
    if not sep:
        module, _, name = ref.rpartition(".")
    return bool(module and name)


def _check_crossing(obj: Any, what: str) -> None:
    """``obj`` must reach the child by reference (pickle), not as live state."""
    label = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    hint = ("isolation='process' loads the target in a child process, by reference: pass a "
            "model path, or a function / stage class defined at the top level of an "
            "importable module (not a lambda, a closure or a function defined inside another "
            "one)")
    qualname = getattr(obj, "__qualname__", "")
    if callable(obj) and isinstance(qualname, str) and "<" in qualname:
        kind = "a lambda" if "<lambda>" in qualname else "defined inside a function"
        raise TypeError(f"{what} {label!r} is {kind}: {hint}")
    module = getattr(obj, "__module__", None) or type(obj).__module__
    if module == "__main__":
        import sys

        main = sys.modules.get("__main__")
        if getattr(main, "__file__", None) is None:
            raise TypeError(f"{what} {label!r} is defined in an interactive session "
                            f"(__main__ has no file), which a child process cannot import: "
                            f"{hint}")
    try:
        pickle.dumps(obj)
    except Exception as exc:
        raise TypeError(f"{what} {label!r} cannot be sent to the child process ({exc}): "
                        f"{hint}") from exc


def process_loader(backend: str, **loader: Any) -> Callable[..., Any]:
    """The ``load(target, *, replicas, maxsize, runner_name, batch, **options)`` that starts
    child processes for ``backend`` instead of loading it here."""
    from .stage import load

    return functools.partial(load, backend, **loader)


def child_pids(runner: Any) -> list[int]:
    """The process ids of a process-isolated runner's children (empty for other runners)."""
    info = runner.info.get("isolation") or {}
    return list(info.get("pids", []))
