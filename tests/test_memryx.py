"""MemryX: the simulated SDK follows the vendor contract; the adapters run on top of it."""

from __future__ import annotations

import asyncio
import importlib.util
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import support

import aioaccel
from aioaccel.testing.memryx import simulate_memryx, write_dfp
from aioaccel.testing.models import Chain, dense_chain

pytestmark = pytest.mark.anyio


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return support.close(a, b, atol=1e-5)


@pytest.fixture
def chain() -> Chain:
    return dense_chain(16, 3, inputs=8)


@pytest.fixture
def dfp(tmp_path: Path, chain: Chain) -> Path:
    return write_dfp(tmp_path / "model.dfp", chain)


def frames(chain: Chain, n: int) -> list[np.ndarray]:
    return [chain.random_input(seed=i) for i in range(n)]


# ---- the simulator follows the MemryX contract ------------------------------------------
def test_async_accl_pulls_inputs_and_pushes_outputs_in_order(dfp: Path, chain: Chain) -> None:
    xs = frames(chain, 12)
    with simulate_memryx():
        from memryx import AsyncAccl

        accl = AsyncAccl(str(dfp))
        source = iter(xs)
        outputs: list[np.ndarray] = []
        threads: set[str] = set()

        def data_source() -> np.ndarray | None:
            threads.add(threading.current_thread().name)
            return next(source, None)  # None ends the stream

        def output_processor(*fmaps: np.ndarray) -> None:
            threads.add(threading.current_thread().name)
            outputs.append(fmaps[0])

        accl.connect_input(data_source)
        accl.connect_output(output_processor)
        accl.wait()
    assert len(outputs) == 12
    assert all(close(y, chain.reference(x)) for y, x in zip(outputs, xs))
    assert threading.current_thread().name not in threads and len(threads) == 2
    assert accl.inport_assignment() == {0: chain.input_name}
    assert accl.outport_assignment() == {0: chain.output_name}


def test_input_callback_rules(dfp: Path, chain: Chain) -> None:
    with simulate_memryx() as sim:
        from memryx import AsyncAccl

        accl = AsyncAccl(dfp)
        with pytest.raises(RuntimeError, match="must not take any parameters"):
            accl.connect_input(lambda frame: frame)
        with pytest.raises(RuntimeError, match="left unconnected"):
            accl.wait()
        sent = iter(frames(chain, 3))
        got: list[np.ndarray] = []

        def failing_source() -> np.ndarray:
            value = next(sent, None)
            if value is None:
                raise KeyError("camera gone")  # an exception ends the input stream
            return value

        accl.connect_input(failing_source)
        accl.connect_output(lambda y: got.append(y))
        accl.wait()
    assert len(got) == 3
    assert any(isinstance(e, KeyError) for e in sim.errors)


def test_bounded_buffers_hold_back_the_input_callback(dfp: Path, chain: Chain) -> None:
    with simulate_memryx(buffer=2) as sim:
        from memryx import AsyncAccl

        accl = AsyncAccl(dfp)
        pulled = 0
        consumed = threading.Event()
        gate = threading.Event()

        def source() -> np.ndarray:
            nonlocal pulled
            pulled += 1
            return chain.random_input()

        def slow_sink(y: np.ndarray) -> None:
            consumed.set()
            gate.wait()  # the consumer is stuck: the chip must stop pulling

        accl.connect_output(slow_sink)
        accl.connect_input(source)
        try:
            assert consumed.wait(5)
            assert not gate.wait(0.2)  # let the runtime run into its bounds
            stalled = pulled
            assert not gate.wait(0.1)
            # 1 in the sink, 2 in the output buffer, 1 computing, 2 in the input buffer, and
            # 1 pulled that waits for room: then the runtime stops calling the callback
            assert pulled == stalled <= 7, (pulled, stalled)
        finally:
            gate.set()
        accl.stop()
    assert all(not t.is_alive() for t in sim.accelerators[0].threads)


