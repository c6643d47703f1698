"""The dashboard's JSON: what `/ui/api/` answers, built from the services' gRPC replies. Blocking calls
of the `FastServeClient` (the routes run them in worker threads) and plain dicts out; no HTTP here but
the `GatewayError`s that say which field or service is at fault (see `errors.py` for their statuses)."""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format

from fastserve.client import ClientError, FastServeClient
from fastserve.client.jobs import state_name
from fastserve.client.optimization import QUALITY_HIGHER_IS_BETTER
from fastserve.common.v1 import jobs_pb2
from fastserve.inference.v1 import inference_pb2 as ipb
from fastserve.services.gateway.dashboard import metrics_scrape as m
from fastserve.services.gateway.errors import GatewayError, from_client_error
from fastserve.storage.artifacts import parse_uri

JOB_SERVICES = ("preprocessing", "training", "optimization")
SERVICES = (*JOB_SERVICES, "inference")
STATES = tuple(state_name(v) for v in jobs_pb2.JobState.values() if v != jobs_pb2.JOB_STATE_UNSPECIFIED)
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
ARTIFACT_KINDS = ("corpora", "datasets", "tokenizers", "checkpoints", "models", "reports")
MAX_NAME, MAX_URI, MAX_JOB_ID, MAX_EVENT_ID = 256, 1024, 128, 64
_JOB_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_EVENT_ID_CHARS = frozenset("0123456789-")
LIST_TIMEOUT = 5.0  # a listing polled every few seconds: a hung service shows as an error, not a hung page
PAGE_SIZE = 100  # jobs per service in one listing
MAX_ARTIFACTS = 2000
FIGURES = ("requests_per_second", "tokens_per_second", "queue_by_level", "batch_occupancy", "latency_p50_ms",
           "latency_p99_ms", "ttft_p50_ms", "ttft_p99_ms")


@dataclass(frozen=True)
class Upstreams:
    """What the dashboard reads: the services (a blocking client) and the inference service's metrics."""

    client: FastServeClient
    metrics: m.MetricsScraper


# -- checks ----------------------------------------------------------------------------------------


def bad(param: str, message: str) -> GatewayError:
    return GatewayError(400, message, param, "invalid_value")


def check_service(service: str, allowed: tuple[str, ...] = JOB_SERVICES) -> str:
    if service not in allowed:
        raise bad("service", f"service must be one of {', '.join(allowed)}, not {service[:64]!r}")
    return service


def check_job_id(job_id: str) -> str:
    # A set test per character: no pattern to backtrack on, whatever the input.
    if not job_id or len(job_id) > MAX_JOB_ID or not _JOB_ID_CHARS.issuperset(job_id):
        raise bad("job_id", f"job_id must be 1 to {MAX_JOB_ID} letters, digits, '.', '_' or '-'")
    return job_id


def check_after(after: str | None) -> str:
    if after and (len(after) > MAX_EVENT_ID or not _EVENT_ID_CHARS.issuperset(after)):
        raise bad("after", f"after must be an event id (digits and '-', at most {MAX_EVENT_ID})")
    return after or ""


def _choice(param: str, value: str | None, allowed: tuple[str, ...]) -> str:
    if value and value not in allowed:
        raise bad(param, f"{param} must be one of {', '.join(allowed)}, not {value[:64]!r}")
    return value or ""


def _text(body: Mapping[str, Any], field: str, limit: int, required: bool = True) -> str:
    value = body.get(field)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise bad(field, f"{field} is required: a non-empty string" if required else f"{field} must be a string")
    if len(value) > limit:
        raise bad(field, f"{field} is over {limit} characters")
    return value


# -- failures ---------------------------------------------------------------------------------------


def unavailable(client: FastServeClient, service: str, error: ClientError) -> str:
    return f"{service} service unavailable at {error.address or client.targets[service]}"


