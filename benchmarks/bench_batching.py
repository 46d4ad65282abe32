"""Dynamic batching: aioaccel with batching off and on against the raw loops and the loop's floor.

For ONNX Runtime and OpenVINO (one runtime thread each), on a tiny (~0.03 ms, 4 dense layers of
width 64) and a ~0.15 ms model (width 512), in one run with interleaved rounds:

* raw per-item loop     -- the runtime called in a plain ``for`` loop, one item per call
* raw batched loop      -- the same, ``--batch`` items per call: the runtime's own limit
* loop floor            -- 64 coroutines awaiting bare futures that resolve at once (a callback
                           per future), no model at all: what any asyncio API with one coroutine
                           per caller can reach at most on this loop; and the same with one
                           callback resolving every pending future (a coalescing bridge)
* aioaccel infer        -- 64 concurrent callers, batching off, and on (``batch=N``,
                           ``batch_wait=0.002``)
* aioaccel streaming    -- ``push`` in one task, ``async for`` in another, batching off and on
* run_in_executor       -- ``await loop.run_in_executor(None, call, x)`` per item

Printed: items/s (median of the rounds), the ratio to the raw per-item loop and to the limit
(the smaller of the raw batched loop and the loop floor), and p50/p99 latency per item over
every round. Until the runner batches, the batching-on rows read "n/a (runner batching not
available)": the script checks that ``aioaccel.open(..., batch=, batch_wait=)`` opens and
really hands a stage more than one item per call.

Run: ``python benchmarks/bench_batching.py [--loop uvloop] [--rounds 5] [--batch 16]
[--only onnx,openvino,onnx-threads] [--seconds 0.4] [--profile]``. ``onnx-threads`` compares ONNX
Runtime's own thread defaults with aioaccel's (raw loop and streaming, no batching).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_cpus_argument, apply_cpus, new_loop, percentile

import aioaccel
from aioaccel.testing.models import Chain, dense_chain

CALLERS = 64
BATCH_WAIT = 0.002
NA = "n/a (runner batching not available)"

#: one round of a mode: process ``count`` items, return per-item latencies (seconds)
Mode = Callable[[int], Awaitable[list[float]]]


# ---- is batching in the runner? -------------------------------------------------------------
async def runner_batches() -> bool:
    """True if ``aioaccel.open(fn, batch=4, batch_wait=...)`` opens and a stage gets more than
    one item in one call when 32 callers wait."""
    biggest = 0

    def record(x: np.ndarray) -> np.ndarray:
        nonlocal biggest
        biggest = max(biggest, int(np.shape(x)[0]))
        return x

    try:
        async with aioaccel.open(record, batch=4, batch_wait=BATCH_WAIT, maxsize=32) as runner:
            await asyncio.gather(*(runner.infer(np.zeros((1, 2), np.float32))
                                   for _ in range(32)))
    except (TypeError, ValueError, aioaccel.AccelError):
        return False
    return biggest > 1


# ---- the runtimes, raw ----------------------------------------------------------------------
@dataclass
class Runtime:
    name: str
    target: Any                              #: what aioaccel.open takes
    options: dict[str, Any]                  #: aioaccel.open options for one runtime thread
    call: Callable[[np.ndarray], Any]        #: one raw call, per item (this thread)
    batched: Callable[[np.ndarray], Any]     #: one raw call at batch N (this thread)
    threadsafe: Callable[[np.ndarray], Any]  #: one call safe from any executor thread
    extra: list[Any] = field(default_factory=list)


def onnx_runtime(chain: Chain, tmp: Path, batch: int) -> Runtime:
    import onnxruntime as ort

    path = chain.write_onnx(tmp / "model.onnx")  # chain has a dynamic batch dimension
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def call(x: np.ndarray) -> Any:
        return session.run(None, {"input": x})

    return Runtime("onnx", path, {"num_threads": 1}, call, call, call)


def openvino_runtime(chain: Chain, tmp: Path, batch: int) -> Runtime:
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
              "INFERENCE_NUM_THREADS": 1}
    static = chain.openvino_model()
    compiled = core.compile_model(static, "CPU", config)
    request = compiled.create_infer_request()
    wide = chain.openvino_model()
    wide.reshape({wide.input(): ov.PartialShape([batch, *chain.input_shape[1:]])})
    batched_request = core.compile_model(wide, "CPU", config).create_infer_request()
    local = threading.local()

    def call(x: np.ndarray) -> Any:
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()

    def batched(x: np.ndarray) -> Any:
        batched_request.infer({0: x})
        return batched_request.get_output_tensor(0).data.copy()

    def threadsafe(x: np.ndarray) -> Any:  # an InferRequest per executor thread
        req = getattr(local, "request", None)
        if req is None:
            req = local.request = compiled.create_infer_request()
        req.infer({0: x})
        return req.get_output_tensor(0).data.copy()

    path = chain.write_openvino(tmp / "model.xml")
    return Runtime("openvino", path, {"config": {"INFERENCE_NUM_THREADS": 1}}, call, batched,
                   threadsafe, [compiled])


# ---- modes ----------------------------------------------------------------------------------
def raw_modes(rt: Runtime, xs: list[np.ndarray], batch: int) -> dict[str, Mode]:
    joined = np.concatenate(xs[:batch])

    async def per_item(n: int) -> list[float]:
        lat = []
        for i in range(n):
            started = perf_counter()
            rt.call(xs[i % len(xs)])
            lat.append(perf_counter() - started)
        return lat

    async def batched(n: int) -> list[float]:
        lat = []
        for _ in range(n // batch):
            started = perf_counter()
            rt.batched(joined)
            lat.extend([perf_counter() - started] * batch)
        return lat

    return {"raw per-item loop": per_item, f"raw batched loop (batch {batch})": batched}


async def loop_floor(n: int) -> list[float]:
    """64 coroutines, each awaiting a bare future that a callback scheduled at once resolves:
    no model, only what one coroutine and one future per item cost the loop."""
    loop = asyncio.get_running_loop()
    lat: list[float] = []

    async def caller(k: int) -> None:
        for _ in range(k, n, CALLERS):
            fut = loop.create_future()
            loop.call_soon(fut.set_result, None)
            started = perf_counter()
            await fut
            lat.append(perf_counter() - started)

    await asyncio.gather(*(caller(k) for k in range(CALLERS)))
    return lat


async def loop_floor_coalesced(n: int) -> list[float]:
    """The same, but one callback resolves every future pending at that moment (as aioaccel's
    bridge delivers a burst of results with one wake-up)."""
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future[None]] = []
    lat: list[float] = []

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
            started = perf_counter()
            await fut
            lat.append(perf_counter() - started)

    await asyncio.gather(*(caller(k) for k in range(CALLERS)))
    return lat


def runner_modes(runner: aioaccel.Runner, xs: list[np.ndarray], label: str) -> dict[str, Mode]:
    async def infer(n: int) -> list[float]:
        lat: list[float] = []

        async def caller(k: int) -> None:
            for i in range(k, n, CALLERS):
                started = perf_counter()
                await runner.infer(xs[i % len(xs)])
                lat.append(perf_counter() - started)

        await asyncio.gather(*(caller(k) for k in range(CALLERS)))
        return lat

    async def streaming(n: int) -> list[float]:
        async def produce() -> None:
            for i in range(n):
                await runner.push(xs[i % len(xs)])

        producer = asyncio.create_task(produce())
        lat = []
        for _ in range(n):
            result = await anext(runner)
            lat.append(result.latency)
        await producer
        return lat

    return {f"aioaccel infer, {CALLERS} callers, {label}": infer,
            f"aioaccel streaming, {label}": streaming}


def executor_mode(rt: Runtime, xs: list[np.ndarray]) -> dict[str, Mode]:
    async def executor(n: int) -> list[float]:
        run = asyncio.get_running_loop().run_in_executor
        lat = []
        for i in range(n):
            started = perf_counter()
            await run(None, rt.threadsafe, xs[i % len(xs)])
            lat.append(perf_counter() - started)
        return lat

    return {"run_in_executor per item": executor}


# ---- measuring ------------------------------------------------------------------------------
@dataclass
class Figures:
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


def measure(loop: asyncio.AbstractEventLoop, modes: dict[str, Mode], count: int,
            rounds: int) -> dict[str, Figures]:
    """Every mode once to warm up, then ``rounds`` rounds with the modes interleaved."""
    figures = {name: Figures() for name in modes}
    for mode in modes.values():
        loop.run_until_complete(mode(max(CALLERS, count // 10)))
    for _ in range(rounds):
        for name, mode in modes.items():
            started = perf_counter()
            lat = loop.run_until_complete(mode(count))
            figures[name].rates.append(count / (perf_counter() - started))
            figures[name].latencies.extend(lat)
    return figures


def report(title: str, figures: dict[str, Figures], missing: list[str], limit_names: list[str],
           batch_call: float) -> dict[str, float]:
    raw = figures["raw per-item loop"].rate
    limit = min(figures[n].rate for n in limit_names)
    print(f"\n{title}")
    print(f"  {'mode':<44} {'items/s':>10} {'vs raw':>8} {'vs limit':>9} {'p50':>9} {'p99':>9}")
    rates = {}
    for name, fig in figures.items():
        rate = fig.rate
        rates[name] = rate
        p50, p99 = percentile(fig.latencies, 0.5), percentile(fig.latencies, 0.99)
        print(f"  {name:<44} {rate:>10.0f} {rate / raw:>7.2f}x {rate / limit:>8.2f}x "
              f"{p50 * 1e3:>7.3f}ms {p99 * 1e3:>7.3f}ms")
    for name in missing:
        print(f"  {name:<44} {NA}")
    bound = BATCH_WAIT + 2 * batch_call
    print(f"  limit = min({', '.join(limit_names)}) = {limit:.0f}/s; "
          f"p99 bound with batching = batch_wait + 2 batched calls = {bound * 1e3:.3f} ms")
    return rates


def print_profile(loop: asyncio.AbstractEventLoop, name: str, mode: Mode, count: int) -> None:
    """Where the event loop's time goes in one round of ``mode`` (cProfile sees the loop thread
    only, which is where validation, admission, futures and the bridge's deliveries run)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    loop.run_until_complete(mode(count))
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    print(f"\n  profile of the loop thread, {name}, {count} items (top 15 by own time):")
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    for line in lines[start:]:
        if line.strip():
            print(f"    {line}")


