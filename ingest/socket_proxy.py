"""WebSockets through the proxy: the Responses API's WebSocket mode (`/v1/responses`
upgraded) and the Realtime API (`/v1/realtime`).

Both modes (`_Relay`): frames pass both ways as they come, text or binary, never held
back; tokentill adds frames of its own only to answer what it refused. Beside them,
each response the upstream creates is metered as a streamed HTTP one: one row per
response id, `transport = 'websocket'`, journaled when its terminal event passes
(before the client gets that frame). A socket that drops mid-response leaves
`interrupted` rows, as a cut HTTP stream does; a client that leaves does not end the
reading: the upstream is read on, up to the drain timeout, to learn what it billed.
Header rules are the HTTP ones: Authorization and the rest are forwarded, hop-by-hop,
`Sec-WebSocket-*` (the socket library makes its own) and `X-Tokentill-*` are not; the
query string is forwarded as it came.

The Responses mode (`_ResponsesRelay`):
- each `response.create` the client sends is admitted like an HTTP request (quotas);
  a refused one is answered on the socket with an `error` event in OpenAI's shape
  (`insufficient_quota`, `user_quota_exceeded`), recorded as an HTTP refusal would be,
  and not forwarded; the socket stays open for the others;
- the end user is the handshake's `X-Tokentill-User`, else the event's `user` or
  `safety_identifier`;
- creates run FIFO per lane (`stream_id`; no `stream_id` is a lane too), so the n-th
  `response.created` on a lane belongs to the n-th create sent on it; the recorder's
  poller asks the upstream how an interrupted response ended.

The Realtime mode (`_RealtimeRelay`; `?model=`, or `?call_id=` for a WebRTC call's
sideband connection):
- the end user is the handshake's `X-Tokentill-User` (the API has no user field); the
  model is the query's, then the session's (`session.created`, `session.updated`);
- the handshake is admitted like a request: a refusal is its HTTP answer and an error
  row. It is a check, not a charge (its reservation is released at once): a session
  costs nothing until a response runs;
- each client `response.create` is admitted (refused: a Realtime `error` event, an
  error row, not forwarded). A response the upstream starts on its own (server VAD) is
  admitted when its `response.created` passes; if refused, tokentill cancels it upstream
  and tells the client, and it is still metered (it may have billed a little);
- responses are keyed by id: several may run at once (out-of-band ones beside the
  conversation's). A `response.created` belongs to the oldest client create still
  waiting, else the upstream started it;
- each `conversation.item.input_audio_transcription.completed` is a
  `realtime.transcription` row at the session's transcription model, its event id
  derived from its item, so that it is never counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol
from urllib.parse import parse_qsl

import orjson
from starlette.types import Receive, Scope, Send

from tokentill.ingest import usage
from tokentill.ingest.bounds import bounded_metadata
from tokentill.ingest.capture import Endpoint, RequestFacts, error_event, finalize, now_us
from tokentill.ingest.errors import RequestRejectedError, error_body
from tokentill.ingest.metrics import Metrics
from tokentill.ingest.paths import NonCanonicalPath, canonical_path
from tokentill.ingest.poller import CREDENTIAL_HEADERS
from tokentill.ingest.proxy import (
    HOP_BY_HOP,
    USER_HEADER,
    Admission,
    IdentityRules,
    check_user_header,
    header_value,
    learn_request,
    raw_header,
)
from tokentill.ingest.recorder import Recorder
from tokentill.ingest.upstream import RawHeaders, UpstreamError
from tokentill.warehouse.events import TERMINAL_STATUSES, UsageEvent, key_fingerprint

log = logging.getLogger(__name__)

Frame = str | bytes
Headers = list[tuple[bytes, bytes]]


class UpstreamRefused(UpstreamError):
    """The upstream answered the handshake with an HTTP status instead of upgrading."""

    def __init__(self, status: int, headers: RawHeaders, body: bytes) -> None:
        super().__init__(f"handshake refused with {status}")
        self.status, self.headers, self.body = status, headers, body


class UpstreamSocketClosed(UpstreamError):
    """The upstream's socket is closed (cleanly or not)."""

    def __init__(self, code: int | None, clean: bool) -> None:
        super().__init__(f"closed with {code}")
        self.code, self.clean = code, clean


