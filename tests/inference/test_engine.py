"""The model runner and the engine on real (tiny, trained) models: decoding stays transformers' greedy
decoding through chunked prefill, KV eviction to host memory and recomputation (decoder-only and
encoder-decoder), long decode rows attended on their own, and steps written by hand for the runner
alone; EOS ends a sequence. Scheduling decisions themselves are tested without a model in
test_scheduler.py."""

from __future__ import annotations

import time

import pytest
import torch
from prometheus_client import REGISTRY
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from fastserve.services.inference.attention import separate_decode_rows
from fastserve.services.inference.decoder import open_decoder
from fastserve.services.inference.engine import Engine
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.model_runner import ModelRunner
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.services.inference.scheduling import MlfqSettings
from fastserve.services.inference.sequence import Finish, Sequence
from fastserve.services.inference.step import NewSequence, Offload, Restore, ScheduledSequence, SchedulerOutput
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


def test_an_eos_token_ends_the_sequence_without_being_returned(model):
    prompt = prompts(1, seed=3)[0]
    expected = reference(model, prompt, 20)
    eos = expected[6]
    eng = engine(model, "eos", eos={eos})
    (seq,) = run_all(eng, [(prompt, 20)])
    assert seq.finish is Finish.EOS and seq.generated == expected[:expected.index(eos)]


def test_the_runner_executes_steps_written_by_hand_exactly(model):
    """No scheduler: a prompt prefilled in two chunks in slot 2 beside another sequence in slot 0, its
    cache then moved to host memory and back into slot 1; both sample transformers' greedy tokens."""
    runner = ModelRunner(open_decoder(model), slots=3, context=256)
    a, b = prompts(1, seed=8)[0] * 2, prompts(1, seed=9)[0]
    half = len(a) // 2
    tokens = {0: list(a), 1: list(b)}

    def run(*rows: tuple[int, int, int, int], **ops) -> None:
        """rows: (sequence, slot, start, count); every row but a first chunk samples."""
        step = SchedulerOutput([ScheduledSequence(i, slot, start, tokens[i][start:start + n],
                                                  start + n == len(tokens[i])) for i, slot, start, n in rows], **ops)
        out = runner.execute(step)
        assert out.seq_ids == [s.seq_id for s in step.sequences if s.sample]
        for i, sampled in zip(out.seq_ids, out.sampled_token_ids, strict=True):
            tokens[i] += sampled

    greedy = SamplingParams()
    run((0, 2, 0, half), (1, 0, 0, len(b)), new_sequences=[NewSequence(0, list(a), None, greedy),
                                                           NewSequence(1, list(b), None, greedy)])
    run((0, 2, half, len(a) - half), (1, 0, len(b), 1))
    run((0, 2, len(a), 1), (1, 0, len(b) + 1, 1))
    run((1, 0, len(b) + 2, 1), offloads=[Offload(0, 2, len(a) + 1)])
    assert runner.host.keys() == {0}
    run((0, 1, len(a) + 1, 1), (1, 0, len(b) + 3, 1), restores=[Restore(0, 1)])
    run((0, 1, len(a) + 2, 1), (1, 0, len(b) + 4, 1))
    assert tokens[0][len(a):] == reference(model, a, 4) and tokens[1][len(b):] == reference(model, b, 6)
    assert not runner.host
    runner.execute(SchedulerOutput(finished_ids=[0, 1]))
    assert not runner.running


def test_a_sequence_that_fails_fails_alone_while_the_others_finish(model):
    """Parameters that bypass the boundary's validation (a NaN temperature, a 1e-38 one, a NaN penalty)
    break only their own sampling row; a token id outside the vocabulary breaks the packed forward pass,
    which then runs each sequence alone. Every other sequence decodes exactly as alone."""
    eng = engine(model, "isolation", max_batch_size=8)
    vocab = model.config.vocab_size
    good = [(p, 12) for p in prompts(4, seed=3)]
    bad_params = [SamplingParams(max_new_tokens=12, temperature=float("nan")),
                  SamplingParams(max_new_tokens=12, temperature=1e-38),
                  SamplingParams(max_new_tokens=12, repetition_penalty=float("nan"))]
    seqs = [eng.submit(p, SamplingParams(max_new_tokens=n)) for p, n in good[:2]]
    bad = [eng.submit(good[0][0], params) for params in bad_params]
    bad.append(eng.submit([5, vocab + 7, 9], SamplingParams(max_new_tokens=12)))
    seqs += [eng.submit(p, SamplingParams(max_new_tokens=n)) for p, n in good[2:]]
    for seq in seqs + bad:
        assert seq.done.wait(60)
    assert [s.finish for s in bad] == [Finish.ERROR] * 4
    assert "non-finite" in bad[0].error and "non-finite" in bad[1].error and "NaN" in bad[2].error
    assert "forward pass" in bad[3].error
    for (prompt, n), seq in zip(good, seqs, strict=True):
        assert seq.finish is Finish.LENGTH and seq.generated == reference(model, prompt, n)
    # The engine serves on.
    after = eng.submit(good[0][0], SamplingParams(max_new_tokens=3))
    assert after.done.wait(60) and after.generated == reference(model, good[0][0], 3)
    eng.drain()


def test_a_detokenizing_failure_fails_that_sequence_alone(model):
    """Stop sequences are found by detokenizing; a tokenizer that fails on a completion fails it alone."""
    def decode(ids: list[int]) -> str:
        raise ValueError("this tokenizer cannot decode")

    eng = Engine("decode-fails", open_decoder(model), GenerationSettings(max_batch_size=4), set(), decode)
    prompt = prompts(1, seed=4)[0]
    stopping = eng.submit(prompt, SamplingParams(max_new_tokens=8, stop_sequences=("zz",)))
    plain = eng.submit(prompt, SamplingParams(max_new_tokens=8))
    assert stopping.done.wait(60) and plain.done.wait(60)
    eng.drain()
    assert stopping.finish is Finish.ERROR and "decode" in stopping.error
    assert plain.finish is Finish.LENGTH and plain.generated == reference(model, prompt, 8)
