"""OpenVINO's legacy Inference Engine API: ``IECore`` / ``ExecutableNetwork`` / ``InferRequest``.

For installations pinned to OpenVINO releases before 2024.0 -- above all Neural Compute Stick 2
(``MYRIAD``) and HDDL users, whose plugins left OpenVINO in 2023.0 -- and code bases that never
moved to the 2.0 API. ``aioaccel.open("model.xml", backend="openvino-legacy")``; chosen
automatically for ``.xml`` files when only ``openvino.inference_engine`` is importable.

``IECore.read_network`` then ``load_network(num_requests=N)``: each infer request is a slot.
A feeder thread takes a free request (blocking while all ``N`` are busy, so the device never
holds more than ``N``), starts ``async_infer`` (which copies the inputs into the request's
blobs), and the request's completion callback -- on a runtime thread, carrying the request id
-- copies the outputs out of the request before the slot is reused and hands them on. Results
are put back in push order by the runner. ``api="wait"`` instead waits for the requests in
start order on a waiter thread, for plugins whose callbacks are unreliable.

Callbacks never raise. A request that completes with a failed status fails that item with
:class:`~aioaccel.InferenceError` naming the status; statuses that mean the network or device
is gone (``NETWORK_NOT_LOADED``, ``NOT_ALLOCATED``, ``NETWORK_NOT_READ``), or
``fatal_after`` failed requests in a row (what an unplugged stick looks like: every request
fails), break the runner with :class:`~aioaccel.DeviceError`.

Options: ``device`` ("CPU", "MYRIAD", "HETERO:MYRIAD,CPU", "MULTI:..."), ``num_requests``
(0: the device's ``OPTIMAL_NUMBER_OF_INFER_REQUESTS``, at most ``maxsize``), ``config``
(for ``load_network``; on the CPU ``INFERENCE_PRECISION_HINT`` defaults to ``f32``, since the
plugin picks bf16 on CPUs that have it), ``api`` ("callback" or "wait"), ``profile`` (per-layer
timings from ``get_perf_counts()`` in ``runner.stats().profile``), ``fatal_after``, ``cast``,
``max_input_bytes``. Shapes are static (the legacy API has no dynamic shapes).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import deque
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import numpy as np

from ..errors import DeviceError
from ..stages import Complete, DeviceStage, StageSpec
from ..tensors import TensorSpec
from . import Model, require
from ._segments import carry, check_chain, model_paths, needed_after, validator

__all__ = ["LegacyRequestFailed", "LegacyIEStage", "ie_api", "load"]

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


class LegacyIEStage(DeviceStage):
    """An ``ExecutableNetwork``'s infer requests as slots, completed by callback (or wait)."""

    def __init__(self, exec_net: Any, statuses: dict[int, str], keep: frozenset[str],
                 last: bool, api: str, profile: bool, fatal_after: int, name: str):
        self.exec_net = exec_net
        self.requests = list(exec_net.requests)
        self._statuses = statuses
        self._ok = next(code for code, n in statuses.items() if n == "OK")
        self._inputs = list(exec_net.input_info)
        self._outputs = list(exec_net.outputs)
        self._keep = keep
        self._last = last
        self._api = api
        self._profile = profile
        self._fatal_after = fatal_after
        self._name = name
        self._free: SimpleQueue[int] = SimpleQueue()
        self._held: dict[int, tuple[object, dict[str, np.ndarray]]] = {}
        self._started: SimpleQueue[int] = SimpleQueue()   # api="wait": request ids in order
        self._waiter: threading.Thread | None = None
        self._lock = threading.Lock()
        self._failures_in_row = 0
        self._complete: Complete | None = None
        self.layers: dict[str, dict[str, Any]] = {}       # profile: per-layer totals
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
            self.requests[rid].async_infer({name: tensors[name] for name in self._inputs})
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
                # copy out: the request's blobs are overwritten when the slot is reused
                outputs = {name: np.array(request.output_blobs[name].buffer, copy=True)
                           for name in self._outputs}
                if self._profile:
                    self._account(request.get_perf_counts())
                self._failures_in_row = 0
                self._free.put(rid)
                self._complete(token, carry(tensors, outputs, self._keep, self._last), None)  # type: ignore[misc]
                return
            name = self._statuses.get(code, str(code))
            self._failures_in_row += 1
            self._free.put(rid)
            if name in FATAL_STATUSES or self._failures_in_row >= self._fatal_after:
                self._complete(token, None, DeviceError(  # type: ignore[misc]
                    f"OpenVINO legacy infer request failed with {name} "
                    f"({self._failures_in_row} in a row): the device or network is gone"))
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

    def _account(self, counts: dict[str, dict[str, Any]]) -> None:
        with self._lock:
            for layer, c in counts.items():
                total = self.layers.setdefault(layer, {
                    "layer_type": c.get("layer_type"), "exec_type": c.get("exec_type"),
                    "calls": 0, "real_time_us": 0.0, "cpu_time_us": 0.0})
                if c.get("status") == "EXECUTED":
                    total["calls"] += 1
                    total["real_time_us"] += float(c.get("real_time", 0))
                    total["cpu_time_us"] += float(c.get("cpu_time", 0))

    def profile(self) -> dict[str, dict[str, Any]]:
        """Per layer: type, kernel, calls, and mean real/CPU time in microseconds."""
        with self._lock:
            return {layer: {"layer_type": t["layer_type"], "exec_type": t["exec_type"],
                            "calls": t["calls"],
                            "real_time_us": t["real_time_us"] / t["calls"] if t["calls"] else 0.0,
                            "cpu_time_us": t["cpu_time_us"] / t["calls"] if t["calls"] else 0.0}
                    for layer, t in self.layers.items()}

    def close(self) -> None:
        # Wait for every started request, so no callback runs after the runner is gone.
        for request in self.requests:
            request.wait(-1)
        if self._waiter is not None:
            self._started.put(_STOP)
            self._waiter.join()


