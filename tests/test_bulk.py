"""The bulk APIs: ``infer_many``, ``push_many``, ``results(max_items=)``, and the same on streams.

Each keeps the single-item contracts: order, backpressure by ``maxsize``, per-item errors in
place, cancellation (a cancelled ``infer_many`` withdraws what has not started).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aioaccel
from aioaccel.testing import SimulatedDevice, SimulatedStage
from aioaccel.testing.models import dense_chain

pytestmark = pytest.mark.anyio


def double(x: int) -> int:
    return x * 2


def fail_on_3(x: int) -> int:
    if x == 3:
        raise ValueError("three is refused")
    return x * 2


class Gate:
    """A blocking stage that holds every call until released; ``started`` counts calls."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.first = threading.Event()
        self.started = 0

    def __call__(self, x: Any) -> Any:
        self.started += 1
        self.first.set()
        if not self.open.wait(10):
            raise RuntimeError("the test never opened the gate")
        return x


async def wait_thread_event(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 10), "the stage never started"


# ---- infer_many -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["stage", "device"])
async def test_infer_many_returns_outputs_in_input_order_past_maxsize(kind: str) -> None:
    target: Any = (SimulatedStage(double, latency=0.0003, jitter=1.0, seed=1) if kind == "stage"
                   else SimulatedDevice(double, latency=0.0005, jitter=1.0, capacity=3, seed=1))
    async with aioaccel.open(target, maxsize=4, replicas=2 if kind == "stage" else 1) as runner:
        out = await runner.infer_many(list(range(50)))
        assert out == [2 * i for i in range(50)]
        stats = runner.stats()
        assert stats.peak_admitted <= 4
        assert stats.completed == 50 and stats.in_flight == 0


async def test_infer_many_takes_any_iterable_and_an_empty_one() -> None:
    async with aioaccel.open(double, maxsize=2) as runner:
        assert await runner.infer_many([]) == []
        assert await runner.infer_many(iter(range(5))) == [0, 2, 4, 6, 8]
        assert await runner.infer_many(x for x in (7,)) == [14]
        with pytest.raises(TypeError, match="sequence of items"):
            await runner.infer_many(5)  # type: ignore[arg-type]


async def test_infer_many_raises_the_failed_items_error_and_the_runner_goes_on() -> None:
    async with aioaccel.open(fail_on_3, maxsize=4) as runner:
        with pytest.raises(aioaccel.InferenceError, match="three is refused") as info:
            await runner.infer_many(list(range(10)))
        assert isinstance(info.value.__cause__, ValueError)
        # later calls work, and nothing is held
        assert await runner.infer_many([1, 2]) == [2, 4]
        await runner.infer(0)  # everything before it has settled (one FIFO worker)
        assert runner.stats().in_flight == 0


async def test_infer_many_return_exceptions_puts_each_error_in_place() -> None:
    async with aioaccel.open(fail_on_3, maxsize=3) as runner:
        out = await runner.infer_many([1, 3, 5, 3, 7], return_exceptions=True)
        assert out[0::2] == [2, 10, 14]
        for err in (out[1], out[3]):
            assert isinstance(err, aioaccel.InferenceError)
            assert isinstance(err.__cause__, ValueError)
        assert out[1] is not out[3]
        assert runner.stats().failed == 2


async def test_infer_many_cancelled_withdraws_what_has_not_started() -> None:
    gate = Gate()
    async with aioaccel.open(gate, maxsize=8) as runner:
        task = asyncio.create_task(runner.infer_many(list(range(20))))
        await wait_thread_event(gate.first)  # one item is on the stage, 7 queued, 12 waiting
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.open.set()
        assert await runner.infer(99) == 99  # FIFO: every shell before it is back
        stats = runner.stats()
        assert gate.started == 2  # the one that was running, and this infer
        assert stats.withdrawn == 7
        assert stats.discarded == 1  # the one on the stage when it was cancelled
        assert stats.in_flight == 0 and stats.pushed == 9


async def test_infer_many_timeout_raises_infer_timeout_and_withdraws() -> None:
    gate = Gate()
    async with aioaccel.open(gate, maxsize=4) as runner:
        with pytest.raises(aioaccel.InferTimeout, match="10 items"):
            await runner.infer_many(list(range(10)), timeout=0.05)
        gate.open.set()
        assert await runner.infer(5) == 5
        assert runner.stats().in_flight == 0


