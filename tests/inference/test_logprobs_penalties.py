"""Per-token logprobs and OpenAI's presence and frequency penalties, in process on a tiny GPT-2: logprobs
are transformers' log-softmax at each greedy step, with sorted alternatives, only for the sequences that
ask; the penalties change greedy decoding exactly as a reference loop over transformers' logits says;
stop sequences drop the logprobs of the tokens they cut; out-of-bounds values name their field; and the
same over gRPC from a real server."""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.runtime.errors import InvalidArgument
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.generator import GenerationRequest, Generator
from fastserve.services.inference.output_processor import final_logprobs, named
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.services.inference.sequence import Finish
from fastserve.services.inference.servicer import logprobs_proto, sampling_of
from tests.support.processes import serving_folder
from tests.support.rpc import field_of
from tests.support.tiny_models import build_causal_lm

PROMPT = [5, 17, 42, 9, 100, 3]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_causal_lm(tmp_path_factory.mktemp("lp") / "gpt", vocab=300, documents=300, train_steps=60,
                           eos=False)


@pytest.fixture(scope="module")
def gen(folder):
    g = Generator("lp", folder, "float32", GenerationSettings(max_batch_size=8))
    yield g
    g.drain()


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def run(gen: Generator, prompt: list[int] = PROMPT, **params):
    [seq] = gen.submit(GenerationRequest(token_ids=prompt, params=SamplingParams(**params).validate(),
                                         max_new_tokens_set=True))
    [completion], _ = gen.complete([seq], None)
    return seq, completion.text, completion.token_ids, completion.finish


def logprobs_of(gen: Generator, seq, text: str):
    """A completed sequence's logprobs as its reply gives them: those of the tokens that make `text`."""
    return named(final_logprobs(seq, gen.decode, text), gen.decode)


@torch.inference_mode()
def reference(model, prompt: list[int], n: int, presence: float = 0.0, frequency: float = 0.0):
    """Greedy decoding over transformers' logits with OpenAI's penalties on the generated tokens: (tokens,
    the raw log-softmax at each step)."""
    ids, out, logprobs = list(prompt), [], []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        logprobs.append(torch.log_softmax(logits, -1))
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
        token = int((logits - frequency * counts - presence * (counts > 0)).argmax())
        out.append(token)
        ids.append(token)
    return out, logprobs


def test_logprobs_are_transformers_log_softmax_at_each_greedy_step(gen, model):
    seq, text, ids, finish = run(gen, max_new_tokens=12, logprobs=True, top_logprobs=5)
    expected, steps = reference(model, PROMPT, 12)
    assert ids == expected and finish is Finish.LENGTH
    logprobs = logprobs_of(gen, seq, text)
    assert [lp.token_id for lp in logprobs] == ids
    for lp, step in zip(logprobs, steps, strict=True):
        assert math.isclose(lp.logprob, float(step[lp.token_id]), abs_tol=1e-4)
        assert len(lp.top) == 5
        values = [c.logprob for c in lp.top]
        assert values == sorted(values, reverse=True)
        assert lp.top[0].token_id == lp.token_id  # greedy: the chosen token is the most likely
        reference_top = torch.topk(step, 5)
        assert torch.allclose(torch.tensor(values), reference_top.values, atol=1e-4)
        assert all(c.text == gen.decode([c.token_id]) for c in lp.top) and lp.text == gen.decode([lp.token_id])
    message = logprobs_proto(logprobs)
    assert [m.token_id for m in message] == ids and len(message[0].top) == 5


def test_logprobs_are_raw_whatever_the_temperature_and_absent_when_not_asked(gen, model):
    seq, text, ids, _ = run(gen, max_new_tokens=8, temperature=1.5, seed=3, logprobs=True)
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT + ids])).logits[0].float()
    raw = torch.log_softmax(logits[len(PROMPT) - 1:-1], -1)
    got = logprobs_of(gen, seq, text)
    assert [lp.token_id for lp in got] == ids and all(lp.top == () for lp in got)
    assert torch.allclose(torch.tensor([lp.logprob for lp in got]), raw[torch.arange(len(ids)), ids], atol=1e-4)
    plain, text, _, _ = run(gen, max_new_tokens=8)
    assert plain.logprobs == [] and logprobs_of(gen, plain, text) == []


