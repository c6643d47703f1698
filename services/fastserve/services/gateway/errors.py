"""The one mapping of failures to OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import re

import grpc
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from fastserve.client import ClientError

RETRY_AFTER_SECONDS = 1

# gRPC request fields (as the inference service names them) back to the OpenAI names.
_FIELDS = {"sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.seed": "seed",
           "sampling.max_new_tokens": "max_tokens", "sampling.stop_sequences": "stop", "text": "prompt",
           "token_ids": "prompt", "texts": "input", "model": "model", "messages": "messages",
           "sampling.presence_penalty": "presence_penalty", "sampling.frequency_penalty": "frequency_penalty",
           "sampling.logprobs": "logprobs", "sampling.top_logprobs": "top_logprobs", "sampling.n": "n",
           "sampling.response_format": "response_format", "sampling.response_format.type": "response_format.type",
           "sampling.response_format.json_schema": "response_format"}
_INDEX = re.compile(r"\[\d+\]")
# The tags pydantic puts in a location for the branch of a union that failed.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "is-instance"})

_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
           grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.NOT_FOUND: 404,
           grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
           grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNAUTHENTICATED: 502,
           grpc.StatusCode.PERMISSION_DENIED: 502, grpc.StatusCode.CANCELLED: 499}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
          504: "timeout"}


class GatewayError(Exception):
    """A request the gateway refuses itself: `status`, `message`, the OpenAI `param` and `code`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def unsupported(param: str, what: str = "") -> GatewayError:
    return GatewayError(400, f"{what or param} is not supported yet by this server", param, "unsupported_parameter")


def openai_param(field: str) -> str:
    """`sampling.temperature` → `temperature`; `messages[2].content` → `messages[2].content` (same name)."""
    if field in _FIELDS:
        return _FIELDS[field]
    return _FIELDS.get(_INDEX.sub("", field), field)


def body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": param, "code": code}}


def kserve_path(path: str) -> bool:
    """A KServe v2 REST route (`kserve_rest`), whose errors are that protocol's `{"error": "<message>"}`."""
    return path == "/v2" or path.startswith("/v2/")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body(message, status, param, code), status, headers=headers)


def from_client_error(error: ClientError) -> GatewayError:
    status = _STATUS.get(error.code, 500)
    field = error.fields[0] if error.fields else None
    param = openai_param(field) if field else None
    code = None
    if status == 404 and (param in (None, "model")):
        param, code = "model", "model_not_found"
    elif status == 429:
        code = "rate_limit_exceeded"
    elif status == 503 and error.unreachable:
        # The gateway's own backend is down: say so without the gRPC address.
        return GatewayError(503, "the inference service is unreachable", None, "service_unavailable")
    elif status >= 500:
        code = error.code.name.lower()
    return GatewayError(status, error.message, param, code)


def _loc_param(loc: tuple) -> str | None:
    parts = [p for p in loc if p != "body"]
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif "[" in str(part) or "-" in str(part) or part in _TYPE_TAGS:
            continue  # pydantic's union branch tags (`str`, `list[str]`, `function-after[...]`)
        else:
            text += ("." if text else "") + str(part)
    return text or None


def install(app) -> None:
    """Every failure leaves as OpenAI's JSON: never FastAPI's default 422 nor its `{"detail": ...}`."""

    @app.exception_handler(GatewayError)
    async def _gateway(request, exc: GatewayError):
        return _response(exc)

    @app.exception_handler(ClientError)
    async def _client(request, exc: ClientError):
        return _response(from_client_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        # Of a union's branches, the deepest failure names the field best (`stop[0]`, not `stop`).
        found = exc.errors()
        first = max(found, key=lambda e: sum(isinstance(p, int) for p in e.get("loc", ()))) if found else {}
        param = _loc_param(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif param:
            message = f"{param}: {message}"
        return error_response(400, message, param, "invalid_value" if param else None)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        if kserve_path(request.url.path):
            return JSONResponse({"error": str(exc.detail)}, exc.status_code)
        code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), None, code)


def _response(error: GatewayError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.status == 429 else None
    return error_response(error.status, error.message, error.param, error.code, headers)
