"""The parent's side: each child process is a *device stage* of the runner's pipeline.

:func:`load` is what ``aioaccel.open(target, isolation="process")`` uses instead of the
backend's own ``load``: it starts the child(ren) (one per callable of a list target, one for a
model, its segments included), waits until each has loaded its model, sizes a slot ring from
the specs the child reports, and returns a :class:`~aioaccel.backends.Model` whose stages are
:class:`ProcessStage` objects. Everything above (admission, ordering, batching, streams,
``call_timeout``, ``restart=``, ``retries=``) is the runner's, unchanged.

A :class:`ProcessStage` ``submit`` writes the item into a free slot and sends its header;
a reader thread receives the answers and completes the items, in any order. It notices the
child's death at once (the reply pipe's EOF: the kernel closes it with the process) and
reports a :class:`~aioaccel.DeviceError` that names the cause (the signal, the exit code,
``max_rss``), which the runner's recovery handles like any lost device.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
from queue import SimpleQueue
from time import perf_counter
from typing import Any

from ..errors import DeviceError, OpenError
from ..stages import Complete, DeviceStage, StageSpec, made
from .child import ChildSpec
from .shm import DEFAULT_REGION_BYTES, SlotRing, decode, encode, region_bytes

__all__ = ["DEFAULT_LOAD_TIMEOUT", "ChildProcess", "ProcessStage", "describe_exit", "load"]

log = logging.getLogger("aioaccel")

#: longest a child may take to load its model (seconds)
DEFAULT_LOAD_TIMEOUT = 300.0
#: how often the reader checks the child's RSS when ``max_rss`` is set (seconds)
RSS_PERIOD = 0.02
#: how long a feeder whose pipe broke waits for the reader to say why the child died
DEATH_REPORT_WAIT = 2.0
#: how long a child asked to stop may take before it is killed (seconds)
STOP_GRACE = 2.0

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_SIGNAL_MEANING = {"SIGSEGV": "segmentation fault", "SIGABRT": "aborted",
                   "SIGKILL": "killed", "SIGBUS": "bus error", "SIGFPE": "arithmetic fault",
                   "SIGILL": "illegal instruction", "SIGTERM": "terminated"}


def describe_exit(code: int | None) -> str:
    """A process's exit status in words: ``killed by SIGSEGV (segmentation fault)``."""
    if code is None:
        return "its exit status is unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            return f"was killed by signal {-code}"
        meaning = _SIGNAL_MEANING.get(name)
        return f"was killed by {name}" + (f" ({meaning})" if meaning else "")
    return f"exited with code {code}"


_context_lock = threading.Lock()


