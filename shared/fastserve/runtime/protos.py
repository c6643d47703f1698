"""Conversions between the core's plain objects and `fastserve.common.v1` messages."""

from __future__ import annotations

from google.protobuf import struct_pb2, timestamp_pb2

from fastserve.common.v1 import artifacts_pb2, jobs_pb2
from fastserve.runtime.errors import InvalidArgument
from fastserve.runtime.jobs import Job, JobEvent, JobState
from fastserve.storage.artifacts import parse_uri

ARTIFACT_KINDS = {"corpora": "CORPUS", "datasets": "DATASET", "tokenizers": "TOKENIZER",
                  "checkpoints": "CHECKPOINT", "models": "MODEL", "reports": "REPORT"}


def job_to_proto(job: Job) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        job_id=job.job_id, service=job.service, job_type=job.job_type,
        state=jobs_pb2.JobState.Value(f"JOB_STATE_{job.state.value}"), progress=job.progress,
        message=job.message, error=job.error, params=struct(job.params), result=struct(job.result),
        create_time=timestamp(job.create_time), update_time=timestamp(job.update_time),
        start_time=timestamp(job.start_time), end_time=timestamp(job.end_time), cancel_requested=job.cancel_requested)


def event_to_proto(event: JobEvent) -> jobs_pb2.JobEvent:
    return jobs_pb2.JobEvent(
        job_id=event.job_id, event_id=event.event_id,
        type=jobs_pb2.JobEventType.Value(f"JOB_EVENT_TYPE_{event.type.value}"),
        state=jobs_pb2.JobState.Value(f"JOB_STATE_{event.state.value}"), progress=event.progress,
        message=event.message, data=struct(event.data), time=timestamp(event.time))


def states_from_proto(states) -> frozenset[JobState]:
    if jobs_pb2.JOB_STATE_UNSPECIFIED in states:
        raise InvalidArgument("JOB_STATE_UNSPECIFIED is not a state to filter on", field="filter.states")
    return frozenset(JobState(jobs_pb2.JobState.Name(s).removeprefix("JOB_STATE_")) for s in states)


def struct(values: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def timestamp(seconds: float) -> timestamp_pb2.Timestamp | None:
    if not seconds:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def artifact_ref(uri: str) -> artifacts_pb2.ArtifactRef:
    """An ArtifactRef for a published artifact's URI (with its version)."""
    ref = parse_uri(uri)
    return artifacts_pb2.ArtifactRef(uri=uri, kind=artifacts_pb2.ArtifactKind.Value(
        f"ARTIFACT_KIND_{ARTIFACT_KINDS[ref.kind]}"), name=ref.name, version=ref.version or 0)
