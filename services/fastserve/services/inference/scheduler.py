"""The generation scheduler: which sequences run in the next step, how many tokens each, in which KV slot.

Each step it ends cancelled and expired sequences, asks the policy (scheduling.py) for an order, and
takes the first sequences that fit: at most `max_batch_size` sequences, at most `max_prefill_tokens`
prompt tokens (long prompts are prefilled in chunks across steps, between decode steps of the others),
and only sequences that hold a KV slot or can get one. Sequences that do not run keep their slot while
they are not in the way; a higher-ranked sequence that needs a slot evicts the lowest-ranked idle one,
whose cache goes to host memory while the host pool has room, or is dropped and recomputed later.
After the step it takes the sampled tokens, ends sequences on EOS, stop token ids and length, and
charges the tokens to the policy (MLFQ demotion).

Its answer is plain data (step.py) for whichever model runner executes it. Nothing here imports
torch, so the scheduling decisions are tested without a model (tests/inference/test_scheduler.py),
and the clock is a parameter so that waiting, starvation and deadlines can be tested without sleeping.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from fastserve.services.inference.generation_metrics import EngineMetrics
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.kv_slots import KVSlots
from fastserve.services.inference.scheduling import make_policy
from fastserve.services.inference.sequence import Finish, Sequence, SequenceUpdate
from fastserve.services.inference.step import (
    Copy,
    Encode,
    NewSequence,
    Offload,
    Restore,
    RunnerOutput,
    ScheduledSequence,
    SchedulerOutput,
)


class Scheduler:
    """Called by one thread at a time (the engine's loop, and its steps on the compute thread), except
    `has_room`, which request threads call under the engine's lock."""

    def __init__(self, settings: GenerationSettings, context: int, eos_ids: set[int], metrics: EngineMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.context, self.eos_ids, self.metrics, self.clock = (settings, context, eos_ids, metrics,
                                                                              clock)
        self.policy = make_policy(settings.policy, settings.mlfq)
        self.kv = KVSlots(settings.slots(), settings.host_pool())
        self.capacity = self.kv.slots + settings.max_queue_size
        self.active: list[Sequence] = []
        self.by_id: dict[int, Sequence] = {}
        self.counter = itertools.count()
        self.finished_ids: list[int] = []  # for the runner, with the next step
        self.ended: list[SequenceUpdate] = []  # ended while scheduling; reported with the step's update
        self.preemptions = 0
        self.last_step = clock()

    # --- admission ----------------------------------------------------------------------------------------------

    def has_room(self, waiting: int) -> bool:
        """Whether one more sequence may queue, with `waiting` submitted but not yet added. Memory stays
        bounded under any load because a request beyond this is refused rather than queued."""
        return len(self.active) + waiting < self.capacity

    def add(self, seq: Sequence) -> None:
        seq.order = next(self.counter)
        self.policy.enter(seq)
        self.active.append(seq)
        self.by_id[seq.order] = seq

    def has_work(self) -> bool:
        return bool(self.active or self.finished_ids or self.ended)

    # --- one step ------------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        for seq in list(self.active):
            if seq.cancelled or (seq.deadline is not None and now > seq.deadline):
                self.ended.append(SequenceUpdate(seq, [], Finish.CANCELLED, sampled=False))
                self._finish(seq, Finish.CANCELLED)
        step = SchedulerOutput(finished_ids=self.finished_ids)
        self.finished_ids = []
        if not self.active:
            return step
        self.metrics.promotions.inc(self.policy.promote(self.active))
        ordered = self.policy.order(self.active, self.settings.max_batch_size)
        batch = self._select(ordered, step)
        chosen = {id(seq) for seq, _ in batch}
        for seq in self.active:  # time since the previous step, charged to those that sit this one out
            if id(seq) not in chosen:
                seq.waited += now - max(self.last_step, seq.arrival)
        self.last_step = now
        self._observe_queues(ordered, chosen)
        started = self.clock()
        for seq, chunk in batch:
            if seq.started is None:
                seq.started = started
                step.new_sequences.append(NewSequence(seq.order, list(seq.tokens), seq.source, seq.params))
            end = seq.cached + chunk
            step.sequences.append(ScheduledSequence(seq.order, seq.slot, seq.cached, seq.tokens[seq.cached:end],
                                                    end == len(seq.tokens)))
            seq.cached = end  # as the runner will have it: a sequence it fails ends
        return step

    def update_from_output(self, out: RunnerOutput) -> list[SequenceUpdate]:
        """Take the step's sampled tokens; what changed, for the output processor (with the sequences that
        ended while scheduling)."""
        updates, self.ended = self.ended, []
        for seq_id, error in out.failed.items():  # its own computation failed: it alone ends
            seq = self.by_id[seq_id]
            seq.error = error
            self._finish(seq, Finish.ERROR)
            updates.append(SequenceUpdate(seq, [], Finish.ERROR, sampled=False))
        for seq_id, sampled in zip(out.seq_ids, out.sampled_token_ids, strict=True):
            seq = self.by_id[seq_id]
            kept, finish = self._check_tokens(seq, sampled)
            if seq_id in out.logprobs:  # an EOS or stop token id, not returned, takes its logprob with it
                seq.logprobs.extend(out.logprobs[seq_id][:len(kept)])  # first: a stream reading a token finds it
            seq.tokens.extend(kept)
            if kept and self.policy.account(seq, len(kept)):
                self.metrics.demotions.inc()
            if finish is None and (len(seq.tokens) - len(seq.prompt) >= seq.params.max_new_tokens
                                   or len(seq.tokens) >= self.context):
                finish = Finish.LENGTH
            if finish is not None:
                self._finish(seq, finish)
            updates.append(SequenceUpdate(seq, kept, finish))
        return updates

    def stop(self, update: SequenceUpdate) -> None:
        """The output processor found a stop sequence in the text (only it detokenizes): the sequence
        ends with STOP, also when the same token reached its length limit."""
        if update.finish is None:
            self._finish(update.seq, Finish.STOP)
        update.finish = update.seq.finish = Finish.STOP

    def fail(self, update: SequenceUpdate, error: str) -> None:
        """Processing the sequence's output failed (the output processor's detokenizing): it ends with
        ERROR, also when the same step had ended it otherwise."""
        if update.finish is None:
            self._finish(update.seq, Finish.ERROR)
        update.seq.error = error
        update.finish = update.seq.finish = Finish.ERROR

    def abort(self, error: str) -> list[SequenceUpdate]:
        """End every sequence with ERROR: the step failed outside any one sequence's computation, so the
        state of every cache is unknown (the last resort; see the engine)."""
        updates, self.ended = self.ended, []
        for seq in list(self.active):
            seq.error = error
            self._finish(seq, Finish.ERROR)
            updates.append(SequenceUpdate(seq, [], Finish.ERROR, sampled=False))
        return updates

    # --- inside a step -------------------------------------------------------------------------------------------

    def _check_tokens(self, seq: Sequence, sampled: list[int]) -> tuple[list[int], Finish | None]:
        """The tokens that stay, up to an EOS or stop token id, which ends the sequence unreturned."""
        for i, token in enumerate(sampled):
            if token in self.eos_ids:
                return sampled[:i], Finish.EOS
            if token in seq.params.stop_token_ids:
                return sampled[:i], Finish.STOP
        return sampled, None

    def _select(self, ordered: list[Sequence], step: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to process) for this step, in policy order."""
        batch: list[tuple[Sequence, int]] = []
        budget = self.settings.max_prefill_tokens
        chosen: set[int] = set()
        for seq in ordered:
            if len(batch) >= self.settings.max_batch_size:
                break
            pending = len(seq.tokens) - seq.cached
            chunk = 1 if pending == 1 else min(pending, budget)
            if chunk == 0 or self._awaits_leader(seq):
                continue
            if seq.slot is None and not self._place(seq, ordered, chosen, step):
                continue  # no slot it may take; a lower-ranked sequence that holds one can still run
            if seq.cached and len(seq.tokens) - seq.cached == 1:  # it forked: one prompt token is left to run
                pending = chunk = 1
            if pending > 1:
                budget -= chunk
            batch.append((seq, chunk))
            chosen.add(id(seq))
        for seq in ordered:
            if seq.running and id(seq) not in chosen:  # ran last step, not this one: preempted
                seq.preemptions += 1
                self.preemptions += 1
                self.metrics.preemptions.inc()
            seq.running = id(seq) in chosen
        return batch

    def _place(self, seq: Sequence, ordered: list[Sequence], chosen: set[int], step: SchedulerOutput) -> bool:
        """Give `seq` a KV slot, evicting the lowest-ranked idle resident sequence if none is free."""
        slot = self.kv.allocate()
        if slot is None:
            victim = next((s for s in reversed(ordered) if s.slot is not None and id(s) not in chosen
                           and s is not seq), None)
            if victim is None or ordered.index(victim) < ordered.index(seq):
                return False
            self._evict(victim, step)
            slot = self.kv.allocate()
        seq.slot = slot
        if seq.on_host:
            step.restores.append(Restore(seq.order, slot))
            seq.on_host = False
            self.kv.release_host_place()
        elif self._fork(seq, slot, step):
            pass
        elif seq.source is not None and not seq.encoded:
            step.encodes.append(Encode(seq.order, slot))
            seq.encoded = True
        return True

    # --- n completions of one prompt -----------------------------------------------------------------------------

    @staticmethod
    def _shared(seq: Sequence) -> int:
        """Positions of `seq`'s prompt another sequence's cache can give it: all but the last prompt token,
        which runs to produce its first logits (an encoder-decoder shares its encoder states, and no position)."""
        return len(seq.prompt) - 1

    def _awaits_leader(self, seq: Sequence) -> bool:
        """A later completion of a request waits while its leader has not finished prefilling the prompt (it
        has sampled no token yet), so that it copies the leader's cache instead of computing the same prompt."""
        leader = seq.leader
        if leader is None or seq.slot is not None or seq.cached or seq.on_host or leader.finish is not None:
            return False
        if not (self._shared(seq) or seq.source is not None):
            return False  # a one-token prompt: nothing to share
        return len(leader.tokens) == len(leader.prompt)

    def _fork(self, seq: Sequence, slot: int, step: SchedulerOutput) -> bool:
        """Start `seq` (just given `slot`) from its leader's cached prompt, when the leader's slot holds it now:
        the copy runs before this step's restores and encodes, so a slot they refill is no source."""
        leader, shared = seq.leader, self._shared(seq)
        if leader is None or seq.cached or leader.slot is None or leader.finish is not None:
            return False
        if any(op.slot == leader.slot for op in (*step.restores, *step.encodes)):
            return False
        if seq.source is not None:
            if not leader.encoded:
                return False
            seq.encoded = True
        elif shared == 0 or leader.cached < shared:
            return False
        step.copies.append(Copy(leader.slot, slot, shared))
        seq.cached = shared
        self.metrics.shared_prefill.inc(shared)
        return True

    def _evict(self, seq: Sequence, step: SchedulerOutput) -> None:
        if self.kv.take_host_place():
            step.offloads.append(Offload(seq.order, seq.slot, seq.cached))
            seq.on_host = True
            self.metrics.evictions["host"].inc()
        else:  # the host pool is full: drop the cache and prefill again when it runs
            seq.cached, seq.encoded = 0, False
            self.metrics.evictions["recompute"].inc()
        self.kv.release(seq.slot)
        seq.slot = None

    def _finish(self, seq: Sequence, reason: Finish) -> None:
        if seq.slot is not None:
            self.kv.release(seq.slot)
            seq.slot = None
        if seq.on_host:
            self.kv.release_host_place()
            seq.on_host = False
        seq.finish, seq.finished = reason, self.clock()
        self.active.remove(seq)
        del self.by_id[seq.order]
        if seq.started is not None:  # the runner knows it
            self.finished_ids.append(seq.order)

    def _observe_queues(self, ordered: list[Sequence], chosen: set[int]) -> None:
        per_level: dict[int, int] = {}
        for seq in ordered:
            if id(seq) not in chosen:
                per_level[seq.level] = per_level.get(seq.level, 0) + 1
        for level, gauge in enumerate(self.metrics.queue_length):
            gauge.set(per_level.get(level, 0))
