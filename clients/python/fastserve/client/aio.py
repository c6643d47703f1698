"""`AsyncInferenceClient`: the inference service's generation and embedding calls on a grpc.aio channel,
for a program that already runs an asyncio loop (the OpenAI gateway); `AsyncJobClient`: a job service's
WatchJob the same way (the gateway's dashboard).

A streamed completion is one message per token. Reading a blocking stream from a loop costs a worker
thread per stream and a hop into the loop per message; a grpc.aio call is read by the loop itself, and
cancelling it (or the task that awaits it) cancels the RPC, so the server frees the generation's slot.

The channel is built as the blocking client's (`make_channel`): TLS from `tls_ca`, mutual TLS with
`client_cert`/`client_key`, `authorization: Bearer <token>` as call credentials over TLS and as call
metadata on a plaintext channel (gRPC refuses call credentials there). Deadlines are those of
`fastserve.client.calls`, failures are `ClientError`s, and Embed is retried on UNAVAILABLE as the
blocking client retries it. `metadata`, called at each call in the caller's context, adds per-call
metadata: the gateway passes the HTTP request's id on that way, without the cost of an interceptor on
every streamed message. A grpc.aio channel belongs to the loop it was made in: make the client inside
the running loop and `await close()` it there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from fastserve.client.calls import COMPUTE, GENERATE, RETRYABLE, RetryPolicy
from fastserve.client.channels import channel_options, tls_credentials
from fastserve.client.client import FastServeClient
from fastserve.client.errors import ClientError
from fastserve.client.inference import Message, _prompt, chat_messages
from fastserve.client.jobs import JobClient
from fastserve.client.settings import DEFAULT_MAX_MESSAGE_MB, DEFAULT_PORTS
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.inference.v1 import inference_pb2_grpc

Metadata = tuple[tuple[str, str], ...]


def make_aio_channel(target: str, *, token: str = "", tls_ca: str = "", client_cert: str = "", client_key: str = "",
                     max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                     options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A grpc.aio channel to `target` with `make_channel`'s TLS and limits. The token goes in the
    credentials only over TLS; on a plaintext channel the client sends it as metadata (see
    `AsyncInferenceClient`)."""
    options = channel_options(max_message_mb, options)
    if not tls_ca:
        return grpc.aio.insecure_channel(target, options)
    return grpc.aio.secure_channel(target, tls_credentials(tls_ca, client_cert, client_key, token), options)