def failure(client: FastServeClient, service: str, error: ClientError) -> GatewayError:
    """A failed call as the dashboard's error: a down service named with its address, a missing job or
    artifact as a plain 404 (not the OpenAI routes' `model_not_found`), the rest as the gateway maps them."""
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return GatewayError(503, unavailable(client, service, error), None, "service_unavailable")
    if error.code == grpc.StatusCode.NOT_FOUND:
        return GatewayError(404, error.message, None, "not_found")
    mapped = from_client_error(error)
    if mapped.param == "after_event_id":
        mapped.param = "after"
    return mapped


def _call(client: FastServeClient, service: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ClientError as error:
        raise failure(client, service, error) from None


def _each(call: Callable[[str], Any], items: tuple[str, ...]) -> list[Any]:
    """`call` on each item in threads of its own (each with this thread's context: the request id)."""
    with ThreadPoolExecutor(len(items)) as pool:
        futures = [pool.submit(contextvars.copy_context().run, call, item) for item in items]
        return [f.result() for f in futures]


# -- shapes -----------------------------------------------------------------------------------------


def iso(stamp) -> str | None:
    return stamp.ToJsonString() if stamp.seconds or stamp.nanos else None


def struct(message) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def job_json(job: jobs_pb2.Job, service: str = "") -> dict[str, Any]:
    return {"service": job.service or service, "job_id": job.job_id, "job_type": job.job_type,
            "state": state_name(job.state), "progress": job.progress,
            "message": job.message, "error": job.error, "cancel_requested": job.cancel_requested,
            "create_time": iso(job.create_time), "update_time": iso(job.update_time),
            "start_time": iso(job.start_time), "end_time": iso(job.end_time),
            "params": struct(job.params), "result": struct(job.result)}


def event_json(event: jobs_pb2.JobEvent) -> dict[str, Any]:
    return {"type": jobs_pb2.JobEventType.Name(event.type).removeprefix("JOB_EVENT_TYPE_"),
            "state": state_name(event.state), "progress": event.progress,
            "message": event.message, "data": struct(event.data), "time": iso(event.time)}


# -- services and jobs ------------------------------------------------------------------------------


def services(client: FastServeClient) -> dict[str, Any]:
    def status(service: str) -> dict[str, str]:
        found = client.health(service)
        return {"name": service, "status": found if found in ("SERVING", "UNREACHABLE") else "NOT_SERVING"}
    return {"services": _each(status, SERVICES)}


def jobs(client: FastServeClient, state: str | None = None, kind: str | None = None) -> dict[str, Any]:
    """Every job of the job services (or of `kind`), newest first; a service that fails is in `errors`."""
    state, kind = _choice("state", state, STATES), _choice("kind", kind, JOB_SERVICES)
    states = [jobs_pb2.JobState.Value(f"JOB_STATE_{state}")] if state else []

    def listing(service: str) -> tuple[list[jobs_pb2.Job], dict[str, str] | None]:
        try:
            page = getattr(client, service).list_jobs(states=states, page_size=PAGE_SIZE, timeout=LIST_TIMEOUT)
            return list(page.jobs), None
        except ClientError as error:
            message = unavailable(client, service, error) if error.code == grpc.StatusCode.UNAVAILABLE \
                else f"{service}: {error.message}"
            return [], {"service": service, "message": message}

    found, errors = [], []
    for listed, error in _each(listing, (kind,) if kind else JOB_SERVICES):
        found += listed
        if error:
            errors.append(error)
    found.sort(key=lambda j: j.create_time.ToNanoseconds(), reverse=True)
    return {"jobs": [job_json(j) for j in found], "errors": errors}


def job(client: FastServeClient, service: str, job_id: str) -> dict[str, Any]:
    service, job_id = check_service(service), check_job_id(job_id)
    return job_json(_call(client, service, lambda: getattr(client, service).get_job(job_id)), service)


def cancel(client: FastServeClient, service: str, job_id: str) -> dict[str, Any]:
    service, job_id = check_service(service), check_job_id(job_id)
    reason = "cancelled from the dashboard"
    return job_json(_call(client, service, lambda: getattr(client, service).cancel_job(job_id, reason)), service)


def report(client: FastServeClient, job_id: str) -> dict[str, Any]:
    """The optimization job's before/after measurements as table rows; 404 while it has none."""
    job_id = check_job_id(job_id)
    try:
        found = client.optimization.get_report(job_id)
    except ClientError as error:
        if error.code == grpc.StatusCode.FAILED_PRECONDITION:  # the job has not succeeded (yet)
            raise GatewayError(404, error.message, None, "not_found") from None
        raise failure(client, "optimization", error) from None
    before, after = found.before, found.after
    quality = before.quality_metric or after.quality_metric or "quality"
    rows = [("size", "size_bytes", "bytes", False), ("parameters", "parameters", "", False),
            ("latency (batch 1)", "latency_ms_batch1", "ms", False),
            (f"throughput (batch {after.batched_size or before.batched_size})", "throughput_batched",
             "sequences/s", True),
            (quality, "quality", "", QUALITY_HIGHER_IS_BETTER.get(quality))]
    return {"rows": [{"metric": label, "before": getattr(before, f), "after": getattr(after, f), "unit": unit,
                      "higher_is_better": higher} for label, f, unit, higher in rows],
            "backend_before": before.backend, "backend_after": after.backend, "job_id": found.job_id,
            "source_model_uri": found.source_model_uri, "relative_degradation": found.relative_degradation,
            "within_budget": found.within_budget, "promoted": found.promoted,
            "result_uri": found.result.uri if found.HasField("result") else None}


# -- models -----------------------------------------------------------------------------------------


def _enum(enum, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix)


def model_json(status: ipb.ModelStatus, figures: dict[str, Any] | None = None) -> dict[str, Any]:
    task = _enum(ipb.ModelTask, status.config.task, "MODEL_TASK_").lower()
    figures = figures or dict.fromkeys(FIGURES)
    queued = figures.get("queue_by_level") or {}
    return {"name": status.name, "version": status.version,
            "state": _enum(ipb.ModelState, status.state, "MODEL_STATE_"),
            "ready": status.state == ipb.MODEL_STATE_READY, "task": task,
            "backend": _enum(ipb.Backend, status.config.backend, "BACKEND_").lower(),
            # Generating now: tokens came out in the window, or sequences wait for a step.
            "generating": task == "generation" and bool(figures.get("tokens_per_second") or any(queued.values())),
            "error": status.error, "model_uri": status.model_uri, "figures": figures}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def figures(status: ipb.ModelStatus, scrape: m.Scrape | None, window: m.Window | None) -> dict[str, Any]:
    """The model's figures over `window` (rates, means, quantiles) and from `scrape` (gauges); None for
    what is not known: no metrics, no window yet, or nothing observed in it."""
    out: dict[str, Any] = dict.fromkeys(FIGURES)
    generative = status.config.task == ipb.MODEL_TASK_GENERATION
    # The generation engine labels its series `<name>/<version>`, the repository by name and version.
    engine, by_version = {"model": f"{status.name}/{status.version}"}, {"model": status.name, "version": status.version}
    if scrape is not None and generative:
        queue = scrape.current(m.QUEUE_LENGTH, engine, by="level")
        out["queue_by_level"] = None if queue is None else \
            {level: int(n) for level, n in sorted(queue.items(), key=lambda item: int(item[0] or 0))}
    if window is None:
        return out
    methods = m.GENERATION_METHODS if generative else m.ENCODER_METHODS
    latency = {"service": "inference", "method": methods}
    out["requests_per_second"] = window.rate(m.REQUESTS, by_version)
    out["latency_p50_ms"] = _ms(window.quantile(0.5, m.RPC_LATENCY, latency))
    out["latency_p99_ms"] = _ms(window.quantile(0.99, m.RPC_LATENCY, latency))
    if generative:
        out["tokens_per_second"] = window.rate(m.GENERATED_TOKENS, engine)
        out["batch_occupancy"] = window.mean(m.BATCH_OCCUPANCY, engine)
        out["ttft_p50_ms"] = _ms(window.quantile(0.5, m.TIME_TO_FIRST_TOKEN, engine))
        out["ttft_p99_ms"] = _ms(window.quantile(0.99, m.TIME_TO_FIRST_TOKEN, engine))
    else:
        size, most = window.mean(m.BATCH_SIZE, by_version), status.config.batching.max_batch_size
        out["batch_occupancy"] = None if size is None or most <= 0 else min(size / most, 1.0)
    return out


def models(upstreams: Upstreams) -> dict[str, Any]:
    """Every loaded model with its figures; the metrics failing leaves the figures None and says why."""
    client = upstreams.client
    listed = _call(client, "inference", lambda: client.inference.list_models(timeout=LIST_TIMEOUT))
    scrape = window = error = None
    try:
        scrape, window = upstreams.metrics.scrape()
    except m.ScrapeError as exc:
        error = str(exc)
    return {"models": [model_json(s, figures(s, scrape, window)) for s in listed], "metrics_error": error}


def load_model(client: FastServeClient, body: Any) -> dict[str, Any]:
    body = _object(body)
    name, uri = _text(body, "name", MAX_NAME), _text(body, "uri", MAX_URI)
    version = _text(body, "version", MAX_NAME, required=False)
    return model_json(_call(client, "inference", lambda: client.inference.load_model(name, uri, version=version)))


def unload_model(client: FastServeClient, body: Any) -> dict[str, Any]:
    body = _object(body)
    name, version = _text(body, "name", MAX_NAME), _text(body, "version", MAX_NAME, required=False)
    _call(client, "inference", lambda: client.inference.unload_model(name, version))
    return {"unloaded": name}


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object", None, "invalid_value")
    return body


# -- artifacts --------------------------------------------------------------------------------------


def node(uri: str) -> dict[str, Any]:
    """`artifact://models/gpt/3` → its kind (the URI's plural), name and version (None for `latest` or an
    alias), as the registry's own parser reads it."""
    ref = parse_uri(uri)
    return {"uri": uri, "kind": ref.kind, "name": ref.name, "version": ref.version}


def artifacts(client: FastServeClient, kind: str | None = None) -> dict[str, Any]:
    kind = _choice("kind", kind, ARTIFACT_KINDS)

    def listing() -> list[dict[str, Any]]:
        out = []
        for summary in client.registry.list(kind or 0, timeout=LIST_TIMEOUT):
            out.append({**node(summary.ref.uri), "size_bytes": summary.size_bytes,
                        "create_time": iso(summary.create_time), "aliases": list(summary.aliases)})
            if len(out) >= MAX_ARTIFACTS:
                break
        return out
    return {"artifacts": _call(client, "inference", listing)}


def lineage(client: FastServeClient, uri: str | None) -> dict[str, Any]:
    """The artifact and everything it was made from, as a graph: inputs point at what used them."""
    uri = _text({"uri": uri}, "uri", MAX_URI)
    if not uri.startswith("artifact://"):
        raise bad("uri", "uri must be an artifact:// URI")
    shown = _call(client, "inference", lambda: client.registry.show(uri))
    root = shown.artifact.ref.uri or uri
    nodes = {root: node(root)}
    edges = []
    for edge in shown.lineage:
        for each in (edge.uri, edge.input_uri):
            nodes.setdefault(each, node(each))
        edges.append({"from": edge.input_uri, "to": edge.uri, "relation": edge.relation, "job_id": edge.job_id})
    return {"nodes": list(nodes.values()), "edges": edges}
