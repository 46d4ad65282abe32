"""OpenVINO: ``AsyncInferQueue`` as a callback-device stage, or sync requests on worker threads.

``aioaccel.open("model.xml")``, ``aioaccel.open("model.onnx", backend="openvino")``, an
``openvino.Model``, or a list of them (a pipeline, one queue per model). A feeder thread calls
``start_async(inputs, userdata=token)``, which blocks while every infer request is busy; the
runtime completes requests on its own threads, in any order, and the callback copies the
outputs out of the request before it is reused and hands them to the bridge.

The callback never raises: an exception escaping an ``AsyncInferQueue`` callback makes the
next ``start_async`` raise and the one after abort the process. Inputs are copied into the
request (``share_inputs=False``), so the caller may reuse its arrays while items are in flight.

Two ways to drive the runtime (``api=``):

* ``"async"`` -- the above: right for GPU/NPU/VPU devices that run many requests at once.
* ``"sync"`` -- one ``InferRequest`` per worker thread (``replicas``), each calling the
  GIL-releasing ``infer``. On the CPU this is faster: every ``AsyncInferQueue`` completion runs
  a Python callback on an OpenVINO thread, which costs GIL hand-offs between three threads per
  item (measured on a 0.1 ms model: the vendor's own AsyncInferQueue loop reaches 0.27x of its
  sync loop; see docs/performance.md).
* ``"auto"`` (default) -- ``"sync"`` on the CPU, ``"async"`` elsewhere.

Options: ``device`` ("CPU", "GPU", "NPU", "AUTO", ...), ``jobs`` (async: infer requests; 0 = the
runtime's optimal number), ``hint`` ("THROUGHPUT" or "LATENCY"; default THROUGHPUT, or LATENCY
for one sync worker), ``precision`` (inference
precision; on the CPU it defaults to "f32", because OpenVINO otherwise picks bf16/f16 on CPUs
that have it, and results drift), ``config`` (more properties for ``compile_model``),
``cast``, ``max_input_bytes``. With several models, CPU pinning is turned off: pinned one-stream
models on different threads do not run in parallel.

``batch=N`` (N >= 2): stages receive up to N items joined along axis 0. A model whose first
dimension is static (a batch of 1) is reshaped to a dynamic first dimension before it is
compiled (a copy: an ``openvino.Model`` passed in is left as it is); a model that cannot be
reshaped, or whose outputs do not follow the batch, fails at open naming the tensor. Partial
batches are not padded: measured here, a dynamic batch of 5 runs as fast as a static one of
5 and 1.4x faster than 5 rows padded to 16 (width-512 MLP), so padding would only cost.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..batching import BatchingUnsupported, backend_batch, batched_specs, require_batch_axis
from ..errors import DeviceError
from ..stages import BlockingStage, Complete, DeviceStage, StageSpec
from ..tensors import TensorSpec
from . import Model, require
from ._segments import carry, check_chain, needed_after, validator

__all__ = ["OpenVINOStage", "OpenVINOSyncStage", "load"]


def runtime() -> Any:
    return require("openvino", "openvino")


def _spec(port: Any) -> TensorSpec:
    shape = tuple(None if d.is_dynamic else d.get_length() for d in port.get_partial_shape())
    dtype = np.dtype(port.get_element_type().to_dtype()).name
    return TensorSpec(port.get_any_name(), dtype, shape)


class OpenVINOStage(DeviceStage):
    def __init__(self, compiled: Any, jobs: int, keep: frozenset[str], last: bool):
        self.compiled = compiled
        self.jobs = jobs
        self._inputs = [port.get_any_name() for port in compiled.inputs]
        self._outputs = [port.get_any_name() for port in compiled.outputs]
        self._keep = keep
        self._last = last
        self._complete: Complete | None = None
        self.queue: Any = None

    def start(self, complete: Complete) -> None:
        ov = runtime()
        self._complete = complete
        self.queue = ov.AsyncInferQueue(self.compiled, self.jobs)
        self.queue.set_callback(self._on_done)

    def submit(self, token: object, tensors: dict[str, np.ndarray]) -> None:
        feed = {name: tensors[name] for name in self._inputs}
        try:
            self.queue.start_async(feed, userdata=(token, tensors), share_inputs=False)
        except RuntimeError as exc:  # the runtime refused: treat the device as gone
            raise DeviceError(f"OpenVINO start_async failed: {exc}") from exc

    def read_outputs(self, request: Any) -> dict[str, np.ndarray]:
        """Copy the outputs out of the request (it is reused as soon as we return)."""
        return {name: request.get_output_tensor(i).data.copy()
                for i, name in enumerate(self._outputs)}

    def _on_done(self, request: Any, userdata: Any) -> None:
        try:
            token, tensors = userdata
        except BaseException:  # never raise into the runtime
            return
        complete = self._complete
        assert complete is not None
        try:
            outputs = carry(tensors, self.read_outputs(request), self._keep, self._last)
        except BaseException as exc:
            complete(token, None, exc)
            return
        complete(token, outputs, None)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.wait_all()


class OpenVINOSyncStage(BlockingStage):
    """One infer request, driven synchronously by its own worker thread."""

    def __init__(self, compiled: Any, keep: frozenset[str], last: bool):
        self.request = compiled.create_infer_request()
        self._inputs = [port.get_any_name() for port in compiled.inputs]
        self._outputs = [port.get_any_name() for port in compiled.outputs]
        self._keep = keep
        self._last = last

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self.request
        # share_inputs=False: the input is copied in, so the caller's array is never read
        # by the runtime behind its back
        request.infer({name: tensors[name] for name in self._inputs}, share_inputs=False)
        outputs = {name: request.get_output_tensor(i).data.copy()
                   for i, name in enumerate(self._outputs)}
        return carry(tensors, outputs, self._keep, self._last)


def _read(core: Any, item: Any, ov: Any) -> Any:
    if isinstance(item, ov.Model):
        return item
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {str(path)!r}")
        return core.read_model(str(path))
    raise TypeError(f"expected an openvino.Model or a model file path, got {type(item).__name__}")


def _batchable(model: Any, batch: int, label: str, ov: Any) -> Any:
    """A copy of ``model`` whose inputs take any number of rows on axis 0."""
    model = model.clone()
    shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        spec = _spec(port) if shape.rank.is_static else None
        require_batch_axis([spec] if spec else [], batch, "input", label, fixed_ok=True)
        if shape.rank.is_static and not shape[0].is_dynamic:
            shape[0] = ov.Dimension(-1)
            shapes[port] = shape
    if shapes:
        try:
            model.reshape(shapes)
        except Exception as exc:  # the graph pins its batch (a Reshape to constants, ...)
            names = ", ".join(f"{port.get_any_name()!r} {port.get_partial_shape()}"
                              for port in shapes)
            raise BatchingUnsupported(
                f"batch={batch}: batch= needs a dynamic batch dimension, and {label} has "
                f"input {names} "
                f"and OpenVINO cannot reshape it to a dynamic first dimension ({exc}); open "
                f"it without batch=") from exc
    for port in model.outputs:
        if port.get_partial_shape().rank.is_static:
            require_batch_axis([_spec(port)], batch, "output", label)
    return model


def load(target: Any, *, replicas: int = 1, device: str = "CPU", api: str = "auto",
         jobs: int = 0, hint: str | None = None, precision: str | None = None,
         config: dict[str, Any] | None = None, cast: bool = False,
         max_input_bytes: int | None = None, batch: int | None = None) -> Model:
    batch = backend_batch(batch, "openvino")
    ov = runtime()
    if api == "auto":
        api = "sync" if device.upper().startswith("CPU") else "async"
    if api not in ("sync", "async"):
        raise ValueError(f"api must be 'auto', 'sync' or 'async', got {api!r}")
    if api == "async" and replicas != 1:
        raise ValueError("with api='async' the OpenVINO backend runs requests in parallel "
                         "through jobs=, not replicas=")
    if hint is None:
        hint = "LATENCY" if api == "sync" and replicas == 1 else "THROUGHPUT"
    if hint not in ("THROUGHPUT", "LATENCY", "CUMULATIVE_THROUGHPUT"):
        raise ValueError(f"hint must be 'THROUGHPUT' or 'LATENCY', got {hint!r}")
    items = list(target) if isinstance(target, (list, tuple)) else [target]
    core = ov.Core()
    properties: dict[str, Any] = {"PERFORMANCE_HINT": hint}
    if precision is not None or device.upper().startswith("CPU"):
        properties["INFERENCE_PRECISION_HINT"] = precision or "f32"
    if len(items) > 1 and device.upper().startswith("CPU"):
        properties["ENABLE_CPU_PINNING"] = False
    properties.update(config or {})
    models = [_read(core, item, ov) for item in items]
    if batch is not None:
        models = [_batchable(m, batch, f"model {i}", ov) for i, m in enumerate(models)]
    compiled = [core.compile_model(m, device, properties) for m in models]
    io = [(f"model {i}", [_spec(p) for p in c.inputs], [_spec(p) for p in c.outputs])
          for i, c in enumerate(compiled)]
    check_chain(io)
    keeps = needed_after([inputs for _, inputs, _ in io])
    specs = []
    for i, model in enumerate(compiled):
        def factory(model: Any = model, keep: frozenset[str] = keeps[i],
                    last: bool = i == len(compiled) - 1) -> OpenVINOStage | OpenVINOSyncStage:
            if api == "sync":
                return OpenVINOSyncStage(model, keep, last)
            return OpenVINOStage(model, jobs, keep, last)

        name = f"openvino{i}" if len(compiled) > 1 else "openvino"
        specs.append(StageSpec(name, factory, replicas, device=api == "async"))
    inputs = batched_specs(io[0][1]) if batch else io[0][1]
    return Model(stages=specs, inputs=inputs, outputs=io[-1][2],
                 prepare=validator(inputs, cast, max_input_bytes), close=compiled.clear,
                 batch=batch or 1,
                 info={"backend": "openvino", "device": device, "api": api,
                       "properties": properties})
