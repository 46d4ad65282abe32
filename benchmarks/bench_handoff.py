"""What a thread -> loop hand-off can reach on this machine, with no framework at all.

A worker thread runs a ~30 us GIL-releasing NumPy call per item and wakes the event loop
(``call_soon_threadsafe`` of a drain, only when none is pending) every ``k`` items; a loop task
takes the results and spends ``busy`` microseconds of Python on each (a stand-in for what a
framework does per streamed item: admission, records, settling, the result object). Printed:
items/s as a ratio to the raw loop, per (k, busy), for a few rounds.

It shows the floor under aioaccel's streamed figures: whether a target is reachable by
coalescing wake-ups alone, given the loop's per-item Python (docs/performance.md, "30 us
streaming: the wake-ups").

Run: ``python benchmarks/bench_handoff.py [--rounds 2] [--items 6000]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import make_work


def spin(us: float) -> None:
    """Hold the GIL for ``us`` microseconds of Python, as per-item framework code does."""
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def raw(work: Any, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        work(i)
    return n / (time.perf_counter() - started)


async def handoff(work: Any, n: int, k: int, busy: float) -> float:
    loop = asyncio.get_running_loop()
    done: deque[Any] = deque()
    scheduled = [False]
    waiter: list[asyncio.Future[None] | None] = [None]

    def drain() -> None:
        scheduled[0] = False  # cleared first: a later append schedules the next drain
        fut = waiter[0]
        if fut is not None and not fut.done():
            fut.set_result(None)

    def worker() -> None:
        for i in range(n):
            done.append(work(i))
            if ((i + 1) % k == 0 or i == n - 1) and not scheduled[0]:
                scheduled[0] = True
                loop.call_soon_threadsafe(drain)

    thread = threading.Thread(target=worker, name="handoff-worker", daemon=True)
    started = time.perf_counter()
    thread.start()
    got = 0
    while got < n:
        while done:
            done.popleft()
            got += 1
            if busy:
                spin(busy)
        if got >= n:
            break
        waiter[0] = loop.create_future()
        if not done:
            await waiter[0]
    thread.join()
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--items", type=int, default=6000)
    args = parser.parse_args()
    work = make_work(30e-6)
    for _ in range(args.rounds):
        base = raw(work, args.items)
        cells = []
        for k in (1, 4, 8, 16):
            for busy in (0.0, 5.0, 10.0):
                rate = asyncio.run(handoff(work, args.items, k, busy))
                cells.append(f"k={k} busy={busy:g}us {rate / base:.2f}x")
        print(f"raw {base:.0f}/s | " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
