"""Client of `fastserve.inference.v1.InferenceService`: models, embeddings, classes, generation, chat."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from fastserve.client.calls import COMPUTE, GENERATE, LOAD, READ, ServiceClient
from fastserve.client.specs import enum_value
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.kserve.v2 import grpc_service_pb2_grpc


def sampling_params(max_new_tokens: int | None = None, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 0.0, repetition_penalty: float = 0.0, seed: int | None = None,
                    stop: Sequence[str] = ()) -> pb.SamplingParams:
    """Decoding parameters; the defaults are greedy decoding of the server's default length."""
    params = pb.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                               repetition_penalty=repetition_penalty, stop_sequences=list(stop))
    if max_new_tokens is not None:
        params.max_new_tokens = max_new_tokens
    if seed is not None:
        params.seed = seed
    return params


Message = Mapping[str, str] | tuple[str, str] | pb.ChatMessage
"""A chat message: `{"role": "user", "content": "..."}` (as transformers and OpenAI write them), a
(role, content) pair, or the protobuf message. Roles: system, user, assistant."""


def chat_messages(messages: Sequence[Message]) -> list[pb.ChatMessage]:
    result = []
    for i, m in enumerate(messages):
        if isinstance(m, pb.ChatMessage):
            result.append(m)
            continue
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        result.append(pb.ChatMessage(role=enum_value(pb.ChatRole, role, f"messages[{i}].role"), content=content))
    return result


