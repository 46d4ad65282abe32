"""The ``aioaccel`` command.

* ``aioaccel demo`` -- builds an embedded model, runs it on the CPU as a multi-segment pipeline
  over a stream of frames, and compares it with running the whole model sequentially.
* ``aioaccel info MODEL`` -- a model's inputs and outputs.
* ``aioaccel bench MODEL... [--backend --device --segments --concurrency --count --rounds
  --shape NAME=D1,D2,... --input FILE.npz --batch N|auto --loop auto|asyncio|uvloop --json]``
  -- items/s and latency through aioaccel (concurrent ``infer`` callers) against the raw
  vendor loop on the same model, in interleaved rounds; prints the input shapes used; ``MODEL``
  may be ``builtin`` (the demo's conv model). Runs on uvloop when installed.
* ``aioaccel devices [--json]`` -- the devices this machine has, and what to install for the
  runtimes that are missing.
* ``aioaccel serve MODEL... [--name --backend --device --maxsize --replicas --host --port
  --admit-timeout --batch --restart --option --allow-origin --header-timeout --loop ...]`` --
  the models over HTTP and WebSocket, with a live status page (:mod:`aioaccel.serve`).

Exit codes: 0 ok, 1 runtime failure, 2 usage error (bad arguments, missing file, unknown
format), 3 a runtime is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import aioaccel
from aioaccel.backends import BACKENDS
from aioaccel.loops import add_loop_arguments, keep_on_cpus, resolve_loop
from aioaccel.loops import run as run_on_loop
from aioaccel.serve.command import add_parser as add_serve_parser
from aioaccel.serve.command import batch_option
from aioaccel.serve.command import run as run_serve
from aioaccel.tensors import format_shape

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
DEMO_BACKENDS = ("litert", "onnx", "openvino")
BACKEND_CHOICES = sorted(BACKENDS)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # the reader went away (``aioaccel devices | head``): not a failure worth a
        # traceback; point stdout at /dev/null so the flush at exit does not raise again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aioaccel", description="asyncio-native inference "
                                     "on edge accelerators")
    parser.add_argument("--version", action="version",
                        version=f"aioaccel {aioaccel.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a built-in model as a pipeline on the CPU")
    demo.add_argument("--backend", choices=DEMO_BACKENDS, default="litert",
                      help="the CPU runtime to run the demo on (default litert)")
    demo.add_argument("--segments", type=int, default=2, help="pipeline segments (default 2)")
    demo.add_argument("--frames", type=int, default=300,
                      help="frames per mode, split over the rounds (default 300)")
    demo.add_argument("--rounds", type=int, default=5,
                      help="interleaved sequential/pipelined rounds (default 5)")
    demo.add_argument("--depth", type=int, default=8, help="conv layers of the model (default 8)")
    info = sub.add_parser("info", help="show a model's inputs and outputs")
    info.add_argument("model", nargs="+", help="model file(s); several = segments")
    info.add_argument("--backend", default=None, choices=BACKEND_CHOICES,
                      help="the runtime to open the model with (default: from the file type)")
    bench = sub.add_parser("bench", help="measure a model: aioaccel vs the raw vendor loop")
    bench.add_argument("model", nargs="+",
                       help="model file(s) (several = pipeline segments), or 'builtin'")
    bench.add_argument("--backend", default=None, choices=BACKEND_CHOICES,
                       help="the runtime (default: from the file type; litert for builtin)")
    bench.add_argument("--device", default=None, help="device= option for the backend")
    bench.add_argument("--segments", type=int, default=1,
                       help="split the builtin model into this many segments")
    bench.add_argument("--concurrency", type=int, default=8, help="concurrent infer callers")
    bench.add_argument("--count", type=int, default=500, help="items to run (default 500)")
    bench.add_argument("--json", action="store_true", help="print JSON for programs")
    bench.add_argument("--shape", action="append", metavar="NAME=D1,D2,...",
                       help="shape of an input with dynamic dimensions (repeatable), "
                            "e.g. --shape images=1,3,640,640")
    bench.add_argument("--input", metavar="FILE.npz",
                       help="input arrays by name (np.savez), instead of random data")
    bench.add_argument("--rounds", type=int, default=5,
                       help="raw and aioaccel rounds, interleaved (default 5)")
    bench.add_argument("--batch", type=batch_option, default=None, metavar="N|auto",
                       help="batch items for the device (aioaccel.open(batch=...)); the raw "
                            "loop stays one item per call")
    add_loop_arguments(bench)
    bench.add_argument("--plot", default=None, metavar="OUT.png",
                       help="also sweep the concurrency and draw throughput and the latency "
                            "CDF beside the raw loop (needs aioaccel[plot])")
    devices = sub.add_parser("devices", help="list accelerators and runtimes on this machine")
    devices.add_argument("--json", action="store_true", help="print JSON for programs")
    add_serve_parser(sub)
    args, extra = parser.parse_known_args(argv)
    if extra:  # `serve a.onnx --name a b.onnx --name b`: models after options are models too
        if args.command != "serve" or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.model += extra
    if args.command == "devices":
        return show_devices(args.json)
    try:
        if args.command == "serve":
            return run_serve(args)
        if args.command == "demo":
            if (args.segments < 1 or args.frames < 1 or args.depth < args.segments
                    or not 1 <= args.rounds <= args.frames):
                parser.error("need 1 <= rounds <= frames and 1 <= segments <= depth")
            return asyncio.run(run_demo(args.backend, args.segments, args.frames, args.depth,
                                        args.rounds))
        if args.command == "bench":
            if min(args.count, args.concurrency, args.segments, args.rounds) < 1:
                parser.error("need --count, --concurrency, --segments and --rounds >= 1")
            if args.segments > 1 and args.model != ["builtin"]:
                parser.error("--segments splits the builtin model; give segment files instead")
            resolve_loop(args.loop)
            keep_on_cpus(args.cpus)
            return run_on_loop(run_bench(args), args.loop)
        return asyncio.run(run_info(args.model, args.backend))
    except aioaccel.BackendUnavailable as exc:
        print(f"aioaccel: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"aioaccel: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except aioaccel.AccelError as exc:
        print(f"aioaccel: {exc}", file=sys.stderr)
        return EXIT_FAILED


def show_devices(as_json: bool) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from .devices import devices

    found = devices()
    if as_json:
        print(json.dumps([d.as_dict() for d in found], indent=2))
        return EXIT_OK
    table = Table(title="aioaccel devices")
    for column in ("backend", "device", "description", "status"):
        table.add_column(column)
    for d in found:
        status = "[green]ready[/]" if d.available else f"[yellow]install:[/] {d.install}"
        table.add_row(d.backend, d.device or "-", d.description, status)
    Console(width=max(120, Console().width)).print(table)
    return EXIT_OK


def _interleaved(count: int, rounds: int) -> list[int]:
    """Items per round: ``count`` split over ``rounds`` (raw and aioaccel alternate)."""
    rounds = max(1, min(rounds, count))
    return [count // rounds + (i < count % rounds) for i in range(rounds)]


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    last = len(ordered) - 1
    return ordered[round(0.5 * last)], ordered[round(0.99 * last)]


def _row(count: int, elapsed: float, latencies: list[float]) -> dict[str, float]:
    p50, p99 = _percentiles(latencies)
    return {"items_per_s": count / elapsed, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3}


async def run_bench(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from .bench import bench_inputs, describe_inputs, parse_shapes, raw_chain

    console = Console(stderr=args.json)
    shapes = parse_shapes(args.shape or [])
    npz = Path(args.input) if args.input else None
    with tempfile.TemporaryDirectory(prefix="aioaccel-bench-") as tmp:
        if args.model == ["builtin"]:
            from aioaccel.testing.models import conv_chain

            backend = args.backend or "litert"
            if backend not in DEMO_BACKENDS:
                raise ValueError(f"the builtin model runs on {', '.join(DEMO_BACKENDS)}")
            chain = conv_chain(size=32, channels=16, depth=4)
            files = write_demo_model(backend, chain, Path(tmp) / "segments", args.segments)
            whole = write_demo_model(backend, chain, Path(tmp) / "whole", 1)
        else:
            files = [Path(m) for m in args.model]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"model file not found: {str(f)!r}")
            backend = args.backend or aioaccel.backends.resolve_backend(args.model)
            whole = files
        options: dict[str, Any] = {}
        if args.device is not None:
            options["device"] = args.device
        if args.batch is not None:
            options["batch"] = args.batch
        loop = "uvloop" if type(asyncio.get_running_loop()).__module__.startswith(
            "uvloop") else "asyncio"
        target: Any = files[0] if len(files) == 1 else files
        maxsize = max(8, 2 * args.concurrency)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            console=console, transient=True)
        raw_latencies: list[float] = []
        ours_latencies: list[float] = []
        raw_elapsed = ours_elapsed = 0.0
        async with aioaccel.open(target, backend=backend, maxsize=maxsize, name="bench",
                                 **options) as runner:
            x = bench_inputs(runner.inputs, shapes, npz)
            used = describe_inputs(x)
            console.print(f"inputs: {used}", soft_wrap=True)
            await runner.infer(x)  # warm-up
            raw = await asyncio.to_thread(raw_chain, backend, whole)
            if raw is not None:
                raw(x)
            share_rounds = _interleaved(args.count, args.rounds)
            with progress:
                raw_task = (progress.add_task("raw vendor loop", total=args.count)
                            if raw is not None else None)
                task = progress.add_task(f"aioaccel, {args.concurrency} callers",
                                         total=args.count)
                for items in share_rounds:  # raw and aioaccel rounds alternate
                    if raw is not None and raw_task is not None:
                        started = time.perf_counter()
                        for _ in range(items):
                            t0 = time.perf_counter()
                            raw(x)  # on the loop on purpose: nothing else runs meanwhile
                            raw_latencies.append(time.perf_counter() - t0)
                            progress.advance(raw_task)
                        raw_elapsed += time.perf_counter() - started
                    share = [items // args.concurrency + (i < items % args.concurrency)
                             for i in range(args.concurrency)]

                    async def caller(n: int) -> None:
                        for _ in range(n):
                            t0 = time.perf_counter()
                            await runner.infer(x)
                            ours_latencies.append(time.perf_counter() - t0)
                            progress.advance(task)

                    started = time.perf_counter()
                    await asyncio.gather(*(caller(n) for n in share))
                    ours_elapsed += time.perf_counter() - started
            final = runner.stats()
            stages = [s.name for s in final.stages]
            # Triton's three numbers: a single "inference time" hides the queueing
            split = {"queue_ms": (final.queue_p50 * 1e3, final.queue_p99 * 1e3),
                     "device_ms": (final.device_p50 * 1e3, final.device_p99 * 1e3),
                     "end_to_end_ms": (final.latency_p50 * 1e3, final.latency_p99 * 1e3)}
            if args.plot:
                sweep = await concurrency_sweep(runner, x, args.count, args.concurrency)
    rows: dict[str, dict[str, float]] = {}
    if raw is not None:
        rows["raw vendor loop"] = _row(args.count, raw_elapsed, raw_latencies)
    rows["aioaccel"] = _row(args.count, ours_elapsed, ours_latencies)
    base = rows.get("raw vendor loop", {}).get("items_per_s")
    for row in rows.values():
        row["vs_raw"] = row["items_per_s"] / base if base else float("nan")
    if args.plot:
        from .plots import bench_figure

        samples = {"raw vendor loop": raw_latencies,
                   f"aioaccel, {args.concurrency} callers": ours_latencies}
        bench_figure(args.plot, throughput={"aioaccel": sweep}, latencies=samples,
                     baseline={"raw vendor loop (one thread)": base} if base else None,
                     title=f"{', '.join(args.model)} on {backend}")
        console.print(f"plot written to {args.plot}")
    if args.json:
        print(json.dumps({"model": args.model, "backend": backend, "stages": stages,
                          "inputs": {k: {"dtype": str(v.dtype), "shape": list(v.shape)}
                                     for k, v in x.items()},
                          "concurrency": args.concurrency, "count": args.count,
                          "batch": args.batch, "loop": loop, "cpus": _cpus_now(),
                          "rounds": len(share_rounds), "results": rows,
                          "latency_split": {k: {"p50": v[0], "p99": v[1]}
                                            for k, v in split.items()}}, indent=2))
        return EXIT_OK
    table = Table(title=f"aioaccel bench: {', '.join(args.model)} on {backend} "
                        f"({len(stages)} stage(s), {args.count} items in "
                        f"{len(share_rounds)} interleaved rounds, {loop} loop)")
    for column in ("mode", "items/s", "vs raw loop", "p50 ms", "p99 ms"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for name, row in rows.items():
        batched = f", batch {args.batch}" if args.batch is not None else ""
        label = (name if name != "aioaccel"
                 else f"aioaccel ({args.concurrency} callers{batched})")
        ratio = f"{row['vs_raw']:.2f}x" if base else "n/a"
        table.add_row(label, f"{row['items_per_s']:.0f}", ratio, f"{row['p50_ms']:.2f}",
                      f"{row['p99_ms']:.2f}")
    console.print(table)
    # the table's p50/p99 are the callers' end to end: the split says where that time went
    # (its own end-to-end figure, from admission, stays in --json: one p50 per run here)
    console.print("where aioaccel's latency went (p50 / p99 ms): "
                  + ", ".join(f"{label} {split[key][0]:.2f} / {split[key][1]:.2f}" for label, key in
                              (("queued", "queue_ms"), ("on the device", "device_ms"))),
                  soft_wrap=True)
    if base is None:
        console.print(f"no raw vendor loop for the {backend} backend: aioaccel only")
    return EXIT_OK


async def concurrency_sweep(runner: aioaccel.Runner, x: Any, count: int,
                            highest: int) -> list[tuple[int, float]]:
    """(callers, items/s) through ``runner.infer`` for 1, 2, 4 ... callers up to ``highest``
    (at least 16): the throughput curve of ``aioaccel bench --plot``."""
    points = []
    callers = 1
    while True:
        share = [count // callers + (i < count % callers) for i in range(callers)]

        async def caller(n: int) -> None:
            for _ in range(n):
                await runner.infer(x)

        started = time.perf_counter()
        await asyncio.gather(*(caller(n) for n in share))
        points.append((callers, count / (time.perf_counter() - started)))
        if callers >= max(16, highest):
            return points
        callers *= 2


async def run_info(models: list[str], backend: str | None) -> int:
    from rich.console import Console
    from rich.table import Table

    target: Any = models[0] if len(models) == 1 else models
    async with aioaccel.open(target, backend=backend) as runner:
        table = Table(title=", ".join(models))
        for column in ("", "name", "dtype", "shape"):
            table.add_column(column)
        for kind, specs in (("input", runner.inputs or []), ("output", runner.outputs or [])):
            for spec in specs:
                table.add_row(kind, spec.name, spec.dtype, format_shape(spec.shape))
        Console().print(table)
        print(f"stages: {[s.name for s in runner.stats().stages]}")
        info = runner.info
        runtime = info.get("interpreter") or info.get("openvino") or info.get("providers")
        print(f"backend: {info.get('backend', backend)}"
              + (f" (runtime: {runtime})" if runtime else ""))
    return EXIT_OK


def write_demo_model(backend: str, chain: Any, directory: Path, segments: int) -> Any:
    directory.mkdir(exist_ok=True)
    if backend == "litert":
        return chain.write_tflite_segments(directory, segments)
    if backend == "onnx":
        return chain.write_onnx_segments(directory, segments)
    return [part.write_openvino(directory / f"segment_{i}.xml")
            for i, part in enumerate(chain.split(segments))]


def demo_options(backend: str) -> dict[str, Any]:
    if backend == "openvino":  # one request per segment, one thread each: a 2-core pipeline
        return {"config": {"INFERENCE_NUM_THREADS": 1}}
    return {"num_threads": 1}


async def run_demo(backend: str, segments: int, frames: int, depth: int,
                   rounds: int = 5) -> int:
    """The sequential vendor loop and the aioaccel pipeline, interleaved over ``rounds``
    rounds of ``frames / rounds`` frames each: what other processes do to the machine then
    hits both alike, and the median ratio with its spread says how much that mattered."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from aioaccel.testing.models import conv_chain
    from aioaccel.testing.vendor import raw_model

    console = Console()
    chain = conv_chain(size=64, channels=32, depth=depth)
    stream = [chain.random_input(seed) for seed in range(min(frames, 32))]
    per_round = max(1, frames // rounds)
    sequential: list[float] = []
    pipelined: list[float] = []
    with tempfile.TemporaryDirectory(prefix="aioaccel-demo-") as tmp:
        directory = Path(tmp)
        console.print(f"[bold]aioaccel demo[/]: a {depth}-layer 3x3 conv model (64x64x32), "
                      f"{segments} segments on the {backend} backend, {rounds} rounds of "
                      f"{per_round} frames, sequential and pipelined in turn", soft_wrap=True)
        files = write_demo_model(backend, chain, directory, segments)

        whole = raw_model(backend, chain.openvino_model() if backend == "openvino" else
                          write_demo_model(backend, chain, directory / "whole", 1)[0])
        whole(stream[0])

        def run_sequential() -> float:
            started = time.perf_counter()
            for i in range(per_round):
                whole(stream[i % len(stream)])
            return per_round / (time.perf_counter() - started)

        depths: dict[str, list[int]] = {}
        kept: list[tuple[int, np.ndarray]] = []
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, transient=True)
        async with aioaccel.open(files, backend=backend, maxsize=8, name="demo",
                                 **demo_options(backend)) as runner:
            await runner.infer(stream[0])  # warm-up: first calls allocate
            checked = 0

            async def run_pipelined(task: Any) -> float:
                started = time.perf_counter()

                async def produce() -> None:
                    for i in range(per_round):
                        await runner.push(stream[i % len(stream)], tag=i)

                producer = asyncio.create_task(produce())
                for _ in range(per_round):
                    result = await anext(runner)
                    if len(kept) < 4:  # checked against NumPy after the run, not on the loop
                        kept.append((result.tag % len(stream), result.outputs["output"]))
                    progress.advance(task)
                    if result.seq % 8 == 0:
                        for stage in runner.stats().stages:
                            depths.setdefault(stage.name, []).append(stage.queue_depth)
                await producer
                return per_round / (time.perf_counter() - started)

            with progress:
                task = progress.add_task("rounds", total=rounds * per_round)
                for n in range(rounds):
                    # alternate which goes first, so that a drift in load favours neither
                    if n % 2 == 0:
                        sequential.append(run_sequential())
                        pipelined.append(await run_pipelined(task))
                    else:
                        pipelined.append(await run_pipelined(task))
                        sequential.append(run_sequential())
            stats = runner.stats()
        for index, output in kept:
            if not np.allclose(output, chain.reference(stream[index]), atol=1e-3):
                raise aioaccel.AccelError(f"frame {index}: the output differs from NumPy's")
            checked += 1

    ratios = [p / q for p, q in zip(pipelined, sequential, strict=True)]
    ratio = statistics.median(ratios)
    table = Table(title=f"results: median of {rounds} interleaved rounds")
    table.add_column("")
    table.add_column("items/s", justify="right")
    table.add_column("vs sequential", justify="right")
    table.add_row("whole model, sequential (vendor API)", f"{statistics.median(sequential):.0f}",
                  "1.00x")
    table.add_row(f"aioaccel pipeline, {segments} segments", f"{statistics.median(pipelined):.0f}",
                  f"{ratio:.2f}x (rounds: {min(ratios):.2f}x to {max(ratios):.2f}x)")
    console.print(table)
    stages = Table(title="stages")
    for column in ("stage", "busy", "mean queue depth", "calls"):
        stages.add_column(column, justify="right" if column != "stage" else "left")
    for stage in stats.stages:
        mean_depth = statistics.fmean(depths.get(stage.name, [0]))
        stages.add_row(stage.name, f"{stage.busy:.0%}", f"{mean_depth:.1f}", str(stage.calls))
    console.print(stages)
    console.print(f"latency p50 {stats.latency_p50 * 1e3:.1f} ms, p99 "
                  f"{stats.latency_p99 * 1e3:.1f} ms; peak admitted {stats.peak_admitted}/"
                  f"{stats.maxsize}; outputs checked against NumPy: {checked}", soft_wrap=True)
    console.print(demo_verdict(ratio, ratios, segments), soft_wrap=True)
    return EXIT_OK


def demo_verdict(ratio: float, ratios: list[float], segments: int) -> str:
    """What the demo's ratio means, and what the machine had to give it."""
    cores = os.cpu_count() or 1
    text = (f"The ratio is the pipeline's items/s over the sequential loop's on the same model: "
            f"{ratio:.2f}x means the {segments} segments ran side by side "
            f"{'on different cores' if ratio > 1.05 else 'only part of the time'}. "
            f"Pipelining needs free cores: up to {min(segments, cores)}x here, on "
            f"{cores} core{'s' if cores != 1 else ''}.")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load >= cores / 2:
        text += (f" The load average is {load:.2f}: other processes take cores, so rounds "
                 f"vary ({min(ratios):.2f}x to {max(ratios):.2f}x); the median is the figure "
                 f"to quote.")
    return text


def _cpus_now() -> list[int] | None:
    """The CPUs this process may run on (what ``--cpus`` set), None where the OS does not say."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


if __name__ == "__main__":
    raise SystemExit(main())
