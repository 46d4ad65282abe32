"""Self-healing runners (issue 13): restart in place, retry what the device held, health,
warm-up, live reload."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from typing import Any

import numpy as np
import pytest

import aioaccel
from aioaccel.backends import Model
from aioaccel.stages import StageSpec
from aioaccel.testing import SimulatedDevice, SimulatedStage

pytestmark = pytest.mark.anyio

FAST = aioaccel.Restart(limit=3, window=60.0, backoff=0.02, max_backoff=0.5)


async def stream_all(runner: aioaccel.Runner, n: int) -> list[aioaccel.Result]:
    async def produce() -> None:
        for i in range(n):
            await runner.push(i, tag=f"t{i}")
        runner.close()

    producer = asyncio.create_task(produce())
    results = [r async for r in runner]
    await producer
    return results


@pytest.mark.parametrize("device", [False, True], ids=["blocking", "device"])
async def test_fatal_error_at_item_50_of_200_is_recovered_without_losing_an_item(
        device: bool) -> None:
    stage: Any = (SimulatedDevice(lambda x: x * 3, latency=0.001, capacity=3, fatal_at=50)
                  if device else SimulatedStage(lambda x: x * 3, latency=0.0005, fatal_at=50))
    async with aioaccel.open(stage, maxsize=8, restart=FAST, retries=1) as runner:
        results = await stream_all(runner, 200)
        health = runner.health()
        stats = runner.stats()
    assert [r.seq for r in results] == list(range(200))
    assert [r.tag for r in results] == [f"t{i}" for i in range(200)]
    assert [r.outputs for r in results] == [3 * i for i in range(200)]
    assert health.restarts == 1 and isinstance(health.last_error, aioaccel.DeviceError)
    assert stats.restarts == 1 and stats.retried >= 1
    assert stats.completed == 200 and stats.failed == 0


async def test_concurrent_infers_across_a_restart_all_answered_once() -> None:
    stage = SimulatedStage(lambda x: -x, latency=0.001, fatal_at=30)
    async with aioaccel.open(stage, maxsize=16, restart=FAST, retries=1, replicas=2) as runner:
        outs = await asyncio.gather(*(runner.infer(i) for i in range(150)))
        stats = runner.stats()
    assert outs == [-i for i in range(150)]
    assert stats.restarts == 1 and stats.in_flight == 0


async def test_without_retries_the_items_on_the_device_fail_and_later_ones_flow() -> None:
    stage = SimulatedStage(lambda x: x, latency=0.001, fatal_at=20)
    async with aioaccel.open(stage, maxsize=4, restart=FAST, retries=0) as runner:
        results = await stream_all(runner, 60)
    assert [r.seq for r in results] == list(range(60))
    failed = [r for r in results if not r.ok]
    assert 1 <= len(failed) <= 4
    assert all(isinstance(r.error.__cause__, aioaccel.DeviceError) for r in failed)  # type: ignore[union-attr]
    assert all(r.outputs == r.seq for r in results if r.ok)
    assert results[-1].ok


async def test_a_hang_is_recovered_within_call_timeout_plus_backoff_and_reopen() -> None:
    stage = SimulatedStage(lambda x: x, latency=0.001, hang_at=50)
    try:
        async with aioaccel.open(stage, maxsize=8, call_timeout=0.2, restart=FAST,
                                 retries=1) as runner:
            started = time.perf_counter()
            results = await stream_all(runner, 120)
            elapsed = time.perf_counter() - started
            stats = runner.stats()
    finally:
        stage.release()  # the abandoned thread may end now
    assert [r.outputs for r in results] == list(range(120))
    assert stats.restarts == 1
    # call_timeout, backoff and a reopen, with slack for a loaded machine: far from the 10 s
    # (close_timeout) a recovery waiting for the hung call would take
    assert elapsed < 0.2 + 0.02 + 5.0, f"took {elapsed:.2f} s"
    assert stats.recovery_sum < 3.0


async def test_an_exhausted_restart_budget_breaks_the_runner_and_fails_every_waiter() -> None:
    stage = SimulatedStage(lambda x: x, latency=0.001, fatal_at=[5, 10, 15, 20, 25])
    policy = aioaccel.Restart(limit=2, window=60.0, backoff=0.01)
    async with aioaccel.open(stage, maxsize=8, restart=policy, retries=0) as runner:
        outcomes = await asyncio.wait_for(asyncio.gather(
            *(runner.infer(i) for i in range(60)), return_exceptions=True), 10)
        health = runner.health()
    assert health.state == "broken" and health.restarts == 2
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors and all(isinstance(e, aioaccel.DeviceError) for e in errors)


async def test_a_reopen_that_fails_twice_then_works_backs_off_more_each_time() -> None:
    attempts: list[float] = []
    lock = threading.Lock()

    def stage_fn(x: int) -> int:
        if x == 3 and len(attempts) == 1:
            raise aioaccel.DeviceError("device lost")
        return x

    def load() -> Model:
        with lock:
            attempts.append(time.perf_counter())
            n = len(attempts)
        if n in (2, 3):
            raise OSError(f"no device yet (attempt {n})")
        return Model(stages=[StageSpec("dev", lambda: stage_fn)])

    policy = aioaccel.Restart(limit=5, window=60.0, backoff=0.05, max_backoff=1.0)
    runner = aioaccel.Runner(load, maxsize=4, restart=policy, retries=1)
    async with runner:
        outs = [await runner.infer(i) for i in range(8)]
        health = runner.health()
    assert outs == list(range(8))
    assert len(attempts) == 4 and health.restarts == 1
    gaps = [b - a for a, b in itertools.pairwise(attempts[1:])]
    assert gaps[1] > gaps[0] * 1.5, gaps


async def test_cancellation_storm_across_a_restart_keeps_exact_accounting() -> None:
    rng = random.Random(5)
    stage = SimulatedStage(lambda x: x, latency=0.002, jitter=1.0, fatal_at=40, seed=2)
    async with aioaccel.open(stage, maxsize=8, restart=FAST, retries=1, replicas=2) as runner:
        tasks = [asyncio.create_task(runner.infer(i)) for i in range(200)]
        for _ in range(60):
            await asyncio.sleep(0.002)
            rng.choice(tasks).cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        stats = runner.stats()
    for i, outcome in enumerate(outcomes):
        assert outcome == i or isinstance(outcome, asyncio.CancelledError), outcome
    assert stats.in_flight == 0 and stats.waiting == 0
    assert stats.pushed == stats.completed + stats.failed + stats.withdrawn
    assert stats.restarts == 1


async def test_push_waits_while_recovering_and_admit_timeout_bounds_it() -> None:
    gate = threading.Event()
    loads = []

    def load() -> Model:
        loads.append(1)
        if len(loads) == 2:
            gate.wait(10)  # the reopen takes a while
        return Model(stages=[StageSpec("s", lambda: fn)])

    def fn(x: int) -> int:
        if x == 0 and len(loads) == 1:
            raise aioaccel.DeviceError("lost")
        return x

    runner = aioaccel.Runner(load, maxsize=4, restart=FAST)
    async with runner:
        with pytest.raises(aioaccel.DeviceError):
            await runner.infer(0)
        assert runner.health().state == "recovering"
        with pytest.raises(aioaccel.WouldBlock):
            await runner.infer(1, admit_timeout=0.05)
        waiting = asyncio.create_task(runner.infer(2))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        gate.set()
        assert await asyncio.wait_for(waiting, 5) == 2
        assert runner.health().state == "ready"


async def test_health_reports_each_state() -> None:
    stage = SimulatedStage(lambda x: x, fatal_at=0)
    runner = aioaccel.open(stage, maxsize=2)
    assert runner.health().state == "starting"
    async with runner:
        assert runner.health().state == "ready" and runner.health().ok
        with pytest.raises(aioaccel.DeviceError):
            await runner.infer(1)
        health = runner.health()
        assert health.state == "broken" and health.last_error is not None
    assert runner.health().state == "closed"
    assert set(runner.health().state_seconds) >= {"starting", "ready", "broken"}


async def test_warmup_runs_before_the_first_user_item() -> None:
    seen: list[Any] = []
    stage = SimulatedStage(lambda x: seen.append(x) or x, latency=0.001)
    async with aioaccel.open(stage, warmup=3, warmup_inputs=-1) as runner:
        assert seen == [-1, -1, -1]
        assert await runner.infer(5) == 5
        stats = runner.stats()
    assert seen == [-1, -1, -1, 5]
    assert stats.warmup_seconds > 0 and stats.pushed == 1


async def test_warmup_uses_synthetic_inputs_of_the_model_spec(tmp_path: Any) -> None:
    pytest.importorskip("onnxruntime")
    from aioaccel.testing.models import dense_chain

    chain = dense_chain(8, 2)
    async with aioaccel.open(chain.write_onnx(tmp_path / "m.onnx"), warmup=2) as runner:
        stats = runner.stats()
        x = chain.random_input()
        out = await runner.infer(x)
    assert stats.stages[0].calls == 2 and stats.warmup_seconds > 0
    assert np.allclose(out[chain.output_name], chain.reference(x), atol=1e-4)


async def test_reload_under_concurrent_callers_and_a_stream_loses_nothing() -> None:
    closed: list[str] = []

    class Versioned:
        def __init__(self, version: int):
            self.version = version

        def __call__(self, x: int) -> tuple[int, int]:
            time.sleep(0.0005)
            return self.version, x

        def close(self) -> None:
            closed.append(f"v{self.version}")

    async with aioaccel.open(Versioned(1), maxsize=16, replicas=2) as runner:
        stream = runner.stream("cam")
        stop = asyncio.Event()

        async def camera() -> list[aioaccel.Result]:
            got: list[aioaccel.Result] = []
            i = 0
            while not stop.is_set():
                await stream.push(i, tag=i)
                got.append(await anext(stream))
                i += 1
            return got

        cam = asyncio.create_task(camera())
        callers = [asyncio.create_task(runner.infer(i)) for i in range(100)]
        await asyncio.sleep(0.01)
        await runner.reload(Versioned(2))
        after = await runner.infer(1000)
        outs = await asyncio.gather(*callers)
        stop.set()
        frames = await cam
    assert after == (2, 1000)
    assert [x for _, x in outs] == list(range(100))
    assert {v for v, _ in outs} <= {1, 2}
    assert [r.tag for r in frames] == list(range(len(frames)))
    assert all(r.ok for r in frames)
    assert closed[0] == "v1" and closed.count("v1") == 1


async def test_reload_the_same_model_file_re_reads_it(tmp_path: Any) -> None:
    pytest.importorskip("onnxruntime")
    from aioaccel.testing.models import dense_chain

    first, second = dense_chain(8, 2, seed=1), dense_chain(8, 2, seed=2)
    path = first.write_onnx(tmp_path / "m.onnx")
    x = first.random_input()
    async with aioaccel.open(path) as runner:
        before = await runner.infer(x)
        second.write_onnx(path)
        await runner.reload()
        after = await runner.infer(x)
    assert np.allclose(before[first.output_name], first.reference(x), atol=1e-4)
    assert np.allclose(after[second.output_name], second.reference(x), atol=1e-4)


# ---- the vendor adapters under their simulators ---------------------------------------------
async def test_coral_pipeline_failure_recovers_in_place(tmp_path: Any) -> None:
    from aioaccel.testing.coral import simulate_coral
    from aioaccel.testing.models import dense_chain

    chain = dense_chain(16, 4, inputs=8)
    with simulate_coral(tpus=2, fail_at=[10]):
        paths = chain.write_tflite_segments(tmp_path, 2)
        async with aioaccel.open(paths, backend="coral", maxsize=4, restart=FAST,
                                 retries=1) as runner:
            xs = [chain.random_input(seed=i) for i in range(30)]
            outs = [await runner.infer(x) for x in xs]
            health = runner.health()
    assert health.restarts == 1 and health.state == "ready"
    for out, x in zip(outs, xs):
        assert np.allclose(out[chain.output_name], chain.reference(x), atol=1e-5)


async def test_memryx_device_failure_recovers_in_place(tmp_path: Any) -> None:
    from aioaccel.testing.memryx import simulate_memryx, write_dfp
    from aioaccel.testing.models import dense_chain

    chain = dense_chain(16, 3, inputs=8)
    dfp = write_dfp(tmp_path / "model.dfp", chain)
    with simulate_memryx(fail_at=[10]):
        # a failed chip goes silent: the watchdog sees it
        async with aioaccel.open(dfp, maxsize=4, restart=FAST, retries=1,
                                 call_timeout=0.3) as runner:
            xs = [chain.random_input(seed=i) for i in range(30)]
            outs = [await runner.infer(x) for x in xs]
            stats = runner.stats()
    assert stats.restarts == 1 and stats.completed == 30
    for out, x in zip(outs, xs):
        assert np.allclose(out[chain.output_name], chain.reference(x), atol=1e-5)


async def test_healthz_reports_starting_then_ready_and_never_a_runner_not_opened() -> None:
    pytest.importorskip("fastapi")
    from aioaccel.integrations.fastapi import Accel

    gate = threading.Event()

    def load() -> Model:
        gate.wait(5)
        return Model(stages=[StageSpec("s", lambda: lambda x: x)])

    runner = aioaccel.Runner(load, name="hz")
    accel = Accel(default=runner)
    status, body = accel._health()
    assert status == 503 and body["models"]["default"]["state"] == "starting"
    opening = asyncio.create_task(runner.__aenter__())
    await asyncio.sleep(0.01)
    assert accel._health()[1]["models"]["default"]["state"] == "starting"
    gate.set()
    await opening
    status, body = accel._health()
    assert status == 200 and body["models"]["default"]["state"] == "ready"
    await runner.aclose()
    assert accel._health() == (503, accel._health()[1])
    assert accel._health()[1]["models"]["default"]["state"] == "closed"