class InferenceClient(ServiceClient):
    stub_class = inference_pb2_grpc.InferenceServiceStub

    def __init__(self, channel, caller) -> None:
        super().__init__(channel, caller)
        # The same server's KServe v2 (Open Inference Protocol) service, on the same channel.
        self.kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)

    def kserve_call(self, method: str, request, *, timeout: float | None = None, idempotent: bool = False):
        """One unary call of the KServe v2 service (`ModelInfer`, `ModelMetadata`, ...) with this client's
        deadlines, retries (for an `idempotent` one) and `ClientError`s."""
        return self._caller.unary(getattr(self.kserve, method), request, self._caller.deadline(timeout, COMPUTE),
                                  idempotent)

    def load_model(self, name: str, model_uri: str = "", *, version: str = "", task: str = "", backend: str = "",
                   dtype: str = "", max_batch_size: int = 0, scheduling: str = "",
                   config: pb.ModelConfig | None = None, timeout: float | None = None) -> pb.ModelStatus:
        """Load a model and return its status once it is READY. `config` gives the whole serving
        configuration; the keywords set its common fields."""
        config = pb.ModelConfig() if config is None else config
        if task:
            config.task = enum_value(pb.ModelTask, task, "config.task")
        if backend:
            config.backend = enum_value(pb.Backend, backend, "config.backend")
        if scheduling:
            config.scheduling = enum_value(pb.SchedulingPolicy, scheduling, "config.scheduling")
        if dtype:
            config.dtype = dtype
        if max_batch_size:
            config.batching.max_batch_size, config.batching.enabled = max_batch_size, True
        request = pb.LoadModelRequest(name=name, version=version, model_uri=model_uri, config=config)
        return self._unary("LoadModel", request, timeout, LOAD, False).status

    def unload_model(self, name: str, version: str = "", *, timeout: float | None = None) -> None:
        self._unary("UnloadModel", pb.UnloadModelRequest(name=name, version=version), timeout, LOAD, False)

    def list_models(self, ready_only: bool = False, *, timeout: float | None = None) -> list[pb.ModelStatus]:
        return list(self._unary("ListModels", pb.ListModelsRequest(ready_only=ready_only), timeout, READ,
                                True).models)

    def model_status(self, name: str, version: str = "", *, timeout: float | None = None) -> pb.ModelStatus:
        request = pb.GetModelStatusRequest(name=name, version=version)
        return self._unary("GetModelStatus", request, timeout, READ, True).status

    def model_statistics(self, name: str = "", version: str = "", *,
                         timeout: float | None = None) -> list[pb.ModelStatistics]:
        request = pb.GetModelStatisticsRequest(name=name, version=version)
        return list(self._unary("GetModelStatistics", request, timeout, READ, True).stats)

    # Embed and Classify are pure functions of the request, so a try that got UNAVAILABLE (the model
    # was swapping versions) is safely made again.
    def embed(self, model: str, texts: Sequence[str], *, version: str = "", truncate: bool = False,
              priority: int = 0, timeout: float | None = None) -> pb.EmbedResponse:
        """One vector per text (`.embeddings[i].values`, `.dimension`)."""
        request = pb.EmbedRequest(model=model, version=version, texts=list(texts), truncate=truncate,
                                  priority=priority)
        return self._unary("Embed", request, timeout, COMPUTE, True)

    def classify(self, model: str, texts: Sequence[str], *, version: str = "", truncate: bool = False,
                 top_k: int = 0, priority: int = 0, timeout: float | None = None) -> pb.ClassifyResponse:
        request = pb.ClassifyRequest(model=model, version=version, texts=list(texts), truncate=truncate,
                                     top_k=top_k, priority=priority)
        return self._unary("Classify", request, timeout, COMPUTE, True)

    # Generation is never retried: a completion is expensive, and a sampled one differs each time.
    def generate(self, model: str, prompt: str | Sequence[int], sampling: pb.SamplingParams | None = None, *,
                 version: str = "", priority: int = 0, timeout: float | None = None) -> pb.GenerateResponse:
        """A whole completion of `prompt` (text, or token ids of the model's tokenizer)."""
        request = _prompt(pb.GenerateRequest(model=model, version=version, sampling=sampling, priority=priority),
                          prompt)
        return self._unary("Generate", request, timeout, GENERATE, False)

    def generate_stream(self, model: str, prompt: str | Sequence[int], sampling: pb.SamplingParams | None = None,
                        *, version: str = "", priority: int = 0,
                        timeout: float | None = None) -> Iterator[pb.GenerateStreamResponse]:
        """The completion as it is produced; the last message has `finish_reason` and `usage`. Closing
        the iterator early cancels the generation."""
        request = _prompt(pb.GenerateStreamRequest(model=model, version=version, sampling=sampling,
                                                   priority=priority), prompt)
        return self._stream("GenerateStream", request, timeout, GENERATE)

    def chat(self, model: str, messages: Sequence[Message], sampling: pb.SamplingParams | None = None, *,
             version: str = "", add_generation_prompt: bool = True, priority: int = 0,
             timeout: float | None = None) -> pb.ChatResponse:
        """The assistant's whole reply to `messages` (`.text`), rendered by the model's chat template.
        `add_generation_prompt=False` continues the final message instead of opening a reply."""
        request = pb.ChatRequest(model=model, version=version, messages=chat_messages(messages), sampling=sampling,
                                 add_generation_prompt=add_generation_prompt, priority=priority)
        return self._unary("Chat", request, timeout, GENERATE, False)

    def chat_stream(self, model: str, messages: Sequence[Message], sampling: pb.SamplingParams | None = None, *,
                    version: str = "", add_generation_prompt: bool = True, priority: int = 0,
                    timeout: float | None = None) -> Iterator[pb.ChatStreamResponse]:
        """The reply as it is produced; the last message has `finish_reason` and `usage`. Closing the
        iterator early cancels the generation."""
        request = pb.ChatStreamRequest(model=model, version=version, messages=chat_messages(messages),
                                       sampling=sampling, add_generation_prompt=add_generation_prompt,
                                       priority=priority)
        return self._stream("ChatStream", request, timeout, GENERATE)

    def stream_text(self, model: str, prompt: str | Sequence[int], sampling: pb.SamplingParams | None = None,
                    **kwargs) -> Iterator[str]:
        """The completion's text in chunks as they come (empty chunks skipped)."""
        for chunk in self.generate_stream(model, prompt, sampling, **kwargs):
            if chunk.text:
                yield chunk.text


def _prompt(request, prompt: str | Sequence[int]):
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request
