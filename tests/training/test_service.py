"""The training service end to end: a real server process, real Celery workers, the tests' Redis, real
models trained on the built-in stdlib corpus."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastserve.common.v1 import jobs_pb2
from fastserve.runtime.config import Config
from fastserve.runtime.stores import Stores
from fastserve.services.preprocessing.core import Preprocessing
from fastserve.storage.datasets import DatasetReader
from fastserve.training.v1 import training_pb2 as pb
from fastserve.training.v1 import training_pb2_grpc
from tests.conftest import private_env
from tests.support.processes import start_service, start_worker
from tests.support.rpc import field_of
from tests.support.waiting import wait_until

S = jobs_pb2.JobState
STDLIB = {"builtin": {"name": "stdlib-docstrings", "seed": 0, "max_documents": 2500}}


@pytest.fixture(scope="module")
def env(tmp_path_factory, redis_server):
    home = tmp_path_factory.mktemp("train")
    return {**private_env(home / "home", redis_server.url), "FASTSERVE_JOB_LEASE_SECONDS": "2"}


@pytest.fixture(scope="module")
def stores(env):
    return Stores.from_config(Config.from_env(env))


@pytest.fixture(scope="module")
def datasets(stores):
    """A causal-LM dataset (BPE trained here) and a topic-classification dataset (MiniLM's tokenizer)."""
    pre = Preprocessing(stores)
    tok = pre.run_train_tokenizer({"source": STDLIB, "model": "bpe", "vocab_size": 1000, "output_name": "bpe"})
    clm = pre.run_build_dataset({"source": STDLIB, "tokenizer_uri": tok["tokenizer_uri"], "task": "causal_lm",
                                 "max_length": 64, "splits": {"validation_fraction": 0.05, "seed": 0},
                                 "output_name": "clm"})
    topics = {"builtin": {"name": "stdlib-docstrings", "seed": 0, "top_labels": 4, "max_documents": 900}}
    cls = pre.run_build_dataset({"source": topics, "tokenizer_uri": "builtin://all-MiniLM-L6-v2",
                                 "task": "sequence_classification", "max_length": 64,
                                 "splits": {"validation_fraction": 0.2, "seed": 0}, "output_name": "topics"})
    return {"clm": clm["dataset_uri"], "topics": cls["dataset_uri"], "tokenizer": tok["tokenizer_uri"]}


@pytest.fixture(scope="module")
def service(env, tmp_path_factory):
    proc = start_service("training", env, tmp_path_factory.mktemp("train-logs"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(service):
    channel = grpc.insecure_channel(service.target)
    yield training_pb2_grpc.TrainingServiceStub(channel)
    channel.close()


@pytest.fixture
def worker(env, log_dir):
    proc = start_worker(env, log_dir)
    yield proc
    proc.stop()


def gpt(datasets, steps=300, **hyper):
    h = {"learning_rate": 3e-3, "batch_size": 16, "max_steps": steps, "warmup_steps": 20, "log_interval_steps": 20,
         "eval_interval_steps": 100, "seed": 1, **hyper}
    return pb.SubmitTrainingJobRequest(
        model=pb.ModelSpec(architecture=pb.ArchitectureConfig(family=pb.ARCHITECTURE_FAMILY_GPT2, num_layers=2,
                                                              hidden_size=64, num_heads=4,
                                                              max_position_embeddings=128)),
        task=pb.TRAINING_TASK_CAUSAL_LM, dataset_uri=datasets["clm"], hyperparameters=pb.Hyperparameters(**h),
        output_name="stdlib-gpt")


def watch(stub, job_id, timeout=600):
    return [r.event for r in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout)]


def finished(stub, job_id):
    job = stub.GetJob(pb.GetJobRequest(job_id=job_id)).job
    assert job.state == S.JOB_STATE_SUCCEEDED, job.error
    return job


def metrics(events):
    return [dict(e.data) for e in events if e.type == jobs_pb2.JOB_EVENT_TYPE_METRICS]


def test_small_gpt_learns_the_stdlib_corpus(stub, worker, stores, datasets):
    job = stub.SubmitTrainingJob(gpt(datasets)).job
    assert job.state == S.JOB_STATE_QUEUED
    events = watch(stub, job.job_id)
    done = finished(stub, job.job_id)
    train = [m for m in metrics(events) if "loss" in m]
    assert train[0]["step"] == 20 and train[-1]["step"] == 300
    # From about ln(vocab) = 6.9 nats for an untrained model (perplexity 1000) to well below it.
    assert train[-1]["loss"] < math.log(1000) - 1.2 and train[-1]["loss"] < train[0]["loss"] - 1.0
    assert all(m["tokens_per_second"] > 0 and "eta_seconds" in m and "learning_rate" in m for m in train)
    evals = [m for m in metrics(events) if "eval_loss" in m]
    assert len(evals) == 3 and evals[-1]["eval_perplexity"] < evals[0]["eval_perplexity"]
    assert not any(e.type == jobs_pb2.JOB_EVENT_TYPE_ARTIFACT for e in events)  # no checkpoint under 500 steps
    model_dir = stores.artifacts.resolve(done.result["model_uri"]).path
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert (model_dir / "generation_config.json").exists() and (model_dir / "model.safetensors").exists()
    ids = tokenizer("Return the", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5
    assert json.loads((model_dir / "metrics.json").read_text())["final"]["step"] == 300


def test_minilm_classifier_beats_the_majority_baseline(stub, worker, stores, datasets):
    job = stub.SubmitTrainingJob(pb.SubmitTrainingJobRequest(
        model=pb.ModelSpec(pretrained_uri="builtin://all-MiniLM-L6-v2"), task=pb.TRAINING_TASK_SEQUENCE_CLASSIFICATION,
        dataset_uri=datasets["topics"], output_name="stdlib-topic",
        hyperparameters=pb.Hyperparameters(learning_rate=1e-4, batch_size=16, epochs=2, warmup_steps=10,
                                           log_interval_steps=10, seed=0))).job
    watch(stub, job.job_id)
    done = finished(stub, job.job_id)
    artifact = stores.artifacts.resolve(datasets["topics"])
    validation = DatasetReader(artifact.path, artifact.manifest["metadata"]).arrays("validation")["labels"]
    majority = collections.Counter(validation.tolist()).most_common(1)[0][1] / len(validation)
    assert done.result["metrics"]["eval_accuracy"] > majority + 0.15
    config = json.loads((stores.artifacts.resolve(done.result["model_uri"]).path / "config.json").read_text())
    assert set(config["id2label"].values()) == set(artifact.manifest["metadata"]["dataset"]["label_map"])


def test_cancel_saves_a_checkpoint_and_ends_cancelled(stub, worker, stores, datasets):
    job = stub.SubmitTrainingJob(gpt(datasets, steps=5000)).job
    stream = stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=120)
    for response in stream:
        if response.event.type == jobs_pb2.JOB_EVENT_TYPE_METRICS:
            stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id))
            break
    rest = [r.event for r in stream]
    final = stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).job
    assert final.state == S.JOB_STATE_CANCELLED
    saved = [e for e in rest if e.type == jobs_pb2.JOB_EVENT_TYPE_ARTIFACT]
    assert saved and saved[-1].data["uri"].startswith(f"artifact://checkpoints/{job.job_id}/")
    assert stores.artifacts.versions("checkpoints", job.job_id)


