"""The Realtime API through tokentill, driven by the openai SDK's own
`realtime.connect()` against the fake: each response is one row with the usage its
`response.done` carried and the fake billed (text, audio, image and cached tokens),
responses the server starts itself (VAD) too, transcriptions are rows of their own,
quotas refuse at the handshake and on the socket, and a dropped socket leaves rows."""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from openai.types.realtime import RealtimeConversationItemUserMessageParam
from openai.types.realtime.realtime_server_event import RealtimeServerEvent
from pydantic import TypeAdapter
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from tests.conftest import Running, ledger, put_user_quota
from tokentill.ingest import usage
from tokentill.ingest.socket_proxy import Handshake
from tokentill.warehouse.catalog import published_prices
from tokentill.warehouse.events import key_fingerprint

# Every server event is validated with the SDK's own types (the SDK's iterator only
# constructs them): the fake's payloads, and the proxy's own error events, must be real.
EVENTS: TypeAdapter[RealtimeServerEvent] = TypeAdapter(RealtimeServerEvent)
SECOND_OF_AUDIO = bytes(48_000)  # pcm16 at 24 kHz, mono: 10 input audio tokens
PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNk"
    "YAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
SERVER_VAD: Any = {
    "type": "realtime",
    "audio": {"input": {"turn_detection": {"type": "server_vad"}}},
}
# What a row, the client's `response.done` and the fake's ledger must agree on.
COLUMNS = (
    "input_tokens",
    "cached_input_tokens",
    "input_audio_tokens",
    "cached_audio_tokens",
    "input_image_tokens",
    "output_tokens",
    "output_audio_tokens",
)
# Which of the catalog's rates each part of a row is priced at.
RATE_OF = {
    "text": "input_per_mtok",
    "text_cached": "cached_input_per_mtok",
    "audio": "audio_input_per_mtok",
    "audio_cached": "audio_cached_input_per_mtok",
    "image": "image_input_per_mtok",
    "image_cached": "image_cached_input_per_mtok",
    "text_out": "output_per_mtok",
    "audio_out": "audio_output_per_mtok",
}


def _until(connection: Any, *kinds: str, count: int = 1) -> list[Any]:
    """Every server event, validated, until `count` of the `kinds` have come."""
    events: list[Any] = []
    seen = 0
    while seen < count:
        event = EVENTS.validate_json(connection.recv_bytes())
        events.append(event)
        if event.type in kinds:
            seen += 1
    return events


def _done(events: list[Any]) -> list[Any]:
    return [e for e in events if e.type == "response.done"]


def _usage(done: Any) -> dict[str, int | None]:
    """A `response.done`'s usage under the row's column names."""
    u = done.response.usage
    inputs, outputs = u.input_token_details, u.output_token_details
    return {
        "input_tokens": u.input_tokens,
        "cached_input_tokens": inputs.cached_tokens,
        "input_audio_tokens": inputs.audio_tokens,
        "cached_audio_tokens": inputs.cached_tokens_details.audio_tokens,
        "input_image_tokens": inputs.image_tokens,
        "output_tokens": u.output_tokens,
        "output_audio_tokens": outputs.audio_tokens,
    }


def _columns(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in COLUMNS}


def _billed(running: Running) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in ledger(running.settings.upstream)}


def _append_audio(connection: Any, audio: bytes = SECOND_OF_AUDIO) -> None:
    half = len(audio) // 2
    for chunk in (audio[:half], audio[half:]):  # the buffer adds up every append
        connection.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())


def _text_item(text: str, *, image: bool = False) -> RealtimeConversationItemUserMessageParam:
    if image:
        return {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": text},
                {"type": "input_image", "image_url": PIXEL},
            ],
        }
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def _expected_cost(row: dict[str, Any]) -> Decimal:
    """The row's cost at its model's rates in the published catalog, each part at its own."""
    (entry,) = [p for p in published_prices() if p.model == row["model"]]
    rates = entry.prices
    audio, cached_audio = row["input_audio_tokens"], row["cached_audio_tokens"]
    image, cached_image = row["input_image_tokens"], row["cached_image_tokens"] or 0
    cached_text = row["cached_input_tokens"] - cached_audio - cached_image
    text = row["input_tokens"] - audio - image - cached_text
    parts = {
        "text": text,
        "text_cached": cached_text,
        "audio": audio - cached_audio,
        "audio_cached": cached_audio,
        "image": image - cached_image,
        "image_cached": cached_image,
        "text_out": row["output_tokens"] - row["output_audio_tokens"],
        "audio_out": row["output_audio_tokens"],
    }
    assert all(rates.get(RATE_OF[k]) is not None for k, n in parts.items() if n)
    return sum((rates[RATE_OF[k]] * n for k, n in parts.items() if n), Decimal(0)) / 1_000_000


