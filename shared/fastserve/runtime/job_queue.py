"""Submitting a job: record it in the job store, then queue it on its service's Celery queue."""

from __future__ import annotations

import logging
from typing import Any

from fastserve.runtime.celery_app import RUN_JOB, client_app
from fastserve.runtime.errors import Unavailable
from fastserve.runtime.jobs import Job, JobState
from fastserve.runtime.stores import Stores

log = logging.getLogger(__name__)


def submit(stores: Stores, service: str, job_type: str, params: dict[str, Any]) -> Job:
    """Create a QUEUED job and hand it to a worker of queue `service`; returns at once."""
    job = stores.jobs.create(service, job_type, params)
    try:
        client_app(stores.config).send_task(RUN_JOB, args=[job.job_id], queue=service)
    except Exception as exc:
        log.exception("could not queue job %s", job.job_id)
        stores.jobs.transition(job.job_id, JobState.FAILED, error=f"could not be queued: {exc}")
        raise Unavailable("the job queue is unavailable; try again later") from exc
    return job
