"""One runner per job, and recovery of jobs whose worker died.

A runner holds a lease on its job, a Redis key with a short TTL that a heartbeat thread renews. A
second delivery of the same job (a redelivered message, a requeue) finds the lease taken and does
nothing, so a job never runs twice at once. When a worker dies outright (SIGKILL, lost machine), its
lease expires; `recover_orphans`, which every worker runs periodically, finds RUNNING jobs without a
lease and queues them again, and their handlers resume from their last checkpoint. Redis' own
redelivery of unacknowledged messages waits for the visibility timeout, which must outlast any job.

The lease fences its runner: `held()` is true only while the last confirmed renewal leaves more than
a third of the TTL, so a runner that cannot renew (its key expired and another worker took it, or
Redis stopped answering) learns it has lost the job while the key can still be its own, stops, and
writes no result; another worker can take the job only once that key has expired.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis

from fastserve.runtime.jobs import EventType, JobStore

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


class LeaseLost(Exception):
    """Raised in a runner that no longer holds its job's lease: it must stop and write nothing more."""


class JobLease:
    """The exclusive right to run a job, renewed every third of its TTL while held."""

    def __init__(self, store: JobStore, job_id: str, ttl_seconds: float) -> None:
        self.client, self.key, self.ttl_ms = store.redis, store.job_key(job_id, "lease"), int(ttl_seconds * 1000)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None
        self._valid_until = 0.0

    def acquire(self) -> bool:
        started = time.monotonic()
        if not self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
            return False
        self._valid_until = started + self.ttl_ms / 1000
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.key}")
        self._thread.start()
        return True

    def held(self) -> bool:
        """Whether this runner may still act for its job. False once a renewal found the key gone or
        another's, and once renewals have failed for two thirds of the TTL: the third left is the
        runner's time to stop (and checkpoint) before the key can expire and another worker take it."""
        return not self._lost.is_set() and time.monotonic() < self._valid_until - self.ttl_ms / 3000

    def check(self) -> None:
        """Raise LeaseLost unless `held()`."""
        if not self.held():
            raise LeaseLost(f"the lease {self.key} was lost")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            # Timed from before the call: the key's TTL runs from when Redis ran it, no earlier.
            started = time.monotonic()
            try:
                if not self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms):
                    log.warning("lost the lease %s: it expired or another worker holds it", self.key)
                    self._lost.set()
                    return
                self._valid_until = started + self.ttl_ms / 1000
            except redis.RedisError:
                log.warning("could not renew the lease %s", self.key, exc_info=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        try:
            self.client.eval(_RELEASE, 1, self.key, self.token)
        except redis.RedisError:
            # The key then expires on its own, and the sweeper queues the job again if it did not end.
            log.warning("could not release the lease %s", self.key, exc_info=True)


def recover_orphans(store: JobStore, services: tuple[str, ...], requeue: Callable[[str, str], None],
                    claim_seconds: float) -> list[str]:
    """Queue again every RUNNING or CANCELLING job of `services` whose lease has expired.

    A short-lived claim key makes sure that of several workers sweeping at once, one requeues.
    """
    requeued = []
    for service in services:
        for job in store.active(service):
            if store.redis.exists(store.job_key(job.job_id, "lease")):
                continue
            if not store.redis.set(store.job_key(job.job_id, "requeue"), 1, nx=True, px=int(claim_seconds * 1000)):
                continue
            store.report(job.job_id, EventType.LOG, "its worker was lost; queued again to resume")
            requeue(service, job.job_id)
            requeued.append(job.job_id)
            log.warning("job %s of %s lost its worker; queued again", job.job_id, service)
    return requeued
