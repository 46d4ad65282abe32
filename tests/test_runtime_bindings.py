"""The real runtimes' bound hot path (OpenVINO sync requests, ONNX Runtime's IOBinding, LiteRT):
buffers bound once per shape must never leak into results. A result handed to the caller is
never overwritten by a later call, shapes that change between calls rebind, and a failed call
leaves the next ones working, bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aioaccel
from aioaccel.backends import get_backend
from aioaccel.backends.onnx import HAND_OUT_ABOVE
from aioaccel.backends.openvino import SHARE_ABOVE
from aioaccel.errors import InferenceError
from aioaccel.testing.models import Chain, dense_chain

pytestmark = pytest.mark.anyio

BACKENDS = ["openvino", "onnx", "litert"]
#: small: outputs copied out of a bound buffer; large (512 KiB, over both thresholds): the
#: bound array is handed out and a fresh one bound before the next call
SIZES = {"small": (1, 16), "large": (2048, 64)}
assert max(HAND_OUT_ABOVE, SHARE_ABOVE) < 2048 * 64 * 4


def target(backend: str, chain: Chain, tmp: Path) -> tuple[Any, dict[str, Any]]:
    if backend == "openvino":
        return chain.openvino_model(), {"api": "sync"}
    if backend == "onnx":
        return chain.write_onnx(tmp / "m.onnx"), {"num_threads": 1}
    return chain.write_tflite(tmp / "m.tflite"), {"num_threads": 1}


def rows(chain: Chain, count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(
        (count, chain.input_shape[1])).astype(np.float32)


def only(outputs: dict[str, np.ndarray]) -> np.ndarray:
    (value,) = outputs.values()
    return value


def close(chain: Chain, x: np.ndarray, out: np.ndarray) -> None:
    np.testing.assert_allclose(out, chain.reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("backend", BACKENDS)
async def test_results_stay_the_callers_after_later_calls(backend: str, size: str,
                                                          tmp_path: Path) -> None:
    batch, width = SIZES[size]
    chain = dense_chain(width, 2, batch=batch)
    model, options = target(backend, chain, tmp_path)
    a, b, c = (rows(chain, batch, seed) for seed in range(3))
    async with aioaccel.open(model, maxsize=4, **options) as runner:
        first = only(await runner.infer(a))
        second = only(await runner.infer(b))
        for _ in range(4):  # each would overwrite a buffer still shared with a result
            close(chain, c, only(await runner.infer(c)))
        await runner.push(a)
        await runner.push(b)
        runner.close()
        streamed = [only(result.outputs) async for result in runner]
    close(chain, a, first)
    close(chain, b, second)
    close(chain, a, streamed[0])
    close(chain, b, streamed[1])
    assert not np.shares_memory(first, second)


@pytest.mark.parametrize("backend", ["openvino", "onnx"])
async def test_shapes_that_change_between_calls_rebind(backend: str, tmp_path: Path) -> None:
    chain = dense_chain(64, 2, dynamic_batch=True)
    model, options = target(backend, chain, tmp_path)
    counts = [1, 3, 2048, 1, 3, 2048, 2]  # small and handed-out outputs, back and forth
    xs = [rows(chain, n, seed) for seed, n in enumerate(counts)]
    async with aioaccel.open(model, maxsize=4, **options) as runner:
        outs = [only(await runner.infer(x)) for x in xs]
    for x, out in zip(xs, outs, strict=True):
        assert out.shape == (len(x), 64)
        close(chain, x, out)


def stage(backend: str, model: Any, **options: Any) -> tuple[Any, Any]:
    """The backend's stage, made as a worker thread makes it, and the model's validator."""
    loaded = get_backend(backend).load(model, **options)
    return loaded.stages[0].factory(), loaded.prepare


def reshape_model(path: Path, declared_rows: str = "N") -> Path:
    """``y = reshape(reshape(x, (3, -1)), (-1, 4))`` for ``x`` of shape (N, 4): y == x, and the
    call fails inside the graph unless 3 divides N. ``declared_rows`` names y's first dim."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "three"], ["mid"]),
         helper.make_node("Reshape", ["mid", "four"], ["y"])], "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [declared_rows, 4])],
        [numpy_helper.from_array(np.array([3, -1], np.int64), "three"),
         numpy_helper.from_array(np.array([-1, 4], np.int64), "four")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_onnx_a_failed_call_leaves_the_next_ones_working_bound(tmp_path: Path) -> None:
    onnx_stage, prepare = stage("onnx", reshape_model(tmp_path / "r.onnx"), num_threads=1)
    good = [np.arange(n * 4, dtype=np.float32).reshape(n, 4) + n for n in (3, 6, 3)]
    assert onnx_stage.run(prepare(good[0]))["y"].tolist() == good[0].tolist()
    with pytest.raises(Exception, match="(?i)reshape"):  # the session's own error
        onnx_stage.run(prepare(np.ones((2, 4), np.float32)))
    outs = [onnx_stage.run(prepare(x))["y"] for x in good]
    assert [o.tolist() for o in outs] == [x.tolist() for x in good]
    assert onnx_stage.binds  # a failing item does not turn the bound path off


async def test_onnx_a_failed_item_fails_alone_in_a_runner(tmp_path: Path) -> None:
    path = reshape_model(tmp_path / "r.onnx")
    good = [np.full((n, 4), n, np.float32) for n in (3, 6, 3)]
    async with aioaccel.open(path, num_threads=1) as runner:
        assert only(await runner.infer(good[0])).tolist() == good[0].tolist()
        with pytest.raises(InferenceError):
            await runner.infer(np.ones((2, 4), np.float32))
        for x in good:
            assert only(await runner.infer(x)).tolist() == x.tolist()


def test_onnx_a_model_whose_declared_output_shape_is_wrong_still_runs(tmp_path: Path) -> None:
    # y is declared (N, 4) against an input (M, 4) of another symbol: not bindable up front
    path = reshape_model(tmp_path / "r.onnx", declared_rows="M")
    onnx_stage, prepare = stage("onnx", path, num_threads=1)
    assert not onnx_stage.binds
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    assert onnx_stage.run(prepare(x))["y"].tolist() == x.tolist()


def test_onnx_bound_shapes_that_lie_fall_back_to_plain_runs(tmp_path: Path) -> None:
    """A model declaring y as (N, 8) for x (N, 4) (its real y is (N/2, 8)): the bound call
    fails on the preallocated (N, 8) buffer, the item runs plainly and gets the true result,
    and later calls run plainly."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "eight"], ["y"])], "halve",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(np.array([-1, 8], np.int64), "eight")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "halve.onnx"
    onnx.save(model, path)
    onnx_stage, prepare = stage("onnx", path, num_threads=1)
    assert onnx_stage.binds
    for n in (2, 4):
        x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
        assert onnx_stage.run(prepare(x))["y"].tolist() == x.reshape(-1, 8).tolist()
    assert not onnx_stage.binds


def test_openvino_handed_out_outputs_are_rebound_and_small_ones_copied() -> None:
    small = dense_chain(16, 2)
    large = dense_chain(64, 2, batch=2048)
    for chain, handed_out in ((small, False), (large, True)):
        ov_stage, prepare = stage("openvino", chain.openvino_model(), api="sync")
        xs = [rows(chain, chain.input_shape[0], seed) for seed in range(3)]
        outs = [ov_stage.run(prepare(x))["output"] for x in xs]
        for x, out in zip(xs, outs, strict=True):
            close(chain, x, out)
        assert [o.handed_out for o in ov_stage._owned] == [handed_out]
        # never the array the request writes the next result into
        assert not any(np.shares_memory(o, ov_stage._owned[0].array) for o in outs[:-1])
