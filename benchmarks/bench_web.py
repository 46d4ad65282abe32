"""Load on the FastAPI example: ``await runner.infer(x)`` vs the usual ``run_in_threadpool``.

Two uvicorn servers (separate processes) serve the same ONNX model (a dense chain of ~0.5 ms):

* aioaccel   -- ``examples/fastapi_app.py`` (``AIOACCEL_MODEL=model.onnx``): ``Accel.infer``
* threadpool -- the handler users write today: ``await run_in_threadpool(session.run, ...)``
  on one shared ``InferenceSession`` (thread-safe), Starlette's default thread pool

A client process sends ``--requests`` JSON requests with at most ``--concurrency`` in flight,
over loopback, to each server in turn (interleaved rounds), and reports requests/s and
latency p50/p99. Both servers get the same model, the same ONNX thread settings (1 intra-op
thread per run) and the same number of model workers (``--workers``).

Run: ``python benchmarks/bench_web.py [--requests 2000] [--concurrency 32] [--rounds 3]``;
``--batch 16`` serves the aioaccel side with batching on (``batch=16, batch_wait=0.002``,
a model with a dynamic batch dimension for both servers; needs the runner's batching).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


# ---- the baseline server: run_in_threadpool ------------------------------------------------
def threadpool_app() -> Any:
    import numpy as np
    import onnxruntime as ort
    from fastapi import FastAPI
    from starlette.concurrency import run_in_threadpool

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(os.environ["AIOACCEL_MODEL"], options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    app = FastAPI()

    @app.post("/infer")
    async def infer(request: Request) -> dict[str, Any]:
        x = np.asarray(await request.json(), dtype=np.float32)
        (y,) = await run_in_threadpool(session.run, None, {name: x})
        return {"outputs": {"output": y.tolist()}}

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    return app


# ---- the client ------------------------------------------------------------------------------
async def load(url: str, body: bytes, requests: int, concurrency: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    limit = asyncio.Semaphore(concurrency)
    failures = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def one() -> None:
            nonlocal failures
            async with limit:
                started = time.perf_counter()
                reply = await client.post("/infer", content=body,
                                          headers={"content-type": "application/json"})
                latencies.append(time.perf_counter() - started)
                failures += reply.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"rps": requests / elapsed, "p50": ordered[len(ordered) // 2],
            "p99": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
            "failures": failures}


def client_main(args: argparse.Namespace) -> None:
    urls = json.loads(args.urls)
    body = Path(args.body).read_bytes()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
    for url in urls.values():  # warm-up
        asyncio.run(load(url, body, max(50, args.requests // 10), args.concurrency))
    for _ in range(args.rounds):
        for name, url in urls.items():
            results[name].append(asyncio.run(load(url, body, args.requests, args.concurrency)))
    print(json.dumps(results))


# ---- the driver ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="model worker threads")
    parser.add_argument("--width", type=int, default=512, help="dense layer width (cost)")
    parser.add_argument("--batch", default=None,
                        help="aioaccel batch= (an int or auto; default: no batching)")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--urls", help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return

    sys.path.insert(0, str(ROOT))
    from aioaccel.testing.models import dense_chain

    chain = dense_chain(args.width, 4, inputs=256, dynamic_batch=args.batch is not None)
    directory = Path(tempfile.mkdtemp(prefix="aioaccel-bench-web-"))
    model = chain.write_onnx(directory / "model.onnx")
    body = directory / "body.json"
    body.write_text(json.dumps(chain.random_input().tolist()))
    env = {**os.environ, "AIOACCEL_MODEL": str(model), "AIOACCEL_REPLICAS": str(args.workers),
           "AIOACCEL_MAXSIZE": str(2 * args.concurrency), "AIOACCEL_ADMIT_TIMEOUT": "30",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if args.batch is not None:
        env["AIOACCEL_BATCH"] = args.batch
    servers = {
        "aioaccel (Accel.infer)": ["examples.fastapi_app:app"],
        "run_in_threadpool": ["--factory", "benchmarks.bench_web:threadpool_app"],
    }
    processes, urls = [], {}
    try:
        for name, target in servers.items():
            port = free_port()
            command = [sys.executable, "-m", "uvicorn", *target, "--host", "127.0.0.1",
                       "--port", str(port), "--log-level", "warning", "--no-access-log"]
            processes.append(subprocess.Popen(command, cwd=ROOT, env=env))
            urls[name] = f"http://127.0.0.1:{port}"
        for url, process in zip(urls.values(), processes, strict=True):
            wait_ready(url, process)
        client = subprocess.run(
            [sys.executable, __file__, "--client", "--urls", json.dumps(urls), "--body",
             str(body), "--requests", str(args.requests), "--concurrency",
             str(args.concurrency), "--rounds", str(args.rounds)],
            capture_output=True, text=True, check=True, cwd=ROOT)
        results = json.loads(client.stdout)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
    batching = f", aioaccel batch={args.batch}" if args.batch is not None else ""
    print(f"bench_web: FastAPI example vs run_in_threadpool{batching}, ONNX Runtime dense "
          f"{args.width}x4 "
          f"(~{chain.cost() / 1e6:.1f} M multiply-adds), {args.workers} model workers, "
          f"{args.requests} requests x {args.rounds} rounds, {args.concurrency} in flight, "
          f"separate client process over loopback (medians)")
    print(f"  {'handler':<26} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}")
    rates = {}
    for name, rounds in results.items():
        rps = statistics.median(r["rps"] for r in rounds)
        p50 = statistics.median(r["p50"] for r in rounds) * 1e3
        p99 = statistics.median(r["p99"] for r in rounds) * 1e3
        failed = sum(r["failures"] for r in rounds)
        rates[name] = rps
        print(f"  {name:<26} {rps:>11.0f} {p50:>8.1f} {p99:>8.1f} {failed:>7}")
    ours, theirs = rates["aioaccel (Accel.infer)"], rates["run_in_threadpool"]
    print(f"  aioaccel vs run_in_threadpool: {ours / theirs:.2f}x requests/s")


if __name__ == "__main__":
    main()
