"""Scale-out on Ray Serve: a local runner vs ``connect()`` to 1 and 2 replicas vs a plain Serve
deployment called per request, on the same ONNX model (a dense chain of ~1 ms per item).

* local              -- ``aioaccel.open(model.onnx)`` in this process, streaming (push / async for)
* connect, N replica -- ``deploy(model.onnx, replicas=N)`` then ``connect(...)``, streaming:
                        items travel in batches, several calls in flight
* connect infer      -- the same 2 replicas, ``--concurrency`` concurrent ``infer`` callers
* plain Serve        -- what users write without aioaccel: a deployment whose ``__call__`` runs
                        the ONNX session on one input, called with ``await handle.remote(x)``
                        by ``--concurrency`` concurrent callers (Serve's own queueing)

Every replica gets one CPU and one ONNX intra-op thread; the cluster is local
(``ray.init(num_cpus=...)``). Modes are interleaved over ``--rounds`` rounds; items/s is the
median, p50/p99 the per-item latency (push to result) of all rounds.

Run: ``python benchmarks/bench_ray.py [--items 2000] [--rounds 3] [--concurrency 64]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # also sets one BLAS/OpenMP thread per call
import numpy as np
import ray
from ray import serve

import aioaccel
from aioaccel.integrations.ray import connect, deploy
from aioaccel.testing.models import dense_chain

CHAIN = dense_chain(768, 6, inputs=64)


@serve.deployment
class PlainOnnx:
    """The per-request deployment users write without aioaccel."""

    def __init__(self, path: str):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.name: x})[0]


async def stream_runner(runner: aioaccel.Runner, xs: list[np.ndarray], n: int) -> list[float]:
    latencies: list[float] = []

    async def produce() -> None:
        for i in range(n):
            await runner.push(xs[i % len(xs)])

    producer = asyncio.create_task(produce())
    for _ in range(n):
        latencies.append((await anext(runner)).latency)
    await producer
    return latencies


async def infer_callers(call: Any, xs: list[np.ndarray], n: int,
                        concurrency: int) -> list[float]:
    latencies: list[float] = []
    next_item = iter(range(n))

    async def caller() -> None:
        for i in next_item:
            started = time.perf_counter()
            await call(xs[i % len(xs)])
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return latencies


async def main(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="aioaccel-bench-ray-"))
    path = str(CHAIN.write_onnx(directory / "model.onnx"))
    xs = [CHAIN.random_input(seed) for seed in range(16)]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    deploy(path, name="one", replicas=1, resources={"CPU": 1}, num_threads=1)
    deploy(path, name="two", replicas=2, resources={"CPU": 1}, num_threads=1)
    plain = serve.run(PlainOnnx.options(num_replicas=2, ray_actor_options={"num_cpus": 1},
                                        max_ongoing_requests=args.concurrency)
                      .bind(path), name="plain", route_prefix=None)

    async def plain_call(x: np.ndarray) -> Any:
        return await plain.remote(x)

    async with aioaccel.open(path, num_threads=1, maxsize=args.maxsize) as local, \
            connect("one", maxsize=args.maxsize) as one, \
            connect("two", maxsize=args.maxsize) as two:
        modes = {
            "local runner, streaming": lambda n: stream_runner(local, xs, n),
            "connect, 1 replica, streaming": lambda n: stream_runner(one, xs, n),
            "connect, 2 replicas, streaming": lambda n: stream_runner(two, xs, n),
            f"connect, 2 replicas, {args.concurrency} x infer":
                lambda n: infer_callers(two.infer, xs, n, args.concurrency),
            f"plain Serve, 2 replicas, {args.concurrency} x call":
                lambda n: infer_callers(plain_call, xs, n, args.concurrency),
        }
        for mode in modes.values():  # warm-up
            await mode(max(50, args.items // 10))
        rates: dict[str, list[float]] = {name: [] for name in modes}
        latencies: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(args.rounds):
            for name, mode in modes.items():
                started = time.perf_counter()
                latencies[name] += await mode(args.items)
                rates[name].append(args.items / (time.perf_counter() - started))
        profile = two.stats().profile
    serve.shutdown()
    ray.shutdown()

    medians = {name: statistics.median(values) for name, values in rates.items()}
    local_rate = medians["local runner, streaming"]
    plain_rate = medians[f"plain Serve, 2 replicas, {args.concurrency} x call"]
    print(f"\n{args.items} items x {args.rounds} rounds, model ~1 ms "
          f"(dense 768 x 6 layers, ONNX Runtime, 1 thread), ray.init(num_cpus={args.cpus})")
    print(f"  {'mode':<40} {'items/s':>9} {'vs local':>9} {'vs plain':>9} "
          f"{'p50 ms':>8} {'p99 ms':>8}")
    for name, rate in medians.items():
        p50 = _common.percentile(latencies[name], 0.5) * 1e3
        p99 = _common.percentile(latencies[name], 0.99) * 1e3
        print(f"  {name:<40} {rate:>9.0f} {rate / local_rate:>8.2f}x {rate / plain_rate:>8.2f}x "
              f"{p50:>8.2f} {p99:>8.2f}")
    print(f"  connect to 2 replicas: mean batch {profile['mean_batch']:.1f} items per call, "
          f"up to {profile['max_calls']} calls in flight")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--maxsize", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=8,
                        help="CPUs Ray may hand out (each replica takes 1)")
    asyncio.run(main(parser.parse_args()))
