"""The generation scheduler without a model: made-up runner outputs (one token per sampling sequence)
drive it through chunked prefill, preemption, eviction to host memory and to recomputation, MLFQ
demotion, skip-join, overdue sequences and the places kept for them, cancellation, deadlines and the
queue cap; each test asserts what the steps it returns contain. A fake clock stands in for time."""

from __future__ import annotations

import itertools
import subprocess
import sys

from fastserve.services.inference.generation_metrics import EngineMetrics
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.services.inference.scheduler import Scheduler
from fastserve.services.inference.scheduling import Mlfq, MlfqSettings
from fastserve.services.inference.sequence import Finish, Sequence, SequenceUpdate
from fastserve.services.inference.step import Copy, Encode, Offload, Restore, RunnerOutput, SchedulerOutput

TOKEN = 5  # what the fake runner samples
_names = itertools.count()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scheduler(eos: set[int] = frozenset(), context: int = 512, **settings) -> Scheduler:
    s = GenerationSettings(**settings)
    metrics = EngineMetrics(f"scheduler-test-{next(_names)}", s.policy, s.mlfq.levels if s.policy == "mlfq" else 1)
    return Scheduler(s, context, set(eos), metrics, Clock())


def add(sched: Scheduler, prompt: int, n: int = 100, priority: int = 0, deadline: float | None = None,
        source: list[int] | None = None, **params) -> Sequence:
    seq = Sequence([1] if source else list(range(10, 10 + prompt)), SamplingParams(max_new_tokens=n, **params),
                   priority, deadline, source=source, arrival=sched.clock())
    sched.add(seq)
    return seq


def runner_output(step: SchedulerOutput, token: int = TOKEN) -> RunnerOutput:
    """What any runner answers: one token for each sequence whose pending tokens all ran."""
    ids = [s.seq_id for s in step.sequences if s.sample]
    return RunnerOutput(ids, [[token] for _ in ids])


def cycle(sched: Scheduler, token: int = TOKEN) -> tuple[SchedulerOutput, list[SequenceUpdate]]:
    step = sched.schedule()
    return step, sched.update_from_output(runner_output(step, token))


def rows(step: SchedulerOutput) -> list[tuple[int, int, int, int, bool]]:
    """(sequence, slot, start, tokens, samples) of each sequence in the step."""
    return [(s.seq_id, s.slot, s.start, len(s.token_ids), s.sample) for s in step.sequences]


def test_long_prompts_prefill_in_chunks_within_the_budget_between_decode_steps():
    sched = scheduler(max_batch_size=4, max_prefill_tokens=8)
    a = add(sched, 3)
    step, _ = cycle(sched)
    assert rows(step) == [(a.order, 0, 0, 3, True)]
    assert [(n.seq_id, n.token_ids, n.params.max_new_tokens) for n in step.new_sequences] == [(0, [10, 11, 12], 100)]
    b, c = add(sched, 20), add(sched, 5)
    step, _ = cycle(sched)
    # The decode token does not use the budget; b takes all 8 prompt tokens of it, so c waits, slotless.
    assert rows(step) == [(a.order, 0, 3, 1, True), (b.order, 1, 0, 8, False)]
    assert step.sequences[0].token_ids == [TOKEN] and step.sequences[1].token_ids == b.prompt[:8]
    assert [n.seq_id for n in step.new_sequences] == [b.order] and c.slot is None
    assert rows(cycle(sched)[0]) == [(a.order, 0, 4, 1, True), (b.order, 1, 8, 8, False)]
    step, _ = cycle(sched)  # b's last 4, then c's first 4
    assert rows(step) == [(a.order, 0, 5, 1, True), (b.order, 1, 16, 4, True), (c.order, 2, 0, 4, False)]
    assert rows(cycle(sched)[0]) == [(a.order, 0, 6, 1, True), (b.order, 1, 20, 1, True), (c.order, 2, 4, 1, True)]
    assert b.generated == [TOKEN, TOKEN] and c.generated == [TOKEN]