class ServerStream:
    """The replies of one server-streaming call, read with `async for` (or `await stream.__anext__()`);
    a failure is a `ClientError`. `cancel()` ends the call at the server; it is safe at
    any time and on a finished call. `async with` cancels on leaving, however the block ends."""

    __slots__ = ("_call",)

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call

    def __aiter__(self) -> ServerStream:
        return self

    async def __anext__(self) -> Any:
        try:
            # `read()` rather than the call's own async iterator: one await per message, not an
            # async generator around it.
            message = await self._call.read()
        except grpc.aio.AioRpcError as error:
            raise ClientError.from_rpc_error(error) from error
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return message

    def cancel(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> ServerStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()


class _AsyncService:
    """A grpc.aio channel to one service, built as the blocking client's (TLS, limits, the token, and
    reconnects at the pace of the retries), and each call's metadata: the token on a plaintext channel
    and what `metadata` adds."""

    def __init__(self, target: str, *, token: str = "", tls_ca: str = "", client_cert: str = "",
                 client_key: str = "", retry: RetryPolicy | None = None,
                 max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                 metadata: Callable[[], Metadata] | None = None) -> None:
        self.retry = retry or RetryPolicy()
        options = [("grpc.initial_reconnect_backoff_ms", int(self.retry.initial_backoff * 1000) or 1),
                   ("grpc.max_reconnect_backoff_ms", int(self.retry.max_backoff * 1000) or 1)]
        self._channel = make_aio_channel(target, token=token, tls_ca=tls_ca, client_cert=client_cert,
                                         client_key=client_key, max_message_mb=max_message_mb, options=options)
        self._static: Metadata = (("authorization", f"Bearer {token}"),) if token and not tls_ca else ()
        self._metadata = metadata

    def _call_metadata(self) -> Metadata | None:
        extra = self._metadata() if self._metadata is not None else ()
        return (self._static + tuple(extra)) or None

    async def close(self) -> None:
        await self._channel.close()


class AsyncJobClient(_AsyncService):
    """WatchJob of one job service on a grpc.aio channel: a watch lasts as long as its job, which on a
    blocking channel would hold a thread for all that time (the gateway's dashboard)."""

    def __init__(self, target: str, job_client: type[JobClient], **kwargs) -> None:
        super().__init__(target, **kwargs)
        self._pb, self._stub = job_client.pb, job_client.stub_class(self._channel)

    @classmethod
    def from_client(cls, client: FastServeClient, service: str, *,
                    metadata: Callable[[], Metadata] | None = None) -> AsyncJobClient:
        """An async client of `service` with the server, credentials and retries of blocking `client`."""
        return cls(client.targets[service], type(getattr(client, service)), retry=client._caller.retry,
                   metadata=metadata, **client._channel_settings)

    def watch_job(self, job_id: str, after_event_id: str = "") -> ServerStream:
        """The job's events, history first, until the one reporting a terminal state. No deadline: the
        caller cancels the stream when it no longer wants it."""
        request = self._pb.WatchJobRequest(job_id=job_id, after_event_id=after_event_id)
        return ServerStream(self._stub.WatchJob(request, metadata=self._call_metadata()))


class AsyncInferenceClient(_AsyncService):
    """Generate, Chat and Embed, and the GenerateStream and ChatStream streams, of the inference service
    on a grpc.aio channel (see the module's docstring). `timeout` replaces every call's default
    deadline, as the blocking client's; `retry` governs Embed's retries."""

    def __init__(self, target: str, *, timeout: float | None = None, **kwargs) -> None:
        super().__init__(target, **kwargs)
        self.timeout = timeout
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)

    @classmethod
    def from_client(cls, client: FastServeClient, *, service: str = "inference",
                    metadata: Callable[[], Metadata] | None = None) -> AsyncInferenceClient:
        """An async client of the server, credentials, deadlines and retries of blocking `client`."""
        settings = client._channel_settings
        return cls(client.targets[service], timeout=client._caller.timeout, retry=client._caller.retry,
                   metadata=metadata, **settings)

    @classmethod
    def connect(cls, host: str = "127.0.0.1", port: int = DEFAULT_PORTS["inference"], **kwargs) -> AsyncInferenceClient:
        return cls(f"{host}:{port}", **kwargs)

    def _deadline(self, given: float | None, default: float) -> float:
        if given is not None:
            return given
        return self.timeout if self.timeout is not None else default

    def _stream(self, method: str, request: Any, timeout: float | None) -> ServerStream:
        rpc = getattr(self._stub, method)
        return ServerStream(rpc(request, timeout=self._deadline(timeout, GENERATE), metadata=self._call_metadata()))

    async def _unary(self, method: str, request: Any, timeout: float | None, default: float,
                     idempotent: bool) -> Any:
        """One reply, tried again on UNAVAILABLE when `idempotent`, as `Caller.unary` does."""
        rpc, deadline, metadata = getattr(self._stub, method), self._deadline(timeout, default), self._call_metadata()
        attempts, attempt, start = (self.retry.attempts if idempotent else 1), 1, time.monotonic()
        while True:
            try:
                return await rpc(request, timeout=deadline, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                failure, wait = ClientError.from_rpc_error(error, attempt), self.retry.backoff(attempt - 1)
                late = failure.unreachable and time.monotonic() + wait - start > self.retry.unreachable_for
                if attempt >= attempts or failure.code not in RETRYABLE or late:
                    raise failure from error
            await asyncio.sleep(wait)
            attempt += 1

    def generate_stream(self, model: str, prompt: str | Sequence[int], sampling: pb.SamplingParams | None = None,
                        *, version: str = "", priority: int = 0, timeout: float | None = None) -> ServerStream:
        """The completion as it is produced (`GenerateStreamResponse`s; the last has `finish_reason` and
        `usage`). The call starts at once; its first read raises a refusal."""
        request = _prompt(pb.GenerateStreamRequest(model=model, version=version, sampling=sampling,
                                                   priority=priority), prompt)
        return self._stream("GenerateStream", request, timeout)

    def chat_stream(self, model: str, messages: Sequence[Message], sampling: pb.SamplingParams | None = None, *,
                    version: str = "", add_generation_prompt: bool = True, priority: int = 0,
                    timeout: float | None = None) -> ServerStream:
        """The reply to `messages` as it is produced (`ChatStreamResponse`s), as `generate_stream`."""
        request = pb.ChatStreamRequest(model=model, version=version, messages=chat_messages(messages),
                                       sampling=sampling, add_generation_prompt=add_generation_prompt,
                                       priority=priority)
        return self._stream("ChatStream", request, timeout)

    # Generation is never retried (expensive, and a sampled one differs each time); Embed is a pure
    # function of the request.
    async def generate(self, model: str, prompt: str | Sequence[int], sampling: pb.SamplingParams | None = None, *,
                       version: str = "", priority: int = 0, timeout: float | None = None) -> pb.GenerateResponse:
        request = _prompt(pb.GenerateRequest(model=model, version=version, sampling=sampling, priority=priority),
                          prompt)
        return await self._unary("Generate", request, timeout, GENERATE, False)

    async def chat(self, model: str, messages: Sequence[Message], sampling: pb.SamplingParams | None = None, *,
                   version: str = "", add_generation_prompt: bool = True, priority: int = 0,
                   timeout: float | None = None) -> pb.ChatResponse:
        request = pb.ChatRequest(model=model, version=version, messages=chat_messages(messages), sampling=sampling,
                                 add_generation_prompt=add_generation_prompt, priority=priority)
        return await self._unary("Chat", request, timeout, GENERATE, False)

    async def embed(self, model: str, texts: Sequence[str], *, version: str = "", truncate: bool = False,
                    priority: int = 0, timeout: float | None = None) -> pb.EmbedResponse:
        request = pb.EmbedRequest(model=model, version=version, texts=list(texts), truncate=truncate,
                                  priority=priority)
        return await self._unary("Embed", request, timeout, COMPUTE, True)

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
