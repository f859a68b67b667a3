"""Billing sinks end to end: a real tokentill (its own process, its DuckDB file) metering
traffic from the openai SDK, pushing it to a CloudEvents receiver (OpenMeter's shape) and
a Stripe stand-in, through a receiver outage and a SIGKILL of tokentill: each receiver
holds every billed response exactly once, with what the upstream billed, and its totals
equal the costs report."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import httpx
import polars as pl
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from tests.billing_receivers import CloudEventsReceiver, StripeReceiver
from tests.cluster import Instance, wait_for
from tests.conftest import ledger
from tests.servers import serve_in_thread
from tests.traffic import demo_traffic
from tokentill.billing_sinks import BillingSinkJob, SinkMetrics
from tokentill.billing_targets import (
    CloudEventsTarget,
    SinkUnavailableError,
    StripeTarget,
    meter_value,
    usage_data,
)
from tokentill.settings import BillingSink, Settings
from tokentill.warehouse.billing_usage import sink_records
from tokentill.warehouse.catalog import EPOCH, PriceRow
from tokentill.warehouse.db import open_warehouse
from tokentill.warehouse.lake import LakeConfig
from tokentill.warehouse.prices import CatalogCache, insert_rows

TOKEN = "om-token-0123456789"
STRIPE_KEY = "sk_test_tokentill"


@pytest.fixture
def receivers() -> Iterator[tuple[CloudEventsReceiver, str, StripeReceiver, str]]:
    events, stripe = CloudEventsReceiver(TOKEN), StripeReceiver(STRIPE_KEY)
    with serve_in_thread(events.app) as events_url, serve_in_thread(stripe.app) as stripe_url:
        yield events, events_url, stripe, stripe_url


def _sinks(events_url: str, stripe_url: str, **more: Any) -> str:
    return json.dumps(
        [
            {
                "name": "openmeter",
                "kind": "cloudevents",
                "url": events_url + "/api/v1/events",
                "secret": TOKEN,
                "subject": "tag:customer",
                "lag_alert": 1,
                **more,
            },
            {
                "name": "stripe-tokens",
                "kind": "stripe",
                "url": stripe_url,
                "secret": STRIPE_KEY,
                "subject": "user",
                "event_type": "llm_tokens",
                "value": "total_tokens",
                "customers": {"ana": "cus_ana", "user-001": "cus_heavy"},
                "lag_alert": 1,
                **more,
            },
        ]
    )


def billable(entry: dict[str, Any]) -> bool:
    """As the fake's bill has it (tokentill.fakeai.billing): an answer with usage."""
    return entry["input_tokens"] is not None


