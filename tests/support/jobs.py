"""Job handlers for tests, imported by test workers with `celery ... -I tests.support.jobs`."""

from __future__ import annotations

import os
import time

from fastserve.runtime.errors import InvalidArgument
from fastserve.runtime.job_runner import JobContext, job_handler


@job_handler("test.count")
def count(ctx: JobContext) -> dict:
    """Counts to `steps`, `delay` seconds a step, reporting each step and stopping when cancelled."""
    steps, delay = int(ctx.params["steps"]), float(ctx.params.get("delay", 0.05))
    for step in range(1, steps + 1):
        ctx.check_cancelled()
        time.sleep(delay)
        ctx.progress(step / steps, f"step {step}/{steps}")
        ctx.metrics(step=step, value=step * step)
    return {"steps": steps, "worker_pid": os.getpid()}


@job_handler("test.fail")
def fail(ctx: JobContext) -> dict:
    raise InvalidArgument("the test job refuses", field="params.x")
