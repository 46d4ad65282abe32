"""OpenVINO's legacy Inference Engine API: ``IECore`` / ``ExecutableNetwork`` / ``InferRequest``.

For installations pinned to OpenVINO releases before 2024.0 -- above all Neural Compute Stick 2
(``MYRIAD``) and HDDL users, whose plugins left OpenVINO in 2023.0 -- and code bases that never
moved to the 2.0 API. ``aioaccel.open("model.xml", backend="openvino-legacy")``; chosen
automatically for ``.xml`` files when only ``openvino.inference_engine`` is importable.

``IECore.read_network`` then ``load_network(num_requests=N)``: each infer request is a slot.
With ``api="callback"``, a feeder thread takes a free request (blocking while all ``N`` are
busy, so the device never holds more than ``N``), starts ``async_infer`` (which copies the
inputs into the request's blobs), and the request's completion callback -- on a runtime
thread, carrying the request id -- copies the outputs out of the request before the slot is
reused and hands them on. Results
are put back in push order by the runner. ``api="wait"`` instead waits for the requests in
start order on a waiter thread, for plugins whose callbacks are unreliable. ``api="sync"``
gives each of ``num_requests`` worker threads a request of its own and calls the blocking,
GIL-releasing ``infer``: on the CPU that is faster, because every callback completion costs
GIL hand-offs between three threads (measured: the vendor's own callback pattern reaches 0.41x
of its start_async/wait loop on a tiny model; see docs/performance.md). ``api="auto"``
(default) is ``"sync"`` on the CPU and ``"callback"`` elsewhere (MYRIAD, HDDL, HETERO, MULTI).

Callbacks never raise. A request that completes with a failed status fails that item with
:class:`~aioaccel.InferenceError` naming the status; statuses that mean the network or device
is gone (``NETWORK_NOT_LOADED``, ``NOT_ALLOCATED``, ``NETWORK_NOT_READ``), or
``fatal_after`` failed requests in a row (what an unplugged stick looks like: every request
fails), break the runner with :class:`~aioaccel.DeviceError`.

Options: ``device`` ("CPU", "MYRIAD", "HETERO:MYRIAD,CPU", "MULTI:..."), ``num_requests``
(0: 1 worker for "sync", else the device's ``OPTIMAL_NUMBER_OF_INFER_REQUESTS``, at most
``maxsize``), ``config``
(for ``load_network``; on the CPU ``INFERENCE_PRECISION_HINT`` defaults to ``f32``, since the
plugin picks bf16 on CPUs that have it), ``api`` ("auto", "sync", "callback" or "wait"),
``profile`` (per-layer timings from ``get_perf_counts()`` in ``runner.stats().profile``),
``fatal_after``, ``cast``, ``max_input_bytes``. Shapes are static (the legacy API has no
dynamic shapes).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import numpy as np

from ..batching import refuse_batch
from ..errors import DeviceError
from ..stages import BlockingStage, Complete, DeviceStage, StageSpec, made
from ..tensors import TensorSpec
from . import Model, require
from ._ir import declared_ports
from ._segments import SegmentIO, Wiring, build_model, ir_read_error, model_paths, plan

__all__ = ["LayerTimes", "LegacyIEStage", "LegacyRequestFailed", "LegacySyncStage", "ie_api",
           "load"]

#: IE precision names -> NumPy dtypes
PRECISIONS = {"FP32": "float32", "FP16": "float16", "FP64": "float64", "U8": "uint8",
              "I8": "int8", "U16": "uint16", "I16": "int16", "I32": "int32", "U32": "uint32",
              "I64": "int64", "U64": "uint64", "BOOL": "bool"}
#: completion statuses that mean the network or the device is gone (InferenceEngine::StatusCode)
FATAL_STATUSES = {"NETWORK_NOT_LOADED", "NOT_ALLOCATED", "NETWORK_NOT_READ"}
_STOP = -1


class LegacyRequestFailed(RuntimeError):
    """An infer request completed with a failed status (the cause of the item's error)."""


def ie_api() -> Any:
    """``openvino.inference_engine``, without the deprecation warning 2022.x-2023.x print on
    import: choosing this backend is the user's explicit decision."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return require("openvino-legacy", "openvino.inference_engine")


def _status_names(ie: Any) -> dict[int, str]:
    codes = ie.StatusCode
    return {int(getattr(codes, name)): name for name in dir(codes) if name.isupper()}


class LayerTimes:
    """Per-layer totals from ``get_perf_counts()``, summed over items (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._layers: dict[str, dict[str, Any]] = {}

    def add(self, counts: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            for layer, c in counts.items():
                total = self._layers.setdefault(layer, {
                    "layer_type": c.get("layer_type"), "exec_type": c.get("exec_type"),
                    "calls": 0, "real_time_us": 0.0, "cpu_time_us": 0.0})
                if c.get("status") == "EXECUTED":
                    total["calls"] += 1
                    total["real_time_us"] += float(c.get("real_time", 0))
                    total["cpu_time_us"] += float(c.get("cpu_time", 0))

    def means(self) -> dict[str, dict[str, Any]]:
        """Per layer: type, kernel, calls, and mean real/CPU time in microseconds."""
        with self._lock:
            return {layer: {**t, "real_time_us": t["real_time_us"] / t["calls"] if t["calls"]
                            else 0.0,
                            "cpu_time_us": t["cpu_time_us"] / t["calls"] if t["calls"] else 0.0}
                    for layer, t in self._layers.items()}


class LegacySyncStage(BlockingStage):
    """One infer request per worker thread, run with the blocking (GIL-releasing) ``infer``."""

    def __init__(self, request: Any, wiring: Wiring, times: LayerTimes | None,
                 failures: _Failures, keys: dict[str, str] | None = None):
        self.request = request
        self._wiring = wiring
        self._names = _LegacyKeys(wiring, keys or {})
        self._times = times
        self._failures = failures

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self.request
        try:
            request.infer(self._names.feed(tensors))
        except Exception as exc:
            self._failures.failed(exc)  # raises DeviceError after fatal_after in a row
            raise LegacyRequestFailed(f"infer request failed: {exc}") from exc
        self._failures.ok()
        outputs = self._names.read(request)
        if self._times is not None:
            self._times.add(request.get_perf_counts())
        return self._wiring.pass_on(tensors, outputs)


class _LegacyKeys:
    """The legacy API keys inputs by their layer and outputs by the layer producing them;
    aioaccel names them as the IR declares them (see :mod:`aioaccel.backends._ir`), as the
    current API does. ``keys``: declared name -> legacy key, where they differ."""

    def __init__(self, wiring: Wiring, keys: dict[str, str]):
        self._feeds = [(keys.get(name, name), carried) for name, carried in wiring.feeds]
        self._reads = [(name, keys.get(name, name)) for name in wiring.outputs]

    def feed(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {key: tensors[carried] for key, carried in self._feeds}

    def read(self, request: Any) -> dict[str, np.ndarray]:
        """The outputs, copied out (the request's blobs are overwritten when it is reused)."""
        blobs = request.output_blobs
        return {name: np.array(blobs[key].buffer, copy=True) for name, key in self._reads}


class _Failures:
    """Failed requests in a row: ``fatal_after`` of them means the device is gone."""

    def __init__(self, fatal_after: int):
        self.fatal_after = fatal_after
        self.in_row = 0
        self._lock = threading.Lock()

    def ok(self) -> None:
        self.in_row = 0

    def failed(self, cause: object) -> None:
        with self._lock:
            self.in_row += 1
            count = self.in_row
        if count >= self.fatal_after:
            raise DeviceError(f"OpenVINO legacy infer request failed ({cause}; {count} in a "
                              f"row): the device or network is gone")


def _ignore_completion(*args: Any) -> None:
    """The completion callback of a request whose stage has closed."""


class LegacyIEStage(DeviceStage):
    """An ``ExecutableNetwork``'s infer requests as slots, completed by callback (or wait)."""

    def __init__(self, exec_net: Any, statuses: dict[int, str], wiring: Wiring, api: str,
                 times: LayerTimes | None, fatal_after: int, name: str,
                 keys: dict[str, str] | None = None):
        self.exec_net = exec_net
        self.requests = list(exec_net.requests)
        self._statuses = statuses
        self._ok = next(code for code, n in statuses.items() if n == "OK")
        self._wiring = wiring
        self._names = _LegacyKeys(wiring, keys or {})
        self._api = api
        self._times = times
        self._failures = _Failures(fatal_after)
        self._name = name
        self._free: SimpleQueue[int] = SimpleQueue()
        self._held: dict[int, tuple[object, dict[str, np.ndarray]]] = {}
        self._started: SimpleQueue[int] = SimpleQueue()   # api="wait": request ids in order
        self._waiter: threading.Thread | None = None
        self._lock = threading.Lock()
        self._complete: Complete | None = None
        self.in_flight = 0
        self.peak_in_flight = 0

    def start(self, complete: Complete) -> None:
        self._complete = complete
        for rid, request in enumerate(self.requests):
            self._free.put(rid)
            if self._api == "callback":
                request.set_completion_callback(self._on_done, rid)
        if self._api == "wait":
            self._waiter = threading.Thread(target=self._wait_in_order, daemon=True,
                                            name=f"aioaccel-{self._name}-wait")
            self._waiter.start()

    def submit(self, token: object, tensors: dict[str, np.ndarray]) -> None:
        rid = self._free.get()  # blocks while every request is busy: the device's bound
        with self._lock:
            self._held[rid] = (token, tensors)
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            self.requests[rid].async_infer(self._names.feed(tensors))
        except Exception:
            with self._lock:  # not started: the slot is free again, this item fails alone
                del self._held[rid]
                self.in_flight -= 1
            self._free.put(rid)
            raise
        if self._api == "wait":
            self._started.put(rid)

    def _wait_in_order(self) -> None:
        while (rid := self._started.get()) != _STOP:
            status = self.requests[rid].wait(-1)  # releases the GIL while it waits
            self._on_done(status, rid)

    def _on_done(self, status: Any, rid: int) -> None:
        # On a runtime thread: must never raise.
        try:
            with self._lock:
                token, tensors = self._held.pop(rid)
                self.in_flight -= 1
            request = self.requests[rid]
            code = int(status)
            if code == self._ok:
                outputs = self._names.read(request)  # copied: the slot is reused
                if self._times is not None:
                    self._times.add(request.get_perf_counts())
                self._failures.ok()
                self._free.put(rid)
                self._complete(token, self._wiring.pass_on(tensors, outputs), None)  # type: ignore[misc]
                return
            name = self._statuses.get(code, str(code))
            self._free.put(rid)
            try:
                if name in FATAL_STATUSES:
                    raise DeviceError(f"OpenVINO legacy infer request failed with {name}: the "
                                      f"device or network is gone")
                self._failures.failed(name)  # raises DeviceError after fatal_after in a row
            except DeviceError as exc:
                self._complete(token, None, exc)  # type: ignore[misc]
                return
            self._complete(token, None, LegacyRequestFailed(  # type: ignore[misc]
                f"infer request completed with status {name} ({code})"))
        except BaseException as exc:
            try:
                error = DeviceError(f"OpenVINO legacy completion handling failed: {exc!r}")
                error.__cause__ = exc
                self._complete(None, None, error)  # type: ignore[misc]
            except BaseException:
                pass

    def close(self) -> None:
        # Wait for every started request, so no callback runs after the runner is gone.
        for request in self.requests:
            request.wait(-1)
        if self._waiter is not None:
            self._started.put(_STOP)
            self._waiter.join()
        # A request holding our callback and we holding the request is a cycle through C++
        # that the garbage collector cannot see: the ExecutableNetwork (and its descriptors)
        # would live for ever. Break it.
        if self._api == "callback":
            for request in self.requests:
                request.set_completion_callback(_ignore_completion)
        self.exec_net = None


def _spec(name: str, precision: str, dims: list[int], where: str) -> TensorSpec:
    dtype = PRECISIONS.get(precision)
    if dtype is None:
        raise ValueError(f"{where} {name!r} has precision {precision}, which aioaccel does not "
                         f"map to a NumPy dtype (known: {sorted(PRECISIONS)})")
    return TensorSpec(name, dtype, tuple(int(d) for d in dims))


def _read(core: Any, path: Path) -> Any:
    # The weights are read from the .bin beside the .xml. Whether the graph needs any is
    # the runtime's call: one without constants has an empty .bin (or none), and loads.
    try:
        return core.read_network(model=str(path))
    except Exception as exc:
        raise ir_read_error(path, "OpenVINO (legacy Inference Engine API)", exc) from exc


def load(target: Any, *, replicas: int = 1, maxsize: int = 8, device: str = "CPU",
         num_requests: int = 0, config: dict[str, str] | None = None, api: str = "auto",
         profile: bool = False, fatal_after: int = 3, cast: bool = False,
         max_input_bytes: int | None = None, runner_name: str = "runner",
         batch: int | None = None) -> Model:
    refuse_batch(batch, "openvino-legacy", "aioaccel's legacy Inference Engine adapter loads "
                 "networks with static shapes; batch with the current API, backend='openvino'")
    if replicas != 1:
        raise ValueError("backend='openvino-legacy': use num_requests for parallel requests")
    if api not in ("auto", "sync", "callback", "wait"):
        raise ValueError(f"api must be 'auto', 'sync', 'callback' or 'wait', got {api!r}")
    if not isinstance(num_requests, int) or num_requests < 0:
        raise ValueError(f"num_requests must be an int >= 0, got {num_requests!r}")
    paths = model_paths(target, (".xml",))
    ie = ie_api()
    core = ie.IECore()
    on_cpu = device.upper().split(".")[0] == "CPU"  # the plain CPU plugin, not HETERO/MULTI
    if api == "auto":  # see the module doc: callbacks cost GIL hand-offs the CPU feels most
        api = "sync" if on_cpu else "callback"
    settings = dict(config or {})
    if "CPU" in device.split(":")[-1].split(","):
        settings.setdefault("INFERENCE_PRECISION_HINT", "f32")
    if profile:
        settings["PERF_COUNT"] = "YES"
    if len(paths) > 1 or api == "sync":
        settings.setdefault("CPU_BIND_THREAD", "NO")  # pinned networks would not overlap

    nets = [_read(core, p) for p in paths]
    io = []
    renames = []  # per segment: declared name -> legacy key
    for path, net in zip(paths, nets, strict=True):
        declared = declared_ports(path).legacy_names()  # legacy key -> declared name
        inputs = [_spec(declared.get(n, n), i.precision, i.input_data.shape, "input")
                  for n, i in net.input_info.items()]
        outputs = [_spec(declared.get(n, n), o.precision, o.shape, "output")
                   for n, o in net.outputs.items()]
        io.append(SegmentIO(path.name, inputs, outputs))
        known = {*net.input_info, *net.outputs}
        renames.append({name: key for key, name in declared.items() if key in known})
    wirings = plan(io)

    times = LayerTimes() if profile else None
    statuses = _status_names(ie)
    specs: list[StageSpec] = []
    exec_nets: list[Any] = []
    for i, (path, net) in enumerate(zip(paths, nets, strict=True)):
        requests = num_requests or (1 if api == "sync" else _optimal_requests(
            core, net, device, settings, maxsize))
        try:
            exec_net = core.load_network(network=net, device_name=device, config=settings,
                                         num_requests=requests)
        except RuntimeError as exc:
            reason = " ".join(str(exc).split())  # the runtime's message spans lines
            raise DeviceError(f"cannot load {path.name} on {device!r}: {reason} (devices "
                              f"here: {core.available_devices})") from exc
        exec_nets.append(exec_net)
        wiring = wirings[i]
        if api == "sync":
            free = list(exec_net.requests)
            lock = threading.Lock()
            failures = _Failures(fatal_after)

            def factory(free: list[Any] = free, lock: threading.Lock = lock,
                        failures: _Failures = failures, wiring: Wiring = wiring,
                        keys: dict[str, str] = renames[i]) -> LegacySyncStage:
                with lock:  # each worker thread takes a request of its own
                    request = free.pop()
                return LegacySyncStage(request, wiring, times, failures, keys)

            specs.append(StageSpec(path.stem, factory, replicas=requests))
        else:
            stage = LegacyIEStage(exec_net, statuses, wiring, api, times, fatal_after,
                                  f"{runner_name}-{path.stem}", renames[i])
            specs.append(StageSpec(path.stem, made(stage), device=True))

    return build_model(
        io, specs, cast=cast, max_input_bytes=max_input_bytes,
        profile=times.means if times is not None else None,
        # the requests do not keep their ExecutableNetwork alive: the model does
        close=exec_nets.clear,
        info={"backend": "openvino-legacy", "device": device, "api": api,
              "layouts": {n: str(i.layout) for n, i in nets[0].input_info.items()},
              "num_requests": [len(n.requests) for n in exec_nets],
              "openvino": ie.get_version(),
              "models": [os.fspath(p) for p in paths]})


def _optimal_requests(core: Any, net: Any, device: str, settings: dict[str, str],
                      maxsize: int) -> int:
    probe = core.load_network(net, device, settings, 1)
    try:
        requests = int(probe.get_metric("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    except Exception:
        requests = 2
    return max(1, min(requests, maxsize))
