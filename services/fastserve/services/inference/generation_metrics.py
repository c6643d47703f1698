"""Prometheus metrics of the generation engine, labelled by model and scheduling policy."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LABELS = ["model", "policy"]


TOKENS = Counter("fastserve_generation_tokens", "Generated tokens.", LABELS)
OCCUPANCY = Histogram("fastserve_generation_batch_occupancy", "Sequences in a step over max_batch_size.", LABELS,
                      buckets=(0.125, 0.25, 0.5, 0.75, 0.9, 1.0))
STEP_SECONDS = Histogram("fastserve_generation_step_seconds", "Time of one engine step.", LABELS,
                         buckets=LATENCY_BUCKETS)
QUEUE_LENGTH = Gauge("fastserve_generation_queue_length", "Sequences not running in the latest step, by level.",
                     [*LABELS, "level"])
PREEMPTIONS = Counter("fastserve_generation_preemptions", "Times a running sequence was left out of a step.", LABELS)
EVICTIONS = Counter("fastserve_generation_evictions", "KV caches moved out of their slot.", [*LABELS, "to"])
DEMOTIONS = Counter("fastserve_generation_demotions", "MLFQ demotions (quantum used up).", LABELS)
SHARED_PREFILL = Counter("fastserve_generation_shared_prefill_tokens",
                         "Prompt tokens a request's later completions copied from its first instead of computing.",
                         LABELS)
PROMOTIONS = Counter("fastserve_generation_promotions", "MLFQ promotions of starving sequences.", LABELS)
TTFT = Histogram("fastserve_generation_time_to_first_token_seconds", "From arrival to the first token.", LABELS,
                 buckets=LATENCY_BUCKETS)
ITL = Histogram("fastserve_generation_inter_token_seconds", "Between consecutive tokens of a sequence.", LABELS,
                buckets=LATENCY_BUCKETS)


class EngineMetrics:
    """One engine's labelled series, looked up once rather than at every token."""

    def __init__(self, model: str, policy: str, levels: int) -> None:
        labels = self.labels = (model, policy)
        self.levels = levels
        self.tokens, self.occupancy = TOKENS.labels(*labels), OCCUPANCY.labels(*labels)
        self.step_seconds, self.preemptions = STEP_SECONDS.labels(*labels), PREEMPTIONS.labels(*labels)
        self.demotions, self.promotions = DEMOTIONS.labels(*labels), PROMOTIONS.labels(*labels)
        self.ttft, self.itl = TTFT.labels(*labels), ITL.labels(*labels)
        self.shared_prefill = SHARED_PREFILL.labels(*labels)
        self.evictions = {to: EVICTIONS.labels(*labels, to) for to in ("host", "recompute")}
        self.queue_length = [QUEUE_LENGTH.labels(*labels, str(level)) for level in range(levels)]

    def remove(self) -> None:
        """Drop this engine's series from the registry (its model is unloaded), so that metrics do not grow
        with every model ever served. The caller makes sure no other engine shares the labels."""
        for metric in (TOKENS, OCCUPANCY, STEP_SECONDS, PREEMPTIONS, DEMOTIONS, PROMOTIONS, TTFT, ITL,
                       SHARED_PREFILL):
            _remove(metric, *self.labels)
        for to in ("host", "recompute"):
            _remove(EVICTIONS, *self.labels, to)
        for level in range(self.levels):
            _remove(QUEUE_LENGTH, *self.labels, str(level))


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # never observed
        pass
