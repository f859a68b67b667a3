"""The Responses API's WebSocket mode on the fake (``GET /v1/responses`` upgraded).

The client sends ``response.create`` events (the body of ``POST /v1/responses`` with
``type`` and an optional ``stream_id``; ``stream`` is implied); the fake answers each
with the events an SSE stream would carry, one JSON text frame each, echoing the
``stream_id``. Creates on one lane (``stream_id``) run in order, lanes run side by
side. A bad event is answered with an ``error`` event (``status``, ``error``) and the
socket stays open. The handshake's ``x-fake-*`` headers apply to every response on
the socket; with ``x-fake-scenario: cut`` the fake drops the connection halfway
through the first response, the way a broken upstream looks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from tokentill.fakeai import errors
from tokentill.fakeai.request import read_request
from tokentill.fakeai.response_builder import IncompleteReason, Outcome, draft_response
from tokentill.fakeai.scenarios import Controls, Scenario, read_controls
from tokentill.fakeai.sdk import dump
from tokentill.fakeai.usage import plan_usage

if TYPE_CHECKING:
    from starlette.responses import Response

    from tokentill.fakeai.app import FakeUpstream

Forced = dict[Scenario, tuple[Outcome, IncompleteReason | None]]


def error_event(error: errors.OpenAIError, stream_id: str | None) -> bytes:
    body: dict[str, Any] = {
        "type": "error",
        "status": error.status,
        "error": {
            "type": error.type,
            "code": error.code,
            "message": error.message,
            "param": error.param,
        },
    }
    if stream_id is not None:
        body["stream_id"] = stream_id
    return orjson.dumps(body)


class ResponsesSocket:
    """One WebSocket connection's worth of responses."""

    def __init__(
        self,
        fake: FakeUpstream,
        websocket: WebSocket,
        key: str,
        controls: Controls,
        forced: Forced,
    ) -> None:
        self._fake, self._ws, self._key = fake, websocket, key
        self._controls, self._forced = controls, forced
        self._lanes: dict[str | None, asyncio.Queue[dict[str, Any]]] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._send_lock = asyncio.Lock()
        self._cut = controls.scenario is Scenario.CUT

    async def run(self) -> None:
        try:
            while True:
                text = await self._ws.receive_text()
                await self._on_event(text)
        except WebSocketDisconnect:
            pass
        finally:
            for worker in self._workers:
                worker.cancel()

    async def _send(self, frame: bytes) -> None:
        async with self._send_lock:
            await self._ws.send_text(frame.decode())

    async def _on_event(self, text: str) -> None:
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            await self._send(error_event(errors.invalid_json(), None))
            return
        if not isinstance(event, dict) or event.get("type") != "response.create":
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "response.steer":
                return  # steering needs a running model; the fake has none to steer
            message = f"Invalid event type: {kind!r}. Expected 'response.create'."
            await self._send(error_event(errors.OpenAIError(400, message, param="type"), None))
            return
        stream_id = event.get("stream_id")
        lane = stream_id if isinstance(stream_id, str) else None
        queue = self._lanes.get(lane)
        if queue is None:
            queue = self._lanes[lane] = asyncio.Queue()
            self._workers.append(asyncio.create_task(self._lane(queue)))
        queue.put_nowait(event)

    async def _lane(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        while True:
            event = await queue.get()
            await self._create(event)

    async def _create(self, event: dict[str, Any]) -> None:
        stream_id = event.get("stream_id")
        sid = stream_id if isinstance(stream_id, str) else None
        body = {k: v for k, v in event.items() if k not in ("type", "stream_id")}
        body["stream"] = True
        try:
            if body.get("background") is True:
                raise errors.OpenAIError(
                    400, "background is not supported over WebSocket.", param="background"
                )
            info = read_request(body, "responses")
        except errors.OpenAIError as error:
            await self._send(error_event(error, sid))
            return
        fake, controls = self._fake, self._controls
        rng = fake.synth.rng_for(orjson.dumps(body))
        forced, reason = self._forced.get(controls.scenario, (None, None))
        draft = draft_response(
            info,
            plan_usage(info, rng),
            rng,
            created_at=controls.created_at or int(time.time()),
            forced=forced,
            forced_reason=reason,
        )
        frames = [_with_stream_id(dump(e), sid) for e in draft.events()]
        if self._cut:
            # The upstream finishes (and bills) what the client never saw whole.
            fake.record_response(draft, self._key, delivered=False)
            if info.store:
                fake.store.put(draft.id, dump(draft.final()))
            for frame in frames[: max(1, len(frames) // 2)]:
                await self._send(frame)
            with contextlib.suppress(Exception):
                await self._ws.close(code=1011)
            return
        for index, frame in enumerate(frames):
            if index and controls.event_delay_s:
                await asyncio.sleep(controls.event_delay_s)
            await self._send(frame)
        fake.record_response(draft, self._key)
        if info.store:
            fake.store.put(draft.id, dump(draft.final()))


def _with_stream_id(payload: bytes, stream_id: str | None) -> bytes:
    if stream_id is None:
        return payload
    return payload[:-1] + b',"stream_id":' + orjson.dumps(stream_id) + b"}"


async def serve_socket(
    fake: FakeUpstream,
    websocket: WebSocket,
    api_key: Callable[[str], str],
    error_response: Callable[[errors.OpenAIError], Response],
    forced: Forced,
) -> None:
    """Authenticate the handshake like the HTTP routes (401 in OpenAI's shape), then
    serve the socket until the client closes it."""
    try:
        key = api_key(websocket.headers.get("authorization", ""))
        controls = read_controls(websocket.headers)
    except errors.OpenAIError as error:
        await websocket.send_denial_response(error_response(error))
        return
    await websocket.accept()
    await ResponsesSocket(fake, websocket, key, controls, forced).run()
