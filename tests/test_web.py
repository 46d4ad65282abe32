"""FastAPI and aiohttp integrations: in-process clients and real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fastapi import Depends, FastAPI, Request, Response

import aioaccel
from aioaccel.integrations import aiohttp as accel_aiohttp
from aioaccel.integrations import fastapi as accel_fastapi
from aioaccel.testing import SimulatedStage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import aiohttp_app
import fastapi_app
from _model import EMBEDDED

pytestmark = pytest.mark.anyio


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def doubled(x: np.ndarray) -> np.ndarray:
    return np.asarray(x) * 2


def fastapi_app_for(runner: aioaccel.Runner, **options: Any) -> FastAPI:
    accel = accel_fastapi.Accel(default=runner, **options)
    app = FastAPI(lifespan=accel.lifespan)

    @app.post("/infer")
    async def infer(request: Request,
                    runner: aioaccel.Runner = Depends(accel.runner())) -> Response:  # noqa: B008
        return await accel.infer(request, runner, await accel.read_inputs(request, runner))

    return app


def aiohttp_app_for(runner: aioaccel.Runner, **options: Any) -> web.Application:
    accel = accel_aiohttp.Accel(default=runner, **options)
    app = web.Application(client_max_size=accel.max_body)
    accel.setup(app)

    async def infer(request: web.Request) -> web.Response:
        return await accel.infer(request, runner, await accel.read_inputs(request, runner))

    app.router.add_post("/infer", infer)
    return app


@asynccontextmanager
async def asgi_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


@asynccontextmanager
async def uvicorn_server(app: FastAPI) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=10))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # uvicorn has no started event to await
        if task.done():
            await task
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def aiohttp_server(app: web.Application) -> AsyncIterator[tuple[str, web.AppRunner]]:
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", runner
    finally:
        await runner.cleanup()


@asynccontextmanager
async def served(framework: str, runner: aioaccel.Runner, **options: Any) -> AsyncIterator[str]:
    """A real ``framework`` server on 127.0.0.1 for ``runner``; yields its URL."""
    server: Any = (uvicorn_server(fastapi_app_for(runner, **options)) if framework == "fastapi"
                   else aiohttp_server(aiohttp_app_for(runner, **options)))
    async with server as (url, _):
        yield url


async def wait_for(condition: Any) -> None:
    """Wait until ``condition()`` holds: for effects inside a server with no event to await."""
    while not condition():
        await asyncio.sleep(0.005)


def accepted(runner: aioaccel.Runner) -> int:
    """Requests whose handler reached the runner: admitted, or waiting for space."""
    stats = runner.stats()
    return stats.pushed + stats.waiting


# ---- the examples, in process ----------------------------------------------------------------
async def test_fastapi_example_serves_json_npy_model_health_and_metrics() -> None:
    app = fastapi_app.create_app()
    x = EMBEDDED.random_input()
    async with asgi_client(app) as client:
        reply = await client.post("/infer", json=x.tolist())
        assert reply.status_code == 200
        assert np.allclose(reply.json()["outputs"]["output"], EMBEDDED.reference(x), atol=1e-4)
        reply = await client.post("/infer", json={"inputs": {"input": x.tolist()}})
        assert reply.status_code == 200
        reply = await client.post("/infer", content=npy(x),
                                  headers={"content-type": "application/x-npy",
                                           "accept": "application/x-npy"})
        assert reply.headers["content-type"] == "application/x-npy"
        assert np.allclose(np.load(io.BytesIO(reply.content)), EMBEDDED.reference(x), atol=1e-4)
        bad = await client.post("/infer", json=[[1.0, 2.0]])
        assert bad.status_code == 422 and "expected shape (1, 16)" in bad.json()["detail"]
        wrong_dtype = await client.post("/infer", content=npy(x.astype(np.float64)),
                                        headers={"content-type": "application/x-npy"})
        assert wrong_dtype.status_code == 422 and "float64" in wrong_dtype.json()["detail"]
        garbage = await client.post("/infer", content=b"{not json",
                                    headers={"content-type": "application/json"})
        assert garbage.status_code == 422
        assert (await client.get("/model")).json()["inputs"] == ["input: float32[1, 16]"]
        health = await client.get("/healthz")
        assert health.status_code == 200 and health.json()["ok"]
        metrics = (await client.get("/metrics")).text
        assert 'aioaccel_items_completed_total{runner="model"} 3.0' in metrics
        assert 'aioaccel_latency_seconds_bucket{le="+Inf",runner="model"} 3.0' in metrics


async def test_aiohttp_example_serves_json_npy_model_health_and_metrics() -> None:
    x = EMBEDDED.random_input()
    async with TestClient(TestServer(aiohttp_app.create_app())) as client:
        reply = await client.post("/infer", json=x.tolist())
        assert reply.status == 200
        body = await reply.json()
        assert np.allclose(body["outputs"]["output"], EMBEDDED.reference(x), atol=1e-4)
        reply = await client.post("/infer", data=npy(x),
                                  headers={"Content-Type": "application/x-npy",
                                           "Accept": "application/x-npy"})
        assert np.allclose(np.load(io.BytesIO(await reply.read())), EMBEDDED.reference(x),
                           atol=1e-4)
        bad = await client.post("/infer", json=[[1.0, 2.0]])
        assert bad.status == 422 and "expected shape (1, 16)" in await bad.text()
        assert (await (await client.get("/model")).json())["inputs"] == ["input: float32[1, 16]"]
        assert (await client.get("/healthz")).status == 200
        metrics = await (await client.get("/metrics")).text()
        assert 'aioaccel_items_completed_total{runner="model"} 2.0' in metrics


# ---- overload, limits, concurrency -------------------------------------------------------
async def test_overload_answers_503_with_retry_after() -> None:
    stage = SimulatedStage(doubled, hang_at=[0, 1])
    app = fastapi_app_for(aioaccel.open(stage, maxsize=2), admit_timeout=0.05, retry_after=2)
    async with asgi_client(app) as client:
        held = [asyncio.create_task(client.post("/infer", json=[i])) for i in range(2)]
        await asyncio.to_thread(stage.hanging.wait, 5)
        refused = await client.post("/infer", json=[9])
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "2"
        assert "overloaded" in refused.json()["detail"]
        stage.release()
        assert [r.json()["outputs"] for r in await asyncio.gather(*held)] == [[0], [2]]


async def test_aiohttp_overload_answers_503_with_retry_after() -> None:
    stage = SimulatedStage(doubled, hang_at=[0, 1])
    app = aiohttp_app_for(aioaccel.open(stage, maxsize=2), admit_timeout=0.05)
    async with TestClient(TestServer(app)) as client:
        held = [asyncio.create_task(client.post("/infer", json=[i])) for i in range(2)]
        await asyncio.to_thread(stage.hanging.wait, 5)
        refused = await client.post("/infer", json=[9])
        assert refused.status == 503 and refused.headers["Retry-After"] == "1"
        stage.release()
        assert [(await r.json())["outputs"] for r in await asyncio.gather(*held)] == [[0], [2]]


async def test_request_body_limit_is_413() -> None:
    fast = fastapi_app_for(aioaccel.open(doubled), max_body=64)
    async with asgi_client(fast) as client:
        assert (await client.post("/infer", json=list(range(100)))).status_code == 413
        assert (await client.post("/infer", json=[1])).status_code == 200
    slow = aiohttp_app_for(aioaccel.open(doubled), max_body=64)
    async with TestClient(TestServer(slow)) as client:
        assert (await client.post("/infer", json=list(range(100)))).status == 413
        assert (await client.post("/infer", json=[1])).status == 200


async def test_many_concurrent_requests_each_get_their_own_answer() -> None:
    app = fastapi_app.create_app()
    xs = [EMBEDDED.random_input(seed=i) for i in range(64)]
    async with asgi_client(app) as client:
        replies = await asyncio.gather(*(client.post("/infer", json=x.tolist()) for x in xs))
    for reply, x in zip(replies, xs):
        assert np.allclose(reply.json()["outputs"]["output"], EMBEDDED.reference(x), atol=1e-4)


# ---- real servers --------------------------------------------------------------------------
async def test_uvicorn_concurrency_and_shutdown_lose_no_accepted_request() -> None:
    runner = aioaccel.open(SimulatedStage(doubled, latency=0.01), maxsize=4, name="served")
    app = fastapi_app_for(runner, admit_timeout=30)
    async with uvicorn_server(app) as (url, server):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            requests = [asyncio.create_task(client.post("/infer", json=[i])) for i in range(24)]
            await wait_for(lambda: accepted(runner) == 24)
            server.should_exit = True  # shut down with requests in flight and waiting
            replies = await asyncio.gather(*requests)
    assert [r.status_code for r in replies] == [200] * 24
    assert [r.json()["outputs"] for r in replies] == [[2 * i] for i in range(24)]
    assert runner.closed and runner.stats().completed == 24


async def test_aiohttp_server_concurrency_and_shutdown_lose_no_accepted_request() -> None:
    runner = aioaccel.open(SimulatedStage(doubled, latency=0.01), maxsize=4)
    app = aiohttp_app_for(runner, admit_timeout=30)
    async with httpx.AsyncClient(timeout=30) as client:
        async with aiohttp_server(app) as (url, _):
            requests = [asyncio.create_task(client.post(f"{url}/infer", json=[i]))
                        for i in range(24)]
            await wait_for(lambda: accepted(runner) == 24)
        replies = await asyncio.gather(*requests)  # server.cleanup() waited for them
    assert [r.status_code for r in replies] == [200] * 24
    assert [r.json()["outputs"] for r in replies] == [[2 * i] for i in range(24)]
    assert runner.closed


@pytest.mark.parametrize("framework", ["fastapi", "aiohttp"])
async def test_a_client_that_disconnects_withdraws_its_item(framework: str) -> None:
    stage = SimulatedStage(doubled, hang_at=[0])
    runner = aioaccel.open(stage, maxsize=4)
    async with served(framework, runner, admit_timeout=30) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            first = asyncio.create_task(client.post("/infer", json=[1]))
            await asyncio.to_thread(stage.hanging.wait, 5)  # the stage holds request 1
            async with httpx.AsyncClient(base_url=url, timeout=30) as leaving:
                second = asyncio.create_task(leaving.post("/infer", json=[2]))
                await wait_for(lambda: runner.stats().pushed == 2)  # admitted, queued
                second.cancel()  # the client gives up: its connection closes
                with pytest.raises(asyncio.CancelledError):
                    await second
            await wait_for(lambda: runner.stats().withdrawn == 1)
            stage.release()
            assert (await first).json()["outputs"] == [2]
    stats = runner.stats()
    assert stats.completed == 1 and stats.withdrawn == 1 and stage.calls == 1


@pytest.mark.parametrize("framework", ["fastapi", "aiohttp"])
async def test_real_server_overload_answers_503(framework: str) -> None:
    stage = SimulatedStage(doubled, hang_at=[0, 1])
    runner = aioaccel.open(stage, maxsize=2)
    async with served(framework, runner, admit_timeout=0.05) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            held = [asyncio.create_task(client.post("/infer", json=[i])) for i in range(2)]
            await wait_for(lambda: runner.stats().pushed == 2)
            refused = await asyncio.gather(*(client.post("/infer", json=[9]) for _ in range(5)))
            assert [r.status_code for r in refused] == [503] * 5
            assert all(r.headers["retry-after"] == "1" for r in refused)
            stage.release()
            assert [r.json()["outputs"] for r in await asyncio.gather(*held)] == [[0], [2]]
    assert runner.stats().pushed == 2  # the refused requests never entered the runner
