"""The Open Inference Protocol (KServe v2) of ``aioaccel serve``, driven by Triton's own clients
(``tritonclient.http``, ``tritonclient.grpc`` and their aio variants) against a real server
subprocess: health, metadata, infer (binary and JSON, several inputs and outputs, rows on the
batch dimension), BYTES refused, errors as the protocol answers them, gRPC streams in order,
cancellation withdrawing items, /metrics. Results are compared with ONNX Runtime's own."""

from __future__ import annotations

import asyncio
import gzip
import json
import queue
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving import ROOT, Served, serve

from aioaccel.testing.models import dense_chain

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
tritonhttp_aio = pytest.importorskip("tritonclient.http.aio")
tritongrpc_aio = pytest.importorskip("tritonclient.grpc.aio")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.anyio

DENSE = dense_chain(16, 2, inputs=16)


@pytest.fixture
def anyio_backend() -> object:
    """The server is a subprocess with its own loop: one client run, not one per loop."""
    return "asyncio"


def write_mixed(path: Path) -> Path:
    """Two inputs, three outputs, three datatypes, a dynamic batch dimension:
    ``sum = a + float(b)`` (FP32), ``twice = 2 * b`` (INT64), ``positive = a > 0`` (BOOL)."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["a", "bf"], ["sum"]),
         helper.make_node("Add", ["b", "b"], ["twice"]),
         helper.make_node("Constant", [], ["zero"], value_float=0.0),
         helper.make_node("Greater", ["a", "zero"], ["positive"])],
        "mixed",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("b", TensorProto.INT64, ["n", 4])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("twice", TensorProto.INT64, ["n", 4]),
         helper.make_tensor_value_info("positive", TensorProto.BOOL, ["n", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("v2")
    return DENSE.write_onnx(folder / "dense.onnx"), write_mixed(folder / "mixed.onnx")


@pytest.fixture(scope="module")
def server(models: tuple[Path, Path]) -> Iterator[Served]:
    dense, mixed = models
    with serve(str(dense), "--name", "dense", str(mixed), "--name", "mixed",
               "--grpc-port", "0") as served:
        yield served


def raw(model: Path, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    """What ONNX Runtime itself answers."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


def http_client(server: Served) -> object:
    return tritonhttp.InferenceServerClient(server.url.removeprefix("http://"))


def mixed_inputs(module: object, binary: bool | None = None) -> tuple[list[object], dict]:
    a = np.array([[1.5, -2.0, 0.0, 3.25], [-1.0, 2.0, 4.0, -0.5]], np.float32)
    b = np.array([[1, 2, 3, 4], [-5, 6, 7, 1 << 40]], np.int64)
    inputs = [module.InferInput("a", list(a.shape), "FP32"),
              module.InferInput("b", list(b.shape), "INT64")]
    for tensor, value in zip(inputs, (a, b)):
        if binary is None:
            tensor.set_data_from_numpy(value)
        else:
            tensor.set_data_from_numpy(value, binary_data=binary)
    return inputs, {"a": a, "b": b}


# ---- health and metadata ---------------------------------------------------------------------
def test_health_and_metadata_over_http_and_grpc(server: Served) -> None:
    rest = http_client(server)
    grpc = tritongrpc.InferenceServerClient(server.grpc)
    for client in (rest, grpc):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("dense") and client.is_model_ready("mixed")
        assert client.is_model_ready("dense", "1")
    meta = rest.get_server_metadata()
    assert meta["name"] == "aioaccel" and "binary_tensor_data" in meta["extensions"]
    assert grpc.get_server_metadata(as_json=True)["name"] == "aioaccel"

    mixed = rest.get_model_metadata("mixed")
    assert mixed["name"] == "mixed" and mixed["versions"] == ["1"]
    assert mixed["platform"] == "onnxruntime_onnx"
    assert mixed["inputs"] == [{"name": "a", "datatype": "FP32", "shape": [-1, 4]},
                               {"name": "b", "datatype": "INT64", "shape": [-1, 4]}]
    assert [(o["name"], o["datatype"]) for o in mixed["outputs"]] == [
        ("sum", "FP32"), ("twice", "INT64"), ("positive", "BOOL")]
    over_grpc = grpc.get_model_metadata("mixed", as_json=True)
    assert [i["datatype"] for i in over_grpc["inputs"]] == ["FP32", "INT64"]
    assert over_grpc["inputs"][0]["shape"] == ["-1", "4"]  # int64 in proto JSON: strings
    assert rest.get_model_metadata("dense", "1")["inputs"][0]["shape"] == [1, 16]

    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        rest.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        grpc.get_model_metadata("nope")
    with pytest.raises(InferenceServerException, match="no version '2'"):
        rest.get_model_metadata("dense", "2")
    assert not rest.is_model_ready("nope")
    grpc.close()
    rest.close()


