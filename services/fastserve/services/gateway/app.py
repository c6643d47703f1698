"""`create_app`: the OpenAI-compatible HTTP API over the inference service's gRPC calls. Routes only
translate (see `translate`). Generation and embedding go over a grpc.aio channel (`AsyncInferenceClient`),
read by the event loop itself: a streamed completion is one gRPC message per token, and a worker thread
per message (or per stream) costs the engine CPU on a small machine. The model listings, the health
check and the KServe routes use the blocking client in worker threads."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from fastserve.client import ClientError, FastServeClient
from fastserve.client.aio import AsyncInferenceClient, ServerStream
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.services.gateway import dashboard, errors, kserve_rest, request_ids, translate
from fastserve.services.gateway.errors import GatewayError
from fastserve.services.gateway.middleware import GatewayMiddleware, Metrics
from fastserve.services.gateway.openai_schema import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from fastserve.services.gateway.sse import EventStream, event

log = logging.getLogger(__name__)

_END = object()


async def _relay(stream: ServerStream, first) -> AsyncIterator:
    """`first` then the rest of the gRPC `stream`; the call is cancelled however this ends. A client that
    goes away is noticed by Starlette (it listens for the disconnect while the response streams), which
    cancels the response's task: the pending read raises CancelledError and grpc.aio cancels the call."""
    try:
        if first is _END:
            return
        yield first
        async for item in stream:
            yield item
    except asyncio.CancelledError:
        log.info("response cancelled mid-stream (the client went away?); cancelling the generation")
        raise
    finally:
        stream.cancel()


async def _open(stream: ServerStream):
    """The stream's first message (or `_END`), read before the response starts so that a refused request
    is an HTTP error, not a broken stream."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END
    except BaseException:
        stream.cancel()
        raise


async def _all(calls: list[Awaitable]) -> list:
    """The replies of `calls` run together (so that the engine batches them); when one fails, or the
    request is cancelled, the others are cancelled too, and the first failure is raised."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def create_app(client: FastServeClient, auth_token: str = "", inference_metrics_url: str = "") -> FastAPI:
    """The gateway over `client` (its inference service); with `auth_token`, every route but `/health`,
    the docs and the dashboard's page needs `Authorization: Bearer <auth_token>`. The generation calls go
    over an async client of the same server and credentials, made when the app starts (a grpc.aio channel
    belongs to its loop). The dashboard (`/ui`) reads the job services of `client` too, and the inference
    service's Prometheus text at `inference_metrics_url` (empty: none)."""
    inference = client.inference
    started = translate.now()
    metrics = Metrics()
    calls: AsyncInferenceClient | None = None

    @asynccontextmanager
    async def lifespan(_app):
        nonlocal calls
        # The HTTP request's id (`logs.request_id`) goes on every call, as the blocking channel's interceptor does.
        calls = AsyncInferenceClient.from_client(client, metadata=request_ids.call_metadata)
        try:
            yield
        finally:
            await calls.close()
            await watches.close()

    app = FastAPI(title="FastServe OpenAI-compatible API", version="1", lifespan=lifespan,
                  description="OpenAI's chat, completions, embeddings and models endpoints over FastServe.")
    errors.install(app)
    kserve_rest.install(app, inference)
    watches = dashboard.install(app, dashboard.Upstreams(client, dashboard.MetricsScraper(inference_metrics_url)))

    @app.get("/health", include_in_schema=False)
    async def health():
        ok = await run_in_threadpool(client.health, "inference") == "SERVING"
        return JSONResponse({"status": "ok" if ok else "inference service unavailable"}, 200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "fastserve"}

    def served() -> list[str]:
        names = [m.name for m in inference.list_models(ready_only=True) if m.state == pb.MODEL_STATE_READY]
        return list(dict.fromkeys(names))

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(n) for n in await run_in_threadpool(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in await run_in_threadpool(served):
            raise GatewayError(404, f"the model {model_id!r} does not exist or is not ready", "model",
                               "model_not_found")
        return model_card(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        messages, sampling = translate.chat_call(body)
        logprobs = bool(body.logprobs)
        if not body.stream:
            reply = await calls.chat(body.model, messages, sampling)
            return translate.chat_completion(body.model, reply, logprobs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = calls.chat_stream(body.model, messages, sampling)
        first = await _open(stream)
        chunks = translate.ChatStream(body.model, translate.choices_per_prompt(body), logprobs, include_usage)

        async def events():
            try:
                async for message in chat_events():
                    yield message
            finally:
                stream.cancel()

        async def chat_events():
            for chunk in chunks.opening():
                yield event(chunk)
            last = None
            async for part in _relay(stream, first):
                last = part
                for chunk in chunks.chunks(part):
                    yield event(chunk)
            if last is None:
                return
            if include_usage:
                yield event(chunks.usage_chunk(last))
            yield "data: [DONE]\n\n"

        return EventStream(events())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts, sampling = translate.completion_call(body)
        n, logprobs = translate.choices_per_prompt(body), body.logprobs is not None
        if not body.stream:
            with translate.completion_errors():
                replies = await _all([calls.generate(body.model, p, sampling) for p in prompts])
            pairs = [(p if isinstance(p, str) else "", r) for p, r in zip(prompts, replies, strict=True)]
            return translate.completion(body.model, pairs, body.echo, n, logprobs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = translate.CompletionStream(body.model, n, logprobs, include_usage, echo=body.echo)
        # Prompts stream one after another; the first is opened here so that a refusal is an HTTP error.
        stream = calls.generate_stream(body.model, prompts[0], sampling)
        with translate.completion_errors():
            first = await _open(stream)

        async def events():
            try:
                async for message in completion_events():
                    yield message
            finally:
                stream.cancel()

        async def completion_events():
            nonlocal stream, first
            prompt_tokens = completion_tokens = 0
            for index, prompt in enumerate(prompts):
                if index:
                    stream = calls.generate_stream(body.model, prompt, sampling)
                    try:
                        first = await _open(stream)
                    except ClientError as error:
                        failure = translate.completion_failure(error)
                        yield event(errors.body(failure.message, failure.status, failure.param, failure.code))
                        return
                for chunk in chunks.start(index, prompt):
                    yield event(chunk)
                last = None
                async for part in _relay(stream, first):
                    last = part
                    for chunk in chunks.chunks(part):
                        yield event(chunk)
                if last is None:
                    return
                prompt_tokens += last.usage.prompt_tokens
                completion_tokens += last.usage.completion_tokens
            if include_usage:
                yield event({"id": chunks.ident, "object": "text_completion", "created": chunks.created,
                              "model": body.model, "choices": [],
                              "usage": translate.usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"

        return EventStream(events())

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        texts = translate.embedding_texts(body.input)
        reply = await calls.embed(body.model, texts)
        return translate.embeddings(body.model, reply, body.encoding_format, body.dimensions)

    return _wrap(app, auth_token, metrics)


def _wrap(app: FastAPI, auth_token: str, metrics: Metrics) -> FastAPI:
    app.add_middleware(GatewayMiddleware, auth_token=auth_token, metrics=metrics)
    return app