class UpstreamSocket(Protocol):
    @property
    def subprotocol(self) -> str | None: ...

    async def recv(self) -> Frame:
        """The next frame; `UpstreamSocketClosed` once there are no more."""

    async def send(self, frame: Frame) -> None: ...

    async def close(self, code: int = 1000) -> None: ...


class SocketUpstream(Protocol):
    async def connect(
        self, url: str, headers: RawHeaders, subprotocols: list[str]
    ) -> UpstreamSocket:
        """Open the upstream socket; `UpstreamRefused` or another `UpstreamError`."""


@dataclass(frozen=True, slots=True)
class Handshake:
    """What the client's upgrade request says about everything on its socket."""

    header_user: str | None
    fingerprint: str | None
    credentials: Headers  # for the poller, which asks the upstream about a response
    query: dict[str, str]  # the first value of each parameter

    def facts(self, endpoint: Endpoint, requested_model: str | None = None) -> RequestFacts:
        """Facts of a request made now on this socket."""
        facts = RequestFacts(
            endpoint=endpoint,
            kind="create",
            started_us=now_us(),
            started_perf=time.perf_counter(),
            key_fingerprint=self.fingerprint,
            requested_model=requested_model,
            stream=True,  # implied on a socket
        )
        if self.header_user is not None:
            facts.user_id, facts.user_source = self.header_user, "header"
        return facts


@dataclass(slots=True)
class _Live:
    """A response the upstream created and has not ended yet."""

    facts: RequestFacts
    event: UsageEvent


class SocketProxy:
    """ASGI handler for WebSocket scopes under /v1."""

    def __init__(
        self,
        upstream_url: str,
        drain_timeout: float,
        metrics: Metrics,
        connector: SocketUpstream,
        recorder: Recorder,
        admission: Admission | None,
        identity: IdentityRules,
    ) -> None:
        base = upstream_url.rstrip("/")
        self._base = "ws" + base[4:] if base.startswith("http") else base
        self._drain_timeout = drain_timeout
        self._metrics = metrics
        self._connector = connector
        self._recorder = recorder
        self._admission = admission
        self.identity = identity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        recorder = self._recorder
        headers: Headers = scope["headers"]
        try:
            header_user = check_user_header(
                raw_header(headers, USER_HEADER), case_fold=self.identity.case_fold
            )
        except RequestRejectedError as exc:
            await deny(scope, send, exc.status, error_body(exc.message, exc.type, exc.code))
            return
        raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        try:
            path = canonical_path(raw)
        except NonCanonicalPath as exc:
            await deny(
                scope,
                send,
                404,
                error_body(
                    f"Invalid URL ({raw}): it has {exc}.", "invalid_request_error", "unknown_url"
                ),
            )
            return
        mode = _MODES.get(path)
        if mode is None:
            await deny(
                scope,
                send,
                404,
                error_body(
                    f"WebSockets are offered on {' and '.join(_MODES)}, not {path}.",
                    "invalid_request_error",
                    "unknown_url",
                ),
            )
            return
        query: bytes = scope.get("query_string") or b""
        handshake = Handshake(
            header_user,
            key_fingerprint(header_value(headers, b"authorization")),
            [(k, v) for k, v in headers if k in CREDENTIAL_HEADERS],
            dict(reversed(parse_qsl(query.decode("latin-1")))),
        )
        refused = await mode.check_handshake(self, recorder, handshake)
        if refused is not None:
            body = error_body(refused.message, refused.type, refused.code)
            await deny(scope, send, refused.status, body, refused.headers or ())
            return
        url = self._base + path + ("?" + query.decode("latin-1") if query else "")
        forwarded = [
            (k, v)
            for k, v in headers
            if k not in HOP_BY_HOP
            and not k.startswith(b"x-tokentill-")
            and not k.startswith(b"sec-websocket-")
        ]
        try:
            upstream = await self._connector.connect(url, forwarded, scope.get("subprotocols", []))
        except UpstreamRefused as exc:
            await deny(scope, send, exc.status, exc.body)
            return
        except UpstreamError as exc:
            await deny(
                scope,
                send,
                502,
                error_body(
                    f"The upstream could not be reached ({exc}).",
                    "upstream_error",
                    "upstream_unreachable",
                ),
            )
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        await mode(self, upstream, recorder, send, handshake).run(receive)

    def count(self, label: str, status: int, seconds: float) -> None:
        self._metrics.count_request(label, status, seconds)

    @property
    def drain_timeout(self) -> float:
        return self._drain_timeout

    def admission(self) -> Admission | None:
        return self._admission


