"""The fake OpenAI upstream, driven over real HTTP by the official openai SDK and httpx."""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any, Literal, get_args, get_origin

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.model import Model
from openai.types.responses import Response, ResponseStreamEvent
from openai.types.shared.chat_model import ChatModel
from openai.types.shared.responses_model import ResponsesModel
from pydantic import TypeAdapter

from tests.servers import serve_in_thread
from tokentill.fakeai import create_fake_app
from tokentill.fakeai.catalog import SNAPSHOTS

EVENTS: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)
AUTH = {"authorization": "Bearer sk-test"}
KEY_FINGERPRINT = "sha256:" + hashlib.sha256(b"sk-test").hexdigest()[:16]


# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve_in_thread(create_fake_app(seed=1234)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as session:
        yield session


def scenario(name: str, **more: str) -> dict[str, str]:
    return {"x-fake-scenario": name, **more}


def sse(response: httpx.Response) -> list[tuple[str | None, str]]:
    """(event, data) pairs of a complete SSE body."""
    frames = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        event = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        frames.append((event, "\n".join(data)))
    return frames


def post_stream(
    http: httpx.Client, path: str, body: dict[str, Any], **headers: str
) -> httpx.Response:
    response = http.post(path, json={**body, "stream": True}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return response


def ledger(http: httpx.Client) -> dict[str, dict[str, Any]]:
    rows: list[dict[str, Any]] = http.get("/_fake/ledger").json()
    return {row["id"]: row for row in rows}


def assert_response_usage_invariants(response: Response, *, reasoning: bool) -> None:
    usage = response.usage
    assert usage is not None
    details = usage.input_tokens_details
    assert 0 <= details.cached_tokens <= usage.input_tokens
    assert 0 <= details.cache_write_tokens <= usage.input_tokens - details.cached_tokens
    if details.cache_write_tokens:
        split = details.cache_write_tokens_details
        assert split is not None
        assert split.ttl_30m_tokens + split.ttl_12h_tokens == details.cache_write_tokens
    assert 0 <= usage.output_tokens_details.reasoning_tokens <= usage.output_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    if not reasoning:
        assert usage.output_tokens_details.reasoning_tokens == 0
    if response.max_output_tokens is not None:
        assert usage.output_tokens <= response.max_output_tokens


def assert_chat_usage_invariants(completion: ChatCompletion | ChatCompletionChunk) -> None:
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    assert usage.completion_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached is not None and 0 <= cached <= usage.prompt_tokens
    reasoning = usage.completion_tokens_details.reasoning_tokens
    assert reasoning is not None and 0 <= reasoning <= usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# -- Responses API: plain ----------------------------------------------------------------


def test_plain_response_echoes_the_request(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model="gpt-4o",
        input="Tell me about otters.",
        instructions="Be brief.",
        metadata={"team": "search", "env": "test"},
        user="user-42",
        safety_identifier="sid-42",
        previous_response_id="resp_previous",
        service_tier="flex",
        prompt_cache_key="otters",
    )
    response = Response.model_validate_json(raw.content)
    assert response == raw.parse()
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.model == "gpt-4o-2024-08-06"
    assert response.metadata == {"team": "search", "env": "test"}
    assert response.user == "user-42"
    assert response.safety_identifier == "sid-42"
    assert response.previous_response_id == "resp_previous"
    assert response.service_tier == "flex"
    assert response.instructions == "Be brief."
    assert response.prompt_cache_key == "otters"
    assert response.background is False
    assert response.tool_usage is None
    assert response.completed_at is not None and response.completed_at >= response.created_at
    assert response.output_text
    assert [item.type for item in response.output] == ["message"]
    assert_response_usage_invariants(response, reasoning=False)
    assert response.usage is not None and response.usage.input_tokens_details.cached_tokens > 0
    body = json.loads(raw.content)
    assert isinstance(body["created_at"], int)  # OpenAI sends integer timestamps
    assert raw.headers["x-request-id"].startswith("req_")
    assert "openai-processing-ms" in raw.headers


def test_stored_response_is_retrievable(client: openai.OpenAI) -> None:
    created = client.responses.create(model="gpt-4.1", input="hi")
    assert client.responses.retrieve(created.id) == created
    not_stored = client.responses.create(model="gpt-4.1", input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(not_stored.id)


@pytest.mark.parametrize(
    ("requested", "answered"),
    [
        ("gpt-4o", "gpt-4o-2024-08-06"),
        ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
        ("gpt-4.1", "gpt-4.1-2025-04-14"),
        ("o4-mini", "o4-mini-2025-04-16"),
        ("gpt-5", "gpt-5-2025-08-07"),
        ("gpt-5-mini", "gpt-5-mini-2025-08-07"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
        ("my-own-model", "my-own-model"),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "ft:gpt-4o-mini-2024-07-18:acme::abc123"),
    ],
)
def test_model_is_answered_as_a_dated_snapshot(
    client: openai.OpenAI, requested: str, answered: str
) -> None:
    assert client.responses.create(model=requested, input="hi").model == answered
    chat = client.chat.completions.create(
        model=requested, messages=[{"role": "user", "content": "hi"}]
    )
    assert chat.model == answered


def _literals(annotation: object) -> set[str]:
    if get_origin(annotation) is Literal:
        return {arg for arg in get_args(annotation) if isinstance(arg, str)}
    return {name for arg in get_args(annotation) for name in _literals(arg)}


def test_snapshot_table_uses_real_model_names() -> None:
    known = _literals(ChatModel) | _literals(ResponsesModel)
    assert "gpt-4o-2024-08-06" in known
    assert set(SNAPSHOTS) <= known
    assert set(SNAPSHOTS.values()) <= known


@pytest.mark.parametrize(
    ("requested", "answered"),
    [
        (None, "default"),
        ("auto", "default"),
        ("default", "default"),
        ("flex", "flex"),
        ("priority", "priority"),
        ("scale", "scale"),
    ],
)
def test_service_tier(client: openai.OpenAI, requested: Any, answered: str) -> None:
    extra = {} if requested is None else {"service_tier": requested}
    response = client.responses.create(model="gpt-4o", input="hi", **extra)
    assert response.service_tier == answered
    chat = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], **extra
    )
    assert chat.service_tier == answered


