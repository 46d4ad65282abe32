"""The runner's contracts: order, pairing, backpressure, errors, lifecycle, infer."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest

import aioaccel
from aioaccel.testing import SimulatedDevice, SimulatedFailure, SimulatedStage

pytestmark = pytest.mark.anyio


async def consume_all(runner: aioaccel.Runner) -> list[aioaccel.Result]:
    return [r async for r in runner]


async def push_all(runner: aioaccel.Runner, values: list[int], close: bool = True) -> list[int]:
    seqs = [await runner.push(v, tag=f"tag-{v}") for v in values]
    if close:
        runner.close()
    return seqs


# ---- order and pairing --------------------------------------------------------------------
@pytest.mark.parametrize("replicas", [1, 4])
async def test_results_come_in_push_order_with_replicas(replicas: int) -> None:
    stage = SimulatedStage(lambda x: x * 10, latency=0.002, jitter=1.0, seed=1)
    async with aioaccel.open(stage, replicas=replicas, maxsize=16) as runner:
        producer = asyncio.create_task(push_all(runner, list(range(120))))
        results = await consume_all(runner)
        seqs = await producer
    assert [r.seq for r in results] == seqs == list(range(120))
    assert [r.tag for r in results] == [f"tag-{i}" for i in range(120)]
    assert [r.outputs for r in results] == [i * 10 for i in range(120)]
    assert all(r.ok and r.latency > 0 for r in results)


async def test_device_stage_completes_out_of_order_yet_results_are_in_order() -> None:
    device = SimulatedDevice(lambda x: -x, latency=0.003, jitter=1.0, capacity=4, seed=7)
    async with aioaccel.open([lambda x: x + 1, device, lambda x: (x, "post")],
                             maxsize=12) as runner:
        producer = asyncio.create_task(push_all(runner, list(range(80))))
        results = await consume_all(runner)
        await producer
        stats = runner.stats()
    assert device.completion_order != sorted(device.completion_order), "never out of order"
    assert [r.outputs for r in results] == [(-(i + 1), "post") for i in range(80)]
    assert [r.tag for r in results] == [f"tag-{i}" for i in range(80)]
    assert device.peak_in_flight <= 4
    assert [s.kind for s in stats.stages] == ["blocking", "device", "blocking"]
    assert stats.stages[1].calls == 80


async def test_stage_names_and_thread_names() -> None:
    def decode(x: int) -> int:
        return x

    seen: list[str] = []

    def record(x: int) -> int:
        seen.append(threading.current_thread().name)
        return x

    async with aioaccel.open([decode, record], name="cam0", replicas=2) as runner:
        assert await runner.infer(1) == 1
        names = {t.name for t in threading.enumerate() if t.name.startswith("aioaccel-cam0-")}
        assert [s.name for s in runner.stats().stages] == ["decode", "record"]
    assert names == {"aioaccel-cam0-decode-0", "aioaccel-cam0-decode-1",
                     "aioaccel-cam0-record-0", "aioaccel-cam0-record-1"}
    assert seen[0].startswith("aioaccel-cam0-record-")


# ---- backpressure -------------------------------------------------------------------------
async def test_admitted_items_never_exceed_maxsize_and_push_nowait_raises() -> None:
    async with aioaccel.open(SimulatedStage(latency=0.001), maxsize=5) as runner:
        for i in range(5):
            assert runner.push_nowait(i) == i
        with pytest.raises(aioaccel.WouldBlock, match="maxsize=5"):
            runner.push_nowait(99)
        blocked = asyncio.create_task(runner.push(5))
        result = await anext(runner)  # frees one slot, handed to the waiting push
        assert result.seq == 0
        assert await blocked == 5
        assert runner.stats().in_flight == 5
        producer = asyncio.create_task(push_all(runner, list(range(6, 100)), close=True))
        count = 1
        async for _ in runner:
            count += 1
            assert runner.stats().in_flight <= 5
        await producer
        stats = runner.stats()
    assert count == 100
    assert stats.peak_admitted == 5
    assert stats.in_flight == 0 and stats.pushed == 100 and stats.completed == 100


async def test_memory_stays_flat_when_a_fast_producer_floods_a_slow_consumer() -> None:
    import tracemalloc

    import numpy as np

    item_bytes = 1 << 20
    maxsize = 4
    tracemalloc.start()
    try:
        async with aioaccel.open(lambda a: a * 2, maxsize=maxsize) as runner:

            async def produce() -> None:
                for _ in range(60):
                    await runner.push(np.ones(item_bytes // 8, dtype=np.float64))
                runner.close()

            baseline = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            producer = asyncio.create_task(produce())
            n = 0
            async for result in runner:
                assert result.outputs[0] == 2.0
                n += 1
                await asyncio.sleep(0.002)  # a slow consumer (simulated work, not synchronisation)
            await producer
            peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert n == 60
    # inputs and outputs of at most maxsize items, plus the one the producer is building
    assert peak < (2 * maxsize + 3) * item_bytes, f"peak grew by {peak / item_bytes:.1f} MB"


# ---- errors -------------------------------------------------------------------------------
async def test_per_item_failure_surfaces_at_its_position_and_later_items_flow() -> None:
    stage = SimulatedStage(fail_if=lambda x: x == 7, latency=0.0005)
    async with aioaccel.open(stage, replicas=3) as runner:
        producer = asyncio.create_task(push_all(runner, list(range(20))))
        results = await consume_all(runner)
        await producer
        stats = runner.stats()
    assert [r.seq for r in results] == list(range(20))
    assert [r.ok for r in results] == [i != 7 for i in range(20)]
    err = results[7].error
    assert isinstance(err, aioaccel.InferenceError) and err.seq == 7 and err.tag == "tag-7"
    assert isinstance(err.__cause__, SimulatedFailure)
    with pytest.raises(aioaccel.InferenceError) as info:
        results[7].outputs  # noqa: B018
    assert info.value is err
    assert stats.failed == 1 and stats.completed == 19


async def test_infer_failure_is_raised_to_that_caller_only() -> None:
    stage = SimulatedStage(fail_if=lambda x: x % 3 == 0)
    async with aioaccel.open(stage, replicas=2) as runner:
        outcomes = await asyncio.gather(*(runner.infer(i) for i in range(30)),
                                        return_exceptions=True)
    for i, out in enumerate(outcomes):
        if i % 3 == 0:
            assert isinstance(out, aioaccel.InferenceError)
            assert isinstance(out.__cause__, SimulatedFailure)
        else:
            assert out == i


@pytest.mark.parametrize("kind", ["stage", "device"])
async def test_fatal_failure_reaches_every_waiter(kind: str) -> None:
    if kind == "stage":
        target: object = SimulatedStage(fatal_at=10, latency=0.002)
    else:
        target = SimulatedDevice(fatal_at=10, latency=0.002, capacity=2)
    async with aioaccel.open(target, maxsize=6) as runner:
        infers = [asyncio.create_task(runner.infer(i)) for i in range(20)]
        pushes = [asyncio.create_task(runner.push(i)) for i in range(20)]
        outcomes = await asyncio.gather(*infers, *pushes, return_exceptions=True)
        with pytest.raises(aioaccel.DeviceError):
            async for _ in runner:
                pass
        with pytest.raises(aioaccel.DeviceError):
            await runner.push(1)
        with pytest.raises(aioaccel.DeviceError):
            runner.push_nowait(1)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors and all(isinstance(e, aioaccel.DeviceError) for e in errors)
    assert runner.stats().in_flight == 0


async def test_hung_call_ends_in_device_timeout_and_aclose_returns_promptly() -> None:
    stage = SimulatedStage(hang_at=3)
    try:
        runner = await aioaccel.open(stage, call_timeout=0.2, replicas=1)
        outcomes = await asyncio.gather(*(runner.infer(i) for i in range(6)),
                                        return_exceptions=True)
        assert outcomes[:3] == [0, 1, 2]
        assert all(isinstance(o, aioaccel.DeviceTimeout) for o in outcomes[3:])
        assert "call_timeout=0.2" in str(outcomes[3])
        started = time.perf_counter()
        await runner.aclose()
        # promptly: not close_timeout's 10 s for the hung call (slack for a loaded machine)
        assert time.perf_counter() - started < 5.0
        assert stage.hanging.is_set()
    finally:
        stage.release()  # lets the abandoned thread end, for the no-thread-left check


async def test_hung_device_ends_in_device_timeout() -> None:
    device = SimulatedDevice(hang_at=2, latency=0.001, capacity=2)
    try:
        async with aioaccel.open(device, call_timeout=0.2) as runner:
            with pytest.raises(aioaccel.DeviceTimeout):
                await asyncio.gather(*(runner.infer(i) for i in range(5)))
    finally:
        device.release()


# ---- lifecycle ----------------------------------------------------------------------------
async def test_close_ends_iteration_after_the_last_result() -> None:
    async with aioaccel.open(SimulatedStage(latency=0.001)) as runner:
        for i in range(5):
            await runner.push(i)
        runner.close()
        with pytest.raises(aioaccel.RunnerClosed):
            await runner.push(5)
        with pytest.raises(aioaccel.RunnerClosed):
            await runner.infer(5)
        assert [r.outputs async for r in runner] == [0, 1, 2, 3, 4]
        assert [r async for r in runner] == []  # stays ended


async def test_close_fails_pushes_waiting_for_space() -> None:
    async with aioaccel.open(SimulatedStage(latency=0.001), maxsize=1) as runner:
        await runner.push(0)
        waiting = [asyncio.create_task(runner.push(i)) for i in range(1, 4)]
        await asyncio.sleep(0)  # let them start waiting
        assert runner.stats().waiting == 3
        runner.close()
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(o, aioaccel.RunnerClosed) for o in outcomes)
        assert [r.outputs async for r in runner] == [0]


async def test_breaking_out_of_iteration_then_aclose_leaves_no_thread() -> None:
    runner = await aioaccel.open([SimulatedStage(latency=0.001), lambda x: x], replicas=2)
    producer = asyncio.create_task(push_all(runner, list(range(1000)), close=True))
    async for result in runner:
        if result.seq == 10:
            break
    await runner.aclose(timeout=0.05)
    with pytest.raises(aioaccel.RunnerClosed):
        await producer
    await runner.aclose()  # idempotent
    assert not [t for t in threading.enumerate() if t.name.startswith(f"aioaccel-{runner.name}-")]


async def test_aclose_fails_pending_items_with_runner_closed() -> None:
    stage = SimulatedStage(latency=0.05)
    runner = await aioaccel.open(stage, maxsize=8)
    infers = [asyncio.create_task(runner.infer(i)) for i in range(4)]
    for i in range(4):
        await runner.push(i)
    consumer = asyncio.create_task(consume_all(runner))
    await asyncio.sleep(0)
    await asyncio.gather(runner.aclose(timeout=0.0), runner.aclose())  # concurrent closes
    outcomes = await asyncio.gather(*infers, return_exceptions=True)
    assert all(isinstance(o, (aioaccel.RunnerClosed, int)) for o in outcomes)
    assert any(isinstance(o, aioaccel.RunnerClosed) for o in outcomes)
    with pytest.raises(aioaccel.RunnerClosed):
        await consumer
    stats = runner.stats()
    assert stats.in_flight == 0
    assert stats.pushed == stats.completed + stats.failed + stats.withdrawn


async def test_aclose_drains_in_flight_items_first() -> None:
    async with aioaccel.open(SimulatedStage(latency=0.005), replicas=2) as runner:
        infers = [asyncio.create_task(runner.infer(i)) for i in range(8)]
        await asyncio.sleep(0)
    assert await asyncio.gather(*infers) == list(range(8))


async def test_failure_while_opening_is_raised_and_leaves_no_thread() -> None:
    def broken_factory() -> object:
        raise OSError("no such device")

    spec = aioaccel.StageSpec("dev", broken_factory)
    with pytest.raises(OSError, match="no such device"):
        async with aioaccel.open([lambda x: x, spec], replicas=2):
            pass


async def test_runner_must_be_opened_before_use() -> None:
    runner = aioaccel.open(lambda x: x)
    with pytest.raises(RuntimeError, match="not open"):
        await runner.push(1)
    async with runner:
        with pytest.raises(RuntimeError, match="already opened"):
            await runner.__aenter__()


async def test_a_runner_never_closed_warns_and_stops_its_threads() -> None:
    runner = await aioaccel.open(lambda x: x, name="forgotten")
    assert await runner.infer(3) == 3
    threads = [t for t in threading.enumerate() if t.name.startswith("aioaccel-forgotten-")]
    with pytest.warns(ResourceWarning, match="never closed"):
        del runner
        gc.collect()
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)


# ---- infer --------------------------------------------------------------------------------
async def test_a_thousand_concurrent_infer_callers_get_their_own_results() -> None:
    async with aioaccel.open(SimulatedStage(lambda x: x * x, latency=0.0002), replicas=2,
                             maxsize=16) as runner:
        results = await asyncio.gather(*(runner.infer(i) for i in range(1000)))
        stats = runner.stats()
    assert results == [i * i for i in range(1000)]
    assert stats.peak_admitted <= 16 and stats.completed == 1000


async def test_infer_items_never_show_up_in_the_stream() -> None:
    async with aioaccel.open(lambda x: x) as runner:
        await runner.push("streamed")
        assert await runner.infer("direct") == "direct"
        runner.close()
        assert [r.outputs async for r in runner] == ["streamed"]


async def test_infer_timeout_withdraws_or_discards_the_item() -> None:
    stage = SimulatedStage(latency=0.2)
    async with aioaccel.open(stage, maxsize=4) as runner:
        with pytest.raises(aioaccel.InferTimeout) as info:
            await asyncio.gather(*(runner.infer(i, timeout=0.05) for i in range(4)))
        assert isinstance(info.value, TimeoutError)
    stats = runner.stats()
    assert stats.in_flight == 0
    assert stats.withdrawn + stats.discarded >= 3 and stats.withdrawn >= 1


async def test_stats_report_busy_fraction_and_latency() -> None:
    async with aioaccel.open([SimulatedStage(latency=0.004, name="slow"),
                              SimulatedStage(name="fast")]) as runner:
        producer = asyncio.create_task(push_all(runner, list(range(30))))
        await consume_all(runner)
        await producer
        stats = runner.stats()
    slow, fast = stats.stages
    assert slow.busy > 0.5 > fast.busy
    assert slow.calls == fast.calls == 30
    assert 0.004 <= stats.latency_p50 <= stats.latency_p99
    assert stats.throughput > 0


async def test_cancelling_open_while_the_model_loads_does_not_block_the_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from aioaccel.backends import function

    loaded = threading.Event()
    release = threading.Event()
    real_load = function.load

    def slow_load(target: object, **options: object) -> aioaccel.Model:
        loaded.set()
        release.wait(10)  # a model that takes long to compile
        return real_load(target, **options)

    monkeypatch.setattr(function, "load", slow_load)
    runner = aioaccel.open(lambda x: x, name="slowload")
    opening = asyncio.create_task(runner.__aenter__())
    assert await asyncio.to_thread(loaded.wait, 5)
    opening.cancel()
    started = time.perf_counter()
    with pytest.raises(asyncio.CancelledError):
        await opening
    # the load holds its thread 10 s
    assert time.perf_counter() - started < 3.0, "the loop waited for the load to finish"
    release.set()


async def test_infer_admit_timeout_bounds_only_the_wait_for_space() -> None:
    gate = threading.Event()

    def held(x: int) -> int:
        gate.wait()
        return x

    async with aioaccel.open(held, maxsize=1) as runner:
        first = asyncio.create_task(runner.infer(1, admit_timeout=0.05))
        await asyncio.sleep(0)
        with pytest.raises(aioaccel.WouldBlock, match="stayed full for 0.05 s"):
            await runner.infer(2, admit_timeout=0.05)
        stats = runner.stats()
        assert stats.waiting == 0 and stats.pushed == 1  # the refused call left no trace
        gate.set()
        assert await first == 1  # admitted at once: the budget did not cut its compute time
        assert await runner.infer(3, admit_timeout=0) == 3
