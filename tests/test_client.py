"""The Python client against a real inference server process (MiniLM served by default, a small GPT
loaded through the client), and its retries against a closed port and against scripted servers
built like the real ones."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import replace

import grpc
import pytest

from fastserve.client import ClientError, FastServeClient, RetryPolicy, sampling_params
from fastserve.runtime.config import Config
from tests.support import scripted
from tests.support.pki import issue
from tests.support.processes import free_port

MINILM = "all-MiniLM-L6-v2"
NO_JITTER = RetryPolicy(attempts=4, initial_backoff=0.1, multiplier=2.0, max_backoff=1.0, jitter=0.0)


@pytest.fixture(scope="module")
def client(gpt_server):
    with FastServeClient(ports={"inference": gpt_server.port}) as fs:
        yield fs


def test_health_of_a_running_and_a_missing_service(gpt_server):
    with FastServeClient(ports={"inference": gpt_server.port, "training": free_port()}) as fs:
        assert fs.health("inference") == "SERVING" and fs.health("training", timeout=0.5) == "UNREACHABLE"


def test_embed_through_the_client(client):
    assert MINILM in [m.name for m in client.inference.list_models(ready_only=True)]
    reply = client.inference.embed(MINILM, ["a cat sits on the mat", "a cat sits on the mat", "stock markets fell"])
    vectors = [list(e.values) for e in reply.embeddings]
    assert reply.dimension == 384 and [len(v) for v in vectors] == [384] * 3
    assert all(math.isclose(math.hypot(*v), 1.0, abs_tol=1e-4) for v in vectors)  # normalized
    assert vectors[0] == vectors[1] and vectors[0] != vectors[2]


def test_invalid_request_raises_client_error_with_the_field(client):
    with pytest.raises(ClientError) as info:
        client.inference.embed(MINILM, [])
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.fields == ["texts"]
    assert error.service == "inference" and error.request_id and error.attempts == 1
    assert error.line().startswith("INVALID_ARGUMENT: ") and error.line().endswith("(field texts)")

    with pytest.raises(ClientError) as info:
        client.inference.classify(MINILM, ["an embedding model cannot classify"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.fields == ["model"]

    with pytest.raises(ClientError) as info:
        client.inference.embed("no-such-model", ["x"])
    assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.attempts == 1


def test_load_stream_and_unload_a_generation_model(client):
    status = client.inference.load_model("gpt", "artifact://models/tiny-gpt/1")
    assert status.name == "gpt" and status.model_uri == "artifact://models/tiny-gpt/1"
    try:
        greedy = sampling_params(max_new_tokens=12)
        whole = client.inference.generate("gpt", "Return the", greedy)
        chunks = list(client.inference.stream_text("gpt", "Return the", greedy))
        assert whole.usage.completion_tokens > 0 and len(chunks) > 1
        assert "".join(chunks) == whole.text  # greedy: the stream is the completion, in pieces

        # Leaving a stream early cancels it; the model goes on serving.
        for _ in client.inference.stream_text("gpt", "Create a", sampling_params(max_new_tokens=200)):
            break
        assert client.inference.generate("gpt", "Return the", greedy).text == whole.text

        with pytest.raises(ClientError) as info:
            client.inference.generate("gpt", "x", sampling_params(temperature=-1.0))
        assert info.value.fields == ["sampling.temperature"]
    finally:
        client.inference.unload_model("gpt")
    assert "gpt" not in [m.name for m in client.inference.list_models()]


def test_a_call_that_reaches_no_server_fails_at_once():
    port = free_port()
    with FastServeClient(ports={"inference": port}, retry=NO_JITTER) as fs:
        start = time.monotonic()
        with pytest.raises(ClientError) as info:
            fs.inference.list_models()
        elapsed = time.monotonic() - start
    error = info.value
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.attempts == 1 and elapsed < 0.5
    assert error.unreachable and error.refused and error.address == f"127.0.0.1:{port}"


def test_idempotent_calls_retry_with_backoff_and_others_do_not():
    # A window for unreachable servers, as a script riding out a restart gives: the backoff applies.
    policy = replace(NO_JITTER, unreachable_for=5.0)
    with FastServeClient(ports={"inference": free_port(), "training": free_port()}, retry=policy) as fs:
        start = time.monotonic()
        with pytest.raises(ClientError) as info:
            fs.inference.list_models()
        elapsed = time.monotonic() - start
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.attempts == 4
        assert 0.7 <= elapsed < 5  # 0.1 + 0.2 + 0.4 seconds between the four tries

        for call in (lambda: fs.inference.generate("m", "x"), lambda: fs.training.cancel_job("j")):
            start = time.monotonic()
            with pytest.raises(ClientError) as info:
                call()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.attempts == 1
            assert time.monotonic() - start < 0.5

    # A window shorter than the backoff: tries at 0 and 0.1 s; the next would start at 0.3 s, past it.
    with FastServeClient(ports={"inference": free_port()}, retry=replace(NO_JITTER, unreachable_for=0.25)) as fs:
        with pytest.raises(ClientError) as info:
            fs.inference.list_models()
        assert info.value.attempts == 2


def test_a_server_that_answers_unavailable(tmp_path):
    servicer = scripted.ScriptedInference(unavailable_lists=2)
    running = scripted.serve(servicer, Config.from_env({"FASTSERVE_HOME": str(tmp_path)}))
    try:
        with FastServeClient(ports={"inference": running.port}, retry=NO_JITTER) as fs:
            assert [m.name for m in fs.inference.list_models()] == ["scripted"]
            assert servicer.calls["ListModels"] == 3
            with pytest.raises(ClientError) as info:
                fs.inference.generate("scripted", "x")
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and info.value.attempts == 1
            assert servicer.calls["Generate"] == 1  # never sent twice
    finally:
        running.stop(0)


def test_a_server_that_comes_up_late(tmp_path):
    port, servers = free_port(), []
    late = threading.Timer(0.8, lambda: servers.append(
        scripted.serve(scripted.ScriptedInference(), Config.from_env({"FASTSERVE_HOME": str(tmp_path)}), port)))
    late.start()
    try:
        policy = RetryPolicy(attempts=30, initial_backoff=0.05, max_backoff=0.2, jitter=0.0, unreachable_for=10.0)
        with FastServeClient(ports={"inference": port}, retry=policy) as fs:
            start = time.monotonic()
            assert [m.name for m in fs.inference.list_models()] == ["scripted"]
            assert time.monotonic() - start >= 0.7
    finally:
        late.join()
        for running in servers:
            running.stop(0)


def test_watch_resumes_after_unavailable_without_missing_or_repeating_events(tmp_path):
    servicer = scripted.ScriptedTraining(break_after=2)
    running = scripted.serve(servicer, Config.from_env({"FASTSERVE_HOME": str(tmp_path)}))
    try:
        with FastServeClient(ports={"training": running.port}, retry=NO_JITTER) as fs:
            events = list(fs.training.watch_job(scripted.JOB_ID))
            assert [e.event_id for e in events] == ["1", "2", "3", "4", "5"]
            assert servicer.watches == ["", "2"]
            assert fs.training.wait_job(scripted.JOB_ID).result["model_uri"] == "artifact://models/scripted/1"
            with pytest.raises(ClientError) as info:
                list(fs.training.watch_job("no-such-job"))
            assert info.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        running.stop(0)


def test_bearer_token(tmp_path):
    config = Config.from_env({"FASTSERVE_HOME": str(tmp_path), "FASTSERVE_AUTH_TOKEN": "s3cret"})
    running = scripted.serve(scripted.ScriptedInference(), config)
    try:
        with FastServeClient(ports={"inference": running.port}) as anonymous:
            with pytest.raises(ClientError) as info:
                anonymous.inference.list_models()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and info.value.attempts == 1
        with FastServeClient(ports={"inference": running.port}, token="s3cret") as authed:
            assert [m.name for m in authed.inference.list_models()] == ["scripted"]
    finally:
        running.stop(0)


def test_tls(tmp_path):
    ca_cert, ca_key, ca_path, _ = issue(tmp_path, "ca")
    _, _, server_cert, server_key = issue(tmp_path, "localhost", (ca_cert, ca_key))
    config = Config.from_env({"FASTSERVE_HOME": str(tmp_path), "FASTSERVE_TLS_CERT": server_cert,
                              "FASTSERVE_TLS_KEY": server_key})
    running = scripted.serve(scripted.ScriptedInference(), config)
    try:
        with FastServeClient("localhost", ports={"inference": running.port}, tls_ca=ca_path) as fs:
            assert [m.name for m in fs.inference.list_models()] == ["scripted"]
        with FastServeClient("localhost", ports={"inference": running.port}, retry=RetryPolicy(attempts=1)) as plain:
            with pytest.raises(ClientError) as info:
                plain.inference.list_models(timeout=3)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0)