def _spec(name: str, precision: str, dims: list[int], where: str) -> TensorSpec:
    dtype = PRECISIONS.get(precision)
    if dtype is None:
        raise ValueError(f"{where} {name!r} has precision {precision}, which aioaccel does not "
                         f"map to a NumPy dtype (known: {sorted(PRECISIONS)})")
    return TensorSpec(name, dtype, tuple(int(d) for d in dims))


def _read(ie: Any, core: Any, path: Path) -> Any:
    weights = path.with_suffix(".bin")
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found beside {path.name}: {str(weights)!r}")
    return core.read_network(model=str(path), weights=str(weights))


def load(target: Any, *, replicas: int = 1, maxsize: int = 8, device: str = "CPU",
         num_requests: int = 0, config: dict[str, str] | None = None, api: str = "callback",
         profile: bool = False, fatal_after: int = 3, cast: bool = False,
         max_input_bytes: int | None = None) -> Model:
    if replicas != 1:
        raise ValueError("backend='openvino-legacy': use num_requests for parallel requests")
    if api not in ("callback", "wait"):
        raise ValueError(f"api must be 'callback' or 'wait', got {api!r}")
    if not isinstance(num_requests, int) or num_requests < 0:
        raise ValueError(f"num_requests must be an int >= 0, got {num_requests!r}")
    paths = model_paths(target, (".xml",))
    ie = ie_api()
    core = ie.IECore()
    settings = dict(config or {})
    if "CPU" in device.split(":")[-1].split(","):
        settings.setdefault("INFERENCE_PRECISION_HINT", "f32")
    if profile:
        settings["PERF_COUNT"] = "YES"
    if len(paths) > 1:
        settings.setdefault("CPU_BIND_THREAD", "NO")  # pinned networks would not overlap

    nets = [_read(ie, core, p) for p in paths]
    io = []
    for path, net in zip(paths, nets, strict=True):
        inputs = [_spec(n, i.precision, i.input_data.shape, "input")
                  for n, i in net.input_info.items()]
        outputs = [_spec(n, o.precision, o.shape, "output") for n, o in net.outputs.items()]
        io.append((path.name, inputs, outputs))
    check_chain(io)
    keeps = needed_after([inputs for _, inputs, _ in io])

    stages: list[LegacyIEStage] = []
    statuses = _status_names(ie)
    for i, (path, net) in enumerate(zip(paths, nets, strict=True)):
        requests = num_requests
        if requests == 0:
            probe = core.load_network(net, device, settings, 1)
            try:
                requests = int(probe.get_metric("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            except Exception:  # noqa: BLE001 - a plugin without the metric gets 2
                requests = 2
            del probe
            requests = max(1, min(requests, maxsize))
        try:
            exec_net = core.load_network(network=net, device_name=device, config=settings,
                                         num_requests=requests)
        except RuntimeError as exc:
            raise DeviceError(f"cannot load {path.name} on {device!r}: {exc} (devices here: "
                              f"{core.available_devices})") from exc
        stages.append(LegacyIEStage(exec_net, statuses, keeps[i], i == len(paths) - 1, api,
                                    profile, fatal_after, f"{path.stem}"))

    specs = [StageSpec(f"{path.stem}", lambda s=stage: s, device=True)
             for path, stage in zip(paths, stages, strict=True)]

    def layer_profile() -> dict[str, Any]:
        return {layer: timing for stage in stages for layer, timing in stage.profile().items()}

    return Model(stages=specs, inputs=io[0][1], outputs=io[-1][2],
                 prepare=validator(io[0][1], cast, max_input_bytes),
                 profile=layer_profile if profile else None,
                 info={"backend": "openvino-legacy", "device": device,
                       "num_requests": [len(s.requests) for s in stages],
                       "api": api, "openvino": ie.get_version(),
                       "models": [os.fspath(p) for p in paths]})
