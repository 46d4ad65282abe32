"""A simulated pycoral: ``PipelinedModelRunner``, ``make_interpreter``, ``list_edge_tpus``.

``with simulate_coral(tpus=2) as sim:`` installs modules named ``pycoral``,
``pycoral.utils.edgetpu`` and ``pycoral.pipeline.pipelined_model_runner`` in ``sys.modules``
(and removes them on exit), so code that imports pycoral -- aioaccel's ``backend="coral"``, or
your own -- runs its real code paths against them. Interpreters are LiteRT interpreters on the
CPU, so results are real and can be checked against a reference.

:class:`SimulatedPipelinedModelRunner` follows pycoral's Python code and libcoral's
``coral/pipeline/pipelined_model_runner.cc`` (docs/testing.md lists each behaviour with the
line it follows, and what is not reproduced):

* one thread per segment; tensors pass between segments by name; the queues *between*
  segments hold one request each (``kInternalQueueSize = 1``); the input and output queues are
  unbounded unless ``set_input_queue_size`` / ``set_output_queue_size`` bound them, so with
  nobody popping ``push`` blocks once input queue + segments + links + output queue are full;
* the constructor refuses what pycoral refuses (``ValueError``) and raises
  :class:`SimulatedAbort` where libcoral aborts the process: an output of a segment that no
  later segment consumes; ``push`` does too for inputs out of the first segment's order;
* the empty request (``{}``, or ``[]`` in 1.0) shuts the pipeline down: it returns once every
  segment has drained, then ``pop`` returns what is left and ``None`` after; a later ``push``
  raises ``RuntimeError`` (2.0) or returns ``False`` (1.0);
* a failed segment (``fail_at``) stops the pipeline: the next ``pop`` and ``push`` raise
  ``RuntimeError("Segment i runner error: ...")`` (a result already queued is lost, as in
  libcoral, which checks the status after taking it), later pops return ``None``;
* ``__del__`` pushes a second empty request if ``_runner`` is still set, as pycoral 2.0.0
  does -- which raises inside ``__del__`` when the stream was already ended.

``version="1.0.0"`` gives the 1.0 API (lists of arrays in tensor order); ``"2.0.0"`` (default)
the dict API of the seed documentation.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

__all__ = ["INTERNAL_QUEUE_SIZE", "CoralSimulation", "SimulatedAbort",
           "SimulatedPipelinedModelRunner", "install_in_child", "simulate_coral"]

#: set by :func:`install_in_child`: libcoral's CHECK failures abort the process for real
_REAL_ABORT = False


class CoralSimulation:
    """What ``simulate_coral`` installed, and what happened to it."""

    def __init__(self, tpus: list[dict[str, str]], version: str, latency: float,
                 fail_at: Iterable[int], hang_at: Iterable[int]):
        self.tpus = tpus
        self.version = version
        self.latency = latency            #: seconds each segment adds per request
        self.fail_at = frozenset(fail_at)  #: request indices whose first segment fails
        self.hang_at = frozenset(hang_at)  #: request indices whose first segment hangs
        #: the native side of every runner made, in order (the runners themselves are not
        #: kept, so that their ``__del__`` runs when the caller drops them)
        self.engines: list[_Engine] = []
        self.interpreters: list[tuple[str, str]] = []  #: (model path, TPU path) made
        self.hanging = threading.Event()
        self._released = threading.Event()
        self._requests = 0
        self._count_lock = threading.Lock()

    def _next_request(self) -> int:
        with self._count_lock:
            number = self._requests
            self._requests += 1
        return number

    def release(self) -> None:
        """Let hung segments (``hang_at``) carry on."""
        self._released.set()

    # ---- pycoral.utils.edgetpu ---------------------------------------------------------
    def list_edge_tpus(self) -> list[dict[str, str]]:
        return [dict(t) for t in self.tpus]

    def _find(self, device: str | None) -> dict[str, str]:
        kind, _, index = (device or "").partition(":")
        pool = [t for t in self.tpus if not kind or t["type"] == kind]
        n = int(index) if index else 0
        if kind not in ("", "usb", "pci") or n >= len(pool):
            # what tflite's load_delegate raises when libedgetpu finds no such device
            raise ValueError("Failed to load delegate from libedgetpu.so.1")
        return pool[n]

    def make_interpreter(self, model_path_or_content: Any, device: str | None = None,
                         delegate: Any = None) -> Any:
        from ..backends.litert import interpreter_module

        Interpreter = interpreter_module().Interpreter
        tpu = self._find(device)
        self.interpreters.append((str(model_path_or_content)[:200], tpu["path"]))
        if isinstance(model_path_or_content, bytes):
            return Interpreter(model_content=model_path_or_content)
        return Interpreter(model_path=model_path_or_content)

    def _request_fate(self, index: int) -> None:
        if index in self.hang_at:
            self.hanging.set()
            self._released.wait()
        if self.latency:
            time.sleep(self.latency)
        if index in self.fail_at:
            raise RuntimeError(f"simulated Edge TPU failure on request {index}")


def _check_failed(message: str) -> SimulatedAbort:
    """What libcoral's ``CHECK`` does: in a child installed with :func:`install_in_child`
    it writes the message and aborts the process, as libcoral does; else the exception."""
    if _REAL_ABORT:
        import os

        sys.stderr.write(f"F coral/pipeline: {message}\n")
        sys.stderr.flush()
        os.abort()
    return SimulatedAbort(message)


class SimulatedAbort(RuntimeError):
    """Where libcoral ``CHECK``-fails (aborts the process), the simulation raises this."""


# libcoral pipelined_model_runner.cc: ``const int kInternalQueueSize = 1;`` for every queue
# between two segments.
INTERNAL_QUEUE_SIZE = 1
_FAILED: dict[str, Any] = {}  # the empty tensor map a failed segment pushes downstream


class _Queue:
    """libcoral's ``WaitQueue``: FIFO, optionally bounded, with ``StopWaiters``."""

    def __init__(self, cond: threading.Condition, max_size: int = 0):
        self.cond = cond
        self.items: deque[Any] = deque()
        self.max_size = max_size  # 0: unbounded (kInfiniteQueueSize)
        self.stopped = False
        self.peak = 0

    def full(self) -> bool:
        return bool(self.max_size) and len(self.items) >= self.max_size


