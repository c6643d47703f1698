"""Prometheus metrics common to every service, exported on the service's metrics port.

Defined once at module level: prometheus_client's default registry refuses a second definition, and
one process may host several servers (tests do).
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

RPC_CALLS = Counter(
    "fastserve_rpc_calls", "Finished RPCs, by method and status code.", ["service", "method", "code"])
RPC_ERRORS = Counter(
    "fastserve_rpc_errors", "RPCs that ended with a status other than OK.", ["service", "method", "code"])
RPC_LATENCY = Histogram(
    "fastserve_rpc_latency_seconds", "Wall time of an RPC, streams included.", ["service", "method"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
RPC_IN_FLIGHT = Gauge("fastserve_rpc_in_flight", "RPCs being served now.", ["service", "method"])


def serve_metrics(host: str, port: int) -> None:
    """Start the HTTP exporter in a daemon thread; port 0 means no exporter."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)
