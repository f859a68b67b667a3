"""The /v1 proxy: forwards every request to the upstream and meters the ones that cost money.

The hot path forwards bytes and reads usage beside them; it never touches the
database. Metered: `POST /v1/responses`, `POST /v1/chat/completions`,
`/v1/embeddings`, `/v1/completions`, `/v1/moderations`, `/v1/images/generations`,
`/edits` and `/variations`, `/v1/audio/transcriptions`, `/translations` and `/speech`
(creations), and `GET /v1/responses/{id}` / `POST /v1/responses/{id}/cancel`
(outcomes of responses created earlier); batches are watched until their output file
can be metered. Everything else passes through unmetered.

Uploads (`multipart/form-data`) are metered by their text fields; audio answers
(speech, and transcriptions asked for as text, SRT or VTT) are forwarded chunk by
chunk like streams and recorded when they end.

Streams are forwarded chunk by chunk as they arrive. A finished response's event is
journaled before the client receives the chunk that completes it (for JSON answers:
before any of the body is sent, since a garbled answer must become a 502).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from starlette.types import Message, Receive, Scope, Send

from tokentill.ingest.bounds import bounded_metadata
from tokentill.ingest.capture import (
    Decoder,
    Endpoint,
    JSONCapture,
    RequestFacts,
    StreamCapture,
    error_event,
    finalize,
    now_us,
)
from tokentill.ingest.errors import RequestRejectedError, send_error
from tokentill.ingest.forms import form_fields, is_form
from tokentill.ingest.metrics import Metrics
from tokentill.ingest.paths import NonCanonicalPath, canonical_path
from tokentill.ingest.poller import CREDENTIAL_HEADERS
from tokentill.ingest.recorder import Recorder
from tokentill.ingest.upstream import (
    Body,
    Upstream,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tokentill.warehouse.events import EventKind, key_fingerprint
from tokentill.warehouse.identity import MAX_USER_ID, BadUserId, decode_header, end_user_id

log = logging.getLogger(__name__)

# RFC 9110 7.6.1 hop-by-hop headers, plus what the transport recomputes.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
USER_HEADER = b"x-tokentill-user"
_RETRIEVE = re.compile(r"^/v1/responses/([A-Za-z0-9_\-]+)(/cancel)?$")


@dataclass(frozen=True, slots=True)
class Route:
    label: str  # metrics label
    endpoint: Endpoint | None  # None: not metered
    kind: EventKind = "create"
    response_id: str | None = None
    batch: bool = False  # a batch created or retrieved: watched until it ends


_OTHER = Route("other", None)
_BATCH = re.compile(r"^/v1/batches/([A-Za-z0-9_\-]+)$")
# Billable endpoints beyond Responses and Chat Completions, with token usage in the answer.
_OTHER_METERED: dict[str, Endpoint] = {
    "/v1/embeddings": "embeddings",
    "/v1/completions": "completions",  # the legacy Completions API
    "/v1/moderations": "moderations",  # free, still counted
    "/v1/images/generations": "images.generations",
    "/v1/images/edits": "images.edits",  # an upload
    "/v1/images/variations": "images.variations",  # an upload (dall-e-2: no usage)
    "/v1/audio/transcriptions": "audio.transcriptions",  # an upload
    "/v1/audio/translations": "audio.translations",  # an upload
    "/v1/audio/speech": "audio.speech",  # answered with audio
}
# Endpoints whose success may be something other than JSON or SSE: audio, plain text.
_MEDIA_ANSWERS = frozenset({"audio.speech", "audio.transcriptions", "audio.translations"})


def classify(method: str, path: str) -> Route:
    if method == "POST" and path == "/v1/responses":
        return Route("responses", "responses")
    if method == "POST" and path == "/v1/chat/completions":
        return Route("chat.completions", "chat.completions")
    if method == "POST" and path in _OTHER_METERED:
        name = _OTHER_METERED[path]
        return Route(name, name)
    if method == "POST" and path == "/v1/batches":
        return Route("batches.create", None, batch=True)
    if method == "GET" and _BATCH.match(path):
        return Route("batches.retrieve", None, batch=True)
    match = _RETRIEVE.match(path)
    if match:
        cancel = bool(match[2])
        if (method == "POST" and cancel) or (method == "GET" and not cancel):
            label = "responses.cancel" if cancel else "responses.retrieve"
            return Route(label, "responses", "update", match[1])
    return _OTHER


# A hook run before forwarding a metered creation, with the parsed body (None when it is
# not a JSON object) and the raw one. It may refuse (RequestRejectedError) or set
# `facts.hold` (quotas: the request's reservation), which every event recorded for this
# request carries to the recorder, and which is released if none is. It decides in
# memory and returns None, or, rarely, returns an awaitable that decides (quotas: a
# subject whose counters were spilled is read back from the warehouse first).
Admission = Callable[[RequestFacts, dict[str, Any] | None, bytes], Awaitable[None] | None]


class BatchObserver(Protocol):
    """What meters the Batch API (`ingest.batches.BatchWatcher`)."""

    def observe(
        self,
        batch: dict[str, Any],
        credentials: list[tuple[bytes, bytes]],
        header_user: str | None,
        fingerprint: str | None,
        holds: dict[str, Any] | None = None,
    ) -> None: ...

    def release_all(self, holds: dict[str, Any] | None) -> None: ...

    async def admit(
        self,
        client: Upstream,
        create: dict[str, Any] | None,
        credentials: list[tuple[bytes, bytes]],
        header_user: str | None,
        fingerprint: str | None,
        admission: Admission,
    ) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """What the proxy is told (the composition root takes it from `Settings`)."""

    upstream: str
    max_request_bytes: int
    max_parsed_response_bytes: int
    stream_drain_timeout: float
    user_id_case_fold: bool = False
    refuse_user_mismatch: bool = False


class Proxy:
    """ASGI app for everything under /v1."""

    def __init__(
        self,
        settings: ProxyConfig,
        metrics: Metrics,
        *,
        identity: IdentityRules,
        client: Upstream,
        recorder: Recorder,
        admission: Admission | None = None,
        batches: BatchObserver | None = None,
    ) -> None:
        """`admission`: the quota check before forwarding (None: quotas off);
        `batches`: what meters the Batch API (None: batches pass unmetered)."""
        self._settings = settings
        self._metrics = metrics
        self._upstream = settings.upstream
        self.identity = identity
        self.client = client
        self.recorder = recorder
        self.admission = admission
        self.batches = batches

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started_perf = time.perf_counter()
        started_us = now_us()
        client, recorder = self.client, self.recorder
        raw: str = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        try:
            path = canonical_path(raw)
        except NonCanonicalPath as exc:
            await send_error(
                send,
                404,
                f"Invalid URL ({scope['method']} {raw}): it has {exc}.",
                "invalid_request_error",
                "unknown_url",
            )
            self._metrics.count_request("invalid_path", 404, time.perf_counter() - started_perf)
            return
        # From here on the canonical spelling is the path: classified and forwarded.
        scope = {**scope, "raw_path": path.encode("latin-1")}
        route = classify(scope["method"], path)
        status = 500
        try:
            status = await self._handle(
                scope, receive, send, route, client, recorder, started_perf, started_us
            )
        finally:
            self._metrics.count_request(route.label, status, time.perf_counter() - started_perf)

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Route,
        client: Upstream,
        recorder: Recorder,
        started_perf: float,
        started_us: int,
    ) -> int:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        facts = None
        if route.endpoint is not None:
            facts = RequestFacts(
                endpoint=route.endpoint,
                kind=route.kind,
                started_us=started_us,
                started_perf=started_perf,
                response_id=route.response_id,
            )
        body: Body = None
        whole = b""
        holds: dict[str, Any] | None = None
        try:
            batches = self.batches
            if route.label == "batches.create" and self.admission and batches is not None:
                # Quotas hold each line of the batch before it is created (ingest.batches).
                body = whole = await self._read_body(receive)
                holds = await batches.admit(
                    client,
                    _parse_json_object(whole),
                    [(k, v) for k, v in headers if k in CREDENTIAL_HEADERS],
                    check_user_header(
                        raw_header(headers, USER_HEADER), case_fold=self.identity.case_fold
                    ),
                    key_fingerprint(header_value(headers, b"authorization")),
                    self.admission,
                )
            elif facts is None:
                # Not metered: nothing to read in the body, so stream it (file uploads).
                body = _stream_body(receive) if _has_body(headers) else None
            else:
                body = whole = await self._read_body(receive)
            header_user = check_user_header(
                raw_header(headers, USER_HEADER), case_fold=self.identity.case_fold
            )
            parsed: dict[str, Any] | None = None
            if facts is not None and facts.kind == "create":
                facts.key_fingerprint = key_fingerprint(header_value(headers, b"authorization"))
                content_type = header_value(headers, b"content-type")
                parsed = (
                    form_fields(content_type, whole)
                    if content_type is not None and is_form(content_type)
                    else _parse_json_object(whole)
                )
                body = learn_request(facts, parsed, header_user, whole, self.identity)
                if self.admission is not None:
                    pending = self.admission(facts, parsed, whole)
                    if pending is not None:
                        await pending  # a spilled quota subject read back (rare)
        except RequestRejectedError as exc:
            if facts is not None and facts.kind == "create":
                recorder.record(
                    error_event(facts, exc.status, {"error": {"type": exc.type, "code": exc.code}})
                )
            await send_error(
                send, exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers
            )
            return exc.status
        try:
            return await self._forward(
                scope, receive, send, facts, client, recorder, body, route.batch, holds
            )
        finally:
            if facts is not None and facts.hold is not None:
                recorder.release(facts.hold)  # a no-op once an event settled it
            if holds and self.batches is not None:
                self.batches.release_all(holds)  # no-ops once the batch's lines settled

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        facts: RequestFacts | None,
        client: Upstream,
        recorder: Recorder,
        body: Body,
        batch: bool = False,
        holds: dict[str, Any] | None = None,
    ) -> int:
        headers: list[tuple[bytes, bytes]] = scope["headers"]

        url = self._upstream + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            url += "?" + scope["query_string"].decode("latin-1")
        forwarded = [
            (k, v) for k, v in headers if k not in HOP_BY_HOP and not k.startswith(b"x-tokentill-")
        ]
        if body is not None and not isinstance(body, bytes):
            # A streamed body keeps the client's length, so the upstream sees no chunking.
            forwarded.extend((k, v) for k, v in headers if k == b"content-length")
        try:
            upstream = await client.send(scope["method"], url, forwarded, body)
        except UpstreamError as exc:
            return await self._upstream_broke(
                send, facts, recorder, exc, "upstream_unreachable", "could not be reached"
            )

        try:
            if facts is None:
                if batch and self.batches is not None and upstream.status == 200:
                    await self._watch_batch(upstream, send, headers, holds)
                else:
                    await self._pass_through(upstream, receive, send)
                return upstream.status
            credentials = [(k, v) for k, v in headers if k in CREDENTIAL_HEADERS]
            content_type = upstream.header("content-type") or ""
            if upstream.status == 200 and content_type.startswith("text/event-stream"):
                return await self._stream(upstream, receive, send, facts, recorder, credentials)
            if (
                upstream.status == 200
                and facts.endpoint in _MEDIA_ANSWERS
                and not content_type.startswith("application/json")
            ):
                return await self._media(upstream, receive, send, facts, recorder)
            return await self._json(upstream, send, facts, recorder, credentials)
        finally:
            upstream.close()

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        limit = self._settings.max_request_bytes
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestRejectedError(
                    400, "The client disconnected while sending the body.", "client_disconnected"
                )
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestRejectedError(
                    413, f"The request body is larger than {limit} bytes.", "request_too_large"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _upstream_failed(
        self,
        send: Send,
        facts: RequestFacts | None,
        recorder: Recorder,
        status: int,
        code: str,
        message: str,
    ) -> int:
        log.warning("upstream failed: %s", message)
        if facts is not None and facts.kind == "create":
            recorder.record(
                error_event(facts, status, {"error": {"type": "upstream_error", "code": code}}),
                hold=facts.hold,
            )
        await send_error(send, status, message, "upstream_error", code)
        return status

    async def _upstream_broke(
        self,
        send: Send,
        facts: RequestFacts | None,
        recorder: Recorder,
        exc: UpstreamError,
        code: str,
        what: str,
    ) -> int:
        """A transport failure: 504 when the upstream was too slow, else 502 with `code`."""
        if isinstance(exc, UpstreamTimeout):
            status, code, what = 504, "upstream_timeout", "did not answer in time"
        else:
            status = 502
        return await self._upstream_failed(
            send, facts, recorder, status, code, f"The upstream {what} ({exc})."
        )

    async def _pass_through(self, upstream: UpstreamResponse, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status,
                "headers": _response_headers(upstream, keep_length=True),
            }
        )
        async for chunk in upstream.iter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _watch_batch(
        self,
        upstream: UpstreamResponse,
        send: Send,
        headers: list[tuple[bytes, bytes]],
        holds: dict[str, Any] | None,
    ) -> None:
        """A batch created or retrieved: forwarded whole (a small JSON object), then handed
        to the batch watcher with the caller's credentials."""
        body = await upstream.read()
        await self._send_head_and(upstream, send, body)
        decoder = Decoder(upstream.header("content-encoding"))
        try:
            batch = orjson.loads(decoder.feed(body)) if decoder.supported else None
            header_user = check_user_header(
                raw_header(headers, USER_HEADER), case_fold=self.identity.case_fold
            )
        except (orjson.JSONDecodeError, zlib.error, RequestRejectedError):
            return
        if isinstance(batch, dict) and self.batches is not None:
            credentials = [(k, v) for k, v in headers if k in CREDENTIAL_HEADERS]
            fingerprint = key_fingerprint(header_value(headers, b"authorization"))
            self.batches.observe(batch, credentials, header_user, fingerprint, dict(holds or {}))
            if holds:
                holds.clear()  # the watcher holds them now

    async def _json(
        self,
        upstream: UpstreamResponse,
        send: Send,
        facts: RequestFacts,
        recorder: Recorder,
        credentials: list[tuple[bytes, bytes]],
    ) -> int:
        """A whole (non-stream) answer: read it, journal its event, then send it."""
        limit = self._settings.max_parsed_response_bytes
        chunks: list[bytes] = []
        size = 0
        ttft: float | None = None
        try:
            async for chunk in upstream.iter_raw():
                if ttft is None:
                    ttft = (time.perf_counter() - facts.started_perf) * 1000
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    break
        except UpstreamError as exc:
            return await self._upstream_broke(
                send, facts, recorder, exc, "upstream_broken_answer", "broke off mid-answer"
            )
        body = b"".join(chunks)
        status = upstream.status
        if size > limit:
            # Too big to read aside: forward untouched and say so in the record.
            await self._send_head_and(upstream, send, body, stream_rest=True)
            if facts.kind == "create":
                event = facts.new_event()
                event.status, event.error_type = "interrupted", "unparsed_answer_too_large"
                recorder.record(finalize(event, facts, status), credentials, facts.hold)
            return status

        capture = JSONCapture(facts, upstream.header("content-encoding"))
        obj = capture.parse(body)
        if status >= 400:
            if facts.kind == "create":
                recorder.record(error_event(facts, status, obj), hold=facts.hold)
            await self._send_head_and(upstream, send, body)
            return status
        if obj is None:
            # A success status with a body that is not a JSON object: not OpenAI's.
            return await self._upstream_failed(
                send,
                facts,
                recorder,
                502,
                "upstream_bad_answer",
                "The upstream answered with something that is not a valid OpenAI response.",
            )
        outcome = capture.event(obj, status)
        if outcome is not None:
            outcome.ttft_ms = None if ttft is None else round(ttft, 3)
            recorder.record(outcome, credentials, facts.hold)
        await self._send_head_and(upstream, send, body)
        return status

    async def _send_head_and(
        self, upstream: UpstreamResponse, send: Send, body: bytes, *, stream_rest: bool = False
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status,
                "headers": _response_headers(upstream, keep_length=True),
            }
        )
        if not stream_rest:
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.body", "body": body, "more_body": True})
        async for chunk in upstream.iter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _stream(
        self,
        upstream: UpstreamResponse,
        receive: Receive,
        send: Send,
        facts: RequestFacts,
        recorder: Recorder,
        credentials: list[tuple[bytes, bytes]],
    ) -> int:
        """An SSE answer: forward each chunk as it comes, reading it on the way."""
        # A Responses stream is journaled as pending when it begins (then updated when it
        # ends): a process killed mid-stream leaves a record the settlement can settle.
        announce = (
            recorder.record if facts.kind == "create" and facts.endpoint == "responses" else None
        )
        capture = StreamCapture(
            facts, upstream.header("content-encoding"), upstream.status, announce
        )
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone))
        recorded = broken = False
        drain_until: float | None = None
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status,
                "headers": _response_headers(
                    upstream, keep_length=not capture.rewrites, keep_encoding=not capture.rewrites
                ),
            }
        )
        try:
            async for chunk in upstream.iter_raw():
                if capture.event.ttft_ms is None:
                    capture.event.ttft_ms = round(
                        (time.perf_counter() - facts.started_perf) * 1000, 3
                    )
                out = capture.feed(chunk)
                if capture.done and not recorded:
                    recorded = True
                    self._record_stream(capture, recorder, credentials, client_gone=gone.is_set())
                if gone.is_set():
                    # The client left: keep reading (bounded) to learn what the upstream billed.
                    if drain_until is None:
                        drain_until = time.monotonic() + self._settings.stream_drain_timeout
                    if recorded or time.monotonic() > drain_until:
                        break
                    continue
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        except UpstreamError as exc:
            log.info("stream from upstream broke off: %s", exc)
            broken = True
        finally:
            watcher.cancel()
            if not recorded:
                self._record_stream(capture, recorder, credentials, client_gone=gone.is_set())
        if broken:
            # Pass the cut on: ending the client's stream cleanly would tell it the
            # answer was whole. Returning mid-response makes the server drop the connection.
            return upstream.status
        tail = capture.flush_tail()
        if tail:
            await send({"type": "http.response.body", "body": tail, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return upstream.status

    async def _media(
        self,
        upstream: UpstreamResponse,
        receive: Receive,
        send: Send,
        facts: RequestFacts,
        recorder: Recorder,
    ) -> int:
        """Audio, or a transcription as plain text: forwarded as it comes (never held),
        recorded when it ends. Speech is measured by the characters it was asked to say;
        a transcription in a text format says nothing of its usage."""
        event = facts.new_event()
        event.status = "completed"
        if facts.endpoint != "audio.speech":
            event.usage_unreported = True
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone))
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status,
                "headers": _response_headers(upstream, keep_length=True),
            }
        )
        broken = False
        try:
            async for chunk in upstream.iter_raw():
                if event.ttft_ms is None:
                    event.ttft_ms = round((time.perf_counter() - facts.started_perf) * 1000, 3)
                if gone.is_set():
                    break  # billed in full all the same: the upstream made all of it
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            log.info("audio from upstream broke off: %s", exc)
            broken = True
            # Ended, but not whole: what the upstream bills for it is its own word.
            event.status, event.incomplete_reason = "incomplete", "upstream_broke_off"
        finally:
            watcher.cancel()
            event.client_disconnected = gone.is_set()
            recorder.record(finalize(event, facts, upstream.status), hold=facts.hold)
        if not broken:
            await send({"type": "http.response.body", "body": b""})
        return upstream.status

    def _record_stream(
        self,
        capture: StreamCapture,
        recorder: Recorder,
        credentials: list[tuple[bytes, bytes]],
        *,
        client_gone: bool,
    ) -> None:
        if capture.facts.kind == "update" and not capture.done:
            return  # a retrieve that did not see the end teaches nothing
        recorder.record(
            capture.finish(client_disconnected=client_gone), credentials, capture.facts.hold
        )


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    with contextlib.suppress(Exception):
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
                return


