"""Fault injection at library level: bad input, files that are not models, backend failures
mid-stream, interpreter exit with requests running, and descriptor/memory leaks per backend."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from time import thread_time
from typing import Any

import numpy as np
import pytest
from support import close

import aioaccel
from aioaccel.tensors import InputValidator, TensorSpec
from aioaccel.testing.models import dense_chain

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["litert", "onnx", "openvino", "openvino-async"]
OPTIONS: dict[str, dict[str, Any]] = {"openvino-async": {"api": "async", "jobs": 2}}


def open_model(backend: str, target: Any, **options: Any) -> aioaccel.Runner:
    return aioaccel.open(target, backend=backend.split("-")[0],
                         **{**OPTIONS.get(backend, {}), **options})


def write_model(backend: str, directory: Path, name: str = "model") -> Path:
    chain = dense_chain(8, 2)
    kind = backend.split("-")[0]
    if kind == "litert":
        return chain.write_tflite(directory / f"{name}.tflite")
    if kind == "onnx":
        return chain.write_onnx(directory / f"{name}.onnx")
    return chain.write_openvino(directory / f"{name}.xml")


# ---- bad input -------------------------------------------------------------------------------
SPEC = TensorSpec("x", "float32", (1, 4))


def test_masked_arrays_are_refused() -> None:
    masked = np.ma.masked_array(np.zeros((1, 4), np.float32), mask=[[0, 1, 0, 0]])
    with pytest.raises(aioaccel.InputError, match="'x': got a masked array"):
        InputValidator([SPEC])(masked)
    with pytest.raises(aioaccel.InputError, match="masked"):
        InputValidator([SPEC], cast=True)({"x": masked})


def test_ragged_lists_are_input_errors() -> None:
    for ragged in ([[1.0, 2.0], [3.0]], [[1.0, [2.0], 3.0, 4.0]]):
        with pytest.raises(aioaccel.InputError, match="'x'"):
            InputValidator([SPEC], cast=True)(ragged)


def test_a_nested_list_of_the_inputs_shape_is_that_input() -> None:
    values = [[1.0, 2.0, 3.0, 4.0]]
    with pytest.raises(aioaccel.InputError) as info:
        InputValidator([SPEC])(values)
    message = str(info.value)
    assert "nested list was given" in message and "float64" in message
    assert "np.asarray(value, dtype=np.float32)" in message and "cast=True" in message
    out = InputValidator([SPEC], cast=True)(values)["x"]
    assert out.dtype == np.float32 and out.tolist() == values
    # by position still works: one array in a list, or one nested list in a list
    assert InputValidator([SPEC])([np.ones((1, 4), np.float32)])["x"].shape == (1, 4)
    assert InputValidator([SPEC], cast=True)([values])["x"].shape == (1, 4)
    with pytest.raises(aioaccel.InputError, match=r"expected shape \(1, 4\), a nested list of "
                                                  r"shape \(2, 2\)"):
        InputValidator([SPEC], cast=True)([[1.0, 2.0], [3.0, 4.0]])


def test_shape_and_size_are_checked_before_any_copy() -> None:
    # the CPU this thread spent, not the wall clock: a loaded machine can hold a thread off its
    # core for longer than the check takes, while copying 1 GiB costs a few hundred ms of CPU
    huge = np.broadcast_to(np.zeros(1), (1 << 27,))  # 1 GiB of float64, without the memory
    for cast in (False, True):
        validator = InputValidator([SPEC], cast=cast)
        started = thread_time()
        with pytest.raises(aioaccel.InputError, match="'x'"):
            validator(huge)
        assert thread_time() - started < 0.05
    capped = InputValidator([TensorSpec("x", "float32", (None,))], cast=True, max_bytes=1024)
    started = thread_time()
    with pytest.raises(aioaccel.InputError, match="over the cap of 1024 bytes"):
        capped(huge)
    assert thread_time() - started < 0.05


def test_integers_out_of_range_for_a_cast_are_input_errors() -> None:
    validator = InputValidator([TensorSpec("x", "uint8", (None,))], cast=True)
    for bad in ([300], [-1], [1, 256]):
        with pytest.raises(aioaccel.InputError, match="out of range for uint8"):
            validator(bad)
    assert validator([1, 255])["x"].tolist() == [1, 255]


# ---- files that are not models ---------------------------------------------------------------
def broken_files(backend: str, directory: Path) -> dict[str, Path]:
    """Files ``backend`` must refuse with a ModelLoadError naming them."""
    good = write_model(backend, directory, "good")
    suffix = good.suffix
    data = good.read_bytes()
    files = {"random bytes": os.urandom(512), "empty": b"", "truncated": data[: len(data) // 3]}
    out = {}
    for label, content in files.items():
        path = directory / f"{label.replace(' ', '_')}{suffix}"
        path.write_bytes(content)
        if suffix == ".xml":
            path.with_suffix(".bin").write_bytes(good.with_suffix(".bin").read_bytes())
        out[label] = path
    directory_model = directory / f"folder{suffix}"
    directory_model.mkdir()
    out["a directory"] = directory_model
    if suffix == ".xml":
        lonely = directory / "no_weights.xml"
        lonely.write_bytes(data)
        out["an IR without its .bin"] = lonely
        short_bin = directory / "short_weights.xml"
        short_bin.write_bytes(data)
        short_bin.with_suffix(".bin").write_bytes(good.with_suffix(".bin").read_bytes()[:40])
        out["an IR with truncated weights"] = short_bin
    return out


#: how each runtime is named in its open errors (LiteRT by its module: ai_edge_litert, or
#: tflite_runtime where that is what runs)
RUNTIMES = {"litert": ("litert", "tflite"), "onnx": ("onnx runtime",), "openvino": ("openvino",)}


@pytest.mark.parametrize("backend", ["litert", "onnx", "openvino"])
async def test_files_that_are_not_models_give_model_load_errors_naming_file_and_runtime(
        backend: str, tmp_path: Path) -> None:
    for label, path in broken_files(backend, tmp_path).items():
        with pytest.raises(aioaccel.ModelLoadError) as info:
            async with aioaccel.open(path):
                pass
        message = str(info.value)
        assert isinstance(info.value, aioaccel.AccelError)
        assert path.name in message or path.with_suffix(".bin").name in message, (label, message)
        if label == "a directory":
            assert "is a directory" in message and "not found" not in message
        elif label == "empty":
            assert "is empty" in message
        elif label == "an IR without its .bin":
            assert isinstance(info.value, aioaccel.ModelNotFound) and ".bin" in message
        else:
            assert any(name in message.lower() for name in RUNTIMES[backend]), (label, message)
            assert info.value.__cause__ is not None  # the runtime's own error, chained
    with pytest.raises(aioaccel.ModelNotFound, match="not found"):
        async with aioaccel.open(tmp_path / f"missing{path.suffix}"):
            pass
    with pytest.raises(FileNotFoundError):  # ModelNotFound is one
        async with aioaccel.open(tmp_path / f"missing{path.suffix}"):
            pass


async def test_an_async_def_stage_is_refused_at_open() -> None:
    async def model(x: Any) -> Any:
        return x

    class Callable:
        async def __call__(self, x: Any) -> Any:
            return x

    for stage in (model, Callable(), [lambda x: x, model]):
        runner = aioaccel.open(stage)
        with pytest.raises(TypeError, match="async function.*blocking callables"):
            await runner.__aenter__()


# ---- backend faults mid-stream ---------------------------------------------------------------
def reshaping_model() -> Any:
    """An OpenVINO model with a dynamic batch that only even batches fit (a Reshape to
    [-1, 16] of [batch, 8]): odd batches fail inside the CPU plugin at run time."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([-1, 8], np.float32, name="x")
    pairs = ops.reshape(x, ops.constant(np.array([-1, 16], np.int64)), special_zero=False)
    weights = ops.constant(np.arange(64, dtype=np.float32).reshape(16, 4) / 64)
    return ov.Model([ops.matmul(pairs, weights, False, False)], [x], "pairs")


