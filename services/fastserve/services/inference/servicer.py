"""gRPC servicer of `fastserve.inference.v1.InferenceService`: protobuf in, the core, protobuf out."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import grpc
import numpy as np

from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.runtime.errors import InvalidArgument
from fastserve.runtime.stores import Stores
from fastserve.services.inference.batcher import BatchingSettings
from fastserve.services.inference.chat import Chat, Message, check_template
from fastserve.services.inference.core import Inference
from fastserve.services.inference.generation_settings import GenerationSettings
from fastserve.services.inference.generator import Chunk, GenerationRequest, Usage
from fastserve.services.inference.logprobs import Logprob
from fastserve.services.inference.repository import LoadedModel, ModelRepository, ModelSettings
from fastserve.services.inference.sampling_params import SamplingParams
from fastserve.services.inference.scheduling import MlfqSettings
from fastserve.services.inference.structured_output import ResponseFormat

SERVICE = "inference"
# BACKEND_UNSPECIFIED: the folder decides (an ONNX-only folder runs on ONNX Runtime, any other on PyTorch).
BACKENDS = {pb.BACKEND_UNSPECIFIED: "", pb.BACKEND_PYTORCH: "pytorch", pb.BACKEND_ONNXRUNTIME: "onnxruntime"}
BACKEND_ENUMS = {v: k for k, v in BACKENDS.items()}
TASKS = {pb.MODEL_TASK_UNSPECIFIED: "", pb.MODEL_TASK_EMBEDDING: "embedding",
         pb.MODEL_TASK_SEQUENCE_CLASSIFICATION: "sequence_classification", pb.MODEL_TASK_RAW: "raw",
         pb.MODEL_TASK_GENERATION: "generation"}
TASK_ENUMS = {v: k for k, v in TASKS.items() if v}
ROLES = {pb.CHAT_ROLE_SYSTEM: "system", pb.CHAT_ROLE_USER: "user", pb.CHAT_ROLE_ASSISTANT: "assistant"}


def deadline_of(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    # Without a deadline gRPC reports an effectively infinite remaining time.
    return None if remaining is None or remaining > 86400 * 365 else time.monotonic() + remaining


def requested_settings(request: pb.LoadModelRequest) -> ModelSettings | None:
    """The settings a load asks for; None when it has no config (or an empty one, as a client that always
    sends the message does): the repository then keeps those the name is served with."""
    if not request.HasField("config") or request.config.ByteSize() == 0:
        return None
    return settings_from_proto(request.config)


def settings_from_proto(config: pb.ModelConfig) -> ModelSettings:
    batching = BatchingSettings(instances=config.instances or 1)
    if config.HasField("batching"):
        b = config.batching
        batching = BatchingSettings(enabled=b.enabled, max_batch_size=b.max_batch_size or 32,
                                    max_queue_delay_us=b.max_queue_delay_us, max_queue_size=b.max_queue_size or 1024,
                                    instances=config.instances or 1)
    # proto3 enums are open: a newer client may send a value this server does not know.
    if config.backend not in BACKENDS:
        raise InvalidArgument(f"unknown backend {config.backend}", field="config.backend")
    if config.task not in TASKS:
        raise InvalidArgument(f"unknown task {config.task}", field="config.task")
    generation = generation_settings(config)
    # Both, whatever the task (an unspecified one is the folder's): a bound is refused before weights load.
    batching.check()
    generation.check()
    return ModelSettings(backend=BACKENDS[config.backend], task=TASKS[config.task], dtype=config.dtype,
                         batching=batching, generation=generation)


def generation_settings(config: pb.ModelConfig) -> GenerationSettings:
    g, defaults, mlfq = config.generation, GenerationSettings(), MlfqSettings()
    oldest_places = g.mlfq_oldest_places if g.HasField("mlfq_oldest_places") else mlfq.oldest_places
    check_template(g.chat_template)
    return GenerationSettings(
        policy="mlfq" if config.scheduling == pb.SCHEDULING_POLICY_MLFQ else "fcfs",
        max_batch_size=config.batching.max_batch_size or defaults.max_batch_size,
        max_queue_size=config.batching.max_queue_size or defaults.max_queue_size,
        kv_slots=g.kv_slots, context=g.context, max_prefill_tokens=g.max_prefill_tokens or defaults.max_prefill_tokens,
        host_slots=g.host_slots if g.HasField("host_slots") else -1,
        mlfq=MlfqSettings(levels=g.mlfq_levels or mlfq.levels, base_quantum=g.mlfq_base_quantum or mlfq.base_quantum,
                          starvation_ms=g.mlfq_starvation_ms or mlfq.starvation_ms,
                          oldest_places=oldest_places),
        chat_template=g.chat_template)


FORMATS = {pb.RESPONSE_FORMAT_TYPE_UNSPECIFIED: "text", pb.RESPONSE_FORMAT_TYPE_TEXT: "text",
           pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: "json_object", pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: "json_schema"}


def response_format_of(f: pb.ResponseFormat) -> ResponseFormat:
    if f.type not in FORMATS:  # proto3 enums are open
        raise InvalidArgument(f"unknown response format type {f.type}", field="sampling.response_format.type")
    return ResponseFormat(FORMATS[f.type], f.json_schema)


def sampling_of(s: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=s.max_new_tokens if s.HasField("max_new_tokens") else SamplingParams.max_new_tokens,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p or 1.0,
        repetition_penalty=s.repetition_penalty or 1.0, seed=s.seed if s.HasField("seed") else None,
        stop_sequences=tuple(s.stop_sequences), stop_token_ids=tuple(s.stop_token_ids),
        presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty, logprobs=s.logprobs,
        top_logprobs=s.top_logprobs, n=s.n or 1, response_format=response_format_of(s.response_format)).validate()


def generation_request(request: pb.GenerateRequest | pb.GenerateStreamRequest,
                       context: grpc.ServicerContext) -> GenerationRequest:
    prompt = request.WhichOneof("prompt")
    return GenerationRequest(text=request.text if prompt == "text" else None,
                             token_ids=list(request.token_ids.ids) if prompt == "token_ids" else None,
                             params=sampling_of(request.sampling),
                             max_new_tokens_set=request.sampling.HasField("max_new_tokens"),
                             priority=request.priority, deadline=deadline_of(context))


def chat_request(request: pb.ChatRequest | pb.ChatStreamRequest, context: grpc.ServicerContext) -> GenerationRequest:
    """A chat as a generation request, which the model's chat template turns into its prompt."""
    messages = tuple(Message(ROLES.get(m.role, ""), m.content) for m in request.messages)
    add = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
    return GenerationRequest(chat=Chat(messages, add).check(), params=sampling_of(request.sampling),
                             max_new_tokens_set=request.sampling.HasField("max_new_tokens"),
                             priority=request.priority, deadline=deadline_of(context))


