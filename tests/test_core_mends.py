"""Regression tests for the core mends (issue 10): each failed on the code before the split."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aioaccel
from aioaccel.backends import Model
from aioaccel.stages import BlockingStage, DeviceStage, StageSpec
from aioaccel.testing import SimulatedDevice

pytestmark = pytest.mark.anyio


async def wait_event(event: threading.Event, limit: float = 5.0) -> bool:
    """Await a threading.Event without blocking the loop."""
    return await asyncio.to_thread(event.wait, limit)


class Gate:
    """A stage function that blocks on the first ``gated`` inputs until opened."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, x: Any) -> Any:
        if isinstance(x, str) and x == "gate":
            self.entered.set()
            self.opened.wait(10)
        return x


# ---- 1. withdrawn items leave the hand-off -------------------------------------------------
async def test_withdrawn_infers_never_pile_up_in_the_stage0_hand_off() -> None:
    gate = Gate()
    async with aioaccel.open(gate, maxsize=4) as runner:
        stuck = asyncio.create_task(runner.infer("gate"))
        assert await wait_event(gate.entered)
        depths = []
        for _ in range(6):
            outcomes = await asyncio.gather(
                *(runner.infer(i, timeout=0.01) for i in range(500)), return_exceptions=True)
            assert all(isinstance(o, aioaccel.InferTimeout) for o in outcomes)
            stats = runner.stats()
            depths.append(stats.stages[0].queue_depth)
            assert stats.in_flight <= 4
        assert max(depths) <= 4, f"stage-0 hand-off grew to {max(depths)} items"
        gate.opened.set()
        assert await stuck == "gate"
        assert await runner.infer(7, timeout=5) == 7
        stats = runner.stats()
    assert stats.in_flight == 0 and stats.waiting == 0
    assert stats.stages[0].queue_depth == 0
    assert stats.pushed == stats.completed + stats.failed + stats.withdrawn


# ---- 2. no result stranded by a deferred wake-up -------------------------------------------
async def test_a_deferred_result_is_delivered_when_the_worker_goes_idle() -> None:
    """The worker finishes a short call with withdrawn shells queued behind it (so it defers
    the wake-up), skips the shells, and waits: the result must still arrive at once."""
    gate = Gate()
    async with aioaccel.open(gate, maxsize=8) as runner:
        for _ in range(20):
            gate.entered.clear()
            gate.opened.clear()
            blocker = asyncio.create_task(runner.infer("gate"))
            assert await wait_event(gate.entered)
            await runner.push("short", tag="short")
            cancelled = [asyncio.create_task(runner.infer(i)) for i in range(5)]
            await asyncio.sleep(0)  # let them be admitted and enqueued
            for task in cancelled:
                task.cancel()
            await asyncio.gather(*cancelled, return_exceptions=True)
            gate.opened.set()
            assert await blocker == "gate"
            result = await asyncio.wait_for(anext(runner), 1.0)
            assert result.tag == "short" and result.outputs == "short"
        stats = runner.stats()
    assert stats.withdrawn >= 20


async def test_stress_deferral_with_cancellations_never_strands_a_result() -> None:
    def short(x: int) -> int:  # well under bridge.SHORT_CALL, so workers may defer
        return x + 1

    async with aioaccel.open(short, maxsize=8) as runner:
        for round_ in range(200):
            tasks = [asyncio.create_task(runner.infer(i)) for i in range(8)]
            await asyncio.sleep(0)
            for task in tasks[1::2]:
                task.cancel()
            kept = tasks[0::2]
            done = await asyncio.wait_for(asyncio.gather(*kept), 1.0)
            assert done == [i + 1 for i in range(0, 8, 2)], round_
            await asyncio.gather(*tasks, return_exceptions=True)
        stats = runner.stats()
    assert stats.in_flight == 0
    assert stats.pushed == stats.completed + stats.failed + stats.withdrawn


# ---- 3. any exception from a factory or load fails open() promptly -----------------------
def _raise_stop_iteration() -> Any:
    raise StopIteration


@pytest.mark.parametrize("where", ["factory", "load"])
@pytest.mark.parametrize("error", [StopIteration, KeyboardInterrupt, RuntimeError])
async def test_open_fails_promptly_whatever_a_factory_or_load_raises(
        where: str, error: type[BaseException]) -> None:
    def boom() -> Any:
        raise error("boom")

    runner = aioaccel.open(StageSpec("bad", boom)) if where == "factory" else aioaccel.Runner(boom)
    with pytest.raises(aioaccel.AccelError) as info:
        async with asyncio.timeout(5):
            await runner.__aenter__()
    assert isinstance(info.value.__cause__, error)
    assert runner.state == "closed"


async def test_open_errors_keep_their_builtin_type() -> None:
    def missing() -> Any:
        raise FileNotFoundError("model.tflite")

    with pytest.raises(FileNotFoundError, match="model.tflite") as info:
        await aioaccel.Runner(missing).__aenter__()
    assert isinstance(info.value, aioaccel.OpenError)