def test_a_text_turn_and_an_audio_turn_are_one_row_each(tokentill: Running) -> None:
    client = tokentill.client()
    with client.realtime.connect(model="gpt-realtime") as connection:
        (created,) = _until(connection, "session.created")
        assert created.session.model == "gpt-realtime"
        # A text turn, with an image: text out.
        connection.conversation.item.create(item=_text_item("what is in it?", image=True))
        connection.response.create(
            response={"output_modalities": ["text"], "metadata": {"team": "voice"}}
        )
        text_turn = _done(_until(connection, "response.done"))
        # A bad event is answered on the socket, which stays open.
        connection.send_raw(json.dumps({"type": "no.such.event", "event_id": "evt_bad"}))
        (error,) = [e for e in _until(connection, "error") if e.type == "error"]
        assert error.error.event_id == "evt_bad" and error.error.param == "type"
        # An audio turn: audio in, audio out, and the first turn read from the cache.
        _append_audio(connection)
        connection.input_audio_buffer.commit()
        connection.response.create()
        audio_turn = _done(_until(connection, "response.done"))
    done = {e.response.id: e for e in text_turn + audio_turn}
    assert len(done) == 2

    rows = {r["response_id"]: r for r in tokentill.rows("endpoint = 'realtime'")}
    assert rows.keys() == done.keys()
    billed = _billed(tokentill)
    for response_id, event in done.items():
        row = rows[response_id]
        assert _columns(row) == _usage(event) == _columns(billed[response_id])
        assert row["total_tokens"] == event.response.usage.total_tokens
        assert (row["status"], row["transport"], row["streamed"]) == (
            "completed",
            "websocket",
            True,
        )
        assert (row["model"], row["requested_model"]) == ("gpt-realtime", "gpt-realtime")
        assert row["key_fingerprint"] == billed[response_id]["key_fingerprint"]
        assert row["user_id"] is None  # no header, and the API has no user field
    text_row, audio_row = rows[text_turn[0].response.id], rows[audio_turn[0].response.id]
    assert text_row["input_image_tokens"] > 0 and text_row["output_audio_tokens"] == 0
    assert json.loads(text_row["metadata"]) == {"team": "voice"}
    assert audio_row["input_audio_tokens"] > 0 and audio_row["output_audio_tokens"] > 0
    assert audio_row["cached_input_tokens"] > 0  # a later turn
    assert audio_row["metadata"] is None

    # Priced from the catalog's audio, image and text rates, each part at its own.
    events = httpx.get(f"{tokentill.url}/api/events", params={"endpoint": "realtime"}).json()
    costs = {e["response_id"]: Decimal(e["cost_usd"]) for e in events["events"]}
    for response_id, row in rows.items():
        assert costs[response_id] == _expected_cost(row)
    assert costs[audio_turn[0].response.id] > 0


def test_responses_the_server_starts_are_metered(tokentill: Running) -> None:
    """Server VAD: committed audio ends a turn and the server responds on its own."""
    client = tokentill.client()
    with client.realtime.connect(
        model="gpt-realtime", extra_headers={"X-Tokentill-User": "rt-vad"}
    ) as connection:
        connection.session.update(
            session={
                "type": "realtime",
                "audio": {"input": {"turn_detection": {"type": "server_vad"}}},
            }
        )
        _until(connection, "session.updated")
        done = []
        for _ in range(2):  # no response.create: the server starts each response
            _append_audio(connection)
            connection.input_audio_buffer.commit()
            events = _until(connection, "response.done")
            assert "input_audio_buffer.speech_stopped" in [e.type for e in events]
            done += _done(events)
    rows = {r["response_id"]: r for r in tokentill.rows("user_id = 'rt-vad'")}
    assert rows.keys() == {e.response.id for e in done}
    billed = _billed(tokentill)
    for event in done:
        row = rows[event.response.id]
        assert _columns(row) == _usage(event) == _columns(billed[event.response.id])
        assert (row["endpoint"], row["status"], row["user_source"]) == (
            "realtime",
            "completed",
            "header",
        )


