"""Each backend opened with ``batch=``, its stages driven directly (no runner): a joined batch
gives every item what a per-item run gives it; backends that cannot batch say so at open."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import close

from aioaccel import DeviceStage
from aioaccel.backends import Model, get_backend
from aioaccel.batching import BatchingUnsupported, join, load_model, split
from aioaccel.testing.models import Chain, conv_chain, dense_chain

BACKENDS = ["litert", "onnx", "openvino", "openvino-async"]


def load(backend: str, chain: Chain, tmp: Path, segments: int = 1, **options: Any) -> Model:
    name = backend.split("-")[0]
    if backend == "openvino-async":
        options["api"] = "async"
    if name == "litert":
        paths = chain.write_tflite_segments(tmp, segments)
    elif name == "onnx":
        paths = chain.write_onnx_segments(tmp, segments)
    else:
        paths = [part.write_openvino(tmp / f"segment{i}.xml")
                 for i, part in enumerate(chain.split(segments))]
    module = get_backend(name)
    return module.load(paths[0] if segments == 1 else paths, **options)  # type: ignore[no-any-return]


class Chained:
    """The model's stages made on this thread and run one after the other."""

    def __init__(self, model: Model):
        self.stages = [spec.factory() for spec in model.stages]
        self.done = threading.Event()
        self.outcome: tuple[Any, BaseException | None] = (None, None)
        for stage in self.stages:
            if isinstance(stage, DeviceStage):
                stage.start(self.complete)

    def complete(self, token: object, outputs: Any, error: BaseException | None) -> None:
        self.outcome = (outputs, error)
        self.done.set()

    def __call__(self, inputs: Any) -> Any:
        for stage in self.stages:
            if isinstance(stage, DeviceStage):
                self.done.clear()
                stage.submit(object(), inputs)
                assert self.done.wait(10)
                inputs, error = self.outcome
                assert error is None
            else:
                inputs = stage.run(inputs)
        return inputs

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


def run_batched(model: Model, items: list[np.ndarray]) -> list[Any]:
    prepare = model.prepare
    assert prepare is not None
    chained = Chained(model)
    try:
        batch, rows = join([prepare(x) for x in items])
        return split(chained(batch), rows)
    finally:
        chained.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("segments", [1, 2])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_a_joined_batch_matches_per_item_runs(backend: str, segments: int, kind: str,
                                              tmp_path: Path) -> None:
    dynamic = backend == "onnx"  # ONNX Runtime needs it; the others make it themselves
    chain = (dense_chain(32, 4, dynamic_batch=dynamic, seed=3) if kind == "dense"
             else conv_chain(10, 4, 3))
    if kind == "conv" and dynamic:
        chain = Chain(chain.input_shape, chain.layers, chain.first, chain.total, True)
    model = load(backend, chain, tmp_path, segments, batch=8)
    assert model.batch == 8
    assert model.inputs is not None and model.inputs[0].shape == (None, *chain.input_shape[1:])
    # items of 1 row, and one item of 3 rows (it brings 3 rows)
    xs = [chain.random_input(s) for s in range(6)]
    xs.insert(2, np.concatenate([chain.random_input(s) for s in (10, 11, 12)]))
    parts = run_batched(model, xs)
    assert len(parts) == len(xs)
    (tmp_path / "single").mkdir()
    single = load(backend, chain, tmp_path / "single", segments) if not dynamic else None
    per_item = Chained(single or model)
    try:
        for x, part in zip(xs, parts, strict=True):
            assert set(part) == {"output"} and part["output"].shape[0] == x.shape[0]
            assert close(part["output"], chain.reference(x))
            if x.shape[0] == 1:  # what the unbatched model gives this item
                assert close(part["output"], per_item({"input": x})["output"])
    finally:
        per_item.close()
        for m in (model, single):
            if m is not None and m.close is not None:
                m.close()


@pytest.mark.parametrize("backend", ["litert", "openvino"])
def test_varying_batch_sizes_reuse_the_stage(backend: str, tmp_path: Path) -> None:
    chain = dense_chain(16, 3, seed=1)
    model = load(backend, chain, tmp_path, batch=4)
    chained = Chained(model)
    try:
        for n in (4, 3, 4, 4, 1, 2, 4, 7):  # full batches, partial ones, and a big item
            x = np.random.default_rng(n).standard_normal((n, 16)).astype(np.float32)
            assert close(chained({"input": x})["output"], chain.reference(x))
    finally:
        chained.close()


