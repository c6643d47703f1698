"""`fastserve up`/`status`/`down`/`logs` (and `make status`) as a user runs them: real processes, stock
health and reflection clients, every port closed afterwards and nothing else touched; and the import
noise the stack's processes no longer log."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from dataclasses import asdict
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from fastserve.client.channels import health_status
from fastserve.runtime.config import SERVICES
from fastserve.stack.processes import HTTP_SERVICES, Component
from tests.support.processes import free_port, port_open

FASTSERVE = Path(sys.executable).with_name("fastserve")
REPO = Path(__file__).resolve().parents[1]


def _fastserve(env, *args, timeout=180):
    return subprocess.run([sys.executable, "-m", "fastserve.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_up_status_down(env, tmp_path):
    ports = {s: free_port() for s in (*SERVICES, *HTTP_SERVICES)}
    env = {**env, **{f"FASTSERVE_{s.upper()}_PORT": str(p) for s, p in ports.items()},
           "PATH": "/usr/bin:/bin"}
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        up = _fastserve(env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        # The gateway serves HTTP once inference does: /health, and the OpenAI model list.
        gateway = f"http://127.0.0.1:{ports['gateway']}"
        assert "gateway        pid " in up.stdout and gateway in up.stdout
        with urllib.request.urlopen(f"{gateway}/health", timeout=10) as reply:
            assert reply.status == 200
        with urllib.request.urlopen(f"{gateway}/v1/models", timeout=30) as reply:
            assert "all-MiniLM-L6-v2" in [m["id"] for m in json.load(reply)["data"]]
        for service in SERVICES:
            port = ports[service]
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert health_status(channel) == "SERVING"
                assert health_status(channel, f"fastserve.{service}.v1.{service.capitalize()}Service") == "SERVING"
                assert f"fastserve.{service}.v1.{service.capitalize()}Service" in \
                    ProtoReflectionDescriptorDatabase(channel).get_services()
        status = _fastserve(env, "status", "--json")
        rows = json.loads(status.stdout)
        assert status.returncode == 0 and {r["name"] for r in rows} == {*SERVICES, "gateway", "worker"}
        assert {r["name"]: r["state"] for r in rows}["gateway"] == "SERVING"
        assert [r.get("url") for r in rows if r["name"] == "gateway"] == [gateway]
        table = _fastserve(env, "status")
        assert table.returncode == 0 and re.search(rf"^gateway +SERVING +pid \d+ +port {ports['gateway']} {gateway}$",
                                                   table.stdout, re.M), table.stdout
        pids = [r["pid"] for r in rows]
        _cli_against_the_stack(env)
        assert _fastserve(env, "up").returncode == 0  # idempotent: already up
        assert [r["pid"] for r in json.loads(_fastserve(env, "status", "--json").stdout)] == pids

        down = _fastserve(env, "down")
        assert down.returncode == 0, down.stderr
        assert not any(port_open(p) for p in ports.values())
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
        assert bystander.poll() is None  # down stops only what up started
        assert _fastserve(env, "status").returncode == 3  # not running
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


@pytest.mark.parametrize("variable", ["FASTSERVE_TRAINING_PORT", "FASTSERVE_GATEWAY_PORT"])
def test_up_refuses_a_taken_port_with_a_clear_line(env, variable):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {f"FASTSERVE_{s.upper()}_PORT": str(free_port()) for s in (*SERVICES, *HTTP_SERVICES)}
        result = _fastserve({**env, **ports, variable: str(port)}, "up")
    assert result.returncode == 2
    assert result.stderr.strip() == f"fastserve: port {port} is in use; free it or set {variable}"


def _cli(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The console script as a user types it, on the stack of `home`."""
    return subprocess.run([str(FASTSERVE), *args], env={**os.environ, "FASTSERVE_HOME": str(home)},
                          capture_output=True, text=True, timeout=timeout)


def _make_status(home: Path) -> subprocess.CompletedProcess:
    # -o setup: the virtualenv is there; a test must not rebuild it.
    return subprocess.run(["make", "-o", "setup", "status"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "FASTSERVE_HOME": str(home)})


def test_status_of_a_stopped_stack_is_an_answer(tmp_path):
    status = _cli(tmp_path, "status")
    assert status.returncode == 3 and status.stderr == ""
    assert "the stack is not running: start it with `make up` (or `fastserve up`)" in status.stdout
    assert json.loads(_cli(tmp_path, "status", "--json").stdout) == []
    made = _make_status(tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "the stack is not running" in made.stdout and "make:" not in made.stdout + made.stderr


def test_status_of_a_stack_that_runs_in_part_is_a_failure(tmp_path):
    """A recorded stack whose worker runs and whose inference service has ended: exit 4, and `make
    status` fails (an actual problem)."""
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ended = subprocess.Popen([sys.executable, "-c", ""])
        ended.wait()
        live = Component("worker", worker.pid, psutil.Process(worker.pid).create_time(), str(tmp_path / "w.log"))
        gone = Component("inference", ended.pid, 0.0, str(tmp_path / "i.log"), port=free_port())
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "stack.json").write_text(json.dumps({"redis_url": "", "components": [
            asdict(gone), asdict(live)]}))
        status = _cli(tmp_path, "status")
        assert status.returncode == 4, status.stdout + status.stderr
        assert "inference      STOPPED" in status.stdout and "worker         RUNNING" in status.stdout
        assert ("the stack runs in part: inference not serving; see `fastserve logs inference`, and restart it "
                "with `make down && make up`") in status.stdout
        made = _make_status(tmp_path)
        # `make: ***`, or `make[1]: ***` when the tests themselves run under make.
        assert made.returncode != 0 and re.search(r"make(\[\d+\])?: \*\*\* \[Makefile:", made.stderr)
    finally:
        worker.kill()
        worker.wait()


