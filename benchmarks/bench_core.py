"""Core overhead: aioaccel streaming vs. a raw loop and vs. per-item thread hand-offs.

The work item is a NumPy ufunc on preallocated arrays, which releases the GIL like a runtime's
native call, sized to ~30 us and ~1 ms. In one run, with interleaved rounds:

* raw loop            -- the stage function called in a plain ``for`` loop (one thread, no loop)
* run_in_executor     -- ``await loop.run_in_executor(None, fn, x)`` per item (what users write)
* anyio.to_thread     -- ``await anyio.to_thread.run_sync(fn, x)`` per item
* aioaccel streaming  -- ``await runner.push(x)`` in one task, ``async for`` in another
  (default ``maxsize=8``, and ``maxsize=32``, which lets the bridge coalesce larger bursts)

Run: ``python benchmarks/bench_core.py [--loop asyncio|uvloop] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    add_cpus_argument,
    apply_cpus,
    make_work,
    measure,
    new_loop,
    print_table,
    stream,
)

import aioaccel


def modes_for(work, count_hint: int):  # type: ignore[no-untyped-def]
    import anyio.to_thread

    async def raw(count: int) -> None:
        for i in range(count):
            work(i)

    async def executor(count: int) -> None:
        loop = asyncio.get_running_loop()
        for i in range(count):
            await loop.run_in_executor(None, work, i)

    async def to_thread(count: int) -> None:
        for i in range(count):
            await anyio.to_thread.run_sync(work, i)

    async def streaming(count: int, maxsize: int = 8) -> None:
        async with aioaccel.open(work, maxsize=maxsize) as runner:
            await stream(runner, [0], count)

    async def streaming_32(count: int) -> None:
        await streaming(count, maxsize=32)

    return {"raw loop (one thread)": raw, "run_in_executor per item": executor,
            "anyio.to_thread per item": to_thread, "aioaccel streaming": streaming,
            "aioaccel streaming, maxsize=32": streaming_32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--rounds", type=int, default=5)
    add_cpus_argument(parser)
    args = parser.parse_args()
    pinned = apply_cpus(args.cpus)
    loop = new_loop(args.loop)
    print(f"bench_core: loop={args.loop}, rounds={args.rounds} (medians of interleaved rounds), "
          f"{pinned}")
    for label, seconds, count in (("~30 us work item", 30e-6, 6000),
                                  ("~1 ms work item", 1e-3, 600)):
        work = make_work(seconds)
        started = perf_counter()
        for i in range(200):
            work(i)
        per_item = (perf_counter() - started) / 200
        rates = measure(loop, modes_for(work, count), count, args.rounds)
        print_table(f"{label} (measured {per_item * 1e6:.0f} us), {count} items per round",
                    rates, "raw loop (one thread)")
        streaming = rates["aioaccel streaming"]
        executor = rates["run_in_executor per item"]
        print(f"  aioaccel streaming vs run_in_executor: {streaming / executor:.2f}x")
    loop.close()


if __name__ == "__main__":
    main()
