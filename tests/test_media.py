"""The Images and Audio APIs through tokentill, driven by the openai SDK: each answer is
metered once with its own usage shape (image and text tokens, audio tokens, seconds of
audio, characters spoken), priced from the catalog at each part's own rate, left
unpriced (never free) when it reports nothing, and held to quotas before forwarding."""

from __future__ import annotations

import io
import struct
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Running, ledger, put_user_quota

_M = Decimal(10**6)


def _wav(seconds: float) -> bytes:
    """A WAV file of silence whose size the fake reads as `seconds` long (16 kB a second)."""
    frames = int(seconds * 16_000) - 44
    header = b"RIFF" + struct.pack("<I", 36 + frames) + b"WAVEfmt "
    header += struct.pack("<IHHIIHH", 16, 1, 1, 16_000, 16_000, 1, 8) + b"data"
    return header + struct.pack("<I", frames) + b"\x80" * frames


def _billed(running: Running, path: str, user: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in ledger(running.settings.upstream)
        if e["endpoint"] == path and (user is None or e["user"] == user)
    ]


def _costs_by(running: Running, *keys: str) -> dict[tuple[str, ...], dict[str, Any]]:
    running.flush()
    assert httpx.post(running.url + "/api/jobs/rollup/run", timeout=60).status_code == 200
    answer = httpx.get(
        running.url + "/api/costs",
        params={"group_by": ",".join(keys), "bucket": "day"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    for row in answer.json()["rows"]:
        out[tuple(row["group"][k] for k in keys)] = row
    return out


def test_images_are_metered_by_image_and_text_tokens(tokentill: Running) -> None:
    client = tokentill.client()
    made = client.images.generate(
        model="gpt-image-1", prompt="a red fox in snow", n=2, quality="low", user="img-user"
    )
    assert made.usage is not None and len(made.data or []) == 2
    streamed = list(
        client.images.generate(
            model="gpt-image-1.5", prompt="a blue heron", stream=True, partial_images=2
        )
    )
    assert [e.type for e in streamed] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    edited = client.images.edit(
        model="gpt-image-1",
        image=[("a.png", io.BytesIO(b"\x89PNG" + b"\x00" * 64)), ("b.png", b"\x89PNG" + b"\0")],
        prompt="make it night",
        extra_headers={"X-Tokentill-User": "img-editor"},
    )
    assert edited.usage is not None
    split = client.images.generate(model="gpt-image-1.5", prompt="a green frog")
    legacy = client.images.generate(model="dall-e-3", prompt="an owl")
    assert legacy.usage is None and legacy.data and legacy.data[0].url

    rows = tokentill.rows("endpoint LIKE 'images.%'")
    assert [(r["endpoint"], r["model"]) for r in rows] == [
        ("images.generations", "gpt-image-1"),
        ("images.generations", "gpt-image-1.5"),
        ("images.edits", "gpt-image-1"),
        ("images.generations", "gpt-image-1.5"),
        ("images.generations", "dall-e-3"),
    ]
    first, second, edit, third, dall_e = rows
    usage = made.usage
    assert (first["input_tokens"], first["output_tokens"]) == (
        usage.input_tokens,
        usage.output_tokens,
    )
    assert first["input_image_tokens"] == 0 and first["user_id"] == "img-user"
    # gpt-image-1 reports one output number: all image tokens.
    assert first["output_image_tokens"] == usage.output_tokens
    done = streamed[-1]
    assert second["streamed"] is True and second["input_tokens"] == done.usage.input_tokens
    # The stream's completed event reports output as one number (the SDK's type has no
    # split): all of it is counted as image output, the dearer rate.
    assert second["output_image_tokens"] == second["output_tokens"] == done.usage.output_tokens
    # A whole answer of gpt-image-1.5 splits its output into image and text tokens.
    assert split.usage is not None and split.usage.output_tokens_details is not None
    assert third["output_image_tokens"] == split.usage.output_tokens_details.image_tokens
    assert third["output_image_tokens"] < third["output_tokens"] == split.usage.output_tokens
    assert edit["input_image_tokens"] == edited.usage.input_tokens_details.image_tokens > 0
    assert edit["user_id"] == "img-editor"
    assert dall_e["usage_unreported"] is True and dall_e["input_tokens"] is None

    costs = _costs_by(tokentill, "model")
    # gpt-image-1: text in $5/M, image in $10/M, output (all image) $40/M.
    text_in = usage.input_tokens - usage.input_tokens_details.image_tokens
    expected = (
        Decimal(text_in) * 5 + Decimal(usage.input_tokens_details.image_tokens) * 10
    ) / _M + Decimal(usage.output_tokens) * 40 / _M
    edit_usage = edited.usage
    expected += (
        Decimal(edit_usage.input_tokens - edit_usage.input_tokens_details.image_tokens) * 5
        + Decimal(edit_usage.input_tokens_details.image_tokens) * 10
        + Decimal(edit_usage.output_tokens) * 40
    ) / _M
    assert Decimal(costs["gpt-image-1",]["cost_usd"]) == expected
    # gpt-image-1.5: text in $5/M, image output at its image rate ($32/M), text output
    # at $10/M.
    details = split.usage.output_tokens_details
    expected_15 = (
        Decimal(second["input_tokens"]) * 5
        + Decimal(second["output_tokens"]) * 32
        + Decimal(split.usage.input_tokens) * 5
        + Decimal(details.image_tokens) * 32
        + Decimal(details.text_tokens) * 10
    ) / _M
    assert Decimal(costs["gpt-image-1.5",]["cost_usd"]) == expected_15
    # dall-e reports nothing: counted and unpriced, never free.
    assert costs["dall-e-3",]["unpriced"] == 1 and costs["dall-e-3",]["requests"] == 1


def test_transcriptions_are_metered_in_seconds_or_tokens(tokentill: Running) -> None:
    client = tokentill.client(default_headers={"X-Tokentill-User": "ear"})
    whisper = client.audio.transcriptions.create(model="whisper-1", file=("talk.wav", _wav(12.5)))
    assert whisper.usage is not None and whisper.usage.type == "duration"
    tokens = client.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=("talk.wav", _wav(3)), prompt="names: Ann, Ben"
    )
    assert tokens.usage is not None and tokens.usage.type == "tokens"
    streamed = list(
        client.audio.transcriptions.create(
            model="gpt-4o-mini-transcribe", file=("talk.wav", _wav(2)), stream=True
        )
    )
    assert streamed[-1].type == "transcript.text.done"
    as_text = client.audio.transcriptions.create(
        model="whisper-1", file=("talk.wav", _wav(1)), response_format="text"
    )
    assert isinstance(as_text, str) and as_text
    with pytest.warns(DeprecationWarning):  # the SDK marks translations deprecated
        translated = client.audio.translations.create(model="whisper-1", file=("talk.wav", _wav(1)))
    assert translated.text

    rows = tokentill.rows("endpoint LIKE 'audio.%'")
    assert [(r["endpoint"], r["model"]) for r in rows] == [
        ("audio.transcriptions", "whisper-1"),
        ("audio.transcriptions", "gpt-4o-transcribe"),
        ("audio.transcriptions", "gpt-4o-mini-transcribe"),
        ("audio.transcriptions", "whisper-1"),
        ("audio.translations", "whisper-1"),
    ]
    assert {r["user_id"] for r in rows} == {"ear"}
    seconds, by_tokens, stream, text, translation = rows
    assert seconds["audio_ms"] == round(whisper.usage.seconds * 1000) == 12_500
    assert seconds["input_tokens"] is None and seconds["usage_unreported"] is False
    details = tokens.usage.input_token_details
    assert details is not None and details.audio_tokens and details.text_tokens
    assert (by_tokens["input_tokens"], by_tokens["input_audio_tokens"]) == (
        tokens.usage.input_tokens,
        details.audio_tokens,
    )
    assert by_tokens["output_tokens"] == tokens.usage.output_tokens
    done = streamed[-1]
    assert done.usage is not None and stream["input_tokens"] == done.usage.input_tokens
    assert stream["streamed"] is True
    assert text["usage_unreported"] is True and translation["usage_unreported"] is True

    costs = _costs_by(tokentill, "model")
    # whisper-1: $0.36 an hour, the 12.5 s it reported (the text answer is unpriced).
    assert costs["whisper-1",]["cost_usd"] is None  # not all of it is known
    assert Decimal(costs["whisper-1",]["priced_cost_usd"]) == (
        Decimal("0.36") * Decimal("12.5") / 3600
    )
    assert costs["whisper-1",]["unpriced"] == 2
    # gpt-4o-transcribe: audio in $6/M, the prompt's text $2.5/M, text out $10/M.
    expected = (
        Decimal(details.audio_tokens) * 6
        + Decimal(details.text_tokens) * Decimal("2.5")
        + Decimal(tokens.usage.output_tokens) * 10
    ) / _M
    assert Decimal(costs["gpt-4o-transcribe",]["cost_usd"]) == expected


def test_speech_is_forwarded_as_it_comes_and_metered(tokentill: Running) -> None:
    client = tokentill.client(default_headers={"X-Tokentill-User": "voice"})
    text = "Hello there, this is a test of speech."
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=text
    ) as answer:
        assert answer.headers["content-type"] == "audio/mpeg"
        audio = b"".join(answer.iter_bytes())
    assert len(audio) == len(text) * 60
    sse = client.audio.speech.create(
        model="gpt-4o-mini-tts", voice="alloy", input="Short one.", stream_format="sse"
    )
    assert b"speech.audio.done" in sse.content
    unreported = client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="Hi.")
    assert unreported.content

    rows = tokentill.rows("endpoint = 'audio.speech'")
    assert [(r["model"], r["input_characters"]) for r in rows] == [
        ("tts-1", len(text)),
        ("gpt-4o-mini-tts", len("Short one.")),
        ("gpt-4o-mini-tts", len("Hi.")),
    ]
    billed = _billed(tokentill, "/v1/audio/speech", None)[-2]
    assert (rows[1]["input_tokens"], rows[1]["output_tokens"]) == (
        billed["input_tokens"],
        billed["output_tokens"],
    )
    assert rows[2]["input_tokens"] is None

    costs = _costs_by(tokentill, "model")
    # tts-1: $15 per 1M characters.
    assert Decimal(costs["tts-1",]["cost_usd"]) == Decimal(len(text)) * 15 / _M
    # gpt-4o-mini-tts as SSE reports tokens ($0.60/M in, $12/M out); as audio, nothing.
    assert costs["gpt-4o-mini-tts",]["unpriced"] == 1
    expected = (
        Decimal(billed["input_tokens"]) * Decimal("0.6") + Decimal(billed["output_tokens"]) * 12
    ) / _M
    assert Decimal(costs["gpt-4o-mini-tts",]["priced_cost_usd"]) == expected


