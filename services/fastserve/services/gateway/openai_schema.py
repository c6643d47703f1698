"""Request models of the OpenAI endpoints, with the inference service's bounds (see inference.proto's
SamplingParams): every number finite and bounded, every list and string capped. Unknown fields are
ignored, as OpenAI's SDKs send fields of newer API versions; fields the engine cannot honour are
refused in `translate`, never dropped."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_MESSAGES = 256
MAX_STOP = 16
MAX_NEW_TOKENS = 8192
MAX_PROMPTS = 64
MAX_TEXT = 1 << 20
MAX_TOKEN_IDS = 1 << 16
MAX_N = 16  # the engine's bound: each completion takes a place in the model's batch
MAX_SCHEMA_BYTES = 1 << 16  # the engine's bound on ResponseFormat.json_schema

Finite = {"allow_inf_nan": False}
Temperature = Annotated[float, Field(ge=0.0, le=100.0, **Finite)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, **Finite)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]
Seed = Annotated[int, Field(ge=0, lt=2**63)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, **Finite)]
StopString = Annotated[str, Field(min_length=1, max_length=256)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchema(_Request):
    """OpenAI's `response_format.json_schema`. `strict` is accepted and changes nothing: the engine always
    constrains the output to the schema."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's `response_format`, a union of three shapes told apart by `type`: `text`, `json_object`, and
    `json_schema` with its `json_schema`. One model rather than a pydantic tagged union because a tagged union
    puts the tag into the error's location (`response_format.json_schema.json_schema.name`), and the gateway's
    errors name the field as OpenAI does (`response_format.type`, `response_format.json_schema.name`)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("a response_format of type json_schema needs its json_schema")
            size = len(self.schema_text().encode())
            if size > MAX_SCHEMA_BYTES:
                raise ValueError(f"the schema is {size} bytes as JSON, over the {MAX_SCHEMA_BYTES} this server takes")
        return self

    def schema_text(self) -> str:
        """The schema as the engine takes it: JSON text (empty but for type json_schema)."""
        if self.type != "json_schema" or self.json_schema is None:
            return ""
        return json.dumps(self.json_schema.schema_, separators=(",", ":"), ensure_ascii=False)


class _Sampling(_Request):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, float] | None = None
    # OpenAI's legacy completions have none; vLLM takes it there as in chat, and so does this server.
    response_format: ResponseFormat | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None


TokenList = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKEN_IDS)]


class CompletionRequest(_Sampling):
    prompt: (Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenList
             | Annotated[list[TokenList], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: MaxTokens | None = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_bools(cls, value):
        # pydantic would read `true` as the token id 1.
        if isinstance(value, list) and any(isinstance(v, bool) for v in value):
            raise ValueError("token ids must be integers")
        return value


class EmbeddingRequest(_Request):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: (Text | Annotated[list[Text], Field(min_length=1, max_length=2048)] | TokenList
            | Annotated[list[TokenList], Field(min_length=1, max_length=2048)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=65536)] | None = None
    user: str | None = None
