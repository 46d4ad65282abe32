"""Hostile clients against both web integrations, on real servers on 127.0.0.1: every bad body
is a 4xx with a short message naming what was wrong, never a 500; slow, leaving and
disconnecting clients cost nothing lasting; JSON out is strict; internals stay on the server."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from time import perf_counter, thread_time
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from aiohttp import web
from fastapi import Depends, FastAPI, Request, Response

import aioaccel
from aioaccel import Model, StageSpec, TensorSpec
from aioaccel.integrations import aiohttp as accel_aiohttp
from aioaccel.integrations import bodies, http
from aioaccel.integrations import fastapi as accel_fastapi
from aioaccel.stages import made
from aioaccel.tensors import InputValidator
from aioaccel.testing import SimulatedStage

pytestmark = pytest.mark.anyio

FRAMEWORKS = ["fastapi", "aiohttp"]


def typed_runner(fn: Callable[[np.ndarray], Any], dtype: str, shape: tuple[int | None, ...],
                 **options: Any) -> aioaccel.Runner:
    """A runner with a real input spec (input ``x``) around a plain function of ``x``."""
    spec = TensorSpec("x", dtype, shape)

    def stage(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"y": fn(inputs["x"])}

    def load() -> Model:
        return Model(stages=[StageSpec("typed", made(stage))], inputs=[spec],
                     prepare=InputValidator([spec]))

    return aioaccel.Runner(load, **options)


@asynccontextmanager
async def served(framework: str, runner: aioaccel.Runner, *, handler_cancellation: bool = True,
                 **options: Any) -> AsyncIterator[str]:
    """A real server for ``runner`` with POST /infer and GET /healthz; yields its URL."""
    if framework == "fastapi":
        accel = accel_fastapi.Accel(default=runner, **options)
        app = FastAPI(lifespan=accel.lifespan)

        @app.post("/infer")
        async def infer(request: Request,
                        runner: aioaccel.Runner = Depends(accel.runner())) -> Response:  # noqa: B008
            return await accel.infer(request, runner, await accel.read_inputs(request, runner))

        @app.get("/healthz")
        async def healthz() -> Response:
            return accel.health()

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="on",
                                               timeout_graceful_shutdown=10))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:  # uvicorn has no started event to await
            if task.done():
                await task
            await asyncio.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            await task
            sock.close()
        return
    accel_a = accel_aiohttp.Accel(default=runner, **options)
    web_app = web.Application(client_max_size=accel_a.max_body)
    accel_a.setup(web_app)

    async def infer_a(request: web.Request) -> web.Response:
        return await accel_a.infer(request, runner, await accel_a.read_inputs(request, runner))

    async def healthz_a(request: web.Request) -> web.Response:
        return accel_a.health()

    web_app.router.add_post("/infer", infer_a)
    web_app.router.add_get("/healthz", healthz_a)
    app_runner = web.AppRunner(web_app, handler_cancellation=handler_cancellation,
                               shutdown_timeout=10)
    await app_runner.setup()
    site = web.TCPSite(app_runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{app_runner.addresses[0][1]}"
    finally:
        await app_runner.cleanup()


def detail(reply: httpx.Response) -> str:
    """The error message, whichever framework wrote it."""
    try:
        return str(reply.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return reply.text


def strict_json(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


async def wait_for(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds: for effects inside a server with no event to await."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


NPY = {"content-type": "application/x-npy"}
JSON = {"content-type": "application/json"}


# ---- bodies ---------------------------------------------------------------------------------
@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_hostile_json_for_a_float_model_is_422_naming_what_was_wrong(framework: str) -> None:
    runner = typed_runner(lambda x: x * 2, "float32", (1, 4))
    cases = {
        "[[true, 1.0, 2.0, 3.0]]": "booleans",
        "[[true, false, true, true]]": "booleans",
        "[[1e39, 0, 0, 0]]": "1e+39 overflows float32",
        "[[NaN, 0, 0, 0]]": "not JSON",
        "[[Infinity, 0, 0, 0]]": "not JSON",
        '[["1", 0, 0, 0]]': "expected numbers",
        "[[null, 0, 0, 0]]": "expected numbers",
        "[[1, 2], [3]]": "ragged",
        "[" * 100_000 + "]" * 100_000: "nested too deeply",
        '{"a":' * 100_000 + "1" + "}" * 100_000: "nested too deeply",
        json.dumps([[0.5] * 4] * 100_000): "takes at most 4",
        '"just a string"': "nested list",
        "{not json": "not JSON",
        '{"x": {"y": 1}}': "got an object",
    }
    async with served(framework, runner) as url, httpx.AsyncClient(base_url=url,
                                                                  timeout=30) as client:
        for body, expected in cases.items():
            reply = await client.post("/infer", content=body, headers=JSON)
            assert reply.status_code == 422, (body[:40], reply.status_code, reply.text[:200])
            assert expected in detail(reply), (body[:40], detail(reply))
            assert len(detail(reply)) < 300
        good = await client.post("/infer", json=[[1.0, 2, 3, 4]])
        assert good.status_code == 200 and good.json()["outputs"]["y"] == [[2.0, 4.0, 6.0, 8.0]]
    assert runner.stats().pushed == 1  # nothing bad reached the runner


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_integers_out_of_range_or_not_integral_are_422_for_an_integer_model(
        framework: str) -> None:
    runner = typed_runner(lambda x: x + 0, "uint8", (None,))
    cases = {"[300]": "300 is out of range for uint8 (0..255)",
             "[-1, 2]": "-1 is out of range for uint8",
             "[1.5]": "takes integers (uint8), got 1.5",
             "[1, true]": "booleans",
             f"[{2 ** 70}]": "integers too large"}
    async with served(framework, runner) as url, httpx.AsyncClient(base_url=url,
                                                                  timeout=30) as client:
        for body, expected in cases.items():
            reply = await client.post("/infer", content=body, headers=JSON)
            assert reply.status_code == 422, (body, reply.text)
            assert expected in detail(reply) and "'x'" in detail(reply), detail(reply)
        good = await client.post("/infer", json=[0, 7, 255])
        assert good.status_code == 200 and good.json()["outputs"]["y"] == [0, 7, 255]


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_npy_bodies_are_checked_before_anything_is_allocated(framework: str) -> None:
    runner = typed_runner(lambda x: x * 2, "float32", (None, 4))
    cases = {
        npy_header((1 << 40,)) + b"\0" * 64: "header says float32[1099511627776]",
        npy_header((2, 4)) + b"\0" * 8: "the body holds 8 bytes",
        npy_header((1,), "|O") + b"x" * 16: "never accepted",
        b"\x93NUMPY garbage": "not a .npy array",
        npy(np.zeros((2, 4), np.float64)): "expected dtype float32, got float64",
    }
    tracemalloc.start()
    try:
        async with served(framework, runner) as url, httpx.AsyncClient(base_url=url,
                                                                      timeout=30) as client:
            for body, expected in cases.items():
                reply = await client.post("/infer", content=body, headers=NPY)
                assert reply.status_code == 422, (body[:20], reply.text)
                assert expected in detail(reply), detail(reply)
            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            good = await client.post("/infer", content=npy(x), headers=NPY)
            assert good.status_code == 200 and good.json()["outputs"]["y"] == (x * 2).tolist()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024  # the 4 TiB header allocated nothing of the sort


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_nan_and_infinity_in_outputs_are_written_as_null(framework: str) -> None:
    special = np.array([np.nan, np.inf, -np.inf, 1.5], np.float32)
    runner = typed_runner(lambda x: special * x, "float32", (4,))
    async with served(framework, runner) as url, httpx.AsyncClient(base_url=url,
                                                                  timeout=30) as client:
        reply = await client.post("/infer", json=[1.0, 1.0, 1.0, 2.0])
    assert reply.status_code == 200
    assert strict_json(reply.text) == {"outputs": {"y": [None, None, None, 3.0]}}


def test_jsonable_keeps_finite_values_and_nulls_the_rest() -> None:
    values = np.array([[1.5, np.nan], [np.inf, -np.inf]], np.float32)
    assert bodies.jsonable({"a": values, "b": np.float64("nan"), "c": [float("inf"), 2]}) == {
        "a": [[1.5, None], [None, None]], "b": None, "c": [None, 2]}
    body, _ = bodies.encode_outputs({"y": values}, None)
    assert strict_json(body.decode()) == {"outputs": {"y": [[1.5, None], [None, None]]}}


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_runtime_failure_answers_an_error_id_and_the_detail_stays_in_the_log(
        framework: str, caplog: pytest.LogCaptureFixture) -> None:
    def broken(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("cannot mmap /srv/secret/models/detector.bin")

    runner = typed_runner(broken, "float32", (2,))
    with caplog.at_level(logging.ERROR, logger="aioaccel.http"):
        async with served(framework, runner) as url, httpx.AsyncClient(base_url=url,
                                                                      timeout=30) as client:
            reply = await client.post("/infer", json=[1.0, 2.0])
            again = await client.post("/infer", json=[1.0, 2.0])
    assert reply.status_code == 500 and again.status_code == 500
    assert "/srv" not in reply.text and "detector" not in reply.text
    error_id = detail(reply).split("error id ")[1].rstrip(")")
    assert len(error_id) == 12 and error_id not in again.text  # one id per failure
    logged = [r.getMessage() for r in caplog.records if error_id in r.getMessage()]
    assert len(logged) == 1 and "/srv/secret/models/detector.bin" in logged[0]


# ---- slow, leaving and disconnecting clients ------------------------------------------------
async def raw_request(url: str, head_body: bytes) -> tuple[asyncio.StreamReader,
                                                            asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head_body)
    await writer.drain()
    return reader, writer


def partial_post(length: int, sent: bytes) -> bytes:
    return (f"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode() + sent


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_body_that_trickles_in_past_body_timeout_gets_408(framework: str) -> None:
    runner = typed_runner(lambda x: x, "float32", (None,))
    async with served(framework, runner, body_timeout=0.3) as url:
        started = perf_counter()
        reader, writer = await raw_request(url, partial_post(1000, b"[1.0, "))
        try:
            status = await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()
        waited = perf_counter() - started
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            assert (await client.post("/infer", json=[1.0])).status_code == 200
    assert b" 408 " in status, status
    assert 0.25 < waited < 5
    assert runner.stats().pushed == 1


@pytest.mark.parametrize(("framework", "cancelling"),
                         [("fastapi", True), ("aiohttp", True), ("aiohttp", False)])
async def test_a_client_leaving_mid_body_is_one_log_line_and_no_traceback(
        framework: str, cancelling: bool, caplog: pytest.LogCaptureFixture) -> None:
    runner = typed_runner(lambda x: x, "float32", (None,))
    with caplog.at_level(logging.INFO):
        async with served(framework, runner, handler_cancellation=cancelling) as url:
            for _ in range(3):
                _, writer = await raw_request(url, partial_post(100_000, b"[1.0, 2.0, "))
                writer.close()
                await writer.wait_closed()
            await wait_for(lambda: sum("left after sending" in r.getMessage()
                                       for r in caplog.records) == 3)
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                assert (await client.post("/infer", json=[1.0])).status_code == 200
    lines = [r for r in caplog.records if "left after sending" in r.getMessage()]
    assert len(lines) == 3 and all(r.exc_info is None for r in lines)
    noisy = [r.getMessage() for r in caplog.records
             if r.exc_info is not None or r.levelno >= logging.ERROR]
    assert not noisy, noisy


@pytest.mark.parametrize(("framework", "cancelling"),
                         [("fastapi", True), ("aiohttp", True), ("aiohttp", False)])
async def test_clients_that_leave_while_their_item_waits_are_withdrawn(
        framework: str, cancelling: bool) -> None:
    """40 clients; the model holds the first; 30 leave: their items are withdrawn (counted),
    the other 10 are answered. aiohttp is tried with and without handler_cancellation."""
    stage = SimulatedStage(lambda x: np.asarray(x) * 2, hang_at=[0])
    runner = aioaccel.open(stage, maxsize=64)
    async with served(framework, runner, handler_cancellation=cancelling,
                      admit_timeout=30) as url:
        clients = [httpx.AsyncClient(base_url=url, timeout=30) for _ in range(40)]
        try:
            first = asyncio.create_task(clients[0].post("/infer", json=[0]))
            await asyncio.to_thread(stage.hanging.wait, 5)
            rest = [asyncio.create_task(c.post("/infer", json=[i]))
                    for i, c in enumerate(clients[1:], 1)]
            await wait_for(lambda: runner.stats().pushed == 40)
            for task, client in zip(rest[:30], clients[1:31]):
                task.cancel()
                await client.aclose()  # the client is gone: its connection closes
            await wait_for(lambda: runner.stats().withdrawn == 30)
            stage.release()
            answers = await asyncio.gather(first, *rest[30:])
        finally:
            stage.release()
            for client in clients:
                await client.aclose()
    assert [a.json()["outputs"] for a in answers] == [[0]] + [[2 * i] for i in range(31, 40)]
    stats = runner.stats()
    assert stats.withdrawn == 30 and stats.completed == 10 and stage.calls == 10


# ---- decoding cost --------------------------------------------------------------------------
async def test_large_bodies_are_decoded_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    original = http.decode_inputs

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread())
        return original(*args)

    monkeypatch.setattr(http, "decode_inputs", spy)
    specs = [TensorSpec("x", "float32", (None,))]
    small = json.dumps([0.5] * 10).encode()
    large = json.dumps([0.5] * (http.OFF_LOOP_BYTES // 4)).encode()
    assert (await http.decode_inputs_off_loop(small, None, specs)).shape == (10,)
    assert (await http.decode_inputs_off_loop(large, None, specs)).dtype == np.float32
    assert threads[0] is threading.current_thread()
    assert threads[1] is not threading.current_thread()


def test_a_body_too_big_for_the_model_is_refused_before_it_is_parsed() -> None:
    body = json.dumps([[0.25] * 1000] * 2000).encode()  # ~12 MB, 2M values
    specs = [TensorSpec("x", "float32", (1, 16))]
    tracemalloc.start()
    started = thread_time()  # CPU, not the wall clock a loaded machine stretches
    try:
        with pytest.raises(aioaccel.InputError, match="takes at most 16"):
            http.decode_inputs(body, "application/json", specs)
        elapsed = thread_time() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024 and elapsed < 0.5


def test_decoding_a_large_json_body_peaks_at_a_small_multiple_of_it() -> None:
    rows = np.random.default_rng(0).standard_normal((20_000, 32)).round(3)
    body = json.dumps(rows.tolist()).encode()
    specs = [TensorSpec("x", "float32", (None, 32))]
    tracemalloc.start()
    try:
        out = http.decode_inputs(body, "application/json", specs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (20_000, 32) and np.allclose(out, rows.astype(np.float32))
    assert peak < 4 * len(body), peak / len(body)  # json.loads alone: over 6x


@pytest.mark.parametrize("fast", [True, False])
def test_the_array_fast_path_and_json_loads_agree(fast: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bodies, "FAST_JSON_BYTES", 0 if fast else 1 << 62)
    specs = [TensorSpec("x", "float32", (None, 2))]
    accepted = {
        "[[1, 2], [3, 4]]": [[1, 2], [3, 4]],
        ' [ [ 1.5e-3 ,\n -0 ] , [ 1E+2, 2 ] ] ': [[1.5e-3, 0], [100, 2]],
        '{"inputs": [[1, 2]]}': [[1, 2]],
        '{"x": [[1, 2]]}': {"x": [[1, 2]]},
    }
    for body, expected in accepted.items():
        out = http.decode_inputs(body.encode(), None, specs)
        if isinstance(expected, dict):
            assert isinstance(out, dict) and out["x"].dtype == np.float32
            assert out["x"].tolist() == expected["x"]
        else:
            assert out.dtype == np.float32 and np.allclose(out, np.array(expected))
    refused = {"[[1, 2], [3]]": "'x'", "[[1,, 2]]": "not JSON", "[[1 2]]": "not JSON",
               "[[1e39, 2]]": "overflows float32", "[[true, 2]]": "booleans",
               "[[NaN, 2]]": "not JSON", "[[-, 2]]": "not JSON"}
    for body, message in refused.items():
        with pytest.raises(aioaccel.InputError, match=re.escape(message)):
            http.decode_inputs(body.encode(), None, specs)
    for body in ('{"y": [[1, 2]]}', "[[]]"):  # decoded, then refused by the runner's check
        with pytest.raises(aioaccel.InputError):
            InputValidator(specs)(http.decode_inputs(body.encode(), None, specs))
