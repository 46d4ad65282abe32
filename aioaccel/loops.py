"""Which event loop the ``aioaccel`` commands run on: uvloop when it is installed (it is in
``aioaccel[serve]`` and ``aioaccel[bench]``), else asyncio's own; ``--loop asyncio`` (or
``--no-uvloop``) turns it off. Measured here: 64 coroutines awaiting futures reach ~70k/s on
the default loop and ~118k/s on uvloop (docs/performance.md).

``--cpus 0`` keeps the command (its loop thread, the runners' worker threads and every thread
started after) on the CPUs given: on a fast model the hand-off between the loop and a worker
thread on another core costs a cross-core wake-up and the items' memory moving between caches,
which measured 2-3x the loop's CPU per item of the same run on one core
(docs/performance.md, "One core for the Python threads")."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LOOPS", "add_loop_arguments", "keep_on_cpus", "loop_factory", "parse_cpus",
           "resolve_loop", "run"]

T = TypeVar("T")

LOOPS = ("auto", "asyncio", "uvloop")


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """``--loop auto|asyncio|uvloop`` and its shorthand ``--no-uvloop``."""
    parser.add_argument("--loop", choices=LOOPS, default="auto",
                        help="the event loop: uvloop when installed (auto, the default), or "
                             "asyncio's own")
    parser.add_argument("--no-uvloop", dest="loop", action="store_const", const="asyncio",
                        help="the same as --loop asyncio")
    parser.add_argument("--cpus", default=None, metavar="N[,N...]",
                        help="keep the command's threads on these CPUs (Linux), e.g. 0: on "
                             "fast models one core for the loop and the worker threads saves "
                             "the cross-core hand-offs (a runtime's own thread pool, made "
                             "later, is kept there too)")


def parse_cpus(spec: str) -> frozenset[int]:
    """The CPU numbers of a ``--cpus`` value (``"0"``, ``"0,2"``); ValueError naming what is
    wrong: not numbers, empty, or a CPU this process may not run on."""
    try:
        cpus = frozenset(int(part) for part in spec.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--cpus takes comma-separated CPU numbers, e.g. 0 or 0,1; got "
                         f"{spec!r}") from None
    if not cpus:
        raise ValueError(f"--cpus takes at least one CPU number, e.g. 0; got {spec!r}")
    allowed = _allowed_cpus()
    if allowed is not None and not cpus <= allowed:
        raise ValueError(f"--cpus {spec}: CPU {', '.join(map(str, sorted(cpus - allowed)))} "
                         f"is not one this process may run on "
                         f"({', '.join(map(str, sorted(allowed)))})")
    return cpus


def keep_on_cpus(spec: str | None) -> frozenset[int] | None:
    """Keep the calling thread, and every thread it starts from now on, on the CPUs of
    ``spec`` (``None``: leave the affinity alone). Call it before opening runners, so that
    their worker threads (and a runtime's thread pool) start there. Linux only."""
    if spec is None:
        return None
    cpus = parse_cpus(spec)
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpus needs a platform with os.sched_setaffinity (Linux)")
    os.sched_setaffinity(0, cpus)
    return cpus


def _allowed_cpus() -> frozenset[int] | None:
    if not hasattr(os, "sched_getaffinity"):
        return None
    return frozenset(os.sched_getaffinity(0))


def resolve_loop(choice: str) -> str:
    """``"asyncio"`` or ``"uvloop"`` for a ``--loop`` choice; ValueError when uvloop is asked
    for and not installed."""
    if choice not in LOOPS:
        raise ValueError(f"--loop takes one of {', '.join(LOOPS)}, got {choice!r}")
    if choice == "asyncio":
        return choice
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise ValueError("--loop uvloop: uvloop is not installed (pip install uvloop, "
                             "or use --loop asyncio)") from None
        return "asyncio"
    return "uvloop"


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``asyncio.Runner`` (None: asyncio's default)."""
    if resolve_loop(choice) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    try:
        factory = loop_factory(choice)
    except ValueError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
