"""n completions of one prompt and structured output, on a real tiny GPT-2 in the engine and over gRPC.

n: the later completions copy the first's cached prompt (the shared-prefill counter moves by what they did
not compute), each samples as a request of its own with seed + i would, and they are refused or cancelled
together. Structured output: whatever a random-ish model prefers, the masked completion parses and matches its
schema, and ends on EOS once the format is complete."""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest

from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.runtime.errors import FailedPrecondition, InvalidArgument
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.generator import GenerationRequest, Generator
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.services.inference.sequence import Finish
from fastserve.services.inference.structured_output import ResponseFormat
from tests.support.processes import serving_folder
from tests.support.rpc import field_of
from tests.support.tiny_models import build_causal_lm

PROMPT = [5, 17, 42, 9, 100, 3, 77, 12]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 8},
                                           "color": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "name", "color"], "additionalProperties": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_causal_lm(tmp_path_factory.mktemp("nf") / "gpt", vocab=300, documents=300, train_steps=40)


@pytest.fixture(scope="module")
def gen(folder):
    g = Generator("nf", folder, "float32", GenerationSettings(max_batch_size=8))
    yield g
    g.drain()


def complete(gen: Generator, prompt: list[int] = PROMPT, **params):
    seqs = gen.submit(GenerationRequest(token_ids=prompt, params=SamplingParams(**params).validate(),
                                        max_new_tokens_set=True))
    return gen.complete(seqs, None)


def shared_prefill(gen: Generator) -> float:
    return gen.engine.metrics.shared_prefill._value.get()


def test_n_completions_are_each_what_a_request_with_seed_plus_i_gives(gen):
    sampled = {"max_new_tokens": 12, "temperature": 1.0, "top_k": 50}
    before = shared_prefill(gen)
    completions, usage = complete(gen, n=3, seed=40, **sampled)
    assert shared_prefill(gen) - before == 2 * (len(PROMPT) - 1)  # the two later ones copied the prompt
    assert [c.index for c in completions] == [0, 1, 2]
    alone = [complete(gen, seed=40 + i, **sampled)[0][0].token_ids for i in range(3)]
    assert [c.token_ids for c in completions] == alone
    assert len({tuple(ids) for ids in alone}) == 3  # different seeds, different samples
    assert usage.prompt_tokens == len(PROMPT) and usage.completion_tokens == 36


def test_greedy_completions_are_equal_and_equal_a_single_one(gen):
    completions, _ = complete(gen, n=2, max_new_tokens=10)
    single = complete(gen, max_new_tokens=10)[0][0]
    assert [c.token_ids for c in completions] == [single.token_ids] * 2
    assert completions[1].text == single.text


def test_n_streams_interleave_and_each_ends_with_its_finish(gen):
    request = GenerationRequest(token_ids=PROMPT, params=SamplingParams(n=2, max_new_tokens=9, temperature=0.8,
                                                                        seed=3), max_new_tokens_set=True)
    chunks = list(gen.stream(gen.submit(request), None))
    whole, usage = complete(gen, n=2, max_new_tokens=9, temperature=0.8, seed=3)
    for c in whole:
        mine = [k for k in chunks if k.index == c.index]
        assert "".join(k.text for k in mine) == c.text and [t for k in mine for t in k.token_ids] == c.token_ids
        assert [k.finish for k in mine][-1] is Finish.LENGTH and all(k.finish is None for k in mine[:-1])
    assert [k.usage is not None for k in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].usage.completion_tokens == usage.completion_tokens == 18


def test_n_over_the_bound_names_the_field():
    with pytest.raises(InvalidArgument) as error:
        SamplingParams(n=17).validate()
    assert field_of(error.value) == "sampling.n"


