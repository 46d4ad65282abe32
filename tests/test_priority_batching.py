"""Strict priority under batching (issue 26, item 7): once admitted, a priority stream's items
go into the next batch formed, ahead of a flooding stream's items admitted before them.

The simulated stages gate every call (a semaphore the test releases) and record each batch's
rows as it is formed, so every check is on batch composition, never on timing. Each row is
``[stream id, index]``; the stages answer ``x * 10 + 1`` so pairing is checked too.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import aioaccel
from aioaccel.testing import SimulatedDevice, SimulatedFailure, SimulatedStage

pytestmark = pytest.mark.anyio

LOW, HIGH, TOP, DEFAULT = 1, 2, 3, 9
#: a gate held longer than this is a test bug: the stage fails instead of hanging
GATE_LIMIT = 20.0


def row(stream: int, index: int, rows: int = 1) -> np.ndarray:
    return np.tile(np.array([[stream, index]], np.int64), (rows, 1))


def answer(x: np.ndarray) -> np.ndarray:
    return x * 10 + 1


class Gate:
    """Records each batch's rows (as ``(stream, index)`` pairs, one per item) when the batch is
    formed, and holds each call until the test lets it go."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []
        self._permits = threading.Semaphore(0)
        self._recorded = threading.Condition()

    def record(self, x: np.ndarray) -> None:
        items = []
        for stream, index in x.tolist():
            if not items or items[-1] != (stream, index):  # a multi-row item counts once
                items.append((stream, index))
        with self._recorded:
            self.batches.append(items)
            self._recorded.notify_all()

    def hold(self) -> None:
        if not self._permits.acquire(timeout=GATE_LIMIT):
            raise RuntimeError("gate never opened")

    def open(self, calls: int = 1) -> None:
        self._permits.release(calls)

    def open_all(self) -> None:
        self._permits.release(10_000)

    async def formed(self, count: int) -> None:
        """Wait (bounded) until ``count`` batches were formed."""
        def wait() -> bool:
            with self._recorded:
                return self._recorded.wait_for(lambda: len(self.batches) >= count, 10.0)
        assert await asyncio.to_thread(wait), f"only {len(self.batches)} batches formed"


@pytest.fixture
def gate() -> Iterator[Gate]:
    """A gate that opens for good when the test ends, pass or fail (no thread stays held)."""
    made = Gate()
    yield made
    made.open_all()


def gated_stage(gate: Gate) -> SimulatedStage:
    """A blocking stage: it forms a batch when it is called (one worker)."""
    def fn(x: np.ndarray) -> np.ndarray:
        gate.record(x)
        gate.hold()
        return answer(x)
    return SimulatedStage(fn, latency=0.0)


class RecordingDevice(SimulatedDevice):
    """A callback device that records each batch when it is handed over (right after the
    batch was formed), computes it on its own thread once the gate lets it."""

    def __init__(self, gate: Gate, **kwargs: Any):
        def fn(x: np.ndarray) -> np.ndarray:
            gate.hold()
            return answer(x)
        super().__init__(fn, latency=0.0, jitter=0.0, **kwargs)
        self.gate = gate

    def submit(self, token: object, inputs: Any) -> None:
        self.gate.record(inputs)
        super().submit(token, inputs)


async def drain(stream: Any, count: int) -> list[aioaccel.Result]:
    out = []
    async for result in stream:
        out.append(result)
        if len(out) == count:
            break
    return out


def check_stream(results: list[aioaccel.Result], stream: int, count: int) -> None:
    """Every item of ``stream`` came back, in push order, with its own tag and outputs."""
    assert [r.tag for r in results] == list(range(count))
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    for r in results:
        assert np.array_equal(r.outputs, answer(row(stream, r.tag))), (stream, r.tag)


async def flood(stream: Any, ident: int, count: int) -> None:
    for i in range(count):
        await stream.push(row(ident, i), tag=i)


