"""The optimization service end to end: a real server, a real Celery worker, real models."""

from __future__ import annotations

import math

import grpc
import pytest
from rich.console import Console

from fastserve.cli.optimize import report_table
from fastserve.common.v1 import jobs_pb2
from fastserve.models.encoders import open_backend
from fastserve.optimization.v1 import optimization_pb2 as pb
from fastserve.optimization.v1 import optimization_pb2_grpc
from fastserve.runtime.config import Config
from fastserve.runtime.stores import Stores
from fastserve.services.optimization.core import MAX_STEPS
from tests.conftest import private_env
from tests.support.processes import service_with_worker
from tests.support.rpc import field_of
from tests.support.waiting import wait_until

S = jobs_pb2.JobState
MINILM = "builtin://all-MiniLM-L6-v2"
EXPORT = pb.OptimizationStep(export=pb.ExportStep(format=pb.EXPORT_FORMAT_ONNX))
ONNX_INT8 = pb.OptimizationStep(quantize=pb.QuantizeStep(method=pb.QUANTIZATION_METHOD_ONNX_INT8_DYNAMIC))


@pytest.fixture(scope="module")
def svc(tmp_path_factory, redis_server):
    home = tmp_path_factory.mktemp("opt")
    env = private_env(home / "home", redis_server.url)
    logs = home / "logs"
    logs.mkdir()
    with service_with_worker("optimization", env, logs) as (_, channel):
        yield optimization_pb2_grpc.OptimizationServiceStub(channel), Stores.from_config(Config.from_env(env))


def run_watched(stub, **request):
    job = stub.SubmitOptimizationJob(pb.SubmitOptimizationJobRequest(**request)).job
    events = [r.event for r in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=600)]
    return stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).job, events


def run(stub, **request):
    return run_watched(stub, **request)[0]


def test_minilm_to_onnx_int8_with_a_report_and_it_serves(svc):
    stub, stores = svc
    job, events = run_watched(stub, model_uri=MINILM, steps=[EXPORT, ONNX_INT8], target=pb.TARGET_CPU,
                              output_name="minilm-int8", quality_budget=pb.QualityBudget(max_relative_degradation=0.01))
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    # Each step's progress and log name it as the request did.
    progress = [e.message for e in events if e.type == jobs_pb2.JOB_EVENT_TYPE_PROGRESS]
    assert progress[:2] == ["step 1/2 export:onnx", "step 2/2 quantize:onnx_int8_dynamic"], progress
    logs = [e.message for e in events if e.type == jobs_pb2.JOB_EVENT_TYPE_LOG]
    assert [m.split(": done in ")[0] for m in logs if ": done in " in m] == progress[:2], logs
    report = stub.GetReport(pb.GetReportRequest(job_id=job.job_id)).report
    assert report.before.backend == "pytorch" and report.after.backend == "onnxruntime"
    assert report.before.size_bytes / report.after.size_bytes > 3.0
    assert report.after.quality >= 0.99 and report.after.quality_metric == "min_cosine_to_source"
    # Each side is a measurement of its own stage (how the figures are timed is tested in test_techniques):
    # a figure left unset, or the source's copied onto the result, fails here.
    for side in (report.before, report.after):
        assert math.isfinite(side.latency_ms_batch1) and side.latency_ms_batch1 > 0 < side.throughput_batched
    assert report.before.latency_ms_batch1 != report.after.latency_ms_batch1
    assert report.before.throughput_batched != report.after.throughput_batched
    assert report.within_budget and report.promoted and report.result.uri == "artifact://models/minilm-int8/1"
    assert 0 <= job.result["export_parity_max_abs_diff"] < 1e-3  # checked right after the (fp32) export
    backend = open_backend(stores.artifacts.resolve(report.result.uri).path, "onnxruntime", "embedding", "")
    assert backend.providers == ["CPUExecutionProvider"]
    embeddings = backend.run(backend.encoder.encode(["a served sentence"], truncate=True).ids)
    assert embeddings.shape == (1, 384)


