"""Celery tasks: thin shells that hand a job id to the job runner, the same core the tests call."""

from __future__ import annotations

from shared import job_runner
from shared.celery_app import RUN_JOB, app


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> str:
    """Run job `job_id` to its end; returns its final state."""
    return job_runner.run(job_runner.context_from_env(), job_id).value
