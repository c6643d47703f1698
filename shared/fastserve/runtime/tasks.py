"""Celery tasks and worker hooks: thin shells over the job runner, the same core the tests call."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from fastserve.runtime import job_runner
from fastserve.runtime.celery_app import RUN_JOB, app
from fastserve.runtime.config import JOB_SERVICES
from fastserve.runtime.job_lease import recover_orphans

log = logging.getLogger(__name__)
_stop_sweeping = threading.Event()


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> str:
    """Run job `job_id` to its end; returns its final state."""
    return job_runner.run(job_runner.context_from_env(), job_id).value


def _requeue(service: str, job_id: str) -> None:
    app.send_task(RUN_JOB, args=[job_id], queue=service)


def _sweep_forever() -> None:
    stores = job_runner.context_from_env()
    interval = stores.config.job_lease_seconds / 2
    while True:
        try:
            recover_orphans(stores.jobs, JOB_SERVICES, _requeue, claim_seconds=stores.config.job_lease_seconds)
        except Exception:  # noqa: BLE001 - a failed sweep is retried at the next interval
            log.warning("orphan sweep failed", exc_info=True)
        if _stop_sweeping.wait(interval):
            return


@worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    # In the worker's main process: it outlives any job, and so notices a dead peer's jobs.
    threading.Thread(target=_sweep_forever, daemon=True, name="orphan-sweeper").start()


@worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    _stop_sweeping.set()
