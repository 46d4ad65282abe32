"""Strict priority under batching: a priority stream's latency beside a flooding stream.

One batched model (a GIL-releasing call of ``--call-ms`` plus a little per row, the
accelerator) serves a flood that keeps the runner full, and a priority stream that pushes one
item every ~5 ms and waits for its result (``reserve=1``: admission lets it in at once, so what
is measured is the wait *after* admission). Modes, interleaved within each round:

* ``fifo``      -- the priority stream has the flood's priority: after admission its item
                   waits in stage 0's FIFO behind the flood (what every priority did before
                   stage 0 ranked by priority)
* ``ranked``    -- ``priority=1``: stage 0 serves it first, its item rides the next batch
* ``unbatched`` -- ``priority=1`` without batching, for reference

Reported: the priority item's latency (p50, p99, max, ms) and the flood's items/s (what the
ranking costs the flood).

Run: ``python benchmarks/bench_priority.py [--loop uvloop] [--rounds 3] [--batch 8]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import new_loop, percentile

import aioaccel

MAXSIZE, PROBES, PERIOD = 32, 60, 0.005


def make_model(call_ms: float) -> Any:
    def model(x: np.ndarray) -> np.ndarray:
        time.sleep(call_ms / 1000 + 0.00005 * x.shape[0])  # releases the GIL, as a device
        return x + 1
    return model


async def run(call_ms: float, batch: int | None, priority: int) -> tuple[list[float], float]:
    x = np.zeros((1, 4), np.float32)
    async with aioaccel.open(make_model(call_ms), batch=batch, maxsize=MAXSIZE) as runner:
        flood = runner.stream("flood")
        probe = runner.stream("probe", priority=priority, reserve=1)
        done = asyncio.Event()
        flooded = 0

        async def produce() -> None:
            while not done.is_set():
                await flood.push(x)

        async def consume() -> None:
            nonlocal flooded
            async for _ in flood:
                flooded += 1

        producer, consumer = asyncio.create_task(produce()), asyncio.create_task(consume())
        await asyncio.sleep(0.05)  # the flood holds the runner when the probes start
        latencies = []
        started = perf_counter()
        counted = flooded
        for _ in range(PROBES):
            t0 = perf_counter()
            await probe.push(x)
            await anext(probe)
            latencies.append(perf_counter() - t0)
            await asyncio.sleep(PERIOD)
        rate = (flooded - counted) / (perf_counter() - started)
        done.set()
        await producer  # its last push is admitted: the consumer keeps draining
        flood.close()
        await consumer  # ends after the flood's last result
    return latencies, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--call-ms", type=float, default=1.0)
    args = parser.parse_args()
    modes = {"fifo": (args.batch, 0), "ranked": (args.batch, 1), "unbatched": (None, 1)}
    loop = new_loop(args.loop)
    lat: dict[str, list[float]] = {m: [] for m in modes}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for name, (batch, priority) in modes.items():
            ls, rate = loop.run_until_complete(run(args.call_ms, batch, priority))
            lat[name].extend(ls)
            rates[name].append(rate)
    loop.close()
    print(f"priority stream beside a flood: batch={args.batch}, call {args.call_ms} ms, "
          f"maxsize={MAXSIZE}, {args.rounds} rounds x {PROBES} probes, loop={args.loop}")
    print(f"{'mode':<10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'flood items/s':>14}")
    for name in modes:
        ms = sorted(v * 1000 for v in lat[name])
        print(f"{name:<10} {statistics.median(ms):8.2f} {percentile(ms, 0.99):8.2f} "
              f"{ms[-1]:8.2f} {statistics.median(rates[name]):14.0f}")


if __name__ == "__main__":
    main()
