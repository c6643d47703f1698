"""`create_app`: the OpenAI-compatible HTTP API over the inference service's gRPC calls. Routes only
translate (see `translate`); the gRPC calls block, so they run in worker threads."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from fastserve.client import ClientError, FastServeClient, InferenceClient
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.services.gateway import errors, translate
from fastserve.services.gateway.errors import GatewayError
from fastserve.services.gateway.middleware import GatewayMiddleware, Metrics
from fastserve.services.gateway.openai_schema import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

log = logging.getLogger(__name__)

_END = object()


class _Events(StreamingResponse):
    """Server-sent events whose source is always closed, however the response ends (a client that went
    away included), so that closing it cancels the gRPC call and the engine frees the slot."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _event(payload) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _relay(request: Request, stream: Iterator, first) -> AsyncIterator:
    """`first` then the rest of the gRPC `stream`, each `next` in a worker thread; the stream is closed
    at the end, on a disconnect, or on cancellation, which cancels the call."""
    try:
        item = first
        while item is not _END:
            yield item
            if await request.is_disconnected():
                log.info("client disconnected mid-stream; cancelling the generation")
                return
            item = await run_in_threadpool(next, stream, _END)
    finally:
        stream.close()


async def _open(stream: Iterator):
    """The stream's first message, fetched before the response starts so that a refused request is an
    HTTP error, not a broken stream."""
    try:
        return await run_in_threadpool(next, stream, _END)
    except BaseException:
        stream.close()
        raise


def create_app(client: FastServeClient | InferenceClient, auth_token: str = "") -> FastAPI:
    """The gateway over `client` (its inference service); with `auth_token`, every route but `/health`
    and the docs needs `Authorization: Bearer <auth_token>`."""
    inference = client.inference if isinstance(client, FastServeClient) else client
    started = translate.now()
    metrics = Metrics()
    # Threads for the prompts of one completion request, sent together so the engine batches them.
    pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="gateway-prompts")

    @asynccontextmanager
    async def lifespan(_app):
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="FastServe OpenAI-compatible API", version="1", lifespan=lifespan,
                  description="OpenAI's chat, completions, embeddings and models endpoints over FastServe.")
    errors.install(app)

    @app.get("/health", include_in_schema=False)
    async def health():
        if isinstance(client, FastServeClient):
            ok = await run_in_threadpool(client.health, "inference") == "SERVING"
        else:
            try:
                await run_in_threadpool(inference.list_models, True, timeout=2.0)
                ok = True
            except ClientError:
                ok = False
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
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages, sampling = translate.chat_call(body)
        if not body.stream:
            reply = await run_in_threadpool(inference.chat, body.model, messages, sampling)
            return translate.chat_completion(body.model, reply)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = inference.chat_stream(body.model, messages, sampling)
        first = await _open(stream)
        ident, created = translate.new_id("chatcmpl"), translate.now()

        async def events():
            try:
                async for event in chat_events():
                    yield event
            finally:
                stream.close()

        async def chat_events():
            yield _event(translate.chat_chunk(ident, created, body.model, {"role": "assistant", "content": ""},
                                              with_usage=include_usage))
            last = None
            async for part in _relay(request, stream, first):
                last = part
                if part.text:
                    yield _event(translate.chat_chunk(ident, created, body.model, {"content": part.text},
                                                      with_usage=include_usage))
            if last is None:
                return
            yield _event(translate.chat_chunk(ident, created, body.model, {},
                                              translate.finish_reason(last.finish_reason), include_usage))
            if include_usage:
                yield _event({"id": ident, "object": "chat.completion.chunk", "created": created,
                              "model": body.model, "choices": [],
                              "usage": translate.usage(last.usage.prompt_tokens, last.usage.completion_tokens)})
            yield "data: [DONE]\n\n"

        return _Events(events())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = translate.prompts(body)
        sampling = translate.sampling(body, body.max_tokens)
        if not body.stream:
            def run_all():
                futures = [pool.submit(inference.generate, body.model, p, sampling) for p in prompts]
                return [(p if isinstance(p, str) else "", f.result()) for p, f in zip(prompts, futures, strict=True)]
            return translate.completion(body.model, await run_in_threadpool(run_all), body.echo)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        ident, created = translate.new_id("cmpl"), translate.now()
        # Prompts stream one after another; the first is opened here so that a refusal is an HTTP error.
        stream = inference.generate_stream(body.model, prompts[0], sampling)
        first = await _open(stream)

        async def events():
            try:
                async for event in completion_events():
                    yield event
            finally:
                stream.close()

        async def completion_events():
            nonlocal stream, first
            prompt_tokens = completion_tokens = 0
            for index, prompt in enumerate(prompts):
                if index:
                    stream = inference.generate_stream(body.model, prompt, sampling)
                    try:
                        first = await _open(stream)
                    except ClientError as error:
                        failure = errors.from_client_error(error)
                        yield _event(errors.body(failure.message, failure.status, failure.param, failure.code))
                        return
                if body.echo:
                    yield _event(translate.completion_chunk(ident, created, body.model, index, prompt,
                                                            with_usage=include_usage))
                last = None
                async for part in _relay(request, stream, first):
                    last = part
                    if part.text:
                        yield _event(translate.completion_chunk(ident, created, body.model, index, part.text,
                                                                with_usage=include_usage))
                if last is None:
                    return
                yield _event(translate.completion_chunk(ident, created, body.model, index, "",
                                                        translate.finish_reason(last.finish_reason), include_usage))
                prompt_tokens += last.usage.prompt_tokens
                completion_tokens += last.usage.completion_tokens
            if include_usage:
                yield _event({"id": ident, "object": "text_completion", "created": created, "model": body.model,
                              "choices": [], "usage": translate.usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"

        return _Events(events())

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        texts = translate.embedding_texts(body.input)
        reply = await run_in_threadpool(inference.embed, body.model, texts)
        return translate.embeddings(body.model, reply, body.encoding_format, body.dimensions)

    return _wrap(app, auth_token, metrics)


def _wrap(app: FastAPI, auth_token: str, metrics: Metrics) -> FastAPI:
    app.add_middleware(GatewayMiddleware, auth_token=auth_token, metrics=metrics)
    return app