class _Engine:
    """The native side (``_pywrap_coral.PipelinedModelRunnerWrapper`` over libcoral's
    ``PipelinedModelRunner``): ``queues[i]`` feeds segment ``i``, which fills ``queues[i+1]``."""

    def __init__(self, interpreters: list[Any], sim: CoralSimulation):
        self.sim = sim
        self.interpreters = interpreters
        self.cond = threading.Condition()
        n = len(interpreters)
        self.queues = [_Queue(self.cond, 0 if i in (0, n) else INTERNAL_QUEUE_SIZE)
                       for i in range(n + 1)]
        self.turned_off = False     # pipeline_on_ == false
        self.status: list[str | None] = [None] * n  # each SegmentRunner's runner_status_
        self.pushed = 0
        self.empty_pushes = 0       # end-of-stream requests, including refused ones
        self.busy = [False] * n     # segment i holds a request (running or handing it on)
        self.waiting_pushes = 0     # callers blocked in push on a full input queue
        self.ending = False         # the simulation is over: nothing blocks any more
        self._shutdown_lock = threading.Lock()
        self.threads = [threading.Thread(target=self._segment, args=(i,), daemon=True,
                                         name=f"aioaccel-sim-coral-segment-{i}")
                        for i in range(n)]
        for t in self.threads:
            t.start()

    # what the old tests read
    @property
    def inputs(self) -> deque[Any]:
        return self.queues[0].items

    @property
    def outputs(self) -> deque[Any]:
        return self.queues[-1].items

    @property
    def links(self) -> list[_Queue]:
        return self.queues[1:-1]

    @property
    def input_max(self) -> int:
        return self.queues[0].max_size

    @property
    def output_max(self) -> int:
        return self.queues[-1].max_size

    @property
    def peak_inputs(self) -> int:
        return self.queues[0].peak

    @property
    def peak_outputs(self) -> int:
        return self.queues[-1].peak

    def held(self) -> int:
        """Requests inside the pipeline: queued anywhere or held by a segment."""
        with self.cond:
            return sum(len(q.items) for q in self.queues) + sum(self.busy)

    def set_queue_size(self, index: int, size: int) -> None:
        with self.cond:
            self.queues[index].max_size = size
            self.cond.notify_all()

    def _put(self, queue: _Queue, value: Any, pusher: bool = False) -> None:
        """``WaitQueue::push``: blocks while the queue is full."""
        with self.cond:
            blocked = pusher and queue.full()
            if blocked:
                self.waiting_pushes += 1
                self.cond.notify_all()
            while queue.full() and not self.ending:
                self.cond.wait()
            if blocked:
                self.waiting_pushes -= 1
            queue.items.append(value)
            queue.peak = max(queue.peak, len(queue.items))
            self.cond.notify_all()

    def _wait(self, queue: _Queue) -> tuple[bool, Any]:
        """``WaitQueue::Wait``: (True, item), or (False, None) once empty and stopped."""
        with self.cond:
            while not queue.items and not queue.stopped:
                self.cond.wait()
            if not queue.items:
                return False, None
            value = queue.items.popleft()
            self.cond.notify_all()
            return True, value

    def runner_status(self) -> str | None:
        """``GetRunnerStatus``: the first failed segment's error."""
        for index, error in enumerate(self.status):
            if error is not None:
                return f"Segment {index} runner error: {error}"
        return None

    def shutdown(self) -> None:
        """``ShutdownPipeline``: stop each queue's waiters and join its segment, in order."""
        with self._shutdown_lock:
            if self.turned_off:
                raise RuntimeError("Pipeline was turned off before.")
            for queue, thread in zip(self.queues, self.threads, strict=False):
                with self.cond:
                    queue.stopped = True
                    self.cond.notify_all()
                if thread is not threading.current_thread():
                    thread.join()
            with self.cond:
                self.queues[-1].stopped = True
                self.turned_off = True
                self.cond.notify_all()

    def push(self, request: Any) -> None:
        if not request:
            with self.cond:
                self.empty_pushes += 1
        status = self.runner_status()
        if status is not None:  # Push: "Shutdown pipeline due to runner error."
            try:
                self.shutdown()
            except RuntimeError:
                pass
            raise RuntimeError(status)
        if not request:
            self.shutdown()  # blocks until every segment drained its queue
            return
        with self.cond:
            if self.turned_off:
                raise RuntimeError("Pipeline was turned off before.")
            number = self.sim._next_request()  # counted over every runner, as documented
            self.pushed += 1
        self._put(self.queues[0], (number, request), pusher=True)

    def pop(self) -> Any:
        got, value = self._wait(self.queues[-1])
        if not got:
            return None  # "Queue is empty and StopWaiters() is called."
        status = self.runner_status()
        if status is not None:  # checked after taking the result: that result is lost
            try:
                self.shutdown()
            except RuntimeError:
                pass
            raise RuntimeError(status)
        return value

    def stop(self) -> None:
        """End the threads of a runner dropped without the empty request (simulation exit)."""
        with self.cond:
            self.ending = True
            for queue in self.queues:
                queue.stopped = True
            self.cond.notify_all()

    def _segment(self, index: int) -> None:
        """``SegmentRunner::RunInference``."""
        interpreter = self.interpreters[index]
        source, target = self.queues[index], self.queues[index + 1]
        last = index == len(self.interpreters) - 1
        details_in = interpreter.get_input_details()
        details_out = interpreter.get_output_details()
        while True:
            got, job = self._wait(source)
            if not got:
                return
            with self.cond:
                self.busy[index] = True
            error: str | None = None
            if job is _FAILED:
                error = "Empty input tensor map."
            else:
                number, tensors = job
                try:
                    if index == 0:
                        self.sim._request_fate(number)
                    elif self.sim.latency:
                        time.sleep(self.sim.latency)
                    for d in details_in:
                        interpreter.set_tensor(d["index"], tensors[d["name"]])
                    interpreter.invoke()
                    produced = {d["name"]: interpreter.get_tensor(d["index"])
                                for d in details_out}
                except Exception as exc:
                    error = str(exc)
            if error is not None:
                with self.cond:
                    self.status[index] = error
                self._put(target, _FAILED)  # "so that downstream runners could fail"
                with self.cond:
                    self.busy[index] = False
                return
            self._put(target, produced if last else (number, {**tensors, **produced}))
            with self.cond:
                self.busy[index] = False