def test_a_gateway_that_does_not_answer_health_leaves_the_stack_in_part(tmp_path):
    """A recorded gateway whose process lives but whose /health nothing answers: UNREACHABLE, exit 4."""
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        create_time = psutil.Process(alive.pid).create_time()
        port = free_port()
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "stack.json").write_text(json.dumps({"redis_url": "", "components": [
            asdict(Component("gateway", alive.pid, create_time, str(tmp_path / "g.log"), port=port)),
            asdict(Component("worker", alive.pid, create_time, str(tmp_path / "w.log")))]}))
        status = _cli(tmp_path, "status")
        assert status.returncode == 4, status.stdout + status.stderr
        assert re.search(rf"^gateway +UNREACHABLE +pid {alive.pid} +port {port} http://127.0.0.1:{port}$",
                         status.stdout, re.M), status.stdout
        assert "the stack runs in part: gateway not serving; see `fastserve logs gateway`" in status.stdout
        rows = json.loads(_cli(tmp_path, "status", "--json").stdout)
        assert [(r["name"], r["state"], r.get("url")) for r in rows] == [
            ("gateway", "UNREACHABLE", f"http://127.0.0.1:{port}"), ("worker", "RUNNING", None)]
    finally:
        alive.kill()
        alive.wait()


def test_logs_prints_the_end_of_a_process_log_and_follows_it(tmp_path):
    log = tmp_path / "logs" / "inference.log"
    log.parent.mkdir()
    log.write_text("".join(f"line {i}\n" for i in range(1, 5001)))
    last = _cli(tmp_path, "logs", "inference", "-n", "3")
    assert last.returncode == 0 and last.stdout == "line 4998\nline 4999\nline 5000\n"
    assert _cli(tmp_path, "logs", "inference").stdout.splitlines() == [f"line {i}" for i in range(4981, 5001)]
    assert [json.loads(line) for line in _cli(tmp_path, "logs", "inference", "-n", "1", "--json").stdout.splitlines()] \
        == [{"process": "inference", "line": "line 5000"}]

    unknown = _cli(tmp_path, "logs", "inferense")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr == ("fastserve: no stack process 'inferense'; one of preprocessing, training, optimization, "
                              "inference, gateway, worker\n")
    (tmp_path / "logs" / "gateway.log").write_text("gateway line\n")
    assert _cli(tmp_path, "logs", "gateway").stdout == "gateway line\n"
    missing = _cli(tmp_path, "logs", "worker")
    assert missing.returncode == 2 and missing.stderr.startswith(f"fastserve: no log at {tmp_path / 'logs'}")

    follow = subprocess.Popen([str(FASTSERVE), "logs", "inference", "-n", "1", "--follow"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "FASTSERVE_HOME": str(tmp_path)})
    try:
        assert follow.stdout.readline() == "line 5000\n"
        with open(log, "a") as out:
            out.write("appended\nhalf a li")  # the unfinished line waits for its end
            out.flush()
            assert follow.stdout.readline() == "appended\n"
            out.write("ne\n")
        assert follow.stdout.readline() == "half a line\n"
        log.write_text("a new stack's log\n")  # shorter: read again from the start
        assert follow.stdout.readline() == "a new stack's log\n"
    finally:
        follow.send_signal(signal.SIGINT)  # Ctrl-C ends a follow, quietly
        assert follow.wait(30) == 0
    assert follow.stderr.read() == ""


def test_import_noise_is_silenced_and_nothing_else(tmp_path):
    """torchao's import on this machine logs lines that every service and worker log started with;
    `silence_import_noise` drops exactly those."""
    silenced = ("import logging; from fastserve.runtime.noise import silence_import_noise; silence_import_noise(); "
                "import torchao; logging.getLogger('torchao').warning('Failed to load the weights');"
                "logging.getLogger('torch.utils._pytree').warning('a real pytree warning');"
                "logging.basicConfig(level=logging.INFO);"
                "logging.info('Quantization parameters for tensor:\"gelu_3\" not specified');"
                "logging.info('Ignore MatMul due to non constant B: /[node_MatMul_428]');"
                "logging.info('a real root line')")

    def run(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              check=True).stderr

    noisy, quiet = run("import torchao"), run(silenced)
    assert "register_constant() on Enum subclasses is deprecated" in noisy  # what a process used to start with
    assert "register_constant" not in quiet and "/torchao/_C" not in quiet
    # The same loggers' other messages still reach the log.
    assert "Failed to load the weights" in quiet and "a real pytree warning" in quiet
    # onnxruntime's quantizer's line per float tensor, on the root logger, goes too; other root lines stay.
    assert "Quantization parameters" not in quiet and "Ignore MatMul" not in quiet and "a real root line" in quiet
