"""Server-sent events on the wire, and the ASGI response that streams (or cuts) them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

DONE_FRAME: Final = b"data: [DONE]\n\n"


def event_frame(event_type: str, payload: bytes) -> bytes:
    """A Responses API frame: ``event: <type>`` then ``data: <json>``."""
    return b"event: " + event_type.encode() + b"\ndata: " + payload + b"\n\n"


def data_frame(payload: bytes) -> bytes:
    """A Chat Completions frame: ``data: <json>`` only."""
    return b"data: " + payload + b"\n\n"


class EventStream(Response):
    """A ``text/event-stream`` answer fed by an iterable of ready frames.

    `delay_s` pauses before every frame but the first; `initial_delay_s` pauses before
    the status line. With `cut_after`, only that many frames are sent and the
    connection is then dropped without finishing the chunked body, the way a broken
    upstream looks to a client. `on_finish` runs once the frames are exhausted or cut
    (even if the client went away meanwhile: the upstream kept generating).
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: Iterable[bytes],
        *,
        headers: Mapping[str, str],
        delay_s: float = 0.0,
        initial_delay_s: float = 0.0,
        cut_after: int | None = None,
        on_finish: Callable[[], None] | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self.frames = frames
        self.delay_s = delay_s
        self.initial_delay_s = initial_delay_s
        self.cut_after = cut_after
        self.on_finish = on_finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.initial_delay_s:
            await asyncio.sleep(self.initial_delay_s)
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            for sent, frame in enumerate(self.frames):
                if self.cut_after is not None and sent >= self.cut_after:
                    return  # no final body message: the server drops the connection
                if sent and self.delay_s:
                    await asyncio.sleep(self.delay_s)
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if self.on_finish is not None:
                self.on_finish()


class TruncatedBody(Response):
    """A JSON answer whose body stops halfway: the connection closes mid-message."""

    media_type = "application/json"

    def __init__(self, body: bytes, *, headers: Mapping[str, str]) -> None:
        self.status_code = 200
        self.background = None
        self.body = body
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        half = bytes(self.body[: max(1, len(self.body) // 2)])
        await send({"type": "http.response.body", "body": half, "more_body": True})
