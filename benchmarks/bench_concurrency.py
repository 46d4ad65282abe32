"""Throughput against concurrency and the latency distribution, on a real runtime.

For 1, 2, 4 ... 64 concurrent callers on one model (ONNX Runtime by default, one intra-op
thread everywhere): aioaccel ``infer`` against ``run_in_executor`` per item, beside the raw
vendor loop (one thread, sequential). Rates are medians over interleaved rounds; latencies are
those of the last round at ``--cdf-at`` callers.

Run: ``python benchmarks/bench_concurrency.py [--backend onnx|openvino|litert] [--rounds 3]
[--replicas N] [--plot docs/images/concurrency-onnx.png]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import new_loop

import aioaccel
from aioaccel.testing.models import dense_chain
from aioaccel.testing.vendor import raw_model

CALLERS = (1, 2, 4, 8, 16, 32, 64)


def write(backend: str, chain: Any, directory: Path) -> Path:
    if backend == "onnx":
        return chain.write_onnx(directory / "model.onnx")  # type: ignore[no-any-return]
    if backend == "litert":
        return chain.write_tflite(directory / "model.tflite")  # type: ignore[no-any-return]
    return chain.write_openvino(directory / "model.xml")  # type: ignore[no-any-return]


def options(backend: str) -> dict[str, Any]:
    if backend == "openvino":
        return {"config": {"INFERENCE_NUM_THREADS": 1}}
    return {"num_threads": 1}


async def callers(call: Any, x: Any, count: int, n: int, latencies: list[float]) -> float:
    share = [count // n + (i < count % n) for i in range(n)]

    async def one(k: int) -> None:
        for _ in range(k):
            t0 = time.perf_counter()
            await call(x)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(one(k) for k in share))
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["onnx", "openvino", "litert"], default="onnx")
    parser.add_argument("--width", type=int, default=512, help="dense layer width")
    parser.add_argument("--count", type=int, default=2000, help="items per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cdf-at", type=int, default=16, help="callers for the latency CDF")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--replicas", type=int, default=os.cpu_count() or 1,
                        help="aioaccel worker threads (default: the cores, as many as the "
                             "executor's threads can use)")
    parser.add_argument("--plot", default=None, metavar="OUT.png",
                        help="draw the figure (needs aioaccel[plot])")
    args = parser.parse_args()
    loop = new_loop(args.loop)
    chain = dense_chain(args.width, 4, inputs=args.width)
    x = chain.random_input()
    rates: dict[str, dict[int, list[float]]] = {"aioaccel infer": {}, "run_in_executor": {}}
    raw_rates: list[float] = []
    latencies: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write(args.backend, chain, Path(tmp))
        raw = raw_model(args.backend, path, threads=1)
        runner = loop.run_until_complete(aioaccel.open(
            path, maxsize=2 * max(CALLERS), replicas=args.replicas,
            **options(args.backend)).__aenter__())
        try:
            async def executor(v: Any) -> Any:
                return await asyncio.get_running_loop().run_in_executor(None, raw, v)

            modes = {"aioaccel infer": runner.infer, "run_in_executor": executor}
            for call in modes.values():  # warm-up
                loop.run_until_complete(callers(call, x, 200, 8, []))
            for r in range(args.rounds):
                last = r == args.rounds - 1
                samples: list[float] = []
                started = time.perf_counter()
                for _ in range(args.count):
                    t0 = time.perf_counter()
                    raw(x)
                    samples.append(time.perf_counter() - t0)
                raw_rates.append(args.count / (time.perf_counter() - started))
                if last:
                    latencies["raw vendor loop"] = samples
                for n in CALLERS:
                    for name, call in modes.items():
                        seen: list[float] = []
                        rate = loop.run_until_complete(callers(call, x, args.count, n, seen))
                        rates[name].setdefault(n, []).append(rate)
                        if last and n == args.cdf_at:
                            latencies[f"{name}, {n} callers"] = seen
        finally:
            loop.run_until_complete(runner.aclose())
    raw_rate = statistics.median(raw_rates)
    print(f"bench_concurrency: {args.backend}, dense {args.width}x4, {args.count} items, "
          f"medians of {args.rounds} rounds, loop={args.loop}, aioaccel replicas="
          f"{args.replicas}")
    print(f"  raw vendor loop (one thread): {raw_rate:.0f} items/s")
    print(f"  {'callers':>7} " + " ".join(f"{name:>22}" for name in rates))
    for n in CALLERS:
        medians = [statistics.median(rates[name][n]) for name in rates]
        cells = " ".join(f"{m:>14.0f} ({m / raw_rate:.2f}x)" for m in medians)
        print(f"  {n:>7} {cells}")
    if args.plot:
        from aioaccel.plots import bench_figure

        bench_figure(args.plot,
                     throughput={name: [(n, statistics.median(v)) for n, v in by_n.items()]
                                 for name, by_n in rates.items()},
                     baseline={"raw vendor loop (one thread)": raw_rate},
                     latencies=latencies,
                     title=f"{args.backend}: dense {args.width}x4, one intra-op thread "
                           f"(shared 2-core machine)")
        print(f"plot written to {args.plot}")
    loop.close()


if __name__ == "__main__":
    main()
