"""LiteRT (TFLite): ``.tflite`` files, one worker thread per segment, optional Edge TPU delegate.

``aioaccel.open("model.tflite")`` or ``aioaccel.open(["seg0.tflite", "seg1.tflite"])``: each
segment runs on its own worker thread with its own ``Interpreter`` (created on that thread),
which gives any device the pipelining that pycoral's ``PipelinedModelRunner`` gives Edge TPUs.
``Interpreter.invoke`` releases the GIL, so segments overlap on different cores.

Options: ``num_threads`` (per interpreter), ``device`` (``"cpu"``, ``"edgetpu"``,
``"edgetpu:usb"``, ``"edgetpu:pci:1"``, or a list with one entry per segment), ``cast``,
``max_input_bytes``, ``batch``.

``batch=N`` (N >= 2, CPU only: Edge TPU models are compiled for a fixed batch): each segment's
inputs are resized along axis 0 to the rows of the batch (``resize_tensor_input``, on the
stage's own worker thread). A stage keeps two interpreters: one allocated for full batches of
N rows, which at full load are nearly all of them, and one it resizes for any other row count
(a resize costs ~2.5 us here, 25-40% of a batched call on a tiny model; one interpreter per
size thrashed the caches and was slower on a width-512 model). Nothing is padded. The price is
a second interpreter's memory (XNNPACK packs weights per interpreter). Open fails naming the
input when a model cannot be resized along its first axis.
"""

from __future__ import annotations

import ctypes
import itertools
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..batching import BatchingUnsupported, backend_batch, batched_model
from ..errors import BackendUnavailable, ModelLoadError
from ..stages import BlockingStage, StageSpec
from ..tensors import TensorSpec
from . import Model, require
from ._exit import NativeCalls
from ._native_log import quiet_info
from ._segments import SegmentIO, Wiring, build_model, model_paths, plan

__all__ = ["LiteRTStage", "interpreter_module", "interpreter_name", "load", "probe",
           "tensor_spec"]

EDGETPU_LIBRARY = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib",
                   "Windows": "edgetpu.dll"}.get(platform.system(), "libedgetpu.so.1")
EDGETPU_INSTALL = ("install the Edge TPU runtime (libedgetpu) from Coral's package repository: "
                   "https://coral.ai/software/#edgetpu-runtime (Debian: apt-get install "
                   "libedgetpu1-std)")


