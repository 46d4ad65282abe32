"""Issue 20, items 1 and 2: a closed runner says RunnerClosed everywhere, a broken one its
DeviceError; a graceful aclose drains (finished results still delivered, then the end)."""

from __future__ import annotations

import asyncio

import pytest

import aioaccel
from aioaccel.testing import SimulatedStage

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


async def test_a_closed_runner_says_runner_closed_everywhere() -> None:
    runner = await aioaccel.open(lambda x: x, maxsize=2)
    await runner.aclose()
    with pytest.raises(aioaccel.RunnerClosed):
        runner.stream("new")
    with pytest.raises(aioaccel.RunnerClosed):
        await runner.push(1)
    with pytest.raises(aioaccel.RunnerClosed):
        runner.push_nowait(1)
    with pytest.raises(aioaccel.RunnerClosed):
        await runner.infer(1)


async def test_a_stream_of_a_closed_runner_says_runner_closed() -> None:
    async with aioaccel.open(lambda x: x, maxsize=2) as runner:
        stream = runner.stream("cam")
    with pytest.raises(aioaccel.RunnerClosed):
        await stream.push(1)


async def test_a_broken_runner_raises_its_device_error_from_streams_too() -> None:
    async with aioaccel.open(SimulatedStage(lambda x: x, fatal_at=0), maxsize=2) as runner:
        with pytest.raises(aioaccel.DeviceError):
            await runner.infer(1)
        with pytest.raises(aioaccel.DeviceError):
            runner.stream("late")
        with pytest.raises(aioaccel.DeviceError):
            await runner.push(2)


async def test_a_graceful_close_drains_a_stream() -> None:
    runner = await aioaccel.open(lambda x: 10 * x, maxsize=4)
    stream = runner.stream("cam")
    await stream.push(1)
    await stream.push(2)
    await runner.aclose()
    assert [r.outputs async for r in stream] == [10, 20]


async def test_a_graceful_close_drains_the_runner_iteration() -> None:
    runner = await aioaccel.open(lambda x: x + 1, maxsize=4)
    for i in range(3):
        await runner.push(i, tag=i)
    await runner.aclose()
    assert [(r.tag, r.outputs) async for r in runner] == [(0, 1), (1, 2), (2, 3)]


async def test_a_close_that_failed_items_ends_with_the_error_after_the_finished_ones() -> None:
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow(x: int) -> int:
        if x == 2:
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)
        return x

    runner = await aioaccel.open(slow, maxsize=4)
    await runner.push(1)
    await runner.push(2)  # blocks its worker until released
    got = []
    async for result in runner:
        got.append(result.outputs)
        break
    await runner.aclose(timeout=0)
    release.set()
    with pytest.raises(aioaccel.RunnerClosed):
        async for result in runner:
            got.append(result.outputs)
    assert got == [1]