def check_user_header(raw: bytes | None, *, case_fold: bool = False) -> str | None:
    """The `X-Tokentill-User` header's end user (UTF-8, see `warehouse.identity`), or a 400."""
    if raw is None:
        return None
    try:
        return end_user_id(decode_header(raw), case_fold=case_fold)
    except BadUserId as exc:
        raise RequestRejectedError(
            400,
            f"X-Tokentill-User {exc}: it must be 1 to {MAX_USER_ID} characters of UTF-8, "
            "with no control characters.",
            "invalid_tokentill_user",
        ) from None


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    length = header_value(headers, b"content-length")
    return (length is not None and length != "0") or header_value(
        headers, b"transfer-encoding"
    ) is not None


async def _stream_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise UpstreamUnreachable("the client disconnected while sending the body")
        chunk: bytes = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def raw_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _response_headers(
    upstream: UpstreamResponse, *, keep_length: bool, keep_encoding: bool = True
) -> list[tuple[bytes, bytes]]:
    """The upstream's headers less hop-by-hop ones. A body we rebuild is sent decoded,
    so it keeps neither the upstream's length nor its encoding."""
    kept = []
    for key, value in upstream.raw_headers:
        name = key.lower()
        if name in HOP_BY_HOP and not (keep_length and name == b"content-length"):
            continue
        if name == b"content-encoding" and not keep_encoding:
            continue
        kept.append((key, value))
    return kept