def test_quality_budget_keeps_a_bad_result_unless_forced(svc):
    stub, stores = svc
    heads = pb.OptimizationStep(prune=pb.PruneStep(method=pb.PRUNING_METHOD_STRUCTURED_HEADS, sparsity=0.5))
    job = run(stub, model_uri=MINILM, steps=[heads], output_name="minilm-halved",
              quality_budget=pb.QualityBudget(max_relative_degradation=0.001))
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    report = stub.GetReport(pb.GetReportRequest(job_id=job.job_id)).report
    assert report.after.parameters < report.before.parameters
    assert not report.within_budget and not report.promoted and not report.result.uri
    assert stores.artifacts.versions("models", "minilm-halved") == []
    forced = run(stub, model_uri=MINILM, steps=[heads], output_name="minilm-halved", force_promote=True,
                 quality_budget=pb.QualityBudget(max_relative_degradation=0.001))
    assert stub.GetReport(pb.GetReportRequest(job_id=forced.job_id)).report.promoted
    assert stores.artifacts.versions("models", "minilm-halved") == [1]


def test_torchao_int8_model_loads_in_the_inference_backend(svc):
    stub, stores = svc
    int8 = pb.OptimizationStep(quantize=pb.QuantizeStep(method=pb.QUANTIZATION_METHOD_INT8_DYNAMIC))
    job = run(stub, model_uri=MINILM, steps=[int8], output_name="minilm-torchao",
              quality_budget=pb.QualityBudget(max_relative_degradation=0.05))
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    report = stub.GetReport(pb.GetReportRequest(job_id=job.job_id)).report
    assert report.after.backend == "pytorch" and report.after.quality > 0.95
    folder = stores.artifacts.resolve(report.result.uri).path
    backend = open_backend(folder, "pytorch", "embedding", "")
    assert backend.run(backend.encoder.encode(["hello"], truncate=True).ids).shape == (1, 384)


