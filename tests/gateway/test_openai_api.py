"""The gateway through the official OpenAI SDK equals the inference service's gRPC answers."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest

from fastserve.client import sampling_params
from fastserve.inference.v1 import inference_pb2 as pb
from tests.gateway.conftest import BUSY, CHAT, EMBED

CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Return the items"}]


def test_models_are_the_ready_ones(openai_client, base_url):
    ids = [m.id for m in openai_client.models.list().data]
    assert {CHAT, BUSY, EMBED} <= set(ids) and len(ids) == len(set(ids))
    card = openai_client.models.retrieve(CHAT)
    assert (card.id, card.object, card.owned_by) == (CHAT, "model", "fastserve") and card.created > 0
    assert httpx.get(f"{base_url}/health").status_code == 200
    assert httpx.get(f"{base_url}/docs").status_code == 200


def test_chat_completion_is_the_grpc_chat(openai_client, grpc_client):
    reply = openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=12, temperature=0)
    direct = grpc_client.chat(CHAT, CONVERSATION, sampling_params(max_new_tokens=12))
    choice = reply.choices[0]
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == CHAT
    assert choice.message.role == "assistant" and choice.message.content == direct.text != ""
    assert choice.finish_reason == ("length" if direct.finish_reason == pb.FINISH_REASON_LENGTH else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (direct.usage.prompt_tokens,
                                                                           direct.usage.completion_tokens)
    assert reply.usage.total_tokens == direct.usage.prompt_tokens + direct.usage.completion_tokens
    # Content as a list of text parts is the same message; max_completion_tokens is max_tokens.
    parts = [CONVERSATION[0], {"role": "user", "content": [{"type": "text", "text": "Return "},
                                                           {"type": "text", "text": "the items"}]}]
    again = openai_client.chat.completions.create(model=CHAT, messages=parts, max_completion_tokens=12)
    assert again.choices[0].message.content == direct.text


def test_chat_stream_is_the_whole_reply(openai_client):
    whole = openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=20)
    chunks = list(openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=20,
                                                        stream=True, stream_options={"include_usage": True}))
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # Without include_usage no usage chunk; the raw stream ends with [DONE].
    plain = list(openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=20,
                                                       stream=True))
    assert all(c.choices for c in plain)


def test_raw_stream_ends_with_done(base_url):
    body = {"model": CHAT, "messages": CONVERSATION, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_completions_are_grpc_generate(openai_client, grpc_client):
    prompts = ["def main", "import os\n", "class Point"]
    reply = openai_client.completions.create(model=CHAT, prompt=prompts, max_tokens=10, temperature=0)
    direct = [grpc_client.generate(CHAT, p, sampling_params(max_new_tokens=10)) for p in prompts]
    assert [c.index for c in reply.choices] == [0, 1, 2] and reply.object == "text_completion"
    assert [c.text for c in reply.choices] == [d.text for d in direct]
    assert reply.usage.completion_tokens == sum(d.usage.completion_tokens for d in direct)
    one = openai_client.completions.create(model=CHAT, prompt=prompts[1], max_tokens=10, echo=True)
    assert one.choices[0].text == prompts[1] + direct[1].text
    # Token ids, one prompt and a list of them; the default length is OpenAI's 16.
    ids = [5, 17, 42, 9]
    by_ids = grpc_client.generate(CHAT, ids, sampling_params(max_new_tokens=16))
    assert openai_client.completions.create(model=CHAT, prompt=ids).choices[0].text == by_ids.text
    twice = openai_client.completions.create(model=CHAT, prompt=[ids, ids]).choices
    assert [c.text for c in twice] == [by_ids.text] * 2
    streamed = list(openai_client.completions.create(model=CHAT, prompt=prompts[:2], max_tokens=10, stream=True))
    for index in (0, 1):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == index) == direct[index].text


def test_embeddings_are_grpc_embed(openai_client, grpc_client, base_url):
    texts = ["a cat sat on the mat", "gRPC and HTTP"]
    direct = grpc_client.embed(EMBED, texts)
    floats = openai_client.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    for got, want in zip(floats.data, direct.embeddings, strict=True):
        assert np.array_equal(np.float32(got.embedding), np.float32(want.values))
    raw = httpx.post(f"{base_url}/v1/embeddings",
                     json={"model": EMBED, "input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    # A batch of one is padded otherwise than the pair above: compare with the same call over gRPC.
    assert np.array_equal(decoded, np.float32(grpc_client.embed(EMBED, texts[:1]).embeddings[0].values))
    # The SDK's default asks for base64 and decodes it itself.
    assert np.array_equal(np.float32(openai_client.embeddings.create(model=EMBED, input=texts[1]).data[0].embedding),
                          np.float32(grpc_client.embed(EMBED, texts[1:]).embeddings[0].values))
    same = openai_client.embeddings.create(model=EMBED, input="x", dimensions=direct.dimension)
    assert len(same.data[0].embedding) == direct.dimension


def test_a_seeded_sample_is_reproduced(openai_client, grpc_client):
    def sample(seed):
        return openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=24,
                                                     temperature=1.0, top_p=0.95, seed=seed).choices[0].message.content
    first, second, other = sample(7), sample(7), sample(8)
    direct = grpc_client.chat(CHAT, CONVERSATION, sampling_params(max_new_tokens=24, temperature=1.0, top_p=0.95,
                                                                   seed=7))
    assert first == second == direct.text and other != first


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stop_strings_are_never_in_the_output(openai_client, endpoint):
    def run(**kwargs):
        # A seeded sample: the greedy chat reply of this random model is newlines only.
        kwargs.update(temperature=1.0, seed=11)
        if endpoint == "chat":
            return openai_client.chat.completions.create(model=CHAT, messages=CONVERSATION, max_tokens=30,
                                                         **kwargs).choices[0]
        return openai_client.completions.create(model=CHAT, prompt="def main", max_tokens=30, **kwargs).choices[0]

    def text(choice):
        return choice.message.content if endpoint == "chat" else choice.text

    free = text(run())
    # Two visible characters from the middle of the free text on.
    at = next(i for i in range(len(free) // 2, len(free) - 1) if free[i:i + 2].strip() == free[i:i + 2])
    stop = free[at:at + 2]
    stopped = run(stop=[stop, "never-in-this-text"])
    assert stopped.finish_reason == "stop" and stop not in text(stopped)
    assert text(stopped) == free[:free.index(stop)]