def test_a_sequence_asking_logprobs_batched_with_one_that_does_not(gen, model):
    asking = [gen.submit(GenerationRequest(token_ids=PROMPT, max_new_tokens_set=True,
                                           params=SamplingParams(max_new_tokens=10, logprobs=True, top_logprobs=2)))[0]
              for _ in range(2)]
    plain = [gen.submit(GenerationRequest(token_ids=PROMPT[::-1], max_new_tokens_set=True,
                                          params=SamplingParams(max_new_tokens=10)))[0] for _ in range(2)]
    for seq in asking + plain:
        assert seq.done.wait(60)
    expected, steps = reference(model, PROMPT, 10)
    for seq in asking:
        assert seq.generated == expected and [lp.token_id for lp in seq.logprobs] == expected
        assert all(math.isclose(lp.logprob, float(s[lp.token_id]), abs_tol=1e-4)
                   for lp, s in zip(seq.logprobs, steps, strict=True))
        assert all(len(lp.top) == 2 for lp in seq.logprobs)
    for seq in plain:
        assert seq.logprobs == [] and seq.generated == reference(model, PROMPT[::-1], 10)[0]


@pytest.mark.parametrize("presence,frequency", [(0.0, 1.5), (2.0, 0.0), (-1.0, 0.5), (0.7, 0.7)])
def test_penalties_change_greedy_decoding_as_the_reference_predicts(gen, model, presence, frequency):
    n = 20
    _, _, ids, _ = run(gen, max_new_tokens=n, presence_penalty=presence, frequency_penalty=frequency)
    assert ids == reference(model, PROMPT, n, presence, frequency)[0]


def test_the_penalties_count_generated_tokens_not_the_prompt(gen, model):
    plain = reference(model, PROMPT, 16)[0]
    assert len(set(plain)) < len(plain)  # this model repeats itself unpenalised
    _, _, ids, _ = run(gen, max_new_tokens=16, frequency_penalty=2.0)
    # The first token is unpenalised (nothing generated yet), though it may be in the prompt.
    assert ids[0] == plain[0] and ids != plain
    _, _, big, _ = run(gen, max_new_tokens=16, frequency_penalty=2.0, presence_penalty=2.0)
    assert big == reference(model, PROMPT, 16, 2.0, 2.0)[0]


def test_a_large_frequency_penalty_prevents_repeats(gen):
    """2 is the bound; beside it a temperature of 0.001 (the bound) makes the penalty weigh 1000-fold."""
    seq, _, ids, _ = run(gen, max_new_tokens=24, frequency_penalty=2.0, presence_penalty=2.0, temperature=1e-3,
                         seed=0)
    assert len(set(ids)) == len(ids) == 24


