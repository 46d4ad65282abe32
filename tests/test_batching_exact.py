"""Batching never changes an answer (issue 26, items 1 and 2).

A batched runner must give every item exactly (bit for bit) what the same runner gives without
batching, for every kind of stage (blocking, device, chains of both) and every backend that
batches, including when batched calls fail and their items are re-run alone. A failure stays
with its item wherever in the pipeline it happens, and a withdrawn item is run by no stage.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aioaccel
from aioaccel.testing import SimulatedDevice, SimulatedStage
from aioaccel.testing.models import dense_chain

pytestmark = pytest.mark.anyio

POISON = 13.0  # an input row with this value fails (the runtime refuses the whole call)


def poisoned(x: Any) -> bool:
    return bool((np.asarray(x) == POISON).any())


def affine(k: float) -> Any:
    """Rows times 1.5 plus ``k``; column 2 (the poison marker) passes through unchanged."""
    def fn(x: np.ndarray) -> np.ndarray:
        y = (x * np.float32(1.5) + np.float32(k)).astype(np.float32)
        y[:, 2] = x[:, 2]
        return y
    return fn


def simulated(kinds: str) -> Any:
    """A pipeline of simulated stages: ``d`` a device (out of order, 3 at a time), ``b`` a
    blocking stage; the last one refuses calls that hold a poisoned row."""
    stages: list[Any] = []
    for i, kind in enumerate(kinds):
        fail_if = poisoned if i == len(kinds) - 1 else None
        if kind == "d":
            stages.append(SimulatedDevice(affine(i + 1), latency=0.001, jitter=0.5, capacity=3,
                                          fail_if=fail_if, seed=i, name=f"dev{i}"))
        else:
            stages.append(SimulatedStage(affine(i + 1), latency=0.0005, fail_if=fail_if,
                                         name=f"blk{i}"))
    return stages if len(stages) > 1 else stages[0]


def rows(n: int, width: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, width)).astype(np.float32) for _ in range(n)]
    for i in (13, 77, 78, 150):  # poisoned items, two of them side by side
        if i < n:
            xs[i][0, 2] = POISON
    return xs


async def outcomes(runner: aioaccel.Runner, xs: list[np.ndarray]) -> list[Any]:
    """Each item's outputs, or the type of its error (from concurrent ``infer`` callers)."""
    replies = await asyncio.gather(*(runner.infer(x) for x in xs), return_exceptions=True)
    return [type(r) if isinstance(r, BaseException) else r for r in replies]


async def streamed(runner: aioaccel.Runner, xs: list[np.ndarray]) -> list[Any]:
    async def produce() -> None:
        for i, x in enumerate(xs):
            await runner.push(x, tag=i)
        runner.close()

    producer = asyncio.create_task(produce())
    results = [r async for r in runner]
    await producer
    assert [r.tag for r in results] == list(range(len(xs)))
    return [r.outputs if r.ok else type(r.error) for r in results]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes() == b.tobytes())
    return bool(a == b)


def assert_same(plain: list[Any], batched: list[Any]) -> None:
    assert len(plain) == len(batched)
    wrong = [i for i, (a, b) in enumerate(zip(plain, batched, strict=True)) if not same(a, b)]
    assert not wrong, (f"{len(wrong)} items differ with batching, first {wrong[:5]}: "
                       f"{batched[wrong[0]]!r} instead of {plain[wrong[0]]!r}")


@pytest.mark.parametrize("kinds", ["d", "b", "dd", "bd", "db", "bb", "bdb"])
async def test_batched_simulated_pipelines_answer_bit_for_bit_as_unbatched(kinds: str) -> None:
    xs = rows(200)
    async with aioaccel.open(simulated(kinds), maxsize=32) as runner:
        plain = await outcomes(runner, xs)
    async with aioaccel.open(simulated(kinds), batch=8, maxsize=32) as runner:
        batched = await outcomes(runner, xs)
        stats = runner.stats()
    assert [i for i, o in enumerate(plain) if o is aioaccel.InferenceError] == [13, 77, 78, 150]
    assert_same(plain, batched)
    assert stats.batching is not None and stats.batching.batches < 200  # it did batch
    assert stats.batching.fallbacks >= 1  # and poisoned batches were re-run item by item
    assert stats.in_flight == 0


