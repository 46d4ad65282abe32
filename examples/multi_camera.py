"""Several cameras sharing one model, each with its own ordered results (LiteRT on the CPU).

Each camera is a producer task with its own ``runner.stream(name)``: frames are admitted
fairly across cameras (a camera that floods cannot starve the others), each camera's results
come back in its own frame order, and ``stream.stats()`` reports per-camera latency. The
model is built in code and split into two LiteRT segments, one worker thread each.

Run: ``python examples/multi_camera.py [cameras] [frames]``  (needs ``aioaccel[litert]``)
"""

from __future__ import annotations

import asyncio
import sys
import tempfile

import numpy as np

import aioaccel
from aioaccel.testing.models import conv_chain


async def camera(stream: aioaccel.Stream, frames: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(abs(hash(stream.key)) % 2**32)
    for frame_id in range(frames):
        await stream.push(rng.standard_normal(shape).astype(np.float32), tag=frame_id)
    stream.close()


async def display(stream: aioaccel.Stream) -> int:
    shown = 0
    async for result in stream:
        assert result.tag == shown  # this camera's frames, in this camera's order
        shown += 1
    return shown


async def main(cameras: int, frames: int) -> None:
    chain = conv_chain(size=16, channels=8, depth=4)
    segments = chain.write_tflite_segments(tempfile.mkdtemp(), 2)
    async with aioaccel.open(segments, maxsize=8, num_threads=1) as runner:
        streams = [runner.stream(f"cam{i}", maxsize=4) for i in range(cameras)]
        shapes = chain.input_shape
        shown = await asyncio.gather(*(camera(s, frames, shapes) for s in streams),
                                     *(display(s) for s in streams))
        for stream, count in zip(streams, shown[cameras:], strict=True):
            stats = stream.stats()
            print(f"{stream.key}: {count} frames, latency p50 {stats.latency_p50 * 1e3:.1f} ms, "
                  f"p99 {stats.latency_p99 * 1e3:.1f} ms")
        print(f"{runner.stats().completed} frames from {cameras} cameras, "
              f"at most {runner.stats().peak_admitted} in flight")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    asyncio.run(main(*(args + [3, 40][len(args):])))