async def test_infer_many_checks_every_input_before_admitting_any(tmp_path: Path) -> None:
    chain = dense_chain(8, 2, dynamic_batch=True, seed=8)
    path = chain.write_onnx(tmp_path / "m.onnx")
    good = [chain.random_input(s) for s in range(3)]
    bad = np.zeros((1, 5), np.float32)
    async with aioaccel.open(path, maxsize=2, num_threads=1) as runner:
        with pytest.raises(aioaccel.InputError, match="item 2 of 4") as info:
            await runner.infer_many([*good[:2], bad, good[2]])
        assert "input" in str(info.value)
        assert runner.stats().pushed == 0  # nothing was admitted
        out = await runner.infer_many([good[0], bad, good[1]], return_exceptions=True)
        assert isinstance(out[1], aioaccel.InputError)
        np.testing.assert_allclose(out[0][chain.output_name], chain.reference(good[0]),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out[2][chain.output_name], chain.reference(good[1]),
                                   rtol=1e-4, atol=1e-5)
        assert runner.stats().pushed == 2


async def test_infer_many_with_batching_matches_the_model(tmp_path: Path) -> None:
    chain = dense_chain(8, 2, dynamic_batch=True, seed=9)
    path = chain.write_onnx(tmp_path / "m.onnx")
    xs = [chain.random_input(s) for s in range(40)]
    async with aioaccel.open(path, maxsize=16, batch=8, num_threads=1) as runner:
        out = await runner.infer_many(xs)
        for x, got in zip(xs, out, strict=True):
            np.testing.assert_allclose(got[chain.output_name], chain.reference(x),
                                       rtol=1e-4, atol=1e-5)
        batching = runner.stats().batching
        assert batching is not None and batching.batches < 40  # it did batch


async def test_infer_many_on_a_closed_runner_raises_runner_closed() -> None:
    async with aioaccel.open(double) as runner:
        runner.close()
        with pytest.raises(aioaccel.RunnerClosed):
            await runner.infer_many([1])


async def test_infer_many_of_a_broken_runner_raises_device_error() -> None:
    device = SimulatedDevice(double, latency=0.0005, fatal_at=5, capacity=2)
    async with aioaccel.open(device, maxsize=4) as runner:
        with pytest.raises(aioaccel.DeviceError):
            await runner.infer_many(list(range(20)))
        with pytest.raises(aioaccel.DeviceError):
            await runner.infer_many([1])


# ---- push_many + results() ------------------------------------------------------------------
async def test_push_many_admits_in_order_and_never_past_maxsize() -> None:
    stage = SimulatedStage(double, latency=0.0002, jitter=1.0, seed=2)
    async with aioaccel.open(stage, maxsize=4, replicas=2) as runner:
        task = asyncio.create_task(runner.push_many(range(10), tags=[f"t{i}" for i in range(10)]))
        got = []
        for _ in range(3):
            result = await anext(runner)
            got.append(result)
            assert runner.stats().in_flight <= 4
        # 4 admitted + 3 consumed: at most 7 of the 10 can have been admitted yet
        assert not task.done()
        for _ in range(7):
            got.append(await anext(runner))
        seqs = await task
        assert seqs == sorted(seqs) and len(seqs) == 10
        assert [r.seq for r in got] == seqs
        assert [r.tag for r in got] == [f"t{i}" for i in range(10)]
        assert [r.outputs for r in got] == [2 * i for i in range(10)]
        assert runner.stats().peak_admitted <= 4


async def test_push_many_checks_tags_and_inputs_before_admitting(tmp_path: Path) -> None:
    chain = dense_chain(8, 2, dynamic_batch=True, seed=8)
    path = chain.write_onnx(tmp_path / "m.onnx")
    good = chain.random_input(0)
    async with aioaccel.open(path, maxsize=4, num_threads=1) as runner:
        with pytest.raises(ValueError, match="3 inputs and 2 tags"):
            await runner.push_many([good, good, good], tags=["a", "b"])
        with pytest.raises(aioaccel.InputError, match="item 1 of 2"):
            await runner.push_many([good, np.zeros((1, 8), np.float64)])
        with pytest.raises(TypeError):
            await runner.push_many(good[0, 0])  # type: ignore[arg-type]
        assert runner.stats().pushed == 0


