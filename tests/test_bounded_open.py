"""Every open, reopen, warm-up and reload is bounded, and aclose() stops a recovery at once
(issue 26, items 4 and 5): a fault fails at once, a hang within ``open_timeout`` (or
``call_timeout`` for a warm-up call), with an error that says which step."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import aioaccel
from aioaccel.backends import Model
from aioaccel.stages import StageSpec
from aioaccel.testing import SimulatedStage

pytestmark = pytest.mark.anyio

#: the open_timeout of these tests: long enough that loading and making the stages finish on
#: a loaded CI machine, so that only the step made to hang runs into it
OPEN_BOUND = 2.0
#: how long a bounded open may take here at most (the bound, plus slack for a loaded machine)
LIMIT = OPEN_BOUND + 4.0

FAST = aioaccel.Restart(limit=2, window=60.0, backoff=0.01, max_backoff=0.05)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Whatever waits on it is released when the test ends (no thread left behind)."""
    event = threading.Event()
    yield event
    event.set()


async def test_a_fatal_failure_during_the_warm_up_fails_open_at_once() -> None:
    stage = SimulatedStage(lambda x: x, fatal_at=0)
    started = time.perf_counter()
    with pytest.raises(aioaccel.DeviceError, match="while it started"):
        async with aioaccel.open(stage, warmup=2, warmup_inputs=np.zeros(2)):
            pass
    assert time.perf_counter() - started < LIMIT


async def test_a_hung_warm_up_call_fails_open_within_call_timeout() -> None:
    stage = SimulatedStage(lambda x: x, hang_at=0)
    started = time.perf_counter()
    try:
        with pytest.raises(aioaccel.DeviceTimeout, match="warm-up"):
            async with aioaccel.open(stage, warmup=1, warmup_inputs=np.zeros(2),
                                     call_timeout=0.2):
                pass
        assert time.perf_counter() - started < LIMIT
    finally:
        stage.release()


async def test_a_hung_warm_up_without_call_timeout_fails_open_within_open_timeout() -> None:
    stage = SimulatedStage(lambda x: x, hang_at=0)
    started = time.perf_counter()
    try:
        with pytest.raises(aioaccel.OpenTimeout, match=r"warm-up .* open_timeout=2.0"):
            async with aioaccel.open(stage, warmup=1, warmup_inputs=np.zeros(2),
                                     open_timeout=OPEN_BOUND):
                pass
        assert time.perf_counter() - started < LIMIT
    finally:
        stage.release()


async def test_a_hung_stage_factory_or_load_fails_open_within_open_timeout(
        gate: threading.Event) -> None:
    def factory() -> Any:
        gate.wait(30)
        return lambda x: x

    hung_factory = aioaccel.open([StageSpec("slow", factory)], open_timeout=OPEN_BOUND)
    with pytest.raises(aioaccel.OpenTimeout, match="making the stages"):
        await hung_factory
    assert hung_factory.state == "closed"

    def load() -> Model:
        gate.wait(30)
        return Model(stages=[StageSpec("s", lambda: lambda x: x)])

    started = time.perf_counter()
    with pytest.raises(aioaccel.OpenTimeout, match="loading the model"):
        await aioaccel.Runner(load, open_timeout=OPEN_BOUND)
    assert time.perf_counter() - started < LIMIT


class Generations:
    """A model whose later generations (reopens, reloads) misbehave while warming up."""

    def __init__(self, later: str, gate: threading.Event):
        self.later = later
        self.gate = gate
        self.loads = 0

    def load(self) -> Model:
        self.loads += 1
        first = self.loads == 1

        def stage(x: Any) -> Any:
            if isinstance(x, np.ndarray) and x.shape == (3,):  # the warm-up's input
                if not first and self.later == "fatal":
                    raise aioaccel.DeviceError("the new device dies as it warms up")
                if not first and self.later == "hang":
                    self.gate.wait(30)
            elif x == 7 and first:
                raise aioaccel.DeviceError("device lost at item 7")
            return x

        return Model(stages=[StageSpec("dev", lambda: stage)])


@pytest.mark.parametrize("later", ["fatal", "hang"])
async def test_a_reopen_whose_warm_up_fails_or_hangs_is_bounded_and_breaks_the_runner(
        later: str, gate: threading.Event) -> None:
    model = Generations(later, gate)
    runner = aioaccel.Runner(model.load, restart=FAST, warmup=1,
                             warmup_inputs=np.zeros(3), open_timeout=OPEN_BOUND)
    started = time.perf_counter()
    async with runner:
        outcomes = await asyncio.gather(*(runner.infer(i) for i in range(12)),
                                        return_exceptions=True)
        health = runner.health()
    # two reopens, each bounded by open_timeout (a hung one would hold the gate's 30 s)
    assert time.perf_counter() - started < FAST.limit * OPEN_BOUND + LIMIT
    assert health.state == "broken" and model.loads == 1 + FAST.limit
    assert outcomes[:7] == list(range(7))
    assert all(isinstance(o, aioaccel.DeviceError) for o in outcomes[7:])
    assert "could not recover" in str(outcomes[-1])
    expected = aioaccel.DeviceError if later == "fatal" else aioaccel.OpenTimeout
    assert isinstance(health.last_error, aioaccel.DeviceError)
    assert isinstance(health.last_error.__cause__, expected)


@pytest.mark.parametrize("later", ["fatal", "hang"])
async def test_a_reload_whose_warm_up_fails_or_hangs_raises_and_the_old_model_serves_on(
        later: str, gate: threading.Event) -> None:
    model = Generations(later, gate)
    async with aioaccel.Runner(model.load, warmup=1, warmup_inputs=np.zeros(3),
                               open_timeout=OPEN_BOUND) as runner:
        assert await runner.infer(1) == 1
        started = time.perf_counter()
        expected = aioaccel.DeviceError if later == "fatal" else aioaccel.OpenTimeout
        with pytest.raises(expected):
            await runner.reload()
        assert time.perf_counter() - started < LIMIT
        assert runner.state == "ready"
        assert await runner.infer(2) == 2


async def test_aclose_while_recovering_stops_the_recovery_at_once(
        gate: threading.Event) -> None:
    """The reopen hangs (a device that never comes back): aclose returns at once, not after
    close_timeout, and every waiter gets an error."""
    model = Generations("hang", gate)
    runner = aioaccel.Runner(model.load, restart=aioaccel.Restart(backoff=0.01), warmup=1,
                             warmup_inputs=np.zeros(3), close_timeout=10.0, open_timeout=60)
    await runner
    waiters = [asyncio.ensure_future(runner.infer(i)) for i in range(10)]
    while runner.health().state != "recovering":
        await asyncio.sleep(0.01)
    started = time.perf_counter()
    await runner.aclose()
    elapsed = time.perf_counter() - started
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    # at once: far from close_timeout (slack for a loaded machine, not for a drain)
    assert elapsed < 3.0, f"aclose took {elapsed:.2f} s"
    assert runner.state == "closed"
    assert outcomes[:7] == list(range(7))
    assert all(isinstance(o, aioaccel.AccelError) for o in outcomes[7:])
