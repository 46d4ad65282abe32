"""``aioaccel_v2_requests_total``: Open Inference Protocol requests answered, for ``/metrics``.

Labelled ``protocol`` (``rest``, ``grpc``, ``grpc_stream``), ``model`` (a served model's name;
empty for a name the server does not serve, so that clients cannot grow the label set) and
``code`` (the HTTP status, or the gRPC status code's name). The items those requests ran are
in the runners' own counters (``aioaccel_items_completed_total`` and the rest).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator
from typing import Any

__all__ = ["V2Requests"]


class V2Requests:
    """Counts per (protocol, model, code); read when Prometheus scrapes."""

    def __init__(self, models: Collection[str]):
        self.models = frozenset(models)
        self.counts: Counter[tuple[str, str, str]] = Counter()

    def count(self, protocol: str, model: str, code: int | str) -> None:
        self.counts[protocol, model if model in self.models else "", str(code)] += 1

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("aioaccel_v2_requests",
                                     "Open Inference Protocol requests answered",
                                     labels=["protocol", "model", "code"])
        for labels, value in sorted(self.counts.items()):
            family.add_metric(list(labels), value)
        yield family

    def exposition(self) -> bytes:
        """The text exposition of this counter alone (appended to the runners' metrics)."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(self)  # a collector: anything with collect()
        return bytes(generate_latest(registry))
