"""How every client call is made: a deadline, retries with backoff for idempotent calls, and gRPC
errors turned into `ClientError`."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from fastserve.client.errors import ClientError

# Only UNAVAILABLE: the server (or a model it is swapping) could not take the call, so it did no work.
# DEADLINE_EXCEEDED is not retried: the work may have run, and a retry would double the wait.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of idempotent calls: `attempts` tries in all, waiting `initial_backoff` seconds after the
    first failure, `multiplier` times longer after each next one, at most `max_backoff`; a call that
    reached no server only within `unreachable_for` seconds."""

    attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    # Each wait is shortened by a random fraction up to this, so that clients that failed together
    # (a server restart) do not all come back in the same instant.
    jitter: float = 0.2
    # A call that reached no server (nothing listens: a stopped stack) is retried only while the next
    # try would start within this many seconds of the first: by default not at all, so that a user who
    # has not started the stack hears so at once rather than after seconds of backoff. A script that
    # must ride out a server restart gives it a window.
    unreachable_for: float = 0.0

    def backoff(self, retry: int) -> float:
        """The wait after failed try number `retry + 1`."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** retry)
        return base * (1.0 - random.uniform(0.0, self.jitter))


class Caller:
    """Makes the calls of one client; `timeout` (seconds) replaces every call's default deadline."""

    def __init__(self, retry: RetryPolicy, timeout: float | None = None) -> None:
        self.retry, self.timeout = retry, timeout

    def deadline(self, given: float | None, default: float | None) -> float | None:
        if given is not None:
            return given
        return self.timeout if self.timeout is not None else default

    def unary(self, rpc: Callable[..., Any], request: Any, timeout: float | None, idempotent: bool) -> Any:
        """One reply; an idempotent call that gets UNAVAILABLE is tried again (each try with the whole
        deadline; one that reached no server only within the policy's `unreachable_for`), any other
        call is tried once."""
        attempts, attempt, start = (self.retry.attempts if idempotent else 1), 1, time.monotonic()
        while True:
            try:
                return rpc(request, timeout=timeout)
            except grpc.RpcError as error:
                failure, wait = ClientError.from_rpc_error(error, attempt), self.retry.backoff(attempt - 1)
                late = failure.unreachable and time.monotonic() + wait - start > self.retry.unreachable_for
                if attempt >= attempts or failure.code not in RETRYABLE or late:
                    raise failure from error
            time.sleep(wait)
            attempt += 1

    def stream(self, rpc: Callable[..., Any], request: Any, timeout: float | None) -> Iterator[Any]:
        """The replies of a server stream, never retried here (a resumable stream retries itself)."""
        call = rpc(request, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as error:
            raise ClientError.from_rpc_error(error) from error
        finally:
            # A caller that stops early cancels the call, so the server stops the work (a generation
            # frees its batch slot).
            call.cancel()


# Default deadlines, in seconds, by kind of call.
READ = 10.0        # get, list, status
SUBMIT = 30.0      # submitting a job (queues it and returns)
COMPUTE = 60.0     # embed, classify, inline cleaning and tokenizing: may wait for a batch
GENERATE = 300.0   # a whole completion
LOAD = 600.0       # loading and warming a model
UPLOAD = 3600.0    # a corpus of any size


class ServiceClient:
    """Base of the per-service clients: a stub of `stub_class` and the calls' `Caller`."""

    stub_class: type

    def __init__(self, channel: grpc.Channel, caller: Caller) -> None:
        self._stub = self.stub_class(channel)
        self._caller = caller

    def _unary(self, method: str, request: Any, timeout: float | None, default: float | None,
               idempotent: bool) -> Any:
        return self._caller.unary(getattr(self._stub, method), request, self._caller.deadline(timeout, default),
                                  idempotent)

    def _submit(self, method: str, request: Any, timeout: float | None) -> Any:
        """A job submit, retried like an idempotent call: it carries a request id (a fresh one unless the
        caller gave one), and the server returns the job an earlier try with that id created."""
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        return self._unary(method, request, timeout, SUBMIT, True)

    def _stream(self, method: str, request: Any, timeout: float | None, default: float | None) -> Iterator[Any]:
        return self._caller.stream(getattr(self._stub, method), request, self._caller.deadline(timeout, default))
