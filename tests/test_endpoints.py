"""The other billable endpoints, metered like the rest: embeddings, the legacy
Completions API (plain and streamed) and moderations (free, still counted), each with
its own usage shape, priced from the catalog, reported by endpoint, under quotas."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Running, ledger, put_user_quota


def test_embeddings_completions_and_moderations_are_metered(tokentill: Running) -> None:
    client = tokentill.client()
    embedded = client.embeddings.create(
        model="text-embedding-3-small", input=["one text", "and another"], user="ep-user"
    )
    assert len(embedded.data) == 2 and embedded.usage.prompt_tokens > 0
    completed = client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hi", user="ep-user", max_tokens=40
    )
    assert completed.usage is not None
    streamed = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True, user="ep-user"
        )
    )
    # The client did not ask for usage: no usage chunk, no usage field.
    assert all(chunk.choices for chunk in streamed)
    assert not any("usage" in chunk.model_fields_set for chunk in streamed)
    moderated = client.moderations.create(model="omni-moderation-latest", input="hello")
    assert moderated.results and not moderated.results[0].flagged

    rows = {r["endpoint"]: r for r in tokentill.rows("endpoint <> 'responses'")}
    billed = {(e["endpoint"], e["id"]): e for e in ledger(tokentill.settings.upstream)}
    assert rows.keys() == {"embeddings", "completions", "moderations"}
    embedding = rows["embeddings"]
    assert embedding["input_tokens"] == embedded.usage.prompt_tokens
    assert embedding["output_tokens"] == 0 and embedding["user_id"] == "ep-user"
    assert embedding["event_id"].startswith("evt_")  # embeddings have no id of their own
    legacy = tokentill.rows("endpoint = 'completions'")
    assert [r["response_id"] for r in legacy] == [completed.id, streamed[0].id]
    for row in legacy:
        entry = billed["/v1/completions", row["response_id"]]
        assert (row["input_tokens"], row["output_tokens"]) == (
            entry["input_tokens"],
            entry["output_tokens"],
        )
    assert legacy[1]["streamed"] is True and legacy[1]["status"] in ("completed", "incomplete")
    assert rows["moderations"]["response_id"] == moderated.id

    tokentill.flush()
    assert httpx.post(tokentill.url + "/api/jobs/rollup/run", timeout=60).status_code == 200
    costs = httpx.get(
        tokentill.url + "/api/costs", params={"group_by": "endpoint", "bucket": "day"}
    ).json()
    by_endpoint: dict[str, Any] = {}
    for row in costs["rows"]:
        by_endpoint[row["group"]["endpoint"]] = row
    # Embeddings: priced at the catalog's input rate ($0.02 per 1M for this model).
    tokens = embedded.usage.prompt_tokens
    assert (
        Decimal(by_endpoint["embeddings"]["cost_usd"]) == Decimal(tokens) * Decimal("0.02") / 10**6
    )
    assert by_endpoint["embeddings"]["unpriced"] == 0
    assert Decimal(by_endpoint["completions"]["cost_usd"]) > 0
    # Moderations are free: zero, not unpriced.
    assert Decimal(by_endpoint["moderations"]["cost_usd"]) == 0
    assert by_endpoint["moderations"]["unpriced"] == 0


def test_quotas_apply_to_every_metered_endpoint(make_tokentill: Any) -> None:
    running: Running = make_tokentill(quotas_enabled=True)
    put_user_quota(running, "ep-capped", limit_requests=2, period="day")
    client = running.client()
    client.embeddings.create(model="text-embedding-3-small", input="x", user="ep-capped")
    client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", user="ep-capped")
    before = len(ledger(running.settings.upstream))
    with pytest.raises(openai.RateLimitError) as refused:
        client.embeddings.create(model="text-embedding-3-small", input="x", user="ep-capped")
    assert refused.value.code == "user_quota_exceeded"
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x", user="ep-capped")
    assert len(ledger(running.settings.upstream)) == before  # never reached the upstream
