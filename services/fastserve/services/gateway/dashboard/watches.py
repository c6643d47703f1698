"""WatchJob of the job services on grpc.aio channels, read by the event loop: a dashboard tab watching a
job holds a stream for as long as the job runs, which on a blocking channel would hold a worker thread.

The channels are made as the blocking client's (same targets, TLS, token and limits), in the running
loop on first use, and closed with the app."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from fastserve.client import FastServeClient
from fastserve.client.aio import Metadata, ServerStream, make_aio_channel
from fastserve.optimization.v1 import optimization_pb2, optimization_pb2_grpc
from fastserve.preprocessing.v1 import preprocessing_pb2, preprocessing_pb2_grpc
from fastserve.training.v1 import training_pb2, training_pb2_grpc

_STUBS = {"preprocessing": (preprocessing_pb2, preprocessing_pb2_grpc.PreprocessingServiceStub),
          "training": (training_pb2, training_pb2_grpc.TrainingServiceStub),
          "optimization": (optimization_pb2, optimization_pb2_grpc.OptimizationServiceStub)}


class JobWatches:
    """`watch(service, job_id, after)`: the job's events as a `ServerStream`; cancel it to end the call."""

    def __init__(self, client: FastServeClient, metadata: Callable[[], Metadata] = lambda: ()) -> None:
        self._client, self._metadata = client, metadata
        self._channels: dict[str, tuple[grpc.aio.Channel, object]] = {}
        settings = client._channel_settings
        # gRPC refuses call credentials on a plaintext channel: the token goes as metadata there.
        token, tls = settings.get("token"), settings.get("tls_ca")
        self._static: Metadata = (("authorization", f"Bearer {token}"),) if token and not tls else ()

    def _stub(self, service: str):
        if service not in self._channels:
            retry = self._client._caller.retry
            options = [("grpc.initial_reconnect_backoff_ms", int(retry.initial_backoff * 1000) or 1),
                       ("grpc.max_reconnect_backoff_ms", int(retry.max_backoff * 1000) or 1)]
            channel = make_aio_channel(self._client.targets[service], options=options,
                                       **self._client._channel_settings)
            self._channels[service] = (channel, _STUBS[service][1](channel))
        return self._channels[service][1]

    def watch(self, service: str, job_id: str, after: str = "") -> ServerStream:
        pb = _STUBS[service][0]
        request = pb.WatchJobRequest(job_id=job_id, after_event_id=after)
        # No deadline: a watch lasts as long as the job; the caller cancels it when its client leaves.
        metadata = self._static + tuple(self._metadata())
        return ServerStream(self._stub(service).WatchJob(request, metadata=metadata or None))

    async def close(self) -> None:
        for channel, _stub in self._channels.values():
            await channel.close()
        self._channels.clear()
