"""LiteRT, ONNX Runtime and OpenVINO, for real on the CPU, on models built in code."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import close, stream_all

import aioaccel
from aioaccel.testing.models import Chain, conv_chain, dense_chain

pytestmark = pytest.mark.anyio

BACKENDS = ["litert", "onnx", "openvino", "openvino-async"]
OPTIONS = {"openvino-async": {"api": "async"}}


def open_model(backend: str, target: Any, **options: Any) -> aioaccel.Runner:
    name = backend.split("-")[0]
    return aioaccel.open(target, backend=name, **{**OPTIONS.get(backend, {}), **options})


def model_target(backend: str, chain: Chain, tmp: Path, segments: int = 1) -> Any:
    """The files (or objects) ``aioaccel.open`` takes for ``chain`` on ``backend``."""
    backend = backend.split("-")[0]
    if backend == "litert":
        paths = chain.write_tflite_segments(tmp, segments)
    elif backend == "onnx":
        paths = chain.write_onnx_segments(tmp, segments)
    elif segments == 1:
        return chain.write_openvino(tmp / "model.xml")
    else:
        return [part.openvino_model() for part in chain.split(segments)]
    return paths[0] if segments == 1 else paths




@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segments", [1, 2, 3])
@pytest.mark.parametrize("kind", ["dense", "conv"])
async def test_matches_numpy_whole_and_segmented(backend: str, segments: int, kind: str,
                                                 tmp_path: Path) -> None:
    chain = dense_chain(32, 6, seed=segments) if kind == "dense" else conv_chain(12, 4, 3)
    target = model_target(backend, chain, tmp_path, segments)
    xs = [chain.random_input(seed) for seed in range(12)]
    async with open_model(backend, target, maxsize=4) as runner:
        assert [s.name for s in runner.inputs] == ["input"]
        assert runner.inputs[0].shape == chain.input_shape
        assert [s.name for s in runner.outputs] == ["output"]
        assert len(runner.stats().stages) == segments
        results = await stream_all(runner, xs)
    assert [r.tag for r in results] == list(range(12))
    for r, x in zip(results, xs):
        assert set(r.outputs) == {"output"}
        assert close(r.outputs["output"], chain.reference(x))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_concurrent_infer_callers_get_their_own_results(backend: str, tmp_path: Path) -> None:
    chain = dense_chain(16, 3)
    xs = [chain.random_input(seed) for seed in range(64)]
    replicas = 1 if backend == "openvino-async" else 2
    async with open_model(backend, model_target(backend, chain, tmp_path, 2),
                          replicas=replicas, maxsize=8) as runner:
        outs = await asyncio.gather(*(runner.infer(x) for x in xs))
        stats = runner.stats()
    assert all(close(o["output"], chain.reference(x)) for o, x in zip(outs, xs))
    assert stats.peak_admitted <= 8 and stats.completed == 64


@pytest.mark.parametrize("backend", BACKENDS)
async def test_bad_inputs_are_rejected_by_name_and_nothing_else_is_lost(backend: str,
                                                                       tmp_path: Path) -> None:
    chain = dense_chain(8, 2)
    good = chain.random_input()
    async with open_model(backend, model_target(backend, chain, tmp_path)) as runner:
        pending = [asyncio.create_task(runner.infer(chain.random_input(s))) for s in range(5)]
        cases = {
            "expected dtype float32, got float64": good.astype(np.float64),
            r"expected shape \(1, 8\), got \(8,\)": good[0],
            r"expected shape \(1, 8\), got \(1, 9\)": np.zeros((1, 9), np.float32),
            "missing \\['input'\\], unexpected \\['extra'\\]": {"extra": good},
            "unexpected \\['extra'\\]": {"input": good, "extra": good},
            "got 2 inputs by position, the model takes 1": [good, good],
            "object/string/void arrays are never accepted": np.array([[None] * 8], dtype=object),
            "got str": "not a tensor",
        }
        for message, bad in cases.items():
            with pytest.raises(aioaccel.InputError, match=message) as info:
                await runner.infer(bad)
            assert "'input'" in str(info.value) or "input" in str(info.value)
            with pytest.raises(aioaccel.InputError):
                runner.push_nowait(bad)
        outs = await asyncio.gather(*pending)
        assert close((await runner.infer({"input": good}))["output"], chain.reference(good))
        assert close((await runner.infer([good]))["output"], chain.reference(good))
        stats = runner.stats()
    assert len(outs) == 5 and stats.failed == 0 and stats.pushed == 7


@pytest.mark.parametrize("backend", BACKENDS)
async def test_cast_opt_in_and_byte_cap_for_dynamic_shapes(backend: str, tmp_path: Path) -> None:
    chain = dense_chain(8, 2, dynamic_batch=True)
    target = model_target(backend, chain, tmp_path)
    async with open_model(backend, target, cast=True, max_input_bytes=64 * 8 * 4) as runner:
        assert runner.inputs[0].shape == (None, 8)
        x = np.random.default_rng(0).standard_normal((5, 8))  # float64, batch 5
        out = await runner.infer(x)
        assert close(out["output"], chain.reference(x.astype(np.float32)))
        with pytest.raises(aioaccel.InputError, match="over the cap of 2048 bytes"):
            await runner.infer(np.zeros((65, 8), np.float32))
        assert (await runner.infer(np.zeros((64, 8), np.float32)))["output"].shape == (64, 8)


@pytest.mark.parametrize("backend", ["litert", "onnx"])
async def test_segments_must_be_fed_by_earlier_segments(backend: str, tmp_path: Path) -> None:
    # inputs=5: reversed, the segments chain neither by name nor by position ((1, 8) -> (1, 5))
    chain = dense_chain(8, 4, inputs=5)
    paths = model_target(backend, chain, tmp_path, 2)
    with pytest.raises(ValueError, match="segment 1 .* needs tensor 'input'"):
        async with aioaccel.open(paths[::-1], backend=backend):
            pass


async def test_openvino_pipeline_checks_its_models_too(tmp_path: Path) -> None:
    parts = [part.openvino_model() for part in dense_chain(8, 4, inputs=5).split(2)]
    with pytest.raises(ValueError, match="needs tensor 'input'"):
        async with aioaccel.open(parts[::-1]):
            pass


@pytest.mark.parametrize("backend,suffix", [("litert", ".tflite"), ("onnx", ".onnx"),
                                            ("openvino", ".xml")])
async def test_missing_model_file_is_named(backend: str, suffix: str, tmp_path: Path) -> None:
    missing = tmp_path / f"nope{suffix}"
    with pytest.raises(FileNotFoundError, match="nope"):
        async with aioaccel.open(missing):
            pass


async def test_litert_edgetpu_without_libedgetpu_says_what_to_install(tmp_path: Path) -> None:
    from aioaccel.backends import litert

    try:
        litert.load_edgetpu_delegate("usb:0")
    except aioaccel.BackendUnavailable:
        pass
    else:
        pytest.skip("an Edge TPU runtime is installed here")
    path = dense_chain(8, 2).write_tflite(tmp_path / "m.tflite")
    with pytest.raises(aioaccel.BackendUnavailable, match="libedgetpu") as info:
        async with aioaccel.open(path, device="edgetpu:usb"):
            pass
    assert isinstance(info.value.__cause__, (OSError, ValueError))
    assert "coral.ai" in str(info.value)


def test_edgetpu_device_strings_give_one_tpu_per_segment() -> None:
    from aioaccel.backends.litert import edgetpu_devices

    assert edgetpu_devices("edgetpu", 3, 1) == [":0", ":1", ":2"]
    assert edgetpu_devices("edgetpu:usb", 2, 1) == ["usb:0", "usb:1"]
    assert edgetpu_devices("edgetpu:pci:1", 2, 1) == ["pci:1", "pci:2"]
    assert edgetpu_devices(["edgetpu:usb:1", "cpu"], 2, 1) == ["usb:1", None]
    assert edgetpu_devices(None, 2, 2) == [None] * 4
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        edgetpu_devices("gpu", 1, 1)


@pytest.mark.hardware
async def test_litert_on_a_real_edge_tpu(tmp_path: Path) -> None:
    from aioaccel.backends import litert

    try:
        litert.load_edgetpu_delegate(":0")
    except aioaccel.BackendUnavailable as exc:
        pytest.skip(f"no Edge TPU here: {exc}")
    # An uncompiled model runs on the CPU even with the delegate: this checks that the
    # delegate loads and the runner works with it; compiled models need edgetpu_compiler.
    chain = dense_chain(8, 2)
    async with aioaccel.open(chain.write_tflite(tmp_path / "m.tflite"), device="edgetpu") as r:
        x = chain.random_input()
        assert close((await r.infer(x))["output"], chain.reference(x))


async def test_openvino_error_in_result_handling_reaches_the_consumer_and_the_process_lives(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An exception while reading a request's outputs (on the runtime's callback thread) must
    not escape into OpenVINO (that aborts the process at a later start_async)."""
    from aioaccel.backends.openvino import OpenVINOStage

    chain = dense_chain(8, 2)
    original = OpenVINOStage.read_outputs
    calls = {"n": 0}

    def flaky(self: OpenVINOStage, request: Any) -> Any:
        calls["n"] += 1
        if calls["n"] in (3, 4):
            raise RuntimeError("result handling broke")
        return original(self, request)

    monkeypatch.setattr(OpenVINOStage, "read_outputs", flaky)
    async with aioaccel.open(chain.openvino_model(), api="async", jobs=2, maxsize=4) as runner:
        xs = [chain.random_input(s) for s in range(40)]

        async def produce() -> None:
            for x in xs:
                await runner.push(x)
            runner.close()

        producer = asyncio.create_task(produce())
        results = [r async for r in runner]
        await producer
    failed = [r for r in results if not r.ok]
    assert len(results) == 40 and len(failed) == 2
    assert all(isinstance(r.error.__cause__, RuntimeError) for r in failed)
    assert all(close(r.outputs["output"], chain.reference(x))
               for r, x in zip(results, xs) if r.ok)


