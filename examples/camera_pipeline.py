"""A camera-style pipeline on the built-in function backend: no runtime, no hardware.

Three blocking stages (decode -> model -> postprocess), each on its own worker thread, fed by a
producer task; results come back in frame order with their frame ids, while web-style callers
use ``infer`` on the same runner concurrently.

Run: ``python examples/camera_pipeline.py [frames]``
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np

import aioaccel

WEIGHTS = np.random.default_rng(0).standard_normal((64 * 64, 10)).astype(np.float32)


def decode(frame: bytes) -> np.ndarray:
    return np.frombuffer(frame, dtype=np.uint8).reshape(64, 64).astype(np.float32) / 255.0


def model(image: np.ndarray) -> np.ndarray:
    return image.reshape(1, -1) @ WEIGHTS  # NumPy releases the GIL here, like a runtime


def postprocess(logits: np.ndarray) -> int:
    return int(logits.argmax())


async def main(frames: int) -> None:
    rng = np.random.default_rng(1)
    camera = [rng.integers(0, 256, 64 * 64, dtype=np.uint8).tobytes() for _ in range(frames)]
    async with aioaccel.open([decode, model, postprocess], maxsize=8, name="camera") as runner:

        async def capture() -> None:
            for frame_id, frame in enumerate(camera):
                await runner.push(frame, tag=frame_id)  # waits while the pipeline is full
            runner.close()  # no more frames: iteration ends after the last result

        producer = asyncio.create_task(capture())
        # Web handlers can share the runner: their items never appear in the stream below.
        replies = asyncio.gather(*(runner.infer(camera[i]) for i in range(4)))
        labels = []
        async for result in runner:
            assert result.tag == len(labels)  # in frame order, paired with the frame id
            labels.append(result.outputs)
        await producer
        print(f"{len(labels)} frames, first labels {labels[:8]}, infer replies {await replies}")
        stats = runner.stats()
        for stage in stats.stages:
            print(f"  stage {stage.name:<12} busy {stage.busy:5.1%}  calls {stage.calls}")
        print(f"  latency p50 {stats.latency_p50 * 1e3:.2f} ms, "
              f"p99 {stats.latency_p99 * 1e3:.2f} ms, "
              f"peak admitted {stats.peak_admitted}/{stats.maxsize}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
