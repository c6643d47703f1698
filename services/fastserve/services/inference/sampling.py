"""Choosing the next token from logits: greedy, or sampled with temperature, top-k, top-p and a
repetition penalty (the transformers definitions), reproducibly per request when it gives a seed.

The model runner keeps one `Sampler` per running sequence; the parameters themselves are plain data
in sampling_params.py, which the scheduler reads without importing torch.

A row that cannot be sampled (NaN logits, or probabilities that are not finite after its penalty and
temperature) is a `SamplingError` for that row alone: `choose_tokens` returns it in the row's place so
the runner fails that sequence and keeps the batch's others."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fastserve.services.inference.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class SamplingError(Exception):
    """One row could not be sampled; the message is safe to show its caller."""


@dataclass
class Sampler:
    """One sequence's sampling state: its parameters and its own random generator."""

    params: SamplingParams
    generator: torch.Generator | None = field(default=None)

    def __post_init__(self) -> None:
        if self.params.temperature > 0:
            self.generator = torch.Generator()
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()

    def choose(self, logits: torch.Tensor, seen: list[int]) -> int:
        """The next token from this sequence's logits [vocab] (float32, on the CPU)."""
        p = self.params
        if p.repetition_penalty != 1.0 and seen:
            index = torch.tensor(sorted(set(seen)), dtype=torch.long)
            picked = logits[index]
            logits = logits.clone()
            logits[index] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if p.temperature == 0.0:
            if bool(torch.isnan(logits).any()):
                raise SamplingError("the repetition penalty made the logits NaN")
            return int(logits.argmax())
        logits = logits / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative - ordered.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            logits = logits.clone()
            logits[order[drop]] = float("-inf")
        probs = logits.softmax(-1)
        if not bool(torch.isfinite(probs).all()):  # multinomial would raise, or pick garbage
            raise SamplingError("sampling produced non-finite probabilities (temperature or penalty out of range)")
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose_tokens(logits: torch.Tensor, samplers: list[Sampler], seen: list[list[int]]) -> list[int | SamplingError]:
    """Next tokens for a batch of rows [n, vocab]: one argmax for the greedy rows, per row otherwise; a
    row that fails is its SamplingError."""
    greedy = logits.argmax(-1).tolist()
    nan_rows = torch.isnan(logits).any(-1).tolist()
    tokens: list[int | SamplingError] = []
    for i, s in enumerate(samplers):
        if nan_rows[i]:
            tokens.append(SamplingError("the model produced NaN logits for this sequence"))
            continue
        try:
            tokens.append(greedy[i] if s.params.greedy else s.choose(logits[i].cpu(), seen[i]))
        except SamplingError as exc:
            tokens.append(exc)
        except RuntimeError as exc:  # a torch kernel refused this row's values
            log.warning("sampling one row failed", exc_info=True)
            tokens.append(SamplingError(f"sampling failed ({type(exc).__name__})"))
    return tokens
