"""The fake's Images and Audio APIs: images made and edited, speech, transcriptions.

Payloads are the openai SDK's own types (`ImagesResponse`, `ImageGenCompletedEvent`,
`ImageEditCompletedEvent`, `Transcription`, `TranscriptionVerbose`, `Translation`,
`TranscriptionTextDeltaEvent`, `TranscriptionTextDoneEvent`); speech's SSE events
(`speech.audio.delta`, `speech.audio.done`) have no type in the SDK and are written as
the API reference shows them. What each model reports, as OpenAI's do:

- gpt-image models: `usage` in tokens (text and image input; gpt-image-1 reports its
  output as one number, later models split it into image and text tokens); images come
  as `b64_json`; `stream: true` sends `partial_images` partial events, then the
  completed event with the usage. dall-e models report no usage and answer with URLs.
- Transcription: whisper-1 reports the seconds of audio (`usage.type = "duration"`),
  the gpt-4o transcription models tokens (`usage.type = "tokens"`, audio and prompt
  text); `response_format` text, srt or vtt answers plain text with no usage; the
  gpt-4o models stream (`transcript.text.delta`, then `.done` with the usage).
  Translation (whisper-1) reports nothing. The fake's audio lasts one second per
  16,000 bytes of the uploaded file.
- Speech: audio bytes in chunks (no usage: tts-1 is priced by the input's
  characters), or, with `stream_format: "sse"` (not tts-1), audio deltas and a done
  event with token usage.

Every answer is billed in the ledger with what OpenAI would bill, reported or not.
"""

from __future__ import annotations

import base64
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson
from openai.types.audio.transcription import Transcription
from openai.types.audio.transcription import UsageDuration as TranscriptionSeconds
from openai.types.audio.transcription import UsageTokens as TranscriptionTokens
from openai.types.audio.transcription import (
    UsageTokensInputTokenDetails as TranscriptionTokenDetails,
)
from openai.types.audio.transcription_text_delta_event import TranscriptionTextDeltaEvent
from openai.types.audio.transcription_text_done_event import TranscriptionTextDoneEvent
from openai.types.audio.transcription_verbose import TranscriptionVerbose
from openai.types.audio.translation import Translation
from openai.types.image import Image
from openai.types.image_edit_completed_event import ImageEditCompletedEvent
from openai.types.image_edit_partial_image_event import ImageEditPartialImageEvent
from openai.types.image_gen_completed_event import ImageGenCompletedEvent
from openai.types.image_gen_partial_image_event import ImageGenPartialImageEvent
from openai.types.images_response import ImagesResponse
from openai.types.images_response import Usage as ImagesUsage
from openai.types.images_response import UsageInputTokensDetails as ImagesInputDetails
from openai.types.images_response import UsageOutputTokensDetails as ImagesOutputDetails

from tokentill.fakeai import errors, ids
from tokentill.fakeai.ledger import LedgerEntry
from tokentill.fakeai.sdk import build, dump
from tokentill.fakeai.text import filler_text, split_deltas

if TYPE_CHECKING:
    from tokentill.fakeai.app import FakeUpstream

IMAGES_GENERATIONS_PATH: Final = "/v1/images/generations"
IMAGES_EDITS_PATH: Final = "/v1/images/edits"
IMAGES_VARIATIONS_PATH: Final = "/v1/images/variations"
TRANSCRIPTIONS_PATH: Final = "/v1/audio/transcriptions"
TRANSLATIONS_PATH: Final = "/v1/audio/translations"
SPEECH_PATH: Final = "/v1/audio/speech"

# gpt-image-1's output tokens by quality and size (OpenAI's image generation guide).
_IMAGE_TOKENS: Final = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
_IMAGE_INPUT_TOKENS: Final = 323  # each image an edit is given
_BYTES_PER_SECOND: Final = 16_000  # the fake's audio: 16 kB a second
_AUDIO_TOKENS_PER_SECOND: Final = 10
_SPEECH_BYTES_PER_CHAR: Final = 60
_TINY_PNG: Final = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 24).decode()
_TEXT_FORMATS: Final = frozenset({"text", "srt", "vtt"})


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _str(fields: dict[str, Any], name: str, default: str | None = None) -> str:
    value = fields.get(name, default)
    if value is None or value == "":
        raise errors.missing_parameter(name)
    if not isinstance(value, str):
        raise errors.invalid_type(name, "a string", type(value).__name__)
    return value


