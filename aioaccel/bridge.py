"""Worker threads -> event loop, with one loop wake-up per burst of results.

A wake-up (``call_soon_threadsafe``) costs a self-pipe write and a loop iteration; done per item
it caps the default loop near 90k items/s. Here workers append finished items to a deque and
schedule a drain only when none is pending, so a burst of completions costs one wake-up.

When the loop is quick, bursts are short: with ~30 us work items the loop drains every single
result, and each wake-up holds the GIL the worker needs back (measured: 0.52x of the raw loop).
So a worker that has just finished a *short* call and still has more than half the window
of input queued (see ``Pipeline.defer_depth``) may ``defer`` the wake-up: its next completion
comes within microseconds. Deferral is bounded by
``COALESCE_WINDOW`` from the oldest undelivered item, and the last item a worker finishes
before its queue runs dry is never deferred, so nothing is stranded and latency grows by at
most the window plus one short call.

Race analysis: the drain clears ``_scheduled`` *before* it empties the deque, so an item
appended after the flag was cleared either is taken by this drain or schedules the next one;
an extra drain is harmless. A deferred item is always followed by a non-deferred delivery from
the worker that deferred it or from the one that took its remaining input.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["COALESCE_WINDOW", "SHORT_CALL", "Bridge"]

#: longest a deferred result waits for the next wake-up (seconds)
COALESCE_WINDOW = 500e-6
#: calls shorter than this may defer their wake-up (longer ones amortise it anyway)
SHORT_CALL = 50e-6


class Bridge:
    """Carries finished items and rare signals (ready, exit, fatal) to an owner on the loop.

    The owner must have ``_on_items(list)``; signals call the owner's method of that name.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: Any):
        self._loop = loop
        self._items: deque[Any] = deque()
        self._scheduled = False
        self._oldest = 0.0  # completion time of the oldest deferred item, 0 if none
        # Weak, so that worker threads (which hold the bridge) do not keep an abandoned runner
        # alive: it must be collectable to warn and stop its threads.
        self._owner = weakref.ref(owner)

    def deliver(self, item: Any, now: float = 0.0, defer: bool = False) -> None:
        """Called from any thread: hand one finished item to the loop.

        ``defer`` (with ``now``, the completion time) lets the wake-up wait for the next
        delivery, within ``COALESCE_WINDOW``.
        """
        self._items.append(item)
        if self._scheduled:
            return
        if defer:
            oldest = self._oldest or now
            if now - oldest < COALESCE_WINDOW:
                self._oldest = oldest
                return
        self._oldest = 0.0
        self._scheduled = True
        self.call_soon(self._drain)

    def signal(self, method: str, *args: Any) -> None:
        """Called from any thread: run ``owner.<method>(*args)`` on the loop."""
        self.call_soon(self._signal, method, args)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Called from any thread: run ``callback`` on the loop; a closed loop is ignored."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # loop closed: nobody is left to tell
            pass

    def _signal(self, method: str, args: tuple[Any, ...]) -> None:
        owner = self._owner()
        if owner is not None:
            getattr(owner, method)(*args)

    def _drain(self) -> None:
        self._scheduled = False
        items = []
        pop = self._items.popleft
        while True:
            try:
                items.append(pop())
            except IndexError:
                break
        owner = self._owner()
        if owner is not None and items:
            owner._on_items(items)
