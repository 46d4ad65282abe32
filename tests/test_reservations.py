"""Reservations, weights and forgotten streams (issue 26, item 7): a closed or dropped stream
gives its reserve back at once, reserves always leave a slot for everyone else, a stream closed
while withdrawn items travel is still forgotten, and a tiny weight breaks no later weighting."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import aioaccel
from aioaccel.core.admission import Admission
from aioaccel.core.records import Lane

pytestmark = pytest.mark.anyio


class Gate:
    """A stage whose calls wait until the gate opens (items pile up behind it)."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()

    def __call__(self, x: Any) -> Any:
        self.entered.set()
        self.opened.wait(10)
        return x


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.opened.set()


async def settled(runner: aioaccel.Runner) -> None:
    """Until nothing is admitted any more (bounded)."""
    async with asyncio.timeout(5):
        while runner.stats().in_flight:
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("how", ["closed", "dropped"])
async def test_a_stream_closed_or_dropped_with_unread_results_gives_its_reserve_back(
        how: str) -> None:
    async with aioaccel.open(lambda x: x, maxsize=4) as runner:
        camera = runner.stream("camera", reserve=3)
        for i in range(2):
            await camera.push(i)
        async with asyncio.timeout(5):
            while runner.stats().streams[0].completed < 2:
                await asyncio.sleep(0.005)
        if how == "closed":
            camera.close()
        else:
            del camera
            gc.collect()
            await asyncio.sleep(0.01)  # the drop is noticed on the loop
        # its 3 reserved slots are everyone's again: 4 plain pushes fit without waiting
        for i in range(4):
            runner.push_nowait(i)
        again = runner.stream("other", reserve=3)  # and a new reserve of 3 fits
        assert again.stats().reserve == 3
        again.close()
        runner.close()
        assert [r.outputs async for r in runner] == [0, 1, 2, 3]


def test_reservations_always_leave_a_slot_for_streams_without_one() -> None:
    adm = Admission(4)
    with pytest.raises(ValueError, match="at most 3 in all"):
        adm.add_lane(Lane("all", 0, 4, reserve=4))
    adm.add_lane(Lane("a", 1, 4, reserve=2))
    with pytest.raises(ValueError, match="does not fit"):
        adm.add_lane(Lane("b", 2, 4, reserve=2))
    adm.add_lane(Lane("c", 3, 4, reserve=1))


async def test_reserve_maxsize_is_refused_by_stream() -> None:
    async with aioaccel.open(lambda x: x, maxsize=4) as runner:
        with pytest.raises(ValueError, match="one slot stays for streams without a reserve"):
            runner.stream("greedy", reserve=4)
        assert await runner.infer(7) == 7


async def test_a_stream_closed_while_its_withdrawn_items_travel_is_forgotten(
        gate: Gate) -> None:
    async with aioaccel.open(gate, maxsize=8) as runner:
        first = asyncio.ensure_future(runner.infer(-1))  # holds the gate
        await asyncio.to_thread(gate.entered.wait, 5)
        s = runner.stream("s", maxsize=4)
        for i in range(3):
            await s.push(i)
        assert s.withdraw() == 3  # all of them: their shells still travel, holding slots
        s.close()
        assert [r async for r in s] == []
        gate.opened.set()
        assert await first == -1
        await settled(runner)  # the shells are back
        assert runner.streams() == []
        runner.stream("s", maxsize=2).close()  # the key is free again, with another maxsize


def serve(adm: Admission, held: list[Lane], lanes: list[Lane], n: int,
          loop: asyncio.AbstractEventLoop) -> Counter[str]:
    """Each lane of ``lanes`` always has one waiter; the one slot is freed ``n`` times."""
    counts: Counter[str] = Counter()
    tasks: dict[asyncio.Task[None], Lane] = {}

    def wait(lane: Lane) -> None:
        tasks[loop.create_task(adm.wait(lane, loop))] = lane

    for lane in lanes:
        wait(lane)
    loop.run_until_complete(asyncio.sleep(0))
    for _ in range(n):
        adm.release(held[0])
        loop.run_until_complete(asyncio.sleep(0))
        for task in [t for t in tasks if t.done()]:
            lane = tasks.pop(task)
            counts[lane.key] += 1
            held[0] = lane
            wait(lane)
        loop.run_until_complete(asyncio.sleep(0))
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0))
    return counts


@pytest.mark.parametrize("tiny", [1e-9, 1e-15])
def test_a_tiny_weight_breaks_no_later_weighting(tiny: float) -> None:
    loop = asyncio.new_event_loop()
    try:
        adm = Admission(1)
        small = Lane("small", 0, 1, weight=tiny)
        heavy, light = Lane("heavy", 1, 1, weight=3), Lane("light", 2, 1, weight=1)
        for lane in (small, heavy, light):
            adm.add_lane(lane)
        assert adm.try_take(small)
        held = [small]
        assert serve(adm, held, [small], 40, loop) == {"small": 40}  # alone, it is served
        counts = serve(adm, held, [heavy, light, small], 400, loop)
    finally:
        loop.close()
    assert counts["small"] == 0
    assert counts["heavy"] == 300 and counts["light"] == 100, counts


@pytest.mark.parametrize("weight", [float("inf"), float("nan"), 1e-320, 0, True])
async def test_weights_that_cannot_weigh_are_refused(weight: Any) -> None:
    async with aioaccel.open(lambda x: x) as runner:
        with pytest.raises(ValueError, match="weight must be a finite number > 0"):
            runner.stream("w", weight=weight)
