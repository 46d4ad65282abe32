"""Device pools: routing (balance, failover), retries, spec agreement, real runtimes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from time import perf_counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from support import close, stream_all

import aioaccel
from aioaccel.pool import MemberLost, Pool, agreed_specs
from aioaccel.routing import Balance, Failover, MemberView, NoMember, ServiceClock, make_policy
from aioaccel.testing import SimulatedDevice, SimulatedStage
from aioaccel.testing.models import dense_chain

pytestmark = pytest.mark.anyio


def sim(latency: float, name: str, **options: Any) -> aioaccel.Runner:
    """A member runner: a simulated device of ``latency`` seconds per item, one at a time."""
    return aioaccel.open(SimulatedStage(latency=latency, **options), name=name)


def labelled(label: str, latency: float = 0.0, **options: Any) -> SimulatedStage:
    """A simulated device whose outputs say which member computed them."""
    return SimulatedStage(lambda x: (label, x), latency=latency, name=label, **options)


async def rate(runner: aioaccel.Runner, count: int) -> tuple[float, list[aioaccel.Result]]:
    async with runner:
        started = perf_counter()
        results = await stream_all(runner, list(range(count)))
        return count / (perf_counter() - started), results


# ---- balance ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["blocking", "device"])
async def test_fast_and_slow_together_beat_the_fast_one_alone(kind: str) -> None:
    def device(ms: float, name: str) -> aioaccel.Runner:
        if kind == "blocking":   # one item at a time, like a LiteRT invoke
            return sim(ms / 1000, name)
        # four at a time, completing out of order, like OpenVINO's AsyncInferQueue; twice as
        # slow per item (2 ms, 6 ms), so that the pair runs ~2700 items/s, not ~5000: on a
        # 2-core machine shared with other work the per-item cost of the host would show
        return aioaccel.open(SimulatedDevice(latency=2 * ms / 1000, name=name), name=name)

    count = 400 if kind == "blocking" else 800
    # The bound, 1.2x (the limit is ~1.33x: 1/1 ms + 1/3 ms), for one-at-a-time
    # devices. Four-at-a-time ones run 8 device threads beside the loop: with other work on
    # the 2 cores they lose more to GIL hand-offs, so 1.1x, and the slow one must get its
    # share (a policy blind to parallelism gave it ~5%).
    bound = 1.2 if kind == "blocking" else 1.1
    # up to 3 interleaved rounds, best of each: other work slows a round now and then
    alone = together = 0.0
    for _ in range(3):
        alone = max(alone, (await rate(device(1, "fast"), count))[0])
        pool = aioaccel.pool(device(1, "fast"), device(3, "slow"))
        speed, results = await rate(pool, count)
        together = max(together, speed)
        assert [r.tag for r in results] == list(range(count))
        assert [r.outputs for r in results] == list(range(count))
        if together >= bound * alone:
            break
    assert together >= bound * alone, (together, alone)
    if kind == "device":
        fast, slow = pool.member_stats()
        assert slow.completed >= 0.15 * count, (fast.completed, slow.completed)
        return
    fast, slow = pool.member_stats()
    assert fast.completed + slow.completed == count
    # balanced by measured speed, not round-robin: the fast device does most of the work
    assert fast.completed > 1.8 * slow.completed > 0
    assert fast.service_time is not None and slow.service_time is not None
    assert slow.service_time > 1.5 * fast.service_time


async def test_results_in_push_order_when_members_finish_out_of_order() -> None:
    members = [aioaccel.open(SimulatedDevice(lambda x: x * 10, latency=0.002, jitter=0.9,
                                             capacity=4, seed=n, name=f"dev{n}"), name=f"d{n}")
               for n in range(3)]
    async with aioaccel.pool(*members) as pool:
        results = await stream_all(pool, list(range(150)), tag=lambda i: f"t{i}")
    assert [r.tag for r in results] == [f"t{i}" for i in range(150)]
    assert [r.outputs for r in results] == [i * 10 for i in range(150)]
    assert [r.seq for r in results] == list(range(150))
    assert all(s.completed > 0 for s in pool.member_stats())


async def test_infer_from_many_callers_and_streams() -> None:
    async with aioaccel.pool(sim(0.001, "a"), sim(0.002, "b"), maxsize=6) as pool:
        answers = await asyncio.gather(*(pool.infer(i) for i in range(60)))
        assert answers == list(range(60))
        cams = [pool.stream(key) for key in ("left", "right")]

        async def camera(stream: aioaccel.Stream) -> list[Any]:
            async def produce() -> None:
                for n in range(20):
                    await stream.push((stream.key, n), tag=n)
                stream.close()

            producer = asyncio.create_task(produce())
            outputs = [r.outputs async for r in stream]
            await producer
            return outputs

        left, right = await asyncio.gather(*map(camera, cams))
        stats = pool.stats()
    assert left == [("left", n) for n in range(20)]
    assert right == [("right", n) for n in range(20)]
    assert stats.peak_admitted <= 6
    assert stats.completed == 100


async def test_a_reserved_stream_on_a_pool_is_admitted_during_a_burst() -> None:
    async with aioaccel.pool(sim(0.002, "a"), sim(0.002, "b"), maxsize=6) as pool:
        critical = pool.stream("critical", priority=1, reserve=1)
        burst = pool.stream("burst")
        for i in range(5):          # the burst takes every slot it may
            burst.push_nowait(i)
        with pytest.raises(aioaccel.WouldBlock):
            burst.push_nowait(5)
        critical.push_nowait("now")  # the reserved slot is still free
        assert (await anext(critical)).outputs == "now"
        burst.close()
        assert [r.outputs async for r in burst] == list(range(5))


async def test_a_pool_of_pools() -> None:
    inner = aioaccel.pool(sim(0.001, "a"), sim(0.001, "b"), name="inner")
    async with aioaccel.pool(inner, sim(0.002, "c"), name="outer") as outer:
        results = await stream_all(outer, list(range(80)))
        assert inner.member_stats()[0].completed > 0 and inner.member_stats()[1].completed > 0
    assert [r.outputs for r in results] == list(range(80))
    assert inner.closed and all(m.closed for m in inner.members)


async def test_cancelled_infers_leave_nothing_stuck() -> None:
    async with aioaccel.pool(sim(0.001, "a"), sim(0.003, "b"), maxsize=8) as pool:
        calls = [asyncio.create_task(pool.infer(i)) for i in range(120)]
        await asyncio.wait([calls[1]])  # by now early items are on the members, later wait
        for task in calls[3::3]:
            task.cancel()
        calls[0].cancel()  # done already: its result stands
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        cancelled = 0
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, asyncio.CancelledError):
                assert i % 3 == 0 and i
                cancelled += 1
            else:
                assert outcome == i
        assert cancelled >= 30
        assert await pool.infer(-1) == -1   # still serving
        stats = pool.stats()
        assert stats.in_flight == 0 and stats.waiting == 0
        assert stats.withdrawn + stats.completed == stats.pushed  # discarded ones completed
        assert stats.discarded > 0   # some were cancelled while on a member
        assert all(m.in_flight == 0 for m in pool.member_stats())


async def test_memory_stays_bounded_with_a_slow_consumer() -> None:
    members = [sim(0.0005, "a"), sim(0.001, "b")]
    async with aioaccel.pool(*members, maxsize=5) as pool:
        pushed = 0
        while True:
            try:
                pool.push_nowait(pushed)
            except aioaccel.WouldBlock:
                break
            pushed += 1
        assert pushed == 5
        results = []
        for i in range(40):
            results.append((await anext(pool)).outputs)
            await pool.push(5 + i)
        pool.close()
        results += [r.outputs async for r in pool]
        assert results == list(range(45))
        assert pool.stats().peak_admitted == 5
        assert all(m.stats().peak_admitted <= m.maxsize for m in pool.members)


# ---- failover and retries -----------------------------------------------------------------
async def test_failover_first_member_breaks_at_item_100_of_300() -> None:
    first = labelled("first", 0.0005, fatal_at=100)
    seen: list[int] = []   # inputs in the order the second member ran them
    second = SimulatedStage(lambda x: seen.append(x) or ("second", x), latency=0.0005)
    pool = aioaccel.pool(aioaccel.open(first, name="first"),
                         aioaccel.open(second, name="second"), policy="failover")
    async with pool:
        results = await stream_all(pool, list(range(300)))
    assert [r.tag for r in results] == list(range(300))   # exactly once each, in order
    assert all(r.ok for r in results)
    assert [r.outputs[1] for r in results] == list(range(300))
    served = [r.outputs[0] for r in results]
    # everything went to the first member until it broke, then everything to the second
    assert served == ["first"] * 100 + ["second"] * 200
    a, b = pool.member_stats()
    assert a.state in ("broken", "closed") and a.completed == 100 and a.retried >= 1
    assert b.completed == 200
    assert second.calls == 200    # nothing ran twice on the member that took over
    # what the first member held when it broke (the oldest items) ran first, not after the
    # newer items waiting in the pool: the gap in the results stays one item time short
    assert seen == list(range(100, 300))


async def test_failover_with_devices_that_complete_out_of_order() -> None:
    def device(name: str, **faults: Any) -> aioaccel.Runner:
        stage = SimulatedDevice(lambda x: (name, x), latency=0.001, capacity=4, seed=3,
                                name=name, **faults)
        return aioaccel.open(stage, name=name)

    async with aioaccel.pool(device("first", fatal_at=100), device("second"),
                             policy="failover") as pool:
        results = await stream_all(pool, list(range(300)))
    assert [r.tag for r in results] == list(range(300))
    assert [r.outputs[1] for r in results] == list(range(300))
    served = [r.outputs[0] for r in results]
    switch = served.index("second")
    # a prefix from the first (what it finished, in order, before it broke), the rest from
    # the second, including what the first held unfinished
    assert 90 <= switch <= 100 and served == ["first"] * switch + ["second"] * (300 - switch)


async def test_failover_follows_member_health_and_returns_to_the_first() -> None:
    first, second = aioaccel.open(labelled("first"), name="first"), aioaccel.open(
        labelled("second"), name="second")
    state = {"value": "ready"}
    own = first.health
    first.health = lambda: dataclasses.replace(  # type: ignore[method-assign]
        own(), state=state["value"])
    async with aioaccel.pool(first, second, policy="failover") as pool:
        assert (await pool.infer(1))[0] == "first"
        state["value"] = "recovering"
        assert [(await pool.infer(n))[0] for n in range(5)] == ["second"] * 5
        state["value"] = "ready"
        assert [(await pool.infer(n))[0] for n in range(5)] == ["first"] * 5
        assert [s.state for s in pool.member_stats()] == ["ready", "ready"]


async def test_failover_returns_to_the_first_after_it_recovers() -> None:
    restart = aioaccel.Restart(limit=3, window=60.0, backoff=0.05)
    first = aioaccel.open(labelled("first", 0.001, fatal_at=100), name="first", restart=restart)
    second = aioaccel.open(labelled("second", 0.001), name="second")
    async with aioaccel.pool(first, second, policy="failover") as pool:
        results = await stream_all(pool, list(range(300)))
    assert [r.tag for r in results] == list(range(300))
    assert [r.outputs[1] for r in results] == list(range(300))
    served = [r.outputs[0] for r in results]
    assert served[:100] == ["first"] * 100
    assert "second" in served[100:]                      # taken over while it recovered
    back = served.index("second", 100)
    assert "first" in served[back:]                      # and traffic came back to it
    assert served[-1] == "first"


async def test_balance_re_runs_what_a_broken_member_held() -> None:
    flaky = SimulatedStage(lambda x: x + 1000, latency=0.001, fatal_at=50, name="flaky")
    steady = SimulatedStage(lambda x: x + 1000, latency=0.001, name="steady")
    async with aioaccel.pool(aioaccel.open(flaky, name="flaky"),
                             aioaccel.open(steady, name="steady")) as pool:
        results = await stream_all(pool, list(range(200)))
        stats = pool.stats()
        a, b = pool.member_stats()
    assert [r.tag for r in results] == list(range(200))
    assert [r.outputs for r in results] == [i + 1000 for i in range(200)]
    assert a.state in ("broken", "closed") and a.completed == 50 and a.retried >= 1
    assert a.completed + b.completed == 200
    assert stats.completed == 200 and stats.failed == 0


async def test_a_hung_member_is_timed_out_and_its_item_re_run_elsewhere() -> None:
    hung = SimulatedStage(latency=0.001, hang_at=5, name="hung")
    member = aioaccel.open(hung, name="hung", call_timeout=0.2)
    try:
        async with aioaccel.pool(member, sim(0.001, "steady")) as pool:
            results = await stream_all(pool, list(range(60)))
            hung.release()  # let its abandoned thread end (the pool no longer waits for it)
            a, _ = pool.member_stats()
    finally:
        hung.release()
    assert [r.outputs for r in results] == list(range(60))
    assert a.state in ("broken", "closed") and a.retried >= 1


async def test_with_retries_0_the_items_held_fail_and_later_ones_flow() -> None:
    flaky = SimulatedStage(latency=0.001, fatal_at=20, name="flaky")
    async with aioaccel.pool(aioaccel.open(flaky, name="flaky"), sim(0.001, "steady"),
                             retries=0) as pool:
        results = await stream_all(pool, list(range(100)))
        held = pool.member_stats()[0].retried
    failed = [r for r in results if not r.ok]
    assert held == 0 and failed, "the broken member held items"
    for r in failed:
        assert isinstance(r.error, aioaccel.InferenceError)
        assert isinstance(r.error.__cause__, MemberLost)
        assert "flaky" in str(r.error.__cause__)
    assert [r.outputs for r in results if r.ok] == [r.tag for r in results if r.ok]
    assert len(results) == 100 and results[-1].ok


async def test_every_member_broken_breaks_the_pool() -> None:
    members = [sim(0.0005, "a", fatal_at=3), sim(0.0005, "b", fatal_at=3)]
    async with aioaccel.pool(*members) as pool:
        async def produce() -> None:
            for i in range(50):
                await pool.push(i)

        producer = asyncio.create_task(produce())
        with pytest.raises(aioaccel.DeviceError, match="every member of pool"):
            async for _ in pool:
                pass
        with pytest.raises(aioaccel.DeviceError, match="every member of pool"):
            await producer  # it was waiting for room: it gets the error too
        with pytest.raises(aioaccel.DeviceError):
            await pool.push(1)


async def test_a_per_item_failure_stays_with_its_item() -> None:
    bad = SimulatedStage(fail_if=lambda x: x == 7, name="picky")
    async with aioaccel.pool(aioaccel.open(bad, name="picky")) as pool:
        results = await stream_all(pool, list(range(12)))
    assert [r.ok for r in results] == [i != 7 for i in range(12)]
    assert "simulated failure" in str(results[7].error.__cause__)  # type: ignore[union-attr]
    assert pool.member_stats()[0].state == "closed"


# ---- spec agreement and arguments ---------------------------------------------------------
async def test_members_with_different_input_specs_fail_at_open(tmp_path: Path) -> None:
    narrow = dense_chain(16, 2, inputs=8).write_onnx(tmp_path / "narrow.onnx")
    wide = dense_chain(16, 2, inputs=12).write_onnx(tmp_path / "wide.onnx")
    a = aioaccel.open(narrow, name="narrow", num_threads=1)
    b = aioaccel.open(wide, name="wide", num_threads=1)
    with pytest.raises(ValueError, match=r"member 0 \('narrow'\) and member 1 \('wide'\).*"
                                         r"'input' has shape \(1, 8\) vs \(1, 12\)"):
        async with aioaccel.pool(a, b):
            pass
    assert a.closed and b.closed   # what it opened, it closed


def spec_holder(name: str, inputs: Any, outputs: Any = None) -> Any:
    return SimpleNamespace(name=name, inputs=inputs, outputs=outputs)


def test_agreed_specs_merge_dynamic_dims_and_name_differences() -> None:
    from aioaccel import TensorSpec as T

    dyn = spec_holder("ov", [T("x", "float32", (None, 4)), T("y", "int64", None)])
    fixed = spec_holder("tfl", [T("y", "int64", (2,)), T("x", "float32", (1, 4))])
    plain = spec_holder("fn", None)
    merged = agreed_specs([plain, dyn, fixed], "inputs")
    assert merged == [T("x", "float32", (1, 4)), T("y", "int64", (2,))]
    assert agreed_specs([plain], "inputs") is None
    with pytest.raises(ValueError, match=r"member 1 \('ov'\) and member 2 \('bad'\): 'x' has "
                                         r"dtype float32 vs float16"):
        agreed_specs([plain, dyn, spec_holder("bad", [T("x", "float16", (1, 4)),
                                                      T("y", "int64", (2,))])], "inputs")
    with pytest.raises(ValueError, match=r"disagree on outputs.*names \['a'\] vs \['b'\]"):
        agreed_specs([spec_holder("p", None, [T("a", "float32", (1,))]),
                      spec_holder("q", None, [T("b", "float32", (1,))])], "outputs")
    with pytest.raises(ValueError, match=r"'x' has shape \(\?, 4\) vs \(1, 4, 1\)"):
        agreed_specs([dyn, spec_holder("r", [T("x", "float32", (1, 4, 1)),
                                             T("y", "int64", None)])], "inputs")


def test_bad_pool_arguments_are_clear() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        aioaccel.pool()
    with pytest.raises(TypeError, match="member 1 must be a runner made with aioaccel.open"):
        aioaccel.pool(aioaccel.open(abs), abs)  # type: ignore[arg-type]
    same = aioaccel.open(abs, name="same")
    with pytest.raises(ValueError, match="members 0 and 1 are the same runner"):
        aioaccel.pool(same, same)
    with pytest.raises(ValueError, match=r"policy must be one of \['balance', 'failover'\], "
                                         r"got 'fastest'"):
        aioaccel.pool(aioaccel.open(abs), policy="fastest")
    with pytest.raises(ValueError, match="retries must be an int >= 0"):
        aioaccel.pool(aioaccel.open(abs), retries=-1)
    with pytest.raises(ValueError, match="maxsize must be a positive int"):
        aioaccel.pool(aioaccel.open(abs), maxsize=0)
    assert aioaccel.pool(aioaccel.open(abs, maxsize=3), aioaccel.open(abs, maxsize=5)).maxsize == 16


async def test_a_member_that_fails_to_open_is_named_and_the_others_closed(
        tmp_path: Path) -> None:
    good = sim(0.0, "good")
    missing = aioaccel.open(tmp_path / "missing.onnx", name="ghost")
    with pytest.raises(FileNotFoundError, match=r"member 1 \('ghost'\) failed to open"):
        await aioaccel.pool(good, missing, name="p")
    assert good.closed


async def test_a_cancelled_open_closes_the_members_it_opened() -> None:
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_to_start() -> Any:  # runs on the member's worker thread while it opens
        loop.call_soon_threadsafe(started.set)
        time.sleep(0.2)
        return abs

    slow = aioaccel.open(aioaccel.StageSpec("slow", slow_to_start), name="slow")
    quick = sim(0.0, "quick")
    pool = aioaccel.pool(quick, slow)
    opening = asyncio.create_task(pool.__aenter__())
    await started.wait()
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    assert quick.closed and slow.closed   # and no thread is left (the fixture checks)


async def test_opening_a_pool_twice_is_refused_and_harmless() -> None:
    async with aioaccel.pool(sim(0.0, "a")) as pool:
        with pytest.raises(RuntimeError, match="already opened"):
            await pool
        assert await pool.infer(3) == 3 and not pool.members[0].closed


async def test_an_opened_member_is_refused() -> None:
    async with sim(0.0, "early") as early:
        with pytest.raises(RuntimeError, match=r"member 0 \('early'\) failed to open.*already"):
            await aioaccel.pool(early)


async def test_bad_input_is_refused_before_admission(tmp_path: Path) -> None:
    chain = dense_chain(8, 2)
    model = chain.write_onnx(tmp_path / "m.onnx")
    async with aioaccel.pool(aioaccel.open(model, num_threads=1)) as pool:
        assert pool.inputs is not None and pool.inputs[0].shape == (1, 8)
        with pytest.raises(aioaccel.InputError, match="input 'input': expected shape"):
            await pool.push(np.zeros((1, 9), np.float32))
        with pytest.raises(aioaccel.InputError, match="expected dtype float32"):
            await pool.infer(np.zeros((1, 8), np.float64))
        assert pool.stats().pushed == 0


# ---- real runtimes ------------------------------------------------------------------------
async def test_onnx_openvino_and_litert_members_agree_with_each_alone(tmp_path: Path) -> None:
    chain = dense_chain(64, 3)
    files = {"onnx": chain.write_onnx(tmp_path / "m.onnx"),
             "openvino": chain.write_openvino(tmp_path / "m.xml"),
             "litert": chain.write_tflite(tmp_path / "m.tflite")}
    options: dict[str, dict[str, Any]] = {"onnx": {"num_threads": 1}, "openvino": {},
                                          "litert": {"num_threads": 1}}

    def member(backend: str) -> aioaccel.Runner:
        return aioaccel.open(files[backend], name=backend, maxsize=4, **options[backend])

    xs = [chain.random_input(seed) for seed in range(48)]
    alone = {}
    for backend in files:
        async with member(backend) as runner:
            alone[backend] = [r.outputs["output"] for r in await stream_all(runner, xs)]
    async with aioaccel.pool(*(member(b) for b in files)) as pool:
        assert [s.name for s in pool.inputs or ()] == ["input"]
        assert [s.name for s in pool.outputs or ()] == ["output"]
        results = await stream_all(pool, xs)
        used = [s.completed for s in pool.member_stats()]
    assert [r.tag for r in results] == list(range(48))
    assert sum(used) == 48 and sum(n > 0 for n in used) >= 2, used
    for i, (r, x) in enumerate(zip(results, xs, strict=True)):
        assert close(r.outputs["output"], chain.reference(x))
        for backend in files:
            assert close(r.outputs["output"], alone[backend][i]), backend


# ---- stats --------------------------------------------------------------------------------
async def test_stats_per_member_and_for_the_pool() -> None:
    pool = aioaccel.pool(sim(0.001, "a"), sim(0.002, "b"), name="duo")
    assert isinstance(pool, Pool) and isinstance(pool, aioaccel.Runner)
    async with pool:
        await stream_all(pool, list(range(60)))
        stats = pool.stats()
        members = pool.member_stats()
        assert [m.name for m in pool.members] == ["a", "b"]
    assert stats.name == "duo" and stats.completed == 60
    assert [s.name for s in stats.stages] == ["pool"]
    assert stats.profile is not None and stats.profile["policy"] == "balance"
    assert [m["name"] for m in stats.profile["members"]] == ["a", "b"]
    assert sum(m.routed for m in members) == 60
    for m in members:
        assert m.completed == m.routed > 0 and m.in_flight == 0
        assert 0.0 < m.busy <= 1.0
        assert m.latency_p99 >= m.latency_p50 > 0
        assert m.capacity == 8


# ---- the policies on their own ------------------------------------------------------------
def view(index: int, depth: int, service: float | None, state: str = "ready",
         capacity: int = 8, latencies: list[float | None] | None = None) -> MemberView:
    return MemberView(index, state, depth, capacity, service,
                      latencies if latencies is not None else [None] * capacity)


def test_balance_places_each_item_where_it_finishes_soonest() -> None:
    balance = Balance()
    one_at_a_time_fast = view(0, 0, 0.001, latencies=[0.001 * (d + 1) for d in range(8)])
    one_at_a_time_slow = view(1, 0, 0.003, latencies=[0.003 * (d + 1) for d in range(8)])
    # 1 ms vs 3 ms devices, 8 items waiting: each where it is done soonest (ties to the
    # earlier member): fast 1, 2, 3 ms, slow 3 ms, fast 4, 5, 6 ms, slow 6 ms
    assert balance.plan([one_at_a_time_fast, one_at_a_time_slow], 8) == [0, 0, 0, 1, 0, 0, 0, 1]
    # a full member can still be the soonest: the item waits for it (None), the next ones
    # are placed behind it
    full_fast = view(0, 8, 0.001, latencies=[0.001 * (d + 1) for d in range(8)])
    assert balance.plan([full_fast, view(1, 0, 0.02, latencies=[0.02] + [None] * 7)], 3) == [
        None, None, None]
    # fast full: 9, 10 ms away; slow: 3, 6, 9 (a tie: to the one with room), 12 ms
    assert balance.plan([full_fast, one_at_a_time_slow], 5) == [1, 1, 1, None, None]
    # a device running four at once is as quick at depth 3 as at depth 0
    parallel_slow = view(1, 0, 0.00075, latencies=[0.003] * 4 + [0.006] * 4)
    assert balance.plan([full_fast, parallel_slow], 6).count(1) >= 3
    # unknown speed: try it
    assert balance.plan([view(0, 0, 0.001), view(1, 0, None)], 1) == [1]
    assert balance.plan([view(0, 0, 0.001, "recovering"), view(1, 3, 0.003)], 1) == [1]
    assert balance.plan([view(0, 0, None, "recovering"), view(1, 0, None, "broken")], 3) == []
    with pytest.raises(NoMember):
        balance.plan([view(0, 0, None, "broken"), view(1, 0, None, "closed")], 1)


def test_estimates_per_depth_and_past_capacity() -> None:
    m = view(0, 2, 0.0005, capacity=4, latencies=[0.002, None, None, 0.004])
    assert m.finish_estimate() == 0.002           # depth 2 unseen: as at depth 0 (try it)
    assert m.finish_estimate(3) == 0.004
    assert m.finish_estimate(5) == pytest.approx(0.004 + 2 * 0.0005)  # waits for 2 slots
    assert view(0, 3, 0.001).finish_estimate() == pytest.approx(0.004)  # nothing per depth yet


def test_tabulated_estimates_match_finish_estimate() -> None:
    for latencies in ([None, None, None], [0.004, None, 0.002], [None, 0.003, None],
                      [0.001, 0.002, 0.003]):
        for service in (None, 0.0005):
            m = view(0, 0, service, capacity=3, latencies=list(latencies))
            assert m.estimates() == [m.finish_estimate(d) for d in range(3)]


def test_failover_plans_everything_for_the_first_ready_member() -> None:
    failover = Failover()
    assert failover.plan([view(0, 8, 0.01), view(1, 0, 0.001)], 3) == []  # full: wait for it
    assert failover.plan([view(0, 6, 0.01), view(1, 0, 0.001)], 3) == [0, 0]
    assert failover.plan([view(0, 0, 0.01, "recovering"), view(1, 0, 0.001)], 2) == [1, 1]
    assert failover.plan([view(0, 0, 0.01, "broken"), view(1, 0, 0.001, "starting"),
                          view(2, 0, 0.001)], 1) == [2]
    assert failover.plan([view(0, 0, 0.01), view(1, 0, 0.001)], 1) == [0]
    with pytest.raises(NoMember):
        failover.plan([view(0, 0, None, "closed")], 1)
    assert make_policy("failover").name == "failover"


def test_service_clock_measures_time_per_item_while_busy_and_latency_per_depth() -> None:
    clock = ServiceClock(capacity=2)
    clock.started(10.0, 0)
    clock.started(10.0, 1)
    clock.finished(10.004, handed_at=10.0, depth=0)   # 4 ms for the first item
    assert clock.value == pytest.approx(0.004)
    clock.finished(10.006, handed_at=10.0, depth=1)   # the second came 2 ms later
    assert clock.value == pytest.approx(0.004 + 0.2 * (0.002 - 0.004))
    assert clock.latencies == [pytest.approx(0.004), pytest.approx(0.006)]
    clock.started(20.0, 0)           # idle time in between does not count
    clock.finished(20.003, handed_at=20.0, depth=0)
    assert clock.value < 0.004
    assert clock.latencies[0] == pytest.approx(0.004 + 0.2 * (0.003 - 0.004))
