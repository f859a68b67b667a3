"""Abuse monitoring: planted history in a real DuckDB file (through the real journal and
writer), a content-filter storm through the proxy, the job run by the server, flags read
back from /api/alerts; and the pure scoring on tiny frames."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import polars as pl
import pytest

from tests.conftest import Running, ledger
from tokentill.ingest.journal import Journal
from tokentill.warehouse.abuse import AbuseConfig, features, flags, with_window
from tokentill.warehouse.db import open_warehouse
from tokentill.warehouse.duckdb_file import DuckDBEvents
from tokentill.warehouse.events import UsageEvent
from tokentill.warehouse.writer import Writer

NOW = datetime.now(UTC)


def planted(user: str, at: datetime, i: int, **fields: Any) -> UsageEvent:
    us = int(at.timestamp() * 1_000_000)
    values: dict[str, Any] = {
        "kind": "create",
        "event_id": f"resp_{user}_{i}",
        "response_id": f"resp_{user}_{i}",
        "endpoint": "responses",
        "status": "completed",
        "created_at_us": us,
        "request_started_at_us": us,
        "recorded_at_us": us,
        "model": "gpt-4o-mini-2024-07-18",
        "user_id": user,
        "input_tokens": 800,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "output_tokens": 200,
        "total_tokens": 1000,
        "key_fingerprint": "sha256:0000000000000000",
    }
    values.update(fields)
    return UsageEvent(**values)


def plant(db: Path, events: list[UsageEvent]) -> None:
    conn = open_warehouse(db)
    journal = Journal(db.with_name(db.name + ".journal"), segment_bytes=1 << 22, fsync_interval=1)
    journal.lock()
    writer = Writer(DuckDBEvents(conn), journal, batch_max=10_000, flush_interval=0.01)
    writer.recover()
    journal.start(writer.submit)
    writer.start()
    for event in events:
        journal.append(event)
    assert writer.flush(30)
    assert writer.stop()
    journal.close()
    conn.close()


def history(rng: random.Random, users: list[str]) -> list[UsageEvent]:
    """Three days of steady hourly use (5 requests of about 1,000 tokens an hour), the
    last of them in the scored hour."""
    events = []
    for user in users:
        for hour in range(72):
            for n in range(5):
                at = NOW - timedelta(hours=hour, minutes=10 + 9 * n)
                out = rng.randint(180, 220)
                events.append(
                    planted(user, at, hour * 10 + n, output_tokens=out, total_tokens=800 + out)
                )
    return events


def test_the_job_flags_a_spike_and_a_content_filter_storm_not_steady_users(
    tmp_path: Path, make_tokentill: Callable[..., Running]
) -> None:
    rng = random.Random(3)
    steady = [f"steady-{i}" for i in range(20)]
    db = tmp_path / "abuse.duckdb"
    events = history(rng, [*steady, "spiky", "filtered"])
    # The spike: this hour, the same number of requests, fifty times the tokens.
    # This hour, "spiky" and "filtered" do what follows instead of their usual.
    events = [
        e
        for e in events
        if not (e.user_id in ("spiky", "filtered") and e.created_at_us > _hour_ago())
    ]
    for n in range(5):
        at = NOW - timedelta(minutes=10 + 9 * n)
        events.append(
            planted("spiky", at, 9000 + n, input_tokens=40_000, output_tokens=10_000,
                    total_tokens=50_000)
        )  # fmt: skip
    plant(db, events)

    running = make_tokentill(db=db, abuse_interval=3600)
    client = running.client()
    for i in range(25):
        scenario = "content_filter" if i < 15 else "completed"
        client.responses.create(
            model="gpt-4o-mini", input="hi", user="filtered",
            extra_headers={"x-fake-scenario": scenario},
        )  # fmt: skip
    running.flush()

    ran = httpx.post(running.url + "/api/jobs/abuse/run", timeout=60)
    assert ran.status_code == 200, ran.text
    assert ran.json()["flags"] >= 2

    def abuse_alerts() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = httpx.get(
            running.url + "/api/alerts", params={"kind": "abuse"}
        ).json()
        return found

    running.wait_for(lambda: len(abuse_alerts()) >= 2)
    found = abuse_alerts()
    by_user: dict[str, set[str]] = {}
    for alert in found:
        by_user.setdefault(alert["user_id"], set()).add(alert["rule"])
    assert {"token_spike", "spend_spike"} <= by_user["spiky"]
    assert "content_filter_rate" in by_user["filtered"]
    assert not set(by_user) & set(steady), by_user
    spike = next(a for a in found if a["rule"] == "token_spike")
    assert spike["severity"] == "critical"
    assert spike["evidence"]["tokens"] == 250_000 and spike["evidence"]["z"] > 10
    assert spike["evidence"]["window_seconds"] == 3600
    storm = next(a for a in found if a["rule"] == "content_filter_rate")
    assert storm["evidence"]["content_filtered"] == 15 and storm["evidence"]["requests"] == 25
    assert storm["severity"] == "critical"  # 60% of its responses

    # A second run in the same window raises nothing new.
    httpx.post(running.url + "/api/jobs/abuse/run", timeout=60)
    assert len(abuse_alerts()) == len(found)
    runs = httpx.get(running.url + "/api/jobs").json()
    assert any(r["job"] == "abuse" and r["error"] is None for r in runs)


def _hour_ago() -> int:
    return int((NOW - timedelta(hours=1)).timestamp() * 1_000_000)


def frame(rows: list[dict[str, Any]]) -> pl.LazyFrame:
    base = {
        "status": "completed",
        "incomplete_reason": None,
        "key_fingerprint": "k",
        "metadata": None,
        "total_tokens": 100,
        "output_tokens": 50,
        "cost_pico": 1000,
    }
    return pl.DataFrame(
        [{**base, **row} for row in rows],
        schema_overrides={"created_at": pl.Datetime("us", "UTC")},
        infer_schema_length=None,
    ).lazy()


def test_pure_rules_on_tiny_frames() -> None:
    config = AbuseConfig(min_population=1)
    now = datetime(2026, 5, 1, 12, tzinfo=UTC)
    # History: one request an hour; this hour: twelve keys, all failed, one a second.
    rows: list[dict[str, Any]] = [
        {"user_id": "a", "created_at": now - timedelta(hours=hour, minutes=5)}
        for hour in range(1, 6)
    ]
    rows.extend(
        {
            "user_id": "a",
            "created_at": now - timedelta(minutes=30, seconds=i),
            "status": "failed",
            "key_fingerprint": f"k{i}",
            "metadata": f'{{"n": {i}}}',
        }
        for i in range(12)
    )
    found = flags(frame(rows).pipe(with_window, now, config).pipe(features), config)
    rules = dict(zip(found["rule"], found["severity"], strict=True))
    assert rules["error_rate"] == "critical"
    assert rules["many_api_keys"] == "critical"
    assert rules["token_spike"] in ("warning", "critical")
    assert "content_filter_rate" not in rules and "metadata_churn" not in rules


def test_a_critical_flag_blocks_the_user_for_a_while_when_configured(
    make_tokentill: Callable[..., Running], fake_upstream: str
) -> None:
    running = make_tokentill(abuse_block_seconds=600, abuse_interval=3600)
    client = running.client()
    for i in range(12):
        scenario = "content_filter" if i < 8 else "completed"
        client.responses.create(
            model="gpt-4o-mini", input="hi", user="stormy",
            extra_headers={"x-fake-scenario": scenario},
        )  # fmt: skip
    running.flush()
    assert httpx.post(running.url + "/api/jobs/abuse/run", timeout=60).json()["flags"] >= 1

    def blocked() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = httpx.get(running.url + "/api/quotas/blocks").json()
        return found

    running.wait_for(lambda: [b["user_id"] for b in blocked()] == ["stormy"])
    billed = len(ledger(fake_upstream))
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.responses.create(model="gpt-4o-mini", input="hi", user="stormy")
    error = refused.value.response.json()["error"]
    assert error["code"] == "user_temporarily_blocked" and error["param"] is None
    assert 0 < int(refused.value.response.headers["retry-after"]) <= 600
    assert len(ledger(fake_upstream)) == billed
    client.responses.create(model="gpt-4o-mini", input="hi", user="calm")  # others pass

    assert httpx.delete(running.url + "/api/quotas/blocks/stormy").status_code == 204
    client.responses.create(model="gpt-4o-mini", input="hi", user="stormy")
    assert httpx.delete(running.url + "/api/quotas/blocks/stormy").status_code == 404


def test_new_users_are_flagged_from_their_first_hour(
    tmp_path: Path, make_tokentill: Callable[..., Running]
) -> None:
    rng = random.Random(11)
    steady = [f"old-{i}" for i in range(12)]
    events = history(rng, steady)  # about 5,000 tokens an hour each
    at = NOW - timedelta(minutes=20)
    # First hours, no history: a 28x spike, a burst, a content-filter storm, and three
    # new users who use it as everybody does.
    for n in range(5):
        events.append(
            planted("new-spike", at - timedelta(minutes=n), n, input_tokens=22_000,
                    output_tokens=6_000, total_tokens=28_000)
        )  # fmt: skip
    minute = at.replace(second=0, microsecond=0)  # the burst within one clock minute
    for n in range(45):
        events.append(planted("new-burst", minute + timedelta(seconds=n), n, total_tokens=100))
    for n in range(20):
        storm: dict[str, Any] = {"status": "incomplete", "incomplete_reason": "content_filter"}
        events.append(
            planted("new-filter", at - timedelta(minutes=n), n, **(storm if n < 8 else {}))
        )
    for i in range(3):
        for n in range(5):
            out = rng.randint(150, 400)
            events.append(
                planted(f"new-steady-{i}", at - timedelta(minutes=7 * n), n,
                        output_tokens=out, total_tokens=900 + out)
            )  # fmt: skip
    db = tmp_path / "first-hour.duckdb"
    plant(db, events)
    running = make_tokentill(db=db, abuse_interval=3600)

    ran = httpx.post(running.url + "/api/jobs/abuse/run", timeout=60)
    assert ran.status_code == 200, ran.text
    result = ran.json()
    assert result["error"] is None and result["repeats"] == 0
    assert result["new"] == result["flags"] > 0
    # Answered after they were stored: read at once, no waiting.
    found: list[dict[str, Any]] = httpx.get(
        running.url + "/api/alerts", params={"kind": "abuse", "limit": 500}
    ).json()
    assert len(found) == result["new"]
    by_user: dict[str, set[str]] = {}
    for alert in found:
        by_user.setdefault(alert["user_id"], set()).add(alert["rule"])
    assert {"new_user_spike", "new_user_spend_spike"} <= by_user["new-spike"]
    assert "request_burst" in by_user["new-burst"]
    assert "content_filter_rate" in by_user["new-filter"]
    assert set(by_user) == {"new-spike", "new-burst", "new-filter"}, by_user
    spike = next(a for a in found if a["rule"] == "new_user_spike")
    assert spike["evidence"]["tokens"] == 140_000 and spike["severity"] == "critical"
    assert spike["evidence"]["active_users"] == 18
    assert "no history" in spike["message"]

    # Run again in the same window: the same flags, all repeats, nothing stored twice.
    again = httpx.post(running.url + "/api/jobs/abuse/run", timeout=60).json()
    assert (again["new"], again["repeats"]) == (0, result["flags"])
    assert len(httpx.get(running.url + "/api/alerts", params={"kind": "abuse"}).json()) == len(
        found
    )
