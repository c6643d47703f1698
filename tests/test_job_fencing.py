"""Jobs are fenced, counted and idempotent: a runner that loses its lease stops and writes nothing, a
job fails after a bounded number of attempts, a redelivered job publishes once, and a submit with a
request id already used returns the job it created. Real Redis; the runner in-process."""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import pytest

from fastserve.client import FastServeClient
from fastserve.client.calls import RetryPolicy
from fastserve.preprocessing.v1 import preprocessing_pb2_grpc
from fastserve.runtime import job_runner
from fastserve.runtime.errors import InvalidArgument, Unavailable
from fastserve.runtime.job_lease import JobLease
from fastserve.runtime.job_queue import submit
from fastserve.runtime.job_runner import JobContext, job_handler
from fastserve.runtime.jobs import JobState
from fastserve.runtime.server import create_server
from fastserve.runtime.stores import Stores
from fastserve.services.preprocessing.servicer import PreprocessingServicer

_steps: dict[str, int] = {}
_publishes: dict[str, int] = {}


class _WorkerDied(BaseException):
    """Stands for a worker killed mid-job: nothing in the runner catches it, as nothing runs after a SIGKILL."""


@job_handler("test.fence.loop")
def _loop(ctx: JobContext) -> dict:
    for step in range(200):
        ctx.check_cancelled()
        _steps[ctx.job.job_id] = step
        time.sleep(0.05)
    return {"steps": 200}


@job_handler("test.fence.publish")
def _publish(ctx: JobContext) -> dict:
    def publish() -> dict:
        _publishes[ctx.job.job_id] = _publishes.get(ctx.job.job_id, 0) + 1
        with ctx.stores.artifacts.publish("models", f"m-{ctx.job.job_id}") as draft:
            (draft.path / "weights").write_text("w")
        return {"uri": draft.ref.uri}

    result = ctx.publish_once(publish)
    if ctx.params.get("die_after_publish") and _publishes[ctx.job.job_id] == 1:
        raise _WorkerDied()
    return result


_staged_at_start: dict[str, list[str]] = {}


@job_handler("test.fence.stage")
def _stage(ctx: JobContext) -> dict:
    staging = ctx.stores.artifacts.root / ".staging" / ctx.job.job_id
    _staged_at_start[ctx.job.job_id] = sorted(p.name for p in staging.iterdir()) if staging.exists() else []
    with ctx.stores.artifacts.publish("models", f"s-{ctx.job.job_id}") as draft:
        assert draft.path.parent == staging  # the job's drafts stage in its own folder
        (draft.path / "weights").write_text("w")
    ctx.stores.artifacts.scratch("left-behind-")  # a handler's scratch it forgot: removed when the job ends
    return {"uri": draft.ref.uri}


@pytest.fixture
def short_lease(config) -> Stores:
    return Stores.from_config(dataclasses.replace(config, job_lease_seconds=0.6))


def _running(stores: Stores, job_type: str, params: dict | None = None) -> str:
    job = stores.jobs.create("training", job_type, params or {})
    return job.job_id


