"""OpenAI requests to the inference service's calls and its replies back to OpenAI's JSON.

Requests: the sampling fields map one to one onto SamplingParams; what the engine cannot honour is refused
by name (`unsupported`), never dropped. Replies: a unary reply becomes one response; a gRPC stream's
messages become chunks through `ChatStream` and `CompletionStream`, which keep the per-choice state a
stream needs (a choice's text offset, which choices have ended) so that the routes only relay.

Choices: with `n` > 1 the engine returns `completions` (by index) beside completion 0's top-level fields, and
a stream's messages carry their completion's `index`; a completion request's prompts each get `n` choices,
choice `prompt_index * n + index` as OpenAI numbers them.
"""

from __future__ import annotations

import base64
import contextlib
import struct
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from fastserve.client import ClientError, sampling_params
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.services.gateway.errors import GatewayError, from_client_error, unsupported
from fastserve.services.gateway.openai_schema import ChatCompletionRequest, CompletionRequest, _Sampling

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_EOS: "stop", pb.FINISH_REASON_LENGTH: "length"}
# OpenAI's newer name for the system role.
_ROLES = {"developer": "system"}
_FORMATS = {"json_object": pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT, "json_schema": pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA}


def finish_reason(reason: int) -> str | None:
    return _FINISH.get(reason)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def choices_per_prompt(request: _Sampling) -> int:
    return request.n or 1


# --- requests ---------------------------------------------------------------------------------------------------

def _refuse_common(request: _Sampling) -> None:
    if request.logit_bias:
        raise unsupported("logit_bias")


def sampling(request: _Sampling, max_tokens: int | None, top_logprobs: int | None = None) -> pb.SamplingParams:
    """The request's SamplingParams; `top_logprobs` not None asks for logprobs with that many alternatives."""
    params = sampling_params(max_new_tokens=max_tokens, temperature=request.temperature or 0.0,
                             seed=request.seed, stop=request.stops())
    # OpenAI's top_p=1 is no filtering, as the engine's 0 is.
    if request.top_p is not None and request.top_p < 1.0:
        params.top_p = request.top_p
    if request.presence_penalty is not None:
        params.presence_penalty = request.presence_penalty
    if request.frequency_penalty is not None:
        params.frequency_penalty = request.frequency_penalty
    if top_logprobs is not None:
        params.logprobs, params.top_logprobs = True, top_logprobs
    if choices_per_prompt(request) > 1:
        params.n = choices_per_prompt(request)
    form = request.response_format
    # "text" is the engine's default: left unset, so a server without structured output serves it too.
    if form is not None and form.type != "text":
        params.response_format.CopyFrom(pb.ResponseFormat(type=_FORMATS[form.type], json_schema=form.schema_text()))
    return params


def chat_call(request: ChatCompletionRequest) -> tuple[list[dict[str, str]], pb.SamplingParams]:
    """The messages and sampling of a chat completion; fields the engine lacks are refused by name."""
    _refuse_common(request)
    if request.top_logprobs and not request.logprobs:
        raise GatewayError(400, "top_logprobs needs logprobs: set logprobs to true", "top_logprobs", "invalid_value")
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
    return messages, sampling(request, limit, (request.top_logprobs or 0) if request.logprobs else None)


def completion_call(request: CompletionRequest) -> tuple[list[str | list[int]], pb.SamplingParams]:
    """Each prompt of a completion request, in order, and their sampling; fields the engine lacks are refused
    by name."""
    _refuse_common(request)
    if request.best_of not in (None, 1):
        raise unsupported("best_of", "best_of > 1")
    if request.suffix:
        raise unsupported("suffix")
    if request.echo and request.logprobs is not None:
        # OpenAI gives the prompt's logprobs with echo; the engine computes those of generated tokens only.
        raise GatewayError(400, "logprobs with echo is not supported: this server gives the logprobs of generated "
                                "tokens only, not the prompt's; drop echo or logprobs", "logprobs",
                           "unsupported_parameter")
    prompt = request.prompt
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if request.echo and any(not isinstance(p, str) for p in items):
        raise unsupported("echo", "echo with a token-id prompt (the gateway cannot decode ids)")
    return items, sampling(request, request.max_tokens, request.logprobs)


# The completions endpoint's `logprobs` is the number of alternatives: the engine's top_logprobs.
_COMPLETION_PARAMS = {"top_logprobs": "logprobs"}


@contextlib.contextmanager
def completion_errors() -> Iterator[None]:
    """The inference service's refusals of a completion request, with the fields under their names there."""
    try:
        yield
    except ClientError as error:
        raise completion_failure(error) from None


def completion_failure(error: ClientError) -> GatewayError:
    failure = from_client_error(error)
    failure.param = _COMPLETION_PARAMS.get(failure.param, failure.param)
    return failure


# --- replies ----------------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choices(reply) -> list[tuple[int, str, int, Sequence[pb.TokenLogprob]]]:
    """(index, text, finish reason, logprobs) of each completion of a unary reply."""
    if reply.completions:
        return [(c.index, c.text, c.finish_reason, c.logprobs) for c in reply.completions]
    return [(0, reply.text, reply.finish_reason, reply.logprobs)]