def test_both_sinks_deliver_the_demos_usage_once_through_an_outage_and_a_kill(
    fake_upstream: str,
    receivers: tuple[CloudEventsReceiver, str, StripeReceiver, str],
    proxies: list[Instance],
    tmp_path: Path,
) -> None:
    events, events_url, stripe, stripe_url = receivers
    # `since`: everything from the start (by default a sink starts at its first run).
    sinks = _sinks(events_url, stripe_url, since="2020-01-01T00:00:00Z")
    settings = {"billing_sinks": sinks, "billing_sink_interval": "0.3"}
    home = tmp_path / "one"
    running = Instance(None, fake_upstream, "one", home, "all", **settings)
    proxies.append(running)
    before = {entry["id"] for entry in ledger(fake_upstream)}

    def billed() -> dict[str, dict[str, Any]]:
        return {e["id"]: e for e in ledger(fake_upstream) if e["id"] not in before}

    def stripe_ids() -> set[str]:
        return {i.removeprefix("llm_tokens:") for i in stripe.events}

    def caught_up() -> bool:
        fresh = httpx.get(running.url + "/api/jobs/freshness", timeout=10).json()
        behind = {s["name"]: s["events_behind"] for s in fresh["billing_sinks"]}
        return behind == {"openmeter": 0, "stripe-tokens": 0}

    def all_delivered() -> bool:
        # Every response the upstream billed (a failed response with no usage is sent too,
        # at zero; a failed chat completion is an HTTP error: no response, nothing sent).
        return {i for i, e in billed().items() if billable(e)} <= stripe_ids() and caught_up()

    demo_traffic(running.url, 60, seed=1)
    wait_for(all_delivered, 90, "the first traffic delivered")
    assert events.events

    # The receivers go away: metering goes on, the sinks fall behind, say so, and raise an
    # alert past their lag_alert.
    events.down = stripe.down = True
    held = len(stripe.events), len(events.events)
    demo_traffic(running.url, 60, seed=2)

    def alerted() -> set[str]:
        found = httpx.get(
            running.url + "/api/alerts", params={"kind": "billing_sink"}, timeout=10
        ).json()
        return {a["evidence"]["sink"] for a in found}

    wait_for(lambda: alerted() == {"openmeter", "stripe-tokens"}, 30, "a lag alert per sink")
    metrics = httpx.get(running.url + "/metrics", timeout=10).text
    lag = {
        line.split('sink="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("tokentill_billing_sink_lag_seconds{")
    }
    assert set(lag) == {"openmeter", "stripe-tokens"} and min(lag.values()) > 1
    fresh = httpx.get(running.url + "/api/jobs/freshness", timeout=10).json()
    by_sink = {s["name"]: s for s in fresh["billing_sinks"]}
    assert by_sink["openmeter"]["events_behind"] > 0
    assert "503" in by_sink["openmeter"]["last_error"]
    assert by_sink["stripe-tokens"]["lag_seconds"] > 1
    page = httpx.get(running.url + "/", timeout=30, follow_redirects=True)  # its freshness
    assert page.status_code == 200 and 'data-sink="openmeter"' in page.text
    assert "answered 503" in page.text
    assert (len(stripe.events), len(events.events)) == held

    # They come back; tokentill is killed while the sinks catch up, and restarted.
    delivered = len(stripe.deliveries)
    events.down = stripe.down = False
    wait_for(lambda: len(stripe.deliveries) > delivered, 30, "delivery resumed")
    running.stop(signal.SIGKILL)
    running = Instance(None, fake_upstream, "one", home, "all", **settings)
    proxies.append(running)
    demo_traffic(running.url, 30, seed=3)
    wait_for(all_delivered, 120, "everything delivered after the outage and the kill")

    # Stripe holds every billed response once (each has an end user), as billed.
    wanted = billed()
    assert len(wanted) > 150 and stripe_ids() <= set(wanted)
    customers = json.loads(sinks)[1]["customers"]
    for identifier, meter_event in stripe.events.items():
        entry = wanted[identifier.removeprefix("llm_tokens:")]
        assert billable(entry) or (entry["endpoint"], entry["status"]) == (
            "/v1/responses",
            "failed",
        )
        assert meter_event["payload"] == {
            "stripe_customer_id": customers.get(entry["user"], entry["user"]),
            "value": str(entry["total_tokens"] or 0),
        }

    # Totals equal the costs report: money by customer, tokens by user.
    ran = httpx.post(running.url + "/api/jobs/rollup/run", timeout=60)
    assert ran.status_code == 200 and ran.json()["error"] is None, ran.text
    today = datetime.now(UTC).date()
    window = {"start": str(today - timedelta(days=1)), "end": str(today + timedelta(days=1))}
    by_customer = httpx.get(
        running.url + "/api/costs", params={**window, "group_by": ["tag:customer"]}, timeout=30
    ).json()
    report = {
        r["group"]["tag:customer"]: Decimal(r["priced_cost_usd"])
        for r in by_customer["rows"]
        if r["group"]["tag:customer"] is not None
    }
    pushed: dict[str, Decimal] = defaultdict(Decimal)
    for event in events.events.values():
        pushed[event["subject"]] += Decimal(event["data"]["cost_usd"] or 0)
    assert dict(pushed) == report and sum(report.values()) > 0
    by_user = httpx.get(
        running.url + "/api/costs", params={**window, "group_by": ["user"]}, timeout=30
    ).json()
    tokens = {r["group"]["user"]: r["total_tokens"] for r in by_user["rows"]}
    meters: dict[str, int] = defaultdict(int)
    for meter_event in stripe.events.values():
        customer = meter_event["payload"]["stripe_customer_id"]
        user = {v: k for k, v in customers.items()}.get(customer, customer)
        meters[user] += int(meter_event["payload"]["value"])
    assert {u: t for u, t in meters.items() if t} == {u: t for u, t in tokens.items() if t}

    # The CloudEvents receiver holds once every settled response with a customer tag, as
    # the warehouse holds it (read from its file once tokentill has stopped).
    running.stop()
    conn = duckdb.connect(str(home / "local.duckdb"), read_only=True)
    try:
        rows = conn.execute(
            """SELECT response_id, json_extract_string(metadata, '$.customer'), status,
                      input_tokens, cached_input_tokens, output_tokens, total_tokens
               FROM usage_events
               WHERE status IN ('completed', 'incomplete', 'failed', 'cancelled')
                 AND json_extract_string(metadata, '$.customer') IS NOT NULL"""
        ).fetchall()
    finally:
        conn.close()
    assert {key[1] for key in events.events} == {r[0] for r in rows}
    assert {r[0] for r in rows} <= set(wanted)
    for response_id, customer, status, *counts in rows:
        event = events.events[("tokentill", response_id)]
        data, entry = event["data"], wanted[response_id]
        assert (event["type"], event["subject"], data["status"]) == (
            "tokentill.usage",
            customer,
            status,
        )
        kinds = ("input_tokens", "cached_input_tokens", "output_tokens", "total_tokens")
        assert [data[k] for k in kinds] == [c or 0 for c in counts]
        assert [data[k] for k in kinds] == [entry[k] or 0 for k in kinds]
        if data["cost_usd"] is not None:
            charges = sum(Decimal(v) for v in data["charges_usd"].values())
            assert charges == Decimal(data["cost_usd"])


def test_a_refused_event_is_set_aside_and_a_refused_key_stops_the_sink(
    fake_upstream: str,
    receivers: tuple[CloudEventsReceiver, str, StripeReceiver, str],
    proxies: list[Instance],
    tmp_path: Path,
) -> None:
    """A receiver refusing one event (a 400 naming it) gets it set aside in sink_rejects
    with an alert, and the rest of its batch delivered; a receiver refusing the key (401)
    is the sink's fault, not the events': nothing is set aside, the sink waits, says why,
    and delivers everything once the key is right."""
    events, events_url, stripe, stripe_url = receivers
    events.refuse_subjects = {"poison"}
    stripe.key = "sk_test_rotated"  # the sink's key is no longer good
    sinks = _sinks(events_url, stripe_url, since="2020-01-01T00:00:00Z")
    settings = {"billing_sinks": sinks, "billing_sink_interval": "0.3"}
    running = Instance(None, fake_upstream, "one", tmp_path / "one", "all", **settings)
    proxies.append(running)
    client = running.client()
    ids = [
        client.responses.create(
            model="gpt-4o-mini", input="x", user="ana", metadata={"customer": customer}
        ).id
        for customer in ("acme", "poison", "acme", "globex")
    ]

    def sinks_now() -> dict[str, dict[str, Any]]:
        fresh = httpx.get(running.url + "/api/jobs/freshness", timeout=10).json()
        return {s["name"]: s for s in fresh["billing_sinks"]}

    def dealt_with(name: str) -> int:
        state = sinks_now().get(name, {})
        return int(state.get("delivered", 0)) + int(state.get("rejected", 0))

    wait_for(lambda: dealt_with("openmeter") == 4, 30, "openmeter dealt with all four")
    assert {key[1] for key in events.events} == {ids[0], ids[2], ids[3]}
    state = sinks_now()
    assert (state["openmeter"]["delivered"], state["openmeter"]["rejected"]) == (3, 1)
    alerts = httpx.get(
        running.url + "/api/alerts", params={"kind": "billing_sink"}, timeout=10
    ).json()
    refused = [a for a in alerts if a["rule"] == "rejected"]
    assert len(refused) == 1 and refused[0]["evidence"]["events"] == [ids[1]]
    assert "400" in refused[0]["message"]

    wait_for(
        lambda: "401" in (sinks_now().get("stripe-tokens", {}).get("last_error") or ""), 30, "401"
    )
    wait_for(lambda: sinks_now()["stripe-tokens"]["events_behind"] == 4, 30, "all four behind")
    state = sinks_now()["stripe-tokens"]
    assert (state["delivered"], state["rejected"]) == (0, 0)
    assert stripe.events == {}
    stripe.key = STRIPE_KEY  # the operator puts the key back
    wait_for(lambda: len(stripe.events) == 4, 60, "delivered once the key is right")
    assert sinks_now()["stripe-tokens"]["last_error"] is None


def test_records_choose_settled_responses_of_the_sinks_subjects_priced_to_the_pico(
    tmp_path: Path,
) -> None:
    conn = open_warehouse(tmp_path / "prices.duckdb")
    rates = {"input_per_mtok": "2.5", "cached_input_per_mtok": "1.25", "output_per_mtok": "10"}
    insert_rows(
        conn,
        [
            PriceRow(
                "gpt-4o", "default", EPOCH, None, {k: Decimal(v) for k, v in rates.items()}, "t"
            )
        ],
    )
    prices = CatalogCache().read(conn)
    conn.close()
    day = datetime(2026, 3, 10, 9, tzinfo=UTC)

    def event(
        i: int, status: str, user: str | None, customer: str | None, **more: Any
    ) -> dict[str, Any]:
        return {
            "ingest_seq": 1,
            "event_id": f"resp_{i}",
            "response_id": f"resp_{i}",
            "endpoint": "/v1/responses",
            "model": "gpt-4o",
            "service_tier": None,
            "status": status,
            "user_id": user,
            "metadata": json.dumps({"customer": customer}) if customer else None,
            "created_at": more.pop("created_at", day),
            "input_tokens": 1_000_000,
            "cached_input_tokens": 400_000,
            "cache_write_tokens": 0,
            "output_tokens": 1_000,
            "reasoning_tokens": 600,
            "total_tokens": 1_001_000,
            **more,
        }

    page = pl.DataFrame(
        [
            event(1, "completed", "ana", "acme"),
            event(2, "queued", "ana", "acme"),  # pending: sent when it settles
            event(3, "error", "ana", "acme", response_id=None),  # no response, nothing billed
            event(4, "incomplete", None, "globex"),  # no end user
            event(5, "failed", "bo", None, input_tokens=None, output_tokens=None),
            event(6, "completed", "cy", "acme", created_at=day - timedelta(days=40)),
        ],
        schema_overrides={"created_at": pl.Datetime("us", "UTC")},
        infer_schema_length=None,
    )
    by_user, passed = sink_records(page, prices, image_model="gpt-image-1", subject="user")
    assert by_user["event_id"].to_list() == ["resp_1", "resp_5", "resp_6"] and passed == 1
    by_customer, passed = sink_records(
        page,
        prices,
        image_model="gpt-image-1",
        subject="tag:customer",
        only=["acme"],
        since=day - timedelta(days=1),
    )
    assert by_customer["event_id"].to_list() == ["resp_1"] and passed == 3
    record = by_customer.to_dicts()[0]
    # 600k uncached at $2.50, 400k cached at $1.25, 1k output at $10 (reasoning within).
    assert record["cost_pico"] == 1_500_000_000_000 + 500_000_000_000 + 10_000_000_000
    data = usage_data(record)
    assert data["cost_usd"] == "2.01" and data["user"] == "ana" and not data["unpriced"]
    assert sum(Decimal(v) for v in data["charges_usd"].values()) == Decimal("2.01")
    assert (data["input_tokens"], data["cached_input_tokens"], data["reasoning_tokens"]) == (
        1_000_000,
        400_000,
        600,
    )
    assert meter_value(record, "cost_usd") == "2.01"
    assert meter_value(record, "uncached_input_tokens") == "600000"
    assert meter_value(record, "requests") == "1"
    failed = by_user.filter(pl.col("event_id") == "resp_5").to_dicts()[0]
    assert usage_data(failed)["input_tokens"] == 0 and usage_data(failed)["cost_usd"] == "0"


def test_a_lakes_active_worker_sends_what_every_proxy_metered(
    lake: LakeConfig,
    fake_upstream: str,
    receivers: tuple[CloudEventsReceiver, str, StripeReceiver, str],
    proxies: list[Instance],
    tmp_path: Path,
) -> None:
    """In a cluster the sinks run on the active worker, over the lake: what two proxies
    metered reaches the receiver once, and an api instance reports the sink's state."""
    events, events_url, stripe, stripe_url = receivers
    sinks = _sinks(events_url, stripe_url, since="2020-01-01T00:00:00Z")
    settings = {"billing_sinks": sinks, "billing_sink_interval": "0.3"}
    worker = Instance(lake, fake_upstream, "worker", tmp_path / "w", "worker", **settings)
    proxies.append(worker)
    meters = [Instance(lake, fake_upstream, f"proxy-{n}", tmp_path / f"p{n}") for n in (0, 1)]
    api = Instance(lake, fake_upstream, "api", tmp_path / "a", "api")
    proxies.extend([*meters, api])
    ids = {
        meters[i % 2]
        .client()
        .responses.create(
            model="gpt-4o-mini", input="x", user=f"u{i % 3}", metadata={"customer": f"c{i % 2}"}
        )
        .id
        for i in range(20)
    }
    wait_for(lambda: {key[1] for key in events.events} == ids, 60, "the lake's usage sent")
    wait_for(lambda: len(stripe.events) == 20, 30, "and to Stripe")
    assert set(events.deliveries.values()) == {1}

    def state() -> dict[str, Any]:
        fresh = httpx.get(api.url + "/api/jobs/freshness", timeout=30).json()
        return {s["name"]: (s["delivered"], s["events_behind"]) for s in fresh["billing_sinks"]}

    wait_for(lambda: state() == {"openmeter": (20, 0), "stripe-tokens": (20, 0)}, 30, "state")


@pytest.mark.parametrize(
    ("sinks", "said"),
    [
        ([{"name": "s", "kind": "stripe", "url": "https://api.stripe.com"}], "secret key"),
        ([{"name": "s", "kind": "cloudevents", "url": "ftp://x"}], "http:// or https://"),
        (
            [{"name": "s", "kind": "cloudevents", "url": "http://x", "subject": "tag:a.b"}],
            "subject",
        ),
        (
            [
                {"name": "s", "kind": "cloudevents", "url": "http://x"},
                {"name": "s", "kind": "cloudevents", "url": "http://y"},
            ],
            "names of their own",
        ),
        ([{"name": "s", "kind": "kafka", "url": "http://x"}], "kind"),
    ],
)
def test_a_bad_sink_is_refused_at_start_saying_why(sinks: list[Any], said: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(billing_sinks=sinks)
    assert said in str(refused.value)


def test_stripe_holding_an_identifier_counts_as_delivered_and_a_failure_keeps_the_prefix(
    receivers: tuple[CloudEventsReceiver, str, StripeReceiver, str],
) -> None:
    """A page sent again (after a crash) is delivered, not rejected, where Stripe already
    holds its events; a receiver failing part way reports what it took before."""
    _, _, stripe, stripe_url = receivers
    sink = BillingSink.model_validate(
        {"name": "s", "kind": "stripe", "url": stripe_url, "secret": STRIPE_KEY, "concurrency": 1}
    )
    target = StripeTarget(sink)
    at = datetime.now(UTC)
    records = [
        {"event_id": f"resp_{i}", "response_id": f"resp_{i}", "subject": "ana",
         "created_at": at, "total_tokens": 10 + i}
        for i in range(4)
    ]  # fmt: skip
    stop = threading.Event()
    try:
        assert target.deliver(records[:2], stop) == []
        assert target.deliver(records[:3], stop) == []  # two of them already held
        assert stripe.deliveries == {
            "tokentill.usage:resp_0": 2,
            "tokentill.usage:resp_1": 2,
            "tokentill.usage:resp_2": 1,
        }
        assert len(stripe.events) == 3
        more = [
            {**records[0], "event_id": f"resp_{i}", "response_id": f"resp_{i}"} for i in (4, 5, 6)
        ]
        stripe.fail_after = 1  # takes one more, then answers 503
        with pytest.raises(SinkUnavailableError) as failed:
            target.deliver(more, stop)
        assert (failed.value.accepted, failed.value.rejects) == (1, [])
        assert "tokentill.usage:resp_4" in stripe.events and len(stripe.events) == 4
    finally:
        target.close()


def test_a_failure_after_a_page_is_saved_never_moves_the_mark_back(
    tmp_path: Path, receivers: tuple[CloudEventsReceiver, str, StripeReceiver, str]
) -> None:
    """The alert for a refused event cannot be stored (the outbox times out): the page's
    mark stays saved, the error is said, and the next run sends nothing again."""
    events, events_url, _, _ = receivers
    events.refuse_subjects = {"poison"}
    db = tmp_path / "w.duckdb"
    conn = open_warehouse(db)
    now = datetime.now(UTC)
    for i, customer in enumerate(("acme", "poison", "globex")):
        conn.execute(
            """INSERT INTO usage_events (event_id, response_id, endpoint, model, status,
                   user_id, metadata, input_tokens, cached_input_tokens, output_tokens,
                   reasoning_tokens, total_tokens, created_at, request_started_at,
                   recorded_at, ingest_seq, updated_at)
               VALUES (?, ?, '/v1/responses', 'gpt-4o', 'completed', 'ana', ?, 100, 0, 10,
                       0, 110, ?, ?, ?, ?, ?)""",
            [f"resp_{i}", f"resp_{i}", json.dumps({"customer": customer}), now, now, now, 1, now],
        )
    conn.close()

    def alert(_: object) -> None:
        raise TimeoutError("the outbox did not answer")

    sink = BillingSink.model_validate(
        {"name": "om", "kind": "cloudevents", "url": events_url + "/api/v1/events",
         "secret": TOKEN, "subject": "tag:customer", "since": "2020-01-01T00:00:00Z"}
    )  # fmt: skip
    job = BillingSinkJob(
        sink,
        CloudEventsTarget(sink),
        lambda: open_warehouse(db),
        CatalogCache(),
        image_model="gpt-image-1",
        alert=alert,
        metrics=SinkMetrics(CollectorRegistry()),
        interval=0.01,
    )
    try:
        first = job.run()
        assert first is not None and (first.delivered, first.rejected) == (2, 1)
        time.sleep(0.05)
        again = job.run()
        assert again is not None and (again.delivered, again.rejected) == (0, 0)
    finally:
        job.close()
    assert set(events.deliveries.values()) == {1} and len(events.events) == 2
    conn = open_warehouse(db)
    try:
        rejects = conn.execute("SELECT event_id FROM sink_rejects").fetchall()
        marks = conn.execute("SELECT seq, after_event, delivered FROM sink_marks").fetchall()
    finally:
        conn.close()
    assert rejects == [("resp_1",)] and marks == [(1, "resp_2", 2)]
