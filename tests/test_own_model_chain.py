"""A user's own model through the whole platform, real processes throughout: a Llama checkpoint built here
(as a user's would be on disk) is uploaded with ImportModel, a corpus is cleaned and tokenized with the
model's own tokenizer, training fine-tunes the import, optimization quantizes the result, inference serves
the optimized model, and the registry's lineage walks back from it to the import and the corpus."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fastserve.client.model_import import import_model
from fastserve.common.v1 import jobs_pb2
from fastserve.inference.v1 import inference_pb2 as ipb
from fastserve.inference.v1 import inference_pb2_grpc
from fastserve.optimization.v1 import optimization_pb2 as opb
from fastserve.optimization.v1 import optimization_pb2_grpc
from fastserve.registry.v1 import registry_pb2 as rpb
from fastserve.registry.v1 import registry_pb2_grpc
from fastserve.runtime.config import Config
from fastserve.runtime.stores import Stores
from fastserve.services.preprocessing.core import Preprocessing
from fastserve.training.v1 import training_pb2 as tpb
from fastserve.training.v1 import training_pb2_grpc
from tests.conftest import private_env
from tests.support.processes import start_inference, start_service, start_worker
from tests.support.tiny_models import build_causal_lm

SUCCEEDED = jobs_pb2.JOB_STATE_SUCCEEDED


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server):
    """Inference (with the registry), training and optimization with one worker, on one home."""
    logs = tmp_path_factory.mktemp("chain-logs")
    env = private_env(tmp_path_factory.mktemp("chain") / "home", redis_server.url)
    procs = [start_inference(Path(env["FASTSERVE_HOME"]), logs / "inference.log", FASTSERVE_INFERENCE_MODELS="none",
                             FASTSERVE_REDIS_URL=env["FASTSERVE_REDIS_URL"])]
    try:
        procs += [start_service("training", env, logs), start_service("optimization", env, logs),
                  start_worker(env, logs)]
        channels = {name: grpc.insecure_channel(proc.target) for name, proc in zip(
            ("inference", "training", "optimization"), procs, strict=False)}
        yield env, channels
        for channel in channels.values():
            channel.close()
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_an_imported_llama_is_fine_tuned_optimized_served_and_traced(stack, tmp_path):
    env, channels = stack
    stores = Stores.from_config(Config.from_env(env))
    registry = registry_pb2_grpc.RegistryServiceStub(channels["inference"])
    users_model = build_causal_lm(tmp_path / "my-llama", family="llama", hidden=64, layers=2, heads=4,
                                  vocab=300, documents=300, train_steps=0)

    base = import_model(registry, users_model, "my-llama").artifact.ref.uri
    assert base == "artifact://models/my-llama/1"

    # A corpus of the user's (cleaned from the bundled docstrings), tokenized with the imported model's tokenizer.
    pre = Preprocessing(stores)
    corpus = pre.run_clean({"source": {"builtin": {"name": "stdlib-docstrings", "seed": 0, "max_documents": 300}},
                            "steps": [{"name": "collapse_whitespace", "options": {}},
                                      {"name": "dedup_exact", "options": {}}],
                            "output_name": "my-docs"})["corpus_uri"]
    dataset = pre.run_build_dataset({"source": {"artifact_uri": corpus}, "tokenizer_uri": base, "task": "causal_lm",
                                     "max_length": 32, "splits": {"validation_fraction": 0.1, "seed": 0},
                                     "output_name": "my-clm"})["dataset_uri"]

    training = training_pb2_grpc.TrainingServiceStub(channels["training"])
    job = training.SubmitTrainingJob(tpb.SubmitTrainingJobRequest(
        model=tpb.ModelSpec(pretrained_uri=base), task=tpb.TRAINING_TASK_CAUSAL_LM, dataset_uri=dataset,
        output_name="my-llama-tuned", hyperparameters=tpb.Hyperparameters(
            learning_rate=1e-3, batch_size=8, max_steps=5, warmup_steps=1, log_interval_steps=1, seed=0))).job
    list(training.WatchJob(tpb.WatchJobRequest(job_id=job.job_id), timeout=600))
    trained = training.GetJob(tpb.GetJobRequest(job_id=job.job_id)).job
    assert trained.state == SUCCEEDED, trained.error
    tuned = trained.result["model_uri"]

    optimization = optimization_pb2_grpc.OptimizationServiceStub(channels["optimization"])
    job = optimization.SubmitOptimizationJob(opb.SubmitOptimizationJobRequest(
        model_uri=tuned, output_name="my-llama-int8", eval_dataset_uri=dataset, force_promote=True,
        steps=[opb.OptimizationStep(quantize=opb.QuantizeStep(method=opb.QUANTIZATION_METHOD_INT8_WEIGHT_ONLY))])).job
    list(optimization.WatchJob(opb.WatchJobRequest(job_id=job.job_id), timeout=600))
    optimized_job = optimization.GetJob(opb.GetJobRequest(job_id=job.job_id)).job
    assert optimized_job.state == SUCCEEDED, optimized_job.error
    optimized = optimized_job.result["result_uri"]
    assert optimized == "artifact://models/my-llama-int8/1"

    inference = inference_pb2_grpc.InferenceServiceStub(channels["inference"])
    status = inference.LoadModel(ipb.LoadModelRequest(name="my-llama-int8", model_uri=optimized)).status
    assert status.state == ipb.MODEL_STATE_READY, status.error
    reply = inference.Generate(ipb.GenerateRequest(model="my-llama-int8", text="def parse",
                                                   sampling=ipb.SamplingParams(max_new_tokens=8)))
    assert reply.usage.completion_tokens >= 1 and list(reply.token_ids)

    shown = registry.GetArtifact(rpb.GetArtifactRequest(uri=optimized))
    edges = {(e.uri, e.relation, e.input_uri): e.job_id for e in shown.lineage}
    tuned_v = stores.artifacts.resolve(tuned).ref.uri
    assert edges[(optimized, "source_model", tuned_v)] == optimized_job.job_id
    assert edges[(tuned_v, "base_model", base)] == trained.job_id
    assert (tuned_v, "dataset", dataset) in edges
    assert (dataset, "corpus", corpus) in edges and (dataset, "tokenizer", base) in edges
    assert shown.source == f"job {optimized_job.job_id}"
    assert registry.GetArtifact(rpb.GetArtifactRequest(uri=base)).source == "import"
    # The chain holds the served model: its base cannot be deleted from under its lineage's user, the
    # optimized one cannot while it is served.
    with pytest.raises(grpc.RpcError) as refused:
        registry.DeleteArtifact(rpb.DeleteArtifactRequest(uri=optimized))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "my-llama-int8" in refused.value.details()
