"""The training job handler, run by Celery workers; it calls the same core the tests call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastserve.runtime.errors import FastServeError, error_gist
from fastserve.runtime.job_runner import JobCancelled, JobContext, job_handler
from fastserve.services.training import distributed
from fastserve.services.training.core import JOB_TYPE, Prepared, Training
from fastserve.services.training.trainer import Stopped

log = logging.getLogger(__name__)


class JobHooks:
    """Trainer hooks that report to the job store: METRICS events (with the progress), checkpoints as
    ARTIFACT events, and the job's cancel flag (read at most every `poll` seconds). A runner that lost
    its lease stops too, at once: the trainer then checkpoints, and the job's next runner resumes there."""

    def __init__(self, ctx: JobContext, core: Training, poll: float = 0.25) -> None:
        self.ctx, self.core, self.poll = ctx, core, poll
        self._checked, self._stop = 0.0, False

    def report(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        if "eval_loss" in metrics:
            message = f"step {step}: eval loss {metrics['eval_loss']:.4f}"
        else:
            message = f"step {step}/{total}: loss {metrics['loss']:.4f}, {metrics['tokens_per_second']:.0f} tokens/s"
        # One event a report, the line with its fraction and figures: a watcher that prints each event's
        # message prints each line once, and a progress bar still gets the figures from METRICS.
        self.ctx.metrics(message, fraction=step / total, **metrics)

    def should_stop(self) -> bool:
        if self.ctx.lease_lost:
            return True
        now = time.monotonic()
        if not self._stop and now - self._checked >= self.poll:
            self._checked, self._stop = now, self.ctx.stores.jobs.cancel_requested(self.ctx.job.job_id)
        return self._stop

    def checkpoint(self, step: int, write: Callable[[Path], None]) -> str:
        uri = self.core.publish_checkpoint(self.ctx.job.job_id, step, write)
        self.ctx.artifact(uri, f"checkpoint at step {step}")
        return uri


def train_and_publish(core: Training, prepared: Prepared, ctx: JobContext, rank: int = 0,
                      world: int = 1) -> dict[str, Any] | None:
    """Run one process of the job; rank 0 publishes the model and returns the job's result."""
    job_id = ctx.job.job_id
    hooks = JobHooks(ctx, core) if rank == 0 else distributed.FollowerHooks()
    try:
        model, outcome = core.train(prepared, job_id, hooks, rank, world)
    except Stopped:
        raise JobCancelled() from None
    except FastServeError:
        raise
    except Exception as exc:
        last = core.latest_checkpoint(job_id)
        log.exception("training job %s failed", job_id)
        raise FastServeError(f"{type(exc).__name__}: {error_gist(exc)} (last checkpoint: "
                             f"{'artifact://checkpoints/' + job_id + '/' + last.name if last else 'none'})") from exc
    if rank != 0:
        return None
    # Once per job: a runner lost after publishing leaves the result for its successor to end with.
    return ctx.publish_once(lambda: core.publish_model(prepared, model, outcome, job_id))


@job_handler(JOB_TYPE)
def train(ctx: JobContext) -> dict[str, Any]:
    core = Training(ctx.stores)
    prepared = core.prepare(ctx.params)
    if prepared.spec.num_processes > 1:
        return distributed.launch(ctx, prepared.spec.num_processes)
    return train_and_publish(core, prepared, ctx)
