"""Prometheus metrics read from runner.stats() at scrape time."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import aioaccel
from aioaccel.metrics import RunnerCollector
from aioaccel.testing import SimulatedStage

pytestmark = pytest.mark.anyio


def samples(collector: RunnerCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = collector.exposition()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


async def test_counters_histogram_stages_and_streams() -> None:
    registry = CollectorRegistry()
    stage = SimulatedStage(lambda x: x, latency=0.002, fail_at=3)
    async with aioaccel.open([stage, lambda x: x], name="cam", maxsize=4) as runner:
        collector = RunnerCollector(runner, registry=registry)
        await asyncio.gather(*(runner.infer(i) for i in range(10)), return_exceptions=True)
        stream = runner.stream("door")
        await stream.push(1)
        await stream.__anext__()
        got = samples(collector)
    r = (("runner", "cam"),)
    assert got[("aioaccel_items_pushed_total", r)] == 11
    assert got[("aioaccel_items_completed_total", r)] == 10
    assert got[("aioaccel_items_failed_total", r)] == 1
    assert got[("aioaccel_maxsize", r)] == 4
    # the histogram counts every successful item; its buckets are cumulative
    assert got[("aioaccel_latency_seconds_count", r)] == 10
    assert got[("aioaccel_latency_seconds_bucket", (("le", "+Inf"), ("runner", "cam")))] == 10
    assert got[("aioaccel_latency_seconds_bucket", (("le", "0.0005"), ("runner", "cam")))] == 0
    assert 10 * 0.002 <= got[("aioaccel_latency_seconds_sum", r)] < 10
    stage_key = (("runner", "cam"), ("stage", "simulated"))
    assert got[("aioaccel_stage_calls_total", stage_key)] == 11
    assert got[("aioaccel_stage_workers", stage_key)] == 1
    assert got[("aioaccel_stream_items_completed_total",
                (("runner", "cam"), ("stream", "door")))] == 1


async def test_default_registry_and_runners_held_weakly() -> None:
    from prometheus_client import REGISTRY

    collector = RunnerCollector()
    try:
        async with aioaccel.open(lambda x: x, name="weak") as runner:
            collector.add(runner)
            await runner.infer(1)
            assert ("aioaccel_items_completed_total", (("runner", "weak"),)) in samples(collector)
        del runner
        import gc

        gc.collect()
        assert not any(labels == (("runner", "weak"),) for _, labels in samples(collector))
    finally:
        REGISTRY.unregister(collector)


def test_without_prometheus_client_the_error_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(aioaccel.BackendUnavailable, match=r"aioaccel\[metrics\]"):
        RunnerCollector()


async def test_recovery_batching_and_the_latency_split_are_exported() -> None:
    import numpy as np

    registry = CollectorRegistry()
    stage = SimulatedStage(lambda x: x, latency=0.001, fatal_at=2)  # its third call (a batch)
    restart = aioaccel.Restart(backoff=0.01)
    async with aioaccel.open(stage, name="heal", maxsize=4, restart=restart, retries=1,
                             batch=4) as runner:
        collector = RunnerCollector(runner, registry=registry)
        xs = [np.full((1, 2), i, np.float32) for i in range(20)]
        await asyncio.gather(*(runner.infer(x) for x in xs))
        got = samples(collector)
    r = (("runner", "heal"),)
    assert got[("aioaccel_restarts_total", r)] == 1
    assert got[("aioaccel_items_retried_total", r)] >= 1
    assert got[("aioaccel_recovery_seconds_count", r)] == 1
    assert got[("aioaccel_ready", r)] == 1
    assert got[("aioaccel_batches_total", r)] >= 1
    assert got[("aioaccel_device_seconds_p99", r)] > 0
    assert got[("aioaccel_state_seconds_total", (("runner", "heal"), ("state", "recovering")))] > 0
