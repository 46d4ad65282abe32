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

__all__ = ["raw_model"]


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