def test_higher_priority_preempts_then_evicts_to_host_then_to_recomputation():
    sched = scheduler(max_batch_size=1, kv_slots=2, host_slots=1)
    a = add(sched, 4)
    assert rows(cycle(sched)[0]) == [(a.order, 0, 0, 4, True)]
    b = add(sched, 3, n=2, priority=1)
    step, _ = cycle(sched)  # a free slot: b takes it, a is preempted but keeps its cache
    assert rows(step) == [(b.order, 1, 0, 3, True)] and not step.offloads
    assert (a.preemptions, a.slot, b.preemptions) == (1, 0, 0)
    c = add(sched, 2, priority=2)
    step, _ = cycle(sched)  # no free slot: a, the lowest ranked, goes to host memory
    assert step.offloads == [Offload(a.order, 0, 4)] and rows(step) == [(c.order, 0, 0, 2, True)]
    assert a.on_host and a.slot is None and sched.kv.on_host == 1
    d = add(sched, 2, priority=3)
    step, _ = cycle(sched)  # the host pool is full: b's cache is dropped, to be recomputed
    assert not step.offloads and rows(step) == [(d.order, 1, 0, 2, True)]
    assert (b.slot, b.cached, b.on_host) == (None, 0, False)
    c.cancel()
    d.cancel()
    step, updates = cycle(sched)  # b prefills its prompt and its token again, in the lowest free slot
    assert step.finished_ids == [c.order, d.order]
    assert rows(step) == [(b.order, 0, 0, 4, True)] and step.sequences[0].token_ids == b.prompt + [TOKEN]
    assert [(u.seq, u.finish, u.sampled) for u in updates] == [(c, Finish.CANCELLED, False),
                                                               (d, Finish.CANCELLED, False), (b, Finish.LENGTH, True)]
    step, _ = cycle(sched)  # b is done: a's cache comes back from host memory, and a decodes on
    assert step.finished_ids == [b.order] and step.restores == [Restore(a.order, 0)]
    assert rows(step) == [(a.order, 0, 4, 1, True)] and sched.kv.on_host == 0
    assert sched.preemptions == 3 and a.generated == [TOKEN, TOKEN]


def test_a_sequence_evicted_to_host_and_cancelled_gives_back_its_host_place():
    sched = scheduler(max_batch_size=1, kv_slots=1, host_slots=1)
    a = add(sched, 4)
    cycle(sched)
    b = add(sched, 2, priority=1)
    assert cycle(sched)[0].offloads == [Offload(a.order, 0, 4)]
    a.cancel()
    step, updates = cycle(sched)
    assert step.finished_ids == [a.order] and updates[0].seq is a and a.finish is Finish.CANCELLED
    assert sched.kv.on_host == 0 and not a.on_host and rows(step) == [(b.order, 0, 2, 1, True)]


def test_encoder_states_are_encoded_when_placed_and_again_after_recomputation():
    sched = scheduler(max_batch_size=1, kv_slots=1, host_slots=0)
    a = add(sched, 0, source=[7, 8, 9])
    step, _ = cycle(sched)
    assert step.encodes == [Encode(a.order, 0)] and rows(step) == [(a.order, 0, 0, 1, True)]
    assert step.new_sequences[0].source == [7, 8, 9] and a.prompt_tokens == 3
    assert not cycle(sched)[0].encodes  # still in its slot
    b = add(sched, 0, n=1, priority=1, source=[4])
    step, _ = cycle(sched)
    assert step.encodes == [Encode(b.order, 0)] and not a.encoded and a.cached == 0
    step, _ = cycle(sched)
    assert step.encodes == [Encode(a.order, 0)] and rows(step) == [(a.order, 0, 0, 3, True)]


def test_mlfq_demotes_a_sequence_that_used_its_quantum_and_a_new_one_overtakes_it():
    sched = scheduler(policy="mlfq", max_batch_size=1, mlfq=MlfqSettings(base_quantum=2))
    a = add(sched, 4)
    levels = [(cycle(sched), a.level)[1] for _ in range(3)]
    assert levels == [0, 1, 1]  # a quantum of 2 tokens at level 0, then 4 at level 1
    b = add(sched, 4)
    step, _ = cycle(sched)
    assert rows(step) == [(b.order, 1, 0, 4, True)] and a.preemptions == 1 and a.slot == 0  # kv_slots 2 for MLFQ
    assert [rows(cycle(sched)[0])[0][0] for _ in range(3)] == [b.order, a.order, a.order]  # b at level 1 too: a first


