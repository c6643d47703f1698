"""The server factory every service uses: health, reflection, error mapping, limits, auth, TLS,
graceful shutdown. Real gRPC servers on loopback; the probe service stands in for a service's RPCs."""

from __future__ import annotations

import ipaddress
import sys
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

from fastserve.client.channels import health_status
from fastserve.common.v1 import errors_pb2
from fastserve.runtime.channels import open_channel
from fastserve.runtime.config import Config
from fastserve.runtime.server import create_server
from tests.support import probe
from tests.support.pki import issue
from tests.support.processes import free_port, port_open, spawn, wait_serving


@pytest.fixture
def server(config: Config):
    running = create_server("inference", probe.register, config, port=0)
    yield running
    running.stop(0)


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def test_health_overall_and_per_service(channel):
    assert health_status(channel) == "SERVING"
    assert health_status(channel, probe.SERVICE) == "SERVING"
    assert health_status(channel, "fastserve.no.v1.Such") == "UNREACHABLE"  # NOT_FOUND for unknown services


def test_reflection_lists_services(channel):
    names = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {probe.SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_stop_reports_not_serving_to_watchers(server, channel):
    from grpc_health.v1 import health_pb2_grpc

    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
    threading.Thread(target=server.stop, args=(2,)).start()
    assert next(stream).status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("kind, code", [
    ("invalid", grpc.StatusCode.INVALID_ARGUMENT),
    ("not_found", grpc.StatusCode.NOT_FOUND),
    ("already_exists", grpc.StatusCode.ALREADY_EXISTS),
    ("failed_precondition", grpc.StatusCode.FAILED_PRECONDITION),
    ("resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("unavailable", grpc.StatusCode.UNAVAILABLE),
    ("deadline", grpc.StatusCode.DEADLINE_EXCEEDED),
    ("cancelled", grpc.StatusCode.CANCELLED),
])
def test_domain_errors_map_to_codes(channel, kind, code):
    with pytest.raises(grpc.RpcError) as info:
        probe.call(channel, "Raise", kind.encode())
    assert info.value.code() == code
    status = rpc_status.from_call(info.value)
    detail = errors_pb2.ErrorDetail()
    assert any(d.Unpack(detail) for d in status.details)
    assert errors_pb2.ErrorReason.Name(detail.reason) == f"ERROR_REASON_{code.name}"
    assert detail.service == "inference" and detail.request_id


def test_invalid_argument_names_the_field(channel):
    with pytest.raises(grpc.RpcError) as info:
        probe.call(channel, "Raise", b"invalid")
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in rpc_status.from_call(info.value).details)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("hyperparameters.learning_rate", "learning_rate must be > 0")]


def test_unexpected_error_is_internal_with_request_id_and_no_traceback(channel, caplog):
    with pytest.raises(grpc.RpcError) as info:
        probe.call(channel, "Raise", b"bug", metadata=(("x-request-id", "req-123"),))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error (request id req-123)"
    assert "ZeroDivisionError" not in info.value.details() and "secret" not in info.value.details()
    assert ("x-request-id", "req-123") in info.value.trailing_metadata()
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "request id req-123" in logged[0].getMessage()


def test_error_mid_stream_keeps_its_code(channel):
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for item in probe.stream(channel, "Count", b"3:not_found"):
            received.append(int(item))
    assert received == [0, 1, 2]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_request_id_returned_on_success(channel):
    _, call = channel.unary_unary(f"/{probe.SERVICE}/Echo").with_call(b"x")
    assert dict(call.trailing_metadata())["x-request-id"]


