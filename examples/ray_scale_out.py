"""One model on several replicas of a Ray Serve application, used through the Runner API.

``python examples/ray_scale_out.py [frames] [replicas]`` (needs ``aioaccel[ray]``).

It starts a local Ray instance that pretends to have ``replicas`` Edge TPUs
(``resources={"EdgeTPU": replicas}``: on a real cluster, each node says what it has with
``ray start --resources='{"EdgeTPU": 1}'`` and the script uses ``RAY_ADDRESS``), deploys the
embedded model with one replica per device, then streams ``frames`` frames through
``connect()`` exactly as through a local runner: push with a tag, results in push order.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

# Ray 2.x's own modules still use APIs pydantic 2 deprecates: not ours to fix
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")
import ray
from ray import serve

import aioaccel
from aioaccel.integrations.ray import connect, deploy
from aioaccel.testing.models import dense_chain

MODEL = dense_chain(64, 3, inputs=16)


async def main(frames: int, replicas: int) -> None:
    path = MODEL.write_onnx(Path(tempfile.mkdtemp(prefix="aioaccel-ray-")) / "model.onnx")
    deploy(str(path), name="detector", replicas=replicas,
           resources={"EdgeTPU": 1, "CPU": 0.5}, num_threads=1)
    camera = np.random.default_rng(0)
    async with connect("detector", maxsize=32) as runner:       # an aioaccel.Runner
        reply = await runner.infer(np.zeros((1, 16), np.float32))
        try:
            await runner.infer(np.zeros((1, 3), np.float32))
        except aioaccel.InputError as exc:                       # refused before sending
            refused = str(exc)

        async def produce() -> None:
            for i in range(frames):
                frame = camera.standard_normal((1, 16)).astype(np.float32)
                await runner.push(frame, tag=f"frame-{i}")
            runner.close()

        producer = asyncio.create_task(produce())
        tags = [result.tag async for result in runner]           # in push order
        await producer
        stats = runner.stats()
    assert tags == [f"frame-{i}" for i in range(frames)]
    served = Counter(where.split("@")[1][:8] for where in stats.profile["answered_by"])
    print(f"{frames} frames in order, answered by {len(served)} of {replicas} replicas "
          f"({stats.profile['calls']} calls, {stats.profile['mean_batch']:.1f} items per call)")
    print(f"infer: outputs {sorted(reply)}; bad input refused at the client: {refused}")


if __name__ == "__main__":
    frames = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    replicas = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    if "RAY_ADDRESS" in os.environ:
        ray.init()
    else:  # a local instance of its own, with pretend devices
        ray.init(address="local", num_cpus=2, resources={"EdgeTPU": replicas},
                 include_dashboard=False, log_to_driver=False)
    try:
        asyncio.run(main(frames, replicas))
    finally:
        serve.shutdown()
        ray.shutdown()
