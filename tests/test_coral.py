"""Coral: the simulated pycoral follows the vendor contract; the adapter runs on top of it."""

from __future__ import annotations

import asyncio
import gc
import importlib
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import support

import aioaccel
from aioaccel.testing.coral import simulate_coral
from aioaccel.testing.models import Chain, dense_chain

pytestmark = pytest.mark.anyio


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return support.close(a, b, atol=1e-5)


@pytest.fixture
def chain() -> Chain:
    return dense_chain(16, 4, inputs=8)


def make_pipeline(sim: Any, paths: list[Path]) -> Any:
    from pycoral.pipeline.pipelined_model_runner import PipelinedModelRunner
    from pycoral.utils.edgetpu import make_interpreter

    interpreters = [make_interpreter(str(p), device=f":{i}") for i, p in enumerate(paths)]
    for interpreter in interpreters:
        interpreter.allocate_tensors()
    return PipelinedModelRunner(interpreters)


def shut(runner: Any, dicts: bool = True) -> None:
    """End a simulated pipeline the way a careful user does, so that __del__ is quiet."""
    runner.push({} if dicts else [])
    while runner.pop():
        pass
    runner._runner = None


class Unraisable:
    """Collects exceptions raised where Python cannot propagate them (``__del__``)."""

    def __init__(self) -> None:
        self.seen: list[BaseException | None] = []

    def __enter__(self) -> Unraisable:
        self._previous = sys.unraisablehook
        sys.unraisablehook = lambda args: self.seen.append(args.exc_value)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.collect()
        sys.unraisablehook = self._previous


# ---- the simulator follows pycoral's contract -------------------------------------------
def test_push_pop_in_fifo_order_with_real_outputs(tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=2) as sim:
        runner = make_pipeline(sim, chain.write_tflite_segments(tmp_path, 2))
        xs = [chain.random_input(seed=i) for i in range(6)]
        for x in xs:
            assert runner.push({chain.input_name: x}) is None  # 2.0: returns nothing
        for x in xs:
            out = runner.pop()
            assert set(out) == {chain.output_name}
            assert close(out[chain.output_name], chain.reference(x))
        assert len(runner.interpreters()) == 2
        runner.push({})
        assert runner.pop() is None
        assert runner.pop() is None  # the end stays the end
        with pytest.raises(RuntimeError, match="turned off"):
            runner.push({chain.input_name: xs[0]})
        runner._runner = None


def test_version_1_api_takes_and_returns_lists(tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=2, version="1.0.0") as sim:
        runner = make_pipeline(sim, chain.write_tflite_segments(tmp_path, 2))
        x = chain.random_input()
        assert runner.push([x]) is True
        out = runner.pop()
        assert isinstance(out, list) and close(out[0], chain.reference(x))
        assert runner.push([]) is True
        assert runner.pop() is None
        assert runner.push([x]) is False  # after the end: refused, no exception
        with Unraisable() as unraisable:
            del runner  # 1.0's __del__ pushes [] again: False, quietly
        assert unraisable.seen == []


def test_pycoral_2_destructor_pushes_a_second_empty_request_and_raises(
        tmp_path: Path, chain: Chain) -> None:
    # The known pycoral 2.0.0 failure the adapter must avoid (fixed upstream in pycoral#80).
    with simulate_coral(tpus=1) as sim:
        runner = make_pipeline(sim, [chain.write_tflite(tmp_path / "m.tflite")])
        runner.push({})
        assert runner.pop() is None
        with Unraisable() as unraisable:
            del runner
        assert len(unraisable.seen) == 1 and "turned off" in str(unraisable.seen[0])


def test_input_queue_size_blocks_push_and_default_is_unbounded(
        tmp_path: Path, chain: Chain) -> None:
    x = {chain.input_name: chain.random_input()}
    with simulate_coral(tpus=1, hang_at=[0]) as sim:
        runner = make_pipeline(sim, [chain.write_tflite(tmp_path / "m.tflite")])
        for _ in range(50):  # unbounded by default: never blocks, even with a stuck TPU
            runner.push(x)
        assert sim.hanging.wait(5)
        assert runner.engine.peak_inputs >= 49
        sim.release()
        for _ in range(50):
            runner.pop()
        shut(runner)

    with simulate_coral(tpus=1, hang_at=[0]) as sim:
        runner = make_pipeline(sim, [chain.write_tflite(tmp_path / "m.tflite")])
        runner.set_input_queue_size(2)
        runner.push(x)                      # taken by the (stuck) segment
        assert sim.hanging.wait(5)
        runner.push(x)
        runner.push(x)                      # the queue now holds 2
        third = threading.Thread(target=runner.push, args=(x,), name="aioaccel-test-push")
        third.start()
        third.join(0.2)
        assert third.is_alive(), "push did not block on a full input queue"
        sim.release()
        third.join(5)
        assert not third.is_alive()
        for _ in range(4):
            runner.pop()
        assert runner.engine.peak_inputs == 2
        shut(runner)