# ---- infer over REST -------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_infer_equals_the_runtime(server: Served, models: tuple[Path, Path],
                                       binary: bool) -> None:
    rest = http_client(server)
    x = DENSE.random_input()
    tensor = tritonhttp.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = rest.infer("dense", [tensor], request_id="req-7", outputs=[
        tritonhttp.InferRequestedOutput("output", binary_data=binary)])
    assert result.get_response()["id"] == "req-7"
    assert result.get_response()["model_name"] == "dense"
    np.testing.assert_array_equal(result.as_numpy("output"),
                                  raw(models[0], input=x)["output"])

    inputs, values = mixed_inputs(tritonhttp, binary)
    expected = raw(models[1], **values)
    result = rest.infer("mixed", inputs)  # no outputs named: every output, binary
    for name in ("sum", "twice", "positive"):
        got = result.as_numpy(name)
        assert got.dtype == expected[name].dtype
        np.testing.assert_array_equal(got, expected[name])
    # the outputs asked for, and only those, in the form asked for
    result = rest.infer("mixed", inputs, outputs=[
        tritonhttp.InferRequestedOutput("positive", binary_data=False),
        tritonhttp.InferRequestedOutput("twice", binary_data=True)])
    described = result.get_response()["outputs"]
    assert [o["name"] for o in described] == ["positive", "twice"]
    assert described[0]["data"] == expected["positive"].ravel().tolist()
    assert described[1]["parameters"]["binary_data_size"] == expected["twice"].nbytes
    np.testing.assert_array_equal(result.as_numpy("twice"), expected["twice"])
    rest.close()


def test_rows_on_the_batch_dimension_are_one_request(server: Served,
                                                     models: tuple[Path, Path]) -> None:
    """The dense model takes one row per call ([1, 16]): a request of 5 rows runs as 5 items
    (one bulk submission) and answers them stacked, as the runtime would row by row."""
    rest = http_client(server)
    before = server.metric("aioaccel_items_completed_total", runner="dense")
    x = np.concatenate([DENSE.random_input() for _ in range(5)])
    tensor = tritonhttp.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    got = rest.infer("dense", [tensor]).as_numpy("output")
    expected = np.concatenate([raw(models[0], input=row[None])["output"] for row in x])
    np.testing.assert_array_equal(got, expected)
    # and /metrics counts v2 traffic like the rest: 5 items, in one v2 request
    assert server.metric("aioaccel_items_completed_total", runner="dense") == before + 5
    assert server.metric("aioaccel_v2_requests_total", code="200", model="dense",
                         protocol="rest") >= 1
    rest.close()