@pytest.mark.parametrize("kinds", ["d", "bd", "db"])
async def test_batched_streams_answer_bit_for_bit_as_unbatched(kinds: str) -> None:
    xs = rows(120)
    async with aioaccel.open(simulated(kinds), maxsize=24) as runner:
        plain = await streamed(runner, xs)
    async with aioaccel.open(simulated(kinds), batch=6, maxsize=24) as runner:
        batched = await streamed(runner, xs)
    assert_same(plain, batched)


BACKENDS = ["onnx", "openvino", "openvino-async", "litert"]


def real_model(backend: str, tmp: Path) -> tuple[Any, dict[str, Any], Any]:
    chain = dense_chain(24, 3, dynamic_batch=backend == "onnx", seed=5)
    if backend == "onnx":
        return chain, {"backend": "onnx"}, chain.write_onnx(tmp / "m.onnx")
    if backend == "litert":
        return chain, {"backend": "litert"}, chain.write_tflite(tmp / "m.tflite")
    # OpenVINO's THROUGHPUT hint picks kernels by batch shape, whose sums round differently
    # in the last bit (measured: 4.8e-7 apart, the runtime's own doing, raw calls included);
    # LATENCY runs the same kernels for every batch size.
    options = {"backend": "openvino", "hint": "LATENCY",
               "api": "async" if backend == "openvino-async" else "sync"}
    return chain, options, chain.write_openvino(tmp / "m.xml")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_batched_real_runtimes_answer_bit_for_bit_as_unbatched(backend: str,
                                                                      tmp_path: Path) -> None:
    chain, options, path = real_model(backend, tmp_path)
    xs = [chain.random_input(seed) for seed in range(96)]
    async with aioaccel.open(path, maxsize=48, **options) as runner:
        plain = await outcomes(runner, xs)
    async with aioaccel.open(path, batch=8, maxsize=48, **options) as runner:
        batched = await outcomes(runner, xs)
        stats = runner.stats().batching
    assert stats is not None and stats.batches < 96
    assert_same(plain, batched)


@pytest.mark.parametrize("kinds", ["bb", "bbb", "bd"])
async def test_a_failure_in_a_later_stage_stays_with_its_item(kinds: str) -> None:
    """The last stage refuses any call holding a poisoned row: only those items fail."""
    xs = rows(64)
    async with aioaccel.open(simulated(kinds), batch=8, maxsize=32) as runner:
        got = await outcomes(runner, xs)
    failed = [i for i, o in enumerate(got) if o is aioaccel.InferenceError]
    assert failed == [13]
    expect = list(xs)
    for i in range(len(kinds)):
        expect = [affine(i + 1)(x) for x in expect]
    assert all(same(got[i], expect[i]) for i in range(64) if i != 13)


class Gate:
    """Stage 0: the first call waits until opened, so the items behind it stay queued."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()

    def __call__(self, x: Any) -> Any:
        self.entered.set()
        if not self.open.wait(10.0):
            raise RuntimeError("gate never opened")
        return x


class Seen:
    """A later stage that records what it is given."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.lock = threading.Lock()

    def __call__(self, x: Any) -> Any:
        with self.lock:
            self.values.append(x)
        if x is None:
            raise AssertionError("a later stage was handed a withdrawn item")
        return x


@pytest.mark.parametrize("batch", [None, 4])
async def test_withdrawn_items_are_run_by_no_later_stage(batch: int | None) -> None:
    gate, seen = Gate(), Seen()
    async with aioaccel.open([gate, seen], batch=batch, maxsize=16) as runner:
        first = asyncio.ensure_future(runner.infer(np.zeros((1, 2), np.float32)))
        await asyncio.to_thread(gate.entered.wait, 5.0)
        doomed = [asyncio.ensure_future(runner.infer(np.full((1, 2), i, np.float32)))
                  for i in range(1, 9)]
        await asyncio.sleep(0)  # admitted and queued behind the gate
        for task in doomed:
            task.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)
        kept = [asyncio.ensure_future(runner.infer(np.full((1, 2), 100 + i, np.float32)))
                for i in range(3)]
        gate.open.set()
        await first
        replies = await asyncio.gather(*kept)
        stats = runner.stats()
    assert [float(r[0, 0]) for r in replies] == [100.0, 101.0, 102.0]
    assert stats.withdrawn == 8 and stats.in_flight == 0
    assert all(v is not None for v in seen.values)
    assert sum(np.asarray(v).shape[0] for v in seen.values) == 4  # the first and the 3 kept
