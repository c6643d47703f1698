"""gRPC servicer of `fastserve.training.v1.TrainingService`: protobuf in, the core, protobuf out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from fastserve.client.protos import enum_name
from fastserve.runtime.errors import InvalidArgument
from fastserve.runtime.job_rpcs import JobRpcs
from fastserve.runtime.protos import job_to_proto
from fastserve.runtime.stores import Stores
from fastserve.services.training.core import SERVICE, Training
from fastserve.training.v1 import training_pb2 as pb
from fastserve.training.v1 import training_pb2_grpc


def _enum(enum_type, value: int, prefix: str) -> str:
    """The enum's word, or "" when unspecified, so the core applies its default or refuses."""
    name = enum_name(enum_type, value, prefix)
    return "" if name == "unspecified" else name


def request_params(request: pb.SubmitTrainingJobRequest) -> dict[str, Any]:
    """The request as the job's JSON parameters."""
    model: dict[str, Any] = {}
    if request.model.WhichOneof("source") == "architecture":
        a = request.model.architecture
        model["architecture"] = {
            "family": enum_name(pb.ArchitectureFamily, a.family, "ARCHITECTURE_FAMILY_"),
            "num_layers": a.num_layers, "hidden_size": a.hidden_size, "num_heads": a.num_heads,
            "intermediate_size": a.intermediate_size, "max_position_embeddings": a.max_position_embeddings,
            "vocab_size": a.vocab_size, "dropout": a.dropout if a.HasField("dropout") else None}
    elif request.model.WhichOneof("source") == "pretrained_uri":
        model["pretrained_uri"] = request.model.pretrained_uri
    h = request.hyperparameters
    hyper = {field.name: getattr(h, field.name) for field in h.DESCRIPTOR.fields
             if field.name not in ("lr_schedule", "precision")}
    hyper["lr_schedule"] = _enum(pb.LrSchedule, h.lr_schedule, "LR_SCHEDULE_")
    hyper["precision"] = _enum(pb.Precision, h.precision, "PRECISION_")
    task = _enum(pb.TrainingTask, request.task, "TRAINING_TASK_")  # unset: the dataset's
    return {"model": model, "task": task, "dataset_uri": request.dataset_uri, "tokenizer_uri": request.tokenizer_uri,
            "hyperparameters": hyper, "output_name": request.output_name, "num_processes": request.num_processes}


class TrainingServicer(JobRpcs, training_pb2_grpc.TrainingServiceServicer):
    service = SERVICE
    pb2 = pb

    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        self.core = Training(stores)

    def SubmitTrainingJob(self, request: pb.SubmitTrainingJobRequest, context):
        job = self.core.submit(request_params(request), request.request_id)
        return pb.SubmitTrainingJobResponse(job=job_to_proto(job))

    def ResumeTrainingJob(self, request: pb.ResumeTrainingJobRequest, context):
        if not request.job_id:
            raise InvalidArgument("job_id is required", field="job_id")
        self._owned(request.job_id)
        return pb.ResumeTrainingJobResponse(job=job_to_proto(self.core.resume(request.job_id, request.max_steps)))


def register(server: grpc.Server, stores: Stores) -> Sequence[str]:
    training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(stores), server)
    return [pb.DESCRIPTOR.services_by_name["TrainingService"].full_name]
