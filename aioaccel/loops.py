"""Which event loop the ``aioaccel`` commands run on: uvloop when it is installed (it is in
``aioaccel[serve]`` and ``aioaccel[bench]``), else asyncio's own; ``--loop asyncio`` (or
``--no-uvloop``) turns it off. Measured here: 64 coroutines awaiting futures reach ~70k/s on
the default loop and ~118k/s on uvloop (docs/performance.md)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LOOPS", "add_loop_arguments", "loop_factory", "resolve_loop", "run"]

T = TypeVar("T")

LOOPS = ("auto", "asyncio", "uvloop")


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """``--loop auto|asyncio|uvloop`` and its shorthand ``--no-uvloop``."""
    parser.add_argument("--loop", choices=LOOPS, default="auto",
                        help="the event loop: uvloop when installed (auto, the default), or "
                             "asyncio's own")
    parser.add_argument("--no-uvloop", dest="loop", action="store_const", const="asyncio",
                        help="the same as --loop asyncio")


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