def bench(loop: asyncio.AbstractEventLoop, runtime: str, width: int, batch: int, rounds: int,
          seconds: float, batching: bool, floor: dict[str, Mode], profile: bool = False) -> None:
    chain = dense_chain(width, 4, dynamic_batch=True, seed=width)
    xs = [chain.random_input(s) for s in range(64)]
    with tempfile.TemporaryDirectory() as tmp:
        make = onnx_runtime if runtime == "onnx" else openvino_runtime
        rt = make(chain, Path(tmp), batch)
        joined = np.concatenate(xs[:batch])
        for _ in range(20):
            rt.call(xs[0])
            rt.batched(joined)
        started = perf_counter()
        for _ in range(200):
            rt.call(xs[0])
        per_item = (perf_counter() - started) / 200
        started = perf_counter()
        for _ in range(50):
            rt.batched(joined)
        batch_call = (perf_counter() - started) / 50
        count = max(CALLERS * batch, int(seconds / per_item) // (CALLERS * batch)
                    * CALLERS * batch)
        runners = []
        off = loop.run_until_complete(
            aioaccel.open(rt.target, maxsize=CALLERS, **rt.options).__aenter__())
        runners.append(off)
        modes: dict[str, Mode] = {**raw_modes(rt, xs, batch), **floor,
                                  **runner_modes(off, xs, "batching off")}
        missing = []
        on_label = f"batch={batch}"
        if batching:
            on = loop.run_until_complete(aioaccel.open(
                rt.target, maxsize=CALLERS, batch=batch, batch_wait=BATCH_WAIT,
                **rt.options).__aenter__())
            runners.append(on)
            modes.update(runner_modes(on, xs, on_label))
        else:
            missing = list(runner_modes(off, xs, on_label))
        modes.update(executor_mode(rt, xs))
        try:
            figures = measure(loop, modes, count, rounds)
            if profile:
                label = on_label if batching else "batching off"
                infer = f"aioaccel infer, {CALLERS} callers, {label}"
                print_profile(loop, infer, modes[infer], count)
        finally:
            for runner in runners:
                loop.run_until_complete(runner.aclose())
        title = (f"{runtime}, width {width} ({per_item * 1e3:.3f} ms per item, "
                 f"{batch_call * 1e3:.3f} ms per batch of {batch}), {count} items per round, "
                 f"{rounds} rounds")
        rates = report(title, figures, missing,
                       [f"raw batched loop (batch {batch})", "loop floor"], batch_call)
        if batching:
            target = 2.5 if width >= 512 else 1.0
            got = rates[f"aioaccel infer, {CALLERS} callers, {on_label}"] / rates[
                "raw per-item loop"]
            verdict = "met" if got >= target else f"missed by {target - got:.2f}x"
            print(f"  target: infer with batching >= {target}x the raw per-item loop: "
                  f"{got:.2f}x ({verdict})")


