"""The numbers behind the status page, without a browser: items/s is the current rate (the
last one to two sampling intervals), never the average since open; the history the page draws
is sampled by the server while it runs, bounded, and marks quiet intervals."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

import aioaccel
from aioaccel.serve.app import build_app
from aioaccel.serve.status import StatusFeed, StatusHistory
from aioaccel.testing import SimulatedStage

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    """Just the stats StatusHistory reads."""

    def __init__(self) -> None:
        self.completed = 0

    def stats(self) -> Any:
        return SimpleNamespace(completed=self.completed, latency_p50=0.002, latency_p99=0.009)


def test_the_rate_is_the_last_intervals_not_the_average_since_open() -> None:
    clock, runner = Clock(), FakeRunner()
    history = StatusHistory({"m": runner}, interval=1.0, clock=clock, wall=clock)  # type: ignore[dict-item]
    for _ in range(10):  # busy: 100 items/s for 10 s
        history.sample()
        clock.now += 1.0
        runner.completed += 100
    for _ in range(10):  # then idle for 10 s
        history.sample()
        clock.now += 1.0
    history.sample()
    assert history.rate("m", runner.completed) == 0.0  # the average since open is 50/s
    runner.completed += 30  # a burst in the last half second
    clock.now += 0.5
    assert history.rate("m", runner.completed) == pytest.approx(30 / 1.5)
    rates = history.series("m")["items_per_s"]
    assert rates[1:10] == [100.0] * 9 and rates[11:] == [0.0] * 10


def test_history_is_bounded_and_quiet_intervals_have_no_latency() -> None:
    clock, runner = Clock(), FakeRunner()
    history = StatusHistory({"m": runner}, interval=1.0, points=5, clock=clock, wall=clock)  # type: ignore[dict-item]
    for i in range(12):
        if i % 2:
            runner.completed += 10
        history.sample()
        clock.now += 1.0
    series = history.series("m")
    assert len(series["t"]) == len(series["items_per_s"]) == 5
    assert series["p50_ms"] == [2.0, None, 2.0, None, 2.0]  # odd samples saw completions
    assert series["p99_ms"] == [9.0, None, 9.0, None, 9.0]
    assert series["t"] == sorted(series["t"])


def test_bad_history_settings_are_named() -> None:
    with pytest.raises(ValueError, match=r"interval > 0 and points >= 2.*interval=0"):
        StatusHistory({}, interval=0)



async def test_a_feed_without_history_starts_at_zero_not_the_average_since_open() -> None:
    async with aioaccel.open(SimulatedStage(latency=0)) as runner:
        await asyncio.gather(*(runner.infer(i) for i in range(20)))
        assert runner.stats().throughput > 0
        first = StatusFeed({"m": runner}).snapshot()["models"]["m"]
        assert first["completed"] == 20 and first["items_per_s"] == 0.0


async def test_the_app_samples_history_while_it_runs() -> None:
    runner = aioaccel.open(SimulatedStage(latency=0), name="m")
    app = build_app({"m": runner}, status_interval=0.02)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), \
            httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for i in range(5):
            reply = await client.post("/v1/models/m/infer", json=[[float(i)]])
            assert reply.status_code == 200, reply.text
        async with asyncio.timeout(10):  # the sampler has no event to await: poll, bounded
            while len((model := (await client.get("/v1/status")).json()["models"]["m"])
                      ["history"]["t"]) < 3:
                await asyncio.sleep(0.02)
        assert set(model["history"]) == {"t", "items_per_s", "p50_ms", "p99_ms"}
        assert model["completed"] == 5
    assert runner.closed  # the lifespan closed the runner; the sampler stopped with it