class _Relay:
    """Both directions of one socket, and the metering beside them: what the modes
    share. A mode says which frames it reads (cheap substring pre-filters that can only
    err towards reading), what it makes of them, and what it has in flight."""

    label: ClassVar[str]  # the metrics label of its requests

    def __init__(
        self,
        proxy: SocketProxy,
        upstream: UpstreamSocket,
        recorder: Recorder,
        send: Send,
        handshake: Handshake,
    ) -> None:
        self._proxy, self._upstream, self._recorder = proxy, upstream, recorder
        self._send, self._handshake = send, handshake
        self._live: dict[str | None, _Live] = {}
        self._client_gone = False
        self._client_lock = asyncio.Lock()
        self._upstream_lock = asyncio.Lock()  # tokentill's own frames share the socket
        # tokentill's frames that follow the upstream frame being relayed.
        self._notices: list[str] = []

    @classmethod
    async def check_handshake(
        cls, proxy: SocketProxy, recorder: Recorder, handshake: Handshake
    ) -> RequestRejectedError | None:
        """The refusal of the handshake (already recorded), or None to connect."""
        return None

    # -- what a mode provides ---------------------------------------------------------------

    def in_flight(self) -> bool:
        """Whether anything is still due from the upstream (worth reading on for)."""
        raise NotImplementedError

    def _wants_client(self, frame: str) -> bool:
        raise NotImplementedError

    async def _on_client(self, frame: str) -> bool:
        """Read a client frame; False if it was refused here (then it is not forwarded)."""
        raise NotImplementedError

    def _wants_upstream(self, frame: str) -> bool:
        raise NotImplementedError

    async def _on_upstream(self, frame: str) -> None:
        raise NotImplementedError

    def _take_waiting(self) -> list[RequestFacts]:
        """Remove and return the creates admitted that no response answered yet."""
        raise NotImplementedError

    # -- the socket -----------------------------------------------------------------------

    async def run(self, receive: Receive) -> None:
        up = asyncio.create_task(self._from_upstream())
        down = asyncio.create_task(self._from_client(receive))
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if down in done:
                failure = down.exception()
                if failure is not None:
                    log.error("the client side of a socket failed", exc_info=failure)
                # The client left: keep reading (bounded) to learn what the upstream billed.
                self._client_gone = True
                if self.in_flight():
                    with contextlib.suppress(Exception):  # a timeout, or the upstream's end
                        await asyncio.wait_for(asyncio.shield(up), self._proxy.drain_timeout)
            else:
                try:
                    code = up.result()
                except Exception:
                    log.exception("the upstream side of a socket failed")
                    code = 1011
                await self._to_client({"type": "websocket.close", "code": code})
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._upstream.close()
            self._settle_rest()

    async def _from_client(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            frame: Frame = text if text is not None else message.get("bytes") or b""
            if isinstance(frame, str) and self._wants_client(frame):
                forward = await self._on_client(frame)
                if not forward:
                    continue  # refused here: answered on the socket, never sent on
            try:
                await self._to_upstream(frame)
            except UpstreamError:
                return

    async def _from_upstream(self) -> int:
        """Relay until the upstream closes; return the close code to pass on."""
        while True:
            try:
                frame = await self._upstream.recv()
            except UpstreamSocketClosed as exc:
                self._interrupted(clean=exc.clean)
                return exc.code if exc.code and exc.clean else 1011
            except UpstreamError:
                self._interrupted(clean=False)
                return 1011
            if isinstance(frame, str) and self._wants_upstream(frame):
                await self._on_upstream(frame)
            if self._client_gone:
                self._notices.clear()
                if not self.in_flight():
                    return 1000
                continue
            if isinstance(frame, str):
                await self._to_client_text(frame)
            else:
                await self._to_client({"type": "websocket.send", "bytes": frame})
            while self._notices:
                await self._to_client_text(self._notices.pop(0))

    async def _to_upstream(self, frame: Frame) -> None:
        async with self._upstream_lock:
            await self._upstream.send(frame)

    async def _to_client_text(self, text: str) -> None:
        await self._to_client({"type": "websocket.send", "text": text})

    async def _to_client(self, message: dict[str, Any]) -> None:
        if self._client_gone:
            return
        async with self._client_lock:
            try:
                await self._send(message)
            except Exception:
                self._client_gone = True

    # -- recording ------------------------------------------------------------------------

    def _count(self, status: int, facts: RequestFacts) -> None:
        self._proxy.count(self.label, status, time.perf_counter() - facts.started_perf)

    async def _refuse(self, facts: RequestFacts, exc: RequestRejectedError, frame: str) -> None:
        """Answer a refused create on the socket (`frame`, in the mode's error shape) and
        record it as a refused request."""
        self._record_error(facts, exc.status, {"error": {"type": exc.type, "code": exc.code}})
        self._count(exc.status, facts)
        await self._to_client_text(frame)

    def _record_error(
        self, facts: RequestFacts, status: int, body: dict[str, Any], hold: Any = None
    ) -> None:
        """A create that got no response: an error row, as a refused HTTP request's."""
        refused = error_event(facts, status, body)
        refused.transport = "websocket"
        self._recorder.record(refused, hold=hold)

    def _finish(self, live: _Live, status: int = 200) -> None:
        live.event.client_disconnected = self._client_gone
        event = finalize(live.event, live.facts, status)
        event.event_id = event.response_id or event.event_id
        self._recorder.record(event, self._handshake.credentials, live.facts.hold)
        self._count(status, live.facts)

    def _cut_live(self) -> None:
        """The responses running now end here: `interrupted`, as a broken stream's do."""
        for key, live in list(self._live.items()):
            del self._live[key]
            live.event.status = "interrupted"
            self._finish(live)

    def _interrupted(self, *, clean: bool) -> None:
        """The upstream socket ended: what was running is cut, as a broken stream is, and
        what was waiting for a response never gets one."""
        self._cut_live()
        closed = {"error": {"type": "upstream_error", "code": "upstream_closed"}}
        for facts in self._take_waiting():
            self._record_error(facts, 502, closed, facts.hold)
        if not clean:
            log.info("upstream socket dropped")

    def _settle_rest(self) -> None:
        """Whatever is still in flight when the relay ends (client gone, drain timed out)."""
        self._cut_live()
        for facts in self._take_waiting():
            if facts.hold is not None:
                self._recorder.release(facts.hold)


async def _admit(
    admission: Admission | None, facts: RequestFacts, parsed: dict[str, Any] | None, body: bytes
) -> None:
    """Run the admission hook (quotas) on `facts`: `RequestRejectedError` if refused."""
    if admission is not None:
        pending = admission(facts, parsed, body)
        if pending is not None:
            await pending


def _json_object(frame: str) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# -- the Responses API's WebSocket mode -------------------------------------------------


class _ResponsesRelay(_Relay):
    """`/v1/responses`: creates and their responses by lane (`stream_id`)."""

    label = "responses.websocket"

    def __init__(
        self,
        proxy: SocketProxy,
        upstream: UpstreamSocket,
        recorder: Recorder,
        send: Send,
        handshake: Handshake,
    ) -> None:
        super().__init__(proxy, upstream, recorder, send, handshake)
        self._waiting: dict[str | None, deque[RequestFacts]] = {}

    def in_flight(self) -> bool:
        return bool(self._live) or any(self._waiting.values())

    def _take_waiting(self) -> list[RequestFacts]:
        taken = [facts for queue in self._waiting.values() for facts in queue]
        self._waiting.clear()
        return taken

    def _wants_client(self, frame: str) -> bool:
        return "response.create" in frame or "\\u" in frame

    async def _on_client(self, frame: str) -> bool:
        """Note a `response.create` on its lane; False if it was refused here."""
        event = _json_object(frame)
        if event is None or event.get("type") != "response.create":
            return True  # the upstream will say what is wrong with it
        lane = _lane(event)
        facts = self._handshake.facts("responses")
        try:
            learn_request(facts, event, self._handshake.header_user, b"", self._proxy.identity)
            facts.stream = True  # implied on the socket
            await _admit(self._proxy.admission(), facts, event, frame.encode())
        except RequestRejectedError as exc:
            await self._refuse(facts, exc, _responses_error_frame(exc, lane))
            return False
        self._waiting.setdefault(lane, deque()).append(facts)
        return True

    def _wants_upstream(self, frame: str) -> bool:
        return '"response"' in frame or '"error"' in frame or "\\u" in frame

    async def _on_upstream(self, frame: str) -> None:
        obj = _json_object(frame)
        if obj is None:
            return
        lane = _lane(obj)
        kind = obj.get("type")
        response = obj.get("response")
        if kind == "response.created" and isinstance(response, dict):
            queue = self._waiting.get(lane)
            if not queue:
                return  # not a create we saw (nothing to meter it against)
            facts = queue.popleft()
            event = facts.new_event()
            event.transport = "websocket"
            event.streamed = True
            event.ttft_ms = round((time.perf_counter() - facts.started_perf) * 1000, 3)
            usage.apply_response(event, response)
            self._live[lane] = _Live(facts, event)
            return
        live = self._live.get(lane)
        if kind == "error":
            self._on_error(obj, lane, live)
            return
        if live is None or not isinstance(response, dict):
            return
        usage.apply_response(live.event, response)
        if live.event.status in TERMINAL_STATUSES:
            del self._live[lane]
            self._finish(live)

    def _on_error(self, obj: dict[str, Any], lane: str | None, live: _Live | None) -> None:
        raw_error, raw_status = obj.get("error"), obj.get("status")
        error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
        status = raw_status if isinstance(raw_status, int) else 500
        if live is not None:
            del self._live[lane]
            live.event.status = "failed"
            live.event.error_type = "stream_error"
            live.event.error_code = _str(error.get("code"))
            self._finish(live)
            return
        queue = self._waiting.get(lane)
        if queue:
            # Refused before a response existed (a bad field, the upstream's own limits).
            facts = queue.popleft()
            self._record_error(facts, status, {"error": error}, facts.hold)
            self._count(status, facts)


def _lane(obj: dict[str, Any]) -> str | None:
    return _str(obj.get("stream_id"))


def _responses_error_frame(exc: RequestRejectedError, lane: str | None) -> str:
    """An `error` event as the Responses API's WebSocket mode sends one."""
    body: dict[str, Any] = {
        "type": "error",
        "status": exc.status,
        "error": {"type": exc.type, "code": exc.code, "message": exc.message, "param": exc.param},
    }
    if lane is not None:
        body["stream_id"] = lane
    return orjson.dumps(body).decode()


# -- the Realtime API ---------------------------------------------------------------------

# What the handshake is admitted as: the smallest request there is (no input, one output
# token), so that only a user or tag already at a hard limit is refused.
_HANDSHAKE_CHECK: Final = {"max_output_tokens": 1}
# A Realtime error event carries no HTTP status; its row gets the one its type implies.
_ERROR_STATUS: Final = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "insufficient_quota": 429,
    "server_error": 500,
}


