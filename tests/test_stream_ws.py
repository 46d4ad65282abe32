"""WebSocket streaming against real servers on 127.0.0.1: ``aioaccel serve`` (FastAPI on
uvicorn, a subprocess) and the aiohttp integration (in process), with real clients
(``aioaccel.client`` on ``websockets``, and aiohttp's)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import httpx
import numpy as np
import pytest
from aiohttp import web
from serving import serve

import aioaccel
from aioaccel.client import connect
from aioaccel.integrations import aiohttp as accel_aiohttp
from aioaccel.testing import SimulatedStage

pytestmark = pytest.mark.anyio

FRAMES = 200


@pytest.fixture
def anyio_backend() -> object:
    return "asyncio"  # the servers under test run their own loops


async def camera(url: str, name: str, frames: int, start: asyncio.Event,
                 arrivals: list[float]) -> list[aioaccel.client.Reply]:
    async with connect(url) as stream:
        async def send() -> None:
            await start.wait()
            for i in range(frames):
                await stream.send(np.full((1, 4), float(i), np.float32), tag=f"{name}-{i}")
            await stream.end()

        sender = asyncio.create_task(send())
        replies = []
        async for reply in stream:
            arrivals.append(time.monotonic())
            replies.append(reply)
        await sender
        assert stream.ended == {"end": True, "frames": frames}
        return replies


async def test_three_clients_get_their_frames_in_order_with_tags_and_a_fair_share() -> None:
    with serve("served_models:slow_double", "--maxsize", "4", latency=0.004) as server:
        url = f"{server.ws}/v1/models/slow_double/stream"
        start = asyncio.Event()
        arrivals: dict[str, list[float]] = {name: [] for name in ("a", "b", "c")}
        clients = [asyncio.create_task(camera(url, name, FRAMES, start, arrivals[name]))
                   for name in arrivals]
        while len(server_streams(server)) < 3:  # all three connected before any sends
            await asyncio.sleep(0.01)
        start.set()
        results = await asyncio.gather(*clients)
    for name, replies in zip(arrivals, results):
        assert [r.tag for r in replies] == [f"{name}-{i}" for i in range(FRAMES)]
        assert all(r.ok for r in replies)
        assert [float(r.outputs[0, 0]) for r in replies] == [2.0 * i
                                                                         for i in range(FRAMES)]
    # fair share: when the first camera has all its results, each other one has most of its
    first_done = min(times[-1] for times in arrivals.values())
    for times in arrivals.values():
        assert sum(t <= first_done for t in times) >= 0.8 * FRAMES


def server_streams(server: object) -> list[dict[str, object]]:
    status = httpx.get(f"{server.url}/v1/status", timeout=10).json()  # type: ignore[attr-defined]
    return status["models"]["slow_double"]["streams"]  # type: ignore[no-any-return]


async def test_json_frames_bad_frames_and_failed_items_are_answered_in_place() -> None:
    with serve("served_models:picky_double", latency=0.001) as server:
        url = f"{server.ws}/v1/models/picky_double/stream?stream=cam7"
        async with connect(url) as stream:
            await stream.send(np.array([[1.0, 2.0]]), tag="json", as_json=True)
            await stream.send_raw("not json")
            await stream.send(np.array([[-5.0]]), tag="negative")
            await stream.send_raw(b"\x93NUMPY garbage")
            await stream.send(np.array([[3.0]]))  # no tag: its index on the connection
            await stream.end()
            replies = [r async for r in stream]
    assert [r.tag for r in replies] == ["json", 1, "negative", 3, 4]
    assert replies[0].ok and replies[0].outputs.tolist() == [[2.0, 4.0]]
    assert replies[1].status == 422 and "not JSON" in (replies[1].error or "")
    assert replies[2].status == 500 and "negative frame" in (replies[2].error or "")
    assert replies[3].status == 422 and ".npy" in (replies[3].error or "")
    assert replies[4].ok and replies[4].outputs.tolist() == [[6.0]]


async def test_a_client_that_stops_reading_is_slowed_not_buffered() -> None:
    # 256 KiB per frame, results as big; random, so that permessage-deflate (on by default)
    # cannot shrink them into the socket buffers
    frame = np.random.default_rng(0).standard_normal((1, 64 * 1024)).astype(np.float32)
    with serve("served_models:slow_double", "--maxsize", "4", latency=0.0) as server:
        async with connect(f"{server.ws}/v1/models/slow_double/stream") as stream:
            for _ in range(4):  # warm up allocations before measuring
                await stream.send(frame)
            for _ in range(4):
                await stream.receive()
            before = server.rss_kib()
            sent = 0
            try:
                for _ in range(600):  # 150 MiB if the server buffered everything
                    await asyncio.wait_for(stream.send(frame), 2.0)
                    sent += 1
            except TimeoutError:
                pass
            grown_mib = (server.rss_kib() - before) / 1024
            assert sent < 200, f"sent {sent} frames without the server pushing back"
            assert grown_mib < 60, f"server RSS grew {grown_mib:.0f} MiB"
            # reading again drains it: nothing was dropped, in order
            reader = asyncio.create_task(collect(stream))
            await stream.end()
            replies = await reader
        assert "Traceback" not in server.stderr()
    # the send that timed out had already written its frame: it may be answered too
    assert sent <= len(replies) <= sent + 1
    assert [r.tag for r in replies] == list(range(4, 4 + len(replies)))


async def collect(stream: aioaccel.client.StreamClient) -> list[aioaccel.client.Reply]:
    return [r async for r in stream]


async def test_a_client_that_disconnects_withdraws_its_frames() -> None:
    with serve("served_models:slow_double", "--maxsize", "8", latency=0.3) as server:
        async with connect(f"{server.ws}/v1/models/slow_double/stream?stream=leaver") as s:
            for i in range(8):
                await s.send(np.array([[float(i)]]))
            while not server_streams(server) or server_streams(server)[0]["pushed"] < 8:
                await asyncio.sleep(0.01)
        # gone without {"end": true}: what the device has not started is withdrawn
        while server_streams(server):
            await asyncio.sleep(0.02)
        assert server.metric("aioaccel_in_flight", runner="slow_double") == 0
        withdrawn = server.metric("aioaccel_items_withdrawn_total", runner="slow_double")
        completed = server.metric("aioaccel_items_completed_total", runner="slow_double")
        assert withdrawn >= 5 and withdrawn + completed == 8
        # the key is free again, and the model serves the next client at once
        async with connect(f"{server.ws}/v1/models/slow_double/stream?stream=leaver") as s:
            await s.send(np.array([[1.0]]), tag="again")
            await s.end()
            assert [r.tag for r in [r async for r in s]] == ["again"]
        assert "Traceback" not in server.stderr()  # a disconnect is no error on the server


# ---- the aiohttp integration's ws helper ------------------------------------------------------
@asynccontextmanager
async def aiohttp_stream_server(runner: aioaccel.Runner) -> AsyncIterator[str]:
    accel = accel_aiohttp.Accel(default=runner)
    app = web.Application()
    accel.setup(app)

    async def stream(request: web.Request) -> web.WebSocketResponse:
        return await accel.ws(request, accel.runner())

    app.router.add_get("/stream", stream)
    app.router.add_get("/ready-made", accel.ws_handler("default", maxsize=2))
    site_runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=10)
    await site_runner.setup()
    site = web.TCPSite(site_runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{site_runner.addresses[0][1]}/stream"
    finally:
        await site_runner.cleanup()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


async def test_aiohttp_ws_streams_in_order_and_a_disconnect_withdraws() -> None:
    runner = aioaccel.open(SimulatedStage(lambda x: np.asarray(x) * 2, latency=0.002),
                           maxsize=4, name="aio")
    async with aiohttp_stream_server(runner) as url, aiohttp.ClientSession() as session:
        async def one(name: str) -> list[dict[str, object]]:
            async with session.ws_connect(url) as ws:
                for i in range(50):
                    await ws.send_str(json.dumps({"tag": f"{name}{i}", "inputs": [[i]]}))
                await ws.send_str(json.dumps({"end": True}))
                return [json.loads(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]

        async def ready_made() -> list[dict[str, object]]:
            async with session.ws_connect(url.replace("/stream", "/ready-made")) as ws:
                for i in range(50):
                    await ws.send_bytes(npy(np.array([[i]])))
                await ws.send_str(json.dumps({"end": True}))
                replies = [json.loads(m.data) async for m in ws
                           if m.type == aiohttp.WSMsgType.TEXT]
            assert [r.get("tag") for r in replies[:-1]] == list(range(50))
            return [{**r, "tag": f"c{r['tag']}"} if "tag" in r else r for r in replies]

        a, b, c = await asyncio.gather(one("a"), one("b"), ready_made())
        for name, replies in (("a", a), ("b", b), ("c", c)):
            assert replies[-1] == {"end": True, "frames": 50}
            assert [r["tag"] for r in replies[:-1]] == [f"{name}{i}" for i in range(50)]
            assert [r["outputs"] for r in replies[:-1]] == [[[2 * i]] for i in range(50)]

        slow = aioaccel.open(SimulatedStage(lambda x: x, latency=0.3), maxsize=8, name="s")
        async with aiohttp_stream_server(slow) as slow_url:
            async with session.ws_connect(slow_url) as ws:
                for i in range(8):
                    await ws.send_bytes(npy(np.array([[float(i)]])))
                while slow.stats().pushed < 8:
                    await asyncio.sleep(0.01)
            while slow.streams():
                await asyncio.sleep(0.01)
            stats = slow.stats()
            assert stats.in_flight == 0 and stats.withdrawn >= 5
            assert stats.withdrawn + stats.completed == 8


async def test_a_frame_the_model_refuses_is_a_422_naming_the_input(tmp_path: object) -> None:
    from pathlib import Path

    from aioaccel.testing.models import dense_chain

    chain = dense_chain(8, 2, inputs=8)
    path = chain.write_onnx(Path(str(tmp_path)) / "dense.onnx")
    x = chain.random_input()
    with serve(str(path), latency=0.0) as server:
        async with connect(f"{server.ws}/v1/models/dense/stream") as stream:
            await stream.send(x, tag="good")
            await stream.send(np.zeros((1, 3), np.float32), tag="short")
            await stream.send(x.astype(np.float64), tag="f64")
            await stream.send(x, tag="good again")
            await stream.end()
            replies = [r async for r in stream]
            assert await stream.wait_closed() == 1000
    assert [r.tag for r in replies] == ["good", "short", "f64", "good again"]
    assert np.allclose(replies[0].outputs["output"], chain.reference(x), atol=1e-4)
    assert replies[1].status == 422 and "input" in (replies[1].error or "")
    assert "(1, 8)" in (replies[1].error or "") or "8" in (replies[1].error or "")
    assert replies[2].status == 422 and "float32" in (replies[2].error or "")
    assert np.allclose(replies[3].outputs["output"], chain.reference(x), atol=1e-4)