def test_reasoning_model_reports_reasoning(client: openai.OpenAI) -> None:
    response = client.responses.create(model="o4-mini", input="think", reasoning={"effort": "high"})
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.reasoning is not None and response.reasoning.effort == "high"
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens > 0
    assert_response_usage_invariants(response, reasoning=True)


def test_hosted_tools_fill_tool_usage(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(
        model="gpt-4.1",
        input="find and draw otters",
        tools=[
            {"type": "web_search"},
            {"type": "image_generation", "quality": "high"},
            {
                "type": "function",
                "name": "lookup",
                "parameters": {"type": "object"},
                "strict": True,
            },
        ],
    )
    response = Response.model_validate_json(raw.content)
    assert response.tool_usage is not None
    assert response.tool_usage.web_search.num_requests >= 1
    image = response.tool_usage.image_gen
    assert image.output_tokens == 4160
    assert image.total_tokens == image.input_tokens + image.output_tokens
    types = [item.type for item in response.output]
    assert types.count("web_search_call") == response.tool_usage.web_search.num_requests
    assert "image_generation_call" in types
    assert [tool.type for tool in response.tools] == ["web_search", "image_generation", "function"]
    only_search = client.responses.create(
        model="gpt-4.1", input="x", tools=[{"type": "web_search_preview"}]
    )
    assert only_search.tool_usage is not None
    assert only_search.tool_usage.image_gen.total_tokens == 0


# -- Responses API: streaming ------------------------------------------------------------


def test_stream_follows_openai_event_sequence(http: httpx.Client, client: openai.OpenAI) -> None:
    response = post_stream(http, "/v1/responses", {"model": "gpt-4o", "input": "hello"})
    assert "content-encoding" not in response.headers  # SSE is never gzipped
    frames = sse(response)
    events = [EVENTS.validate_json(data) for _, data in frames]
    assert [name for name, _ in frames] == [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    types = [event.type for event in events]
    deltas = types.count("response.output_text.delta")
    assert deltas >= 3
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    created, final = events[0], events[-1]
    assert created.type == "response.created" and created.response.status == "in_progress"
    assert created.response.usage is None
    assert final.type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.response.output_text
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.type == "response.output_text.done" and done.text == text
    assert_response_usage_invariants(final.response, reasoning=False)
    assert client.responses.retrieve(final.response.id) == final.response


def test_stream_through_the_sdk(client: openai.OpenAI) -> None:
    with client.responses.stream(model="gpt-5", input="hello") as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output_text
    assert_response_usage_invariants(final, reasoning=True)


def test_stream_with_hosted_tools_validates(http: httpx.Client) -> None:
    body = {
        "model": "o3",
        "input": "x",
        "tools": [{"type": "web_search"}, {"type": "image_generation"}],
    }
    events = [
        EVENTS.validate_json(data) for _, data in sse(post_stream(http, "/v1/responses", body))
    ]
    types = [event.type for event in events]
    assert "response.web_search_call.completed" in types
    assert "response.image_generation_call.completed" in types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    assert events[-1].response.tool_usage is not None


# -- background ---------------------------------------------------------------------------


def test_background_goes_queued_in_progress_then_completed(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    created = client.responses.create(
        model="gpt-4o",
        input="long task",
        background=True,
        extra_headers={"x-fake-background-delay-ms": "400"},
    )
    assert created.status == "queued" and created.background is True
    assert created.usage is None and created.output == []
    seen: list[str | None] = [created.status]
    deadline = time.monotonic() + 10
    current = created
    while current.status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.03)
        billed_before = ledger(http)
        current = client.responses.retrieve(created.id)
        seen.append(current.status)
        if current.status in ("queued", "in_progress"):
            assert created.id not in billed_before  # billed only once it is terminal
    assert "in_progress" in seen
    assert current.status == "completed"
    assert current.background is True
    assert current.output_text
    assert_response_usage_invariants(current, reasoning=False)
    raw = http.get(f"/v1/responses/{created.id}")
    assert Response.model_validate_json(raw.content) == current
    row = ledger(http)[created.id]
    assert row["status"] == "completed" and row["background"] is True
    assert current.usage is not None and row["total_tokens"] == current.usage.total_tokens


def test_background_cancel(client: openai.OpenAI, http: httpx.Client) -> None:
    created = client.responses.create(
        model="gpt-4o",
        input="never mind",
        background=True,
        extra_headers={"x-fake-background-delay-ms": "30000"},
    )
    cancelled = client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    assert cancelled.usage is None
    Response.model_validate_json(http.post(f"/v1/responses/{created.id}/cancel").content)
    assert client.responses.retrieve(created.id).status == "cancelled"
    assert client.responses.cancel(created.id).status == "cancelled"  # idempotent
    row = ledger(http)[created.id]
    assert row["status"] == "cancelled" and row["total_tokens"] is None

    finished = client.responses.create(
        model="gpt-4o",
        input="quick",
        background=True,
        extra_headers={"x-fake-background-delay-ms": "0"},
    )
    time.sleep(0.1)
    assert client.responses.cancel(finished.id).status == "completed"

    plain = client.responses.create(model="gpt-4o", input="plain")
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(plain.id)
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.cancel("resp_unknown")
    assert missing.value.body == {
        "message": "Response with id 'resp_unknown' not found.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def test_background_stream_and_replay(http: httpx.Client, client: openai.OpenAI) -> None:
    body = {"model": "gpt-4o", "input": "hi", "background": True}
    events = [
        EVENTS.validate_json(data)
        for _, data in sse(
            post_stream(http, "/v1/responses", body, **{"x-fake-background-delay-ms": "5000"})
        )
    ]
    types = [event.type for event in events]
    assert types[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert events[0].type == "response.created" and events[0].response.status == "queued"
    final = events[-1]
    assert final.type == "response.completed" and final.response.background is True
    assert [e.sequence_number for e in events] == list(range(len(events)))
    stored = client.responses.retrieve(final.response.id)
    assert stored.status == "completed"  # the stream's end finishes the background job
    replay = http.get(f"/v1/responses/{stored.id}", params={"stream": "true", "starting_after": 5})
    replayed = [EVENTS.validate_json(data) for _, data in sse(replay)]
    assert [e.sequence_number for e in replayed] == list(range(6, len(events)))
    assert replayed[-1].type == "response.completed" and replayed[-1].response == stored


# -- Chat Completions ---------------------------------------------------------------------


def test_chat_plain(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}],
        user="user-1",
        metadata={"k": "v"},
        n=2,
    )
    completion = ChatCompletion.model_validate_json(raw.content)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini-2024-07-18"
    assert completion.service_tier == "default"
    assert completion.system_fingerprint is not None
    assert completion.system_fingerprint.startswith("fp_")
    assert completion.metadata == {"k": "v"}
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(c.finish_reason == "stop" and c.message.content for c in completion.choices)
    assert_chat_usage_invariants(completion)


@pytest.mark.parametrize("model", ["gpt-4o", "o3-mini"])
def test_chat_stream_with_include_usage(http: httpx.Client, model: str) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream_options": {"include_usage": True},
    }
    frames = sse(post_stream(http, "/v1/chat/completions", body))
    assert frames[-1] == (None, "[DONE]")
    raw_chunks = [json.loads(data) for _, data in frames[:-1]]
    chunks = [ChatCompletionChunk.model_validate_json(data) for _, data in frames[:-1]]
    assert all("usage" in chunk for chunk in raw_chunks)
    assert all(chunk["usage"] is None for chunk in raw_chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert_chat_usage_invariants(last)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert len({chunk.id for chunk in chunks}) == 1
    reasoning = last.usage.completion_tokens_details
    assert reasoning is not None
    assert (
        (reasoning.reasoning_tokens or 0) > 0
        if model == "o3-mini"
        else reasoning.reasoning_tokens == 0
    )


@pytest.mark.parametrize("options", [None, {"include_usage": False}])
def test_chat_stream_without_usage(http: httpx.Client, options: dict[str, bool] | None) -> None:
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    if options is not None:
        body["stream_options"] = options
    frames = sse(post_stream(http, "/v1/chat/completions", body))
    assert frames[-1] == (None, "[DONE]")
    raw_chunks = [json.loads(data) for _, data in frames[:-1]]
    assert all("usage" not in chunk for chunk in raw_chunks)
    assert all(chunk["choices"] for chunk in raw_chunks)
    for _, data in frames[:-1]:
        ChatCompletionChunk.model_validate_json(data)


def test_chat_stream_through_the_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="gpt-4.1",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_chat_completion_token_limit(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=5
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model="o4-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=50
        )
    assert error.value.code == "unsupported_parameter"


# -- scenarios ----------------------------------------------------------------------------


def test_incomplete(client: openai.OpenAI, http: httpx.Client) -> None:
    forced = client.responses.create(
        model="gpt-4o", input="x", extra_headers=scenario("incomplete")
    )
    assert forced.status == "incomplete"
    assert forced.incomplete_details is not None
    assert forced.incomplete_details.reason == "max_output_tokens"
    assert forced.completed_at is None
    natural = client.responses.create(model="gpt-4o", input="x", max_output_tokens=16)
    assert natural.status == "incomplete"
    assert natural.usage is not None and natural.usage.output_tokens == 16
    assert natural.output[0].type == "message" and natural.output[0].status == "incomplete"
    events = [
        EVENTS.validate_json(data)
        for _, data in sse(
            post_stream(
                http, "/v1/responses", {"model": "gpt-4o", "input": "x"}, **scenario("incomplete")
            )
        )
    ]
    assert events[-1].type == "response.incomplete"
    chat = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "x"}],
        extra_headers=scenario("incomplete"),
    )
    assert chat.choices[0].finish_reason == "length"


