"""Cancellation: a storm of cancelled push/infer calls, and a model-based state machine."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import aioaccel
from aioaccel.testing import SimulatedDevice, SimulatedStage


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["stage", "device"])
async def test_cancellation_storm_loses_and_duplicates_nothing(kind: str) -> None:
    rng = random.Random(2024)
    if kind == "stage":
        target: Any = SimulatedStage(lambda x: x + 1000, latency=0.0005, jitter=1.0, seed=3)
    else:
        target = SimulatedDevice(lambda x: x + 1000, latency=0.0008, jitter=1.0, capacity=3,
                                 seed=3)
    loop = asyncio.get_running_loop()
    pushed: dict[int, int] = {}     # tag -> seq, for pushes that returned
    inferred: dict[int, int] = {}   # input -> output, for infers that returned
    received: list[tuple[int, int, int]] = []
    async with aioaccel.open(target, replicas=2, maxsize=8) as runner:

        async def consume() -> None:
            async for r in runner:
                received.append((r.seq, r.tag, r.outputs))

        async def do_push(i: int) -> None:
            pushed[i] = await runner.push(i, tag=i)

        async def do_infer(i: int) -> None:
            inferred[i] = await runner.infer(i)

        consumer = asyncio.create_task(consume())
        tasks = []
        for i in range(600):
            task = asyncio.create_task(do_push(i) if i % 2 else do_infer(i))
            tasks.append(task)
            if rng.random() < 0.5:
                loop.call_later(rng.uniform(0, 0.01), task.cancel)
            if i % 25 == 0:
                await asyncio.sleep(rng.uniform(0, 0.003))
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        runner.close()
        await consumer
        stats = runner.stats()

    cancelled = sum(isinstance(o, asyncio.CancelledError) for o in outcomes)
    assert cancelled > 100, "the storm did not cancel much"
    assert not [o for o in outcomes if o is not None and not isinstance(o, asyncio.CancelledError)]
    # every push that returned a seq was delivered exactly once, in order, paired with its tag
    assert sorted(tag for _, tag, _ in received) == sorted(pushed)
    seqs = [seq for seq, _, _ in received]
    assert seqs == sorted(set(seqs))
    assert all(pushed[tag] == seq and out == tag + 1000 for seq, tag, out in received)
    assert all(out == i + 1000 for i, out in inferred.items())
    # every admitted item is accounted for exactly once; nothing is left admitted or waiting
    assert stats.in_flight == 0 and stats.waiting == 0
    assert stats.pushed == len(pushed) + len(inferred) + stats.withdrawn + stats.discarded
    assert stats.pushed == stats.completed + stats.failed + stats.withdrawn
    assert stats.peak_admitted <= 8


MAXSIZE = 3


class RunnerMachine(RuleBasedStateMachine):
    """push / push_nowait / consume / cancel / close against a model of the expected queue."""

    loop_factory: Any = asyncio.new_event_loop

    def __init__(self) -> None:
        super().__init__()
        self.loop = self.loop_factory()
        self.runner = self.run(aioaccel.open(lambda x: ("out", x), maxsize=MAXSIZE).__aenter__())
        self.admitted: list[tuple[int, int]] = []          # (seq, value) not yet consumed
        self.waiting: list[tuple[asyncio.Task[int], int]] = []
        self.next_seq = 0
        self.closed = False
        self.ended = False

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 10))

    def teardown(self) -> None:
        self.run(self.runner.aclose())
        # Retrieve what the pushes still waiting got: an unretrieved task exception is logged
        # with a traceback when the task is collected, and in Python 3.11 formatting it calls
        # ast.parse; a collection during pytest's own ast.parse of a module it rewrites then
        # fails that import with "AST constructor recursion depth mismatch".
        async def settle() -> list[Any]:
            return await asyncio.gather(*(task for task, _ in self.waiting),
                                        return_exceptions=True)

        outcomes = self.run(settle())
        assert all(isinstance(o, aioaccel.RunnerClosed) for o in outcomes), outcomes
        self.waiting.clear()
        self.loop.close()

    def _admit(self, seq: int, value: int) -> None:
        assert seq == self.next_seq
        self.next_seq += 1
        self.admitted.append((seq, value))

    @rule(value=st.integers(0, 99))
    def push_nowait(self, value: int) -> None:
        if self.closed:
            with pytest.raises(aioaccel.RunnerClosed):
                self.runner.push_nowait(value)
        elif len(self.admitted) < MAXSIZE and not self.waiting:
            self._admit(self.runner.push_nowait(value), value)
        else:
            with pytest.raises(aioaccel.WouldBlock):
                self.runner.push_nowait(value)

    @rule(value=st.integers(0, 99))
    def push(self, value: int) -> None:
        if self.closed:
            with pytest.raises(aioaccel.RunnerClosed):
                self.run(self.runner.push(value))
        elif len(self.admitted) < MAXSIZE and not self.waiting:
            self._admit(self.run(self.runner.push(value)), value)
        else:
            task = self.loop.create_task(self.runner.push(value))
            self.run(asyncio.sleep(0))  # it starts and waits for space
            assert not task.done()
            self.waiting.append((task, value))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def cancel_waiting_push(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.waiting) - 1))
        task, _ = self.waiting.pop(index)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            self.loop.run_until_complete(task)

    @precondition(lambda self: self.admitted or (self.closed and not self.ended))
    @rule()
    def consume(self) -> None:
        if not self.admitted:
            with pytest.raises(StopAsyncIteration):
                self.run(anext(self.runner))
            self.ended = True
            return
        result = self.run(anext(self.runner))
        seq, value = self.admitted.pop(0)
        assert (result.seq, result.outputs) == (seq, ("out", value))
        if self.waiting:  # the freed slot goes to the oldest waiting push
            task, value = self.waiting.pop(0)
            self._admit(self.run(task), value)

    @rule()
    def close(self) -> None:
        self.runner.close()
        self.closed = True
        for task, _ in self.waiting:
            with pytest.raises(aioaccel.RunnerClosed):
                self.run(task)
        self.waiting.clear()

    @invariant()
    def counters_match_the_model(self) -> None:
        stats = self.runner.stats()
        assert stats.in_flight == len(self.admitted)
        assert stats.waiting == len(self.waiting)
        assert stats.peak_admitted <= MAXSIZE


def _loop_factories() -> list[Any]:
    factories = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop

        factories.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    except ImportError:  # pragma: no cover
        pass
    return factories


@pytest.mark.timeout(240)
@pytest.mark.parametrize("loop_factory", _loop_factories())
def test_state_machine(loop_factory: Any) -> None:
    machine = type("Machine", (RunnerMachine,), {"loop_factory": staticmethod(loop_factory)})

    def make_machine() -> RunnerMachine:
        return machine()

    run_state_machine_as_test(
        make_machine, settings=settings(max_examples=60, stateful_step_count=25, deadline=None))