def test_sync_accl_send_receive_run_and_timeouts(dfp: Path, chain: Chain) -> None:
    xs = frames(chain, 4)
    with simulate_memryx(buffer=1):
        from memryx import SyncAccl

        accl = SyncAccl(dfp)
        assert close(accl.run(xs[0]), chain.reference(xs[0]))
        outs = accl.run(xs[1:])
        assert all(close(y, chain.reference(x)) for y, x in zip(outs, xs[1:]))
        with pytest.raises(TimeoutError):
            accl.receive(timeout=20)
        with pytest.raises(TimeoutError):
            for x in xs * 3:  # nobody receives: the buffers fill, send times out
                accl.send(x, timeout=20)
        del accl


def test_multistream_calls_back_with_stream_idx(tmp_path: Path, chain: Chain) -> None:
    dfp = write_dfp(tmp_path / "m.dfp", chain)
    with simulate_memryx():
        from memryx import MultiStreamAsyncAccl

        sources = {s: iter(frames(chain, 5 + s)) for s in range(3)}
        outs: dict[int, list[np.ndarray]] = {s: [] for s in range(3)}
        accl = MultiStreamAsyncAccl(dfp)
        with pytest.raises(RuntimeError, match="stream_idx"):
            accl.connect_streams(lambda: None, lambda s, y: None, 3)
        accl.connect_streams(lambda s: next(sources[s], None),
                             lambda s, y: outs[s].append(y), 3)
        accl.wait()
    for s in range(3):
        expected = [chain.reference(x) for x in frames(chain, 5 + s)]
        assert len(outs[s]) == len(expected)
        assert all(close(a, b) for a, b in zip(outs[s], expected))


def test_fewer_stream_workers_than_streams_take_the_streams_in_turn(
        dfp: Path, chain: Chain) -> None:
    with simulate_memryx():
        from memryx import MultiStreamAsyncAccl

        calls: dict[str, list[int]] = {}
        left = dict.fromkeys(range(4), 3)

        def source(stream_idx: int) -> np.ndarray | None:
            calls.setdefault(threading.current_thread().name, []).append(stream_idx)
            if left[stream_idx] == 0:
                return None
            left[stream_idx] -= 1
            return chain.random_input(seed=stream_idx)

        outs: dict[int, int] = dict.fromkeys(range(4), 0)

        def sink(stream_idx: int, *fmaps: np.ndarray) -> None:
            outs[stream_idx] += 1

        accl = MultiStreamAsyncAccl(dfp, stream_workers=2)
        accl.connect_streams(source, sink, 4)
        accl.wait()
    assert outs == {0: 3, 1: 3, 2: 3, 3: 3}
    assert len(calls) == 2  # two workers share the four streams...
    for sequence in calls.values():  # ...each taking its own streams in turn
        mine = sorted(set(sequence))
        assert len(mine) == 2
        assert sequence[:6] == mine * 3


def test_group_and_file_errors(tmp_path: Path, dfp: Path) -> None:
    with simulate_memryx(groups=1):
        from memryx import AsyncAccl

        with pytest.raises(RuntimeError, match="chip group 1 not found"):
            AsyncAccl(dfp, group_id=1)
        bogus = tmp_path / "real.dfp"
        bogus.write_bytes(b"\x00compiled by NeuralCompiler")
        with pytest.raises(RuntimeError, match="not a DFP the MemryX simulator can run"):
            AsyncAccl(bogus)
        with pytest.raises(RuntimeError, match="model_idx 3 out of range"):
            AsyncAccl(dfp).inport_assignment(3)


# ---- the adapters -------------------------------------------------------------------------
@pytest.mark.parametrize("api", ["async", "sync"])
async def test_results_match_the_reference_in_push_order(dfp: Path, chain: Chain,
                                                         api: str) -> None:
    xs = frames(chain, 30)
    with simulate_memryx(latency=0.001) as sim:
        async with aioaccel.open(dfp, api=api, maxsize=5) as runner:
            results = await support.stream_all(runner, xs)
            stats = runner.stats()
        accel = sim.accelerators[0]
    assert [r.tag for r in results] == list(range(30))
    assert all(close(r.outputs[chain.output_name], chain.reference(x))
               for r, x in zip(results, xs))
    assert stats.peak_admitted <= 5 and stats.stages[0].kind == "device"
    assert accel.inputs[0].peak <= 2  # the chip's own buffer was never overrun
    assert accel.stopping.is_set() or api == "sync"


