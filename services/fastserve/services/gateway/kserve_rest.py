"""KServe v2 REST (the Open Inference Protocol's HTTP half, as Triton serves it) on the gateway's port.

Each route is one call of the inference service's `inference.GRPCInferenceService` (its KServe v2 gRPC
servicer) through the gateway's client channel, translated by `kserve_codec`; so what the gRPC side
serves (models, datatypes, parameters, errors) is what REST serves, and tritonclient's HTTP client works
as its gRPC client does. Errors are KServe's `{"error": "<message>"}` with the HTTP status of the gRPC
code (`kserve_codec.STATUS`); the middleware and `errors` keep that shape for every /v2 path.
"""

from __future__ import annotations

import zlib

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from fastserve.client import ClientError, InferenceClient
from fastserve.kserve.v2 import grpc_service_pb2 as kpb
from fastserve.services.gateway import kserve_codec as codec
from fastserve.services.gateway.errors import RETRY_AFTER_SECONDS
from fastserve.services.gateway.kserve_codec import HEADER_LENGTH, MAX_BODY_BYTES, KServeError

# Deadlines of the gRPC calls, in seconds: probes answer fast or count as down; an infer may be a
# whole generation.
PROBE, READ, INFER, LOAD = 2.0, 10.0, 300.0, 600.0
MODEL_ROUTES = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")


def error_response(error: KServeError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.status == 429 else None
    return JSONResponse({"error": error.message}, error.status, headers=headers)


def from_client_error(error: ClientError) -> KServeError:
    if error.unreachable:
        # The gateway's own backend is down: say so without its gRPC address.
        return KServeError(503, "the inference service is unreachable")
    message = f"{error.fields[0]}: {error.message}" if error.fields else error.message
    return KServeError(codec.http_status(error.code), message)


def _call(inference: InferenceClient, method: str, request, timeout: float, idempotent: bool = True):
    try:
        return inference.kserve_call(method, request, timeout=timeout, idempotent=idempotent)
    except ClientError as error:
        raise from_client_error(error) from error


def decompress(body: bytes, encoding: str | None, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body of a `Content-Encoding: gzip` or `deflate` request (tritonclient's request compression),
    inflated at most to `limit` bytes so that a small bomb cannot fill the memory."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise KServeError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)")
    inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise KServeError(400, f"the body is not valid {encoding} data") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise KServeError(413, f"the inflated request body is over {limit} bytes")
    return out


def _model(request: Request) -> tuple[str, str]:
    return request.path_params["name"], request.path_params.get("version", "")


def install(app: FastAPI, inference: InferenceClient) -> None:
    """The /v2 routes of `app`, calling the inference service through `inference`'s channel."""

    @app.exception_handler(KServeError)
    async def _refused(request, exc: KServeError):
        return error_response(exc)

    async def call(method: str, message, timeout: float, idempotent: bool = True):
        return await run_in_threadpool(_call, inference, method, message, timeout, idempotent)

    @app.get("/v2/health/live", tags=["kserve"])
    async def server_live():
        live = (await call("ServerLive", kpb.ServerLiveRequest(), PROBE)).live
        return JSONResponse({"live": live}, 200 if live else 400)

    @app.get("/v2/health/ready", tags=["kserve"])
    async def server_ready():
        ready = (await call("ServerReady", kpb.ServerReadyRequest(), PROBE)).ready
        return JSONResponse({"ready": ready}, 200 if ready else 400)

    @app.get("/v2", tags=["kserve"])
    async def server_metadata():
        reply = await call("ServerMetadata", kpb.ServerMetadataRequest(), READ)
        return {"name": reply.name, "version": reply.version, "extensions": list(reply.extensions)}

    async def model_metadata(request: Request):
        name, version = _model(request)
        reply = await call("ModelMetadata", kpb.ModelMetadataRequest(name=name, version=version), READ)
        return codec.model_metadata(reply)

    async def model_config(request: Request):
        name, version = _model(request)
        reply = await call("ModelMetadata", kpb.ModelMetadataRequest(name=name, version=version), READ)
        return codec.model_config(reply)

    async def model_ready(request: Request):
        name, version = _model(request)
        ready = (await call("ModelReady", kpb.ModelReadyRequest(name=name, version=version), PROBE)).ready
        return JSONResponse({"name": name, "ready": ready}, 200 if ready else 400)

    async def infer(request: Request):
        name, version = _model(request)
        body, encoding = await request.body(), request.headers.get("content-encoding")
        header_length = request.headers.get(HEADER_LENGTH)

        def run() -> tuple[bytes, int | None]:
            parsed = codec.parse_infer(decompress(body, encoding), header_length, name, version)
            # Not idempotent: a generation is expensive, and a sampled one differs each time.
            return codec.render_infer(_call(inference, "ModelInfer", parsed.request, INFER, False), parsed)

        content, json_size = await run_in_threadpool(run)
        if json_size is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_size)})

    for route in MODEL_ROUTES:
        app.add_api_route(route, model_metadata, methods=["GET"], tags=["kserve"])
        app.add_api_route(f"{route}/config", model_config, methods=["GET"], tags=["kserve"])
        app.add_api_route(f"{route}/ready", model_ready, methods=["GET"], tags=["kserve"])
        app.add_api_route(f"{route}/infer", infer, methods=["POST"], tags=["kserve"])

    @app.post("/v2/repository/index", tags=["kserve"])
    async def repository_index(request: Request):
        body = codec.json_object(await request.body())
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise codec.bad("ready", "must be true or false")
        reply = await call("RepositoryIndex", kpb.RepositoryIndexRequest(ready=ready), READ)
        return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in reply.models]

    @app.post("/v2/repository/models/{name}/load", tags=["kserve"])
    async def repository_load(name: str, request: Request):
        body = codec.json_object(await request.body())
        message = kpb.RepositoryModelLoadRequest(model_name=name)
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise codec.bad("parameters", "must be an object")
        for key, value in parameters.items():
            message.parameters[key].CopyFrom(codec.repository_parameter(value, f"parameters.{key}"))
        await call("RepositoryModelLoad", message, LOAD, False)
        return Response(b"", media_type="application/json")

    @app.post("/v2/repository/models/{name}/unload", tags=["kserve"])
    async def repository_unload(name: str, request: Request):
        codec.json_object(await request.body())
        await call("RepositoryModelUnload", kpb.RepositoryModelUnloadRequest(model_name=name), LOAD, False)
        return Response(b"", media_type="application/json")

