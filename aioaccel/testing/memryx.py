"""A simulated MemryX runtime: ``AsyncAccl``, ``SyncAccl``, ``MultiStreamAsyncAccl``.

``with simulate_memryx() as sim:`` installs a module named ``memryx`` in ``sys.modules`` (and
removes it on exit), so code that does ``from memryx import AsyncAccl`` -- aioaccel's
``backend="memryx"`` or your own -- runs its real code paths against it.

A real ``.dfp`` comes from MemryX's NeuralCompiler; the simulator runs *simulated* DFPs written
by :func:`write_dfp` from :mod:`aioaccel.testing.models` chains (one or more models per file),
and computes real outputs with NumPy. Each model has ports named like the chain's tensors.

What follows the vendor contract (the seed document of the MemryX Accelerator API):

* ``AsyncAccl.connect_input(callback, model_idx)`` starts a thread that *pulls* frames by
  calling ``callback()`` whenever the model's input buffer has room; returning ``None`` or
  raising ends that model's input stream. A callback that takes parameters is refused with
  ``RuntimeError``. ``connect_output(callback, model_idx)`` starts a thread that calls
  ``callback(*fmaps)`` for each result, in order. ``stop()`` stops every model and blocks until
  its threads are gone (a thread inside a blocking input callback finishes that call first).
  ``wait()`` raises ``RuntimeError`` when a model's input or output is unconnected, else blocks
  until every model's stream ended and its outputs were delivered.
* ``SyncAccl.send(data, model_idx, timeout)`` copies a frame into the model's input buffer and
  returns; with the buffer full it blocks for ``timeout`` ms (``None``: forever) and then raises
  ``TimeoutError``. ``receive(model_idx, timeout)`` likewise waits for an output. ``run`` does
  both, for one frame or a list of frames.
* ``MultiStreamAsyncAccl.connect_streams(input_callback, output_callback, stream_count,
  model_idx)``: ``input_callback(stream_idx)`` and ``output_callback(stream_idx, *fmaps)``;
  ``stream_workers`` threads (default: one per stream) pull the streams in turn.
* ``inport_assignment`` / ``outport_assignment`` map port ids to layer names.

Buffers hold ``buffer`` frames per model (input and output side), so backpressure reaches the
callbacks. ``hang_at`` makes the frame with that index (per accelerator, in arrival order)
hang until ``sim.release()``; ``fail_at`` makes the chip fail there: async APIs stop
delivering, ``SyncAccl.receive`` raises ``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .models import Chain, Layer

__all__ = ["MemryxSimulation", "SimulatedAsyncAccl", "SimulatedMultiStreamAsyncAccl",
           "SimulatedSyncAccl", "install_in_child", "simulate_memryx", "write_dfp"]

_MARK = "aioaccel simulated dfp v1"
_END = object()


# ---- simulated DFP files -----------------------------------------------------------------
def write_dfp(path: str | os.PathLike[str], *chains: Chain) -> Path:
    """Write a simulated DFP holding one model per chain (model_idx = position)."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"mark": _MARK, "models": []}
    for m, chain in enumerate(chains):
        meta["models"].append({
            "input_shape": list(chain.input_shape),
            "input": chain.input_name, "output": chain.output_name,
            "layers": [{"kind": layer.kind, "relu": layer.relu} for layer in chain.layers],
        })
        for k, layer in enumerate(chain.layers):
            arrays[f"m{m}w{k}"] = layer.weights
            arrays[f"m{m}b{k}"] = layer.bias
    buffer = io.BytesIO()
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    target = Path(path)
    target.write_bytes(buffer.getvalue())
    return target