@dataclass(slots=True)
class _Create:
    """A client `response.create` admitted and forwarded, not answered yet."""

    facts: RequestFacts
    event_id: str | None  # the client's; the upstream's `error` names it


class _RealtimeRelay(_Relay):
    """`/v1/realtime`: one session; responses by id, transcriptions by item."""

    label = "realtime.websocket"

    def __init__(
        self,
        proxy: SocketProxy,
        upstream: UpstreamSocket,
        recorder: Recorder,
        send: Send,
        handshake: Handshake,
    ) -> None:
        super().__init__(proxy, upstream, recorder, send, handshake)
        self._model = handshake.query.get("model") or None
        self._transcription_model: str | None = None
        self._waiting: deque[_Create] = deque()
        # Committed audio items whose transcription the session will bill.
        self._transcribing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def check_handshake(
        cls, proxy: SocketProxy, recorder: Recorder, handshake: Handshake
    ) -> RequestRejectedError | None:
        facts = handshake.facts("realtime", handshake.query.get("model") or None)
        try:
            await _admit(proxy.admission(), facts, dict(_HANDSHAKE_CHECK), b"")
        except RequestRejectedError as exc:
            refused = error_event(
                facts, exc.status, {"error": {"type": exc.type, "code": exc.code}}
            )
            refused.transport = "websocket"
            recorder.record(refused)
            proxy.count(cls.label, exc.status, time.perf_counter() - facts.started_perf)
            return exc
        if facts.hold is not None:
            recorder.release(facts.hold)  # a check, not a charge
        return None

    def in_flight(self) -> bool:
        return bool(self._live or self._waiting or self._transcribing)

    def _take_waiting(self) -> list[RequestFacts]:
        taken = [create.facts for create in self._waiting]
        self._waiting.clear()
        return taken

    async def run(self, receive: Receive) -> None:
        try:
            await super().run(receive)
        finally:
            for task in self._tasks:
                task.cancel()

    # -- client -> upstream ---------------------------------------------------------------

    def _wants_client(self, frame: str) -> bool:
        # `input_audio_buffer.append`, most of the traffic, is base64: never either.
        return "response.create" in frame or "\\u" in frame

    async def _on_client(self, frame: str) -> bool:
        """Admit a `response.create`; False if it was refused here."""
        event = _json_object(frame)
        if event is None or event.get("type") != "response.create":
            return True
        event_id = _str(event.get("event_id"))
        raw = event.get("response")
        params: dict[str, Any] = raw if isinstance(raw, dict) else {}
        facts = self._handshake.facts("realtime", self._model)
        facts.metadata, cut = bounded_metadata(params.get("metadata"))
        if cut:
            facts.truncated = "metadata"
        try:
            await _admit(self._proxy.admission(), facts, params, frame.encode())
        except RequestRejectedError as exc:
            await self._refuse(facts, exc, _realtime_error_frame(exc, event_id))
            return False
        self._waiting.append(_Create(facts, event_id))
        return True

    # -- upstream -> client ---------------------------------------------------------------

    def _wants_upstream(self, frame: str) -> bool:
        # Deltas (audio, text, transcripts) carry `"response_id"`, never `"response"`.
        return (
            '"response"' in frame
            or '"session"' in frame
            or '"error"' in frame
            or "buffer.committed" in frame
            or "transcription.completed" in frame
            or "transcription.failed" in frame
            or "\\u" in frame
        )

    async def _on_upstream(self, frame: str) -> None:
        obj = _json_object(frame)
        if obj is None:
            return
        kind = obj.get("type")
        response = obj.get("response")
        if kind in ("session.created", "session.updated"):
            self._learn_session(obj.get("session"))
        elif kind == "response.created" and isinstance(response, dict):
            await self._on_created(response)
        elif kind == "response.done" and isinstance(response, dict):
            self._on_done(response)
        elif kind == "error":
            self._on_error(obj)
        elif kind == "input_audio_buffer.committed":
            item_id = _str(obj.get("item_id"))
            if item_id and self._transcription_model:
                self._transcribing.add(item_id)
        elif kind == "conversation.item.input_audio_transcription.completed":
            self._on_transcribed(obj)
        elif kind == "conversation.item.input_audio_transcription.failed":
            self._transcribing.discard(_str(obj.get("item_id")) or "")

    def _learn_session(self, session: Any) -> None:
        """The session's model, and the model its input audio is transcribed with (the
        server sends the whole session each time)."""
        if not isinstance(session, dict):
            return
        self._model = _str(session.get("model")) or self._model
        audio = session.get("audio")
        inputs = audio.get("input") if isinstance(audio, dict) else None
        if isinstance(inputs, dict) and "transcription" in inputs:
            transcription = inputs["transcription"]
            model = transcription.get("model") if isinstance(transcription, dict) else None
            self._transcription_model = _str(model) or None

    def _new_event(self, facts: RequestFacts, response: dict[str, Any]) -> UsageEvent:
        event = facts.new_event()
        event.transport = "websocket"
        event.streamed = True
        event.model = self._model
        metadata = response.get("metadata")
        if isinstance(metadata, dict):
            # What the upstream recorded with the response (a VAD one's too).
            event.metadata, cut = bounded_metadata(metadata)
            if cut:
                event.truncated_fields = "metadata"
        usage.apply_realtime_response(event, response)
        return event

    async def _on_created(self, response: dict[str, Any]) -> None:
        response_id = _str(response.get("id"))
        if response_id is None:
            return
        if self._waiting:
            facts = self._waiting.popleft().facts
            event = self._new_event(facts, response)
            event.ttft_ms = round((time.perf_counter() - facts.started_perf) * 1000, 3)
            self._live[response_id] = _Live(facts, event)
            return
        # Started by the upstream itself (server VAD): admitted now, as it starts.
        facts = self._handshake.facts("realtime", self._model)
        live = self._live[response_id] = _Live(facts, self._new_event(facts, response))
        admission = self._proxy.admission()
        if admission is None:
            return
        try:
            pending = admission(facts, response, b"")
        except RequestRejectedError as exc:
            # The client hears of it after the `response.created` it is about.
            self._notices.append(await self._stop(response_id, live, exc))
            return
        if pending is not None:
            # Decided after a read from the warehouse: the frames go on meanwhile.
            task = asyncio.create_task(self._admit_later(response_id, live, pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _admit_later(self, response_id: str, live: _Live, pending: Awaitable[None]) -> None:
        try:
            await pending
        except RequestRejectedError as exc:
            await self._to_client_text(await self._stop(response_id, live, exc))
            return
        if self._live.get(response_id) is not live and live.facts.hold is not None:
            # It ended before it was admitted, and was recorded without a reservation.
            self._recorder.release(live.facts.hold)

    async def _stop(self, response_id: str, live: _Live, exc: RequestRejectedError) -> str:
        """Cancel a refused response upstream; return the error event for the client. Its
        row (at `response.done`) names the refusal."""
        live.event.error_type, live.event.error_code = exc.type, exc.code
        self._count(exc.status, live.facts)
        cancel = {"type": "response.cancel", "event_id": _event_id(), "response_id": response_id}
        with contextlib.suppress(UpstreamError):
            await self._to_upstream(orjson.dumps(cancel).decode())
        return _realtime_error_frame(exc, None)

    def _on_done(self, response: dict[str, Any]) -> None:
        response_id = _str(response.get("id"))
        live = self._live.pop(response_id, None)
        if live is None:
            # Its creation passed unseen: billed all the same, so metered all the same.
            facts = self._handshake.facts("realtime", self._model)
            live = _Live(facts, self._new_event(facts, response))
        else:
            usage.apply_realtime_response(live.event, response)
        self._finish(live)

    def _on_error(self, obj: dict[str, Any]) -> None:
        """An `error` that answers a create still waiting ends it with an error row. The
        error names the client's `event_id`; a create sent without one is known by the
        errors only a create gets (the oldest waiting: the upstream answers in order)."""
        raw = obj.get("error")
        error: dict[str, Any] = raw if isinstance(raw, dict) else {}
        named = _str(error.get("event_id"))
        create = None
        if named is not None:
            create = next((c for c in self._waiting if c.event_id == named), None)
        elif self._waiting and (
            error.get("code") == "conversation_already_has_active_response"
            or (_str(error.get("param")) or "").startswith("response")
        ):
            create = self._waiting[0]
        if create is None:
            return  # about another event (a bad item, an empty audio buffer)
        self._waiting.remove(create)
        status = _ERROR_STATUS.get(_str(error.get("type")) or "", 400)
        self._record_error(create.facts, status, {"error": error}, create.facts.hold)
        self._count(status, create.facts)

    def _on_transcribed(self, obj: dict[str, Any]) -> None:
        """A transcription of committed audio: billed at the transcription model's rates."""
        item_id = _str(obj.get("item_id"))
        self._transcribing.discard(item_id or "")
        facts = self._handshake.facts("realtime.transcription", self._transcription_model)
        event = facts.new_event()
        event.transport = "websocket"
        event.status = "completed"
        raw = obj.get("usage")
        if isinstance(raw, dict):
            usage.apply_transcription_usage(event, raw)
        else:
            event.usage_unreported = True
        # One row per transcribed content part, however often its event is seen.
        index = obj.get("content_index")
        if item_id:
            event.event_id = f"{item_id}:transcription:{index if isinstance(index, int) else 0}"
        elif server_id := _str(obj.get("event_id")):
            event.event_id = f"{server_id}:transcription"
        self._recorder.record(finalize(event, facts, 200))


def _event_id() -> str:
    """An id for an event tokentill itself sends (recognisable as its own)."""
    return "event_tokentill_" + uuid.uuid4().hex[:16]


def _realtime_error_frame(exc: RequestRejectedError, event_id: str | None) -> str:
    """An `error` event as the Realtime API sends one (`RealtimeErrorEvent`), naming the
    client event it answers."""
    error = {
        "type": exc.type,
        "code": exc.code,
        "message": exc.message,
        "param": exc.param,
        "event_id": event_id,
    }
    return orjson.dumps({"type": "error", "event_id": _event_id(), "error": error}).decode()


_MODES: Final[dict[str, type[_Relay]]] = {
    "/v1/responses": _ResponsesRelay,
    "/v1/realtime": _RealtimeRelay,
}


async def deny(
    scope: Scope, send: Send, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Refuse the handshake with an HTTP answer where the server can send one (uvicorn
    can), else by closing before accepting (the client sees 403)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), *headers],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})
