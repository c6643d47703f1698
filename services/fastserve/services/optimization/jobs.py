"""The optimization job handler, run by Celery workers on the `optimization` queue."""

from __future__ import annotations

from typing import Any

from fastserve.runtime.job_runner import JobContext, job_handler
from fastserve.services.optimization.core import JOB_TYPE, Optimization


@job_handler(JOB_TYPE)
def pipeline(ctx: JobContext) -> dict[str, Any]:
    def progress(fraction: float, message: str) -> None:
        ctx.check_cancelled()  # between steps and before publishing: a cancelled job registers nothing
        ctx.progress(fraction, message)

    return Optimization(ctx.stores).run(ctx.params, ctx.job.job_id, progress, ctx.log, ctx.publish_once)