def _read_dfp(dfp: Any) -> list[_Model]:
    data = dfp if isinstance(dfp, (bytes, bytearray)) else Path(dfp).read_bytes()
    try:
        npz = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
        meta = json.loads(str(npz["meta"]))
        assert meta["mark"] == _MARK
    except Exception as exc:
        raise RuntimeError("not a DFP the MemryX simulator can run (write one with "
                           "aioaccel.testing.memryx.write_dfp)") from exc
    models = []
    for m, spec in enumerate(meta["models"]):
        layers = tuple(Layer(d["kind"], npz[f"m{m}w{k}"], npz[f"m{m}b{k}"], d["relu"])
                       for k, d in enumerate(spec["layers"]))
        chain = Chain(tuple(spec["input_shape"]), layers)
        models.append(_Model(spec["input"], spec["output"], chain))
    return models


class _Model:
    def __init__(self, input_name: str, output_name: str, chain: Chain):
        self.input_name = input_name
        self.output_name = output_name
        self.chain = chain

    def check(self, frames: Any) -> np.ndarray:
        """The frame(s) the callback or ``send`` returned, as this one-input model takes."""
        if isinstance(frames, (list, tuple)):
            if len(frames) != 1:
                raise ValueError(f"model takes 1 input, got {len(frames)}")
            frames = frames[0]
        if not isinstance(frames, np.ndarray) or frames.dtype != np.float32:
            raise TypeError(f"input must be a float32 numpy array, got "
                            f"{getattr(frames, 'dtype', type(frames).__name__)}")
        if frames.shape != self.chain.input_shape:
            raise ValueError(f"input shape {frames.shape} != {self.chain.input_shape}")
        return frames.copy()  # copied to the chip's buffer: the caller may reuse its array


# ---- the simulated chip ------------------------------------------------------------------
class MemryxSimulation:
    """What ``simulate_memryx`` installed, and what happened to it."""

    def __init__(self, groups: int, buffer: int, latency: float, fail_at: Iterable[int],
                 hang_at: Iterable[int]):
        self.groups = groups
        self.buffer = buffer
        self.latency = latency
        self.fail_at = frozenset(fail_at)
        self.hang_at = frozenset(hang_at)
        self.accelerators: list[_Accelerator] = []
        self.errors: list[BaseException] = []  #: exceptions the runtime swallowed
        self.hanging = threading.Event()
        self._released = threading.Event()
        self._frames = 0
        self._count_lock = threading.Lock()

    def _next_frame(self) -> int:
        with self._count_lock:
            index = self._frames
            self._frames += 1
        return index

    def release(self) -> None:
        self._released.set()


class _Pipe:
    """A bounded FIFO between runtime threads, which ``stop`` can interrupt."""

    def __init__(self, size: int, stopping: threading.Event, cond: threading.Condition):
        self.items: deque[Any] = deque()
        self.size = size
        self.peak = 0
        self._stopping = stopping
        self._cond = cond

    def put(self, item: Any, timeout: float | None = None) -> bool:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: len(self.items) < self.size or item is _END or self._stopping.is_set(),
                timeout)
            if not ok:
                return False
            if self._stopping.is_set():
                return True
            self.items.append(item)
            self.peak = max(self.peak, len(self.items))
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> Any:
        with self._cond:
            ok = self._cond.wait_for(lambda: self.items or self._stopping.is_set(), timeout)
            if not ok:
                raise TimeoutError
            if not self.items:
                return _END  # stopping
            item = self.items.popleft()
            self._cond.notify_all()
            return item


