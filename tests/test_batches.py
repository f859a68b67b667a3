"""The Batch API through tokentill with the openai SDK: each request of a batch lands as
one row when the batch ends, at the batch tier, attributed to its line's end user."""

from __future__ import annotations

import io
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Running, ledger, put_user_quota, serve_tokentill


def _jsonl(lines: list[dict[str, Any]]) -> io.BytesIO:
    return io.BytesIO(b"".join(json.dumps(line).encode() + b"\n" for line in lines))


def test_every_request_of_a_batch_is_metered_once_at_the_batch_tier(tokentill: Running) -> None:
    client = tokentill.client()
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": f"question {i}"}],
                "user": f"batch-user-{i % 2}",
                "metadata": {"team": "batchers"},
            },
        }
        for i in range(3)
    ]
    uploaded = client.files.create(file=("requests.jsonl", _jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        # Over 1 KiB, so the fake gzips the Batch it answers (as OpenAI does): tokentill
        # must read it decoded.
        metadata={f"note-{i}": "x" * 400 for i in range(4)},
        extra_headers={"x-fake-background-delay-ms": "200"},
    )
    assert batch.status in ("validating", "in_progress")
    tokentill.wait_for(lambda: len(tokentill.rows("service_tier = 'batch'")) == 3, 20)
    rows = tokentill.rows("service_tier = 'batch'")
    billed = {
        e["id"]: e for e in ledger(tokentill.settings.upstream) if e["service_tier"] == "batch"
    }
    assert {r["response_id"] for r in rows} == set(billed)
    for row in rows:
        entry = billed[row["response_id"]]
        assert (row["input_tokens"], row["output_tokens"]) == (
            entry["input_tokens"],
            entry["output_tokens"],
        )
        assert row["endpoint"] == "chat.completions" and row["status"] == "completed"
        assert json.loads(row["metadata"]) == {"team": "batchers"}
    assert sorted(r["user_id"] for r in rows) == ["batch-user-0", "batch-user-0", "batch-user-1"]

    # Retrieved through tokentill after it ended: nothing lands twice.
    done = client.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.completed == 3
    tokentill.flush()
    assert len(tokentill.rows("service_tier = 'batch'")) == 3

    # Priced at the batch tier: half of gpt-4o-mini's default rates.
    assert httpx.post(tokentill.url + "/api/jobs/rollup/run", timeout=60).status_code == 200
    costs = httpx.get(
        tokentill.url + "/api/costs", params={"group_by": "service_tier", "bucket": "day"}
    ).json()
    batch_cost = sum(
        Decimal(r["cost_usd"]) for r in costs["rows"] if r["group"]["service_tier"] == "batch"
    )
    tokens_in = sum(r["input_tokens"] for r in rows)
    tokens_out = sum(r["output_tokens"] for r in rows)
    cached = sum(r["cached_input_tokens"] or 0 for r in rows)
    expected = (
        Decimal(tokens_in - cached) * Decimal("0.075")
        + Decimal(cached) * Decimal("0.075")
        + Decimal(tokens_out) * Decimal("0.3")
    ) / 10**6
    assert batch_cost == expected


def _chat_line(i: int, user: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"question {i}"}],
            "user": user,
            **body,
        },
    }


def _start_batch(client: openai.OpenAI, lines: list[dict[str, Any]]) -> Any:
    """A Chat Completions batch of `lines`, uploaded and created (done in 100 ms)."""
    uploaded = client.files.create(file=("requests.jsonl", _jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers={"x-fake-background-delay-ms": "100"},
    )


def test_a_line_the_endpoint_refuses_is_an_error_row_from_the_error_file(
    tokentill: Running,
) -> None:
    client = tokentill.client()
    lines = [_chat_line(0, "err-user"), _chat_line(1, "err-user", model=None)]
    batch = _start_batch(client, lines)
    tokentill.wait_for(lambda: len(tokentill.rows("service_tier = 'batch'")) == 2, 20)
    done = client.batches.retrieve(batch.id)
    assert done.output_file_id and done.error_file_id  # the refused line is in the error file
    rows = {r["status"]: r for r in tokentill.rows("service_tier = 'batch'")}
    assert rows.keys() == {"completed", "error"}
    refused = rows["error"]
    assert refused["event_id"] == f"{batch.id}:req-1" and refused["http_status"] == 400
    assert refused["user_id"] == "err-user" and refused["input_tokens"] is None


def test_a_batch_read_again_after_a_restart_lands_once(tmp_path: Path, fake_upstream: str) -> None:
    """A batch is read whenever a client asks about it through tokentill: after a restart
    (or, in a cluster, by another proxy) the same lines come again, and land once."""
    db = tmp_path / "w.duckdb"
    lines = [_chat_line(0, "again"), _chat_line(1, "again", model=None), _chat_line(2, "again")]
    with serve_tokentill(db, fake_upstream) as first:
        batch = _start_batch(first.client(), lines)
        first.wait_for(lambda: len(first.rows("service_tier = 'batch'")) == 3, 20)
        before = sorted((r["event_id"], r["status"]) for r in first.rows("service_tier = 'batch'"))
    with serve_tokentill(db, fake_upstream) as second:
        assert second.client().batches.retrieve(batch.id).status == "completed"

        def read_again() -> bool:
            text = httpx.get(second.url + "/metrics", timeout=10).text
            seen = [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("tokentill_events_captured_total{")
                and 'endpoint="chat.completions"' in line
            ]
            return sum(seen) >= 3  # the batch's lines journaled again

        second.wait_for(read_again, 20)
        after = sorted((r["event_id"], r["status"]) for r in second.rows("service_tier = 'batch'"))
    assert after == before
    assert {status for _, status in after} == {"completed", "error"}


def test_quotas_admit_a_batch_line_by_line_before_it_is_created(make_tokentill: Any) -> None:
    running: Running = make_tokentill(quotas_enabled=True)
    put_user_quota(running, "batch-capped", limit_requests=3, period="day")
    client = running.client()

    def create(lines: list[dict[str, Any]]) -> Any:
        uploaded = client.files.create(file=("r.jsonl", _jsonl(lines)), purpose="batch")
        return client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_headers={"x-fake-background-delay-ms": "400"},
        )

    # Four lines for a user allowed three requests a day: refused, nothing created.
    batches_before = [e for e in ledger(running.settings.upstream) if e["user"] == "batch-capped"]
    with pytest.raises(openai.RateLimitError) as refused:
        create([_chat_line(i, "batch-capped") for i in range(4)])
    assert refused.value.code == "user_quota_exceeded"
    (row,) = running.rows("user_id = 'batch-capped'")
    assert (row["http_status"], row["service_tier"]) == (429, "batch")

    # Two lines fit; while the batch runs they hold two of the three requests, so a third
    # line's batch and two direct requests cannot all pass.
    batch = create([_chat_line(i, "batch-capped") for i in range(2)])
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], user="batch-capped"
    )
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "y"}], user="batch-capped"
        )
    # When the batch ends its lines are settled by their rows: still three requests used.
    running.wait_for(
        lambda: len(running.rows("service_tier = 'batch' AND status = 'completed'")) == 2, 20
    )
    assert client.batches.retrieve(batch.id).status == "completed"
    quota = httpx.get(f"{running.url}/api/quotas/users/batch-capped", timeout=30).json()
    (limit,) = quota["limits"]
    assert Decimal(limit["used"]) == 3 and Decimal(limit["reserved"]) == 0
    billed = [e for e in ledger(running.settings.upstream) if e["user"] == "batch-capped"]
    assert len(billed) == len(batches_before) + 3  # the refused batch never ran