def test_output_queue_size_bounds_unconsumed_results(tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=2) as sim:
        runner = make_pipeline(sim, chain.write_tflite_segments(tmp_path, 2))
        runner.set_output_queue_size(3)
        for i in range(10):
            runner.push({chain.input_name: chain.random_input(seed=i)})
        results = [runner.pop() for _ in range(10)]
        assert len(results) == 10
        assert runner.engine.peak_outputs <= 3
        shut(runner)


def test_push_checks_count_and_dtype_like_pycoral(tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=1) as sim:
        runner = make_pipeline(sim, [chain.write_tflite(tmp_path / "m.tflite")])
        with pytest.raises(ValueError, match="of type"):
            runner.push({chain.input_name: chain.random_input().astype(np.float64)})
        with pytest.raises(ValueError, match="Expected input of length 1"):
            runner.push({chain.input_name: chain.random_input(), "extra": chain.random_input()})
        shut(runner)


def test_constructor_checks_that_segments_get_their_inputs(tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=2) as sim:
        seg0, seg1 = chain.write_tflite_segments(tmp_path, 2)
        with pytest.raises(ValueError, match="Interpreter 1 can not get its input tensors"):
            make_pipeline(sim, [seg1, seg0])
        with pytest.raises(ValueError, match="At least one interpreter"):
            make_pipeline(sim, [])


def test_a_failed_segment_stops_the_pipeline_like_libcoral(tmp_path: Path,
                                                          chain: Chain) -> None:
    # libcoral: the failed SegmentRunner records its status and stops; Pop checks the status
    # after taking a result (raises), later Pops find the stopped, empty queue (None); Push
    # checks it first (raises).
    with simulate_coral(tpus=1, fail_at=[0]) as sim:
        runner = make_pipeline(sim, [chain.write_tflite(tmp_path / "m.tflite")])
        runner.push({chain.input_name: chain.random_input()})
        engine = runner.engine
        with engine.cond:
            assert engine.cond.wait_for(lambda: engine.status[0] is not None, timeout=5)
        with pytest.raises(RuntimeError, match="Segment 0 runner error: simulated Edge TPU "
                                               "failure on request 0"):
            runner.pop()
        assert runner.pop() is None
        with pytest.raises(RuntimeError, match="Segment 0 runner error"):
            runner.push({chain.input_name: chain.random_input()})
        runner._runner = None
        for t in runner.engine.threads:
            t.join(5)
            assert not t.is_alive()


def test_a_failure_downstream_of_queued_results_loses_them_as_libcoral_does(
        tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=2, hang_at=[2], fail_at=[2]) as sim:
        runner = make_pipeline(sim, chain.write_tflite_segments(tmp_path, 2))
        for i in range(3):
            runner.push({chain.input_name: chain.random_input(seed=i)})
        assert runner.pop() is not None  # popped before the failure: delivered
        assert sim.hanging.wait(5)
        engine = runner.engine
        with engine.cond:  # result 1 reached the output queue; request 2 hangs in segment 0
            assert engine.cond.wait_for(lambda: len(engine.outputs) == 1, timeout=5)
        sim.release()
        for t in engine.threads:
            t.join(5)
        # the output queue holds result 1 and the empty map the failed segments passed on:
        # Pop takes each and then checks the status, so both raise; then the stopped, empty
        # queue gives None
        for _ in range(2):
            with pytest.raises(RuntimeError, match="Segment 0 runner error"):
                runner.pop()
        assert runner.pop() is None
        runner._runner = None