def test_litert_keeps_a_full_batch_interpreter_and_resizes_the_other(tmp_path: Path) -> None:
    chain = dense_chain(16, 2)
    model = load("litert", chain, tmp_path, batch=4)
    stage: Any = model.stages[0].factory()
    flexible = stage.interpreter
    stage.run({"input": np.zeros((4, 16), np.float32)})
    full = stage._full[0]
    assert full is not flexible
    assert flexible.get_input_details()[0]["shape"].tolist() == [1, 16]  # untouched by 4 rows
    stage.run({"input": np.zeros((3, 16), np.float32)})
    assert flexible.get_input_details()[0]["shape"].tolist() == [3, 16]
    assert full.get_input_details()[0]["shape"].tolist() == [4, 16]


def test_batched_input_specs_accept_any_rows_but_still_check_the_rest(tmp_path: Path) -> None:
    from aioaccel import InputError

    chain = dense_chain(8, 2)
    model = load("openvino", chain, tmp_path, batch=4)
    assert model.prepare is not None
    assert model.prepare(np.zeros((3, 8), np.float32))["input"].shape == (3, 8)
    with pytest.raises(InputError, match=r"expected shape \(\?, 8\), got \(1, 9\)"):
        model.prepare(np.zeros((1, 9), np.float32))
    with pytest.raises(InputError, match="expected dtype float32"):
        model.prepare(np.zeros((1, 8), np.float64))


def test_an_openvino_model_object_is_not_reshaped_in_place(tmp_path: Path) -> None:
    chain = dense_chain(8, 2)
    original = chain.openvino_model()
    model = get_backend("openvino").load(original, batch=4)
    assert model.inputs is not None and model.inputs[0].shape == (None, 8)
    assert list(original.input().get_partial_shape().to_shape()) == [1, 8]


# ---- what cannot batch says so at open --------------------------------------------------------
def test_onnx_with_a_fixed_first_dimension_is_refused_naming_the_input(tmp_path: Path) -> None:
    path = dense_chain(8, 2).write_onnx(tmp_path / "fixed.onnx")
    with pytest.raises(BatchingUnsupported) as info:
        get_backend("onnx").load(path, batch=8)
    message = str(info.value)
    assert message.startswith("batch=8: batch= needs a dynamic batch dimension")
    assert "input 'input' of fixed.onnx has shape (1, 8): its first dimension is fixed" in message


def test_an_openvino_model_that_pins_its_batch_is_refused(tmp_path: Path) -> None:
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 8], ov.Type.f32, name="x")
    x.output(0).get_tensor().set_names({"x"})
    flat = ops.reshape(x, ops.constant(np.array([1, 8], np.int64)), special_zero=False)
    y = ops.relu(flat)
    y.output(0).get_tensor().set_names({"y"})
    model = ov.Model([ops.result(y)], [x], "pinned")
    with pytest.raises(BatchingUnsupported, match=r"batch= needs a dynamic batch .*'y'.*\(1, 8\)"):
        get_backend("openvino").load(model, batch=4)


def test_litert_on_the_edge_tpu_refuses_batch(tmp_path: Path) -> None:
    path = dense_chain(8, 2).write_tflite(tmp_path / "m.tflite")
    with pytest.raises(BatchingUnsupported, match="Edge TPU.*fixed batch"):
        get_backend("litert").load(path, batch=4, device="edgetpu")


@pytest.mark.parametrize("module", ["coral", "memryx", "openvino_legacy"])
def test_backends_that_cannot_batch_refuse_batch_n_at_open(module: str, tmp_path: Path) -> None:
    import importlib

    load_fn = importlib.import_module(f"aioaccel.backends.{module}").load
    with pytest.raises(BatchingUnsupported, match=r"batch=8: the .* backend cannot batch"):
        load_fn(tmp_path / "model.file", batch=8)


@pytest.mark.parametrize("module", ["coral", "memryx", "openvino_legacy"])
def test_auto_picks_1_for_backends_that_cannot_batch(module: str, tmp_path: Path) -> None:
    import importlib

    load_fn = importlib.import_module(f"aioaccel.backends.{module}").load
    loads: list[int | None] = []

    def load_backend(n: int | None) -> Model:
        loads.append(n)
        if n is None:  # the runtime itself is simulated elsewhere; the refusal is what counts
            return Model(stages=[])
        return load_fn(tmp_path / "model.file", batch=n)  # type: ignore[no-any-return]

    model = load_model(load_backend, "auto", 0.002)
    assert loads == [32, None] and model.batch == 1
    assert "cannot batch" in model.info["batch"]["reason"]


def test_the_function_backend_takes_batch() -> None:
    model = get_backend("function").load(lambda x: x, batch=8)
    assert model.batch == 8
    assert get_backend("function").load(lambda x: x).batch == 1


