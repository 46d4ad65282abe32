"""Coral Edge TPU through pycoral: ``PipelinedModelRunner`` for segments, replicas for one model.

* ``aioaccel.open([seg0.tflite, seg1.tflite, ...], backend="coral")`` -- pipeline parallelism.
  One Edge TPU interpreter per segment (``make_interpreter(path, device=":0")``, ``":1"``, ...
  or as given by ``device=``), all driven by one ``PipelinedModelRunner``: the stage's feeder
  thread calls ``push`` and a drainer thread calls ``pop``. Both vendor queues are bounded
  (``set_input_queue_size`` / ``set_output_queue_size``, unbounded by default) by the runner's
  ``maxsize``, so ``push`` blocks the feeder when the TPUs fall behind: backpressure reaches
  the vendor. pycoral returns results in push order, so tokens are paired FIFO. The chain is
  checked first (:func:`check_pipeline`): where libcoral's constructor would abort the
  process, aioaccel raises ``ValueError`` naming the segment and the tensor.
* ``aioaccel.open("model.tflite", backend="coral", replicas=2)`` -- data parallelism: the same
  model on several Edge TPUs, one interpreter and worker thread each.

Both API forms of pycoral's runner work: a dict of name -> array (pycoral 2.x, as documented)
and a list of arrays in input order whose ``push`` returns False once the pipeline is off
(pycoral 1.0). End of stream is the empty request, pushed once when the runner closes.

Errors: pycoral's own input check (``ValueError``) fails that item only; ``RuntimeError`` from
``push`` or ``pop``, or ``push`` returning False, breaks the runner with
:class:`~aioaccel.DeviceError` (after a failed ``pop`` the pairing of results to inputs is
lost). A ``pop`` that never returns is caught by ``call_timeout``.

Options: ``device`` (``None`` -> ``":0"``, ``":1"``, ... one TPU per segment or replica; a
pycoral device string such as ``"usb"`` or ``"pci:1"``, numbered onwards from there; or a
list with one entry per segment/replica), ``queue_size`` (vendor queues; default ``maxsize``),
``cast``, ``max_input_bytes``.

pycoral and libedgetpu are not on PyPI (the PyPI package named ``pycoral`` is an unrelated
project): install them from Coral's package repository, see :data:`INSTALL`.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

from ..errors import DeviceError
from ..stages import Complete, DeviceStage, StageSpec, made
from . import Model, require
from ._segments import SegmentIO, Wiring, build_model, model_paths, plan
from .litert import LiteRTStage, tensor_spec

__all__ = ["INSTALL", "CoralPipelineStage", "check_pipeline", "coral_devices", "load"]

INSTALL = ("pycoral and the Edge TPU runtime come from Coral's package repository, not PyPI: "
           "https://coral.ai/software/#debian-packages (Debian: apt-get install "
           "python3-pycoral libedgetpu1-std), or pip install --extra-index-url "
           "https://google-coral.github.io/py-repo/ pycoral")


def pycoral() -> tuple[Any, Any, bool]:
    """(``pycoral.utils.edgetpu``, ``PipelinedModelRunner``, whether it takes dicts)."""
    edgetpu = require("coral", "pycoral.utils.edgetpu")
    pipelined = require("coral", "pycoral.pipeline.pipelined_model_runner")
    version = getattr(sys.modules.get("pycoral"), "__version__", "2.0.0")
    # pycoral 1.0 pushes/pops lists of arrays; 2.0 switched to dicts keyed by tensor name.
    takes_dicts = int(str(version).split(".")[0]) >= 2
    return edgetpu, pipelined.PipelinedModelRunner, takes_dicts


def coral_devices(device: Any, count: int) -> list[str]:
    """One pycoral device string per segment or replica."""
    if device is None:
        return [f":{n}" for n in range(count)]
    if isinstance(device, (list, tuple)):
        if len(device) != count:
            raise ValueError(f"device= lists {len(device)} Edge TPUs for {count} "
                             f"segments/replicas")
        return [str(d) for d in device]
    if not isinstance(device, str):
        raise TypeError(f"device must be a pycoral device string or a list, got {device!r}")
    kind, _, first = device.partition(":")
    if kind not in ("", "usb", "pci") or (first and not first.isdigit()):
        raise ValueError(f"unknown Edge TPU device {device!r}: expected ':N', 'usb', 'usb:N', "
                         f"'pci' or 'pci:N' (pycoral's make_interpreter device strings)")
    start = int(first) if first else 0
    return [f"{kind}:{start + n}" for n in range(count)]


class CoralPipelineStage(DeviceStage):
    """A ``PipelinedModelRunner``: ``push`` on the feeder thread, ``pop`` on a drainer thread."""

    def __init__(self, interpreters: list[Any], runner_class: Any, takes_dicts: bool,
                 queue_size: int, name: str):
        self._interpreters = interpreters
        self._runner_class = runner_class
        self._takes_dicts = takes_dicts
        self._queue_size = queue_size
        self._name = name
        self._inputs = [d["name"] for d in interpreters[0].get_input_details()]
        self._outputs = [d["name"] for d in interpreters[-1].get_output_details()]
        self._tokens: deque[object] = deque()   # pushed and not popped, in push order
        self._lock = threading.Lock()
        self._complete: Complete | None = None
        self._drainer: threading.Thread | None = None
        self.runner: Any = None

    def start(self, complete: Complete) -> None:
        self._complete = complete
        runner = self.runner = self._runner_class(self._interpreters)
        # Unbounded by default: a fast producer would fill memory inside pycoral.
        runner.set_input_queue_size(self._queue_size)
        runner.set_output_queue_size(self._queue_size)
        self._drainer = threading.Thread(target=self._drain, name=f"aioaccel-{self._name}-pop",
                                         daemon=True)
        self._drainer.start()

    def submit(self, token: object, tensors: dict[str, Any]) -> None:
        request: Any = ({name: tensors[name] for name in self._inputs} if self._takes_dicts
                        else [tensors[name] for name in self._inputs])
        with self._lock:
            self._tokens.append(token)  # before push: pop may return before push does
        try:
            accepted = self.runner.push(request)  # blocks while the input queue is full
        except ValueError:  # pycoral's own check of this request: this item fails
            self._take_back()
            raise
        except RuntimeError as exc:
            self._take_back()
            raise DeviceError(f"Edge TPU pipeline refused an input: {exc}") from exc
        if accepted is False:  # pycoral 1.0: the pipeline was already turned off
            self._take_back()
            raise DeviceError("Edge TPU pipeline refused an input: it was turned off")

    def _take_back(self) -> None:
        with self._lock:
            self._tokens.pop()  # the feeder's own, newest token: no result can pair with it

    def _drain(self) -> None:
        complete = self._complete
        assert complete is not None
        outputs = self._outputs
        while True:
            try:
                result = self.runner.pop()  # blocks until a result or the end of stream
            except Exception as exc:
                error = DeviceError(f"Edge TPU pipeline failed: {exc!r}; results can no "
                                    f"longer be paired with inputs")
                error.__cause__ = exc
                complete(None, None, error)
                return
            if not result:
                return  # the empty request went through: end of stream
            with self._lock:
                token = self._tokens.popleft() if self._tokens else None
            if token is None:
                complete(None, None, DeviceError("Edge TPU pipeline returned a result for "
                                                 "no pending input"))
                return
            if not isinstance(result, dict):  # pycoral 1.0: a list in output order
                result = dict(zip(outputs, result, strict=True))
            complete(token, result, None)

    def close(self) -> None:
        runner = self.runner
        if runner is None:
            return
        try:
            runner.push({} if self._takes_dicts else [])  # end of stream, exactly once
        except RuntimeError:
            pass  # already off (a failed pipeline): the drainer has ended or will end
        if self._drainer is not None:
            self._drainer.join()
        # pycoral 2.0.0's __del__ pushes a second empty request whenever ``_runner`` is set,
        # and that push raises RuntimeError inside __del__ (fixed later upstream, pycoral#80).
        # The pipeline is off and drained: drop the native runner so __del__ does nothing.
        if getattr(runner, "_runner", None) is not None:
            runner._runner = None
        self.runner = None


def check_pipeline(segments: list[SegmentIO]) -> None:
    """Refuse, with a clear error, the chains libcoral's ``PipelinedModelRunner`` would abort
    the process on (a ``CHECK`` in its constructor) or pycoral would refuse: tensors travel
    between Edge TPU segments by name only, so each segment's inputs must be produced by an
    earlier segment (or be model inputs), and every output of a segment but the last must be
    an input of some later segment."""
    available = {spec.name for spec in segments[0].inputs}
    for index, segment in enumerate(segments):
        missing = [spec.name for spec in segment.inputs if spec.name not in available]
        if missing:
            raise ValueError(f"Edge TPU segment {index} ({segment.label}) needs tensor "
                             f"{missing[0]!r}, which no earlier segment produces (available: "
                             f"{sorted(available)}); PipelinedModelRunner passes tensors "
                             f"between segments by name")
        available |= {spec.name for spec in segment.outputs}
        if index == len(segments) - 1:
            break
        later = {spec.name for after in segments[index + 1:] for spec in after.inputs}
        unused = [spec.name for spec in segment.outputs if spec.name not in later]
        if unused:
            raise ValueError(f"Edge TPU segment {index} ({segment.label}) outputs tensor "
                             f"{unused[0]!r}, which no later segment consumes; libcoral's "
                             f"PipelinedModelRunner aborts the process on such a chain "
                             f"(\"must be consumed by subsequent segment\"): re-segment "
                             f"the model with the Edge TPU compiler")


def _interpreters(edgetpu: Any, paths: list[Path], devices: list[str]) -> list[Any]:
    interpreters = []
    for path, device in zip(paths, devices, strict=True):
        try:
            interpreter = edgetpu.make_interpreter(str(path), device=device)
        except (ValueError, OSError) as exc:  # load_delegate fails: no such TPU
            found = _listed(edgetpu)
            raise DeviceError(f"cannot open Edge TPU {device!r} for {path.name}: {exc} "
                              f"(Edge TPUs found: {found})") from exc
        interpreter.allocate_tensors()
        interpreters.append(interpreter)
    return interpreters


def _listed(edgetpu: Any) -> str:
    try:
        tpus = edgetpu.list_edge_tpus()
    except Exception as exc:
        return f"unknown ({exc!r})"
    return ", ".join(f"{t.get('type')}:{t.get('path')}" for t in tpus) or "none"


def load(target: Any, *, replicas: int = 1, maxsize: int = 8, device: Any = None,
         queue_size: int | None = None, cast: bool = False,
         max_input_bytes: int | None = None, runner_name: str = "runner") -> Model:
    paths = model_paths(target, (".tflite",))
    edgetpu, runner_class, takes_dicts = pycoral()
    segmented = isinstance(target, (list, tuple))
    if segmented and replicas > 1:
        raise ValueError("backend='coral' runs either segments (a list: one Edge TPU each) or "
                         "replicas of one model, not both")
    interpreters = _interpreters(edgetpu, paths if segmented else paths * replicas,
                                 coral_devices(device, len(paths) if segmented else replicas))
    io = [SegmentIO(p.name, [tensor_spec(d) for d in i.get_input_details()],
                    [tensor_spec(d) for d in i.get_output_details()])
          for p, i in zip(paths, interpreters, strict=False)]
    info: dict[str, Any] = {"backend": "coral", "segments": [str(p) for p in paths],
                            "device": device}
    if segmented:
        check_pipeline(io)  # before the vendor's constructor, which would abort the process
        size = maxsize if queue_size is None else queue_size
        stage = CoralPipelineStage(interpreters, runner_class, takes_dicts, size,
                                   f"{runner_name}-edgetpu")
        specs = [StageSpec("edgetpu-pipeline", made(stage), device=True)]
        info["api"] = "PipelinedModelRunner"
    else:
        free = list(interpreters)
        lock = threading.Lock()
        wiring: Wiring = plan(io)[0]

        def factory() -> LiteRTStage:
            with lock:  # each replica thread takes its own TPU's interpreter
                return LiteRTStage(free.pop(0), wiring)

        specs = [StageSpec("edgetpu", factory, replicas)]
        info["api"] = "interpreter per Edge TPU"

    def release() -> None:
        interpreters.clear()  # the delegates (and TPUs) go with the last reference

    return build_model(io, specs, cast=cast, max_input_bytes=max_input_bytes, close=release,
                       info=info)
