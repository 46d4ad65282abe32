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

import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from queue import SimpleQueue
from time import perf_counter
from typing import Any

import numpy as np

from ..batching import (
    BatchingUnsupported,
    backend_batch,
    batched_model,
    require_batch_axis,
)
from ..core import exit_guard
from ..errors import ModelLoadError
from ..stages import BlockingStage, Complete, DeviceStage, StageSpec
from ..tensors import TensorSpec
from . import Model, require
from ._exit import NativeCalls
from ._ir import declared_ports
from ._segments import SegmentIO, Wiring, build_model, check_file, ir_read_error, plan

__all__ = ["OpenVINOStage", "OpenVINOSyncStage", "Recompiling", "load"]

log = logging.getLogger(__name__)


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


def port_name(port: Any, declared: Sequence[str], own: Any = None) -> str:
    """The name a port has in the model file. A compiled port can carry several tensor names,
    and ``get_any_name()`` may return an internal one (an ONNX ``If`` inlined by the frontend
    names its output after the branch; compiling adds aliases), so the file's own name wins
    when the port has it, then the name of the model's port before it was compiled (``own``)."""
    names = port.get_names()
    for name in declared:
        if name in names:
            return name
    for candidate in (own, port):
        if candidate is not None:
            try:
                return str(candidate.get_any_name())
            except RuntimeError:  # a port without names
                continue
    raise ModelLoadError(f"an OpenVINO port has no tensor name: {port}")


