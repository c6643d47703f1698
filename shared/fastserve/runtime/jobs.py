"""The job store shared by every service, kept in Redis.

Every key is under the stack's prefix `fastserve:<namespace>:` (`Config.redis_prefix`), so stacks
sharing one Redis never see each other's jobs. A job is a hash `<prefix>job:<id>` (state, progress,
params, result, ...) plus a Redis stream `<prefix>job:<id>:events` holding its events in order, and
each service has an index `<prefix>jobs:<service>`. A watcher reads the stream from any event id,
so one that reconnects gets what it missed and then live events. State changes are checked
transactions: a job moves QUEUED → RUNNING → CANCELLING → SUCCEEDED | FAILED | CANCELLED, never out
of a terminal state, and every change appends a STATE event.
"""

from __future__ import annotations

import base64
import enum
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from fastserve.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_EVENT_ID = re.compile(r"^\d+-\d+$")


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

ALLOWED_FROM: dict[JobState, frozenset[JobState]] = {
    JobState.RUNNING: frozenset({JobState.QUEUED}),
    JobState.CANCELLING: frozenset({JobState.QUEUED, JobState.RUNNING}),
    JobState.SUCCEEDED: frozenset({JobState.RUNNING, JobState.CANCELLING}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING}),
}


class EventType(enum.StrEnum):
    STATE = "STATE"
    PROGRESS = "PROGRESS"
    LOG = "LOG"
    METRICS = "METRICS"
    ARTIFACT = "ARTIFACT"


@dataclass
class Job:
    job_id: str
    service: str
    job_type: str
    state: JobState
    progress: float = 0.0
    message: str = ""
    error: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    create_time: float = 0.0
    update_time: float = 0.0
    start_time: float = 0.0
    end_time: float = 0.0
    cancel_requested: bool = False

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Job:
        return cls(
            job_id=h["job_id"], service=h["service"], job_type=h["job_type"], state=JobState(h["state"]),
            progress=float(h.get("progress", 0)), message=h.get("message", ""), error=h.get("error", ""),
            params=json.loads(h.get("params", "{}")), result=json.loads(h.get("result", "{}")),
            create_time=float(h.get("create_time", 0)), update_time=float(h.get("update_time", 0)),
            start_time=float(h.get("start_time", 0)), end_time=float(h.get("end_time", 0)),
            cancel_requested=h.get("cancel_requested") == "1")


@dataclass
class JobEvent:
    job_id: str
    event_id: str
    type: EventType
    state: JobState
    progress: float
    message: str
    data: dict[str, Any]
    time: float


@dataclass
class JobPage:
    jobs: list[Job]
    next_page_token: str
    total_size: int


