"""Submitting a job: record it in the job store, then queue it on its service's Celery queue.

A submit may carry a client's request id: the first submit with it creates the job and records
`<prefix>request:<service>:<id>` → job id (SET NX, kept as long as finished jobs are), and every later
submit with it returns that job. A client can therefore retry a submit whose reply it never got
without queuing the work twice.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import redis

from fastserve.runtime.celery_app import RUN_JOB, client_app
from fastserve.runtime.errors import InvalidArgument, Unavailable
from fastserve.runtime.jobs import Job, JobState
from fastserve.runtime.stores import Stores

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# While the first submit with an id is creating its job, a concurrent one with the same id waits for
# it this long before answering UNAVAILABLE (which the client retries).
_PENDING, _WAIT_SECONDS = "pending", 5.0


def check_request_id(request_id: str) -> None:
    if request_id and not REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument("request_id must be 1-64 letters, digits, '_' or '-'", field="request_id")


def submit(stores: Stores, service: str, job_type: str, params: dict[str, Any], request_id: str = "") -> Job:
    """Create a QUEUED job and hand it to a worker of queue `service`; returns at once. With a
    `request_id` already used for `service`, returns the job it created instead."""
    check_request_id(request_id)
    if not request_id:
        return _create_and_queue(stores, service, job_type, params)
    try:
        return _submit_once(stores, service, job_type, params, request_id)
    except redis.RedisError as exc:
        raise Unavailable("the job store (Redis) is unavailable; try again later") from exc


def _submit_once(stores: Stores, service: str, job_type: str, params: dict[str, Any], request_id: str) -> Job:
    key = f"{stores.jobs.prefix}request:{service}:{request_id}"
    ttl = max(int(stores.jobs.retention_seconds), 1)
    if not stores.jobs.redis.set(key, _PENDING, nx=True, ex=ttl):
        return _job_of(stores, key)
    try:
        job = _create_and_queue(stores, service, job_type, params)
    except BaseException:
        # Nothing was queued under the id: a retry must be free to create the job.
        stores.jobs.redis.delete(key)
        raise
    stores.jobs.redis.set(key, job.job_id, ex=ttl)
    return job


def _job_of(stores: Stores, key: str) -> Job:
    deadline = time.monotonic() + _WAIT_SECONDS
    while (job_id := stores.jobs.redis.get(key)) == _PENDING:
        if time.monotonic() > deadline:
            raise Unavailable("a submit with this request_id is still being queued; try again")
        time.sleep(0.05)
    if job_id is None:  # the first submit failed meanwhile and released the id
        raise Unavailable("a submit with this request_id failed; try again")
    return stores.jobs.get(job_id)


def _create_and_queue(stores: Stores, service: str, job_type: str, params: dict[str, Any]) -> Job:
    job = stores.jobs.create(service, job_type, params)
    try:
        client_app(stores.config).send_task(RUN_JOB, args=[job.job_id], queue=service)
    except Exception as exc:
        log.exception("could not queue job %s", job.job_id)
        stores.jobs.transition(job.job_id, JobState.FAILED, error="could not be queued: the broker refused it")
        raise Unavailable("the job queue is unavailable; try again later") from exc
    return job
