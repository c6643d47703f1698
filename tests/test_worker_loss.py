"""A worker killed outright (SIGKILL of its whole process group) loses no job: its lease expires and
another worker queues the job again."""

from __future__ import annotations

import time

from fastserve.runtime.config import Config
from fastserve.runtime.job_queue import submit
from fastserve.runtime.jobs import EventType, JobState
from fastserve.runtime.stores import Stores
from tests.support.processes import start_worker


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
