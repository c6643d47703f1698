"""Graceful shutdown: NOT_SERVING first, serving on through the drain delay, open streams ended with
UNAVAILABLE, in-flight calls finished; and a rolling restart of two real server processes behind one
round-robin client fails no call."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence

import grpc

from fastserve.client.calls import Caller, RetryPolicy
from fastserve.client.channels import health_status
from fastserve.client.errors import ClientError
from fastserve.runtime.server import SHUTTING_DOWN, create_server
from tests.support import probe
from tests.support.processes import free_port, spawn, wait_serving

_IDLE = "fastserve.test.v1.IdleService"


def _idle(request: bytes, context):
    """One reply, then nothing until the call ends: a watch of a job with no news."""
    yield b"first"
    while context.is_active():
        time.sleep(0.05)


def _register(server: grpc.Server) -> Sequence[str]:
    probe.register(server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_IDLE, {
        "Idle": grpc.unary_stream_rpc_method_handler(_idle)}),))
    return [probe.SERVICE, _IDLE]


def test_stop_turns_not_serving_drains_and_ends_streams(config):
    running = create_server("inference", _register, config, port=0)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        in_flight = channel.unary_unary(f"/{probe.SERVICE}/Sleep").future(b"1.5", timeout=10)
        idle = channel.unary_stream(f"/{_IDLE}/Idle")(b"", timeout=20)
        assert next(idle) == b"first"
        stopping = threading.Thread(target=running.stop, args=(5.0, 1.0))
        stopping.start()
        time.sleep(0.2)
        assert health_status(channel, timeout=2) == "NOT_SERVING"
        assert probe.call(channel, "Echo", b"new", timeout=2) == b"new"  # still served while draining
        try:
            next(idle)
            raise AssertionError("the stream went on after the server stopped")
        except grpc.RpcError as error:
            assert error.code() is grpc.StatusCode.UNAVAILABLE and error.details() == SHUTTING_DOWN
        assert in_flight.result() == b"slept 1.5"
        stopping.join(10)
        assert not stopping.is_alive()


def test_rolling_restart_fails_no_call(env, log_dir):
    ports = [free_port(), free_port()]
    settings = {**env, "FASTSERVE_GRACE_SECONDS": "10", "FASTSERVE_DRAIN_SECONDS": "1"}

    def start(i: int):
        proc = spawn([sys.executable, "-m", "tests.support.probe"], {**settings, "FASTSERVE_INFERENCE_PORT": str(
            ports[i])}, log_dir / f"probe-{i}.log", ports[i])
        wait_serving(proc)
        return proc

    procs = [start(0), start(1)]
    stop, calls, failures = threading.Event(), [0], []
    # The client library's own retries: UNAVAILABLE only, which a server gives for calls it did not run.
    caller = Caller(RetryPolicy(attempts=8, initial_backoff=0.05, unreachable_for=10.0))
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)

    def client(channel: grpc.Channel) -> None:
        rpc = channel.unary_unary(f"/{probe.SERVICE}/Sleep")
        while not stop.is_set():
            try:
                assert caller.unary(rpc, b"0.2", timeout=10, idempotent=True) == b"slept 0.2"
                calls[0] += 1
            except ClientError as error:
                failures.append(error)

    with grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")]) as channel:
        threads = [threading.Thread(target=client, args=(channel,)) for _ in range(4)]
        try:
            for t in threads:
                t.start()
            time.sleep(0.5)
            for i in range(2):
                with grpc.insecure_channel(procs[i].target) as direct:
                    in_flight = direct.unary_unary(f"/{probe.SERVICE}/Sleep").future(b"1", timeout=10)
                    time.sleep(0.2)
                    procs[i].process.terminate()
                    time.sleep(0.3)
                    # Draining: a new call, not retried, is still served while balancers move away.
                    assert probe.call(direct, "Echo", b"late", timeout=5) == b"late"
                    assert in_flight.result() == b"slept 1"
                assert procs[i].process.wait(20) == 0
                procs[i] = start(i)
                time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(15)
            for proc in procs:
                proc.stop()
    assert not failures, failures[:3]
    assert calls[0] > 20