# ---- 4. device handles released on cancellation --------------------------------------------
class CountedModel:
    def __init__(self, load_gate: threading.Event | None = None):
        self.load_gate = load_gate
        self.loading = threading.Event()
        self.closed = threading.Event()
        self.closes = 0

    def load(self) -> Model:
        self.loading.set()
        if self.load_gate is not None:
            self.load_gate.wait(10)
        return Model(stages=[StageSpec("slow", lambda: _slow)], close=self._close)

    def _close(self) -> None:
        self.closes += 1
        self.closed.set()


def _slow(x: Any) -> Any:
    time.sleep(0.3)
    return x


async def test_cancelling_open_while_the_model_loads_still_releases_it() -> None:
    gate = threading.Event()
    backend = CountedModel(gate)
    runner = aioaccel.Runner(backend.load)
    task = asyncio.create_task(runner.__aenter__())
    assert await wait_event(backend.loading)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    assert await wait_event(backend.closed), "the loaded model was never closed"
    assert backend.closes == 1


async def test_a_cancelled_aclose_still_joins_and_releases_the_model() -> None:
    backend = CountedModel()
    runner = aioaccel.Runner(backend.load, close_timeout=10)
    await runner.__aenter__()
    await runner.push(1)
    closing = asyncio.create_task(runner.aclose())
    await asyncio.sleep(0.05)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert await wait_event(backend.closed), "a cancelled aclose() did not release the model"
    assert backend.closes == 1
    await runner.aclose()  # idempotent: nothing is closed twice
    assert backend.closes == 1 and runner.state == "closed"


# ---- 5. call_timeout does not fire on a healthy device under backpressure ----------------
async def test_call_timeout_ignores_time_queued_behind_other_items_on_a_device() -> None:
    device = SimulatedDevice(latency=0.02, jitter=0.0, capacity=1)
    async with aioaccel.open(device, maxsize=48, call_timeout=0.4) as runner:
        results = await asyncio.gather(*(runner.infer(i) for i in range(60)))
    assert results == list(range(60))


async def test_call_timeout_still_catches_a_hung_device_under_backpressure() -> None:
    device = SimulatedDevice(latency=0.005, jitter=0.0, capacity=2, hang_at=10)
    async with aioaccel.open(device, maxsize=16, call_timeout=0.2) as runner:
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(runner.infer(i) for i in range(30)),
                                        return_exceptions=True)
        elapsed = time.perf_counter() - started
        device.release()
    assert any(isinstance(o, aioaccel.DeviceTimeout) for o in outcomes)
    assert elapsed < 2.0


async def test_call_timeout_under_backpressure_memryx(tmp_path: Path) -> None:
    from aioaccel.testing.memryx import simulate_memryx, write_dfp
    from aioaccel.testing.models import dense_chain

    chain = dense_chain(16, 3, inputs=8)
    dfp = write_dfp(tmp_path / "model.dfp", chain)
    with simulate_memryx(latency=0.02):  # 48 queued x 20 ms: far past call_timeout if counted
        async with aioaccel.open(dfp, maxsize=48, call_timeout=0.4) as runner:
            outs = await asyncio.gather(*(runner.infer(chain.random_input(seed=i))
                                          for i in range(60)))
    assert len(outs) == 60


async def test_call_timeout_under_backpressure_coral(tmp_path: Path) -> None:
    from aioaccel.testing.coral import simulate_coral
    from aioaccel.testing.models import dense_chain

    chain = dense_chain(16, 4, inputs=8)
    with simulate_coral(tpus=2, latency=0.02):
        paths = chain.write_tflite_segments(tmp_path, 2)
        async with aioaccel.open(paths, backend="coral", maxsize=48,
                                 call_timeout=0.4) as runner:
            outs = await asyncio.gather(*(runner.infer(chain.random_input(seed=i))
                                          for i in range(60)))
    assert len(outs) == 60


async def test_call_timeout_under_backpressure_openvino_async() -> None:
    pytest.importorskip("openvino")
    from aioaccel.testing.models import dense_chain

    # A few ms per call, and call_timeout over 100 calls' worth: a loaded machine that slows
    # each call 10-20x (one OpenVINO thread on a shared core) stays far from it, while the
    # queue in front of the last items (maxsize calls) is twice call_timeout, so a clock
    # started at submit would trip on half of them.
    chain = dense_chain(1024, 4, batch=8)
    x = chain.random_input()
    async with aioaccel.open(chain.openvino_model(), api="async", jobs=1, maxsize=4,
                             config={"INFERENCE_NUM_THREADS": 1}) as probe:
        await probe.infer(x)
        started = time.perf_counter()
        for _ in range(10):
            await probe.infer(x)
        per_item = (time.perf_counter() - started) / 10
    timeout = max(1.0, 100 * per_item)
    maxsize = min(1024, int(2 * timeout / per_item) + 1)  # the queue alone would trip a
    async with aioaccel.open(chain.openvino_model(), api="async", jobs=1,  # submit-time clock
                             maxsize=maxsize, config={"INFERENCE_NUM_THREADS": 1},
                             call_timeout=timeout) as runner:
        outs = await asyncio.gather(*(runner.infer(x) for _ in range(2 * maxsize)))
    assert len(outs) == 2 * maxsize


