"""The job store shared by every service, kept in Redis.

Every key is under the stack's prefix `fastserve:<namespace>:` (`Config.redis_prefix`), so stacks
sharing one Redis never see each other's jobs. A job is a hash `<prefix>job:<id>` (state, progress,
params, result, ...) plus a Redis stream `<prefix>job:<id>:events` holding its events in order. A
watcher reads the stream from any event id, so one that reconnects gets what it missed and then live
events. State changes are checked transactions: a job moves QUEUED → RUNNING → CANCELLING → SUCCEEDED |
FAILED | CANCELLED, never out of a terminal state, and every change appends a STATE event.

Bounds. A job's stream keeps about its last `MAX_EVENTS` events (XADD with an approximate MAXLEN): a
watcher that resumes after an event that was trimmed away gets the events that remain, oldest first. A
finished job, its hash and its stream, expires `retention_seconds` after it ended. ListJobs reads sorted
sets scored by create time — `<prefix>jobs:<service>`, and the same narrowed `:type:<job_type>`,
`:state:<STATE>` or both — one page at a time, and the orphan sweeper reads only the RUNNING and
CANCELLING sets (`active`). `<prefix>jobs:finished`, scored by end time, says which index entries to
drop once their jobs expire.

Faults. Every public method is behind one boundary (`_redis_boundary`): a lost or timed-out connection
is `Unavailable` (UNAVAILABLE, which clients retry) and a Redis out of memory is `ResourceExhausted`,
never INTERNAL. The calls a running job makes (`report`, `transition`, `cancel_requested`) first retry
with backoff for `write_retry_seconds`, so a job pauses through a Redis restart instead of failing.
"""

from __future__ import annotations

import base64
import enum
import functools
import inspect
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError

from fastserve.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from fastserve.runtime.redis_server import connect

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_EVENTS = 10_000
"""About how many events a job's stream keeps; older ones are trimmed."""
DEFAULT_RETENTION_SECONDS = 30 * 24 * 3600.0
DEFAULT_WRITE_RETRY_SECONDS = 60.0
_PRUNE_BATCH = 500
_EVENT_ID = re.compile(r"^\d+-\d+$")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_JOB_TYPE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
# Faults that pass: the server restarts, fails over, or the network drops (BusyLoadingError, Redis
# reloading its AOF after a restart, is a ConnectionError).
_TRANSIENT = (redis.ConnectionError, redis.TimeoutError, ReadOnlyError)


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
ACTIVE = (JobState.RUNNING, JobState.CANCELLING)

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


def valid_job_id(job_id: str) -> bool:
    """Whether `job_id` has the form of the ids `create` makes (uuid4 hex)."""
    return bool(_JOB_ID.match(job_id))


# Called by a running job: they wait for Redis to return, so that a restart pauses the job rather
# than failing it. Every other call answers at once, so that an RPC is UNAVAILABLE, not stuck.
_WAIT_FOR_REDIS = frozenset({"report", "transition", "cancel_requested"})


def _fault(exc: redis.RedisError) -> Exception:
    if isinstance(exc, OutOfMemoryError):
        return ResourceExhausted("the job store is full; try again later")
    return Unavailable("the job store (Redis) is unavailable; try again later")


