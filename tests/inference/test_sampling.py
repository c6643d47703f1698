"""The batched sampler (sampling.py) on the CPU: its noise is splitmix64 of (seed, position); greedy rows
are the argmax; draws follow softmax(logits / T) after reference top-k and top-p filters (a chi-square
bound over 20,000 seeded draws); penalties equal a reference computed from Python token lists, with
counts kept across steps; a row that cannot be sampled fails alone. Then through the engine on a tiny
GPT-2: a seeded sequence samples the same tokens alone, batched with 7 others of other parameters,
beside a sequence that breaks the packed forward pass (each then runs alone), and after being evicted
and recomputed."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastserve.services.inference.decoder import open_decoder
from fastserve.services.inference.engine import Engine
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.sampling import BatchSampler, uniform
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.services.inference.scheduling import MlfqSettings
from fastserve.services.inference.sequence import Finish
from tests.support.tiny_models import build_causal_lm

CPU = torch.device("cpu")
_M64 = (1 << 64) - 1


def _splitmix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def test_the_noise_is_splitmix64_of_the_seed_and_position():
    seeds, positions = [0, 1, 2, 41, 2**63 - 1, 987654321987], [0, 1, 7, 2047, 0, 123456]
    expected = [(_splitmix((_splitmix(s) + (p + 1) * 0x9E3779B97F4A7C15) & _M64) >> 40) * 2**-24
                for s, p in zip(seeds, positions, strict=True)]
    assert uniform(torch.tensor(seeds), torch.tensor(positions)).tolist() == expected
    many = uniform(torch.arange(100_000), torch.zeros(100_000, dtype=torch.long))
    assert 0 <= float(many.min()) and float(many.max()) < 1 and abs(float(many.mean()) - 0.5) < 0.01


def sampler_with(params: list[SamplingParams], vocab: int, prompt: list[int] = (1, 2, 3)) -> BatchSampler:
    sampler = BatchSampler(vocab, CPU)
    for seq_id, p in enumerate(params):
        sampler.add(seq_id, p, list(prompt))
    return sampler


def tokens_of(results) -> list[int | None]:
    return [r.token for r in results]


def test_greedy_rows_are_the_argmax_beside_sampling_rows():
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=1), SamplingParams(),
              SamplingParams(temperature=1.0, top_k=5, seed=2), SamplingParams(top_k=3, top_p=0.5)]
    sampler = sampler_with(params, 1000)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits = torch.randn(5, 1000, generator=g)
        tokens = tokens_of(sampler.sample(logits, list(range(5))))
        assert [tokens[j] for j in (0, 2, 4)] == logits[[0, 2, 4]].argmax(-1).tolist()


def reference_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> list[float]:
    """softmax(logits / T), then the top k, then the smallest most likely set reaching top_p, renormalised
    each time: written out over a sorted Python list."""
    probs = torch.softmax(logits.double() / temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    if top_k:
        order = order[:top_k]
    total = sum(probs[t] for t in order)
    kept, mass = [], 0.0
    for t in order:
        kept.append(t)
        mass += probs[t] / total
        if mass >= top_p:
            break
    total = sum(probs[t] for t in kept)
    return [probs[t] / total if t in kept else 0.0 for t in range(len(probs))]


def chi_square_bound(df: int, z: float = 3.72) -> float:
    """The chi-square quantile of `df` degrees of freedom at the normal quantile `z` (3.72: p = 1e-4), by
    Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.8, 0, 0.9), (0.7, 10, 1.0), (1.3, 20, 0.8),
                                                     (2.0, 0, 0.5), (1.5, 30, 0.6)])
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
    """1000 seeds x 20 positions; the counts of each token against the reference distribution (tokens the
    filters drop never drawn; rare ones pooled so every cell expects at least 5)."""
    vocab, sequences, steps = 64, 1000, 20
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(7)) * 2
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    sampler = BatchSampler(vocab, CPU)
    for seq_id in range(sequences):
        sampler.add(seq_id, replace(params, seed=1000 + seq_id), [0])
    counts = Counter()
    for _ in range(steps):
        counts.update(tokens_of(sampler.sample(logits.expand(sequences, vocab).contiguous(), list(range(sequences)))))
    n = sequences * steps
    expected = reference_probabilities(logits, temperature, top_k, top_p)
    assert all(expected[t] > 0 for t in counts), "a token the filters drop was drawn"
    cells, pooled_e, pooled_o = [], 0.0, 0
    for t in range(vocab):
        if expected[t] == 0:
            continue
        if n * expected[t] >= 5:
            cells.append((counts[t], n * expected[t]))
        else:
            pooled_e, pooled_o = pooled_e + n * expected[t], pooled_o + counts[t]
    if pooled_e:
        cells.append((pooled_o, pooled_e))
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    assert len(cells) > 1 and chi2 < chi_square_bound(len(cells) - 1), (chi2, len(cells))
    # The test can tell: the same draws against the unfiltered softmax of a filtering case are far off.
    if top_k or top_p < 1:
        plain = reference_probabilities(logits, temperature, 0, 1.0)
        assert any(counts[t] == 0 and n * plain[t] > 50 for t in range(vocab))