def test_max_output_tokens_below_minimum_is_rejected(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model="gpt-4o", input="x", max_output_tokens=10)
    assert error.value.body == {
        "message": "Invalid 'max_output_tokens': integer below minimum value. "
        "Expected a value >= 16, but got 10 instead.",
        "type": "invalid_request_error",
        "param": "max_output_tokens",
        "code": "integer_below_min_value",
    }


def test_content_filter(client: openai.OpenAI, http: httpx.Client) -> None:
    response = client.responses.create(
        model="gpt-4o", input="x", extra_headers=scenario("content_filter")
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "content_filter"
    assert_response_usage_invariants(response, reasoning=False)
    chat = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "x"}],
        extra_headers=scenario("content_filter"),
    )
    assert chat.choices[0].finish_reason == "content_filter"
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
    frames = sse(post_stream(http, "/v1/chat/completions", body, **scenario("content_filter")))
    finish = [ChatCompletionChunk.model_validate_json(d) for _, d in frames[:-1]][-1]
    assert finish.choices[0].finish_reason == "content_filter"


def test_failed(client: openai.OpenAI, http: httpx.Client) -> None:
    response = client.responses.create(model="gpt-4o", input="x", extra_headers=scenario("failed"))
    assert response.status == "failed"
    assert response.error is not None and response.error.code == "server_error"
    assert response.error.message
    assert response.usage is None
    frames = sse(
        post_stream(http, "/v1/responses", {"model": "gpt-4o", "input": "x"}, **scenario("failed"))
    )
    events = [EVENTS.validate_json(data) for _, data in frames]
    assert events[-1].type == "response.failed"
    assert events[-1].response.error is not None
    assert "response.output_text.done" not in [e.type for e in events]
    row = ledger(http)[response.id]
    assert row["status"] == "failed" and row["error_code"] == "server_error"
    assert row["total_tokens"] is None
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "x"}],
            extra_headers=scenario("failed"),
        )
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        extra_headers=scenario("failed"),
    )
    with pytest.raises(openai.APIError) as error:
        list(stream)
    assert isinstance(error.value.body, dict) and error.value.body["type"] == "server_error"


