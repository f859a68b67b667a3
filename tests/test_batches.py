"""The Batch API through tokentill with the openai SDK: each request of a batch lands as
one row when the batch ends, at the batch tier, attributed to its line's end user."""

from __future__ import annotations

import io
import json
from decimal import Decimal
from typing import Any

import httpx

from tests.conftest import Running, ledger


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
