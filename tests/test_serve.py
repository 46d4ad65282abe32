"""``aioaccel serve`` as a real subprocess on 127.0.0.1: HTTP inference (JSON and .npy),
specs, 503 under overload, /metrics, /healthz, graceful SIGTERM, usage errors."""

from __future__ import annotations

import asyncio
import io
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving import ROOT, serve

import aioaccel
from aioaccel.testing.models import dense_chain

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> object:
    """The server is a subprocess: its loop is its own, so the client's loop is not under
    test here (one run, not one per loop)."""
    return "asyncio"

MODEL = dense_chain(16, 2, inputs=16)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return MODEL.write_onnx(tmp_path_factory.mktemp("serve") / "dense.onnx")


async def test_serves_several_models_over_json_and_npy(onnx_model: Path) -> None:
    x = MODEL.random_input()
    with serve(str(onnx_model), "--name", "dense", "served_models:slow_double") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            reply = await client.post("/v1/models/dense/infer", json=x.tolist())
            assert reply.status_code == 200, reply.text
            assert np.allclose(reply.json()["outputs"]["output"], MODEL.reference(x), atol=1e-4)
            reply = await client.post("/v1/models/dense/infer", content=npy(x),
                                      headers={"content-type": "application/x-npy",
                                               "accept": "application/x-npy"})
            assert reply.status_code == 200
            assert reply.headers["content-type"] == "application/x-npy"
            assert np.allclose(np.load(io.BytesIO(reply.content)), MODEL.reference(x),
                               atol=1e-4)
            # the second MODEL is served under its attribute name
            reply = await client.post("/v1/models/slow_double/infer", json=[[1.5, 2.0]])
            assert reply.status_code == 200 and reply.json()["outputs"] == [[3.0, 4.0]]

            spec = (await client.get("/v1/models/dense")).json()
            assert spec["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 16]}]
            assert spec["state"] == "ready" and spec["maxsize"] == 16
            listed = (await client.get("/v1/models")).json()["models"]
            assert [m["name"] for m in listed] == ["dense", "slow_double"]

            missing = await client.post("/v1/models/nope/infer", json=[[1.0]])
            assert missing.status_code == 404 and "dense" in missing.json()["detail"]
            wrong = await client.post("/v1/models/dense/infer", json=[[1.0, 2.0]])
            assert wrong.status_code == 422 and "input" in wrong.json()["detail"]
            junk = await client.post("/v1/models/dense/infer", content=b"\x93NUMPY junk",
                                     headers={"content-type": "application/x-npy"})
            assert junk.status_code == 422 and "Traceback" not in junk.text

            health = await client.get("/healthz")
            assert health.status_code == 200
            assert health.json()["models"]["dense"]["state"] == "ready"
            docs = await client.get("/docs")
            assert docs.status_code == 200 and "swagger" in docs.text.lower()
            paths = (await client.get("/openapi.json")).json()["paths"]
            assert {"/v1/models/{name}/infer", "/v1/models/{name}", "/healthz",
                    "/metrics"} <= set(paths)
        assert server.metric("aioaccel_items_completed_total", runner="dense") == 2
        assert server.metric("aioaccel_items_completed_total", runner="slow_double") == 1


async def test_overload_answers_503_with_retry_after() -> None:
    with serve("served_models:slow_double", "--maxsize", "1", "--admit-timeout", "0.05",
               latency=0.3) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            replies = await asyncio.gather(*(
                client.post("/v1/models/slow_double/infer", json=[[float(i)]])
                for i in range(6)))
        statuses = sorted(r.status_code for r in replies)
        assert 200 in statuses and 503 in statuses, statuses
        assert set(statuses) <= {200, 503}
        for reply in replies:
            if reply.status_code == 503:
                assert int(reply.headers["retry-after"]) >= 1
                assert "overloaded" in reply.json()["detail"]
            else:
                i = replies.index(reply)
                assert reply.json()["outputs"] == [[2.0 * i]]
        assert "Traceback" not in server.stderr()


async def test_sigterm_answers_every_accepted_request_and_exits_0() -> None:
    with serve("served_models:slow_double", "--maxsize", "2", "--admit-timeout", "20",
               latency=0.25) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            requests = [asyncio.ensure_future(
                client.post("/v1/models/slow_double/infer", json=[[float(i)]]))
                for i in range(5)]
            # every request reached the runner (admitted, or waiting for space) ...
            while (server.metric("aioaccel_items_pushed_total", runner="slow_double")
                   + server.metric("aioaccel_waiting", runner="slow_double")) < 5:
                await asyncio.sleep(0.02)
            assert server.metric("aioaccel_items_completed_total", runner="slow_double") < 5
            server.proc.send_signal(signal.SIGTERM)  # ... when the server is told to stop
            replies = await asyncio.gather(*requests)
        assert [r.status_code for r in replies] == [200] * 5
        assert [r.json()["outputs"] for r in replies] == [[[2.0 * i]] for i in range(5)]
        assert server.proc.wait(timeout=30) == 0
        assert "Traceback" not in server.stderr()


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aioaccel", "serve", *args, "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_usage_errors_name_what_was_wrong(tmp_path: Path, onnx_model: Path) -> None:
    missing = run_serve(str(tmp_path / "none.onnx"))
    assert missing.returncode == 2 and "model file not found" in missing.stderr
    names = run_serve(str(onnx_model), "--name", "a", "--name", "b")
    assert names.returncode == 2 and "one --name per MODEL" in names.stderr
    batch = run_serve(str(onnx_model), "--batch", "0")
    assert batch.returncode == 2 and "--batch takes a positive int or 'auto'" in batch.stderr
    option = run_serve(str(onnx_model), "--option", "not a pair")
    assert option.returncode == 2 and "key=value" in option.stderr
    unknown = run_serve(str(onnx_model), "--option", "no_such_option=1")
    assert unknown.returncode == 2 and "no_such_option" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    cpus = run_serve(str(onnx_model), "--cpus", "4096")
    assert cpus.returncode == 2 and "CPU 4096 is not one this process may run on" in cpus.stderr


def test_batch_passes_through_to_open(onnx_model: Path) -> None:
    """Before batching lands, the command says so clearly (exit 2, no traceback); after, the
    flag reaches ``aioaccel.open(batch=...)`` (then its own tests cover it)."""
    batch = run_serve(str(onnx_model), "--batch", "auto", "--host", "256.0.0.1")
    if batch.returncode == 2:
        assert "--batch is not supported" in batch.stderr and "Traceback" not in batch.stderr


async def test_restart_passes_a_restart_policy_to_open(onnx_model: Path) -> None:
    if not hasattr(aioaccel, "Restart"):
        refused = run_serve(str(onnx_model), "--restart")
        assert refused.returncode == 2 and "aioaccel.Restart" in refused.stderr
        return
    bad = run_serve(str(onnx_model), "--restart", "limit=0")
    assert bad.returncode == 2 and "--restart: Restart.limit" in bad.stderr
    unknown = run_serve(str(onnx_model), "--restart", "tries=3")
    assert unknown.returncode == 2 and "tries" in unknown.stderr
    for flags, healed in ((("--restart", "limit=2,backoff=0.05"), True), ((), False)):
        with serve("served_models:flaky_double", *flags) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                replies = []
                for i in range(5):  # the third call is a fatal device failure
                    replies.append(await client.post("/v1/models/flaky_double/infer",
                                                     json=[[float(i)]]))
                    if i == 2:  # let a restart finish before the next request
                        while healed and (await client.get("/healthz")).status_code != 200:
                            await asyncio.sleep(0.02)
                health = await client.get("/healthz")
        statuses = [r.status_code for r in replies]
        if healed:  # only the item on the failed device is lost
            assert statuses == [200, 200, 503, 200, 200], statuses
            assert health.status_code == 200
            assert health.json()["models"]["flaky_double"]["restarts"] == 1
        else:  # broken for good
            assert statuses == [200, 200, 503, 503, 503], statuses
            assert health.status_code == 503
            assert health.json()["models"]["flaky_double"]["state"] == "broken"


async def test_sigterm_ends_streams_and_status_feeds_instead_of_waiting_for_them() -> None:
    """Open WebSocket streams and status feeds would hold uvicorn's drain until its timeout:
    on SIGTERM the streams answer their accepted frames and close with 1001, the feeds end,
    and the server exits 0 well before the drain timeout."""
    from aioaccel.client import connect

    with serve("served_models:slow_double", "--maxsize", "4", "--drain-timeout", "20",
               latency=0.2) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client, \
                client.stream("GET", "/v1/status/events") as feed, \
                connect(f"{server.ws}/v1/models/slow_double/stream") as stream:
            lines = feed.aiter_lines()
            assert (await anext(lines)).startswith("data: {")
            for i in range(3):
                await stream.send(np.array([[float(i)]]), tag=i)
            while server.metric("aioaccel_items_pushed_total", runner="slow_double") < 3:
                await asyncio.sleep(0.02)
            started = asyncio.get_running_loop().time()
            server.proc.send_signal(signal.SIGTERM)
            replies = [r async for r in stream]
            assert [r.tag for r in replies] == [0, 1, 2]  # accepted frames answered
            assert [r.outputs.tolist() for r in replies] == [[[0.0]], [[2.0]], [[4.0]]]
            assert stream.ended == {"end": True, "frames": 3}
            assert await stream.wait_closed() == 1001  # going away: the server shuts down
            async for _ in lines:  # the feed ends instead of holding the drain
                pass
        assert await asyncio.to_thread(server.proc.wait, 30) == 0
        assert asyncio.get_running_loop().time() - started < 10
