"""Interpreter exit never aborts, whatever a program left open (issue 20, item 6).

Each case is a child interpreter (tests/exit_child.py) that opens a runner, fills it and leaves
without closing it. A clean exit: the scenario's own exit code (0, or 1 for an uncaught
exception, -2 for ``KeyboardInterrupt``), no ``terminate called`` / ``Fatal Python error`` /
thread traceback on stderr, and the exit itself bounded. Children run two at a time: aborts are
races, and load makes them likelier. The long count (50 runs per backend and scenario) is
``python benchmarks/soak_exit.py --runs 50``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from exit_child import BACKENDS, Exit, exit_once

from aioaccel.core.exit_guard import EXIT_WAIT

pytestmark = pytest.mark.timeout(300)

NEEDS = {"openvino-async": "openvino", "openvino-sync": "openvino", "pool": "openvino",
         "onnx": "onnxruntime", "process": "onnxruntime", "litert": "ai_edge_litert"}


def needs(backend: str) -> None:
    module = NEEDS.get(backend)
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'aioaccel[all]')")


def exits(cases: Iterable[tuple[str, str]]) -> list[Exit]:
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda case: exit_once(*case), cases))


def assert_clean(done: list[Exit]) -> None:
    bad = [f"{e.backend}/{e.scenario}: {e.problem}" for e in done if e.problem is not None]
    assert not bad, f"{len(bad)} of {len(done)} exits were not clean:\n" + "\n".join(bad)


#: one child per scenario and backend: the loop ended with items pending, infer calls
#: awaiting, traffic on a daemon thread through the exit
EVERY_BACKEND = ("global", "infer", "thread")


@pytest.mark.parametrize("backend", BACKENDS)
def test_exit_with_a_runner_left_open_is_clean(backend: str) -> None:
    needs(backend)
    assert_clean(exits((backend, scenario) for scenario in EVERY_BACKEND))


def test_exit_with_openvino_requests_running_is_clean_every_way() -> None:
    """The case the issue measured (OpenVINO ``api="async"``, never closed, items pending),
    left every way: the loop ended, ``sys.exit`` in the coroutine, an uncaught exception or
    ``KeyboardInterrupt`` (exit codes 1 and -2, the interpreter's own), a loop never closed,
    ``infer`` calls awaiting, traffic on another thread."""
    needs("openvino-async")
    scenarios = ("global", "sysexit", "raise", "interrupt", "loop", "infer", "thread")
    assert_clean(exits(("openvino-async", s) for s in scenarios))


@pytest.mark.parametrize("backend", ["openvino-async", "openvino-sync"])
def test_exit_while_the_model_compiles_is_clean(backend: str) -> None:
    """Regression: leaving while a runner was still opening left its load thread inside
    OpenVINO's ``compile_model``; finalization ended that thread as it came back for the GIL
    and the process aborted (``terminate called without an active exception``, exit code -6)
    in 4 to 7 of 10 runs. The exit now waits for the load (bounded) and releases its model."""
    needs(backend)
    assert_clean(exits([(backend, "opening")] * 6))


def test_exit_with_a_pool_fed_from_another_thread_is_prompt() -> None:
    """Regression: a pool whose loop runs on another thread was closed through that loop at
    exit, its members draining for ``close_timeout`` while the exit waited (about 16 s).
    At exit the members are stopped directly, as when there is no loop."""
    needs("pool")
    done = exits([("pool", "thread")] * 3)  # the old code was slow in about 1 exit of 5
    assert_clean(done)
    slow = [round(e.exit_seconds, 1) for e in done if e.exit_seconds >= EXIT_WAIT]
    assert not slow, f"exits took {slow} s (the exit's whole budget is {EXIT_WAIT} s)"
