"""Streaming without batching: how many loop wake-ups a burst of results costs, and that
coalescing them never holds a result back (a lone item, the end of a window)."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

import aioaccel
from aioaccel.core import loop_bridge, stage_threads
from aioaccel.core.stage_threads import defer_depth
from aioaccel.pytest_plugin import backends

pytestmark = pytest.mark.anyio


@pytest.fixture(params=backends())
def anyio_backend(request: pytest.FixtureRequest) -> object:
    """asyncio, uvloop and trio: the hold timer runs on each library's own timers."""
    return request.param


class CountedDrains:
    """Wraps a runner's bridge: counts the drains workers schedule, and lets a stage wait
    until every scheduled drain has run (a loop that is always quick, deterministically)."""

    def __init__(self, runner: aioaccel.Runner):
        gen = runner._sup.gen
        assert gen is not None
        bridge = gen.bridge
        self.scheduled = 0
        self.done = 0
        self._cond = threading.Condition()
        wake, drain = bridge._wake, bridge._drain

        def counted_wake(callback: Any, *args: Any) -> Any:
            if callback == counted_drain:
                with self._cond:
                    self.scheduled += 1
            return wake(callback, *args)

        def counted_drain() -> None:
            drain()
            with self._cond:
                self.done += 1
                self._cond.notify_all()

        bridge._wake = counted_wake  # type: ignore[method-assign]
        bridge._drain = counted_drain  # type: ignore[method-assign]

    def wait_drained(self, timeout: float = 5.0) -> None:
        """On a worker thread: until the loop ran every drain scheduled so far."""
        with self._cond:
            self._cond.wait_for(lambda: self.done >= self.scheduled, timeout)


@pytest.mark.parametrize("maxsize", [8, 32])
async def test_a_full_window_of_short_items_shares_a_few_wake_ups(
        maxsize: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """maxsize items queued behind a gate, each completing only after the loop drained what
    was already scheduled (as a quick loop does): the worker defers the wake-up while more
    than a quarter of the window is queued, so the window costs defer_depth + 1 wake-ups
    (3 at maxsize=8; with half the window as the cushion it cost 5: a wake-up every 1.6
    items, where each costs the worker a GIL hand-off)."""
    # every call counts as short and no deferral times out, whatever the machine's load
    monkeypatch.setattr(stage_threads, "SHORT_CALL", 1e9)
    monkeypatch.setattr(loop_bridge, "COALESCE_WINDOW", 1e9)
    gate = threading.Event()
    counted: list[CountedDrains] = []

    def stage(x: int) -> int:
        if x == 0:
            gate.wait(5.0)
        else:
            counted[0].wait_drained()
        return x * 2

    async with aioaccel.open(stage, maxsize=maxsize) as runner:
        counted.append(CountedDrains(runner))
        for i in range(maxsize):
            runner.push_nowait(i)  # the whole window is admitted and queued at once
        gate.set()
        with anyio.fail_after(10):
            got = [(await anext(runner)).outputs for _ in range(maxsize)]
        assert got == [2 * i for i in range(maxsize)]
        wakes = counted[0].scheduled
    assert wakes == defer_depth(maxsize) + 1, wakes
    assert wakes <= maxsize // 2


@pytest.mark.parametrize("maxsize", [1, 2, 8, 32])
async def test_a_lone_item_is_delivered_without_further_pushes(maxsize: int) -> None:
    """Coalescing never waits for a burst to fill: one pushed item, alone, is delivered; so is
    the tail of a full window (no later push comes to carry it)."""
    async with aioaccel.open(lambda x: x + 1, maxsize=maxsize) as runner:
        with anyio.fail_after(10):
            for round_ in range(5):
                await runner.push(round_)
                result = await anext(runner)
                assert (result.outputs, result.seq) == (round_ + 1, round_)
            for i in range(maxsize):
                await runner.push(i)
            assert [(await anext(runner)).outputs for _ in range(maxsize)] == [
                i + 1 for i in range(maxsize)]
            await runner.push(-1)  # and a lone one again after the burst
            assert (await anext(runner)).outputs == 0


async def test_a_deferred_result_is_flushed_when_the_worker_runs_dry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Deferral without a time bound: results held back while input was queued reach the loop
    once the queue runs dry (the worker flushes before it waits), with no further push."""
    monkeypatch.setattr(stage_threads, "SHORT_CALL", 1e9)
    monkeypatch.setattr(loop_bridge, "COALESCE_WINDOW", 1e9)
    gate = threading.Event()

    def stage(x: int) -> int:
        if x == 0:
            gate.wait(5.0)
        return x

    async with aioaccel.open(stage, maxsize=16) as runner:
        for i in range(16):
            runner.push_nowait(i)
        gate.set()
        with anyio.fail_after(10):
            assert [(await anext(runner)).outputs for _ in range(16)] == list(range(16))


async def test_deferred_results_do_not_wait_for_a_slow_next_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker defers after short calls expecting the next to be short too; when the next
    call is slow (here: it blocks until the test ends it), the loop's hold timer delivers the
    deferred results meanwhile instead of leaving them behind it."""
    monkeypatch.setattr(stage_threads, "SHORT_CALL", 1e9)
    monkeypatch.setattr(loop_bridge, "COALESCE_WINDOW", 1e9)
    gate, slow = threading.Event(), threading.Event()

    def stage(x: int) -> int:
        if x == 0:
            gate.wait(5.0)
        elif x == 5:
            slow.wait(10.0)  # held until the first five results arrived
        return x

    async with aioaccel.open(stage, maxsize=16) as runner:
        for i in range(16):
            runner.push_nowait(i)  # 0-4 complete with more than a quarter queued: deferred
        gate.set()
        try:
            with anyio.fail_after(5):
                assert [(await anext(runner)).outputs for _ in range(5)] == list(range(5))
        finally:
            slow.set()
        with anyio.fail_after(10):
            assert [(await anext(runner)).outputs for _ in range(11)] == list(range(5, 16))
        gen = runner._sup.gen
        assert gen is not None
        # idle now: the timer stops by itself (it does not tick for the runner's lifetime);
        # it is a timer, so its state is polled, a few of its periods at most
        with anyio.fail_after(5):
            while gen.bridge._armed:
                await anyio.sleep(loop_bridge.HOLD_LIMIT)


async def test_results_deferred_before_a_device_fault_are_delivered_not_failed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Items that finished (their wake-up deferred) before a later call broke the device are
    results, not casualties of the fault: the fault reaches the loop after them."""
    monkeypatch.setattr(stage_threads, "SHORT_CALL", 1e9)
    monkeypatch.setattr(loop_bridge, "COALESCE_WINDOW", 1e9)
    monkeypatch.setattr(loop_bridge, "HOLD_LIMIT", 60.0)  # only the fault may deliver them
    gate = threading.Event()

    def stage(x: int) -> int:
        if x == 0:
            gate.wait(5.0)
        elif x == 5:
            raise aioaccel.DeviceError("device lost at item 5")
        return x

    runner = aioaccel.Runner(lambda: aioaccel.backends.Model(stages=[
        aioaccel.stages.StageSpec("device", aioaccel.stages.made(stage), device=True)]),
        maxsize=16)
    async with runner:
        for i in range(16):
            runner.push_nowait(i)  # 0-4 complete with more than a quarter queued: deferred
        gate.set()
        results: list[aioaccel.Result] = []
        with anyio.fail_after(10):
            try:
                async for result in runner:
                    results.append(result)
            except aioaccel.DeviceError:
                pass
    finished = [r.outputs for r in results if r.ok]
    assert finished[:5] == list(range(5)), [(r.tag, r.error) for r in results]