def test_a_starving_sequence_becomes_overdue_and_runs_to_its_end_ahead_of_newer_short_jobs():
    # Two places: one (half the batch) kept for overdue sequences; oldest_places 0 keeps none for age alone.
    sched = scheduler(policy="mlfq", max_batch_size=2, kv_slots=8,
                      mlfq=MlfqSettings(base_quantum=1, starvation_ms=100, oldest_places=0))
    a = add(sched, 2, n=20)
    cycle(sched)
    assert a.level == 1
    ran = []
    for _ in range(12):  # two short jobs every 30 ms, each done in one step: a waits at level 1
        sched.clock.now += 0.03
        add(sched, 2, n=1), add(sched, 2, n=1)
        ran.append(a.order in [row[0] for row in rows(cycle(sched)[0])])
    # Left out of steps 30, 60, 90, 120 ms after steps 1-4: overdue from step 5 on, it takes the place kept
    # for the overdue every step although its level stays low and newer top-level jobs keep coming.
    assert ran == [False] * 4 + [True] * 8 and a.level > 1 and sched.metrics.promotions._value.get() == 1


def test_with_a_full_batch_the_oldest_sequence_keeps_its_place_whatever_its_level():
    def second_step(oldest_places: int) -> list[int]:
        sched = scheduler(policy="mlfq", max_batch_size=2, mlfq=MlfqSettings(base_quantum=1, starvation_ms=60000,
                                                                           oldest_places=oldest_places))
        a = add(sched, 2)
        for _ in range(3):
            cycle(sched)
        assert a.level == 2
        for _ in range(3):
            add(sched, 2)
        return [row[0] for row in rows(cycle(sched)[0])]

    assert second_step(oldest_places=1) == [0, 1]
    assert second_step(oldest_places=0) == [1, 2]


def test_cancelled_and_expired_sequences_end_before_the_step_and_free_their_slots():
    sched = scheduler(max_batch_size=4)
    a, b, c = add(sched, 3, deadline=sched.clock() + 1.0), add(sched, 3), add(sched, 3)
    cycle(sched)
    b.cancel()
    d = add(sched, 3)
    d.cancel()  # never ran: the runner never heard of it
    sched.clock.now += 2.0  # past a's deadline
    step, updates = cycle(sched)
    assert sorted(step.finished_ids) == [a.order, b.order] and rows(step) == [(c.order, 2, 3, 1, True)]
    assert [(u.seq, u.finish, u.sampled) for u in updates[:3]] == [(a, Finish.CANCELLED, False),
                                                                   (b, Finish.CANCELLED, False),
                                                                   (d, Finish.CANCELLED, False)]
    assert sorted(sched.kv.free) == [0, 1, 3] and sched.active == [c]


def test_eos_stop_token_ids_and_length_end_a_sequence():
    sched = scheduler(eos={99}, context=8, max_batch_size=4)
    eos, stop, length, window = add(sched, 2), add(sched, 2, stop_token_ids=(98,)), add(sched, 2, n=2), add(sched, 6)
    step = sched.schedule()
    out = RunnerOutput([s.seq_id for s in step.sequences], [[99], [98], [TOKEN], [TOKEN]])
    updates = sched.update_from_output(out)
    assert [(u.token_ids, u.finish) for u in updates] == [([], Finish.EOS), ([], Finish.STOP), ([TOKEN], None),
                                                          ([TOKEN], None)]
    assert eos.generated == [] and stop.generated == []
    updates = cycle(sched)[1]  # `length` reaches max_new_tokens, `window` the 8-token context
    assert [(u.seq, u.finish) for u in updates] == [(length, Finish.LENGTH), (window, Finish.LENGTH)]
    assert length.generated == [TOKEN, TOKEN] and len(window.tokens) == 8


def test_a_stop_sequence_found_in_the_text_outranks_the_length_limit():
    sched = scheduler()
    a, b = add(sched, 2, n=1), add(sched, 2, n=5)
    updates = cycle(sched)[1]
    for update in updates:
        sched.stop(update)
    assert [(u.finish, u.seq.finish) for u in updates] == [(Finish.STOP, Finish.STOP)] * 2
    assert sched.active == [] and b.generated == [TOKEN] and a.generated == [TOKEN]


