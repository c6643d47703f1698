"""Launching real FastServe processes for tests: services, the gateway, Celery workers, the probe server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import httpx

from fastserve.client.channels import health_status
from fastserve.runtime.celery_app import client_app
from fastserve.runtime.config import JOB_SERVICES, Config
from fastserve.runtime.redis_server import RedisServer

T = TypeVar("T")


def free_port() -> int:
    """A port nothing listens on now. Another process may bind it before the child this is for does: start
    children through `on_a_free_port`, which tries again on such a race."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a child logs when another process bound its port first: gRPC's error, then uvicorn's.
_PORT_TAKEN = ("Failed to bind to address", "address already in use")
BIND_ATTEMPTS = 3


class PortTaken(RuntimeError):
    """The child exited because the port picked for it was taken before it could bind it."""


def on_a_free_port(start: Callable[[int], T]) -> T:
    """`start(port)` on a free port, again on another (up to BIND_ATTEMPTS in all) when it raises PortTaken:
    a busy machine makes the race between picking a port and the child binding it a real one."""
    for attempt in range(1, BIND_ATTEMPTS + 1):
        try:
            return start(free_port())
        except PortTaken:
            if attempt == BIND_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def did_not_start(proc: Proc, what: str) -> RuntimeError:
    """Stop a child that did not come up, and return the error for it: PortTaken when it had exited over a
    taken port."""
    exited = proc.process.poll() is not None
    proc.stop()
    text = proc.log_text()
    lost_port = exited and any(m in text for m in _PORT_TAKEN)
    return (PortTaken if lost_port else RuntimeError)(f"{what} on {proc.target} did not start:\n{text[-3000:]}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Proc:
    """A child process with its log file; `stop` sends SIGTERM and waits."""

    process: subprocess.Popen
    log: Path
    port: int = 0
    node: str = ""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the process and everything in its process group (Celery's pool children)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def spawn(argv: list[str], env: dict[str, str], log: Path, port: int = 0) -> Proc:
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return Proc(process, log, port)


def wait_serving(proc: Proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(proc.target) as channel:
        while health_status(channel, timeout=1.0) != "SERVING":
            if proc.process.poll() is not None or time.monotonic() > deadline:
                raise did_not_start(proc, "server")
            time.sleep(0.1)


def start_redis(directory: Path, persistent: bool = False) -> RedisServer:
    """A redis-server of the tests' own on a free loopback port, never the machine's on 6379."""
    def start(port: int) -> RedisServer:
        try:
            return RedisServer(port, directory, persistent=persistent).start()
        except RuntimeError as error:
            log = directory / "redis.log"
            if log.exists() and "Address already in use" in log.read_text(errors="replace"):
                raise PortTaken(str(error)) from error
            raise
    return on_a_free_port(start)


def start_inference(home: Path, log: Path, timeout: float = 180.0, **settings: str) -> Proc:
    """An inference server on a free port with its own home and no Redis: serving needs none, only the
    registry's delete check does (pass FASTSERVE_REDIS_URL for that); `settings` are more FASTSERVE_* variables."""
    env = {"FASTSERVE_HOME": str(home), "FASTSERVE_INFERENCE_METRICS_PORT": "0",
           "FASTSERVE_REDIS_URL": "redis://127.0.0.1:1/0", "HF_HUB_OFFLINE": "1", **settings}
    return _serve("inference", env, log, timeout)


@contextmanager
def serving_models(home: Path, log: Path, models: Mapping[str, str], config=None, **settings: str) -> Iterator[Proc]:
    """An inference server of `home` with no model of its own, serving each of `models` (name → model URI),
    each loaded with `config` (a ModelConfig) when one is given; stopped after. `settings` as for
    `start_inference`."""
    from fastserve.inference.v1 import inference_pb2 as pb
    from fastserve.inference.v1 import inference_pb2_grpc

    proc = start_inference(home, log, FASTSERVE_INFERENCE_MODELS="none", **settings)
    try:
        with grpc.insecure_channel(proc.target) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for name, uri in models.items():
                stub.LoadModel(pb.LoadModelRequest(name=name, model_uri=uri, config=config))
        yield proc
    finally:
        proc.stop()


@contextmanager
def serving_folder(folder: Path, root: Path, name: str = "gpt") -> Iterator[grpc.Channel]:
    """An inference server under `root` serving the model `folder` (published as models/<name>/1) as `name`:
    a channel to it."""
    import shutil

    from fastserve.storage.artifacts import ArtifactStore

    with ArtifactStore(root / "home" / "artifacts").publish("models", name) as draft:
        for item in folder.iterdir():
            shutil.copy(item, draft.path / item.name)
    with serving_models(root / "home", root / "inference.log", {name: f"artifact://models/{name}/1"}) as proc, \
            grpc.insecure_channel(proc.target) as channel:
        yield channel


def start_service(service: str, env: dict[str, str], log_dir: Path) -> Proc:
    """`python -m fastserve.services.<service>` on a free port, returned once its health check says SERVING."""
    return _serve(service, env, log_dir / f"{service}.log", timeout=60.0)


def _serve(service: str, env: dict[str, str], log: Path, timeout: float) -> Proc:
    def start(port: int) -> Proc:
        proc = spawn([sys.executable, "-m", f"fastserve.services.{service}"],
                     {**env, f"FASTSERVE_{service.upper()}_PORT": str(port)}, log, port)
        wait_serving(proc, timeout=timeout)
        return proc
    return on_a_free_port(start)


def start_gateway(inference: Proc | None, log: Path, token: str = "", timeout: float = 60.0,
                  ready_path: str = "/health", **settings: str) -> Proc:
    """`python -m fastserve.services.gateway` over `inference` (None: the port `settings` name) on a free
    port, returned once `ready_path` answers 200 (`/health`: the inference service reachable); `settings`
    are more FASTSERVE_* variables."""
    def start(port: int) -> Proc:
        env = {"FASTSERVE_GATEWAY_PORT": str(port), "FASTSERVE_AUTH_TOKEN": token, "FASTSERVE_LOG_FORMAT": "json",
               **({"FASTSERVE_INFERENCE_PORT": str(inference.port)} if inference else {}), **settings}
        proc = spawn([sys.executable, "-m", "fastserve.services.gateway"], env, log, port)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=1.0).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            if proc.process.poll() is not None or time.monotonic() > deadline:
                raise did_not_start(proc, "the gateway")
            time.sleep(0.1)
    return on_a_free_port(start)


def start_worker(env: dict[str, str], log_dir: Path, include: str = "tests.support.jobs",
                 queues: tuple[str, ...] = JOB_SERVICES, timeout: float = 60.0) -> Proc:
    """A real Celery worker process, returned once it answers a ping."""
    node = f"test-{uuid.uuid4().hex[:8]}@localhost"
    proc = spawn([sys.executable, "-m", "celery", "-A", "fastserve.runtime.celery_app", "worker",
                  "-Q", ",".join(queues), "-n", node, "-I", include,
                  "--concurrency", "1", "--without-mingle", "--without-gossip"],
                 env, log_dir / f"worker-{node.split('@')[0]}.log")
    proc.node = node
    # The ping travels in the worker's namespace, as every Celery message does.
    app = client_app(Config.from_env({**os.environ, **env}))
    deadline = time.monotonic() + timeout
    while not app.control.ping(destination=[node], timeout=0.5):
        if proc.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker did not start:\n{proc.log_text()[-3000:]}")
    return proc


@contextmanager
def service_with_worker(service: str, env: dict[str, str], log_dir: Path) -> Iterator[tuple[Proc, grpc.Channel]]:
    """A service process and a Celery worker on the same Redis; yields the service and a channel to it."""
    proc = start_service(service, env, log_dir)
    worker = None
    try:
        worker = start_worker(env, log_dir)
        with grpc.insecure_channel(proc.target) as channel:
            yield proc, channel
    finally:
        if worker:
            worker.stop()
        proc.stop()
