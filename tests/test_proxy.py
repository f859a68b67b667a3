"""The proxy end to end: the official SDK -> tokentill -> the fake upstream, rows in DuckDB."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Running, ledger
from tests.servers import free_port

USAGE_COLUMNS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
)


def one_row(tokentill: Running, response_id: str) -> dict[str, Any]:
    rows = tokentill.rows("response_id = ?", [response_id])
    assert len(rows) == 1, rows
    return rows[0]


def assert_usage_matches(row: dict[str, Any], usage: Any) -> None:
    assert row["input_tokens"] == usage.input_tokens
    assert row["cached_input_tokens"] == usage.input_tokens_details.cached_tokens
    assert row["cache_write_tokens"] == usage.input_tokens_details.cache_write_tokens
    assert row["output_tokens"] == usage.output_tokens
    assert row["reasoning_tokens"] == usage.output_tokens_details.reasoning_tokens
    assert row["total_tokens"] == usage.total_tokens


def test_plain_response_passes_through_and_is_captured(tokentill: Running) -> None:
    client = tokentill.client()
    response = client.responses.create(
        model="gpt-5-mini",
        input="What is the capital of France?",
        user="alice",
        metadata={"team": "search", "feature": "qa"},
        service_tier="flex",
    )
    assert response.status == "completed"
    assert response.usage is not None and response.usage.total_tokens > 0

    row = one_row(tokentill, response.id)
    assert row["event_id"] == response.id
    assert row["endpoint"] == "responses"
    assert row["model"] == response.model
    assert row["requested_model"] == "gpt-5-mini"
    assert row["status"] == "completed"
    assert row["http_status"] == 200
    assert row["user_id"] == "alice" and row["user_source"] == "user"
    assert json.loads(row["metadata"]) == {"team": "search", "feature": "qa"}
    assert row["service_tier"] == response.service_tier == "flex"
    assert row["streamed"] is False
    assert row["latency_ms"] > 0
    assert_usage_matches(row, response.usage)
    # A fingerprint of the key, never the key.
    assert row["key_fingerprint"].startswith("sha256:")
    assert "sk-test" not in json.dumps(row, default=str)


def test_end_user_header_beats_body_fields(tokentill: Running) -> None:
    client = tokentill.client()
    by_header = client.responses.create(
        model="gpt-4o-mini",
        input="hi",
        user="body-user",
        extra_headers={"X-Tokentill-User": "header-user"},
    )
    by_safety = client.responses.create(
        model="gpt-4o-mini", input="hi", safety_identifier="safe-123"
    )
    nobody = client.responses.create(model="gpt-4o-mini", input="hi")
    assert one_row(tokentill, by_header.id)["user_id"] == "header-user"
    safety_row = one_row(tokentill, by_safety.id)
    assert (safety_row["user_id"], safety_row["user_source"]) == ("safe-123", "safety_identifier")
    assert one_row(tokentill, nobody.id)["user_id"] is None


def test_stream_is_forwarded_event_by_event_and_captured(tokentill: Running) -> None:
    client = tokentill.client()
    events = list(
        client.responses.create(model="o4-mini", input="Count to five.", stream=True, user="bob")
    )
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    numbers = [event.sequence_number for event in events]
    assert numbers == sorted(numbers)
    final = events[-1].response
    assert final.usage is not None
    row = one_row(tokentill, final.id)
    assert row["streamed"] is True and row["status"] == "completed"
    assert row["ttft_ms"] is not None and row["ttft_ms"] <= row["latency_ms"]
    assert_usage_matches(row, final.usage)
    assert row["reasoning_tokens"] == final.usage.output_tokens_details.reasoning_tokens


def test_chat_completions_plain_and_streamed(tokentill: Running) -> None:
    client = tokentill.client()
    plain = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hello"}],
        user="carol",
        metadata={"team": "chat"},
        store=True,
    )
    assert plain.usage is not None
    row = one_row(tokentill, plain.id)
    assert row["endpoint"] == "chat.completions"
    assert row["input_tokens"] == plain.usage.prompt_tokens
    assert row["output_tokens"] == plain.usage.completion_tokens
    assert row["total_tokens"] == plain.usage.total_tokens
    assert row["user_id"] == "carol"

    # The client did not ask for usage: tokentill asks for it upstream but the client
    # must not see the usage-only chunk, nor usage fields.
    raw = httpx.post(
        tokentill.url + "/v1/chat/completions",
        headers={"Authorization": "Bearer sk-test"},
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        timeout=30,
    )
    assert raw.status_code == 200
    assert '"usage"' not in raw.text
    assert raw.text.rstrip().endswith("data: [DONE]")
    chunks = [json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: {")]
    assert all(chunk["choices"] for chunk in chunks)
    row = one_row(tokentill, chunks[0]["id"])
    assert row["streamed"] is True and row["status"] == "completed"
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0

    # A client that asked for usage gets it, once, as the SDK expects.
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    received = list(stream)
    usage_chunks = [chunk for chunk in received if chunk.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
    row = one_row(tokentill, received[0].id)
    assert row["total_tokens"] == usage_chunks[0].usage.total_tokens  # type: ignore[union-attr]


def test_background_response_filled_in_when_client_retrieves(
    make_tokentill: Callable[..., Running],
) -> None:
    # Polling is slowed down so that the client's own retrieve settles it.
    tokentill = make_tokentill(background_poll_min_interval=30.0)
    client = tokentill.client()
    created = client.responses.create(
        model="gpt-4.1", input="a long task", background=True, user="dave"
    )
    assert created.status == "queued"
    row = one_row(tokentill, created.id)
    assert row["status"] == "queued" and row["background"] is True
    assert row["input_tokens"] is None

    final = created
    tokentill.wait_for(
        lambda: (final := client.responses.retrieve(created.id)).status == "completed"  # noqa: F841
    )
    final = client.responses.retrieve(created.id)
    assert final.usage is not None
    tokentill.wait_for(lambda: one_row(tokentill, created.id)["status"] == "completed")
    row = one_row(tokentill, created.id)
    assert_usage_matches(row, final.usage)
    assert row["user_id"] == "dave"  # the update keeps who asked


def test_background_response_polled_by_tokentill(tokentill: Running) -> None:
    client = tokentill.client()
    created = client.responses.create(
        model="gpt-4o", input="background work", background=True, metadata={"team": "batch"}
    )
    assert created.status == "queued"
    # Nobody retrieves it: tokentill polls the upstream with the caller's key.
    tokentill.wait_for(lambda: one_row(tokentill, created.id)["status"] == "completed", 15)
    row = one_row(tokentill, created.id)
    billed = {entry["id"]: entry for entry in ledger(tokentill.settings.upstream)}[created.id]
    assert row["input_tokens"] == billed["input_tokens"]
    assert row["output_tokens"] == billed["output_tokens"]
    assert json.loads(row["metadata"]) == {"team": "batch"}


@pytest.mark.parametrize(
    ("scenario", "exception", "status", "code"),
    [
        ("http_401", openai.AuthenticationError, 401, "invalid_api_key"),
        ("http_429", openai.RateLimitError, 429, "rate_limit_exceeded"),
        ("http_500", openai.InternalServerError, 500, None),
    ],
)
def test_upstream_errors_pass_through_and_are_recorded(
    tokentill: Running, scenario: str, exception: type[Exception], status: int, code: str | None
) -> None:
    client = tokentill.client()
    with pytest.raises(exception) as caught:
        client.responses.create(
            model="gpt-4o", input="hi", user="erin", extra_headers={"x-fake-scenario": scenario}
        )
    assert caught.value.status_code == status  # type: ignore[attr-defined]
    rows = tokentill.rows("user_id = 'erin'")
    assert len(rows) == 1
    row = rows[0]
    assert row["response_id"] is None and row["event_id"].startswith("evt_")
    assert (row["status"], row["http_status"], row["error_code"]) == ("error", status, code)
    assert row["error_type"] == caught.value.body["type"]  # type: ignore[attr-defined]
    assert row["model"] == "gpt-4o"


def test_failed_and_incomplete_responses(tokentill: Running) -> None:
    client = tokentill.client()
    failed = client.responses.create(
        model="gpt-4o", input="hi", extra_headers={"x-fake-scenario": "failed"}
    )
    filtered = client.responses.create(
        model="gpt-4o", input="hi", extra_headers={"x-fake-scenario": "content_filter"}
    )
    short = client.responses.create(model="gpt-4o", input="hi", max_output_tokens=16)
    row = one_row(tokentill, failed.id)
    assert row["status"] == "failed" and row["error_code"] == "server_error"
    row = one_row(tokentill, filtered.id)
    assert (row["status"], row["incomplete_reason"]) == ("incomplete", "content_filter")
    row = one_row(tokentill, short.id)
    assert row["status"] == short.status
    assert row["output_tokens"] == short.usage.output_tokens  # type: ignore[union-attr]


def test_unreachable_upstream_is_a_502_in_openai_shape(
    make_tokentill: Callable[..., Running],
) -> None:
    tokentill = make_tokentill(upstream=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(openai.APIStatusError) as caught:
        tokentill.client().responses.create(model="gpt-4o", input="hi", user="frank")
    assert caught.value.status_code == 502
    body = caught.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "upstream_unreachable"
    row = tokentill.rows("user_id = 'frank'")[0]
    assert (row["status"], row["http_status"]) == ("error", 502)


def test_slow_upstream_is_a_504(make_tokentill: Callable[..., Running]) -> None:
    tokentill = make_tokentill(upstream_read_timeout=0.3)
    answer = httpx.post(
        tokentill.url + "/v1/responses",
        headers={
            "Authorization": "Bearer sk-test",
            "x-fake-scenario": "slow",
            "x-fake-delay-ms": "2000",
        },
        json={"model": "gpt-4o", "input": "hi", "user": "gina"},
        timeout=30,
    )
    assert answer.status_code == 504
    assert answer.json()["error"]["code"] == "upstream_timeout"
    row = tokentill.rows("user_id = 'gina'")[0]
    assert (row["status"], row["http_status"]) == ("error", 504)


def test_garbage_answer_is_a_502(tokentill: Running) -> None:
    answer = httpx.post(
        tokentill.url + "/v1/responses",
        headers={"Authorization": "Bearer sk-test", "x-fake-scenario": "garbage"},
        json={"model": "gpt-4o", "input": "hi", "user": "hank"},
        timeout=30,
    )
    assert answer.status_code == 502
    assert answer.json()["error"]["type"] == "upstream_error"
    assert tokentill.rows("user_id = 'hank'")[0]["status"] == "error"


def test_cut_stream_is_recorded_then_settled_from_upstream(tokentill: Running) -> None:
    client = tokentill.client()
    stream = client.responses.create(
        model="gpt-4o",
        input="hi",
        stream=True,
        user="ivan",
        extra_headers={"x-fake-scenario": "cut"},
    )
    seen: list[Any] = []
    with pytest.raises(openai.APIError):
        seen.extend(stream)
    assert seen and seen[0].type == "response.created"
    response_id = seen[0].response.id
    row = one_row(tokentill, response_id)
    # Never silently dropped: the row says the stream broke off...
    assert row["status"] in ("interrupted", "completed")
    # ...and tokentill asks the upstream how it really ended.
    tokentill.wait_for(lambda: one_row(tokentill, response_id)["status"] == "completed", 15)
    billed = {entry["id"]: entry for entry in ledger(tokentill.settings.upstream)}[response_id]
    assert one_row(tokentill, response_id)["output_tokens"] == billed["output_tokens"]


def test_client_disconnect_mid_stream_still_records_real_usage(tokentill: Running) -> None:
    body = json.dumps(
        {"model": "gpt-4o", "input": "tell me a story", "stream": True, "user": "judy"}
    ).encode()
    port = int(tokentill.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\n"
            b"x-fake-delay-ms: 30\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        first = sock.recv(4096)
        assert b"200" in first.split(b"\r\n", 1)[0]

    # The client is gone; tokentill keeps reading the upstream to learn the usage. (The
    # row is there from the stream's first event, pending, and then takes its outcome.)
    def ended() -> bool:
        found = tokentill.rows("user_id = 'judy'")
        return bool(found) and found[0]["status"] != "in_progress"

    tokentill.wait_for(ended, 15)
    [row] = tokentill.rows("user_id = 'judy'")
    assert row["client_disconnected"] is True
    assert row["status"] == "completed"
    billed = {entry["id"]: entry for entry in ledger(tokentill.settings.upstream)}
    assert row["output_tokens"] == billed[row["response_id"]]["output_tokens"]


def test_bad_input_gets_clear_errors_and_server_stays_healthy(
    make_tokentill: Callable[..., Running],
) -> None:
    tokentill = make_tokentill(max_request_bytes=8 * 1024 * 1024)
    auth = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
    # Malformed JSON: forwarded, the upstream's 400 comes back untouched, and recorded.
    bad_json = httpx.post(
        tokentill.url + "/v1/responses", headers=auth, content=b"{nope", timeout=30
    )
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["type"] == "invalid_request_error"
    # Bad metadata: 17 pairs.
    too_many = {f"k{i}": "v" for i in range(17)}
    with pytest.raises(openai.BadRequestError):
        tokentill.client().responses.create(
            model="gpt-4o", input="hi", metadata=too_many, user="kate"
        )
    # A 5 MB body is fine.
    big = tokentill.client().responses.create(model="gpt-4o", input="x" * (5 * 1024 * 1024))
    assert big.status == "completed"
    # Beyond the configured limit: 413 in OpenAI's shape, the upstream never called.
    huge = httpx.post(
        tokentill.url + "/v1/responses",
        headers=auth,
        content=b'{"model": "gpt-4o", "input": "' + b"x" * (9 * 1024 * 1024) + b'"}',
        timeout=30,
    )
    assert huge.status_code == 413
    assert huge.json()["error"]["code"] == "request_too_large"
    # An end-user header that is too long.
    long_user = httpx.post(
        tokentill.url + "/v1/responses",
        headers={**auth, "X-Tokentill-User": "u" * 300},
        json={"model": "gpt-4o", "input": "hi"},
        timeout=30,
    )
    assert long_user.status_code == 400
    assert long_user.json()["error"]["code"] == "invalid_tokentill_user"

    assert httpx.get(tokentill.url + "/healthz").status_code == 200
    statuses = sorted(row["http_status"] for row in tokentill.rows())
    assert statuses == [200, 400, 400, 400, 413]
    assert tokentill.rows("user_id = 'kate'")[0]["error_code"] is not None


def test_unmetered_paths_pass_through(tokentill: Running) -> None:
    models = tokentill.client().models.list()
    assert any(model.id.startswith("gpt") for model in models)
    missing = httpx.get(tokentill.url + "/v1/nowhere", headers={"Authorization": "Bearer sk-test"})
    assert missing.status_code == 404
    assert "error" in missing.json()
    assert tokentill.rows() == []


def test_exact_capture_under_concurrency(tokentill: Running) -> None:
    """A few hundred mixed requests, a hundred at once: every billed response lands once."""
    httpx.delete(tokentill.settings.upstream + "/_fake/ledger")
    client = tokentill.client(http_client=httpx.Client(limits=httpx.Limits(max_connections=200)))
    models = ["gpt-4o", "gpt-4o-mini", "o4-mini", "gpt-5", "gpt-4.1"]

    def call(i: int) -> str | None:
        kind = i % 4
        user = f"user-{i % 37}"
        meta = {"team": f"t{i % 5}", "n": str(i)}
        try:
            if kind == 0:
                return client.responses.create(
                    model=models[i % 5], input=f"q{i}", user=user, metadata=meta
                ).id
            if kind == 1:
                events = list(
                    client.responses.create(
                        model=models[i % 5], input=f"q{i}", user=user, metadata=meta, stream=True
                    )
                )
                return str(events[-1].response.id)  # type: ignore[union-attr]
            if kind == 2:
                return client.chat.completions.create(
                    model=models[i % 5], messages=[{"role": "user", "content": f"q{i}"}], user=user
                ).id
            chunks = list(
                client.chat.completions.create(
                    model=models[i % 5],
                    messages=[{"role": "user", "content": f"q{i}"}],
                    user=user,
                    stream=True,
                )
            )
            return chunks[0].id
        except openai.APIError:
            return None

    with ThreadPoolExecutor(max_workers=100) as pool:
        ids = list(pool.map(call, range(400)))
    assert None not in ids
    rows = tokentill.rows()
    assert len(rows) == 400
    assert len({row["event_id"] for row in rows}) == 400
    by_id = {row["response_id"]: row for row in rows}
    billed = ledger(tokentill.settings.upstream)
    assert {entry["id"] for entry in billed} == set(by_id) == set(ids)
    for entry in billed:
        row = by_id[entry["id"]]
        for column in USAGE_COLUMNS:
            assert row[column] == entry[column], (column, row, entry)
        assert row["model"] == entry["model"]
        assert row["status"] == entry["status"]


def test_metrics_and_health(tokentill: Running) -> None:
    tokentill.client().responses.create(model="gpt-4o", input="hi")
    tokentill.flush()
    text = httpx.get(tokentill.url + "/metrics").text
    for name in (
        'tokentill_proxy_requests_total{endpoint="responses",status="200"} 1.0',
        "tokentill_upstream_latency_seconds_bucket",
        "tokentill_journal_backlog_events 0.0",
        "tokentill_writer_lag_seconds",
        "tokentill_events_written 1.0",
    ):
        assert name in text, name
    assert httpx.get(tokentill.url + "/healthz").json()["status"] == "ok"


def test_uploads_stream_through_unmetered(tokentill: Running) -> None:
    """A file upload is streamed to the upstream whole, with no size cap of ours."""
    content = bytes(range(256)) * (300 * 1024 // 256 * 256)  # ~77 MB of bytes, all values
    uploaded = tokentill.client().files.create(file=("batch.jsonl", content), purpose="batch")
    assert uploaded.bytes == len(content)
    assert len(content) > tokentill.settings.max_request_bytes
    assert tokentill.rows() == []