def reference_penalised(logits: torch.Tensor, prompt: list[int], generated: list[int], p: SamplingParams
                        ) -> torch.Tensor:
    """The penalties over Python lists: transformers' repetition penalty on each token of prompt +
    generated, OpenAI's presence and frequency penalties on the generated ones."""
    out = logits.clone()
    for t in set(prompt) | set(generated):
        x = out[t]
        out[t] = x * p.repetition_penalty if x < 0 else x / p.repetition_penalty
    for t, c in Counter(generated).items():
        out[t] = out[t] - torch.tensor(p.frequency_penalty) * c - torch.tensor(p.presence_penalty)
    return out


def test_penalties_equal_a_reference_over_token_lists():
    """Greedy rows, so that the token is the penalised argmax; logits that make the penalties decide.
    A sampling row draws what an unpenalised twin of the same seed draws from the reference's logits.
    A finished sequence's counts do not leak into the one that reuses its row."""
    vocab, prompt = 40, [3, 5, 5, 7]
    params = [SamplingParams(repetition_penalty=1.8), SamplingParams(frequency_penalty=1.2),
              SamplingParams(presence_penalty=1.5), SamplingParams(repetition_penalty=1.3, presence_penalty=-0.5,
                                                                   frequency_penalty=0.8),
              SamplingParams(), SamplingParams(temperature=0.9, frequency_penalty=2.0, seed=5)]
    twin = SamplingParams(temperature=0.9, seed=5)
    g = torch.Generator().manual_seed(3)

    def decode(steps: int) -> None:
        sampler = sampler_with([*params, twin], vocab, prompt)
        generated: list[list[int]] = [[] for _ in params]
        for _ in range(steps):
            logits = torch.randn(len(params), vocab, generator=g).abs() * 0.3
            logits[:, :8] += 1.0  # the prompt's tokens and their neighbours lead: penalties change the choice
            expected = [reference_penalised(logits[j], prompt, generated[j], p) for j, p in enumerate(params)]
            batch = torch.cat([logits, expected[-1].unsqueeze(0)])
            tokens = tokens_of(sampler.sample(batch, list(range(len(params) + 1))))
            for j, p in enumerate(params[:-1]):
                assert tokens[j] == int(expected[j].argmax()), (j, p)
            assert tokens[len(params) - 1] == tokens[len(params)]
            for j, token in enumerate(tokens[:len(params)]):
                generated[j].append(token)
        assert len(set(generated[1])) > 3  # the frequency penalty moved it off its favourites

    decode(12)
    reused = sampler_with(params, vocab, prompt)
    leading = torch.zeros(len(params), vocab)
    leading[:, 5] = 3.0
    for _ in range(3):  # sequence 1 takes token 5 each time: 3 - 1.2 * 2 still leads
        assert tokens_of(reused.sample(leading, list(range(len(params)))))[1] == 5
    reused.remove(1)
    reused.add(9, params[1], prompt)
    logits = torch.zeros(1, vocab)
    logits[0, 5] = 1.0
    assert tokens_of(reused.sample(logits, [9])) == [5]  # nothing counted yet: the prompt is not penalised


def test_a_row_that_cannot_be_sampled_fails_alone():
    """NaN logits, a NaN penalty, a vanishing or NaN temperature, a format that allows nothing: each fails its
    own row with its own message; the others sample what they sample alone."""
    vocab = 100
    good = [SamplingParams(temperature=0.8, top_p=0.9, seed=1), SamplingParams(),
            SamplingParams(temperature=1.0, top_k=7, frequency_penalty=0.5, seed=2)]
    bad = [SamplingParams(temperature=0.8, seed=3), SamplingParams(repetition_penalty=float("nan")),
           SamplingParams(temperature=1e-38, seed=4), SamplingParams(temperature=float("nan"), seed=5),
           SamplingParams(temperature=0.8, seed=6)]
    g = torch.Generator().manual_seed(1)
    steps = [torch.randn(len(good) + len(bad), vocab, generator=g) for _ in range(4)]
    alone = sampler_with(good, vocab)
    expected = [tokens_of(alone.sample(logits[:len(good)], [0, 1, 2])) for logits in steps]
    mixed = sampler_with(good + bad, vocab)
    for step, logits in enumerate(steps):
        logits = logits.clone()
        logits[3, 17] = float("nan")
        logits[5] *= 100  # over float32's range once divided by 1e-38
        blocked = torch.zeros(len(logits), dtype=torch.bool)
        blocked[7] = True
        results = mixed.sample(logits, list(range(len(logits))), blocked=blocked)
        assert tokens_of(results[:3]) == expected[step]
        errors = [r.error for r in results[3:]]
        assert all(r.token is None for r in results[3:])
        assert "NaN logits" in errors[0] and "penalties made the logits NaN" in errors[1]
        assert "non-finite" in errors[2] and "non-finite" in errors[3] and "response format" in errors[4]


