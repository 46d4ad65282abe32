"""The core's per-item fast paths (issue 21) do what the general paths do: batches claimed
together, one-input batches joined in one step, rows split back as copies, a burst handed to
the loop with one wake-up, ``infer_many`` of uniform arrays planned in one step."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import numpy as np
import pytest

import aioaccel
from aioaccel.core.batch_gather import Batch, BatchCounters, gather, run_batch
from aioaccel.core.jobs import QUEUED, RUNNING, Job
from aioaccel.core.loop_bridge import COALESCE_WINDOW, Bridge
from aioaccel.core.stage_threads import _STOP, Pipeline
from aioaccel.stages import StageSpec
from aioaccel.stats import LatencyHistogram
from aioaccel.testing.models import dense_chain

pytestmark = pytest.mark.anyio


class Receiver:
    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def on_jobs(self, jobs: list[Job]) -> None:
        self.jobs.extend(jobs)

    def on_ready(self, worker: Any, error: BaseException | None) -> None: ...
    def on_worker_exit(self, worker: Any) -> None: ...
    def on_fatal(self, error: BaseException, stage: str) -> None: ...


def _pipeline() -> tuple[Pipeline, Bridge, Receiver, list[Any]]:
    """A batching pipeline whose threads never start; its bridge runs wake-ups at once."""
    receiver = Receiver()
    wakes: list[Any] = []

    def wake(callback: Any, *args: Any) -> None:
        wakes.append(callback)
        callback(*args)

    bridge = Bridge(wake, receiver)
    pipeline = Pipeline([StageSpec("s", lambda: None, 1)], bridge, "r", 64, batch=8)
    return pipeline, bridge, receiver, wakes


def test_a_batch_is_claimed_together_and_withdrawn_jobs_go_back_as_shells() -> None:
    pipeline, _, receiver, _ = _pipeline()
    queue = pipeline.queues[0]
    jobs = [Job(i, {"x": np.zeros((1, 4), np.float32)}) for i in range(6)]
    for job in jobs:
        queue.put(job)
    assert pipeline.withdraw(jobs[2]) and pipeline.withdraw(jobs[4])
    first = queue.get_nowait()
    assert pipeline._claim(first)
    taken, following = gather(first, queue.get_nowait, queue.get, 8, 0.0, lambda: False,
                              pipeline._claim_many, pipeline._return_shell, _STOP,
                              pipeline._ranked, pipeline._put_back)
    assert [j.seq for j in taken] == [0, 1, 3, 5] and following is None
    assert all(j.state == RUNNING for j in taken)
    assert [j.seq for j in receiver.jobs] == [2, 4]  # their shells, to free their slots
    assert not pipeline.withdraw(jobs[3])  # claimed: too late to withdraw


def test_gather_stops_at_the_row_limit_and_leaves_the_next_job_unclaimed() -> None:
    pipeline, _, _, _ = _pipeline()
    queue: SimpleQueue[Any] = pipeline.queues[0]
    jobs = [Job(i, {"x": np.zeros((3, 4), np.float32)}) for i in range(4)]
    for job in jobs:
        queue.put(job)
    first = queue.get_nowait()
    pipeline._claim(first)
    taken, following = gather(first, queue.get_nowait, queue.get, 8, 0.0, lambda: False,
                              pipeline._claim_many, pipeline._return_shell, _STOP,
                              pipeline._ranked, pipeline._put_back)
    assert [j.seq for j in taken] == [0, 1]  # 6 rows; a third job would make 9
    assert following is jobs[2] and following.state == QUEUED


def test_one_input_batches_join_in_one_step_and_never_cast() -> None:
    calls: list[Any] = []

    def run(value: Any) -> Any:
        calls.append(value)
        return {"y": value["x"] * 2}

    counters = BatchCounters(8)
    rows = [np.full((1, 4), i, np.float32) for i in range(3)]
    jobs = [Job(i, {"x": rows[i]}) for i in range(3)]
    out = run_batch(run, jobs, "s", counters, 0.0)
    assert len(out) == 1 and type(out[0]) is Batch and len(calls) == 1
    assert np.array_equal(calls[0]["x"], np.concatenate(rows))
    members = out[0].unbatch(1.0)
    for i, job in enumerate(members):
        assert np.array_equal(job.value["y"], rows[i] * 2)
        assert not np.shares_memory(job.value["y"], out[0].value["y"])  # copies: pin nothing

    # one float64 item among float32 ones is never cast into the batch: each runs alone
    calls.clear()
    mixed = [Job(0, {"x": rows[0]}), Job(1, {"x": rows[1].astype(np.float64)})]
    out = run_batch(run, mixed, "s", counters, 0.0)
    assert [c["x"].dtype for c in calls] == [np.float32, np.float64]
    assert [job.value["y"].dtype for job in out] == [np.float32, np.float64]


def test_a_batch_whose_stage_returns_too_few_rows_fails_every_member() -> None:
    jobs = [Job(i, None) for i in range(3)]
    batch = Batch(jobs, {"y": np.zeros((2, 4), np.float32)}, [1, 1, 1])
    for job in batch.unbatch(1.0):
        assert isinstance(job.error, ValueError) and "2 rows" in str(job.error)
        assert job.t_done == 1.0


def test_a_burst_of_results_costs_one_wake_up() -> None:
    _, bridge, receiver, wakes = _pipeline()
    held: list[Any] = []
    bridge._wake = lambda callback, *args: held.append(callback)  # the loop is busy
    jobs = [Job(i, None) for i in range(5)]
    bridge.deliver_many(jobs[:3], 0.0)
    bridge.deliver_many(jobs[3:], 0.0)  # a drain is pending already
    assert len(held) == 1
    held[0]()
    assert [j.seq for j in receiver.jobs] == [0, 1, 2, 3, 4]

    # deferred within the window: no wake-up until the window passes or a flush
    held.clear()
    bridge.deliver_many([Job(5, None)], 1.0, defer=True)
    bridge.deliver_many([Job(6, None)], 1.0 + COALESCE_WINDOW / 2, defer=True)
    assert not held
    bridge.flush()
    assert len(held) == 1
    held[0]()
    assert [j.seq for j in receiver.jobs][-2:] == [5, 6]
    assert not wakes


def test_histogram_add_many_counts_as_add_does() -> None:
    values = [1e-5, 3e-4, 2e-3, 0.5, 30.0, 0.0]
    one, many = LatencyHistogram(), LatencyHistogram()
    for v in values:
        one.add(v)
    many.add_many(values)
    assert one.counts == many.counts and one.sum == pytest.approx(many.sum)


@pytest.fixture
def onnx_model(tmp_path: Path) -> tuple[Any, Path]:
    pytest.importorskip("onnxruntime")
    chain = dense_chain(8, 2, dynamic_batch=True, seed=3)
    return chain, chain.write_onnx(tmp_path / "model.onnx")


async def test_infer_many_of_uniform_arrays_matches_infer_item_by_item(
        onnx_model: tuple[Any, Path]) -> None:
    chain, path = onnx_model
    xs = [chain.random_input(s) for s in range(21)]
    pairs = [np.concatenate([chain.random_input(s), chain.random_input(s + 1)])
             for s in range(7)]
    async with aioaccel.open(path, batch=4, maxsize=8, num_threads=1) as runner:
        alone = [await runner.infer(x) for x in xs]
        together = await asyncio.wait_for(runner.infer_many(xs), 30)
        two_rows = await asyncio.wait_for(runner.infer_many(pairs), 30)
        stats = runner.stats()
    for a, b in zip(alone, together, strict=True):
        (name,) = a
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6)
        assert b[name].shape == a[name].shape
    for pair, out in zip(pairs, two_rows, strict=True):
        assert out[name].shape[0] == 2
        np.testing.assert_allclose(out[name], chain.reference(pair), rtol=1e-4, atol=1e-5)
    assert stats.in_flight == 0 and stats.completed == 21 + 21 + 7


async def test_infer_many_names_the_bad_item_when_one_differs(
        onnx_model: tuple[Any, Path]) -> None:
    chain, path = onnx_model
    xs = [chain.random_input(s) for s in range(6)]
    xs[3] = xs[3].astype(np.float64)
    async with aioaccel.open(path, batch=4, maxsize=8, num_threads=1) as runner:
        with pytest.raises(aioaccel.InputError, match="item 3 of 6"):
            await asyncio.wait_for(runner.infer_many(xs), 30)
        assert runner.stats().in_flight == 0  # nothing was admitted
        outs = await asyncio.wait_for(runner.infer_many(xs, return_exceptions=True), 30)
    assert isinstance(outs[3], aioaccel.InputError)
    assert all(isinstance(o, dict) for k, o in enumerate(outs) if k != 3)


def test_no_thread_is_started_by_these_unit_checks() -> None:
    assert not [t for t in threading.enumerate() if t.name.startswith("aioaccel-r-")]