async def test_openvino_keeps_maxsize_and_completes_out_of_order_in_order(tmp_path: Path) -> None:
    chain = dense_chain(64, 4, dynamic_batch=True)
    sizes = [1 + (7 * i) % 33 for i in range(60)]  # uneven work: requests finish out of order
    xs = [np.random.default_rng(i).standard_normal((n, 64)).astype(np.float32)
          for i, n in enumerate(sizes)]
    async with aioaccel.open(chain.openvino_model(), api="async", jobs=4, maxsize=6) as runner:
        async def produce() -> None:
            for i, x in enumerate(xs):
                await runner.push(x, tag=i)
            runner.close()

        producer = asyncio.create_task(produce())
        results = []
        async for r in runner:
            results.append(r)
            assert runner.stats().in_flight <= 6
        await producer
        stats = runner.stats()
    assert [r.tag for r in results] == list(range(60))
    assert all(close(r.outputs["output"], chain.reference(x)) for r, x in zip(results, xs))
    assert stats.peak_admitted <= 6 and stats.stages[0].kind == "device"


@pytest.mark.parametrize("backend", ["litert", "onnx", "openvino"])
async def test_replicas_and_num_threads(backend: str, tmp_path: Path) -> None:
    chain = conv_chain(8, 4, 2)
    xs = [chain.random_input(s) for s in range(16)]
    threads = {"config": {"INFERENCE_NUM_THREADS": 1}} if backend == "openvino" else {
        "num_threads": 1}
    async with aioaccel.open(model_target(backend, chain, tmp_path), replicas=3,
                             name="rep", **threads) as runner:
        outs = await asyncio.gather(*(runner.infer(x) for x in xs))
        assert runner.stats().stages[0].workers == 3
    assert all(close(o["output"], chain.reference(x)) for o, x in zip(outs, xs))


