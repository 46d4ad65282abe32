"""Shared by the benchmarks: interleaved rounds, medians, a ratio table."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from time import perf_counter, thread_time
from typing import Any

import numpy as np

# One BLAS/OpenMP thread per call: the benchmarks compare scheduling, not library threading.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

Mode = Callable[[int], Awaitable[None]]


def make_work(target_seconds: float):  # type: ignore[no-untyped-def]
    """A GIL-releasing NumPy multiply sized to take about ``target_seconds``."""
    n = 200_000
    for _ in range(3):
        a = np.ones(n, np.float32)
        b = np.ones(n, np.float32)
        out = np.empty_like(a)
        # sized on this thread's CPU clock, not the wall clock: on a shared machine a wall
        # clock counts the time other processes held the core, and the work came out short
        started = thread_time()
        for _ in range(50):
            np.multiply(a, b, out=out)
        per_call = (thread_time() - started) / 50
        n = max(1000, int(n * target_seconds / per_call))
    a, b, out = np.ones(n, np.float32), np.ones(n, np.float32), np.empty(n, np.float32)

    def work(_: object) -> np.ndarray:
        return np.multiply(a, b, out=out)

    return work


def add_cpus_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpus", default="",
        help="comma-separated CPU numbers the whole run is kept on (e.g. 0): with the loop "
             "thread and the worker threads on one core, a hand-off costs no cross-core "
             "wake-up, and the run does not swing with where the scheduler puts the threads")


def apply_cpus(spec: str) -> str:
    """Keep this process (and every thread it starts from now on) on the CPUs of ``spec``;
    returns what to print about it."""
    if not spec:
        return "cpus: any"
    cpus = {int(c) for c in spec.split(",") if c.strip()}
    os.sched_setaffinity(0, cpus)
    return f"cpus: {','.join(map(str, sorted(cpus)))}"


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def measure(loop: asyncio.AbstractEventLoop, modes: dict[str, Mode], count: int,
            rounds: int) -> dict[str, float]:
    """items/s per mode: the median over ``rounds``, the modes interleaved within each round."""
    samples: dict[str, list[float]] = {name: [] for name in modes}
    for mode in modes.values():  # warm-up
        loop.run_until_complete(mode(max(1, count // 10)))
    for _ in range(rounds):
        for name, mode in modes.items():
            started = perf_counter()
            loop.run_until_complete(mode(count))
            samples[name].append(count / (perf_counter() - started))
    return {name: statistics.median(values) for name, values in samples.items()}


def print_table(title: str, rates: dict[str, float], baseline: str,
                extra: dict[str, str] | None = None) -> None:
    base = rates[baseline]
    print(f"\n{title}")
    print(f"  {'mode':<34} {'items/s':>10} {'vs ' + baseline:>14}")
    for name, rate in rates.items():
        note = f"  {extra[name]}" if extra and name in extra else ""
        print(f"  {name:<34} {rate:>10.0f} {rate / base:>13.2f}x{note}")


def lag_probe(loop: asyncio.AbstractEventLoop, interval: float = 0.001) -> tuple[Any, list[float]]:
    """Start a task measuring how late the loop wakes a 1 ms sleeper; returns (task, lags)."""
    lags: list[float] = []

    async def probe() -> None:
        while True:
            started = perf_counter()
            await asyncio.sleep(interval)
            lags.append(perf_counter() - started - interval)

    return loop.create_task(probe()), lags


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def stream(runner: Any, xs: list[Any], count: int) -> None:
    """aioaccel streaming: ``count`` pushes (cycling over ``xs``) from a producer task while
    this task consumes ``count`` results."""
    async def produce() -> None:
        for i in range(count):
            await runner.push(xs[i % len(xs)])

    producer = asyncio.create_task(produce())
    for _ in range(count):
        await anext(runner)
    await producer


# ---- servers the web benchmarks start -------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    """Until ``url``/healthz answers 200 (60 s at most); the server's exit is an error."""
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server for {url} did not start")
