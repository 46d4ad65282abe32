"""ONNX Runtime: ``.onnx`` files, one session per segment and replica.

``aioaccel.open("model.onnx")`` or a list of segment files. ``InferenceSession.run`` releases
the GIL. Options: ``providers`` (default ``["CPUExecutionProvider"]``), ``num_threads`` (intra-op
threads per session; with several segments or replicas the default shares the cores out, one
session per core at least, instead of a spinning pool per session on every core),
``session_options`` (a callable that edits the ``SessionOptions``), ``cast``,
``max_input_bytes``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from ..stages import BlockingStage, StageSpec
from ..tensors import TensorSpec
from . import Model, require
from ._segments import SegmentIO, Wiring, build_model, model_paths, plan

__all__ = ["OnnxStage", "load"]

_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(uint32)": "uint32",
    "tensor(int64)": "int64", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}


def runtime() -> Any:
    return require("onnx", "onnxruntime")


def _spec(arg: Any) -> TensorSpec:
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise ValueError(f"tensor {arg.name!r} has type {arg.type}, which aioaccel does not map")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return TensorSpec(arg.name, dtype, shape)


def _session(path: Path, providers: Sequence[str], num_threads: int | None,
             session_options: Callable[[Any], None] | None) -> Any:
    ort = runtime()
    options = ort.SessionOptions()
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    if session_options is not None:
        session_options(options)
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


class OnnxStage(BlockingStage):
    def __init__(self, session: Any, wiring: Wiring):
        self.session = session
        self._wiring = wiring
        self._outputs = list(wiring.outputs)

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wiring = self._wiring
        return wiring.pass_on_values(tensors, self.session.run(self._outputs,
                                                               wiring.gather(tensors)))


def load(target: Any, *, replicas: int = 1, providers: Sequence[str] | None = None,
         num_threads: int | None = None, session_options: Callable[[Any], None] | None = None,
         cast: bool = False, max_input_bytes: int | None = None) -> Model:
    paths = model_paths(target, (".onnx",))
    providers = list(providers or ["CPUExecutionProvider"])
    workers = len(paths) * replicas
    if num_threads is None and workers > 1:
        # Each session's default pool has a (spinning) thread per core: several sessions would
        # oversubscribe the cores. Share them out instead.
        num_threads = max(1, (os.cpu_count() or 1) // workers)
    io = [_probe(path, providers, session_options) for path in paths]
    wirings = plan(io)
    specs = []
    for i, path in enumerate(paths):
        def factory(path: Path = path, wiring: Wiring = wirings[i]) -> OnnxStage:
            return OnnxStage(_session(path, providers, num_threads, session_options), wiring)

        specs.append(StageSpec(path.stem, factory, replicas))
    return build_model(io, specs, cast=cast, max_input_bytes=max_input_bytes,
                       info={"backend": "onnx", "segments": [str(p) for p in paths],
                             "providers": providers})


def _probe(path: Path, providers: Sequence[str],
           session_options: Callable[[Any], None] | None) -> SegmentIO:
    ort = runtime()
    try:
        session = _session(path, providers, 1, session_options)
    except Exception as exc:  # onnxruntime's own classes (Fail, InvalidGraph, ...) vary
        reason = " ".join(str(exc).split())[:500]
        raise ModelLoadError(f"ONNX Runtime {ort.__version__} cannot load {str(path)!r}: "
                             f"{reason}") from exc
    return SegmentIO(path.name, [_spec(a) for a in session.get_inputs()],
                     [_spec(a) for a in session.get_outputs()])
