"""One runner per job, and recovery of jobs whose worker died.

A runner holds a lease on its job, a Redis key with a short TTL that a heartbeat thread renews. A
second delivery of the same job (a redelivered message, a requeue) finds the lease taken and does
nothing, so a job never runs twice at once. When a worker dies outright (SIGKILL, lost machine), its
lease expires; `recover_orphans`, which every worker runs periodically, finds RUNNING jobs without a
lease and queues them again, and their handlers resume from their last checkpoint. Redis' own
redelivery of unacknowledged messages waits for the visibility timeout, which must outlast any job.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable

import redis

from fastserve.runtime.jobs import EventType, JobState, JobStore

log = logging.getLogger(__name__)

# Renew only a lease we still hold: after a long stall another runner may own it.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class JobLease:
    """The exclusive right to run a job, renewed every third of its TTL while held."""

    def __init__(self, store: JobStore, job_id: str, ttl_seconds: float) -> None:
        self.client, self.key, self.ttl_ms = store.redis, store.job_key(job_id, "lease"), int(ttl_seconds * 1000)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return False
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.key}")
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms):
                    log.warning("lost the lease %s", self.key)
                    return
            except redis.RedisError:
                log.warning("could not renew the lease %s", self.key, exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.client.eval(_RELEASE, 1, self.key, self.token)


def recover_orphans(store: JobStore, services: tuple[str, ...], requeue: Callable[[str, str], None],
                    claim_seconds: float) -> list[str]:
    """Queue again every RUNNING or CANCELLING job of `services` whose lease has expired.

    A short-lived claim key makes sure that of several workers sweeping at once, one requeues.
    """
    requeued = []
    for service in services:
        page = store.list(service, states=frozenset({JobState.RUNNING, JobState.CANCELLING}),
                          page_size=1000)
        for job in page.jobs:
            if store.redis.exists(store.job_key(job.job_id, "lease")):
                continue
            if not store.redis.set(store.job_key(job.job_id, "requeue"), 1, nx=True, px=int(claim_seconds * 1000)):
                continue
            store.report(job.job_id, EventType.LOG, "its worker was lost; queued again to resume")
            requeue(service, job.job_id)
            requeued.append(job.job_id)
            log.warning("job %s of %s lost its worker; queued again", job.job_id, service)
    return requeued
