"""Admission on its own (no runner, no threads): caps, priorities, weights, reserves."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import aioaccel
from aioaccel.admission import Admission
from aioaccel.lanes import Lane

MAXSIZE = 5
#: (cap, weight, priority, reserve) of the machine's lanes
LANES = [(2, 1.0, 0, 0), (5, 3.0, 0, 0), (3, 1.0, 1, 0), (2, 1.0, 0, 1), (5, 2.0, 0, 1)]


class AdmissionMachine(RuleBasedStateMachine):
    """Properties after every step, with the loop settled: (1) caps and maxsize hold, (2) the
    reserved slots nobody uses stay free, (3) no waiter is stranded (a lane with waiters could
    not take a slot now), (4) FIFO within a lane, (5) the counters match what was granted."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.adm = Admission(MAXSIZE)
        self.lanes = []
        for i, (cap, weight, priority, reserve) in enumerate(LANES):
            lane = Lane(f"l{i}", i, cap, weight=weight, priority=priority, reserve=reserve)
            self.adm.add_lane(lane)
            self.lanes.append(lane)
        self.held = [0] * len(LANES)
        self.waiting: list[list[tuple[asyncio.Task[None], int]]] = [[] for _ in LANES]
        self.order = 0

    def settle(self) -> None:
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))
        for i, waiting in enumerate(self.waiting):
            done = [k for k, (task, _) in enumerate(waiting) if task.done()]
            assert done == list(range(len(done))), f"lane {i} admitted out of order"
            for task, _ in waiting[:len(done)]:
                task.result()
                self.held[i] += 1
            del waiting[:len(done)]

    def teardown(self) -> None:
        for waiting in self.waiting:
            for task, _ in waiting:
                task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    @rule(i=st.integers(0, len(LANES) - 1))
    def push(self, i: int) -> None:
        lane = self.lanes[i]
        if not self.waiting[i] and self.adm.try_take(lane):
            self.held[i] += 1
        else:
            self.order += 1
            task = self.loop.create_task(self.adm.wait(lane, self.loop.create_future))
            self.waiting[i].append((task, self.order))
        self.settle()

    @precondition(lambda self: any(self.held))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from([k for k, h in enumerate(self.held) if h]))
        self.held[i] -= 1
        self.adm.release(self.lanes[i])
        self.settle()

    @precondition(lambda self: any(self.waiting))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from([k for k, w in enumerate(self.waiting) if w]))
        k = data.draw(st.integers(0, len(self.waiting[i]) - 1))
        task, _ = self.waiting[i].pop(k)
        task.cancel()
        try:
            self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass
        else:  # it had been handed a slot and resumed: it holds it
            self.held[i] += 1
        self.settle()

    @invariant()
    def properties(self) -> None:
        adm = self.adm
        assert adm.admitted == sum(self.held) <= MAXSIZE
        unused = 0
        for i, lane in enumerate(self.lanes):
            assert lane.admitted == self.held[i] <= lane.cap
            unused += max(0, lane.reserve - lane.admitted)
        assert MAXSIZE - adm.admitted >= unused, "a reserved slot was given away"
        for i, lane in enumerate(self.lanes):
            if self.waiting[i]:
                assert not adm.may_take(lane), f"lane {i} stranded while it could take a slot"
        assert adm.waiting == sum(len(w) for w in self.waiting)


def test_admission_state_machine() -> None:
    run_state_machine_as_test(
        AdmissionMachine, settings=settings(max_examples=80, stateful_step_count=40,
                                            deadline=None))


def grants(adm: Admission, lanes: list[Lane], rounds: int) -> Counter[str]:
    """Saturate every lane with waiters; free slots one at a time (oldest holder first);
    count which lane each freed slot goes to."""
    loop = asyncio.new_event_loop()
    try:
        counts: Counter[str] = Counter()
        held: list[Lane] = []
        for lane in lanes:
            while adm.try_take(lane):
                held.append(lane)
        tasks: dict[asyncio.Task[None], Lane] = {}
        for lane in lanes:
            for _ in range(rounds):
                tasks[loop.create_task(adm.wait(lane, loop.create_future))] = lane
        loop.run_until_complete(asyncio.sleep(0))
        for _ in range(rounds):
            adm.release(held.pop(0))
            loop.run_until_complete(asyncio.sleep(0))
            for task in [t for t in tasks if t.done()]:
                lane = tasks.pop(task)
                counts[lane.key] += 1
                held.append(lane)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        return counts
    finally:
        loop.close()


