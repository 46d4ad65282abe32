"""Dynamic batching in the runner core (issue 12): grouping, splitting, fallbacks, fairness."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import numpy as np
import pytest

import aioaccel
from aioaccel.batching import join, split

pytestmark = pytest.mark.anyio


class Recorder:
    """A batched function stage: records the rows of each call."""

    def __init__(self, latency: float = 0.0, poison: float | None = None):
        self.calls: list[int] = []
        self.latency = latency
        self.poison = poison
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls.append(x.shape[0])
        if self.poison is not None and (x == self.poison).any():
            raise ValueError(f"poisoned row {self.poison}")
        if self.latency:
            time.sleep(self.latency)
        return x * 2 + 1


def row(i: int, width: int = 4) -> np.ndarray:
    return np.full((1, width), i, np.float32)


async def test_concurrent_infers_are_batched_and_each_gets_its_own_row() -> None:
    stage = Recorder(latency=0.002)
    async with aioaccel.open(stage, batch=8, maxsize=64) as runner:
        outs = await asyncio.gather(*(runner.infer(row(i)) for i in range(100)))
        stats = runner.stats()
    for i, out in enumerate(outs):
        assert np.array_equal(out, row(i) * 2 + 1)
    assert max(stage.calls) == 8 and sum(stage.calls) == 100
    assert len(stage.calls) < 30
    assert stats.batching is not None and stats.batching.items == 100
    assert stats.batching.batches == len(stage.calls) and stats.batching.fill > 0.5


async def test_streaming_with_batching_keeps_push_order_tags_and_latency() -> None:
    stage = Recorder(latency=0.001)
    async with aioaccel.open(stage, batch=4, maxsize=16) as runner:
        async def produce() -> None:
            for i in range(50):
                await runner.push(row(i), tag=f"f{i}")
            runner.close()

        producer = asyncio.create_task(produce())
        results = [r async for r in runner]
        await producer
    assert [r.seq for r in results] == list(range(50))
    assert [r.tag for r in results] == [f"f{i}" for i in range(50)]
    assert all(np.array_equal(r.outputs, row(i) * 2 + 1) for i, r in enumerate(results))
    assert all(r.latency > 0 for r in results)
    assert max(stage.calls) > 1


async def test_a_lone_item_is_sent_at_once_when_the_device_is_idle() -> None:
    stage = Recorder()
    async with aioaccel.open(stage, batch=8, batch_wait=5.0) as runner:
        started = time.perf_counter()
        out = await runner.infer(row(3))
        elapsed = time.perf_counter() - started
    assert np.array_equal(out, row(3) * 2 + 1)
    # half of batch_wait: slack for a loaded machine, far from the 5 s a wait would take
    assert elapsed < 2.5, "a lone item waited for batch_wait with the device idle"


async def test_a_partial_batch_waits_at_most_batch_wait_while_the_device_is_busy() -> None:
    gate, busy_now = threading.Event(), threading.Event()

    def stage(x: np.ndarray) -> np.ndarray:
        if (x == -1).any():
            busy_now.set()
            gate.wait(5)  # keeps one replica busy
        return x

    async with aioaccel.open(stage, batch=8, batch_wait=0.05, replicas=2, maxsize=16) as runner:
        busy = asyncio.create_task(runner.infer(row(-1)))
        # the replica holds it (else row 7 could join its batch and wait for the gate)
        assert await asyncio.to_thread(busy_now.wait, 10)
        started = time.perf_counter()
        out = await asyncio.wait_for(runner.infer(row(7)), 4)
        elapsed = time.perf_counter() - started
        gate.set()
        await busy
    assert np.array_equal(out, row(7))
    # batch_wait, and slack for a loaded machine: far from the 5 s the busy replica holds
    assert elapsed < 0.05 + 1.0, f"waited {elapsed:.3f} s"


async def test_a_poisoned_item_fails_alone_and_its_batch_mates_succeed() -> None:
    stage = Recorder(poison=13)
    async with aioaccel.open(stage, batch=8, maxsize=32) as runner:
        outcomes = await asyncio.gather(*(runner.infer(row(i)) for i in range(32)),
                                        return_exceptions=True)
        stats = runner.stats()
    for i, outcome in enumerate(outcomes):
        if i == 13:
            assert isinstance(outcome, aioaccel.InferenceError)
            assert isinstance(outcome.__cause__, ValueError)
        else:
            assert np.array_equal(outcome, row(i) * 2 + 1)  # type: ignore[arg-type]
    assert stats.batching is not None and stats.batching.fallbacks >= 1


async def test_a_wrong_first_axis_length_fails_those_items_clearly() -> None:
    def drops_a_row(x: np.ndarray) -> np.ndarray:
        return x[:-1] if x.shape[0] > 1 else x

    gate, held = threading.Event(), threading.Event()

    def stage(x: np.ndarray) -> np.ndarray:
        if (x == -1).any():
            held.set()
            gate.wait(5)
        return drops_a_row(x)

    async with aioaccel.open(stage, batch=4, maxsize=16) as runner:
        first = asyncio.create_task(runner.infer(row(-1)))
        assert await asyncio.to_thread(held.wait, 10)  # the worker holds it, alone
        rest = [asyncio.create_task(runner.infer(row(i))) for i in range(4)]
        # all four admitted behind it (one batch once the worker is free)
        deadline = time.monotonic() + 10.0
        while runner.stats().in_flight < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        assert runner.stats().in_flight == 5
        gate.set()
        await first
        outcomes = await asyncio.gather(*rest, return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, aioaccel.InferenceError)]
    assert errors, outcomes
    assert "rows" in str(errors[0].__cause__)


async def test_cancellation_storm_with_batching_keeps_exact_accounting() -> None:
    rng = random.Random(3)
    stage = Recorder(latency=0.002)
    async with aioaccel.open(stage, batch=8, maxsize=16, replicas=2) as runner:
        tasks = [asyncio.create_task(runner.infer(row(i), timeout=rng.choice([0.001, 5])))
                 for i in range(300)]
        for _ in range(50):
            await asyncio.sleep(0.001)
            rng.choice(tasks).cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        stats = runner.stats()
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, np.ndarray):
            assert np.array_equal(outcome, row(i) * 2 + 1)
        else:
            assert isinstance(outcome, (asyncio.CancelledError, aioaccel.InferTimeout))
    assert stats.in_flight == 0 and stats.waiting == 0
    assert stats.pushed == stats.completed + stats.failed + stats.withdrawn


async def test_streams_share_batches_fairly_and_keep_their_own_order() -> None:
    stage = Recorder(latency=0.003)
    async with aioaccel.open(stage, batch=4, maxsize=8) as runner:
        flood, light = runner.stream("flood"), runner.stream("light")
        light_times: list[float] = []

        async def push_flood() -> None:
            for i in range(120):
                await flood.push(row(i), tag=i)
            flood.close()

        async def push_light() -> None:
            for i in range(10):
                t0 = time.perf_counter()
                await light.push(row(1000 + i), tag=i)
                light_times.append(time.perf_counter() - t0)
                await asyncio.sleep(0.005)
            light.close()

        async def read(s: aioaccel.Stream) -> list[aioaccel.Result]:
            return [r async for r in s]

        tasks = [asyncio.create_task(c) for c in (push_flood(), push_light())]
        flood_results, light_results = await asyncio.gather(read(flood), read(light))
        await asyncio.gather(*tasks)
    assert [r.tag for r in flood_results] == list(range(120))
    assert [r.tag for r in light_results] == list(range(10))
    assert all(np.array_equal(r.outputs, row(1000 + i) * 2 + 1)
               for i, r in enumerate(light_results))
    assert max(light_times) < 0.2, f"the light stream waited {max(light_times):.3f} s"


async def test_batch_needs_a_backend_that_can_batch() -> None:
    from aioaccel.backends import Model
    from aioaccel.stages import StageSpec

    with pytest.raises(ValueError, match="batch must be"):
        aioaccel.open(lambda x: x, batch=0)
    runner = aioaccel.Runner(lambda: Model(stages=[StageSpec("s", lambda: lambda x: x)]))
    async with runner:  # built without open(): no batching, items one by one
        assert await runner.infer(1) == 1


def test_join_and_split_round_trip_every_input_form() -> None:
    a = [np.full((1, 3), i, np.float32) for i in range(3)] + [np.ones((2, 3), np.float32)]
    batch, counts = join(a)
    assert batch.shape == (5, 3) and counts == [1, 1, 1, 2]
    assert all(np.array_equal(p, x) for p, x in zip(split(batch, counts), a))
    d = [{"x": x, "y": x[:, :1]} for x in a]
    batch_d, counts_d = join(d)
    back = split(batch_d, counts_d)
    assert all(np.array_equal(b["y"], x["y"]) for b, x in zip(back, d))
    parts = split((batch, batch[:, 0]), counts)
    assert isinstance(parts[0], tuple) and parts[3][1].shape == (2,)
    with pytest.raises(ValueError, match="4 rows for a batch of 5 rows from 4 items"):
        split(batch[:4], counts)
    with pytest.raises(ValueError, match="along dimension 1"):
        join([np.ones((1, 3)), np.ones((1, 4))])
    assert not np.shares_memory(split(batch, counts)[0], batch)


async def test_non_array_inputs_still_run_one_by_one() -> None:
    def stage(x: Any) -> Any:
        return x

    async with aioaccel.open(stage, batch=4) as runner:
        assert await asyncio.gather(*(runner.infer(i) for i in range(10))) == list(range(10))


async def test_device_stages_take_batches_and_a_poisoned_batch_reruns_item_by_item() -> None:
    from aioaccel.testing import SimulatedDevice

    def fn(x: np.ndarray) -> np.ndarray:
        if (x == 13).any():
            raise ValueError("poisoned row 13")
        return x * 2 + 1

    device = SimulatedDevice(fn, latency=0.002, jitter=0.0, capacity=2)
    async with aioaccel.open(device, batch=8, maxsize=32) as runner:
        outcomes = await asyncio.gather(*(runner.infer(row(i)) for i in range(40)),
                                        return_exceptions=True)
        stats = runner.stats()
    for i, outcome in enumerate(outcomes):
        if i == 13:
            assert isinstance(outcome, aioaccel.InferenceError)
        else:
            assert np.array_equal(outcome, row(i) * 2 + 1)  # type: ignore[arg-type]
    assert stats.batching is not None and stats.batching.batches < 40
    assert stats.batching.fallbacks >= 1 and stats.in_flight == 0
