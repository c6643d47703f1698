"""WatchJob of the job services on grpc.aio channels (`AsyncJobClient`), read by the event loop: a
dashboard tab watching a job holds a stream for as long as the job runs, which on a blocking channel
would hold a worker thread. The clients are made as the blocking client's, in the running loop on first
use, and closed with the app."""

from __future__ import annotations

from collections.abc import Callable

from fastserve.client import FastServeClient
from fastserve.client.aio import AsyncJobClient, Metadata, ServerStream


class JobWatches:
    """`watch(service, job_id, after)`: the job's events as a `ServerStream`; cancel it to end the call."""

    def __init__(self, client: FastServeClient, metadata: Callable[[], Metadata] = lambda: ()) -> None:
        self._client, self._metadata = client, metadata
        self._clients: dict[str, AsyncJobClient] = {}

    def watch(self, service: str, job_id: str, after: str = "") -> ServerStream:
        if service not in self._clients:
            self._clients[service] = AsyncJobClient.from_client(self._client, service, metadata=self._metadata)
        return self._clients[service].watch_job(job_id, after)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
