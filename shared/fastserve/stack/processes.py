"""The local stack: Redis if needed, the four gRPC services, the HTTP gateway and a Celery worker, as
background processes.

`up` starts them, records each process (pid and start time) in `FASTSERVE_HOME/run/stack.json` and
returns once every health check says SERVING (the gateway's: `GET /health` answers 200) and the
worker answers a ping; `down` stops exactly the processes recorded there (a recycled pid is recognised
by its start time and left alone); `status` reports them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil

from fastserve.client.channels import health_status
from fastserve.runtime.celery_app import client_app
from fastserve.runtime.channels import open_channel
from fastserve.runtime.config import JOB_SERVICES, SERVICES, Config
from fastserve.runtime.errors import FailedPrecondition, Unavailable
from fastserve.runtime.redis_server import resolve_redis_url

log = logging.getLogger(__name__)

HTTP_SERVICES: tuple[str, ...] = ("gateway",)
"""The stack's HTTP services, started after the gRPC ones (the gateway calls inference); each serves on
`Config.<name>_port` and answers `GET /health` with 200 when it serves."""


@dataclass
class Component:
    """One process of the stack."""

    name: str
    pid: int
    create_time: float
    log: str
    port: int = 0
    node: str = ""  # the Celery node name of a worker

    def process(self) -> psutil.Process | None:
        """The live process, or None if it ended (or its pid now belongs to another process)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
        except psutil.Error:
            pass
        return None


class Stack:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.run_dir = config.home / "run"
        self.log_dir = config.home / "logs"
        self.state_file = self.run_dir / "stack.json"

    def components(self) -> list[Component]:
        if not self.state_file.exists():
            return []
        return [Component(**c) for c in json.loads(self.state_file.read_text())["components"]]

    def _save(self, components: list[Component], redis_url: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"redis_url": redis_url, "components": [asdict(c) for c in components]}, indent=2))
        tmp.replace(self.state_file)

    def up(self, timeout: float = 120.0) -> list[Component]:
        """Start the stack in the background and wait until it serves; stop what started on failure."""
        running = self.components()
        if running and all(c.process() for c in running):
            log.info("the stack is already up")
            return running
        if running:
            self.down()
        for service in (*SERVICES, *HTTP_SERVICES):
            _require_free(self.config.host, self.port(service), f"FASTSERVE_{service.upper()}_PORT")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        redis_url, embedded = resolve_redis_url(self.config.redis_url, self.config.home,
                                                self.config.embedded_redis_port)
        components: list[Component] = []
        if embedded is not None:
            components.append(_component("redis", embedded.process, str(self.config.home / "redis" / "redis.log"),
                                         embedded.port))
        env = {**os.environ, **self.config.env(), "FASTSERVE_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
        try:
            for service in (*SERVICES, *HTTP_SERVICES):
                components.append(self._spawn(service, [sys.executable, "-m", f"fastserve.services.{service}"], env,
                                              self.port(service)))
            node = f"fastserve-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
            worker = self._spawn("worker", [
                sys.executable, "-m", "celery", "-A", "fastserve.runtime.celery_app", "worker",
                "-Q", ",".join(JOB_SERVICES), "-n", node, "--loglevel", self.config.log_level], env)
            worker.node = node
            components.append(worker)
            self._save(components, redis_url)
            self._wait_ready(components, redis_url, timeout)
        except BaseException:
            self._save(components, redis_url)
            self.down()
            raise
        return components

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], port: int = 0) -> Component:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        return _component(name, proc, str(log_path), port)

    def _wait_ready(self, components: list[Component], redis_url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for c in components:
            while not self._ready(c, redis_url):
                if c.process() is None:
                    raise Unavailable(f"{c.name} exited during start-up; end of {c.log}:\n{_tail(c.log)}")
                if time.monotonic() > deadline:
                    raise Unavailable(f"{c.name} not ready after {timeout:.0f}s; end of {c.log}:\n{_tail(c.log)}")
                time.sleep(0.2)
            log.info("%s ready (pid %d)", c.name, c.pid)

    def _ready(self, c: Component, redis_url: str) -> bool:
        if c.name in SERVICES or c.name in HTTP_SERVICES:
            return self.health(c) == "SERVING"
        if c.name == "worker":
            # In the stack's namespace: a worker answers control messages of its own namespace only.
            app = client_app(replace(self.config, redis_url=redis_url))
            return any(c.node in reply for reply in app.control.ping(destination=[c.node], timeout=1.0) or [])
        return c.process() is not None

    def port(self, service: str) -> int:
        """The port `service` (gRPC or HTTP) serves on."""
        return self.config.port(service) if service in SERVICES else int(getattr(self.config, f"{service}_port"))

    def url(self, c: Component) -> str:
        """Where a client on this machine reaches HTTP service `c` (https when the stack serves TLS)."""
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{self.config.client_host}:{c.port}"

    def health(self, c: Component) -> str:
        """`SERVING`, `NOT_SERVING`, ... as the gRPC health service says; for an HTTP service, `SERVING` when
        `GET /health` answers 200, `NOT_SERVING` for another status, `UNREACHABLE` without an answer."""
        if c.name in HTTP_SERVICES:
            return http_health(f"{self.url(c)}/health", self.config.tls_cert)
        with open_channel(f"{self.config.client_host}:{c.port}", self.config) as channel:
            return health_status(channel)

    def down(self, timeout: float | None = None) -> list[str]:
        """Stop every recorded process (SIGTERM, then SIGKILL after the grace period); return their names."""
        timeout = self.config.grace_seconds + 5 if timeout is None else timeout
        stopped = []
        procs = []
        for c in reversed(self.components()):
            proc = c.process()
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                procs.append(proc)
                stopped.append(c.name)
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for proc in alive:
            proc.kill()
        psutil.wait_procs(alive, timeout=5)
        self.state_file.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[dict[str, object]]:
        rows = []
        for c in self.components():
            alive = c.process() is not None
            served = c.name in SERVICES or c.name in HTTP_SERVICES
            state = ("RUNNING" if alive else "STOPPED") if not served else (self.health(c) if alive else "STOPPED")
            row = {"name": c.name, "pid": c.pid, "port": c.port, "state": state, "log": c.log}
            if c.name in HTTP_SERVICES:
                row["url"] = self.url(c)
            rows.append(row)
        return rows


def http_health(url: str, tls_ca: str = "", timeout: float = 2.0) -> str:
    """`SERVING` when `GET url` answers 200, `NOT_SERVING` for another HTTP status, `UNREACHABLE` when
    nothing answers; an https URL is checked against `tls_ca` (the stack's own certificate)."""
    context = ssl.create_default_context(cafile=tls_ca or None) if url.startswith("https:") else None
    if context and tls_ca:
        # The certificate itself is the trust anchor, as for gRPC: without this OpenSSL accepts only a
        # self-signed one, and a CA-signed server certificate never reads as healthy.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as reply:
            return "SERVING" if reply.status == 200 else "NOT_SERVING"
    except urllib.error.HTTPError:
        return "NOT_SERVING"
    except (OSError, ValueError):
        return "UNREACHABLE"


def _component(name: str, proc: subprocess.Popen, log_path: str, port: int = 0) -> Component:
    return Component(name, proc.pid, psutil.Process(proc.pid).create_time(), log_path, port)


def _require_free(host: str, port: int, variable: str) -> None:
    with socket.socket() as s:
        # As the gRPC server does: a port left in TIME_WAIT by a closed connection is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise FailedPrecondition(f"port {port} is in use; free it or set {variable}") from None


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
