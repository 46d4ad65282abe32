"""One program, three async libraries: aioaccel under asyncio, uvloop and trio.

The program is written once with anyio (task groups), so only the running library differs:

* streaming          -- ``push`` in one task, ``async for`` in another (a ~30 us NumPy call
  that releases the GIL, maxsize 8 and 32)
* infer, 64 callers  -- 64 persistent callers of ``infer`` on a trivial stage (the loop's
  per-item cost dominates), and with ``batch=16`` on (1, 4) float32 rows

Each library runs in its own process, in interleaved rounds; the table gives the medians of
items/s and of the event loop thread's CPU time per item (``time.thread_time``).

Run: ``python benchmarks/bench_libraries.py [--rounds 5]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, sys
from time import perf_counter, thread_time

import anyio
import numpy as np

import aioaccel
from _common import make_work  # benchmarks/ is on PYTHONPATH after the checkout

COUNT = 4000




async def streaming(work, maxsize):
    async with aioaccel.open(work, maxsize=maxsize) as runner:
        async def produce():
            for i in range(COUNT):
                await runner.push(i)
        started, cpu = perf_counter(), thread_time()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(produce)
            for _ in range(COUNT):
                await runner.__anext__()
        return COUNT / (perf_counter() - started), (thread_time() - cpu) / COUNT * 1e6


async def infer(stage, x, **options):
    async with aioaccel.open(stage, maxsize=64, **options) as runner:
        per_caller = 4 * COUNT // 64

        async def caller():
            for _ in range(per_caller):
                await runner.infer(x)
        started, cpu = perf_counter(), thread_time()
        async with anyio.create_task_group() as tasks:
            for _ in range(64):
                tasks.start_soon(caller)
        n = per_caller * 64
        return n / (perf_counter() - started), (thread_time() - cpu) / n * 1e6


async def main():
    work = make_work(30e-6)
    out = {}
    modes = {
        "streaming, 30 us, maxsize=8": lambda: streaming(work, 8),
        "streaming, 30 us, maxsize=32": lambda: streaming(work, 32),
        "infer, 64 callers, trivial stage": lambda: infer(lambda x: x, 1),
        "infer, 64 callers, batch=16": lambda: infer(lambda x: x * 2,
                                                     np.ones((1, 4), np.float32), batch=16),
    }
    await modes["infer, 64 callers, trivial stage"]()  # warm-up
    for name, mode in modes.items():
        out[name] = await mode()
    print(json.dumps(out))


backend = sys.argv[1]
if backend == "uvloop":
    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
else:
    anyio.run(main, backend=backend)
'''

LIBRARIES = ("asyncio", "uvloop", "trio")


def one_run(library: str) -> dict[str, list[float]]:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "benchmarks")]),
           "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, library], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600, check=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, list[float]]]] = {lib: [] for lib in LIBRARIES}
    for n in range(args.rounds):
        for lib in LIBRARIES[n % 3:] + LIBRARIES[:n % 3]:  # a different order every round
            runs[lib].append(one_run(lib))
        print(f"  round {n + 1}/{args.rounds} done", file=sys.stderr)
    print(f"bench_libraries: {args.rounds} rounds (medians); the same anyio program on each")
    for index, what in ((0, "items/s"), (1, "loop CPU us/item")):
        print(f"\n  {what:<36}" + "".join(f"{lib:>10}" for lib in LIBRARIES))
        for mode in runs["asyncio"][0]:
            cells = [statistics.median(r[mode][index] for r in runs[lib]) for lib in LIBRARIES]
            fmt = ".0f" if index == 0 else ".2f"
            print(f"  {mode:<36}" + "".join(f"{c:>10{fmt}}" for c in cells))


if __name__ == "__main__":
    main()