def test_a_running_job_cancelled_passes_through_cancelling_and_registers_nothing(svc):
    stub, stores = svc
    job = stub.SubmitOptimizationJob(pb.SubmitOptimizationJobRequest(
        model_uri=MINILM, steps=[EXPORT, ONNX_INT8], output_name="never")).job
    # Cancelled while it runs (a queued job is cancelled at once, without its worker's part in it).
    wait_until(lambda: stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).job.state == S.JOB_STATE_RUNNING,
               "the worker to start the job", timeout=120)
    cancelling = stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id)).job
    assert cancelling.state == S.JOB_STATE_CANCELLING
    states = [r.event.state for r in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=300)
              if r.event.type == jobs_pb2.JOB_EVENT_TYPE_STATE]
    assert states[-2:] == [S.JOB_STATE_CANCELLING, S.JOB_STATE_CANCELLED], states
    assert stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).job.state == S.JOB_STATE_CANCELLED
    assert stores.artifacts.versions("models", "never") == []
    with pytest.raises(grpc.RpcError) as info:
        stub.GetReport(pb.GetReportRequest(job_id=job.job_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION



@pytest.mark.parametrize("steps, target, field", [
    ([pb.OptimizationStep(prune=pb.PruneStep(method=pb.PRUNING_METHOD_MAGNITUDE_UNSTRUCTURED, sparsity=1.5))],
     pb.TARGET_CPU, "steps[0].prune.sparsity"),
    ([ONNX_INT8], pb.TARGET_CPU, "steps[0].quantize.method"),
    ([pb.OptimizationStep(quantize=pb.QuantizeStep(method=pb.QUANTIZATION_METHOD_INT4_WEIGHT_ONLY))], pb.TARGET_CPU,
     "steps[0].quantize.method"),
    ([EXPORT, pb.OptimizationStep(prune=pb.PruneStep(method=pb.PRUNING_METHOD_STRUCTURED_CHANNELS, sparsity=0.5))],
     pb.TARGET_CPU, "steps[1]"),
    ([], pb.TARGET_CPU, "steps"),
])
def test_bad_requests(svc, steps, target, field):
    stub, stores = svc
    before = stores.jobs.list("optimization").total_size
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitOptimizationJob(pb.SubmitOptimizationJobRequest(model_uri=MINILM, steps=steps, target=target,
                                                                   output_name="x"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == field
    assert stores.jobs.list("optimization").total_size == before


@pytest.mark.parametrize("request_fields, field", [
    ({"steps": [pb.OptimizationStep(export=pb.ExportStep(format=pb.EXPORT_FORMAT_ONNX, opset=17))]},
     "steps[0].export.opset"),
    ({"steps": [pb.OptimizationStep(export=pb.ExportStep(format=pb.EXPORT_FORMAT_ONNX, opset=99))]},
     "steps[0].export.opset"),
    ({"steps": [EXPORT], "quality_budget": pb.QualityBudget(max_relative_degradation=math.nan)},
     "quality_budget.max_relative_degradation"),
    ({"steps": [EXPORT], "quality_budget": pb.QualityBudget(max_relative_degradation=2.0)},
     "quality_budget.max_relative_degradation"),
    ({"steps": [pb.OptimizationStep(prune=pb.PruneStep(method=pb.PRUNING_METHOD_MAGNITUDE_UNSTRUCTURED,
                                                       sparsity=0.1))] * (MAX_STEPS + 1)}, "steps"),
    ({"steps": [EXPORT], "target": 7}, "target"),
    ({"steps": [EXPORT], "output_name": "bad\nname"}, "output_name"),
])
def test_what_a_worker_would_fail_on_is_refused_at_submit(svc, request_fields, field):
    stub, stores = svc
    before = stores.jobs.list("optimization").total_size
    request = pb.SubmitOptimizationJobRequest(model_uri=MINILM, output_name="x")
    for name, value in request_fields.items():
        if isinstance(value, list):
            getattr(request, name).extend(value)
        elif name == "quality_budget":
            request.quality_budget.CopyFrom(value)
        else:
            setattr(request, name, value)
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitOptimizationJob(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == field
    assert stores.jobs.list("optimization").total_size == before


def test_unknown_model_is_not_found(svc):
    stub, _ = svc
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitOptimizationJob(pb.SubmitOptimizationJobRequest(model_uri="artifact://models/nope/1",
                                                                   steps=[EXPORT], output_name="x"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_report_table_marks_a_figure_that_got_worse():
    measured = dict(size_bytes=90_000_000, parameters=22_000_000, batched_size=32, quality_metric="perplexity")
    report = pb.OptimizationReport(
        job_id="j", before=pb.Measurement(latency_ms_batch1=10.0, throughput_batched=100.0, quality=20.0,
                                          backend="pytorch", **measured),
        after=pb.Measurement(latency_ms_batch1=16.8, throughput_batched=395.0, quality=25.0, backend="onnxruntime",
                             **{**measured, "size_bytes": 23_000_000}))
    table = report_table(report)
    plain = Console(width=200, color_system=None, file=None)
    with plain.capture() as captured:
        plain.print(table)
    rows = {line.split("│")[1].strip(): line for line in captured.get().splitlines() if line.count("│") > 3}
    # Readable without colour: the ratio, the way it went, and the verdict in words.
    assert "×1.68 slower, worse" in rows["latency, batch 1 (ms)"]
    assert "×3.95 higher, better" in rows["throughput, batch 32 (seq/s)"]
    assert "×0.26 smaller, better" in rows["size (MB)"] and "×1.00 unchanged" in rows["parameters"]
    assert "×1.25 higher, worse" in rows["quality (perplexity)"]  # lower perplexity is better
    # And in red where colour shows.
    segments = list(Console(width=200, color_system="truecolor").render(table))
    styles = {s.text.strip(): s.style for s in segments if "×" in s.text}
    assert styles["×1.68 slower, worse"].color.name == "red"
    assert styles["×3.95 higher, better"].color.name != "red"
