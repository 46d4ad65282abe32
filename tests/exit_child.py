"""A child interpreter that leaves a runner open, with work in flight, and exits.

``python tests/exit_child.py BACKEND SCENARIO`` opens a runner on BACKEND, fills it (items
pushed and not consumed, or ``infer`` calls awaiting), and leaves the interpreter the way
SCENARIO says, never closing the runner. It prints ``leaving`` on stdout just before it goes.
The parent side is :func:`exit_once` (used by tests/test_exit_safety.py and
benchmarks/soak_exit.py): it checks the exit code is the one the scenario asks for, that
stderr has no abort text, and times the exit itself (from ``leaving`` to the process's end).

BACKEND: openvino-async, openvino-sync, onnx, litert, function, pool (two OpenVINO async
members), process (ONNX Runtime in a child process, ``isolation="process"``).

SCENARIO:

* ``global``   -- opened inside ``asyncio.run``, kept in a global; the loop ends, items pending;
* ``sysexit``  -- ``sys.exit(0)`` inside the coroutine, items pending (the runner is a local);
* ``raise``    -- an exception escapes the coroutine (exit code 1, a traceback);
* ``interrupt``-- ``KeyboardInterrupt`` escapes the coroutine (the interpreter then ends itself
  with SIGINT: exit code -2);
* ``loop``     -- no ``asyncio.run``: a loop never closed, ``run_until_complete`` of the pushes;
* ``infer``    -- 64 ``infer`` calls awaiting when ``sys.exit(0)`` is called;
* ``thread``   -- a daemon thread runs a loop that keeps pushing and consuming; the main thread
  returns while it does (traffic through the whole exit: the exit stops the runner, and the
  thread's next push says ``RunnerClosed``);
* ``opening``  -- the interpreter exits while the runner is still opening (the model compiling
  on its load thread).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import aioaccel
from aioaccel.testing.models import dense_chain

#: exit code each scenario leaves with when the exit is clean
EXPECTED = {"global": 0, "sysexit": 0, "raise": 1, "interrupt": -2, "loop": 0, "infer": 0,
            "thread": 0, "opening": 0}
BACKENDS = ("openvino-async", "openvino-sync", "onnx", "litert", "function", "pool", "process")

#: big enough that items are still running when the interpreter exits (a few ms per item)
CHAIN = dense_chain(512, 8, batch=32)
MAXSIZE = 64


def work(x: Any) -> Any:
    """The function backend's stage: releases the GIL in NumPy, like a runtime."""
    return CHAIN.reference(x)