def test_transcriptions_are_rows_at_the_transcription_model(tokentill: Running) -> None:
    client = tokentill.client()
    transcribed = []
    with client.realtime.connect(model="gpt-realtime") as connection:
        for model in ("gpt-4o-transcribe", "whisper-1"):
            connection.session.update(
                session={
                    "type": "realtime",
                    "audio": {"input": {"transcription": {"model": model}}},
                }
            )
            _until(connection, "session.updated")
            _append_audio(connection, SECOND_OF_AUDIO * 2)
            connection.input_audio_buffer.commit()
            events = _until(connection, "conversation.item.input_audio_transcription.completed")
            transcribed.append(events[-1])
    rows = tokentill.rows("endpoint = 'realtime.transcription'")
    assert [r["model"] for r in rows] == ["gpt-4o-transcribe", "whisper-1"]
    billed = _billed(tokentill)
    tokens, duration = rows
    usage = transcribed[0].usage
    assert usage.type == "tokens"
    assert (tokens["input_tokens"], tokens["input_audio_tokens"], tokens["output_tokens"]) == (
        usage.input_tokens,
        usage.input_token_details.audio_tokens,
        usage.output_tokens,
    )
    entry = billed[transcribed[0].item_id]
    assert (entry["model"], entry["input_tokens"], entry["input_audio_tokens"]) == (
        "gpt-4o-transcribe",
        tokens["input_tokens"],
        tokens["input_audio_tokens"],
    )
    assert transcribed[1].usage.type == "duration"
    assert duration["audio_ms"] == 2000 == billed[transcribed[1].item_id]["audio_seconds"] * 1000
    assert duration["input_tokens"] is None and not duration["usage_unreported"]
    # No response ran: transcriptions are the only rows; each item once.
    assert len(tokentill.rows()) == 2
    assert {r["transport"] for r in rows} == {"websocket"}


def test_quotas_refuse_at_the_handshake_and_on_the_socket(make_tokentill: Any) -> None:
    running: Running = make_tokentill(quotas_enabled=True)
    put_user_quota(running, "rt-capped", limit_requests=1, period="day")
    # A key of its own: what the fake billed for this test alone is told by its fingerprint.
    key = "sk-realtime-quota"
    client = openai.OpenAI(base_url=running.url + "/v1", api_key=key, max_retries=0)
    user = {"X-Tokentill-User": "rt-capped"}
    with client.realtime.connect(model="gpt-realtime", extra_headers=user) as connection:
        connection.conversation.item.create(item=_text_item("one"))
        connection.response.create(event_id="evt_1", response={"output_modalities": ["text"]})
        (first,) = _done(_until(connection, "response.done"))
        connection.response.create(event_id="evt_2", response={"output_modalities": ["text"]})
        (refused,) = [e for e in _until(connection, "error") if e.type == "error"]
        # The socket stays open: the next event is served.
        connection.conversation.item.create(item=_text_item("still there?"))
        _until(connection, "conversation.item.done")
    assert (refused.error.type, refused.error.code) == ("insufficient_quota", "user_quota_exceeded")
    assert refused.error.event_id == "evt_2"
    # The refused create never reached the upstream: it billed the first response only.
    fingerprint = key_fingerprint(f"Bearer {key}")
    mine = [e for e in ledger(running.settings.upstream) if e["key_fingerprint"] == fingerprint]
    assert [e["id"] for e in mine] == [first.response.id]

    # Over its limit now, the user is refused at the handshake.
    with (
        pytest.raises(InvalidStatus) as caught,
        client.realtime.connect(model="gpt-realtime", extra_headers=user),
    ):
        pass
    assert caught.value.response.status_code == 429
    assert json.loads(caught.value.response.body)["error"]["code"] == "user_quota_exceeded"
    assert caught.value.response.headers["retry-after"]

    rows = running.rows("user_id = 'rt-capped'")
    assert [(r["status"], r["http_status"], r["error_code"]) for r in rows] == [
        ("completed", 200, None),
        ("error", 429, "user_quota_exceeded"),
        ("error", 429, "user_quota_exceeded"),
    ]
    assert rows[0]["response_id"] == first.response.id
    assert {(r["endpoint"], r["transport"]) for r in rows} == {("realtime", "websocket")}
    assert {r["key_fingerprint"] for r in rows} == {fingerprint}