def declared_names(item: Any) -> tuple[list[str], list[str]]:
    """(inputs, outputs) as the model file declares them: the ONNX graph's, the IR's names
    in declaration order; empty when it cannot be read without a converter or is not a file
    (an ``openvino.Model``: the names of its own ports are used)."""
    if not isinstance(item, (str, os.PathLike)):
        return [], []
    suffix = Path(item).suffix.lower()
    if suffix == ".xml":
        ports = declared_ports(item)
        return ([n for _, names in ports.inputs for n in names],
                [n for _, names in ports.outputs for n in names])
    if suffix != ".onnx":
        return [], []
    try:
        import onnx
    except ImportError:
        return [], []
    graph = onnx.load(os.fspath(item), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return ([i.name for i in graph.input if i.name not in initializers],
            [o.name for o in graph.output])


class Recompiling:
    """The compiled model of one segment, shared by its requests, compiled anew after an item
    fails in it.

    Measured on the CPU plugin (OpenVINO 2026.4, PP-OCRv4 detector, dynamic H and W): after
    one input fails inside the graph, the compiled model's stream graphs keep what the failed
    call left. Every later request on it -- a new one too -- fails the next input of the last
    good shape with the first error, and an input of another shape gets wrong outputs without
    an error. Only a new compiled model is clean, so a failure costs one compilation (0.2 s
    for that model, milliseconds for small ones) on the thread that saw it; requests of the
    old model that are still running finish on it, and every stage moves to the new one
    before its next item (``generation``).
    """

    def __init__(self, compiled: Any, recompile: Callable[[], Any]):
        self.compiled = compiled
        self.generation = 0
        #: compilations after a failure (for tests and stats)
        self.recompiled = 0
        self._recompile = recompile
        self._lock = threading.Lock()

    def renew(self, generation: int) -> None:
        """After a failure on ``generation``: compile again, unless another stage did."""
        with self._lock:
            if generation != self.generation or self._recompile is None:
                return
            try:
                compiled = self._recompile()
            except Exception:  # cannot compile now: the old model beats none
                log.warning("OpenVINO: recompiling after a failed item failed; the old "
                            "compiled model stays", exc_info=True)
                return
            self.compiled = compiled
            self.generation += 1
            self.recompiled += 1

    def release(self) -> None:
        """Drop the compiled model and what could compile another (the runner closed)."""
        with self._lock:
            self.compiled = None
            self._recompile = None  # type: ignore[assignment]


class _Slot:
    """One infer request and the thread that waits for whatever it runs."""

    def __init__(self, request: Any, generation: int):
        self.request = request
        self.generation = generation  # of the compiled model it was made from
        self.jobs: SimpleQueue[Any] = SimpleQueue()
        self.thread: threading.Thread | None = None


class OpenVINOStage(DeviceStage):
    """``jobs`` infer requests running at once: the feeder starts each item with
    ``start_async`` on an idle request; each request has a thread that waits for it, copies
    the outputs out and completes the item, so requests finish in any order.

    Not an ``AsyncInferQueue``: when one of its jobs fails, the queue never runs that job's
    callback (the item would be in flight forever), and every later ``start_async`` raises the
    first error. ``InferRequest.wait`` raises a failure instead, so the failed item fails alone;
    the model is then compiled anew (see :class:`Recompiling`) and each request is replaced by
    one of the new model before it serves again. No Python code runs on OpenVINO's threads.
    """

    def __init__(self, compiled: Recompiling, jobs: int, wiring: Wiring):
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
        holder = self.compiled
        jobs = self.jobs or int(holder.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        for n in range(max(1, jobs)):
            slot = _Slot(holder.compiled.create_infer_request(), holder.generation)
            slot.thread = threading.Thread(target=self._wait_for, args=(slot,), daemon=True,
                                           name=f"aioaccel-openvino-{id(self):x}-request{n}")
            slot.thread.start()
            self._slots.append(slot)
            self._idle.put(slot)
        exit_guard.watch(self, exit_guard.STAGES)  # its requests finish before the exit

    def submit(self, token: object, tensors: dict[str, np.ndarray]) -> None:
        slot = self._idle.get()  # blocks while every request is busy: backpressure
        with self._lock:  # against stop_at_exit: nothing starts after it has begun
            if self._exiting:
                self._idle.put(slot)
                raise RuntimeError("the interpreter is exiting: OpenVINO takes no more items")
            try:
                if slot.generation != self.compiled.generation:  # recompiled after a failure
                    self._renew(slot)
                # share_inputs=False: copied in, so the caller may reuse its arrays at once
                # by port index: the runtime's own names for a port may differ from the file's
                slot.request.start_async(dict(enumerate(self._wiring.gather_list(tensors))),
                                         share_inputs=False)
            except BaseException:
                self._failed(slot)  # this item fails alone (the pipeline reports it)
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
                self._failed(slot)
                complete(token, None, exc)
                continue
            self._idle.put(slot)
            complete(token, outputs, None)

    def _failed(self, slot: _Slot) -> None:
        """After a failure the model is compiled anew, and the slot serves again with a
        request of the new one (see :class:`Recompiling`)."""
        self.compiled.renew(slot.generation)
        try:
            self._renew(slot)
        except BaseException:
            pass  # cannot make one: the old request is better than a lost slot
        self._idle.put(slot)

    def _renew(self, slot: _Slot) -> None:
        holder = self.compiled
        generation, compiled = holder.generation, holder.compiled
        slot.request = compiled.create_infer_request()
        slot.generation = generation
        self.recreated += 1

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
        exit_guard.forget(self, exit_guard.STAGES)
        deadline = None if timeout is None else perf_counter() + timeout
        for slot in stopping:
            if slot.thread is not None:
                slot.thread.join(None if deadline is None else max(0.0, deadline - perf_counter()))

    def stop_at_exit(self, timeout: float) -> None:
        """A runner never closed may leave requests running at exit; interpreter finalization
        would then end their threads inside OpenVINO's C++ ``wait`` (which aborts the process),
        or OpenVINO would unload under them: the exit hook lets them finish first, while every
        thread still runs, and nothing starts after. (Sync stages use
        :class:`~aioaccel.backends._exit.NativeCalls`.)"""
        self._stop(timeout)


_STOP = object()


#: element types whose request tensors NumPy can write in place (others go through OpenVINO's
#: own conversion: strings, bf16, sub-byte types)
_IN_PLACE_KINDS = frozenset("biuf")
#: inputs up to this size are copied into the request's own tensor; larger ones are shared
#: with the request for the call (a copy of a few MB costs more than wrapping it)
SHARE_ABOVE = 256 * 1024


class _Input:
    """One input of a sync request: where it comes from and the request tensor it fills."""

    __slots__ = ("index", "key", "shared", "tensor", "view")

    def __init__(self, index: int, key: str, tensor: Any):
        self.index = index
        self.key = key
        self.tensor = tensor       # the request's own input tensor
        self.view: np.ndarray | None = None  # its data, for the shape it has now
        self.shared = False        # the request holds a caller's array instead of ``tensor``


class _Output:
    """One output of a sync request with a static shape: the array the request writes it
    into (set with ``set_output_tensor``, so OpenVINO's contract, not chance, says where the
    result is)."""

    __slots__ = ("array", "handed_out", "index")

    def __init__(self, index: int, array: np.ndarray):
        self.index = index
        self.array = array
        #: large: the array goes to the caller, and a fresh one is set before the next call
        self.handed_out = array.nbytes > SHARE_ABOVE


class OpenVINOSyncStage(BlockingStage):
    """One infer request, driven synchronously by its own worker thread.

    The per-call path is what a tuned raw loop does: each input is written into the request's
    own tensor (its shape set only when it changes; inputs over :data:`SHARE_ABOVE` bytes are
    shared with the request instead of copied), ``infer()`` runs with no argument to convert,
    and each output is copied out once (results are the caller's to keep: the next call
    overwrites the request's tensors). An output of static shape is written into an array of
    ours set as the request's output tensor, so copying it out needs no tensor lookup; one
    over :data:`SHARE_ABOVE` bytes is handed out as it is, and a fresh array set before the
    next call (a copy of a few MB costs more than setting a tensor). After a failed item the
    model is compiled anew (see :class:`Recompiling`) and the stage takes a request of the
    new one.
    """

    def __init__(self, compiled: Recompiling, wiring: Wiring):
        self.compiled = compiled
        self._wiring = wiring
        self._outputs = wiring.outputs
        self._calls = NativeCalls()  # finished before the interpreter exits
        self._bind()

    def _bind(self) -> None:
        """Take a request of the current compiled model, its input tensors, and arrays of
        ours for its static outputs."""
        holder = self.compiled
        generation, request = holder.generation, holder.compiled.create_infer_request()
        inputs = [_Input(i, key, request.get_input_tensor(i))
                  for i, (_, key) in enumerate(self._wiring.feeds)]
        self._in_place = all(_writable(port) for port in request.model_inputs)
        #: per output: an _Output (static shape, plain NumPy type), or None (the request
        #: allocates it: read after each call)
        owned: list[_Output | None] = []
        for i, port in enumerate(request.model_outputs):
            shape = port.get_partial_shape()
            if not (self._in_place and _writable(port) and shape.is_static):
                owned.append(None)
                continue
            array = np.empty(tuple(port.get_shape()), port.get_element_type().to_dtype())
            request.set_output_tensor(i, _tensor_of(array))
            owned.append(_Output(i, array))
        self._owned = owned
        self._fresh = [o for o in owned if o is not None and o.handed_out]
        self.request, self._inputs, self._generation = request, inputs, generation

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._generation != self.compiled.generation:  # recompiled after a failure
            self._bind()
        request = self.request
        with self._calls:
            try:
                if self._in_place:
                    for slot in self._inputs:
                        self._fill(request, slot, tensors[slot.key])
                    for out in self._fresh:  # the last call's array is the caller's now
                        out.array = np.empty_like(out.array)
                        request.set_output_tensor(out.index, _tensor_of(out.array))
                    request.infer(share_outputs=True)  # outputs are copied once, below
                else:  # OpenVINO converts (share_inputs=False: copied in)
                    request.infer(dict(enumerate(self._wiring.gather_list(tensors))),
                                  share_inputs=False, share_outputs=True)
            except BaseException:
                self._recover()  # this item fails alone; the next one gets a clean model
                raise
        outputs = {}
        for i, (name, owned) in enumerate(zip(self._outputs, self._owned, strict=True)):
            if owned is None:  # read after the call: a dynamic output is reallocated per shape
                outputs[name] = request.get_output_tensor(i).data.copy()
            else:
                outputs[name] = owned.array if owned.handed_out else owned.array.copy()
        return self._wiring.pass_on(tensors, outputs)

    def _recover(self) -> None:
        self.compiled.renew(self._generation)
        try:
            self._bind()
        except Exception:  # the runner is closing, or OpenVINO cannot: the next item says
            log.debug("OpenVINO: no new request after a failed item", exc_info=True)

    @staticmethod
    def _fill(request: Any, slot: _Input, value: np.ndarray) -> None:
        """Put ``value`` where the request reads input ``slot`` from."""
        if value.nbytes > SHARE_ABOVE:  # wrap it (the caller keeps it until its result)
            request.set_input_tensor(slot.index, _tensor_of(value))
            slot.shared = True
            return
        if slot.shared:  # a caller's array was bound last time: back to our own tensor
            request.set_input_tensor(slot.index, slot.tensor)
            slot.shared = False
            slot.view = None
        view = slot.view
        if view is None or view.shape != value.shape:
            slot.tensor.shape = value.shape  # reallocates for a new dynamic shape
            slot.view = view = slot.tensor.data
        np.copyto(view, value, casting="no")  # the validator checked the dtype: never casts

    def close(self) -> None:
        self._calls.forget()


def _tensor_of(value: np.ndarray) -> Any:
    return runtime().Tensor(value, shared_memory=True)


def _writable(port: Any) -> bool:
    """Whether NumPy can fill this input's request tensor in place (whole bytes of a plain
    NumPy type)."""
    element = port.get_element_type()
    try:
        kind = np.dtype(element.to_dtype()).kind
    except Exception:  # a type NumPy has no dtype for
        return False
    return (kind in _IN_PLACE_KINDS and element.bitwidth >= 8
            and element.get_type_name() not in ("bf16", "string"))


def _read(core: Any, item: Any, ov: Any) -> Any:
    if isinstance(item, ov.Model):
        return item
    if isinstance(item, (str, os.PathLike)):
        path = check_file(Path(item))
        try:
            # An IR's weights are read from the .bin beside it. Whether the graph needs any
            # is OpenVINO's call: one without constants has an empty .bin, and loads.
            return core.read_model(str(path))
        except RuntimeError as exc:  # the frontend cannot convert an op, or cannot parse
            if path.suffix.lower() == ".xml":
                raise ir_read_error(path, f"OpenVINO {ov.get_version()}", exc) from exc
            raise ModelLoadError(f"OpenVINO {ov.get_version()} cannot convert "
                                 f"{str(path)!r}: {_reason(exc)}") from exc
    raise TypeError(f"expected an openvino.Model or a model file path, got {type(item).__name__}")


def _reason(exc: BaseException) -> str:
    """The runtime's message without its source-file preamble, on one line."""
    lines = [line.strip() for line in str(exc).splitlines()]
    useful = [line for line in lines if line and not line.startswith(("Exception from src",
                                                                      "Check 'false' failed"))]
    return " ".join(useful or lines)[:600]


def _segment(label: str, compiled: Any, model: Any, item: Any) -> SegmentIO:
    """Compiled ports follow the model's in order; their names come from the file (see
    :func:`port_name`)."""
    declared_in, declared_out = declared_names(item)
    return SegmentIO(label,
                     [_spec(p, port_name(p, declared_in, own))
                      for p, own in zip(compiled.inputs, model.inputs, strict=True)],
                     [_spec(p, port_name(p, declared_out, own))
                      for p, own in zip(compiled.outputs, model.outputs, strict=True)])


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
    io = [_segment(_label(i, item), c, m, item)
          for i, (c, m, item) in enumerate(zip(compiled, models, items, strict=True))]
    wirings = plan(io)
    def recompile(model: Any, item: Any) -> Callable[[], Any]:
        return lambda: _compile(core, model, item, device, properties, ov)

    holders = [Recompiling(c, recompile(m, item))
               for c, m, item in zip(compiled, models, items, strict=True)]
    del compiled  # the holders own them (and compile anew after a failure)
    specs = []
    for i, holder in enumerate(holders):
        def factory(holder: Recompiling = holder, wiring: Wiring = wirings[i]
                    ) -> OpenVINOStage | OpenVINOSyncStage:
            if api == "sync":
                return OpenVINOSyncStage(holder, wiring)
            return OpenVINOStage(holder, jobs, wiring)

        name = f"openvino{i}" if len(holders) > 1 else "openvino"
        specs.append(StageSpec(name, factory, replicas, device=api == "async"))

    def close() -> None:
        for holder in holders:
            holder.release()

    built = build_model(io, specs, cast=cast, max_input_bytes=max_input_bytes, close=close,
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
