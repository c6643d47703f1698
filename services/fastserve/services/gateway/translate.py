"""OpenAI requests to the inference service's calls and its replies back to OpenAI's JSON."""

from __future__ import annotations

import base64
import struct
import time
import uuid

from fastserve.client import sampling_params
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.services.gateway.errors import GatewayError, unsupported
from fastserve.services.gateway.openai_schema import ChatCompletionRequest, CompletionRequest, _Sampling

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_EOS: "stop", pb.FINISH_REASON_LENGTH: "length"}
# OpenAI's newer name for the system role.
_ROLES = {"developer": "system"}


def finish_reason(reason: int) -> str | None:
    return _FINISH.get(reason)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _refuse_common(request: _Sampling) -> None:
    if request.n not in (None, 1):
        raise unsupported("n", "n > 1")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise unsupported(name, f"a non-zero {name}")
    if request.logit_bias:
        raise unsupported("logit_bias")


def sampling(request: _Sampling, max_tokens: int | None) -> pb.SamplingParams:
    params = sampling_params(max_new_tokens=max_tokens, temperature=request.temperature or 0.0,
                             seed=request.seed, stop=request.stops())
    # OpenAI's top_p=1 is no filtering, as the engine's 0 is.
    if request.top_p is not None and request.top_p < 1.0:
        params.top_p = request.top_p
    return params


def chat_call(request: ChatCompletionRequest) -> tuple[list[dict[str, str]], pb.SamplingParams]:
    """The messages and sampling of a chat completion; fields the engine lacks yet are refused by name."""
    _refuse_common(request)
    if request.logprobs:
        raise unsupported("logprobs")
    if request.top_logprobs:
        raise unsupported("top_logprobs")
    if request.response_format and request.response_format.get("type") != "text":
        raise unsupported("response_format", f"response_format {request.response_format.get('type')!r}")
    if request.tools or request.functions:
        raise unsupported("tools" if request.tools else "functions", "tool calling")
    if request.tool_choice not in (None, "none"):
        raise unsupported("tool_choice", "tool calling")
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise GatewayError(400, "max_tokens and max_completion_tokens differ: give one", "max_completion_tokens",
                           "invalid_value")
    messages = []
    for i, m in enumerate(request.messages):
        if m.name:
            raise unsupported(f"messages[{i}].name", "a message name")
        messages.append({"role": _ROLES.get(m.role, m.role), "content": m.text()})
    limit = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    return messages, sampling(request, limit)


def prompts(request: CompletionRequest) -> list[str | list[int]]:
    """Each prompt of a completion request, in order; fields the engine lacks yet are refused by name."""
    _refuse_common(request)
    if request.logprobs is not None:
        raise unsupported("logprobs")
    if request.best_of not in (None, 1):
        raise unsupported("best_of", "best_of > 1")
    if request.suffix:
        raise unsupported("suffix")
    prompt = request.prompt
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if request.echo and any(not isinstance(p, str) for p in items):
        raise unsupported("echo", "echo with a token-id prompt (the gateway cannot decode ids)")
    return items


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(model: str, reply: pb.ChatResponse) -> dict:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "logprobs": None, "finish_reason": finish_reason(reply.finish_reason)}],
            "usage": usage(reply.usage.prompt_tokens, reply.usage.completion_tokens)}


def chat_chunk(ident: str, created: int, model: str, delta: dict, finish: str | None = None,
               with_usage: bool = False) -> dict:
    chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def completion(model: str, texts: list[tuple[str, pb.GenerateResponse]], echo: bool) -> dict:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index, (prompt, reply) in enumerate(texts):
        text = (prompt if echo else "") + reply.text
        choices.append({"index": index, "text": text, "logprobs": None,
                        "finish_reason": finish_reason(reply.finish_reason)})
        prompt_tokens += reply.usage.prompt_tokens
        completion_tokens += reply.usage.completion_tokens
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(ident: str, created: int, model: str, index: int, text: str, finish: str | None = None,
                     with_usage: bool = False) -> dict:
    chunk = {"id": ident, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def embedding_texts(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if value and not isinstance(value[0], str):
        raise GatewayError(400, "token-id input is not supported: the inference service embeds texts only; "
                                "send the input as text", "input", "unsupported_parameter")
    return list(value)


def embeddings(model: str, reply: pb.EmbedResponse, encoding: str, dimensions: int | None) -> dict:
    if dimensions is not None and dimensions != reply.dimension:
        raise GatewayError(400, f"dimensions {dimensions} is not supported: model {model!r} gives "
                                f"{reply.dimension}-dimensional embeddings", "dimensions", "unsupported_parameter")
    data = []
    for index, e in enumerate(reply.embeddings):
        values = list(e.values)
        vector = (base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
                  if encoding == "base64" else values)
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0}}