def test_a_seeded_row_draws_the_same_whatever_its_row_and_batch_mates():
    vocab = 500
    target = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=77)
    others = [SamplingParams(), SamplingParams(temperature=1.5, seed=1), SamplingParams(temperature=0.6, top_p=0.5),
              SamplingParams(temperature=1.0, top_k=200, seed=3), SamplingParams(presence_penalty=1.0),
              SamplingParams(temperature=0.3, top_k=2, top_p=0.7), SamplingParams(temperature=2.0, top_p=0.99)]
    g = torch.Generator().manual_seed(5)
    steps = [torch.randn(8, vocab, generator=g) * 3 for _ in range(30)]
    alone = sampler_with([target], vocab)
    expected = [tokens_of(alone.sample(logits[3:4], [0]))[0] for logits in steps]
    batched = sampler_with([*others[:3], target, *others[3:]], vocab)
    assert [tokens_of(batched.sample(logits, list(range(8))))[3] for logits in steps] == expected
    assert len(set(expected)) > 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = build_causal_lm(tmp_path_factory.mktemp("sampling") / "gpt", vocab=300, documents=300, train_steps=60,
                             eos=False)
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def engine(model, name: str, **settings) -> Engine:
    return Engine(name, open_decoder(model), GenerationSettings(**settings), set(), lambda ids: "")


def run(eng: Engine, work: list[tuple[list[int], SamplingParams]]) -> list:
    seqs = [eng.submit(prompt, params) for prompt, params in work]
    for seq in seqs:
        assert seq.done.wait(120)
    return seqs


PROMPTS = [[5, 17, 42, 9, 100, 3], [8, 8, 31, 200, 4], [150, 2, 77, 91, 13, 60, 21], [40, 41], [250, 11, 12, 99],
           [7, 70, 170, 270, 27, 72], [33, 3, 133, 233], [18, 81, 181, 118, 9]]
SAMPLED = [SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, frequency_penalty=0.5, seed=1234),
           SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=12, temperature=1.3, top_k=5, seed=8),
           SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.5),
           SamplingParams(max_new_tokens=20, repetition_penalty=1.3, temperature=1.0, seed=9),
           SamplingParams(max_new_tokens=28, presence_penalty=1.0, temperature=0.5, top_k=100, seed=10),
           SamplingParams(max_new_tokens=16, temperature=1.0, seed=11),
           SamplingParams(max_new_tokens=36, temperature=2.0, top_p=0.99, top_k=250)]


def test_a_seeded_sequence_samples_the_same_alone_batched_rerun_and_recomputed(model):
    eng = engine(model, "seeded", max_batch_size=8)
    try:
        alone = [run(eng, [(prompt, params)])[0].generated for prompt, params in zip(PROMPTS, SAMPLED, strict=True)
                 if params.seed is not None]
        seeded = [j for j, params in enumerate(SAMPLED) if params.seed is not None]
        assert all(len(ids) == SAMPLED[j].max_new_tokens for ids, j in zip(alone, seeded, strict=True))
        # Batched with 7 others of other parameters (greedy and unseeded ones among them).
        batched = run(eng, list(zip(PROMPTS, SAMPLED, strict=True)))
        assert [batched[j].generated for j in seeded] == alone
        # Beside a token outside the vocabulary, which breaks the packed pass: each sequence runs again alone.
        beside = run(eng, [(PROMPTS[0], SAMPLED[0]), ([5, model.config.vocab_size + 7], SamplingParams()),
                           (PROMPTS[2], SAMPLED[2])])
        assert beside[1].finish is Finish.ERROR and "forward pass" in beside[1].error
        assert [beside[0].generated, beside[2].generated] == alone[:2]
    finally:
        eng.drain()
    # Fewer KV slots than sequences and no host pool: caches are dropped and prompts recomputed.
    small = engine(model, "seeded-evict", policy="mlfq", max_batch_size=2, kv_slots=3, host_slots=0,
                   mlfq=MlfqSettings(base_quantum=2))
    recomputed, sampled_before = set(), set()
    execute = small.runner.execute

    def watching(step):
        recomputed.update(s.seq_id for s in step.sequences if s.start == 0 and s.seq_id in sampled_before)
        out = execute(step)
        sampled_before.update(out.seq_ids)
        return out

    small.runner.execute = watching
    try:
        evicted = run(small, [(PROMPTS[j], SAMPLED[j]) for j in seeded])
    finally:
        small.drain()
    assert [s.generated for s in evicted] == alone
    assert recomputed and {s.order for s in evicted} >= recomputed
