"""The legacy Inference Engine API: its own start_async/wait loop vs. aioaccel, same model.

Needs the legacy environment (``openvino<2024``, ``numpy<2``; see ``.ci/run``). In one run,
with interleaved rounds, on the CPU with ``num_requests`` infer requests:

* legacy sync loop          -- ``exec_net.infer(inputs)`` per item, one thread
* legacy start_async/wait   -- the vendor samples' pattern: requests used round-robin, each
  waited for (``wait(-1)``) before it is started again
* legacy callbacks          -- ``set_completion_callback`` freeing request ids to a queue the
  main thread takes from (what aioaccel's feeder does, without an event loop)
* run_in_executor           -- ``await loop.run_in_executor(None, exec_net.infer, inputs)``
* aioaccel sync            -- ``backend="openvino-legacy"`` (``api="auto"`` = ``"sync"`` on the
  CPU): push / async for, a request per worker thread (1 and 2 workers)
* aioaccel callback         -- ``api="callback"``: completion callbacks
* aioaccel wait             -- ``api="wait"``: a waiter thread

Run: ``python benchmarks/bench_openvino_legacy.py [--loop uvloop] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import measure, new_loop, print_table, stream

import aioaccel
from aioaccel.testing.models import dense_chain

REQUESTS = 2
EXTRA: dict[str, str] = {}


def legacy_modes(xml: Path, x: Any) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from openvino.inference_engine import IECore
    ie = IECore()
    net = ie.read_network(model=str(xml))
    config = {"INFERENCE_PRECISION_HINT": "f32", **EXTRA}
    sync_net = ie.load_network(net, "CPU", config, 1)
    async_net = ie.load_network(net, "CPU", config, REQUESTS)
    callback_net = ie.load_network(net, "CPU", config, REQUESTS)  # callbacks stay set
    feed = {"input": x}

    async def sync_loop(count: int) -> None:
        for _ in range(count):
            sync_net.infer(feed)

    async def start_async_wait(count: int) -> None:
        requests = async_net.requests
        started = [False] * len(requests)
        for i in range(count):
            rid = i % len(requests)
            if started[rid]:
                requests[rid].wait(-1)
                requests[rid].output_blobs["output"].buffer.copy()
            async_net.start_async(request_id=rid, inputs=feed)
            started[rid] = True
        for rid, request in enumerate(requests):
            if started[rid]:
                request.wait(-1)
                request.output_blobs["output"].buffer.copy()

    async def callbacks(count: int) -> None:
        # the vendor's callback pattern: a completion callback frees its request id
        import queue

        requests = callback_net.requests
        free: queue.SimpleQueue[int] = queue.SimpleQueue()

        def done(status: Any, rid: int) -> None:
            requests[rid].output_blobs["output"].buffer.copy()
            free.put(rid)

        for rid, request in enumerate(requests):
            request.set_completion_callback(done, rid)
            free.put(rid)
        for _ in range(count):
            requests[free.get()].async_infer(feed)
        for _ in requests:
            free.get()

    async def executor(count: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            await loop.run_in_executor(None, sync_net.infer, feed)

    def streaming(api: str, requests: int = REQUESTS) -> Any:
        async def run(count: int) -> None:
            async with aioaccel.open(xml, backend="openvino-legacy", api=api, config=EXTRA,
                                     num_requests=requests, maxsize=8) as runner:
                await stream(runner, [x], count)
        return run

    return {"legacy sync loop": sync_loop, "legacy start_async/wait": start_async_wait,
            "legacy completion callbacks": callbacks,
            "run_in_executor per item": executor,
            "aioaccel (sync, 1 worker)": streaming("sync", 1),
            "aioaccel (sync, 2 workers)": streaming("sync", 2),
            "aioaccel (callback)": streaming("callback"),
            "aioaccel (api='wait')": streaming("wait")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loop = new_loop(args.loop)
    directory = Path(tempfile.mkdtemp())
    print(f"bench_openvino_legacy: loop={args.loop}, rounds={args.rounds}, CPU, "
          f"num_requests={REQUESTS} (medians of interleaved rounds)")
    for label, chain, count in (("tiny model (dense 64x4)", dense_chain(64, 4), 3000),
                                ("~1 ms model (dense 1024x8)", dense_chain(1024, 8), 400)):
        xml = chain.write_openvino(directory / f"{chain.cost():.0f}.xml")
        modes = legacy_modes(xml, chain.random_input())
        rates = measure(loop, modes, count, args.rounds)
        print_table(label, rates, "legacy start_async/wait")
        best = max(v for k, v in rates.items() if k.startswith("aioaccel"))
        print(f"  best aioaccel vs run_in_executor: "
              f"{best / rates['run_in_executor per item']:.2f}x, vs the legacy sync loop: "
              f"{best / rates['legacy sync loop']:.2f}x")
    loop.close()


if __name__ == "__main__":
    main()