def _context() -> Any:
    """``forkserver`` where it exists (a fork of a server that has aioaccel and NumPy
    imported: a child starts in milliseconds, not the ~0.3 s of a fresh interpreter), else
    ``spawn``. Neither forks the parent itself, with its threads and runtimes."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        with _context_lock:
            from multiprocessing import forkserver

            server = forkserver._forkserver
            if getattr(server, "_forkserver_pid", None) is None:
                # the server imports these once; every child then starts with them
                preload = list(getattr(server, "_preload_modules", []))
                for module in ("numpy", "aioaccel.isolation.child", "aioaccel.core.stage_threads"):
                    if module not in preload:
                        preload.append(module)
                ctx.set_forkserver_preload(preload)
        return ctx
    return multiprocessing.get_context("spawn")


# The child imports what its target references, and nothing else: multiprocessing would also
# re-run the parent's main script in it (``init_main_from_path``), which breaks the common
# asyncio script without an ``if __name__ == "__main__":`` guard (the child would start its
# own runner). When the target does not come from ``__main__``, starts made by this module
# leave the main script out (a thread-local switch: other users of multiprocessing see no
# change).
_starting = threading.local()
_prepare_lock = threading.Lock()


def _install_main_filter() -> None:
    from multiprocessing import spawn

    with _prepare_lock:
        original = spawn.get_preparation_data
        if getattr(original, "_aioaccel", False):
            return

        def get_preparation_data(name: str) -> dict[str, Any]:
            data: dict[str, Any] = original(name)
            if getattr(_starting, "hide_main", False):
                data.pop("init_main_from_path", None)
                data.pop("init_main_from_name", None)
            return data

        get_preparation_data._aioaccel = True  # type: ignore[attr-defined]
        spawn.get_preparation_data = get_preparation_data


def _rss(pid: int) -> int:
    """Resident bytes of process ``pid`` (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class ChildProcess:
    """One child: its process, its two pipes and its slot ring."""

    def __init__(self, spec: ChildSpec, slots: int, max_rss: int | None,
                 region: int | None = None):
        self.spec = spec
        self.slots = slots
        self.max_rss = max_rss
        self.region = region
        self.ring: SlotRing | None = None
        self.meta: dict[str, Any] = {}
        self.cause: str | None = None  # why the parent killed it (max_rss), if it did
        ctx = _context()
        req_r, self.requests = ctx.Pipe(duplex=False)
        self.replies, rep_w = ctx.Pipe(duplex=False)
        from .child import main

        self.process: Any = ctx.Process(
            target=main, args=(req_r, rep_w, spec), daemon=True,
            name=f"aioaccel-{spec.runner_name}-{spec.stage_name}")
        _install_main_filter()
        _starting.hide_main = b"__main__" not in pickle.dumps(spec)
        try:
            self.process.start()
        finally:
            _starting.hide_main = False
            # only the child holds these now: its death closes them (EOF here at once)
            req_r.close()
            rep_w.close()
        self.pid: int = self.process.pid
        # one joiner at a time: forkserver children report their exit status as 4 bytes on
        # a pipe, and two threads reading it at once would see it torn (as code 255)
        self._join_lock = threading.Lock()
        self._reaped = False

    def join(self, timeout: float) -> int | None:
        """Wait (bounded) for the child to end; its exit code, or None if it still runs."""
        if not self._join_lock.acquire(timeout=timeout):
            return None
        try:
            self.process.join(timeout)
            code: int | None = self.process.exitcode
            if code is not None:
                self._reaped = True
            return code
        except Exception:
            return None
        finally:
            self._join_lock.release()

    def signal_kill(self) -> None:
        """SIGKILL now, without waiting (safe on the event loop)."""
        if not self._reaped:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)

    def _receive(self, deadline: float) -> tuple[Any, ...]:
        remaining = deadline - perf_counter()
        if remaining <= 0 or not self.replies.poll(remaining):
            raise OpenError(f"the child process {self.pid} of runner "
                            f"{self.spec.runner_name!r} did not load its model within "
                            f"{DEFAULT_LOAD_TIMEOUT} s")
        try:
            message: tuple[Any, ...] = pickle.loads(self.replies.recv_bytes())
        except (EOFError, OSError):
            raise OpenError(f"the child process {self.pid} of runner "
                            f"{self.spec.runner_name!r} died while loading its model: "
                            f"{describe_exit(self.join(1.0))}") from None
        if message[0] == "load_failed":
            raise pickle.loads(message[1])
        return message

    def wait_loaded(self, deadline: float) -> dict[str, Any]:
        message = self._receive(deadline)
        self.meta = message[1]
        return self.meta

    def attach(self, rows: int, deadline: float) -> None:
        """Make the ring from the child's specs, let the child attach it, then unlink it."""
        meta = self.meta
        default = self.region or DEFAULT_REGION_BYTES
        in_bytes = max(region_bytes(meta.get("inputs"), rows, default), self.region or 0)
        out_bytes = max(region_bytes(meta.get("outputs"), rows, default), self.region or 0)
        self.ring = SlotRing(self.slots, in_bytes, out_bytes)
        try:
            self.requests.send_bytes(pickle.dumps(("ring", self.ring.describe())))
            self._receive(deadline)  # "started": it has attached and made its stages
        finally:
            self.ring.unlink()  # nothing left in /dev/shm from here on, whatever happens

    def kill(self) -> None:
        """End the child now (SIGKILL) and reap it; idempotent."""
        self.signal_kill()
        self.join(5.0)

    def ask_to_stop(self) -> None:
        """Ask the child to finish and leave (it exits on its own)."""
        with contextlib.suppress(OSError, ValueError):
            self.requests.send_bytes(pickle.dumps(("stop",)))

    def release(self) -> None:
        """Close the pipes and the ring (after the child and the reader are gone)."""
        for conn in (self.requests, self.replies):
            with contextlib.suppress(OSError):
                conn.close()
        if self.ring is not None:
            self.ring.close()
        with contextlib.suppress(Exception):
            self.process.close()


