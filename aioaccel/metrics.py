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
* histograms ``latency_seconds`` (admission to completion, successful items),
  ``recovery_seconds`` (fatal failure to serving again)
* counters ``restarts_total``, ``items_retried_total``, ``duplicate_completions_total``,
  ``state_seconds_total`` (labelled ``state``), ``batches_total``, ``batch_size_calls_total``
  (labelled ``size``)
* gauges ``ready``, latency split three ways as Triton reports it: ``queue_seconds_p50/p99``
  (admitted until a worker took it), ``device_seconds_p50/p99`` (in stage calls / on the
  device), ``latency_seconds_p50/p99`` (end to end); ``warmup_seconds``, ``batch_fill``,
  ``batch_wait_seconds_mean``
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
        kinds = {"counter": core.CounterMetricFamily, "gauge": core.GaugeMetricFamily}

        def families(table: tuple[tuple[str, str, str, str], ...],
                     labels: list[str]) -> list[tuple[Any, str]]:
            return [(kinds[kind](f"aioaccel_{name}", doc, labels=labels), field)
                    for name, kind, field, doc in table]

        per_runner = families(_RUNNER, ["runner"])
        per_stage = families(_STAGE, ["runner", "stage"])
        per_stream = families(_STREAM, ["runner", "stream"])
        latency = core.HistogramMetricFamily(
            "aioaccel_latency_seconds", "seconds from admission to completion",
            labels=["runner"])
        recovery = core.HistogramMetricFamily(
            "aioaccel_recovery_seconds", "seconds from a fatal failure to serving again",
            labels=["runner"])
        state_time = core.CounterMetricFamily(
            "aioaccel_state_seconds", "seconds spent in each health state",
            labels=["runner", "state"])
        up = core.GaugeMetricFamily("aioaccel_ready", "1 while the runner is ready",
                                    labels=["runner"])
        batches = core.CounterMetricFamily("aioaccel_batches", "batched calls of the first stage",
                                           labels=["runner"])
        batch_fill = core.GaugeMetricFamily("aioaccel_batch_fill",
                                            "mean items per batch as a fraction of its size",
                                            labels=["runner"])
        batch_sizes = core.CounterMetricFamily("aioaccel_batch_size_calls",
                                               "batched calls per batch size",
                                               labels=["runner", "size"])
        batch_wait = core.GaugeMetricFamily("aioaccel_batch_wait_seconds_mean",
                                            "mean wait of an item for its batch",
                                            labels=["runner"])
        for runner in list(self._runners):
            stats = runner.stats()
            for family, field in per_runner:
                family.add_metric([stats.name], float(getattr(stats, field)))
            latency.add_metric([stats.name],
                               [(_le(bound), count) for bound, count in stats.latency_buckets],
                               stats.latency_sum)
            if stats.recovery_buckets:
                recovery.add_metric([stats.name], [(_le(b), c) for b, c in stats.recovery_buckets],
                                    stats.recovery_sum)
            for state, seconds in (stats.state_seconds or {}).items():
                state_time.add_metric([stats.name, state], seconds)
            up.add_metric([stats.name], 1.0 if stats.state == "ready" else 0.0)
            if stats.batching is not None:
                b = stats.batching
                batches.add_metric([stats.name], b.batches)
                batch_fill.add_metric([stats.name], b.fill)
                batch_wait.add_metric([stats.name], b.wait_mean)
                for size, calls in b.sizes:
                    batch_sizes.add_metric([stats.name, str(size)], calls)
            for stage in stats.stages:
                for family, field in per_stage:
                    family.add_metric([stats.name, stage.name], getattr(stage, field))
            for stream in stats.streams:
                for family, field in per_stream:
                    family.add_metric([stats.name, str(stream.key)], getattr(stream, field))
        for family, _ in (*per_runner, *per_stage, *per_stream):
            yield family
        yield from (latency, recovery, state_time, up, batches, batch_fill, batch_sizes,
                    batch_wait)


# (name after "aioaccel_", kind, stats field, help); counters get "_total" from the client
_RUNNER = (
    ("items_pushed", "counter", "pushed", "items admitted (push, push_nowait, infer)"),
    ("items_completed", "counter", "completed", "items whose stages all succeeded"),
    ("items_failed", "counter", "failed", "items that failed"),
    ("items_discarded", "counter", "discarded",
     "results computed for an infer() whose caller had gone"),
    ("items_withdrawn", "counter", "withdrawn",
     "infer() items taken back before any worker started them"),
    ("in_flight", "gauge", "in_flight", "items admitted and not yet consumed"),
    ("maxsize", "gauge", "maxsize", "the runner's capacity"),
    ("waiting", "gauge", "waiting", "push/infer calls waiting for space"),
    ("peak_admitted", "gauge", "peak_admitted", "high-water mark of in_flight"),
    ("throughput", "gauge", "throughput", "completed items per second since open"),
    ("duplicate_completions", "counter", "duplicates",
     "completions a device reported twice for one item (ignored)"),
    ("restarts", "counter", "restarts", "recoveries from fatal failures"),
    ("items_retried", "counter", "retried", "items re-run after a device failure"),
    ("queue_seconds_p50", "gauge", "queue_p50", "time queued before a worker took an item"),
    ("queue_seconds_p99", "gauge", "queue_p99", "time queued before a worker took an item"),
    ("device_seconds_p50", "gauge", "device_p50", "time in stage calls or on the device"),
    ("device_seconds_p99", "gauge", "device_p99", "time in stage calls or on the device"),
    ("latency_seconds_p50", "gauge", "latency_p50", "admission to completion, recent items"),
    ("latency_seconds_p99", "gauge", "latency_p99", "admission to completion, recent items"),
    ("warmup_seconds", "gauge", "warmup_seconds", "time the warm-up took at open"),
)
_STAGE = (
    ("stage_queue_depth", "gauge", "queue_depth", "items waiting in front of the stage"),
    ("stage_busy_ratio", "gauge", "busy", "fraction of time the stage worked"),
    ("stage_in_device", "gauge", "in_device", "items on the device now"),
    ("stage_workers", "gauge", "workers", "worker threads of the stage"),
    ("stage_calls", "counter", "calls", "items the stage finished"),
)
_STREAM = (
    ("stream_in_flight", "gauge", "in_flight", "items of the stream admitted and not consumed"),
    ("stream_items_completed", "counter", "completed", "completed items of the stream"),
    ("stream_items_failed", "counter", "failed", "failed items of the stream"),
)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
