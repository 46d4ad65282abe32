"""The framework's cost per item on the event loop, and where it goes.

For each way of feeding a runner -- ``infer`` from 64 persistent callers, ``push`` +
``async for``, ``stream.push`` + ``async for`` on a stream, and the bulk APIs (``infer_many``,
``push_many`` + ``results()``, ``stream.push_many`` + ``stream.results()``) where the runner has
them -- batching off and on, this prints in one run with interleaved rounds:

* items/s (median of the rounds) and the ratio to the raw per-item and raw batched loops;
* **loop CPU per item**: CPU time of the event-loop thread (``time.thread_time``) over the
  round divided by the items -- what the framework and the caller cost the loop, without the
  device (it runs on worker threads) and without idle time in ``epoll``;
* **wake-ups/item**: callbacks the runner's bridge scheduled on the loop per item (drains of
  finished results, counted by wrapping ``Bridge.call_soon``: old and new checkouts alike);
* **workers us/item**: CPU time of the runner's worker threads per item (the runtime's own
  work, plus the framework's Python on those threads, which competes with the loop for the GIL);
* with ``--profile``, that loop time split (cProfile with a CPU-time clock, one extra round per
  mode) into *admission* (capacity, waiting for room), *validation* (checking inputs against
  the spec), *hand-off* (tickets, jobs, the stage-0 queue), *completion* (the bridge's drain,
  settling futures and outboxes), *result delivery* (``async for`` / ``results()``, Result
  records), *event loop* (asyncio's own scheduling, tasks, wake-ups) and *caller* (this
  benchmark's own coroutines).

The model is ONNX Runtime's 4-layer dense MLP of ``--width`` (64 by default: ~0.01 ms per item,
where the framework, not the device, sets the speed), one runtime thread on both sides. The
``stage30`` section is a ~30 us GIL-releasing NumPy stage streamed without batching, against
its raw loop.

Beside the raw loops, each section measures **floors** (rows named ``floor: ...``): the least
any asyncio bridge costs for that mode on this machine, written directly against the loop and
one thread with no framework, so that a missed target can be read against what is possible:

* ``floor: loop, 64 callers, bare futures`` -- 64 coroutines awaiting futures resolved at once
  by a callback each (no model, no thread); ``... one callback per burst`` -- the same with one
  callback resolving every pending future;
* ``floor: bridge, 64 callers, batch N`` -- 64 coroutines hand a future each to one thread
  through a ``SimpleQueue``; the thread joins what is queued (up to N rows), makes one batched
  call and resolves the lot with one ``call_soon_threadsafe``; ``floor: bridge, infer_many`` --
  one coroutine hands 64 rows over as batches of N and awaits one future;
* ``floor: hand-off, one wake-up + future per item`` (stage30) -- a thread makes the same 30 us
  call per item and ``call_soon_threadsafe``-resolves one future per item that a loop task
  awaits in order; ``... one wake-up per burst`` -- results appended to a deque, a drain
  scheduled only when none is pending (the input side is left out: a floor, not a runner).

Targets (issue 21): <= 7 us of loop CPU per batched item, <= 12 us unbatched.

Run: ``python benchmarks/bench_overhead.py [--loop asyncio|uvloop] [--rounds 3] [--width 64]
[--batch 16] [--seconds 0.3] [--only onnx,stage30] [--profile] [--switch 0.5,0.05]
[--switchinterval S] [--best] [--modes push_many,...]``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, SimpleQueue
from time import perf_counter
from typing import Any, ClassVar

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_cpus_argument, apply_cpus, new_loop
from bench_core import make_work

import aioaccel
from aioaccel.testing.models import dense_chain

CALLERS = 64
BATCH_WAIT = 0.002
BULK = 64  # rows per infer_many / push_many call

#: one round: process ``n`` items
Mode = Callable[[int], Awaitable[None]]


# ---- attribution ------------------------------------------------------------------------------
CATEGORIES = ("admission", "validation", "hand-off", "completion", "result delivery",
              "event loop", "caller", "other")

# (substring of the file, function names or None for any) -> category; first match wins.
_RULES: list[tuple[str, frozenset[str] | None, str]] = [
    ("tensors.py", None, "validation"),
    ("aioaccel/backends", None, "validation"),
    ("admission.py", None, "admission"),
    ("bridge.py", None, "completion"),
    ("completion.py", None, "completion"),
    ("lanes.py", frozenset({"wake"}), "completion"),
    ("pipeline.py", None, "hand-off"),
    ("batcher.py", None, "hand-off"),
    ("aioaccel", frozenset({
        "_admit", "_check_accepting", "_take_room", "_admit_many", "_wait_room", "push",
        "_push_lane", "push_nowait", "_push_lane_nowait", "push_many", "_push_many",
        "_admit_rows", "infer", "_infer", "infer_many", "_infer_many", "_in"}), "admission"),
    ("aioaccel", frozenset({"_enqueue", "_enqueue_many", "_submit", "put"}), "hand-off"),
    ("aioaccel", frozenset({"_next", "__anext__", "results", "_results", "_take_ready",
                            "__init__", "outputs", "ok"}), "result delivery"),
    ("aioaccel", None, "other"),
    ("bench_overhead.py", None, "caller"),
    ("asyncio", None, "event loop"),
    ("uvloop", None, "event loop"),
    ("selectors.py", None, "event loop"),
    ("socket.py", None, "event loop"),
]
# built-ins (no file): by their name
_BUILTINS: list[tuple[str, str]] = [
    ("set_result", "completion"), ("set_exception", "completion"),
    ("SimpleQueue", "hand-off"), ("put", "hand-off"),
    ("numpy", "validation"), ("ascontiguousarray", "validation"),
    ("isinstance", "other"),
]


def _category(filename: str, function: str) -> str:
    if filename == "~" or filename.startswith("<"):
        for needle, cat in _BUILTINS:
            if needle in function:
                return cat
        return "event loop"
    for needle, names, cat in _RULES:
        if needle in filename and (names is None or function in names):
            return cat
    return "caller" if "benchmarks" in filename else "other"


def attribute(stats: pstats.Stats) -> dict[str, float]:
    """Own CPU time per category, as fractions of the total."""
    totals = dict.fromkeys(CATEGORIES, 0.0)
    raw: Any = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, function), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        totals[_category(filename, function)] += tottime
    whole = sum(totals.values()) or 1.0
    return {cat: value / whole for cat, value in totals.items()}


# ---- measuring --------------------------------------------------------------------------------
#: wake-ups of the loop by a runner's bridge in the current round (``count_wakeups``)
WAKES = [0]


def count_wakeups() -> None:
    """Count every callback a runner's bridge schedules on the loop (``Bridge.call_soon``:
    drains, and the rare ready/exit/fatal signals), for the wake-ups/item column. Works on
    any checkout that has the bridge, so old and new code are counted alike."""
    from aioaccel.core.loop_bridge import Bridge

    call_soon = Bridge.call_soon

    def counted(self: Bridge, callback: Callable[..., Any], *args: Any) -> None:
        WAKES[0] += 1
        call_soon(self, callback, *args)

    Bridge.call_soon = counted  # type: ignore[method-assign]


@dataclass
class Figures:
    rates: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # loop-thread CPU seconds per item
    workers: list[float] = field(default_factory=list)  # worker threads' CPU seconds per item
    wakes: list[float] = field(default_factory=list)  # bridge -> loop wake-ups per item
    split: dict[str, float] | None = None

    #: ``--best``: the best round of each mode (highest rate, least CPU) instead of the median:
    #: on a machine other processes load, the least disturbed round is the closest to the code's
    #: own cost (as ``timeit`` takes the minimum)
    best: ClassVar[bool] = False

    @property
    def rate(self) -> float:
        return max(self.rates) if self.best else statistics.median(self.rates)

    @property
    def cpu_per_item(self) -> float:
        return min(self.cpu) if self.best else statistics.median(self.cpu)

    @property
    def worker_cpu_per_item(self) -> float:
        if not self.workers:
            return 0.0
        return min(self.workers) if self.best else statistics.median(self.workers)


def worker_cpu() -> float:
    """CPU seconds used so far by every aioaccel worker thread alive (the stages' threads:
    the runtime's own work plus the framework's per-item Python on them)."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.name.startswith("aioaccel-") and thread.ident is not None:
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (OSError, ProcessLookupError):
                pass  # it just exited
    return total


