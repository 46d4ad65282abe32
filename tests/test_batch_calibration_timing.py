"""``batch="auto"`` times each size on a machine other processes share: a size measured while
they ran must not read as "no gain" (under load it chose 1 on a small ONNX model)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from aioaccel.backends import Model
from aioaccel.batching import _Chain, calibrate
from aioaccel.stages import StageSpec, made
from aioaccel.tensors import TensorSpec


class DisturbedWhileSize2:
    """A stage of 1 ms per call at any size (batching pays off 2x per item); while size 2 is
    measured, other processes take the core for 20 ms in all calls but every third."""

    def __init__(self) -> None:
        self.calls = {1: 0, 2: 0}

    def __call__(self, x: Any) -> Any:
        array = next(iter(x.values())) if isinstance(x, dict) else x
        rows = int(np.asarray(array).shape[0])
        self.calls[rows] += 1
        disturbed = rows == 2 and self.calls[rows] % 3 != 0
        time.sleep(0.021 if disturbed else 0.001)  # the call's duration (simulated work)
        return x


def test_a_size_measured_while_the_machine_was_busy_still_shows_its_gain() -> None:
    stage = DisturbedWhileSize2()
    model = Model(stages=[StageSpec("disturbed", made(stage))],
                  inputs=[TensorSpec("x", "float32", (None, 4))])
    with _Chain(model) as chain:
        chosen, measured = calibrate(chain.timer(min_seconds=0.0), [1, 2], budget=1.0)
    assert stage.calls[2] >= 3  # undisturbed calls were among those timed
    assert chosen == 2, measured
