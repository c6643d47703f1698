"""`fastserve up`/`status`/`down` as a user runs them: real processes, stock health and reflection
clients, every port closed afterwards and nothing else touched."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import psutil
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from fastserve.client.channels import health_status
from fastserve.runtime.config import SERVICES
from tests.support.processes import free_port, port_open


def _fastserve(env, *args, timeout=180):
    return subprocess.run([sys.executable, "-m", "fastserve.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_up_status_down(env, tmp_path):
    ports = {s: free_port() for s in SERVICES}
    env = {**env, **{f"FASTSERVE_{s.upper()}_PORT": str(p) for s, p in ports.items()},
           "PATH": "/usr/bin:/bin"}
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        up = _fastserve(env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        for service, port in ports.items():
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert health_status(channel) == "SERVING"
                assert health_status(channel, f"fastserve.{service}.v1.{service.capitalize()}Service") == "SERVING"
                assert f"fastserve.{service}.v1.{service.capitalize()}Service" in \
                    ProtoReflectionDescriptorDatabase(channel).get_services()
        status = _fastserve(env, "status", "--json")
        rows = json.loads(status.stdout)
        assert status.returncode == 0 and {r["name"] for r in rows} == {*SERVICES, "worker"}
        pids = [r["pid"] for r in rows]
        _cli_against_the_stack(env)
        assert _fastserve(env, "up").returncode == 0  # idempotent: already up
        assert [r["pid"] for r in json.loads(_fastserve(env, "status", "--json").stdout)] == pids

        down = _fastserve(env, "down")
        assert down.returncode == 0, down.stderr
        assert not any(port_open(p) for p in ports.values())
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
        assert bystander.poll() is None  # down stops only what up started
        assert _fastserve(env, "status").returncode != 0
    finally:
        _fastserve(env, "down")
        bystander.kill()


def _cli_against_the_stack(env) -> None:
    """The service commands on the stack `up` started: a real job through the worker, JSON listings,
    the served model, and an error as one line."""
    job = _fastserve(env, "preprocess", "tokenizer", "--source", "stdlib-docstrings", "--max-documents", "200",
                     "--vocab-size", "300", "--output", "cli-bpe", "--watch", "--json")
    assert job.returncode == 0, job.stdout + job.stderr
    jobs = json.loads(_fastserve(env, "preprocess", "list", "--json").stdout)
    assert [j["state"] for j in jobs["jobs"]] == ["JOB_STATE_SUCCEEDED"]
    assert "all-MiniLM-L6-v2" in _fastserve(env, "models", "list", "--json").stdout
    missing = _fastserve(env, "train", "get", "no-such-job")
    assert missing.returncode == 1 and missing.stderr.startswith("NOT_FOUND")
    assert len(missing.stderr.strip().splitlines()) == 1 and "Traceback" not in missing.stderr


def test_up_refuses_a_taken_port_with_a_clear_line(env):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {f"FASTSERVE_{s.upper()}_PORT": str(free_port()) for s in SERVICES}
        result = _fastserve({**env, **ports, "FASTSERVE_TRAINING_PORT": str(port)}, "up")
    assert result.returncode == 2
    assert result.stderr.strip() == f"fastserve: port {port} is in use; free it or set FASTSERVE_TRAINING_PORT"
