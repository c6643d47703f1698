"""One generation request inside the engine, as plain Python (no torch): its tokens, where its KV cache
is, its place in the scheduling policy, its timings, and the stream its tokens go out on.

The scheduler owns every field but `cancelled` (set from a request thread) and the timings and stream
(the output processor's). The model runner never sees a Sequence: it gets a step's plain description
(step.py), so sequence state cannot leak into device code and scheduling runs without a model.
"""

from __future__ import annotations

import enum
import queue
import threading
import time
from dataclasses import dataclass, field

from fastserve.services.inference.logprobs import TokenLogprob
from fastserve.services.inference.sampling_params import SamplingParams


class Finish(enum.StrEnum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"  # computing this sequence failed; `Sequence.error` says how (its caller gets an error)


@dataclass(eq=False)
class Sequence:
    prompt: list[int]  # what the decoder starts from: the prompt, or an encoder-decoder's start token
    params: SamplingParams
    priority: int
    deadline: float | None
    source: list[int] | None = None  # an encoder-decoder's input
    encoded: bool = False  # its encoder states are in its slot
    order: int = 0  # arrival order, given by the scheduler; also the sequence's id in steps
    arrival: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)  # prompt + generated: what the cache must hold
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with params.logprobs: one per generated token
    cached: int = 0  # leading tokens whose keys/values are in the slot (or its host copy)
    slot: int | None = None
    on_host: bool = False  # evicted with its cache copied to host memory (the runner holds the copy)
    level: int = 0
    quantum_used: int = 0
    waited: float = 0.0  # seconds left out of steps since it arrived (MLFQ: overdue past a bound)
    started: float | None = None  # first scheduled: from here on the runner knows it
    first_token: float | None = None
    last_token: float = 0.0
    running: bool = False  # ran in the latest step
    finished: float | None = None
    finish: Finish | None = None
    error: str = ""  # with Finish.ERROR: what failed, safe to show the caller
    preemptions: int = 0
    cancelled: bool = False
    # (index, ended) each step it gains tokens or ends: a group's sequences share their leader's queue, so that
    # one reader follows all n completions of a request.
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    done: threading.Event = field(default_factory=threading.Event)
    # One of the n completions of a request (SamplingParams.n): `index` its place, `leader` the first, whose
    # cached prompt the others copy rather than prefill it again (the scheduler's fork).
    index: int = 0
    leader: Sequence | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)

    @property
    def prompt_tokens(self) -> int:
        return len(self.source if self.source is not None else self.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(slots=True)
class SequenceUpdate:
    """What one step did to a sequence, from the scheduler to the output processor."""

    seq: Sequence
    token_ids: list[int]  # tokens it gained (not an EOS or stop token id, which end it unreturned)
    finish: Finish | None = None
    sampled: bool = True  # False: ended without running (cancelled, expired), so no token timing