def _int(fields: dict[str, Any], name: str, default: int) -> int:
    value = fields.get(name, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise errors.invalid_type(name, "an integer", type(value).__name__) from None
    if number < 0 or isinstance(value, bool):
        raise errors.invalid_value(name, f"Invalid '{name}': it must be a positive integer.")
    return number


def _flag(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name)
    return value is True or (isinstance(value, str) and value.lower() == "true")


def _entry(
    key: str,
    path: str,
    model: str,
    fields: dict[str, Any],
    *,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    streamed: bool = False,
    **modalities: Any,
) -> LedgerEntry:
    now = int(time.time())
    user = fields.get("user")
    total = None if input_tokens is None else input_tokens + (output_tokens or 0)
    return LedgerEntry(
        id=ids.request_id(),
        endpoint=path,
        model=model,
        requested_model=str(fields.get("model", model)),
        status="completed",
        incomplete_reason=None,
        error_code=None,
        input_tokens=input_tokens,
        cached_input_tokens=None if input_tokens is None else 0,
        cache_write_tokens=None,
        cache_write_30m_tokens=None,
        cache_write_12h_tokens=None,
        output_tokens=output_tokens,
        reasoning_tokens=None,
        total_tokens=total,
        web_search_calls=None,
        image_gen_input_tokens=None,
        image_gen_input_image_tokens=None,
        image_gen_output_tokens=None,
        service_tier="default",
        user=user if isinstance(user, str) else None,
        safety_identifier=None,
        created_at=now,
        completed_at=now,
        key_fingerprint=ids.key_fingerprint(key),
        streamed=streamed,
        background=False,
        delivered=True,
        **modalities,
    )


# -- images -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageDraft:
    """One images request, decided up front: the JSON and the stream are views of it."""

    path: str
    model: str
    n: int
    size: str
    quality: str
    stream: bool
    partials: int
    usage: ImagesUsage | None
    created: int

    @property
    def reports_usage(self) -> bool:
        return self.usage is not None

    def whole(self) -> ImagesResponse:
        if self.usage is None:  # dall-e: links, no usage
            data = [build(Image, url=f"https://images.example/{ids.request_id()}.png")]
            return build(ImagesResponse, created=self.created, data=data * self.n)
        return build(
            ImagesResponse,
            created=self.created,
            data=[build(Image, b64_json=_TINY_PNG) for _ in range(self.n)],
            background="opaque",
            output_format="png",
            quality=self.quality,
            size=self.size,
            usage=self.usage,
        )

    def events(self) -> Iterator[tuple[str, bytes]]:
        edit = self.path == IMAGES_EDITS_PATH
        partial_type = ImageEditPartialImageEvent if edit else ImageGenPartialImageEvent
        done_type = ImageEditCompletedEvent if edit else ImageGenCompletedEvent
        prefix = "image_edit" if edit else "image_generation"
        common = {
            "b64_json": _TINY_PNG,
            "background": "opaque",
            "created_at": self.created,
            "output_format": "png",
            "quality": self.quality,
            "size": self.size,
        }
        for index in range(self.partials):
            event = build(
                partial_type,
                type=f"{prefix}.partial_image",
                partial_image_index=index,
                **common,
            )
            yield f"{prefix}.partial_image", dump(event)
        done = build(done_type, type=f"{prefix}.completed", usage=self.usage, **common)
        yield f"{prefix}.completed", dump(done)


def image_draft(path: str, fields: dict[str, Any], files: int) -> ImageDraft:
    model = _str(fields, "model", "dall-e-2")  # the API's default
    prompt = "" if path == IMAGES_VARIATIONS_PATH else _str(fields, "prompt")
    n = _int(fields, "n", 1)
    if not 1 <= n <= 10:
        raise errors.invalid_value("n", "Invalid 'n': it must be between 1 and 10.")
    size = str(fields.get("size") or "1024x1024")
    quality = str(fields.get("quality") or "medium")
    if quality == "auto":
        quality = "medium"
    stream = _flag(fields, "stream")
    gpt_image = model.startswith(("gpt-image", "chatgpt-image"))
    if path == IMAGES_VARIATIONS_PATH and gpt_image:
        raise errors.invalid_value("model", "Variations are only offered by dall-e-2.")
    if stream and not gpt_image:
        raise errors.invalid_value("stream", "Streaming is only offered by the gpt-image models.")
    usage = None
    if gpt_image:
        per_image = _IMAGE_TOKENS.get(quality, _IMAGE_TOKENS["medium"]).get(size, 1056)
        image_in = files * _IMAGE_INPUT_TOKENS
        text_in = _tokens(prompt)
        text_out = 0 if model == "gpt-image-1" else 16 * n  # later models also write text
        out = per_image * n + text_out
        split: dict[str, Any] = {}
        if model != "gpt-image-1":  # gpt-image-1 reports its output as one number
            split["output_tokens_details"] = build(
                ImagesOutputDetails, image_tokens=per_image * n, text_tokens=text_out
            )
        usage = build(
            ImagesUsage,
            input_tokens=text_in + image_in,
            input_tokens_details=build(
                ImagesInputDetails, image_tokens=image_in, text_tokens=text_in
            ),
            output_tokens=out,
            total_tokens=text_in + image_in + out,
            **split,
        )
    partials = _int(fields, "partial_images", 0) if stream else 0
    return ImageDraft(
        path, model, n, size, quality, stream, min(partials, 3), usage, int(time.time())
    )


def bill_images(fake: FakeUpstream, key: str, draft: ImageDraft, fields: dict[str, Any]) -> None:
    usage = draft.usage
    if usage is None:
        fake.ledger.record(_entry(key, draft.path, draft.model, fields))
        return
    details = usage.output_tokens_details
    fake.ledger.record(
        _entry(
            key,
            draft.path,
            draft.model,
            fields,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            streamed=draft.stream,
            input_image_tokens=usage.input_tokens_details.image_tokens,
            output_image_tokens=details.image_tokens if details else usage.output_tokens,
        )
    )


# -- audio in ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TranscriptionDraft:
    path: str
    model: str
    text: str
    seconds: float
    response_format: str
    stream: bool
    usage: TranscriptionTokens | TranscriptionSeconds | None

    def whole(self) -> tuple[bytes, str]:
        """The answer's body and content type."""
        if self.response_format in _TEXT_FORMATS:
            return self.text.encode() + b"\n", "text/plain; charset=utf-8"
        if self.path == TRANSLATIONS_PATH:
            return dump(build(Translation, text=self.text)), "application/json"
        if self.response_format == "verbose_json":
            verbose = build(
                TranscriptionVerbose,
                duration=self.seconds,
                language="english",
                text=self.text,
                usage=self.usage,
            )
            return dump(verbose), "application/json"
        return dump(build(Transcription, text=self.text, usage=self.usage)), "application/json"

    def events(self) -> Iterator[tuple[str, bytes]]:
        for delta in split_deltas(self.text, 3) or [""]:
            event = build(TranscriptionTextDeltaEvent, type="transcript.text.delta", delta=delta)
            yield "transcript.text.delta", dump(event)
        done = build(
            TranscriptionTextDoneEvent,
            type="transcript.text.done",
            text=self.text,
            usage=self.usage,
        )
        yield "transcript.text.done", dump(done)


def transcription_draft(path: str, fields: dict[str, Any], audio_bytes: int) -> TranscriptionDraft:
    model = _str(fields, "model")
    if audio_bytes <= 0:
        raise errors.missing_parameter("file")
    response_format = str(fields.get("response_format") or "json")
    stream = _flag(fields, "stream")
    whisper = model == "whisper-1"
    if path == TRANSLATIONS_PATH and not whisper:
        raise errors.invalid_value("model", "Translations are only offered by whisper-1.")
    if stream and whisper:
        raise errors.invalid_value("stream", "whisper-1 does not stream transcriptions.")
    if response_format == "verbose_json" and not whisper:
        raise errors.invalid_value(
            "response_format", f"response_format 'verbose_json' is not compatible with {model}"
        )
    seconds = round(audio_bytes / _BYTES_PER_SECOND, 3)
    rng = random.Random(audio_bytes)
    text = filler_text(max(4, int(seconds * 3)), rng)
    usage: TranscriptionTokens | TranscriptionSeconds | None
    if whisper:
        usage = build(TranscriptionSeconds, type="duration", seconds=seconds)
    else:
        prompt = _tokens(str(fields.get("prompt") or "")) if fields.get("prompt") else 0
        audio = max(1, math.ceil(seconds * _AUDIO_TOKENS_PER_SECOND))
        out = _tokens(text)
        usage = build(
            TranscriptionTokens,
            type="tokens",
            input_tokens=audio + prompt,
            input_token_details=build(
                TranscriptionTokenDetails, audio_tokens=audio, text_tokens=prompt
            ),
            output_tokens=out,
            total_tokens=audio + prompt + out,
        )
    return TranscriptionDraft(path, model, text, seconds, response_format, stream, usage)


def bill_transcription(
    fake: FakeUpstream, key: str, draft: TranscriptionDraft, fields: dict[str, Any]
) -> None:
    usage = draft.usage
    if isinstance(usage, TranscriptionTokens):
        details = usage.input_token_details
        entry = _entry(
            key,
            draft.path,
            draft.model,
            fields,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            streamed=draft.stream,
            input_audio_tokens=details.audio_tokens if details else None,
        )
    else:
        entry = _entry(key, draft.path, draft.model, fields, audio_seconds=draft.seconds)
    fake.ledger.record(entry)


# -- audio out ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpeechDraft:
    model: str
    characters: int
    input_tokens: int
    output_tokens: int
    audio: bytes
    sse: bool
    content_type: str

    def chunks(self) -> Iterator[bytes]:
        size = max(1, len(self.audio) // 4)
        for start in range(0, len(self.audio), size):
            yield self.audio[start : start + size]

    def events(self) -> Iterator[tuple[str, bytes]]:
        for chunk in self.chunks():
            delta = {"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode()}
            yield "speech.audio.delta", orjson.dumps(delta)
        usage = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }
        yield "speech.audio.done", orjson.dumps({"type": "speech.audio.done", "usage": usage})


_AUDIO_TYPES: Final = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}


def speech_draft(fields: dict[str, Any]) -> SpeechDraft:
    model = _str(fields, "model")
    text = _str(fields, "input")
    _str(fields, "voice")
    if len(text) > 4096:
        raise errors.invalid_value("input", "Invalid 'input': at most 4096 characters.")
    sse = fields.get("stream_format") == "sse"
    if sse and model in ("tts-1", "tts-1-hd"):
        raise errors.invalid_value(
            "stream_format", f"stream_format 'sse' is not offered by {model}"
        )
    response_format = str(fields.get("response_format") or "mp3")
    audio = random.Random(text).randbytes(len(text) * _SPEECH_BYTES_PER_CHAR)
    return SpeechDraft(
        model=model,
        characters=len(text),
        input_tokens=_tokens(text),
        output_tokens=max(1, len(text) // 2),
        audio=audio,
        sse=sse,
        content_type=_AUDIO_TYPES.get(response_format, "audio/mpeg"),
    )


def bill_speech(fake: FakeUpstream, key: str, draft: SpeechDraft, fields: dict[str, Any]) -> None:
    by_characters = draft.model in ("tts-1", "tts-1-hd")
    entry = _entry(
        key,
        SPEECH_PATH,
        draft.model,
        fields,
        input_tokens=None if by_characters else draft.input_tokens,
        output_tokens=None if by_characters else draft.output_tokens,
        streamed=draft.sse,
        input_characters=draft.characters,
    )
    fake.ledger.record(entry)
