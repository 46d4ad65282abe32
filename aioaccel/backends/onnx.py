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

from ..stages import BlockingStage, StageSpec
from ..tensors import TensorSpec
from . import Model, require
from ._exit import NativeCalls
from ._segments import carry, check_chain, loading, model_paths, needed_after, validator

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
    def __init__(self, session: Any, keep: frozenset[str], last: bool):
        self.session = session
        self._inputs = [i.name for i in session.get_inputs()]
        self._outputs = [o.name for o in session.get_outputs()]
        self._keep = keep
        self._last = last
        self._calls = NativeCalls()  # finished before the interpreter exits

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._calls:
            values = self.session.run(self._outputs,
                                      {name: tensors[name] for name in self._inputs})
        return carry(tensors, dict(zip(self._outputs, values, strict=True)), self._keep,
                     self._last)

    def close(self) -> None:
        self._calls.forget()


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
    io = []
    for path in paths:
        with loading(path, "ONNX Runtime"):
            probe = _session(path, providers, 1, session_options)
        io.append((path.name, [_spec(a) for a in probe.get_inputs()],
                   [_spec(a) for a in probe.get_outputs()]))
    check_chain(io)
    keeps = needed_after([inputs for _, inputs, _ in io])
    specs = []
    for i, path in enumerate(paths):
        def factory(path: Path = path, keep: frozenset[str] = keeps[i],
                    last: bool = i == len(paths) - 1) -> OnnxStage:
            return OnnxStage(_session(path, providers, num_threads, session_options), keep, last)

        specs.append(StageSpec(path.stem, factory, replicas))
    return Model(stages=specs, inputs=io[0][1], outputs=io[-1][2],
                 prepare=validator(io[0][1], cast, max_input_bytes),
                 info={"backend": "onnx", "segments": [str(p) for p in paths],
                       "providers": providers})