def test_plain_json_and_nested_data_and_gzip(server: Served, models: tuple[Path, Path]) -> None:
    """What a KServe user or curl sends: JSON tensors with nested or flat data; gzip bodies."""
    x = DENSE.random_input()
    expected = raw(models[0], input=x)["output"]
    for data in (x.tolist(), x.ravel().tolist()):
        body = {"id": "1", "inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                        "data": data}]}
        reply = httpx.post(f"{server.url}/v2/models/dense/infer", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        out = reply.json()
        assert out["id"] == "1" and out["model_version"] == "1"
        assert out["outputs"][0]["shape"] == [1, 16]
        np.testing.assert_allclose(out["outputs"][0]["data"], expected.ravel(), rtol=1e-6)
    packed = gzip.compress(json.dumps(body).encode())
    reply = httpx.post(f"{server.url}/v2/models/dense/infer", content=packed, timeout=30,
                       headers={"content-encoding": "gzip",
                                "content-type": "application/json"})
    assert reply.status_code == 200, reply.text
    rest = tritonhttp.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = tritonhttp.InferInput("input", [1, 16], "FP32")
    tensor.set_data_from_numpy(x)
    result = rest.infer("dense", [tensor], request_compression_algorithm="deflate")
    np.testing.assert_array_equal(result.as_numpy("output"), expected)
    rest.close()


# ---- bad input ---------------------------------------------------------------------------------
BAD_BODIES = [
    (b"not json", None, "not JSON"),
    (b"[1, 2]", None, "JSON object"),
    (b'{"inputs": []}', None, "non-empty list"),
    (b'{"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32"}]}', None,
     "neither 'data' nor binary_data_size"),
    (b'{"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [1]}]}',
     None, "holds 1 values"),
    (b'{"inputs": [{"name": "input", "shape": [1, -16], "datatype": "FP32", "data": []}]}',
     None, "non-negative"),
    (b'{"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP64", "data": []}]}',
     None, "the model takes FP32"),
    (b'{"inputs": [{"name": "input", "shape": [1, 16], "datatype": "BF16", "data": []}]}',
     None, "BF16"),
    (b'{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": []}]}',
     None, "no input named 'x'"),
    (b'{"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": '
     b'[NaN, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]}]}', None, "NaN"),
    (b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", '
     b'"parameters": {"binary_data_size": 16}}]}', bytes(16), "expected shape"),
    (b'{"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", '
     b'"parameters": {"binary_data_size": 64}}]}', bytes(8), "ends past the body"),
    (b'{"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": '
     b'[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]}]}', bytes(8), "add up to 0"),
    (b'{"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": '
     b'[0.5]}], "outputs": [{"name": "nope"}]}', None, "holds 1 values"),
]


async def test_bad_requests_get_400_and_lose_nothing_else(server: Served) -> None:
    x = DENSE.random_input()
    good = {"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        async def bad(header: bytes, binary: bytes | None) -> httpx.Response:
            headers = {"content-type": "application/octet-stream"}
            if binary is not None:  # Triton's binary extension: JSON, then the tensors
                headers["inference-header-content-length"] = str(len(header))
            return await client.post("/v2/models/dense/infer", content=header + (binary or b""),
                                     headers=headers)

        replies = await asyncio.gather(
            *(bad(body, header) for body, header, _ in BAD_BODIES),
            *(client.post("/v2/models/dense/infer", json=good) for _ in range(8)))
        for reply, (body, _, expected) in zip(replies, BAD_BODIES):
            assert reply.status_code == 400, (body, reply.text)
            assert expected in reply.json()["error"], (body, reply.json())
        for reply in replies[len(BAD_BODIES):]:  # in flight beside them: answered
            assert reply.status_code == 200
            assert len(reply.json()["outputs"][0]["data"]) == 16
        wrong_output = dict(good, outputs=[{"name": "nope"}])
        reply = await client.post("/v2/models/dense/infer", json=wrong_output)
        assert reply.status_code == 400 and "no output named 'nope'" in reply.json()["error"]
        reply = await client.post("/v2/models/nope/infer", json=good)
        assert reply.status_code == 404 and "dense" in reply.json()["error"]
        reply = await client.post("/v2/models/dense/versions/3/infer", json=good)
        assert reply.status_code == 404
        reply = await client.post("/v2/models/dense/infer", content=b"{}" * (9 << 20))
        assert reply.status_code == 413 and "limit" in reply.json()["error"]
        reply = await client.post("/v2/models/dense/infer", content=b'{"inputs": []}',
                                  headers={"inference-header-content-length": "99"})
        assert reply.status_code == 400 and "body holds 14 bytes" in reply.json()["error"]
    assert "Traceback" not in server.stderr()


def test_bytes_tensors_are_refused_as_documented(server: Served) -> None:
    words = np.array([[b"hello", b"world"]], dtype=np.object_)
    rest = http_client(server)
    tensor = tritonhttp.InferInput("a", [1, 2], "BYTES")
    tensor.set_data_from_numpy(words)
    with pytest.raises(InferenceServerException, match=r"BYTES \(string\) tensors are not "
                                                       r"supported") as refused:
        rest.infer("mixed", [tensor])
    assert refused.value.status() == "400"
    grpc = tritongrpc.InferenceServerClient(server.grpc)
    tensor = tritongrpc.InferInput("a", [1, 2], "BYTES")
    tensor.set_data_from_numpy(words)
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT.*BYTES"):
        grpc.infer("mixed", [tensor])
    grpc.close()
    rest.close()


# ---- gRPC ------------------------------------------------------------------------------------
def test_grpc_infer_several_inputs_and_outputs(server: Served,
                                               models: tuple[Path, Path]) -> None:
    grpc = tritongrpc.InferenceServerClient(server.grpc)
    inputs, values = mixed_inputs(tritongrpc)
    expected = raw(models[1], **values)
    result = grpc.infer("mixed", inputs, request_id="g1")
    assert result.get_response().id == "g1"
    for name in ("sum", "twice", "positive"):
        np.testing.assert_array_equal(result.as_numpy(name), expected[name])
    result = grpc.infer("mixed", inputs, outputs=[tritongrpc.InferRequestedOutput("twice")])
    assert [o.name for o in result.get_response().outputs] == ["twice"]
    # a wrong shape: INVALID_ARGUMENT naming the input; the server goes on
    tensor = tritongrpc.InferInput("input", [1, 15], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 15), np.float32))
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT.*input 'input'"):
        grpc.infer("dense", [tensor])
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        grpc.infer("nope", inputs)
    # unknown names are counted without their name (the label set stays bounded)
    assert server.metric("aioaccel_v2_requests_total", code="NOT_FOUND", model="",
                         protocol="grpc") >= 1
    x = DENSE.random_input()
    tensor = tritongrpc.InferInput("input", [1, 16], "FP32")
    tensor.set_data_from_numpy(x)
    np.testing.assert_array_equal(grpc.infer("dense", [tensor], priority=5).as_numpy("output"),
                                  raw(models[0], input=x)["output"])
    grpc.close()


def test_grpc_stream_answers_in_order_and_survives_a_bad_request(
        server: Served, models: tuple[Path, Path]) -> None:
    grpc = tritongrpc.InferenceServerClient(server.grpc)
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    grpc.start_stream(callback=lambda result, error: answers.put((result, error)))
    xs = [DENSE.random_input() for _ in range(40)]
    try:
        for k, x in enumerate(xs):
            shape = [1, 15] if k == 7 else [1, 16]  # one bad request in the middle
            tensor = tritongrpc.InferInput("input", shape, "FP32")
            tensor.set_data_from_numpy(x[:, :15] if k == 7 else x)
            grpc.async_stream_infer("dense", [tensor], request_id=str(k))
        got = [answers.get(timeout=30) for _ in xs]
    finally:
        grpc.stop_stream()
        grpc.close()
    for k, ((result, error), x) in enumerate(zip(got, xs)):
        if k == 7:
            assert result is None and "expected shape (1, 16)" in str(error)
            continue
        assert error is None, error
        assert result.get_response().id == str(k)  # in request order
        np.testing.assert_array_equal(result.as_numpy("output"),
                                      raw(models[0], input=x)["output"])
    assert server.metric("aioaccel_v2_requests_total", code="INVALID_ARGUMENT", model="dense",
                         protocol="grpc_stream") >= 1
    assert server.metric("aioaccel_v2_requests_total", code="OK", model="dense",
                         protocol="grpc_stream") >= 39


# ---- async clients ---------------------------------------------------------------------------
async def test_aio_clients_infer_and_stream(server: Served, models: tuple[Path, Path]) -> None:
    xs = [DENSE.random_input() for _ in range(16)]
    expected = [raw(models[0], input=x)["output"] for x in xs]

    rest = tritonhttp_aio.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        assert await rest.is_server_ready()

        async def one(x: np.ndarray) -> np.ndarray:
            tensor = tritonhttp_aio.InferInput("input", [1, 16], "FP32")
            tensor.set_data_from_numpy(x)
            return (await rest.infer("dense", [tensor])).as_numpy("output")

        for got, want in zip(await asyncio.gather(*map(one, xs)), expected):
            np.testing.assert_array_equal(got, want)
    finally:
        await rest.close()

    grpc = tritongrpc_aio.InferenceServerClient(server.grpc)
    try:
        assert await grpc.is_model_ready("dense")
        tensor = tritongrpc_aio.InferInput("input", [1, 16], "FP32")
        tensor.set_data_from_numpy(xs[0])
        np.testing.assert_array_equal(
            (await grpc.infer("dense", [tensor])).as_numpy("output"), expected[0])

        async def requests():  # type: ignore[no-untyped-def]
            for k, x in enumerate(xs):
                tensor = tritongrpc_aio.InferInput("input", [1, 16], "FP32")
                tensor.set_data_from_numpy(x)
                yield {"model_name": "dense", "inputs": [tensor], "request_id": str(k)}

        got = []
        async for result, error in grpc.stream_infer(requests()):
            assert error is None, error
            got.append(result)
            if len(got) == len(xs):
                break
        assert [r.get_response().id for r in got] == [str(k) for k in range(len(xs))]
        for result, want in zip(got, expected):
            np.testing.assert_array_equal(result.as_numpy("output"), want)
    finally:
        await grpc.close()


def test_http_async_infer(server: Served, models: tuple[Path, Path]) -> None:
    rest = tritonhttp.InferenceServerClient(server.url.removeprefix("http://"), concurrency=4)
    xs = [DENSE.random_input() for _ in range(8)]
    pending = []
    for x in xs:
        tensor = tritonhttp.InferInput("input", [1, 16], "FP32")
        tensor.set_data_from_numpy(x)
        pending.append(rest.async_infer("dense", [tensor]))
    for request, x in zip(pending, xs):
        np.testing.assert_array_equal(request.get_result().as_numpy("output"),
                                      raw(models[0], input=x)["output"])
    rest.close()


# ---- overload, cancellation, shutdown ------------------------------------------------------------
def slow_request(i: float) -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [i]}]}


