"""A worker killed outright (SIGKILL of its whole process group) loses no job: its lease expires and
another worker queues the job again; and a job that kills its worker every time fails after a bounded
number of attempts instead of being queued again forever."""

from __future__ import annotations

import os
import signal
import time

from fastserve.runtime.config import Config
from fastserve.runtime.job_queue import submit
from fastserve.runtime.job_runner import JobContext, job_handler
from fastserve.runtime.jobs import EventType, JobState
from fastserve.runtime.stores import Stores
from tests.support.processes import start_worker


@job_handler("test.kill_worker")
def _kill_worker(ctx: JobContext) -> dict:
    """Kills the pool process that runs it, as a job that exhausts the machine's memory would."""
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def _wait(stores, job_id, predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate(job := stores.jobs.get(job_id)):
        assert time.monotonic() < deadline, f"job stuck in {job.state}: {job.message}"
        time.sleep(0.1)
    return job


def test_job_of_a_killed_worker_is_requeued_and_finishes(env, log_dir):
    env = {**env, "FASTSERVE_JOB_LEASE_SECONDS": "2"}
    stores = Stores.from_config(Config.from_env(env))
    doomed = start_worker(env, log_dir)
    survivor = None
    try:
        job = submit(stores, "training", "test.count", {"steps": 40, "delay": 0.05})
        _wait(stores, job.job_id, lambda j: j.state is JobState.RUNNING and j.progress > 0.1)
        doomed.kill()
        survivor = start_worker(env, log_dir)
        done = _wait(stores, job.job_id, lambda j: j.state.terminal)
        assert done.state is JobState.SUCCEEDED and done.result["steps"] == 40
        assert done.result["worker_pid"] != doomed.process.pid
        messages = [e.message for e in stores.jobs.events(job.job_id) if e.type is EventType.LOG]
        assert "its worker was lost; queued again to resume" in messages
    finally:
        doomed.kill()
        if survivor:
            survivor.stop()


def test_a_job_that_kills_its_worker_fails_after_its_attempts(env, log_dir):
    env = {**env, "FASTSERVE_JOB_LEASE_SECONDS": "1"}
    stores = Stores.from_config(Config.from_env(env))
    # Celery's prefork pool replaces the killed process and redelivers the job (reject on worker lost).
    worker = start_worker(env, log_dir, include="tests.support.jobs,tests.test_worker_loss")
    try:
        job = submit(stores, "training", "test.kill_worker", {})
        done = _wait(stores, job.job_id, lambda j: j.state.terminal, timeout=90)
        assert done.state is JobState.FAILED
        assert "gave up after 3 attempts" in done.error
        assert stores.jobs.redis.hget(stores.jobs.job_key(job.job_id), "attempts") == "4"
    finally:
        worker.stop()
