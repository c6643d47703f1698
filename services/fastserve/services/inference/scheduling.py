"""Which sequences run at each decode step: first come first served, or FastServe's skip-join
multi-level feedback queue.

A policy only orders sequences; the scheduler (scheduler.py) takes the first ones that fit
(batch size, prefill budget, KV slots), so a sequence that falls behind is preempted at token
granularity.

MLFQ: level i has a quantum of `base_quantum * 2**i` generated tokens. A new sequence skips the
levels whose quantum is shorter than its prompt's cost (skip-join: a long prompt would use up a short
quantum in its prefill alone), and a sequence that uses up its quantum drops one level. Short jobs thus
finish ahead of long ones, which is what lowers the mean completion time against FCFS.

The price is the tail: a long job at a low level loses every step a shorter one wants, so with a steady
stream of short jobs its completion time grows far beyond FCFS's (where nothing overtakes it), and the
longest jobs are the p99. Sending a starved job back to the top level (the paper's promotion) does not
help it: its first quantum there demotes it again within a few tokens. So a sequence that has been left
out of steps for `starvation_ms` in all since it arrived is *overdue*, and stays so until it ends:
overdue sequences run first, oldest first (FCFS among them), in places kept for them. Those places
are bounded, at most half of the batch (and at least `oldest_places`, which the oldest sequences get
whether overdue or not), so short jobs always keep the other half and MLFQ's gain on the mean
survives a backlog of starved jobs; a job overdue past those places waits for the older overdue ones,
as it would under FCFS.
bench/jct.py measures both against FCFS.
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
    waited: float  # seconds spent waiting (not in a step) since it arrived


@dataclass(frozen=True)
class MlfqSettings:
    levels: int = 6
    base_quantum: int = 8  # generated tokens at the top level
    prompt_tokens_per_step: int = 32  # prompt tokens that cost about one decode step, for skip-join
    starvation_ms: int = 5000  # time left out of steps after which a sequence is overdue
    oldest_places: int = 1  # places of each step kept for the oldest sequences, overdue or not

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
        self.overdue: set[int] = set()  # orders of the overdue sequences still active

    def enter(self, seq: Schedulable) -> None:
        cost = math.ceil(seq.prompt_tokens / self.settings.prompt_tokens_per_step)
        top = self.settings.levels - 1
        seq.level = next((i for i in range(top) if self.settings.quantum(i) >= cost), top)
        seq.quantum_used = 0

    def key(self, seq: Schedulable) -> tuple:
        return (seq.level, -seq.priority, seq.order)

    def reserved(self, batch_size: int) -> int:
        """How many places of a step the oldest and overdue sequences may take: never the whole step,
        never more than half of it unless `oldest_places` says more."""
        return min(batch_size - 1, max(self.settings.oldest_places, batch_size // 2))

    def order(self, seqs: list, batch_size: int) -> list:
        """The sequences from the first to run to the last: the oldest few and the overdue ones, in arrival
        order, up to the reserved places; then the rest by level."""
        ranked = sorted(seqs, key=self.key)
        places = self.reserved(batch_size)
        if places <= 0 or len(ranked) <= batch_size:
            return ranked
        by_age = sorted(seqs, key=lambda seq: seq.order)
        first = [seq for i, seq in enumerate(by_age)
                 if i < self.settings.oldest_places or seq.order in self.overdue][:places]
        kept = {id(seq) for seq in first}
        return first + [seq for seq in ranked if id(seq) not in kept]

    def account(self, seq: Schedulable, tokens: int) -> bool:
        """Charge generated tokens to the sequence's quantum; True when that demoted it."""
        seq.quantum_used += tokens
        if seq.quantum_used < self.settings.quantum(seq.level) or seq.level == self.settings.levels - 1:
            return False
        seq.level += 1
        seq.quantum_used = 0
        return True

    def promote(self, seqs: list) -> int:
        """Mark the sequences whose time left out of steps passed the starvation bound as overdue (and forget
        those that ended); how many became overdue now."""
        bound = self.settings.starvation_ms / 1e3
        active = {seq.order for seq in seqs}
        self.overdue &= active
        new = {seq.order for seq in seqs if seq.waited > bound} - self.overdue
        self.overdue |= new
        return len(new)


def make_policy(name: str, mlfq: MlfqSettings) -> Fcfs | Mlfq:
    return Mlfq(mlfq) if name == "mlfq" else Fcfs()