def test_a_runner_that_loses_its_lease_stops_and_writes_nothing(short_lease):
    stores = short_lease
    job_id = _running(stores, "test.fence.loop")
    outcome: list[JobState] = []
    runner = threading.Thread(target=lambda: outcome.append(job_runner.run(stores, job_id)))
    runner.start()
    deadline = time.monotonic() + 10
    while _steps.get(job_id, 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Another worker takes the job (as after this one stalled past its lease).
    lease_key = stores.jobs.job_key(job_id, "lease")
    stores.jobs.redis.set(lease_key, "another-runner", px=60_000)
    runner.join(5)
    assert not runner.is_alive(), "the runner went on after losing its lease"
    job = stores.jobs.get(job_id)
    assert job.state is JobState.RUNNING and job.result == {}  # left to the lease's holder
    assert stores.jobs.redis.get(lease_key) == "another-runner"  # its release did not drop another's lease
    assert _steps[job_id] < 199


def test_a_lease_that_cannot_be_renewed_is_given_up_before_it_expires(short_lease):
    stores = short_lease
    lease = JobLease(stores.jobs, _running(stores, "test.fence.loop"), 0.6)
    assert lease.acquire() and lease.held()
    # Redis stops answering: no renewal can be confirmed, yet the key (TTL 0.6 s) has not expired.
    stores.jobs.redis.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    paused = time.monotonic()
    while lease.held():
        time.sleep(0.01)
    given_up = time.monotonic() - paused
    try:
        assert given_up < 0.6, f"held the lease {given_up:.2f}s into a 0.6s TTL without renewing it"
    finally:
        time.sleep(max(0.0, 1.6 - (time.monotonic() - paused)))
        lease.release()


def test_attempts_are_counted_and_bounded(stores):
    job_id = _running(stores, "test.fence.publish")
    assert job_runner.run(stores, job_id) is JobState.SUCCEEDED
    assert stores.jobs.redis.hget(stores.jobs.job_key(job_id), "attempts") == "1"

    # A job whose every runner was killed: three attempts took its lease and none ended it.
    doomed = _running(stores, "test.fence.loop")
    stores.jobs.transition(doomed, JobState.RUNNING)
    stores.jobs.redis.hset(stores.jobs.job_key(doomed), "attempts", job_runner.max_attempts(stores))
    assert job_runner.run(stores, doomed) is JobState.FAILED
    job = stores.jobs.get(doomed)
    assert "gave up after 3 attempts" in job.error and "FASTSERVE_JOB_MAX_ATTEMPTS" in job.error
    assert doomed not in _steps  # it did not run again


def test_a_redelivered_job_publishes_its_artifact_once(stores):
    job_id = _running(stores, "test.fence.publish", {"die_after_publish": True})
    with pytest.raises(_WorkerDied):
        job_runner.run(stores, job_id)
    assert stores.jobs.get(job_id).state is JobState.RUNNING
    assert job_runner.run(stores, job_id) is JobState.SUCCEEDED  # the redelivery
    job = stores.jobs.get(job_id)
    assert _publishes[job_id] == 1
    assert stores.artifacts.versions("models", f"m-{job_id}") == [1]
    assert job.result == {"uri": f"artifact://models/m-{job_id}/1"}


def test_a_killed_attempts_half_written_drafts_are_removed(stores):
    job_id = _running(stores, "test.fence.stage")
    stores.jobs.transition(job_id, JobState.RUNNING)
    # What an attempt whose worker was SIGKILLed mid-publish leaves: a draft nothing else removes.
    draft = stores.for_job(job_id).artifacts.scratch("models-s-")
    (draft / "weights.partial").write_bytes(b"\0" * 1024)
    assert job_runner.run(stores, job_id) is JobState.SUCCEEDED
    assert _staged_at_start[job_id] == []  # cleared before the next attempt ran
    assert not (stores.artifacts.root / ".staging" / job_id).exists()  # and nothing left after it
    assert stores.artifacts.versions("models", f"s-{job_id}") == [1]


def test_distributed_ranks_are_stopped_when_the_lease_is_lost(short_lease):
    import subprocess
    import sys

    from fastserve.runtime.job_lease import LeaseLost
    from fastserve.services.training.distributed import _wait

    stores = short_lease
    job_id = _running(stores, "test.fence.loop")
    lease = JobLease(stores.jobs, job_id, stores.config.job_lease_seconds)
    assert lease.acquire()
    ranks = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    try:
        stores.jobs.redis.set(stores.jobs.job_key(job_id, "lease"), "another-runner", px=60_000)
        started = time.monotonic()
        with pytest.raises(LeaseLost):
            _wait(ranks, JobContext(stores.jobs.get(job_id), stores, lease), poll=0.05)
        assert time.monotonic() - started < 0.6  # before the lost lease's TTL would have run out
        assert all(r.poll() is not None for r in ranks)
    finally:
        for r in ranks:
            r.kill()
        lease.release()


def test_a_submit_with_a_used_request_id_returns_the_same_job(stores):
    first = submit(stores, "training", "test.fence.publish", {}, request_id="retry-1")
    again = submit(stores, "training", "test.fence.publish", {}, request_id="retry-1")
    assert again.job_id == first.job_id
    assert submit(stores, "training", "test.fence.publish", {}, request_id="retry-2").job_id != first.job_id
    assert submit(stores, "optimization", "test.fence.publish", {}, request_id="retry-1").job_id != first.job_id
    assert submit(stores, "training", "test.fence.publish", {}).job_id != first.job_id
    assert stores.jobs.redis.ttl(f"{stores.jobs.prefix}request:training:retry-1") > 0
    for bad in ("x" * 65, "has space", "semi;colon", "ünï"):
        with pytest.raises(InvalidArgument) as error:
            submit(stores, "training", "test.fence.publish", {}, request_id=bad)
        assert [v.field for v in error.value.violations] == ["request_id"]


class _LostFirstReply(PreprocessingServicer):
    """The real servicer, except that the reply to the first submit is lost: the job is queued, yet
    the client hears UNAVAILABLE, as when a connection breaks after the server acted."""

    request_ids: list[str] = []

    def SubmitCleanJob(self, request, context):
        reply = super().SubmitCleanJob(request, context)
        self.request_ids.append(request.request_id)
        if len(self.request_ids) == 1:
            raise Unavailable("the connection broke")
        return reply


def test_the_client_retries_a_submit_and_gets_the_job_it_queued(stores):
    def register(server: grpc.Server):
        preprocessing_pb2_grpc.add_PreprocessingServiceServicer_to_server(_LostFirstReply(stores), server)
        return ["fastserve.preprocessing.v1.PreprocessingService"]

    running = create_server("preprocessing", register, stores.config, port=0)
    try:
        retry = RetryPolicy(attempts=3, initial_backoff=0.05, jitter=0.0)
        with FastServeClient(ports={"preprocessing": running.port}, retry=retry) as fs:
            job = fs.preprocessing.submit_clean_job("stdlib-docstrings", ["collapse_whitespace"], "cleaned")
    finally:
        running.stop(0)
    first, second = _LostFirstReply.request_ids
    assert first and first == second  # one id, sent twice
    assert stores.jobs.list("preprocessing").total_size == 1  # queued once
    assert job.job_id == stores.jobs.list("preprocessing").jobs[0].job_id