def test_quotas_hold_images_and_audio_before_forwarding(make_tokentill: Any) -> None:
    running: Running = make_tokentill(quotas_enabled=True)
    put_user_quota(running, "media-capped", limit_requests=1, period="day")
    # Speech priced by the character is reserved at exactly its price: $15 per 1M.
    put_user_quota(running, "speech-capped", limit_usd="0.0001", period="day")
    client = running.client(default_headers={"X-Tokentill-User": "media-capped"})
    client.images.generate(model="gpt-image-1", prompt="one", quality="low")
    before = len(ledger(running.settings.upstream))
    with pytest.raises(openai.RateLimitError):
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", _wav(1)))
    with pytest.raises(openai.RateLimitError):
        client.images.edit(model="gpt-image-1", image=("a.png", b"\x89PNG"), prompt="x")
    speaker = running.client(default_headers={"X-Tokentill-User": "speech-capped"})
    speaker.audio.speech.create(model="tts-1", voice="alloy", input="x" * 6)  # $0.00009
    with pytest.raises(openai.RateLimitError):
        speaker.audio.speech.create(model="tts-1", voice="alloy", input="y" * 10)
    # The refused requests never reached the upstream; each left an error row.
    assert len(ledger(running.settings.upstream)) == before + 1
    refused = running.rows("http_status = 429")
    assert [(r["endpoint"], r["user_id"]) for r in refused] == [
        ("audio.transcriptions", "media-capped"),
        ("images.edits", "media-capped"),
        ("audio.speech", "speech-capped"),
    ]


def test_a_malformed_upload_is_forwarded_and_recorded(tokentill: Running) -> None:
    answer = httpx.post(
        tokentill.url + "/v1/audio/transcriptions",
        content=b"--nope\r\nnot a form",
        headers={
            "content-type": "multipart/form-data; boundary=zzz",
            "authorization": "Bearer sk-test",
        },
        timeout=30,
    )
    assert answer.status_code == 400 and answer.json()["error"]["type"]
    (row,) = tokentill.rows("endpoint = 'audio.transcriptions'")
    assert row["status"] == "error" and row["http_status"] == 400
