"""Which sequences run at each decode step: first come first served, or FastServe's skip-join
multi-level feedback queue.

A policy only orders sequences; the scheduler (scheduler.py) takes the first ones that fit
(batch size, prefill budget, KV slots), so a sequence that falls behind is preempted at token
granularity.

MLFQ: level i has a quantum of `base_quantum * 2**i` generated tokens. A new sequence skips the
levels whose quantum is shorter than its prompt's cost (a long prompt would use up a short quantum
in its prefill alone), a sequence that uses up its quantum drops one level, and one that has waited
`starvation_ms` in all (left out of steps) since it entered its level goes back to the top level, so
long jobs are delayed by short ones but never starved.

Promotion alone still lets a long job lose most steps to a stream of short ones, so its completion
time can far exceed what it would be under FCFS. MLFQ therefore keeps `oldest_places` places of every
step (at most all but one) for the oldest sequences, whatever their level: once a sequence is the
oldest in the engine it runs every step to its end, which keeps the tail of completion times near
FCFS's while the other places still go to the short jobs first (bench/generation.py measures both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

POLICIES = ("fcfs", "mlfq")


class Schedulable(Protocol):
    order: int  # arrival order
    priority: int  # the request's priority; higher runs first within a level
    prompt_tokens: int
    level: int
    quantum_used: int
    waited: float  # seconds spent waiting (not in a step) since it entered its level


@dataclass(frozen=True)
class MlfqSettings:
    levels: int = 6
    base_quantum: int = 8  # generated tokens at the top level
    prompt_tokens_per_step: int = 32  # prompt tokens that cost about one decode step, for skip-join
    starvation_ms: int = 5000
    oldest_places: int = 1  # places of each step kept for the oldest sequences

    def quantum(self, level: int) -> int:
        return self.base_quantum * 2 ** level


class Fcfs:
    name = "fcfs"

    def enter(self, seq: Schedulable) -> None:
        seq.level = 0

    def key(self, seq: Schedulable) -> tuple:
        return (-seq.priority, seq.order)

    def order(self, seqs: list, batch_size: int) -> list:
        """The sequences from the first to run to the last."""
        return sorted(seqs, key=self.key)

    def account(self, seq: Schedulable, tokens: int) -> bool:
        return False

    def promote(self, seqs: list) -> int:
        return 0


class Mlfq:
    name = "mlfq"

    def __init__(self, settings: MlfqSettings) -> None:
        self.settings = settings

    def enter(self, seq: Schedulable) -> None:
        cost = math.ceil(seq.prompt_tokens / self.settings.prompt_tokens_per_step)
        top = self.settings.levels - 1
        seq.level = next((i for i in range(top) if self.settings.quantum(i) >= cost), top)
        seq.quantum_used = 0

    def key(self, seq: Schedulable) -> tuple:
        return (seq.level, -seq.priority, seq.order)

    def order(self, seqs: list, batch_size: int) -> list:
        """The sequences from the first to run to the last: the oldest few, then by level."""
        ranked = sorted(seqs, key=self.key)
        places = min(self.settings.oldest_places, batch_size - 1)
        if places <= 0 or len(ranked) <= batch_size:
            return ranked
        oldest = sorted(seqs, key=lambda seq: seq.order)[:places]
        kept = {id(seq) for seq in oldest}
        return oldest + [seq for seq in ranked if id(seq) not in kept]

    def account(self, seq: Schedulable, tokens: int) -> bool:
        """Charge generated tokens to the sequence's quantum; True when that demoted it."""
        seq.quantum_used += tokens
        if seq.quantum_used < self.settings.quantum(seq.level) or seq.level == self.settings.levels - 1:
            return False
        seq.level += 1
        seq.quantum_used, seq.waited = 0, 0.0
        return True

    def promote(self, seqs: list) -> int:
        """Move sequences that have waited past the starvation bound to the top level."""
        bound = self.settings.starvation_ms / 1e3
        promoted = 0
        for seq in seqs:
            if seq.level > 0 and seq.waited > bound:
                seq.level, seq.quantum_used, seq.waited = 0, 0, 0.0
                promoted += 1
        return promoted


def make_policy(name: str, mlfq: MlfqSettings) -> Fcfs | Mlfq:
    return Mlfq(mlfq) if name == "mlfq" else Fcfs()