def test_killed_worker_resumes_from_its_checkpoint(stub, env, stores, datasets, log_dir):
    doomed = start_worker(env, log_dir)
    survivor = None
    try:
        job = stub.SubmitTrainingJob(gpt(datasets, steps=240, checkpoint_interval_steps=40,
                                         log_interval_steps=10)).job
        for response in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=120):
            if response.event.type == jobs_pb2.JOB_EVENT_TYPE_METRICS and response.event.data["step"] >= 90:
                break
        doomed.kill()
        survivor = start_worker(env, log_dir)
        events = watch(stub, job.job_id)
        done = finished(stub, job.job_id)
    finally:
        doomed.kill()
        if survivor:
            survivor.stop()
    resumed_from = int(done.result["metrics"]["resumed_from_step"])
    assert resumed_from >= 80 and resumed_from % 40 == 0
    requeued = next(i for i, e in enumerate(events) if "queued again" in e.message)
    steps_after = [m["step"] for m in metrics(events[requeued:]) if "loss" in m]
    # The step count went on from the checkpoint; it did not restart.
    assert steps_after[0] == resumed_from + 10 and steps_after[-1] == 240
    assert done.result["steps"] == 240


def test_two_jobs_on_one_worker_queue_and_both_finish(stub, worker, datasets):
    first = stub.SubmitTrainingJob(gpt(datasets, steps=40)).job
    second = stub.SubmitTrainingJob(gpt(datasets, steps=40)).job
    wait_until(lambda: stub.GetJob(pb.GetJobRequest(job_id=first.job_id)).job.state == S.JOB_STATE_RUNNING,
               "the worker to take the first job", timeout=60)
    assert stub.GetJob(pb.GetJobRequest(job_id=second.job_id)).job.state == S.JOB_STATE_QUEUED
    watch(stub, second.job_id)
    a, b = finished(stub, first.job_id), finished(stub, second.job_id)
    assert b.start_time.ToNanoseconds() >= a.end_time.ToNanoseconds()
    assert a.result["model_uri"] != b.result["model_uri"]


