"""Recovery: how long a camera service goes without results when its device dies or hangs.

A simulated device at ~5 ms per frame is fed by 4 camera streams at 30 frames/s each. In the
middle of the run the device fails fatally (``fatal``), or hangs (``hang``: caught by
``call_timeout``). Reported per scenario: the longest time without any result (the gap),
frames lost (pushed and never answered with outputs), restarts, and the recovery time the
runner measured. Frigate's documented behaviour for a stuck detector, for comparison: it
notices after 10 s, waits 30 s, then restarts the whole service: a gap of 40 s or more.

Process isolation (``--isolation``): a 1 ms model in a child process at full load (16
persistent callers) suffers each native fault once: ``abort``, ``segfault``, ``exit`` (code
3), ``sigkill`` from outside, ``hang`` holding the GIL (``call_timeout=0.1``), memory growth
past ``max_rss``. Reported: the longest gap between results, the new child's load time, items
lost with ``retries=1``, the worst event-loop lag. Then throughput, ``isolation="process"``
vs threads: the 1 ms model, the width-512 ONNX MLP with ``batch=16``, and a 2-stage pipeline of
pure-Python 1 ms stages (two children) vs the same stages called one after the other.
``--soak N``: N crash/restart cycles; fds, threads, /dev/shm and RSS before and after.

Run: ``python benchmarks/bench_recovery.py [--loop asyncio|uvloop] [--seconds 6]
[--isolation] [--soak 200]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import threading
import time
from itertools import pairwise
from pathlib import Path
from time import perf_counter
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np
from _common import lag_probe, measure, new_loop, print_table

import aioaccel
from aioaccel.isolation import child_pids
from aioaccel.testing import SimulatedDevice
from aioaccel.testing.faults import Fault, Work

CAMERAS = 4
FPS = 30.0
FRAME_TIME = 0.005


async def scenario(kind: str, seconds: float, call_timeout: float) -> dict[str, float]:
    frames = int(seconds * FPS)
    fault = frames * CAMERAS // 2  # the device call index where it fails
    device = SimulatedDevice(lambda x: x, latency=FRAME_TIME, jitter=0.0, capacity=1,
                             fatal_at=fault if kind == "fatal" else None,
                             hang_at=fault if kind == "hang" else None)
    restart = aioaccel.Restart(limit=3, window=60.0, backoff=0.05)
    answered = 0
    last = perf_counter()
    gap = 0.0
    async with aioaccel.open(device, maxsize=16, call_timeout=call_timeout, restart=restart,
                             retries=1, close_timeout=5) as runner:
        async def camera(n: int) -> None:
            nonlocal answered, last, gap
            stream = runner.stream(f"cam{n}", maxsize=4)

            async def produce() -> None:
                start = perf_counter()
                for i in range(frames):
                    await asyncio.sleep(max(0.0, start + i / FPS - perf_counter()))
                    await stream.push(i, tag=i)
                stream.close()

            producer = asyncio.create_task(produce())
            async for result in stream:
                now = perf_counter()
                gap = max(gap, now - last)
                last = now
                if result.ok:
                    answered += 1
            await producer

        await asyncio.gather(*(camera(n) for n in range(CAMERAS)))
        stats = runner.stats()
    device.release()
    return {"gap": gap, "lost": CAMERAS * frames - answered, "restarts": stats.restarts,
            "recovery": stats.recovery_sum, "pushed": stats.pushed}


# ---- process isolation ------------------------------------------------------------------------
CALLERS = 16
FAULT_AT = 600  # the child's call that fails (~0.6 s into the run at ~1000 items/s)


async def fault_scenario(kind: str, seconds: float) -> dict[str, float]:
    """One fault under full load; the gap between results, losses, loop lag."""
    with tempfile.TemporaryDirectory() as tmp:
        once = Path(tmp) / "fired"
        options: dict[str, Any] = {}
        if kind == "hang":
            stage = Fault("hang", at=FAULT_AT, ms=1.0, once=once)
            options["call_timeout"] = 0.1
        elif kind == "max_rss":
            stage = Fault("grow", at=FAULT_AT, ms=1.0, megabytes=16, once=once)
            options["max_rss"] = 256 * 2**20
        elif kind == "none":
            stage = Fault("exit", at=10**9, ms=1.0)  # never fires: the baseline
        elif kind == "sigkill":
            stage = Fault("exit", at=10**9, ms=1.0)  # never fires: killed from outside
        else:
            stage = Fault(kind, at=FAULT_AT, ms=1.0, once=once)
        restart = aioaccel.Restart(limit=5, window=60.0, backoff=0.01)
        stamps: list[float] = []
        lost = 0
        loop = asyncio.get_running_loop()
        async with aioaccel.open(stage, isolation="process", maxsize=CALLERS, restart=restart,
                                 retries=1, **options) as runner:
            probe, lags = lag_probe(loop)
            deadline = perf_counter() + seconds

            async def caller() -> None:
                nonlocal lost
                while perf_counter() < deadline:
                    try:
                        await runner.infer(np.zeros(16, np.float32))
                        stamps.append(perf_counter())
                    except aioaccel.AccelError:
                        lost += 1

            if kind == "sigkill":
                pid = child_pids(runner)[0]
                loop.call_later(0.6, os.kill, pid, signal.SIGKILL)
            await asyncio.gather(*(caller() for _ in range(CALLERS)))
            probe.cancel()
            health = runner.health()
            load = float(runner.info.get("load_seconds", 0.0))
        stamps.sort()
        gap = max((b - a for a, b in pairwise(stamps)), default=0.0)
        return {"gap": gap, "load": load, "lost": lost, "restarts": health.restarts,
                "lag": max(lags, default=0.0), "items": len(stamps)}


def isolation_faults(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    print(f"\nprocess isolation: a 1 ms model, {CALLERS} persistent callers, each fault once, "
          f"retries=1, restart backoff 0.01 s")
    print(f"  {'fault':<9} {'gap (s)':>8} {'load (s)':>9} {'gap-load':>9} {'target':>7} "
          f"{'lost':>5} {'restarts':>9} {'loop lag (ms)':>14} {'items':>6}")
    for kind in ("none", "abort", "segfault", "exit", "sigkill", "hang", "max_rss"):
        r = loop.run_until_complete(fault_scenario(kind, seconds))
        budget = 0.3 + (0.1 if kind == "hang" else 0.0)  # a hang is noticed at call_timeout
        print(f"  {kind:<9} {r['gap']:>8.3f} {r['load']:>9.3f} {r['gap'] - r['load']:>9.3f} "
              f"{'<= ' + format(budget, '.1f'):>7} {r['lost']:>5.0f} {r['restarts']:>9.0f} "
              f"{r['lag'] * 1e3:>14.1f} {r['items']:>6.0f}")


def _persistent(runner: Any, x: Any, callers: int = CALLERS) -> Any:
    async def run(count: int) -> None:
        left = count

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await runner.infer(x)

        await asyncio.gather(*(caller() for _ in range(callers)))
    return run


def isolation_throughput(loop: asyncio.AbstractEventLoop, rounds: int) -> None:
    x = np.zeros(16, np.float32)
    opened = []

    def open_(target: Any, **options: Any) -> Any:
        runner = loop.run_until_complete(aioaccel.open(target, **options).__aenter__())
        opened.append(runner)
        return runner

    try:
        work = Work(1.0)  # sleeps: a runtime's native call, GIL released
        thread = open_(work, maxsize=CALLERS)
        process = open_(work, maxsize=CALLERS, isolation="process")
        rates = measure(loop, {"thread runner": _persistent(thread, x),
                               "isolation='process'": _persistent(process, x)}, 1000, rounds)
        print_table("1 ms model, 16 persistent callers (target: process >= 0.95x)", rates,
                    "thread runner")
        try:
            from aioaccel.testing.models import dense_chain

            chain = dense_chain(512, 4, dynamic_batch=True, seed=512)
            with tempfile.TemporaryDirectory() as tmp:
                path = chain.write_onnx(Path(tmp) / "mlp512.onnx")
                thread = open_(path, batch=16, maxsize=64, num_threads=1)
                process = open_(path, batch=16, maxsize=64, num_threads=1, isolation="process")
                xs = chain.random_input(0)
                rates = measure(loop, {"thread runner": _persistent(thread, xs, 64),
                                       "isolation='process'": _persistent(process, xs, 64)},
                                4000, rounds)
            print_table("ONNX width-512 MLP, batch=16, 64 persistent callers (target: process "
                        ">= 0.8x)", rates, "thread runner")
        except aioaccel.BackendUnavailable as exc:
            print(f"\nONNX: skipped ({exc})")
        spin = Work(1.0, "spin")  # holds the GIL: pure-Python pre/post-processing
        two = open_([spin, Work(1.0, "spin")], maxsize=CALLERS, isolation="process")
        threads = open_([spin, Work(1.0, "spin")], maxsize=CALLERS)

        async def sequential(count: int) -> None:
            for _ in range(count):
                spin(spin(x))

        rates = measure(loop, {"sequential (one thread)": sequential,
                               "2 stages, 2 threads": _persistent(threads, x),
                               "2 stages, 2 children": _persistent(two, x)}, 500, rounds)
        print_table("2-stage pipeline of pure-Python 1 ms stages (target: children >= 1.7x)",
                    rates, "sequential (one thread)")
    finally:
        for runner in opened:
            loop.run_until_complete(runner.aclose())


def _snapshot() -> dict[str, int]:
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"fds": len(os.listdir("/proc/self/fd")),
            "threads": threading.active_count(),
            "shm": len(os.listdir("/dev/shm")),
            "rss_mib": rss // 2**20}


async def soak(cycles: int) -> tuple[set[int], set[int]]:
    restart = aioaccel.Restart(limit=cycles * 2, window=3600.0, backoff=0.0)
    seen: set[int] = set()
    async with aioaccel.open(Fault("segfault", at=0), isolation="process", maxsize=2,
                             restart=restart) as runner:
        before: dict[str, int] = {}
        started = perf_counter()
        for n in range(cycles):
            try:
                await runner.infer(np.zeros(1024, np.float32))
            except aioaccel.DeviceError:
                pass
            await asyncio.wait_for(runner._sup.healer.recovered.wait(), 30.0)
            seen.update(child_pids(runner))
            if n == 4:
                before = _snapshot()
        after = _snapshot()
        took = perf_counter() - started
        current = set(child_pids(runner))
    print(f"\nsoak: {cycles} segfault/restart cycles in {took:.1f} s "
          f"({took / cycles * 1e3:.0f} ms each), {len(seen)} children")
    for key in before:
        print(f"  {key:<8} after 5 cycles {before[key]:>6}   after {cycles} {after[key]:>6}")
    return seen, current


def report_children(seen: set[int], current: set[int]) -> None:
    time.sleep(0.5)  # let the last children be reaped before counting them
    left = [p for p in seen - current if os.path.exists(f"/proc/{p}")]
    print(f"  children still running: {len(left)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--call-timeout", type=float, default=0.5)
    parser.add_argument("--isolation", action="store_true",
                        help="only the process-isolation figures (faults, throughput)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--soak", type=int, default=0, metavar="N",
                        help="only N crash/restart cycles of an isolated child, leak figures")
    args = parser.parse_args()
    loop = new_loop(args.loop)
    if args.soak:
        report_children(*loop.run_until_complete(soak(args.soak)))
        return
    if args.isolation:
        isolation_faults(loop, min(args.seconds, 2.0))
        isolation_throughput(loop, args.rounds)
        loop.close()
        return
    print(f"bench_recovery: loop={args.loop}, {CAMERAS} cameras x {FPS:.0f} fps, "
          f"~{FRAME_TIME * 1e3:.0f} ms per frame, call_timeout={args.call_timeout} s, "
          f"restart backoff 0.05 s, retries=1")
    print(f"  {'scenario':<10} {'gap (s)':>8} {'target':>10} {'lost':>5} {'restarts':>9} "
          f"{'recovery (s)':>13}")
    targets = {"none": None, "fatal": 1.0, "hang": args.call_timeout + 1.0}
    for kind in ("none", "fatal", "hang"):
        r = loop.run_until_complete(scenario(kind, args.seconds, args.call_timeout))
        target = targets[kind]
        mark = "" if target is None else f"<= {target:.1f}"
        print(f"  {kind:<10} {r['gap']:>8.3f} {mark:>10} {r['lost']:>5.0f} "
              f"{r['restarts']:>9.0f} {r['recovery']:>13.3f}")
    print("  Frigate (documented): 10 s to detect + 30 s stop + service restart: gap >= 40 s")
    loop.close()


if __name__ == "__main__":
    main()