class ProcessStage(DeviceStage):
    """Child processes as one device stage: ``submit`` ships, a reader thread per child
    completes. Several children (replicas of a Python stage) share one pool of free slots, so
    an item goes to whichever child has room: a slow child takes fewer."""

    def __init__(self, children: list[ChildProcess]):
        self.children = children
        self.child = children[0]
        self.name = self.child.spec.stage_name
        self._rings: list[SlotRing] = []
        self._free: SimpleQueue[tuple[int, int] | None] = SimpleQueue()
        self._held: list[list[Any]] = []
        for child in children:
            assert child.ring is not None
            self._rings.append(child.ring)
            self._held.append([None] * child.slots)
        for slot in range(self.child.slots):  # interleaved: the children take turns
            for c in range(len(children)):
                self._free.put((c, slot))
        self._complete: Complete | None = None
        self._readers: list[threading.Thread] = []
        self._dead: DeviceError | None = None
        self._dead_event = threading.Event()
        self._closing = False
        self._lock = threading.Lock()
        self._closed = False
        self.shipped = 0      # items whose tensors went through shared memory
        self.pickled = 0      # items that travelled pickled (did not fit / not arrays)

    @property
    def pids(self) -> list[int]:
        return [child.pid for child in self.children]

    # ---- the runner's feeder thread ---------------------------------------------------------
    def start(self, complete: Complete) -> None:
        self._complete = complete
        for c, child in enumerate(self.children):
            reader = threading.Thread(
                target=self._read, args=(c,), daemon=True,
                name=f"aioaccel-{child.spec.runner_name}-{self.name}-child{c}")
            self._readers.append(reader)
            reader.start()

    def submit(self, token: object, inputs: Any) -> None:
        self.submit_stream(token, inputs, 0)

    def submit_stream(self, token: object, inputs: Any, stream: int) -> None:
        free = self._free.get()  # blocks while every slot is on a child (backpressure)
        if free is None or self._dead is not None:
            self._free.put(None)  # wake the next waiter too
            raise self._dead or DeviceError(f"stage {self.name!r}: the child process is closed")
        c, slot = free
        try:
            header = encode(inputs, self._rings[c].region(slot, output=False))
        except BaseException:
            self._free.put(free)
            raise  # a value that neither fits nor pickles fails this item only
        if header[0] == "p":
            self.pickled += 1
        else:
            self.shipped += 1
        self._held[c][slot] = token
        child = self.children[c]
        try:
            child.requests.send_bytes(pickle.dumps(("run", slot, stream, header),
                                                   protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, ValueError) as exc:
            self._held[c][slot] = None
            # The pipe broke before the reader saw the EOF: wait for it to say why (the exit
            # status), so that the error names the cause and not just "broken pipe".
            self._dead_event.wait(DEATH_REPORT_WAIT)
            raise self._dead or DeviceError(
                f"stage {self.name!r} of runner {child.spec.runner_name!r}: the child "
                f"process {child.pid} is gone ({exc})") from exc

    # ---- the reader threads -----------------------------------------------------------------
    def _read(self, c: int) -> None:
        child = self.children[c]
        replies = child.replies
        recv, poll, loads = replies.recv_bytes, replies.poll, pickle.loads
        complete = self._complete
        assert complete is not None
        max_rss = child.max_rss
        region, free, held = self._rings[c].region, self._free.put, self._held[c]
        checked = perf_counter()
        while True:
            try:
                if max_rss is not None:
                    now = perf_counter()
                    if now - checked >= RSS_PERIOD:
                        checked = now
                        self._check_rss(child, max_rss)
                    if not poll(RSS_PERIOD):
                        continue
                message = loads(recv())
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "done":
                slot = message[1]
                try:
                    outputs = decode(message[2], region(slot, output=True), copy=True)
                    error: BaseException | None = None
                except Exception as exc:
                    outputs, error = None, exc
                token, held[slot] = held[slot], None
                free((c, slot))
                complete(token, outputs, error)
            elif kind == "error":
                slot = message[1]
                try:
                    error = loads(message[2])
                except Exception as exc:
                    error = exc
                token, held[slot] = held[slot], None
                free((c, slot))
                complete(token, None, error)
            elif kind == "fatal":
                try:
                    cause: BaseException = loads(message[2])
                except Exception as exc:
                    cause = exc
                err = DeviceError(f"stage {message[1]!r} in the child process {child.pid} "
                                  f"of runner {child.spec.runner_name!r} failed fatally: "
                                  f"{cause}")
                err.__cause__ = cause
                self._die(err)
                return
        self._died(c)

    @staticmethod
    def _check_rss(child: ChildProcess, max_rss: int) -> None:
        rss = _rss(child.pid)
        if rss > max_rss and child.cause is None:
            child.cause = (f"was killed by the parent: its resident memory reached "
                           f"{rss / 2**20:.0f} MiB, over max_rss={max_rss / 2**20:.0f} MiB")
            child.signal_kill()

    def _died(self, c: int) -> None:
        """A reply pipe reached EOF: that child is gone. Say why."""
        child = self.children[c]
        code = child.join(1.0)
        if self._closing:
            self._die(None)
            return
        cause = child.cause or describe_exit(code)
        held = sum(1 for t in self._held[c] if t is not None)
        err = DeviceError(f"stage {self.name!r} of runner {child.spec.runner_name!r}: the "
                          f"child process {child.pid} {cause}; it held {held} item"
                          f"{'' if held == 1 else 's'}")
        self._die(err)

    def _die(self, err: DeviceError | None) -> None:
        with self._lock:
            if self._dead is not None:
                return
            self._dead = err or DeviceError(f"stage {self.name!r}: the child process was closed")
            self._dead_event.set()
        self._free.put(None)  # a feeder waiting for a slot wakes and raises
        if err is not None and not self._closing and self._complete is not None:
            self._complete(None, None, err)  # breaks or restarts the runner

    # ---- closing ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the children (politely while healthy, SIGKILL otherwise), the readers, and
        release the pipes and the rings. Idempotent; safe from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing = True
        if self._dead is None:
            for child in self.children:  # all asked first: they finish side by side
                child.ask_to_stop()
            for child in self.children:
                if child.join(STOP_GRACE) is None:
                    child.kill()
        else:
            for child in self.children:
                child.signal_kill()
            for child in self.children:
                child.kill()
        for reader in self._readers:
            if reader is not threading.current_thread():
                reader.join(5.0)
        self._die(None)
        for child in self.children:
            child.release()

    def stats(self) -> dict[str, Any]:
        return {"pids": self.pids, "shipped": self.shipped, "pickled": self.pickled,
                "slots": self.child.slots, "slot_bytes": self._rings[0].slot_bytes}


def _on_a_loop() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _units(backend: str, target: Any) -> list[Any]:
    """What each child loads: one callable or stage of a list each; a model (all its
    segments) as one."""
    if backend == "function" and isinstance(target, (list, tuple)):
        return list(target)
    return [target]


def _unit_name(unit: Any, index: int) -> str:
    name = getattr(unit, "name", None) if not callable(unit) else None
    name = name or getattr(unit, "__name__", None)
    if name is None:
        items = unit if isinstance(unit, (list, tuple)) else [unit]
        name = os.path.basename(os.fspath(items[0])) if items and isinstance(
            items[0], (str, os.PathLike)) else type(unit).__name__
    return f"{name}@process"


def load(backend: str, target: Any, *, replicas: int = 1, maxsize: int = 8,
         runner_name: str = "runner", batch: int | None = None, max_rss: int | None = None,
         setup: str | None = None, slot_bytes: int | None = None,
         load_timeout: float = DEFAULT_LOAD_TIMEOUT, **options: Any) -> Any:
    """Start the children for ``target`` and return the parent's Model of them."""
    from ..backends import Model
    from ..tensors import InputValidator

    units = _units(backend, target)
    # Python callables: one child per replica (each has its own GIL, so they run in
    # parallel). A model's replicas stay threads of one child: the runtime releases the GIL,
    # and device backends number their devices per replica (one Edge TPU each).
    per_child, copies = (1, replicas) if backend == "function" else (replicas, 1)
    # a batch, a warm-up or a retry never holds more than the runner admits, plus its warm-up
    slots = maxsize + 1
    groups: list[list[ChildProcess]] = []
    children: list[ChildProcess] = []
    stages: list[ProcessStage] = []
    deadline = perf_counter() + load_timeout
    try:
        names: set[str] = set()
        for i, unit in enumerate(units):
            name = _unit_name(unit, i)
            if name in names:
                name = f"{name}{i}"
            names.add(name)
            spec = ChildSpec(backend, unit, runner_name, name, per_child, maxsize, batch,
                             dict(options), setup)
            group = [ChildProcess(spec, slots, max_rss, slot_bytes) for _ in range(copies)]
            groups.append(group)
            children.extend(group)
        for child in children:  # they load in parallel
            child.wait_loaded(deadline)
        for group in groups:
            for child in group:
                child.attach(max(1, batch or 1), deadline)
            stages.append(ProcessStage(group))
    except BaseException:
        for child in children:
            child.kill()
            child.release()
        raise
    first, last = groups[0][0].meta, groups[-1][0].meta
    inputs = first.get("inputs")
    prepare = None
    if first.get("validator") is not None:  # the child's own check, rebuilt on this side
        specs, cast, max_bytes = first["validator"]
        prepare = InputValidator(specs, cast=cast, max_bytes=max_bytes)
    info: dict[str, Any] = dict(first.get("info", {}))
    info["isolation"] = {
        "mode": "process", "start_method": _context().get_start_method(),
        "pids": [c.pid for c in children], "slots": slots,
        "slot_bytes": [s.stats()["slot_bytes"] for s in stages],
        "child_stages": [c.meta.get("stages") for c in children],
        "max_rss": max_rss}

    def close() -> None:
        # On the event loop (the runner releasing a generation whose feeder hung), only
        # signal: the children die at once, and a thread reaps them and frees the ring.
        if _on_a_loop():
            for child in children:
                child.signal_kill()
            threading.Thread(target=close_all, daemon=True,
                             name=f"aioaccel-{runner_name}-child-reaper").start()
        else:
            close_all()

    def close_all() -> None:
        for stage in stages:
            stage.close()

    return Model(stages=[StageSpec(s.name, made(s), 1, device=True, shared=True)
                         for s in stages],
                 inputs=inputs, outputs=last.get("outputs"), prepare=prepare, close=close,
                 info=info, max_streams=first.get("max_streams"))