def usage_proto(usage: Usage) -> pb.Usage:
    return pb.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                    queue_time_ms=usage.queue_ms, time_to_first_token_ms=usage.time_to_first_token_ms,
                    total_time_ms=usage.total_ms)


def logprobs_proto(logprobs: Sequence[Logprob]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, text=lp.text, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=c.token_id, text=c.text, logprob=c.logprob) for c in lp.top])
            for lp in logprobs]


def chunk_proto(chunk: Chunk, reply: type = pb.GenerateStreamResponse):
    """A stream message of `reply`'s type: GenerateStreamResponse or ChatStreamResponse (the same fields)."""
    return reply(
        text=chunk.text, token_ids=chunk.token_ids,
        finish_reason=FINISH[chunk.finish] if chunk.finish else pb.FINISH_REASON_UNSPECIFIED,
        usage=usage_proto(chunk.usage) if chunk.usage else None, logprobs=logprobs_proto(chunk.logprobs),
        index=chunk.index)


def completion_reply(core: Inference, request, generation: GenerationRequest, context, reply: type):
    """A whole generation as `reply` (GenerateResponse or ChatResponse: the same fields): its first completion,
    and all n when it asked for more; its sequences are cancelled if the call ends first."""
    _, completions, usage = core.generate(request.model, request.version, generation,
                                          lambda seq: context.add_callback(seq.cancel))
    first = completions[0]
    every = [pb.Completion(index=c.index, text=c.text, token_ids=c.token_ids, finish_reason=FINISH[c.finish],
                           logprobs=logprobs_proto(c.logprobs)) for c in completions] if len(completions) > 1 else []
    return reply(text=first.text, token_ids=first.token_ids, finish_reason=FINISH[first.finish],
                 usage=usage_proto(usage), logprobs=logprobs_proto(first.logprobs), completions=every)


FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "eos": pb.FINISH_REASON_EOS,
          "cancelled": pb.FINISH_REASON_CANCELLED}


@functools.lru_cache(maxsize=64)
def _embedding_prefix(dimension: int) -> bytes:
    """What precedes one row's packed floats in an EmbedResponse's wire form, as protobuf writes it: a
    zero row's message without its 4 * dimension payload bytes."""
    one = pb.EmbedResponse(embeddings=[pb.Embedding(values=[0.0] * dimension)]).SerializeToString()
    return one[:len(one) - 4 * dimension]


def embed_reply(outputs: np.ndarray, tokens: int) -> pb.EmbedResponse:
    """The reply parsed (in C) from the array's own bytes, each row laid out as protobuf lays out one
    `Embedding`. Building it from Python floats instead (384 a row) cost three to five times as much, on
    the cores the forward pass needs."""
    rows = np.ascontiguousarray(outputs, dtype="<f4")
    dimension = rows.shape[1]
    prefix = _embedding_prefix(dimension)
    reply = pb.EmbedResponse.FromString(b"".join(prefix + row.tobytes() for row in rows))
    reply.dimension, reply.prompt_tokens = dimension, tokens
    return reply


def status_of(model: LoadedModel) -> pb.ModelStatus:
    b = model.settings.batching
    status = pb.ModelStatus(
        name=model.name, version=model.version, state=pb.ModelState.Value(f"MODEL_STATE_{model.state.value}"),
        error=model.error, model_uri=model.uri,
        config=pb.ModelConfig(
            backend=BACKEND_ENUMS.get(model.settings.backend, pb.BACKEND_UNSPECIFIED),
            task=TASK_ENUMS.get(model.task, pb.MODEL_TASK_UNSPECIFIED), dtype=model.settings.dtype,
            instances=b.instances,
            batching=pb.BatchingConfig(enabled=b.enabled, max_batch_size=b.max_batch_size,
                                       max_queue_delay_us=b.max_queue_delay_us, max_queue_size=b.max_queue_size)))
    return generation_status(model, status) if model.task == "generation" and model.backend else status