def interpreter_module() -> Any:
    """``ai_edge_litert.interpreter``, else ``tflite_runtime.interpreter``."""
    return require("litert", "ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def edgetpu_devices(device: Any, segments: int, replicas: int) -> list[str | None]:
    """One delegate device string (or None for the CPU) per worker: segment-major order."""
    workers = segments * replicas
    if device is None or device == "cpu":
        return [None] * workers
    if isinstance(device, (list, tuple)):
        if len(device) != workers:
            raise ValueError(f"device= lists {len(device)} devices for {workers} workers "
                             f"({segments} segments x {replicas} replicas)")
        return [edgetpu_devices(d, 1, 1)[0] for d in device]
    if not isinstance(device, str) or not device.startswith("edgetpu"):
        raise ValueError(f"unknown device {device!r} for LiteRT: expected 'cpu', 'edgetpu', "
                         f"'edgetpu:usb', 'edgetpu:pci:1' or a list of them")
    parts = device.split(":")[1:]
    kind = parts[0] if parts else ""
    if kind not in ("", "usb", "pci"):
        raise ValueError(f"unknown Edge TPU type in {device!r}: expected usb or pci")
    first = int(parts[1]) if len(parts) > 1 else 0
    return [f"{kind}:{first + n}" for n in range(workers)]  # one TPU per worker, in order


def load_edgetpu_delegate(device: str) -> Any:
    module = interpreter_module()
    try:
        # Check the library first: when load_delegate fails, LiteRT's half-built Delegate
        # raises AttributeError from its __del__ ("Exception ignored in ...") at collection.
        ctypes.CDLL(EDGETPU_LIBRARY)
        return module.load_delegate(EDGETPU_LIBRARY, {"device": device} if device else {})
    except (OSError, ValueError) as exc:
        raise BackendUnavailable(
            f"cannot load the Edge TPU delegate {EDGETPU_LIBRARY} for device {device!r} "
            f"({exc}); {EDGETPU_INSTALL}") from exc


def tensor_spec(detail: dict[str, Any]) -> TensorSpec:
    """A TensorSpec from one entry of ``Interpreter.get_input_details()``."""
    signature = detail.get("shape_signature", detail["shape"])
    shape = tuple(None if int(d) < 0 else int(d) for d in signature)
    return TensorSpec(detail["name"], np.dtype(detail["dtype"]).name, shape)


class LiteRTStage(BlockingStage):
    """One interpreter, used only by the worker thread that runs this stage."""

    def __init__(self, interpreter: Any, wiring: Wiring,
                 full_batch: tuple[int, Callable[[], Any]] | None = None):
        self.interpreter = interpreter
        self._wiring = wiring
        self._calls = NativeCalls()  # finished before the interpreter exits
        self._inputs = self._slots(interpreter)
        self._outputs = [(d["name"], d["index"]) for d in interpreter.get_output_details()]
        #: batching: (rows of a full batch, how to make its interpreter); made on first use
        self._full_batch = full_batch
        self._full: tuple[Any, list[tuple[str, int, tuple[int, ...]]]] | None = None

    def _slots(self, interpreter: Any) -> list[tuple[str, int, tuple[int, ...]]]:
        """(key in the carried dict, tensor index, current shape), in the interpreter's order."""
        keys = dict(self._wiring.feeds)
        return [(keys.get(d["name"], d["name"]), d["index"], tuple(d["shape"]))
                for d in interpreter.get_input_details()]

    @classmethod
    def create(cls, path: Path, num_threads: int | None, delegate_device: str | None,
               wiring: Wiring, batch: int | None = None) -> LiteRTStage:
        """Make the interpreter (on the calling worker thread) and the stage around it."""
        module = interpreter_module()

        def make() -> Any:
            delegates = None
            if delegate_device is not None:
                delegates = [load_edgetpu_delegate(delegate_device)]
            interpreter = module.Interpreter(model_path=str(path), num_threads=num_threads,
                                             experimental_delegates=delegates)
            with quiet_info():  # LiteRT's one-time XNNPACK INFO line
                interpreter.allocate_tensors()
            return interpreter

        return cls(make(), wiring, None if batch is None else (batch, make))

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp, inputs = self.interpreter, self._inputs
        full = self._full_batch
        if full is not None and tensors[inputs[0][0]].shape[0] == full[0]:
            if self._full is None:
                made = full[1]()
                self._full = (made, self._slots(made))
            interp, inputs = self._full
        for slot, (key, index, shape) in enumerate(inputs):
            value = tensors[key]
            if value.shape != shape:  # a dynamic dimension changed: resize, then reallocate
                interp.resize_tensor_input(index, value.shape)
                interp.allocate_tensors()
                inputs[slot] = (key, index, value.shape)
            interp.set_tensor(index, value)  # copies: the caller may reuse its array
        with self._calls:
            interp.invoke()  # releases the GIL
        outputs = {name: interp.get_tensor(index) for name, index in self._outputs}
        return self._wiring.pass_on(tensors, outputs)

    def close(self) -> None:
        self._calls.forget()


def _check_batchable(module: Any, path: Path, batch: int) -> None:
    """Resize a probe interpreter to a batch of 2 rows; raise BatchingUnsupported unless it
    allocates and every output follows the batch."""
    probe = module.Interpreter(model_path=str(path))
    label = path.name
    details = probe.get_input_details()
    for d in details:
        if not len(d["shape"]):
            raise BatchingUnsupported(f"batch={batch}: batch= needs a batch dimension, and input "
                                      f"{d['name']!r} of {label} has no dimensions")
    try:
        for d in details:
            probe.resize_tensor_input(d["index"], (2, *d["shape"][1:]))
        with quiet_info():
            probe.allocate_tensors()
    except (RuntimeError, ValueError) as exc:
        shapes = ", ".join(str(tensor_spec(d)) for d in details)
        raise BatchingUnsupported(
            f"batch={batch}: batch= needs a dynamic batch dimension, and {label} ({shapes}) "
            f"cannot be resized along its first axis ({_first_line(exc)}); open it without "
            f"batch=") from exc
    for d in probe.get_output_details():
        if not len(d["shape"]) or int(d["shape"][0]) != 2:
            raise BatchingUnsupported(
                f"batch={batch}: batch= needs outputs that follow the batch, and output "
                f"{d['name']!r} of {label} has shape {tuple(int(x) for x in d['shape'])} for 2 "
                f"input rows")


def load(target: Any, *, replicas: int = 1, num_threads: int | None = None, device: Any = None,
         cast: bool = False, max_input_bytes: int | None = None,
         batch: int | None = None) -> Model:
    batch = backend_batch(batch, "litert")
    if batch is not None and device not in (None, "cpu"):
        raise BatchingUnsupported(
            f"batch={batch} is not available on the Edge TPU ({device!r}): its models are "
            f"compiled for a fixed batch; open it without batch=")
    paths = model_paths(target, (".tflite",))
    module = interpreter_module()
    devices = edgetpu_devices(device, len(paths), replicas)
    if device not in (None, "cpu") and len(paths) > 1 and replicas > 1:
        raise ValueError("with the Edge TPU, give either several segments or replicas, not both")
    io = [probe(module, path) for path in paths]
    wirings = plan(io)
    if batch is not None:
        for path in paths:
            _check_batchable(module, path, batch)
    specs = []
    for i, path in enumerate(paths):
        def factory(path: Path = path, wiring: Wiring = wirings[i],
                    devs: tuple[str | None, ...] = tuple(devices[i * replicas:(i + 1) * replicas]),
                    counter: Any = itertools.count()) -> LiteRTStage:  # noqa: B008 - one per stage
            # next() on a count is atomic: each replica thread takes its own device (modulo:
            # batch="auto" makes stages of its own to time the model before the workers do)
            device = devs[next(counter) % len(devs)]
            return LiteRTStage.create(path, num_threads, device, wiring, batch)

        specs.append(StageSpec(path.stem, factory, replicas))
    model = build_model(io, specs, cast=cast, max_input_bytes=max_input_bytes,
                        info={"backend": "litert", "interpreter": interpreter_name(module),
                              "segments": [str(p) for p in paths], "device": device or "cpu"})
    return batched_model(model, batch, cast=cast, max_input_bytes=max_input_bytes)


def interpreter_name(module: Any) -> str:
    """Which interpreter runs: ``ai_edge_litert`` or ``tflite_runtime``, with its version."""
    package = module.__name__.split(".")[0]
    version = getattr(sys.modules.get(package), "__version__", None)
    return f"{package} {version}" if version else package


def probe(module: Any, path: Path) -> SegmentIO:
    """A segment's inputs and outputs, read without a delegate (it only needs the flatbuffer).
    A file the interpreter cannot read fails here, naming the file and the runtime."""
    try:
        interpreter = module.Interpreter(model_path=str(path))
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{interpreter_name(module)} cannot load {str(path)!r}: "
                             f"{_first_line(exc)}") from exc
    return SegmentIO(path.name, [tensor_spec(d) for d in interpreter.get_input_details()],
                     [tensor_spec(d) for d in interpreter.get_output_details()])


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500]
