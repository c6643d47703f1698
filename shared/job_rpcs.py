"""The GetJob, ListJobs, WatchJob and CancelJob RPCs, the same in every service that runs jobs.

A servicer inherits `JobRpcs` and names its service and generated module; each RPC translates the
request, calls the job store, and builds the reply from `fastserve.common.v1` messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import grpc
from fastserve.common.v1 import jobs_pb2, pagination_pb2
from google.protobuf import struct_pb2, timestamp_pb2

from shared.errors import InvalidArgument, NotFound
from shared.jobs import Job, JobEvent, JobState
from shared.stores import Stores


def job_to_proto(job: Job) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        job_id=job.job_id, service=job.service, job_type=job.job_type,
        state=jobs_pb2.JobState.Value(f"JOB_STATE_{job.state.value}"), progress=job.progress,
        message=job.message, error=job.error, params=_struct(job.params), result=_struct(job.result),
        create_time=_ts(job.create_time), update_time=_ts(job.update_time),
        start_time=_ts(job.start_time), end_time=_ts(job.end_time), cancel_requested=job.cancel_requested)


def event_to_proto(event: JobEvent) -> jobs_pb2.JobEvent:
    return jobs_pb2.JobEvent(
        job_id=event.job_id, event_id=event.event_id,
        type=jobs_pb2.JobEventType.Value(f"JOB_EVENT_TYPE_{event.type.value}"),
        state=jobs_pb2.JobState.Value(f"JOB_STATE_{event.state.value}"), progress=event.progress,
        message=event.message, data=_struct(event.data), time=_ts(event.time))


def states_from_proto(states) -> frozenset[JobState]:
    if jobs_pb2.JOB_STATE_UNSPECIFIED in states:
        raise InvalidArgument("JOB_STATE_UNSPECIFIED is not a state to filter on", field="filter.states")
    return frozenset(JobState(jobs_pb2.JobState.Name(s).removeprefix("JOB_STATE_")) for s in states)


def _struct(values: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def _ts(seconds: float) -> timestamp_pb2.Timestamp | None:
    if not seconds:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


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