@pytest.mark.parametrize("segments,input_size,output_size", [(1, 1, 1), (2, 2, 1), (3, 2, 3)])
def test_push_blocks_once_input_queue_segments_links_and_output_queue_are_full(
        tmp_path: Path, segments: int, input_size: int, output_size: int) -> None:
    chain = dense_chain(16, 4, inputs=8)
    # libcoral: queues between segments hold kInternalQueueSize = 1; each segment holds the
    # request it is handing on; nobody pops.
    capacity = input_size + segments + (segments - 1) + output_size
    x = {chain.input_name: chain.random_input()}
    with simulate_coral(tpus=3) as sim:
        runner = make_pipeline(sim, chain.write_tflite_segments(tmp_path, segments))
        runner.set_input_queue_size(input_size)
        runner.set_output_queue_size(output_size)
        engine = runner.engine
        for _ in range(capacity):
            runner.push(x)  # each returns: there is room somewhere downstream
        with engine.cond:
            assert engine.cond.wait_for(lambda: sum(len(q.items) for q in engine.queues)
                                        + sum(engine.busy) == capacity, timeout=5)
        blocked = threading.Thread(target=runner.push, args=(x,), name="aioaccel-test-push")
        blocked.start()
        with engine.cond:
            assert engine.cond.wait_for(lambda: engine.waiting_pushes == 1, timeout=5)
        blocked.join(0.1)
        assert blocked.is_alive(), f"push {capacity + 1} did not block"
        assert [len(q.items) for q in engine.links] == [1] * (segments - 1)
        assert len(engine.outputs) == output_size and len(engine.inputs) == input_size
        assert runner.pop() is not None  # one result out: every queue moves up, push returns
        blocked.join(5)
        assert not blocked.is_alive()
        for _ in range(capacity):
            assert runner.pop() is not None
        shut(runner)


def test_links_between_segments_never_hold_more_than_one(tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=3, latency=0.001) as sim:
        runner = make_pipeline(sim, chain.write_tflite_segments(tmp_path, 3))
        for i in range(20):
            runner.push({chain.input_name: chain.random_input(seed=i)})
        outs = [runner.pop() for _ in range(20)]
        assert all(o is not None for o in outs)
        assert [q.peak for q in runner.engine.links] == [1, 1]
        assert runner.engine.peak_inputs > 1  # the input queue is unbounded by default
        shut(runner)


def test_an_output_no_later_segment_consumes_is_refused_where_libcoral_aborts(
        tmp_path: Path, chain: Chain) -> None:
    from aioaccel.testing.coral import SimulatedAbort

    seg0, _ = chain.write_tflite_segments(tmp_path, 2)
    with simulate_coral(tpus=2) as sim:
        # pycoral's own check passes (segment 1 takes the model input), libcoral's CHECK fails
        with pytest.raises(SimulatedAbort, match="Output tensor act2 must be consumed by "
                                                 "subsequent segment"):
            make_pipeline(sim, [seg0, seg0])
        assert sim.engines == []


def test_push_in_another_order_than_the_first_segment_is_an_abort_in_libcoral(
        tmp_path: Path) -> None:
    from aioaccel.testing.coral import SimulatedAbort
    from aioaccel.testing.models import two_input_model

    path = two_input_model(tmp_path / "two.tflite")
    with simulate_coral(tpus=1) as sim:
        runner = make_pipeline(sim, [path])
        a = np.ones((1, 4), np.float32)
        with pytest.raises(SimulatedAbort, match="order"):
            runner.push({"b": a, "a": a})
        with pytest.raises(KeyError):  # pycoral looks each name up
            runner.push({"a": a, "c": a})
        runner.push({"a": a, "b": a * 2})
        assert close(runner.pop()["sum"], a * 3)
        shut(runner)


def test_make_interpreter_and_list_edge_tpus(tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=["usb", "pci", "pci"]):
        from pycoral.utils.edgetpu import list_edge_tpus, make_interpreter

        assert [t["type"] for t in list_edge_tpus()] == ["usb", "pci", "pci"]
        path = str(chain.write_tflite(tmp_path / "m.tflite"))
        for device in (None, ":2", "usb", "usb:0", "pci:1"):
            make_interpreter(path, device=device).allocate_tensors()
        for device in (":3", "usb:1", "pci:2", "tpu"):
            with pytest.raises(ValueError, match="Failed to load delegate"):
                make_interpreter(path, device=device)
    assert "pycoral" not in sys.modules  # the simulation is gone after the block


