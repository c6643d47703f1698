"""`create_app`: the OpenAI-compatible HTTP API over the inference service's gRPC calls. Routes only
translate (see `translate`); the gRPC calls block, so they run in worker threads."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from weakref import WeakKeyDictionary

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from fastserve.client import ClientError, FastServeClient, InferenceClient
from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.services.gateway import errors, kserve_rest, translate
from fastserve.services.gateway.errors import GatewayError
from fastserve.services.gateway.middleware import GatewayMiddleware, Metrics
from fastserve.services.gateway.openai_schema import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from fastserve.services.gateway.stream_reader import END, Failure, StreamReader, Throttle, coalesce

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


# The readers `_open` started, by stream, for `_relay` to take over (weak: a stream never relayed is dropped).
_readers: WeakKeyDictionary = WeakKeyDictionary()
DISCONNECT_CHECK_SECONDS = 0.1


async def _relay(request: Request, stream: Iterator, first) -> AsyncIterator:
    """`first` then the rest of the gRPC `stream`, in batches from the `StreamReader` that `_open`
    started (else each `next` in a worker thread); the stream is closed at the end, on a disconnect, or
    on cancellation, which cancels the call. A disconnect is looked for at most every
    DISCONNECT_CHECK_SECONDS: the check is dear, and Starlette cancels a response whose client left."""
    reader, disconnect_check = _readers.pop(stream, None), Throttle(DISCONNECT_CHECK_SECONDS)
    try:
        if first is _END:
            return
        yield first
        while True:
            if disconnect_check.due() and await request.is_disconnected():
                log.info("client disconnected mid-stream; cancelling the generation")
                return
            if reader is None:
                item = await run_in_threadpool(next, stream, _END)
                if item is _END:
                    return
                yield item
                continue
            for item in coalesce(await reader.batch()):
                if item is END:
                    return
                if isinstance(item, Failure):
                    item.raise_in(stream)
                yield item
    finally:
        stream.close()


async def _open(stream: Iterator):
    """The stream's first message, fetched before the response starts so that a refused request is an
    HTTP error, not a broken stream; then a `StreamReader` reads the rest for `_relay`."""
    try:
        first = await run_in_threadpool(next, stream, _END)
        if first is not _END:
            reader = StreamReader.attach(stream)
            if reader is not None:
                _readers[stream] = reader
        return first
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
    kserve_rest.install(app, inference)

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
        logprobs = bool(body.logprobs)
        if not body.stream:
            reply = await run_in_threadpool(inference.chat, body.model, messages, sampling)
            return translate.chat_completion(body.model, reply, logprobs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = inference.chat_stream(body.model, messages, sampling)
        first = await _open(stream)
        chunks = translate.ChatStream(body.model, translate.choices_per_prompt(body), logprobs, include_usage)

        async def events():
            try:
                async for event in chat_events():
                    yield event
            finally:
                stream.close()

        async def chat_events():
            for chunk in chunks.opening():
                yield _event(chunk)
            last = None
            async for part in _relay(request, stream, first):
                last = part
                for chunk in chunks.chunks(part):
                    yield _event(chunk)
            if last is None:
                return
            if include_usage:
                yield _event(chunks.usage_chunk(last))
            yield "data: [DONE]\n\n"

        return _Events(events())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts, sampling = translate.completion_call(body)
        n, logprobs = translate.choices_per_prompt(body), body.logprobs is not None
        if not body.stream:
            def run_all():
                futures = [pool.submit(inference.generate, body.model, p, sampling) for p in prompts]
                with translate.completion_errors():
                    return [(p if isinstance(p, str) else "", f.result())
                            for p, f in zip(prompts, futures, strict=True)]
            return translate.completion(body.model, await run_in_threadpool(run_all), body.echo, n, logprobs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = translate.CompletionStream(body.model, n, logprobs, include_usage, echo=body.echo)
        # Prompts stream one after another; the first is opened here so that a refusal is an HTTP error.
        stream = inference.generate_stream(body.model, prompts[0], sampling)
        with translate.completion_errors():
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
                        failure = translate.completion_failure(error)
                        yield _event(errors.body(failure.message, failure.status, failure.param, failure.code))
                        return
                for chunk in chunks.start(index, prompt):
                    yield _event(chunk)
                last = None
                async for part in _relay(request, stream, first):
                    last = part
                    for chunk in chunks.chunks(part):
                        yield _event(chunk)
                if last is None:
                    return
                prompt_tokens += last.usage.prompt_tokens
                completion_tokens += last.usage.completion_tokens
            if include_usage:
                yield _event({"id": chunks.ident, "object": "text_completion", "created": chunks.created,
                              "model": body.model, "choices": [],
                              "usage": translate.usage(prompt_tokens, completion_tokens)})
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
