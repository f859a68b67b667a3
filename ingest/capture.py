"""Reading one metered answer beside the client and turning it into a usage event.

A `Capture` is fed the upstream's bytes as they pass. For streams it spots the
terminal event (Responses: `response.completed` / `.incomplete` / `.failed`; Chat
Completions: the usage chunk) so the proxy can journal the event before forwarding
that chunk. For JSON answers it parses the whole body at the end. When the proxy
asked a Chat Completions stream for usage on the client's behalf, it also removes
what the client did not ask for, so the client sees what the upstream would have sent it.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from tokentill.ingest import json_text, usage
from tokentill.ingest.sse import SSEParser, event_fields, lead, replace_data
from tokentill.warehouse.events import TERMINAL_STATUSES, EventKind, UsageEvent
from tokentill.warehouse.events import now_us as now_us  # re-exported: the proxy's clock

Endpoint = Literal[
    "responses",
    "chat.completions",
    "completions",
    "embeddings",
    "moderations",
    "images.generations",
    "images.edits",
    "images.variations",
    "audio.transcriptions",
    "audio.translations",
    "audio.speech",
    "realtime",
    "realtime.transcription",
]

# The pre-filters: bytes an event must contain to be worth parsing. A `\u` escape may
# spell any of them, so an event with one is always parsed.
# Between a key and its value the raw block may hold blanks and, when the payload is
# split over several `data:` lines, line ends and `data:` prefixes.
_GAP = rb"(?:\s|data:)*"
_CHAT_INTEREST = re.compile(rb'"(?:usage|finish_reason)"' + _GAP + b":" + _GAP + rb'[{"]|\\u')


def _may_carry_response(block: bytes) -> bool:
    """An event (its raw bytes) that may hold a `response` object or an `error` (every
    terminal event and `response.created`); never a bare delta, most of the stream."""
    return b'"response"' in block or b'"error"' in block or b"\\u" in block


# The events that end each typed stream, carrying its usage.
_TYPED_STREAMS: dict[str, frozenset[str]] = {
    "images.generations": frozenset({"image_generation.completed"}),
    "images.edits": frozenset({"image_edit.completed"}),
    "audio.transcriptions": frozenset({"transcript.text.done"}),
    "audio.translations": frozenset({"transcript.text.done"}),
    "audio.speech": frozenset({"speech.audio.done"}),
}


def _may_carry_usage(block: bytes) -> bool:
    """An event of a typed stream (its raw bytes) that may end it: one with a usage
    object, a `.done`/`.completed` type, or an error; never a delta's audio or image."""
    return (
        b'"usage"' in block
        or b".done" in block
        or b".completed" in block
        or b'"error"' in block
        or b"\\u" in block
    )


def _may_carry_chat_usage(block: bytes) -> bool:
    """A Chat Completions chunk (its raw bytes) that may hold a usage object or a
    finish reason."""
    return _CHAT_INTEREST.search(block) is not None


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


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
    body_user_id: str | None = None
    metadata: str | None = None
    truncated: str | None = None  # fields of the request cut to their bounds
    previous_response_id: str | None = None
    stream: bool = False
    background: bool = False
    store: bool = True
    strip_chat_usage: bool = False
    input_characters: int | None = None  # the text to speak (speech is priced by it)
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
            body_user_id=self.body_user_id,
            metadata=self.metadata,
            truncated_fields=self.truncated,
            previous_response_id=self.previous_response_id,
            background=self.background,
            streamed=self.stream,
            key_fingerprint=self.key_fingerprint,
            input_characters=self.input_characters,
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
        endpoint = self.facts.endpoint
        if endpoint == "responses":
            usage.apply_response(event, obj)
        elif endpoint == "embeddings":
            usage.apply_embedding(event, obj)
        elif endpoint == "moderations":
            usage.apply_moderation(event, obj)
        elif endpoint.startswith("images."):
            usage.apply_images(event, obj)
        elif endpoint in ("audio.transcriptions", "audio.translations"):
            usage.apply_transcription(event, obj)
        elif endpoint == "audio.speech":
            event.status = "completed"  # a JSON 200 from speech: no usage but the text's
        else:  # Chat Completions and the legacy Completions share their usage shape
            usage.apply_chat_completion(event, obj)
            event.status = usage.chat_status(event)
        if self.facts.kind == "update" and event.status not in TERMINAL_STATUSES:
            return None
        event.event_id = event.response_id or ""
        return finalize(event, self.facts, http_status)


