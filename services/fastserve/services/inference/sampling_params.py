"""What a request asks of sampling, as plain data: kept apart from sampling.py (which needs torch) so
that the scheduler and the output processor, which read the limits and stop conditions, import no torch.

`validate` is the one check of a request's values, called where each protocol builds its parameters
(the gRPC servicer and KServe), before anything reaches the engine: a non-finite or absurd value would
otherwise surface deep inside a batched step. The bounds are documented on the proto's SamplingParams.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastserve.runtime.errors import InvalidArgument
from fastserve.services.inference.logprobs import MAX_TOP_LOGPROBS
from fastserve.services.inference.structured_output import ResponseFormat

DEFAULT_MAX_NEW_TOKENS = 64
MAX_NEW_TOKENS = 8192  # above any window the engine serves (2048); the window check is the generator's
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0  # below: logits / t overflows; above: uniform noise
MAX_TOP_K = 1 << 20  # above any vocabulary; a top_k above the model's vocabulary filters nothing
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 100.0
MAX_PENALTY = 2.0  # presence and frequency penalties, in [-2, 2] as in OpenAI's API
MAX_SEED = 2**63 - 1
MAX_STOP_SEQUENCES, MAX_STOP_LENGTH = 16, 256  # each stop costs a tail decode per token
MAX_STOP_TOKEN_IDS = 64
MAX_N = 16  # completions of one request: each takes a place in the batch
_FLOAT32 = 1 - 2**-20  # the proto's floats are float32: 0.01 arrives as 0.00999999977


def _within(value: float, low: float, high: float) -> bool:
    return math.isfinite(value) and low * _FLOAT32 <= value <= high / _FLOAT32


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None
    stop_sequences: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0  # OpenAI's: on the tokens this sequence generated, not the prompt's
    frequency_penalty: float = 0.0
    logprobs: bool = False  # each generated token's logprob (logprobs.py)
    top_logprobs: int = 0  # with logprobs: this many most likely alternatives per token
    n: int = 1  # completions of the prompt, sharing its prefill (the engine gives each its own sequence)
    response_format: ResponseFormat = ResponseFormat()
    # The response format compiled for the model's vocabulary (structured_output.Grammar), set by the generator
    # before the request reaches the engine; the runner masks logits with it. Opaque here: no torch, no compiling.
    grammar: Any = None

    @property
    def greedy(self) -> bool:
        """The argmax of the (penalised) logits: no temperature."""
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, fields: Mapping[str, str] | None = None) -> SamplingParams:
        """Self, or InvalidArgument naming the request field at fault: `fields` maps an attribute to the
        protocol's name for it (default `sampling.<attribute>`)."""
        def bad(attribute: str, message: str) -> InvalidArgument:
            return InvalidArgument(message, field=(fields or {}).get(attribute, f"sampling.{attribute}"))

        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise bad("max_new_tokens", f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {self.max_new_tokens}")
        t = self.temperature
        if not (t == 0.0 or _within(t, MIN_TEMPERATURE, MAX_TEMPERATURE)):
            raise bad("temperature", f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                                     f"{MAX_TEMPERATURE:g}], got {t}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", f"top_k must be in [0, {MAX_TOP_K}], got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        r = self.repetition_penalty
        if not _within(r, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY):
            raise bad("repetition_penalty", f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, "
                                            f"{MAX_REPETITION_PENALTY:g}], got {r}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise bad("seed", f"seed must be in [0, 2^63 - 1], got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise bad(name, f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs", "top_logprobs needs logprobs")
        if not 1 <= self.n <= MAX_N:
            raise bad("n", f"n must be in [1, {MAX_N}], got {self.n}")
        self._validate_stops(bad)
        self.response_format.validate(field=(fields or {}).get("response_format", "sampling.response_format"))
        return self

    def _validate_stops(self, bad) -> None:
        if len(self.stop_sequences) > MAX_STOP_SEQUENCES:
            raise bad("stop_sequences", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(self.stop_sequences)}")
        for stop in self.stop_sequences:
            if not isinstance(stop, str) or not 1 <= len(stop) <= MAX_STOP_LENGTH:
                raise bad("stop_sequences", f"each stop sequence must be a string of 1 to {MAX_STOP_LENGTH} "
                                            "characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop token ids")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "stop token ids must be >= 0")