def measure(loop: asyncio.AbstractEventLoop, modes: dict[str, Mode], count: int, rounds: int,
            profile: bool) -> dict[str, Figures]:
    """Warm every mode up, then ``rounds`` rounds with the modes interleaved; with ``profile``,
    one more profiled round per mode (not counted in the rates)."""
    figures = {name: Figures() for name in modes}
    for mode in modes.values():
        loop.run_until_complete(mode(max(CALLERS * 4, count // 10)))
    for _ in range(rounds):
        for name, mode in modes.items():
            WAKES[0] = 0
            w0, cpu0, started = worker_cpu(), time.thread_time(), perf_counter()
            loop.run_until_complete(mode(count))
            wall, cpu = perf_counter() - started, time.thread_time() - cpu0
            figures[name].rates.append(count / wall)
            figures[name].cpu.append(cpu / count)
            figures[name].workers.append((worker_cpu() - w0) / count)
            figures[name].wakes.append(WAKES[0] / count)
    if profile:
        for name, mode in modes.items():
            if name.startswith(("raw", "floor")):
                continue
            profiler = cProfile.Profile(time.thread_time_ns, 1e-9)
            profiler.enable()
            loop.run_until_complete(mode(count))
            profiler.disable()
            figures[name].split = attribute(pstats.Stats(profiler))
    return figures


def report(title: str, figures: dict[str, Figures], baselines: list[str], load: str) -> None:
    print(f"\n{title}\n  load before the run: {load}")
    heads = "".join(f" {'vs ' + b.split(' (')[0].removeprefix('raw '):>16}" for b in baselines)
    print(f"  {'mode':<46} {'items/s':>10}{heads} {'loop us/item':>13} {'workers us':>11}"
          f" {'wake-ups/item':>14}")
    for name, fig in figures.items():
        ratios = "".join(f" {fig.rate / figures[b].rate:>15.2f}x" for b in baselines)
        raw = name.startswith(("raw", "floor"))
        cpu = "-" if raw else f"{fig.cpu_per_item * 1e6:.2f}"
        wcpu = "-" if raw else f"{fig.worker_cpu_per_item * 1e6:.2f}"
        wakes = "-" if raw or not fig.wakes else f"{statistics.median(fig.wakes):.3f}"
        print(f"  {name:<46} {fig.rate:>10.0f}{ratios} {cpu:>13} {wcpu:>11} {wakes:>14}")
    split = {n: f for n, f in figures.items() if f.split is not None}
    if split:
        print("\n  loop us/item by part (cProfile, CPU clock; shares applied to the unprofiled "
              "figure):")
        short = [c.replace("result delivery", "results").replace("event loop", "loop")
                 for c in CATEGORIES]
        print(f"  {'mode':<46}" + "".join(f" {c:>10}" for c in short))
        for name, fig in split.items():
            assert fig.split is not None
            us = fig.cpu_per_item * 1e6
            print(f"  {name:<46}" + "".join(f" {fig.split[c] * us:>10.2f}" for c in CATEGORIES))


# ---- the modes --------------------------------------------------------------------------------
def raw_modes(call: Callable[[np.ndarray], Any], xs: list[np.ndarray],
              batch: int) -> dict[str, Mode]:
    joined = np.concatenate(xs[:batch])

    async def per_item(n: int) -> None:
        for i in range(n):
            call(xs[i % len(xs)])

    async def batched(n: int) -> None:
        for _ in range(n // batch):
            call(joined)

    return {"raw per-item loop": per_item, f"raw batched loop (batch {batch})": batched}


# ---- the floors: what any asyncio bridge costs here, with no framework --------------------------
# Each is the least an asyncio front can do for that mode, written directly against the loop
# and one thread: a target a mode misses can be read against its floor (the same machine, the
# same run). Their names start with "floor": like the raw loops, they have no framework CPU.
def loop_floor_modes() -> dict[str, Mode]:
    """64 coroutines awaiting bare futures resolved at once (no model, no thread): the most
    any API with one coroutine and one future per item reaches on this loop; and the same with
    one callback resolving every pending future (as a coalescing bridge does)."""

    async def per_future(n: int) -> None:
        loop = asyncio.get_running_loop()

        async def caller(k: int) -> None:
            for _ in range(k, n, CALLERS):
                fut = loop.create_future()
                loop.call_soon(fut.set_result, None)
                await fut

        await asyncio.gather(*(caller(k) for k in range(CALLERS)))

    async def coalesced(n: int) -> None:
        loop = asyncio.get_running_loop()
        pending: list[asyncio.Future[None]] = []

        def resolve() -> None:
            burst = pending[:]
            pending.clear()
            for fut in burst:
                fut.set_result(None)

        async def caller(k: int) -> None:
            for _ in range(k, n, CALLERS):
                fut = loop.create_future()
                if not pending:
                    loop.call_soon(resolve)
                pending.append(fut)
                await fut

        await asyncio.gather(*(caller(k) for k in range(CALLERS)))

    return {f"floor: loop, {CALLERS} callers, bare futures": per_future,
            f"floor: loop, {CALLERS} callers, one callback per burst": coalesced}


def batched_bridge_floor(call: Callable[[np.ndarray], Any], xs: list[np.ndarray],
                         batch: int) -> dict[str, Mode]:
    """The least a batching bridge costs: 64 coroutines each put a future in a SimpleQueue and
    await it; one thread takes what is queued (up to ``batch``), makes one batched call on the
    rows joined, and resolves the lot with one ``call_soon_threadsafe``. And ``infer_many``'s:
    one coroutine hands ``BULK`` rows over as batches of ``batch`` and awaits one future."""
    stop = object()

    def run_thread(loop: asyncio.AbstractEventLoop, queue: SimpleQueue[Any]) -> threading.Thread:
        def resolve(futs: list[asyncio.Future[Any]], out: Any) -> None:
            for fut in futs:
                fut.set_result(out)

        def worker() -> None:
            while True:
                first = queue.get()
                if first is stop:
                    return
                taken = [first]
                while len(taken) < batch:
                    try:
                        item = queue.get_nowait()
                    except Empty:
                        break
                    if item is stop:
                        queue.put(stop)
                        break
                    taken.append(item)
                out = call(np.concatenate([x for x, _ in taken]))
                loop.call_soon_threadsafe(resolve, [f for _, f in taken], out)

        thread = threading.Thread(target=worker, name="floor-bridge", daemon=True)
        thread.start()
        return thread

    async def infer(n: int) -> None:
        loop = asyncio.get_running_loop()
        queue: SimpleQueue[Any] = SimpleQueue()
        thread = run_thread(loop, queue)

        async def caller(k: int) -> None:
            for i in range(k, n, CALLERS):
                fut = loop.create_future()
                queue.put((xs[i % len(xs)], fut))
                await fut

        await asyncio.gather(*(caller(k) for k in range(CALLERS)))
        queue.put(stop)
        thread.join()

    block = [xs[i % len(xs)] for i in range(BULK)]

    async def infer_many(n: int) -> None:
        loop = asyncio.get_running_loop()
        jobs: SimpleQueue[Any] = SimpleQueue()

        def worker() -> None:
            while True:
                job = jobs.get()
                if job is stop:
                    return
                rows, done = job
                loop.call_soon_threadsafe(done, call(rows))

        thread = threading.Thread(target=worker, name="floor-bulk", daemon=True)
        thread.start()
        for _ in range(n // BULK):
            fut = loop.create_future()
            parts: list[Any] = []
            chunks = range(0, BULK, batch)

            def done(out: Any, parts: list[Any] = parts,
                     fut: asyncio.Future[None] = fut) -> None:
                parts.append(out)
                if len(parts) == len(chunks):
                    fut.set_result(None)

            for start in chunks:
                jobs.put((np.concatenate(block[start:start + batch]), done))
            await fut
        jobs.put(stop)
        thread.join()

    return {f"floor: bridge, {CALLERS} callers, batch {batch}": infer,
            f"floor: bridge, infer_many({BULK}), batch {batch}": infer_many}


def handoff_floor(work: Callable[[int], Any]) -> dict[str, Mode]:
    """The least a thread -> loop hand-off costs for a blocking stage, input aside: a thread
    makes the same call per item and hands each result to a loop task that awaits it, with
    one wake-up (``call_soon_threadsafe``) and one future per item; and with one wake-up per
    burst (results appended to a deque, a drain scheduled only when none is pending)."""

    async def per_item(n: int) -> None:
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in range(n)]

        def worker() -> None:
            for i in range(n):
                loop.call_soon_threadsafe(futs[i].set_result, work(i))

        thread = threading.Thread(target=worker, name="floor-item", daemon=True)
        thread.start()
        for fut in futs:
            await fut
        thread.join()

    async def per_burst(n: int) -> None:
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
                if not scheduled[0]:
                    scheduled[0] = True
                    loop.call_soon_threadsafe(drain)

        thread = threading.Thread(target=worker, name="floor-burst", daemon=True)
        thread.start()
        got = 0
        while got < n:
            if done:
                done.popleft()
                got += 1
                continue
            waiter[0] = loop.create_future()
            if not done:
                await waiter[0]
        thread.join()

    return {"floor: hand-off, one wake-up + future per item": per_item,
            "floor: hand-off, one wake-up per burst": per_burst}


def runner_modes(runner: aioaccel.Runner, xs: list[Any], label: str) -> dict[str, Mode]:
    async def infer(n: int) -> None:
        async def caller(k: int) -> None:
            for i in range(k, n, CALLERS):
                await runner.infer(xs[i % len(xs)])

        await asyncio.gather(*(caller(k) for k in range(CALLERS)))

    async def streaming(n: int) -> None:
        async def produce() -> None:
            for i in range(n):
                await runner.push(xs[i % len(xs)])

        producer = asyncio.create_task(produce())
        for _ in range(n):
            await anext(runner)
        await producer

    async def stream_push(n: int) -> None:
        async with runner.stream("bench") as stream:
            async def produce() -> None:
                for i in range(n):
                    await stream.push(xs[i % len(xs)])

            producer = asyncio.create_task(produce())
            for _ in range(n):
                await anext(stream)
            await producer

    modes: dict[str, Mode] = {f"infer, {CALLERS} callers, {label}": infer,
                              f"push + async for, {label}": streaming,
                              f"stream.push + async for, {label}": stream_push}
    if hasattr(runner, "infer_many"):
        block = [xs[i % len(xs)] for i in range(BULK)]

        async def infer_many(n: int) -> None:
            for _ in range(n // BULK):
                await runner.infer_many(block)

        async def bulk_stream(n: int) -> None:
            async def produce() -> None:
                for _ in range(n // BULK):
                    await runner.push_many(block)

            producer = asyncio.create_task(produce())
            got = 0
            async for results in runner.results(max_items=BULK):
                got += len(results)
                if got >= n // BULK * BULK:
                    break
            await producer

        async def stream_bulk(n: int) -> None:
            async with runner.stream("bench-bulk") as stream:
                async def produce() -> None:
                    for _ in range(n // BULK):
                        await stream.push_many(block)

                producer = asyncio.create_task(produce())
                got = 0
                async for results in stream.results(max_items=BULK):
                    got += len(results)
                    if got >= n // BULK * BULK:
                        break
                await producer

        modes.update({f"infer_many({BULK}), 1 caller, {label}": infer_many,
                      f"push_many({BULK}) + results(), {label}": bulk_stream,
                      f"stream.push_many + results(), {label}": stream_bulk})
    return modes


def with_switch(modes: dict[str, Mode], intervals: list[float]) -> dict[str, Mode]:
    """Each of ``modes`` again with ``sys.setswitchinterval`` set for its rounds only, so the
    effect of the GIL's switch interval is read in the same run, interleaved."""
    out: dict[str, Mode] = {}
    for seconds in intervals:
        for name, mode in modes.items():
            def switched(n: int, mode: Mode = mode, seconds: float = seconds) -> Awaitable[None]:
                async def run() -> None:
                    before = sys.getswitchinterval()
                    sys.setswitchinterval(seconds)
                    try:
                        await mode(n)
                    finally:
                        sys.setswitchinterval(before)
                return run()
            out[f"{name}, switch {seconds * 1e3:g} ms"] = switched
    return out


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3]) + " (1, 5, 15 min; 2 cores)"
    except OSError:
        return "unknown"


async def _open(target: Any, **options: Any) -> aioaccel.Runner:
    return await aioaccel.open(target, maxsize=CALLERS, **options)


async def _open_sized(target: Any, maxsize: int) -> aioaccel.Runner:
    return await aioaccel.open(target, maxsize=maxsize)


# ---- the sections -----------------------------------------------------------------------------
def picked(modes: dict[str, Mode], only: list[str]) -> dict[str, Mode]:
    """``modes`` whose name holds one of ``only`` (all when empty), and the raw loops (the
    ratios' baselines) always."""
    if not only:
        return modes
    return {name: mode for name, mode in modes.items()
            if name.startswith("raw") or any(part in name for part in only)}


def onnx_section(loop: asyncio.AbstractEventLoop, width: int, batch: int, rounds: int,
                 seconds: float, profile: bool, switch: list[float],
                 only: list[str] | None = None) -> None:
    import onnxruntime as ort

    chain = dense_chain(width, 4, dynamic_batch=True, seed=width)
    xs = [chain.random_input(s) for s in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        path = chain.write_onnx(Path(tmp) / "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def call(x: np.ndarray) -> Any:
            return session.run(None, {"input": x})

        for _ in range(50):
            call(xs[0])
        started = perf_counter()
        for i in range(300):
            call(xs[i % 64])
        per_item = (perf_counter() - started) / 300
        unit = CALLERS * batch
        count = max(unit, int(seconds / per_item) // unit * unit)
        load = load_average()
        off = loop.run_until_complete(_open(path, num_threads=1))
        on = loop.run_until_complete(_open(path, num_threads=1, batch=batch,
                                           batch_wait=BATCH_WAIT))
        modes = {**raw_modes(call, xs, batch), **loop_floor_modes(),
                 **batched_bridge_floor(call, xs, batch),
                 **runner_modes(off, xs, "batching off"),
                 **runner_modes(on, xs, f"batch={batch}")}
        if switch:
            batched = {k: v for k, v in modes.items()
                       if k.endswith(f"batch={batch}") and k.startswith(("infer,", "push +"))}
            modes.update(with_switch(batched, switch))
        modes = picked(modes, only or [])
        try:
            figures = measure(loop, modes, count, rounds, profile)
        finally:
            for runner in (off, on):
                loop.run_until_complete(runner.aclose())
    report(f"ONNX Runtime, dense MLP width {width} ({per_item * 1e3:.3f} ms per item, "
           f"num_threads=1), {count} items per round, {rounds} rounds",
           figures, ["raw per-item loop", f"raw batched loop (batch {batch})"], load)
    budgets = {"batching off": 12e-6, f"batch={batch}": 7e-6}
    for name, fig in figures.items():
        for label, budget in budgets.items():
            if name.endswith(label):
                verdict = "met" if fig.cpu_per_item <= budget else "missed"
                print(f"  budget {budget * 1e6:.0f} us/item, {name}: "
                      f"{fig.cpu_per_item * 1e6:.2f} us ({verdict})")


def stage30_section(loop: asyncio.AbstractEventLoop, rounds: int, profile: bool,
                    switch: list[float]) -> None:
    work = make_work(30e-6)
    started = perf_counter()
    for i in range(300):
        work(i)
    per_item = (perf_counter() - started) / 300
    count = 6400
    load = load_average()
    xs = [np.zeros(1, np.float32)]

    async def raw(n: int) -> None:
        for i in range(n):
            work(i)

    runner = loop.run_until_complete(_open_sized(work, 8))
    wide = loop.run_until_complete(_open_sized(work, 32))
    modes: dict[str, Mode] = {"raw loop (one thread)": raw, **handoff_floor(work)}
    for r, label in ((runner, "maxsize=8"), (wide, "maxsize=32")):
        picked = runner_modes(r, xs, label)
        modes.update({k: v for k, v in picked.items() if not k.startswith(("infer,", "stream."))})
    if switch:
        modes.update(with_switch({k: v for k, v in modes.items() if k.startswith("push +")},
                                 switch))
    try:
        figures = measure(loop, modes, count, rounds, profile)
    finally:
        for r in (runner, wide):
            loop.run_until_complete(r.aclose())
    report(f"~30 us GIL-releasing stage (measured {per_item * 1e6:.0f} us), no batching, "
           f"{count} items per round, {rounds} rounds", figures, ["raw loop (one thread)"], load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=0.3,
                        help="about how long the raw per-item loop takes per round")
    parser.add_argument("--only", default="onnx,stage30")
    parser.add_argument("--profile", action="store_true",
                        help="split each mode's loop time into parts (one more round each)")
    parser.add_argument("--switchinterval", type=float, default=None,
                        help="sys.setswitchinterval for the run (seconds; default: Python's, "
                             "5 ms): how long a thread coming back from native code may wait "
                             "for the GIL the loop holds")
    parser.add_argument("--switch", default="",
                        help="comma-separated switch intervals in ms (e.g. 0.5,0.05): the "
                             "batched infer/push modes and the stage30 push modes again, each "
                             "with that interval for its rounds, interleaved with the others")
    parser.add_argument("--modes", default="",
                        help="comma-separated parts of mode names to run (e.g. 'push_many,"
                             "floor: bridge'); the raw loops always run (default: every mode)")
    parser.add_argument("--best", action="store_true",
                        help="report each mode's best round (highest rate, least CPU) instead "
                             "of the median: for a machine other processes load")
    add_cpus_argument(parser)
    args = parser.parse_args()
    pinned = apply_cpus(args.cpus)
    Figures.best = args.best
    count_wakeups()
    if args.switchinterval is not None:
        sys.setswitchinterval(args.switchinterval)
    loop = new_loop(args.loop)
    print(f"bench_overhead: loop={args.loop}, rounds={args.rounds} "
          f"({'best' if args.best else 'median'} of them), switch interval "
          f"{sys.getswitchinterval() * 1e3:g} ms, {pinned}, "
          f"aioaccel from {Path(aioaccel.__file__).parent}")
    try:
        parts = args.only.split(",")
        switch = [float(ms) / 1e3 for ms in args.switch.split(",") if ms.strip()]
        if "onnx" in parts:
            onnx_section(loop, args.width, args.batch, args.rounds, args.seconds, args.profile,
                         switch, [m.strip() for m in args.modes.split(",") if m.strip()])
        if "stage30" in parts:
            stage30_section(loop, args.rounds, args.profile, switch)
    finally:
        loop.close()


if __name__ == "__main__":
    main()
