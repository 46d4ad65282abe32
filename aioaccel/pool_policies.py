"""Routing policies of a device pool: which member each waiting item should go to.

A policy sees one :class:`MemberView` per member (in priority order) and the number of items
waiting, and plans where each of them goes. It keeps no state and touches no thread or loop,
so the pool can call it wherever it decides (today: on the event loop, whenever an item
arrives or a member finishes one). A member may be full: an item planned for it waits for it
rather than going to a member that would finish it later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["FINAL", "POLICIES", "ROUTABLE", "Balance", "Failover", "MemberView", "NoMember",
           "Policy", "ServiceClock", "make_policy"]

#: health states in which a member takes new items
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
    service_time: float | None  #: seconds between its completions while busy (None: unknown)
    #: measured seconds from hand-off to result, by the depth it was handed at (None: unseen)
    latencies: Sequence[float | None] = ()

    @property
    def full(self) -> bool:
        return self.depth >= self.capacity

    def finish_estimate(self, depth: int | None = None) -> float:
        """Seconds until an item handed now (behind ``depth`` others) would be back.

        Measured per depth where the member has been seen at that depth: a device that runs
        four items at once takes as long at depth 3 as at depth 0, a one-at-a-time device
        four times as long. A depth not seen yet is assumed as fast as the nearest one below
        (so it gets tried, and measured); never seen at all: 0 (try it). Past its capacity
        an item also waits for slots to free, one service time each.
        """
        d = self.depth if depth is None else depth
        if d >= self.capacity and self.capacity > 0:
            extra = d - self.capacity + 1
            return self.finish_estimate(self.capacity - 1) + extra * (self.service_time or 0.0)
        for k in range(min(d, len(self.latencies) - 1), -1, -1):
            seen = self.latencies[k]
            if seen is not None:
                return seen
        return (self.service_time or 0.0) * (d + 1)

    def estimates(self) -> list[float]:
        """:meth:`finish_estimate` for each depth below the capacity, in one pass."""
        out: list[float] = []
        last: float | None = None
        for d in range(max(1, self.capacity)):
            seen = self.latencies[d] if d < len(self.latencies) else None
            if seen is not None:
                last = seen
            out.append(last if last is not None else (self.service_time or 0.0) * (d + 1))
        return out


class Policy(Protocol):
    name: str

    def plan(self, members: Sequence[MemberView], waiting: int) -> list[int | None]:
        """For each of the ``waiting`` items, in order: the index of the member to hand it to
        now, or None (it waits). Raises :class:`NoMember` when every member is gone."""


def _check_alive(members: Sequence[MemberView]) -> None:
    if all(m.state in FINAL for m in members):
        raise NoMember("every member is broken or closed")


class Balance:
    """Each item to the member expected to finish it soonest.

    Items are placed one after the other, each counting the ones placed before it: the
    expected finish on a member is its measured time at that queue depth (see
    :meth:`MemberView.finish_estimate`). So a member three times slower gets the items it can
    finish before the fast one could, about a quarter of them, and no queue grows in front of
    a slow device while a fast one idles -- nor the other way round. A member whose speed is
    not known yet is tried first. Ties go to a member with room, then to the earlier member.
    """

    name = "balance"

    def plan(self, members: Sequence[MemberView], waiting: int) -> list[int | None]:
        _check_alive(members)
        usable = [m for m in members if m.state in ROUTABLE]
        room = sum(max(0, m.capacity - m.depth) for m in usable)
        if not room:
            return []
        # what finish_estimate gives, tabulated once per member for the depths in play
        tables = [m.estimates() for m in usable]
        service = [m.service_time or 0.0 for m in usable]
        caps = [m.capacity for m in usable]
        depth = [m.depth for m in usable]

        def estimate(k: int) -> float:
            d, table = depth[k], tables[k]
            if d < caps[k]:
                return table[d]
            return table[-1] + (d - caps[k] + 1) * service[k]

        current = [estimate(k) for k in range(len(usable))]
        out: list[int | None] = []
        handed = 0
        while handed < room and len(out) < waiting:  # once all are (virtually) full, wait
            k = 0
            for i in range(1, len(usable)):  # soonest; ties: one with room, then the earlier
                if (current[i], depth[i] >= caps[i]) < (current[k], depth[k] >= caps[k]):
                    k = i
            if depth[k] < caps[k]:
                out.append(usable[k].index)
                handed += 1
            else:
                out.append(None)  # it waits for this member, and is counted there
            depth[k] += 1
            current[k] = estimate(k)
        return out


class Failover:
    """Everything to the first member (in the order given) that is ready; the next one while
    it is broken or recovering; back to the first as soon as it is ready again."""

    name = "failover"

    def plan(self, members: Sequence[MemberView], waiting: int) -> list[int | None]:
        _check_alive(members)
        for m in members:
            if m.state in ROUTABLE:
                room = max(0, m.capacity - m.depth)
                return [m.index] * min(room, waiting)
        return []


POLICIES: dict[str, type[Balance] | type[Failover]] = {"balance": Balance, "failover": Failover}


def make_policy(name: str) -> Balance | Failover:
    try:
        return POLICIES[name]()
    except (KeyError, TypeError):
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}") from None


class ServiceClock:
    """Measures one member: its service time and its latency at each queue depth.

    The service time is the mean gap between completions while the member is busy: for a
    device that runs several items at once, its time per item at full load (latency /
    parallelism), which is what waiting for a free slot costs. The latency at depth ``d`` is
    the time from hand-off to result of items handed behind ``d`` others. Exponential moving
    averages follow speed changes (thermal throttling, a shared CPU) within ~10 items.
    """

    __slots__ = ("_mark", "latencies", "value")

    SMOOTHING = 0.2

    def __init__(self, capacity: int = 1) -> None:
        self.value: float | None = None
        self.latencies: list[float | None] = [None] * max(1, capacity)
        self._mark = 0.0  # last completion, or when it went busy from idle

    def started(self, now: float, depth_before: int) -> None:
        if depth_before == 0:
            self._mark = now

    def finished(self, now: float, handed_at: float | None = None, depth: int = 0) -> None:
        self.value = _smooth(self.value, max(0.0, now - self._mark))
        self._mark = now
        if handed_at is not None and 0 <= depth < len(self.latencies):
            self.latencies[depth] = _smooth(self.latencies[depth], max(0.0, now - handed_at))


def _smooth(value: float | None, sample: float) -> float:
    return sample if value is None else value + ServiceClock.SMOOTHING * (sample - value)
