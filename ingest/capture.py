"""Reading one metered answer beside the client and turning it into a usage event.

A `Capture` is fed the upstream's bytes as they pass. For streams it spots the
terminal event (Responses: `response.completed` / `.incomplete` / `.failed`; Chat
Completions: the usage chunk) so the proxy can journal the event before forwarding
that chunk. For JSON answers it parses the whole body at the end. When the proxy
asked a Chat Completions stream for usage on the client's behalf, it also removes
what the client did not ask for, so the client sees what the upstream would have sent it.
"""

from __future__ import annotations

import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from ingest import usage
from ingest.events import TERMINAL_STATUSES, EventKind, UsageEvent
from ingest.sse import SSESplitter, event_fields

Endpoint = Literal["responses", "chat.completions"]

_RESPONSE_EVENTS_WITH_OBJECT = frozenset(
    {
        b"response.created",
        b"response.queued",
        b"response.in_progress",
        b"response.completed",
        b"response.incomplete",
        b"response.failed",
        b"response.cancelled",
    }
)
_DELTA_MARK = b'"type":"response.output_text.delta"'


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(slots=True)
class RequestFacts:
    """What the proxy learned from the request (never its content)."""

    endpoint: Endpoint
    kind: EventKind
    started_us: int
    started_perf: float
    key_fingerprint: str | None = None
    requested_model: str | None = None
    user_id: str | None = None
    user_source: str | None = None
    metadata: str | None = None
    previous_response_id: str | None = None
    stream: bool = False
    background: bool = False
    store: bool = True
    strip_chat_usage: bool = False
    response_id: str | None = None  # for retrieve / cancel
    hold: Any = None  # set by the admission hook (a quota reservation); opaque here

    def new_event(self) -> UsageEvent:
        return UsageEvent(
            kind=self.kind,
            event_id=self.response_id or "",
            response_id=self.response_id,
            endpoint=self.endpoint,
            status="in_progress",
            created_at_us=self.started_us,
            request_started_at_us=self.started_us,
            recorded_at_us=0,
            requested_model=self.requested_model,
            model=self.requested_model,
            user_id=self.user_id,
            user_source=self.user_source,
            metadata=self.metadata,
            previous_response_id=self.previous_response_id,
            background=self.background,
            streamed=self.stream,
            key_fingerprint=self.key_fingerprint,
        )


def finalize(event: UsageEvent, facts: RequestFacts, http_status: int | None) -> UsageEvent:
    """Stamp the bookkeeping fields just before journaling."""
    event.http_status = http_status
    if not event.event_id:
        event.event_id = event.response_id or f"evt_{uuid.uuid4().hex}"
    event.recorded_at_us = now_us()
    event.latency_ms = round((time.perf_counter() - facts.started_perf) * 1000, 3)
    return event


def error_event(facts: RequestFacts, http_status: int, body: Any) -> UsageEvent:
    """A request answered with an HTTP error before any response existed."""
    event = facts.new_event()
    event.kind = "create"
    event.event_id = ""
    event.response_id = None
    event.status = "error"
    usage.apply_error_body(event, body)
    return finalize(event, facts, http_status)


class Decoder:
    """Undo a Content-Encoding for our side copy (the client gets the raw bytes)."""

    def __init__(self, encoding: str | None) -> None:
        encoding = (encoding or "identity").strip().lower()
        self.supported = encoding in ("identity", "gzip", "x-gzip", "deflate")
        self._inflate = None if encoding == "identity" else zlib.decompressobj(zlib.MAX_WBITS | 32)

    def feed(self, chunk: bytes) -> bytes:
        return chunk if self._inflate is None else self._inflate.decompress(chunk)


