"""Per-token log-probabilities as plain data (no torch): what the model runner measures for a sequence that
asks (SamplingParams.logprobs), kept on the sequence beside its tokens, and the same with each token's
text for replies.

A logprob is the log-softmax of the model's raw logits at that step, before temperature, penalties and
top-k/top-p filtering (vLLM's default, "raw"): the model's own distribution, whatever the sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_TOP_LOGPROBS = 20  # OpenAI's bound; each alternative costs a decode per token


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A sampled token's logprob and the `top_logprobs` most likely (token id, logprob) at its step, most
    likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Candidate:
    token_id: int
    text: str  # the token decoded alone
    logprob: float


@dataclass(frozen=True, slots=True)
class Logprob:
    """A returned token with its text, its logprob and its step's most likely alternatives."""

    token_id: int
    text: str
    logprob: float
    top: tuple[Candidate, ...] = ()