async def test_overload_answers_503_with_retry_after_over_http_and_grpc() -> None:
    with serve("served_models:slow_double", "--maxsize", "1", "--admit-timeout", "0.05",
               "--grpc-port", "0", latency=0.3) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            replies = await asyncio.gather(*(
                client.post("/v2/models/slow_double/infer", json=slow_request(i))
                for i in range(6)))
        statuses = sorted(r.status_code for r in replies)
        assert 200 in statuses and 503 in statuses, statuses
        for i, reply in enumerate(replies):
            if reply.status_code == 503:
                assert int(reply.headers["retry-after"]) >= 1
                assert "overloaded" in reply.json()["error"]
            else:
                assert reply.json()["outputs"][0]["data"] == [2.0 * i]
        grpc = tritongrpc_aio.InferenceServerClient(server.grpc)
        try:
            async def one(i: int) -> object:
                tensor = tritongrpc_aio.InferInput("x", [1, 1], "FP64")
                tensor.set_data_from_numpy(np.array([[float(i)]]))
                return await grpc.infer("slow_double", [tensor])

            outcomes = await asyncio.gather(*map(one, range(6)), return_exceptions=True)
        finally:
            await grpc.close()
        refused = [o for o in outcomes if isinstance(o, InferenceServerException)]
        assert refused and all("UNAVAILABLE" in str(o) for o in refused), outcomes
        assert len(refused) < 6
        assert "Traceback" not in server.stderr()