def _guard(fn: Callable, wait: bool) -> Callable:
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(self: JobStore, *args: Any, **kwargs: Any) -> Iterator:
            try:
                yield from fn(self, *args, **kwargs)
            except (*_TRANSIENT, OutOfMemoryError) as exc:
                raise _fault(exc) from exc
        return stream

    @functools.wraps(fn)
    def call(self: JobStore, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + (self.write_retry_seconds if wait else 0.0)
        delay = 0.1
        while True:
            try:
                return fn(self, *args, **kwargs)
            except OutOfMemoryError as exc:
                raise _fault(exc) from exc
            except _TRANSIENT as exc:
                if time.monotonic() + delay > deadline:
                    raise _fault(exc) from exc
                log.warning("Redis unavailable in %s (%s); retrying in %.1fs", fn.__name__, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
    return call


def _redis_boundary(cls: type) -> type:
    """Put every public method of `cls` behind the fault mapping (see the module docstring)."""
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(member):
            setattr(cls, name, _guard(member, wait=name in _WAIT_FOR_REDIS))
    return cls


@_redis_boundary
class JobStore:
    """Jobs of every service of one stack, its keys all under `prefix`; safe to share between threads and
    processes. `redis` is the raw client, for callers that keep keys of their own (leases)."""

    def __init__(self, client: redis.Redis, prefix: str, retention_seconds: float = DEFAULT_RETENTION_SECONDS,
                 write_retry_seconds: float = DEFAULT_WRITE_RETRY_SECONDS) -> None:
        self.redis = client
        self.prefix = prefix
        self.retention_seconds = retention_seconds
        self.write_retry_seconds = write_retry_seconds

    @classmethod
    def from_url(cls, url: str, prefix: str, retention_seconds: float = DEFAULT_RETENTION_SECONDS,
                 write_retry_seconds: float = DEFAULT_WRITE_RETRY_SECONDS) -> JobStore:
        return cls(connect(url), prefix, retention_seconds, write_retry_seconds)

    def job_key(self, job_id: str, part: str = "") -> str:
        """The key of job `job_id`'s hash, or of one of its parts (`events`, `lease`, `requeue`). An id
        not of the form `create` makes is NOT_FOUND here, before any key is built from it."""
        if not valid_job_id(job_id):
            raise NotFound(f"no job {job_id[:64]!r}")
        return f"{self.prefix}job:{job_id}{':' + part if part else ''}"

    def _index(self, service: str, job_type: str = "", state: JobState | None = None) -> str:
        key = f"{self.prefix}jobs:{service}"
        if job_type:
            key += f":type:{job_type}"
        if state is not None:
            key += f":state:{state.value}"
        return key

    def _state_indexes(self, service: str, job_type: str, state: JobState) -> tuple[str, str]:
        return self._index(service, state=state), self._index(service, job_type, state)

    @property
    def _finished(self) -> str:
        return f"{self.prefix}jobs:finished"

    def create(self, service: str, job_type: str, params: dict[str, Any]) -> Job:
        """Record a new QUEUED job and its first event."""
        self._prune()
        now = time.time()
        job = Job(job_id=uuid.uuid4().hex, service=service, job_type=job_type, state=JobState.QUEUED,
                  params=params, create_time=now, update_time=now, message="queued")
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.job_key(job.job_id), mapping={
            "job_id": job.job_id, "service": service, "job_type": job_type, "state": job.state.value,
            "progress": 0, "message": job.message, "params": json.dumps(params), "result": "{}",
            "create_time": now, "update_time": now, "cancel_requested": 0})
        for key in (self._index(service), self._index(service, job_type),
                    *self._state_indexes(service, job_type, job.state)):
            pipe.zadd(key, {job.job_id: now})
        self._add_event(pipe, job.job_id, EventType.STATE, job.state, 0.0, job.message, {})
        pipe.execute()
        return job

    def get(self, job_id: str) -> Job:
        return self._get(job_id)

    def _get(self, job_id: str) -> Job:
        h = self.redis.hgetall(self.job_key(job_id))
        if not h:
            raise NotFound(f"no job {job_id!r}")
        return Job.from_hash(h)

    def list(self, service: str, job_type: str = "", states: frozenset[JobState] = frozenset(),
             page_size: int = 0, page_token: str = "") -> JobPage:
        """Jobs of `service`, newest first, filtered by type and states, one page at a time; `page_size`
        0 is the default, above `MAX_PAGE_SIZE` is clamped to it."""
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative", field="page.page_size")
        if job_type and not _JOB_TYPE.match(job_type):
            raise InvalidArgument("job_type must be 1 to 100 letters, digits, '_', '.' or '-'",
                                  field="filter.job_type")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        cursor = _decode_token(page_token)
        self._prune()
        keys = [self._index(service, job_type, s) for s in sorted(states)] if states \
            else [self._index(service, job_type)]
        page, more = self._page(keys, size, cursor)
        jobs = self._load([job_id for job_id, _ in page])
        total = sum(self._pipelined(lambda pipe: [pipe.zcard(k) for k in keys]))
        return JobPage(jobs, _encode_token(*page[-1]) if more else "", total)

    def active(self, service: str) -> list[Job]:
        """The RUNNING and CANCELLING jobs of `service`, from their own small sets, not all its jobs."""
        keys = [self._index(service, state=s) for s in ACTIVE]
        ids = [i for batch in self._pipelined(lambda pipe: [pipe.zrange(k, 0, -1) for k in keys]) for i in batch]
        return [j for j in self._load(ids) if j.state in ACTIVE]

    def _page(self, keys: list[str], size: int,
              cursor: tuple[str, float] | None) -> tuple[list[tuple[str, float]], bool]:
        """(id, score) of the next `size` members of the union of `keys` after `cursor`, ordered as ZREVRANGE orders
        one set (score, then member, descending); and whether more follow."""
        def reads(pipe: redis.client.Pipeline) -> list:
            for key in keys:
                if cursor is None:
                    pipe.zrevrange(key, 0, size, withscores=True)
                else:
                    _, score = cursor
                    # Members tied on the cursor's score, then those strictly below it.
                    pipe.zrangebyscore(key, score, score, withscores=True)
                    pipe.zrevrangebyscore(key, f"({score!r}", "-inf", start=0, num=size + 1, withscores=True)
            return []

        candidates: dict[str, float] = {}
        for batch in self._pipelined(reads):
            candidates.update(batch)
        if cursor is not None:
            last, score = cursor
            candidates = {m: s for m, s in candidates.items() if s < score or (s == score and m < last)}
        ordered = sorted(candidates.items(), key=lambda ms: (ms[1], ms[0]), reverse=True)
        return ordered[:size], len(ordered) > size

    def _pipelined(self, queue: Callable[[redis.client.Pipeline], Any]) -> list:
        pipe = self.redis.pipeline(transaction=False)
        queue(pipe)
        return pipe.execute()

    def _load(self, ids: list[str]) -> list[Job]:
        hashes = self._pipelined(lambda pipe: [pipe.hgetall(self.job_key(i)) for i in ids])
        return [Job.from_hash(h) for h in hashes if h]  # an expired job not yet pruned from the index

    def _prune(self) -> None:
        """Drop from the indexes up to a batch of jobs past their retention (their keys expire)."""
        horizon = time.time() - self.retention_seconds
        members = self.redis.zrangebyscore(self._finished, "-inf", horizon, start=0, num=_PRUNE_BATCH)
        if not members:
            return
        pipe = self.redis.pipeline(transaction=False)
        for member in members:
            service, job_type, state, job_id = json.loads(member)
            for key in (self._index(service), self._index(service, job_type),
                        *self._state_indexes(service, job_type, JobState(state))):
                pipe.zrem(key, job_id)
            pipe.delete(self.job_key(job_id), self.job_key(job_id, "events"))
            pipe.zrem(self._finished, member)
        pipe.execute()

    def transition(self, job_id: str, to: JobState, message: str = "", error: str = "",
                   result: dict[str, Any] | None = None) -> Job:
        """Move the job to `to` if its current state allows it; FailedPrecondition otherwise."""
        self._transition(job_id, to, message, error, result)
        return self._get(job_id)

    def _transition(self, job_id: str, to: JobState, message: str = "", error: str = "",
                    result: dict[str, Any] | None = None) -> None:
        key = self.job_key(job_id)

        def apply(pipe: redis.client.Pipeline) -> None:
            current, service, job_type, created, old_progress = pipe.hmget(
                key, "state", "service", "job_type", "create_time", "progress")
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
            progress = float(fields.get("progress", old_progress or 0))
            pipe.multi()
            pipe.hset(key, mapping=fields)
            for old in self._state_indexes(service, job_type, JobState(current)):
                pipe.zrem(old, job_id)
            for new in self._state_indexes(service, job_type, to):
                pipe.zadd(new, {job_id: float(created or now)})
            self._add_event(pipe, job_id, EventType.STATE, to, progress, fields["message"],
                            {"error": error} if error else {})
            if to.terminal:
                ttl = max(int(self.retention_seconds), 1)
                pipe.expire(key, ttl)
                pipe.expire(self.job_key(job_id, "events"), ttl)
                pipe.zadd(self._finished, {json.dumps([service, job_type, to.value, job_id]): now})

        self.redis.transaction(apply, key)

    def request_cancel(self, job_id: str, reason: str = "") -> Job:
        """Cooperative cancel: a QUEUED job ends CANCELLED now; a RUNNING one becomes CANCELLING and its
        worker stops at its next check. A finished job cannot be cancelled."""
        job = self._get(job_id)
        if job.state.terminal:
            raise FailedPrecondition(f"job {job_id} already ended {job.state.value}")
        message = f"cancel requested{': ' + reason if reason else ''}"
        try:
            if job.state is JobState.QUEUED:
                self._transition(job_id, JobState.CANCELLED, message)
            elif job.state is JobState.RUNNING:
                self._transition(job_id, JobState.CANCELLING, message)
        except FailedPrecondition:
            pass  # the worker moved it meanwhile; the flag still stops it
        # The reply is read before the flag is raised: the worker stops only once it sees the flag, so the
        # reply says what this call did (CANCELLING), not what the worker did a moment after it.
        reply = self._get(job_id)
        self.redis.hset(self.job_key(job_id), "cancel_requested", 1)
        reply.cancel_requested = True
        return reply

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.job_key(job_id), "cancel_requested") == "1"

    def report(self, job_id: str, type: EventType, message: str = "", progress: float | None = None,
               data: dict[str, Any] | None = None) -> None:
        """Append a PROGRESS, LOG, METRICS or ARTIFACT event and update the job's progress and message."""
        job = self._get(job_id)
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
            "data": json.dumps(data), "time": time.time()}, maxlen=MAX_EVENTS, approximate=True)

    def events(self, job_id: str, after_event_id: str = "", block_ms: int = 500,
               stop: Callable[[], bool] = lambda: False) -> Iterator[JobEvent]:
        """The job's events after `after_event_id` (all when empty; what remains when it was trimmed away),
        then live ones as they come. Ends after the terminal STATE event, or at once when the job is
        finished and no event follows `after_event_id`, or when `stop()` turns true (the caller went
        away)."""
        self._get(job_id)
        if after_event_id and not _EVENT_ID.match(after_event_id):
            raise InvalidArgument(f"after_event_id {after_event_id!r} is not an event id", field="after_event_id")
        stream, key, last = self.job_key(job_id, "events"), self.job_key(job_id), after_event_id or "0-0"
        while not stop():
            # The terminal state and its event are written in one transaction: once the state reads
            # terminal, every event is in the stream, and a read that finds none left is the end.
            state = self.redis.hget(key, "state")
            finished = state is None or JobState(state).terminal
            batches = self.redis.xread({stream: last}, count=100, block=None if finished else block_ms)
            entries = [e for _stream, batch in batches or [] for e in batch]
            for event_id, f in entries:
                last = event_id
                event = JobEvent(job_id, event_id, EventType(f["type"]), JobState(f["state"]),
                                 float(f["progress"]), f["message"], json.loads(f["data"]), float(f["time"]))
                yield event
                if event.type is EventType.STATE and event.state.terminal:
                    return
            if finished and not entries:
                return


def _encode_token(last_id: str, score: float) -> str:
    return base64.urlsafe_b64encode(json.dumps({"i": last_id, "s": score}).encode()).decode()


def _decode_token(token: str) -> tuple[str, float] | None:
    if not token:
        return None
    try:
        cursor = json.loads(base64.urlsafe_b64decode(token.encode()))
        score, last = cursor["s"], cursor["i"]
        if isinstance(score, float) and isinstance(last, str) and valid_job_id(last):
            return last, score
    except (ValueError, KeyError, TypeError):
        pass
    raise InvalidArgument("page_token is not one this server issued", field="page.page_token")
