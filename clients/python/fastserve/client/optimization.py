"""Client of `fastserve.optimization.v1.OptimizationService`."""

from __future__ import annotations

from collections.abc import Sequence

from fastserve.client.calls import READ
from fastserve.client.jobs import JobClient
from fastserve.client.specs import enum_value, optimization_step
from fastserve.common.v1 import jobs_pb2
from fastserve.optimization.v1 import optimization_pb2 as pb
from fastserve.optimization.v1 import optimization_pb2_grpc

# Which way is better for each quality metric a report can carry (`OptimizationMeasurement.quality_metric`).
QUALITY_HIGHER_IS_BETTER = {"min_cosine_to_source": True, "accuracy": True, "perplexity": False}


class OptimizationClient(JobClient):
    stub_class = optimization_pb2_grpc.OptimizationServiceStub
    pb = pb

    def submit_optimization_job(self, model_uri: str, steps: Sequence[str | pb.OptimizationStep], *,
                                output_name: str, target: str | int = "cpu", eval_dataset_uri: str = "",
                                max_relative_degradation: float = 0.0, force_promote: bool = False,
                                request_id: str = "", timeout: float | None = None) -> jobs_pb2.Job:
        """Queue an optimization job; steps as messages or as `export:onnx`, `quantize:<method>`,
        `prune:<method>,sparsity=0.5` (see `fastserve.client.specs.optimization_step`)."""
        request = pb.SubmitOptimizationJobRequest(
            model_uri=model_uri, steps=[optimization_step(s, f"steps[{i}]") for i, s in enumerate(steps)],
            target=enum_value(pb.Target, target, "target"), eval_dataset_uri=eval_dataset_uri,
            quality_budget=pb.QualityBudget(max_relative_degradation=max_relative_degradation),
            force_promote=force_promote, output_name=output_name, request_id=request_id)
        return self._submit("SubmitOptimizationJob", request, timeout).job

    def get_report(self, job_id: str, *, timeout: float | None = None) -> pb.OptimizationReport:
        """The before/after report of a succeeded job."""
        return self._unary("GetReport", pb.GetReportRequest(job_id=job_id), timeout, READ, True).report