class _Accelerator:
    """The chip group a class instance opened: per model an input and an output buffer and a
    compute thread."""

    def __init__(self, dfp: Any, group_id: int, sim: MemryxSimulation, kind: str):
        if not isinstance(group_id, int) or not 0 <= group_id < sim.groups:
            raise RuntimeError(f"MemryX chip group {group_id} not found ({sim.groups} present)")
        self.sim = sim
        self.kind = kind
        self.models = _read_dfp(dfp)
        self.stopping = threading.Event()
        self.cond = threading.Condition()
        self.frames = 0
        self.failed = False
        self.inputs = [_Pipe(sim.buffer, self.stopping, self.cond) for _ in self.models]
        self.outputs = [_Pipe(sim.buffer, self.stopping, self.cond) for _ in self.models]
        self.threads: list[threading.Thread] = []
        for m in range(len(self.models)):
            self._spawn(self._compute, f"compute-{m}", m)
        sim.accelerators.append(self)

    def model(self, model_idx: int) -> _Model:
        if not isinstance(model_idx, int) or not 0 <= model_idx < len(self.models):
            raise RuntimeError(f"model_idx {model_idx!r} out of range: the DFP holds "
                               f"{len(self.models)} models")
        return self.models[model_idx]

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True,
                             name=f"aioaccel-sim-memryx-{self.kind}-{name}")
        t.start()
        self.threads.append(t)

    def _compute(self, m: int) -> None:
        model = self.models[m]
        while True:
            job = self.inputs[m].get()
            if job is _END:
                self.outputs[m].put(_END)
                return
            tag, frame = job
            with self.cond:
                self.frames += 1
            index = self.sim._next_frame()  # counted over every chip group opened
            if index in self.sim.hang_at:
                self.sim.hanging.set()
                self.sim._released.wait()
            if index in self.sim.fail_at or self.failed:
                self.failed = True
                self.sim.errors.append(RuntimeError(f"simulated chip failure at frame {index}"))
                continue  # nothing comes out any more
            if self.sim.latency:
                time.sleep(self.sim.latency)
            self.outputs[m].put((tag, [model.chain.reference(frame)]))

    def stop(self) -> None:
        self.stopping.set()
        with self.cond:
            self.cond.notify_all()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join()

    def ports(self, model_idx: int, output: bool) -> dict[int, str]:
        model = self.model(model_idx)
        return {0: model.output_name if output else model.input_name}


def _params(callback: Callable[..., Any]) -> list[inspect.Parameter]:
    return list(inspect.signature(callback).parameters.values())


class _AsyncBase:
    _accel: _Accelerator

    def stop(self) -> None:
        """Stop every model; blocks until the runtime's threads are gone."""
        self._accel.stop()

    def inport_assignment(self, model_idx: int = 0) -> dict[int, str]:
        return self._accel.ports(model_idx, output=False)

    def outport_assignment(self, model_idx: int = 0) -> dict[int, str]:
        return self._accel.ports(model_idx, output=True)

    def _deliver(self, m: int, call: Callable[[Any, list[np.ndarray]], None]) -> None:
        """Output thread: hand each result to the user's callback, in order."""
        while True:
            job = self._accel.outputs[m].get()
            if job is _END:
                return
            tag, fmaps = job
            try:
                call(tag, fmaps)
            except Exception as exc:  # the runtime logs it and carries on
                self._accel.sim.errors.append(exc)


class SimulatedAsyncAccl(_AsyncBase):
    """MemryX ``AsyncAccl(dfp, group_id=0, **kwargs)`` (see the module doc)."""

    def __init__(self, dfp: Any, group_id: int = 0, *, _sim: MemryxSimulation, **kwargs: Any):
        self._accel = _Accelerator(dfp, group_id, _sim, "async")
        self._connected: dict[int, set[str]] = {m: set() for m in range(len(self._accel.models))}

    def connect_input(self, callback: Callable[[], Any], model_idx: int = 0) -> None:
        model = self._accel.model(model_idx)
        if _params(callback):
            raise RuntimeError("the input callback must not take any parameters")
        self._connected[model_idx].add("input")
        accel = self._accel

        def pull() -> None:
            pipe = accel.inputs[model_idx]
            while not accel.stopping.is_set():
                try:
                    frames = callback()
                    if frames is None:
                        break
                    frame = model.check(frames)
                except Exception as exc:  # ends this model's input stream (documented)
                    accel.sim.errors.append(exc)
                    break
                pipe.put((None, frame))  # waits for room: the next pull waits with it
            pipe.put(_END)

        accel._spawn(pull, f"input-{model_idx}")

    def connect_output(self, callback: Callable[..., Any], model_idx: int = 0) -> None:
        self._accel.model(model_idx)
        self._connected[model_idx].add("output")
        self._accel._spawn(self._deliver, f"output-{model_idx}", model_idx,
                           lambda _tag, fmaps: callback(*fmaps))

    def wait(self) -> None:
        loose = [m for m, ends in self._connected.items() if ends != {"input", "output"}]
        if loose:
            raise RuntimeError(f"inputs/outputs of models {loose} are left unconnected")
        for t in self._accel.threads:
            if not t.name.endswith(tuple(f"compute-{m}" for m in self._connected)):
                t.join()
        self._accel.stop()

    def set_preprocessing_model(self, model_or_path: Any, model_idx: int = 0) -> None:
        raise NotImplementedError("the simulator runs no pre-processing models")

    def set_postprocessing_model(self, model_or_path: Any, model_idx: int = 0) -> None:
        raise NotImplementedError("the simulator runs no post-processing models")


