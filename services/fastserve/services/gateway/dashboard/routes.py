"""`install(app, upstreams)`: the dashboard's routes. The page and its assets (`static/`) are open; the
JSON under `/ui/api/` is behind the gateway's token like every other route (see `middleware`). Each
route checks its input, runs a view of `views` in a worker thread and returns what it built; a job's
events stream from WatchJob over a grpc.aio channel (`watches`)."""

from __future__ import annotations

import json
import logging
import mimetypes
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from fastserve.client import ClientError
from fastserve.services.gateway import errors, request_ids
from fastserve.services.gateway.dashboard import views
from fastserve.services.gateway.dashboard.views import Upstreams
from fastserve.services.gateway.dashboard.watches import JobWatches
from fastserve.services.gateway.errors import GatewayError

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".svg": "image/svg+xml", ".json": "application/json", ".png": "image/png", ".ico": "image/x-icon",
          ".woff2": "font/woff2", ".map": "application/json"}
# The page runs only its own scripts (no inline ones) and talks only to this gateway.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
_HEADERS = {"cache-control": "no-cache", "x-content-type-options": "nosniff"}


def static_file(relative: str, root: Path = STATIC) -> Path:
    """The file `relative` names under `root`, or a 404: no `..`, absolute path or link leads outside it."""
    if "\x00" in relative or "\\" in relative:
        raise GatewayError(404, "no such dashboard file", None, "not_found")
    base = os.path.realpath(root)
    found = os.path.realpath(os.path.join(base, relative))
    if os.path.commonpath([base, found]) != base or not os.path.isfile(found):
        raise GatewayError(404, "no such dashboard file", None, "not_found")
    return Path(found)


def _file(path: Path, **headers: str) -> FileResponse:
    media = _TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media, headers={**_HEADERS, **headers})


class _Events(StreamingResponse):
    """Server-sent events whose source is closed however the response ends (as the OpenAI routes'
    stream), so that a client that goes away cancels the gRPC watch."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def sse(payload, *, event: str = "", ident: str = "") -> str:
    head = (f"event: {event}\n" if event else "") + (f"id: {ident}\n" if ident else "")
    return f"{head}data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def install(app: FastAPI, upstreams: Upstreams) -> None:
    """Add `/ui` (the page), `/ui/static/...` (its assets) and `/ui/api/...` (its JSON) to `app`."""
    client = upstreams.client
    watches = JobWatches(client, metadata=request_ids.call_metadata)
    outer = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application):
        # The watch channels belong to the app's loop: closed when it stops, after the app's own.
        try:
            async with outer(application) as state:
                yield state
        finally:
            await watches.close()

    app.router.lifespan_context = lifespan

    @app.get("/ui", include_in_schema=False)
    @app.get("/ui/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if not page.is_file():
            raise GatewayError(500, f"the dashboard is not installed: {page} is missing", None, "not_installed")
        return _file(page, **{"content-security-policy": _CSP})

    @app.get("/ui/static/{path:path}", include_in_schema=False)
    async def asset(path: str):
        return _file(static_file(path))

    @app.get("/ui/api/services", include_in_schema=False)
    async def services():
        return await run_in_threadpool(views.services, client)

    @app.get("/ui/api/jobs", include_in_schema=False)
    async def jobs(state: str | None = None, kind: str | None = None):
        return await run_in_threadpool(views.jobs, client, state, kind)

    @app.get("/ui/api/jobs/optimization/{job_id}/report", include_in_schema=False)
    async def report(job_id: str):
        return await run_in_threadpool(views.report, client, job_id)

    @app.get("/ui/api/jobs/{service}/{job_id}", include_in_schema=False)
    async def job(service: str, job_id: str):
        return await run_in_threadpool(views.job, client, service, job_id)

    @app.post("/ui/api/jobs/{service}/{job_id}/cancel", include_in_schema=False)
    async def cancel(service: str, job_id: str):
        return await run_in_threadpool(views.cancel, client, service, job_id)

    @app.get("/ui/api/jobs/{service}/{job_id}/events", include_in_schema=False)
    async def events(service: str, job_id: str, after: str | None = None):
        after = views.check_after(after)
        # The job is looked up first, so that an unknown one is a 404 rather than a broken stream.
        await run_in_threadpool(views.job, client, service, job_id)
        return _Events(_job_events(service, job_id, after))

    async def _job_events(service: str, job_id: str, after: str) -> AsyncIterator[str]:
        """The job's events, history first, then `end` with the job once it is over. The watch opens
        here, on the stream's first read, so that a response that never starts leaves no call open."""
        stream, ended = watches.watch(service, job_id, after), False
        try:
            async for reply in stream:
                yield sse(views.event_json(reply.event), ident=reply.event.event_id)
            ended = True
        except ClientError as error:
            ended = True
            failed = views.failure(client, service, error)
            yield sse(errors.body(failed.message, failed.status, failed.param, failed.code), event="error")
            return
        finally:
            # Cancelled while waiting for an event, or closed at a `yield`: either way the client left.
            if not ended:
                log.info("the watch of job %s was cancelled (the client went away?)", job_id)
            stream.cancel()
        try:
            final = await run_in_threadpool(views.job, client, service, job_id)
        except GatewayError as error:
            yield sse(errors.body(error.message, error.status, error.param, error.code), event="error")
            return
        yield sse(final, event="end")

    @app.get("/ui/api/models", include_in_schema=False)
    async def models():
        return await run_in_threadpool(views.models, upstreams)

    @app.post("/ui/api/models/load", include_in_schema=False)
    async def load(request: Request):
        return await run_in_threadpool(views.load_model, client, await _json(request))

    @app.post("/ui/api/models/unload", include_in_schema=False)
    async def unload(request: Request):
        return await run_in_threadpool(views.unload_model, client, await _json(request))

    @app.get("/ui/api/artifacts", include_in_schema=False)
    async def artifacts(kind: str | None = None):
        return await run_in_threadpool(views.artifacts, client, kind)

    @app.get("/ui/api/artifacts/lineage", include_in_schema=False)
    async def lineage(uri: str | None = None):
        return await run_in_threadpool(views.lineage, client, uri)


async def _json(request: Request):
    try:
        return json.loads(await request.body() or b"null")
    except ValueError:
        raise GatewayError(400, "the request body is not valid JSON", None, "invalid_value") from None
