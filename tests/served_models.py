"""Python models for ``aioaccel serve module:attribute`` in the serve tests (imported by the
server subprocess; ``AIOACCEL_TEST_LATENCY`` sets their seconds per call)."""

from __future__ import annotations

import os

import numpy as np

from aioaccel.testing import SimulatedStage

LATENCY = float(os.environ.get("AIOACCEL_TEST_LATENCY", "0.005"))


def _double(x: np.ndarray) -> np.ndarray:
    return np.asarray(x) * 2


def _fail_negative(x: np.ndarray) -> np.ndarray:
    if np.asarray(x).sum() < 0:
        raise ValueError("negative frame")
    return np.asarray(x) * 2


#: doubles its input, sleeping LATENCY seconds per call (the GIL is released meanwhile)
slow_double = SimulatedStage(_double, latency=LATENCY, name="slow_double")
#: the same, but a frame whose sum is negative fails (a per-item error)
picky_double = SimulatedStage(_fail_negative, latency=LATENCY, name="picky_double")
#: the same, but its third call is a fatal device failure (the runner breaks, or restarts)
flaky_double = SimulatedStage(_double, latency=LATENCY, fatal_at=2, name="flaky_double")


def _two(x: np.ndarray) -> dict[str, np.ndarray]:
    x = np.asarray(x)
    return {"scaled": (x * 2).astype(np.float32), "count": np.array([x.size], np.int64)}


#: two outputs of different dtypes (float32 and int64), for the binary result tests
two_outputs = SimulatedStage(_two, latency=LATENCY, name="two_outputs")
