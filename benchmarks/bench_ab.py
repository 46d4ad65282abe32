"""Before/after: the same per-item workloads on two checkouts, in alternating processes.

For a change to the core's hot path (the loop-side cost of each item): every round runs one
short process per checkout, old and new in turn, so both see the same machine load; each
process measures, in one run:

* raw loop            -- a ~30 us GIL-releasing NumPy call in a plain loop (the load gauge)
* streaming           -- ``push`` in one task, ``async for`` in another, maxsize 8 and 32
* infer, 64 callers   -- 64 persistent callers of ``infer`` on a trivial stage (the loop's
  per-item cost dominates: the figure most sensitive to the hot path)
* infer, batch=16     -- the same with dynamic batching of (1, 4) float32 rows

and prints items/s and the event loop thread's CPU time per item (``time.thread_time``: what
the hot path costs, much less sensitive to other processes than throughput). The tables give
each mode's median over the rounds, per checkout, and the median of the per-round ratios
new/old (1.00 = no change; the spread of those ratios is the noise).

Run: ``python benchmarks/bench_ab.py OLD_CHECKOUT [NEW_CHECKOUT] [--rounds 8] [--loop uvloop]``
(make ``OLD_CHECKOUT`` with ``git worktree add --detach /tmp/old <commit>``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent

CHILD = r'''
import asyncio, json, sys
from time import perf_counter, thread_time

import numpy as np

import aioaccel
from _common import make_work  # benchmarks/ is on PYTHONPATH after the checkout

COUNT = 4000




async def streaming(work, maxsize):
    async with aioaccel.open(work, maxsize=maxsize) as runner:
        async def produce():
            for i in range(COUNT):
                await runner.push(i)
        producer = asyncio.ensure_future(produce())
        started, cpu = perf_counter(), thread_time()
        for _ in range(COUNT):
            await runner.__anext__()
        await producer
        return COUNT / (perf_counter() - started), (thread_time() - cpu) / COUNT * 1e6


async def infer(stage, x, **options):
    async with aioaccel.open(stage, maxsize=64, **options) as runner:
        per_caller = 4 * COUNT // 64

        async def caller():
            for _ in range(per_caller):
                await runner.infer(x)
        await asyncio.gather(*(runner.infer(x) for _ in range(64)))  # warm
        started, cpu = perf_counter(), thread_time()
        await asyncio.gather(*(caller() for _ in range(64)))
        n = per_caller * 64
        return n / (perf_counter() - started), (thread_time() - cpu) / n * 1e6


async def main():
    work = make_work(30e-6)
    started = perf_counter()
    for i in range(COUNT):
        work(i)
    rates = {"raw loop, 30 us": COUNT / (perf_counter() - started)}
    cpu = {}
    modes = {
        "streaming, 30 us, maxsize=8": streaming(work, 8),
        "streaming, 30 us, maxsize=32": streaming(work, 32),
        "infer, 64 callers, trivial stage": infer(lambda x: x, 1),
        "infer, 64 callers, batch=16": infer(lambda x: x * 2, np.ones((1, 4), np.float32),
                                             batch=16),
    }
    for name, mode in modes.items():
        rates[name], cpu[name] = await mode
    print(json.dumps({"module": aioaccel.__file__, "rates": rates, "cpu": cpu}))


if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
'''


def one_round(checkout: Path, loop: str) -> dict[str, dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), str(BENCH)]),
           "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, loop], env=env, cwd=checkout,
                          capture_output=True, text=True, timeout=600, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if not out["module"].startswith(str(checkout)):
        raise RuntimeError(f"{checkout}: imported aioaccel from {out['module']}")
    return {"rates": out["rates"], "cpu": out["cpu"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=Path(__file__).parent.parent)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    old, new = args.old.resolve(), args.new.resolve()
    samples: dict[str, list[dict[str, dict[str, float]]]] = {"old": [], "new": []}
    for n in range(args.rounds):
        order = [("old", old), ("new", new)] if n % 2 == 0 else [("new", new), ("old", old)]
        for side, checkout in order:
            samples[side].append(one_round(checkout, args.loop))
        print(f"  round {n + 1}/{args.rounds} done", file=sys.stderr)
    print(f"bench_ab: loop={args.loop}, {args.rounds} rounds, old={old}, new={new}")
    for what, unit, fmt in (("rates", "items/s", ".0f"), ("cpu", "loop CPU us/item", ".2f")):
        print(f"\n  {what + ' (' + unit + ')':<36} {'old':>10} {'new':>10} {'new/old':>8} "
              f"{'range':>12}")
        for mode in samples["old"][0][what]:
            o = statistics.median(r[what][mode] for r in samples["old"])
            w = statistics.median(r[what][mode] for r in samples["new"])
            ratios = sorted(b[what][mode] / a[what][mode]
                            for a, b in zip(samples["old"], samples["new"]))
            print(f"  {mode:<36} {o:>10{fmt}} {w:>10{fmt}} {statistics.median(ratios):>7.2f}x "
                  f"{ratios[0]:>5.2f}-{ratios[-1]:.2f}")


if __name__ == "__main__":
    main()
