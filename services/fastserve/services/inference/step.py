"""The plain data between the scheduler and the model runner (no torch, no Sequence objects).

`SchedulerOutput` says everything the runner must do in one step: which KV slots to copy to host
memory, back, or fill with encoder states, and which tokens of which sequences to run at which
positions in which slots. The runner answers with a `RunnerOutput`: the tokens it sampled. So a
runner can be replaced (say by a CUDA-graph, device-resident one) without touching scheduling, and
the scheduler can be driven in tests by made-up runner outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastserve.services.inference.logprobs import TokenLogprob
from fastserve.services.inference.sampling_params import SamplingParams


@dataclass(slots=True)
class ScheduledSequence:
    seq_id: int
    slot: int
    start: int  # tokens already in the slot: the position of the first token here
    token_ids: list[int]  # a prefill chunk (a whole or part prompt, or tokens to recompute), or one to decode
    sample: bool  # these end its pending tokens: sample its next token


@dataclass(slots=True)
class NewSequence:
    """A sequence scheduled for the first time: what the runner keeps for it until it finishes."""

    seq_id: int
    token_ids: list[int]  # the tokens it starts from (a repetition penalty counts them as seen; presence and
    # frequency penalties count only what it generates after them)
    source: list[int] | None  # an encoder-decoder's input, encoded by an `Encode`
    params: SamplingParams


@dataclass(slots=True)
class Offload:
    """Copy the slot's first `length` positions (and its encoder states) to host memory, kept for `seq_id`."""

    seq_id: int
    slot: int
    length: int


@dataclass(slots=True)
class Restore:
    """Copy `seq_id`'s host copy into the slot, and drop it from host memory."""

    seq_id: int
    slot: int


@dataclass(slots=True)
class Copy:
    """Copy the first `length` positions of `src_slot` (and its encoder states) into `dst_slot`: a sequence
    that shares its prompt with another (one of a request's n completions) starts from its cache."""

    src_slot: int
    dst_slot: int
    length: int


@dataclass(slots=True)
class Encode:
    """Run the encoder on `seq_id`'s source and store its cross-attention states in the slot."""

    seq_id: int
    slot: int


@dataclass(slots=True)
class SchedulerOutput:
    sequences: list[ScheduledSequence] = field(default_factory=list)  # in policy order
    new_sequences: list[NewSequence] = field(default_factory=list)
    # Done in this order, before the forward pass: a slot offloaded may be refilled in the same step, and a
    # copy reads its source before a restore or an encode may overwrite it.
    offloads: list[Offload] = field(default_factory=list)
    copies: list[Copy] = field(default_factory=list)
    restores: list[Restore] = field(default_factory=list)
    encodes: list[Encode] = field(default_factory=list)
    finished_ids: list[int] = field(default_factory=list)  # ended since the last step: forget them

    @property
    def empty(self) -> bool:
        return not (self.sequences or self.offloads or self.finished_ids)


@dataclass(slots=True)
class RunnerOutput:
    """Per sequence that sampled, in step order, its new tokens (one per step today; a list, so that more
    can come without changing the scheduler's side)."""

    seq_ids: list[int] = field(default_factory=list)
    sampled_token_ids: list[list[int]] = field(default_factory=list)
    # For the sequences that sampled and asked for logprobs (SamplingParams.logprobs) alone: one per
    # sampled token, in the same order.
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    # Sequences whose own computation failed this step (their sampling, their encoder pass, their forward
    # pass run alone), each with what failed in words safe to show its caller; the others carry on.
    failed: dict[int, str] = field(default_factory=dict)
