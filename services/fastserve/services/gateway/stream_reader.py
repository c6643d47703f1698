"""`StreamReader`: the messages of a blocking gRPC response stream handed to the event loop in batches.

A streamed completion gets one message per generated token. Fetching each with `next` in a worker thread
(`run_in_threadpool`) costs the event loop a thread hop per token: a limiter token, a cancel scope, a
future and a wake-up, which on a small machine is CPU taken from the engine. Here one thread per stream
reads the call and the loop is woken only when it waits on an empty buffer, so whatever arrived in the
meantime comes out in one batch.

The thread reads the gRPC call itself, not the client's generator around it (`yield from call`, see
`fastserve.client.calls.Caller.stream`), so that the generator is never running in the thread:
closing it from the loop, at any moment, cancels the call, and the blocked read ends with CANCELLED.
An error is thrown back into the generator, which turns it into the client's `ClientError` as a plain
iteration would.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Generator
from typing import Any

END = object()
"""The batch item after the last message."""


class Failure:
    """The batch item for an error that ended the call; `raise_in` raises it as the client would."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def raise_in(self, stream: Generator) -> None:
        stream.throw(self.error)
        raise self.error  # the generator swallowed it: still an error


class StreamReader:
    """Reads `call` (the gRPC call a client stream delegates to) on a daemon thread into a buffer of the
    loop. It keeps no reference to the stream, so that the stream can be a weak key to it."""

    def __init__(self, call: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._call, self._loop = call, loop
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future | None = None
        self._thread = threading.Thread(target=self._read, name="gateway-stream", daemon=True)

    @classmethod
    def attach(cls, stream: Any) -> StreamReader | None:
        """A started reader of `stream` once its first message was taken, or None when `stream` is not
        a generator suspended in `yield from` a call (the caller then reads it message by message)."""
        call = getattr(stream, "gi_yieldfrom", None)
        if call is None or not hasattr(call, "cancel"):
            return None
        reader = cls(call, asyncio.get_running_loop())
        reader._thread.start()
        return reader

    def _read(self) -> None:
        while True:
            try:
                item = next(self._call)
            except StopIteration:
                item = END
            except BaseException as error:  # noqa: BLE001 - handed to the loop, which raises it
                item = Failure(error)
            with self._lock:
                self._items.append(item)
                waiter, self._waiter = self._waiter, None
            if waiter is not None:
                try:
                    self._loop.call_soon_threadsafe(_wake, waiter)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return
            if item is END or isinstance(item, Failure):
                return

    async def batch(self) -> list:
        """Every message read since the last batch, waiting for one if there is none; ends with END or
        a Failure once the call is over."""
        with self._lock:
            if not self._items:
                self._waiter = waiter = self._loop.create_future()
            else:
                waiter = None
        if waiter is not None:
            await waiter
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


# The fields of GenerateStreamResponse and ChatStreamResponse that `coalesce` knows how to join; a message
# with any other field set is passed on as it is.
_JOINABLE = frozenset({"text", "token_ids", "logprobs", "index", "finish_reason", "usage"})


def coalesce(items: list) -> list:
    """`items` with each run of consecutive messages of one completion joined into one: text, token ids
    and logprobs concatenated (as the unary reply's are), the finish reason and usage of the last. The
    loop's cost is per message sent, so a loop that fell behind catches up with fewer, larger chunks;
    one that keeps up gets batches of one, and every token still goes out as soon as it is read."""
    out: list = []
    for item in items:
        last = out[-1] if out else None
        if (last is not None and type(item) is type(last) and _joinable(last) and _joinable(item)
                and last.index == item.index and not last.finish_reason and not last.HasField("usage")):
            last.text += item.text
            last.token_ids.extend(item.token_ids)
            last.logprobs.extend(item.logprobs)
            if item.finish_reason:
                last.finish_reason = item.finish_reason
            if item.HasField("usage"):
                last.usage.CopyFrom(item.usage)
        else:
            out.append(item)
    return out


def _joinable(message: Any) -> bool:
    return hasattr(message, "ListFields") and all(field.name in _JOINABLE for field, _ in message.ListFields())


class Throttle:
    """`due()` is true at most once every `seconds`, the first time at once: for checks too dear to make
    on every message (Starlette's `is_disconnected` costs a cancel scope and a task cancellation)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self._next = seconds, 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.seconds
        return True