def runner_for(backend: str) -> Any:
    """A runner (not opened) for BACKEND."""
    tmp = tempfile.mkdtemp(prefix="aioaccel-exit-")
    if backend == "openvino-async":
        return aioaccel.open(CHAIN.openvino_model(), api="async", jobs=4, maxsize=MAXSIZE)
    if backend == "openvino-sync":
        return aioaccel.open(CHAIN.openvino_model(), api="sync", replicas=2, maxsize=MAXSIZE)
    if backend == "onnx":
        return aioaccel.open(CHAIN.write_onnx(tmp + "/m.onnx"), replicas=2, maxsize=MAXSIZE)
    if backend == "litert":
        return aioaccel.open(CHAIN.write_tflite(tmp + "/m.tflite"), replicas=2, maxsize=MAXSIZE)
    if backend == "function":
        return aioaccel.open(work, replicas=2, maxsize=MAXSIZE)
    if backend == "pool":
        xml = CHAIN.write_openvino(tmp + "/m.xml")
        return aioaccel.pool(aioaccel.open(xml, api="async", jobs=2, maxsize=MAXSIZE // 2),
                             aioaccel.open(xml, api="async", jobs=2, maxsize=MAXSIZE // 2))
    if backend == "process":
        return aioaccel.open(CHAIN.write_onnx(tmp + "/m.onnx"), isolation="process",
                             maxsize=MAXSIZE)
    raise SystemExit(f"unknown backend {backend!r}: one of {', '.join(BACKENDS)}")


async def filled(backend: str) -> Any:
    runner = await runner_for(backend)
    for i in range(MAXSIZE):
        runner.push_nowait(CHAIN.random_input(i))
    return runner


def leaving() -> None:
    print("leaving", flush=True)


async def main(backend: str, scenario: str) -> Any:
    if scenario == "opening":
        opening = asyncio.ensure_future(runner_for(backend).__aenter__())
        await asyncio.sleep(0)  # the load thread has started compiling
        globals()["opening"] = opening
        leaving()
        return None
    if scenario == "infer":
        runner = await runner_for(backend)
        calls = [asyncio.ensure_future(runner.infer(CHAIN.random_input(i)))
                 for i in range(MAXSIZE)]
        await asyncio.sleep(0.05)  # the calls are admitted and running
        globals()["calls"] = calls
        leaving()
        sys.exit(0)
    runner = await filled(backend)
    leaving()
    if scenario == "sysexit":
        sys.exit(0)
    if scenario == "raise":
        raise RuntimeError("the program failed with items pending")
    if scenario == "interrupt":
        raise KeyboardInterrupt
    return runner


def traffic(backend: str, started: threading.Event) -> None:
    async def forever() -> None:
        runner = await runner_for(backend)
        started.set()
        i = 0
        while True:  # push and consume until the interpreter goes
            await runner.push(CHAIN.random_input(i))
            i += 1
            if i > MAXSIZE // 2:
                await runner.__anext__()

    try:
        asyncio.run(forever())
    except aioaccel.RunnerClosed:
        pass  # the interpreter is exiting: its hook stopped the runner


def run(backend: str, scenario: str) -> None:
    if scenario not in EXPECTED:
        raise SystemExit(f"unknown scenario {scenario!r}: one of {', '.join(EXPECTED)}")
    if scenario == "thread":
        started = threading.Event()
        threading.Thread(target=traffic, args=(backend, started), daemon=True).start()
        if not started.wait(120):
            raise SystemExit("the traffic thread never opened its runner")
        leaving()
        return
    if scenario == "loop":
        loop = asyncio.new_event_loop()
        globals()["kept"] = loop.run_until_complete(filled(backend))
        leaving()
        return
    globals()["kept"] = asyncio.run(main(backend, scenario))


#: what a child's stderr says when it died in native code at exit, or a thread of ours raised
ABORT_TEXT = ("terminate called", "Fatal Python error", "core dumped", "Aborted",
              "Segmentation fault", "Exception in thread", "Exception ignored")


@dataclass
class Exit:
    """How one child interpreter left."""

    backend: str
    scenario: str
    returncode: int | None
    stderr: str
    exit_seconds: float  # from "leaving" to the end of the process

    @property
    def problem(self) -> str | None:
        """None when the exit was clean, else what was wrong."""
        if self.returncode is None:
            return f"no exit within the timeout: {self.stderr[-800:]}"
        if self.exit_seconds < 0:
            return (f"never got as far as leaving (exit code {self.returncode}): "
                    f"{self.stderr[-800:]}")
        aborted = [text for text in ABORT_TEXT if text in self.stderr]
        if self.returncode != EXPECTED[self.scenario] or aborted:
            return (f"exit code {self.returncode} (clean: {EXPECTED[self.scenario]})"
                    f"{', stderr says ' + repr(aborted) if aborted else ''}: "
                    f"{self.stderr[-800:]}")
        return None


def exit_once(backend: str, scenario: str, timeout: float = 120.0) -> Exit:
    """Run one child that leaves BACKEND's runner open the SCENARIO way; how it went."""
    proc = subprocess.Popen([sys.executable, "-W", "ignore::ResourceWarning", __file__,
                             backend, scenario], cwd=Path(__file__).parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    left = -1.0
    try:
        for line in proc.stdout:  # EOF when the child is gone, whatever happened
            if line.startswith("leaving"):
                left = perf_counter()
                break
        _, err = proc.communicate(timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        code = None
    return Exit(backend, scenario, code, err, perf_counter() - left if left >= 0 else -1.0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(sys.argv[1], sys.argv[2])
