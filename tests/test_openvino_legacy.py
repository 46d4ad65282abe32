"""The legacy Inference Engine API backend, for real on the CPU.

Runs in the separate environment ``.ci/run`` builds (``openvino==2023.3.0``, ``numpy<2``);
the main environment's current OpenVINO has no ``openvino.inference_engine``, so there the
whole module is skipped with that reason.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import support
from support import close

import aioaccel
from aioaccel.testing.models import Chain, dense_chain

if importlib.util.find_spec("openvino") is None or \
        importlib.util.find_spec("openvino.inference_engine") is None:
    pytest.skip("openvino.inference_engine is not installed here (OpenVINO < 2024 with "
                "numpy<2; .ci/run builds that environment and runs this module in it)",
                allow_module_level=True)

from aioaccel.backends import openvino_legacy
from aioaccel.backends.openvino_legacy import LegacyIEStage, LegacySyncStage

pytestmark = pytest.mark.anyio




@pytest.fixture
def chain() -> Chain:
    return dense_chain(64, 4, inputs=32)


def stage_of(runner: aioaccel.Runner, index: int = 0) -> LegacyIEStage:
    return runner._model.stages[index].factory()  # type: ignore[union-attr,return-value]


async def stream_all(runner: aioaccel.Runner, xs: list[np.ndarray]) -> list[aioaccel.Result]:
    return await support.stream_all(runner, xs, tag=lambda i: f"frame-{i}")


@pytest.mark.parametrize("api", ["sync", "callback", "wait"])
@pytest.mark.parametrize("segments", [1, 2])
async def test_matches_the_reference_in_push_order(tmp_path: Path, chain: Chain, api: str,
                                                   segments: int) -> None:
    paths = [part.write_openvino(tmp_path / f"seg{i}.xml")
             for i, part in enumerate(chain.split(segments))]
    xs = [chain.random_input(seed=i) for i in range(60)]
    async with aioaccel.open(paths, backend="openvino-legacy", api=api, num_requests=3,
                             maxsize=6) as runner:
        results = await stream_all(runner, xs)
        stats = runner.stats()
        if api != "sync":
            peaks = [stage_of(runner, i).peak_in_flight for i in range(segments)]
            assert max(peaks) <= 3  # never more than num_requests on the device
    assert [r.tag for r in results] == [f"frame-{i}" for i in range(60)]
    assert all(close(r.outputs["output"], chain.reference(x)) for r, x in zip(results, xs))
    assert stats.peak_admitted <= 6
    assert [s.workers for s in stats.stages] == [3 if api == "sync" else 1] * segments


async def test_out_of_order_completions_come_back_in_push_order(
        tmp_path: Path, chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    completed: list[int] = []
    original = LegacyIEStage._on_done

    def slow_first_request(self: LegacyIEStage, status: Any, rid: int) -> None:
        if rid == 0:
            time.sleep(0.01)  # request 0's completion is late: others overtake it
        token = self._held[rid][0]
        completed.append(token.seq)  # type: ignore[attr-defined]
        original(self, status, rid)

    monkeypatch.setattr(LegacyIEStage, "_on_done", slow_first_request)
    xs = [chain.random_input(seed=i) for i in range(40)]
    # two CPU streams run two requests at once, each completing on its own stream's thread
    async with aioaccel.open(chain.write_openvino(tmp_path / "m.xml"),
                             backend="openvino-legacy", api="callback", num_requests=4,
                             maxsize=8, config={"CPU_THROUGHPUT_STREAMS": "2"}) as runner:
        results = await stream_all(runner, xs)
    assert completed != sorted(completed), "the requests never completed out of order"
    assert [r.seq for r in results] == sorted(r.seq for r in results)
    assert all(close(r.outputs["output"], chain.reference(x)) for r, x in zip(results, xs))


async def test_backpressure_bounds_admission_and_the_device(tmp_path: Path,
                                                            chain: Chain) -> None:
    async with aioaccel.open(chain.write_openvino(tmp_path / "m.xml"),
                             backend="openvino-legacy", api="callback", num_requests=2,
                             maxsize=5) as runner:
        xs = [chain.random_input(seed=i) for i in range(80)]
        outs = await asyncio.gather(*(runner.infer(x) for x in xs))
        stats = runner.stats()
        stage = stage_of(runner)
    assert all(close(o["output"], chain.reference(x)) for o, x in zip(outs, xs))
    assert stats.peak_admitted <= 5 and stage.peak_in_flight <= 2
    assert len(stage.requests) == 2


async def test_defaults_sync_on_the_cpu_and_requests_from_the_device(tmp_path: Path,
                                                                     chain: Chain) -> None:
    xml = chain.write_openvino(tmp_path / "m.xml")
    async with aioaccel.open(xml, backend="openvino-legacy", maxsize=3) as runner:
        assert runner._model.info["api"] == "sync"  # type: ignore[union-attr]
        assert runner.stats().stages[0].kind == "blocking"
    async with aioaccel.open(xml, backend="openvino-legacy", api="callback", maxsize=3) as runner:
        assert 1 <= len(stage_of(runner).requests) <= 3
        assert runner._model.info["num_requests"] == [len(stage_of(runner).requests)]  # type: ignore[union-attr]


@pytest.mark.parametrize("device", ["HETERO:CPU", "MULTI:CPU"])
async def test_hetero_and_multi_device_strings(tmp_path: Path, chain: Chain, device: str) -> None:
    async with aioaccel.open(chain.write_openvino(tmp_path / "m.xml"), backend="openvino-legacy",
                             device=device, num_requests=2) as runner:
        assert runner._model.info["api"] == "callback"  # type: ignore[union-attr]
        assert runner._model.info["layouts"] == {"input": "NC"}  # type: ignore[union-attr]
        xs = [chain.random_input(seed=i) for i in range(12)]
        outs = await asyncio.gather(*(runner.infer(x) for x in xs))
    assert all(close(o["output"], chain.reference(x)) for o, x in zip(outs, xs))


async def test_a_device_that_is_not_there_is_named(tmp_path: Path, chain: Chain) -> None:
    with pytest.raises(aioaccel.DeviceError, match=r"'MYRIAD'.*devices here: \['CPU'"):
        async with aioaccel.open(chain.write_openvino(tmp_path / "m.xml"),
                                 backend="openvino-legacy", device="MYRIAD", num_requests=1):
            pass


async def test_bad_inputs_fail_alone_and_say_what_was_expected(tmp_path: Path,
                                                               chain: Chain) -> None:
    async with aioaccel.open(chain.write_openvino(tmp_path / "m.xml"),
                             backend="openvino-legacy") as runner:
        assert runner.inputs == [aioaccel.TensorSpec("input", "float32", (1, 32))]
        with pytest.raises(aioaccel.InputError, match=r"'input'.*expected dtype float32"):
            await runner.infer(chain.random_input().astype(np.float64))  # no silent cast
        with pytest.raises(aioaccel.InputError, match=r"expected shape \(1, 32\)"):
            await runner.infer(np.zeros((1, 31), np.float32))
        with pytest.raises(aioaccel.InputError, match="missing"):
            await runner.infer({"data": chain.random_input()})
        x = chain.random_input()
        assert close((await runner.infer(x))["output"], chain.reference(x))
        assert runner.stats().failed == 0


async def test_a_request_that_fails_mid_stream_fails_that_item_only(
        tmp_path: Path, chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = LegacyIEStage._on_done

    def third_fails(self: LegacyIEStage, status: Any, rid: int) -> None:
        calls["n"] += 1
        original(self, -1 if calls["n"] == 3 else status, rid)  # -1: GENERAL_ERROR

    monkeypatch.setattr(LegacyIEStage, "_on_done", third_fails)
    async with aioaccel.open(chain.write_openvino(tmp_path / "m.xml"),
                             backend="openvino-legacy", api="callback",
                             num_requests=1) as runner:
        results = await stream_all(runner, [chain.random_input(seed=i) for i in range(6)])
    assert [r.ok for r in results] == [True, True, False, True, True, True]
    assert "GENERAL_ERROR" in str(results[2].error)
    assert isinstance(results[2].error.__cause__, openvino_legacy.LegacyRequestFailed)


@pytest.mark.parametrize("statuses, message", [
    ({2: -3}, "NETWORK_NOT_LOADED"),                      # a status that means the device is gone
    ({2: -1, 3: -1, 4: -1}, "3 in a row"),                # an unplugged stick: every request fails
])
async def test_device_errors_break_the_runner(tmp_path: Path, chain: Chain,
                                              monkeypatch: pytest.MonkeyPatch,
                                              statuses: dict[int, int], message: str) -> None:
    calls = {"n": 0}
    original = LegacyIEStage._on_done

    def failing(self: LegacyIEStage, status: Any, rid: int) -> None:
        index = calls["n"]
        calls["n"] += 1
        original(self, statuses.get(index, status), rid)

    monkeypatch.setattr(LegacyIEStage, "_on_done", failing)
    async with aioaccel.open(chain.write_openvino(tmp_path / "m.xml"),
                             backend="openvino-legacy", api="callback",
                             num_requests=1) as runner:
        with pytest.raises(aioaccel.DeviceError, match=message):
            await stream_all(runner, [chain.random_input(seed=i) for i in range(8)])
        with pytest.raises(aioaccel.DeviceError):
            await runner.infer(chain.random_input())


@pytest.mark.parametrize("api", ["sync", "callback", "wait"])
async def test_close_with_requests_in_flight_finishes_them(tmp_path: Path, api: str) -> None:
    big = dense_chain(512, 6, inputs=256)
    runner = await aioaccel.open(big.write_openvino(tmp_path / "m.xml"),
                                 backend="openvino-legacy", api=api, num_requests=4,
                                 maxsize=8, name="legacy-close")
    for i in range(8):
        await runner.push(big.random_input(seed=i))
    await runner.aclose()
    stats = runner.stats()
    assert stats.completed == 8 and stats.failed == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("aioaccel-legacy-close")]


@pytest.mark.parametrize("api", ["sync", "callback"])
async def test_profile_reports_per_layer_timings(tmp_path: Path, chain: Chain, api: str) -> None:
    async with aioaccel.open(chain.write_openvino(tmp_path / "m.xml"),
                             backend="openvino-legacy", api=api, num_requests=2,
                             profile=True) as runner:
        await asyncio.gather(*(runner.infer(chain.random_input(seed=i)) for i in range(10)))
        profile = runner.stats().profile
    assert profile, "no per-layer timings"
    # calls: the items for which the plugin reported the layer EXECUTED (the CPU plugin
    # sometimes reports a dense layer as executed on only some requests)
    dense = [t for t in profile.values() if t["layer_type"] == "FullyConnected"]
    assert len(dense) == 4
    assert max(t["calls"] for t in dense) == 10 and all(t["calls"] <= 10 for t in dense)
    assert sum(t["real_time_us"] for t in dense) > 0


async def test_ir_written_by_current_openvino_loads_in_the_legacy_api() -> None:
    directory = os.environ.get("AIOACCEL_CURRENT_IR")
    if not directory:
        pytest.skip("AIOACCEL_CURRENT_IR is not set: .ci/run writes IR with the main "
                    "environment's OpenVINO (tests/write_current_ir.py) and sets it")
    for name in ("dense", "conv"):
        data = np.load(Path(directory) / f"{name}.npz")
        async with aioaccel.open(Path(directory) / f"{name}.xml") as runner:
            assert runner._model.info["backend"] == "openvino"  # type: ignore[union-attr]
        async with aioaccel.open(Path(directory) / f"{name}.xml",
                                 backend="openvino-legacy") as runner:
            out = await runner.infer(data["x"])
        assert close(out["output"], data["y"]), name


class FlakyRequest:
    """A real infer request whose ``infer`` raises on chosen calls (a failing device)."""

    def __init__(self, request: Any, fail: set[int], counter: list[int]):
        self._request = request
        self._fail = fail
        self._counter = counter

    def infer(self, inputs: Any) -> None:
        index = self._counter[0]
        self._counter[0] += 1
        if index in self._fail:
            raise RuntimeError(f"[ GENERAL_ERROR ] simulated failure of call {index}")
        self._request.infer(inputs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


@pytest.mark.parametrize("fail, fatal", [({2}, False), ({2, 3, 4}, True)])
async def test_sync_requests_that_fail(tmp_path: Path, chain: Chain,
                                       monkeypatch: pytest.MonkeyPatch, fail: set[int],
                                       fatal: bool) -> None:
    counter = [0]
    original = LegacySyncStage.__init__

    def flaky(self: LegacySyncStage, request: Any, *args: Any) -> None:
        original(self, FlakyRequest(request, fail, counter), *args)

    monkeypatch.setattr(LegacySyncStage, "__init__", flaky)
    async with aioaccel.open(chain.write_openvino(tmp_path / "m.xml"),
                             backend="openvino-legacy", api="sync") as runner:
        xs = [chain.random_input(seed=i) for i in range(7)]
        if fatal:
            with pytest.raises(aioaccel.DeviceError, match="3 in a row"):
                await stream_all(runner, xs)
            return
        results = await stream_all(runner, xs)
    assert [r.ok for r in results] == [True, True, False, True, True, True, True]
    assert isinstance(results[2].error.__cause__, openvino_legacy.LegacyRequestFailed)
    assert close(results[3].outputs["output"], chain.reference(xs[3]))


async def test_legacy_backend_is_chosen_when_only_the_legacy_api_imports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aioaccel import backends
    from aioaccel.backends import openvino as current

    chain = dense_chain(8, 2)
    xml = chain.write_openvino(tmp_path / "m.xml")
    # decided in the load, on a worker thread: telling the APIs apart imports openvino
    assert backends.resolve_backend(xml) == "openvino"
    assert not current.only_legacy_api()  # 2023.3 has both APIs: the new one is used
    monkeypatch.setattr(current, "only_legacy_api", lambda: True)
    x = chain.random_input()
    async with aioaccel.open(xml) as runner:
        assert runner._model.info["backend"] == "openvino-legacy"  # type: ignore[union-attr]
        assert close((await runner.infer(x))["output"], chain.reference(x))
    assert "openvino-legacy" in aioaccel.available_backends()


def test_devices_lists_the_legacy_api_devices() -> None:
    legacy = [d for d in aioaccel.devices() if d.backend == "openvino-legacy"]
    assert any(d.device == "CPU" and d.available for d in legacy)
