"""Redis stopping and coming back: the job store answers UNAVAILABLE while it is down (never INTERNAL, never
a hang), a running job's writes wait for it, and a real training job survives a restart of its Redis."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from fastserve.common.v1 import jobs_pb2
from fastserve.runtime.config import Config
from fastserve.runtime.errors import Unavailable
from fastserve.runtime.jobs import EventType, JobState, JobStore
from fastserve.runtime.server import create_server
from fastserve.runtime.stores import Stores
from fastserve.services.preprocessing.core import Preprocessing
from fastserve.services.training.servicer import register
from fastserve.training.v1 import training_pb2 as pb
from fastserve.training.v1 import training_pb2_grpc
from tests.conftest import private_env
from tests.support.processes import start_redis, start_worker


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test alone, with an append-only file, so a restart keeps the jobs."""
    server = start_redis(tmp_path / "redis", persistent=True)
    yield server
    server.stop()


def test_store_is_unavailable_while_redis_is_down_and_writes_wait_for_it(own_redis):
    jobs = JobStore.from_url(own_redis.url, "fastserve:faults:", write_retry_seconds=30)
    job = jobs.create("training", "t", {})
    jobs.transition(job.job_id, JobState.RUNNING)
    own_redis.stop()
    started = time.monotonic()
    for call in (lambda: jobs.get(job.job_id), lambda: jobs.list("training"), lambda: jobs.create("training", "t", {}),
                 lambda: list(jobs.events(job.job_id)), lambda: jobs.request_cancel(job.job_id)):
        with pytest.raises(Unavailable):
            call()
    assert time.monotonic() - started < 15  # bounded by the client's timeouts and retries, not a hang
    # A running job's report, made while Redis is down, lands once it is back.
    reported = threading.Thread(target=lambda: jobs.report(job.job_id, EventType.LOG, "during the outage"))
    reported.start()
    time.sleep(1.0)
    assert reported.is_alive()
    own_redis.start()
    reported.join(30)
    assert not reported.is_alive()
    jobs.transition(job.job_id, JobState.SUCCEEDED)
    assert [e.message for e in jobs.events(job.job_id)][-2:] == ["during the outage", "succeeded"]


def test_a_training_job_survives_a_redis_restart(tmp_path, own_redis):
    env = private_env(tmp_path / "home", own_redis.url)
    config = Config.from_env(env)
    stores = Stores.from_config(config)
    pre = Preprocessing(stores)
    source = {"builtin": {"name": "stdlib-docstrings", "seed": 0, "max_documents": 300}}
    tokenizer = pre.run_train_tokenizer({"source": source, "model": "bpe", "vocab_size": 300, "output_name": "bpe"})
    dataset = pre.run_build_dataset({"source": source, "tokenizer_uri": tokenizer["tokenizer_uri"],
                                     "task": "causal_lm", "max_length": 32,
                                     "splits": {"validation_fraction": 0.05, "seed": 0}, "output_name": "clm"})
    logs = tmp_path / "logs"
    logs.mkdir()
    steps = 60
    request = pb.SubmitTrainingJobRequest(
        model=pb.ModelSpec(architecture=pb.ArchitectureConfig(family=pb.ARCHITECTURE_FAMILY_GPT2, num_layers=1,
                                                              hidden_size=32, num_heads=2,
                                                              max_position_embeddings=64)),
        task=pb.TRAINING_TASK_CAUSAL_LM, dataset_uri=dataset["dataset_uri"], output_name="tiny",
        hyperparameters=pb.Hyperparameters(learning_rate=3e-3, batch_size=8, max_steps=steps, warmup_steps=5,
                                           log_interval_steps=5, eval_interval_steps=1000, eval_batches=2, seed=1))
    # The service in this process (its RPCs are what is checked), the job on a real Celery worker.
    server = create_server("training", lambda s: register(s, stores), config, port=0)
    worker = start_worker(env, logs)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        job = stub.SubmitTrainingJob(request).job
        deadline = time.monotonic() + 40
        while stores.jobs.get(job.job_id).progress < 0.15:
            assert time.monotonic() < deadline and not stores.jobs.get(job.job_id).state.terminal
            time.sleep(0.05)
        own_redis.stop()
        with pytest.raises(grpc.RpcError) as info:
            stub.GetJob(pb.GetJobRequest(job_id=job.job_id), timeout=20)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        time.sleep(2)
        own_redis.start()
        restarted = time.time()
        events = [r.event for r in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=60)]
        done = stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).job
        channel.close()
    finally:
        worker.stop()
        server.stop(0)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.end_time.ToNanoseconds() / 1e9 > restarted  # it ran on through the outage
    logged = [int(e.data["step"]) for e in events if e.type == jobs_pb2.JOB_EVENT_TYPE_METRICS and "loss" in e.data]
    # Every report of the run, the outage's included, once and in order: the step count went on.
    assert logged == list(range(5, steps + 1, 5))
    assert int(done.result["steps"]) == steps
    assert not any("queued again" in e.message for e in events)
