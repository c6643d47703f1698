"""The `fastserve` CLI's exit status when it follows a job to its end, through the real training service and a
real Celery worker: 0 only for a job that succeeded; 1, with the job's state said, for one that failed or was
cancelled while the watch ran. A script (`fastserve train watch $ID && deploy`) relies on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastserve.runtime.config import Config
from fastserve.runtime.job_queue import submit
from fastserve.runtime.jobs import JobState
from fastserve.runtime.stores import Stores
from tests.conftest import private_env
from tests.support.processes import service_with_worker
from tests.support.waiting import wait_until

FASTSERVE = Path(sys.executable).with_name("fastserve")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server):
    home = tmp_path_factory.mktemp("watch")
    env = private_env(home / "home", redis_server.url)
    with service_with_worker("training", env, home) as (proc, _):
        cli_env = {**os.environ, "FASTSERVE_HOME": env["FASTSERVE_HOME"], "FASTSERVE_TRAINING_PORT": str(proc.port)}
        yield Stores.from_config(Config.from_env(env)), cli_env


def _cli(cli_env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(FASTSERVE), *args], env=cli_env, capture_output=True, text=True, timeout=timeout)


def test_watch_exits_0_for_a_job_that_succeeded(stack):
    stores, cli_env = stack
    job = submit(stores, "training", "test.count", {"steps": 3, "delay": 0.01})
    live = _cli(cli_env, "train", "watch", job.job_id)
    assert live.returncode == 0, live.stdout + live.stderr
    assert f"job {job.job_id} SUCCEEDED" in live.stdout


@pytest.mark.parametrize("json_flag", [(), ("--json",)], ids=["live", "json"])
def test_watch_exits_1_for_a_job_that_failed(stack, json_flag):
    stores, cli_env = stack
    job = submit(stores, "training", "test.fail", {})
    watched = _cli(cli_env, *json_flag, "train", "watch", job.job_id)
    assert watched.returncode == 1, watched.stdout + watched.stderr
    if json_flag:
        last = json.loads(watched.stdout.splitlines()[-1])
        assert last["state"] == "JOB_STATE_FAILED" and last["type"] == "JOB_EVENT_TYPE_STATE", last
    else:
        assert f"job {job.job_id} FAILED: the test job refuses" in watched.stderr, watched.stderr
    assert "Traceback" not in watched.stderr


@pytest.mark.parametrize("json_flag", [(), ("--json",)], ids=["live", "json"])
def test_watch_exits_1_for_a_job_cancelled_while_it_watches(stack, json_flag):
    stores, cli_env = stack
    job = submit(stores, "training", "test.count", {"steps": 3000, "delay": 0.02})
    watcher = subprocess.Popen([str(FASTSERVE), *json_flag, "train", "watch", job.job_id], env=cli_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: stores.jobs.get(job.job_id).state is JobState.RUNNING, "the worker to start the job",
                   timeout=60)
        cancel = _cli(cli_env, "train", "cancel", job.job_id, "--reason", "not needed")
        assert cancel.returncode == 0 and "CANCELLING" in cancel.stdout, cancel.stdout + cancel.stderr
        out, err = watcher.communicate(timeout=120)
    finally:
        watcher.kill()
    assert watcher.returncode == 1, out + err
    if json_flag:
        states = [e["state"] for e in map(json.loads, out.splitlines()) if e["type"] == "JOB_EVENT_TYPE_STATE"]
        assert states[-2:] == ["JOB_STATE_CANCELLING", "JOB_STATE_CANCELLED"], states
    else:
        assert f"job {job.job_id} CANCELLED" in out, out + err
    assert stores.jobs.get(job.job_id).state is JobState.CANCELLED
