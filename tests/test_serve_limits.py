"""``aioaccel serve``'s HTTP edges, on a real server (a subprocess on 127.0.0.1) and on both
integrations in process: header and idle deadlines, ``.npy`` bodies with impossible shapes,
``Accept`` weights, a second signal, and the help's own examples (issue 26 item 8)."""

from __future__ import annotations

import asyncio
import io
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from serving import ROOT, serve
from test_web_hostile import FRAMEWORKS, detail, served, typed_runner

from aioaccel.client import connect
from aioaccel.integrations import bodies
from aioaccel.integrations.negotiation import NotAcceptable, acceptable

pytestmark = pytest.mark.anyio


def npy_with_shape(shape_text: bytes) -> bytes:
    """A float32 (2, 2) .npy whose header's shape is replaced by ``shape_text`` (same length,
    so the data still starts where the header says)."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 2), np.float32))
    data = buffer.getvalue()
    assert len(shape_text) == len(b"(2, 2), }")
    return data.replace(b"(2, 2), }", shape_text)


# ---- .npy bodies whose header cannot describe an array ---------------------------------------
@pytest.mark.parametrize("shape", [b"(-2,-2),}", b"(-1, 4),}", b"(-4,-1),}", b"(2, 2),  "])
def test_npy_headers_with_negative_dims_or_broken_syntax_are_input_errors(shape: bytes) -> None:
    with pytest.raises(bodies.InputError, match=r"\.npy"):
        bodies.decode_npy(npy_with_shape(shape))


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_negative_dims_npy_body_is_422_not_500(framework: str) -> None:
    runner = typed_runner(lambda x: x, "float32", (2, 2))
    async with served(framework, runner) as url, httpx.AsyncClient(timeout=10) as client:
        for shape in (b"(-2,-2),}", b"(-1, 4),}", b"(2, 2),  "):
            reply = await client.post(f"{url}/infer", content=npy_with_shape(shape),
                                      headers={"content-type": "application/x-npy"})
            assert reply.status_code == 422, reply.text
            assert ".npy" in detail(reply) and "Traceback" not in reply.text
        good = await client.post(f"{url}/infer", content=npy_with_shape(b"(2, 2), }"),
                                 headers={"content-type": "application/x-npy"})
        assert good.status_code == 200  # nothing else was affected


# ---- Accept ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("accept", "chosen"), [
    (None, "application/json"),
    ("application/x-npy", "application/x-npy"),
    ("application/x-npy;q=0", "application/json"),
    ("application/x-npy; q=0, application/json", "application/json"),
    ("application/json;q=0.5, application/x-npy", "application/x-npy"),
    ("application/json;q=0, application/x-npy", "application/x-npy"),
    ("application/x-npy, application/json", "application/x-npy"),
    ("application/json, application/x-npy", "application/json"),
    ("*/*", "application/json"),
    ("application/*;q=0.1, application/x-npy;q=0.9", "application/x-npy"),
    ("*/*;q=0.5, application/json;q=0", "application/x-npy"),
    ("text/html", "application/json"),
    ("application/x-npy;q=nan", "application/json"),
])
def test_accept_weights_choose_the_response_type(accept: str | None, chosen: str) -> None:
    assert acceptable(accept)[0] == chosen


@pytest.mark.parametrize("accept", ["application/json;q=0",
                                    "application/json;q=0, application/x-npy;q=0",
                                    "*/*;q=0"])
def test_an_accept_that_refuses_both_types_is_not_acceptable(accept: str) -> None:
    with pytest.raises(NotAcceptable, match="refuses"):
        acceptable(accept)


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_accept_q0_is_honoured_over_http(framework: str) -> None:
    runner = typed_runner(lambda x: x * 2, "float32", (1, 2))
    async with served(framework, runner) as url, httpx.AsyncClient(timeout=10) as client:
        body = {"json": [[1.0, 2.0]]}
        refused = await client.post(f"{url}/infer", **body,
                                    headers={"accept": "application/x-npy;q=0"})
        assert refused.status_code == 200
        assert refused.headers["content-type"].startswith("application/json")
        assert refused.json()["outputs"]["y"] == [[2.0, 4.0]]
        preferred = await client.post(f"{url}/infer", **body, headers={
            "accept": "application/json;q=0.2, application/x-npy"})
        assert preferred.headers["content-type"] == "application/x-npy"
        assert np.load(io.BytesIO(preferred.content)).tolist() == [[2.0, 4.0]]
        none = await client.post(f"{url}/infer", **body,
                                 headers={"accept": "application/json;q=0"})
        assert none.status_code == 406 and "refuses" in detail(none)
        # the 406 cost the device nothing
        assert runner.stats().pushed == 2


def test_several_outputs_answer_json_when_npy_is_preferred_but_json_accepted() -> None:
    outputs = {"a": np.ones(2, np.float32), "b": np.zeros(1, np.int64)}
    _, kind = bodies.encode_outputs(outputs, "application/x-npy, application/json;q=0.5")
    assert kind == "application/json"
    with pytest.raises(NotAcceptable, match="one-output"):
        bodies.encode_outputs(outputs, "application/x-npy")


# ---- header and idle deadlines (aioaccel serve) ----------------------------------------------
def _accepts(port: int) -> bool:
    """Whether the server on ``port`` still accepts connections."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def _closed_within(sock: socket.socket, seconds: float) -> tuple[float, bytes]:
    """(seconds until the server closed ``sock``, what it sent before)."""
    sock.settimeout(seconds)
    started = time.monotonic()
    received = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            raise AssertionError(f"still open after {seconds} s; got {received!r}") from None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return time.monotonic() - started, received
        received += chunk


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a subprocess: its own loop
async def test_connections_that_send_nothing_or_trickle_headers_are_closed() -> None:
    with serve("served_models:slow_double", "--header-timeout", "1",
               "--keep-alive-timeout", "1", latency=0.0) as server:
        host, port = "127.0.0.1", server.port
        silent = socket.create_connection((host, port))
        trickle = socket.create_connection((host, port))
        idle = socket.create_connection((host, port))
        try:
            # a trickle: one header byte every 0.2 s, forever if the server let it
            async def drip() -> None:
                for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                    try:
                        trickle.send(bytes([byte]))
                    except OSError:
                        return
                    await asyncio.sleep(0.2)

            dripping = asyncio.create_task(drip())
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            elapsed, _ = await asyncio.to_thread(_closed_within, silent, 10)
            assert elapsed < 5
            elapsed, sent = await asyncio.to_thread(_closed_within, trickle, 10)
            assert b"408" in sent.split(b"\r\n")[0]
            dripping.cancel()
            # a keep-alive connection that answered and then idles is closed too
            elapsed, sent = await asyncio.to_thread(_closed_within, idle, 10)
            assert sent.startswith(b"HTTP/1.1 200")
        finally:
            for s in (silent, trickle, idle):
                s.close()
        # an honest client is not hurried: a WebSocket lives past the header deadline
        async with connect(f"{server.ws}/v1/models/slow_double/stream") as stream:
            await asyncio.sleep(2.5)  # longer than --header-timeout: that is the point
            await stream.send(np.ones((1, 2), np.float32), tag="late")
            await stream.end()
            assert [r.tag async for r in stream] == ["late"]
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(f"{server.url}/healthz")).status_code == 200