async def test_clients_that_go_away_withdraw_their_items() -> None:
    """HTTP disconnect and gRPC cancel (a deadline): the requests still waiting for the one
    worker are withdrawn, not run."""
    with serve("served_models:slow_double", "--maxsize", "4", "--admit-timeout", "20",
               "--grpc-port", "0", latency=1.0) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=0.5) as client:
            gone = await asyncio.gather(*(
                client.post("/v2/models/slow_double/infer", json=slow_request(i))
                for i in range(4)), return_exceptions=True)
        assert all(isinstance(g, httpx.TimeoutException) for g in gone), gone
        await wait_for(lambda: server.metric("aioaccel_items_withdrawn_total",
                                             runner="slow_double") >= 2)
        grpc = tritongrpc_aio.InferenceServerClient(server.grpc)
        try:
            async def one(i: int) -> object:
                tensor = tritongrpc_aio.InferInput("x", [1, 1], "FP64")
                tensor.set_data_from_numpy(np.array([[float(i)]]))
                return await grpc.infer("slow_double", [tensor], client_timeout=0.5)

            await wait_for(lambda: server.metric("aioaccel_in_flight",
                                                 runner="slow_double") == 0)
            before = server.metric("aioaccel_items_withdrawn_total", runner="slow_double")
            outcomes = await asyncio.gather(*map(one, range(4)), return_exceptions=True)
        finally:
            await grpc.close()
        assert all("DEADLINE_EXCEEDED" in str(o) for o in outcomes), outcomes
        await wait_for(lambda: server.metric("aioaccel_items_withdrawn_total",
                                             runner="slow_double") >= before + 2)
        await wait_for(lambda: server.metric("aioaccel_in_flight",
                                             runner="slow_double") == 0)
        assert server.metric("aioaccel_items_completed_total", runner="slow_double") <= 4