class SimulatedMultiStreamAsyncAccl(_AsyncBase):
    """MemryX ``MultiStreamAsyncAccl(dfp, group_id=0, stream_workers=None, **kwargs)``."""

    def __init__(self, dfp: Any, group_id: int = 0, stream_workers: int | None = None, *,
                 _sim: MemryxSimulation, **kwargs: Any):
        self._accel = _Accelerator(dfp, group_id, _sim, "multistream")
        self._workers = stream_workers
        self._connected: set[int] = set()

    def connect_streams(self, input_callback: Callable[[int], Any],
                        output_callback: Callable[..., Any], stream_count: int,
                        model_idx: int = 0) -> None:
        model = self._accel.model(model_idx)
        if len(_params(input_callback)) != 1:
            raise RuntimeError("input_callback must take exactly one parameter: stream_idx")
        if len(_params(output_callback)) < 2:
            raise RuntimeError("output_callback must take stream_idx and the feature maps")
        if stream_count < 1:
            raise ValueError("stream_count must be >= 1")
        self._connected.add(model_idx)
        accel = self._accel
        workers = min(self._workers or stream_count, stream_count)
        live = [set(range(w, stream_count, workers)) for w in range(workers)]
        remaining = [workers]
        lock = threading.Lock()

        def pull(worker: int) -> None:
            mine = live[worker]
            while mine and not accel.stopping.is_set():
                for stream_idx in sorted(mine):  # this worker's streams, in turn
                    try:
                        frames = input_callback(stream_idx)
                        if frames is None:
                            mine.discard(stream_idx)
                            continue
                        frame = model.check(frames)
                    except Exception as exc:  # ends this stream
                        accel.sim.errors.append(exc)
                        mine.discard(stream_idx)
                        continue
                    accel.inputs[model_idx].put((stream_idx, frame))
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                accel.inputs[model_idx].put(_END)

        for w in range(workers):
            accel._spawn(pull, f"stream-worker-{w}", w)
        accel._spawn(self._deliver, f"output-{model_idx}", model_idx,
                     lambda stream_idx, fmaps: output_callback(stream_idx, *fmaps))

    def wait(self) -> None:
        loose = [m for m in range(len(self._accel.models)) if m not in self._connected]
        if loose:
            raise RuntimeError(f"inputs/outputs of models {loose} are left unconnected")
        for t in self._accel.threads:
            if "compute" not in t.name:
                t.join()
        self._accel.stop()


