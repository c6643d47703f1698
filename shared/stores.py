"""The stores a service or worker process works with, built once from its configuration."""

from __future__ import annotations

from dataclasses import dataclass

from shared.artifacts import ArtifactStore
from shared.config import Config
from shared.jobs import JobStore
from shared.redis_server import DEFAULT_URL


@dataclass(frozen=True)
class Stores:
    config: Config
    jobs: JobStore
    artifacts: ArtifactStore

    @classmethod
    def from_config(cls, config: Config) -> Stores:
        return cls(config, JobStore.from_url(config.redis_url or DEFAULT_URL), ArtifactStore(config.home / "artifacts"))
