"""The generation engine in process: KV eviction to host memory and recomputation (decoder-only and
encoder-decoder), chunked prefill, EOS, and the MLFQ policy's levels, demotion and promotion."""

from __future__ import annotations

import time

import pytest
import torch
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from services.inference.decoder import open_decoder
from services.inference.engine import Engine, Finish, GenerationSettings, Sequence, separate_decode_rows
from services.inference.sampling import Sampler, SamplingParams
from services.inference.scheduling import Mlfq, MlfqSettings
from tests.support.tiny_models import build_causal_lm, build_seq2seq


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = build_causal_lm(tmp_path_factory.mktemp("engine") / "gpt", "gpt2", train_steps=200)
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    folder = build_seq2seq(tmp_path_factory.mktemp("engine") / "t5", steps=150)
    return AutoModelForSeq2SeqLM.from_pretrained(str(folder)).eval()


def engine(model, name: str, eos: set[int] = frozenset(), **settings) -> Engine:
    return Engine(name, open_decoder(model), GenerationSettings(**settings), set(eos), lambda ids: "")


def reference(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=None)[0, len(prompt):].tolist()


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 400, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def run_all(eng: Engine, work: list[tuple[list[int], int]]) -> list[Sequence]:
    seqs = [eng.submit(p, SamplingParams(max_new_tokens=n)) for p, n in work]
    for seq in seqs:
        assert seq.done.wait(60)
    eng.drain()
    return seqs


def evictions(name: str, to: str) -> float:
    return REGISTRY.get_sample_value("fastserve_generation_evictions_total",
                                     {"model": name, "policy": "mlfq", "to": to}) or 0.0


@pytest.mark.parametrize("host_slots,evicted_to", [(2, "host"), (0, "recompute")])
def test_evicted_caches_come_back_exactly(model, host_slots, evicted_to):
    """MLFQ with fewer KV slots than sequences: caches move out and back, and decoding is unchanged."""
    name = f"evict-{evicted_to}"
    eng = engine(model, name, policy="mlfq", max_batch_size=2, kv_slots=3, host_slots=host_slots,
                 mlfq=MlfqSettings(base_quantum=2))
    work = [(p, 10 + 7 * i) for i, p in enumerate(prompts(6))]
    seqs = run_all(eng, work)
    for (prompt, n), seq in zip(work, seqs, strict=True):
        assert seq.finish is Finish.LENGTH and seq.generated == reference(model, prompt, n)
    assert evictions(name, evicted_to) > 0
    assert sum(s.preemptions for s in seqs) > 0


@pytest.mark.parametrize("host_slots,evicted_to", [(2, "host"), (0, "recompute")])
def test_encoder_decoder_cross_attention_states_survive_eviction(seq2seq, host_slots, evicted_to):
    name = f"t5-evict-{evicted_to}"
    eng = engine(seq2seq, name, policy="mlfq", max_batch_size=2, kv_slots=3, host_slots=host_slots,
                 mlfq=MlfqSettings(base_quantum=2))
    work = [(p, 8 + 5 * i) for i, p in enumerate(prompts(6, seed=7))]
    seqs = run_all(eng, work)
    for (source, n), seq in zip(work, seqs, strict=True):
        ids = torch.tensor([source])
        expected = seq2seq.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                    eos_token_id=None)[0, 1:].tolist()
        assert seq.generated == expected and seq.prompt_tokens == len(source)
    assert evictions(name, evicted_to) > 0


def test_long_prompts_prefill_in_chunks_between_decode_steps(model):
    eng = engine(model, "chunked", max_batch_size=4, max_prefill_tokens=8)
    short, long = prompts(1, seed=1)[0], prompts(1, seed=2)[0] * 4
    first = eng.submit(short, SamplingParams(max_new_tokens=40))
    while not first.generated:
        time.sleep(0.001)
    second = eng.submit(long, SamplingParams(max_new_tokens=5))
    assert second.done.wait(60) and first.done.wait(60)
    eng.drain()
    assert second.generated == reference(model, long, 5) and first.generated == reference(model, short, 40)
    # While the long prompt was prefilled 8 tokens a step, the first sequence kept decoding.
    assert eng.stats.batch_sizes.get(2, 0) >= len(long) // 8


def test_long_decode_rows_attend_on_their_own_when_cheaper():
    # One 900-token sequence among short ones: a batched call would make every row pay for 900 keys.
    assert separate_decode_rows([0, 1, 2, 3], [30, 900, 25, 40], call_cost=256) == [1]
    # Similar lengths, or a launch as dear as a GPU's: one batched call.
    assert separate_decode_rows([0, 1, 2, 3], [300, 310, 290, 305], call_cost=256) == []
    assert separate_decode_rows([0, 1, 2, 3], [30, 900, 25, 40], call_cost=65536) == []
    # A lone short row in a high slot: its own call beats a view over all the slots below it.
    assert separate_decode_rows([0, 15], [500, 480], call_cost=256) == [0, 1]


