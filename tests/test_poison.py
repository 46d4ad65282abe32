"""One poison item never fails innocent ones across a restart (issue 26, item 3): with
``retries=``, the items a failed device held are re-run one at a time after the reopen; the
one that breaks the device again is failed alone, its neighbours are answered."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

import aioaccel
from aioaccel.testing import SimulatedDevice, SimulatedStage

pytestmark = pytest.mark.anyio

POISON = 13
POLICY = aioaccel.Restart(limit=5, window=60.0, backoff=0.01, max_backoff=0.05)


def breaks_on_poison(x: np.ndarray) -> np.ndarray:
    if (x == POISON).any():
        raise aioaccel.DeviceError("the device crashed on this input")
    return x * 2


def make(kind: str) -> Any:
    if kind == "device":
        return SimulatedDevice(breaks_on_poison, latency=0.002, jitter=0.5, capacity=4)
    return SimulatedStage(breaks_on_poison, latency=0.001)


def row(i: int) -> np.ndarray:
    return np.full((1, 3), i, np.float32)


@pytest.mark.parametrize("batch", [None, 4])
@pytest.mark.parametrize("kind", ["blocking", "device"])
async def test_a_poison_item_fails_alone_and_its_neighbours_are_rerun(kind: str,
                                                                      batch: int | None) -> None:
    async with aioaccel.open(make(kind), maxsize=16, restart=POLICY, retries=2,
                             batch=batch) as runner:
        async def produce() -> None:
            for i in range(60):
                await runner.push(row(i), tag=i)
            runner.close()

        producer = asyncio.create_task(produce())
        results = [r async for r in runner]
        await producer
        stats = runner.stats()
    assert [r.tag for r in results] == list(range(60))
    failed = [r.tag for r in results if not r.ok]
    assert failed == [POISON], f"innocent items failed: {failed}"
    error = results[POISON].error
    assert error is not None and "poison" in str(error.__cause__)
    assert all(np.array_equal(r.outputs, row(r.tag) * 2) for r in results if r.ok)
    assert stats.restarts == 2  # it broke the device twice, and was not tried a third time
    assert stats.in_flight == 0


async def test_concurrent_callers_around_a_poison_item_are_all_answered() -> None:
    async with aioaccel.open(make("device"), maxsize=32, restart=POLICY, retries=1) as runner:
        outcomes = await asyncio.gather(*(runner.infer(row(i)) for i in range(64)),
                                        return_exceptions=True)
        later = await runner.infer(row(100))
        health = runner.health()
    errors = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    assert errors == [POISON]
    assert isinstance(outcomes[POISON], aioaccel.DeviceError)
    assert "poison" in str(outcomes[POISON])
    assert np.array_equal(later, row(100) * 2)
    assert health.state == "ready" and health.restarts == 2