async def test_infer_from_many_callers(dfp: Path, chain: Chain) -> None:
    with simulate_memryx(latency=0.001):
        async with aioaccel.open(dfp, maxsize=4) as runner:
            xs = frames(chain, 40)
            outs = await asyncio.gather(*(runner.infer(x) for x in xs))
    assert all(close(o[chain.output_name], chain.reference(x)) for o, x in zip(outs, xs))


async def test_close_with_frames_in_flight_drains_then_stops(dfp: Path, chain: Chain) -> None:
    with simulate_memryx(latency=0.005) as sim:
        runner = await aioaccel.open(dfp, maxsize=6)
        for x in frames(chain, 6):
            await runner.push(x)
        await runner.aclose()
        accel = sim.accelerators[0]
        assert runner.stats().completed == 6
        assert accel.stopping.is_set()
        assert all(not t.is_alive() for t in accel.threads)
        assert sim.errors == []  # the input stream ended with None, not with an exception


async def test_several_models_of_one_dfp(tmp_path: Path) -> None:
    detector, classifier = dense_chain(16, 2, inputs=8, seed=1), dense_chain(4, 2, inputs=6,
                                                                              seed=2)
    dfp = write_dfp(tmp_path / "two.dfp", detector, classifier)
    with simulate_memryx(latency=0.001):
        async with aioaccel.open(dfp, model_idx=[0, 1], maxsize=4) as runner:
            pairs = [(detector.random_input(seed=i), classifier.random_input(seed=i))
                     for i in range(10)]
            outs = await asyncio.gather(*(runner.infer(list(p)) for p in pairs))
            with pytest.raises(aioaccel.InputError, match="one input per model"):
                await runner.infer(pairs[0][0])
    for (a, b), (out_a, out_b) in zip(pairs, outs):
        assert close(out_a["output"], detector.reference(a))
        assert close(out_b["output"], classifier.reference(b))


async def test_multistream_maps_runner_streams_onto_vendor_streams(dfp: Path,
                                                                   chain: Chain) -> None:
    with simulate_memryx(latency=0.001) as sim:
        async with aioaccel.open(dfp, streams=3, maxsize=6) as runner:
            cams = [runner.stream(f"cam{i}") for i in range(3)]
            with pytest.raises(ValueError, match="at most 3 streams"):
                runner.stream("cam3")
            xs = {i: frames(chain, 8 + i) for i in range(3)}

            async def feed(i: int) -> None:
                for n, x in enumerate(xs[i]):
                    await cams[i].push(x, tag=(i, n))
                cams[i].close()

            feeders = [asyncio.create_task(feed(i)) for i in range(3)]
            async def drain(cam: aioaccel.Stream) -> list[aioaccel.Result]:
                return [r async for r in cam]

            results = await asyncio.gather(*(drain(cam) for cam in cams))
            await asyncio.gather(*feeders)
        assert sim.accelerators[0].kind == "multistream"
    for i, got in enumerate(results):
        assert [r.tag for r in got] == [(i, n) for n in range(8 + i)]
        assert all(close(r.outputs[chain.output_name], chain.reference(x))
                   for r, x in zip(got, xs[i]))


