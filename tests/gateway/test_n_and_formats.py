"""`n` completions and structured output (`response_format`) through the official OpenAI SDK: the choices are
the inference service's completions, streamed ones interleave by index, and constrained replies parse."""

from __future__ import annotations

import json

import jsonschema
import pytest

from fastserve.client import sampling_params
from fastserve.inference.v1 import inference_pb2 as pb
from tests.gateway.conftest import CHAT

CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Return the items"}]
PROMPTS = ["def main", "import os\n"]
SCHEMA = {"type": "object",
          "properties": {"ok": {"type": "boolean"}, "name": {"type": "string", "maxLength": 12},
                         "color": {"enum": ["red", "green"]}},
          "required": ["ok", "name", "color"], "additionalProperties": False}


def sampled(n: int, max_new_tokens: int, seed: int):
    params = sampling_params(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    params.n = n
    return params


def test_n_chat_choices_are_the_grpc_completions(openai_client, grpc_client):
    def ask():
        return openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=24,
                                                     temperature=1.0, seed=9, n=2)
    first, second = ask(), ask()
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in second.choices] and texts[0] != texts[1]
    direct = grpc_client.chat(CHAT, CONVERSATION, sampled(2, 24, 9))
    assert texts == [c.text for c in direct.completions]
    assert [c.finish_reason for c in first.choices] == [
        "length" if c.finish_reason == pb.FINISH_REASON_LENGTH else "stop" for c in direct.completions]
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (direct.usage.prompt_tokens,
                                                                          direct.usage.completion_tokens)
    # Completion i samples with seed + i: each is the n=1 reply of its seed, and the usage is theirs summed
    # with the prompt counted once.
    ones = [openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=24, temperature=1.0,
                                                  seed=seed) for seed in (9, 10)]
    assert [o.choices[0].message.content for o in ones] == texts
    assert first.usage.completion_tokens == sum(o.usage.completion_tokens for o in ones)
    assert first.usage.prompt_tokens == ones[0].usage.prompt_tokens


def test_n_chat_stream_interleaves_by_index(openai_client):
    kwargs = {"model": CHAT, "messages": CONVERSATION, "max_tokens": 24, "temperature": 1.0, "seed": 9, "n": 2,
              "logprobs": True}
    reply = openai_client.chat.completions.create(**kwargs)
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1}
    for choice in reply.choices:
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == choice.index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        finishes = [c.finish_reason for c in mine]
        assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
        streamed = [e.model_dump() for c in mine if c.logprobs for e in c.logprobs.content]
        assert streamed == [e.model_dump() for e in choice.logprobs.content]


def test_n_completions_number_choices_by_prompt(openai_client, grpc_client):
    kwargs = {"model": CHAT, "prompt": PROMPTS, "max_tokens": 12, "temperature": 1.0, "seed": 4, "n": 2}
    reply = openai_client.completions.create(**kwargs)
    direct = [grpc_client.generate(CHAT, p, sampled(2, 12, 4)) for p in PROMPTS]
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    # OpenAI's numbering: choice prompt_index * n + completion index.
    assert [c.text for c in reply.choices] == [c.text for d in direct for c in d.completions]
    assert reply.usage.completion_tokens == sum(d.usage.completion_tokens for d in direct)
    assert reply.usage.prompt_tokens == sum(d.usage.prompt_tokens for d in direct)
    chunks = list(openai_client.completions.create(**kwargs, stream=True))
    for choice in reply.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_json_schema_reply_validates(openai_client, seed):
    form = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    choice = openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=200,
                                                   temperature=1.0, seed=seed, response_format=form).choices[0]
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert choice.finish_reason == "stop"


def test_a_json_object_reply_parses(openai_client, grpc_client):
    reply = openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=200,
                                                  temperature=1.0, seed=5,
                                                  response_format={"type": "json_object"}).choices[0]
    assert isinstance(json.loads(reply.message.content), dict) and reply.finish_reason == "stop"
    # Free text from the same seed is no JSON: the format did constrain it.
    free = grpc_client.chat(CHAT, CONVERSATION, sampled(1, 200, 5)).text
    try:
        parsed = json.loads(free)
    except json.JSONDecodeError:
        parsed = None
    assert not isinstance(parsed, dict)


def test_completions_take_a_response_format(openai_client):
    form = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    choice = openai_client.completions.create(model=CHAT, prompt=PROMPTS[0], max_tokens=200, temperature=1.0, seed=1,
                                              extra_body={"response_format": form}).choices[0]
    jsonschema.validate(json.loads(choice.text), SCHEMA)
    assert choice.finish_reason == "stop"
