"""Reading a server's Prometheus page, as a scraper would."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` on the Prometheus page at `url` whose labels include `labels`
    (0 where none do): one series' value, or a metric summed over the labels not given. The generation
    engine's series name their model with its version (`model="gpt/1"`)."""
    page = httpx.get(url, timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(page) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))
