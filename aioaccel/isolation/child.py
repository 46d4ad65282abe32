"""The child process: load the target, run its stages, answer through the slot ring.

The child is started by :mod:`aioaccel.isolation.stage` (``forkserver`` on Linux, else
``spawn``) and receives a :class:`ChildSpec`: only references cross (a backend name, model
paths, importable callables), never a loaded runtime. It then

1. watches its parent: ``PR_SET_PDEATHSIG`` (SIGKILL, Linux) fires even when a native call
   holds the GIL, and the request pipe's EOF ends it otherwise;
2. loads the model with the backend's own ``load`` and reports its specs (``loaded``);
3. attaches the parent's slot ring and runs the model's stages with the same
   :class:`~aioaccel.pipeline.Pipeline` a runner uses in-process (replicas, device stages,
   segments), with a bridge that writes each finished item into its slot and its header on
   the reply pipe (``started``, then ``done`` / ``error`` per item, ``fatal``).

Inputs reach the stages as views on the slot (zero copies on this side); outputs are copied
once into the slot's output region. Everything here runs on plain threads: no event loop.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pickle
import signal
import sys
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any, cast

from .shm import SlotRing, decode, encode

if TYPE_CHECKING:
    from ..backends import Model
    from ..core.jobs import Job, Worker
    from ..core.loop_bridge import Bridge

__all__ = ["SWITCH_INTERVAL", "ChildSpec", "main", "resolve_reference"]

#: the child's ``sys.setswitchinterval`` (seconds)
SWITCH_INTERVAL = 0.0005


@dataclass(frozen=True)
class ChildSpec:
    """What the child needs to load its part of the runner (all of it picklable)."""

    backend: str
    target: Any
    runner_name: str
    stage_name: str
    replicas: int = 1
    maxsize: int = 8
    batch: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: ``"module:function"`` called in the child before the load (install a simulator, set
    #: environment for a vendor runtime, ...)
    setup: str | None = None


def resolve_reference(ref: str) -> Any:
    """``"package.module:name"`` (or ``"package.module.name"``) imported."""
    module, sep, name = ref.partition(":")
    if not sep:
        module, _, name = ref.rpartition(".")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _watch_parent() -> None:
    """Die with the parent, even if this process is stuck in native code holding the GIL."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    # Under the forkserver our parent is the forkserver, which exits only once every holder of
    # its "alive" pipe is gone -- and multiprocessing hands that pipe's write end to each child
    # it forks (so that a child could start processes through it too, which ours never do).
    # Kept open here, a child stuck holding the GIL would keep the forkserver alive after the
    # runner died, and the forkserver it: neither would ever go. Closed, the runner's death
    # ends the forkserver, and PR_SET_PDEATHSIG ends us.
    forkserver = sys.modules.get("multiprocessing.forkserver")
    server = getattr(forkserver, "_forkserver", None)
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive_fd, int):
        try:
            os.close(alive_fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None  # type: ignore[union-attr]


def _load(spec: ChildSpec) -> Model:
    from ..backends import get_backend

    load = get_backend(spec.backend).load
    accepted = inspect.signature(load).parameters
    options = dict(spec.options)
    if "maxsize" in accepted:
        options["maxsize"] = spec.maxsize
    if "runner_name" in accepted:
        options["runner_name"] = spec.runner_name
    if spec.batch is not None and spec.batch > 1:
        if "batch" not in accepted:
            from ..errors import BatchingUnsupported

            raise BatchingUnsupported(f"the {spec.backend} backend cannot batch "
                                      f"(batch={spec.batch} given): its runtime takes one item "
                                      f"per call")
        options["batch"] = spec.batch
    model: Model = load(spec.target, replicas=spec.replicas, **options)
    return model


def _picklable(value: Any) -> Any:
    try:
        pickle.dumps(value)
        return value
    except Exception:
        return repr(value)


def _exception(exc: BaseException) -> bytes:
    """``exc`` pickled for the parent (its type and message when it does not pickle)."""
    note = f"raised in the isolated child process {os.getpid()}"
    try:
        exc.add_note(note)
        return pickle.dumps(exc)
    except Exception:
        plain = RuntimeError(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")
        plain.add_note(note)
        return pickle.dumps(plain)


class _Reply:
    """The reply pipe, written by one writer thread for everyone (workers, device
    completions): a stage's worker only queues its reply and goes back to its next item,
    while the pipe write (a syscall and a wake-up of the parent) happens beside it."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._queue: SimpleQueue[tuple[Any, ...]] = SimpleQueue()
        self.send = self._queue.put
        self._writer = threading.Thread(target=self._write, name="aioaccel-child-writer",
                                        daemon=True)
        self._writer.start()

    def _write(self) -> None:
        get, dumps, send = self._queue.get, pickle.dumps, self._conn.send_bytes
        protocol = pickle.HIGHEST_PROTOCOL
        while True:
            message = get()
            try:
                send(dumps(message, protocol=protocol))
            except OSError:  # the parent is gone
                os._exit(0)

    def send_now(self, message: tuple[Any, ...]) -> None:
        """Send from this thread (before the writer matters: loading, failing to load)."""
        try:
            self._conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            os._exit(0)


class ChildBridge:
    """What the child's Pipeline reports to: the reply pipe instead of an event loop."""

    def __init__(self, reply: _Reply, ring: SlotRing, workers: int):
        self._reply = reply
        self._ring = ring
        self._workers = workers
        self._ready = 0
        self._lock = threading.Lock()
        self.started = threading.Event()
        self.start_error: BaseException | None = None

    def deliver(self, job: Job, now: float = 0.0, defer: bool = False) -> None:
        slot = job.seq
        if job.error is not None:
            self._reply.send(("error", slot, _exception(job.error), job.failed_stage))
            return
        try:
            header = encode(job.value, self._ring.region(slot, output=True))
        except Exception as exc:  # outputs that neither fit nor pickle fail this item only
            self._reply.send(("error", slot, _exception(exc), ""))
            return
        job.value = None  # drop the views on the input region
        self._reply.send(("done", slot, header))

    def flush(self) -> None:
        pass

    def ready(self, worker: Worker, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and self.start_error is None:
                self.start_error = error
                self.started.set()
                return
            self._ready += 1
            if self._ready == self._workers:
                self.started.set()

    def exited(self, worker: Worker) -> None:
        pass

    def fatal(self, error: BaseException, stage: str) -> None:
        self._reply.send(("fatal", stage, _exception(error)))


def main(requests: Connection, replies: Connection, spec: ChildSpec) -> None:
    """The child's main (the target of the ``multiprocessing.Process``)."""
    _watch_parent()
    # A pure-Python stage holds the GIL for its whole call; the writer thread then waits for
    # the interpreter's forced switch to send a finished item's reply. 0.5 ms instead of
    # 5 ms keeps replies flowing (measured: a 2-stage pipeline of 1 ms Python stages in two
    # children went from ~1.2x to ~1.8x sequential).
    sys.setswitchinterval(SWITCH_INTERVAL)
    # Ctrl-C reaches the whole process group: the parent decides when its children stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reply = _Reply(replies)
    try:
        if spec.setup:
            resolve_reference(spec.setup)()
        model = _load(spec)
    except BaseException as exc:
        reply.send_now(("load_failed", _exception(exc)))
        return
    from ..tensors import InputValidator

    prepare = model.prepare
    validator = None
    if isinstance(prepare, InputValidator):  # the parent rebuilds it: bad input stays there
        validator = (prepare.specs, prepare.cast, prepare.max_bytes)
        prepare = None
    reply.send(("loaded", {
        "inputs": model.inputs, "outputs": model.outputs, "validator": validator,
        "info": {k: _picklable(v) for k, v in model.info.items()},
        "max_streams": model.max_streams, "batch": model.batch,
        "stages": [s.name for s in model.stages], "pid": os.getpid()}))
    try:
        message = pickle.loads(requests.recv_bytes())
    except (EOFError, OSError):
        os._exit(0)
    if message[0] != "ring":
        os._exit(0)
    ring = SlotRing.attach(*message[1])
    _serve(requests, reply, ring, model, spec, prepare)


def _serve(requests: Connection, reply: _Reply, ring: SlotRing, model: Model, spec: ChildSpec,
           prepare: Any) -> None:
    from ..core.jobs import Job
    from ..core.stage_threads import Pipeline

    pipeline = Pipeline(model.stages, cast("Bridge", None), spec.runner_name, ring.slots)
    bridge = ChildBridge(reply, ring, len(pipeline.workers))
    pipeline.bridge = cast("Bridge", bridge)
    pipeline.start()
    bridge.started.wait()
    if bridge.start_error is not None:
        reply.send_now(("load_failed", _exception(bridge.start_error)))
        os._exit(0)
    reply.send(("started",))
    submit = pipeline.submit
    recv = requests.recv_bytes
    loads = pickle.loads
    region = ring.region
    while True:
        try:
            message = loads(recv())
        except (EOFError, OSError):  # the parent closed the pipe or died
            os._exit(0)
        if message[0] != "run":
            break  # "stop"
        _, slot, stream, header = message
        try:
            value = decode(header, region(slot, output=False), copy=False)
            if prepare is not None:
                value = prepare(value)
        except Exception as exc:
            reply.send(("error", slot, _exception(exc), ""))
            continue
        submit(Job(slot, value, stream))
    # An orderly stop: finish what was submitted, release the stages, then leave.
    pipeline.stop()
    pipeline.join(10.0)
    pipeline.close_shared()
    if model.close is not None:
        with contextlib.suppress(Exception):
            model.close()
    os._exit(0)
