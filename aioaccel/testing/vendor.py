"""The vendor APIs called directly, in the calling thread: the baseline that the demo and the
benchmarks compare aioaccel against.

``raw_model(backend, target)`` returns ``f(x) -> output array`` for a one-input, one-output
model, with one runtime thread (``num_threads=1``, ``INFERENCE_NUM_THREADS=1``) unless told.
``target`` is a model file, or an ``openvino.Model`` for OpenVINO.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["raw_model", "raw_segment"]


def raw_model(backend: str, target: Any, *, threads: int | None = 1) -> Callable[[np.ndarray], Any]:
    if backend == "litert":
        from ..backends.litert import interpreter_module

        interp = interpreter_module().Interpreter(model_path=str(target), num_threads=threads)
        interp.allocate_tensors()
        index = interp.get_input_details()[0]["index"]
        out = interp.get_output_details()[0]["index"]

        def run_litert(x: np.ndarray) -> Any:
            interp.set_tensor(index, x)
            interp.invoke()
            return interp.get_tensor(out)
        return run_litert
    if backend == "onnx":
        from ..backends.onnx import runtime

        ort = runtime()
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    if backend == "openvino":
        from ..backends.openvino import runtime

        ov = runtime()
        core = ov.Core()
        model = target if isinstance(target, ov.Model) else core.read_model(str(target))
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY",
                                  "INFERENCE_PRECISION_HINT": "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        request = core.compile_model(model, "CPU", config).create_infer_request()
        return lambda x: request.infer({0: x})[0]
    raise ValueError(f"no raw vendor loop for backend {backend!r}")


def raw_segment(backend: str, target: Any, *,
                threads: int | None = None) -> Callable[[dict[str, np.ndarray]],
                                                        dict[str, np.ndarray]]:
    """The vendor API for one model file of any number of inputs and outputs:
    ``f({input name: array}) -> {output name: array}``, names as the file declares them."""
    if backend == "litert":
        from ..backends.litert import interpreter_module

        interp = interpreter_module().Interpreter(model_path=str(target), num_threads=threads)
        interp.allocate_tensors()
        inputs = {d["name"]: (d["index"], tuple(d["shape"])) for d in interp.get_input_details()}
        outputs = [(d["name"], d["index"]) for d in interp.get_output_details()]

        def run_litert(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            for name, (index, shape) in inputs.items():
                if feed[name].shape != shape:
                    interp.resize_tensor_input(index, feed[name].shape)
                    interp.allocate_tensors()
                    inputs[name] = (index, feed[name].shape)
                interp.set_tensor(index, feed[name])
            interp.invoke()
            return {name: interp.get_tensor(index) for name, index in outputs}
        return run_litert
    if backend == "onnx":
        from ..backends.onnx import runtime

        ort = runtime()
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return lambda feed: dict(zip(names, session.run(names, feed), strict=True))
    if backend == "openvino":
        from ..backends.openvino import declared_names, port_name, runtime

        ov = runtime()
        core = ov.Core()
        model = target if isinstance(target, ov.Model) else core.read_model(str(target))
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = core.compile_model(model, "CPU", config)
        declared_in, declared_out = declared_names(target)
        in_names = [port_name(p, declared_in) for p in compiled.inputs]
        out_names = [port_name(p, declared_out) for p in compiled.outputs]
        request = compiled.create_infer_request()

        def run_openvino(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            request.infer({i: feed[name] for i, name in enumerate(in_names)})
            return {name: request.get_output_tensor(i).data.copy()
                    for i, name in enumerate(out_names)}
        return run_openvino
    raise ValueError(f"no raw vendor loop for backend {backend!r}")