@pytest.mark.parametrize("kind", ["stage", "device"])
async def test_high_priority_items_ride_the_next_batch_formed_and_lows_fill_the_rest(
        kind: str, gate: Gate) -> None:
    model: Any = gated_stage(gate) if kind == "stage" else RecordingDevice(gate, capacity=1)
    async with aioaccel.open(model, batch=4, maxsize=64) as runner:
        low = runner.stream("low")
        high = runner.stream("high", priority=5)
        await flood(low, LOW, 24)
        # a blocking stage forms its next batch once the call running returns; a device
        # with capacity 1 has one more formed and waiting for the device to free up
        ahead = 1 if kind == "stage" else 2
        await gate.formed(ahead)
        admitted_after = len(gate.batches)
        await flood(high, HIGH, 3)
        gate.open_all()
        lows, highs = await asyncio.gather(drain(low, 24), drain(high, 3))
    check_stream(lows, LOW, 24)
    check_stream(highs, HIGH, 3)
    nxt = gate.batches[admitted_after]
    assert nxt[:3] == [(HIGH, 0), (HIGH, 1), (HIGH, 2)], gate.batches
    assert len(nxt) == 4 and nxt[3][0] == LOW, gate.batches  # the rest filled with lows
    # the lows' own order on the device is untouched: FIFO across every batch
    seen = [item for batch in gate.batches for item in batch if item[0] == LOW]
    assert seen == [(LOW, i) for i in range(24)]


async def test_more_high_items_than_a_batch_fill_whole_batches_before_any_low(gate: Gate) -> None:
    async with aioaccel.open(gated_stage(gate), batch=4, maxsize=64) as runner:
        low, high = runner.stream("low"), runner.stream("high", priority=1)
        await flood(low, LOW, 20)
        await gate.formed(1)
        first = len(gate.batches)
        await flood(high, HIGH, 6)
        gate.open_all()
        lows, highs = await asyncio.gather(drain(low, 20), drain(high, 6))
    check_stream(lows, LOW, 20)
    check_stream(highs, HIGH, 6)
    assert gate.batches[first] == [(HIGH, i) for i in range(4)]
    assert gate.batches[first + 1][:2] == [(HIGH, 4), (HIGH, 5)]
    assert [s for s, _ in gate.batches[first + 1][2:]] == [LOW, LOW]


async def test_three_levels_are_served_highest_first_and_the_default_lane_sits_at_zero(
        gate: Gate) -> None:
    async with aioaccel.open(gated_stage(gate), batch=8, maxsize=64) as runner:
        below = runner.stream("below", priority=-1)   # under the default lane's 0
        high = runner.stream("high", priority=1)
        top = runner.stream("top", priority=2)
        await flood(below, LOW, 12)
        await gate.formed(1)
        first = len(gate.batches)
        for i in range(2):
            await runner.push(row(DEFAULT, i), tag=i)
        await flood(high, HIGH, 2)
        await flood(top, TOP, 2)
        gate.open_all()
        lows, highs, tops, defaults = await asyncio.gather(
            drain(below, 12), drain(high, 2), drain(top, 2), drain(runner, 2))
    for results, ident, count in ((lows, LOW, 12), (highs, HIGH, 2), (tops, TOP, 2),
                                  (defaults, DEFAULT, 2)):
        check_stream(results, ident, count)
    assert gate.batches[first][:6] == [(TOP, 0), (TOP, 1), (HIGH, 0), (HIGH, 1),
                                       (DEFAULT, 0), (DEFAULT, 1)]
    assert [s for s, _ in gate.batches[first][6:]] == [LOW, LOW]