async def test_push_many_cancelled_while_waiting_keeps_what_it_admitted() -> None:
    gate = Gate()
    async with aioaccel.open(gate, maxsize=3) as runner:
        task = asyncio.create_task(runner.push_many(range(8), tags=list(range(8))))
        # push_many admitted 3 without suspending before the stage could start the first
        await wait_thread_event(gate.first)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert runner.stats().in_flight == 3
        gate.open.set()
        runner.close()
        tags = [r.tag async for r in runner]
        assert tags == [0, 1, 2]
        assert runner.stats().in_flight == 0


async def test_results_yields_ready_lists_in_push_order_with_errors_in_place() -> None:
    async with aioaccel.open(fail_on_3, maxsize=8, replicas=2) as runner:

        async def produce() -> None:
            await runner.push_many(range(30), tags=[f"x{i}" for i in range(30)])
            runner.close()

        producer = asyncio.create_task(produce())
        batches = [b async for b in runner.results(max_items=5)]
        await producer
        assert all(1 <= len(b) <= 5 for b in batches)
        flat = [r for b in batches for r in b]
        assert [r.tag for r in flat] == [f"x{i}" for i in range(30)]
        assert [r.seq for r in flat] == sorted(r.seq for r in flat)
        assert not flat[3].ok and isinstance(flat[3].error, aioaccel.InferenceError)
        assert [r.outputs for r in flat if r.ok] == [2 * i for i in range(30) if i != 3]


async def test_results_returns_everything_ready_in_one_list() -> None:
    gate = Gate()
    async with aioaccel.open(gate, maxsize=6) as runner:
        await runner.push_many(range(6))
        gate.open.set()
        await runner.infer_many([])  # (no-op)
        first = await anext(runner)  # the head is ready; wait for the last through order
        assert first.tag is None and first.outputs == 0
        batches = runner.results(max_items=None)
        got: list[Any] = []
        while len(got) < 5:
            got.extend(r.outputs for r in await anext(batches))
        assert got == [1, 2, 3, 4, 5]


async def test_results_max_items_must_be_a_positive_int() -> None:
    async with aioaccel.open(double) as runner:
        for bad in (0, -1, 1.5, True, "3"):
            with pytest.raises(ValueError, match="max_items"):
                runner.results(max_items=bad)  # type: ignore[arg-type]


async def test_results_and_async_for_share_the_stream() -> None:
    async with aioaccel.open(double, maxsize=8) as runner:
        await runner.push_many(range(6))
        one = await anext(runner)
        rest: list[int] = []
        async for batch in runner.results(max_items=2):
            rest.extend(r.outputs for r in batch)
            if len(rest) == 5:
                break
        assert one.outputs == 0 and rest == [2, 4, 6, 8, 10]


async def test_results_of_a_broken_runner_raise_after_the_finished_prefix() -> None:
    device = SimulatedDevice(double, latency=0.0005, jitter=0.0, fatal_at=4, capacity=1)
    async with aioaccel.open(device, maxsize=8) as runner:
        await runner.push_many(range(8))
        got: list[int] = []
        with pytest.raises(aioaccel.DeviceError):
            async for batch in runner.results(max_items=3):
                got.extend(r.outputs for r in batch)
        assert got == [2 * i for i in range(len(got))] and len(got) <= 4


