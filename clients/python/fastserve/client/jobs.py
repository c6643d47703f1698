"""The job RPCs every job service has (GetJob, ListJobs, CancelJob, WatchJob), and waiting for a job."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType

import grpc

from fastserve.client.calls import READ, RETRYABLE, ServiceClient
from fastserve.client.errors import ClientError
from fastserve.client.specs import enum_value
from fastserve.common.v1 import jobs_pb2, pagination_pb2

TERMINAL = frozenset({jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED})


def state_name(state: int) -> str:
    """`JOB_STATE_SUCCEEDED` -> `SUCCEEDED`."""
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


class JobClient(ServiceClient):
    """A client of a service that runs jobs; `pb` is the service's generated message module."""

    pb: ModuleType

    def get_job(self, job_id: str, *, timeout: float | None = None) -> jobs_pb2.Job:
        return self._unary("GetJob", self.pb.GetJobRequest(job_id=job_id), timeout, READ, True).job

    def list_jobs(self, *, job_type: str = "", states: Iterable[str | int] = (), page_size: int = 0,
                  page_token: str = "", timeout: float | None = None):
        """One page of this service's jobs, newest first (`.jobs`, `.page.next_page_token`)."""
        request = self.pb.ListJobsRequest(
            filter=jobs_pb2.JobFilter(job_type=job_type,
                                      states=[enum_value(jobs_pb2.JobState, s, "filter.states") for s in states]),
            page=pagination_pb2.PageRequest(page_size=page_size, page_token=page_token))
        return self._unary("ListJobs", request, timeout, READ, True)

    def cancel_job(self, job_id: str, reason: str = "", *, timeout: float | None = None) -> jobs_pb2.Job:
        # Not retried: a cancel that reached the server but whose reply was lost would be refused the
        # second time (the job may have finished cancelling).
        return self._unary("CancelJob", self.pb.CancelJobRequest(job_id=job_id, reason=reason), timeout, READ,
                           False).job

    def watch_job(self, job_id: str, after_event_id: str = "", *,
                  timeout: float | None = None) -> Iterator[jobs_pb2.JobEvent]:
        """The job's events, history first, until the one reporting a terminal state. A stream broken
        by UNAVAILABLE is resumed after the last event received (with the retry policy's backoff), so
        no event is missed or repeated."""
        policy, failures, start = self._caller.retry, 0, time.monotonic()
        while True:
            try:
                request = self.pb.WatchJobRequest(job_id=job_id, after_event_id=after_event_id)
                # Only a deadline given here: the client's `timeout` would cut a job that runs for hours.
                for reply in self._caller.stream(self._stub.WatchJob, request, timeout):
                    failures = 0
                    after_event_id = reply.event.event_id
                    yield reply.event
                return
            except ClientError as error:
                failures += 1
                # A watch that never reached the server (the stack is down) fails at once, as other calls
                # do; one broken after events arrived rides through a restart.
                never_reached = error.unreachable and not after_event_id and \
                    time.monotonic() - start + policy.backoff(failures - 1) > policy.unreachable_for
                if error.code not in RETRYABLE or failures >= policy.attempts or never_reached:
                    error.attempts = failures
                    raise
            time.sleep(policy.backoff(failures - 1))

    def wait_job(self, job_id: str, *, timeout: float | None = None,
                 on_event: Callable[[jobs_pb2.JobEvent], None] = lambda event: None) -> jobs_pb2.Job:
        """Watch the job until it ends, handing each event to `on_event`; return it in its final state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in self.watch_job(job_id, timeout=timeout):
            on_event(event)
            if event.state in TERMINAL:
                break
        left = None if deadline is None else max(0.1, deadline - time.monotonic())
        job = self.get_job(job_id, timeout=left)
        if job.state not in TERMINAL:
            raise ClientError(grpc.StatusCode.UNAVAILABLE, f"the watch of job {job_id} ended before the job did")
        return job
