"""Real runtimes on the CPU: aioaccel against the vendors' own loops, in one run.

1. overhead    -- OpenVINO, ONNX Runtime and LiteRT, each on a tiny and a ~1 ms model (f32
                  MLPs; one intra-op thread for ONNX Runtime and LiteRT, on both sides): the
                  raw loop as the vendor documents it, a tuned raw loop (OpenVINO: inputs
                  written into the request's tensors, outputs copied once; ONNX Runtime: I/O
                  bound once, outputs into a preallocated array), the backend's stage
                  ``run()`` in a plain loop (the adapter's cost, without the framework's),
                  aioaccel streaming, and aioaccel ``infer()`` from 64 persistent callers.
                  OpenVINO adds its AsyncInferQueue loop, run_in_executor per item and
                  aioaccel with api="async" (unless ``--no-extra``).
2. pipelining  -- a ~10 ms LiteRT and ONNX conv chain split into 2 segments: the whole model
                  sequentially, aioaccel's pipeline, and the limit 1 / (slowest segment).
3. loop health -- event-loop lag p50/p99 (a 1 ms sleeper) while each backend runs flat out.
4. memory      -- a producer flooding 1 MB inputs at a slow consumer: peak growth in items.

0. calls       -- (only with ``--only calls``) CPU per call of the raw loops and of the stage's
                  ``run()`` on the tiny model, best of 15: the adapter's cost, steady under load.

Run: ``python benchmarks/bench_runtimes.py [--rounds 5] [--only calls,overhead,pipelining,...]
[--runtimes openvino,onnx,litert]``

Before/after: ``python benchmarks/bench_runtimes.py --ab OLD_CHECKOUT [--rounds 6]`` runs the
overhead section of *this* script once per round in each checkout (``PYTHONPATH``), old and
new alternating, and prints each mode's median per checkout and the median of the per-round
ratios new/old (make ``OLD_CHECKOUT`` with ``git worktree add --detach /tmp/old main``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import Mode, lag_probe, measure, new_loop, percentile, print_table, stream

import aioaccel
from aioaccel.backends import get_backend
from aioaccel.backends._native_log import quiet_info
from aioaccel.testing.models import conv_chain, dense_chain
from aioaccel.testing.vendor import raw_model

# ---- 1. overhead --------------------------------------------------------------------------
#: (label, chain, items per round): a tiny model, where the per-item cost around the call
#: decides, and a ~1 ms one, where the call itself does
MODELS = (("tiny model", lambda: dense_chain(16, 2), 4000),
          ("~1 ms model", lambda: dense_chain(1024, 8), 600))
RUNTIMES = ("openvino", "onnx", "litert")
RAW = "raw loop (vendor docs)"
TUNED = "raw loop, tuned"
STAGE = "stage.run only (no aioaccel)"
STREAMING = "aioaccel streaming"
INFER = "aioaccel infer, 64 callers"


class Case:
    """One runtime on one model: its raw loops, and how aioaccel opens it."""

    def __init__(self, raw: dict[str, Callable[[np.ndarray], Any]], target: Any,
                 options: dict[str, Any], extra: dict[str, Mode] | None = None,
                 cleanup: Callable[[], None] | None = None):
        self.raw, self.target, self.options = raw, target, options
        self.extra = extra or {}
        self.cleanup = cleanup


def openvino_case(chain: Any, tmp: Path, loop: asyncio.AbstractEventLoop,
                  xs: list[np.ndarray], extra: bool) -> Case:
    import openvino as ov

    core = ov.Core()
    model = chain.openvino_model()
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    request = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **f32}
                                 ).create_infer_request()
    tuned = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **f32}
                               ).create_infer_request()
    into = tuned.get_input_tensor(0).data

    def raw_tuned(x: np.ndarray) -> Any:
        # what a tuned loop does: write into the request's own tensor, infer with nothing to
        # convert, copy the output once (the caller keeps it: the next call overwrites it)
        np.copyto(into, x)
        tuned.infer(share_outputs=True)
        return tuned.get_output_tensor(0).data.copy()

    raw = {RAW: lambda x: request.infer({0: x}), TUNED: raw_tuned}
    if not extra:
        return Case(raw, model, {})
    async_model = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT", **f32})

    async def raw_queue(n: int) -> None:
        queue = ov.AsyncInferQueue(async_model, 0)
        done = []
        queue.set_callback(
            lambda req, userdata: done.append(req.get_output_tensor(0).data.copy()))
        for i in range(n):
            queue.start_async({0: xs[i % len(xs)]}, userdata=i)
        queue.wait_all()

    async def executor(n: int) -> None:
        run = asyncio.get_running_loop().run_in_executor
        for i in range(n):
            await run(None, request.infer, {0: xs[i % len(xs)]})

    queue_runner = loop.run_until_complete(
        aioaccel.open(model, api="async", maxsize=16).__aenter__())

    async def streaming_queue(n: int) -> None:
        await stream(queue_runner, xs, n)

    return Case(raw, model, {},
                {"raw AsyncInferQueue + callbacks": raw_queue,
                 "run_in_executor per item": executor,
                 "aioaccel streaming, api=async": streaming_queue},
                lambda: loop.run_until_complete(queue_runner.aclose()))


def onnx_case(chain: Any, tmp: Path, loop: asyncio.AbstractEventLoop,
              xs: list[np.ndarray], extra: bool) -> Case:
    import onnxruntime as ort

    from aioaccel.backends.onnx import SPINNING

    path = chain.write_onnx(tmp / f"overhead-{chain.cost():.0f}.onnx")
    options = ort.SessionOptions()  # what aioaccel's num_threads=1 sets: the same on both sides
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry(SPINNING, "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    binding = session.io_binding()
    out = np.empty(chain.output_shape, np.float32)
    binding.bind_output(out_name, "cpu", 0, np.float32, out.shape, out.ctypes.data)

    def raw_tuned(x: np.ndarray) -> Any:
        # bound once: the output into a preallocated array (copied out, as the caller keeps
        # it), the input rebound to each caller's array (no copy in)
        binding.bind_cpu_input(name, x)
        session.run_with_iobinding(binding)
        return out.copy()

    return Case({RAW: lambda x: session.run(None, {name: x}), TUNED: raw_tuned}, path,
                {"num_threads": 1})


def litert_case(chain: Any, tmp: Path, loop: asyncio.AbstractEventLoop,
                xs: list[np.ndarray], extra: bool) -> Case:
    from aioaccel.backends.litert import interpreter_module

    path = chain.write_tflite(tmp / f"overhead-{chain.cost():.0f}.tflite")
    interp = interpreter_module().Interpreter(model_path=str(path), num_threads=1)
    with quiet_info():
        interp.allocate_tensors()
    index = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]

    def raw(x: np.ndarray) -> Any:
        interp.set_tensor(index, x)  # copies in
        interp.invoke()
        return interp.get_tensor(out)  # copies out

    return Case({RAW: raw}, path, {"num_threads": 1})


CASES = {"openvino": openvino_case, "onnx": onnx_case, "litert": litert_case}


def stage_only(runtime: str, case: Case) -> Callable[[np.ndarray], Any]:
    """The backend's stage for this model, made as a worker thread makes it, and a function
    calling its run() on an item's validated inputs: the adapter's cost without the
    framework's."""
    model = get_backend(runtime).load(case.target, **case.options)
    assert model.prepare is not None
    stage = model.stages[0].factory()
    run = stage.run if hasattr(stage, "run") else stage
    prepared: dict[int, Any] = {}

    def call(x: np.ndarray) -> Any:
        tensors = prepared.get(id(x))
        if tensors is None:  # validated once per input array, as the loop would
            tensors = prepared[id(x)] = model.prepare(x)  # type: ignore[misc]
        return run(tensors)
    return call


