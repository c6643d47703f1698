"""The dashboard's windowed figures against prometheus_client's own exposition: rates over the window
between two scrapes, quantiles over the buckets' increase (as Prometheus' histogram_quantile), and
counter resets."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from fastserve.services.gateway.dashboard.metrics_scrape import Scrape, Window, histogram_quantile

BUCKETS = (0.1, 0.2, 0.4, 0.8)


def _registry():
    registry = CollectorRegistry()
    tokens = Counter("fastserve_generation_tokens", "t", ["model"], registry=registry)
    ttft = Histogram("fastserve_generation_time_to_first_token_seconds", "h", ["model"], buckets=BUCKETS,
                     registry=registry)
    return registry, tokens, ttft


def _scrape(registry, at: float) -> Scrape:
    return Scrape.parse(generate_latest(registry).decode(), at)


def test_rate_and_quantiles_cover_only_the_window():
    registry, tokens, ttft = _registry()
    tokens.labels("chat/1").inc(1000)
    for _ in range(50):  # before the window: all slow, must not count
        ttft.labels("chat/1").observe(0.7)
    first = _scrape(registry, 100.0)
    tokens.labels("chat/1").inc(300)
    tokens.labels("other/1").inc(5)
    for value in [0.05] * 90 + [0.3] * 10:
        ttft.labels("chat/1").observe(value)
    window = Window(first, _scrape(registry, 110.0))
    match = {"model": "chat/1"}
    assert window.rate("fastserve_generation_tokens_total", match) == 30.0
    name = "fastserve_generation_time_to_first_token_seconds"
    p50, p99 = window.quantile(0.5, name, match), window.quantile(0.99, name, match)
    # 90 of 100 in the first bucket: the median is inside it; the 99th in (0.2, 0.4], linearly placed.
    assert 0 < p50 <= 0.1
    assert math.isclose(p99, 0.2 + 0.2 * (99 - 90) / 10)
    assert math.isclose(window.mean(name, match), (90 * 0.05 + 10 * 0.3) / 100)
    assert window.rate("fastserve_generation_tokens_total", {"model": "absent/1"}) is None


def test_a_restarted_counter_counts_from_zero():
    registry, tokens, _ = _registry()
    tokens.labels("chat/1").inc(500)
    first = _scrape(registry, 0.0)
    fresh, again, _ = _registry()  # the service restarted: its counter starts over
    again.labels("chat/1").inc(40)
    window = Window(first, _scrape(fresh, 4.0))
    assert window.rate("fastserve_generation_tokens_total", {"model": "chat/1"}) == 10.0


def test_histogram_quantile_edges():
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    # Everything above the last finite bound: Prometheus answers that bound.
    assert histogram_quantile(0.99, [(0.1, 0.0), (0.8, 0.0), (math.inf, 10.0)]) == 0.8
