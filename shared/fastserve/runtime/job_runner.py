"""Running a job on a worker: the registry of job handlers and the life cycle around them.

A service declares `@job_handler("training.train")` on a function `(ctx: JobContext) -> dict`. The
runner takes the job's lease (so no two runners run it at once), moves it to RUNNING, calls the
handler, and records SUCCEEDED with the returned result, CANCELLED when the handler stopped at a
cancel check, or FAILED with the error. A job redelivered after its worker died is still RUNNING and
runs again; handlers resume from their checkpoints.

Each run that takes the lease counts an attempt in the job's hash; past `job_max_attempts` the job
fails instead of running, so a job that kills its worker is not queued again forever. A runner that
loses its lease stops at its next check (`check_cancelled`, a trainer's stop hook) and writes no
state: the job is another runner's now. A handler publishes its output through `publish_once`, which
records the result in the job hash, so a job redelivered after publishing ends with that result
instead of publishing a second artifact. Its drafts stage in a folder of the job's own, removed when
the job ends and again when a later attempt starts, so a killed attempt leaves no half-written files.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from fastserve.runtime.config import Config
from fastserve.runtime.errors import FailedPrecondition, FastServeError, error_gist
from fastserve.runtime.job_lease import JobLease, LeaseLost
from fastserve.runtime.jobs import EventType, Job, JobState
from fastserve.runtime.stores import Stores

log = logging.getLogger(__name__)

# The job hash's fields this module keeps: runs that took the lease, and the result of a publish.
ATTEMPTS, PUBLISHED = "attempts", "published"


class JobCancelled(Exception):
    """Raised by `JobContext.check_cancelled` to unwind a handler whose job was cancelled."""


@dataclass
class JobContext:
    """What a handler gets: its job, the stores, and ways to report and to check for cancellation."""

    job: Job
    stores: Stores
    # None in a process that runs under another's lease (a rank of a distributed job).
    lease: JobLease | None = None

    @property
    def params(self) -> dict[str, Any]:
        return self.job.params

    def progress(self, fraction: float, message: str = "") -> None:
        self.stores.jobs.report(self.job.job_id, EventType.PROGRESS, message, progress=fraction)

    def metrics(self, message: str = "", fraction: float | None = None, **values: Any) -> None:
        """Figures as a METRICS event; with `fraction`, the event is the progress report too."""
        self.stores.jobs.report(self.job.job_id, EventType.METRICS, message, progress=fraction, data=values)

    def log(self, message: str) -> None:
        self.stores.jobs.report(self.job.job_id, EventType.LOG, message)

    def artifact(self, uri: str, message: str = "") -> None:
        self.stores.jobs.report(self.job.job_id, EventType.ARTIFACT, message or f"published {uri}", data={"uri": uri})

    def check_cancelled(self) -> None:
        """Call between units of work; raises JobCancelled once a cancel was requested, LeaseLost once
        the job is no longer this runner's."""
        if self.lease is not None:
            self.lease.check()
        if self.stores.jobs.cancel_requested(self.job.job_id):
            raise JobCancelled()

    @property
    def lease_lost(self) -> bool:
        return self.lease is not None and not self.lease.held()

    def publish_once(self, publish: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run `publish` (which publishes the job's output and returns its result) unless an earlier
        attempt did; either way return the result. Only the lease holder publishes."""
        key = self.stores.jobs.job_key(self.job.job_id)
        done = self.stores.jobs.redis.hget(key, PUBLISHED)
        if done:
            return json.loads(done)
        if self.lease is not None:
            self.lease.check()
        result = publish()
        self.stores.jobs.redis.hset(key, PUBLISHED, json.dumps(result))
        return result


Handler = Callable[[JobContext], dict[str, Any]]
_HANDLERS: dict[str, Handler] = {}


def job_handler(job_type: str) -> Callable[[Handler], Handler]:
    """Register the handler of `job_type` (`<service>.<operation>`)."""
    def register(fn: Handler) -> Handler:
        _HANDLERS[job_type] = fn
        return fn
    return register


def registered(job_type: str) -> bool:
    return job_type in _HANDLERS


@functools.cache
def context_from_env() -> Stores:
    """The worker process's stores, built once from its environment."""
    return Stores.from_config(Config.from_env())


def run(stores: Stores, job_id: str) -> JobState:
    """Run job `job_id` to a terminal state (or leave it as it is if it ended or runs elsewhere)."""
    lease = JobLease(stores.jobs, job_id, stores.config.job_lease_seconds)
    if not lease.acquire():
        log.info("job %s is already running elsewhere; this delivery does nothing", job_id)
        return stores.jobs.get(job_id).state
    try:
        return _run(stores, job_id, lease)
    except LeaseLost:
        log.warning("job %s: this runner lost its lease and stopped; the job is left to its next runner", job_id)
        return JobState.RUNNING
    finally:
        lease.release()


def max_attempts(stores: Stores) -> int:
    return stores.config.job_max_attempts


def _run(stores: Stores, job_id: str, lease: JobLease) -> JobState:
    jobs = stores.jobs

    def finish(to: JobState, message: str = "", error: str = "", result: dict[str, Any] | None = None) -> JobState:
        # Fenced: a runner that lost its lease leaves the job's outcome to the runner that holds it.
        lease.check()
        return jobs.transition(job_id, to, message, error=error, result=result).state

    job = jobs.get(job_id)
    if job.state.terminal:
        log.info("job %s already %s; nothing to run", job_id, job.state.value)
        return job.state
    attempt = jobs.redis.hincrby(jobs.job_key(job_id), ATTEMPTS, 1)
    limit = max_attempts(stores)
    if attempt > limit:
        return finish(JobState.FAILED, error=f"gave up after {limit} attempts: each ended with its worker lost "
                      "before the job finished (FASTSERVE_JOB_MAX_ATTEMPTS)")
    handler = _HANDLERS.get(job.job_type)
    if handler is None:
        return finish(JobState.FAILED, error=f"no handler for job type {job.job_type!r}")
    published = jobs.redis.hget(jobs.job_key(job_id), PUBLISHED)
    if published:
        return finish(JobState.SUCCEEDED, "succeeded (published by an earlier attempt)", result=json.loads(published))
    if job.state is JobState.QUEUED:
        try:
            job = jobs.transition(job_id, JobState.RUNNING, "running")
        except FailedPrecondition:
            return jobs.get(job_id).state  # cancelled while queued
    else:
        jobs.report(job_id, EventType.LOG, f"resuming after redelivery (was {job.state.value}; attempt "
                    f"{attempt} of {limit})")
    # Drafts stage under the job's own folder: what an earlier attempt left when its worker was killed
    # goes now, and what this one leaves goes when it ends (a lost lease leaves it to the next runner).
    stores.artifacts.remove_staging(job_id)
    ctx = JobContext(job, stores.for_job(job_id), lease)
    try:
        ctx.check_cancelled()
        outcome = JobState.SUCCEEDED, {"message": "succeeded", "result": handler(ctx)}
    except (LeaseLost, redis.RedisError):
        # Not the job's failure: the runner lost its lease or its store; the job's next runner resumes it.
        raise LeaseLost(job_id) from None
    except JobCancelled:
        outcome = JobState.CANCELLED, {"message": "cancelled"}
    except FastServeError as exc:
        outcome = JobState.FAILED, {"error": exc.message}
    except Exception as exc:  # noqa: BLE001 - a job's failure is recorded, never lost
        log.exception("job %s failed", job_id)
        # The job's error is read by clients: the gist of the exception, without server paths.
        outcome = JobState.FAILED, {"error": f"internal error: {type(exc).__name__}: {error_gist(exc)} (the worker "
                                             f"log has the traceback under job {job_id})"}
    stores.artifacts.remove_staging(job_id)
    return finish(outcome[0], **outcome[1])


class ProgressMeter:
    """Reports a job's progress through a stream of work: the fraction done, and at most every
    `interval` seconds a METRICS event with items and bytes done, MB/s and ETA. Each call is also a
    cancellation point."""

    def __init__(self, ctx: JobContext, total_bytes: int, unit: str = "documents", interval: float = 0.5) -> None:
        self.ctx, self.total, self.unit, self.interval = ctx, max(total_bytes, 1), unit, interval
        self.start = self.last = time.monotonic()

    def __call__(self, items: int, done_bytes: int) -> None:
        self.ctx.check_cancelled()
        now = time.monotonic()
        if now - self.last < self.interval and done_bytes < self.total:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = done_bytes / elapsed
        fraction = min(done_bytes / self.total, 1.0)
        message = f"{items} {self.unit}, {done_bytes / 1e6:.1f}/{self.total / 1e6:.1f} MB"
        self.ctx.progress(fraction, message)
        # The figures without the line: the PROGRESS event above carries it, and a watcher that prints
        # messages would print it twice.
        self.ctx.metrics(**{self.unit: items}, bytes=done_bytes, mb_per_s=round(rate / 1e6, 3),
                         eta_seconds=round((self.total - done_bytes) / rate, 1) if rate else None)
