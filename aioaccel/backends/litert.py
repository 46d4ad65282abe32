"""LiteRT (TFLite): ``.tflite`` files, one worker thread per segment, optional Edge TPU delegate.

``aioaccel.open("model.tflite")`` or ``aioaccel.open(["seg0.tflite", "seg1.tflite"])``: each
segment runs on its own worker thread with its own ``Interpreter`` (created on that thread),
which gives any device the pipelining that pycoral's ``PipelinedModelRunner`` gives Edge TPUs.
``Interpreter.invoke`` releases the GIL, so segments overlap on different cores.

Options: ``num_threads`` (per interpreter), ``device`` (``"cpu"``, ``"edgetpu"``,
``"edgetpu:usb"``, ``"edgetpu:pci:1"``, or a list with one entry per segment), ``cast``,
``max_input_bytes``.
"""

from __future__ import annotations

import ctypes
import itertools
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable, ModelLoadError
from ..stages import BlockingStage, StageSpec
from ..tensors import TensorSpec
from . import Model, require
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

    def __init__(self, interpreter: Any, wiring: Wiring):
        self.interpreter = interpreter
        keys = dict(wiring.feeds)
        # (key in the carried dict, tensor index, current shape), in the interpreter's order
        self._inputs = [(keys.get(d["name"], d["name"]), d["index"], tuple(d["shape"]))
                        for d in interpreter.get_input_details()]
        self._outputs = [(d["name"], d["index"]) for d in interpreter.get_output_details()]
        self._wiring = wiring

    @classmethod
    def create(cls, path: Path, num_threads: int | None, delegate_device: str | None,
               wiring: Wiring) -> LiteRTStage:
        """Make the interpreter (on the calling worker thread) and the stage around it."""
        module = interpreter_module()
        delegates = None
        if delegate_device is not None:
            delegates = [load_edgetpu_delegate(delegate_device)]
        interpreter = module.Interpreter(model_path=str(path), num_threads=num_threads,
                                         experimental_delegates=delegates)
        interpreter.allocate_tensors()
        return cls(interpreter, wiring)

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self.interpreter
        for slot, (key, index, shape) in enumerate(self._inputs):
            value = tensors[key]
            if value.shape != shape:  # a dynamic dimension changed: resize, then reallocate
                interp.resize_tensor_input(index, value.shape)
                interp.allocate_tensors()
                self._inputs[slot] = (key, index, value.shape)
            interp.set_tensor(index, value)  # copies: the caller may reuse its array
        interp.invoke()  # releases the GIL
        outputs = {name: interp.get_tensor(index) for name, index in self._outputs}
        return self._wiring.pass_on(tensors, outputs)


def load(target: Any, *, replicas: int = 1, num_threads: int | None = None, device: Any = None,
         cast: bool = False, max_input_bytes: int | None = None) -> Model:
    paths = model_paths(target, (".tflite",))
    module = interpreter_module()
    devices = edgetpu_devices(device, len(paths), replicas)
    if device not in (None, "cpu") and len(paths) > 1 and replicas > 1:
        raise ValueError("with the Edge TPU, give either several segments or replicas, not both")
    io = [probe(module, path) for path in paths]
    wirings = plan(io)
    specs = []
    for i, path in enumerate(paths):
        def factory(path: Path = path, wiring: Wiring = wirings[i],
                    devs: tuple[str | None, ...] = tuple(devices[i * replicas:(i + 1) * replicas]),
                    counter: Any = itertools.count()) -> LiteRTStage:  # noqa: B008 - one per stage
            # next() on a count is atomic: each replica thread takes its own device
            return LiteRTStage.create(path, num_threads, devs[next(counter)], wiring)

        specs.append(StageSpec(path.stem, factory, replicas))
    return build_model(io, specs, cast=cast, max_input_bytes=max_input_bytes,
                       info={"backend": "litert", "interpreter": interpreter_name(module),
                             "segments": [str(p) for p in paths], "device": device or "cpu"})


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
