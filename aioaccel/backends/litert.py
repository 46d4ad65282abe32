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
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendUnavailable
from ..stages import BlockingStage, StageSpec
from ..tensors import TensorSpec
from . import Model, require
from ._exit import NativeCalls
from ._segments import carry, check_chain, loading, model_paths, needed_after, validator

__all__ = ["LiteRTStage", "load", "tensor_spec"]

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

    def __init__(self, interpreter: Any, keep: frozenset[str], last: bool):
        self.interpreter = interpreter
        self._inputs = [(d["name"], d["index"], tuple(d["shape"]))
                        for d in interpreter.get_input_details()]
        self._outputs = [(d["name"], d["index"]) for d in interpreter.get_output_details()]
        self._keep = keep
        self._last = last
        self._calls = NativeCalls()  # finished before the interpreter exits

    @classmethod
    def create(cls, path: Path, num_threads: int | None, delegate_device: str | None,
               keep: frozenset[str], last: bool) -> LiteRTStage:
        """Make the interpreter (on the calling worker thread) and the stage around it."""
        module = interpreter_module()
        delegates = None
        if delegate_device is not None:
            delegates = [load_edgetpu_delegate(delegate_device)]
        interpreter = module.Interpreter(model_path=str(path), num_threads=num_threads,
                                         experimental_delegates=delegates)
        interpreter.allocate_tensors()
        return cls(interpreter, keep, last)

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self.interpreter
        for slot, (name, index, shape) in enumerate(self._inputs):
            value = tensors[name]
            if value.shape != shape:  # a dynamic dimension changed: resize, then reallocate
                interp.resize_tensor_input(index, value.shape)
                interp.allocate_tensors()
                self._inputs[slot] = (name, index, value.shape)
            interp.set_tensor(index, value)  # copies: the caller may reuse its array
        with self._calls:
            interp.invoke()  # releases the GIL
        outputs = {name: interp.get_tensor(index) for name, index in self._outputs}
        return carry(tensors, outputs, self._keep, self._last)

    def close(self) -> None:
        self._calls.forget()


def load(target: Any, *, replicas: int = 1, num_threads: int | None = None, device: Any = None,
         cast: bool = False, max_input_bytes: int | None = None) -> Model:
    paths = model_paths(target, (".tflite",))
    module = interpreter_module()
    devices = edgetpu_devices(device, len(paths), replicas)
    if device not in (None, "cpu") and len(paths) > 1 and replicas > 1:
        raise ValueError("with the Edge TPU, give either several segments or replicas, not both")
    io = []
    for path in paths:  # read the specs without a delegate: it only needs the flatbuffer
        with loading(path, "LiteRT"):
            probe = module.Interpreter(model_path=str(path))
        io.append((path.name, [tensor_spec(d) for d in probe.get_input_details()],
                   [tensor_spec(d) for d in probe.get_output_details()]))
        del probe
    check_chain(io)
    keeps = needed_after([inputs for _, inputs, _ in io])
    specs = []
    for i, path in enumerate(paths):
        def factory(path: Path = path, keep: frozenset[str] = keeps[i],
                    last: bool = i == len(paths) - 1,
                    devs: tuple[str | None, ...] = tuple(devices[i * replicas:(i + 1) * replicas]),
                    counter: Any = itertools.count()) -> LiteRTStage:  # noqa: B008 - one per stage
            # next() on a count is atomic: each replica thread takes its own device
            return LiteRTStage.create(path, num_threads, devs[next(counter)], keep, last)

        specs.append(StageSpec(path.stem, factory, replicas))
    return Model(stages=specs, inputs=io[0][1], outputs=io[-1][2],
                 prepare=validator(io[0][1], cast, max_input_bytes),
                 info={"backend": "litert", "segments": [str(p) for p in paths],
                       "device": device or "cpu"})