def test_weights_share_freed_slots_in_proportion() -> None:
    adm = Admission(4)
    a, b = Lane("a", 0, 4, weight=3), Lane("b", 1, 4, weight=1)
    counts = grants(adm, [a, b], 400)
    assert abs(counts["a"] / counts["b"] - 3.0) < 0.3, counts


def test_a_higher_priority_class_is_always_served_first() -> None:
    adm = Admission(4)
    low, high = Lane("low", 0, 4), Lane("high", 1, 4, priority=1)
    counts = grants(adm, [low, high], 50)
    assert counts["high"] == 50 and counts["low"] == 0


def test_reservations_must_fit_maxsize() -> None:
    adm = Admission(4)
    adm.add_lane(Lane("a", 0, 4, reserve=3))
    with pytest.raises(ValueError, match="does not fit"):
        adm.add_lane(Lane("b", 1, 4, reserve=2))


# ---- the same through a runner's streams ------------------------------------------------------


def _work(x: int) -> int:
    time.sleep(0.003)
    return x


@pytest.mark.anyio
async def test_a_high_priority_stream_waits_little_while_a_low_one_floods() -> None:
    async with aioaccel.open(_work, maxsize=4) as runner:
        low = runner.stream("low")
        high = runner.stream("high", priority=1)
        waits: list[float] = []

        async def flood() -> None:
            for i in range(150):
                await low.push(i)
            low.close()

        async def drain(s: aioaccel.Stream) -> int:
            return len([r async for r in s])

        async def critical() -> None:
            for i in range(15):
                t0 = time.perf_counter()
                await high.push(i)
                waits.append(time.perf_counter() - t0)
                await asyncio.sleep(0.01)
            high.close()

        tasks = [asyncio.create_task(c) for c in (flood(), critical())]
        counts = await asyncio.gather(drain(low), drain(high))
        await asyncio.gather(*tasks)
    assert counts == [150, 15]
    waits.sort()
    assert waits[-1] < 0.1, f"high-priority push waited up to {waits[-1] * 1e3:.1f} ms"


@pytest.mark.anyio
async def test_weights_3_to_1_under_saturation_through_streams() -> None:
    order: list[str] = []

    def work(x: str) -> str:
        time.sleep(0.001)
        return x

    async with aioaccel.open(work, maxsize=4) as runner:
        heavy = runner.stream("heavy", weight=3)
        light = runner.stream("light", weight=1)

        async def flood(s: aioaccel.Stream, tag: str) -> None:
            for _ in range(200):
                await s.push(tag)
                order.append(tag)

        async def drain(s: aioaccel.Stream) -> None:
            async for _ in s:
                pass

        pushers = [asyncio.create_task(flood(heavy, "h")), asyncio.create_task(flood(light, "l"))]
        readers = [asyncio.create_task(drain(heavy)), asyncio.create_task(drain(light))]
        while len(order) < 200:
            await asyncio.sleep(0.005)
        window = order[20:200]  # saturated: both always waiting
        for p in pushers:
            p.cancel()
        await asyncio.gather(*pushers, return_exceptions=True)
        heavy.close()
        light.close()
        await asyncio.gather(*readers)
    ratio = window.count("h") / max(1, window.count("l"))
    assert 2.7 <= ratio <= 3.3, f"heavy:light = {ratio:.2f}"


@pytest.mark.anyio
async def test_a_reserved_stream_is_admitted_at_once_while_a_burst_holds_the_rest() -> None:
    async with aioaccel.open(_work, maxsize=4) as runner:
        burst = runner.stream("burst")
        camera = runner.stream("camera", reserve=1)

        async def flood() -> None:
            for i in range(60):
                await burst.push(i)
            burst.close()

        async def drain(s: aioaccel.Stream) -> int:
            return len([r async for r in s])

        flooding = asyncio.create_task(flood())
        reader = asyncio.create_task(drain(burst))
        # until the burst holds every slot it may (nothing signals it; bounded)
        deadline = time.monotonic() + 10.0
        while runner.stats().in_flight < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert runner.stats().in_flight == 3
        for i in range(5):
            # at once, exactly: push_nowait raises WouldBlock where push would have waited (a
            # wall-clock bound on push says the same only on an idle machine)
            camera.push_nowait(i)
            assert (await anext(camera)).outputs == i
        camera.close()
        await flooding
        assert await reader == 60