def measure_cpu(loop: asyncio.AbstractEventLoop, modes: dict[str, Mode], count: int,
                rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """:func:`measure`, plus each mode's CPU time per item over every thread of the process
    (us): a cost that other processes' load moves far less than throughput."""
    cpu: dict[str, list[float]] = {name: [] for name in modes}

    def timed(name: str, mode: Mode) -> Mode:
        async def run(n: int) -> None:
            started = time.process_time()
            await mode(n)
            cpu[name].append((time.process_time() - started) / n * 1e6)
        return run

    rates = measure(loop, {name: timed(name, mode) for name, mode in modes.items()}, count,
                    rounds)
    return rates, {name: statistics.median(v[1:]) for name, v in cpu.items()}  # [0]: warm-up


@contextmanager
def cpu_per_item(runner: Any, n: int, into: list[tuple[float, float]]) -> Iterator[None]:
    """Append (loop thread's, stage workers' CPU seconds) per item over the block, in us:
    where the time goes when aioaccel is slower than the raw loop (Linux: per-thread clocks)."""
    workers = [t for t in threading.enumerate()
               if t.name.startswith(f"aioaccel-{runner.name}-") and t.ident is not None]
    clocks = [time.pthread_getcpuclockid(t.ident) for t in workers]  # type: ignore[arg-type]
    loop_started = time.thread_time()
    started = [time.clock_gettime(c) for c in clocks]
    yield
    worker = sum(time.clock_gettime(c) - s for c, s in zip(clocks, started, strict=True))
    into.append(((time.thread_time() - loop_started) / n * 1e6, worker / n * 1e6))


def looped(fn: Callable[[np.ndarray], Any], xs: list[np.ndarray]) -> Mode:
    async def mode(n: int) -> None:
        for i in range(n):
            fn(xs[i % len(xs)])
    return mode


def calls(loop: asyncio.AbstractEventLoop, tmp: Path, runtimes: Sequence[str]) -> None:
    """CPU per call (every thread of the process; best of 15 runs of 2000 calls), the raw loops
    against the stage's run(): the adapter's own cost, which machine load moves far less than
    throughput (the best run is the one least disturbed)."""
    print("\n0. CPU per call (us, best of 15 x 2000 calls): raw loops and the stage alone")
    for runtime in runtimes:
        chain = MODELS[0][1]()
        xs = [chain.random_input(s) for s in range(16)]
        case = CASES[runtime](chain, tmp, loop, xs, False)
        fns = {**case.raw, STAGE: stage_only(runtime, case)}
        best = {name: float("inf") for name in fns}
        for _ in range(15):
            for name, fn in fns.items():  # interleaved
                started = time.process_time()
                for i in range(2000):
                    fn(xs[i % 16])
                best[name] = min(best[name], (time.process_time() - started) / 2000 * 1e6)
        row = ", ".join(f"{name} {us:.2f}" for name, us in best.items())
        print(f"  {runtime}, {MODELS[0][0]}: {row}")


def overhead(loop: asyncio.AbstractEventLoop, rounds: int, tmp: Path,
             runtimes: Sequence[str], results: dict[str, Any], extra: bool = True) -> None:
    for runtime in runtimes:
        for label, make, count in MODELS:
            chain = make()
            xs = [chain.random_input(s) for s in range(16)]
            case = CASES[runtime](chain, tmp, loop, xs, extra)
            runner = loop.run_until_complete(
                aioaccel.open(case.target, maxsize=16, **case.options).__aenter__())

            cpu: dict[str, list[tuple[float, float]]] = {STREAMING: [], INFER: []}

            async def streaming(n: int, runner: Any = runner, xs: list[Any] = xs) -> None:
                with cpu_per_item(runner, n, cpu[STREAMING]):
                    await stream(runner, xs, n)

            async def infer64(n: int, runner: Any = runner, xs: list[Any] = xs) -> None:
                async def caller(k: int) -> None:
                    for i in range(k, n, 64):
                        await runner.infer(xs[i % 16])
                with cpu_per_item(runner, n, cpu[INFER]):
                    await asyncio.gather(*(caller(k) for k in range(64)))

            modes: dict[str, Mode] = {name: looped(fn, xs) for name, fn in case.raw.items()}
            modes[STAGE] = looped(stage_only(runtime, case), xs)
            modes[STREAMING] = streaming
            modes[INFER] = infer64
            modes.update(case.extra)
            rates, process_cpu = measure_cpu(loop, modes, count, rounds)
            loop.run_until_complete(runner.aclose())
            if case.cleanup is not None:
                case.cleanup()
            best = max(rates[name] for name in case.raw)
            us = {name: 1e6 / rate for name, rate in rates.items()}
            best_us = 1e6 / best
            print_table(f"1. overhead, {runtime}, {label} ({best_us:.1f} us per item in the "
                        f"best raw loop), {count} items per round", rates, RAW,
                        {name: f"{rate / best:5.2f}x of the best raw loop, "
                         f"{us[name]:7.1f} us/item, CPU {process_cpu[name]:7.1f} us/item"
                         for name, rate in rates.items()})
            print(f"  per item: the backend's adapter {us[STAGE] - best_us:+.1f} us over the "
                  f"best raw loop; aioaccel streaming {us[STREAMING] - us[STAGE]:+.1f} us, "
                  f"infer {us[INFER] - us[STAGE]:+.1f} us over the stage alone")
            threads = {}
            for name, samples in cpu.items():
                loop_us = statistics.median(s[0] for s in samples[-rounds:])
                worker_us = statistics.median(s[1] for s in samples[-rounds:])
                threads[name] = {"loop": loop_us, "worker": worker_us}
                print(f"  {name}: CPU per item on the event loop's thread {loop_us:.1f} us, on "
                      f"the stage's worker thread {worker_us:.1f} us (of {us[name]:.1f} us "
                      f"per item)")
            results[f"{runtime}, {label}"] = {"rates": rates, "best": best, "cpu": threads,
                                              "process_cpu": process_cpu}


# ---- 2. pipelining ------------------------------------------------------------------------
def pipelining(loop: asyncio.AbstractEventLoop, rounds: int, tmp: Path) -> None:
    chain = conv_chain(size=64, channels=32, depth=17)
    xs = [chain.random_input(s) for s in range(8)]
    count = 200
    for backend in ("litert", "onnx"):
        if backend == "litert":
            whole_path = chain.write_tflite(tmp / "whole.tflite")
            segment_paths = chain.write_tflite_segments(tmp, 2)
        else:
            whole_path = chain.write_onnx(tmp / "whole.onnx")
            segment_paths = chain.write_onnx_segments(tmp, 2)
        whole = raw_model(backend, whole_path)
        segments = [raw_model(backend, p) for p in segment_paths]
        seg_times = []
        for k, seg in enumerate(segments):
            x = xs[0] if k == 0 else segments[0](xs[0])
            seg(x)
            started = time.perf_counter()
            for _ in range(30):
                seg(x)
            seg_times.append((time.perf_counter() - started) / 30)

        async def sequential(n: int) -> None:
            for i in range(n):
                whole(xs[i % 8])

        runner = loop.run_until_complete(
            aioaccel.open(segment_paths, num_threads=1, maxsize=8).__aenter__())

        async def pipelined(n: int) -> None:
            await stream(runner, xs, n)

        rates = measure(loop, {"whole model, sequential": sequential,
                               "aioaccel, 2 segments": pipelined}, count, rounds)
        loop.run_until_complete(runner.aclose())
        limit = 1 / max(seg_times)
        print_table(f"2. pipelining, {backend}: conv chain, segments {seg_times[0] * 1e3:.1f} + "
                    f"{seg_times[1] * 1e3:.1f} ms, {count} items per round", rates,
                    "whole model, sequential",
                    {"aioaccel, 2 segments": f"(limit 1/slowest segment: {limit:.0f}/s = "
                     f"{limit / rates['whole model, sequential']:.2f}x; reached "
                     f"{rates['aioaccel, 2 segments'] / limit:.0%})"})


# ---- 3. loop health -----------------------------------------------------------------------
def loop_health(loop: asyncio.AbstractEventLoop, tmp: Path) -> None:
    chain = conv_chain(size=32, channels=16, depth=4)
    xs = [chain.random_input(s) for s in range(8)]
    targets = {
        "litert, 2 segments": (chain.write_tflite_segments(tmp, 2), {"num_threads": 1}),
        "onnx, 2 segments": (chain.write_onnx_segments(tmp, 2), {"num_threads": 1}),
        "openvino (sync requests)": (chain.openvino_model(), {}),
        "openvino (api=async)": (chain.openvino_model(), {"api": "async"}),
    }
    print("\n3. loop health: lag of a 1 ms sleeper while the runner streams flat out")
    print(f"  {'backend':<30} {'items/s':>8} {'lag p50':>9} {'lag p99':>9}")
    for name, (target, options) in targets.items():
        async def run() -> tuple[float, list[float]]:
            async with aioaccel.open(target, maxsize=8, **options) as runner:
                await runner.infer(xs[0])
                probe, lags = lag_probe(asyncio.get_running_loop())
                started = time.perf_counter()
                await stream(runner, xs, 2000)
                rate = 2000 / (time.perf_counter() - started)
                probe.cancel()
                return rate, lags

        rate, lags = loop.run_until_complete(run())
        print(f"  {name:<30} {rate:>8.0f} {percentile(lags, 0.5) * 1e3:>7.2f}ms "
              f"{percentile(lags, 0.99) * 1e3:>7.2f}ms")


# ---- 4. memory ----------------------------------------------------------------------------
def memory(loop: asyncio.AbstractEventLoop, tmp: Path) -> None:
    chain = dense_chain(16, 2, inputs=262144)  # a 1 MiB float32 input
    path = chain.write_onnx(tmp / "wide.onnx")
    item = 262144 * 4
    print("\n4. memory: 300 inputs of 1 MiB pushed at a consumer that takes 5 ms per result")
    for maxsize in (4, 16):
        async def run() -> tuple[int, int]:
            async with aioaccel.open(path, maxsize=maxsize, num_threads=1) as runner:
                async def produce() -> None:
                    for i in range(300):
                        await runner.push(np.full((1, 262144), i, np.float32))
                    runner.close()

                tracemalloc.start()
                baseline = tracemalloc.get_traced_memory()[0]
                producer = asyncio.create_task(produce())
                async for _ in runner:
                    await asyncio.sleep(0.005)
                await producer
                peak = tracemalloc.get_traced_memory()[1] - baseline
                tracemalloc.stop()
                return peak, runner.stats().peak_admitted

        peak, admitted = loop.run_until_complete(run())
        print(f"  maxsize={maxsize:<3} peak growth {peak / item:5.1f} MiB = items "
              f"(peak admitted {admitted}; bound: maxsize + the one being built)")


def ab(old: Path, rounds: int, loop: str, runtimes: str) -> None:
    """Alternating processes, old and new checkout, one overhead run each per round."""
    new = Path(__file__).resolve().parent.parent
    samples: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    for n in range(rounds):
        order = [("old", old), ("new", new)] if n % 2 == 0 else [("new", new), ("old", old)]
        for side, checkout in order:
            env = {**os.environ, "PYTHONPATH": str(checkout)}
            proc = subprocess.run(
                [sys.executable, __file__, "--only", "overhead", "--rounds", "1", "--json",
                 "--no-extra", "--loop", loop, "--runtimes", runtimes],
                env=env, cwd=checkout, capture_output=True, text=True, timeout=1800,
                check=True)
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            if not out["module"].startswith(str(checkout)):
                raise RuntimeError(f"{checkout}: imported aioaccel from {out['module']}")
            samples[side].append(out["results"])
        print(f"  round {n + 1}/{rounds} done", file=sys.stderr)
    print(f"bench_runtimes --ab: loop={loop}, {rounds} rounds, old={old}, new={new}")
    for case in samples["old"][0]:
        print(f"\n  {case:<34} {'old/s':>8} {'new/s':>8} {'new/old':>8} {'range':>11}"
              f" {'old/raw':>8} {'new/raw':>8} {'CPU us/item old':>16} {'new':>6}")
        for mode in samples["old"][0][case]["rates"]:
            def median(side: str, key: str = mode) -> float:
                return statistics.median(r[case]["rates"][key] for r in samples[side])

            def of_raw(side: str, key: str = mode) -> float:
                return statistics.median(r[case]["rates"][key] / r[case]["best"]
                                         for r in samples[side])
            ratios = sorted(b[case]["rates"][mode] / a[case]["rates"][mode]
                            for a, b in zip(samples["old"], samples["new"], strict=True))
            def cpu(side: str, key: str = mode) -> float:
                return statistics.median(r[case]["process_cpu"][key] for r in samples[side])
            print(f"  {mode:<34} {median('old'):>8.0f} {median('new'):>8.0f} "
                  f"{statistics.median(ratios):>7.2f}x {ratios[0]:>5.2f}-{ratios[-1]:.2f}"
                  f" {of_raw('old'):>7.2f}x {of_raw('new'):>7.2f}x {cpu('old'):>16.1f} "
                  f"{cpu('new'):>6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--only", default="overhead,pipelining,loop,memory")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help="overhead: which runtimes (openvino,onnx,litert)")
    parser.add_argument("--no-extra", action="store_true",
                        help="overhead: skip OpenVINO's AsyncInferQueue/executor/api=async rows")
    parser.add_argument("--json", action="store_true",
                        help="overhead: also print the rates as one JSON line (for --ab)")
    parser.add_argument("--ab", type=Path, metavar="OLD_CHECKOUT",
                        help="before/after against another checkout (see the module doc)")
    args = parser.parse_args()
    runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown runtimes {unknown}; known: {', '.join(RUNTIMES)}")
    if args.ab is not None:
        ab(args.ab.resolve(), args.rounds, args.loop, ",".join(runtimes))
        return
    parts = args.only.split(",")
    loop = new_loop(args.loop)
    print(f"bench_runtimes: loop={args.loop}, rounds={args.rounds} "
          f"(medians of interleaved rounds)")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "calls" in parts:
            calls(loop, Path(tmp), runtimes)
        if "overhead" in parts:
            overhead(loop, args.rounds, Path(tmp), runtimes, results, not args.no_extra)
        if "pipelining" in parts:
            pipelining(loop, args.rounds, Path(tmp))
        if "loop" in parts:
            loop_health(loop, Path(tmp))
        if "memory" in parts:
            memory(loop, Path(tmp))
    loop.close()
    if args.json:
        print(json.dumps({"module": aioaccel.__file__, "results": results}))


if __name__ == "__main__":
    main()
