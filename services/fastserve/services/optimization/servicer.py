"""gRPC servicer of `fastserve.optimization.v1.OptimizationService`: protobuf in, the core, protobuf out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from fastserve.client.protos import enum_name
from fastserve.optimization.v1 import optimization_pb2 as pb
from fastserve.optimization.v1 import optimization_pb2_grpc
from fastserve.runtime.errors import InvalidArgument
from fastserve.runtime.job_rpcs import JobRpcs
from fastserve.runtime.protos import artifact_ref, job_to_proto
from fastserve.runtime.stores import Stores
from fastserve.services.optimization.core import SERVICE, Optimization


def step_params(step: pb.OptimizationStep, index: int) -> dict[str, Any]:
    kind = step.WhichOneof("step")
    if kind == "prune":
        return {"type": "prune", "method": enum_name(pb.PruningMethod, step.prune.method, "PRUNING_METHOD_"),
                "sparsity": step.prune.sparsity}
    if kind == "export":
        if step.export.format not in (pb.EXPORT_FORMAT_UNSPECIFIED, pb.EXPORT_FORMAT_ONNX):
            raise InvalidArgument("only ONNX export is supported", field=f"steps[{index}].export.format")
        precision = enum_name(pb.Precision, step.export.precision, "PRECISION_")
        return {"type": "export", "opset": step.export.opset, "optimize_graph": step.export.optimize_graph,
                "precision": "fp32" if precision == "unspecified" else precision}
    if kind == "quantize":
        return {"type": "quantize", "method": enum_name(pb.QuantizationMethod, step.quantize.method,
                                                     "QUANTIZATION_METHOD_"),
                "calibration_dataset_uri": step.quantize.calibration_dataset_uri}
    return {"type": "", "index": index}


def measurement(m: dict[str, Any]) -> pb.Measurement:
    return pb.Measurement(size_bytes=int(m["size_bytes"]), parameters=int(m["parameters"]),
                          latency_ms_batch1=m["latency_ms_batch1"], throughput_batched=m["throughput_batched"],
                          batched_size=int(m["batched_size"]), backend=m["backend"], quality=m.get("quality", 0.0),
                          quality_metric=m.get("quality_metric", ""))


class OptimizationServicer(JobRpcs, optimization_pb2_grpc.OptimizationServiceServicer):
    service = SERVICE
    pb2 = pb

    def __init__(self, stores: Stores) -> None:
        self.stores = stores
        self.core = Optimization(stores)

    def SubmitOptimizationJob(self, request: pb.SubmitOptimizationJobRequest, context):
        target = enum_name(pb.Target, request.target, "TARGET_")
        job = self.core.submit({
            "model_uri": request.model_uri, "steps": [step_params(s, i) for i, s in enumerate(request.steps)],
            "target": "cpu" if target == "unspecified" else target, "eval_dataset_uri": request.eval_dataset_uri,
            "max_relative_degradation": request.quality_budget.max_relative_degradation,
            "force_promote": request.force_promote, "output_name": request.output_name}, request.request_id)
        return pb.SubmitOptimizationJobResponse(job=job_to_proto(job))

    def GetReport(self, request: pb.GetReportRequest, context):
        if not request.job_id:
            raise InvalidArgument("job_id is required", field="job_id")
        self._owned(request.job_id)
        r = self.core.report(request.job_id)
        return pb.GetReportResponse(report=pb.OptimizationReport(
            before=measurement(r["before"]), after=measurement(r["after"]), within_budget=r["within_budget"],
            promoted=r["promoted"], result=artifact_ref(r["result_uri"]) if r["result_uri"] else None,
            job_id=r["job_id"], source_model_uri=r["source_model_uri"],
            relative_degradation=r["relative_degradation"]))


def register(server: grpc.Server, stores: Stores) -> Sequence[str]:
    optimization_pb2_grpc.add_OptimizationServiceServicer_to_server(OptimizationServicer(stores), server)
    return [pb.DESCRIPTOR.services_by_name["OptimizationService"].full_name]
