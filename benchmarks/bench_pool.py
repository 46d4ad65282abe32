"""Device pools: two devices of different speeds behind one runner.

In one run, with interleaved rounds (medians), streaming ``--count`` items through:

* each member alone               -- one ``aioaccel.open`` runner per device
* naive round-robin over both     -- what users write today: item i to device i % 2, results
  read back in the same alternation (order kept, but the fast device waits for the slow one)
* ``aioaccel.pool(a, b)``         -- policy="balance"

The limit is the sum of the two members' throughputs alone. For the real pair the benchmark also
runs the two native loops at once on two threads: on a shared 2-core machine that, not the sum,
is what two CPU "devices" can give together. Simulated devices sleep 1 ms and
3 ms per item (``time.sleep`` releases the GIL, as a runtime's native call does); the real pair
is ONNX Runtime and OpenVINO on the CPU, one thread each, on the same model built in code.

Failover gap: policy="failover", the first member breaks (a fatal device error) at item
``count // 3``; the gap is the time between the last result before the break and the next one
(that item, re-run on the second member), against the usual time between results. The longest
gap anywhere in the run is printed too: on a loaded machine it shows the scheduler's noise.

Run: ``python benchmarks/bench_pool.py [--loop uvloop] [--rounds 3] [--count 300] [--no-real]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from time import perf_counter
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import measure, new_loop, stream

import aioaccel
from aioaccel.testing import SimulatedStage
from aioaccel.testing.models import dense_chain


async def round_robin(a: aioaccel.Runner, b: aioaccel.Runner, xs: list[Any], count: int) -> None:
    members = (a, b)

    async def produce() -> None:
        for i in range(count):
            await members[i % 2].push(xs[i % len(xs)])

    producer = asyncio.create_task(produce())
    for i in range(count):
        await anext(members[i % 2])
    await producer


def compare(loop: asyncio.AbstractEventLoop, title: str, make: Any, xs: list[Any], count: int,
            rounds: int, raw: Callable[[], float] | None = None) -> None:
    """``make(label)`` -> (a, b): two fresh member runners (not opened). ``raw()``: items/s of
    the two native loops running at once on two threads (what the machine gives right now)."""
    a_alone, b_alone = make("alone")
    rr_a, rr_b = make("rr")
    pool = aioaccel.pool(*make("pool"), name="pool")
    runners = [a_alone, b_alone, rr_a, rr_b, pool]
    for runner in runners:
        loop.run_until_complete(runner.__aenter__())
    try:
        modes = {
            f"{a_alone.name} alone": lambda n: stream(a_alone, xs, n),
            f"{b_alone.name} alone": lambda n: stream(b_alone, xs, n),
            "naive round-robin over both": lambda n: round_robin(rr_a, rr_b, xs, n),
            "aioaccel.pool (balance)": lambda n: stream(pool, xs, n),
        }
        rates = measure(loop, modes, count, rounds)
        shares = [s.completed for s in pool.member_stats()]
        if raw is not None:
            rates["raw: both native loops at once"] = statistics.median(
                raw() for _ in range(rounds))
    finally:
        for runner in runners:
            loop.run_until_complete(runner.aclose())
    names = list(rates)
    limit = rates[names[0]] + rates[names[1]]  # the members' rates alone, summed
    print(f"\n{title}")
    print(f"  {'mode':<34} {'items/s':>10} {'vs limit':>9}")
    for name, value in rates.items():
        print(f"  {name:<34} {value:>10.0f} {value / limit:>8.2f}x")
    print(f"  {'limit (sum of the two alone)':<34} {limit:>10.0f}")
    total = sum(shares) or 1
    print(f"  pool vs round-robin: {rates[names[3]] / rates[names[2]]:.2f}x; pool's split: "
          + ", ".join(f"{s / total:.0%}" for s in shares))


def raw_pair(onnx_file: Path, xml_file: Path, x: Any, seconds: float = 1.0) -> float:
    """Items/s of a plain ONNX Runtime loop and a plain OpenVINO loop, on two threads at once."""
    import onnxruntime as ort
    import openvino as ov

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    compiled = ov.Core().compile_model(str(xml_file), "CPU", {
        "INFERENCE_NUM_THREADS": 1, "ENABLE_CPU_PINNING": False, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    calls = [lambda: session.run(None, {"input": x}), lambda: request.infer({0: x})]
    counts = [0, 0]
    deadline = perf_counter() + seconds

    def loop_on(k: int) -> None:
        call = calls[k]
        while perf_counter() < deadline:
            call()
            counts[k] += 1

    threads = [threading.Thread(target=loop_on, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


async def failover_gap(count: int) -> tuple[float, float, float]:
    """Across the first member's fatal failure at item ``count // 3``: the time between the
    last result before it and the result of that item (re-run on the second member), the
    longest gap between results in the whole run, and the median gap, in seconds."""
    broken_at = count // 3
    first = aioaccel.open(SimulatedStage(latency=0.001, fatal_at=broken_at), name="first")
    second = aioaccel.open(SimulatedStage(latency=0.001), name="second")
    arrivals: list[float] = []
    async with aioaccel.pool(first, second, policy="failover") as pool:
        async def produce() -> None:
            for i in range(count):
                await pool.push(i)
            pool.close()

        producer = asyncio.create_task(produce())
        async for result in pool:
            assert result.ok
            arrivals.append(perf_counter())
        await producer
    assert len(arrivals) == count
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return gaps[broken_at - 1], max(gaps), statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--no-real", action="store_true", help="simulated devices only")
    args = parser.parse_args()
    loop = new_loop(args.loop)
    print(f"bench_pool: loop={args.loop}, rounds={args.rounds}, count={args.count} "
          f"(medians over rounds)")

    def simulated(label: str) -> tuple[aioaccel.Runner, aioaccel.Runner]:
        return (aioaccel.open(SimulatedStage(latency=0.001), name=f"fast-1ms-{label}"),
                aioaccel.open(SimulatedStage(latency=0.003), name=f"slow-3ms-{label}"))

    compare(loop, "simulated devices: 1 ms and 3 ms per item", simulated, list(range(16)),
            args.count, args.rounds)

    if not args.no_real:
        chain = dense_chain(1024, 6)
        with tempfile.TemporaryDirectory() as tmp:
            onnx_file = chain.write_onnx(Path(tmp) / "m.onnx")
            xml_file = chain.write_openvino(Path(tmp) / "m.xml")

            def real(label: str) -> tuple[aioaccel.Runner, aioaccel.Runner]:
                return (aioaccel.open(onnx_file, name=f"onnxruntime-{label}", num_threads=1),
                        aioaccel.open(xml_file, name=f"openvino-{label}",
                                      config={"INFERENCE_NUM_THREADS": 1,
                                              "ENABLE_CPU_PINNING": False}))

            xs = [chain.random_input(seed) for seed in range(16)]
            compare(loop, "real: ONNX Runtime + OpenVINO on the CPU, one thread each "
                          "(dense 1024x6, f32)", real, xs, args.count * 2, args.rounds,
                    raw=lambda: raw_pair(onnx_file, xml_file, xs[0]))

    gaps = [loop.run_until_complete(failover_gap(args.count)) for _ in range(args.rounds)]
    at_break, longest, usual = (statistics.median(g[k] for g in gaps) for k in range(3))
    print(f"\nfailover (1 ms members, the first breaks at item {args.count // 3}): "
          f"{at_break * 1e3:.1f} ms without results across the break (usual gap between "
          f"results {usual * 1e3:.2f} ms; longest gap anywhere in the run {longest * 1e3:.1f} ms)")
    loop.close()


if __name__ == "__main__":
    main()
