"""The Responses API's WebSocket mode through the proxy (`/v1/responses` upgraded).

Frames pass both ways as they come, text or binary, never held back. Beside them:
- each `response.create` the client sends is admitted like an HTTP request (quotas);
  a refused one is answered on the socket with an `error` event in OpenAI's shape
  (`insufficient_quota`, `user_quota_exceeded`), recorded as an HTTP refusal would be,
  and not forwarded; the socket stays open for the others;
- each response the upstream creates is metered as a streamed HTTP one: one row per
  response id, journaled when its terminal event passes (before the client gets it),
  `transport = 'websocket'`. The end user is the handshake's `X-Tokentill-User`, else
  the event's `user` or `safety_identifier`;
- creates run FIFO per lane (`stream_id`; no `stream_id` is a lane too), so the n-th
  `response.created` on a lane belongs to the n-th create sent on it;
- a socket that drops mid-response leaves `interrupted` rows, as a cut HTTP stream
  does (the recorder's poller then asks the upstream for the outcome).

Header rules are the HTTP ones: Authorization and the rest are forwarded, hop-by-hop,
`Sec-WebSocket-*` (the socket library makes its own) and `X-Tokentill-*` are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from starlette.types import Receive, Scope, Send

from ingest import usage
from ingest.capture import RequestFacts, error_event, finalize, now_us
from ingest.errors import error_body
from ingest.events import TERMINAL_STATUSES, UsageEvent, key_fingerprint
from ingest.paths import NonCanonicalPath, canonical_path
from ingest.poller import CREDENTIAL_HEADERS
from ingest.proxy import (
    HOP_BY_HOP,
    USER_HEADER,
    Admission,
    IdentityRules,
    RequestRejectedError,
    check_user_header,
    header_value,
    learn_request,
    raw_header,
)
from ingest.recorder import Recorder
from ingest.upstream import RawHeaders, UpstreamError
from tokentill.metrics import Metrics

log = logging.getLogger(__name__)

Frame = str | bytes
_LABEL = "responses.websocket"


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


@dataclass(slots=True)
class _Live:
    facts: RequestFacts
    event: UsageEvent


@dataclass(slots=True)
class _Session:
    """What one client socket has in flight, by lane."""

    waiting: dict[str | None, deque[RequestFacts]] = field(default_factory=dict)
    live: dict[str | None, _Live] = field(default_factory=dict)
    client_gone: bool = False

    def in_flight(self) -> bool:
        return bool(self.live) or any(self.waiting.values())


class SocketProxy:
    """ASGI handler for WebSocket scopes under /v1."""

    def __init__(
        self,
        upstream_url: str,
        drain_timeout: float,
        metrics: Metrics,
        connector: SocketUpstream,
        recorder: Callable[[], Recorder | None],
        admission: Callable[[], Admission | None],
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
        recorder = self._recorder()
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if recorder is None:
            await _deny(
                scope,
                send,
                503,
                error_body("tokentill is starting or stopping", "server_error", "unavailable"),
            )
            return
        try:
            header_user = check_user_header(
                raw_header(headers, USER_HEADER), case_fold=self.identity.case_fold
            )
        except RequestRejectedError as exc:
            await _deny(scope, send, exc.status, error_body(exc.message, exc.type, exc.code))
            return
        raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        try:
            path = canonical_path(raw)
        except NonCanonicalPath as exc:
            await _deny(
                scope,
                send,
                404,
                error_body(
                    f"Invalid URL ({raw}): it has {exc}.", "invalid_request_error", "unknown_url"
                ),
            )
            return
        if path != "/v1/responses":
            await _deny(
                scope,
                send,
                404,
                error_body(
                    f"WebSocket mode is offered on /v1/responses, not {path}.",
                    "invalid_request_error",
                    "unknown_url",
                ),
            )
            return
        url = self._base + path
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
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
            await _deny(scope, send, exc.status, exc.body)
            return
        except UpstreamError as exc:
            await _deny(
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
        relay = _Relay(
            self,
            upstream,
            recorder,
            send,
            header_user,
            key_fingerprint(header_value(headers, b"authorization")),
            [(k, v) for k, v in headers if k in CREDENTIAL_HEADERS],
        )
        await relay.run(receive)

    def count(self, status: int, seconds: float) -> None:
        self._metrics.count_request(_LABEL, status, seconds)

    @property
    def drain_timeout(self) -> float:
        return self._drain_timeout

    def admission(self) -> Admission | None:
        return self._admission()


class _Relay:
    """Both directions of one socket, and the metering beside them."""

    def __init__(
        self,
        proxy: SocketProxy,
        upstream: UpstreamSocket,
        recorder: Recorder,
        send: Send,
        header_user: str | None,
        fingerprint: str | None,
        credentials: list[tuple[bytes, bytes]],
    ) -> None:
        self._proxy, self._upstream, self._recorder = proxy, upstream, recorder
        self._send, self._header_user = send, header_user
        self._fingerprint, self._credentials = fingerprint, credentials
        self._session = _Session()
        self._client_lock = asyncio.Lock()

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
                self._session.client_gone = True
                if self._session.in_flight():
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

    # -- client -> upstream -------------------------------------------------------------

    async def _from_client(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            frame: Frame = text if text is not None else message.get("bytes") or b""
            creates = isinstance(frame, str) and ("response.create" in frame or "\\u" in frame)
            if creates and not await self._admit(str(frame)):
                continue
            try:
                await self._upstream.send(frame)
            except UpstreamError:
                return

    async def _admit(self, frame: str) -> bool:
        """Note a `response.create` on its lane; False if it was refused here."""
        try:
            event = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return True  # the upstream will say what is wrong with it
        if not isinstance(event, dict) or event.get("type") != "response.create":
            return True
        facts = RequestFacts(
            endpoint="responses",
            kind="create",
            started_us=now_us(),
            started_perf=time.perf_counter(),
            key_fingerprint=self._fingerprint,
        )
        try:
            learn_request(facts, event, self._header_user, b"", self._proxy.identity)
        except RequestRejectedError as exc:
            await self._refuse(facts, exc, _lane(event))
            return False
        facts.stream = True  # implied on the socket
        lane = _lane(event)
        admission = self._proxy.admission()
        try:
            if admission is not None:
                pending = admission(facts, event, frame.encode())
                if pending is not None:
                    await pending
        except RequestRejectedError as exc:
            await self._refuse(facts, exc, lane)
            return False
        self._session.waiting.setdefault(lane, deque()).append(facts)
        return True

    async def _refuse(
        self, facts: RequestFacts, exc: RequestRejectedError, lane: str | None
    ) -> None:
        """Answer a refused create on the socket and record it as a refused request."""
        self._record_error(facts, exc.status, {"error": {"type": exc.type, "code": exc.code}})
        self._proxy.count(exc.status, time.perf_counter() - facts.started_perf)
        await self._to_client_text(
            _error_frame(exc.status, exc.type, exc.code, exc.message, exc.param, lane)
        )

    # -- upstream -> client -------------------------------------------------------------

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
            if isinstance(frame, str) and (
                '"response"' in frame or '"error"' in frame or "\\u" in frame
            ):
                self._read(frame)
            if self._session.client_gone:
                if not self._session.in_flight():
                    return 1000
                continue
            if isinstance(frame, str):
                await self._to_client_text(frame)
            else:
                await self._to_client({"type": "websocket.send", "bytes": frame})

    def _read(self, frame: str) -> None:
        try:
            obj = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        lane = _lane(obj)
        kind = obj.get("type")
        session = self._session
        response = obj.get("response")
        if kind == "response.created" and isinstance(response, dict):
            queue = session.waiting.get(lane)
            if not queue:
                return  # not a create we saw (nothing to meter it against)
            facts = queue.popleft()
            event = facts.new_event()
            event.transport = "websocket"
            event.streamed = True
            event.ttft_ms = round((time.perf_counter() - facts.started_perf) * 1000, 3)
            usage.apply_response(event, response)
            session.live[lane] = _Live(facts, event)
            return
        live = session.live.get(lane)
        if kind == "error":
            self._on_error(obj, lane, live)
            return
        if live is None or not isinstance(response, dict):
            return
        usage.apply_response(live.event, response)
        if live.event.status in TERMINAL_STATUSES:
            del session.live[lane]
            self._finish(live, 200)

    def _on_error(self, obj: dict[str, Any], lane: str | None, live: _Live | None) -> None:
        raw_error, raw_status = obj.get("error"), obj.get("status")
        error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
        status = raw_status if isinstance(raw_status, int) else 500
        if live is not None:
            del self._session.live[lane]
            live.event.status = "failed"
            live.event.error_type = "stream_error"
            code = error.get("code")
            live.event.error_code = code if isinstance(code, str) else None
            self._finish(live, 200)
            return
        queue = self._session.waiting.get(lane)
        if queue:
            # Refused before a response existed (a bad field, the upstream's own limits).
            facts = queue.popleft()
            self._record_error(facts, status, {"error": error}, facts.hold)
            self._proxy.count(status, time.perf_counter() - facts.started_perf)

    def _record_error(
        self, facts: RequestFacts, status: int, body: dict[str, Any], hold: Any = None
    ) -> None:
        """A create that got no response: an error row, as a refused HTTP request's."""
        refused = error_event(facts, status, body)
        refused.transport = "websocket"
        self._recorder.record(refused, hold=hold)

    def _finish(self, live: _Live, status: int) -> None:
        live.event.client_disconnected = self._session.client_gone
        event = finalize(live.event, live.facts, status)
        event.event_id = event.response_id or event.event_id
        self._recorder.record(event, self._credentials, live.facts.hold)
        self._proxy.count(status, time.perf_counter() - live.facts.started_perf)

    def _cut_live(self) -> None:
        """The responses running now end here: `interrupted`, as a broken stream's do."""
        for lane, live in list(self._session.live.items()):
            del self._session.live[lane]
            live.event.status = "interrupted"
            self._finish(live, 200)

    def _interrupted(self, *, clean: bool) -> None:
        """The upstream socket ended: what was running is cut, as a broken stream is."""
        self._cut_live()
        for queue in self._session.waiting.values():
            while queue:
                facts = queue.popleft()
                closed = {"error": {"type": "upstream_error", "code": "upstream_closed"}}
                self._record_error(facts, 502, closed, facts.hold)
        if not clean:
            log.info("upstream socket dropped")

    def _settle_rest(self) -> None:
        """Whatever is still in flight when the relay ends (client gone, drain timed out)."""
        self._cut_live()
        for queue in self._session.waiting.values():
            while queue:
                facts = queue.popleft()
                if facts.hold is not None:
                    self._recorder.release(facts.hold)

    async def _to_client_text(self, text: str) -> None:
        await self._to_client({"type": "websocket.send", "text": text})

    async def _to_client(self, message: dict[str, Any]) -> None:
        if self._session.client_gone:
            return
        async with self._client_lock:
            try:
                await self._send(message)
            except Exception:
                self._session.client_gone = True


def _lane(obj: dict[str, Any]) -> str | None:
    stream_id = obj.get("stream_id")
    return stream_id if isinstance(stream_id, str) else None


def _error_frame(
    status: int, type_: str, code: str | None, message: str, param: str | None, lane: str | None
) -> str:
    body: dict[str, Any] = {
        "type": "error",
        "status": status,
        "error": {"type": type_, "code": code, "message": message, "param": param},
    }
    if lane is not None:
        body["stream_id"] = lane
    return orjson.dumps(body).decode()


async def _deny(scope: Scope, send: Send, status: int, body: bytes) -> None:
    """Refuse the handshake with an HTTP answer where the server can send one (uvicorn
    can), else by closing before accepting (the client sees 403)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})
