"""A stream closed while its withdrawn items are still travelling is forgotten once their
empty shells come back: its key and slots are free again (what a vanished WebSocket client
left behind, issue 26 item 9)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

import aioaccel
from aioaccel.testing import SimulatedStage

pytestmark = pytest.mark.anyio


async def test_a_closed_stream_is_forgotten_when_its_withdrawn_items_come_back() -> None:
    gates = {0.0: threading.Event(), 1.0: threading.Event()}
    started = {0.0: threading.Event(), 1.0: threading.Event()}

    def hold(x: np.ndarray) -> np.ndarray:
        key = float(np.asarray(x).flat[0])
        if key in gates:
            started[key].set()
            gates[key].wait(10)
        return x

    async with aioaccel.open(SimulatedStage(hold), maxsize=4, name="held") as runner:
        cam, other = runner.stream("cam"), runner.stream("other")
        await cam.push(np.zeros(1))                 # A: on the worker
        await asyncio.to_thread(started[0.0].wait, 10)
        await other.push(np.ones(1))                # X: next, holds the worker again
        await cam.push(np.full(1, 2.0))             # B: queued behind X, withdrawn
        assert cam.withdraw() == 1
        cam.close()
        gates[0.0].set()
        assert [r.outputs.tolist() async for r in cam] == [[0.0]]
        await asyncio.to_thread(started[1.0].wait, 10)
        # the consumer has finished while B's empty shell is still queued behind X
        gates[1.0].set()
        other.close()
        assert [r.outputs.tolist() async for r in other] == [[1.0]]
        async with asyncio.timeout(10):
            while runner.streams() or runner.stats().in_flight:
                await asyncio.sleep(0.01)  # no event tells when a shell has come back
        again = runner.stream("cam")  # the key is free, with a fresh count
        assert again.stats().pushed == 0
        await again.push(np.full(1, 3.0))
        again.close()
        assert [r.outputs.tolist() async for r in again] == [[3.0]]
