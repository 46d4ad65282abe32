"""Soak: a runner at full speed for a minute, with every kind of traffic, watched each second.

Traffic, all at once on one runner (a ~50 us GIL-releasing stage, 2 replicas, maxsize 16):
a streaming producer/consumer, 32 concurrent ``infer`` callers (some with tiny timeouts, some
cancelled), camera streams made and dropped, a poisoned input now and then (fails alone).

Sampled every second: RSS, open descriptors, threads, loop lag p99. At the end the counters
must balance: ``pushed == completed + failed + withdrawn`` (a discarded result was completed
or failed: nobody was left to take it), nothing in flight, no waiter, and RSS / descriptors /
threads flat (the last samples within a small margin of the first ones after warm-up).

Run: ``python benchmarks/soak.py [--seconds 60] [--loop asyncio|uvloop]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import threading
from pathlib import Path
from time import perf_counter

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import lag_probe, new_loop, percentile

import aioaccel

A = np.ones(20_000, np.float32)
OUT = np.empty_like(A)


def stage(x: object) -> object:
    if isinstance(x, str):
        raise ValueError("poisoned input")
    np.multiply(A, A, out=OUT)  # releases the GIL, like a runtime
    return x


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def soak(seconds: float) -> int:
    rng = random.Random(1)
    stop = asyncio.Event()
    samples: list[tuple[float, float, int, int, float]] = []
    probe, lags = lag_probe(asyncio.get_running_loop())
    async with aioaccel.open(stage, replicas=2, maxsize=16, name="soak") as runner:

        async def streaming() -> None:
            async def produce() -> None:
                i = 0
                while not stop.is_set():
                    await runner.push("poison" if i % 997 == 0 else i, tag=i)
                    i += 1
                runner.close()

            producer = asyncio.create_task(produce())
            async for _ in runner:
                pass
            await producer

        async def caller(n: int) -> None:
            while not stop.is_set():
                timeout = 0.0001 if rng.random() < 0.05 else 5.0
                task = asyncio.create_task(runner.infer(n, timeout=timeout))
                if rng.random() < 0.05:
                    await asyncio.sleep(0)
                    task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, aioaccel.InferTimeout, aioaccel.RunnerClosed):
                    pass

        async def cameras() -> None:
            k = 0
            while not stop.is_set():
                cam = runner.stream(("cam", k))
                k += 1
                try:
                    await cam.push(k)
                    await anext(cam)
                except aioaccel.RunnerClosed:
                    return
                del cam  # dropped without close(): the runner reclaims it
                await asyncio.sleep(0.001)

        async def sampler() -> None:
            started = perf_counter()
            while not stop.is_set():
                await asyncio.sleep(1.0)
                window = lags[:]
                lags.clear()
                samples.append((perf_counter() - started, rss_mb(), fds(),
                                threading.active_count(), percentile(window, 0.99)))
                t, rss, fd, threads, lag = samples[-1]
                print(f"  {t:5.0f} s  rss {rss:7.1f} MB  fds {fd:4d}  threads {threads:3d}  "
                      f"loop lag p99 {lag * 1e3:6.2f} ms  completed {runner.stats().completed}",
                      flush=True)
                if t >= seconds:
                    stop.set()

        tasks = [asyncio.create_task(c) for c in
                 (streaming(), cameras(), sampler(), *(caller(n) for n in range(32)))]
        await stop.wait()
        await asyncio.gather(*tasks)
        stats = runner.stats()
    probe.cancel()
    ok = True
    balance = stats.completed + stats.failed + stats.withdrawn
    print(f"\n  pushed {stats.pushed} = completed {stats.completed} + failed {stats.failed} "
          f"+ withdrawn {stats.withdrawn} ({balance}); discarded {stats.discarded}; "
          f"in_flight {stats.in_flight}, waiting {stats.waiting}, streams left "
          f"{len(stats.streams)}")
    if stats.pushed != balance or stats.in_flight or stats.waiting:
        print("  FAIL: the counters do not balance")
        ok = False
    if len(samples) >= 6:
        first, last = samples[2], samples[-1]
        print(f"  after warm-up -> end: rss {first[1]:.1f} -> {last[1]:.1f} MB, fds {first[2]} "
              f"-> {last[2]}, threads {first[3]} -> {last[3]}; worst loop lag p99 "
              f"{max(s[4] for s in samples) * 1e3:.2f} ms")
        if last[1] - first[1] > 20 or last[2] > first[2] + 2 or last[3] > first[3] + 1:
            print("  FAIL: memory, descriptors or threads grew")
            ok = False
    print("  soak:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    loop = new_loop(args.loop)
    print(f"soak: {args.seconds:.0f} s, loop={args.loop}")
    code = loop.run_until_complete(soak(args.seconds))
    loop.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