async def test_items_queued_before_the_first_priority_stream_do_not_hold_it_back(
        gate: Gate) -> None:
    """The switch from the plain FIFO to priority levels happens with a flood already queued:
    the queued items move to their level in order, and the new stream still goes first."""
    async with aioaccel.open(gated_stage(gate), batch=4, maxsize=64) as runner:
        for i in range(20):
            await runner.push(row(DEFAULT, i), tag=i)
        await gate.formed(1)
        assert runner._sup.gen is not None and runner._sup.gen.pipeline.ranks is None
        first = len(gate.batches)
        high = runner.stream("high", priority=1)
        assert runner._sup.gen.pipeline.ranks is not None
        await flood(high, HIGH, 2)
        gate.open_all()
        defaults, highs = await asyncio.gather(drain(runner, 20), drain(high, 2))
    check_stream(defaults, DEFAULT, 20)
    check_stream(highs, HIGH, 2)
    assert gate.batches[first][:2] == [(HIGH, 0), (HIGH, 1)]
    seen = [item for batch in gate.batches for item in batch if item[0] == DEFAULT]
    assert seen == [(DEFAULT, i) for i in range(20)]


async def test_one_priority_keeps_the_plain_fifo() -> None:
    """The common case pays nothing: streams that all share the default priority never
    switch stage 0 to priority levels."""
    async with aioaccel.open(SimulatedStage(answer), batch=4, maxsize=16) as runner:
        a, b = runner.stream("a"), runner.stream("b", weight=3)
        await flood(a, LOW, 5)
        await flood(b, HIGH, 5)
        lows, highs = await asyncio.gather(drain(a, 5), drain(b, 5))
        gen = runner._sup.gen
        assert gen is not None and gen.pipeline.ranks is None
        assert runner._sup.submit == gen.pipeline.queues[0].put
    check_stream(lows, LOW, 5)
    check_stream(highs, HIGH, 5)


async def test_a_high_item_too_big_for_what_is_left_waits_at_the_head_not_behind_lows(
        gate: Gate) -> None:
    """Items of several rows: a high item that does not fit in the batch being filled goes
    back to the head of its level, so the next batch starts with it (not with lows)."""
    async with aioaccel.open(gated_stage(gate), batch=4, maxsize=64) as runner:
        low, high = runner.stream("low"), runner.stream("high", priority=1)
        await flood(low, LOW, 16)
        await gate.formed(1)
        first = len(gate.batches)
        await high.push(row(HIGH, 0, rows=3), tag=0)
        await high.push(row(HIGH, 1, rows=3), tag=1)
        gate.open_all()
        lows, highs = await asyncio.gather(drain(low, 16), drain(high, 2))
    check_stream(lows, LOW, 16)
    assert [r.tag for r in highs] == [0, 1]
    for r in highs:
        assert np.array_equal(r.outputs, answer(row(HIGH, r.tag, rows=3)))
    assert gate.batches[first] == [(HIGH, 0)]
    assert gate.batches[first + 1][0] == (HIGH, 1)
    assert [s for s, _ in gate.batches[first + 1][1:]] == [LOW]


async def test_without_batching_the_next_call_is_the_high_item(gate: Gate) -> None:
    async with aioaccel.open(gated_stage(gate), maxsize=32) as runner:
        low, high = runner.stream("low"), runner.stream("high", priority=1)
        await flood(low, LOW, 10)
        await gate.formed(1)
        first = len(gate.batches)
        await flood(high, HIGH, 2)
        gate.open_all()
        lows, highs = await asyncio.gather(drain(low, 10), drain(high, 2))
    check_stream(lows, LOW, 10)
    check_stream(highs, HIGH, 2)
    assert gate.batches[first:first + 2] == [[(HIGH, 0)], [(HIGH, 1)]]


