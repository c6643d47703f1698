"""The GetJob, ListJobs, WatchJob and CancelJob RPCs, the same in every service that runs jobs.

A servicer inherits `JobRpcs` and names its service and generated module; each RPC translates the
request, calls the job store, and builds the reply from `fastserve.common.v1` messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import grpc

from fastserve.common.v1 import pagination_pb2
from fastserve.runtime.errors import InvalidArgument, NotFound
from fastserve.runtime.jobs import Job
from fastserve.runtime.protos import event_to_proto, job_to_proto, states_from_proto
from fastserve.runtime.stores import Stores


def _job_id(request) -> str:
    if not request.job_id:
        raise InvalidArgument("job_id is required", field="job_id")
    return request.job_id


class JobRpcs:
    """Mixin for servicers of services with jobs: set `service`, `pb2` and `stores`."""

    service: str
    pb2: ModuleType
    stores: Stores

    def _owned(self, job_id: str) -> Job:
        job = self.stores.jobs.get(job_id)
        if job.service != self.service:
            # Jobs share one store; a service answers only for its own.
            raise NotFound(f"no {self.service} job {job_id!r}")
        return job

    def GetJob(self, request, context: grpc.ServicerContext):
        return self.pb2.GetJobResponse(job=job_to_proto(self._owned(_job_id(request))))

    def ListJobs(self, request, context: grpc.ServicerContext):
        page = self.stores.jobs.list(
            self.service, job_type=request.filter.job_type, states=states_from_proto(request.filter.states),
            page_size=request.page.page_size, page_token=request.page.page_token)
        return self.pb2.ListJobsResponse(
            jobs=[job_to_proto(j) for j in page.jobs],
            page=pagination_pb2.PageResponse(next_page_token=page.next_page_token, total_size=page.total_size))

    def WatchJob(self, request, context: grpc.ServicerContext) -> Iterator:
        job_id = _job_id(request)
        self._owned(job_id)
        for event in self.stores.jobs.events(job_id, request.after_event_id, stop=lambda: not context.is_active()):
            yield self.pb2.WatchJobResponse(event=event_to_proto(event))

    def CancelJob(self, request, context: grpc.ServicerContext):
        job_id = _job_id(request)
        self._owned(job_id)
        return self.pb2.CancelJobResponse(job=job_to_proto(self.stores.jobs.request_cancel(job_id, request.reason)))
