"""Choosing the next token from logits: greedy, or sampled with temperature, top-k, top-p and a
repetition penalty (the transformers definitions), reproducibly per request when it gives a seed.

The model runner keeps one `Sampler` per running sequence; the parameters themselves are plain data
in sampling_params.py, which the scheduler reads without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastserve.services.inference.sampling_params import SamplingParams


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
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose_tokens(logits: torch.Tensor, samplers: list[Sampler], seen: list[list[int]]) -> list[int]:
    """Next tokens for a batch of rows [n, vocab]: one argmax for the greedy rows, per row otherwise."""
    greedy = logits.argmax(-1).tolist()
    return [greedy[i] if s.params.greedy else s.choose(logits[i].cpu(), seen[i]) for i, s in enumerate(samplers)]