async def test_withdrawn_and_cancelled_high_items_run_nowhere_and_free_their_slots(
        gate: Gate) -> None:
    async with aioaccel.open(gated_stage(gate), batch=4, maxsize=64) as runner:
        low = runner.stream("low", priority=-1)  # the default lane (infer) ranks above it
        high = runner.stream("high", priority=1)
        await flood(low, LOW, 12)
        await gate.formed(1)
        first = len(gate.batches)
        await flood(high, HIGH, 3)
        assert high.withdraw() == 3
        calls = [asyncio.create_task(runner.infer(row(DEFAULT, i))) for i in range(3)]
        await asyncio.sleep(0)  # a yield, not a wait: each new task runs up to its future
        assert runner.stats().in_flight == 12 + 3 + 3  # all admitted, none taken yet
        calls[1].cancel()
        with pytest.raises(asyncio.CancelledError):
            await calls[1]  # withdrawn as it is cancelled: no worker took it yet
        gate.open_all()
        outs = await asyncio.gather(calls[0], calls[2])
        lows = await drain(low, 12)
        await high.push(row(HIGH, 9), tag=9)  # the stream still works after its withdrawal
        (again,) = await drain(high, 1)
        stats = runner.stats()
    check_stream(lows, LOW, 12)
    assert np.array_equal(outs[0], answer(row(DEFAULT, 0)))
    assert np.array_equal(outs[1], answer(row(DEFAULT, 2)))
    assert again.tag == 9 and np.array_equal(again.outputs, answer(row(HIGH, 9)))
    ran = [item for batch in gate.batches for item in batch]
    assert not {(HIGH, 0), (HIGH, 1), (HIGH, 2), (DEFAULT, 1)} & set(ran)
    assert gate.batches[first][:2] == [(DEFAULT, 0), (DEFAULT, 2)], gate.batches
    assert [s for s, _ in gate.batches[first][2:]] == [LOW, LOW]
    assert stats.in_flight == 0


async def test_order_and_pairing_hold_for_many_streams_on_a_jittery_device() -> None:
    """No gate: four priorities, out-of-order completions, batches, concurrent infers."""
    device = SimulatedDevice(answer, latency=0.0005, jitter=0.9, capacity=3, seed=7)
    async with aioaccel.open(device, batch=8, maxsize=48) as runner:
        streams = {ident: runner.stream(f"s{ident}", priority=prio)
                   for ident, prio in ((LOW, -2), (HIGH, 1), (TOP, 7))}
        counts = {LOW: 150, HIGH: 60, TOP: 40}

        async def infers() -> list[Any]:
            return await asyncio.gather(*(runner.infer(row(DEFAULT, i)) for i in range(40)))

        results = await asyncio.gather(
            *(flood(streams[i], i, counts[i]) for i in counts),
            *(drain(streams[i], counts[i]) for i in counts), infers())
        stats = runner.stats()
    for k, ident in enumerate(counts):
        check_stream(results[len(counts) + k], ident, counts[ident])
    for i, out in enumerate(results[-1]):
        assert np.array_equal(out, answer(row(DEFAULT, i)))
    assert stats.batching is not None and stats.batching.items == sum(counts.values()) + 40
    assert stats.in_flight == 0


async def test_a_per_item_failure_in_a_priority_batch_stays_with_its_item() -> None:
    def poisoned(x: np.ndarray) -> Any:
        return bool((x[:, 0] == HIGH).any() and (x[:, 1] == 1).any())
    stage = SimulatedStage(answer, fail_if=poisoned)
    async with aioaccel.open(stage, batch=4, maxsize=32) as runner:
        low, high = runner.stream("low"), runner.stream("high", priority=1)
        await asyncio.gather(flood(low, LOW, 10), flood(high, HIGH, 4))
        lows, highs = await asyncio.gather(drain(low, 10), drain(high, 4))
    check_stream(lows, LOW, 10)
    assert [r.tag for r in highs] == [0, 1, 2, 3]
    assert isinstance(highs[1].error, aioaccel.InferenceError)
    assert isinstance(highs[1].error.__cause__, SimulatedFailure)
    for r in (highs[0], highs[2], highs[3]):
        assert r.error is None and np.array_equal(r.outputs, answer(row(HIGH, r.tag)))


