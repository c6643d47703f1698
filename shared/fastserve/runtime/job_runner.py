"""Running a job on a worker: the registry of job handlers and the life cycle around them.

A service declares `@job_handler("training.train")` on a function `(ctx: JobContext) -> dict`. The
runner takes the job's lease (so no two runners run it at once), moves it to RUNNING, calls the
handler, and records SUCCEEDED with the returned result, CANCELLED when the handler stopped at a
cancel check, or FAILED with the error. A job redelivered after its worker died is still RUNNING and
runs again; handlers resume from their checkpoints.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastserve.runtime.config import Config
from fastserve.runtime.errors import FailedPrecondition, FastServeError
from fastserve.runtime.job_lease import JobLease
from fastserve.runtime.jobs import EventType, Job, JobState
from fastserve.runtime.stores import Stores

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised by `JobContext.check_cancelled` to unwind a handler whose job was cancelled."""


@dataclass
class JobContext:
    """What a handler gets: its job, the stores, and ways to report and to check for cancellation."""

    job: Job
    stores: Stores

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
        """Call between units of work; raises JobCancelled once a cancel was requested."""
        if self.stores.jobs.cancel_requested(self.job.job_id):
            raise JobCancelled()


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
        return _run(stores, job_id)
    finally:
        lease.release()


def _run(stores: Stores, job_id: str) -> JobState:
    jobs = stores.jobs
    job = jobs.get(job_id)
    if job.state.terminal:
        log.info("job %s already %s; nothing to run", job_id, job.state.value)
        return job.state
    handler = _HANDLERS.get(job.job_type)
    if handler is None:
        return jobs.transition(job_id, JobState.FAILED, error=f"no handler for job type {job.job_type!r}").state
    if job.state is JobState.QUEUED:
        try:
            job = jobs.transition(job_id, JobState.RUNNING, "running")
        except FailedPrecondition:
            return jobs.get(job_id).state  # cancelled while queued
    else:
        jobs.report(job_id, EventType.LOG, f"resuming after redelivery (was {job.state.value})")
    ctx = JobContext(job, stores)
    try:
        ctx.check_cancelled()
        result = handler(ctx)
    except JobCancelled:
        return jobs.transition(job_id, JobState.CANCELLED, "cancelled").state
    except FastServeError as exc:
        return jobs.transition(job_id, JobState.FAILED, error=exc.message).state
    except Exception as exc:  # noqa: BLE001 - a job's failure is recorded, never lost
        log.exception("job %s failed", job_id)
        return jobs.transition(job_id, JobState.FAILED, error=f"{type(exc).__name__}: {exc}").state
    return jobs.transition(job_id, JobState.SUCCEEDED, "succeeded", result=result).state


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
