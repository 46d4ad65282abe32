"""A streamed chunk (issue 21, item 2): ``push_many`` of uniform arrays on a batching runner
goes to the stage threads as one job per ``batch`` rows, and every per-item contract holds:
order and tags (``results()`` and ``async for`` alike, mixed with single pushes),
backpressure (a chunk never holds more slots than were free), a poison row fails alone with
the per-item error, cancellation, close and drain, healing after a device fault, streams,
withdrawal and the per-item counters. Run on asyncio, uvloop and trio.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import numpy as np
import pytest

import aioaccel
from aioaccel.pytest_plugin import backends
from aioaccel.testing import SimulatedDevice, SimulatedStage

pytestmark = pytest.mark.anyio

FAST = aioaccel.Restart(limit=5, window=60.0, backoff=0.01, max_backoff=0.05)


@pytest.fixture(params=backends())
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


class Recorder:
    """A blocking stage that doubles its rows and records how many each call got; it refuses
    negative rows (a per-item failure: the whole call fails)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            self.rows.append(int(x.shape[0]))
        if (x < 0).any():
            raise ValueError("negative rows are refused")
        return x * 2


class Gate:
    """A blocking stage that holds every call until the test opens it."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.first = threading.Event()

    def __call__(self, x: Any) -> Any:
        self.first.set()
        if not self.open.wait(10):
            raise RuntimeError("the test never opened the gate")
        return x


def frames(n: int, start: int = 0) -> list[np.ndarray]:
    return [np.full((1, 4), start + i, np.float32) for i in range(n)]


def job_rows(runner: aioaccel.Runner) -> list[int]:
    """The rows of each job the runner hands to stage 0, from now on (its submit, wrapped)."""
    sizes: list[int] = []
    sup = runner._sup
    submit = sup.submit

    def counting(job: Any) -> None:
        sizes.append(int(job.value.shape[0]))
        submit(job)

    sup.submit = counting
    return sizes


async def gather_results(runner: Any, count: int, max_items: int | None = None
                         ) -> list[aioaccel.Result]:
    out: list[aioaccel.Result] = []
    async for batch in runner.results(max_items=max_items):
        assert batch and (max_items is None or len(batch) <= max_items)
        out.extend(batch)
        if len(out) >= count:
            break
    return out


async def wait_event(event: threading.Event) -> None:
    assert await anyio.to_thread.run_sync(event.wait, 10), "the stage never started"


# ---- the chunk path ---------------------------------------------------------------------
async def test_push_many_of_64_rows_at_batch_16_is_four_jobs_and_four_calls() -> None:
    stage = Recorder()
    async with aioaccel.open(stage, maxsize=64, batch=16) as runner:
        jobs = job_rows(runner)
        xs = frames(64)
        seqs = await runner.push_many(xs, tags=[f"t{i}" for i in range(64)])
        results = await gather_results(runner, 64, max_items=64)
        stats = runner.stats()
    assert jobs == [16, 16, 16, 16]  # one job per chunk, not one per item
    assert stage.rows == [16, 16, 16, 16]  # one native call per chunk
    assert [r.seq for r in results] == seqs == list(range(seqs[0], seqs[0] + 64))
    assert [r.tag for r in results] == [f"t{i}" for i in range(64)]
    for x, r in zip(xs, results, strict=True):
        assert r.ok and r.outputs.shape == (1, 4)
        np.testing.assert_array_equal(r.outputs, x * 2)
    assert stats.pushed == 64 and stats.completed == 64 and stats.failed == 0
    assert stats.in_flight == 0 and stats.peak_admitted <= 64
    assert stats.stages[0].calls == 64  # items, not chunks
    assert stats.batching is not None and stats.batching.items == 64


async def test_items_of_several_rows_each_get_their_own_rows_back() -> None:
    stage = Recorder()
    async with aioaccel.open(stage, maxsize=32, batch=8) as runner:
        jobs = job_rows(runner)
        xs = [np.full((2, 3), i, np.float32) for i in range(12)]
        await runner.push_many(xs, tags=list(range(12)))
        results = await gather_results(runner, 12)
    assert jobs == [8, 8, 8]  # 4 items of 2 rows per chunk
    assert [r.tag for r in results] == list(range(12))
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_array_equal(r.outputs, x * 2)


async def test_results_and_async_for_yield_the_same_order_mixed_with_single_pushes() -> None:
    async with aioaccel.open(Recorder(), maxsize=64, batch=8) as runner:
        xs = frames(41)
        seqs = [await runner.push(xs[0], tag=0)]
        seqs += await runner.push_many(xs[1:21], tags=list(range(1, 21)))
        seqs.append(await runner.push(xs[21], tag=21))
        seqs += await runner.push_many(xs[22:], tags=list(range(22, 41)))
        runner.close()
        got = [await anext(runner)]           # one by async for,
        async for batch in runner.results(max_items=7):  # some in lists,
            got.extend(batch)
            if len(got) > 20:
                break
        got.extend([r async for r in runner])  # the rest one by one again
    assert [r.tag for r in got] == list(range(41))
    assert [r.seq for r in got] == seqs
    assert all(np.array_equal(r.outputs, xs[r.tag] * 2) for r in got)


# ---- backpressure -----------------------------------------------------------------------
async def test_a_chunk_never_holds_more_slots_than_are_free_and_a_waiting_consumer_flows() -> None:
    async with aioaccel.open(Recorder(), maxsize=5, batch=16) as runner:
        jobs = job_rows(runner)
        xs = frames(40)
        got: list[aioaccel.Result] = []
        peak = 0

        async def produce() -> None:
            await runner.push_many(xs, tags=list(range(40)))
            runner.close()

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            async for result in runner:  # one at a time: frees one slot per item
                peak = max(peak, runner.stats().in_flight)
                got.append(result)
        stats = runner.stats()
    assert [r.tag for r in got] == list(range(40))
    assert jobs[0] == 5  # the first chunk: the five slots that were free
    assert max(jobs) <= 5 and sum(jobs) == 40
    assert peak <= 5 and stats.peak_admitted <= 5 and stats.in_flight == 0


async def test_results_on_a_small_runner_take_partial_chunks() -> None:
    async with aioaccel.open(Recorder(), maxsize=6, batch=4) as runner:
        got: list[aioaccel.Result] = []

        async def produce() -> None:
            await runner.push_many(frames(50), tags=list(range(50)))
            runner.close()

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            async for batch in runner.results(max_items=3):  # fewer than a chunk at a time
                assert 1 <= len(batch) <= 3
                assert runner.stats().in_flight <= 6
                got.extend(batch)
    assert [r.tag for r in got] == list(range(50))


# ---- errors -----------------------------------------------------------------------------
async def test_a_poison_row_in_a_chunk_fails_alone_with_the_per_item_error() -> None:
    async with aioaccel.open(Recorder(), maxsize=32, batch=16) as runner:
        xs = frames(16)
        xs[5] = np.full((1, 4), -1, np.float32)
        seqs = await runner.push_many(xs, tags=[f"t{i}" for i in range(16)])
        results = await gather_results(runner, 16)
        single = await runner.push(xs[5], tag="t5")  # the same item pushed alone
        (alone,) = await gather_results(runner, 1)
        stats = runner.stats()
    assert [r.tag for r in results] == [f"t{i}" for i in range(16)]
    assert [r.ok for r in results] == [i != 5 for i in range(16)]
    assert all(np.array_equal(r.outputs, xs[i] * 2) for i, r in enumerate(results) if i != 5)
    error, expected = results[5].error, alone.error
    assert isinstance(error, aioaccel.InferenceError) and isinstance(expected,
                                                                      aioaccel.InferenceError)
    assert isinstance(error.__cause__, ValueError)
    assert str(error) == str(expected).replace(f"item {single} ", f"item {seqs[5]} ")
    assert stats.failed == 2 and stats.completed == 15 and stats.in_flight == 0
    assert stats.batching is not None and stats.batching.fallbacks >= 1


async def test_bad_input_in_a_uniform_push_many_names_the_item_and_admits_nothing(
        tmp_path: Any) -> None:
    from aioaccel.testing.models import dense_chain

    chain = dense_chain(8, 2, dynamic_batch=True, seed=3)
    path = chain.write_onnx(tmp_path / "m.onnx")
    async with aioaccel.open(path, maxsize=32, batch=8, num_threads=1) as runner:
        good = [chain.random_input(i) for i in range(10)]
        wrong = [np.zeros((1, 9), np.float32)] * 10  # uniform, but not the model's width
        with pytest.raises(aioaccel.InputError, match="item 0 of 10"):
            await runner.push_many(wrong)
        assert runner.stats().pushed == 0 and runner.stats().in_flight == 0
        await runner.push_many(good, tags=list(range(10)))
        results = await gather_results(runner, 10)
        expected = [await runner.infer(x) for x in good]
    assert [r.tag for r in results] == list(range(10))
    for r, want in zip(results, expected, strict=True):
        for name in want:
            np.testing.assert_allclose(r.outputs[name], want[name], rtol=1e-5)


# ---- cancellation, close, drain ---------------------------------------------------------
async def test_push_many_cancelled_while_waiting_keeps_the_chunks_it_admitted() -> None:
    gate = Gate()
    async with aioaccel.open(gate, maxsize=8, batch=4) as runner:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(runner.push_many, frames(20), list(range(20)))
                await wait_event(gate.first)  # its first step admitted 8, then it waits
                scope.cancel()
        assert runner.stats().pushed == 8 and runner.stats().in_flight == 8
        gate.open.set()
        runner.close()
        got = [r async for r in runner]
        stats = runner.stats()
    assert [r.tag for r in got] == list(range(8))
    assert stats.completed == 8 and stats.in_flight == 0


async def test_close_drains_every_chunk_and_a_zero_timeout_fails_each_item() -> None:
    stage = SimulatedStage(lambda x: x + 1, latency=0.001)
    async with aioaccel.open(stage, maxsize=64, batch=8) as runner:
        await runner.push_many(frames(30), tags=list(range(30)))
        runner.close()
        drained = [r for batch in [b async for b in runner.results()] for r in batch]
    assert [r.tag for r in drained] == list(range(30))

    gate = Gate()
    runner = await aioaccel.open(gate, maxsize=16, batch=4)
    try:
        await runner.push_many(frames(12), tags=list(range(12)))
        await wait_event(gate.first)
        await runner.aclose(timeout=0)
        stats = runner.stats()
        with pytest.raises(aioaccel.RunnerClosed):
            await anext(runner)
    finally:
        gate.open.set()
    assert stats.pushed == 12 and stats.failed == 12 and stats.in_flight == 0


# ---- healing ----------------------------------------------------------------------------
def breaks_on_13(x: np.ndarray) -> np.ndarray:
    if (x == 13).any():
        raise aioaccel.DeviceError("the device crashed on this input")
    return x * 2


@pytest.mark.parametrize("kind", ["blocking", "device"])
async def test_a_device_fault_mid_chunk_heals_with_per_item_outcomes(kind: str) -> None:
    stage: Any = (SimulatedDevice(breaks_on_13, latency=0.001, jitter=0.5, capacity=2)
                  if kind == "device" else SimulatedStage(breaks_on_13, latency=0.0005))
    async with aioaccel.open(stage, maxsize=32, batch=8, restart=FAST, retries=2) as runner:
        xs = frames(40)
        results: list[aioaccel.Result] = []

        async def produce() -> None:  # 40 items, 32 slots: it waits for the consumer
            await runner.push_many(xs, tags=list(range(40)))
            runner.close()

        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            results.extend([r async for r in runner])
        stats = runner.stats()
    assert [r.tag for r in results] == list(range(40))
    assert [r.tag for r in results if not r.ok] == [13]
    assert all(np.array_equal(r.outputs, xs[r.tag] * 2) for r in results if r.ok)
    assert stats.restarts == 2 and stats.completed == 39 and stats.failed == 1
    assert stats.in_flight == 0


async def test_a_device_fault_without_retries_fails_each_item_of_the_chunk() -> None:
    stage = SimulatedStage(breaks_on_13, latency=0.0005)
    async with aioaccel.open(stage, maxsize=32, batch=8, restart=FAST) as runner:
        await runner.push_many(frames(16), tags=list(range(16)))
        runner.close()
        results = [r async for r in runner]
        stats = runner.stats()
    assert [r.tag for r in results] == list(range(16))
    failed = [r for r in results if not r.ok]
    assert 13 in [r.tag for r in failed]
    assert all("was on the device when it failed" in str(r.error) for r in failed)
    assert {r.seq for r in failed} == {r.error.seq for r in failed if r.error}  # each its own
    assert stats.failed == len(failed) and stats.completed == 16 - len(failed)
    assert stats.in_flight == 0


# ---- streams ----------------------------------------------------------------------------
async def test_streams_push_many_in_chunks_keep_their_order_and_counts() -> None:
    async with aioaccel.open(Recorder(), maxsize=64, batch=8) as runner:
        jobs = job_rows(runner)
        out: dict[str, list[Any]] = {}

        async def feed(key: str, base: int) -> None:
            async with runner.stream(key) as s:
                await s.push_many(frames(24, base), tags=list(range(24)))
                s.close()
                out[key] = [(r.tag, float(r.outputs[0, 0])) async for r in s]
                assert s.stats().completed == 24 and s.stats().pushed == 24

        async with anyio.create_task_group() as tg:
            tg.start_soon(feed, "a", 0)
            tg.start_soon(feed, "b", 100)
        stats = runner.stats()
    assert out["a"] == [(i, 2.0 * i) for i in range(24)]
    assert out["b"] == [(i, 2.0 * (100 + i)) for i in range(24)]
    assert max(jobs) == 8 and sum(jobs) == 48
    assert stats.completed == 48 and stats.in_flight == 0


async def test_streams_of_several_priorities_keep_items_one_job_each() -> None:
    async with aioaccel.open(Recorder(), maxsize=32, batch=8) as runner:
        urgent = runner.stream("urgent", priority=1)  # stage 0 ranks priorities from now on
        jobs = job_rows(runner)
        await urgent.push_many(frames(10), tags=list(range(10)))
        got = await gather_results(urgent, 10)
        urgent.close()
    assert [r.tag for r in got] == list(range(10))
    assert jobs == [1] * 10  # ranked stage 0: the plain per-item path


async def test_withdrawing_a_stream_takes_back_its_unstarted_chunks_by_item() -> None:
    gate = Gate()
    async with aioaccel.open(gate, maxsize=16, batch=4) as runner:
        s = runner.stream("s")
        await s.push_many(frames(12), tags=list(range(12)))
        await wait_event(gate.first)  # the first chunk is on the stage
        assert s.withdraw() == 8
        stats = runner.stats()
        assert stats.withdrawn == 8
        gate.open.set()
        got = await gather_results(s, 4)
        s.close()
        assert [r.tag for r in got] == list(range(4))
        await runner.infer(np.zeros((1, 4), np.float32))  # its shells are back before this
        assert runner.stats().in_flight == 0
