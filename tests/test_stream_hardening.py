"""WebSocket streams against hostile and careless clients, on a real ``aioaccel serve`` (a
subprocess) and on the aiohttp integration: bad frames answered in place, keys nobody can
take over, an ``Origin`` allow-list, strict JSON out, vanished clients released, frames read
before a shutdown answered (issue 26 item 9), binary results and refusals at connect (issue
25 items 2 and 6)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
import numpy as np
import pytest
import websockets
from aiohttp import web
from serving import Served, serve

import aioaccel
from aioaccel.client import StreamClosed, StreamRefused, connect
from aioaccel.integrations import aiohttp as accel_aiohttp
from aioaccel.testing import SimulatedStage

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> object:
    return "asyncio"  # the servers under test run their own loops


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def strict(text: str) -> Any:
    """Parse as RFC 8259 JSON: NaN and Infinity fail the test."""
    def refuse(name: str) -> Any:
        raise AssertionError(f"the server sent {name}, which is not JSON: {text[:200]}")
    return json.loads(text, parse_constant=refuse)


async def streams_of(server: Served, model: str = "slow_double") -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10) as client:
        status = (await client.get(f"{server.url}/v1/status")).json()
    return status["models"][model]["streams"]  # type: ignore[no-any-return]


async def replies_until_end(ws: Any) -> list[Any]:
    out = []
    async with asyncio.timeout(20):
        while True:
            message = strict(await ws.recv())
            out.append(message)
            if message.get("end") is True:
                return out


# ---- bad frames are answered in place ---------------------------------------------------------
async def test_deep_nesting_nan_tags_and_negative_dims_are_answered_and_the_stream_lives() -> None:
    deep = '{"tag": "deep", "inputs": ' + "[" * 5000 + "1" + "]" * 5000 + "}"
    header = npy(np.zeros((2, 2), np.float32))
    negative = header.replace(b"(2, 2), }", b"(-2,-2),}")
    with serve("served_models:slow_double", latency=0.0) as server:
        async with websockets.connect(f"{server.ws}/v1/models/slow_double/stream") as ws:
            await ws.send(deep)
            await ws.send('{"tag": NaN, "inputs": [[1.0]]}')
            await ws.send('{"tag": [1, Infinity]}')
            await ws.send(negative)
            await ws.send(json.dumps({"tag": "good", "inputs": [[1.0, 2.0]]}))
            await ws.send(json.dumps({"end": True}))
            replies = await replies_until_end(ws)
            assert ws.close_code is None or ws.close_code == 1000
        assert [r.get("status") for r in replies[:4]] == [422, 422, 422, 422]
        assert "nested too deeply" in replies[0]["error"]
        assert "NaN" in replies[1]["error"] and replies[1]["tag"] == 1  # never echoed as NaN
        assert "Infinity" in replies[2]["error"]
        assert ".npy" in replies[3]["error"] and replies[3]["tag"] == 3
        assert replies[4]["tag"] == "good" and replies[4]["outputs"] == [[2.0, 4.0]]
        assert replies[5] == {"end": True, "frames": 5}
        assert "Traceback" not in server.stderr()


# ---- keys -------------------------------------------------------------------------------------
async def test_anonymous_keys_are_unguessable_and_cannot_be_claimed_or_taken_over() -> None:
    with serve("served_models:slow_double", latency=0.0) as server:
        url = f"{server.ws}/v1/models/slow_double/stream"
        async with connect(url) as first, connect(url) as second:
            keys = sorted(s["key"] for s in await streams_of(server))
            assert len(keys) == 2 and all(re.fullmatch(r"ws-[0-9a-f]{16}", k) for k in keys)
            # a client naming an anonymous key (live or not) is refused at the handshake
            for key in (keys[0], "ws-0", "ws-1"):
                with pytest.raises(StreamRefused) as refused:
                    async with connect(f"{url}?stream={key}"):
                        pass
                assert refused.value.status == 400 and "ws-" in refused.value.reason
            for stream in (first, second):
                await stream.send(np.ones((1, 1), np.float32), tag="mine")
                await stream.end()
                assert [r.tag async for r in stream] == ["mine"]
        with pytest.raises(StreamRefused) as refused:
            async with connect(f"{url}?stream={'k' * 200}"):
                pass
        assert refused.value.status == 400


async def test_connect_to_a_key_in_use_is_refused_at_connect() -> None:
    with serve("served_models:slow_double", latency=0.0) as server:
        url = f"{server.ws}/v1/models/slow_double/stream?stream=cam1"
        async with connect(url) as owner:
            with pytest.raises(StreamRefused) as refused:
                async with connect(url):
                    pytest.fail("connected to a key in use")
            assert refused.value.status == 409 and "cam1" in refused.value.reason
            await owner.send(np.ones((1, 1), np.float32), tag="still mine")
            await owner.end()
            assert [r.tag async for r in owner] == ["still mine"]


async def test_a_stream_to_an_unknown_model_closes_with_the_reason_of_a_404() -> None:
    with serve("served_models:slow_double", latency=0.0) as server:
        async with websockets.connect(f"{server.ws}/v1/models/nope/stream") as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 4404
            assert "no model named 'nope'" in ws.close_reason
            assert "slow_double" in ws.close_reason
        async with connect(f"{server.ws}/v1/models/nope/stream") as stream:
            with pytest.raises(StreamClosed) as closed:
                await stream.receive()
        assert closed.value.code == 4404 and "nope" in closed.value.reason


# ---- origins ---------------------------------------------------------------------------------
async def test_browser_origins_other_than_the_servers_own_are_refused_by_default() -> None:
    with serve("served_models:slow_double", latency=0.0) as server:
        url = f"{server.ws}/v1/models/slow_double/stream"
        with pytest.raises(StreamRefused) as refused:
            async with connect(url, origin="http://evil.example"):
                pass
        assert refused.value.status == 403 and "evil.example" in refused.value.reason
        own = f"http://127.0.0.1:{server.port}"
        async with connect(url, origin=own) as stream:  # the status page's own origin
            await stream.send(np.ones((1, 1), np.float32))
            await stream.end()
            assert len([r async for r in stream]) == 1
    with serve("served_models:slow_double", "--allow-origin", "http://cams.example",
               latency=0.0) as server:
        url = f"{server.ws}/v1/models/slow_double/stream"
        async with connect(url, origin="http://cams.example") as stream:
            await stream.end()
            assert [r async for r in stream] == []
        with pytest.raises(StreamRefused):
            async with connect(url, origin="http://evil.example"):
                pass


# ---- binary results --------------------------------------------------------------------------
async def test_binary_results_keep_dtype_and_shape_and_json_stays_on_request() -> None:
    with serve("served_models:two_outputs", latency=0.0) as server:
        url = f"{server.ws}/v1/models/two_outputs/stream"
        frame = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
        async with connect(url) as stream:  # binary by default
            await stream.send(frame, tag="a")
            await stream.end()
            (reply,) = [r async for r in stream]
        assert reply.tag == "a"
        assert reply.outputs["scaled"].dtype == np.float32
        assert reply.outputs["scaled"].shape == (1, 2, 3)
        assert np.array_equal(reply.outputs["scaled"], frame * 2)
        assert reply.outputs["count"].dtype == np.int64 and reply.outputs["count"].tolist() == [6]
        async with connect(url, results="json") as stream:
            await stream.send(frame, tag="b")
            await stream.end()
            (reply,) = [r async for r in stream]
        assert reply.outputs["scaled"].dtype == np.float64  # what JSON numbers become
        # per message: a JSON connection asks for one frame in binary, and back
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"tag": "bin", "results": "npy"}))
            await ws.send(npy(frame))
            await ws.send(json.dumps({"tag": "txt", "inputs": frame.tolist()}))
            await ws.send(json.dumps({"tag": "bin2", "results": "npy",
                                      "inputs": frame.tolist()}))
            await ws.send(json.dumps({"tag": "bad", "results": "xml", "inputs": [1]}))
            await ws.send(json.dumps({"end": True}))
            head = strict(await ws.recv())
            assert head["tag"] == "bin" and head["npy"] == ["scaled", "count"]
            scaled = np.load(io.BytesIO(await ws.recv()))
            count = np.load(io.BytesIO(await ws.recv()))
            assert scaled.dtype == np.float32 and np.array_equal(scaled, frame * 2)
            assert count.tolist() == [6]
            text = strict(await ws.recv())
            assert text["tag"] == "txt" and "outputs" in text
            head = strict(await ws.recv())
            assert head["tag"] == "bin2" and head["npy"] == ["scaled", "count"]
            assert np.load(io.BytesIO(await ws.recv())).dtype == np.float32  # the model's
            await ws.recv()
            bad = strict(await ws.recv())
            assert bad["status"] == 422 and "xml" in bad["error"]
            assert strict(await ws.recv()) == {"end": True, "frames": 4}


async def test_an_unknown_results_format_is_refused_at_connect() -> None:
    with serve("served_models:slow_double", latency=0.0) as server:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(
                    f"{server.ws}/v1/models/slow_double/stream?results=xml"):
                pass
        assert refused.value.response.status_code == 400


# ---- clients that vanish -----------------------------------------------------------------------
VANISHING_CLIENT = r'''
import asyncio, sys
import numpy as np
from aioaccel.client import connect

async def main():
    async with connect(sys.argv[1]) as s:
        frame = np.random.default_rng(0).standard_normal((1, 64 * 1024)).astype(np.float32)
        for _ in range(int(sys.argv[2])):
            await s.send(frame)
        print("sent", flush=True)
        await asyncio.sleep(60)  # killed here, in the middle of its stream

asyncio.run(main())
'''


def start_clients(url: str, n: int) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, f"{url}?stream=cam{i}",
                              str(2 + i % 5)], stdout=subprocess.PIPE, text=True)
            for i in range(n)]


async def test_clients_killed_mid_stream_leave_no_stream_or_key_behind() -> None:
    with serve("served_models:slow_double", "--maxsize", "4", latency=0.01) as server:
        url = f"{server.ws}/v1/models/slow_double/stream"
        clients = start_clients(url, 20)
        try:
            for client in clients:
                assert client.stdout is not None
                assert await asyncio.to_thread(client.stdout.readline) == "sent\n"
        finally:
            for client in clients:
                client.kill()
            for client in clients:
                client.wait(10)
                if client.stdout is not None:
                    client.stdout.close()
        async with asyncio.timeout(20):
            while await streams_of(server):
                await asyncio.sleep(0.05)
        assert server.metric("aioaccel_in_flight", runner="slow_double") == 0
        for i in range(20):  # every key is free again
            async with connect(f"{url}?stream=cam{i}") as stream:
                await stream.end()
                if i % 2:  # the others leave before the server's end message: no error
                    assert [r async for r in stream] == []
        async with asyncio.timeout(20):
            while await streams_of(server):
                await asyncio.sleep(0.05)
        assert "Traceback" not in server.stderr()


# ---- shutdown ----------------------------------------------------------------------------------
async def test_on_sigterm_a_frame_read_but_not_admitted_is_answered() -> None:
    with serve("served_models:slow_double", "--maxsize", "1", latency=0.5) as server:
        async with connect(f"{server.ws}/v1/models/slow_double/stream?stream=cam") as stream:
            await stream.send(np.zeros((1, 1), np.float32), tag="admitted")
            await stream.send(np.ones((1, 1), np.float32), tag="read")  # waits for space
            async with asyncio.timeout(10):  # the server has read it and waits to admit it
                while not (found := await streams_of(server)) or found[0]["waiting"] < 1:
                    await asyncio.sleep(0.01)
            server.proc.send_signal(signal.SIGTERM)
            replies = [r async for r in stream]
            assert await stream.wait_closed() == 1001
        assert [r.tag for r in replies] == ["admitted", "read"]
        assert all(r.ok for r in replies)
        assert stream.ended == {"end": True, "frames": 2}
        assert await asyncio.to_thread(server.proc.wait, 30) == 0


# ---- the aiohttp integration -----------------------------------------------------------------
@asynccontextmanager
async def aiohttp_server(runner: aioaccel.Runner, **options: Any) -> AsyncIterator[str]:
    accel = accel_aiohttp.Accel(default=runner, **options)
    app = web.Application()
    accel.setup(app)
    app.router.add_get("/stream", accel.ws_handler())
    site_runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=10)
    await site_runner.setup()
    site = web.TCPSite(site_runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"ws://127.0.0.1:{site_runner.addresses[0][1]}/stream"
    finally:
        await site_runner.cleanup()


async def test_aiohttp_streams_refuse_keys_in_use_and_origins_and_send_binary_results() -> None:
    runner = aioaccel.open(SimulatedStage(lambda x: np.asarray(x) * 2), maxsize=4, name="aio")
    async with aiohttp_server(runner, allowed_origins=["http://ok.example"]) as url, \
            aiohttp.ClientSession() as session:
        async with connect(f"{url}?stream=cam") as owner:
            with pytest.raises(StreamRefused) as refused:
                async with connect(f"{url}?stream=cam"):
                    pass
            assert refused.value.status == 409
            frame = np.arange(4, dtype=np.int16).reshape(2, 2)
            await owner.send(frame, tag="x")
            await owner.end()
            (reply,) = [r async for r in owner]
            assert reply.outputs.dtype == np.int16 and np.array_equal(reply.outputs, frame * 2)
        with pytest.raises(aiohttp.WSServerHandshakeError) as denied:
            await session.ws_connect(url, headers={"Origin": "http://evil.example"})
        assert denied.value.status == 403
        async with session.ws_connect(url, headers={"Origin": "http://ok.example"}) as ws:
            await ws.send_str('{"tag": NaN, "inputs": [[1]]}')
            await ws.send_str(json.dumps({"end": True}))
            messages = [strict(m.data) async for m in ws if m.type == aiohttp.WSMsgType.TEXT]
        assert messages[0]["status"] == 422 and messages[0]["tag"] == 0



async def test_aiohttp_stop_ends_a_stream_waiting_for_frames_with_1001() -> None:
    runner = aioaccel.open(SimulatedStage(lambda x: np.asarray(x) + 1), maxsize=4, name="stop")
    accel = accel_aiohttp.Accel(default=runner)
    stop = asyncio.Event()
    app = web.Application()
    accel.setup(app)

    async def handler(request: web.Request) -> web.WebSocketResponse:
        return await accel.ws(request, runner, stop=stop)

    app.router.add_get("/stream", handler)
    site_runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=10)
    await site_runner.setup()
    site = web.TCPSite(site_runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"ws://127.0.0.1:{site_runner.addresses[0][1]}/stream"
        async with connect(url) as stream:
            await stream.send(np.zeros((1, 1), np.float32), tag="one")
            first = await stream.receive()
            assert first.tag == "one" and first.outputs.tolist() == [[1.0]]
            stop.set()  # the server is now waiting for the next frame: it stops waiting
            assert [r async for r in stream] == []
            assert stream.ended == {"end": True, "frames": 1}
            assert await stream.wait_closed() == 1001
        assert not runner.streams()
    finally:
        await site_runner.cleanup()


@pytest.mark.parametrize(("origin", "host", "allowed", "ok"), [
    (None, "127.0.0.1:8000", None, True),                      # not a browser
    ("http://127.0.0.1:8000", "127.0.0.1:8000", None, True),   # the server's own page
    ("http://localhost:8000", "127.0.0.1:8000", None, False),  # another origin, by name
    ("https://cams.example", "cams.example", None, True),      # default port, either way
    ("https://cams.example", "cams.example:443", None, True),
    ("http://cams.example", "cams.example:443", None, False),
    ("http://[::1]:8000", "[::1]:8000", None, True),
    ("null", "127.0.0.1:8000", None, False),                   # sandboxed or file: pages
    ("http://evil.example", "127.0.0.1:8000", None, False),
    ("http://evil.example", "127.0.0.1:8000", ["http://evil.example/"], True),
    ("http://evil.example", "127.0.0.1:8000", ["*"], True),
    ("http://evil.example:99999", "evil.example:99999", None, False),  # not a valid port
    ("ftp://127.0.0.1:8000", "127.0.0.1:8000", None, False),
])
def test_origin_allowed(origin: str | None, host: str, allowed: list[str] | None,
                        ok: bool) -> None:
    from aioaccel.integrations.streaming import origin_allowed

    assert origin_allowed(origin, host, allowed) is ok
