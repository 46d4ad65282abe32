"""OpenVINO: infer requests started asynchronously as a device stage, or sync requests on
worker threads.

``aioaccel.open("model.xml")``, ``aioaccel.open("model.onnx", backend="openvino")``, an
``openvino.Model``, or a list of them (a pipeline, one set of requests per model). With
``api="async"`` a feeder thread starts each item on an idle infer request
(``start_async``; it blocks while every request is busy), the runtime runs ``jobs`` requests at
once, and each request's own thread waits for it, copies the outputs out of the request before
it is reused, and hands them to the bridge. No Python callback runs on
OpenVINO's threads (``AsyncInferQueue`` drops a failed job's callback and then fails every later
``start_async`` with the first error; see :class:`OpenVINOStage`). A failed item fails alone
with :class:`~aioaccel.InferenceError`, and its request is replaced before the next item.
Inputs are copied into the request (``share_inputs=False``), so the caller may reuse its arrays
while items are in flight.

Two ways to drive the runtime (``api=``):

* ``"async"`` -- the above: right for GPU/NPU/VPU devices that run many requests at once.
* ``"sync"`` -- one ``InferRequest`` per worker thread (``replicas``), each calling the
  GIL-releasing ``infer``. On the CPU this is faster: an asynchronous completion costs GIL
  hand-offs between three threads per item (measured on a 0.1 ms model: the vendor's own
  AsyncInferQueue loop reaches 0.27x of its sync loop; see docs/performance.md). After a
  failed item the worker's request is replaced too.
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

import atexit
import importlib.util
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import numpy as np

from ..batching import (
    BatchingUnsupported,
    backend_batch,
    batched_model,
    require_batch_axis,
)
from ..errors import ModelLoadError
from ..stages import BlockingStage, Complete, DeviceStage, StageSpec
from ..tensors import TensorSpec
from . import Model, require
from ._exit import NativeCalls
from ._segments import SegmentIO, Wiring, build_model, check_file, plan

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


class _Slot:
    """One infer request and the thread that waits for whatever it runs."""

    def __init__(self, request: Any):
        self.request = request
        self.jobs: SimpleQueue[Any] = SimpleQueue()
        self.thread: threading.Thread | None = None


class OpenVINOStage(DeviceStage):
    """``jobs`` infer requests running at once: the feeder starts each item with
    ``start_async`` on an idle request; each request has a thread that waits for it, copies
    the outputs out and completes the item, so requests finish in any order.

    Not an ``AsyncInferQueue``: when one of its jobs fails, the queue never runs that job's
    callback (the item would be in flight forever), and every later ``start_async`` raises the
    first error. ``InferRequest.wait`` raises a failure instead, so the failed item fails alone;
    its request is then replaced by a new one before it serves again (a request that failed is
    not trusted; ``create_infer_request`` costs microseconds, recompiling the model thousands
    of times more). No Python code runs on OpenVINO's threads.
    """

    def __init__(self, compiled: Any, jobs: int, wiring: Wiring):
        self.compiled = compiled
        self.jobs = jobs
        self._wiring = wiring
        self._outputs = wiring.outputs
        self._complete: Complete | None = None
        self._slots: list[_Slot] = []
        self._idle: SimpleQueue[_Slot] = SimpleQueue()
        self._lock = threading.Lock()
        self._exiting = False
        #: requests replaced after a failure (for tests and stats)
        self.recreated = 0

    def start(self, complete: Complete) -> None:
        self._complete = complete
        jobs = self.jobs or int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        for n in range(max(1, jobs)):
            slot = _Slot(self.compiled.create_infer_request())
            slot.thread = threading.Thread(target=self._wait_for, args=(slot,), daemon=True,
                                           name=f"aioaccel-openvino-{id(self):x}-request{n}")
            slot.thread.start()
            self._slots.append(slot)
            self._idle.put(slot)
        _running.add(self)

    def submit(self, token: object, tensors: dict[str, np.ndarray]) -> None:
        slot = self._idle.get()  # blocks while every request is busy: backpressure
        with self._lock:  # against _finish_at_exit: nothing starts after it has begun
            if self._exiting:
                self._idle.put(slot)
                raise RuntimeError("the interpreter is exiting: OpenVINO takes no more items")
            try:
                # share_inputs=False: copied in, so the caller may reuse its arrays at once
                # by port index: the runtime's own names for a port may differ from the file's
                slot.request.start_async(dict(enumerate(self._wiring.gather_list(tensors))),
                                         share_inputs=False)
            except BaseException:
                self._replace(slot)  # this item fails alone (the pipeline reports it)
                raise
            slot.jobs.put((token, tensors))

    def read_outputs(self, request: Any) -> dict[str, np.ndarray]:
        """Copy the outputs out of the request (it is reused as soon as we return)."""
        return {name: request.get_output_tensor(i).data.copy()
                for i, name in enumerate(self._outputs)}

    def _wait_for(self, slot: _Slot) -> None:
        complete = self._complete
        assert complete is not None
        while (job := slot.jobs.get()) is not _STOP:
            token, tensors = job
            try:
                slot.request.wait()  # releases the GIL; raises what failed this item
                outputs = self._wiring.pass_on(tensors, self.read_outputs(slot.request))
            except BaseException as exc:
                self._replace(slot)
                complete(token, None, exc)
                continue
            self._idle.put(slot)
            complete(token, outputs, None)

    def _replace(self, slot: _Slot) -> None:
        """A request that failed serves no more items: a new one takes its place."""
        try:
            slot.request = self.compiled.create_infer_request()
            self.recreated += 1
        except BaseException:
            pass  # cannot make one: the old one is better than a lost slot
        self._idle.put(slot)

    def close(self) -> None:
        """Let what was started finish, then stop the request threads."""
        self._stop(None)
        self._slots = []  # release the requests now, not at collection
        while not self._idle.empty():
            self._idle.get()

    def _stop(self, timeout: float | None) -> None:
        with self._lock:
            stopping = [] if self._exiting else self._slots
            self._exiting = True
            for slot in stopping:
                slot.jobs.put(_STOP)  # after whatever it runs: that is waited for first
        _running.discard(self)
        for slot in stopping:
            if slot.thread is not None:
                slot.thread.join(timeout)


_STOP = object()
#: async stages whose requests may be running: finished before the interpreter exits
_running: weakref.WeakSet[OpenVINOStage] = weakref.WeakSet()


@atexit.register
def _finish_at_exit() -> None:
    """A runner never closed may leave requests running at exit. Interpreter finalization then
    stops daemon threads where they stand, inside OpenVINO's C++ ``wait`` (which aborts the
    process), or OpenVINO unloads under running requests: let them finish first, while every
    thread still runs. (Sync stages use :class:`~aioaccel.backends._exit.NativeCalls`.)"""
    for stage in list(_running):
        stage._stop(timeout=10.0)


class OpenVINOSyncStage(BlockingStage):
    """One infer request, driven synchronously by its own worker thread."""

    def __init__(self, compiled: Any, wiring: Wiring):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self._wiring = wiring
        self._outputs = wiring.outputs
        self._calls = NativeCalls()  # finished before the interpreter exits

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self.request
        with self._calls:
            # share_inputs=False: the input is copied in, so the caller's array is never read
            # by the runtime behind its back
            try:
                request.infer(dict(enumerate(self._wiring.gather_list(tensors))),
                              share_inputs=False)
            except BaseException:
                # this item fails alone; a request that failed serves no more items
                self.request = self.compiled.create_infer_request()
                raise
        outputs = {name: request.get_output_tensor(i).data.copy()
                   for i, name in enumerate(self._outputs)}
        return self._wiring.pass_on(tensors, outputs)

    def close(self) -> None:
        self._calls.forget()


def _read(core: Any, item: Any, ov: Any) -> Any:
    if isinstance(item, ov.Model):
        return item
    if isinstance(item, (str, os.PathLike)):
        path = check_file(Path(item))
        if path.suffix.lower() == ".xml":  # an IR: its weights are beside it
            check_file(path.with_suffix(".bin"), f"weights file of {path.name}")
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


def _batchable(model: Any, batch: int, label: str, ov: Any) -> Any:
    """A copy of ``model`` whose inputs take any number of rows on axis 0."""
    model = model.clone()
    shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        spec = _spec(port, port.get_any_name()) if shape.rank.is_static else None
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
                f"input {names} that OpenVINO cannot reshape to a dynamic first dimension "
                f"({_reason(exc)}); open it without batch=") from exc
    for port in model.outputs:
        if port.get_partial_shape().rank.is_static:
            require_batch_axis([_spec(port, port.get_any_name())], batch, "output", label)
    return model


def load(target: Any, *, replicas: int = 1, device: str = "CPU", api: str = "auto",
         jobs: int = 0, hint: str | None = None, precision: str | None = None,
         config: dict[str, Any] | None = None, cast: bool = False,
         max_input_bytes: int | None = None, runner_name: str = "runner",
         batch: int | None = None) -> Model:
    if only_legacy_api() and not any(type(t).__module__.startswith("openvino")
                                     for t in (target if isinstance(target, (list, tuple))
                                               else [target])):
        from . import openvino_legacy

        return openvino_legacy.load(target, replicas=replicas, device=device,
                                    config=config, cast=cast, max_input_bytes=max_input_bytes,
                                    runner_name=runner_name, batch=batch)
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
        models = [_batchable(m, batch, _label(i, item), ov)
                  for i, (m, item) in enumerate(zip(models, items, strict=True))]
    compiled = [_compile(core, m, item, device, properties, ov)
                for m, item in zip(models, items, strict=True)]
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
    built = build_model(io, specs, cast=cast, max_input_bytes=max_input_bytes,
                        close=compiled.clear,
                        info={"backend": "openvino", "device": device, "api": api,
                              "openvino": ov.get_version(), "properties": properties})
    return batched_model(built, batch, cast=cast, max_input_bytes=max_input_bytes)


def _label(index: int, item: Any) -> str:
    return Path(item).name if isinstance(item, (str, os.PathLike)) else f"model {index}"


def _compile(core: Any, model: Any, item: Any, device: str, properties: dict[str, Any],
             ov: Any) -> Any:
    try:
        return core.compile_model(model, device, properties)
    except RuntimeError as exc:
        raise ModelLoadError(f"OpenVINO {ov.get_version()} cannot compile "
                             f"{_label(0, item)!r} for {device}: {_reason(exc)}") from exc
