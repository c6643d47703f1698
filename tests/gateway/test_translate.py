"""The translation of requests to SamplingParams and of the inference service's replies (n completions,
interleaved stream messages, logprobs) to OpenAI's JSON, on the protobuf messages themselves."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.services.gateway import translate
from fastserve.services.gateway.openai_schema import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def lp(text: str, logprob: float, *top: tuple[str, float]) -> pb.TokenLogprob:
    return pb.TokenLogprob(text=text, logprob=logprob, top=[pb.TopLogprob(text=t, logprob=v) for t, v in top])


def test_chat_fields_become_sampling_params():
    request = ChatCompletionRequest(model="m", messages=MESSAGES, n=3, logprobs=True, top_logprobs=2,
                                    presence_penalty=0.5, frequency_penalty=-1.0, max_tokens=7,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": SCHEMA}})
    _, params = translate.chat_call(request)
    assert (params.n, params.logprobs, params.top_logprobs, params.max_new_tokens) == (3, True, 2, 7)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    assert json.loads(params.response_format.json_schema) == SCHEMA
    # The neutral values leave the engine's defaults.
    _, plain = translate.chat_call(ChatCompletionRequest(model="m", messages=MESSAGES, n=1, logprobs=False,
                                                         response_format={"type": "text"}))
    assert not plain.HasField("response_format") and (plain.n, plain.logprobs) == (0, False)
    _, form = translate.chat_call(ChatCompletionRequest(model="m", messages=MESSAGES,
                                                        response_format={"type": "json_object"}))
    assert form.response_format == pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)


def test_completion_logprobs_count_is_top_logprobs():
    prompts, params = translate.completion_call(CompletionRequest(model="m", prompt=["a", "b"], logprobs=0))
    assert prompts == ["a", "b"] and (params.logprobs, params.top_logprobs) == (True, 0)
    _, params = translate.completion_call(CompletionRequest(model="m", prompt="a"))
    assert not params.logprobs


@pytest.mark.parametrize("form", [{"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}},
                                  {"type": "json_schema"}, {"type": "grammar"}])
def test_bad_response_formats_are_refused(form):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=MESSAGES, response_format=form)


def test_n_unary_choices_come_from_the_completions():
    reply = pb.ChatResponse(text="a", finish_reason=pb.FINISH_REASON_EOS,
                            completions=[pb.Completion(index=0, text="a", finish_reason=pb.FINISH_REASON_EOS,
                                                       logprobs=[lp("a", -0.5, ("a", -0.5))]),
                                         pb.Completion(index=1, text="bc", finish_reason=pb.FINISH_REASON_LENGTH,
                                                       logprobs=[lp("b", -1.0), lp("c", -2.0)])],
                            usage=pb.Usage(prompt_tokens=4, completion_tokens=3))
    body = translate.chat_completion("m", reply, logprobs=True)
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "a", "stop"), (1, "bc", "length")]
    assert body["choices"][0]["logprobs"]["content"] == [
        {"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [{"token": "a", "logprob": -0.5,
                                                                         "bytes": [97]}]}]
    assert [e["token"] for e in body["choices"][1]["logprobs"]["content"]] == ["b", "c"]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    # Several prompts: choice prompt_index * n + index.
    generated = [pb.GenerateResponse(completions=[pb.Completion(index=i, text=f"{p}{i}") for i in range(2)])
                 for p in "xy"]
    body = translate.completion("m", [("x", generated[0]), ("y", generated[1])], echo=True, n=2)
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "xx0"), (1, "xx1"), (2, "yy0"), (3, "yy1")]


def test_chat_stream_messages_interleave_by_index():
    stream = translate.ChatStream("m", n=2, logprobs=True, include_usage=True)
    opening = stream.opening()
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in opening] == [
        (0, {"role": "assistant", "content": ""}), (1, {"role": "assistant", "content": ""})]
    parts = [pb.ChatStreamResponse(index=1, text="b", logprobs=[lp("b", -1.0)]),
             pb.ChatStreamResponse(index=0, text="a", logprobs=[lp("a", -0.5)], finish_reason=pb.FINISH_REASON_STOP),
             pb.ChatStreamResponse(index=1, text="", logprobs=[lp("\ufffd", -3.0)]),
             pb.ChatStreamResponse(index=1, finish_reason=pb.FINISH_REASON_LENGTH,
                                   usage=pb.Usage(prompt_tokens=2, completion_tokens=3))]
    chunks = [c for part in parts for c in stream.chunks(part)]
    seen = [(c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]
    assert seen == [(1, {"content": "b"}, None), (0, {"content": "a"}, None), (0, {}, "stop"),
                    (1, {"content": ""}, None), (1, {}, "length")]
    assert [e["token"] for c in chunks if c["choices"][0]["logprobs"]
            for e in c["choices"][0]["logprobs"]["content"]] == ["b", "a", "\ufffd"]
    assert all(c["usage"] is None and c["id"] == stream.ident for c in opening + chunks)
    assert stream.usage_chunk(parts[-1])["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_completion_stream_offsets_run_on_per_choice():
    stream = translate.CompletionStream("m", n=2, logprobs=True, echo=False)
    assert stream.start(1, "prompt") == []
    parts = [pb.GenerateStreamResponse(index=0, text="ab", logprobs=[lp("a", -1.0, ("a", -1.0)), lp("b", -2.0)]),
             pb.GenerateStreamResponse(index=1, text="x", logprobs=[lp("x", -0.1)]),
             pb.GenerateStreamResponse(index=0, text="cd", logprobs=[lp("cd", -3.0, ("e", -2.5))],
                                       finish_reason=pb.FINISH_REASON_LENGTH)]
    chunks = [c["choices"][0] for part in parts for c in stream.chunks(part)]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in chunks] == [
        (2, "ab", None), (3, "x", None), (2, "cd", None), (2, "", "length")]
    assert chunks[0]["logprobs"] == {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0],
                                     "top_logprobs": [{"a": -1.0}, {"b": -2.0}], "text_offset": [0, 1]}
    # The chosen token joins its step's alternatives, as OpenAI's legacy logprobs have it.
    assert chunks[2]["logprobs"]["top_logprobs"] == [{"e": -2.5, "cd": -3.0}]
    assert chunks[2]["logprobs"]["text_offset"] == [2] and chunks[1]["logprobs"]["text_offset"] == [0]
    echoed = translate.CompletionStream("m", n=2, echo=True)
    assert [(c["choices"][0]["index"], c["choices"][0]["text"]) for c in echoed.start(0, "hi")] == [(0, "hi"),
                                                                                                    (1, "hi")]