class JobStore:
    """Jobs of every service of one stack, its keys all under `prefix`; safe to share between threads and
    processes."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, prefix: str) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True), prefix)

    def job_key(self, job_id: str, part: str = "") -> str:
        """The key of job `job_id`'s hash, or of one of its parts (`events`, `lease`, `requeue`)."""
        return f"{self.prefix}job:{job_id}{':' + part if part else ''}"

    def _index(self, service: str) -> str:
        return f"{self.prefix}jobs:{service}"

    def create(self, service: str, job_type: str, params: dict[str, Any]) -> Job:
        """Record a new QUEUED job and its first event."""
        now = time.time()
        job = Job(job_id=uuid.uuid4().hex, service=service, job_type=job_type, state=JobState.QUEUED,
                  params=params, create_time=now, update_time=now, message="queued")
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.job_key(job.job_id), mapping={
            "job_id": job.job_id, "service": service, "job_type": job_type, "state": job.state.value,
            "progress": 0, "message": job.message, "params": json.dumps(params), "result": "{}",
            "create_time": now, "update_time": now, "cancel_requested": 0})
        pipe.zadd(self._index(service), {job.job_id: now})
        self._add_event(pipe, job.job_id, EventType.STATE, job.state, 0.0, job.message, {})
        pipe.execute()
        return job

    def get(self, job_id: str) -> Job:
        h = self.redis.hgetall(self.job_key(job_id)) if job_id else {}
        if not h:
            raise NotFound(f"no job {job_id!r}")
        return Job.from_hash(h)

    def list(self, service: str, job_type: str = "", states: frozenset[JobState] = frozenset(),
             page_size: int = 0, page_token: str = "") -> JobPage:
        """Jobs of `service`, newest first, filtered by type and states, one page at a time."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be in [0, {MAX_PAGE_SIZE}]", field="page.page_size")
        offset = _decode_token(page_token)
        ids = self.redis.zrevrange(self._index(service), 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.job_key(job_id))
        jobs = [Job.from_hash(h) for h in pipe.execute() if h]
        jobs = [j for j in jobs if (not job_type or j.job_type == job_type) and (not states or j.state in states)]
        size = page_size or DEFAULT_PAGE_SIZE
        page = jobs[offset:offset + size]
        more = offset + size < len(jobs)
        return JobPage(page, _encode_token(offset + size) if more else "", len(jobs))

    def transition(self, job_id: str, to: JobState, message: str = "", error: str = "",
                   result: dict[str, Any] | None = None) -> Job:
        """Move the job to `to` if its current state allows it; FailedPrecondition otherwise."""
        key = self.job_key(job_id)

        def apply(pipe: redis.client.Pipeline) -> None:
            current = pipe.hget(key, "state")
            if current is None:
                raise NotFound(f"no job {job_id!r}")
            if JobState(current) not in ALLOWED_FROM[to]:
                raise FailedPrecondition(f"job {job_id} is {current}; it cannot become {to.value}")
            now = time.time()
            fields: dict[str, Any] = {"state": to.value, "update_time": now, "message": message or to.value.lower()}
            if to is JobState.RUNNING:
                fields["start_time"] = now
            if to.terminal:
                fields["end_time"] = now
            if to is JobState.SUCCEEDED:
                fields["progress"] = 1.0
            if error:
                fields["error"] = error
            if result is not None:
                fields["result"] = json.dumps(result)
            progress = float(fields.get("progress", pipe.hget(key, "progress") or 0))
            pipe.multi()
            pipe.hset(key, mapping=fields)
            self._add_event(pipe, job_id, EventType.STATE, to, progress, fields["message"],
                            {"error": error} if error else {})

        self.redis.transaction(apply, key)
        return self.get(job_id)

    def request_cancel(self, job_id: str, reason: str = "") -> Job:
        """Cooperative cancel: a QUEUED job ends CANCELLED now; a RUNNING one becomes CANCELLING and its
        worker stops at its next check. A finished job cannot be cancelled."""
        job = self.get(job_id)
        if job.state.terminal:
            raise FailedPrecondition(f"job {job_id} already ended {job.state.value}")
        self.redis.hset(self.job_key(job_id), "cancel_requested", 1)
        message = f"cancel requested{': ' + reason if reason else ''}"
        try:
            if job.state is JobState.QUEUED:
                return self.transition(job_id, JobState.CANCELLED, message)
            if job.state is JobState.RUNNING:
                return self.transition(job_id, JobState.CANCELLING, message)
        except FailedPrecondition:
            pass  # the worker moved it meanwhile; the flag still stops it
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.job_key(job_id), "cancel_requested") == "1"

    def report(self, job_id: str, type: EventType, message: str = "", progress: float | None = None,
               data: dict[str, Any] | None = None) -> None:
        """Append a PROGRESS, LOG, METRICS or ARTIFACT event and update the job's progress and message."""
        job = self.get(job_id)
        if job.state.terminal:
            return
        progress = job.progress if progress is None else min(max(progress, 0.0), 1.0)
        pipe = self.redis.pipeline(transaction=True)
        fields: dict[str, Any] = {"progress": progress, "update_time": time.time()}
        if message:
            fields["message"] = message
        pipe.hset(self.job_key(job_id), mapping=fields)
        self._add_event(pipe, job_id, type, job.state, progress, message, data or {})
        pipe.execute()

    def _add_event(self, pipe, job_id: str, type: EventType, state: JobState, progress: float, message: str,
                   data: dict[str, Any]) -> None:
        pipe.xadd(self.job_key(job_id, "events"), {
            "type": type.value, "state": state.value, "progress": progress, "message": message,
            "data": json.dumps(data), "time": time.time()})

    def events(self, job_id: str, after_event_id: str = "", block_ms: int = 500,
               stop: Callable[[], bool] = lambda: False) -> Iterator[JobEvent]:
        """The job's events after `after_event_id` (all when empty), then live ones as they come; ends
        after the terminal STATE event, or when `stop()` turns true (the caller went away)."""
        self.get(job_id)
        if after_event_id and not _EVENT_ID.match(after_event_id):
            raise InvalidArgument(f"after_event_id {after_event_id!r} is not an event id", field="after_event_id")
        last = after_event_id or "0-0"
        while not stop():
            batches = self.redis.xread({self.job_key(job_id, "events"): last}, count=100, block=block_ms)
            for _stream, entries in batches or []:
                for event_id, f in entries:
                    last = event_id
                    event = JobEvent(job_id, event_id, EventType(f["type"]), JobState(f["state"]),
                                     float(f["progress"]), f["message"], json.loads(f["data"]), float(f["time"]))
                    yield event
                    if event.type is EventType.STATE and event.state.terminal:
                        return


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode()


def _decode_token(token: str) -> int:
    if not token:
        return 0
    try:
        offset = json.loads(base64.urlsafe_b64decode(token.encode()))["o"]
        if isinstance(offset, int) and offset >= 0:
            return offset
    except (ValueError, KeyError, TypeError):
        pass
    raise InvalidArgument("page_token is not one this server issued", field="page.page_token")