async def test_openvino_rejects_replicas_and_bad_hints(tmp_path: Path) -> None:
    model = dense_chain(8, 2).openvino_model()
    with pytest.raises(ValueError, match="jobs="):
        async with aioaccel.open(model, api="async", replicas=2):
            pass
    with pytest.raises(ValueError, match="api must be"):
        async with aioaccel.open(model, api="fast"):
            pass
    with pytest.raises(ValueError, match="hint"):
        async with aioaccel.open(model, hint="FAST"):
            pass


async def test_openvino_opens_onnx_files_when_asked(tmp_path: Path) -> None:
    chain = dense_chain(8, 3)
    path = chain.write_onnx(tmp_path / "m.onnx")
    x = chain.random_input()
    async with aioaccel.open(path, backend="openvino") as runner:
        assert close((await runner.infer(x))["output"], chain.reference(x))
        assert runner.stats().stages[0].name == "openvino"


async def test_openvino_legacy_without_the_legacy_api_says_what_to_install(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("openvino.inference_engine") is not None:
        pytest.skip("the legacy API is installed here (tests/test_openvino_legacy.py runs)")
    path = dense_chain(8, 2).write_openvino(tmp_path / "m.xml")
    with pytest.raises(aioaccel.BackendUnavailable, match="openvino<2024"):
        async with aioaccel.open(path, backend="openvino-legacy"):
            pass