def test_http_error_scenarios(client: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        client.responses.create(model="gpt-4o", input="x", extra_headers=scenario("http_401"))
    assert unauthorized.value.code == "invalid_api_key"
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "x"}],
            extra_headers=scenario("http_429"),
        )
    assert limited.value.code == "rate_limit_exceeded"
    headers = limited.value.response.headers
    assert headers["retry-after"] == "1"
    for name in ("limit", "remaining", "reset"):
        assert f"x-ratelimit-{name}-requests" in headers
        assert f"x-ratelimit-{name}-tokens" in headers
    with pytest.raises(openai.InternalServerError) as broken:
        client.responses.create(model="gpt-4o", input="x", extra_headers=scenario("http_500"))
    assert broken.value.status_code == 500
    assert isinstance(broken.value.body, dict) and broken.value.body["type"] == "server_error"


def test_garbage(client: openai.OpenAI, http: httpx.Client) -> None:
    raw = http.post(
        "/v1/responses", json={"model": "gpt-4o", "input": "x"}, headers=scenario("garbage")
    )
    assert raw.status_code == 200
    assert raw.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw.content)
    with pytest.raises(json.JSONDecodeError):
        client.responses.create(model="gpt-4o", input="x", extra_headers=scenario("garbage"))


def test_cut_stream_lacks_terminal_event(http: httpx.Client, client: openai.OpenAI) -> None:
    body = {"model": "gpt-4o", "input": "x", "stream": True}
    received: list[str] = []
    with (
        http.stream("POST", "/v1/responses", json=body, headers=scenario("cut")) as response,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        received.extend(response.iter_lines())
    types = [line.removeprefix("event: ") for line in received if line.startswith("event: ")]
    assert types[0] == "response.created"
    assert "response.output_text.delta" in types
    assert not {"response.completed", "response.incomplete", "response.failed"} & set(types)
    with pytest.raises(openai.APIConnectionError):
        list(
            client.responses.create(
                model="gpt-4o", input="x", stream=True, extra_headers=scenario("cut")
            )
        )
    chat_lines: list[str] = []
    chat_body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with (
        http.stream(
            "POST", "/v1/chat/completions", json=chat_body, headers=scenario("cut")
        ) as chat,
        pytest.raises(httpx.RemoteProtocolError),
    ):
        chat_lines.extend(chat.iter_lines())
    assert chat_lines and "data: [DONE]" not in chat_lines


def test_cut_plain_body_is_truncated(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        client.responses.create(model="gpt-4o", input="x", extra_headers=scenario("cut"))
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "x"}],
            extra_headers=scenario("cut"),
        )