def _parse_json_object(body: bytes) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # forwarded as is: the upstream will say what is wrong with it
    return parsed if isinstance(parsed, dict) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class IdentityRules:
    """How end-user ids are read (see `warehouse.identity`)."""

    case_fold: bool = False
    refuse_mismatch: bool = False  # header and body name different users: 400


def learn_request(
    facts: RequestFacts,
    parsed: dict[str, Any] | None,
    header_user: str | None,
    body: bytes,
    rules: IdentityRules = IdentityRules(),
) -> bytes:
    """Note who is asking and how; return the body to forward (changed only to ask a
    Chat Completions stream for its usage). An end-user id that cannot be one is a
    `RequestRejectedError` (400)."""
    if header_user is not None:
        facts.user_id, facts.user_source = header_user, "header"
    if parsed is None:
        return body
    facts.requested_model = _str_or_none(parsed.get("model"))
    facts.stream = parsed.get("stream") is True
    facts.background = parsed.get("background") is True
    facts.store = parsed.get("store") is not False
    facts.previous_response_id = _str_or_none(parsed.get("previous_response_id"))
    facts.metadata, cut = bounded_metadata(parsed.get("metadata"))
    if cut:
        facts.truncated = "metadata"
    for source in ("user", "safety_identifier"):
        value = _str_or_none(parsed.get(source))
        if not value:
            continue
        try:
            body_user = end_user_id(value, case_fold=rules.case_fold)
        except BadUserId as exc:
            raise RequestRejectedError(
                400, f"The end user's id in '{source}' {exc}.", "invalid_end_user", source
            ) from None
        if facts.user_id is None:
            facts.user_id, facts.user_source = body_user, source
        elif body_user != facts.user_id:
            # The header wins (it is the operator's word); both are kept.
            facts.body_user_id = body_user
            if rules.refuse_mismatch:
                raise RequestRejectedError(
                    400,
                    f"X-Tokentill-User names {facts.user_id!r} but '{source}' names "
                    f"{body_user!r}; this tokentill refuses requests whose end users differ.",
                    "user_mismatch",
                    source,
                )
        break
    if facts.endpoint == "audio.speech" and isinstance(parsed.get("input"), str):
        facts.input_characters = len(parsed["input"])
    if facts.endpoint in ("chat.completions", "completions") and facts.stream:
        options = parsed.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            new_options = dict(options) if isinstance(options, dict) else {}
            new_options["include_usage"] = True
            parsed["stream_options"] = new_options
            facts.strip_chat_usage = True
            return _encode(parsed)
    return body


def _encode(parsed: dict[str, Any]) -> bytes:
    """A parsed body as JSON again. orjson stops at 255 levels of nesting (it parses up
    to 1024): deeper bodies take the standard library's encoder."""
    try:
        return orjson.dumps(parsed)
    except TypeError:
        try:
            return json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode()
        except (RecursionError, ValueError):
            raise RequestRejectedError(
                400, "The request body is nested too deeply to be read.", "body_too_deep"
            ) from None