# ---- signals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # a subprocess: its own loop
async def test_a_second_sigint_exits_at_once_while_the_first_would_drain() -> None:
    # 2 s a frame and 8 frames admitted: a graceful drain takes ~16 s (and may take 30)
    with serve("served_models:slow_double", "--maxsize", "8", "--drain-timeout", "30",
               latency=2.0) as server:
        async with connect(f"{server.ws}/v1/models/slow_double/stream") as stream:
            for i in range(8):
                await stream.send(np.full((1, 1), float(i), np.float32))
            async with asyncio.timeout(10), httpx.AsyncClient(timeout=10) as client:
                while (await client.get(f"{server.url}/v1/status")).json()[
                        "models"]["slow_double"]["in_flight"] < 8:
                    await asyncio.sleep(0.05)
            server.proc.send_signal(signal.SIGINT)
            # the first one has started the drain once the server stops accepting (nothing
            # else tells; a fixed pause could end before a loaded server acted on it, and two
            # signals seen as one would drain)
            deadline = time.monotonic() + 10
            while await asyncio.to_thread(_accepts, server.port):
                assert time.monotonic() < deadline, "the first SIGINT started no drain"
                await asyncio.sleep(0.05)
            assert server.proc.poll() is None  # draining, not gone
            started = time.monotonic()
            server.proc.send_signal(signal.SIGINT)
            code = await asyncio.to_thread(server.proc.wait, 20)
            assert time.monotonic() - started < 6.0  # at once: the drain takes 16 s or more
            assert code == 0
        assert "Traceback" not in server.stderr()


