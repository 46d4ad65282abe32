"""Multi-stream fan-in: per-stream order, fair admission, per-stream caps, close, errors."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

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
from aioaccel.testing import SimulatedDevice, SimulatedStage

pytestmark = pytest.mark.anyio


class Gate:
    """A stage that holds every call until released, recording the order it started them."""

    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.go = threading.Event()

    def __call__(self, x: tuple[str, int]) -> tuple[str, int]:
        self.go.wait()
        self.started.append(x)
        return x


async def feed(stream: aioaccel.Stream, name: str, count: int) -> None:
    for i in range(count):
        await stream.push((name, i), tag=i)
    stream.close()


async def drain(stream: aioaccel.Stream) -> list[aioaccel.Result]:
    return [r async for r in stream]


async def test_each_stream_gets_its_own_results_in_its_own_order() -> None:
    device = SimulatedDevice(lambda x: (x[0], x[1] * 2), latency=0.002, jitter=1.0,
                             capacity=4, seed=3)
    async with aioaccel.open(device, maxsize=6) as runner:
        cams = {name: runner.stream(name) for name in ("cam0", "cam1", "cam2")}
        counts = {"cam0": 40, "cam1": 25, "cam2": 10}
        feeders = [asyncio.create_task(feed(s, n, counts[n])) for n, s in cams.items()]
        results = await asyncio.gather(*(drain(s) for s in cams.values()))
        await asyncio.gather(*feeders)
        stats = runner.stats()
    for (name, stream_results) in zip(cams, results):
        assert [r.outputs for r in stream_results] == [(name, i * 2) for i in range(counts[name])]
        assert [r.tag for r in stream_results] == list(range(counts[name]))
    assert device.completion_order != sorted(device.completion_order)
    by_key = {s.key: s for s in stats.streams} if stats.streams else {}
    # closed and drained streams are forgotten; the runner's totals still count them
    assert stats.completed == 75 and by_key == {}
    assert stats.peak_admitted <= 6


async def test_a_flooding_stream_cannot_starve_another() -> None:
    gate = Gate()
    async with aioaccel.open(gate, maxsize=4) as runner:
        flood, quiet = runner.stream("flood"), runner.stream("quiet")
        # The flood fills the runner and queues 40 more pushes before the quiet stream asks.
        flooding = [asyncio.create_task(flood.push(("flood", i))) for i in range(44)]
        while runner.stats().waiting < 40:
            await asyncio.sleep(0)
        quiet_pushes = [asyncio.create_task(quiet.push(("quiet", i))) for i in range(5)]
        await asyncio.sleep(0)
        consumers = [asyncio.create_task(drain(flood)), asyncio.create_task(drain(quiet))]
        gate.go.set()
        await asyncio.gather(*flooding, *quiet_pushes)
        flood.close()
        quiet.close()
        flood_results, quiet_results = await asyncio.gather(*consumers)
    assert len(flood_results) == 44 and len(quiet_results) == 5
    order = [name for name, _ in gate.started]
    # After the 4 that filled the runner, freed slots alternate between the two waiting
    # streams: the quiet stream's 5 items are all admitted within the first 14 admissions.
    last_quiet = max(i for i, name in enumerate(order) if name == "quiet")
    assert last_quiet < 4 + 2 * 5, order
    assert order[4:14:2].count("quiet") + order[5:14:2].count("quiet") == 5


async def test_stream_maxsize_bounds_what_one_stream_holds() -> None:
    async with aioaccel.open(lambda x: x, maxsize=8) as runner:
        slow = runner.stream("slow", maxsize=2)
        other = runner.stream("other")
        slow.push_nowait(1)
        slow.push_nowait(2)
        with pytest.raises(aioaccel.WouldBlock, match="stream 'slow'.*maxsize=2"):
            slow.push_nowait(3)
        blocked = asyncio.create_task(slow.push(3))
        # the slow stream's consumer is not reading: the rest of the runner is still free
        for i in range(6):
            other.push_nowait(i)
        assert runner.stats().in_flight == 8
        assert not blocked.done()
        first = await slow.__anext__()  # consuming frees one of the stream's own slots...
        assert first.outputs == 1
        await blocked                    # ...but the runner is full again only after it
        other.close()
        assert [r.outputs async for r in other] == list(range(6))
        slow.close()
        assert [r.outputs async for r in slow] == [2, 3]


async def test_stream_waiters_resume_when_another_stream_consumes() -> None:
    async with aioaccel.open(lambda x: x, maxsize=2) as runner:
        a, b = runner.stream("a"), runner.stream("b")
        await a.push("a0")
        await a.push("a1")
        waiting = asyncio.create_task(b.push("b0"))
        await asyncio.sleep(0)
        assert not waiting.done() and b.stats().waiting == 1
        assert (await a.__anext__()).outputs == "a0"
        assert await waiting >= 0
        b.close()
        assert [r.outputs async for r in b] == ["b0"]


async def test_closing_a_stream_ends_it_and_fails_its_waiting_pushes_only() -> None:
    async with aioaccel.open(lambda x: x, maxsize=1) as runner:
        a, b = runner.stream("a"), runner.stream("b")
        await a.push(1)
        waiting_b = asyncio.create_task(b.push(2))
        await asyncio.sleep(0)
        b.close()
        with pytest.raises(aioaccel.RunnerClosed, match="stream 'b'"):
            await waiting_b
        with pytest.raises(aioaccel.RunnerClosed, match="stream 'b'"):
            await b.push(3)
        assert [r async for r in b] == []
        assert not runner.closed
        a.close()
        assert [r.outputs async for r in a] == [1]
        assert runner.stats().in_flight == 0


async def test_a_cancelled_stream_push_leaves_no_trace() -> None:
    async with aioaccel.open(lambda x: x, maxsize=1) as runner:
        a, b = runner.stream("a"), runner.stream("b")
        await a.push(0)
        doomed = asyncio.create_task(b.push("doomed"))
        kept = asyncio.create_task(b.push("kept"))
        await asyncio.sleep(0)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert (await a.__anext__()).outputs == 0
        await kept
        b.close()
        assert [r.outputs async for r in b] == ["kept"]
        stats = runner.stats()
    assert stats.pushed == 2 and stats.in_flight == 0 and stats.waiting == 0


async def test_per_item_failure_stays_in_its_stream_position() -> None:
    stage = SimulatedStage(fail_if=lambda x: x == ("a", 1))
    async with aioaccel.open(stage, maxsize=4) as runner:
        a, b = runner.stream("a"), runner.stream("b")
        feeders = [asyncio.create_task(feed(a, "a", 3)), asyncio.create_task(feed(b, "b", 3))]
        ra, rb = await asyncio.gather(drain(a), drain(b))
        await asyncio.gather(*feeders)
    assert [r.ok for r in ra] == [True, False, True]
    assert isinstance(ra[1].error, aioaccel.InferenceError) and ra[1].tag == 1
    assert [r.outputs for r in rb] == [("b", 0), ("b", 1), ("b", 2)]


async def test_a_fatal_failure_reaches_every_stream() -> None:
    async with aioaccel.open(SimulatedStage(fatal_at=2), maxsize=4) as runner:
        a, b = runner.stream("a"), runner.stream("b")
        for i in range(3):
            await a.push(i)
        for stream in (a, b):
            with pytest.raises(aioaccel.DeviceError):
                async for _ in stream:
                    pass
        with pytest.raises(aioaccel.DeviceError):
            await b.push(9)


async def test_stream_stats_and_keys() -> None:
    async with aioaccel.open(lambda x: x * 2, maxsize=4) as runner:
        a = runner.stream(("camera", 7), maxsize=3)
        assert runner.stream(("camera", 7)) is not None
        assert runner.stream(("camera", 7)).key == ("camera", 7)
        with pytest.raises(ValueError, match="already exists with maxsize=3"):
            runner.stream(("camera", 7), maxsize=2)
        with pytest.raises(ValueError, match="from 1 to the runner's maxsize"):
            runner.stream("too-big", maxsize=5)
        b = runner.stream("b")
        assert {a.index, b.index} == {0, 1}
        for i in range(3):
            await a.push(i)
        results = [await a.__anext__() for _ in range(2)]
        stats = {s.key: s for s in runner.stats().streams}
        assert [r.outputs for r in results] == [0, 2]
        assert stats[("camera", 7)].pushed == 3
        assert stats[("camera", 7)].in_flight == 1
        assert stats[("camera", 7)].maxsize == 3
        assert stats["b"].pushed == 0
        a.close()
        await a.__anext__()
        with pytest.raises(StopAsyncIteration):
            await a.__anext__()
        # a finished stream is forgotten: its key and index can be used again
        again = runner.stream(("camera", 7))
        assert again.index == 0 and not again.closed
        assert "closed" not in repr(again)


async def test_streams_and_plain_push_and_infer_share_one_runner() -> None:
    async with aioaccel.open(lambda x: x + 1, maxsize=3) as runner:
        cam = runner.stream("cam")
        await runner.push(10)
        await cam.push(100)
        answers = await asyncio.gather(*(runner.infer(i) for i in range(5)))
        await runner.push(20)
        runner.close()
        assert [r.outputs async for r in cam] == [101]
        assert [r.outputs async for r in runner] == [11, 21]
    assert answers == [1, 2, 3, 4, 5]


async def test_closing_the_runner_closes_its_streams() -> None:
    async with aioaccel.open(lambda x: x, maxsize=2) as runner:
        cam = runner.stream("cam")
        await cam.push(1)
        runner.close()
        assert cam.closed
        with pytest.raises(aioaccel.RunnerClosed):
            await cam.push(2)
        assert [r.outputs async for r in cam] == [1]


async def test_stream_context_manager_closes_it() -> None:
    async with aioaccel.open(lambda x: x, maxsize=2) as runner:
        async with runner.stream("cam") as cam:
            await cam.push(5)
        assert cam.closed
        assert [r.outputs async for r in cam] == [5]


async def test_cancellation_storm_across_streams_loses_and_duplicates_nothing() -> None:
    import random

    rng = random.Random(11)
    device = SimulatedDevice(latency=0.0005, jitter=1.0, capacity=3, seed=5)
    async with aioaccel.open(device, maxsize=5) as runner:
        streams = [runner.stream(f"s{i}", maxsize=rng.choice([2, 3, 5])) for i in range(4)]
        pushes: dict[str, list[tuple[int, asyncio.Task[int]]]] = {s.key: [] for s in streams}
        for n in range(60):
            for s in streams:
                pushes[s.key].append((n, asyncio.create_task(s.push((s.key, n), tag=n))))
        consumers = {s.key: asyncio.create_task(drain(s)) for s in streams}
        for _ in range(3):  # cancel a third of the pushes while slots are being handed over
            await asyncio.sleep(0)
            for tasks in pushes.values():
                for _, task in rng.sample(tasks, 7):
                    task.cancel()
        for s in streams:
            await asyncio.gather(*(t for _, t in pushes[s.key]), return_exceptions=True)
            s.close()
        got = {key: await task for key, task in consumers.items()}
        stats = runner.stats()
    for key, tasks in pushes.items():
        admitted = [n for n, t in tasks if not t.cancelled()]
        assert [r.tag for r in got[key]] == admitted  # each admitted once, in push order
        assert [r.outputs for r in got[key]] == [(key, n) for n in admitted]
    assert stats.pushed == sum(len(v) for v in got.values())
    assert stats.in_flight == 0 and stats.waiting == 0 and stats.peak_admitted <= 5


async def test_a_slot_freed_in_the_same_step_as_a_cancellation_goes_to_the_next_waiter() -> None:
    async with aioaccel.open(lambda x: x, maxsize=1) as runner:
        a, b = runner.stream("a"), runner.stream("b")
        await a.push("a0")
        while a.stats().completed < 1:  # the result is ready before the waiters line up
            await asyncio.sleep(0.001)
        doomed = asyncio.create_task(b.push("doomed"))
        kept = asyncio.create_task(b.push("kept"))
        await asyncio.sleep(0)
        doomed.cancel()  # its future is cancelled now; its own clean-up runs later
        assert (await a.__anext__()).outputs == "a0"  # frees the slot before that clean-up
        with pytest.raises(asyncio.CancelledError):
            await doomed
        await kept
        b.close()
        assert [r.outputs async for r in b] == ["kept"]
        assert runner.stats().in_flight == 0


# ---- property-based: streams with caps, waiting pushes, cancellations, consumption -------

RUNNER_MAXSIZE = 4


class StreamsMachine(RuleBasedStateMachine):
    """Checks properties, not a copy of the algorithm: after every step, with the loop
    settled, (1) a lane never holds more than its cap, (2) while the runner has room, every
    stream that still has waiters is at its cap (no waiter is stranded), (3) each stream's
    waiters are admitted in their order, (4) counters match, (5) each stream's results come
    back in its push order."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.runner = self.run(aioaccel.open(lambda x: x, maxsize=RUNNER_MAXSIZE).__aenter__())
        caps = [1, 2, RUNNER_MAXSIZE]
        self.streams = [self.runner.stream(f"s{i}", maxsize=caps[i]) for i in range(3)]
        self.caps = caps
        self.admitted: list[list[int]] = [[], [], []]
        self.waiting: list[list[tuple[asyncio.Task[int], int]]] = [[], [], []]
        self.counter = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 10))

    def settle(self) -> None:
        for _ in range(3):
            self.run(asyncio.sleep(0))
        for lane, waiting in enumerate(self.waiting):
            done = [i for i, (task, _) in enumerate(waiting) if task.done()]
            assert done == list(range(len(done))), f"stream {lane} admitted out of order"
            for task, value in waiting[:len(done)]:
                task.result()
                self.admitted[lane].append(value)
            del waiting[:len(done)]

    def teardown(self) -> None:
        self.run(self.runner.aclose())

        async def settle() -> list[Any]:
            return await asyncio.gather(*(t for w in self.waiting for t, _ in w),
                                        return_exceptions=True)

        outcomes = self.run(settle())
        assert all(isinstance(o, aioaccel.RunnerClosed) for o in outcomes), outcomes
        self.loop.close()

    @rule(lane=st.integers(0, 2))
    def push(self, lane: int) -> None:
        self.counter += 1
        value = self.counter
        task = self.loop.create_task(self.streams[lane].push(value))
        self.waiting[lane].append((task, value))
        self.settle()

    @precondition(lambda self: any(self.waiting))
    @rule(data=st.data())
    def cancel_a_waiting_push(self, data: st.DataObject) -> None:
        lanes = [i for i, w in enumerate(self.waiting) if w]
        lane = data.draw(st.sampled_from(lanes))
        index = data.draw(st.integers(0, len(self.waiting[lane]) - 1))
        task, _ = self.waiting[lane].pop(index)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            self.loop.run_until_complete(task)
        self.settle()

    @precondition(lambda self: any(self.admitted))
    @rule(data=st.data())
    def consume(self, data: st.DataObject) -> None:
        lane = data.draw(st.sampled_from([i for i, a in enumerate(self.admitted) if a]))
        result = self.run(anext(self.streams[lane]))
        assert result.outputs == self.admitted[lane].pop(0)  # this stream's push order
        self.settle()

    @invariant()
    def properties(self) -> None:
        stats = self.runner.stats()
        held = [len(a) for a in self.admitted]
        assert stats.in_flight == sum(held) <= RUNNER_MAXSIZE
        assert stats.waiting == sum(len(w) for w in self.waiting)
        for lane in range(3):
            assert held[lane] <= self.caps[lane]
            if self.waiting[lane] and stats.in_flight < RUNNER_MAXSIZE:
                assert held[lane] == self.caps[lane], f"stream {lane} stranded with room free"


def test_streams_state_machine() -> None:
    run_state_machine_as_test(
        StreamsMachine, settings=settings(max_examples=50, stateful_step_count=30,
                                          deadline=None))
