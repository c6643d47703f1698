"""Server-sent events, as the OpenAI streams and the dashboard's job events send them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse


class EventStream(StreamingResponse):
    """Server-sent events whose source is always closed, however the response ends (a client that went
    away included), so that closing it cancels the gRPC call behind it (the engine frees the slot, the
    job service ends the watch)."""

    def __init__(self, events: AsyncIterator[str]) -> None:
        # x-accel-buffering: a proxy in front (nginx) passes each event on as it comes.
        super().__init__(events, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def event(payload, *, name: str = "", ident: str = "") -> str:
    """One event: `payload` as compact JSON, with an `event:` name and an `id:` when given."""
    head = (f"event: {name}\n" if name else "") + (f"id: {ident}\n" if ident else "")
    return f"{head}data: {json.dumps(payload, separators=(',', ':'))}\n\n"
