"""A runner's lifecycle: its :class:`State` and the time it spent in each.

One vocabulary everywhere: ``runner.state``, ``runner.health().state``,
``runner.stats().state`` and a pool member's ``MemberStats.state`` all take these values::

    STARTING -> READY -> CLOSING -> CLOSED
                  |  ^
                  v  |
               RECOVERING          (a fatal failure with a Restart policy)
                  |
                  v
               BROKEN -> CLOSED    (a fatal failure it could not recover from)

A runner made and not yet opened is ``STARTING`` (it is not serving, and nothing failed).
``close()`` (no more input) is not a state: results keep flowing; ``runner.closed`` says it.
"""

from __future__ import annotations

import enum
from time import time

__all__ = ["State", "StateClock"]


class State(enum.StrEnum):
    """Where a runner is in its life (a ``str``: ``runner.state == "ready"`` holds)."""

    STARTING = "starting"
    READY = "ready"
    RECOVERING = "recovering"
    BROKEN = "broken"
    CLOSING = "closing"
    CLOSED = "closed"


class StateClock:
    """Seconds spent in each state, and since when the current one holds."""

    __slots__ = ("_seconds", "since", "state")

    def __init__(self) -> None:
        self.state = State.STARTING
        self.since = time()
        self._seconds: dict[str, float] = {}

    def enter(self, state: State) -> None:
        now = time()
        key = self.state.value
        self._seconds[key] = self._seconds.get(key, 0.0) + now - self.since
        self.state = state
        self.since = now

    def seconds(self) -> dict[str, float]:
        """Seconds in each state so far, the current one included."""
        out = dict(self._seconds)
        key = self.state.value
        out[key] = out.get(key, 0.0) + time() - self.since
        return out