# ---- the adapter --------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["2.0.0", "1.0.0"])
@pytest.mark.parametrize("segments", [1, 2, 3])
async def test_segments_on_the_pipelined_model_runner_match_the_reference(
        tmp_path: Path, chain: Chain, segments: int, version: str) -> None:
    with simulate_coral(tpus=3, version=version, latency=0.001) as sim:
        paths = chain.write_tflite_segments(tmp_path, segments)
        xs = [chain.random_input(seed=i) for i in range(40)]
        with Unraisable() as unraisable:
            async with aioaccel.open(paths, backend="coral", maxsize=5) as runner:
                results = await support.stream_all(runner, xs, tag=lambda i: f"frame-{i}")
            engine = sim.engines[0]
        assert unraisable.seen == [], "pycoral's __del__ pushed a second empty request"
        assert engine.empty_pushes == 1
    assert [r.tag for r in results] == [f"frame-{i}" for i in range(40)]
    for r, x in zip(results, xs):
        assert close(r.outputs[chain.output_name], chain.reference(x))
    assert [tpu for _, tpu in sim.interpreters] == [t["path"] for t in sim.tpus[:segments]]
    # backpressure reaches pycoral's queues: bounded by maxsize, never its unbounded default
    assert engine.input_max == engine.output_max == 5
    assert engine.peak_inputs <= 5 and engine.peak_outputs <= 5
    assert engine.turned_off


async def test_infer_from_many_callers_pairs_each_result(tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=2, latency=0.001):
        paths = chain.write_tflite_segments(tmp_path, 2)
        async with aioaccel.open(paths, backend="coral", maxsize=4) as runner:
            xs = [chain.random_input(seed=i) for i in range(30)]
            outs = await asyncio.gather(*(runner.infer({"input": x}) for x in xs))
    for out, x in zip(outs, xs):
        assert close(out[chain.output_name], chain.reference(x))


async def test_close_with_items_in_flight_drains_them_and_ends_the_stream_once(
        tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=2, latency=0.005) as sim:
        paths = chain.write_tflite_segments(tmp_path, 2)
        with Unraisable() as unraisable:
            runner = await aioaccel.open(paths, backend="coral", maxsize=6)
            for i in range(6):
                await runner.push(chain.random_input(seed=i), tag=i)
            await runner.aclose()  # nothing consumed yet: all 6 finish inside pycoral
            engine = sim.engines[0]
        assert unraisable.seen == []
        assert engine.turned_off and engine.empty_pushes == 1
        assert runner.stats().completed == 6 and runner.stats().failed == 0
        for t in engine.threads:
            assert not t.is_alive()


async def test_the_adapter_refuses_a_chain_libcoral_would_abort_on_before_building_it(
        tmp_path: Path, chain: Chain) -> None:
    seg0, _ = chain.write_tflite_segments(tmp_path, 2)
    with simulate_coral(tpus=2) as sim:
        with pytest.raises(ValueError, match="segment 0 .*outputs tensor 'act2', which no later "
                                             "segment consumes"):
            async with aioaccel.open([seg0, seg0], backend="coral"):
                pass
        assert sim.engines == []  # PipelinedModelRunner was never constructed


async def test_bad_input_fails_alone_and_names_the_tensor(tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=2):
        paths = chain.write_tflite_segments(tmp_path, 2)
        async with aioaccel.open(paths, backend="coral") as runner:
            with pytest.raises(aioaccel.InputError, match="'input'.*float32"):
                await runner.push(chain.random_input().astype(np.float64))
            with pytest.raises(aioaccel.InputError, match="shape"):
                await runner.infer(np.zeros((1, 9), np.float32))
            x = chain.random_input()
            assert close((await runner.infer(x))[chain.output_name], chain.reference(x))


async def test_a_pipeline_failure_breaks_the_runner_with_device_error(
        tmp_path: Path, chain: Chain) -> None:
    # request 3 hangs, then fails: the three results before it are popped first (libcoral
    # loses a result still queued when a segment fails, so the order is pinned here)
    with simulate_coral(tpus=2, fail_at=[3], hang_at=[3]) as sim:
        paths = chain.write_tflite_segments(tmp_path, 2)
        async with aioaccel.open(paths, backend="coral", maxsize=8) as runner:
            for i in range(6):
                await runner.push(chain.random_input(seed=i))
            got = []
            with pytest.raises(aioaccel.DeviceError, match="paired") as info:
                async for r in runner:
                    got.append(r)
                    if len(got) == 3:
                        sim.release()
            assert len(got) == 3  # the results before the failure were delivered, in order
            assert isinstance(info.value.__cause__, RuntimeError)  # pycoral's own error
            assert "request 3" in str(info.value.__cause__)
            with pytest.raises(aioaccel.DeviceError):
                await runner.push(chain.random_input())


