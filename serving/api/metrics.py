"""Prometheus metrics of the serving tier.

Request, token and latency metrics are measured in the ingress, where the client's view of latency is.
Engine state (queues, KV cache, preemptions, prefix cache) lives in the LLM replicas: at each scrape the
ingress asks every replica for its `EngineStats` and exports them labelled by replica. With several ingress
replicas each one exports its own request counters, so scrape every ingress (or run one).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# (stats field, metric name, kind, help)
_ENGINE_FIELDS = (
    ("num_waiting", "mosaic_num_waiting_seqs", "gauge", "Sequences waiting to be scheduled"),
    ("num_running", "mosaic_num_running_seqs", "gauge", "Sequences in the running batch"),
    ("kv_cache_usage", "mosaic_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use"),
    ("num_free_blocks", "mosaic_kv_cache_free_blocks", "gauge", "Free KV-cache blocks"),
    ("num_total_blocks", "mosaic_kv_cache_total_blocks", "gauge", "KV-cache blocks in the pool"),
    ("num_preemptions", "mosaic_preemptions", "counter", "Sequences preempted for lack of KV blocks"),
    ("prefix_cache_queries", "mosaic_prefix_cache_queries", "counter", "Prefix-cache lookups (see EngineStats)"),
    ("prefix_cache_hits", "mosaic_prefix_cache_hits", "counter", "Prefix-cache hits (see EngineStats)"),
    ("num_steps", "mosaic_engine_steps", "counter", "Engine steps run"),
    ("kv_bytes_per_token", "mosaic_kv_cache_bytes_per_token", "gauge",
     "Bytes one cached token takes (keys and values, all layers, one tensor-parallel rank)"),
    ("kv_capacity_tokens", "mosaic_kv_cache_capacity_tokens", "gauge", "Tokens the KV-cache pool holds"),
    ("in_flight", "mosaic_replica_in_flight_requests", "gauge", "Requests admitted by the replica, not finished"),
)


class _EngineStatsCollector(Collector):
    """Exports the latest per-replica engine snapshot taken by `Metrics.set_engine_stats`."""

    def __init__(self) -> None:
        self.snapshot: list[Mapping[str, Any]] = []

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "replica"]
        for field, name, kind, doc in _ENGINE_FIELDS:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=labels)
            for stats in self.snapshot:
                if field in stats:
                    family.add_metric([stats["model"], stats["replica"]], float(stats[field]))
            yield family
        rate = GaugeMetricFamily("mosaic_prefix_cache_hit_rate", "Cumulative prefix-cache hits / queries",
                                 labels=labels)
        for stats in self.snapshot:
            queries = stats.get("prefix_cache_queries", 0)
            rate.add_metric([stats["model"], stats["replica"]],
                            stats.get("prefix_cache_hits", 0) / queries if queries else 0.0)
        yield rate
        info = GaugeMetricFamily("mosaic_kv_cache_info", "KV-cache storage type (always 1)",
                                 labels=[*labels, "kv_cache_dtype"])
        for stats in self.snapshot:
            if "kv_cache_dtype" in stats:
                info.add_metric([stats["model"], stats["replica"], stats["kv_cache_dtype"]], 1.0)
        yield info


class Metrics:
    def __init__(self, replica: str = "local") -> None:
        self.registry = CollectorRegistry()
        # Each ingress replica keeps its own counters and a scrape through the proxy reaches one of them:
        # this series says whose counters a scrape shows (and that it restarted, when it changes).
        Gauge("mosaic_ingress_info", "The ingress replica that answered this scrape (always 1)", ["replica"],
              registry=self.registry).labels(replica).set(1)
        self.requests = Counter("mosaic_requests", "HTTP requests by endpoint, status and API key name",
                                ["endpoint", "status", "key"], registry=self.registry)
        self.request_latency = Histogram("mosaic_request_latency_seconds", "Time to the full response",
                                         ["endpoint"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("mosaic_prompt_tokens", "Prompt tokens of admitted requests",
                                     ["model", "key"], registry=self.registry)
        self.generation_tokens = Counter("mosaic_generation_tokens", "Generated tokens",
                                         ["model", "key"], registry=self.registry)
        self.ttft = Histogram("mosaic_time_to_first_token_seconds", "Arrival to the first generated token",
                              ["model"], buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("mosaic_inter_token_latency_seconds", "Time between generated tokens",
                             ["model"], buckets=_ITL_BUCKETS, registry=self.registry)
        self._engine = _EngineStatsCollector()
        self.registry.register(self._engine)

    def set_engine_stats(self, snapshot: Iterable[Mapping[str, Any]]) -> None:
        self._engine.snapshot = list(snapshot)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
