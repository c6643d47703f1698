"""Job RPCs end to end: a real training service process, a real Celery worker, the tests' Redis."""

from __future__ import annotations

import time

import grpc
import pytest

from fastserve.common.v1 import jobs_pb2
from fastserve.runtime.config import Config
from fastserve.runtime.job_queue import submit
from fastserve.runtime.stores import Stores
from fastserve.training.v1 import training_pb2 as pb
from fastserve.training.v1 import training_pb2_grpc
from tests.conftest import private_env
from tests.support.processes import service_with_worker
from tests.support.rpc import field_of
from tests.support.waiting import wait_until

S = jobs_pb2.JobState


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server):
    home = tmp_path_factory.mktemp("jobs")
    env = private_env(home / "home", redis_server.url)
    logs = home / "logs"
    logs.mkdir()
    with service_with_worker("training", env, logs) as (_, channel):
        yield training_pb2_grpc.TrainingServiceStub(channel), Stores.from_config(Config.from_env(env))


def _watch(stub, job_id, after="", timeout=60):
    return [r.event for r in stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_event_id=after), timeout=timeout)]


def test_job_runs_on_worker_and_streams_events(stack):
    stub, stores = stack
    job = submit(stores, "training", "test.count", {"steps": 10, "delay": 0.02})
    events = _watch(stub, job.job_id)
    states = [e.state for e in events if e.type == jobs_pb2.JOB_EVENT_TYPE_STATE]
    assert states == [S.JOB_STATE_QUEUED, S.JOB_STATE_RUNNING, S.JOB_STATE_SUCCEEDED]
    progress = [e.progress for e in events if e.type == jobs_pb2.JOB_EVENT_TYPE_PROGRESS]
    assert progress == sorted(progress) and len(progress) == 10 and progress[-1] == 1.0
    assert [e.data["value"] for e in events if e.type == jobs_pb2.JOB_EVENT_TYPE_METRICS][-1] == 100
    done = stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).job
    assert done.state == S.JOB_STATE_SUCCEEDED and done.result["steps"] == 10
    assert done.result["worker_pid"] != 0 and done.end_time.seconds >= done.start_time.seconds > 0
    # A watcher that reconnects after an event gets exactly what followed it.
    assert [e.event_id for e in _watch(stub, job.job_id, events[4].event_id)] == [e.event_id for e in events[5:]]
    # After the last event of a finished job there is nothing to wait for: the stream ends at once.
    started = time.monotonic()
    assert _watch(stub, job.job_id, events[-1].event_id, timeout=5) == []
    assert time.monotonic() - started < 2


def test_cancel_running_job_is_cooperative(stack):
    stub, stores = stack
    job = submit(stores, "training", "test.count", {"steps": 500, "delay": 0.02})
    stream = stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=60)
    for response in stream:
        if response.event.type == jobs_pb2.JOB_EVENT_TYPE_PROGRESS:
            break
    reply = stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id, reason="test"))
    assert reply.job.state == S.JOB_STATE_CANCELLING and reply.job.cancel_requested
    last = [r.event for r in stream][-1]
    assert last.state == S.JOB_STATE_CANCELLED
    final = stub.GetJob(pb.GetJobRequest(job_id=job.job_id)).job
    assert final.state == S.JOB_STATE_CANCELLED and final.progress < 1.0
    with pytest.raises(grpc.RpcError) as info:
        stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_failures_are_recorded(stack):
    stub, stores = stack
    failing = submit(stores, "training", "test.fail", {})
    unknown = submit(stores, "training", "test.no_such_type", {})
    assert _watch(stub, failing.job_id)[-1].state == S.JOB_STATE_FAILED
    assert stub.GetJob(pb.GetJobRequest(job_id=failing.job_id)).job.error == "the test job refuses"
    assert _watch(stub, unknown.job_id)[-1].state == S.JOB_STATE_FAILED
    assert "no handler" in stub.GetJob(pb.GetJobRequest(job_id=unknown.job_id)).job.error


def test_jobs_queue_behind_a_busy_worker(stack):
    stub, stores = stack
    first = submit(stores, "training", "test.count", {"steps": 10, "delay": 0.05})
    second = submit(stores, "training", "test.count", {"steps": 2, "delay": 0.01})
    wait_until(lambda: stub.GetJob(pb.GetJobRequest(job_id=first.job_id)).job.state == S.JOB_STATE_RUNNING,
               "the worker to take the first job")
    assert stub.GetJob(pb.GetJobRequest(job_id=second.job_id)).job.state == S.JOB_STATE_QUEUED
    assert _watch(stub, second.job_id)[-1].state == S.JOB_STATE_SUCCEEDED
    a = stub.GetJob(pb.GetJobRequest(job_id=first.job_id)).job
    b = stub.GetJob(pb.GetJobRequest(job_id=second.job_id)).job
    assert a.state == S.JOB_STATE_SUCCEEDED and b.start_time.ToNanoseconds() >= a.end_time.ToNanoseconds()


def test_list_jobs_with_filter(stack):
    stub, stores = stack
    job = submit(stores, "training", "test.count", {"steps": 1, "delay": 0})
    _watch(stub, job.job_id)
    listed = stub.ListJobs(pb.ListJobsRequest(filter=jobs_pb2.JobFilter(
        job_type="test.count", states=[S.JOB_STATE_SUCCEEDED])))
    assert job.job_id in [j.job_id for j in listed.jobs]
    assert all(j.state == S.JOB_STATE_SUCCEEDED and j.job_type == "test.count" for j in listed.jobs)


def test_bad_job_requests(stack):
    stub, stores = stack
    with pytest.raises(grpc.RpcError) as info:
        stub.GetJob(pb.GetJobRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(info.value) == "job_id"
    other = stores.jobs.create("optimization", "optimization.x", {})
    for call in (lambda: stub.GetJob(pb.GetJobRequest(job_id=other.job_id)),
                 lambda: stub.GetJob(pb.GetJobRequest(job_id="nope")),
                 # Names a real key of the store, the job's event stream: still not a job.
                 lambda: stub.GetJob(pb.GetJobRequest(job_id=f"{other.job_id}:events")),
                 lambda: _watch(stub, f"{other.job_id}:events", timeout=5)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub.ListJobs(pb.ListJobsRequest(filter=jobs_pb2.JobFilter(states=[S.JOB_STATE_UNSPECIFIED])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