class JSONCapture:
    """A whole JSON answer: parsed once it has all arrived."""

    def __init__(self, facts: RequestFacts, encoding: str | None) -> None:
        self.facts = facts
        self._decoder = Decoder(encoding)

    def parse(self, body: bytes) -> dict[str, Any] | None:
        if not self._decoder.supported:
            return None
        try:
            parsed = orjson.loads(self._decoder.feed(body))
        except (orjson.JSONDecodeError, zlib.error):
            return None
        return parsed if isinstance(parsed, dict) else None

    def event(self, obj: dict[str, Any], http_status: int) -> UsageEvent | None:
        """The event for a successful answer, or None if there is nothing to record
        (a retrieve of a response that is still running)."""
        event = self.facts.new_event()
        if self.facts.endpoint == "responses":
            usage.apply_response(event, obj)
        else:
            usage.apply_chat_completion(event, obj)
            event.status = usage.chat_status(event)
        if self.facts.kind == "update" and event.status not in TERMINAL_STATUSES:
            return None
        event.event_id = event.response_id or ""
        return finalize(event, self.facts, http_status)


class StreamCapture:
    """An SSE answer, read event by event as it passes."""

    def __init__(self, facts: RequestFacts, encoding: str | None, http_status: int) -> None:
        self.facts = facts
        self.http_status = http_status
        self.event = facts.new_event()
        self.event.streamed = True
        self.done = False  # the terminal event has been seen
        self._splitter = SSESplitter()
        self._decoder = Decoder(encoding)
        self._seen_first_chunk = False

    def feed(self, chunk: bytes) -> bytes:
        """Read `chunk`; return the bytes to forward to the client."""
        if not self._decoder.supported:
            return chunk
        decoded = self._decoder.feed(chunk)
        if self.facts.strip_chat_usage:
            # Re-frame on event boundaries: what we forward is rebuilt from whole events.
            return b"".join(self._strip(raw) for raw in self._splitter.feed(decoded))
        for raw in self._splitter.feed(decoded):
            self._read(raw)
        return chunk

    def flush_tail(self) -> bytes:
        """Bytes of an unterminated last event (forwarded as they were)."""
        return self._splitter.pending if self.facts.strip_chat_usage else b""

    def _read(self, raw: bytes) -> None:
        if self.facts.endpoint == "responses":
            self._read_responses_event(raw)
        else:
            self._read_chat_chunk(raw)

    def _read_responses_event(self, raw: bytes) -> None:
        # Most events are deltas: reject them on their `event:` line without parsing.
        if raw.startswith(b"event: "):
            head = raw[7 : raw.find(b"\n")].rstrip(b"\r")
            if head not in _RESPONSE_EVENTS_WITH_OBJECT and head != b"error":
                return
        name, data = event_fields(raw)
        if name is not None and name not in _RESPONSE_EVENTS_WITH_OBJECT and name != b"error":
            return
        if name is None and (not data or _DELTA_MARK in data):
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if kind == "error":
            self.event.status = "failed"
            self.event.error_type = "stream_error"
            self.event.error_code = obj.get("code") if isinstance(obj.get("code"), str) else None
            self.done = True
            return
        response = obj.get("response")
        if isinstance(response, dict):
            usage.apply_response(self.event, response)
            if self.event.status in TERMINAL_STATUSES and kind != "response.created":
                self.done = True

    def _read_chat_chunk(self, raw: bytes) -> None:
        _, data = event_fields(raw)
        if not data or data == b"[DONE]":
            return
        first = not self._seen_first_chunk
        if not (first or b'"usage":{' in data or b'"finish_reason":"' in data):
            return
        self._seen_first_chunk = True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(obj, dict):
            usage.apply_chat_completion(self.event, obj)
            if isinstance(obj.get("usage"), dict):
                self.event.status = usage.chat_status(self.event)
                self.done = True

    def _strip(self, raw: bytes) -> bytes:
        self._read_chat_chunk(raw)
        _, data = event_fields(raw)
        if data.startswith(b"{") and b'"usage":{' in data and b'"choices":[]' in data:
            return b""  # the usage-only chunk the client did not ask for
        return raw.replace(b',"usage":null', b"")

    def finish(self, *, client_disconnected: bool) -> UsageEvent:
        """The event at the end of the stream, whatever happened to it."""
        event = self.event
        if not self.done:
            # The stream ended before its terminal event: record what is known.
            event.status = "interrupted"
        event.client_disconnected = client_disconnected
        event.event_id = event.response_id or ""
        return finalize(event, self.facts, self.http_status)
