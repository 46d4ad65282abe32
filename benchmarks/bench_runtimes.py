"""Real runtimes on the CPU: aioaccel against the vendors' own loops, in one run.

1. overhead    -- OpenVINO, a tiny (~0.03 ms) and a ~1 ms model (f32): raw sync loop, raw
                  AsyncInferQueue with callbacks, run_in_executor per item, aioaccel streaming
                  (default api: sync requests on the CPU), aioaccel infer() with 64 concurrent
                  callers, and aioaccel streaming with api="async" (started requests).
2. pipelining  -- a ~10 ms LiteRT and ONNX conv chain split into 2 segments: the whole model
                  sequentially, aioaccel's pipeline, and the limit 1 / (slowest segment).
3. loop health -- event-loop lag p50/p99 (a 1 ms sleeper) while each backend runs flat out.
4. memory      -- a producer flooding 1 MB inputs at a slow consumer: peak growth in items.

Run: ``python benchmarks/bench_runtimes.py [--rounds 5] [--only overhead,pipelining,...]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import lag_probe, measure, new_loop, percentile, print_table, stream

import aioaccel
from aioaccel.testing.models import conv_chain, dense_chain
from aioaccel.testing.vendor import raw_model


# ---- 1. overhead --------------------------------------------------------------------------
def overhead(loop: asyncio.AbstractEventLoop, rounds: int) -> None:
    import openvino as ov

    core = ov.Core()
    for label, chain, count in (("tiny model", dense_chain(16, 2), 4000),
                                ("~1 ms model", dense_chain(1024, 8), 600)):
        model = chain.openvino_model()
        f32 = {"INFERENCE_PRECISION_HINT": "f32"}
        sync_model = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **f32})
        request = sync_model.create_infer_request()
        async_model = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", **f32})
        xs = [chain.random_input(s) for s in range(16)]
        started = time.perf_counter()
        for _ in range(50):
            request.infer({0: xs[0]})
        per_item = (time.perf_counter() - started) / 50

        async def raw_sync(n: int) -> None:
            for i in range(n):
                request.infer({0: xs[i % 16]})

        async def raw_queue(n: int) -> None:
            queue = ov.AsyncInferQueue(async_model, 0)
            done = []
            queue.set_callback(
                lambda req, userdata: done.append(req.get_output_tensor(0).data.copy()))
            for i in range(n):
                queue.start_async({0: xs[i % 16]}, userdata=i)
            queue.wait_all()

        async def executor(n: int) -> None:
            run = asyncio.get_running_loop().run_in_executor
            for i in range(n):
                await run(None, request.infer, {0: xs[i % 16]})

        runner = loop.run_until_complete(aioaccel.open(model, maxsize=16).__aenter__())
        queue_runner = loop.run_until_complete(
            aioaccel.open(model, api="async", maxsize=16).__aenter__())

        async def streaming(n: int) -> None:
            await stream(runner, xs, n)

        async def streaming_queue(n: int) -> None:
            await stream(queue_runner, xs, n)

        async def infer64(n: int) -> None:
            async def caller(k: int) -> None:
                for i in range(k, n, 64):
                    await runner.infer(xs[i % 16])
            await asyncio.gather(*(caller(k) for k in range(64)))

        rates = measure(loop, {"raw sync loop (infer)": raw_sync,
                               "raw AsyncInferQueue + callbacks": raw_queue,
                               "run_in_executor per item": executor,
                               "aioaccel streaming": streaming,
                               "aioaccel infer, 64 callers": infer64,
                               "aioaccel streaming, api=async": streaming_queue}, count, rounds)
        loop.run_until_complete(runner.aclose())
        loop.run_until_complete(queue_runner.aclose())
        best = max(rates["raw sync loop (infer)"], rates["raw AsyncInferQueue + callbacks"])
        print_table(f"1. overhead, OpenVINO {label} ({per_item * 1e3:.3f} ms per sync infer), "
                    f"{count} items per round", rates, "raw sync loop (infer)")
        ours, executor = rates["aioaccel streaming"], rates["run_in_executor per item"]
        print(f"  aioaccel streaming vs the best raw loop: {ours / best:.2f}x;"
              f" vs run_in_executor: {ours / executor:.2f}x")


# ---- 2. pipelining ------------------------------------------------------------------------
def pipelining(loop: asyncio.AbstractEventLoop, rounds: int, tmp: Path) -> None:
    chain = conv_chain(size=64, channels=32, depth=17)
    xs = [chain.random_input(s) for s in range(8)]
    count = 200
    for backend in ("litert", "onnx"):
        if backend == "litert":
            whole_path = chain.write_tflite(tmp / "whole.tflite")
            segment_paths = chain.write_tflite_segments(tmp, 2)
        else:
            whole_path = chain.write_onnx(tmp / "whole.onnx")
            segment_paths = chain.write_onnx_segments(tmp, 2)
        whole = raw_model(backend, whole_path)
        segments = [raw_model(backend, p) for p in segment_paths]
        seg_times = []
        for k, seg in enumerate(segments):
            x = xs[0] if k == 0 else segments[0](xs[0])
            seg(x)
            started = time.perf_counter()
            for _ in range(30):
                seg(x)
            seg_times.append((time.perf_counter() - started) / 30)

        async def sequential(n: int) -> None:
            for i in range(n):
                whole(xs[i % 8])

        runner = loop.run_until_complete(
            aioaccel.open(segment_paths, num_threads=1, maxsize=8).__aenter__())

        async def pipelined(n: int) -> None:
            await stream(runner, xs, n)

        rates = measure(loop, {"whole model, sequential": sequential,
                               "aioaccel, 2 segments": pipelined}, count, rounds)
        loop.run_until_complete(runner.aclose())
        limit = 1 / max(seg_times)
        print_table(f"2. pipelining, {backend}: conv chain, segments {seg_times[0] * 1e3:.1f} + "
                    f"{seg_times[1] * 1e3:.1f} ms, {count} items per round", rates,
                    "whole model, sequential",
                    {"aioaccel, 2 segments": f"(limit 1/slowest segment: {limit:.0f}/s = "
                     f"{limit / rates['whole model, sequential']:.2f}x; reached "
                     f"{rates['aioaccel, 2 segments'] / limit:.0%})"})


# ---- 3. loop health -----------------------------------------------------------------------
def loop_health(loop: asyncio.AbstractEventLoop, tmp: Path) -> None:
    chain = conv_chain(size=32, channels=16, depth=4)
    xs = [chain.random_input(s) for s in range(8)]
    targets = {
        "litert, 2 segments": (chain.write_tflite_segments(tmp, 2), {"num_threads": 1}),
        "onnx, 2 segments": (chain.write_onnx_segments(tmp, 2), {"num_threads": 1}),
        "openvino (sync requests)": (chain.openvino_model(), {}),
        "openvino (api=async)": (chain.openvino_model(), {"api": "async"}),
    }
    print("\n3. loop health: lag of a 1 ms sleeper while the runner streams flat out")
    print(f"  {'backend':<30} {'items/s':>8} {'lag p50':>9} {'lag p99':>9}")
    for name, (target, options) in targets.items():
        async def run() -> tuple[float, list[float]]:
            async with aioaccel.open(target, maxsize=8, **options) as runner:
                await runner.infer(xs[0])
                probe, lags = lag_probe(asyncio.get_running_loop())
                started = time.perf_counter()
                await stream(runner, xs, 2000)
                rate = 2000 / (time.perf_counter() - started)
                probe.cancel()
                return rate, lags

        rate, lags = loop.run_until_complete(run())
        print(f"  {name:<30} {rate:>8.0f} {percentile(lags, 0.5) * 1e3:>7.2f}ms "
              f"{percentile(lags, 0.99) * 1e3:>7.2f}ms")


# ---- 4. memory ----------------------------------------------------------------------------
def memory(loop: asyncio.AbstractEventLoop, tmp: Path) -> None:
    chain = dense_chain(16, 2, inputs=262144)  # a 1 MiB float32 input
    path = chain.write_onnx(tmp / "wide.onnx")
    item = 262144 * 4
    print("\n4. memory: 300 inputs of 1 MiB pushed at a consumer that takes 5 ms per result")
    for maxsize in (4, 16):
        async def run() -> tuple[int, int]:
            async with aioaccel.open(path, maxsize=maxsize, num_threads=1) as runner:
                async def produce() -> None:
                    for i in range(300):
                        await runner.push(np.full((1, 262144), i, np.float32))
                    runner.close()

                tracemalloc.start()
                baseline = tracemalloc.get_traced_memory()[0]
                producer = asyncio.create_task(produce())
                async for _ in runner:
                    await asyncio.sleep(0.005)
                await producer
                peak = tracemalloc.get_traced_memory()[1] - baseline
                tracemalloc.stop()
                return peak, runner.stats().peak_admitted

        peak, admitted = loop.run_until_complete(run())
        print(f"  maxsize={maxsize:<3} peak growth {peak / item:5.1f} MiB = items "
              f"(peak admitted {admitted}; bound: maxsize + the one being built)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--only", default="overhead,pipelining,loop,memory")
    args = parser.parse_args()
    parts = args.only.split(",")
    loop = new_loop(args.loop)
    print(f"bench_runtimes: loop={args.loop}, rounds={args.rounds} "
          f"(medians of interleaved rounds)")
    with tempfile.TemporaryDirectory() as tmp:
        if "overhead" in parts:
            overhead(loop, args.rounds)
        if "pipelining" in parts:
            pipelining(loop, args.rounds, Path(tmp))
        if "loop" in parts:
            loop_health(loop, Path(tmp))
        if "memory" in parts:
            memory(loop, Path(tmp))
    loop.close()


if __name__ == "__main__":
    main()