def generation_status(model: LoadedModel, status: pb.ModelStatus) -> pb.ModelStatus:
    """The engine's effective settings, in place of the encoder batching ones."""
    engine, g = model.backend.engine, model.settings.generation
    status.config.scheduling = pb.SCHEDULING_POLICY_MLFQ if g.policy == "mlfq" else pb.SCHEDULING_POLICY_FCFS
    status.config.batching.CopyFrom(pb.BatchingConfig(enabled=True, max_batch_size=g.max_batch_size,
                                                      max_queue_size=g.max_queue_size))
    status.config.generation.CopyFrom(pb.GenerationConfig(
        kv_slots=engine.cache.slots, context=engine.context, max_prefill_tokens=g.max_prefill_tokens,
        host_slots=engine.cache.host_slots, mlfq_levels=g.mlfq.levels, mlfq_base_quantum=g.mlfq.base_quantum,
        mlfq_starvation_ms=g.mlfq.starvation_ms, mlfq_oldest_places=g.mlfq.oldest_places))
    return status


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Model management, encoder inference and generation."""

    def __init__(self, core: Inference) -> None:
        self.core = core
        self.repository = core.repository

    def LoadModel(self, request: pb.LoadModelRequest, context):
        model = self.repository.load(request.name, request.model_uri, request.version, requested_settings(request))
        return pb.LoadModelResponse(status=status_of(model))

    def UnloadModel(self, request: pb.UnloadModelRequest, context):
        self.repository.unload(request.name, request.version)
        return pb.UnloadModelResponse()

    def ListModels(self, request: pb.ListModelsRequest, context):
        models = [m for m in self.repository.all() if not request.ready_only or m.state.value == "READY"]
        return pb.ListModelsResponse(models=[status_of(m) for m in models])

    def GetModelStatus(self, request: pb.GetModelStatusRequest, context):
        models = [m for m in self.repository.all() if m.name == request.name and
                  (not request.version or m.version == request.version)]
        if not models:
            self.repository.get(request.name, request.version)  # raises the precise NOT_FOUND
        return pb.GetModelStatusResponse(status=status_of(models[-1]))

    def Embed(self, request: pb.EmbedRequest, context):
        result = self.core.run(request.model, request.version, list(request.texts), request.truncate,
                               request.priority, deadline_of(context), "embedding",
                               lambda future: context.add_callback(future.cancel))
        return embed_reply(result.outputs, result.tokens)

    def Classify(self, request: pb.ClassifyRequest, context):
        if request.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0: all labels), got {request.top_k}", field="top_k")
        result = self.core.run(request.model, request.version, list(request.texts), request.truncate,
                               request.priority, deadline_of(context), "sequence_classification",
                               lambda future: context.add_callback(future.cancel))
        labels = result.model.backend.labels
        classifications = []
        for probs in result.outputs:
            order = probs.argsort()[::-1][:request.top_k or len(labels)]
            classifications.append(pb.Classification(
                label=labels[order[0]], scores=[pb.LabelScore(label=labels[i], score=float(probs[i])) for i in order]))
        return pb.ClassifyResponse(results=classifications)

    def Generate(self, request: pb.GenerateRequest, context):
        return completion_reply(self.core, request, generation_request(request, context), context,
                                pb.GenerateResponse)

    def GenerateStream(self, request: pb.GenerateStreamRequest, context):
        chunks = self.core.stream(request.model, request.version, generation_request(request, context),
                                  lambda seq: context.add_callback(seq.cancel))
        for chunk in chunks:
            yield chunk_proto(chunk)

    def Chat(self, request: pb.ChatRequest, context):
        return completion_reply(self.core, request, chat_request(request, context), context, pb.ChatResponse)

    def ChatStream(self, request: pb.ChatStreamRequest, context):
        chunks = self.core.stream(request.model, request.version, chat_request(request, context),
                                  lambda seq: context.add_callback(seq.cancel))
        for chunk in chunks:
            yield chunk_proto(chunk, pb.ChatStreamResponse)

    def GetModelStatistics(self, request: pb.GetModelStatisticsRequest, context):
        models = [m for m in self.repository.all() if (not request.name or m.name == request.name) and
                  (not request.version or m.version == request.version)]
        if request.name and not models:
            self.repository.get(request.name, request.version)
        stats = []
        for m in models:
            s = m.statistics()
            stats.append(pb.ModelStatistics(
                name=m.name, version=m.version, request_count=s.requests, failure_count=s.failures,
                inference_count=s.inferences, batch_count=s.batches, queue_time_ms_total=s.queue_ms,
                compute_time_ms_total=s.compute_ms, batch_sizes=dict(s.batch_sizes)))
        return pb.GetModelStatisticsResponse(stats=stats)


def register(server: grpc.Server, stores: Stores) -> Sequence[str]:
    from fastserve.kserve.v2 import grpc_service_pb2, grpc_service_pb2_grpc
    from fastserve.services.inference import registry_servicer
    from fastserve.services.inference.kserve import KServeServicer

    core = Inference(ModelRepository(stores.artifacts, stores.config.inference_max_models,
                                     stores.config.inference_kv_cache_gb * 2**30))
    core.load_configured(stores.config)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(core), server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(core), server)
    registry = registry_servicer.add(server, stores, core.repository)
    return [pb.DESCRIPTOR.services_by_name["InferenceService"].full_name,
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name, registry]
