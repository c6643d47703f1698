"""Data-parallel training: one job, `num_processes` processes under torch.distributed (DDP).

The worker launches the ranks torchrun-style (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) as child
processes that die with it, NCCL on GPUs and gloo on CPU. Rank 0 reports, checkpoints and publishes,
and leaves its outcome in a JSON file the worker reads back. The ranks run under the worker's lease
on the job, and are killed when the worker loses it.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastserve.runtime.errors import FastServeError
from fastserve.runtime.job_lease import LeaseLost
from fastserve.runtime.job_runner import JobCancelled, JobContext


class FollowerHooks:
    """Ranks other than 0 report nothing; stop requests reach them through the trainer's all-reduce."""

    def report(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def checkpoint(self, step: int, write: Callable[[Path], None]) -> str:
        return ""


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: a rank must not outlive a worker that was killed.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ctx: JobContext, world: int) -> dict[str, Any]:
    """Run the job's ranks and return rank 0's result; a cancel or a failure ends the job likewise."""
    with tempfile.TemporaryDirectory(prefix="ddp-") as tmp:
        outcome_file = Path(tmp) / "outcome.json"
        env = {**os.environ, **ctx.stores.config.env(), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world), "FASTSERVE_DDP_OUTCOME": str(outcome_file)}
        procs = [subprocess.Popen([sys.executable, "-m", "fastserve.services.training.rank", ctx.job.job_id],
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, preexec_fn=_die_with_parent)
                 for r in range(world)]
        codes = _wait(procs, ctx)
        outcome = json.loads(outcome_file.read_text()) if outcome_file.exists() else {}
    if outcome.get("status") == "succeeded":
        return outcome["result"]
    if outcome.get("status") == "cancelled":
        raise JobCancelled()
    raise FastServeError(outcome.get("error") or f"distributed training failed (exit codes {codes})")


def _wait(procs: list[subprocess.Popen], ctx: JobContext, poll: float = 0.5) -> list[int]:
    """The ranks' exit codes. The ranks run under this runner's lease: once it is lost they are stopped
    (before the lease can expire, so no second runner starts beside them) and LeaseLost is raised."""
    while any(p.poll() is None for p in procs):
        if ctx.lease_lost:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            raise LeaseLost(ctx.job.job_id)
        time.sleep(poll)
    return [p.returncode for p in procs]