def test_two_process_ddp_matches_one_process(stub, worker, stores, datasets):
    def request(processes, batch):
        r = gpt(datasets, steps=30, batch_size=batch, log_interval_steps=10, eval_interval_steps=1000, seed=3)
        r.model.architecture.dropout = 0.0
        r.num_processes = processes
        return r

    one = stub.SubmitTrainingJob(request(1, 8)).job
    two = stub.SubmitTrainingJob(request(2, 4)).job
    watch(stub, two.job_id)
    a, b = finished(stub, one.job_id), finished(stub, two.job_id)
    assert abs(a.result["metrics"]["loss"] - b.result["metrics"]["loss"]) < 1e-3
    wa = load_file(str(stores.artifacts.resolve(a.result["model_uri"]).path / "model.safetensors"))
    wb = load_file(str(stores.artifacts.resolve(b.result["model_uri"]).path / "model.safetensors"))
    assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) < 1e-3



def test_bad_requests_queue_nothing(stub, stores, datasets):
    before = stores.jobs.list("training").total_size
    unknown = gpt(datasets)
    unknown.model.architecture.family = pb.ARCHITECTURE_FAMILY_UNSPECIFIED
    bert_lm = gpt(datasets)
    bert_lm.model.architecture.family = pb.ARCHITECTURE_FAMILY_BERT
    wrong_task = gpt(datasets)
    wrong_task.dataset_uri = datasets["topics"]
    bad_lr = gpt(datasets, learning_rate=3.0)
    bad_batch = gpt(datasets, batch_size=100000)
    heads = gpt(datasets)
    heads.model.architecture.num_heads = 5
    # What a worker would have failed on, seen at submit (issue 15): non-finite and out-of-range numbers.
    later = [(gpt(datasets, learning_rate=math.nan), "hyperparameters.learning_rate"),
             (gpt(datasets, max_grad_norm=math.inf), "hyperparameters.max_grad_norm"),
             (gpt(datasets, weight_decay=-1.0), "hyperparameters.weight_decay"),
             (gpt(datasets, seed=-1), "hyperparameters.seed"),
             (gpt(datasets, seed=2**40), "hyperparameters.seed"),
             (gpt(datasets, steps=10**12), "hyperparameters.max_steps")]
    for request, field in [(unknown, "model.architecture.family"), (bert_lm, "model.architecture.family"),
                           (wrong_task, "task"), (bad_lr, "hyperparameters.learning_rate"),
                           (bad_batch, "hyperparameters.batch_size"), (heads, "model.architecture.num_heads"),
                           *later]:
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitTrainingJob(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert field_of(info.value) == field
    missing = gpt(datasets)
    missing.dataset_uri = "artifact://datasets/nope/1"
    huge = gpt(datasets)
    huge.model.architecture.hidden_size, huge.model.architecture.num_layers = 8192, 96
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitTrainingJob(missing)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and field_of(info.value) == "dataset_uri"
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitTrainingJob(huge)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "GiB" in info.value.details()
    assert stores.jobs.list("training").total_size == before


def test_the_task_comes_from_the_dataset_and_each_line_is_reported_once(stub, worker, stores, datasets):
    bert = pb.SubmitTrainingJobRequest(
        model=pb.ModelSpec(architecture=pb.ArchitectureConfig(family=pb.ARCHITECTURE_FAMILY_BERT, num_layers=1,
                                                              hidden_size=32, num_heads=2,
                                                              max_position_embeddings=64)),
        dataset_uri=datasets["topics"], output_name="topics-bert",
        hyperparameters=pb.Hyperparameters(batch_size=8, max_steps=10, log_interval_steps=5, eval_batches=2))
    lm = gpt(datasets, steps=40, log_interval_steps=10, eval_interval_steps=20)
    lm.task = pb.TRAINING_TASK_UNSPECIFIED
    classifier, causal = stub.SubmitTrainingJob(bert).job, stub.SubmitTrainingJob(lm).job
    assert classifier.params["task"] == "sequence_classification" and causal.params["task"] == "causal_lm"
    events = watch(stub, causal.job_id)
    watch(stub, classifier.job_id)
    labels = set(stores.artifacts.resolve(datasets["topics"]).manifest["metadata"]["dataset"]["label_map"])
    config = json.loads((stores.artifacts.resolve(finished(stub, classifier.job_id).result["model_uri"]).path
                         / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert set(config["id2label"].values()) == labels
    config = json.loads((stores.artifacts.resolve(finished(stub, causal.job_id).result["model_uri"]).path
                         / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    # What a loop printing each event's progress and message shows: every line once, with its progress.
    messages = [e.message for e in events]
    assert not [a for a, b in zip(messages, messages[1:], strict=False) if a and a == b], messages
    reports = [e for e in events if e.type == jobs_pb2.JOB_EVENT_TYPE_METRICS]
    assert [m["step"] for m in metrics(events) if "loss" in m] == [10, 20, 30, 40]
    assert all(e.message.startswith(f"step {int(e.data['step'])}") for e in reports)
    assert reports[0].progress == pytest.approx(0.25) and reports[-1].progress == pytest.approx(1.0)
    assert not any(e.type == jobs_pb2.JOB_EVENT_TYPE_PROGRESS for e in events)


def _cli(service, *args: str) -> subprocess.CompletedProcess:
    fastserve = Path(sys.executable).with_name("fastserve")
    env = {**os.environ, "FASTSERVE_HOST": "127.0.0.1", "FASTSERVE_TRAINING_PORT": str(service.port)}
    return subprocess.run([str(fastserve), *args], env=env, capture_output=True, text=True, timeout=120)


def test_a_cancelled_job_resumes_from_its_checkpoint_as_a_new_job(stub, service, worker, stores, datasets):
    old = stub.SubmitTrainingJob(gpt(datasets, steps=5000, checkpoint_interval_steps=20, log_interval_steps=10)).job
    stream = stub.WatchJob(pb.WatchJobRequest(job_id=old.job_id), timeout=120)
    before = []
    for response in stream:
        before.append(response.event)
        if response.event.type == jobs_pb2.JOB_EVENT_TYPE_ARTIFACT:
            stub.CancelJob(pb.CancelJobRequest(job_id=old.job_id))
            break
    before += [r.event for r in stream]
    assert stub.GetJob(pb.GetJobRequest(job_id=old.job_id)).job.state == S.JOB_STATE_CANCELLED
    saved = stores.artifacts.versions("checkpoints", old.job_id)[-1]
    assert saved >= 20

    resumed = _cli(service, "--json", "train", "resume", old.job_id, "--max-steps", str(saved + 20))
    assert resumed.returncode == 0, resumed.stderr
    new = json.loads(resumed.stdout)
    assert new["job_id"] != old.job_id and new["params"]["resumed_from"] == old.job_id
    assert new["params"]["resume_checkpoint"] == f"artifact://checkpoints/{old.job_id}/{saved}"
    events = watch(stub, new["job_id"])
    done = finished(stub, new["job_id"])
    assert int(done.result["metrics"]["resumed_from_step"]) == saved and int(done.result["steps"]) == saved + 20
    first = next(m for m in metrics(events) if "loss" in m)
    # The step count goes on from the checkpoint, and so does the loss: the weights are the trained ones.
    assert saved < first["step"] <= saved + 10
    old_losses = [m["loss"] for m in metrics(before) if "loss" in m]
    assert first["loss"] < old_losses[0] - 0.3, (first, old_losses)
    # The old job is untouched: still cancelled, its checkpoints kept.
    assert stub.GetJob(pb.GetJobRequest(job_id=old.job_id)).job.state == S.JOB_STATE_CANCELLED
    assert saved in stores.artifacts.versions("checkpoints", old.job_id)


def test_only_a_cancelled_or_failed_job_with_a_checkpoint_resumes(stub, stores, datasets):
    # No worker here: the job stays queued, and cancelled it ends before any checkpoint.
    queued = stub.SubmitTrainingJob(gpt(datasets)).job
    with pytest.raises(grpc.RpcError) as info:
        stub.ResumeTrainingJob(pb.ResumeTrainingJobRequest(job_id=queued.job_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "QUEUED" in info.value.details()
    stub.CancelJob(pb.CancelJobRequest(job_id=queued.job_id))
    before = stores.jobs.list("training").total_size
    with pytest.raises(grpc.RpcError) as info:
        stub.ResumeTrainingJob(pb.ResumeTrainingJobRequest(job_id=queued.job_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no checkpoint" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.ResumeTrainingJob(pb.ResumeTrainingJobRequest(job_id="no-such-job"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub.ResumeTrainingJob(pb.ResumeTrainingJobRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(info.value) == "job_id"
    assert stores.jobs.list("training").total_size == before