def reshaping_reference(x: np.ndarray) -> np.ndarray:
    return np.asarray(x.reshape(-1, 16) @ (np.arange(64, dtype=np.float32).reshape(16, 4) / 64))


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_openvino_fails_a_bad_item_alone_and_later_items_flow(api: str) -> None:
    """Valid dtype and rank, a shape the graph rejects: that item fails with InferenceError,
    before and after good ones, streamed and by infer(), and nothing hangs."""
    rng = np.random.default_rng(0)
    batches = [2, 3, 4, 5, 5, 2, 7, 6, 1, 4, 2, 2]
    xs = [rng.standard_normal((b, 8)).astype(np.float32) for b in batches]
    async with aioaccel.open(reshaping_model(), api=api, jobs=2, maxsize=4) as runner:
        async def produce() -> None:
            for i, x in enumerate(xs):
                await runner.push(x, tag=i)
            runner.close()

        producer = asyncio.create_task(produce())
        results = [r async for r in runner]
        await producer
        stats = runner.stats()
    assert [r.tag for r in results] == list(range(len(xs)))
    for r, x in zip(results, xs):
        if x.shape[0] % 2:
            assert isinstance(r.error, aioaccel.InferenceError)
            assert isinstance(r.error.__cause__, RuntimeError)
        else:
            assert r.ok and close(r.outputs[runner.outputs[0].name], reshaping_reference(x))
    assert stats.failed == 5 and stats.completed == 7 and stats.in_flight == 0