# ---- batch="auto" on real runtimes ----------------------------------------------------------
def test_auto_picks_more_than_1_on_a_small_onnx_model(tmp_path: Path) -> None:
    path = dense_chain(32, 4, dynamic_batch=True).write_onnx(tmp_path / "m.onnx")
    onnx = get_backend("onnx")
    model = load_model(lambda n: onnx.load(path, batch=n), "auto", 0.002)
    assert model.batch > 1
    info = model.info["batch"]
    assert info["size"] == model.batch
    assert [m["size"] for m in info["measurements"]][:2] == [1, 2]
    chosen = next(m for m in info["measurements"] if m["size"] == model.batch)
    assert chosen["items_per_second"] > 1.15 * info["measurements"][0]["items_per_second"]


def test_auto_picks_1_on_an_onnx_model_with_a_fixed_batch_dimension(tmp_path: Path) -> None:
    path = dense_chain(32, 4).write_onnx(tmp_path / "m.onnx")
    onnx = get_backend("onnx")
    model = load_model(lambda n: onnx.load(path, batch=n), "auto", 0.002)
    assert model.batch == 1
    assert model.inputs is not None and model.inputs[0].shape == (1, 32)
    assert "dynamic batch dimension" in model.info["batch"]["reason"]


@pytest.mark.parametrize("backend", ["litert", "openvino", "openvino-async"])
def test_auto_measures_litert_and_openvino_stages(backend: str, tmp_path: Path) -> None:
    chain = dense_chain(32, 4)
    model = load_model(lambda n: load(backend, chain, tmp_path, batch=n), "auto", 0.002,
                       sizes=(1, 2, 4))
    sizes = [m["size"] for m in model.info["batch"]["measurements"]]
    assert sizes == [1, 2, 4] and model.batch in (1, 2, 4)
    assert all(m["call_seconds"] > 0 for m in model.info["batch"]["measurements"])
    if model.close is not None:
        model.close()


# ---- ONNX Runtime thread defaults -------------------------------------------------------------
def test_onnx_sessions_leave_a_core_to_the_loop_and_do_not_spin(tmp_path: Path,
                                                                monkeypatch: Any) -> None:
    import os

    from aioaccel.backends import onnx

    path = dense_chain(8, 2, dynamic_batch=True).write_onnx(tmp_path / "m.onnx")
    for cores, replicas, threads in ((2, 1, 1), (8, 1, 7), (8, 2, 3), (1, 1, 1)):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        model = onnx.load(path, replicas=replicas)
        assert model.info["num_threads"] == threads
        stage: Any = model.stages[0].factory()
        options = stage.session.get_session_options()
        assert options.intra_op_num_threads == threads
        assert options.get_session_config_entry(onnx.SPINNING) == "0"


def test_onnx_session_options_may_turn_spinning_back_on(tmp_path: Path) -> None:
    from aioaccel.backends import onnx

    path = dense_chain(8, 2, dynamic_batch=True).write_onnx(tmp_path / "m.onnx")
    model = onnx.load(path, num_threads=2, session_options=lambda o: (
        o.add_session_config_entry(onnx.SPINNING, "1")))
    stage: Any = model.stages[0].factory()
    options = stage.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry(onnx.SPINNING) == "1"


# ---- through aioaccel.open: the refusal reaches the caller at open, nothing is left behind ----
@pytest.mark.anyio
async def test_open_with_batch_fails_at_open_on_a_fixed_onnx_model(tmp_path: Path) -> None:
    import aioaccel

    path = dense_chain(8, 2).write_onnx(tmp_path / "fixed.onnx")
    with pytest.raises(BatchingUnsupported, match=r"'input' of fixed.onnx has shape \(1, 8\)"):
        async with aioaccel.open(path, batch=8):
            pass


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["coral", "memryx", "openvino-legacy"])
async def test_open_with_batch_fails_at_open_where_the_runtime_cannot_batch(
        backend: str, tmp_path: Path) -> None:
    import contextlib

    import aioaccel
    from aioaccel.testing.coral import simulate_coral
    from aioaccel.testing.memryx import simulate_memryx, write_dfp

    chain = dense_chain(16, 2, inputs=8)
    if backend == "coral":
        target: Any = chain.write_tflite(tmp_path / "m.tflite")
        simulation: Any = simulate_coral(tpus=1)
    elif backend == "memryx":
        target = write_dfp(tmp_path / "m.dfp", chain)
        simulation = simulate_memryx()
    else:
        target = chain.write_openvino(tmp_path / "m.xml")
        simulation = contextlib.nullcontext()
    with simulation:
        with pytest.raises(BatchingUnsupported, match=f"batch=8: the {backend} backend cannot"):
            async with aioaccel.open(target, backend=backend, batch=8):
                pass