def _entry(token: str, logprob: float) -> dict:
    # The token's text decoded alone: a token holding part of a character reads U+FFFD, and so do its bytes.
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(logprobs: Sequence[pb.TokenLogprob]) -> dict:
    """OpenAI's chat `logprobs` of these tokens: `{"content": [...], "refusal": None}`."""
    return {"content": [{**_entry(t.text, t.logprob), "top_logprobs": [_entry(a.text, a.logprob) for a in t.top]}
                        for t in logprobs], "refusal": None}


def completion_logprobs(logprobs: Sequence[pb.TokenLogprob], offset: int = 0) -> dict:
    """OpenAI's legacy completion `logprobs` of these tokens, the first at character `offset` of the choice's text.
    `top_logprobs` holds each step's alternatives and, as OpenAI's do, the chosen token (so up to k + 1)."""
    tokens, values, tops, offsets = [], [], [], []
    for t in logprobs:
        tokens.append(t.text)
        values.append(t.logprob)
        top: dict[str, float] = {}
        for a in t.top:
            top.setdefault(a.text, a.logprob)  # two tokens may decode alike (U+FFFD): the likelier one's
        top.setdefault(t.text, t.logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_completion(model: str, reply: pb.ChatResponse, logprobs: bool = False) -> dict:
    choices = [{"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": chat_logprobs(lps) if logprobs else None, "finish_reason": finish_reason(reason)}
               for index, text, reason, lps in _choices(reply)]
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": model,
            "choices": choices, "usage": usage(reply.usage.prompt_tokens, reply.usage.completion_tokens)}


def completion(model: str, replies: list[tuple[str, pb.GenerateResponse]], echo: bool, n: int = 1,
               logprobs: bool = False) -> dict:
    """One response of the replies to each prompt (with the prompt's text, "" for token ids), `n` choices each."""
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for number, (prompt, reply) in enumerate(replies):
        for index, text, reason, lps in _choices(reply):
            choices.append({"index": number * n + index, "text": (prompt if echo else "") + text,
                            "logprobs": completion_logprobs(lps) if logprobs else None,
                            "finish_reason": finish_reason(reason)})
        prompt_tokens += reply.usage.prompt_tokens
        completion_tokens += reply.usage.completion_tokens
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


@dataclass
class _Stream:
    model: str
    n: int = 1
    logprobs: bool = False
    include_usage: bool = False
    ident: str = ""
    created: int = field(default_factory=now)

    def _chunk(self, choice: dict) -> dict:
        chunk = {"id": self.ident, "object": self.object, "created": self.created, "model": self.model,
                 "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, last) -> dict:
        """The chunk of the whole request's usage, with no choices: `last` is the stream's last message, the
        one that has the usage of all n completions."""
        return {"id": self.ident, "object": self.object, "created": self.created, "model": self.model,
                "choices": [], "usage": usage(last.usage.prompt_tokens, last.usage.completion_tokens)}


@dataclass
class ChatStream(_Stream):
    """chat.completion.chunk dicts of a ChatStream: a role chunk per choice, then each message's content (and
    logprobs) and, on a choice's last message, its finish chunk."""

    object: str = "chat.completion.chunk"

    def __post_init__(self) -> None:
        self.ident = self.ident or new_id("chatcmpl")

    def _choice(self, index: int, delta: dict, lps=None, finish: str | None = None) -> dict:
        return self._chunk({"index": index, "delta": delta,
                            "logprobs": chat_logprobs(lps) if lps is not None else None, "finish_reason": finish})

    def opening(self) -> list[dict]:
        return [self._choice(i, {"role": "assistant", "content": ""}) for i in range(self.n)]

    def chunks(self, part: pb.ChatStreamResponse) -> list[dict]:
        out = []
        if part.text or (self.logprobs and part.logprobs):
            out.append(self._choice(part.index, {"content": part.text}, part.logprobs if self.logprobs else None))
        if part.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            out.append(self._choice(part.index, {}, None, finish_reason(part.finish_reason)))
        return out


@dataclass
class CompletionStream(_Stream):
    """text_completion chunks of the GenerateStream of each prompt in turn (`start(prompt_index)`): the
    echoed prompt per choice, each message's text (and logprobs, with text offsets running on over the
    choice's text) and, on a choice's last message, its finish chunk."""

    object: str = "text_completion"
    echo: bool = False
    prompt_index: int = 0
    offsets: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ident = self.ident or new_id("cmpl")

    def _choice(self, index: int, text: str, lps=None, finish: str | None = None) -> dict:
        return self._chunk({"index": index, "text": text, "logprobs": lps, "finish_reason": finish})

    def start(self, prompt_index: int, prompt) -> list[dict]:
        self.prompt_index = prompt_index
        if not self.echo:
            return []
        out = []
        for index in range(prompt_index * self.n, (prompt_index + 1) * self.n):
            self.offsets[index] = len(prompt)
            out.append(self._choice(index, prompt))
        return out

    def chunks(self, part: pb.GenerateStreamResponse) -> list[dict]:
        index = self.prompt_index * self.n + part.index
        out = []
        if part.text or (self.logprobs and part.logprobs):
            lps = None
            if self.logprobs:
                offset = self.offsets.get(index, 0)
                lps = completion_logprobs(part.logprobs, offset)
                self.offsets[index] = offset + sum(len(t.text) for t in part.logprobs)
            out.append(self._choice(index, part.text, lps))
        if part.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            out.append(self._choice(index, "", None, finish_reason(part.finish_reason)))
        return out


# --- embeddings -------------------------------------------------------------------------------------------------

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
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}}