def reshaping_onnx(path: Path) -> Path:
    """The same model as :func:`reshaping_model`, as an ONNX file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.arange(64, dtype=np.float32).reshape(16, 4) / 64
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "pairs_shape"], ["pairs"]),
         helper.make_node("MatMul", ["pairs", "w"], ["y"])],
        "pairs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["half", 4])],
        [numpy_helper.from_array(np.array([-1, 16], np.int64), "pairs_shape"),
         numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("backend", ["onnx", "openvino", "openvino-async"])
async def test_a_runtime_failure_on_one_item_fails_it_alone_on_every_backend(
        backend: str, tmp_path: Path) -> None:
    path = reshaping_onnx(tmp_path / "pairs.onnx")
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((b, 8)).astype(np.float32) for b in (3, 2, 1, 4, 5, 2)]
    async with open_model(backend, path, maxsize=3) as runner:
        outcomes = await asyncio.gather(*(runner.infer(x) for x in xs), return_exceptions=True)
        stats = runner.stats()
    for outcome, x in zip(outcomes, xs):
        if x.shape[0] % 2:
            assert isinstance(outcome, aioaccel.InferenceError), outcome
        else:
            assert close(next(iter(outcome.values())), reshaping_reference(x))
    assert stats.failed == 3 and stats.completed == 3


@pytest.mark.parametrize("api", ["sync", "async"])
async def test_openvino_requests_are_replaced_after_a_failure(api: str) -> None:
    from aioaccel.backends import openvino

    made: list[Any] = []
    original_sync, original_async = openvino.OpenVINOSyncStage, openvino.OpenVINOStage

    def keep(cls: Any) -> Any:
        def factory(*args: Any) -> Any:
            stage = cls(*args)
            made.append(stage)
            return stage
        return factory

    good, bad = np.ones((2, 8), np.float32), np.ones((3, 8), np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(openvino, "OpenVINOSyncStage", keep(original_sync))
        patch.setattr(openvino, "OpenVINOStage", keep(original_async))
        async with aioaccel.open(reshaping_model(), api=api, jobs=1) as runner:
            await runner.infer(good)
            before = [getattr(s, "request", None) for s in made]
            with pytest.raises(aioaccel.InferenceError):
                await runner.infer(bad)
            for _ in range(5):
                out = await runner.infer(good)
                assert close(next(iter(out.values())), reshaping_reference(good))
    stage = made[0]
    if api == "sync":
        assert stage.request is not before[0]
    else:
        assert stage.recreated == 1


EXIT_SCRIPT = """
import asyncio, sys, tempfile
import aioaccel
from aioaccel.testing.models import dense_chain

chain = dense_chain(256, 6, batch=32)
backend = sys.argv[1]
if backend.startswith("openvino"):
    target, options = chain.openvino_model(), {"api": backend.split("-")[1], "jobs": 4}
elif backend == "onnx":
    target, options = chain.write_onnx(tempfile.mkdtemp() + "/m.onnx"), {}
else:
    target, options = chain.write_tflite(tempfile.mkdtemp() + "/m.tflite"), {}

async def main():
    runner = await aioaccel.open(target, maxsize=16, **options)
    for i in range(16):
        runner.push_nowait(chain.random_input(i))
    globals()["runner"] = runner  # never closed, alive until the interpreter exits
    print("leaving with", runner.stats().in_flight, "in flight")

asyncio.run(main())
"""


@pytest.mark.parametrize("backend", ["openvino-sync", "openvino-async", "onnx", "litert"])
def test_exit_with_a_runner_never_closed_and_calls_running_is_clean(backend: str) -> None:
    """Worker threads inside a native call at interpreter exit aborted the process (OpenVINO
    always, ONNX Runtime about one run in two): the calls now finish first. Three runs each."""
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-W", "ignore::ResourceWarning", "-c",
                               textwrap.dedent(EXIT_SCRIPT), backend], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "in flight" in proc.stdout
        assert "terminate called" not in proc.stderr


# ---- leaks -----------------------------------------------------------------------------------
def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


CYCLES = 40


@pytest.mark.parametrize("backend", BACKENDS)
async def test_open_close_cycles_and_failed_opens_leak_nothing(backend: str,
                                                               tmp_path: Path) -> None:
    """Descriptors flat (OpenVINO's AsyncInferQueue leaked one per cycle) and RSS bounded, for
    good opens that run an item and for opens of a file the runtime refuses."""
    good = write_model(backend, tmp_path)
    bad = tmp_path / f"bad{good.suffix}"
    bad.write_bytes(os.urandom(256))
    if good.suffix == ".xml":
        bad.with_suffix(".bin").write_bytes(os.urandom(64))
    x = dense_chain(8, 2).random_input()

    async def cycle(path: Path) -> None:
        try:
            async with open_model(backend, path) as runner:
                await runner.infer(x)
        except aioaccel.ModelLoadError:
            assert path == bad

    for path in (good, bad):
        for _ in range(3):  # warm up: lazy imports, thread pools, allocator arenas
            await cycle(path)
        gc.collect()
        fds, rss = descriptors(), rss_mb()
        for _ in range(CYCLES):
            await cycle(path)
        gc.collect()
        assert descriptors() - fds <= 1, (path.name, fds, descriptors())
        assert rss_mb() - rss < 40, (path.name, rss, rss_mb())
