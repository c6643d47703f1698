"""Scripted stand-ins of the inference and training services, for client tests: real gRPC servers
built by `create_server` (the services' interceptors, auth and error mapping included) whose replies
a test scripts, to see what a client does when a server fails in one given way."""

from __future__ import annotations

from collections import Counter

import grpc
from google.protobuf import struct_pb2

from fastserve.common.v1 import jobs_pb2
from fastserve.inference.v1 import inference_pb2 as inf_pb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.runtime import errors
from fastserve.runtime.config import Config
from fastserve.runtime.server import RunningServer, create_server
from fastserve.training.v1 import training_pb2 as train_pb
from fastserve.training.v1 import training_pb2_grpc

S, E = jobs_pb2.JobState, jobs_pb2.JobEventType


class ScriptedInference(inference_pb2_grpc.InferenceServiceServicer):
    """ListModels answers UNAVAILABLE `unavailable_lists` times, then a model; Generate always
    answers UNAVAILABLE. `calls` counts what reached the server."""

    def __init__(self, unavailable_lists: int = 0) -> None:
        self.unavailable_lists, self.calls = unavailable_lists, Counter()

    def ListModels(self, request, context):
        self.calls["ListModels"] += 1
        if self.calls["ListModels"] <= self.unavailable_lists:
            raise errors.Unavailable("the model is being swapped")
        return inf_pb.ListModelsResponse(models=[inf_pb.ModelStatus(name="scripted", state=inf_pb.MODEL_STATE_READY)])

    def Generate(self, request, context):
        self.calls["Generate"] += 1
        raise errors.Unavailable("the engine is restarting")


def _event(event_id: int, type_: int, state: int, progress: float, message: str = "", **data) -> jobs_pb2.JobEvent:
    payload = struct_pb2.Struct()
    payload.update(data)
    return jobs_pb2.JobEvent(job_id=JOB_ID, event_id=str(event_id), type=type_, state=state, progress=progress,
                             message=message, data=payload)


JOB_ID = "job-1"
EVENTS = [
    _event(1, E.JOB_EVENT_TYPE_STATE, S.JOB_STATE_RUNNING, 0.0, "running"),
    _event(2, E.JOB_EVENT_TYPE_METRICS, S.JOB_STATE_RUNNING, 0.5, "step 5/10", loss=2.5, tokens_per_second=1000.0,
           eta_seconds=65.0),
    _event(3, E.JOB_EVENT_TYPE_ARTIFACT, S.JOB_STATE_RUNNING, 0.5, "checkpoint at step 5",
           uri="artifact://checkpoints/job-1/step-5"),
    _event(4, E.JOB_EVENT_TYPE_METRICS, S.JOB_STATE_RUNNING, 1.0, "step 10/10", loss=1.25, tokens_per_second=1200.0,
           eta_seconds=0.0),
    _event(5, E.JOB_EVENT_TYPE_STATE, S.JOB_STATE_SUCCEEDED, 1.0, "succeeded"),
]


class ScriptedTraining(training_pb2_grpc.TrainingServiceServicer):
    """One job, `job-1`, with the events above. A watch from the start breaks with UNAVAILABLE after
    `break_after` events, as a watch does when the job store fails over; `watches` records each
    WatchJob's after_event_id."""

    def __init__(self, break_after: int = 2) -> None:
        self.break_after, self.watches = break_after, []

    def WatchJob(self, request, context):
        self.watches.append(request.after_event_id)
        if request.job_id != JOB_ID:
            raise errors.NotFound(f"no training job {request.job_id!r}")
        start = int(request.after_event_id or 0)
        for event in EVENTS[start:]:
            yield train_pb.WatchJobResponse(event=event)
            if not request.after_event_id and int(event.event_id) == self.break_after:
                raise errors.Unavailable("the job store is failing over")

    def GetJob(self, request, context):
        result = struct_pb2.Struct()
        result.update({"model_uri": "artifact://models/scripted/1"})
        return train_pb.GetJobResponse(job=jobs_pb2.Job(job_id=JOB_ID, service="training", state=S.JOB_STATE_SUCCEEDED,
                                                        progress=1.0, result=result))


def serve(servicer, config: Config, port: int = 0) -> RunningServer:
    """`servicer` (a ScriptedInference or ScriptedTraining) on a server like the real service's."""
    if isinstance(servicer, ScriptedInference):
        service, add = "inference", inference_pb2_grpc.add_InferenceServiceServicer_to_server
        name = inf_pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
    else:
        service, add = "training", training_pb2_grpc.add_TrainingServiceServicer_to_server
        name = train_pb.DESCRIPTOR.services_by_name["TrainingService"].full_name

    def register(server: grpc.Server) -> list[str]:
        add(servicer, server)
        return [name]
    return create_server(service, register, config, port=port)