def test_a_response_the_server_starts_over_quota_is_cancelled_and_metered(
    make_tokentill: Any,
) -> None:
    running: Running = make_tokentill(quotas_enabled=True)
    put_user_quota(running, "rt-vad-capped", limit_requests=1, period="day")
    client = running.client()
    headers = {"X-Tokentill-User": "rt-vad-capped", "x-fake-delay-ms": "100"}
    with client.realtime.connect(model="gpt-realtime", extra_headers=headers) as connection:
        connection.session.update(
            session={
                "type": "realtime",
                "audio": {"input": {"turn_detection": {"type": "server_vad"}}},
            }
        )
        _until(connection, "session.updated")
        _append_audio(connection)
        connection.input_audio_buffer.commit()
        (allowed,) = _done(_until(connection, "response.done"))
        _append_audio(connection)
        connection.input_audio_buffer.commit()
        events = _until(connection, "response.done")
    kinds = [e.type for e in events]
    assert kinds.index("response.created") < kinds.index("error")
    (error,) = [e for e in events if e.type == "error"]
    assert error.error.code == "user_quota_exceeded"
    (stopped,) = _done(events)
    assert stopped.response.status == "cancelled"
    assert stopped.response.status_details.reason == "client_cancelled"
    # Cancelled, it still billed its input and what it said: metered all the same.
    rows = {r["response_id"]: r for r in running.rows("user_id = 'rt-vad-capped'")}
    assert rows.keys() == {allowed.response.id, stopped.response.id}
    row = rows[stopped.response.id]
    assert _columns(row) == _usage(stopped) == _columns(_billed(running)[stopped.response.id])
    assert (row["status"], row["error_code"]) == ("cancelled", "user_quota_exceeded")
    assert rows[allowed.response.id]["status"] == "completed"
    # Both count in the live counters, the one no request reserved for too.
    quota = httpx.get(f"{running.url}/api/quotas/users/rt-vad-capped", timeout=30).json()
    (limit,) = quota["limits"]
    assert Decimal(limit["used"]) == 2 and Decimal(limit["reserved"]) == 0


def test_a_cancelled_response_and_an_out_of_band_one_beside_it(tokentill: Running) -> None:
    client = tokentill.client()
    with client.realtime.connect(
        model="gpt-realtime", extra_headers={"x-fake-delay-ms": "100"}
    ) as connection:
        connection.conversation.item.create(item=_text_item("tell me a long story"))
        connection.response.create()
        connection.response.create(
            response={
                "conversation": "none",
                "output_modalities": ["text"],
                "metadata": {"purpose": "summary"},
                "input": [_text_item("summarise the story so far")],
            }
        )
        events = _until(connection, "response.created", count=2)
        in_conversation = next(
            e for e in events if e.type == "response.created" and e.response.conversation_id
        )
        connection.response.cancel(response_id=in_conversation.response.id)
        done = _done(events + _until(connection, "response.done", count=2))
    statuses = {e.response.id: e.response.status for e in done}
    assert sorted(statuses.values()) == ["cancelled", "completed"]
    assert statuses[in_conversation.response.id] == "cancelled"
    rows = {r["response_id"]: r for r in tokentill.rows("endpoint = 'realtime'")}
    assert rows.keys() == statuses.keys()
    billed = _billed(tokentill)
    for event in done:
        row = rows[event.response.id]
        assert _columns(row) == _usage(event) == _columns(billed[event.response.id])
        assert row["status"] == event.response.status
    cancelled = rows[in_conversation.response.id]
    assert cancelled["incomplete_reason"] == "client_cancelled"
    out_of_band = next(r for r in rows.values() if r["status"] == "completed")
    assert json.loads(out_of_band["metadata"]) == {"purpose": "summary"}


@pytest.mark.parametrize(
    ("scenario", "status", "reason"),
    [
        ("incomplete", "incomplete", "max_output_tokens"),
        ("content_filter", "incomplete", "content_filter"),
        ("failed", "failed", None),
    ],
)
def test_how_a_response_ends_is_recorded(
    tokentill: Running, scenario: str, status: str, reason: str | None
) -> None:
    client = tokentill.client()
    with client.realtime.connect(
        model="gpt-realtime", extra_headers={"x-fake-scenario": scenario}
    ) as connection:
        connection.response.create()
        (done,) = _done(_until(connection, "response.done"))
    assert done.response.status == status
    (row,) = tokentill.rows("endpoint = 'realtime'")
    assert (row["status"], row["incomplete_reason"]) == (status, reason)
    billed = _billed(tokentill)[done.response.id]
    if status == "failed":  # no usage, and not billed: nothing unreported
        assert done.response.usage is None and billed["input_tokens"] is None
        assert (row["error_type"], row["error_code"]) == ("server_error", "server_error")
        assert row["input_tokens"] is None and not row["usage_unreported"]
    else:
        assert _columns(row) == _usage(done) == _columns(billed)


def test_a_finished_response_without_usage_is_flagged_unreported() -> None:
    event = Handshake(None, None, [], {}).facts("realtime").new_event()
    usage.apply_realtime_response(event, {"id": "resp_1", "status": "in_progress"})
    assert not event.usage_unreported  # `response.created`: no usage yet
    usage.apply_realtime_response(event, {"id": "resp_1", "status": "completed"})
    assert event.usage_unreported and event.status == "completed"


