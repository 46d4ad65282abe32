"""Routing policies of a device pool: which member the next item should go to.

A policy sees one :class:`MemberView` per member (in priority order) and picks a member, or
none. It keeps no state of its own and touches no thread or loop, so the pool can call it
wherever it decides (today: on the event loop, per item, just before the item is handed
over). A picked member may be full: the item then waits for that member rather than going to
a member that would finish it later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["POLICIES", "Balance", "Failover", "MemberView", "NoMember", "Policy", "ServiceClock",
           "make_policy"]

#: health states a member can take a new item in ("starting" is a member still opening)
ROUTABLE = frozenset({"ready"})
#: health states a member never leaves: it will not take items again
FINAL = frozenset({"broken", "closed"})


class NoMember(Exception):
    """Every member is broken or closed: nothing will ever run another item."""


@dataclass(frozen=True)
class MemberView:
    """What a policy knows of one member at the moment it decides."""

    index: int
    state: str            #: "starting" | "ready" | "recovering" | "broken" | "closed"
    depth: int            #: items handed to it and not yet back
    capacity: int         #: most items it may hold (its maxsize)
    service_time: float | None  #: measured seconds per item while busy; None: not yet known

    @property
    def full(self) -> bool:
        return self.depth >= self.capacity

    @property
    def finish_estimate(self) -> float:
        """When a new item would be done here: service time x (queue depth + 1)."""
        return (self.service_time or 0.0) * (self.depth + 1)


class Policy(Protocol):
    name: str

    def choose(self, members: Sequence[MemberView]) -> int | None:
        """The index of the member for the next item; None: wait (no member can take it now).
        Raises :class:`NoMember` when every member is gone for good."""


def _check_alive(members: Sequence[MemberView]) -> None:
    if all(m.state in FINAL for m in members):
        raise NoMember("every member is broken or closed")


class Balance:
    """Each item to the member expected to finish it soonest.

    Expected finish = measured service time x (queue depth + 1), so a member three times
    slower gets about a third of the items and no queue grows on a slow device while a fast
    one idles. A member whose speed is not known yet is tried first (estimate 0). Ties go to
    a member with room, then to the earlier member.
    """

    name = "balance"

    def choose(self, members: Sequence[MemberView]) -> int | None:
        _check_alive(members)
        best: MemberView | None = None
        for m in members:
            if m.state not in ROUTABLE:
                continue
            if best is None or (m.finish_estimate, m.full) < (best.finish_estimate, best.full):
                best = m
        return None if best is None else best.index


class Failover:
    """Everything to the first member (in the order given) that is ready; the next one while
    it is broken or recovering; back to the first as soon as it is ready again."""

    name = "failover"

    def choose(self, members: Sequence[MemberView]) -> int | None:
        _check_alive(members)
        for m in members:
            if m.state in ROUTABLE:
                return m.index
        return None


POLICIES: dict[str, type[Balance] | type[Failover]] = {"balance": Balance, "failover": Failover}


def make_policy(name: str) -> Balance | Failover:
    try:
        return POLICIES[name]()
    except (KeyError, TypeError):
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}") from None


class ServiceClock:
    """Measures a member's service time: the mean gap between completions while it is busy.

    For a device that runs several items at once this is its time per item at full load
    (latency / parallelism), which is what queueing in front of it costs. An exponential
    moving average follows speed changes (thermal throttling, a shared CPU) within ~10 items.
    """

    __slots__ = ("_mark", "value")

    SMOOTHING = 0.2

    def __init__(self) -> None:
        self.value: float | None = None
        self._mark = 0.0  # last completion, or when it went busy from idle

    def started(self, now: float, depth_before: int) -> None:
        if depth_before == 0:
            self._mark = now

    def finished(self, now: float) -> None:
        sample = max(0.0, now - self._mark)
        self._mark = now
        value = self.value
        self.value = sample if value is None else value + self.SMOOTHING * (sample - value)
