"""The Responses API's WebSocket mode through tokentill, driven by the openai SDK's own
`responses.connect()`: frames pass both ways, each response is metered once, quotas are
refused on the socket, and a dropped socket leaves rows as a cut stream does."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from tests.conftest import Running, ledger, put_user_quota
from tests.test_agents import WEATHER_TOOL


def _until_terminal(connection: Any, count: int) -> list[Any]:
    """Every event until `count` responses ended (or errors came)."""
    events: list[Any] = []
    ended = 0
    for event in connection:
        events.append(event)
        if event.type in ("response.completed", "response.incomplete", "response.failed", "error"):
            ended += 1
            if ended == count:
                break
    return events


def test_responses_on_one_socket_are_metered_once_each(tokentill: Running) -> None:
    client = tokentill.client()
    with client.responses.connect() as connection:
        # Two lanes side by side and the default lane; users from the event's fields.
        connection.response.create(
            model="gpt-4o-mini",
            input="a",
            user="ws-ann",
            stream_id="lane-1",
            metadata={"team": "search"},
        )
        connection.response.create(
            model="gpt-4.1-mini", input="b", safety_identifier="ws-ben", stream_id="lane-2"
        )
        connection.response.create(model="gpt-4o", input="c", user="ws-ann")
        events = _until_terminal(connection, 3)
    done = {e.response.id: e for e in events if e.type == "response.completed"}
    assert len(done) == 3
    lanes = {e.response.id: getattr(e, "stream_id", None) for e in done.values()}
    assert sorted(lanes.values(), key=str) == sorted(["lane-1", "lane-2", None], key=str)

    rows = {r["response_id"]: r for r in tokentill.rows("transport = 'websocket'")}
    assert rows.keys() == done.keys()
    billed = {e["id"]: e for e in ledger(tokentill.settings.upstream)}
    for response_id, event in done.items():
        row = rows[response_id]
        usage = event.response.usage
        assert row["input_tokens"] == usage.input_tokens == billed[response_id]["input_tokens"]
        assert row["output_tokens"] == usage.output_tokens
        assert row["streamed"] is True and row["status"] == "completed"
    users = {rows[rid]["user_id"]: rows[rid]["user_source"] for rid in done}
    assert users == {"ws-ann": "user", "ws-ben": "safety_identifier"}
    tagged = [r for r in rows.values() if r["metadata"]]
    assert len(tagged) == 1 and json.loads(tagged[0]["metadata"]) == {"team": "search"}


def test_the_handshake_header_names_the_end_user(tokentill: Running) -> None:
    client = tokentill.client()
    with client.responses.connect(extra_headers={"X-Tokentill-User": "ws-head"}) as connection:
        connection.response.create(model="gpt-4o-mini", input="a", user="body-user")
        (event,) = [e for e in _until_terminal(connection, 1) if e.type == "response.completed"]
    (row,) = tokentill.rows("response_id = ?", [event.response.id])
    assert (row["user_id"], row["user_source"]) == ("ws-head", "header")
    # The header is tokentill's own: the upstream never saw it (its user is the body's).
    billed = {e["id"]: e for e in ledger(tokentill.settings.upstream)}
    assert billed[event.response.id]["user"] == "body-user"


def test_a_tool_loop_over_the_socket(tokentill: Running) -> None:
    client = tokentill.client()
    with client.responses.connect() as connection:
        connection.response.create(
            model="gpt-4.1-mini", input="weather?", tools=[WEATHER_TOOL], user="ws-agent"
        )
        first = next(e for e in _until_terminal(connection, 1) if e.type == "response.completed")
        (call,) = [item for item in first.response.output if item.type == "function_call"]
        connection.response.create(
            model="gpt-4.1-mini",
            previous_response_id=first.response.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
            tools=[WEATHER_TOOL],
            user="ws-agent",
        )
        second = next(e for e in _until_terminal(connection, 1) if e.type == "response.completed")
    assert second.response.output_text
    rows = tokentill.rows("user_id = 'ws-agent'")
    assert [r["response_id"] for r in rows] == [first.response.id, second.response.id]
    assert rows[1]["previous_response_id"] == first.response.id


def test_a_quota_refusal_is_an_error_event_and_the_socket_stays_open(
    make_tokentill: Any,
) -> None:
    running: Running = make_tokentill(quotas_enabled=True)
    put_user_quota(running, "ws-capped", limit_requests=1, period="day")
    before = len(ledger(running.settings.upstream))
    client = running.client()
    with client.responses.connect() as connection:
        connection.response.create(model="gpt-4o-mini", input="1", user="ws-capped")
        _until_terminal(connection, 1)
        connection.response.create(model="gpt-4o-mini", input="2", user="ws-capped", stream_id="s2")
        (refused,) = [e for e in _until_terminal(connection, 1) if e.type == "error"]
        # Another user on the same socket is still served.
        connection.response.create(model="gpt-4o-mini", input="3", user="ws-free")
        served = _until_terminal(connection, 1)
    assert refused.error.code == "user_quota_exceeded"
    assert refused.error.type == "insufficient_quota" and refused.status == 429
    assert refused.stream_id == "s2"
    assert served[-1].type == "response.completed"
    # The refused create never reached the upstream; it is recorded as a refusal.
    assert len(ledger(running.settings.upstream)) == before + 2
    statuses = sorted((r["user_id"], r["status"]) for r in running.rows("transport = 'websocket'"))
    assert statuses == [
        ("ws-capped", "completed"),
        ("ws-capped", "error"),
        ("ws-free", "completed"),
    ]


def test_a_socket_that_drops_mid_response_leaves_a_row_then_settles(tokentill: Running) -> None:
    client = tokentill.client()
    seen: list[Any] = []
    with (
        pytest.raises(ConnectionClosedError) as closed,
        client.responses.connect(extra_headers={"x-fake-scenario": "cut"}) as connection,
    ):
        connection.response.create(model="gpt-4o", input="hi", user="ws-cut")
        for event in connection:
            seen.append(event)  # noqa: PERF402 - keep what came before the drop
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert seen and seen[0].type == "response.created"
    response_id = seen[0].response.id
    (row,) = tokentill.rows("response_id = ?", [response_id])
    assert row["status"] in ("interrupted", "completed") and row["transport"] == "websocket"
    # The poller asks the upstream how it ended, as for a cut HTTP stream.
    tokentill.wait_for(
        lambda: tokentill.rows("response_id = ?", [response_id])[0]["status"] == "completed", 15
    )
    billed = {e["id"]: e for e in ledger(tokentill.settings.upstream)}[response_id]
    assert (
        tokentill.rows("response_id = ?", [response_id])[0]["output_tokens"]
        == (billed["output_tokens"])
    )


def test_a_refused_handshake_is_passed_on(tokentill: Running) -> None:
    client = openai.OpenAI(base_url=tokentill.url + "/v1", api_key="sk-bad-key", max_retries=0)
    with pytest.raises(InvalidStatus) as caught, client.responses.connect() as connection:
        connection.response.create(model="gpt-4o-mini", input="hi")
        next(iter(connection))
    assert caught.value.response.status_code == 401
    assert json.loads(caught.value.response.body)["error"]["code"] == "invalid_api_key"
    assert tokentill.rows("transport = 'websocket'") == []
