"""The stores a service or worker process works with, built once from its configuration."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastserve.runtime.config import Config
from fastserve.runtime.jobs import JobStore
from fastserve.runtime.redis_server import DEFAULT_URL
from fastserve.storage.artifacts import ArtifactStore


@dataclass(frozen=True)
class Stores:
    config: Config
    jobs: JobStore
    artifacts: ArtifactStore

    @classmethod
    def from_config(cls, config: Config) -> Stores:
        jobs = JobStore.from_url(config.redis_url or DEFAULT_URL, config.redis_prefix,
                                 retention_seconds=config.job_retention_seconds,
                                 write_retry_seconds=config.redis_retry_seconds)
        return cls(config, jobs, ArtifactStore(config.home / "artifacts"))

    def for_job(self, job_id: str) -> Stores:
        """The stores as job `job_id` uses them: its drafts stage in a folder of its own (see
        `ArtifactStore.owned_by`), which its next runner clears."""
        return dataclasses.replace(self, artifacts=self.artifacts.owned_by(job_id))