def test_the_queue_holds_the_resident_sequences_plus_max_queue_size():
    sched = scheduler(max_batch_size=1, kv_slots=2, max_queue_size=1)
    assert sched.capacity == 3
    add(sched, 2, n=1)
    assert sched.has_room(waiting=1) and not sched.has_room(waiting=2)  # `waiting`: submitted, not yet added
    add(sched, 2)
    add(sched, 2)
    assert not sched.has_room(waiting=0)
    cycle(sched)  # the first is done: room for one more
    assert sched.has_room(waiting=0) and not sched.has_room(waiting=1)


def test_importing_the_scheduler_does_not_import_torch():
    modules = ["scheduler", "scheduling", "sequence", "step", "kv_slots", "generation_settings", "sampling_params",
               "output_processor"]
    code = ("import sys\n" + "".join(f"import fastserve.services.inference.{m}\n" for m in modules)
            + "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_mlfq_levels_skip_join_demotion_and_promotion():
    policy = Mlfq(MlfqSettings(levels=4, base_quantum=4, prompt_tokens_per_step=16, starvation_ms=100))

    def seq(prompt_tokens: int) -> Sequence:
        s = Sequence(list(range(prompt_tokens)), SamplingParams(), 0, None, order=prompt_tokens)
        policy.enter(s)
        return s

    short, medium, huge = seq(10), seq(100), seq(5000)
    assert (short.level, medium.level, huge.level) == (0, 1, 3)  # quanta 4, 8, 16, 32 decode steps
    assert [policy.account(short, 1) for _ in range(4)] == [False, False, False, True] and short.level == 1
    assert policy.key(short) < policy.key(medium)  # the same level now: the earlier arrival first
    huge.waited = 0.2
    assert policy.promote([short, medium, huge]) == 1 and policy.overdue == {huge.order}
    assert policy.promote([short, medium, huge]) == 0  # overdue once, until it ends
    assert policy.promote([short, medium]) == 0 and policy.overdue == set()  # it ended: forgotten


def test_mlfq_order_puts_the_oldest_first_only_when_the_batch_is_full():
    policy = Mlfq(MlfqSettings(base_quantum=4, oldest_places=1))
    seqs = []
    for order in range(4):
        s = Sequence([1, 2, 3], SamplingParams(), 0, None, order=order)
        policy.enter(s)
        seqs.append(s)
    seqs[0].level = 3  # the oldest has been demoted
    assert policy.order(seqs, batch_size=4) == [seqs[1], seqs[2], seqs[3], seqs[0]]  # all run anyway
    assert policy.order(seqs, batch_size=2) == [seqs[0], seqs[1], seqs[2], seqs[3]]
    assert policy.order(seqs, batch_size=1) == [seqs[1], seqs[2], seqs[3], seqs[0]]  # never the only place


def test_overdue_sequences_run_oldest_first_in_at_most_half_of_the_batch():
    policy = Mlfq(MlfqSettings(base_quantum=4, oldest_places=1, starvation_ms=100))
    seqs = []
    for order in range(10):
        s = Sequence([1, 2, 3], SamplingParams(), 0, None, order=order)
        policy.enter(s)
        s.level = 4 if order < 6 else 0  # six old demoted sequences, four new ones at the top level
        s.waited = 1.0 if order in (1, 2, 4, 5) else 0.0
        seqs.append(s)
    assert policy.promote(seqs) == 4
    # Batch 6: three places for the oldest (0) and the overdue (1, 2; 4 and 5 must wait), three by level.
    assert [s.order for s in policy.order(seqs, batch_size=6)][:6] == [0, 1, 2, 6, 7, 8]
    # Batch 8: four kept places, so 4 gets one; 5 waits behind the four top-level sequences.
    assert [s.order for s in policy.order(seqs, batch_size=8)][:8] == [0, 1, 2, 4, 6, 7, 8, 9]


def test_skip_join_a_long_prompt_starts_at_a_lower_level_and_a_later_short_one_runs_first():
    sched = scheduler(policy="mlfq", max_batch_size=1, max_prefill_tokens=4096,
                      mlfq=MlfqSettings(base_quantum=8, prompt_tokens_per_step=32, oldest_places=0))
    long_prompt, short_prompt = add(sched, 300, n=4), add(sched, 4, n=4)
    # 300 prompt tokens cost about 10 decode steps: past the 8-token quantum of level 0, within level 1's 16.
    assert (long_prompt.level, short_prompt.level) == (1, 0)
    order = [rows(cycle(sched)[0])[0][0] for _ in range(8)]
    assert order == [short_prompt.order] * 4 + [long_prompt.order] * 4


def group(sched: Scheduler, prompt: int, n: int, new_tokens: int = 100, source: list[int] | None = None,
          **params) -> list[Sequence]:
    """A request's `n` completions, as the engine submits them: one queue, the first their leader."""
    seqs = [Sequence([1] if source else list(range(10, 10 + prompt)),
                     SamplingParams(max_new_tokens=new_tokens, **params), 0, None, source=source,
                     arrival=sched.clock()) for _ in range(n)]
    for index, seq in enumerate(seqs[1:], 1):
        seq.index, seq.leader, seq.events = index, seqs[0], seqs[0].events
    for seq in seqs:
        sched.add(seq)
    return seqs


def test_a_requests_later_completions_copy_the_first_ones_prompt_instead_of_prefilling_it():
    sched = scheduler(max_batch_size=8, max_prefill_tokens=64)
    a, b, c = group(sched, 12, 3)
    step, _ = cycle(sched)
    # Only the leader prefills; the others wait for its cache rather than compute the same 12 tokens.
    assert rows(step) == [(a.order, 0, 0, 12, True)] and step.copies == []
    step, _ = cycle(sched)
    # Each copies the 11 positions before the last prompt token, which it runs to sample its own first token.
    assert step.copies == [Copy(0, 1, 11), Copy(0, 2, 11)]
    assert rows(step) == [(a.order, 0, 12, 1, True), (b.order, 1, 11, 1, True), (c.order, 2, 11, 1, True)]
    assert step.sequences[1].token_ids == [a.prompt[-1]] and b.cached == c.cached == 12
    assert [n.seq_id for n in step.new_sequences] == [b.order, c.order]
    rows_after = rows(cycle(sched)[0])
    assert rows_after == [(a.order, 0, 13, 1, True), (b.order, 1, 12, 1, True), (c.order, 2, 12, 1, True)]
    assert sched.metrics.shared_prefill._value.get() == 22


def test_a_fork_falls_back_to_a_prefill_when_the_leader_has_gone():
    sched = scheduler(max_batch_size=8)
    a, b = group(sched, 6, 2, new_tokens=1)  # the leader ends with its first token
    step, _ = cycle(sched)
    assert rows(step) == [(a.order, 0, 0, 6, True)] and a.finish is Finish.LENGTH
    step, _ = cycle(sched)
    assert step.copies == [] and rows(step) == [(b.order, 0, 0, 6, True)]


def test_a_completion_that_evicts_its_leader_prefills_on_its_own():
    """MLFQ demotes the leader after its first token; its completion, now ranked above it, takes the only slot
    by evicting it, so there is no resident cache to copy: it prefills."""
    sched = scheduler(policy="mlfq", mlfq=MlfqSettings(base_quantum=1, oldest_places=0), max_batch_size=1,
                      kv_slots=1, host_slots=4)
    a, b = group(sched, 6, 2)
    cycle(sched)
    step, _ = cycle(sched)
    assert step.offloads == [Offload(a.order, 0, 6)] and step.copies == []
    assert rows(step) == [(b.order, 0, 0, 6, True)]


def test_an_encoder_decoders_completions_share_its_encoder_states():
    sched = scheduler(max_batch_size=4)
    a, b = group(sched, 0, 2, source=[7, 8, 9])
    step, _ = cycle(sched)
    assert step.encodes == [Encode(a.order, 0)] and rows(step) == [(a.order, 0, 0, 1, True)]
    step, _ = cycle(sched)
    assert step.encodes == [] and step.copies == [Copy(0, 1, 0)] and b.encoded
    assert rows(step) == [(a.order, 0, 1, 1, True), (b.order, 1, 0, 1, True)]
