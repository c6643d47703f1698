"""Client of `fastserve.training.v1.TrainingService`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastserve.client.calls import SUBMIT
from fastserve.client.jobs import JobClient
from fastserve.client.specs import enum_value, fill
from fastserve.common.v1 import jobs_pb2
from fastserve.training.v1 import training_pb2 as pb
from fastserve.training.v1 import training_pb2_grpc


class TrainingClient(JobClient):
    stub_class = training_pb2_grpc.TrainingServiceStub
    pb = pb

    def submit_training_job(self, *, dataset_uri: str, output_name: str,
                            model: str | pb.ArchitectureConfig | pb.ModelSpec, task: str | int = 0,
                            tokenizer_uri: str = "",
                            hyperparameters: pb.Hyperparameters | Mapping[str, Any] | None = None,
                            num_processes: int = 0, request_id: str = "",
                            timeout: float | None = None) -> jobs_pb2.Job:
        """Queue a training job. `model` is a pretrained model's URI to fine-tune, or the architecture
        of a new one; `task` (`causal_lm`, ...) defaults to the dataset's; `hyperparameters` a message or
        its fields by name (`{"max_steps": 100}`); `request_id` (default: a fresh one) makes retries of
        the submit return the same job."""
        if isinstance(model, str):
            model = pb.ModelSpec(pretrained_uri=model)
        elif isinstance(model, pb.ArchitectureConfig):
            model = pb.ModelSpec(architecture=model)
        if not isinstance(hyperparameters, pb.Hyperparameters):
            hyperparameters = fill(pb.Hyperparameters(), dict(hyperparameters or {}), "hyperparameters")
        request = pb.SubmitTrainingJobRequest(
            model=model, task=enum_value(pb.TrainingTask, task, "task") if task else 0, dataset_uri=dataset_uri,
            tokenizer_uri=tokenizer_uri, hyperparameters=hyperparameters, output_name=output_name,
            num_processes=num_processes, request_id=request_id)
        return self._submit("SubmitTrainingJob", request, timeout).job

    def resume_training_job(self, job_id: str, *, max_steps: int = 0, timeout: float | None = None) -> jobs_pb2.Job:
        """Queue a new job that goes on from the last checkpoint of a cancelled or failed one; `max_steps`
        is its new total (0: the old job's). The new job's params name the old one in `resumed_from`."""
        request = pb.ResumeTrainingJobRequest(job_id=job_id, max_steps=max_steps)
        return self._unary("ResumeTrainingJob", request, timeout, SUBMIT, False).job
