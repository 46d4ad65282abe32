"""MemryX MX3: ``.dfp`` files through the MemryX SDK (``AsyncAccl``, ``SyncAccl``,
``MultiStreamAsyncAccl``).

The MemryX runtime *pulls* inputs: it calls an input callback on its own thread whenever a
model can take a frame, and calls an output callback on another thread with each result.
aioaccel turns that inside out:

* ``api="async"`` (default) -- ``AsyncAccl``. ``push``/``infer`` put items on a bounded queue
  per model (``queue_size``, default ``maxsize``); the input callback takes from it (blocking
  while it is empty, which is how the runtime waits for a frame) and returns ``None`` once the
  runner closes, which ends the vendor stream. The output callback pairs each result with the
  oldest item handed to that model (MemryX keeps order per model) and hands it to the bridge.
  ``model_idx=[0, 1]`` runs several models of one DFP on the accelerator: each item carries
  one input per model, and its result is a list with each model's outputs.
* ``api="sync"`` -- ``SyncAccl``: the feeder thread calls ``send`` (blocking while the model's
  buffer is full) and a receiver thread calls ``receive`` with a timeout, for batch work.
* ``streams=N`` (or ``api="multistream"``) -- ``MultiStreamAsyncAccl`` with ``N`` streams:
  ``runner.stream(key)`` maps onto the vendor's ``stream_idx``, so each camera's frames travel
  in their own vendor stream and come back to their own ``async for``.

Callbacks never raise: per the vendor contract an exception in an input callback ends that
model's stream, so they catch everything and report it (a per-item problem fails that item; a
broken pairing breaks the runner with :class:`~aioaccel.DeviceError`). ``aclose()`` ends the
input streams, waits for the outputs of what was handed over, then calls ``stop()``.

Inputs: the SDK does not describe input shapes, so aioaccel checks the count, names (from
``inport_assignment``) and dtype (float32 unless ``dtype=``); give ``input_shapes=[(...), ...]``
(one per input port) and shapes are checked too before anything reaches the accelerator.

Options: ``api``, ``group_id``, ``model_idx``, ``streams``, ``queue_size``, ``input_shapes``,
``dtype``, ``cast``, ``max_input_bytes``, ``poll_ms`` (SyncAccl receive timeout), and other
keyword options for the accelerator class.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DeviceError, InputError
from ..stages import Complete, DeviceStage, StageSpec, made
from ..tensors import TensorSpec
from . import Model, require
from ._segments import validator

__all__ = ["MemryxAsyncStage", "MemryxMultiStreamStage", "MemryxSyncStage", "load"]

_END = object()


def sdk() -> Any:
    return require("memryx", "memryx")


class _MemryxStage(DeviceStage):
    """Pairing and draining shared by the three APIs: FIFO tokens per vendor queue."""

    def __init__(self, accl: Any, in_names: list[list[str]], out_names: list[list[str]],
                 lanes: int):
        self.accl = accl
        self._in = in_names
        self._out = out_names
        self._pending: list[deque[object]] = [deque() for _ in range(lanes)]
        self._lock = threading.Condition()
        self._outstanding = 0                # submitted and not completed
        self._complete: Complete | None = None
        self._stopped = False
        self._broken = False

    def _handed(self, lane: int, token: object) -> None:
        with self._lock:
            self._pending[lane].append(token)

    def _finished(self, lane: int, fmaps: Sequence[Any], names: list[str]) -> object | None:
        """Pair one vendor result with its token; None (and the runner broken) if none."""
        with self._lock:
            token = self._pending[lane].popleft() if self._pending[lane] else None
        if token is None:
            self._fatal(DeviceError(f"MemryX returned a result on queue {lane} for no "
                                    f"pending input"))
            return None
        if len(fmaps) != len(names):
            self._fatal(DeviceError(f"MemryX returned {len(fmaps)} feature maps, the model "
                                    f"has {len(names)} outputs {names}"))
            return None
        return token

    def _done(self, token: object, outputs: Any, error: BaseException | None) -> None:
        with self._lock:
            self._outstanding -= 1
            self._lock.notify_all()
        self._complete(token, outputs, error)  # type: ignore[misc]

    def _fatal(self, error: BaseException) -> None:
        with self._lock:
            self._broken = True  # nothing more will pair up: close must not wait for it
            self._lock.notify_all()
        if not isinstance(error, DeviceError):
            wrapped = DeviceError(f"MemryX adapter failed: {error!r}")
            wrapped.__cause__ = error
            error = wrapped
        self._complete(None, None, error)  # type: ignore[misc]

    def _count_in(self) -> None:
        with self._lock:
            self._outstanding += 1

    def _drain(self, timeout: float = 2.0) -> None:
        """Wait until every item handed over came back (bounded: a dead chip never answers;
        the runner has failed those items by then, and a healthy one has answered: the runner
        drains its results before it stops its stages)."""
        with self._lock:
            self._lock.wait_for(lambda: self._outstanding <= 0 or self._broken, timeout)

    def release(self) -> None:
        """Stop the accelerator (idempotent; also called if the runner fails to open).
        ``SyncAccl`` has no ``stop``: it is released with the last reference."""
        if self._stopped:
            return
        self._stopped = True
        if hasattr(self.accl, "stop"):
            self.accl.stop()
        self.accl = None


class _PulledStage(_MemryxStage):
    """The runtime pulls inputs: one bounded queue per vendor lane (model or stream) that the
    input callbacks take from, and ``_END`` in each to end the vendor streams."""

    def __init__(self, accl: Any, in_names: list[list[str]], out_names: list[list[str]],
                 lanes: int, queue_size: int):
        super().__init__(accl, in_names, out_names, lanes)
        self._queues: list[queue.Queue[Any]] = [queue.Queue(queue_size) for _ in range(lanes)]

    def _offer(self, lane: int, token: object, tensors: dict[str, Any], names: list[str]) -> None:
        # blocks while the lane's queue is full: backpressure reaches push/infer
        self._queues[lane].put((token, [tensors[name] for name in names]))

    def _pull(self, lane: int) -> Any:
        """The next frame(s) for the runtime, or None to end its stream. Called by the runtime:
        never raises (an exception would end the vendor stream unreported)."""
        try:
            job = self._queues[lane].get()  # the runtime waits here for the next frame
            if job is _END:
                return None
            token, frames = job
            self._handed(lane, token)
            return frames[0] if len(frames) == 1 else frames
        except BaseException as exc:
            self._fatal(exc)
            return None

    def close(self) -> None:
        for lane in self._queues:
            lane.put(_END)  # the input callbacks return None: the vendor streams end
        self._drain()
        self.release()


class MemryxAsyncStage(_PulledStage):
    def __init__(self, accl: Any, models: list[int], in_names: list[list[str]],
                 out_names: list[list[str]], queue_size: int, fan_out: bool):
        super().__init__(accl, in_names, out_names, len(models), queue_size)
        self.models = models
        self._fan_out = fan_out
        self._partial: dict[object, list[Any]] = {}

    def start(self, complete: Complete) -> None:
        self._complete = complete
        for lane, m in enumerate(self.models):
            self.accl.connect_output(self._output(lane), m)
        for lane, m in enumerate(self.models):
            self.accl.connect_input(self._input(lane), m)

    def submit(self, token: object, inputs: Any) -> None:
        per_model = inputs if self._fan_out else [inputs]
        self._count_in()
        if self._fan_out:
            with self._lock:
                self._partial[token] = [None] * len(self.models)
        for lane, tensors in enumerate(per_model):
            self._offer(lane, token, tensors, self._in[lane])

    def _input(self, lane: int) -> Callable[[], Any]:
        def pull() -> Any:  # AsyncAccl refuses input callbacks that take parameters
            return self._pull(lane)

        return pull

    def _output(self, lane: int) -> Callable[..., None]:
        names = self._out[lane]

        def receive(*fmaps: Any) -> None:  # called by the runtime: must not raise
            try:
                token = self._finished(lane, fmaps, names)
                if token is None:
                    return
                outputs = dict(zip(names, fmaps, strict=True))
                if not self._fan_out:
                    self._done(token, outputs, None)
                    return
                with self._lock:
                    parts = self._partial[token]
                    parts[lane] = outputs
                    whole = all(p is not None for p in parts)
                    if whole:
                        del self._partial[token]
                if whole:
                    self._done(token, parts, None)
            except BaseException as exc:
                self._fatal(exc)

        return receive


class MemryxMultiStreamStage(_PulledStage):
    def __init__(self, accl: Any, model: int, streams: int, in_names: list[str],
                 out_names: list[str], queue_size: int):
        super().__init__(accl, [in_names], [out_names], streams, queue_size)
        self.model = model
        self.streams = streams

    def start(self, complete: Complete) -> None:
        self._complete = complete
        self.accl.connect_streams(self._pull, self._output, self.streams, self.model)

    def submit(self, token: object, tensors: Any) -> None:
        self.submit_stream(token, tensors, 0)

    def submit_stream(self, token: object, tensors: Any, stream: int) -> None:
        stream_idx = stream % self.streams  # the runner's stream -> the vendor's stream
        self._count_in()
        self._offer(stream_idx, token, tensors, self._in[0])

    def _output(self, stream_idx: int, *fmaps: Any) -> None:  # must not raise
        try:
            token = self._finished(stream_idx, fmaps, self._out[0])
            if token is not None:
                self._done(token, dict(zip(self._out[0], fmaps, strict=True)), None)
        except BaseException as exc:
            self._fatal(exc)


class MemryxSyncStage(_MemryxStage):
    def __init__(self, accl: Any, model: int, in_names: list[str], out_names: list[str],
                 poll_ms: int, name: str):
        super().__init__(accl, [in_names], [out_names], 1)
        self.model = model
        self._poll_ms = poll_ms
        self._name = name
        self._closing = False
        self._receiver: threading.Thread | None = None

    def start(self, complete: Complete) -> None:
        self._complete = complete
        self._receiver = threading.Thread(target=self._receive, daemon=True,
                                          name=f"aioaccel-{self._name}-receive")
        self._receiver.start()

    def submit(self, token: object, tensors: Any) -> None:
        frames = [tensors[n] for n in self._in[0]]
        self._count_in()
        self._handed(0, token)  # before send: receive may return before send does
        try:
            self.accl.send(frames[0] if len(frames) == 1 else frames, self.model, timeout=None)
        except Exception:
            with self._lock:  # refused: nothing of it is on the device
                self._pending[0].pop()
                self._outstanding -= 1
                self._lock.notify_all()
            raise

    def _receive(self) -> None:
        names = self._out[0]
        while True:
            with self._lock:
                if self._closing and not self._pending[0]:
                    return
            try:
                out = self.accl.receive(self.model, timeout=self._poll_ms)
            except TimeoutError:
                continue  # nothing yet: look at _closing again
            except Exception as exc:
                error = DeviceError(f"MemryX SyncAccl.receive failed: {exc!r}")
                error.__cause__ = exc
                self._fatal(error)
                return
            fmaps = list(out) if isinstance(out, (list, tuple)) else [out]
            token = self._finished(0, fmaps, names)
            if token is None:
                return
            self._done(token, dict(zip(names, fmaps, strict=True)), None)

    def close(self) -> None:
        with self._lock:
            self._closing = True
        if self._receiver is not None:
            self._receiver.join()
        self.release()


# ---- loading ---------------------------------------------------------------------------------
def _ports(assignment: dict[int, str]) -> list[str]:
    return [name for _, name in sorted(assignment.items())]


def _dfp(target: Any) -> Any:
    if isinstance(target, (bytes, bytearray)):
        return target
    if not isinstance(target, (str, os.PathLike)):
        raise TypeError(f"backend='memryx' opens a .dfp path or DFP bytes, got "
                        f"{type(target).__name__}")
    path = Path(target)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {str(path)!r}")
    if path.suffix.lower() != ".dfp":
        raise ValueError(f"{str(path)!r} is not a .dfp file (compile the model with MemryX's "
                         f"NeuralCompiler)")
    return str(path)


def load(target: Any, *, replicas: int = 1, maxsize: int = 8, api: str = "async",
         group_id: int = 0, model_idx: int | Sequence[int] = 0, streams: int | None = None,
         queue_size: int | None = None, input_shapes: Sequence[Sequence[int]] | None = None,
         dtype: str = "float32", cast: bool = False, max_input_bytes: int | None = None,
         poll_ms: int = 50, runner_name: str = "runner", **accl_options: Any) -> Model:
    if replicas != 1:
        raise ValueError("backend='memryx': the accelerator pipelines internally; use "
                         "maxsize (and streams=) instead of replicas")
    if streams is not None:
        api = "multistream" if api == "async" else api
    if api not in ("async", "sync", "multistream"):
        raise ValueError(f"api must be 'async', 'sync' or 'multistream', got {api!r}")
    if api == "multistream" and (not isinstance(streams, int) or streams < 1):
        raise ValueError("api='multistream' needs streams=N (the number of vendor streams)")
    fan_out = not isinstance(model_idx, int)
    models = ([int(m) for m in model_idx] if isinstance(model_idx, Sequence)
              else [int(model_idx)])
    if fan_out and (api != "async" or not models):
        raise ValueError("several models (model_idx=[...]) run with api='async' only")
    dfp = _dfp(target)
    memryx = sdk()
    size = maxsize if queue_size is None else queue_size
    cls = {"async": "AsyncAccl", "sync": "SyncAccl", "multistream": "MultiStreamAsyncAccl"}[api]
    try:
        accl = getattr(memryx, cls)(dfp, group_id=group_id, **accl_options)
    except (RuntimeError, OSError) as exc:
        raise DeviceError(f"cannot open MemryX chip group {group_id} with {cls}: {exc}") from exc
    in_names = [_ports(accl.inport_assignment(m)) for m in models]
    out_names = [_ports(accl.outport_assignment(m)) for m in models]

    checks: list[Callable[[Any], dict[str, np.ndarray]]] = []
    specs: list[TensorSpec] = []
    for names in in_names:
        shapes: list[tuple[int, ...] | None] = [None] * len(names)  # the SDK does not say
        if input_shapes is not None and not fan_out:
            if len(input_shapes) != len(names):
                raise ValueError(f"input_shapes lists {len(input_shapes)} shapes, the model "
                                 f"has {len(names)} inputs {names}")
            shapes = [tuple(s) for s in input_shapes]
        model_specs = [TensorSpec(n, dtype, s) for n, s in zip(names, shapes, strict=True)]
        if input_shapes is not None and not fan_out:
            specs += model_specs
        checks.append(validator(model_specs, cast, max_input_bytes))
    if fan_out:
        def prepare(inputs: Any) -> list[dict[str, np.ndarray]]:
            if not isinstance(inputs, (list, tuple)) or len(inputs) != len(models):
                raise InputError(f"this runner feeds models {models}: pass a list with one "
                                 f"input per model")
            return [check(x) for check, x in zip(checks, inputs, strict=True)]
    else:
        prepare = checks[0]  # type: ignore[assignment]

    stage: _MemryxStage
    if api == "async":
        stage = MemryxAsyncStage(accl, models, in_names, out_names, size, fan_out)
    elif api == "sync":
        stage = MemryxSyncStage(accl, models[0], in_names[0], out_names[0], poll_ms,
                                f"{runner_name}-mx3")
    else:
        stage = MemryxMultiStreamStage(accl, models[0], streams, in_names[0],  # type: ignore[arg-type]
                                       out_names[0], size)
    return Model(
        stages=[StageSpec(f"mx3-{api}", made(stage), device=True)],
        inputs=specs or None, outputs=None, prepare=prepare, close=stage.release,
        info={"backend": "memryx", "api": cls, "group_id": group_id, "models": models,
              "inputs": in_names, "outputs": out_names},
        max_streams=streams if api == "multistream" else None,
    )
