"""The inference service's Prometheus text, scraped from its metrics port, turned into windowed figures.

Counters and histograms only grow, so a figure "now" is the difference of two scrapes: a rate is the
increase over the seconds between them, a quantile is Prometheus' `histogram_quantile` over the increase
of each bucket. The scraper keeps its recent scrapes and measures each new one against the newest that is
at least `window` seconds old (or the oldest it has), so that figures polled every few seconds are
steady, and two callers polling at once do not see the empty window between their two scrapes.

The metric names are the inference service's (`generation_metrics`, `repository`, the runtime's RPC
metrics), copied as strings: the gateway imports no other service.
"""

from __future__ import annotations

import math
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# The generation engine's `model` label is `<name>/<version>`.
GENERATED_TOKENS = "fastserve_generation_tokens_total"  # labels model, policy
BATCH_OCCUPANCY = "fastserve_generation_batch_occupancy"  # histogram; model, policy
QUEUE_LENGTH = "fastserve_generation_queue_length"  # gauge; model, policy, level
TIME_TO_FIRST_TOKEN = "fastserve_generation_time_to_first_token_seconds"  # histogram; model, policy
REQUESTS = "fastserve_inference_requests_total"  # labels model, version
BATCH_SIZE = "fastserve_inference_batch_size"  # histogram; model, version (encoders)
RPC_LATENCY = "fastserve_rpc_latency_seconds"  # histogram; service, method

# The RPCs whose latency is a model's request latency, by the kind of model: the RPC metrics carry no
# model label, so every model of one kind shows the service's latency for that kind of call.
GENERATION_METHODS = frozenset({"Generate", "GenerateStream", "Chat", "ChatStream"})
ENCODER_METHODS = frozenset({"Embed", "Classify", "ModelInfer"})

MAX_BYTES = 16 << 20  # a scrape larger than this is refused rather than read into memory
Match = Mapping[str, str | frozenset[str]]
Key = tuple[str, frozenset[tuple[str, str]]]


class ScrapeError(Exception):
    """The metrics could not be read; the message says why, for `metrics_error`."""


def _matches(labels: frozenset[tuple[str, str]], match: Match) -> bool:
    found = dict(labels)
    for name, wanted in match.items():
        value = found.get(name)
        if value is None or (value not in wanted if isinstance(wanted, frozenset) else value != wanted):
            return False
    return True


@dataclass(frozen=True)
class Scrape:
    """Every sample of one scrape, by sample name and labels, and when it was taken (monotonic seconds)."""

    time: float
    samples: Mapping[Key, float]

    @classmethod
    def parse(cls, text: str, at: float) -> Scrape:
        samples: dict[Key, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
        return cls(at, samples)

    def series(self, name: str, match: Match) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name and _matches(labels, match)}

    def current(self, name: str, match: Match, by: str) -> dict[str, float] | None:
        """A gauge's values now, summed by the label `by`; None when no series matches."""
        found = self.series(name, match)
        if not found:
            return None
        totals: dict[str, float] = {}
        for labels, value in found.items():
            key = dict(labels).get(by, "")
            totals[key] = totals.get(key, 0.0) + value
        return totals


@dataclass(frozen=True)
class Window:
    """The increase of the counters and histograms between two scrapes."""

    earlier: Scrape
    later: Scrape

    @property
    def seconds(self) -> float:
        return self.later.time - self.earlier.time

    def increase(self, name: str, match: Match) -> dict[frozenset[tuple[str, str]], float] | None:
        """Each matching series' increase; a series that went down restarted (the service did), so all of its
        value is new, as Prometheus counts a counter reset. None when no series matches now."""
        now = self.later.series(name, match)
        if not now:
            return None
        before = self.earlier.samples
        out = {}
        for labels, value in now.items():
            delta = value - before.get((name, labels), 0.0)
            out[labels] = value if delta < 0 else delta
        return out

    def total(self, name: str, match: Match) -> float | None:
        found = self.increase(name, match)
        return None if found is None else sum(found.values())

    def rate(self, name: str, match: Match) -> float | None:
        """Per second, over the window; None when no series matches or the window is empty."""
        total = self.total(name, match)
        return None if total is None or self.seconds <= 0 else total / self.seconds

    def mean(self, histogram: str, match: Match) -> float | None:
        """Mean of the observations in the window; None when there were none."""
        count, total = self.total(f"{histogram}_count", match), self.total(f"{histogram}_sum", match)
        return None if not count or total is None else total / count

    def quantile(self, q: float, histogram: str, match: Match) -> float | None:
        """`histogram_quantile(q, increase(histogram_bucket[window]))`; None when nothing was observed."""
        found = self.increase(f"{histogram}_bucket", match)
        if not found:
            return None
        buckets: dict[float, float] = {}
        for labels, value in found.items():
            bound = float(dict(labels)["le"])
            buckets[bound] = buckets.get(bound, 0.0) + value
        return histogram_quantile(q, buckets.items())


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The `q` quantile of cumulative `(upper bound, count)` buckets, interpolated linearly inside the
    bucket it falls in, as Prometheus does: a quantile in the +Inf bucket is the largest finite bound,
    the first bucket starts at 0. None when the buckets hold nothing."""
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]) or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def fetch(url: str, timeout: float) -> str:
    """The text at `url`, proxies ignored: the metrics port is the stack's own."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as reply:
            body = reply.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ScrapeError(f"the inference metrics at {url} cannot be read: {getattr(exc, 'reason', exc)}") from None
    if len(body) > MAX_BYTES:
        raise ScrapeError(f"the inference metrics at {url} are over {MAX_BYTES} bytes")
    return body.decode("utf-8", errors="replace")


class MetricsScraper:
    """Scrapes `url` (empty: the inference service exports no metrics) and keeps recent scrapes to measure
    windows against; safe to call from several threads."""

    def __init__(self, url: str, *, window: float = 10.0, timeout: float = 2.0, keep: int = 64) -> None:
        self.url, self.window, self.timeout = url, window, timeout
        self._history: deque[Scrape] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def scrape(self) -> tuple[Scrape, Window | None]:
        """A new scrape, and its window against an earlier one (None for the first). Raises ScrapeError."""
        if not self.url:
            raise ScrapeError("the inference service exports no metrics (FASTSERVE_INFERENCE_METRICS_PORT=0)")
        with self._lock:
            text = fetch(self.url, self.timeout)
            try:
                new = Scrape.parse(text, time.monotonic())
            except ValueError as exc:
                raise ScrapeError(f"the inference metrics at {self.url} are not Prometheus text: {exc}") from None
            history = self._history
            # Keep the newest scrape at least `window` old (and the ones after it) to measure against.
            while len(history) > 1 and history[1].time <= new.time - self.window:
                history.popleft()
            window = Window(history[0], new) if history else None
            history.append(new)
            return new, window
