"""The Open Inference Protocol (KServe v2) of ``aioaccel serve`` against its /v1 JSON route and a
plain FastAPI handler, side by side in one run.

The model: the width-64 ONNX MLP of bench_batching.py (4 dense layers, ~0.03 ms a row, a
dynamic batch dimension), one ONNX Runtime thread everywhere. Three servers run at once, each
its own process on loopback:

* ``aioaccel serve`` with batching off, and one with ``--batch 16`` (``--grpc-port`` on both)
* a plain FastAPI handler, what a user writes by hand: JSON in, ``run_in_threadpool(
  session.run, ...)`` on one shared session, JSON out (uvicorn, the same loop as aioaccel's)

A separate client process (uvloop) keeps ``--callers`` persistent callers busy on each mode in
turn (interleaved rounds of ``--seconds`` each), one row of 64 floats per request:

* ``plain handler``   -- POST /infer, JSON
* ``/v1 JSON``        -- POST /v1/models/mlp/infer, JSON (``{"inputs": [[...]]}``)
* ``v2 binary HTTP``  -- POST /v2/models/mlp/infer, Triton's binary tensor extension: the bytes
  ``tritonclient.http`` sends for a numpy input (JSON header + raw float32), binary output
* ``v2 gRPC``         -- ``inference.GRPCInferenceService/ModelInfer`` with raw contents, the
  message ``tritonclient.grpc`` sends (grpc.aio stub, one channel)

Reported: requests/s (median of the rounds), p50 latency, and the ratios the issue sets as
targets (v2 binary >= 1.5x /v1 JSON, gRPC >= 2x; with batching both >= 2x the plain handler).
The client shares the machine's cores with the servers: the figures are the whole system's.

Run: ``python benchmarks/bench_v2.py [--rounds 3] [--seconds 2] [--callers 64]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, wait_ready
from fastapi import Request  # at module level: FastAPI resolves the handler's annotations here

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "mlp"


# ---- the baseline server: a plain FastAPI handler ---------------------------------------------
def plain_app() -> Any:
    """``uvicorn --factory benchmarks.bench_v2:plain_app`` (``AIOACCEL_MODEL``: the .onnx)."""
    import numpy as np
    import onnxruntime as ort
    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(os.environ["AIOACCEL_MODEL"], options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    app = FastAPI()

    @app.post("/infer")
    async def infer(request: Request) -> dict[str, Any]:
        x = np.asarray((await request.json())["inputs"], dtype=np.float32)
        (y,) = await run_in_threadpool(session.run, None, {name: x})
        return {"outputs": {"output": y.tolist()}}

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    return app


# ---- the floors: what the HTTP and gRPC servers cost with no work at all ------------------------
def floor_app() -> Any:
    """``uvicorn --factory benchmarks.bench_v2:floor_app``: raw ASGI, reads the body, answers
    256 fixed bytes. No server on uvicorn answers a request for less."""
    answer = bytes(256)
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"256")]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


def grpc_floor_main(port: int) -> None:
    """A grpc.aio server (uvloop, as aioaccel serve) whose ModelInfer answers a canned reply."""
    import grpc
    import uvloop

    from aioaccel.serve._grpc import grpc_service_pb2 as pb

    reply = pb.ModelInferResponse(model_name=MODEL_NAME)
    reply.outputs.add(name="output", datatype="FP32", shape=[1, 64])
    reply.raw_output_contents.append(bytes(256))

    async def infer(request: Any, context: Any) -> Any:
        return reply

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(
                infer, request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=pb.ModelInferResponse.SerializeToString)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(serve())


# ---- the client -------------------------------------------------------------------------------
def v2_binary_body(x: Any) -> tuple[bytes, int]:
    """The body tritonclient.http sends for one FP32 input in binary, binary output asked."""
    header = json.dumps({
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True}}).encode()
    return header + x.tobytes(), len(header)


async def run_http(url: str, body: bytes, headers: dict[str, str], callers: int,
                   seconds: float) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=callers)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal failures
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as reply:
                    await reply.read()
                    failures += reply.status != 200
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = time.perf_counter() - started
    return _summary(latencies, elapsed, failures)


async def run_grpc(address: str, x: Any, callers: int, seconds: float) -> dict[str, float]:
    import grpc

    from aioaccel.serve._grpc import grpc_service_pb2 as pb
    from aioaccel.serve._grpc import grpc_service_pb2_grpc as stubs

    request = pb.ModelInferRequest(model_name=MODEL_NAME)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    latencies: list[float] = []
    failures = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = stubs.GRPCInferenceServiceStub(channel)
        deadline = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal failures
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    await stub.ModelInfer(request, timeout=30)
                except grpc.aio.AioRpcError:
                    failures += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = time.perf_counter() - started
    return _summary(latencies, elapsed, failures)


def _summary(latencies: list[float], elapsed: float, failures: int) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"rps": len(latencies) / elapsed, "p50": ordered[len(ordered) // 2] * 1e3,
            "failures": failures}


def client_main(args: argparse.Namespace) -> None:
    import numpy as np
    import uvloop

    targets = json.loads(args.targets)
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    json_body = json.dumps({"inputs": x.tolist()}).encode()
    binary, header_length = v2_binary_body(x)
    json_headers = {"content-type": "application/json"}
    binary_headers = {"content-type": "application/octet-stream",
                      "inference-header-content-length": str(header_length)}

    def modes(seconds: float) -> dict[str, Any]:
        found: dict[str, Any] = {
            "floor: raw ASGI on uvicorn": lambda: run_http(
                f"{targets['floor']}/", binary, binary_headers, args.callers, seconds),
            "floor: empty grpc.aio handler": lambda: run_grpc(
                targets["grpc_floor"], x, args.callers, seconds),
            "plain handler": lambda: run_http(f"{targets['plain']}/infer", json_body,
                                              json_headers, args.callers, seconds)}
        for label, key in (("off", "off"), ("batch=16", "on")):
            http, grpc_address = targets[key]
            found[f"/v1 JSON, batching {label}"] = (
                lambda http=http: run_http(f"{http}/v1/models/{MODEL_NAME}/infer", json_body,
                                           json_headers, args.callers, seconds))
            found[f"v2 binary HTTP, batching {label}"] = (
                lambda http=http: run_http(f"{http}/v2/models/{MODEL_NAME}/infer", binary,
                                           binary_headers, args.callers, seconds))
            found[f"v2 gRPC, batching {label}"] = (
                lambda address=grpc_address: run_grpc(address, x, args.callers, seconds))
        return found

    results: dict[str, list[dict[str, float]]] = {name: [] for name in modes(0)}
    for mode in modes(0.3).values():  # warm-up: connections, the runtimes' first calls
        uvloop.run(mode())
    pids = targets["pids"]
    for _ in range(args.rounds):
        for name, mode in modes(args.seconds).items():
            pid = pids["plain" if name == "plain handler" else
                       "floor" if name.startswith("floor: raw") else
                       "grpc_floor" if name.startswith("floor: empty") else
                       "on" if "batch=16" in name else "off"]
            busy = cpu_seconds(pid)
            result = uvloop.run(mode())
            result["server_cpu_us"] = ((cpu_seconds(pid) - busy) * 1e6
                                       / max(1.0, result["rps"] * args.seconds))
            results[name].append(result)
    print(json.dumps(results))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the driver -------------------------------------------------------------------------------


def wait_listening(address: str, process: subprocess.Popen[bytes]) -> None:
    host, port = address.removeprefix("http://").rsplit(":", 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {address} exited with {process.returncode}")
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server for {address} did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per mode and round")
    parser.add_argument("--callers", type=int, default=64, help="persistent clients")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--targets", help=argparse.SUPPRESS)
    parser.add_argument("--grpc-floor", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return
    if args.grpc_floor is not None:
        sys.path.insert(0, str(ROOT))
        grpc_floor_main(args.grpc_floor)
        return

    sys.path.insert(0, str(ROOT))
    from aioaccel.testing.models import dense_chain

    chain = dense_chain(64, 4, dynamic_batch=True)
    directory = Path(tempfile.mkdtemp(prefix="aioaccel-bench-v2-"))
    model = chain.write_onnx(directory / f"{MODEL_NAME}.onnx")
    env = {**os.environ, "AIOACCEL_MODEL": str(model), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    maxsize = str(2 * args.callers)
    processes: list[subprocess.Popen[bytes]] = []
    targets: dict[str, Any] = {"pids": {}}
    try:
        port = free_port()
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "benchmarks.bench_v2:plain_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
             "--no-access-log"], cwd=ROOT, env=env))
        targets["plain"] = f"http://127.0.0.1:{port}"
        targets["pids"]["plain"] = processes[-1].pid
        port = free_port()
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "benchmarks.bench_v2:floor_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
             "--no-access-log"], cwd=ROOT, env=env))
        targets["floor"] = f"http://127.0.0.1:{port}"
        targets["pids"]["floor"] = processes[-1].pid
        port = free_port()
        processes.append(subprocess.Popen([sys.executable, __file__, "--grpc-floor", str(port)],
                                          cwd=ROOT, env=env))
        targets["grpc_floor"] = f"127.0.0.1:{port}"
        targets["pids"]["grpc_floor"] = processes[-1].pid
        for key, extra in (("off", []), ("on", ["--batch", "16"])):
            port, grpc_port = free_port(), free_port()
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "aioaccel", "serve", str(model), "--name", MODEL_NAME,
                 "--port", str(port), "--grpc-port", str(grpc_port), "--maxsize", maxsize,
                 "--admit-timeout", "30", "--option", "num_threads=1", *extra],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL))
            targets[key] = (f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}")
            targets["pids"][key] = processes[-1].pid
        for process, url in zip([processes[0], *processes[3:]],
                                [targets["plain"], targets["off"][0], targets["on"][0]],
                                strict=True):
            wait_ready(url, process)
        wait_listening(targets["floor"], processes[1])
        wait_listening(targets["grpc_floor"], processes[2])
        client = subprocess.run(
            [sys.executable, __file__, "--client", "--targets", json.dumps(targets),
             "--rounds", str(args.rounds), "--seconds", str(args.seconds), "--callers",
             str(args.callers)], capture_output=True, text=True, check=True, cwd=ROOT,
            env=env)
        results = json.loads(client.stdout)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
    print(f"bench_v2: ONNX Runtime MLP width 64 x 4 layers, one runtime thread, "
          f"{args.callers} persistent callers in a separate client process (uvloop), "
          f"{args.rounds} interleaved rounds of {args.seconds} s (medians), "
          f"{os.cpu_count()} cores shared by servers and client")
    print(f"  {'mode':<32} {'requests/s':>11} {'p50 ms':>8} {'server CPU us/req':>18} "
          f"{'failed':>7}")
    rates = {}
    for name, rounds in results.items():
        rates[name] = statistics.median(r["rps"] for r in rounds)
        p50 = statistics.median(r["p50"] for r in rounds)
        cpu = statistics.median(r["server_cpu_us"] for r in rounds)
        failed = sum(r["failures"] for r in rounds)
        print(f"  {name:<32} {rates[name]:>11.0f} {p50:>8.2f} {cpu:>18.0f} {failed:>7}")
    print("  targets:")
    for label in ("off", "batch=16"):
        v1 = rates[f"/v1 JSON, batching {label}"]
        for kind, target in (("v2 binary HTTP", 1.5), ("v2 gRPC", 2.0)):
            ratio = rates[f"{kind}, batching {label}"] / v1
            print(f"    {kind}, batching {label}: {ratio:.2f}x /v1 JSON (target >= "
                  f"{target}x)")
    plain = rates["plain handler"]
    for kind in ("v2 binary HTTP", "v2 gRPC"):
        ratio = rates[f"{kind}, batching batch=16"] / plain
        print(f"    {kind}, batching on: {ratio:.2f}x the plain handler (target >= 2x)")
    print("  the floors (no model, no framework) bound every mode of their protocol:")
    for kind, floor in (("v2 binary HTTP", "floor: raw ASGI on uvicorn"),
                        ("v2 gRPC", "floor: empty grpc.aio handler")):
        ratio = rates[f"{kind}, batching batch=16"] / rates[floor]
        print(f"    {kind}, batching on: {ratio:.2f}x of {floor}; the plain handler is "
              f"{plain / rates['floor: raw ASGI on uvicorn']:.2f}x of the HTTP floor")


if __name__ == "__main__":
    main()
