"""Helpers shared by the backend test modules (imported as ``support``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np

import aioaccel


def close(actual: np.ndarray, expected: np.ndarray, atol: float = 1e-4) -> bool:
    return bool(np.allclose(actual, expected, rtol=1e-4, atol=atol))


async def stream_all(runner: aioaccel.Runner, xs: list[Any],
                     tag: Callable[[int], Any] = lambda i: i) -> list[aioaccel.Result]:
    """Push every input (tagged ``tag(index)``) from a producer task, close, and collect the
    results as ``async for`` yields them."""
    async def produce() -> None:
        for i, x in enumerate(xs):
            await runner.push(x, tag=tag(i))
        runner.close()

    producer = asyncio.create_task(produce())
    results = [r async for r in runner]
    await producer
    return results
