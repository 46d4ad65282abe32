"""Testing a service built on aioaccel without hardware: ``pytest examples/test_service.py``.

The service below classifies frames with a runner; the tests give it simulated accelerators
from aioaccel's pytest plugin (installed with aioaccel): slow ones, failing ones, hung ones.
Written with anyio, so anyio's pytest plugin runs each test on asyncio and on trio.
"""

from __future__ import annotations

import anyio
import pytest

import aioaccel
from aioaccel.pytest_plugin import backends

pytestmark = pytest.mark.anyio  # anyio's pytest plugin runs these async tests


@pytest.fixture(params=backends("asyncio", "trio"))
def anyio_backend(request: pytest.FixtureRequest) -> object:
    # each test on asyncio and on trio (add "uvloop" for a third run); a library that is not
    # installed is skipped, saying what to install
    return request.param


async def classify(runner: aioaccel.Runner, frames: list[int]) -> list[str]:
    """The code under test: a label per frame, "error" for frames the model failed on."""
    results: list[object] = [None] * len(frames)

    async def one(i: int) -> None:
        try:
            results[i] = await runner.infer(frames[i], timeout=1.0)
        except aioaccel.AccelError as exc:
            results[i] = exc

    async with anyio.create_task_group() as tasks:  # one concurrent infer per frame
        for i in range(len(frames)):
            tasks.start_soon(one, i)
    return ["error" if isinstance(r, Exception) else ("even" if r % 2 == 0 else "odd")
            for r in results]


@pytest.mark.accel(lambda frame: frame * 3, latency=0.002, fail_if=lambda frame: frame == 4)
async def test_a_failed_frame_is_reported_and_the_others_are_labelled(accel_runner):
    assert await classify(accel_runner, [2, 3, 4, 5]) == ["even", "odd", "error", "odd"]


async def test_a_hung_accelerator_fails_fast_instead_of_hanging(accel_factory):
    runner = accel_factory.simulated(hang_at=0, call_timeout=0.1)
    async with runner:
        assert await classify(runner, [1]) == ["error"]


async def test_backpressure_holds_the_service_to_maxsize(accel_factory):
    async with accel_factory.simulated(latency=0.001, device=True, jitter=1.0,
                                       maxsize=3) as runner:
        assert await classify(runner, list(range(30))) == ["even", "odd"] * 15
        assert runner.stats().peak_admitted <= 3


@pytest.mark.hardware("coral")
async def test_on_a_real_edge_tpu(accel_factory):
    ...  # runs only where aioaccel.devices() reports an Edge TPU; skipped with the reason
