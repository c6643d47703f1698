"""`python -m fastserve.services.training.rank <job id>`: one rank of a data-parallel training job."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fastserve.runtime.config import Config
from fastserve.runtime.errors import FastServeError
from fastserve.runtime.job_runner import JobCancelled, JobContext
from fastserve.runtime.logs import setup_logging
from fastserve.runtime.stores import Stores
from fastserve.services.training.core import Training
from fastserve.services.training.jobs import train_and_publish


def main(job_id: str) -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    config = Config.from_env()
    setup_logging(f"training-rank{rank}", config.log_format, config.log_level)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world)
    stores = Stores.from_config(config).for_job(job_id)
    ctx = JobContext(stores.jobs.get(job_id), stores)
    outcome: dict = {}
    try:
        core = Training(stores)
        result = train_and_publish(core, core.prepare(ctx.params), ctx, rank, world)
        outcome = {"status": "succeeded", "result": result}
    except JobCancelled:
        outcome = {"status": "cancelled"}
    except FastServeError as exc:
        outcome = {"status": "failed", "error": exc.message}
    finally:
        dist.destroy_process_group()
        if rank == 0:
            Path(os.environ["FASTSERVE_DDP_OUTCOME"]).write_text(json.dumps(outcome))
    return 0 if outcome.get("status") == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
