"""Prometheus counters of the provider: the region that answered each request, and the failovers.

MLflow's gateway serves no metrics of its own, so `MOSAIC_GATEWAY_METRICS_PORT=9464` makes the first
gateway worker that binds the port serve these on `http://$MOSAIC_GATEWAY_METRICS_HOST:PORT/metrics`
(host 127.0.0.1 by default). With several workers also set `PROMETHEUS_MULTIPROC_DIR` to an empty folder
(prometheus_client's multiprocess mode): that worker then reports the sums over all of them.
Labels carry endpoint names, region base URLs and statuses; never a prompt or a key.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, multiprocess, start_http_server

_logger = logging.getLogger(__name__)

REQUESTS = Counter(
    "mosaic_gateway_upstream_requests",
    "Requests the provider sent upstream, by the region that gave the final answer and its status",
    ["endpoint", "region", "status"],
)
FAILOVERS = Counter(
    "mosaic_gateway_failovers",
    "Attempts moved off a region that failed (connect, reset, timeout, 503 or a stream cut before its first chunk)",
    ["endpoint", "region", "reason"],
)

_exporter_tried = False


def start_exporter_once() -> None:
    """Serve /metrics when MOSAIC_GATEWAY_METRICS_PORT is set; one try per process."""
    global _exporter_tried
    port = os.environ.get("MOSAIC_GATEWAY_METRICS_PORT")
    if _exporter_tried or not port:
        return
    _exporter_tried = True
    registry = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    host = os.environ.get("MOSAIC_GATEWAY_METRICS_HOST", "127.0.0.1")
    try:
        if registry is None:
            start_http_server(int(port), addr=host)
        else:
            start_http_server(int(port), addr=host, registry=registry)
    except OSError:
        # Another worker of this gateway serves them.
        _logger.debug("metrics port %s is taken; another worker serves /metrics", port)
        return
    _logger.info("provider metrics on http://%s:%s/metrics", host, port)
