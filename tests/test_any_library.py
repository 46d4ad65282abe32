"""The runner's contracts on asyncio, uvloop and trio, written once with anyio: order and
pairing, backpressure, cancellation (cancel scopes, move_on_after / fail_after), errors,
close and drain, recovery, watchdog, streams, pools, batching, reload.

Each test runs under the three libraries (``aioaccel.pytest_plugin.backends()``); cancellation
here is anyio's (on asyncio: task cancellation; on trio: trio's cancel scopes), so these are
the rules an anyio or trio user relies on.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import aioaccel
from aioaccel.pytest_plugin import backends
from aioaccel.testing import SimulatedDevice, SimulatedStage

pytestmark = pytest.mark.anyio

FAST = aioaccel.Restart(limit=3, window=60.0, backoff=0.02, max_backoff=0.5)


@pytest.fixture(params=backends())
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


async def stream_all(runner: aioaccel.Runner, values: list[Any],
                     tag: Any = lambda i: f"tag-{i}") -> tuple[list[int], list[aioaccel.Result]]:
    """Push ``values`` from a producer task, close, collect what ``async for`` yields."""
    seqs: list[int] = []

    async def produce() -> None:
        for i, v in enumerate(values):
            seqs.append(await runner.push(v, tag=tag(i)))
        runner.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        results = [r async for r in runner]
    return seqs, results


# ---- order and pairing ----------------------------------------------------------------------
@pytest.mark.parametrize("replicas", [1, 3])
async def test_results_come_in_push_order_paired_with_their_tags(replicas: int) -> None:
    stage = SimulatedStage(lambda x: x * 10, latency=0.001, jitter=1.0, seed=1)
    async with aioaccel.open(stage, replicas=replicas, maxsize=8) as runner:
        seqs, results = await stream_all(runner, list(range(100)))
    assert [r.seq for r in results] == seqs == list(range(100))
    assert [r.tag for r in results] == [f"tag-{i}" for i in range(100)]
    assert [r.outputs for r in results] == [i * 10 for i in range(100)]


async def test_a_device_completing_out_of_order_still_yields_in_push_order() -> None:
    device = SimulatedDevice(lambda x: -x, latency=0.002, jitter=1.0, capacity=4, seed=7)
    async with aioaccel.open([lambda x: x + 1, device], maxsize=12) as runner:
        _, results = await stream_all(runner, list(range(60)))
    assert device.completion_order != sorted(device.completion_order), "never out of order"
    assert [r.outputs for r in results] == [-(i + 1) for i in range(60)]


async def test_many_concurrent_infer_callers_each_get_their_own_answer() -> None:
    async with aioaccel.open(SimulatedStage(lambda x: x * 3, latency=0.0005), replicas=2,
                             maxsize=8) as runner:
        answers: dict[int, int] = {}

        async def call(i: int) -> None:
            answers[i] = await runner.infer(i)

        async with anyio.create_task_group() as tg:
            for i in range(80):
                tg.start_soon(call, i)
        stats = runner.stats()
    assert answers == {i: 3 * i for i in range(80)}
    assert stats.peak_admitted <= 8 and stats.in_flight == 0


# ---- backpressure ---------------------------------------------------------------------------
async def test_push_waits_at_maxsize_and_push_nowait_refuses() -> None:
    gate = threading.Event()
    async with aioaccel.open(lambda x: gate.wait(5) and x, maxsize=3) as runner:
        for i in range(3):
            runner.push_nowait(i)
        with pytest.raises(aioaccel.WouldBlock, match="maxsize=3"):
            runner.push_nowait(99)
        pushed = anyio.Event()

        async def push_one_more() -> None:
            await runner.push(3)
            pushed.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(push_one_more)
            await anyio.wait_all_tasks_blocked()
            assert not pushed.is_set() and runner.stats().waiting == 1
            gate.set()
            first = await runner.__anext__()  # consuming one frees a slot for the waiter
            assert first.outputs == 0
            with anyio.fail_after(5):
                await pushed.wait()
        runner.close()
        rest = [r.outputs async for r in runner]
        stats = runner.stats()
    assert rest == [1, 2, 3]
    assert stats.peak_admitted == 3


# ---- cancellation ---------------------------------------------------------------------------
async def test_a_push_cancelled_while_waiting_leaves_no_trace() -> None:
    gate = threading.Event()
    async with aioaccel.open(lambda x: gate.wait(5) and x, maxsize=2) as runner:
        runner.push_nowait(0)
        runner.push_nowait(1)
        with anyio.move_on_after(0.05) as scope:
            await runner.push(2)
        assert scope.cancelled_caught
        before = runner.stats()
        assert before.waiting == 0 and before.in_flight == 2 and before.pushed == 2
        gate.set()
        runner.close()
        out = [r.outputs async for r in runner]
    assert out == [0, 1]


async def test_an_infer_cancelled_before_a_worker_took_it_is_withdrawn() -> None:
    gate = threading.Event()
    calls: list[int] = []

    def stage(x: int) -> int:
        calls.append(x)
        gate.wait(5)
        return x

    async with aioaccel.open(stage, maxsize=4) as runner:
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.infer, 0)  # the worker takes this one and blocks
            await anyio.wait_all_tasks_blocked()
            with anyio.move_on_after(0.05) as scope:
                await runner.infer(1)  # queued behind it: withdrawn when cancelled
            assert scope.cancelled_caught
            gate.set()
    stats = runner.stats()  # after the drain: the withdrawn item's shell came back
    assert calls == [0], "the withdrawn item reached the stage"
    assert stats.withdrawn == 1 and stats.completed == 1 and stats.in_flight == 0


async def test_fail_after_raises_timeout_error_and_infer_timeout_raises_infer_timeout() -> None:
    gate, taken = threading.Event(), threading.Event()

    def held(x: int) -> int:
        taken.set()
        gate.wait(5)
        return x

    async with aioaccel.open(held, maxsize=3) as runner:
        with pytest.raises(TimeoutError):
            with anyio.fail_after(10) as scope:
                async def expire_once_taken() -> None:
                    # the deadline passes once the worker has the item, however long a loaded
                    # machine takes to start it (a fixed 0.05 s could end before: withdrawn)
                    assert await anyio.to_thread.run_sync(taken.wait, 10)
                    scope.deadline = anyio.current_time()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(expire_once_taken)
                    await runner.infer(1)  # the worker took it: its result will be discarded
        with pytest.raises(aioaccel.InferTimeout, match=r"within 0\.05 s"):
            await runner.infer(2, timeout=0.05)  # withdrawn: its shell holds a slot a while
        runner.push_nowait(3)  # the third slot: full
        with pytest.raises(aioaccel.WouldBlock, match="stayed full"):
            await runner.infer(4, admit_timeout=0.05)
        gate.set()
        assert await runner.infer(5, timeout=5) == 5
        runner.close()
        assert [r.outputs async for r in runner] == [3]
        stats = runner.stats()
    assert stats.withdrawn == 1 and stats.discarded == 1
    assert stats.in_flight == 0 and stats.waiting == 0
    assert stats.pushed == stats.completed + stats.failed + stats.withdrawn


@pytest.mark.parametrize("kind", ["stage", "device"])
async def test_a_cancellation_storm_loses_and_duplicates_nothing(kind: str) -> None:
    rng = random.Random(2024)
    target: Any = (SimulatedStage(lambda x: x + 1000, latency=0.0005, jitter=1.0, seed=3)
                   if kind == "stage" else
                   SimulatedDevice(lambda x: x + 1000, latency=0.0008, jitter=1.0, capacity=3,
                                   seed=3))
    pushed: dict[int, int] = {}
    inferred: dict[int, int] = {}
    received: list[tuple[int, int, int]] = []
    cancelled = 0
    async with aioaccel.open(target, replicas=2, maxsize=8) as runner:

        async def consume() -> None:
            async for r in runner:
                received.append((r.seq, r.tag, r.outputs))

        async def one(i: int, deadline: float | None) -> None:
            nonlocal cancelled
            with anyio.CancelScope(deadline=deadline or float("inf")) as scope:
                if i % 2:
                    pushed[i] = await runner.push(i, tag=i)
                else:
                    inferred[i] = await runner.infer(i)
            cancelled += scope.cancelled_caught

        async with anyio.create_task_group() as consumers:
            consumers.start_soon(consume)
            async with anyio.create_task_group() as tg:
                for i in range(400):
                    cut = rng.random() < 0.5
                    tg.start_soon(one, i, anyio.current_time() + rng.uniform(0, 0.01)
                                  if cut else None)
                    if i % 25 == 0:
                        await anyio.sleep(rng.uniform(0, 0.003))
            runner.close()
        stats = runner.stats()

    assert cancelled > 50, "the storm did not cancel much"
    assert sorted(tag for _, tag, _ in received) == sorted(pushed)
    seqs = [seq for seq, _, _ in received]
    assert seqs == sorted(set(seqs))
    assert all(pushed[tag] == seq and out == tag + 1000 for seq, tag, out in received)
    assert all(out == i + 1000 for i, out in inferred.items())
    assert stats.in_flight == 0 and stats.waiting == 0
    assert stats.pushed == len(pushed) + len(inferred) + stats.withdrawn + stats.discarded
    assert stats.pushed == stats.completed + stats.failed + stats.withdrawn
    assert stats.peak_admitted <= 8


async def test_leaving_the_runner_through_a_cancel_scope_releases_everything() -> None:
    closed: list[bool] = []
    runner = aioaccel.open(SimulatedStage(latency=0.002), maxsize=4)
    with anyio.CancelScope() as scope:
        async with runner:
            # the budget runs from the open on (under load an open can take longer than it)
            scope.deadline = anyio.current_time() + 0.05
            async with anyio.create_task_group() as tg:
                async def produce() -> None:
                    for i in range(10_000):
                        await runner.push(i)

                tg.start_soon(produce)
                async for _ in runner:
                    pass
    closed.append(runner.closed)
    assert scope.cancelled_caught and closed == [True]
    assert runner.state == "closed"
    # the conftest checks that no aioaccel thread outlives the test


# ---- errors ---------------------------------------------------------------------------------
async def test_a_per_item_failure_surfaces_at_its_position_and_later_items_flow() -> None:
    stage = SimulatedStage(lambda x: x + 1, fail_at={3, 7})
    async with aioaccel.open(stage, maxsize=4) as runner:
        _, results = await stream_all(runner, list(range(10)))
    assert [r.ok for r in results] == [i not in {3, 7} for i in range(10)]
    assert isinstance(results[3].error, aioaccel.InferenceError)
    assert results[3].error.__cause__ is not None
    assert [r.outputs for r in results if r.ok] == [i + 1 for i in range(10) if i not in {3, 7}]


async def test_a_per_item_failure_raises_in_that_infer_caller_only() -> None:
    stage = SimulatedStage(lambda x: x + 1, fail_at=1)
    async with aioaccel.open(stage) as runner:
        assert await runner.infer(0) == 1
        with pytest.raises(aioaccel.InferenceError):
            await runner.infer(1)
        assert await runner.infer(2) == 3


async def test_a_fatal_failure_reaches_every_waiter_promptly() -> None:
    device = SimulatedDevice(lambda x: x, latency=0.005, capacity=2, fatal_at=5)
    outcomes: list[BaseException | int] = []
    async with aioaccel.open(device, maxsize=8) as runner:

        async def call(i: int) -> None:
            try:
                outcomes.append(await runner.infer(i))
            except aioaccel.AccelError as exc:
                outcomes.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(call, i)
        assert runner.state == "broken"
        with pytest.raises(aioaccel.DeviceError):
            await runner.push(0)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(outcomes) == 20 and errors
    assert all(isinstance(e, aioaccel.DeviceError) for e in errors)


async def test_a_hung_call_ends_in_device_timeout_through_the_watchdog() -> None:
    stage = SimulatedStage(hang_at=2)
    try:
        async with aioaccel.open(stage, call_timeout=0.2) as runner:
            assert await runner.infer(0) == 0
            assert await runner.infer(1) == 1
            with anyio.fail_after(10), pytest.raises(aioaccel.DeviceTimeout,
                                                     match="call_timeout=0.2"):
                await runner.infer(2)
            assert runner.state == "broken"
    finally:
        stage.release()


# ---- close and drain ------------------------------------------------------------------------
async def test_close_drains_and_aclose_is_idempotent_and_concurrent() -> None:
    runner = await aioaccel.open(SimulatedStage(lambda x: x, latency=0.002), maxsize=8)
    for i in range(6):
        runner.push_nowait(i)
    runner.close()
    with pytest.raises(aioaccel.RunnerClosed):
        await runner.push(99)
    assert [r.outputs async for r in runner] == list(range(6))
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(runner.aclose)
    await runner.aclose()
    assert runner.state == "closed"


async def test_aclose_with_a_budget_fails_what_is_left() -> None:
    gate = threading.Event()
    runner = await aioaccel.open(lambda x: gate.wait(5) and x, maxsize=4)
    errors: list[BaseException] = []

    async def call(i: int) -> None:
        try:
            await runner.infer(i)
        except aioaccel.RunnerClosed as exc:
            errors.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(call, i)
            await anyio.wait_all_tasks_blocked()
            with anyio.fail_after(5):
                await runner.aclose(timeout=0.05)
    finally:
        gate.set()
    assert len(errors) == 3 and runner.state == "closed"


# ---- recovery -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", [False, True], ids=["blocking", "device"])
async def test_a_fatal_failure_is_recovered_without_losing_an_item(device: bool) -> None:
    stage: Any = (SimulatedDevice(lambda x: x * 3, latency=0.001, capacity=3, fatal_at=30)
                  if device else SimulatedStage(lambda x: x * 3, latency=0.0005, fatal_at=30))
    async with aioaccel.open(stage, maxsize=8, restart=FAST, retries=1) as runner:
        _, results = await stream_all(runner, list(range(100)))
        health = runner.health()
    assert [r.seq for r in results] == list(range(100))
    assert [r.outputs for r in results] == [3 * i for i in range(100)]
    assert health.restarts == 1 and isinstance(health.last_error, aioaccel.DeviceError)


async def test_closing_while_recovering_cancels_the_recovery() -> None:
    stage = SimulatedStage(lambda x: x, fatal_at=0)
    slow = aioaccel.Restart(limit=3, window=60.0, backoff=5.0, max_backoff=5.0)
    runner = await aioaccel.open(stage, restart=slow)
    with pytest.raises(aioaccel.AccelError):
        await runner.infer(0, timeout=2)
    with anyio.fail_after(5):
        await runner.aclose()
    assert runner.state == "closed"


async def test_reload_swaps_the_model_without_losing_an_item() -> None:
    async with aioaccel.open(lambda x: x + 1, maxsize=4) as runner:
        assert await runner.infer(1) == 2
        await runner.reload(lambda x: x + 100)
        assert await runner.infer(1) == 101


# ---- streams, pools, batching ---------------------------------------------------------------
async def test_streams_keep_their_own_order_and_share_the_runner() -> None:
    async with aioaccel.open(SimulatedStage(lambda x: x, latency=0.0005, jitter=1.0, seed=2),
                             replicas=2, maxsize=6) as runner:
        got: dict[str, list[Any]] = {}

        async def camera(key: str) -> None:
            stream = runner.stream(key)

            async def produce() -> None:
                for i in range(30):
                    await stream.push((key, i), tag=i)
                stream.close()

            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                got[key] = [(r.tag, r.outputs) async for r in stream]

        async with anyio.create_task_group() as tg:
            for key in ("a", "b", "c"):
                tg.start_soon(camera, key)
        stats = runner.stats()
    for key in ("a", "b", "c"):
        assert got[key] == [(i, (key, i)) for i in range(30)]
    assert stats.peak_admitted <= 6


@pytest.mark.parametrize("policy", ["balance", "failover"])
async def test_a_pool_keeps_order_and_reruns_what_a_broken_member_held(policy: str) -> None:
    first = aioaccel.open(SimulatedDevice(lambda x: x * 2, latency=0.002, capacity=2,
                                          fatal_at=10), maxsize=4, name="first")
    second = aioaccel.open(SimulatedStage(lambda x: x * 2, latency=0.001), maxsize=4,
                           name="second")
    async with aioaccel.pool(first, second, policy=policy, retries=2) as pool:
        answer = await pool.infer(21)
        _, results = await stream_all(pool, list(range(60)))
        members = pool.member_stats()
    assert [r.outputs for r in results] == [2 * i for i in range(60)]
    assert answer == 42
    assert members[0].state == "broken" and members[1].completed > 0
    assert first.closed and second.closed


async def test_batching_groups_concurrent_callers_and_splits_the_answers() -> None:
    calls: list[int] = []

    def double(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape[0])
        return x * 2

    async with aioaccel.open(double, batch=8, maxsize=32) as runner:
        answers: dict[int, np.ndarray] = {}

        async def call(i: int) -> None:
            answers[i] = await runner.infer(np.full((1, 4), i, np.float32))

        async with anyio.create_task_group() as tg:
            for i in range(64):
                tg.start_soon(call, i)
        stats = runner.stats()
    assert all(np.array_equal(answers[i], np.full((1, 4), 2 * i, np.float32))
               for i in range(64))
    assert sum(calls) == 64 and max(calls) > 1
    assert stats.batching is not None and stats.batching.items == 64


# ---- bulk APIs ------------------------------------------------------------------------------
def _double_or_fail(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative input {x}")
    return x * 2


async def test_infer_many_answers_in_order_and_a_cancel_scope_withdraws_the_rest() -> None:
    stage = SimulatedStage(_double_or_fail, latency=0.001)
    async with aioaccel.open(stage, maxsize=4) as runner:
        assert await runner.infer_many(list(range(30))) == [2 * i for i in range(30)]
        with anyio.move_on_after(0.01) as scope:
            await runner.infer_many(list(range(200)))
        assert scope.cancelled_caught
        with anyio.fail_after(5):
            while runner.stats().in_flight:  # the withdrawn shells come back
                await anyio.sleep(0.005)
        assert await runner.infer_many([5, 6]) == [10, 12]  # nothing was left holding a slot
        out = await runner.infer_many([1, -1, 3], return_exceptions=True)
    assert out[0] == 2 and out[2] == 6
    assert isinstance(out[1], aioaccel.InferenceError) and "negative input" in str(out[1])


async def test_push_many_and_results_deliver_lists_in_push_order() -> None:
    stage = SimulatedStage(lambda x: x + 1, latency=0.0005, jitter=1.0, seed=3)
    async with aioaccel.open(stage, maxsize=8, replicas=2) as runner:
        async def produce() -> None:
            await runner.push_many(list(range(50)), tags=[f"t{i}" for i in range(50)])
            runner.close()

        got: list[aioaccel.Result] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce)
            async for chunk in runner.results(max_items=7):
                assert 1 <= len(chunk) <= 7
                got.extend(chunk)
    assert [r.tag for r in got] == [f"t{i}" for i in range(50)]
    assert [r.outputs for r in got] == [i + 1 for i in range(50)]


# ---- bounded open, poison items -------------------------------------------------------------
async def test_a_hung_warm_up_fails_open_within_open_timeout() -> None:
    stage = SimulatedStage(lambda x: x, hang_at=0)
    try:
        with anyio.fail_after(20):  # 2 s: the load and stage making finish first, even loaded
            with pytest.raises(aioaccel.OpenTimeout, match="warm-up"):
                async with aioaccel.open(stage, warmup=1, warmup_inputs=np.zeros(2),
                                         open_timeout=2.0):
                    pass
    finally:
        stage.release()


def _breaks_on_13(x: np.ndarray) -> np.ndarray:
    if (x == 13).any():
        raise aioaccel.DeviceError("the device crashed on this input")
    return x * 2


async def test_a_poison_item_fails_alone_and_its_neighbours_are_answered() -> None:
    device = SimulatedDevice(_breaks_on_13, latency=0.002, jitter=0.5, capacity=4)
    async with aioaccel.open(device, maxsize=16, restart=FAST, retries=2) as runner:
        rows = [np.full((1, 3), i, np.float32) for i in range(30)]
        outcomes: list[Any] = [None] * 30

        async def call(i: int) -> None:
            try:
                outcomes[i] = await runner.infer(rows[i])
            except aioaccel.AccelError as exc:
                outcomes[i] = exc

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(call, i)
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, BaseException)]
    assert failed == [13]
    assert all(np.array_equal(o, rows[i] * 2) for i, o in enumerate(outcomes) if i != 13)


# ---- the same program on each library -------------------------------------------------------
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_first_example() -> str:
    """The README's first runner example (its "A short example" section)."""
    text = README.read_text()
    section = text.find("## A short example")
    assert section >= 0, "README.md has no 'A short example' section"
    block = re.search(r"^```python\n(.*?)^```", text[section:], re.MULTILINE | re.DOTALL)
    assert block is not None, "README.md's short example has no python block"
    return block.group(1)


def run_program(code: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                          text=True, timeout=120, cwd=README.parent)
    assert proc.returncode == 0, proc.stderr
    # the results, without their latency (the one figure that differs from run to run)
    return [re.sub(r" [\d.]+ ms$", "", line) for line in proc.stdout.splitlines()
            if line.startswith("frame-")]


def test_the_readme_example_gives_the_same_results_on_asyncio_and_trio() -> None:
    code = readme_first_example()
    last = "anyio.run(main)"
    assert last in code, "the README's short example ends with anyio.run(main)"
    as_written = run_program(code)
    on_asyncio = run_program("import asyncio\n" + code.replace(last, "asyncio.run(main())", 1))
    on_trio = run_program("import trio\n" + code.replace(last, "trio.run(main)", 1))
    assert as_written == on_asyncio == on_trio
    assert on_trio == [f"frame-{i} {2 * i}" for i in range(10)]
