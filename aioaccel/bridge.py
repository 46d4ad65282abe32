"""Worker threads -> event loop, with one loop wake-up per burst of results.

A wake-up (``call_soon_threadsafe``) costs a self-pipe write and a loop iteration; done per item
it caps the default loop near 90k items/s. Here workers append finished items to a deque and
schedule a drain only when none is pending, so a burst of completions costs one wake-up.

Race analysis: the drain clears ``_scheduled`` *before* it empties the deque, so an item
appended after the flag was cleared either is taken by this drain or schedules the next one;
an extra drain is harmless, a missed one is impossible.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Bridge"]


class Bridge:
    """Carries finished items and rare signals (ready, exit, fatal) to an owner on the loop.

    The owner must have ``_on_items(list)``; signals call the owner's method of that name.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: Any):
        self._loop = loop
        self._items: deque[Any] = deque()
        self._scheduled = False
        # Weak, so that worker threads (which hold the bridge) do not keep an abandoned runner
        # alive: it must be collectable to warn and stop its threads.
        self._owner = weakref.ref(owner)

    def deliver(self, item: Any) -> None:
        """Called from any thread: hand one finished item to the loop."""
        self._items.append(item)
        if not self._scheduled:
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
