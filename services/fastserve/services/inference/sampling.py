"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p, after a
repetition penalty (the transformers definition, over the prompt and the generated tokens) and presence
and frequency penalties (OpenAI's, over the generated tokens only), reproducibly per request when it
gives a seed; and the logprobs of the chosen tokens for the rows that ask (logprobs.py).

The model runner keeps one `Sampler` per running sequence; the parameters themselves are plain data
in sampling_params.py, which the scheduler reads without importing torch. The penalties are applied to
the batch's penalised rows at once, from token counts built by a scatter, not per token.

A row that cannot be sampled (NaN logits, or probabilities that are not finite after its penalty and
temperature) is a `SamplingError` for that row alone: `choose_tokens` returns it in the row's place so
the runner fails that sequence and keeps the batch's others."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fastserve.services.inference.logprobs import TokenLogprob
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

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's penalised logits [vocab] (float32, on the CPU)."""
        p = self.params
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


def _counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] float32: how often each token id occurs in each row's list (ids outside the vocabulary,
    sent to a spare column, are not counted)."""
    width = max(map(len, token_lists), default=0)
    padded = torch.tensor([t + [vocab] * (width - len(t)) for t in token_lists], dtype=torch.long)
    padded = padded.clamp_(0, vocab).to(device)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab]


def penalise(logits: torch.Tensor, samplers: list[Sampler], seen: list[list[int]],
             prompt_lengths: list[int]) -> torch.Tensor:
    """`logits` [n, vocab] with each row's penalties: the repetition penalty on every token in `seen` (its
    prompt and generated tokens), then `presence * (count > 0) + frequency * count` subtracted, counting
    the tokens after its first `prompt_lengths` ones. `logits` itself when no row is penalised, else a copy."""
    rows = [i for i, s in enumerate(samplers) if s.params.penalised]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    params = [samplers[i].params for i in rows]
    column = lambda values: torch.tensor(values, dtype=logits.dtype, device=device).unsqueeze(1)  # noqa: E731
    index = torch.tensor(rows, device=device)
    part = logits[index]
    if any(p.repetition_penalty != 1.0 for p in params):
        r = column([p.repetition_penalty for p in params])  # 1 in the rows without one: x * 1 == x / 1 == x
        present = _counts([seen[i] for i in rows], vocab, device) > 0
        part = torch.where(present, torch.where(part < 0, part * r, part / r), part)
    if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
        counts = _counts([seen[i][prompt_lengths[i]:] for i in rows], vocab, device)
        part = (part - column([p.frequency_penalty for p in params]) * counts
                - column([p.presence_penalty for p in params]) * (counts > 0))
    return logits.index_copy(0, index, part)


def choose_tokens(logits: torch.Tensor, samplers: list[Sampler], seen: list[list[int]],
                  prompt_lengths: list[int]) -> list[int | SamplingError]:
    """Next tokens for a batch of rows [n, vocab], `seen[i]` the tokens row i has (its first `prompt_lengths[i]`
    its prompt): the penalties on the penalised rows, one argmax for the greedy rows, a draw per row
    otherwise; a row that fails is its SamplingError. `logits` is left as it is."""
    nan_rows = torch.isnan(logits).any(-1).tolist()
    penalised = penalise(logits, samplers, seen, prompt_lengths)
    penalised_nan = nan_rows if penalised is logits else torch.isnan(penalised).any(-1).tolist()
    logits = penalised
    greedy = logits.argmax(-1).tolist()
    tokens: list[int | SamplingError] = []
    for i, s in enumerate(samplers):
        if nan_rows[i]:
            tokens.append(SamplingError("the model produced NaN logits for this sequence"))
            continue
        if penalised_nan[i]:
            tokens.append(SamplingError("the sampling penalties made the logits NaN"))
            continue
        try:
            tokens.append(greedy[i] if s.params.greedy else s.choose(logits[i].cpu()))
        except SamplingError as exc:
            tokens.append(exc)
        except RuntimeError as exc:  # a torch kernel refused this row's values
            log.warning("sampling one row failed", exc_info=True)
            tokens.append(SamplingError(f"sampling failed ({type(exc).__name__})"))
    return tokens


def constrain(logits: torch.Tensor, rows: list[int], constraints: list) -> tuple[torch.Tensor, set[int]]:
    """`logits` [n, vocab] with every token each of `rows` may not produce next set to -inf, as its response
    format's state (structured_output.Constraint) allows, and the rows it allows nothing: a copy, `logits`
    itself left for the raw logprobs. Each state writes its bitmask (a bit a token, 32 a word) into one row."""
    vocab = logits.shape[-1]
    bitmask = torch.empty(len(rows), (vocab + 31) // 32, dtype=torch.int32)
    for j, constraint in enumerate(constraints):
        constraint.write_mask(bitmask[j])
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.view(len(rows), -1)[:, :vocab].bool().to(logits.device)
    index = torch.tensor(rows, device=logits.device)
    part = logits[index].masked_fill(~allowed, float("-inf"))
    blocked = {rows[j] for j, none in enumerate((~allowed.any(-1)).tolist()) if none}
    return logits.index_copy(0, index, part), blocked


def token_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int], tops: list[int]) -> list[TokenLogprob]:
    """For each of `rows` of the raw `logits` [n, vocab]: the logprob of its chosen token and its `tops[j]`
    most likely tokens; one log-softmax and one top-k over those rows alone."""
    device = logits.device
    logprobs = torch.log_softmax(logits[torch.tensor(rows, device=device)], -1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=device).unsqueeze(1)).squeeze(1).tolist()
    k = min(max(tops), logprobs.shape[-1])
    values, ids = torch.topk(logprobs, k, -1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(token, value, tuple(zip(ids[j][:tops[j]], values[j][:tops[j]], strict=True)))
            for j, (token, value) in enumerate(zip(tokens, chosen, strict=True))]