class SimulatedPipelinedModelRunner:
    """pycoral's ``PipelinedModelRunner`` over simulated Edge TPUs (see the module doc)."""

    def __init__(self, interpreters: list[Any], *, _sim: CoralSimulation):
        self._runner: _Engine | None = None
        if not interpreters:
            raise ValueError("At least one interpreter expected")
        # pycoral: the inputs of interpreter i are a subset of what came before
        names = {d["name"] for d in interpreters[0].get_input_details()}
        for index, interpreter in enumerate(interpreters):
            if not {d["name"] for d in interpreter.get_input_details()} <= names:
                raise ValueError(f"Interpreter {index} can not get its input tensors")
            names |= {d["name"] for d in interpreter.get_output_details()}
        # libcoral's constructor: CHECK_GT(last_consumed_by_map[output_name], i) << "Output
        # tensor ... must be consumed by subsequent segment." -- an abort there, raised here
        for index, interpreter in enumerate(interpreters[:-1]):
            later = {d["name"] for after in interpreters[index + 1:]
                     for d in after.get_input_details()}
            for d in interpreter.get_output_details():
                if d["name"] not in later:
                    raise _check_failed(f"Check failed: Output tensor {d['name']} must be "
                                         f"consumed by subsequent segment. (segment {index}; "
                                         f"libcoral aborts the process here)")
        self._sim = _sim
        self._dicts = int(_sim.version.split(".")[0]) >= 2
        self._interpreters = interpreters
        self._input_details = interpreters[0].get_input_details()
        self._output_details = interpreters[-1].get_output_details()
        self._runner = self.engine = _Engine(interpreters, _sim)  # engine: for tests
        _sim.engines.append(self.engine)

    def __del__(self) -> None:
        if self._runner:  # as pycoral 2.0.0: no check whether the stream was already ended
            self.push({} if self._dicts else [])
            while self.pop():
                pass

    def interpreters(self) -> list[Any]:
        return self._interpreters

    def set_input_queue_size(self, size: int) -> None:
        self._engine().set_queue_size(0, size)

    def set_output_queue_size(self, size: int) -> None:
        self._engine().set_queue_size(-1, size)

    def push(self, input_tensors: Any) -> bool | None:
        engine = self._engine()
        if self._dicts:
            if not isinstance(input_tensors, dict):
                raise TypeError("input_tensors must be a dict of name -> numpy array")
            request = input_tensors
        else:
            if not isinstance(input_tensors, list):
                raise TypeError("input_tensors must be a list of numpy arrays")
            request = {d["name"]: t for d, t in zip(self._input_details, input_tensors,
                                                        strict=False)}  # pycoral checks count
        if input_tensors and len(input_tensors) != len(self._input_details):
            raise ValueError(f"Expected input of length {len(self._input_details)}, but got "
                             f"{len(input_tensors)}")
        types = {d["name"]: d["dtype"] for d in self._input_details}
        for name, tensor in request.items():
            input_type = types[name]  # pycoral: an unknown name is a KeyError
            if not isinstance(tensor, np.ndarray) or tensor.dtype != input_type:
                raise ValueError(f"Input should be a list of numpy array of type {input_type}")
        if request:
            # libcoral Push: CHECK_EQ(interpreter->input_tensor(i)->name, input_tensors[i].name),
            # with the dict in insertion order (the pybind wrapper iterates it)
            order = [d["name"] for d in self._input_details]
            if list(request) != order:
                raise _check_failed(f"Check failed: input tensors given in order "
                                     f"{list(request)}, the first segment takes {order} "
                                     f"(libcoral aborts the process here)")
        if not self._dicts:
            try:
                engine.push(request)
            except RuntimeError:
                return False
            return True
        engine.push(request)
        return None

    def pop(self) -> Any:
        result = self._engine().pop()
        if result is None or self._dicts:
            return result
        return [result[d["name"]] for d in self._output_details]

    def _engine(self) -> _Engine:
        engine = self._runner
        if engine is None:
            raise RuntimeError("the pipeline's native runner is gone")
        return engine


