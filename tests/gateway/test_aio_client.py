"""The async client (`fastserve.client.aio`) the gateway streams with: against the package's inference
server its refusals are `ClientError`s with the server's fields and the request id of the call's metadata,
and cancelling a stream stops the generation; against scripted servers it carries the bearer token on a
plaintext channel and over TLS."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from fastserve.client import ClientError, FastServeClient, RetryPolicy, sampling_params
from fastserve.client.aio import AsyncInferenceClient
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.runtime import logs
from fastserve.runtime.config import Config
from fastserve.services.gateway.request_ids import call_metadata
from tests.gateway.conftest import BUSY, CHAT, EMBED, generated_tokens
from tests.support import scripted
from tests.support.pki import issue

LONG = 1000


def _client(inference, **kwargs) -> AsyncInferenceClient:
    return AsyncInferenceClient.from_client(FastServeClient(ports={"inference": inference.port}), **kwargs)


def test_a_refused_stream_names_the_field_and_the_request_id(inference):
    async def refused() -> ClientError:
        token = logs.request_id.set("aio-rid-0007")
        try:
            async with _client(inference, metadata=call_metadata) as client:
                stream = client.generate_stream(CHAT, [5], pb.SamplingParams(temperature=-1.0))
                with pytest.raises(ClientError) as info:
                    await stream.__anext__()
                return info.value
        finally:
            logs.request_id.reset(token)

    error = asyncio.run(refused())
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.fields == ["sampling.temperature"]
    # The server took the id from the call's metadata: it is in the error's details and its log line.
    assert error.request_id == "aio-rid-0007"
    assert "aio-rid-0007" in inference.log_text()


def test_unary_calls_map_errors_and_stream_the_same_tokens(inference, grpc_client):
    async def run():
        async with _client(inference) as client:
            with pytest.raises(ClientError) as missing:
                await client.chat("no-such-model", [("user", "hi")])
            vectors = await client.embed(EMBED, ["hello there"])
            greedy = sampling_params(max_new_tokens=12)
            whole = await client.generate(CHAT, [5, 6], greedy)
            parts = [part async for part in client.generate_stream(CHAT, [5, 6], greedy)]
            return missing.value, vectors, whole, parts

    missing, vectors, whole, parts = asyncio.run(run())
    assert missing.code == grpc.StatusCode.NOT_FOUND and missing.request_id
    assert vectors == grpc_client.embed(EMBED, ["hello there"])
    assert [t for part in parts for t in part.token_ids] == list(whole.token_ids)
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens == 12


def test_cancelling_a_stream_stops_the_generation(inference, metrics_port, grpc_client):
    before = generated_tokens(metrics_port)

    async def read_some() -> int:
        async with _client(inference) as client:
            async with client.generate_stream(BUSY, [5], sampling_params(max_new_tokens=LONG)) as stream:
                for _ in range(3):
                    await stream.__anext__()
            # The model's one slot is free again: a second generation runs at once.
            reply = await client.generate(BUSY, [5], sampling_params(max_new_tokens=2), timeout=30)
            return reply.usage.completion_tokens

    assert asyncio.run(read_some()) == 2
    spent = generated_tokens(metrics_port) - before
    assert 3 <= spent < LONG
    # Nothing more is generated once the call is cancelled.
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert generated_tokens(metrics_port) - before == spent


def test_the_bearer_token_on_a_plaintext_channel_and_over_tls(tmp_path):
    """The scripted server's Generate answers UNAVAILABLE to a call it authenticated, UNAUTHENTICATED
    to one without the token."""
    once = RetryPolicy(attempts=1)

    async def generate(target: str, **kwargs) -> ClientError:
        async with AsyncInferenceClient(target, retry=once, **kwargs) as client:
            with pytest.raises(ClientError) as info:
                await client.generate("scripted", "x", timeout=10)
            return info.value

    ca_cert, ca_key, ca_path, _ = issue(tmp_path, "ca")
    _, _, server_cert, server_key = issue(tmp_path, "localhost", (ca_cert, ca_key))
    plain = Config.from_env({"FASTSERVE_HOME": str(tmp_path / "a"), "FASTSERVE_AUTH_TOKEN": "s3cret"})
    tls = Config.from_env({"FASTSERVE_HOME": str(tmp_path / "b"), "FASTSERVE_AUTH_TOKEN": "s3cret",
                           "FASTSERVE_TLS_CERT": server_cert, "FASTSERVE_TLS_KEY": server_key})
    servers = [scripted.serve(scripted.ScriptedInference(), config) for config in (plain, tls)]
    try:
        plain_target, tls_target = f"127.0.0.1:{servers[0].port}", f"localhost:{servers[1].port}"
        assert asyncio.run(generate(plain_target)).code == grpc.StatusCode.UNAUTHENTICATED
        authed = asyncio.run(generate(plain_target, token="s3cret"))
        assert authed.code == grpc.StatusCode.UNAVAILABLE and "restarting" in authed.message
        assert asyncio.run(generate(tls_target, tls_ca=ca_path)).code == grpc.StatusCode.UNAUTHENTICATED
        secured = asyncio.run(generate(tls_target, tls_ca=ca_path, token="s3cret"))
        assert secured.code == grpc.StatusCode.UNAVAILABLE and "restarting" in secured.message
    finally:
        for server in servers:
            server.stop(0)
