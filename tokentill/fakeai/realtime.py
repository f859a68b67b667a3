"""The Realtime API on the fake (``GET /v1/realtime?model=…`` upgraded; the GA interface).

One socket is one session with one default conversation. On connect the fake sends
``session.created`` (the model from the query; ``call_id=`` instead joins a call, as a
WebRTC call's sideband connection does). Client events:

- ``session.update``: merged into the session (``audio.input``/``audio.output`` key by
  key), answered with ``session.updated``;
- ``conversation.item.create``: the item joins the conversation, answered with
  ``conversation.item.added`` and ``conversation.item.done``;
- ``input_audio_buffer.append`` / ``.clear`` / ``.commit``: the buffer counts the bytes of
  its base64 audio; a commit (at least 100 ms) turns it into a user item, answered with
  ``input_audio_buffer.committed`` and the item's events; with a transcription model
  configured (``audio.input.transcription.model``), then
  ``conversation.item.input_audio_transcription.completed`` with its usage (``tokens``, or
  ``duration`` for the models billed by the hour, whisper-1 among them);
- ``response.create``: a response runs (``response.created``, its output item, content
  part and text or audio deltas, ``response.done`` with usage). Only one response at a
  time may write to the default conversation (``conversation: "none"`` responses, out
  of band, run beside it);
- ``response.cancel``: the response (by ``response_id``, else the conversation's) ends
  ``cancelled`` with the usage of what it produced so far.

With server VAD on (``audio.input.turn_detection`` of type ``server_vad`` or
``semantic_vad``), a commit plays the end of a spoken turn: ``speech_started`` /
``speech_stopped`` come first and, unless ``create_response`` is false, a response starts
on its own, with no ``response.create`` (cancelling the one running, reason
``turn_detected``, unless ``interrupt_response`` is false). Real VAD finds the silence
itself; the fake has no ears, so the commit stands for it. Deliberate deviation: a fake
session starts with turn detection off (OpenAI's default is server VAD), so that a
test's manual commit does not also start a response.

Usage: audio in at 10 tokens a second of input audio (the buffer's bytes over the
format's byte rate), audio out at 20 a second, text at about four characters a token,
images at a fixed count each. A response's input is the conversation so far (its own
``input`` for an out-of-band one) with the instructions; output of earlier turns is
input of later ones, and from the second turn on the part the previous response
already read comes from the cache. A bad event is answered with an ``error`` event
(`RealtimeErrorEvent`, naming the client's ``event_id``) and the socket stays open.

Every response that ends and every transcription is billed in the ledger (endpoint
``/v1/realtime``; a transcription's id is its item's). A cancelled response is billed
for what it produced; a failed one for nothing. The handshake's ``x-fake-*`` headers
apply to the whole session: ``http_401``/``http_429``/``http_500`` refuse the handshake;
``incomplete``, ``content_filter`` and ``failed`` decide how responses end; ``slow``
delays each response's first event; ``x-fake-delay-ms`` paces the events; ``cut`` drops
the connection (1011) halfway through the first response, which is billed for what it
produced by then (``delivered=False``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple

import orjson
from openai import BaseModel
from openai.types.realtime import (
    ConversationItemAdded,
    ConversationItemDeletedEvent,
    ConversationItemDone,
    ConversationItemInputAudioTranscriptionCompletedEvent,
    InputAudioBufferClearedEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    RealtimeConversationItemAssistantMessage,
    RealtimeConversationItemFunctionCall,
    RealtimeConversationItemFunctionCallOutput,
    RealtimeConversationItemSystemMessage,
    RealtimeConversationItemUserMessage,
    RealtimeError,
    RealtimeErrorEvent,
    RealtimeResponse,
    RealtimeResponseStatus,
    RealtimeResponseUsage,
    RealtimeResponseUsageInputTokenDetails,
    RealtimeResponseUsageOutputTokenDetails,
    RealtimeSessionCreateRequest,
    ResponseAudioDeltaEvent,
    ResponseAudioDoneEvent,
    ResponseAudioTranscriptDeltaEvent,
    ResponseAudioTranscriptDoneEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseDoneEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    SessionCreatedEvent,
    SessionUpdatedEvent,
)
from openai.types.realtime.conversation_item_input_audio_transcription_completed_event import (
    UsageTranscriptTextUsageDuration,
    UsageTranscriptTextUsageTokens,
    UsageTranscriptTextUsageTokensInputTokenDetails,
)
from openai.types.realtime.realtime_audio_formats import AudioPCM
from openai.types.realtime.realtime_conversation_item_assistant_message import (
    Content as AssistantContent,
)
from openai.types.realtime.realtime_response import Audio, AudioOutput
from openai.types.realtime.realtime_response_status import Error as StatusError
from openai.types.realtime.realtime_response_usage_input_token_details import (
    CachedTokensDetails,
)
from openai.types.realtime.response_content_part_added_event import Part
from starlette.websockets import WebSocket, WebSocketDisconnect

from tokentill.fakeai import errors, ids
from tokentill.fakeai.ledger import LedgerEntry
from tokentill.fakeai.scenarios import Controls, Scenario, read_controls
from tokentill.fakeai.sdk import build, coerce, dump
from tokentill.fakeai.text import filler_text, split_deltas

if TYPE_CHECKING:
    from starlette.responses import Response

    from tokentill.fakeai.app import FakeUpstream

REALTIME_PATH: Final = "/v1/realtime"
_INPUT_AUDIO_TOKENS_PER_SECOND: Final = 10  # one token per 100 ms of the user's audio
_OUTPUT_AUDIO_TOKENS_PER_SECOND: Final = 20  # one per 50 ms of the model's
_BYTES_PER_SECOND: Final = {"audio/pcm": 48_000, "audio/pcmu": 8_000, "audio/pcma": 8_000}
_MIN_COMMIT_SECONDS: Final = 0.1
_IMAGE_TOKENS: Final = 255
_DELTAS: Final = 4
# Transcription models billed by the second of audio (their usage is a `duration`).
_BILLED_BY_DURATION: Final = frozenset(
    {"whisper-1", "gpt-realtime-whisper", "gpt-transcribe", "gpt-live-transcribe"}
)
_CLIENT_EVENTS: Final = (
    "session.update",
    "conversation.item.create",
    "conversation.item.delete",
    "input_audio_buffer.append",
    "input_audio_buffer.clear",
    "input_audio_buffer.commit",
    "response.create",
    "response.cancel",
)
_VAD_TYPES: Final = frozenset({"server_vad", "semantic_vad"})
_SERVER_VAD_DEFAULTS: Final = {
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "create_response": True,
    "interrupt_response": True,
}
_ID_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
Status = Literal["completed", "cancelled", "failed", "incomplete"]
_FORCED: Final[dict[Scenario, tuple[Status, str | None]]] = {
    Scenario.INCOMPLETE: ("incomplete", "max_output_tokens"),
    Scenario.CONTENT_FILTER: ("incomplete", "content_filter"),
    Scenario.FAILED: ("failed", None),
}


def _id(prefix: str) -> str:
    """An id in the Realtime API's style: a prefix and 22 letters or digits."""
    return prefix + "".join(_ID_ALPHABET[b % len(_ID_ALPHABET)] for b in os.urandom(22))


