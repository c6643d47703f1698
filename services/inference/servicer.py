"""gRPC servicer of `fastserve.inference.v1.InferenceService`: protobuf in, the core, protobuf out."""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc

from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc
from services.inference.batcher import BatchingSettings
from services.inference.core import Inference
from services.inference.repository import LoadedModel, ModelRepository, ModelSettings
from shared.errors import FailedPrecondition
from shared.stores import Stores

SERVICE = "inference"
BACKENDS = {pb.BACKEND_UNSPECIFIED: "pytorch", pb.BACKEND_PYTORCH: "pytorch", pb.BACKEND_ONNXRUNTIME: "onnxruntime"}
TASKS = {pb.MODEL_TASK_UNSPECIFIED: "", pb.MODEL_TASK_EMBEDDING: "embedding",
         pb.MODEL_TASK_SEQUENCE_CLASSIFICATION: "sequence_classification", pb.MODEL_TASK_RAW: "raw"}
TASK_ENUMS = {v: k for k, v in TASKS.items() if v}


def deadline_of(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    # Without a deadline gRPC reports an effectively infinite remaining time.
    return None if remaining is None or remaining > 86400 * 365 else time.monotonic() + remaining


def settings_from_proto(config: pb.ModelConfig) -> ModelSettings:
    if config.task == pb.MODEL_TASK_GENERATION:
        raise FailedPrecondition("generation models are not served yet")
    batching = BatchingSettings(instances=config.instances or 1)
    if config.HasField("batching"):
        b = config.batching
        batching = BatchingSettings(enabled=b.enabled, max_batch_size=b.max_batch_size or 32,
                                    max_queue_delay_us=b.max_queue_delay_us, max_queue_size=b.max_queue_size or 1024,
                                    instances=config.instances or 1)
    return ModelSettings(backend=BACKENDS[config.backend], task=TASKS[config.task], dtype=config.dtype,
                         batching=batching)


def status_of(model: LoadedModel) -> pb.ModelStatus:
    b = model.settings.batching
    return pb.ModelStatus(
        name=model.name, version=model.version, state=pb.ModelState.Value(f"MODEL_STATE_{model.state.value}"),
        error=model.error, model_uri=model.uri,
        config=pb.ModelConfig(
            backend=pb.BACKEND_ONNXRUNTIME if model.settings.backend == "onnxruntime" else pb.BACKEND_PYTORCH,
            task=TASK_ENUMS.get(model.task, pb.MODEL_TASK_UNSPECIFIED), dtype=model.settings.dtype,
            instances=b.instances,
            batching=pb.BatchingConfig(enabled=b.enabled, max_batch_size=b.max_batch_size,
                                       max_queue_delay_us=b.max_queue_delay_us, max_queue_size=b.max_queue_size)))


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Model management and encoder inference; generation RPCs answer UNIMPLEMENTED until they exist."""

    def __init__(self, core: Inference) -> None:
        self.core = core
        self.repository = core.repository

    def LoadModel(self, request: pb.LoadModelRequest, context):
        model = self.repository.load(request.name, request.model_uri, request.version,
                                     settings_from_proto(request.config))
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
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=row) for row in result.outputs.tolist()],
                                dimension=int(result.outputs.shape[1]))

    def Classify(self, request: pb.ClassifyRequest, context):
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

    def GetModelStatistics(self, request: pb.GetModelStatisticsRequest, context):
        models = [m for m in self.repository.all() if (not request.name or m.name == request.name) and
                  (not request.version or m.version == request.version)]
        if request.name and not models:
            self.repository.get(request.name, request.version)
        stats = []
        for m in models:
            with m.lock:
                s = m.stats
                stats.append(pb.ModelStatistics(
                    name=m.name, version=m.version, request_count=s.requests, failure_count=s.failures,
                    inference_count=s.inferences, batch_count=s.batches, queue_time_ms_total=s.queue_ms,
                    compute_time_ms_total=s.compute_ms, batch_sizes=dict(s.batch_sizes)))
        return pb.GetModelStatisticsResponse(stats=stats)


def register(server: grpc.Server, stores: Stores) -> Sequence[str]:
    from inference import grpc_service_pb2, grpc_service_pb2_grpc
    from services.inference.kserve import KServeServicer

    core = Inference(ModelRepository(stores.artifacts))
    core.load_configured(stores.config)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(core), server)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(core), server)
    return [pb.DESCRIPTOR.services_by_name["InferenceService"].full_name,
            grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name]