def test_a_create_the_upstream_refuses_is_an_error_row(tokentill: Running) -> None:
    """One response at a time writes to the conversation: the upstream refuses a second
    create (sent without an event_id) with an error, and it pairs with no response."""
    client = tokentill.client()
    with client.realtime.connect(
        model="gpt-realtime", extra_headers={"x-fake-delay-ms": "20"}
    ) as connection:
        connection.response.create(response={"metadata": {"n": "1"}})
        connection.response.create(response={"metadata": {"n": "2"}})
        events = _until(connection, "response.done")
    (error,) = [e for e in events if e.type == "error"]
    assert error.error.code == "conversation_already_has_active_response"
    (done,) = _done(events)
    served, refused = tokentill.rows("endpoint = 'realtime'")
    assert (served["response_id"], served["status"]) == (done.response.id, "completed")
    assert json.loads(served["metadata"]) == {"n": "1"}
    assert (refused["status"], refused["http_status"], refused["error_code"]) == (
        "error",
        400,
        "conversation_already_has_active_response",
    )
    assert json.loads(refused["metadata"]) == {"n": "2"}


def test_an_upstream_that_drops_mid_response_leaves_an_interrupted_row(
    tokentill: Running,
) -> None:
    client = tokentill.client()
    seen: list[Any] = []
    with (
        pytest.raises(ConnectionClosedError) as closed,
        client.realtime.connect(
            model="gpt-realtime", extra_headers={"x-fake-scenario": "cut"}
        ) as connection,
    ):
        connection.response.create()
        for event in connection:
            seen.append(event)  # noqa: PERF402 - keep what came before the drop
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    (created,) = [e for e in seen if e.type == "response.created"]
    assert "response.done" not in [e.type for e in seen]
    (row,) = tokentill.rows("endpoint = 'realtime'")
    assert (row["response_id"], row["status"], row["transport"]) == (
        created.response.id,
        "interrupted",
        "websocket",
    )
    assert row["client_disconnected"] is False
    assert _billed(tokentill)[created.response.id]["delivered"] is False


def test_a_client_that_leaves_mid_response_still_gets_the_response_metered(
    tokentill: Running,
) -> None:
    client = tokentill.client()
    with client.realtime.connect(
        model="gpt-realtime", extra_headers={"x-fake-delay-ms": "30"}
    ) as connection:
        connection.response.create()
        created = _until(connection, "response.created")[-1]
    # The proxy read on after the client left: the row has what the upstream billed.
    response_id = created.response.id

    def settled() -> bool:
        rows = tokentill.rows("response_id = ?", [response_id])
        return bool(rows) and rows[0]["status"] == "completed"

    tokentill.wait_for(settled, 15)
    (row,) = tokentill.rows("response_id = ?", [response_id])
    assert row["client_disconnected"] is True
    assert _columns(row) == _columns(_billed(tokentill)[response_id])


@pytest.mark.parametrize(
    "spelling",
    [
        {"websocket_base_url": "/v1//%2E"},  # /v1//%2E/realtime
        {"base_url": "/%761"},  # /%761/realtime: an escaped letter
    ],
)
def test_other_spellings_of_the_path_are_metered_alike(
    tokentill: Running, spelling: dict[str, str]
) -> None:
    urls = {
        "base_url": tokentill.url + spelling.get("base_url", "/v1"),
        "websocket_base_url": tokentill.url.replace("http", "ws", 1)
        + spelling["websocket_base_url"]
        if "websocket_base_url" in spelling
        else None,
    }
    client = openai.OpenAI(api_key="sk-test", max_retries=0, **urls)  # type: ignore[arg-type]
    with client.realtime.connect(model="gpt-realtime") as connection:
        connection.response.create(response={"output_modalities": ["text"]})
        (done,) = _done(_until(connection, "response.done"))
    (row,) = tokentill.rows("endpoint = 'realtime'")
    assert row["response_id"] == done.response.id
    assert _columns(row) == _usage(done)


def test_a_refused_handshake_is_passed_on(tokentill: Running) -> None:
    client = openai.OpenAI(base_url=tokentill.url + "/v1", api_key="sk-bad-key", max_retries=0)
    with (
        pytest.raises(InvalidStatus) as caught,
        client.realtime.connect(model="gpt-realtime"),
    ):
        pass
    assert caught.value.response.status_code == 401
    assert json.loads(caught.value.response.body)["error"]["code"] == "invalid_api_key"
    assert tokentill.rows() == []
