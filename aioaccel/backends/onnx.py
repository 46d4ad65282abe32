"""ONNX Runtime: ``.onnx`` files, one session per segment and replica.

``aioaccel.open("model.onnx")`` or a list of segment files. ``InferenceSession.run`` releases
the GIL. Options: ``providers`` (default ``["CPUExecutionProvider"]``), ``num_threads`` (intra-op
threads per session; the default leaves one core to the event loop and shares the others
out between the sessions, at least one each, and turns the pool's spinning off:
ONNX Runtime's own default, a spinning pool on every core per session, competes with the loop),
``session_options`` (a callable that edits the ``SessionOptions``), ``cast``,
``max_input_bytes``, ``batch`` (N >= 2: stages receive up to N items joined along axis 0; every
segment's inputs and outputs need a dynamic first dimension, or open fails naming the tensor).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..batching import backend_batch, batched_model, require_batch_axis
from ..errors import ModelLoadError
from ..stages import BlockingStage, StageSpec
from ..tensors import TensorSpec
from . import Model, require
from ._exit import NativeCalls
from ._segments import SegmentIO, Wiring, build_model, model_paths, plan

__all__ = ["HAND_OUT_ABOVE", "SPINNING", "OnnxStage", "default_threads", "load"]

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


#: a session-config key ONNX Runtime reads as "0"/"1"
SPINNING = "session.intra_op.allow_spinning"


def default_threads(sessions: int) -> int:
    """Intra-op threads per session when ``num_threads`` is not given: one core is left to the
    event loop (and the Python work around each call), the rest shared out, at least 1 each."""
    return max(1, ((os.cpu_count() or 1) - 1) // sessions)


def _session(path: Path, providers: Sequence[str], num_threads: int | None,
             session_options: Callable[[Any], None] | None) -> Any:
    ort = runtime()
    options = ort.SessionOptions()
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    if session_options is not None:
        session_options(options)
    try:
        options.get_session_config_entry(SPINNING)
    except RuntimeError:  # not set by session_options: workers that spin idle steal the loop's
        options.add_session_config_entry(SPINNING, "0")  # core while the loop feeds them
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


#: outputs up to this size are written into a buffer bound once per shape and copied out; a
#: larger one gets a fresh buffer bound before each call and is handed out as it is (a copy
#: of a few MB costs more than binding)
HAND_OUT_ABOVE = 256 * 1024


class _Binding:
    """How one set of input shapes is bound: inputs copied into (or bound to) buffers,
    outputs written into preallocated arrays. Made on the first call with these shapes."""

    __slots__ = ("copied_in", "copied_out", "fresh", "inputs", "outputs", "shapes")

    def __init__(self, shapes: tuple[tuple[int, ...], ...]):
        self.shapes = shapes
        #: per input: the buffer bound once (small inputs are copied into it), or None (the
        #: caller's array is bound for each call)
        self.inputs: list[np.ndarray | None] = []
        #: per output: the array bound to it now
        self.outputs: list[np.ndarray] = []
        #: per output: whether it is handed out (and a fresh one bound before the next call)
        self.fresh: list[bool] = []
        #: the common case, made once: every input copied in and every output copied out,
        #: as (key, buffer) and (name, array) pairs; None when an input is bound in place or
        #: an output handed out
        self.copied_in: list[tuple[str, np.ndarray]] | None = None
        self.copied_out: list[tuple[str, np.ndarray]] | None = None


class OnnxStage(BlockingStage):
    """One session, driven through an ``IOBinding`` made once per input shapes.

    ``InferenceSession.run`` converts its arguments and builds its result list on every call;
    ``run_with_iobinding`` runs what is bound. So small inputs are copied into buffers bound
    once (larger ones, over :data:`HAND_OUT_ABOVE`, are bound in place for the call), and each
    output is written into an array allocated for its shape: a small one is copied out (the
    next call overwrites it), a large one is handed out and a fresh array bound before the
    next call. An output's shape must follow from the input shapes: every dimension is fixed
    or a symbol (``"batch"``) that an input also has. A model with other outputs (shapes that
    depend on the data) runs through ``session.run``, as does any call that fails bound: the
    item is run again that way, so a model whose declared shapes are wrong loses nothing (its
    bound path is then turned off), and a real failure raises the session's own error (a
    failing item costs two calls).
    """

    def __init__(self, session: Any, wiring: Wiring):
        self.session = session
        self._wiring = wiring
        self._outputs = list(wiring.outputs)
        self._calls = NativeCalls()  # finished before the interpreter exits
        declared_inputs = {arg.name: arg for arg in session.get_inputs()}
        self._keys = [key for _, key in wiring.feeds]
        self._input_names = [name for name, _ in wiring.feeds]
        self._input_dims = [list(declared_inputs[name].shape) for name in self._input_names]
        by_name = {arg.name: arg for arg in session.get_outputs()}
        self._output_args = [by_name[name] for name in self._outputs]
        self._output_dtypes = [np.dtype(_DTYPES[arg.type]) for arg in self._output_args]
        symbols = {dim for dims in self._input_dims for dim in dims if isinstance(dim, str)}
        #: whether calls run bound: every output's shape follows from the inputs' (turned
        #: off for good when a bound call fails and the same item then runs plainly)
        self.binds = all((isinstance(dim, int) and dim >= 0) or dim in symbols
                         for arg in self._output_args for dim in arg.shape)
        self._io = session.io_binding()
        self._bound: _Binding | None = None

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bound = self._bound
        copied_in = None if bound is None else bound.copied_in
        if copied_in is None or not self.binds:
            return self._run(tensors)
        # The hot path (small inputs and outputs, shapes as last time): nothing but the copies
        # and the call, on this thread that competes with the event loop for the GIL.
        for key, buffer in copied_in:
            value = tensors[key]
            if value.shape != buffer.shape:
                return self._run(tensors)  # other shapes: rebind
            np.copyto(buffer, value, casting="no")  # validated: never casts
        try:
            with self._calls:
                self.session.run_with_iobinding(self._io)
        except Exception:
            return self._failed_bound(tensors)
        outputs = {name: array.copy() for name, array in bound.copied_out}  # type: ignore[union-attr]
        return outputs if self._wiring.last else self._wiring.pass_on(tensors, outputs)

    def _run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Any call: binds for new shapes, binds large inputs in place and hands out large
        outputs, or runs plainly when the model cannot be bound."""
        if not self.binds:
            return self._run_plain(tensors)
        values = [tensors[key] for key in self._keys]
        shapes = tuple(value.shape for value in values)
        bound = self._bound
        io = self._io
        try:
            if bound is None or bound.shapes != shapes:  # first call, or other shapes
                bound = self._bind(values, shapes)
            for k, value in enumerate(values):
                buffer = bound.inputs[k]
                if buffer is None:  # large: bound in place for this call
                    io.bind_cpu_input(self._input_names[k], value)
                else:
                    np.copyto(buffer, value, casting="no")  # validated: never casts
            fresh = bound.fresh
            for k, handed in enumerate(fresh):
                if handed:  # the last call's array is the caller's now: bind a new one
                    self._bind_output(bound, k, np.empty_like(bound.outputs[k]))
            with self._calls:
                self.session.run_with_iobinding(io)
        except Exception:
            return self._failed_bound(tensors)
        values_out = [array if handed else array.copy()
                      for array, handed in zip(bound.outputs, fresh, strict=True)]
        return self._wiring.pass_on_values(tensors, values_out)

    def _failed_bound(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Bound wrongly (a model whose declared shapes lie), or the item fails: running it
        plainly tells which, and a failure raises the session's own error."""
        self._bound = None
        outputs = self._run_plain(tensors)
        self.binds = False  # it ran plainly after failing bound: binding is wrong here
        return outputs

    def _run_plain(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wiring = self._wiring
        with self._calls:
            values = self.session.run(self._outputs, wiring.gather(tensors))
        return wiring.pass_on_values(tensors, values)

    def _bind(self, values: list[np.ndarray], shapes: tuple[tuple[int, ...], ...]
              ) -> _Binding:
        """Bind buffers for these input shapes (the outputs' shapes follow from them)."""
        self._bound = None
        symbols: dict[str, int] = {}
        for dims, shape in zip(self._input_dims, shapes, strict=True):
            for dim, size in zip(dims, shape, strict=False):
                if isinstance(dim, str):
                    symbols.setdefault(dim, size)
        bound = _Binding(shapes)
        io = self._io
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        for name, value in zip(self._input_names, values, strict=True):
            if value.nbytes > HAND_OUT_ABOVE:
                bound.inputs.append(None)
                continue
            buffer = np.empty(value.shape, value.dtype)
            io.bind_cpu_input(name, buffer)
            bound.inputs.append(buffer)
        for k, (arg, dtype) in enumerate(zip(self._output_args, self._output_dtypes,
                                             strict=True)):
            shape = tuple(symbols[dim] if isinstance(dim, str) else dim for dim in arg.shape)
            bound.outputs.append(np.empty(0, dtype))
            self._bind_output(bound, k, np.empty(shape, dtype))
            bound.fresh.append(bound.outputs[k].nbytes > HAND_OUT_ABOVE)
        if not any(bound.fresh) and all(b is not None for b in bound.inputs):
            bound.copied_in = [(key, b) for key, b in zip(self._keys, bound.inputs, strict=True)
                               if b is not None]
            bound.copied_out = list(zip(self._outputs, bound.outputs, strict=True))
        self._bound = bound
        return bound

    def _bind_output(self, bound: _Binding, k: int, array: np.ndarray) -> None:
        # the binding holds only the pointer: ``bound`` keeps the array alive while it is bound
        self._io.bind_output(self._outputs[k], "cpu", 0, array.dtype, array.shape,
                             array.ctypes.data)
        bound.outputs[k] = array

    def close(self) -> None:
        self._calls.forget()


def load(target: Any, *, replicas: int = 1, providers: Sequence[str] | None = None,
         num_threads: int | None = None, session_options: Callable[[Any], None] | None = None,
         cast: bool = False, max_input_bytes: int | None = None,
         batch: int | None = None) -> Model:
    batch = backend_batch(batch, "onnx")
    paths = model_paths(target, (".onnx",))
    providers = list(providers or ["CPUExecutionProvider"])
    if num_threads is None:
        # Each session's default pool has a (spinning) thread per core: several sessions would
        # oversubscribe the cores, and even one competes with the event loop. Share them out.
        num_threads = default_threads(len(paths) * replicas)
    io = [_probe(path, providers, session_options) for path in paths]
    wirings = plan(io)
    if batch is not None:
        for segment in io:
            require_batch_axis(segment.inputs, batch, "input", segment.label)
            require_batch_axis(segment.outputs, batch, "output", segment.label)
    specs = []
    for i, path in enumerate(paths):
        def factory(path: Path = path, wiring: Wiring = wirings[i]) -> OnnxStage:
            return OnnxStage(_session(path, providers, num_threads, session_options), wiring)

        specs.append(StageSpec(path.stem, factory, replicas))
    model = build_model(io, specs, cast=cast, max_input_bytes=max_input_bytes,
                        info={"backend": "onnx", "segments": [str(p) for p in paths],
                              "providers": providers, "num_threads": num_threads})
    return batched_model(model, batch, cast=cast, max_input_bytes=max_input_bytes)


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