async def test_bad_input_fails_alone(dfp: Path, chain: Chain) -> None:
    with simulate_memryx():
        async with aioaccel.open(dfp, input_shapes=[chain.input_shape]) as runner:
            with pytest.raises(aioaccel.InputError, match=r"'input'.*shape"):
                await runner.infer(np.zeros((2, 8), np.float32))
            with pytest.raises(aioaccel.InputError, match="float32"):
                await runner.infer(chain.random_input().astype(np.float64))
            x = chain.random_input()
            assert close((await runner.infer(x))[chain.output_name], chain.reference(x))
        async with aioaccel.open(dfp) as runner:  # shapes unknown: count and dtype still
            with pytest.raises(aioaccel.InputError, match="takes 1"):
                await runner.infer([chain.random_input(), chain.random_input()])
            with pytest.raises(aioaccel.InputError, match="int64"):
                await runner.infer(np.zeros(chain.input_shape, np.int64))


async def test_a_failing_callback_is_reported_and_never_reaches_the_runtime(
        dfp: Path, chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    from aioaccel.backends import memryx

    calls = {"n": 0}
    original = memryx._MemryxStage._handed

    def flaky(self: Any, lane: int, token: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("simulated failure inside the input callback")
        original(self, lane, token)

    monkeypatch.setattr(memryx._MemryxStage, "_handed", flaky)
    with simulate_memryx() as sim:
        async with aioaccel.open(dfp, maxsize=8) as runner:
            with pytest.raises(aioaccel.DeviceError, match="MemoryError"):
                await asyncio.gather(*(runner.infer(x) for x in frames(chain, 6)))
        assert sim.errors == []  # the vendor never saw an exception from a callback


async def test_a_hung_chip_is_caught_by_the_watchdog(dfp: Path, chain: Chain) -> None:
    with simulate_memryx(hang_at=[2]) as sim:
        async with aioaccel.open(dfp, maxsize=4, call_timeout=0.3) as runner:
            results = await asyncio.gather(*(runner.infer(x) for x in frames(chain, 4)),
                                           return_exceptions=True)
            assert sim.hanging.is_set()
            assert all(isinstance(r, dict) for r in results[:2])
            assert all(isinstance(r, aioaccel.DeviceTimeout) for r in results[2:])
            sim.release()


async def test_sync_receive_failure_breaks_the_runner(dfp: Path, chain: Chain) -> None:
    with simulate_memryx(fail_at=[1]):
        async with aioaccel.open(dfp, api="sync", maxsize=4) as runner:
            with pytest.raises(aioaccel.DeviceError, match="receive failed"):
                await asyncio.gather(*(runner.infer(x) for x in frames(chain, 4)))


async def test_option_errors(dfp: Path, tmp_path: Path) -> None:
    with simulate_memryx():
        for options, message in [({"api": "multistream"}, "needs streams=N"),
                                 ({"api": "batch"}, "api must be"),
                                 ({"replicas": 2}, "pipelines internally"),
                                 ({"group_id": 3}, "chip group 3"),
                                 ({"model_idx": [0], "api": "sync"}, "api='async' only")]:
            with pytest.raises((ValueError, aioaccel.DeviceError), match=message):
                async with aioaccel.open(dfp, backend="memryx", **options):
                    pass
        with pytest.raises(FileNotFoundError):
            async with aioaccel.open(tmp_path / "missing.dfp"):
                pass


async def test_without_the_sdk_the_error_says_what_to_install(dfp: Path) -> None:
    if importlib.util.find_spec("memryx") is not None:
        pytest.skip("a real MemryX SDK is installed here")
    with pytest.raises(aioaccel.BackendUnavailable, match="MemryX SDK"):
        async with aioaccel.open(dfp):
            pass


@pytest.mark.hardware
async def test_async_accl_on_a_real_mx3(tmp_path: Path) -> None:
    if importlib.util.find_spec("memryx") is None:
        pytest.skip("the MemryX SDK is not installed (it comes from developer.memryx.com)")
    model = Path(__file__).parent / "data" / "mx3_model.dfp"
    if not model.is_file():
        pytest.skip(f"no compiled DFP at {model}: compile a model with MemryX's "
                    f"NeuralCompiler to run this test on the hardware")
    async with aioaccel.open(model) as runner:
        result = await runner.infer(np.zeros((224, 224, 3), np.float32))
    assert result
