"""A simulated pycoral: ``PipelinedModelRunner``, ``make_interpreter``, ``list_edge_tpus``.

``with simulate_coral(tpus=2) as sim:`` installs modules named ``pycoral``,
``pycoral.utils.edgetpu`` and ``pycoral.pipeline.pipelined_model_runner`` in ``sys.modules``
(and removes them on exit), so code that imports pycoral -- aioaccel's ``backend="coral"``, or
your own -- runs its real code paths against them. Interpreters are LiteRT interpreters on the
CPU, so results are real and can be checked against a reference.

:class:`SimulatedPipelinedModelRunner` follows pycoral's documented contract:

* one thread per segment; intermediate tensors pass between segments by name;
* ``push`` blocks while the input queue holds ``set_input_queue_size`` requests, and the last
  segment blocks while the output queue holds ``set_output_queue_size`` results; both are
  unbounded by default;
* the empty request (``{}``, or ``[]`` in 1.0) ends the stream: ``pop`` returns ``None`` once
  everything before it was popped; a later ``push`` raises ``RuntimeError`` (2.0) or returns
  ``False`` (1.0);
* ``push`` checks the request like pycoral does (``ValueError`` on count or dtype);
* ``pop`` raises ``RuntimeError`` once a segment failed (``fail_at``), then and afterwards;
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

__all__ = ["CoralSimulation", "SimulatedPipelinedModelRunner", "simulate_coral"]

_END = object()


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
        from ai_edge_litert.interpreter import Interpreter

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


class _Engine:
    """The native side (``_pywrap_coral.PipelinedModelRunnerWrapper``)."""

    def __init__(self, interpreters: list[Any], sim: CoralSimulation):
        self.sim = sim
        self.interpreters = interpreters
        self.cond = threading.Condition()
        self.inputs: deque[Any] = deque()
        self.outputs: deque[Any] = deque()
        self.input_max = 0   # 0: unbounded
        self.output_max = 0
        self.turned_off = False
        self.broken = False  # a segment failed: results can no longer flow in order
        self.peak_inputs = self.peak_outputs = 0
        self.pushed = 0
        self.empty_pushes = 0  # end-of-stream requests, including refused ones
        self.links: list[deque[Any]] = [deque() for _ in interpreters[1:]]
        self.threads = [threading.Thread(target=self._segment, args=(i,), daemon=True,
                                         name=f"aioaccel-sim-coral-segment-{i}")
                        for i in range(len(interpreters))]
        for t in self.threads:
            t.start()

    def push(self, request: Any) -> None:
        with self.cond:
            if not request:
                self.empty_pushes += 1
            if self.turned_off:
                raise RuntimeError("Pipeline was turned off before.")
            if not request:
                self.turned_off = True
                self.inputs.append(_END)
                self.cond.notify_all()
                return
            while self.input_max and len(self.inputs) >= self.input_max:
                self.cond.wait()
            self.inputs.append((self.pushed, request))
            self.pushed += 1
            self.peak_inputs = max(self.peak_inputs, len(self.inputs))
            self.cond.notify_all()

    def pop(self) -> Any:
        with self.cond:
            while not self.outputs:
                self.cond.wait()
            head = self.outputs[0]
            if head is _END:
                return None  # stays: every later pop also sees the end
            if isinstance(head, BaseException):
                raise RuntimeError(f"error during retrieving pipelined model inference "
                                   f"results: {head}")
            self.outputs.popleft()
            self.cond.notify_all()
            return head

    def _take(self, source: deque[Any]) -> Any:
        with self.cond:
            while not source:
                self.cond.wait()
            value = source.popleft()
            self.cond.notify_all()
            return value

    def _give(self, target: deque[Any], value: Any, limit: int) -> None:
        with self.cond:
            while limit and len(target) >= limit and value is not _END and not self.broken:
                self.cond.wait()
            target.append(value)
            if target is self.outputs:
                self.peak_outputs = max(self.peak_outputs, len(target))
            self.cond.notify_all()

    def _segment(self, index: int) -> None:
        interpreter = self.interpreters[index]
        source = self.inputs if index == 0 else self.links[index - 1]
        last = index == len(self.interpreters) - 1
        details_in = interpreter.get_input_details()
        details_out = interpreter.get_output_details()
        while True:
            job = self._take(source)
            if job is not _END and not isinstance(job, BaseException):
                number, tensors = job
                try:
                    if index == 0:
                        self.sim._request_fate(number)
                    elif self.sim.latency:
                        time.sleep(self.sim.latency)
                    for d in details_in:
                        interpreter.set_tensor(d["index"], tensors[d["name"]])
                    interpreter.invoke()
                    produced = {d["name"]: interpreter.get_tensor(d["index"]) for d in details_out}
                    job = produced if last else (number, {**tensors, **produced})
                except Exception as exc:
                    job = exc  # the pipeline is broken from here on
                    with self.cond:
                        self.broken = True
                        self.cond.notify_all()
            if last:
                self._give(self.outputs, job, self.output_max)
            else:
                self._give(self.links[index], job, 0)
            if job is _END:
                return


class SimulatedPipelinedModelRunner:
    """pycoral's ``PipelinedModelRunner`` over simulated Edge TPUs (see the module doc)."""

    def __init__(self, interpreters: list[Any], *, _sim: CoralSimulation):
        self._runner: _Engine | None = None
        if not interpreters:
            raise ValueError("At least one interpreter expected")
        names = {d["name"] for d in interpreters[0].get_input_details()}
        for index, interpreter in enumerate(interpreters):
            if not {d["name"] for d in interpreter.get_input_details()} <= names:
                raise ValueError(f"Interpreter {index} can not get its input tensors")
            names |= {d["name"] for d in interpreter.get_output_details()}
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
        with self._engine().cond:
            self._engine().input_max = size
            self._engine().cond.notify_all()

    def set_output_queue_size(self, size: int) -> None:
        with self._engine().cond:
            self._engine().output_max = size
            self._engine().cond.notify_all()

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
        for d in self._input_details:
            if not input_tensors:
                break
            tensor = request.get(d["name"])
            if not isinstance(tensor, np.ndarray) or tensor.dtype != d["dtype"]:
                raise ValueError(f"Input should be a list of numpy array of type {d['dtype']}")
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
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