def test_oversized_message_is_resource_exhausted(env):
    config = Config.from_env({**env, "FASTSERVE_MAX_MESSAGE_MB": "1"})
    running = create_server("inference", probe.register, config, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            assert probe.call(ch, "Echo", b"a" * 1000) == b"a" * 1000
            with pytest.raises(grpc.RpcError) as info:
                probe.call(ch, "Echo", b"a" * (2 * 1024 * 1024))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.stop(0)


def test_bearer_token(env):
    config = Config.from_env({**env, "FASTSERVE_AUTH_TOKEN": "s3cret"})
    running = create_server("inference", probe.register, config, port=0)
    target = f"127.0.0.1:{running.port}"
    try:
        with grpc.insecure_channel(target) as bare:
            for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)]:
                with pytest.raises(grpc.RpcError) as info:
                    probe.call(bare, "Echo", b"x", metadata=metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                list(probe.stream(bare, "Count", b"2"))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert health_status(bare) == "SERVING"  # probes carry no token
        with open_channel(target, config) as authed:
            assert probe.call(authed, "Echo", b"x") == b"x"
            assert [int(i) for i in probe.stream(authed, "Count", b"2")] == [0, 1]
    finally:
        running.stop(0)


def test_tls_and_mutual_tls(env, tmp_path):
    ca_cert, ca_key, ca_path, _ = issue(tmp_path, "ca")
    _, _, server_cert, server_key = issue(tmp_path, "localhost", (ca_cert, ca_key))
    _, _, client_cert, client_key = issue(tmp_path, "client", (ca_cert, ca_key))
    tls = Config.from_env({**env, "FASTSERVE_TLS_CERT": server_cert, "FASTSERVE_TLS_KEY": server_key})
    running = create_server("inference", probe.register, tls, port=0)
    trust_ca = Config.from_env({**env, "FASTSERVE_TLS_CERT": ca_path})
    try:
        with open_channel(f"localhost:{running.port}", trust_ca) as ch:
            assert probe.call(ch, "Echo", b"tls") == b"tls"
        with grpc.insecure_channel(f"localhost:{running.port}") as plain:
            with pytest.raises(grpc.RpcError):
                probe.call(plain, "Echo", b"x", timeout=3)
    finally:
        running.stop(0)

    mtls = Config.from_env({**env, "FASTSERVE_TLS_CERT": server_cert, "FASTSERVE_TLS_KEY": server_key,
                            "FASTSERVE_TLS_CLIENT_CA": ca_path})
    running = create_server("inference", probe.register, mtls, port=0)
    try:
        with open_channel(f"localhost:{running.port}", trust_ca) as no_cert:
            with pytest.raises(grpc.RpcError) as info:
                probe.call(no_cert, "Echo", b"x", timeout=3)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with open_channel(f"localhost:{running.port}", trust_ca, client_cert, client_key) as with_cert:
            assert probe.call(with_cert, "Echo", b"mtls") == b"mtls"
    finally:
        running.stop(0)


def _listening_on(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The local addresses of the TCP sockets listening on `port`, read from the kernel's tables (an
    IPv4-mapped IPv6 address as its IPv4 one: gRPC may bind 127.0.0.1 through an IPv6 socket)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    # The kernel writes each 32-bit word in host (little-endian) order.
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    ip = ipaddress.ip_address(raw)
                    found.add(getattr(ip, "ipv4_mapped", None) or ip)
    return found


def test_loopback_by_default(server, config, env):
    assert Config().host == "127.0.0.1"
    # Only loopback listens: a server bound to every interface would show 0.0.0.0 or :: here.
    assert _listening_on(server.port) == {ipaddress.ip_address("127.0.0.1")}
    everywhere = create_server("inference", probe.register, Config.from_env({**env, "FASTSERVE_HOST": "0.0.0.0"}),
                               port=0)
    try:
        # What the check above would catch.
        assert {ip.is_unspecified for ip in _listening_on(everywhere.port)} == {True}
    finally:
        everywhere.stop(0)


def test_sigterm_lets_in_flight_call_finish(env, log_dir):
    port = free_port()
    proc = spawn([sys.executable, "-m", "tests.support.probe"],
                 {**env, "FASTSERVE_INFERENCE_PORT": str(port), "FASTSERVE_GRACE_SECONDS": "10"},
                 log_dir / "probe.log", port)
    try:
        wait_serving(proc)
        with grpc.insecure_channel(proc.target) as ch:
            future = ch.unary_unary(f"/{probe.SERVICE}/Sleep").future(b"2", timeout=15)
            time.sleep(0.5)  # the call is in flight
            proc.process.terminate()
            assert future.result() == b"slept 2"
            assert proc.process.wait(10) == 0
        assert not port_open(port)
        assert "shutting down" in proc.log_text()
    finally:
        proc.stop()


def test_metrics_per_method_and_code(channel):
    from urllib.request import urlopen

    from prometheus_client import REGISTRY

    from fastserve.runtime.metrics import serve_metrics

    def calls(method, code):
        return REGISTRY.get_sample_value(
            "fastserve_rpc_calls_total", {"service": "inference", "method": method, "code": code}) or 0

    before_ok, before_nf = calls("Echo", "OK"), calls("Raise", "NOT_FOUND")
    probe.call(channel, "Echo", b"x")
    with pytest.raises(grpc.RpcError):
        probe.call(channel, "Raise", b"not_found")
    assert calls("Echo", "OK") == before_ok + 1 and calls("Raise", "NOT_FOUND") == before_nf + 1
    assert REGISTRY.get_sample_value("fastserve_rpc_in_flight", {"service": "inference", "method": "Echo"}) == 0
    port = free_port()
    serve_metrics("127.0.0.1", port)
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'fastserve_rpc_calls_total{code="NOT_FOUND",method="Raise",service="inference"}' in text
    assert "fastserve_rpc_latency_seconds_bucket" in text


def test_json_log_lines():
    import json
    import logging

    from fastserve.runtime.logs import JsonFormatter, request_id

    token = request_id.set("abc")
    try:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
        record.service, record.request_id = "training", request_id.get()
        entry = json.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(token)
    assert entry["message"] == "failed here" and entry["request_id"] == "abc" and entry["service"] == "training"


def test_celery_settings_are_json_only_and_ask_for_redelivery_on_worker_loss():
    # What these settings promise, a job finished by another worker after one is killed, is proven with real
    # workers in tests/test_worker_loss.py; this checks only the settings themselves.
    from fastserve.runtime.celery_app import celery_settings

    settings = celery_settings(Config())
    assert settings["accept_content"] == ["json"] and settings["task_serializer"] == "json"
    assert settings["result_accept_content"] == ["json"]
    assert settings["task_acks_late"] and settings["task_reject_on_worker_lost"]
    assert settings["worker_prefetch_multiplier"] == 1


@pytest.mark.parametrize("tls, named", [
    ({"FASTSERVE_TLS_KEY": "k"}, "FASTSERVE_TLS_KEY is set without FASTSERVE_TLS_CERT"),
    ({"FASTSERVE_TLS_CERT": "c"}, "FASTSERVE_TLS_CERT is set without FASTSERVE_TLS_KEY"),
])
def test_half_set_tls_refuses_to_start(env, log_dir, tmp_path, tls, named):
    for variable, name in tls.items():
        (tmp_path / name).write_text("PEM")
        tls[variable] = str(tmp_path / name)
    port = free_port()
    proc = spawn([sys.executable, "-m", "tests.support.probe"], {**env, "FASTSERVE_INFERENCE_PORT": str(port), **tls},
                 log_dir / "probe.log", port)
    try:
        assert proc.process.wait(30) != 0
        assert f"inference cannot start: {named}" in proc.log_text()
        assert "Traceback" not in proc.log_text()
        assert not port_open(port)  # and never served plaintext
    finally:
        proc.stop()


def test_errors_show_no_server_paths(config, caplog):
    import logging

    from fastserve.runtime.errors import FailedPrecondition

    caplog.set_level(logging.INFO, logger="fastserve.runtime.interceptors")
    secret = f"{config.home}/artifacts/models/m/1/config.json"

    def fail(request, context):
        raise FailedPrecondition(f"cannot read {secret}: [Errno 13] denied, also '/srv/data/x/y.bin'",
                                 field="model_uri")

    def register(server):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            probe.SERVICE, {"Fail": grpc.unary_unary_rpc_method_handler(fail)}),))
        return [probe.SERVICE]

    running = create_server("inference", register, config, port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch, pytest.raises(grpc.RpcError) as info:
            ch.unary_unary(f"/{probe.SERVICE}/Fail")(b"", metadata=(("x-request-id", "req-path"),), timeout=5)
    finally:
        running.stop(0)
    sent = [info.value.details(), *(v.description for v in _violations(info.value))]
    for text in sent:
        assert str(config.home) not in text and "/srv" not in text
        assert "$FASTSERVE_HOME/artifacts/models/m/1/config.json" in text and "…/x/y.bin" in text
    assert any(secret in r.getMessage() for r in caplog.records)  # the log keeps the detail


def _violations(error):
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in rpc_status.from_call(error).details)
    return bad.field_violations


def test_model_folder_errors_name_no_server_path(tmp_path):
    from fastserve.models.kinds import read_config
    from fastserve.runtime.errors import FailedPrecondition, error_gist

    folder = tmp_path / "models" / "m" / "1"
    (folder / "config.json").mkdir(parents=True)  # unreadable as a file: IsADirectoryError names the path
    with pytest.raises(FailedPrecondition) as info:
        read_config(folder)
    assert str(tmp_path) not in info.value.message and "m/1" in info.value.message
    gist = error_gist(OSError(f"Can't load the configuration of '{folder}'. Make sure..."))
    assert str(tmp_path) not in gist and "…/m/1" in gist