def _event_id() -> str:
    return _id("event_")


def _text_tokens(text: str) -> int:
    return max(1, len(text) // 4) if text else 0


class RealtimeEventError(Exception):
    """A client event the fake refuses: answered with an `error` event."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass(slots=True)
class Tokens:
    """Token counts by modality."""

    text: int = 0
    audio: int = 0
    image: int = 0

    @property
    def total(self) -> int:
        return self.text + self.audio + self.image

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.text + other.text, self.audio + other.audio, self.image + other.image)

    def at_most(self, other: Tokens) -> Tokens:
        return Tokens(
            min(self.text, other.text), min(self.audio, other.audio), min(self.image, other.image)
        )


class _Step(NamedTuple):
    """One event of a response's output, and what it delivers."""

    event: BaseModel
    tokens: Tokens = Tokens()
    said: str = ""


@dataclass(slots=True)
class _Item:
    """A conversation item as the fake keeps it: its id, its echo and its tokens."""

    id: str
    model: BaseModel
    tokens: Tokens


@dataclass(slots=True)
class _Turn:
    """One response, from `response.created` to `response.done`."""

    id: str
    in_conversation: bool
    modalities: list[str]
    max_output_tokens: int | str
    metadata: dict[str, str] | None
    inputs: Tokens
    cached: Tokens
    text: str
    text_tokens: int
    audio_tokens: int
    outcome: Status
    reason: str | None
    conversation_id: str | None
    created_at: int
    item_id: str = field(default_factory=lambda: _id("item_"))
    produced: Tokens = field(default_factory=Tokens)
    said: str = ""  # the text (or the audio's transcript) delivered so far
    cancelled: str | None = None  # the reason it was cancelled with, once it is
    ended: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def audio_out(self) -> bool:
        return "audio" in self.modalities


class RealtimeSession:
    """One Realtime socket's session, conversation, audio buffer and responses."""

    def __init__(
        self,
        fake: FakeUpstream,
        websocket: WebSocket,
        key: str,
        controls: Controls,
        model: str,
        call_id: str | None,
    ) -> None:
        self._fake, self._ws, self._key, self._controls = fake, websocket, key, controls
        self._send_lock = asyncio.Lock()
        self._conversation_id = _id("conv_")
        self._items: list[_Item] = []
        self._buffer_bytes = 0
        self._active: _Turn | None = None  # the response writing to the conversation
        self._turns: dict[str, _Turn] = {}  # every response running
        self._last_inputs: Tokens | None = None  # what the previous response read
        self._cut = controls.scenario is Scenario.CUT
        self._closed = False
        self._session: dict[str, Any] = {
            "type": "realtime",
            "object": "realtime.session",
            "id": _id("sess_"),
            "model": model,
            "output_modalities": ["audio"],
            "instructions": "You are a helpful, witty and friendly assistant.",
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "tracing": None,
            "truncation": "auto",
            "prompt": None,
            "expires_at": int(time.time()) + 3600,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": None,
                    "noise_reduction": None,
                    "turn_detection": None,
                },
                "output": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "voice": "alloy",
                    "speed": 1.0,
                },
            },
        }
        if call_id is not None:
            self._session["call_id"] = call_id

    # -- the socket -----------------------------------------------------------------------

    async def run(self) -> None:
        await self._send(
            build(
                SessionCreatedEvent,
                event_id=_event_id(),
                type="session.created",
                session=self._session_model(),
            )
        )
        try:
            while not self._closed:
                text = await self._ws.receive_text()
                await self._on_event(text)
        except WebSocketDisconnect:
            pass
        finally:
            for turn in list(self._turns.values()):
                if turn.task is not None:
                    turn.task.cancel()
                # The client left mid-response: what was produced is spent.
                self._bill(turn, "cancelled", delivered=False)

    async def _send(self, event: BaseModel) -> None:
        async with self._send_lock:
            await self._ws.send_text(dump(event).decode())

    async def _error(self, exc: RealtimeEventError, event_id: str | None) -> None:
        error = build(
            RealtimeError,
            type="invalid_request_error",
            code=exc.code,
            message=exc.message,
            param=exc.param,
            event_id=event_id,
        )
        await self._send(build(RealtimeErrorEvent, event_id=_event_id(), type="error", error=error))

    async def _on_event(self, text: str) -> None:
        try:
            event = orjson.loads(text)
        except orjson.JSONDecodeError:
            error = RealtimeEventError("The event is not valid JSON.", "invalid_json")
            await self._error(error, None)
            return
        if not isinstance(event, dict):
            error = RealtimeEventError("An event is a JSON object.", "invalid_type")
            await self._error(error, None)
            return
        raw_id = event.get("event_id")
        event_id = raw_id if isinstance(raw_id, str) else None
        kind = event.get("type")
        try:
            if kind == "session.update":
                await self._session_update(event)
            elif kind == "conversation.item.create":
                await self._item_create(event)
            elif kind == "conversation.item.delete":
                await self._item_delete(event)
            elif kind == "input_audio_buffer.append":
                self._append(event)
            elif kind == "input_audio_buffer.clear":
                self._buffer_bytes = 0
                await self._send(
                    build(
                        InputAudioBufferClearedEvent,
                        event_id=_event_id(),
                        type="input_audio_buffer.cleared",
                    )
                )
            elif kind == "input_audio_buffer.commit":
                await self._commit()
            elif kind == "response.create":
                await self._response_create(event)
            elif kind == "response.cancel":
                self._response_cancel(event)
            else:
                supported = ", ".join(f"'{name}'" for name in _CLIENT_EVENTS)
                raise RealtimeEventError(
                    f"Invalid value: {kind!r}. Supported values are: {supported}.",
                    "invalid_value",
                    "type",
                )
        except RealtimeEventError as exc:
            await self._error(exc, event_id)

    # -- the session ----------------------------------------------------------------------

    def _session_model(self) -> RealtimeSessionCreateRequest:
        return coerce(RealtimeSessionCreateRequest, copy.deepcopy(self._session))

    async def _session_update(self, event: dict[str, Any]) -> None:
        update = event.get("session")
        if not isinstance(update, dict):
            raise RealtimeEventError(
                "Missing required parameter: 'session'.", "missing_required_parameter", "session"
            )
        if update.get("type") not in ("realtime", None):
            raise RealtimeEventError(
                f"Invalid value: {update.get('type')!r}. This is a 'realtime' session.",
                "invalid_value",
                "session.type",
            )
        for name, value in update.items():
            if name in ("type", "model", "id", "object"):
                continue  # a session's kind and model are fixed when it is created
            if name == "audio" and isinstance(value, dict):
                audio = self._session["audio"]
                for side in ("input", "output"):
                    if isinstance(value.get(side), dict):
                        audio[side].update(value[side])
                continue
            self._session[name] = value
        detection = self._audio_input().get("turn_detection")
        if isinstance(detection, dict) and detection.get("type") == "server_vad":
            self._audio_input()["turn_detection"] = {**_SERVER_VAD_DEFAULTS, **detection}
        await self._send(
            build(
                SessionUpdatedEvent,
                event_id=_event_id(),
                type="session.updated",
                session=self._session_model(),
            )
        )

    def _audio_input(self) -> dict[str, Any]:
        value: dict[str, Any] = self._session["audio"]["input"]
        return value

    def _transcription_model(self) -> str | None:
        transcription = self._audio_input().get("transcription")
        model = transcription.get("model") if isinstance(transcription, dict) else None
        return model if isinstance(model, str) else None

    def _vad(self) -> dict[str, Any] | None:
        detection = self._audio_input().get("turn_detection")
        if isinstance(detection, dict) and detection.get("type") in _VAD_TYPES:
            return detection
        return None

    def _bytes_per_second(self) -> int:
        audio_format = self._audio_input().get("format")
        kind = audio_format.get("type") if isinstance(audio_format, dict) else None
        return _BYTES_PER_SECOND.get(str(kind), _BYTES_PER_SECOND["audio/pcm"])

    # -- the conversation -----------------------------------------------------------------

    def _read_item(self, raw: Any) -> _Item:
        """An item the client sent: its echo (an SDK item type) and its tokens."""
        if not isinstance(raw, dict):
            raise RealtimeEventError(
                "Missing required parameter: 'item'.", "missing_required_parameter", "item"
            )
        item = dict(raw)
        given = item.get("id")
        item_id = given if isinstance(given, str) else _id("item_")
        item.update(id=item_id, object="realtime.item", status="completed")
        kind, role = item.get("type"), item.get("role")
        tokens = Tokens()
        model: BaseModel
        if kind == "message" and role in ("user", "system", "assistant"):
            content = item.get("content")
            if not isinstance(content, list):
                raise RealtimeEventError(
                    "Missing required parameter: 'item.content'.",
                    "missing_required_parameter",
                    "item.content",
                )
            for part in content:
                tokens += self._part_tokens(part)
            cls = {
                "user": RealtimeConversationItemUserMessage,
                "system": RealtimeConversationItemSystemMessage,
                "assistant": RealtimeConversationItemAssistantMessage,
            }[role]
            model = coerce(cls, item)
        elif kind == "function_call":
            tokens.text = _text_tokens(str(item.get("arguments", ""))) + 4
            model = coerce(RealtimeConversationItemFunctionCall, item)
        elif kind == "function_call_output":
            tokens.text = _text_tokens(str(item.get("output", "")))
            model = coerce(RealtimeConversationItemFunctionCallOutput, item)
        else:
            raise RealtimeEventError(
                f"Invalid value: {kind!r}. The fake takes message, function_call and "
                "function_call_output items.",
                "invalid_value",
                "item.type",
            )
        return _Item(item_id, model, tokens)

    def _part_tokens(self, part: Any) -> Tokens:
        if not isinstance(part, dict):
            return Tokens()
        kind = part.get("type")
        if kind == "input_audio" and isinstance(part.get("audio"), str):
            return Tokens(audio=self._audio_tokens(self._decoded_size(part["audio"], "audio")))
        if kind == "input_image":
            return Tokens(image=_IMAGE_TOKENS)
        text = part.get("text") or part.get("transcript")
        return Tokens(text=_text_tokens(text if isinstance(text, str) else ""))

    def _audio_tokens(self, size: int) -> int:
        seconds = size / self._bytes_per_second()
        return max(1, round(seconds * _INPUT_AUDIO_TOKENS_PER_SECOND)) if size else 0

    @staticmethod
    def _decoded_size(value: Any, param: str) -> int:
        if not isinstance(value, str):
            raise RealtimeEventError(
                f"Missing required parameter: '{param}'.", "missing_required_parameter", param
            )
        try:
            return len(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise RealtimeEventError(
                f"Invalid '{param}': not valid base64.", "invalid_value", param
            ) from None

    async def _add_item(self, item: _Item) -> None:
        previous = self._items[-1].id if self._items else None
        self._items.append(item)
        for cls, kind in (
            (ConversationItemAdded, "conversation.item.added"),
            (ConversationItemDone, "conversation.item.done"),
        ):
            await self._send(
                build(
                    cls,
                    event_id=_event_id(),
                    type=kind,
                    previous_item_id=previous,
                    item=item.model,
                )
            )

    async def _item_create(self, event: dict[str, Any]) -> None:
        item = self._read_item(event.get("item"))
        if any(known.id == item.id for known in self._items):
            raise RealtimeEventError(
                f"Item with id '{item.id}' already exists.", "item_already_exists", "item.id"
            )
        await self._add_item(item)

    async def _item_delete(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        for index, item in enumerate(self._items):
            if item.id == item_id:
                del self._items[index]
                await self._send(
                    build(
                        ConversationItemDeletedEvent,
                        event_id=_event_id(),
                        type="conversation.item.deleted",
                        item_id=item_id,
                    )
                )
                return
        raise RealtimeEventError(
            f"Error deleting item: the item with id '{item_id}' does not exist.",
            "item_delete_invalid_item_id",
            "item_id",
        )

    # -- the input audio buffer -----------------------------------------------------------

    def _append(self, event: dict[str, Any]) -> None:
        self._buffer_bytes += self._decoded_size(event.get("audio"), "audio")

    async def _commit(self) -> None:
        size, rate = self._buffer_bytes, self._bytes_per_second()
        if size < rate * _MIN_COMMIT_SECONDS:
            raise RealtimeEventError(
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {size / rate * 1000:.2f}ms of audio.",
                "input_audio_buffer_commit_empty",
            )
        self._buffer_bytes = 0
        item_id = _id("item_")
        vad = self._vad()
        previous = self._items[-1].id if self._items else None
        if vad is not None:
            end_ms = round(size / rate * 1000)
            await self._send(
                build(
                    InputAudioBufferSpeechStartedEvent,
                    event_id=_event_id(),
                    type="input_audio_buffer.speech_started",
                    audio_start_ms=0,
                    item_id=item_id,
                )
            )
            await self._send(
                build(
                    InputAudioBufferSpeechStoppedEvent,
                    event_id=_event_id(),
                    type="input_audio_buffer.speech_stopped",
                    audio_end_ms=end_ms,
                    item_id=item_id,
                )
            )
        await self._send(
            build(
                InputAudioBufferCommittedEvent,
                event_id=_event_id(),
                type="input_audio_buffer.committed",
                previous_item_id=previous,
                item_id=item_id,
            )
        )
        message = coerce(
            RealtimeConversationItemUserMessage,
            {
                "id": item_id,
                "object": "realtime.item",
                "type": "message",
                "status": "completed",
                "role": "user",
                "content": [{"type": "input_audio", "transcript": None}],
            },
        )
        await self._add_item(_Item(item_id, message, Tokens(audio=self._audio_tokens(size))))
        if self._transcription_model() is not None:
            await self._transcribe(item_id, size)
        if vad is None or vad.get("create_response") is False:
            return
        active = self._active
        if active is not None and vad.get("interrupt_response") is not False:
            self._cancel(active, "turn_detected")
            if active.task is not None:
                await asyncio.wait({active.task})
        if self._active is None:
            await self._start(self._plan({}, in_conversation=True))

    async def _transcribe(self, item_id: str, size: int) -> None:
        model = self._transcription_model() or ""
        transcription = self._audio_input().get("transcription") or {}
        rng = self._fake.synth.rng_for(item_id.encode())
        seconds = size / self._bytes_per_second()
        transcript = filler_text(max(1, round(seconds * 3)), rng)
        audio = self._audio_tokens(size)
        prompt = transcription.get("prompt")
        prompt_tokens = _text_tokens(prompt) if isinstance(prompt, str) else 0
        output = _text_tokens(transcript)
        usage: BaseModel
        if model in _BILLED_BY_DURATION:
            usage = build(
                UsageTranscriptTextUsageDuration, type="duration", seconds=round(seconds, 3)
            )
            billed = {"audio_seconds": round(seconds, 3)}
        else:
            usage = build(
                UsageTranscriptTextUsageTokens,
                type="tokens",
                input_tokens=audio + prompt_tokens,
                input_token_details=build(
                    UsageTranscriptTextUsageTokensInputTokenDetails,
                    text_tokens=prompt_tokens,
                    audio_tokens=audio,
                ),
                output_tokens=output,
                total_tokens=audio + prompt_tokens + output,
            )
            billed = {
                "input_tokens": audio + prompt_tokens,
                "input_audio_tokens": audio,
                "cached_input_tokens": 0,
                "output_tokens": output,
                "total_tokens": audio + prompt_tokens + output,
            }
        await self._send(
            build(
                ConversationItemInputAudioTranscriptionCompletedEvent,
                event_id=_event_id(),
                type="conversation.item.input_audio_transcription.completed",
                item_id=item_id,
                content_index=0,
                transcript=transcript,
                usage=usage,
            )
        )
        self._record(item_id, model, "completed", None, None, billed, created_at=None)

    # -- responses --------------------------------------------------------------------------

    async def _response_create(self, event: dict[str, Any]) -> None:
        raw = event.get("response")
        params: dict[str, Any] = raw if isinstance(raw, dict) else {}
        in_conversation = params.get("conversation", "auto") != "none"
        if in_conversation and self._active is not None:
            raise RealtimeEventError(
                "Conversation already has an active response in progress: "
                f"{self._active.id}. Wait until the response is finished before creating "
                "a new one.",
                "conversation_already_has_active_response",
            )
        await self._start(self._plan(params, in_conversation=in_conversation))

    def _response_cancel(self, event: dict[str, Any]) -> None:
        response_id = event.get("response_id")
        turn = self._turns.get(response_id) if isinstance(response_id, str) else self._active
        if turn is None or turn.cancelled is not None:
            raise RealtimeEventError(
                "Cancellation failed: no active response found.",
                "response_cancel_not_active",
                "response_id" if response_id is not None else None,
            )
        self._cancel(turn, "client_cancelled")

    def _cancel(self, turn: _Turn, reason: str) -> None:
        turn.cancelled = reason

    def _plan(self, params: dict[str, Any], *, in_conversation: bool) -> _Turn:
        """Decide a response's input, output and ending before it starts."""
        rng = self._fake.synth.rng_for(orjson.dumps(params) + self._conversation_id.encode())
        instructions = params.get("instructions", self._session.get("instructions"))
        inputs = Tokens(text=_text_tokens(instructions if isinstance(instructions, str) else ""))
        given = params.get("input")
        if in_conversation or not isinstance(given, list):
            for item in self._items:
                inputs += item.tokens
        else:
            known = {item.id: item for item in self._items}
            for raw in given:
                if isinstance(raw, dict) and raw.get("type") == "item_reference":
                    found = known.get(str(raw.get("id")))
                    inputs += found.tokens if found is not None else Tokens()
                else:
                    inputs += self._read_item(raw).tokens
        # The previous turn's input is the prefix this one repeats: read from the cache.
        previous = self._last_inputs if in_conversation else None
        cached = previous.at_most(inputs) if previous is not None else Tokens()
        modalities = params.get("output_modalities") or self._session.get("output_modalities")
        modalities = [m for m in modalities or () if m in ("text", "audio")] or ["audio"]
        limit = params.get("max_output_tokens", self._session.get("max_output_tokens"))
        wanted = rng.randint(12, 60)
        audio_tokens = rng.randint(20, 80) if "audio" in modalities else 0
        outcome: Status = "completed"
        reason: str | None = None
        forced = _FORCED.get(self._controls.scenario)
        if forced is not None:
            outcome, reason = forced
        if isinstance(limit, int) and not isinstance(limit, bool) and wanted + audio_tokens > limit:
            # It stops at its bound, half audio, half transcript.
            outcome, reason = "incomplete", "max_output_tokens"
            audio_tokens = min(audio_tokens, limit // 2) if audio_tokens else 0
            wanted = max(1, limit - audio_tokens)
        elif outcome == "incomplete":
            wanted, audio_tokens = max(1, wanted // 2), audio_tokens // 2
        raw_metadata = params.get("metadata")
        metadata = raw_metadata if isinstance(raw_metadata, dict) else None
        return _Turn(
            id=_id("resp_"),
            in_conversation=in_conversation,
            modalities=modalities,
            max_output_tokens=limit if isinstance(limit, (int, str)) else "inf",
            metadata=metadata,
            inputs=inputs,
            cached=cached,
            text=filler_text(wanted, rng),
            text_tokens=wanted,
            audio_tokens=audio_tokens,
            outcome=outcome,
            reason=reason,
            conversation_id=self._conversation_id if in_conversation else None,
            created_at=self._controls.created_at or int(time.time()),
        )

    async def _start(self, turn: _Turn) -> None:
        """Create the response, then let it run beside the session's other events. It
        is created before the next client event is read, as OpenAI answers in order."""
        self._turns[turn.id] = turn
        if turn.in_conversation:
            self._active = turn
            self._last_inputs = turn.inputs
        await self._send(
            build(
                ResponseCreatedEvent,
                event_id=_event_id(),
                type="response.created",
                response=self._response(turn, "in_progress", None),
            )
        )
        turn.task = asyncio.create_task(self._run(turn))

    def _response(self, turn: _Turn, status: str, usage: RealtimeResponseUsage | None) -> Any:
        details: RealtimeResponseStatus | None = None
        if status == "cancelled":
            details = build(RealtimeResponseStatus, type="cancelled", reason=turn.cancelled)
        elif status == "incomplete":
            details = build(RealtimeResponseStatus, type="incomplete", reason=turn.reason)
        elif status == "failed":
            error = build(
                StatusError,
                type="server_error",
                code="server_error",
                message="The server had an error while processing your request.",
            )
            details = build(RealtimeResponseStatus, type="failed", error=error)
        output = [] if status == "in_progress" else [self._output_item(turn, status)]
        voice = self._session["audio"]["output"].get("voice")
        return build(
            RealtimeResponse,
            id=turn.id,
            object="realtime.response",
            status=status,
            status_details=details,
            output=output,
            conversation_id=turn.conversation_id,
            output_modalities=turn.modalities,
            max_output_tokens=turn.max_output_tokens,
            audio=build(
                Audio,
                output=build(
                    AudioOutput, format=build(AudioPCM, type="audio/pcm", rate=24000), voice=voice
                ),
            ),
            usage=usage,
            metadata=turn.metadata,
        )

    def _output_item(self, turn: _Turn, status: str) -> RealtimeConversationItemAssistantMessage:
        produced = turn.said
        if turn.audio_out:
            content = build(AssistantContent, type="output_audio", transcript=produced)
        else:
            content = build(AssistantContent, type="output_text", text=produced)
        item_status = "in_progress" if status == "in_progress" else "completed"
        if status in ("cancelled", "incomplete", "failed"):
            item_status = "incomplete"
        return build(
            RealtimeConversationItemAssistantMessage,
            id=turn.item_id,
            object="realtime.item",
            type="message",
            status=item_status,
            role="assistant",
            content=[content],
        )

    def _usage(self, turn: _Turn) -> RealtimeResponseUsage:
        inputs, cached, produced = turn.inputs, turn.cached, turn.produced
        return build(
            RealtimeResponseUsage,
            total_tokens=inputs.total + produced.text + produced.audio,
            input_tokens=inputs.total,
            output_tokens=produced.text + produced.audio,
            input_token_details=build(
                RealtimeResponseUsageInputTokenDetails,
                text_tokens=inputs.text,
                audio_tokens=inputs.audio,
                image_tokens=inputs.image,
                cached_tokens=cached.total,
                cached_tokens_details=build(
                    CachedTokensDetails,
                    text_tokens=cached.text,
                    audio_tokens=cached.audio,
                    image_tokens=cached.image,
                ),
            ),
            output_token_details=build(
                RealtimeResponseUsageOutputTokenDetails,
                text_tokens=produced.text,
                audio_tokens=produced.audio,
            ),
        )

    def _output_events(self, turn: _Turn) -> list[_Step]:
        """The events between `response.created` and the closing ones, each with the
        output it delivers."""
        common = {"response_id": turn.id, "item_id": turn.item_id, "output_index": 0}
        part_type = "audio" if turn.audio_out else "text"
        steps = [
            _Step(
                build(
                    ResponseOutputItemAddedEvent,
                    event_id=_event_id(),
                    type="response.output_item.added",
                    response_id=turn.id,
                    output_index=0,
                    item=self._output_item(turn, "in_progress"),
                )
            ),
            _Step(
                build(
                    ResponseContentPartAddedEvent,
                    event_id=_event_id(),
                    type="response.content_part.added",
                    content_index=0,
                    part=build(Part, type=part_type),
                    **common,
                )
            ),
        ]
        deltas = split_deltas(turn.text, _DELTAS)
        text_tokens = _split(turn.text_tokens, len(deltas))
        audio_tokens = _split(turn.audio_tokens, len(deltas))
        bytes_per_token = _BYTES_PER_SECOND["audio/pcm"] // _OUTPUT_AUDIO_TOKENS_PER_SECOND
        for delta, text_count, audio_count in zip(deltas, text_tokens, audio_tokens, strict=True):
            if turn.audio_out:
                chunk = base64.b64encode(bytes(audio_count * bytes_per_token)).decode()
                audio = build(
                    ResponseAudioDeltaEvent,
                    event_id=_event_id(),
                    type="response.output_audio.delta",
                    content_index=0,
                    delta=chunk,
                    **common,
                )
                steps.append(_Step(audio, Tokens(audio=audio_count)))
                transcript = build(
                    ResponseAudioTranscriptDeltaEvent,
                    event_id=_event_id(),
                    type="response.output_audio_transcript.delta",
                    content_index=0,
                    delta=delta,
                    **common,
                )
                steps.append(_Step(transcript, Tokens(text=text_count), delta))
            else:
                text = build(
                    ResponseTextDeltaEvent,
                    event_id=_event_id(),
                    type="response.output_text.delta",
                    content_index=0,
                    delta=delta,
                    **common,
                )
                steps.append(_Step(text, Tokens(text=text_count), delta))
        return steps

    def _closing_events(self, turn: _Turn, status: str) -> list[BaseModel]:
        common = {"response_id": turn.id, "item_id": turn.item_id, "output_index": 0}
        text = turn.said
        events: list[BaseModel] = []
        if turn.audio_out:
            events.append(
                build(
                    ResponseAudioDoneEvent,
                    event_id=_event_id(),
                    type="response.output_audio.done",
                    content_index=0,
                    **common,
                )
            )
            events.append(
                build(
                    ResponseAudioTranscriptDoneEvent,
                    event_id=_event_id(),
                    type="response.output_audio_transcript.done",
                    content_index=0,
                    transcript=text,
                    **common,
                )
            )
            part = build(Part, type="audio", transcript=text)
        else:
            events.append(
                build(
                    ResponseTextDoneEvent,
                    event_id=_event_id(),
                    type="response.output_text.done",
                    content_index=0,
                    text=text,
                    **common,
                )
            )
            part = build(Part, type="text", text=text)
        events.append(
            build(
                ResponseContentPartDoneEvent,
                event_id=_event_id(),
                type="response.content_part.done",
                content_index=0,
                part=part,
                **common,
            )
        )
        events.append(
            build(
                ResponseOutputItemDoneEvent,
                event_id=_event_id(),
                type="response.output_item.done",
                response_id=turn.id,
                output_index=0,
                item=self._output_item(turn, status),
            )
        )
        return events

    async def _run(self, turn: _Turn) -> None:
        controls = self._controls
        if controls.initial_delay_s:
            await asyncio.sleep(controls.initial_delay_s)
        events = self._output_events(turn)
        cut_at = max(1, len(events) // 2) if self._cut else None
        for index, step in enumerate(events):
            # A pause (or a bare yield) between events lets a cancel land mid-response.
            await asyncio.sleep(controls.event_delay_s)
            if turn.cancelled is not None:
                break
            if index == cut_at:
                await self._drop(turn)
                return
            await self._send(step.event)
            turn.produced += step.tokens
            turn.said += step.said
        status: Status = "cancelled" if turn.cancelled is not None else turn.outcome
        for event in self._closing_events(turn, status):
            await self._send(event)
        usage = None if status == "failed" else self._usage(turn)
        self._bill(turn, status, delivered=True)
        await self._send(
            build(
                ResponseDoneEvent,
                event_id=_event_id(),
                type="response.done",
                response=self._response(turn, status, usage),
            )
        )

    async def _drop(self, turn: _Turn) -> None:
        """The `cut` scenario: the connection breaks; what was produced is spent."""
        self._cut = False
        self._closed = True
        self._bill(turn, "cancelled", delivered=False)
        with contextlib.suppress(Exception):
            await self._ws.close(code=1011)

    def _bill(self, turn: _Turn, status: Status, *, delivered: bool) -> None:
        """Bill a response once, when it ends; it leaves the conversation's active slot
        and its output joins the conversation."""
        if turn.ended:
            return
        turn.ended = True
        self._turns.pop(turn.id, None)
        if self._active is turn:
            self._active = None
        if turn.in_conversation and status != "failed":
            self._items.append(
                _Item(
                    turn.item_id,
                    self._output_item(turn, status),
                    Tokens(text=turn.produced.text, audio=turn.produced.audio),
                )
            )
        billed: dict[str, Any] = {}
        if status != "failed":
            inputs, cached, produced = turn.inputs, turn.cached, turn.produced
            billed = {
                "input_tokens": inputs.total,
                "cached_input_tokens": cached.total,
                "input_audio_tokens": inputs.audio,
                "cached_audio_tokens": cached.audio,
                "input_image_tokens": inputs.image,
                "cached_image_tokens": cached.image,
                "output_tokens": produced.text + produced.audio,
                "output_audio_tokens": produced.audio,
                "total_tokens": inputs.total + produced.text + produced.audio,
            }
        reason = turn.cancelled if status == "cancelled" else turn.reason
        error_code = "server_error" if status == "failed" else None
        self._record(
            turn.id,
            str(self._session["model"]),
            status,
            reason if status in ("incomplete", "cancelled") else None,
            error_code,
            billed,
            created_at=turn.created_at,
            delivered=delivered,
        )

    def _record(
        self,
        object_id: str,
        model: str,
        status: str,
        reason: str | None,
        error_code: str | None,
        usage: dict[str, Any],
        *,
        created_at: int | None,
        delivered: bool = True,
    ) -> None:
        """One ledger entry; `usage` holds the entry's usage fields that apply (none for
        what is not billed)."""
        now = int(time.time())
        self._fake.ledger.record(
            LedgerEntry(
                id=object_id,
                endpoint=REALTIME_PATH,
                model=model,
                requested_model=model,
                status=status,
                incomplete_reason=reason,
                error_code=error_code,
                input_tokens=usage.pop("input_tokens", None),
                cached_input_tokens=usage.pop("cached_input_tokens", None),
                cache_write_tokens=None,
                cache_write_30m_tokens=None,
                cache_write_12h_tokens=None,
                output_tokens=usage.pop("output_tokens", None),
                reasoning_tokens=None,
                total_tokens=usage.pop("total_tokens", None),
                web_search_calls=None,
                image_gen_input_tokens=None,
                image_gen_input_image_tokens=None,
                image_gen_output_tokens=None,
                service_tier="default",
                user=None,  # the Realtime API has no end-user field
                safety_identifier=None,
                created_at=created_at or now,
                completed_at=now,
                key_fingerprint=ids.key_fingerprint(self._key),
                streamed=True,
                background=False,
                delivered=delivered,
                **usage,
            )
        )


def _split(total: int, parts: int) -> list[int]:
    """`total` in `parts` nearly equal counts."""
    if parts <= 0:
        return []
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


async def serve_realtime(
    fake: FakeUpstream,
    websocket: WebSocket,
    api_key: Callable[[str], str],
    error_response: Callable[[errors.OpenAIError], Response],
) -> None:
    """Authenticate the handshake like the HTTP routes (OpenAI's errors in its shape),
    read the model (or the call to join) from the query, then serve the session."""
    try:
        key = api_key(websocket.headers.get("authorization", ""))
        controls = read_controls(websocket.headers)
        if controls.scenario is Scenario.HTTP_401:
            raise errors.invalid_api_key(key)
        if controls.scenario is Scenario.HTTP_429:
            raise errors.rate_limited(websocket.query_params.get("model") or "gpt-realtime", 1)
        if controls.scenario is Scenario.HTTP_500:
            raise errors.server_error()
        call_id = websocket.query_params.get("call_id")
        model = websocket.query_params.get("model")
        if not model and not call_id:
            raise errors.missing_parameter("model")
    except errors.OpenAIError as error:
        await websocket.send_denial_response(error_response(error))
        return
    await websocket.accept()
    session = RealtimeSession(fake, websocket, key, controls, model or "gpt-realtime", call_id)
    await session.run()