@pytest.mark.parametrize("version", ["2.0.0", "1.0.0"])
async def test_a_pipeline_turned_off_underneath_breaks_the_runner(
        tmp_path: Path, chain: Chain, version: str) -> None:
    with simulate_coral(tpus=1, version=version) as sim:
        path = chain.write_tflite(tmp_path / "m.tflite")
        async with aioaccel.open([path], backend="coral") as runner:
            await runner.infer(chain.random_input())
            sim.engines[0].push({})  # someone else ended pycoral's stream
            # 2.0 raises RuntimeError from push; 1.0 returns False: both break the runner
            with pytest.raises(aioaccel.DeviceError, match="refused an input"):
                await runner.infer(chain.random_input())


async def test_a_pop_that_never_returns_is_caught_by_the_watchdog(
        tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=2, hang_at=[2]) as sim:
        paths = chain.write_tflite_segments(tmp_path, 2)
        async with aioaccel.open(paths, backend="coral", maxsize=4, call_timeout=0.3) as runner:
            outs = [runner.infer(chain.random_input(seed=i)) for i in range(4)]
            results = await asyncio.gather(*outs, return_exceptions=True)
            assert sim.hanging.is_set()
            assert [type(r) for r in results[:2]] == [dict, dict]
            assert all(isinstance(r, aioaccel.DeviceTimeout) for r in results[2:])
            sim.release()  # lets the stuck TPU finish, so its threads can end


async def test_data_parallel_replicas_one_interpreter_per_tpu(tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=["usb", "usb"]) as sim:
        path = chain.write_tflite(tmp_path / "m.tflite")
        async with aioaccel.open(path, backend="coral", replicas=2, device="usb",
                                 name="tpus") as runner:
            names = {t.name for t in threading.enumerate() if t.name.startswith("aioaccel-tpus")}
            xs = [chain.random_input(seed=i) for i in range(20)]
            outs = await asyncio.gather(*(runner.infer(x) for x in xs))
            stats = runner.stats()
    assert names == {"aioaccel-tpus-edgetpu-0", "aioaccel-tpus-edgetpu-1"}
    assert sorted(tpu for _, tpu in sim.interpreters) == sorted(t["path"] for t in sim.tpus)
    assert stats.stages[0].workers == 2 and stats.stages[0].calls == 20
    for out, x in zip(outs, xs):
        assert close(out[chain.output_name], chain.reference(x))


async def test_a_missing_tpu_is_named_with_what_was_found(tmp_path: Path, chain: Chain) -> None:
    with simulate_coral(tpus=1):
        paths = chain.write_tflite_segments(tmp_path, 2)
        with pytest.raises(aioaccel.DeviceError, match=r"':1'.*found: pci:/dev/apex_0"):
            async with aioaccel.open(paths, backend="coral"):
                pass
        with pytest.raises(ValueError, match="not both"):
            async with aioaccel.open(paths, backend="coral", replicas=2):
                pass
        with pytest.raises(ValueError, match="unknown Edge TPU device"):
            async with aioaccel.open(paths, backend="coral", device="gpu"):
                pass


async def test_without_pycoral_the_error_says_where_it_comes_from(tmp_path: Path,
                                                                  chain: Chain) -> None:
    if importlib.util.find_spec("pycoral") is not None:
        pytest.skip("a real pycoral is installed here")
    path = chain.write_tflite(tmp_path / "m.tflite")
    with pytest.raises(aioaccel.BackendUnavailable, match="coral.ai/software"):
        async with aioaccel.open(path, backend="coral"):
            pass


def real_edge_tpus() -> list[dict[str, str]]:
    try:
        from pycoral.utils.edgetpu import list_edge_tpus
    except ImportError:
        pytest.skip("pycoral is not installed (it comes from Coral's package repository)")
    tpus = list_edge_tpus()
    if not tpus:
        pytest.skip("pycoral is installed but no Edge TPU is connected")
    return tpus


@pytest.mark.hardware
async def test_pipeline_on_real_edge_tpus(tmp_path: Path, chain: Chain) -> None:
    tpus = real_edge_tpus()
    segments = min(2, len(tpus))
    # Uncompiled segments run on the CPU under the delegate: this exercises pycoral's real
    # PipelinedModelRunner, queues and threads; compiled segments need edgetpu_compiler.
    paths = chain.write_tflite_segments(tmp_path, segments)
    async with aioaccel.open(paths, backend="coral", maxsize=4) as runner:
        xs = [chain.random_input(seed=i) for i in range(20)]
        outs = await asyncio.gather(*(runner.infer(x) for x in xs))
    for out, x in zip(outs, xs):
        assert close(out[chain.output_name], chain.reference(x))
