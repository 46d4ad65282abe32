"""Recovery: how long a camera service goes without results when its device dies or hangs.

A simulated device at ~5 ms per frame is fed by 4 camera streams at 30 frames/s each. In the
middle of the run the device fails fatally (``fatal``), or hangs (``hang``: caught by
``call_timeout``). Reported per scenario: the longest time without any result (the gap),
frames lost (pushed and never answered with outputs), restarts, and the recovery time the
runner measured. Frigate's documented behaviour for a stuck detector, for comparison: it
notices after 10 s, waits 30 s, then restarts the whole service: a gap of 40 s or more.

Run: ``python benchmarks/bench_recovery.py [--loop asyncio|uvloop] [--seconds 6]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).parent))
from _common import new_loop

import aioaccel
from aioaccel.testing import SimulatedDevice

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--call-timeout", type=float, default=0.5)
    args = parser.parse_args()
    loop = new_loop(args.loop)
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