# ---- 6. one stage object shared by replicas ------------------------------------------------
class SharedStage(BlockingStage):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.closes = 0
        self.closed_while_running = False

    def run(self, inputs: Any) -> Any:
        with self.lock:
            self.active += 1
        time.sleep(0.002)
        with self.lock:
            self.active -= 1
        return inputs

    def close(self) -> None:
        with self.lock:
            self.closes += 1
            self.closed_while_running |= self.active > 0


async def test_a_stage_object_shared_by_replicas_is_closed_once_after_all_stopped() -> None:
    stage = SharedStage()
    async with aioaccel.open(stage, replicas=3, maxsize=12) as runner:
        assert await asyncio.gather(*(runner.infer(i) for i in range(60))) == list(range(60))
    assert stage.closes == 1
    assert not stage.closed_while_running


# ---- also fixed ----------------------------------------------------------------------------
class PickyDeviceError(aioaccel.DeviceError):
    def __init__(self, code: int, where: str):
        super().__init__(f"device {where} failed with code {code}")
        self.code = code


async def test_a_device_error_subclass_with_its_own_init_reaches_every_waiter() -> None:
    def stage(x: int) -> int:
        if x == 3:
            raise PickyDeviceError(7, "usb0")
        time.sleep(0.01)
        return x

    async with aioaccel.open(stage, replicas=2, maxsize=14) as runner:
        outcomes = await asyncio.wait_for(asyncio.gather(
            *(runner.infer(i) for i in range(14)), return_exceptions=True), 5)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors and all(isinstance(e, PickyDeviceError) for e in errors)
    assert all(e.code == 7 for e in errors)  # type: ignore[attr-defined]
    assert all(isinstance(o, (int, aioaccel.DeviceError)) for o in outcomes)


async def test_push_and_push_nowait_agree_on_a_closed_runner_with_bad_input() -> None:
    def prepare(x: Any) -> Any:
        if not isinstance(x, int):
            raise aioaccel.InputError(f"expected an int, got {type(x).__name__}")
        return x

    runner = aioaccel.Runner(lambda: Model(stages=[StageSpec("id", lambda: lambda x: x)],
                                           prepare=prepare))
    async with runner:
        runner.close()
        with pytest.raises(aioaccel.RunnerClosed):
            await runner.push("bad")
        with pytest.raises(aioaccel.RunnerClosed):
            runner.push_nowait("bad")
        with pytest.raises(aioaccel.RunnerClosed):
            await runner.infer("bad")


async def test_runner_info_is_public() -> None:
    async with aioaccel.open(lambda x: x) as runner:
        assert isinstance(runner.info, dict)
        assert "load_seconds" in runner.info


def test_settling_a_burst_survives_one_bad_ticket() -> None:
    """Items popped by the bridge are never lost, even if settling one of them raises."""
    from aioaccel.admission import Admission
    from aioaccel.completion import Completions, Ticket
    from aioaccel.lanes import Lane
    from aioaccel.pipeline import Job

    loop = asyncio.new_event_loop()
    try:
        admission = Admission(4)
        lane = Lane(None, 0, 4)
        done = Completions(admission, lane)

        class Exploding:
            def done(self) -> bool:
                raise RuntimeError("boom")

        tickets = []
        for seq in range(3):
            admission.take(lane)
            job = Job(seq, seq)
            fut: Any = Exploding() if seq == 1 else loop.create_future()
            ticket = Ticket(seq, None, lane, fut, job, 0.0)
            done.unfinished[seq] = ticket
            tickets.append(ticket)
        done.on_jobs([t.job for t in tickets])
        assert tickets[0].future.result() == 0
        assert tickets[2].future.result() == 2
        assert not done.unfinished
    finally:
        loop.close()


class TwiceDevice(DeviceStage):
    """Completes every token twice, as a buggy runtime might."""

    def start(self, complete: Any) -> None:
        self.complete = complete

    def submit(self, token: object, inputs: Any) -> None:
        self.complete(token, inputs * 2, None)
        self.complete(token, inputs * 3, None)


async def test_a_token_completed_twice_is_ignored_and_counted() -> None:
    async with aioaccel.open(TwiceDevice(), maxsize=4) as runner:
        outs = [await runner.infer(i) for i in range(10)]
    stats = runner.stats()  # after the feeder's last (second) completion
    assert outs == [2 * i for i in range(10)]
    assert stats.duplicates == 10
    assert stats.stages[0].in_device == 0 and stats.stages[0].calls == 10


async def test_arrays_survive_the_ticket_job_split() -> None:
    async with aioaccel.open(lambda a: a * 2, maxsize=4) as runner:
        x = np.arange(6, dtype=np.float32)
        assert np.array_equal(await runner.infer(x), x * 2)
