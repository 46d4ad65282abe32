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
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DeviceError, ModelLoadError
from ..stages import BlockingStage, Complete, DeviceStage, StageSpec
from ..tensors import TensorSpec
from . import Model, require
from ._segments import SegmentIO, Wiring, build_model, plan

__all__ = ["OpenVINOStage", "OpenVINOSyncStage", "load"]


def runtime() -> Any:
    return require("openvino", "openvino")


def only_legacy_api() -> bool:
    """Whether the installed OpenVINO is old enough to have only the Inference Engine API.
    Imports the openvino package: call it from the load, on a worker thread."""
    try:
        return (importlib.util.find_spec("openvino.runtime") is None
                and importlib.util.find_spec("openvino.inference_engine") is not None)
    except ImportError:  # no openvino at all: runtime() says what to install
        return False


def _spec(port: Any, name: str) -> TensorSpec:
    shape = tuple(None if d.is_dynamic else d.get_length() for d in port.get_partial_shape())
    dtype = np.dtype(port.get_element_type().to_dtype()).name
    return TensorSpec(name, dtype, shape)


def port_name(port: Any, declared: Sequence[str]) -> str:
    """The name a port has in the model file. A port can carry several tensor names, and
    ``get_any_name()`` may return an internal one (an ONNX ``If`` inlined by the frontend
    names its output after the branch), so the file's own name wins when the port has it."""
    names = port.get_names()
    for name in declared:
        if name in names:
            return name
    return str(port.get_any_name())


def declared_names(item: Any) -> tuple[list[str], list[str]]:
    """(inputs, outputs) as the model file declares them; empty when it cannot be read
    without a converter (IR, ``openvino.Model``: OpenVINO's own names are the file's)."""
    if not isinstance(item, (str, os.PathLike)) or Path(item).suffix.lower() != ".onnx":
        return [], []
    try:
        import onnx
    except ImportError:
        return [], []
    graph = onnx.load(os.fspath(item), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return ([i.name for i in graph.input if i.name not in initializers],
            [o.name for o in graph.output])


class OpenVINOStage(DeviceStage):
    def __init__(self, compiled: Any, jobs: int, wiring: Wiring):
        self.compiled = compiled
        self.jobs = jobs
        self._wiring = wiring
        self._outputs = wiring.outputs
        self._complete: Complete | None = None
        self.queue: Any = None

    def start(self, complete: Complete) -> None:
        ov = runtime()
        self._complete = complete
        self.queue = ov.AsyncInferQueue(self.compiled, self.jobs)
        self.queue.set_callback(self._on_done)

    def submit(self, token: object, tensors: dict[str, np.ndarray]) -> None:
        # by port index: the runtime's own names for a port may differ from the file's
        feed = dict(enumerate(self._wiring.gather_list(tensors)))
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
            outputs = self._wiring.pass_on(tensors, self.read_outputs(request))
        except BaseException as exc:
            complete(token, None, exc)
            return
        complete(token, outputs, None)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.wait_all()


class OpenVINOSyncStage(BlockingStage):
    """One infer request, driven synchronously by its own worker thread."""

    def __init__(self, compiled: Any, wiring: Wiring):
        self.request = compiled.create_infer_request()
        self._wiring = wiring
        self._outputs = wiring.outputs

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self.request
        # share_inputs=False: the input is copied in, so the caller's array is never read
        # by the runtime behind its back
        request.infer(dict(enumerate(self._wiring.gather_list(tensors))), share_inputs=False)
        outputs = {name: request.get_output_tensor(i).data.copy()
                   for i, name in enumerate(self._outputs)}
        return self._wiring.pass_on(tensors, outputs)


def _read(core: Any, item: Any, ov: Any) -> Any:
    if isinstance(item, ov.Model):
        return item
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {str(path)!r}")
        try:
            return core.read_model(str(path))
        except RuntimeError as exc:  # the frontend cannot convert an op, or cannot parse
            raise ModelLoadError(f"OpenVINO {ov.get_version()} cannot convert "
                                 f"{str(path)!r}: {_reason(exc)}") from exc
    raise TypeError(f"expected an openvino.Model or a model file path, got {type(item).__name__}")


def _reason(exc: BaseException) -> str:
    """The runtime's message without its source-file preamble, on one line."""
    lines = [line.strip() for line in str(exc).splitlines()]
    useful = [line for line in lines if line and not line.startswith(("Exception from src",
                                                                      "Check 'false' failed"))]
    return " ".join(useful or lines)[:600]


def _segment(label: str, compiled: Any, item: Any) -> SegmentIO:
    declared_in, declared_out = declared_names(item)
    return SegmentIO(label, [_spec(p, port_name(p, declared_in)) for p in compiled.inputs],
                     [_spec(p, port_name(p, declared_out)) for p in compiled.outputs])


def load(target: Any, *, replicas: int = 1, device: str = "CPU", api: str = "auto",
         jobs: int = 0, hint: str | None = None, precision: str | None = None,
         config: dict[str, Any] | None = None, cast: bool = False,
         max_input_bytes: int | None = None, runner_name: str = "runner") -> Model:
    if only_legacy_api() and not any(type(t).__module__.startswith("openvino")
                                     for t in (target if isinstance(target, (list, tuple))
                                               else [target])):
        from . import openvino_legacy

        return openvino_legacy.load(target, replicas=replicas, device=device,
                                    config=config, cast=cast, max_input_bytes=max_input_bytes,
                                    runner_name=runner_name)
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
    compiled = [_compile(core, _read(core, item, ov), item, device, properties, ov)
                for item in items]
    io = [_segment(_label(i, item), c, item) for i, (c, item) in enumerate(zip(compiled, items,
                                                                              strict=True))]
    wirings = plan(io)
    specs = []
    for i, model in enumerate(compiled):
        def factory(model: Any = model, wiring: Wiring = wirings[i]
                    ) -> OpenVINOStage | OpenVINOSyncStage:
            if api == "sync":
                return OpenVINOSyncStage(model, wiring)
            return OpenVINOStage(model, jobs, wiring)

        name = f"openvino{i}" if len(compiled) > 1 else "openvino"
        specs.append(StageSpec(name, factory, replicas, device=api == "async"))
    return build_model(io, specs, cast=cast, max_input_bytes=max_input_bytes,
                       close=compiled.clear,
                       info={"backend": "openvino", "device": device, "api": api,
                             "openvino": ov.get_version(), "properties": properties})


def _label(index: int, item: Any) -> str:
    return Path(item).name if isinstance(item, (str, os.PathLike)) else f"model {index}"


def _compile(core: Any, model: Any, item: Any, device: str, properties: dict[str, Any],
             ov: Any) -> Any:
    try:
        return core.compile_model(model, device, properties)
    except RuntimeError as exc:
        raise ModelLoadError(f"OpenVINO {ov.get_version()} cannot compile "
                             f"{_label(0, item)!r} for {device}: {_reason(exc)}") from exc