def test_the_restart_example_in_the_help_works() -> None:
    shown = subprocess.run([sys.executable, "-m", "aioaccel", "serve", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    text = " ".join(shown.stdout.split())
    example = re.search(r"e\.g\. (--restart \S+)", text)
    assert example is not None, text
    flag, value = example.group(1).split(" ", 1) if " " in example.group(1) else (
        "--restart", example.group(1).removeprefix("--restart"))
    with serve("served_models:slow_double", flag, value.strip().rstrip(")")) as server:
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_a_restart_option_that_does_not_exist_names_the_ones_that_do() -> None:
    done = subprocess.run([sys.executable, "-m", "aioaccel", "serve", "served_models:slow_double",
                           "--restart", "max_restarts=5", "--port", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ,
                               "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}"})
    assert done.returncode == 2
    assert "max_restarts" in done.stderr and "limit" in done.stderr


# ---- the loop ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "loop"), [((), "uvloop"), (("--loop", "asyncio"), "asyncio"),
                                             (("--no-uvloop",), "asyncio")])
def test_serve_runs_on_uvloop_unless_turned_off(flags: tuple[str, ...], loop: str) -> None:
    with serve("served_models:slow_double", *flags, latency=0.0) as server:
        assert f" on {loop};" in server.banner
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
async def test_the_header_deadline_works_on_both_uvicorn_http_protocols(protocol: str) -> None:
    import uvicorn
    from fastapi import FastAPI
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from aioaccel.serve.limits import guarded

    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    base = HttpToolsProtocol if protocol == "httptools" else H11Protocol
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                           http=guarded(base, 0.5), timeout_keep_alive=30))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:  # uvicorn has no started event to await
            await asyncio.sleep(0.01)
        silent = socket.create_connection(("127.0.0.1", port))
        partial = socket.create_connection(("127.0.0.1", port))
        keep = socket.create_connection(("127.0.0.1", port))
        try:
            partial.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")  # never finished
            keep.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            elapsed, _ = await asyncio.to_thread(_closed_within, silent, 5)
            assert elapsed < 3
            _, sent = await asyncio.to_thread(_closed_within, partial, 5)
            assert sent.startswith(b"HTTP/1.1 408")
            # keep-alive is 30 s here: the deadline for the next request's headers closes it
            _, sent = await asyncio.to_thread(_closed_within, keep, 5)
            assert sent.startswith(b"HTTP/1.1 200") and b'{"ok":true}' in sent
        finally:
            for s in (silent, partial, keep):
                s.close()
        async with httpx.AsyncClient(timeout=10) as client:  # an honest client is served
            assert (await client.get(f"http://127.0.0.1:{port}/ping")).json() == {"ok": True}
    finally:
        server.should_exit = True
        await task
        sock.close()


def test_a_header_deadline_must_be_positive() -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from aioaccel.serve.limits import guarded

    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="header_timeout"):
            guarded(H11Protocol, bad)
