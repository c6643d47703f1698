"""The one configuration registry of FastServe.

Every setting is a `FASTSERVE_*` environment variable, declared once here with its type, default and
meaning. Processes call `Config.from_env()` once at start-up and pass the result down; no other module
reads the environment. The defaults run the whole stack on one machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastserve.client.settings import DEFAULT_MAX_MESSAGE_MB, DEFAULT_PORTS, SERVICES, ClientSettings, reachable_host
from fastserve.runtime.errors import InvalidArgument

__all__ = ["JOB_SERVICES", "SERVICES", "Config", "describe"]

JOB_SERVICES: tuple[str, ...] = ("preprocessing", "training", "optimization")
"""Services whose long operations run as Celery jobs; each has a queue of its own name."""

_NAMESPACE = re.compile(r"[a-z0-9-]{1,40}")


_PORT = (1, 65535)
_PORT_OR_OFF = (0, 65535)


def _setting(env: str, default: Any, doc: str, bounds: tuple[float, float] | None = None) -> Any:
    """A setting; a numeric one has inclusive `bounds`, checked (with finiteness) whatever sets it."""
    return field(default=default, metadata={"env": env, "doc": doc, "bounds": bounds})


@dataclass(frozen=True)
class Config:
    """Typed settings; each field's metadata names its environment variable and documents it."""

    home: Path = _setting(
        "FASTSERVE_HOME", Path("~/.fastserve"),
        "Root of all local state: artifacts, logs, pid files, the embedded Redis.")
    host: str = _setting(
        "FASTSERVE_HOST", "127.0.0.1",
        "Address the gRPC and metrics servers bind. Loopback by default; 0.0.0.0 in containers.")
    preprocessing_port: int = _setting(
        "FASTSERVE_PREPROCESSING_PORT", DEFAULT_PORTS["preprocessing"], "gRPC port of preprocessing.", _PORT)
    training_port: int = _setting(
        "FASTSERVE_TRAINING_PORT", DEFAULT_PORTS["training"], "gRPC port of training.", _PORT)
    optimization_port: int = _setting(
        "FASTSERVE_OPTIMIZATION_PORT", DEFAULT_PORTS["optimization"], "gRPC port of optimization.", _PORT)
    inference_port: int = _setting(
        "FASTSERVE_INFERENCE_PORT", DEFAULT_PORTS["inference"], "gRPC port of inference.", _PORT)
    preprocessing_metrics_port: int = _setting(
        "FASTSERVE_PREPROCESSING_METRICS_PORT", 9151, "Prometheus HTTP port of preprocessing; 0 turns it off.",
        _PORT_OR_OFF)
    training_metrics_port: int = _setting(
        "FASTSERVE_TRAINING_METRICS_PORT", 9152, "Prometheus HTTP port of training; 0 turns it off.", _PORT_OR_OFF)
    optimization_metrics_port: int = _setting(
        "FASTSERVE_OPTIMIZATION_METRICS_PORT", 9153, "Prometheus HTTP port of optimization; 0 turns it off.",
        _PORT_OR_OFF)
    inference_metrics_port: int = _setting(
        "FASTSERVE_INFERENCE_METRICS_PORT", 9154, "Prometheus HTTP port of inference; 0 turns it off.", _PORT_OR_OFF)
    redis_url: str = _setting(
        "FASTSERVE_REDIS_URL", "",
        "Redis for jobs and Celery. Empty: use redis://127.0.0.1:6379/0 if it answers, else start an "
        "embedded redis-server under FASTSERVE_HOME.")
    namespace: str = _setting(
        "FASTSERVE_NAMESPACE", "",
        "This stack's share of Redis: its jobs, events, leases and Celery queues and results are all keyed "
        "under `fastserve:<namespace>:`, so stacks on one Redis never see each other's jobs; [a-z0-9-], at "
        "most 40. Empty: `home-` and 12 hex digits of the sha256 of the absolute FASTSERVE_HOME path. Set it "
        "when the hosts of one stack mount its home at different paths.")
    embedded_redis_port: int = _setting(
        "FASTSERVE_EMBEDDED_REDIS_PORT", 6390, "Loopback port of the embedded Redis, when one is started.", _PORT)
    gateway_port: int = _setting(
        "FASTSERVE_GATEWAY_PORT", 8000,
        "Port of the OpenAI-compatible HTTP gateway (`/v1/...`, `/health`, `/metrics`).", _PORT)
    inference_host: str = _setting(
        "FASTSERVE_INFERENCE_HOST", "",
        "Where the gateway calls the inference service (a container's or Service's name). Empty: "
        "FASTSERVE_HOST, reached on loopback when it is a wildcard.")
    preprocessing_host: str = _setting(
        "FASTSERVE_PREPROCESSING_HOST", "",
        "Where the gateway's dashboard calls the preprocessing service (a container's or Service's name). "
        "Empty: FASTSERVE_HOST, reached on loopback when it is a wildcard.")
    training_host: str = _setting(
        "FASTSERVE_TRAINING_HOST", "",
        "Where the gateway's dashboard calls the training service. Empty: FASTSERVE_HOST, reached on loopback "
        "when it is a wildcard.")
    optimization_host: str = _setting(
        "FASTSERVE_OPTIMIZATION_HOST", "",
        "Where the gateway's dashboard calls the optimization service. Empty: FASTSERVE_HOST, reached on "
        "loopback when it is a wildcard.")
    inference_models: str = _setting(
        "FASTSERVE_INFERENCE_MODELS", "all-MiniLM-L6-v2=builtin://all-MiniLM-L6-v2",
        "Models the inference service loads at start, `name=uri` comma-separated; `none` for none.")
    inference_max_models: int = _setting(
        "FASTSERVE_INFERENCE_MAX_MODELS", 16,
        "Most model versions the inference service holds loaded at once; a load past it is refused. 1 to 1024.",
        (1, 1024))
    inference_kv_cache_gb: float = _setting(
        "FASTSERVE_INFERENCE_KV_CACHE_GB", 8.0,
        "Most memory one generative model's KV cache may take, in GiB: its resident slots on the device plus "
        "their host copies (kv_slots and host_slots × context × the model's layers and heads). A load past it is "
        "refused, naming the sizes. 0.001 to 1024.", (0.001, 1024.0))
    log_format: str = _setting("FASTSERVE_LOG_FORMAT", "human", "Log line format: `human` or `json`.")
    log_level: str = _setting("FASTSERVE_LOG_LEVEL", "INFO", "Root log level (DEBUG, INFO, WARNING, ...).")
    max_message_mb: int = _setting(
        "FASTSERVE_MAX_MESSAGE_MB", DEFAULT_MAX_MESSAGE_MB,
        "Largest gRPC message received or sent, in MiB; larger ones get RESOURCE_EXHAUSTED. 1 to 2047.",
        (1, 2047))
    grace_seconds: float = _setting(
        "FASTSERVE_GRACE_SECONDS", 10.0,
        "On SIGTERM/SIGINT, how long in-flight calls may run before the server cancels them. 0 to 3600.",
        (0, 3600))
    grpc_threads: int = _setting(
        "FASTSERVE_GRPC_THREADS", 256,
        "Worker threads of each gRPC server: the calls it runs at once, streams and generations included. "
        "1 to 4096.", (1, 4096))
    auth_token: str = _setting(
        "FASTSERVE_AUTH_TOKEN", "",
        "When set, every call but health checks needs `authorization: Bearer <token>` metadata.")
    tls_cert: str = _setting("FASTSERVE_TLS_CERT", "", "PEM server certificate; with TLS_KEY turns TLS on.")
    tls_key: str = _setting("FASTSERVE_TLS_KEY", "", "PEM private key of TLS_CERT.")
    tls_client_ca: str = _setting(
        "FASTSERVE_TLS_CLIENT_CA", "", "PEM CA bundle; when set, clients must present a certificate it signed (mTLS).")
    job_visibility_timeout: int = _setting(
        "FASTSERVE_JOB_VISIBILITY_TIMEOUT", 7 * 24 * 3600,
        "Seconds before Redis redelivers an unacknowledged job; longer than any job may run. 60 to 31536000.",
        (60, 365 * 24 * 3600))
    job_lease_seconds: float = _setting(
        "FASTSERVE_JOB_LEASE_SECONDS", 30.0,
        "A running job's lease; a job whose worker died is queued again this long after its last renewal. "
        "0.5 to 3600.", (0.5, 3600))
    job_max_attempts: int = _setting(
        "FASTSERVE_JOB_MAX_ATTEMPTS", 3,
        "Runs a job may start (its worker lost and the job redelivered counts one); past them it fails. "
        "1 to 100.", (1, 100))
    job_retention_days: float = _setting(
        "FASTSERVE_JOB_RETENTION_DAYS", 30.0,
        "How long a finished job (its record, events and submit request id) stays in Redis. 0.01 to 3650.",
        (0.01, 3650))
    redis_retry_seconds: float = _setting(
        "FASTSERVE_REDIS_RETRY_SECONDS", 60.0,
        "How long a job write keeps retrying while Redis is unreachable before giving up. 0 to 3600.", (0, 3600))
    drain_seconds: float = _setting(
        "FASTSERVE_DRAIN_SECONDS", 2.0,
        "On SIGTERM, how long a server reports NOT_SERVING while still serving, before it stops taking calls. "
        "0 to 600.", (0, 600))
    worker_memory_gb: float = _setting(
        "FASTSERVE_WORKER_MEMORY_GB", 0.0,
        "Memory a training worker may use; jobs estimated to need more are refused. 0: this machine's. "
        "0 to 1048576.", (0, 1024 * 1024))
    worker_concurrency: int = _setting(
        "FASTSERVE_WORKER_CONCURRENCY", 1, "Jobs one Celery worker process runs at once. 1 to 256.", (1, 256))
    import_roots: str = _setting(
        "FASTSERVE_IMPORT_ROOTS", "",
        "Server folders ImportModel may read a model from (`server_path`), absolute paths separated by ':' or "
        "','. Empty: importing from server paths is off; uploads still work.")
    import_max_gb: float = _setting(
        "FASTSERVE_IMPORT_MAX_GB", 64.0,
        "Largest model ImportModel takes, in GiB: the files declared for an upload, measured for a server "
        "folder. 0.00001 to 4096.", (0.00001, 4096.0))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_bounds(f, getattr(self, f.name))
        _check_tls_settings(self)
        if not self.namespace:
            object.__setattr__(self, "namespace", _derived_namespace(self.home))
        elif not _NAMESPACE.fullmatch(self.namespace):
            raise InvalidArgument(
                f"FASTSERVE_NAMESPACE={self.namespace!r} must be 1 to 40 lowercase letters, digits or '-'",
                field="FASTSERVE_NAMESPACE")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Read every setting from `env` (default: the process environment), parsing by declared type."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.metadata["env"], f.type, raw)
        config = cls(**values)
        return dataclasses.replace(config, home=Path(os.path.expanduser(str(config.home))))

    @property
    def job_retention_seconds(self) -> int:
        """FASTSERVE_JOB_RETENTION_DAYS in seconds, as Redis expiries take it."""
        return int(self.job_retention_days * 24 * 3600)

    @property
    def redis_prefix(self) -> str:
        """What every Redis key of this stack starts with."""
        return f"fastserve:{self.namespace}:"

    @property
    def client_host(self) -> str:
        """Where a client on this machine reaches the servers: a wildcard bind is reached on loopback."""
        return reachable_host(self.host)

    def client_settings(self) -> ClientSettings:
        """How a client on this machine reaches this stack: its ports, token and certificate."""
        return ClientSettings(host=self.client_host, ports={s: self.port(s) for s in SERVICES}, token=self.auth_token,
                              tls_ca=self.tls_cert, max_message_mb=self.max_message_mb)

    def server_tls(self) -> tuple[bytes, bytes, bytes | None] | None:
        """What a server's TLS needs, read now: (key, certificate, client CA or None); None for plaintext.
        All or nothing: a certificate without its key, or a file that cannot be read, is refused naming
        the variable, so a server never falls back to plaintext or dies later on a half-set TLS."""
        if not self.tls_cert:
            return None
        if not self.tls_key:
            raise InvalidArgument("FASTSERVE_TLS_CERT is set without FASTSERVE_TLS_KEY: a server's TLS needs "
                                  "both", field="FASTSERVE_TLS_KEY")
        files = {"FASTSERVE_TLS_KEY": self.tls_key, "FASTSERVE_TLS_CERT": self.tls_cert,
                 "FASTSERVE_TLS_CLIENT_CA": self.tls_client_ca}
        pems: dict[str, bytes | None] = {}
        for env, path in files.items():
            try:
                pems[env] = Path(path).read_bytes() if path else None
            except OSError as exc:
                raise InvalidArgument(f"{env}={path!r} cannot be read: {exc.strerror}", field=env) from None
        return pems["FASTSERVE_TLS_KEY"], pems["FASTSERVE_TLS_CERT"], pems["FASTSERVE_TLS_CLIENT_CA"]

    def port(self, service: str) -> int:
        """The gRPC port of `service`."""
        return int(getattr(self, f"{_known(service)}_port"))

    def service_hosts(self) -> dict[str, str]:
        """The services given a host of their own (FASTSERVE_<SERVICE>_HOST), by name: the others are on
        `client_host`."""
        return {s: getattr(self, f"{s}_host") for s in SERVICES if getattr(self, f"{s}_host")}

    def metrics_port(self, service: str) -> int:
        """The Prometheus port of `service` (0: none)."""
        return int(getattr(self, f"{_known(service)}_metrics_port"))

    def env(self) -> dict[str, str]:
        """These settings as environment variables, to hand to a child process."""
        return {f.metadata["env"]: str(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _derived_namespace(home: Path) -> str:
    # The home is the stack's identity on one machine: two homes are two stacks, even on one Redis.
    path = str(Path(os.path.expanduser(str(home))).resolve())
    return f"home-{hashlib.sha256(path.encode()).hexdigest()[:12]}"


def _known(service: str) -> str:
    if service not in SERVICES:
        raise InvalidArgument(f"unknown service {service!r}", field="service")
    return service


def _check_bounds(f: dataclasses.Field, value: Any) -> None:
    bounds = f.metadata["bounds"]
    if bounds is None:
        return
    low, high = bounds
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgument(f"{f.metadata['env']}={value!r} must be a number from {low} to {high}",
                              field=f.metadata["env"])


def _check_tls_settings(config: Config) -> None:
    # A key or a client CA alone would leave the server serving plaintext while its operator meant TLS.
    # A certificate alone is a client's setting (the CA it trusts); `server_tls` refuses it for a server.
    for name, env in (("tls_key", "FASTSERVE_TLS_KEY"), ("tls_client_ca", "FASTSERVE_TLS_CLIENT_CA")):
        if getattr(config, name) and not config.tls_cert:
            raise InvalidArgument(f"{env} is set without FASTSERVE_TLS_CERT: TLS needs FASTSERVE_TLS_CERT and "
                                  "FASTSERVE_TLS_KEY together", field=env)


def _parse(name: str, type_name: str, raw: str) -> Any:
    parsers = {"Path": Path, "str": str, "int": int, "float": float}
    try:
        return parsers[type_name](raw)
    except ValueError:
        raise InvalidArgument(f"{name}={raw!r} is not a valid {type_name}", field=name) from None


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) of every setting, for `fastserve config` and the docs."""
    return [(f.metadata["env"], str(f.default), f.metadata["doc"]) for f in dataclasses.fields(Config)]