def test_a_stop_sequence_drops_the_logprobs_of_the_tokens_it_cuts(gen):
    sampled = {"max_new_tokens": 30, "temperature": 0.9, "seed": 11, "logprobs": True}  # varied text, reproduced
    seq, full, ids, _ = run(gen, **sampled)
    spots = [i for i in range(1, len(full) - 2) if full[i:i + 2].isalnum()]
    stop = full[min(spots, key=lambda i: abs(i - len(full) // 2)):][:2]
    seq, text, ids, finish = run(gen, stop_sequences=(stop,), **sampled)
    assert finish is Finish.STOP and text == full[:full.index(stop)]
    kept = logprobs_of(gen, seq, text)
    assert len(kept) < len(ids) and [lp.token_id for lp in kept] == ids[:len(kept)]
    assert gen.decode(ids[:len(kept)]).startswith(text) and len(gen.decode(ids[:len(kept) - 1])) < len(text)
    # Streamed: the same logprobs, those of the tokens whose text each chunk completes.
    stream = list(gen.stream(gen.submit(GenerationRequest(
        token_ids=PROMPT, params=SamplingParams(stop_sequences=(stop,), **sampled), max_new_tokens_set=True)), None))
    assert "".join(c.text for c in stream) == text
    assert [lp for c in stream for lp in c.logprobs] == kept


def test_streamed_logprobs_go_with_their_token_ids(gen):
    seq, text, ids, _ = run(gen, max_new_tokens=16, logprobs=True, top_logprobs=3)
    chunks = list(gen.stream(gen.submit(GenerationRequest(
        token_ids=PROMPT, params=SamplingParams(max_new_tokens=16, logprobs=True, top_logprobs=3),
        max_new_tokens_set=True)), None))
    assert all([lp.token_id for lp in c.logprobs] == c.token_ids for c in chunks)
    assert [lp for c in chunks for lp in c.logprobs] == logprobs_of(gen, seq, text)


@pytest.mark.parametrize("sampling,field", [
    (pb.SamplingParams(presence_penalty=math.nan), "sampling.presence_penalty"),
    (pb.SamplingParams(presence_penalty=3.0), "sampling.presence_penalty"),
    (pb.SamplingParams(frequency_penalty=-2.5), "sampling.frequency_penalty"),
    (pb.SamplingParams(frequency_penalty=math.inf), "sampling.frequency_penalty"),
    (pb.SamplingParams(logprobs=True, top_logprobs=21), "sampling.top_logprobs"),
    (pb.SamplingParams(logprobs=True, top_logprobs=-1), "sampling.top_logprobs"),
    (pb.SamplingParams(top_logprobs=2), "sampling.top_logprobs"),  # needs logprobs, as in OpenAI's API
])
def test_out_of_bounds_values_are_invalid_argument_naming_the_field(sampling, field):
    with pytest.raises(InvalidArgument) as error:
        sampling_of(sampling)
    assert field_of(error.value) == field


def test_bounds_themselves_pass():
    p = sampling_of(pb.SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, logprobs=True, top_logprobs=20))
    assert (p.presence_penalty, p.frequency_penalty, p.logprobs, p.top_logprobs) == (-2.0, 2.0, True, 20)


@pytest.fixture(scope="module")
def stub(folder, tmp_path_factory):
    with serving_folder(folder, tmp_path_factory.mktemp("lp-server")) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def test_replies_carry_logprobs_over_grpc(stub, gen, model):
    sampling = pb.SamplingParams(max_new_tokens=10, logprobs=True, top_logprobs=3, frequency_penalty=0.5)
    reply = stub.Generate(pb.GenerateRequest(model="gpt", token_ids=pb.TokenIds(ids=PROMPT), sampling=sampling))
    expected, steps = reference(model, PROMPT, 10, frequency=0.5)
    assert list(reply.token_ids) == expected and [lp.token_id for lp in reply.logprobs] == expected
    assert all(math.isclose(lp.logprob, float(s[lp.token_id]), abs_tol=1e-4) and len(lp.top) == 3
               for lp, s in zip(reply.logprobs, steps, strict=True))
    chunks = list(stub.GenerateStream(pb.GenerateStreamRequest(model="gpt", token_ids=pb.TokenIds(ids=PROMPT),
                                                               sampling=sampling)))
    assert [lp for c in chunks for lp in c.logprobs] == list(reply.logprobs)
    plain = stub.Generate(pb.GenerateRequest(model="gpt", token_ids=pb.TokenIds(ids=PROMPT),
                                             sampling=pb.SamplingParams(max_new_tokens=4)))
    assert len(plain.token_ids) == 4 and not plain.logprobs


@pytest.mark.parametrize("sampling,field", [
    (pb.SamplingParams(presence_penalty=math.nan), "sampling.presence_penalty"),
    (pb.SamplingParams(frequency_penalty=3.0), "sampling.frequency_penalty"),
    (pb.SamplingParams(logprobs=True, top_logprobs=21), "sampling.top_logprobs"),
])
def test_out_of_bounds_values_are_invalid_argument_over_grpc(stub, sampling, field):
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(pb.GenerateRequest(model="gpt", token_ids=pb.TokenIds(ids=PROMPT), sampling=sampling))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(error.value) == field
