"""Reading a server's Prometheus page with the dashboard's own scrape (fetch, parse, label match)."""

from __future__ import annotations

from fastserve.services.gateway.dashboard.metrics_scrape import Scrape, fetch


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of the samples called `name` on the Prometheus page on loopback `port` whose labels include
    `labels` (0 where none do): one series' value, or a metric summed over the labels not given. The
    generation engine's series name their model with its version (`model="gpt/1"`)."""
    scrape = Scrape.parse(fetch(f"http://127.0.0.1:{port}/metrics", timeout=10), at=0.0)
    return sum(scrape.series(name, labels).values())
