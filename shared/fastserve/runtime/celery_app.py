"""The Celery app: Redis as broker and result backend, JSON only, settings for long, crash-safe jobs.

Configured lazily from `Config` the first time it is used, so importing this module reads nothing.
Workers start with `celery -A fastserve.runtime.celery_app worker -Q <queues>`; task modules are apart
(`fastserve.runtime.tasks`), and each service's job handlers are imported by the worker through `include`.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery
from celery.signals import setup_logging as celery_setup_logging

from fastserve.runtime.config import Config
from fastserve.runtime.logs import setup_logging
from fastserve.runtime.redis_server import DEFAULT_URL

RUN_JOB = "fastserve.run_job"

# Service modules whose `@job_handler`s the worker registers; each service issue adds its own.
JOB_MODULES: list[str] = [f"fastserve.services.{name}.jobs" for name in ("preprocessing", "training", "optimization")]


def celery_settings(config: Config) -> dict[str, Any]:
    url = config.redis_url or DEFAULT_URL
    return {
        "broker_url": url,
        "result_backend": url,
        # JSON only: pickle would let whoever can write to Redis run code on the workers.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A job is acknowledged only when done, and given back if its worker dies, so a killed worker's
        # job is redelivered; prefetch 1 keeps queued jobs free for other workers.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Every broker and result key (queues, bindings, unacked, control fanout, results) under the stack's
        # prefix: a worker of one namespace never takes another's jobs on a shared Redis.
        "broker_transport_options": {"visibility_timeout": config.job_visibility_timeout,
                                     "global_keyprefix": config.redis_prefix},
        "result_backend_transport_options": {"visibility_timeout": config.job_visibility_timeout,
                                             "global_keyprefix": config.redis_prefix},
        "result_expires": 7 * 24 * 3600,
        "task_track_started": True,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "worker_concurrency": config.worker_concurrency,
        "include": ["fastserve.runtime.tasks", *JOB_MODULES],
    }


app = Celery("fastserve")
"""The worker's app, configured from the worker process's environment on first use."""


@functools.cache
def client_app(config: Config) -> Celery:
    """An app for a service process to send jobs with, configured from that service's `Config`."""
    client = Celery("fastserve-client")
    client.conf.update(celery_settings(config))
    return client


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_settings(Config.from_env()))


@celery_setup_logging.connect
def _worker_logging(**_: Any) -> None:
    config = Config.from_env()
    setup_logging("worker", config.log_format, config.log_level)
