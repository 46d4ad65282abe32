"""Prometheus metrics: ``runner.stats()`` of every registered runner, read at scrape time.

``pip install 'aioaccel[metrics]'`` (``prometheus_client``). Nothing is counted twice and the
hot path does no extra work: the collector reads each runner's counters when Prometheus
scrapes.

    from aioaccel.metrics import RunnerCollector
    collector = RunnerCollector()           # registers with prometheus_client's default registry
    collector.add(runner)                   # or RunnerCollector(runner_a, runner_b)
    body, content_type = collector.exposition()   # for a /metrics route

Metrics (all prefixed ``aioaccel_``, labelled ``runner``; stage metrics add ``stage``, stream
metrics add ``stream``):

* counters ``items_pushed_total``, ``items_completed_total``, ``items_failed_total``,
  ``items_discarded_total``, ``items_withdrawn_total``, ``stage_calls_total``,
  ``stream_items_completed_total``, ``stream_items_failed_total``
* histogram ``latency_seconds`` (admission to completion, successful items)
* gauges ``in_flight``, ``maxsize``, ``waiting``, ``peak_admitted``, ``throughput``
  (items/s since open), ``stage_queue_depth``, ``stage_busy_ratio``, ``stage_in_device``,
  ``stage_workers``, ``stream_in_flight``
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._optional import need

if TYPE_CHECKING:
    from .runner import Runner

__all__ = ["RunnerCollector"]


def _client() -> Any:
    return need("prometheus_client", "metrics", "aioaccel.metrics")


class RunnerCollector:
    """A Prometheus collector over runners (held weakly: a runner that is gone disappears)."""

    def __init__(self, *runners: Runner, registry: Any = "default"):
        client = _client()
        self._core = need("prometheus_client.core", "metrics", "aioaccel.metrics")
        self._client = client
        self._runners: weakref.WeakSet[Runner] = weakref.WeakSet(runners)
        self.registry = client.REGISTRY if registry == "default" else registry
        if self.registry is not None:
            self.registry.register(self)

    def add(self, runner: Runner) -> None:
        self._runners.add(runner)

    def remove(self, runner: Runner) -> None:
        self._runners.discard(runner)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the text exposition of this collector's registry."""
        registry = self.registry
        if registry is None:
            registry = self._client.CollectorRegistry()
            registry.register(self)
        return self._client.generate_latest(registry), self._client.CONTENT_TYPE_LATEST

    def describe(self) -> list[Any]:
        return []  # metrics depend on the runners present: collected on demand only

    def collect(self) -> Iterator[Any]:
        core = self._core
        runner_label = ["runner"]
        counters = {
            "items_pushed": ("items admitted (push, push_nowait, infer)", "pushed"),
            "items_completed": ("items whose stages all succeeded", "completed"),
            "items_failed": ("items that failed", "failed"),
            "items_discarded": ("results computed for an infer() whose caller had gone",
                                "discarded"),
            "items_withdrawn": ("infer() items taken back before any worker started them",
                                "withdrawn"),
        }
        gauges = {
            "in_flight": ("items admitted and not yet consumed", "in_flight"),
            "maxsize": ("the runner's capacity", "maxsize"),
            "waiting": ("push/infer calls waiting for space", "waiting"),
            "peak_admitted": ("high-water mark of in_flight", "peak_admitted"),
            "throughput": ("completed items per second since open", "throughput"),
        }
        families: dict[str, Any] = {}
        for name, (doc, _) in counters.items():
            families[name] = core.CounterMetricFamily(f"aioaccel_{name}", doc,
                                                      labels=runner_label)
        for name, (doc, _) in gauges.items():
            families[name] = core.GaugeMetricFamily(f"aioaccel_{name}", doc, labels=runner_label)
        latency = core.HistogramMetricFamily(
            "aioaccel_latency_seconds", "seconds from admission to completion",
            labels=runner_label)
        stage_label = ["runner", "stage"]
        stage = {
            "queue_depth": core.GaugeMetricFamily(
                "aioaccel_stage_queue_depth", "items waiting in front of the stage",
                labels=stage_label),
            "busy": core.GaugeMetricFamily(
                "aioaccel_stage_busy_ratio", "fraction of time the stage worked",
                labels=stage_label),
            "in_device": core.GaugeMetricFamily(
                "aioaccel_stage_in_device", "items on the device now", labels=stage_label),
            "workers": core.GaugeMetricFamily(
                "aioaccel_stage_workers", "worker threads of the stage", labels=stage_label),
            "calls": core.CounterMetricFamily(
                "aioaccel_stage_calls", "items the stage finished", labels=stage_label),
        }
        stream_label = ["runner", "stream"]
        stream = {
            "in_flight": core.GaugeMetricFamily(
                "aioaccel_stream_in_flight", "items of the stream admitted and not consumed",
                labels=stream_label),
            "completed": core.CounterMetricFamily(
                "aioaccel_stream_items_completed", "completed items of the stream",
                labels=stream_label),
            "failed": core.CounterMetricFamily(
                "aioaccel_stream_items_failed", "failed items of the stream",
                labels=stream_label),
        }
        for runner in list(self._runners):
            stats = runner.stats()
            labels = [stats.name]
            for name, (_, field) in {**counters, **gauges}.items():
                families[name].add_metric(labels, float(getattr(stats, field)))
            buckets = [(_le(bound), count) for bound, count in stats.latency_buckets]
            latency.add_metric(labels, buckets, stats.latency_sum)
            for s in stats.stages:
                key = [stats.name, s.name]
                stage["queue_depth"].add_metric(key, s.queue_depth)
                stage["busy"].add_metric(key, s.busy)
                stage["in_device"].add_metric(key, s.in_device)
                stage["workers"].add_metric(key, s.workers)
                stage["calls"].add_metric(key, s.calls)
            for st in stats.streams:
                key = [stats.name, str(st.key)]
                stream["in_flight"].add_metric(key, st.in_flight)
                stream["completed"].add_metric(key, st.completed)
                stream["failed"].add_metric(key, st.failed)
        yield from families.values()
        yield latency
        yield from stage.values()
        yield from stream.values()


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