def test_decoding_is_exact_when_long_rows_attend_on_their_own(model):
    long_prompt = prompts(1, seed=4)[0] * 6  # well over a hundred tokens
    work = [(long_prompt, 30)] + [(p, 30) for p in prompts(3, seed=6)]
    lengths = [len(p) + 1 for p, _ in work]
    assert separate_decode_rows(list(range(len(work))), lengths, call_cost=256) == [0]
    eng = engine(model, "alone", max_batch_size=4)
    for (prompt, n), seq in zip(work, run_all(eng, work), strict=True):
        assert seq.generated == reference(model, prompt, n)


def test_the_oldest_sequence_keeps_its_place_in_every_step(model):
    """MLFQ with two places: short jobs arriving behind a long one take one place; with a place kept
    for the oldest, the long job runs every step and finishes before most of them, without it, it
    waits for all of them (the starvation bound is far away)."""
    def run(oldest_places: int) -> tuple[Sequence, list[Sequence]]:
        settings = MlfqSettings(base_quantum=2, starvation_ms=60000, oldest_places=oldest_places)
        return long_job_then_shorts(engine(model, f"oldest-{oldest_places}", policy="mlfq", max_batch_size=2,
                                           mlfq=settings), long_tokens=60, shorts=40)

    long, shorts = run(oldest_places=1)
    assert long.preemptions == 0 and sum(s.finished < long.finished for s in shorts) < 30
    long, shorts = run(oldest_places=0)
    assert long.preemptions > 0 and all(s.finished < long.finished for s in shorts)


def long_job_then_shorts(eng: Engine, long_tokens: int, shorts: int) -> tuple[Sequence, list[Sequence]]:
    """A long job that has used up its first quanta (base quantum 2: demoted to level 2), then a burst
    of 6-token jobs; both, once all have finished."""
    long = eng.submit(prompts(1)[0], SamplingParams(max_new_tokens=long_tokens))
    while len(long.generated) < 10:
        time.sleep(0.001)
    burst = [eng.submit(p, SamplingParams(max_new_tokens=6)) for p in prompts(shorts, seed=5)]
    for seq in [long, *burst]:
        assert seq.done.wait(60)
    eng.drain()
    return long, burst


def test_an_eos_token_ends_the_sequence_without_being_returned(model):
    prompt = prompts(1, seed=3)[0]
    expected = reference(model, prompt, 20)
    eos = expected[6]
    eng = engine(model, "eos", eos={eos})
    (seq,) = run_all(eng, [(prompt, 20)])
    assert seq.finish is Finish.EOS and seq.generated == expected[:expected.index(eos)]


def test_a_starving_job_is_promoted_after_its_wait_bound(model):
    """One long job behind a flood of short ones: without promotion it finishes last, with a short
    starvation bound it goes back to the top level and finishes while short jobs still wait."""
    def finish_rank(starvation_ms: int) -> int:
        eng = engine(model, f"starve-{starvation_ms}", policy="mlfq", max_batch_size=1,
                     mlfq=MlfqSettings(base_quantum=2, starvation_ms=starvation_ms))
        long, shorts = long_job_then_shorts(eng, long_tokens=24, shorts=150)
        return sum(s.finished < long.finished for s in shorts)

    assert finish_rank(starvation_ms=60000) == 150
    assert finish_rank(starvation_ms=20) < 150


def test_mlfq_levels_skip_join_demotion_and_promotion():
    policy = Mlfq(MlfqSettings(levels=4, base_quantum=4, prompt_tokens_per_step=16, starvation_ms=100))

    def seq(prompt_tokens: int) -> Sequence:
        s = Sequence(list(range(prompt_tokens)), Sampler(SamplingParams()), 0, None, order=prompt_tokens)
        policy.enter(s)
        return s

    short, medium, huge = seq(10), seq(100), seq(5000)
    assert (short.level, medium.level, huge.level) == (0, 1, 3)  # quanta 4, 8, 16, 32 decode steps
    assert [policy.account(short, 1) for _ in range(4)] == [False, False, False, True] and short.level == 1
    assert policy.key(short) < policy.key(medium)  # the same level now: the earlier arrival first
    huge.waited = 0.2
    assert policy.promote([short, medium, huge]) == 1 and huge.level == 0 and huge.waited == 0


def test_mlfq_order_puts_the_oldest_first_only_when_the_batch_is_full():
    policy = Mlfq(MlfqSettings(base_quantum=4, oldest_places=1))
    seqs = []
    for order in range(4):
        s = Sequence([1, 2, 3], Sampler(SamplingParams()), 0, None, order=order)
        policy.enter(s)
        seqs.append(s)
    seqs[0].level = 3  # the oldest has been demoted
    assert policy.order(seqs, batch_size=4) == [seqs[1], seqs[2], seqs[3], seqs[0]]  # all run anyway
    assert policy.order(seqs, batch_size=2) == [seqs[0], seqs[1], seqs[2], seqs[3]]
    assert policy.order(seqs, batch_size=1) == [seqs[1], seqs[2], seqs[3], seqs[0]]  # never the only place