class SimulatedSyncAccl:
    """MemryX ``SyncAccl(dfp, group_id=0, **kwargs)`` (see the module doc)."""

    def __init__(self, dfp: Any, group_id: int = 0, *, _sim: MemryxSimulation, **kwargs: Any):
        self._accel = _Accelerator(dfp, group_id, _sim, "sync")

    def send(self, data: Any, model_idx: int = 0, timeout: int | None = None) -> None:
        frame = self._accel.model(model_idx).check(data)
        if not self._accel.inputs[model_idx].put((None, frame), _ms(timeout)):
            raise TimeoutError(f"no space in the input buffer of model {model_idx} after "
                               f"{timeout} ms")

    def receive(self, model_idx: int = 0, timeout: int | None = None) -> Any:
        self._accel.model(model_idx)
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while True:
            if self._accel.failed:
                raise RuntimeError("MemryX accelerator error: the chip stopped responding")
            wait = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            try:
                job = self._accel.outputs[model_idx].get(max(wait, 0.0))
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no output from model {model_idx} after {timeout} "
                                       f"ms") from None
                continue
            if job is _END:
                raise RuntimeError("the accelerator was stopped")
            fmaps = job[1]
            return fmaps[0] if len(fmaps) == 1 else fmaps

    def run(self, inputs: Any, model_idx: int = 0) -> Any:
        """One frame (an array) -> its outputs; a list of frames -> a list of outputs."""
        batch = isinstance(inputs, list)
        frames: Sequence[Any] = inputs if batch else [inputs]
        outputs = []
        for frame in frames:
            self.send(frame, model_idx)
            outputs.append(self.receive(model_idx))
        return outputs if batch else outputs[0]

    def inport_assignment(self, model_idx: int = 0) -> dict[int, str]:
        return self._accel.ports(model_idx, output=False)

    def outport_assignment(self, model_idx: int = 0) -> dict[int, str]:
        return self._accel.ports(model_idx, output=True)

    def __del__(self) -> None:
        # The vendor API has no close(): the accelerator is released with the object.
        accel = getattr(self, "_accel", None)
        if accel is not None:
            accel.stop()


def _ms(timeout: int | None) -> float | None:
    return None if timeout is None else timeout / 1000


@contextlib.contextmanager
def simulate_memryx(groups: int = 1, *, buffer: int = 2, latency: float = 0.0,
                    fail_at: Iterable[int] = (), hang_at: Iterable[int] = ()
                    ) -> Iterator[MemryxSimulation]:
    """Install a simulated ``memryx`` module for the duration of the ``with`` block."""
    sim = MemryxSimulation(groups, buffer, latency, fail_at, hang_at)
    module = types.ModuleType("memryx")

    class AsyncAccl(SimulatedAsyncAccl):
        def __init__(self, dfp: Any, group_id: int = 0, **kwargs: Any):
            super().__init__(dfp, group_id, _sim=sim, **kwargs)

    class SyncAccl(SimulatedSyncAccl):
        def __init__(self, dfp: Any, group_id: int = 0, **kwargs: Any):
            super().__init__(dfp, group_id, _sim=sim, **kwargs)

    class MultiStreamAsyncAccl(SimulatedMultiStreamAsyncAccl):
        def __init__(self, dfp: Any, group_id: int = 0, stream_workers: int | None = None,
                     **kwargs: Any):
            super().__init__(dfp, group_id, stream_workers, _sim=sim, **kwargs)

    module.AsyncAccl = AsyncAccl  # type: ignore[attr-defined]
    module.SyncAccl = SyncAccl  # type: ignore[attr-defined]
    module.MultiStreamAsyncAccl = MultiStreamAsyncAccl  # type: ignore[attr-defined]
    module.__version__ = "simulated"  # type: ignore[attr-defined]
    saved = sys.modules.get("memryx")
    sys.modules["memryx"] = module
    try:
        yield sim
    finally:
        sim.release()
        for accel in sim.accelerators:
            accel.stop()
        if saved is None:
            sys.modules.pop("memryx", None)
        else:
            sys.modules["memryx"] = saved


def install_in_child(groups: int = 1) -> None:
    """Install the simulated ``memryx`` module for the rest of this process: the
    ``child_setup`` of ``aioaccel.open("model.dfp", isolation="process",
    child_setup="aioaccel.testing.memryx:install_in_child")``."""
    installed = simulate_memryx(groups)
    installed.__enter__()
    _installed.append(installed)  # kept: collecting it would uninstall the simulation


_installed: list[Any] = []
