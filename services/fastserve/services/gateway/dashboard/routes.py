"""`install(app, upstreams)`: the dashboard's routes. The page and its assets (`static/`) are open; the
JSON under `/ui/api/` is behind the gateway's token like every other route (see `middleware`). Each
route checks its input, runs a view of `views` in a worker thread and returns what it built; a job's
events stream from WatchJob over a grpc.aio channel (`watches`)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from fastserve.client import ClientError
from fastserve.services.gateway import errors, request_ids
from fastserve.services.gateway.dashboard import views
from fastserve.services.gateway.dashboard.views import Upstreams
from fastserve.services.gateway.dashboard.watches import JobWatches
from fastserve.services.gateway.errors import GatewayError
from fastserve.services.gateway.sse import EventStream, event

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
_HEADERS = {"cache-control": "no-cache", "x-content-type-options": "nosniff"}
# The page runs only its own scripts (no inline ones) and talks only to this gateway.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class _Assets(StaticFiles):
    """Starlette's static files (paths confined to the folder, types by extension), never cached stale
    after an upgrade and never sniffed as another type."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(_HEADERS)
        return response


def install(app: FastAPI, upstreams: Upstreams) -> JobWatches:
    """Add `/ui` (the page), `/ui/static/...` (its assets) and `/ui/api/...` (its JSON) to `app`; the job
    watches' channels, for the app to close when it stops (they belong to its loop)."""
    client = upstreams.client
    watches = JobWatches(client, metadata=request_ids.call_metadata)

    @app.get("/ui", include_in_schema=False)
    @app.get("/ui/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if not page.is_file():
            raise GatewayError(500, f"the dashboard is not installed: {page} is missing", None, "not_installed")
        return FileResponse(page, media_type="text/html; charset=utf-8",
                            headers={**_HEADERS, "content-security-policy": _CSP})

    app.mount("/ui/static", _Assets(directory=STATIC), name="dashboard-assets")

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
        return EventStream(_job_events(service, job_id, after))

    async def _job_events(service: str, job_id: str, after: str) -> AsyncIterator[str]:
        """The job's events, history first, then `end` with the job once it is over. The watch opens
        here, on the stream's first read, so that a response that never starts leaves no call open."""
        stream, ended = watches.watch(service, job_id, after), False
        try:
            async for reply in stream:
                yield event(views.event_json(reply.event), ident=reply.event.event_id)
            ended = True
        except ClientError as error:
            ended = True
            failed = views.failure(client, service, error)
            yield event(errors.body(failed.message, failed.status, failed.param, failed.code), name="error")
            return
        finally:
            # Cancelled while waiting for an event, or closed at a `yield`: either way the client left.
            if not ended:
                log.info("the watch of job %s was cancelled (the client went away?)", job_id)
            stream.cancel()
        try:
            final = await run_in_threadpool(views.job, client, service, job_id)
        except GatewayError as error:
            yield event(errors.body(error.message, error.status, error.param, error.code), name="error")
            return
        yield event(final, name="end")

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

    return watches


async def _json(request: Request):
    try:
        return json.loads(await request.body() or b"null")
    except ValueError:
        raise GatewayError(400, "the request body is not valid JSON", None, "invalid_value") from None