def onnx_threads(loop: asyncio.AbstractEventLoop, rounds: int, seconds: float) -> None:
    """ONNX Runtime's own thread defaults against aioaccel's, without batching: the raw loop
    and aioaccel streaming on the ~0.15 ms model, each with the same session settings."""
    import onnxruntime as ort

    from aioaccel.backends.onnx import SPINNING, default_threads

    chain = dense_chain(512, 4, dynamic_batch=True, seed=512)
    xs = [chain.random_input(s) for s in range(64)]

    def ort_default(options: Any) -> None:  # what a bare InferenceSession does
        options.intra_op_num_threads = 0
        options.add_session_config_entry(SPINNING, "1")

    def ours(options: Any) -> None:  # what the backend does when num_threads is not given
        options.intra_op_num_threads = default_threads(1)
        options.add_session_config_entry(SPINNING, "0")

    settings = {"ONNX Runtime defaults (a spinning pool on every core)": ort_default,
                f"aioaccel defaults ({default_threads(1)} thread(s), no spinning)": ours}
    with tempfile.TemporaryDirectory() as tmp:
        path = chain.write_onnx(Path(tmp) / "model.onnx")
        modes: dict[str, Mode] = {}
        runners = []
        for label, edit in settings.items():
            options = ort.SessionOptions()
            edit(options)
            session = ort.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])

            async def raw(n: int, session: Any = session) -> list[float]:
                lat = []
                for i in range(n):
                    started = perf_counter()
                    session.run(None, {"input": xs[i % len(xs)]})
                    lat.append(perf_counter() - started)
                return lat

            runner = loop.run_until_complete(
                aioaccel.open(path, maxsize=CALLERS, session_options=edit).__aenter__())
            runners.append(runner)
            modes[f"raw loop, {label}"] = raw
            modes[f"aioaccel streaming, {label}"] = runner_modes(runner, xs, "")[
                "aioaccel streaming, "]
        count = max(256, int(seconds / 0.00015) // 64 * 64)
        try:
            figures = measure(loop, modes, count, rounds)
        finally:
            for runner in runners:
                loop.run_until_complete(runner.aclose())
    print(f"\nONNX Runtime threads, width 512, no batching, {count} items per round, "
          f"{rounds} rounds")
    for name, fig in figures.items():
        print(f"  {name:<86} {fig.rate:>8.0f}/s  p99 "
              f"{percentile(fig.latencies, 0.99) * 1e3:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=0.4,
                        help="about how long the raw per-item loop takes per round")
    parser.add_argument("--only", default="onnx,openvino,onnx-threads")
    parser.add_argument("--profile", action="store_true",
                        help="after each table, profile the loop thread during one round of "
                             "aioaccel infer (batching on when available)")
    add_cpus_argument(parser)
    args = parser.parse_args()
    pinned = apply_cpus(args.cpus)
    loop = new_loop(args.loop)
    try:
        batching = loop.run_until_complete(runner_batches())
        print(f"loop: {args.loop}; runner batching: {'available' if batching else NA}; {pinned}")
        floor: dict[str, Mode] = {"loop floor": loop_floor,
                                  "loop floor, one callback per burst": loop_floor_coalesced}
        parts = args.only.split(",")
        for runtime in [p for p in parts if p in ("onnx", "openvino")]:
            for width in (64, 512):
                bench(loop, runtime, width, args.batch, args.rounds, args.seconds, batching,
                      floor, args.profile)
        if "onnx-threads" in parts:
            onnx_threads(loop, args.rounds, args.seconds)
    finally:
        loop.close()


if __name__ == "__main__":
    main()
