"""Stacks with different homes on one Redis: each has its namespace, and never sees another's jobs,
queues or workers. Against the tests' own Redis, first the job store, then two real stacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis

from fastserve.common.v1 import jobs_pb2
from fastserve.preprocessing.v1 import preprocessing_pb2 as pb
from fastserve.preprocessing.v1 import preprocessing_pb2_grpc
from fastserve.runtime.celery_app import client_app
from fastserve.runtime.config import Config
from fastserve.runtime.errors import InvalidArgument, NotFound
from fastserve.runtime.jobs import JobState
from fastserve.runtime.stores import Stores
from fastserve.storage.artifacts import ArtifactStore
from tests.conftest import private_env
from tests.support.processes import start_service, start_worker
from tests.support.rpc import field_of

S = jobs_pb2.JobState


def _stores(home: Path, redis_url: str, **settings: str) -> Stores:
    return Stores.from_config(Config.from_env({"FASTSERVE_HOME": str(home), "FASTSERVE_REDIS_URL": redis_url,
                                               **settings}))


def test_homes_get_their_own_namespaces(tmp_path, redis_server):
    a, b = _stores(tmp_path / "a", redis_server.url), _stores(tmp_path / "b", redis_server.url)
    assert a.config.namespace != b.config.namespace
    assert a.config.namespace.startswith("home-") and len(a.config.namespace) == len("home-") + 12
    # Derived from the resolved absolute path: another spelling of the same home is the same stack.
    assert _stores(tmp_path / "x" / ".." / "a", redis_server.url).config.namespace == a.config.namespace
    assert a.jobs.prefix == f"fastserve:{a.config.namespace}:"


def test_a_store_sees_only_its_own_namespace(tmp_path, redis_server):
    a, b = _stores(tmp_path / "a", redis_server.url), _stores(tmp_path / "b", redis_server.url)
    job = b.jobs.create("training", "training.train", {"output_name": "theirs"})
    b.jobs.transition(job.job_id, JobState.RUNNING)
    for call in (lambda: a.jobs.get(job.job_id), lambda: list(a.jobs.events(job.job_id)),
                 lambda: a.jobs.request_cancel(job.job_id)):
        with pytest.raises(NotFound):
            call()
    assert a.jobs.list("training").jobs == []
    assert not a.jobs.cancel_requested(job.job_id)
    # Another process of the same home (a fresh store) sees it, and the failed cancel above did nothing.
    same = _stores(tmp_path / "b", redis_server.url)
    assert [j.job_id for j in same.jobs.list("training").jobs] == [job.job_id]
    assert same.jobs.get(job.job_id).state is JobState.RUNNING and not same.jobs.cancel_requested(job.job_id)


def test_explicit_namespace_joins_homes_at_different_paths(tmp_path, redis_server):
    host1 = _stores(tmp_path / "mnt" / "fs", redis_server.url, FASTSERVE_NAMESPACE="prod-1")
    host2 = _stores(tmp_path / "data", redis_server.url, FASTSERVE_NAMESPACE="prod-1")
    assert host1.config.namespace == host2.config.namespace == "prod-1"
    assert host1.config.redis_prefix == "fastserve:prod-1:"
    job = host1.jobs.create("optimization", "optimization.prune", {})
    assert host2.jobs.get(job.job_id).job_type == "optimization.prune"
    assert Config.from_env(host1.config.env()).namespace == "prod-1"  # handed to children as it is


@pytest.mark.parametrize("value", ["Prod", "a_b", "a:b", "a b", "x" * 41, "ü"])
def test_bad_namespace_names_the_variable(value):
    with pytest.raises(InvalidArgument) as info:
        Config.from_env({"FASTSERVE_NAMESPACE": value})
    assert field_of(info.value) == "FASTSERVE_NAMESPACE"
    assert info.value.message.startswith(f"FASTSERVE_NAMESPACE={value!r} must be")


def test_config_and_status_show_the_namespace_in_effect(tmp_path):
    env = {**os.environ, "FASTSERVE_HOME": str(tmp_path / "home")}
    env.pop("FASTSERVE_NAMESPACE", None)
    derived = Config.from_env(env).namespace

    def fastserve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fastserve.cli", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    listing = fastserve("config").stdout
    assert f"FASTSERVE_NAMESPACE  (default '', in effect {derived!r})" in listing
    rows = {r["variable"]: r for r in json.loads(fastserve("--json", "config").stdout)}
    assert rows["FASTSERVE_NAMESPACE"]["value"] == derived and "value" not in rows["FASTSERVE_HOME"]
    status = fastserve("status")  # not running, and still says whose keys it would use
    assert f"namespace {derived} (Redis keys under fastserve:{derived}:)" in status.stdout.splitlines()
    env["FASTSERVE_NAMESPACE"] = "Shared"
    bad = fastserve("config")
    assert bad.returncode == 2 and "FASTSERVE_NAMESPACE='Shared'" in bad.stderr


# -- two real stacks on one Redis ---------------------------------------------------------------

WORDS = {"a": "alpha bravo charlie delta echo foxtrot", "b": "xray yankee zulu whiskey victor uniform"}


def _corpus(words: str) -> bytes:
    parts = words.split()
    return "\n".join(" ".join(parts[(i + j) % len(parts)] for j in range(8)) for i in range(300)).encode()


def _upload(stub, data: bytes) -> str:
    header = pb.UploadCorpusRequest(header=pb.UploadCorpusHeader(name="tiny", format=pb.TEXT_FORMAT_PLAIN))
    return stub.UploadCorpus(iter([header, pb.UploadCorpusRequest(chunk=data)]), timeout=60).corpus.uri


def _train(stub, corpus_uri: str) -> str:
    return stub.TrainTokenizer(pb.TrainTokenizerRequest(
        source=pb.CorpusSource(artifact_uri=corpus_uri), model=pb.TOKENIZER_MODEL_BPE, vocab_size=300,
        output_name="tok"), timeout=30).job.job_id


def _finish(stub, job_id: str):
    for _ in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=60):
        pass
    return stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).job


def _vocab(home: Path) -> set[str]:
    store = ArtifactStore(home / "artifacts")
    assert store.versions("tokenizers", "tok") == [1]  # one publication: nobody else's job wrote here
    path = store.resolve("artifact://tokenizers/tok/1").path / "tokenizer.json"
    return set(json.loads(path.read_text())["model"]["vocab"])


def test_two_stacks_on_one_redis_keep_to_themselves(tmp_path, redis_server):
    homes = {n: tmp_path / n / "home" for n in "ab"}
    envs = {n: private_env(homes[n], redis_server.url) for n in "ab"}  # both before anything starts
    configs = {n: Config.from_env(envs[n]) for n in "ab"}
    db = redis.Redis.from_url(redis_server.url, decode_responses=True)
    logs = {n: tmp_path / n / "logs" for n in "ab"}
    for path in logs.values():
        path.mkdir(parents=True)
    procs = []
    try:
        services = {}
        for n in "ab":
            procs.append(services.setdefault(n, start_service("preprocessing", envs[n], logs[n])))
        procs.append(worker_a := start_worker(envs["a"], logs["a"]))
        channels = {n: grpc.insecure_channel(services[n].target) for n in "ab"}
        stubs = {n: preprocessing_pb2_grpc.PreprocessingServiceStub(channels[n]) for n in "ab"}
        # The same corpus URI in both homes names different text, as the same tokenizer URI will.
        corpora = {n: _upload(stubs[n], _corpus(WORDS[n])) for n in "ab"}
        assert corpora["a"] == corpora["b"] == "artifact://corpora/tiny/1"

        # B's job is queued while only A's worker runs: it must wait for a worker of its own.
        job_b = _train(stubs["b"], corpora["b"])
        job_a = _train(stubs["a"], corpora["a"])
        done_a = _finish(stubs["a"], job_a)
        assert done_a.state == S.JOB_STATE_SUCCEEDED, done_a.error
        time.sleep(1.0)
        assert stubs["b"].GetJob(pb.GetJobRequest(job_id=job_b)).job.state == S.JOB_STATE_QUEUED
        assert db.llen(f"{configs['b'].redis_prefix}preprocessing") == 1  # its message, untaken, in B's queue
        assert client_app(configs["b"]).control.ping(timeout=0.5) == []  # A's worker hears only A
        assert [*client_app(configs["a"]).control.ping(timeout=0.5)[0]] == [worker_a.node]

        procs.append(start_worker(envs["b"], logs["b"]))
        done_b = _finish(stubs["b"], job_b)
        assert done_b.state == S.JOB_STATE_SUCCEEDED, done_b.error

        ids = {"a": job_a, "b": job_b}
        for n, other in (("a", "b"), ("b", "a")):
            listed = stubs[n].ListJobs(pb.ListJobsRequest(), timeout=10)
            assert [j.job_id for j in listed.jobs] == [ids[n]] and listed.page.total_size == 1
            with pytest.raises(grpc.RpcError) as info:
                stubs[n].GetJob(pb.GetJobRequest(job_id=ids[other]), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as info:
                stubs[n].CancelJob(pb.CancelJobRequest(job_id=ids[other]), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

        # Each tokenizer was trained on its own home's corpus and published there only.
        vocab = {n: _vocab(homes[n]) for n in "ab"}
        assert any("alpha" in t for t in vocab["a"]) and not any("zulu" in t for t in vocab["a"])
        assert any("zulu" in t for t in vocab["b"]) and not any("alpha" in t for t in vocab["b"])

        prefixes = tuple(configs[n].redis_prefix for n in "ab")
        keys = list(db.scan_iter("*"))
        assert keys and [k for k in keys if not k.startswith(prefixes)] == []
        # The Celery side is in the namespaces too: queues, bindings, results.
        for prefix in prefixes:
            assert {f"{prefix}_kombu.binding.preprocessing", f"{prefix}jobs:preprocessing"} <= set(keys)
            assert any(k.startswith(f"{prefix}celery-task-meta-") for k in keys)
        for channel in channels.values():
            channel.close()
    finally:
        for proc in reversed(procs):
            proc.stop()