def test_slow_and_event_delay(http: httpx.Client) -> None:
    started = time.perf_counter()
    response = http.post(
        "/v1/responses",
        json={"model": "gpt-4o", "input": "x"},
        headers=scenario("slow", **{"x-fake-delay-ms": "300"}),
    )
    assert response.status_code == 200
    assert time.perf_counter() - started >= 0.3
    body = {"model": "gpt-4o", "input": "x", "stream": True}
    started = time.perf_counter()
    with http.stream(
        "POST", "/v1/responses", json=body, headers={"x-fake-delay-ms": "40"}
    ) as stream:
        lines = stream.iter_lines()
        first = next(lines)
        first_byte = time.perf_counter() - started
        rest = list(lines)
    total = time.perf_counter() - started
    events = [first, *rest]
    frames = sum(1 for line in events if line.startswith("event: "))
    assert first == "event: response.created"
    assert first_byte < 0.04 * frames / 2
    assert total >= 0.04 * (frames - 1)
    with pytest.raises(httpx.HTTPStatusError):
        http.post(
            "/v1/responses", json={"model": "gpt-4o"}, headers={"x-fake-delay-ms": "soon"}
        ).raise_for_status()
    with pytest.raises(httpx.HTTPStatusError):
        http.post(
            "/v1/responses", json={"model": "gpt-4o"}, headers=scenario("nope")
        ).raise_for_status()