@contextlib.contextmanager
def simulate_coral(tpus: int | Iterable[str] = 2, *, version: str = "2.0.0",
                   latency: float = 0.0, fail_at: Iterable[int] = (),
                   hang_at: Iterable[int] = ()) -> Iterator[CoralSimulation]:
    """Install a simulated pycoral with ``tpus`` Edge TPUs (a count of PCIe TPUs, or a list
    of types such as ``["usb", "pci"]``) for the duration of the ``with`` block.

    ``fail_at`` / ``hang_at``: request indices (0-based, in push order over all runners) whose
    first segment fails (the pipeline breaks: ``pop`` raises) or hangs until
    ``sim.release()``.
    """
    kinds = ["pci"] * tpus if isinstance(tpus, int) else list(tpus)
    devices = [{"type": kind, "path": f"/dev/apex_{n}" if kind == "pci" else f"/sys/bus/usb/{n}"}
               for n, kind in enumerate(kinds)]
    sim = CoralSimulation(devices, version, latency, fail_at, hang_at)

    package = types.ModuleType("pycoral")
    package.__version__ = version  # type: ignore[attr-defined]
    package.__path__ = []
    utils = types.ModuleType("pycoral.utils")
    utils.__path__ = []
    edgetpu = types.ModuleType("pycoral.utils.edgetpu")
    edgetpu.make_interpreter = sim.make_interpreter  # type: ignore[attr-defined]
    edgetpu.list_edge_tpus = sim.list_edge_tpus  # type: ignore[attr-defined]
    pipeline = types.ModuleType("pycoral.pipeline")
    pipeline.__path__ = []
    pipelined = types.ModuleType("pycoral.pipeline.pipelined_model_runner")

    class PipelinedModelRunner(SimulatedPipelinedModelRunner):
        def __init__(self, interpreters: list[Any]):
            super().__init__(interpreters, _sim=sim)

    pipelined.PipelinedModelRunner = PipelinedModelRunner  # type: ignore[attr-defined]
    modules = {"pycoral": package, "pycoral.utils": utils, "pycoral.utils.edgetpu": edgetpu,
               "pycoral.pipeline": pipeline, "pycoral.pipeline.pipelined_model_runner": pipelined}
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield sim
    finally:
        sim.release()
        for engine in sim.engines:
            engine.stop()
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def install_in_child(tpus: int = 2) -> None:
    """Install the simulated pycoral for the rest of this process, with libcoral's aborts
    real: the ``child_setup`` of ``aioaccel.open(..., backend="coral",
    isolation="process", child_setup="aioaccel.testing.coral:install_in_child")``."""
    global _REAL_ABORT
    _REAL_ABORT = True
    installed = simulate_coral(tpus)
    installed.__enter__()
    _installed.append(installed)  # kept: collecting it would uninstall the simulation


_installed: list[Any] = []
