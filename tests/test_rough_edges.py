"""Issue 25 item 6's rough edges: ``print(runner.stats())`` reads on a few lines, and
``/healthz`` lists its models under one word in ``aioaccel serve`` and in the example apps."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import httpx
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from serving import serve

import aioaccel
from aioaccel.stats import RunnerStats
from aioaccel.testing import SimulatedStage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import aiohttp_app
import fastapi_app

pytestmark = pytest.mark.anyio


async def test_printed_stats_are_a_few_labelled_lines_and_keep_every_field() -> None:
    async with aioaccel.open(SimulatedStage(lambda x: x), maxsize=4, name="readable") as runner:
        stream = runner.stream("cam")
        await stream.push(np.ones(2))
        await anext(stream)
        await runner.infer(np.ones(2))
        stats = runner.stats()
    text = repr(stats)
    assert str(stats) == text
    lines = text.splitlines()
    assert 5 <= len(lines) <= 20 and max(map(len, lines)) <= 100, text
    assert lines[0].startswith("RunnerStats('readable'")
    for word in ("pushed 2", "completed 2", "in flight 0/4", "p50", "p99", "queued",
                 "on the device", "stage", "stream    'cam'"):
        assert word in text, (word, text)
    # the dataclass is unchanged: every field is still there for programs
    assert {f.name for f in fields(RunnerStats)} >= {"pushed", "completed", "latency_p50",
                                                     "stages", "streams", "batching"}
    assert stats.completed == 2


async def test_healthz_says_models_in_serve_and_in_both_example_apps() -> None:
    with serve("served_models:slow_double", latency=0.0) as server:
        async with httpx.AsyncClient(timeout=10) as client:
            served = (await client.get(f"{server.url}/healthz")).json()
    assert set(served) == {"ok", "models"} and "slow_double" in served["models"]
    app = fastapi_app.create_app()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            example = (await client.get("/healthz")).json()
    assert set(example) == {"ok", "models"} and "default" in example["models"]
    async with TestClient(TestServer(aiohttp_app.create_app())) as client:
        other = await (await client.get("/healthz")).json()
    assert set(other) == {"ok", "models"}
    for body in (served, example, other):  # the same fields per model, too
        model = next(iter(body["models"].values()))
        assert {"state", "restarts", "in_flight", "maxsize"} <= set(model)
