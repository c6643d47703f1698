"""The gateway's ASGI middleware: request ids, the bearer token, the body-size cap and the metrics.

Pure ASGI rather than Starlette's BaseHTTPMiddleware, which buffers and detaches streamed responses
(a disconnect would then not reach the stream that must cancel its gRPC call)."""

from __future__ import annotations

import hmac
import json
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException

from fastserve.runtime import logs
from fastserve.services.gateway.errors import body, kserve_path
from fastserve.services.gateway.kserve_codec import MAX_BODY_BYTES as KSERVE_MAX_BODY_BYTES

MAX_BODY_BYTES = 4 << 20  # /v2 (KServe) requests carry whole tensors: KSERVE_MAX_BODY_BYTES
# The dashboard's page and assets hold no data and must load to ask for the token; its /ui/api/ is not open.
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/ui", "/ui/"})
OPEN_PREFIXES = ("/ui/static/",)


class Metrics:
    """Requests by route and status and their latency, in a registry of this app's own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fastserve_gateway_requests", "HTTP requests by route and status.",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("fastserve_gateway_request_seconds",
                                 "Seconds from a request's arrival to the end of its response, by route.",
                                 ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))


class GatewayMiddleware:
    def __init__(self, app, auth_token: str, metrics: Metrics, max_body: int = MAX_BODY_BYTES) -> None:
        self.app, self.token, self.metrics, self.max_body = app, auth_token.encode(), metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        token = logs.request_id.set(rid)
        start, status = time.monotonic(), [500]

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        kserve = kserve_path(scope["path"])
        limit = KSERVE_MAX_BODY_BYTES if kserve else self.max_body
        try:
            refusal = self._refusal(scope, headers, limit)
            if refusal:
                await _reply(send_tagged, *refusal, kserve=kserve)
                return
            await self.app(scope, self._capped(receive, limit), send_tagged)
        except _TooLarge:
            await _reply(send_tagged, 413, f"the request body is over {limit} bytes", None,
                         "request_too_large", kserve=kserve)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - start)
            logs.request_id.reset(token)

    def _refusal(self, scope, headers, limit: int) -> tuple | None:
        path = scope["path"]
        if self.token and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            given = headers.get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
                return (401, "missing or invalid bearer token (Authorization: Bearer <token>)", None,
                        "invalid_api_key", {"www-authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return 413, f"the request body is over {limit} bytes", None, "request_too_large"
        return None

    def _capped(self, receive, limit: int):
        seen = [0]

        async def capped():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise _TooLarge(limit)
            return message
        return capped


class _TooLarge(HTTPException):
    """Raised from `receive`: FastAPI passes an HTTPException from the body read on to its handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over {limit} bytes")


async def _reply(send, status: int, message: str, param, code, headers: dict[str, str] | None = None, *,
                 kserve: bool = False) -> None:
    # KServe v2 clients read `{"error": "<message>"}`, not OpenAI's object.
    payload = json.dumps({"error": message} if kserve else body(message, status, param, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