# ---- streams --------------------------------------------------------------------------------
async def test_stream_push_many_and_results_keep_each_streams_order_and_share() -> None:
    stage = SimulatedStage(double, latency=0.0002, jitter=1.0, seed=4)
    async with aioaccel.open(stage, maxsize=6, replicas=2) as runner:
        a, b = runner.stream("a", maxsize=2), runner.stream("b")
        peaks = {"a": 0}

        async def feed(s: aioaccel.Stream, base: int) -> None:
            await s.push_many([base + i for i in range(20)], tags=list(range(20)))
            s.close()

        async def drain(s: aioaccel.Stream) -> list[Any]:
            out = []
            async for batch in s.results(max_items=4):
                assert 1 <= len(batch) <= 4
                if s is a:
                    peaks["a"] = max(peaks["a"], a.stats().in_flight)
                out.extend((r.tag, r.outputs) for r in batch)
            return out

        *_, got_a, got_b = await asyncio.gather(feed(a, 0), feed(b, 100), drain(a), drain(b))
        assert got_a == [(i, 2 * i) for i in range(20)]
        assert got_b == [(i, 2 * (100 + i)) for i in range(20)]
        assert peaks["a"] <= 2
        assert runner.stats().peak_admitted <= 6


async def test_stream_push_many_on_a_closed_stream_raises() -> None:
    async with aioaccel.open(double) as runner:
        s = runner.stream("s")
        s.close()
        with pytest.raises(aioaccel.RunnerClosed, match="stream 's'"):
            await s.push_many([1])


# ---- infer_many on a batching runner: runs of items joined into one call ----------------------
def rows_times_two(x: np.ndarray) -> np.ndarray:
    if (x < 0).any():
        raise ValueError("negative rows are refused")
    return x * 2


def column(values: list[float]) -> list[np.ndarray]:
    return [np.array([[v]], np.float32) for v in values]


async def test_batched_infer_many_fails_only_the_item_that_fails_alone() -> None:
    async with aioaccel.open(rows_times_two, maxsize=16, batch=8) as runner:
        xs = column([1, 2, -3, 4, 5, 6, -7, 8, 9, 10])
        out = await runner.infer_many(xs, return_exceptions=True)
        for k, (x, got) in enumerate(zip(xs, out, strict=True)):
            if x[0, 0] < 0:
                assert isinstance(got, aioaccel.InferenceError), k
                assert isinstance(got.__cause__, ValueError)
            else:
                np.testing.assert_array_equal(got, x * 2)
        stats = runner.stats()
        assert stats.pushed >= 10 and stats.failed == 2 and stats.in_flight == 0
        with pytest.raises(aioaccel.InferenceError, match="negative"):
            await runner.infer_many(xs)


async def test_batched_infer_many_counts_every_item_and_keeps_rows_apart() -> None:
    async with aioaccel.open(rows_times_two, maxsize=16, batch=8) as runner:
        # items of 1 and 3 rows: each gets back exactly its own rows
        xs = [np.full((1 + 2 * (i % 2), 2), i, np.float32) for i in range(20)]
        out = await runner.infer_many(xs)
        for x, got in zip(xs, out, strict=True):
            np.testing.assert_array_equal(got, x * 2)
        stats = runner.stats()
        assert stats.pushed == 20 and stats.completed == 20 and stats.in_flight == 0
        assert stats.peak_admitted <= 16


async def test_concurrent_batched_infer_many_calls_share_a_small_runner() -> None:
    # maxsize below the batch size, two callers: partial runs must not wait on each other
    async with aioaccel.open(rows_times_two, maxsize=3, batch=8) as runner:
        a = column([float(i) for i in range(30)])
        b = column([float(100 + i) for i in range(30)])
        out_a, out_b = await asyncio.gather(runner.infer_many(a), runner.infer_many(b))
        assert [float(v[0, 0]) for v in out_a] == [2.0 * i for i in range(30)]
        assert [float(v[0, 0]) for v in out_b] == [2.0 * (100 + i) for i in range(30)]
        assert runner.stats().peak_admitted <= 3 and runner.stats().in_flight == 0


async def test_batched_infer_many_cancelled_gives_every_slot_back() -> None:
    gate = Gate()
    async with aioaccel.open(gate, maxsize=8, batch=4) as runner:
        task = asyncio.create_task(runner.infer_many(column([float(i) for i in range(20)])))
        await wait_thread_event(gate.first)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.open.set()
        x = np.ones((1, 1), np.float32)
        np.testing.assert_array_equal(await runner.infer(x), x)
        stats = runner.stats()
        assert stats.in_flight == 0
        assert stats.withdrawn >= 1
        # everything admitted afterwards still flows
        assert len(await runner.infer_many(column([1.0] * 12))) == 12