def test_n_sequences_are_refused_together_when_they_do_not_fit(folder):
    g = Generator("nf-small", folder, "float32", GenerationSettings(max_batch_size=1, max_queue_size=1))
    try:
        from fastserve.runtime.errors import ResourceExhausted

        with pytest.raises(ResourceExhausted):  # one slot and one queue place: three do not fit
            g.submit(GenerationRequest(token_ids=PROMPT, params=SamplingParams(n=3, max_new_tokens=2)))
        assert g.engine.scheduler.active == [] and g.engine.incoming == []
    finally:
        g.drain()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_json_schema_completion_parses_and_matches_its_schema(gen, seed):
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA))
    [c], _ = complete(gen, max_new_tokens=120, temperature=1.0, seed=seed, response_format=fmt)
    assert c.finish is Finish.EOS, c.text
    jsonschema.validate(json.loads(c.text), SCHEMA)


def test_json_mode_gives_an_object(gen):
    completions, _ = complete(gen, max_new_tokens=200, temperature=0.7, seed=5, n=2,
                              response_format=ResponseFormat("json_object"))
    for c in completions:
        if c.finish is Finish.EOS:
            assert isinstance(json.loads(c.text), dict)
        else:  # cut by max_new_tokens: still the start of an object
            assert c.finish is Finish.LENGTH and c.text.startswith("{")
    assert any(c.finish is Finish.EOS for c in completions)


def test_a_format_does_not_leak_into_the_other_sequences_of_a_batch(gen):
    fmt = ResponseFormat("json_schema", json.dumps(SCHEMA))
    formatted = gen.submit(GenerationRequest(token_ids=PROMPT, max_new_tokens_set=True, params=SamplingParams(
        max_new_tokens=120, temperature=1.0, seed=9, response_format=fmt)))
    free = gen.submit(GenerationRequest(token_ids=PROMPT, max_new_tokens_set=True,
                                        params=SamplingParams(max_new_tokens=12)))
    [c], _ = gen.complete(formatted, None)
    [f], _ = gen.complete(free, None)
    jsonschema.validate(json.loads(c.text), SCHEMA)
    assert f.token_ids == complete(gen, max_new_tokens=12)[0][0].token_ids


def test_a_model_without_eos_cannot_take_a_format(tmp_path):
    folder = build_causal_lm(tmp_path / "no-eos", vocab=300, documents=100, train_steps=0, eos=False)
    g = Generator("no-eos", folder, "float32", GenerationSettings(max_batch_size=2))
    try:
        with pytest.raises(FailedPrecondition) as error:
            g.submit(GenerationRequest(token_ids=PROMPT, params=SamplingParams(
                response_format=ResponseFormat("json_object"))))
        assert field_of(error.value) == "sampling.response_format"
    finally:
        g.drain()


@pytest.fixture(scope="module")
def stub(folder, tmp_path_factory):
    with serving_folder(folder, tmp_path_factory.mktemp("nf-server")) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def test_n_and_a_schema_over_grpc(stub):
    sampling = pb.SamplingParams(max_new_tokens=120, temperature=1.0, seed=21, n=2, response_format=pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=json.dumps(SCHEMA)))
    reply = stub.Generate(pb.GenerateRequest(model="gpt", token_ids=pb.TokenIds(ids=PROMPT), sampling=sampling))
    assert [c.index for c in reply.completions] == [0, 1] and reply.text == reply.completions[0].text
    for c in reply.completions:
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert reply.usage.completion_tokens == sum(len(c.token_ids) for c in reply.completions)
    chunks = list(stub.GenerateStream(pb.GenerateStreamRequest(model="gpt", token_ids=pb.TokenIds(ids=PROMPT),
                                                               sampling=sampling)))
    for c in reply.completions:
        assert "".join(k.text for k in chunks if k.index == c.index) == c.text


@pytest.mark.parametrize("sampling,field", [
    (pb.SamplingParams(n=17), "sampling.n"),
    (pb.SamplingParams(response_format=pb.ResponseFormat(type=9)), "sampling.response_format.type"),
    (pb.SamplingParams(response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA)),
     "sampling.response_format.json_schema"),
    (pb.SamplingParams(response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                                                         json_schema="{not json")),
     "sampling.response_format.json_schema"),
])
def test_bad_values_are_invalid_argument_naming_the_field(stub, sampling, field):
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(pb.GenerateRequest(model="gpt", token_ids=pb.TokenIds(ids=PROMPT), sampling=sampling))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(error.value) == field
