"""TLS, mutual TLS and the bearer token through the whole stack, as the README's configuration table
claims them: `fastserve up` with a CA-signed certificate and a token, `fastserve status` and
`fastserve health` against it, the Python client by IP and by name; mutual TLS refusing strangers; and
each mismatch (plaintext against TLS, TLS against plaintext, a bad token) failing with its exact code.
Real processes on loopback; certificates made here with `cryptography`."""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fastserve.client import ClientError, FastServeClient
from fastserve.client.calls import RetryPolicy
from fastserve.client.channels import health_status, make_channel
from fastserve.runtime.config import SERVICES
from fastserve.stack.processes import HTTP_SERVICES
from tests.support import probe
from tests.support.pki import issue
from tests.support.processes import Proc, free_port, spawn
from tests.test_stack import _fastserve

TOKEN = "s3cret-token"
NO_RETRY = RetryPolicy(attempts=1)


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    stranger_ca: str
    stranger_cert: str
    stranger_key: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    from cryptography import x509

    folder = tmp_path_factory.mktemp("pki")
    ca = issue(folder, "test-ca")
    server = issue(folder, "server", ca[:2],
                    sans=(x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")))
    client = issue(folder, "client", ca[:2])
    stranger_ca = issue(folder, "stranger-ca")
    stranger = issue(folder, "stranger", stranger_ca[:2])
    return Pki(ca[2], server[2], server[3], client[2], client[3], stranger_ca[2], stranger[2], stranger[3])


def _rpc_error(call) -> grpc.RpcError | ClientError:
    with pytest.raises((grpc.RpcError, ClientError)) as info:
        call()
    return info.value


def _code(error) -> grpc.StatusCode:
    return error.code if isinstance(error, ClientError) else error.code()


def test_up_status_health_and_client_with_a_ca_signed_certificate_and_a_token(env, pki):
    ports = {s: free_port() for s in (*SERVICES, *HTTP_SERVICES)}
    env = {**env, **{f"FASTSERVE_{s.upper()}_PORT": str(p) for s, p in ports.items()},
           "FASTSERVE_INFERENCE_MODELS": "none", "FASTSERVE_AUTH_TOKEN": TOKEN,
           "FASTSERVE_TLS_CERT": pki.server_cert, "FASTSERVE_TLS_KEY": pki.server_key}
    try:
        up = _fastserve(env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        status = _fastserve(env, "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        states = {r["name"]: r["state"] for r in json.loads(status.stdout)}
        assert states == {**dict.fromkeys(SERVICES, "SERVING"), "gateway": "SERVING", "worker": "RUNNING"}

        # As a container's health check runs it: the stack's own TLS settings, no other option.
        health = _fastserve(env, "health", "--port", str(ports["inference"]))
        assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr

        for host in ("127.0.0.1", "localhost"):
            with FastServeClient(host, ports=ports, token=TOKEN, tls_ca=pki.ca, timeout=10) as fs:
                assert fs.inference.list_models() == []
                assert fs.training.list_jobs().jobs == []

        # The token: missing or wrong is UNAUTHENTICATED, while health checks stay open to probes.
        for token in ("", "wrong"):
            with FastServeClient("localhost", ports=ports, token=token, tls_ca=pki.ca, timeout=10,
                                 retry=NO_RETRY) as fs:
                assert _code(_rpc_error(fs.inference.list_models)) == grpc.StatusCode.UNAUTHENTICATED
        with make_channel(f"localhost:{ports['inference']}", tls_ca=pki.ca) as channel:
            assert health_status(channel) == "SERVING"

        # Plaintext against TLS: the handshake never completes.
        with FastServeClient("127.0.0.1", ports=ports, token=TOKEN, timeout=5, retry=NO_RETRY) as fs:
            assert _code(_rpc_error(fs.inference.list_models)) == grpc.StatusCode.UNAVAILABLE
        # A client trusting another CA does not accept the server.
        with FastServeClient("localhost", ports=ports, token=TOKEN, tls_ca=pki.stranger_ca, timeout=5,
                             retry=NO_RETRY) as fs:
            assert _code(_rpc_error(fs.inference.list_models)) == grpc.StatusCode.UNAVAILABLE
    finally:
        down = _fastserve(env, "down")
    assert down.returncode == 0, down.stderr


def _probe(env: dict[str, str], log: Path, **settings: str) -> Proc:
    """The probe service in a process of its own, through the same server factory as every service."""
    port = free_port()
    return spawn([sys.executable, "-m", "tests.support.probe"],
                 {**env, "FASTSERVE_INFERENCE_PORT": str(port), **settings}, log, port)


def _wait_port(proc: Proc, timeout: float = 60.0) -> None:
    # The TLS probe cannot be asked its health in plaintext; its log line says when it serves.
    deadline = time.monotonic() + timeout
    while "serving" not in proc.log_text():
        if proc.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"probe on {proc.target} did not start:\n{proc.log_text()[-3000:]}")
        time.sleep(0.1)


def test_mutual_tls_takes_only_clients_of_its_ca(env, pki, tmp_path):
    proc = _probe(env, tmp_path / "mtls.log", FASTSERVE_TLS_CERT=pki.server_cert, FASTSERVE_TLS_KEY=pki.server_key,
                  FASTSERVE_TLS_CLIENT_CA=pki.ca, FASTSERVE_AUTH_TOKEN=TOKEN)
    try:
        _wait_port(proc)
        target = f"localhost:{proc.port}"
        with make_channel(target, token=TOKEN, tls_ca=pki.ca, client_cert=pki.client_cert,
                          client_key=pki.client_key) as channel:
            assert probe.call(channel, "Echo", b"mtls") == b"mtls"
        refused = {
            "a client of another CA": dict(client_cert=pki.stranger_cert, client_key=pki.stranger_key),
            "no client certificate": {},
        }
        for why, identity in refused.items():
            with make_channel(target, token=TOKEN, tls_ca=pki.ca, **identity) as channel:
                error = _rpc_error(lambda: probe.call(channel, "Echo", b"x", timeout=5))
                assert _code(error) == grpc.StatusCode.UNAVAILABLE, why
            # Refused at the handshake, that client alone: the server still takes its own CA's clients.
            with make_channel(target, token=TOKEN, tls_ca=pki.ca, client_cert=pki.client_cert,
                              client_key=pki.client_key) as channel:
                assert probe.call(channel, "Echo", why.encode()) == why.encode()
        # The right certificate with a wrong token gets through TLS and is then refused by the token check.
        with make_channel(target, token="wrong", tls_ca=pki.ca, client_cert=pki.client_cert,
                          client_key=pki.client_key) as channel:
            assert _code(_rpc_error(lambda: probe.call(channel, "Echo", b"x", timeout=5))) == \
                grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.stop()


def test_a_tls_client_against_a_plaintext_server_is_unavailable(env, pki, tmp_path):
    proc = _probe(env, tmp_path / "plain.log")
    try:
        _wait_port(proc)
        with make_channel(f"127.0.0.1:{proc.port}", tls_ca=pki.ca) as channel:
            error = _rpc_error(lambda: probe.call(channel, "Echo", b"x", timeout=5))
            assert _code(error) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{proc.port}") as channel:
            assert probe.call(channel, "Echo", b"plain") == b"plain"  # the server itself serves
    finally:
        proc.stop()
