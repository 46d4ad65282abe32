"""Multi-stream fan-in: live cameras beside a burst, sharing one accelerator.

One model (a GIL-releasing NumPy item of ~1 ms, the accelerator) serves two live cameras,
which push a frame every ~4 ms each and wait for its result, while a batch job drops a burst
of ``--burst`` frames on it at once. What matters to the cameras is their frames' latency,
push call to result. In one run, with interleaved rounds:

* naive glue        -- what users write: one ``asyncio.Queue(maxsize)`` in front of a worker
  task calling ``await loop.run_in_executor(None, model, x)``; callers await a future
* one FIFO runner   -- ``await runner.infer(x)`` for everybody on one aioaccel runner
* aioaccel streams  -- ``runner.stream("cam0")``, ``runner.stream("cam1")``,
  ``runner.stream("batch")``: round-robin admission across streams

Run: ``python benchmarks/bench_streams.py [--loop uvloop] [--rounds 3] [--burst 200]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path
from time import perf_counter
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import new_loop, percentile
from bench_core import make_work

import aioaccel

CAMERAS, FRAMES, PERIOD, MAXSIZE = 2, 40, 0.004, 8


async def scenario(submit_for: Any, burst: int) -> tuple[list[float], float]:
    """Cameras and a burst through ``submit_for(key)`` -> an ``async (x) -> result`` callable.
    Returns the cameras' latencies and the burst's completion time."""
    latencies: list[float] = []

    async def camera(key: str) -> None:
        submit = submit_for(key)
        for n in range(FRAMES):
            started = perf_counter()
            await submit(n)
            latencies.append(perf_counter() - started)
            await asyncio.sleep(PERIOD)

    async def batch() -> float:
        submit = submit_for("batch")
        await asyncio.sleep(0.02)  # the cameras are running when the burst lands
        started = perf_counter()
        await asyncio.gather(*(submit(i) for i in range(burst)))
        return perf_counter() - started

    *_, burst_time = await asyncio.gather(*(camera(f"cam{c}") for c in range(CAMERAS)), batch())
    return latencies, burst_time


async def naive(work: Any, burst: int) -> tuple[list[float], float]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue(MAXSIZE)

    async def worker() -> None:
        while True:
            x, fut = await queue.get()
            fut.set_result(await loop.run_in_executor(None, work, x))

    task = asyncio.create_task(worker())

    def submit_for(key: str) -> Any:
        async def submit(x: Any) -> Any:
            fut = loop.create_future()
            await queue.put((x, fut))
            return await fut
        return submit

    try:
        return await scenario(submit_for, burst)
    finally:
        task.cancel()


async def fifo_runner(work: Any, burst: int) -> tuple[list[float], float]:
    async with aioaccel.open(work, maxsize=MAXSIZE) as runner:
        return await scenario(lambda key: runner.infer, burst)


async def streams(work: Any, burst: int) -> tuple[list[float], float]:
    async with aioaccel.open(work, maxsize=MAXSIZE) as runner:
        def submit_for(key: str) -> Any:
            stream = runner.stream(key)
            # one consumer per stream routes results to the waiting pushers, in order
            waiting: asyncio.Queue[asyncio.Future[Any]] = asyncio.Queue()

            async def consume() -> None:
                async for result in stream:
                    (await waiting.get()).set_result(result.outputs)

            consumers.append(asyncio.create_task(consume()))

            async def submit(x: Any) -> Any:
                fut = asyncio.get_running_loop().create_future()
                waiting.put_nowait(fut)   # push order == result order for this stream
                await stream.push(x)
                return await fut
            return submit

        consumers: list[asyncio.Task[None]] = []
        try:
            return await scenario(submit_for, burst)
        finally:
            for c in consumers:
                c.cancel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=200)
    args = parser.parse_args()
    work = make_work(1e-3)
    modes = {"naive glue (Queue + run_in_executor)": naive, "one FIFO runner (infer)": fifo_runner,
             "aioaccel streams": streams}
    loop = new_loop(args.loop)
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, mode in modes.items():
            lat, burst_time = loop.run_until_complete(mode(work, args.burst))
            samples[name].append((percentile(lat, 0.5), percentile(lat, 0.99), burst_time))
    loop.close()
    print(f"bench_streams: loop={args.loop}, rounds={args.rounds}, {CAMERAS} cameras x "
          f"{FRAMES} frames every {PERIOD * 1e3:.0f} ms, burst of {args.burst}, ~1 ms model, "
          f"maxsize={MAXSIZE} (medians over rounds)")
    print(f"  {'mode':<38} {'camera p50':>11} {'camera p99':>11} {'burst done':>11}")
    base = statistics.median(s[1] for s in samples[next(iter(modes))])
    for name, rows in samples.items():
        p50 = statistics.median(r[0] for r in rows)
        p99 = statistics.median(r[1] for r in rows)
        done = statistics.median(r[2] for r in rows)
        print(f"  {name:<38} {p50 * 1e3:>8.1f} ms {p99 * 1e3:>8.1f} ms {done:>9.2f} s"
              f"   camera p99 {base / p99:.1f}x better than naive")


if __name__ == "__main__":
    main()