# -- auth, validation, transport ----------------------------------------------------------


def test_auth(url: str, client: openai.OpenAI) -> None:
    missing = httpx.post(url + "/v1/responses", json={"model": "gpt-4o", "input": "x"})
    assert missing.status_code == 401
    error = missing.json()["error"]
    assert error["message"].startswith("You didn't provide an API key")
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, None)
    bad = openai.OpenAI(base_url=url + "/v1", api_key="sk-bad-1234567890abcdef", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as rejected:
        bad.models.list()
    assert rejected.value.code == "invalid_api_key"
    assert "sk-bad-1234567890abcdef" not in str(rejected.value.body)
    assert client.models.list().data


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/chat/completions"])
def test_input_validation(http: httpx.Client, path: str) -> None:
    base: dict[str, Any] = {
        "model": "gpt-4o",
        "input": "x",
        "messages": [{"role": "user", "content": "x"}],
    }
    if path == "/v1/responses":
        del base["messages"]
    else:
        del base["input"]
    bad_json = _error(
        http.post(
            path, content=b'{"model": "gpt-4o",', headers={"content-type": "application/json"}
        )
    )
    assert bad_json["message"].startswith("We could not parse the JSON body of your request.")
    no_model = _error(http.post(path, json={k: v for k, v in base.items() if k != "model"}))
    if path == "/v1/responses":
        assert (no_model["param"], no_model["code"]) == ("model", "missing_required_parameter")
    else:
        assert no_model["message"] == "you must provide a model parameter"
    cases = {
        "too many": {f"k{i}": "v" for i in range(17)},
        "long key": {"k" * 65: "v"},
        "long value": {"k": "v" * 513},
        "not a string": {"k": 1},
    }
    for metadata in cases.values():
        error = _error(http.post(path, json={**base, "metadata": metadata}))
        assert error["param"] == "metadata"
    assert (
        http.post(
            path, json={**base, "metadata": {f"k{i}": "v" * 512 for i in range(16)}}
        ).status_code
        == 200
    )
    tier = _error(http.post(path, json={**base, "service_tier": "turbo"}))
    assert tier["param"] == "service_tier"


def test_large_body_is_accepted(client: openai.OpenAI) -> None:
    text = "x" * (5 * 1024 * 1024)
    response = client.responses.create(model="gpt-4o", input=text)
    assert response.usage is not None
    assert response.usage.input_tokens >= len(text) // 4


def test_gzip_for_large_json_only(url: str) -> None:
    body = {"model": "gpt-4o", "input": "x"}
    with httpx.Client(base_url=url, headers={**AUTH, "accept-encoding": "gzip"}) as session:
        compressed = session.post("/v1/responses", json=body)
        assert compressed.headers["content-encoding"] == "gzip"
        Response.model_validate_json(compressed.content)  # httpx decompressed it
        small = session.post("/v1/responses", json={"input": "x"})
        assert small.status_code == 400 and "content-encoding" not in small.headers
        streamed = session.post("/v1/responses", json={**body, "stream": True})
        assert "content-encoding" not in streamed.headers
        with session.stream("POST", "/v1/responses", json=body) as raw:
            wire = b"".join(raw.iter_raw())
        Response.model_validate_json(gzip.decompress(wire))
    with httpx.Client(base_url=url, headers={**AUTH, "accept-encoding": "identity"}) as session:
        plain = session.post("/v1/responses", json=body)
        assert "content-encoding" not in plain.headers
        Response.model_validate_json(plain.content)


def test_models_and_unknown_paths(client: openai.OpenAI, http: httpx.Client) -> None:
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list"
    models = [Model.model_validate(item) for item in raw["data"]]
    assert {"gpt-4o", "gpt-4o-2024-08-06", "o4-mini"} <= {model.id for model in models}
    assert {model.id for model in client.models.list()} == {model.id for model in models}
    for method, path in (
        ("GET", "/v1/nope"),
        ("POST", "/v2/responses"),
        ("GET", "/v1/chat/completions"),
    ):
        response = http.request(method, path)
        assert response.status_code == 404
        assert response.json() == {
            "error": {
                "message": f"Invalid URL ({method} {path})",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_does_not_exist")


# -- usage over many requests -------------------------------------------------------------


def reasons(model: str) -> bool:
    """Reasoning models: the o-series and the gpt-5 family."""
    return model.startswith(("o1", "o3", "o4", "gpt-5"))


def _varied_requests(count: int) -> Iterator[dict[str, Any]]:
    models = [
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "o4-mini",
        "o3",
        "gpt-5",
        "gpt-5-mini",
        "my-model",
    ]
    for i in range(count):
        body: dict[str, Any] = {
            "model": models[i % len(models)],
            "input": "word " * (i * 37 % 1500),
        }
        if i % 3 == 0:
            body["prompt_cache_key"] = f"key-{i % 5}"
        if i % 4 == 0:
            body["max_output_tokens"] = 16 + i % 300
        if i % 7 == 0:
            body["tools"] = [{"type": "web_search"}]
        if i % 11 == 0:
            body["tools"] = [{"type": "image_generation"}, {"type": "web_search"}]
        if i % 5 == 0:
            body["prompt_cache_retention"] = "24h"
        if i % 6 == 0:
            body["reasoning"] = {"effort": ["minimal", "low", "medium", "high"][i % 4]}
        yield body


def test_usage_invariants_over_many_requests(http: httpx.Client) -> None:
    cached = writes = reasoning_seen = 0
    for body in _varied_requests(300):
        response = Response.model_validate_json(http.post("/v1/responses", json=body).content)
        assert_response_usage_invariants(response, reasoning=reasons(response.model))
        usage = response.usage
        assert usage is not None
        assert usage.input_tokens >= len(body["input"]) // 4
        if body.get("prompt_cache_key"):
            assert usage.input_tokens_details.cached_tokens > 0
        if usage.input_tokens_details.cached_tokens >= 1024:
            assert usage.input_tokens_details.cached_tokens % 128 == 0
        if usage.input_tokens_details.cache_write_tokens and body.get("prompt_cache_retention"):
            split = usage.input_tokens_details.cache_write_tokens_details
            assert split is not None and split.ttl_30m_tokens == 0
        cached += usage.input_tokens_details.cached_tokens > 0
        writes += usage.input_tokens_details.cache_write_tokens > 0
        reasoning_seen += usage.output_tokens_details.reasoning_tokens > 0
        tools = {tool["type"] for tool in body.get("tools", [])}
        if tools:
            assert response.tool_usage is not None
            assert (response.tool_usage.web_search.num_requests > 0) == ("web_search" in tools)
            assert (response.tool_usage.image_gen.total_tokens > 0) == ("image_generation" in tools)
        else:
            assert response.tool_usage is None
        limit = body.get("max_output_tokens")
        if response.status == "incomplete":
            assert limit is not None and usage.output_tokens == limit
    assert 0 < cached < 300 and 0 < writes < 300 and reasoning_seen > 50
    for body in list(_varied_requests(60))[::3]:
        frames = sse(post_stream(http, "/v1/responses", body))
        events = [EVENTS.validate_json(data) for _, data in frames]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        final = events[-1]
        assert final.type in ("response.completed", "response.incomplete")
        assert_response_usage_invariants(final.response, reasoning=reasons(final.response.model))
    for index, body in enumerate(_varied_requests(120)):
        chat_body: dict[str, Any] = {
            "model": body["model"],
            "messages": [{"role": "user", "content": body["input"] or "hi"}],
            "max_completion_tokens": body.get("max_output_tokens"),
            "n": 1 + index % 3,
        }
        completion = ChatCompletion.model_validate_json(
            http.post("/v1/chat/completions", json=chat_body).content
        )
        assert_chat_usage_invariants(completion)
        assert (
            completion.usage is not None and completion.usage.completion_tokens_details is not None
        )
        if not reasons(completion.model):
            assert completion.usage.completion_tokens_details.reasoning_tokens == 0
        if chat_body["max_completion_tokens"] is not None:
            assert completion.usage.completion_tokens <= chat_body["max_completion_tokens"]
        assert len(completion.choices) == chat_body["n"]


def test_seeded_apps_repeat_their_usage() -> None:
    def totals(seed: int) -> list[int]:
        with (
            serve_in_thread(create_fake_app(seed=seed)) as base,
            httpx.Client(base_url=base, headers=AUTH) as s,
        ):
            numbers = []
            for body in _varied_requests(20):
                usage = s.post("/v1/responses", json=body).json()["usage"]
                numbers.append(usage["total_tokens"])
            return numbers

    first = totals(7)
    assert totals(7) == first
    assert totals(8) != first
    assert len(set(first)) > 10


# -- ledger ---------------------------------------------------------------------------------


def test_ledger_matches_what_the_client_received(url: str) -> None:
    with (
        serve_in_thread(create_fake_app(seed=99)) as base,
        httpx.Client(base_url=base, headers=AUTH) as s,
    ):
        client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
        received: dict[str, tuple[str, str, str, int | None, int | None]] = {}

        plain = client.responses.create(
            model="gpt-4o", input="a", user="alice", service_tier="priority"
        )
        streamed = client.responses.create(model="o4-mini", input="b", stream=True)
        final = [event for event in streamed][-1]
        assert final.type == "response.completed"
        background = client.responses.create(
            model="gpt-5",
            input="c",
            background=True,
            extra_headers={"x-fake-background-delay-ms": "50"},
        )
        while background.status in ("queued", "in_progress"):
            time.sleep(0.02)
            background = client.responses.retrieve(background.id)
        for response in (plain, final.response, background):
            assert response.usage is not None
            received[response.id] = (
                "/v1/responses",
                response.model,
                str(response.status),
                response.usage.input_tokens,
                response.usage.output_tokens,
            )
        chat = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "d"}]
        )
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "e"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        for completion in (chat, chunks[-1]):
            assert completion.usage is not None
            received[completion.id] = (
                "/v1/chat/completions",
                completion.model,
                "completed",
                completion.usage.prompt_tokens,
                completion.usage.completion_tokens,
            )
        with pytest.raises(openai.APIConnectionError):
            client.responses.create(model="gpt-4o", input="f", extra_headers=scenario("cut"))
        with pytest.raises(openai.RateLimitError):
            client.responses.create(model="gpt-4o", input="g", extra_headers=scenario("http_429"))

        rows = s.get("/_fake/ledger").json()
        by_id = {row["id"]: row for row in rows}
        assert len(rows) == len(received) + 1  # plus the cut one; the 429 was not billed
        for object_id, (endpoint, model, status, input_tokens, output_tokens) in received.items():
            row = by_id[object_id]
            assert (row["endpoint"], row["model"], row["status"]) == (endpoint, model, status)
            assert (row["input_tokens"], row["output_tokens"]) == (input_tokens, output_tokens)
            assert row["total_tokens"] == input_tokens + output_tokens  # type: ignore[operator]
            assert row["key_fingerprint"] == KEY_FINGERPRINT
            assert row["delivered"] is True
        assert by_id[plain.id]["user"] == "alice"
        assert by_id[plain.id]["service_tier"] == "priority"
        assert by_id[plain.id]["requested_model"] == "gpt-4o"
        assert by_id[final.response.id]["streamed"] is True
        assert by_id[background.id]["background"] is True
        (cut,) = [row for row in rows if row["id"] not in received]
        assert cut["delivered"] is False and cut["total_tokens"] > 0

        assert s.delete("/_fake/ledger").json() == {"deleted": len(rows)}
        assert s.get("/_fake/ledger").json() == []