class StreamCapture:
    """An SSE answer, read event by event as it passes.

    Events are read by their meaning: parsed as SSE, then as JSON, whatever the
    spacing, key order, line ends or chunk boundaries. Most events are deltas that
    carry nothing we need; a byte pre-filter skips them, and it can only err towards
    parsing (see `_may_carry_response` and `_may_carry_chat_usage`).
    """

    def __init__(
        self,
        facts: RequestFacts,
        encoding: str | None,
        http_status: int,
        announce: Callable[[UsageEvent], None] | None = None,
    ) -> None:
        """`announce` journals a pending record of the response as soon as its id is
        known (a Responses stream's `response.created`): if the process dies before the
        stream ends, that record is what a settlement finds and settles. The outcome at
        the end is then an update of it."""
        self.facts = facts
        self.http_status = http_status
        self.event = facts.new_event()
        self.event.streamed = True
        self.done = False  # the terminal event has been seen
        self._announce = announce
        self.announced = False
        self._parser = SSEParser()
        self._decoder = Decoder(encoding)
        self._seen_first_chunk = False

    @property
    def rewrites(self) -> bool:
        """Whether the client gets rebuilt bytes (decoded, re-framed) rather than the
        upstream's own: then Content-Length and Content-Encoding no longer hold."""
        return self.facts.strip_chat_usage and self._decoder.supported

    def feed(self, chunk: bytes) -> bytes:
        """Read `chunk`; return the bytes to forward to the client."""
        if not self._decoder.supported:
            return chunk
        blocks = self._parser.feed(self._decoder.feed(chunk))
        if self.facts.strip_chat_usage:
            # Forward what is rebuilt from whole events, less what the client did not ask for.
            return b"".join([self._strip(block) for block in blocks])
        if self.facts.endpoint == "responses":
            for block in blocks:
                if _may_carry_response(block):
                    data = event_fields(block)[1]
                    if data is not None:
                        self._read_responses_event(data)
        elif self.facts.endpoint in _TYPED_STREAMS:
            for block in blocks:
                if _may_carry_usage(block):
                    data = event_fields(block)[1]
                    if data is not None:
                        self._read_typed_event(data)
        else:
            for block in blocks:
                if not self._seen_first_chunk or _may_carry_chat_usage(block):
                    data = event_fields(block)[1]
                    if data is not None:
                        self._read_chat(data)
        return chunk

    def flush_tail(self) -> bytes:
        """Bytes of an unterminated last event (forwarded as they were)."""
        return self._parser.pending if self.rewrites else b""

    def _read_responses_event(self, data: bytes) -> None:
        obj = _json_object(data)
        if obj is None:
            return
        kind = obj.get("type")
        if kind == "error":
            self._failed(obj)
            return
        response = obj.get("response")
        if isinstance(response, dict):
            usage.apply_response(self.event, response)
            if self.event.status in TERMINAL_STATUSES and kind != "response.created":
                self.done = True
            elif self._announce is not None and not self.announced and self.event.response_id:
                pending = dataclasses.replace(self.event)
                pending.event_id = pending.response_id or ""
                self._announce(finalize(pending, self.facts, self.http_status))
                self.announced = True  # only once journaled: the end is then its update

    def _failed(self, error: dict[str, Any]) -> None:
        """The stream ended on an error event: the response failed."""
        code = error.get("code")
        self.event.status = "failed"
        self.event.error_type = "stream_error"
        self.event.error_code = code if isinstance(code, str) else None
        self.done = True

    def _read_typed_event(self, data: bytes) -> None:
        """An images, transcription or speech stream: usage comes with its last event."""
        obj = _json_object(data)
        if obj is None:
            return
        kind = obj.get("type")
        error = obj.get("error")
        if kind == "error" or isinstance(error, dict):
            self._failed(error if isinstance(error, dict) else obj)
            return
        if kind not in _TYPED_STREAMS[self.facts.endpoint]:
            return
        if self.facts.endpoint.startswith("images."):
            usage.apply_images(self.event, obj)
        elif self.facts.endpoint == "audio.speech":
            self.event.status = "completed"
            if isinstance(obj.get("usage"), dict):
                usage.apply_speech_usage(self.event, obj["usage"])
        else:
            usage.apply_transcription(self.event, obj)
        # The first image of several ends the record (each image's event carries its
        # own usage; a stream of several is rare and the record would otherwise wait).
        self.done = True

    def _read_chat(self, data: bytes) -> dict[str, Any] | None:
        """Read one chunk; return it parsed (None: not a JSON object, or `[DONE]`)."""
        obj = _json_object(data)
        if obj is None:
            return None
        self._seen_first_chunk = True
        usage.apply_chat_completion(self.event, obj)
        if isinstance(obj.get("usage"), dict):
            self.event.status = usage.chat_status(self.event)
            self.done = True
        return obj

    def _strip(self, block: bytes) -> bytes:
        """The event as the client would have had it had we not asked for usage: the
        usage-only chunk dropped, the `usage` member cut out of every other chunk."""
        asks_reading = not self._seen_first_chunk or _may_carry_chat_usage(block)
        if not asks_reading and b"usage" not in block and b"\\u" not in block:
            return block
        data = event_fields(block)[1]
        if data is None:
            return block
        obj = self._read_chat(data) if asks_reading else _json_object(data)
        if obj is None:
            return block
        if obj.get("choices") == [] and isinstance(obj.get("usage"), dict):
            return lead(block)  # the usage-only chunk the client did not ask for
        shorter = json_text.without_member(data, "usage", obj)
        return block if shorter is None else replace_data(block, shorter)

    def finish(self, *, client_disconnected: bool) -> UsageEvent:
        """The event at the end of the stream, whatever happened to it."""
        event = self.event
        if not self.done:
            # The stream ended before its terminal event: record what is known.
            event.status = "interrupted"
        event.client_disconnected = client_disconnected
        event.event_id = event.response_id or ""
        if self.announced:
            event.kind = "update"  # of the pending record journaled when it began
        return finalize(event, self.facts, self.http_status)