async def wait_for(condition: object) -> None:
    """Poll a server-side condition (a subprocess offers no event to await), for 20 s."""
    async with asyncio.timeout(20):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.05)


async def test_sigterm_with_an_open_grpc_stream_answers_it_and_exits_0() -> None:
    with serve("served_models:slow_double", "--maxsize", "4", "--grpc-port", "0",
               latency=0.2) as server:
        grpc = tritongrpc_aio.InferenceServerClient(server.grpc)
        sent = asyncio.Event()

        async def requests():  # type: ignore[no-untyped-def]
            for k in range(3):
                tensor = tritongrpc_aio.InferInput("x", [1, 1], "FP64")
                tensor.set_data_from_numpy(np.array([[float(k)]]))
                yield {"model_name": "slow_double", "inputs": [tensor], "request_id": str(k)}
            sent.set()
            await asyncio.Event().wait()  # the client keeps its stream open

        got = []
        try:
            async def consume() -> None:
                async for result, error in grpc.stream_infer(requests()):
                    assert error is None, error
                    got.append(result)

            reading = asyncio.ensure_future(consume())
            await sent.wait()
            await wait_for(lambda: server.metric("aioaccel_items_pushed_total",
                                                 runner="slow_double") == 3)
            server.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(server.proc.wait, 30) == 0
            await asyncio.wait_for(reading, 10)
        finally:
            await grpc.close()
        assert [r.get_response().id for r in got] == ["0", "1", "2"]
        assert [float(r.as_numpy("output")[0, 0]) for r in got] == [0.0, 2.0, 4.0]
        assert "Traceback" not in server.stderr()


def test_grpc_is_off_unless_asked_and_a_busy_port_is_an_error(models: tuple[Path, Path]
                                                              ) -> None:
    with serve(str(models[0]), "--name", "dense") as plain:
        assert plain.grpc is None
        reply = httpx.get(f"{plain.url}/v2/health/ready", timeout=10)
        assert reply.status_code == 200 and reply.json() == {"ready": True}
        with serve(str(models[0]), "--grpc-port", "0") as first:
            port = first.grpc.rsplit(":", 1)[1]
            busy = subprocess.run([sys.executable, "-m", "aioaccel", "serve", str(models[0]),
                                   "--grpc-port", port, "--port", "0"], capture_output=True,
                                  text=True, timeout=120, cwd=ROOT)
    assert busy.returncode == 1
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in busy.stderr
    assert "Traceback" not in busy.stderr