async def test_priority_survives_a_restart(gate: Gate) -> None:
    calls = {"n": 0}
    lock = threading.Lock()

    def fn(x: np.ndarray) -> np.ndarray:
        with lock:
            calls["n"] += 1
            first = calls["n"] == 1
        if first:
            raise aioaccel.DeviceError("simulated device lost")
        gate.record(x)
        gate.hold()
        return answer(x)

    stage = SimulatedStage(fn)
    restart = aioaccel.Restart(backoff=0.0)
    async with aioaccel.open(stage, batch=4, maxsize=64, restart=restart, retries=1) as runner:
        low, high = runner.stream("low"), runner.stream("high", priority=1)
        await low.push(row(LOW, 0), tag=0)  # breaks the device; re-run after the restart
        await gate.formed(1)               # the suspect runs alone on the new generation
        gen = runner._sup.gen
        assert gen is not None and gen.pipeline.ranks is not None
        await flood_from(low, LOW, 1, 12)
        first = len(gate.batches)
        gate.open(1)                        # the suspect's call ends: the probation is over
        await gate.formed(first + 1)
        second = len(gate.batches)
        await flood(high, HIGH, 2)
        gate.open_all()
        lows, highs = await asyncio.gather(drain(low, 12), drain(high, 2))
    check_stream(lows, LOW, 12)
    check_stream(highs, HIGH, 2)
    assert gate.batches[second][:2] == [(HIGH, 0), (HIGH, 1)], gate.batches


async def flood_from(stream: Any, ident: int, start: int, stop: int) -> None:
    for i in range(start, stop):
        await stream.push(row(ident, i), tag=i)


# ---- the levels on their own ------------------------------------------------------------------
def test_levels_give_the_highest_priority_first_and_fifo_within_a_priority() -> None:
    from queue import SimpleQueue

    from aioaccel.core.jobs import Job
    from aioaccel.core.priority_levels import BELL, PriorityLevels

    bells: SimpleQueue[Any] = SimpleQueue()
    levels = PriorityLevels(bells)
    jobs = [Job(i, None, priority=p) for i, p in enumerate([0, 3, -1, 3, 0, 7, -1, 0])]
    for job in jobs:
        levels.put(job)
    assert bells.qsize() == len(jobs) and all(bells.get_nowait() is BELL for _ in jobs)
    assert levels.levels() == {0: 3, 3: 2, -1: 2, 7: 1}
    taken = [levels.take().seq for _ in jobs]
    assert taken == [5, 1, 3, 0, 4, 7, 2, 6]
    levels.put(jobs[0])
    levels.put_back(jobs[4])  # taken but not run: it goes first among its equals again
    assert [levels.take().seq for _ in range(2)] == [4, 0]
    with pytest.raises(RuntimeError, match="bell without a job"):
        levels.take()


def test_levels_lose_and_repeat_nothing_under_concurrent_takers() -> None:
    from queue import SimpleQueue

    from aioaccel.core.jobs import Job
    from aioaccel.core.priority_levels import BELL, PriorityLevels

    bells: SimpleQueue[Any] = SimpleQueue()
    levels = PriorityLevels(bells)
    count, takers = 20_000, 4
    got: list[list[Job]] = [[] for _ in range(takers)]
    stop = object()

    def take(out: list[Job]) -> None:
        while (bell := bells.get(timeout=10)) is not stop:
            assert bell is BELL
            out.append(levels.take())

    threads = [threading.Thread(target=take, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for i in range(count):  # new levels appear while the takers run
        levels.put(Job(i, None, priority=i % 5 - (i // 1000)))
    for _ in threads:
        bells.put(stop)
    for t in threads:
        t.join(30)
    seqs = sorted(job.seq for out in got for job in out)
    assert seqs == list(range(count))
    for out in got:  # each taker saw every priority's jobs in put order
        by_level: dict[int, list[int]] = {}
        for job in out:
            by_level.setdefault(job.priority, []).append(job.seq)
        assert all(s == sorted(s) for s in by_level.values())
