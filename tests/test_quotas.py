"""Quotas end to end: the admin API, the official SDK through tokentill to the fake
upstream, 429s in OpenAI's shape, live counters, restarts, alerts and their webhook."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import Running, ledger
from tests.servers import serve_in_thread
from tokentill.app import create_app
from tokentill.settings import Settings
from tokentill.warehouse import pricing
from tokentill.warehouse.prices import insert_rows, parse_price_entries, price_table
from tokentill.warehouse.quota_book import user_subject

QUOTA_ERROR_KEYS = {"message", "type", "param", "code"}


def api(running: Running, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, running.url + "/api" + path, timeout=30, **kwargs)


def warehouse_cost(running: Running, user: str) -> int:
    """What the rollup pipeline says the user's successful responses cost (pico-dollars)."""
    running.flush()
    with duckdb.connect(str(running.db)) as conn:
        events = conn.sql(
            f"""SELECT model, service_tier, created_at, {", ".join(pricing.PRICED_FIELDS)}
                FROM usage_events WHERE user_id = ? AND status <> 'error'""",
            params=[user],
        ).pl()
        prices = price_table(conn)
    if events.height == 0:
        return 0
    events = events.with_columns(events["created_at"].dt.convert_time_zone("UTC"))
    models = pricing.model_map(events["model"].to_list(), prices["model"].unique().to_list())
    priced = pricing.price_events(
        events.lazy(), models.lazy(), pricing.effective_intervals(prices).lazy(), "gpt-image-1"
    ).collect()
    return int(priced["cost_pico"].sum())


def total_spent(running: Running, user: str, before: int) -> str:
    return f"${Decimal(warehouse_cost(running, user) - before) / 10**12} after the warm-up"


def pico(value: str) -> int:
    return int(Decimal(value) * 10**12)


def test_quota_api_put_get_delete_and_list(tokentill: Running) -> None:
    assert api(tokentill, "GET", "/quotas/users/alice").status_code == 404
    put = api(tokentill, "PUT", "/quotas/users/alice", json={"limit_usd": "5.00", "period": "day"})
    assert put.status_code == 200, put.text
    body = put.json()
    assert body["subject"] == "user:alice" and body["source"] == "own"
    (limit,) = body["limits"]
    assert (limit["unit"], limit["period"], limit["mode"]) == ("usd", "day", "hard")
    assert Decimal(limit["limit"]) == Decimal("5") and Decimal(limit["remaining"]) == 5
    assert limit["resets_at"] is not None

    several = {
        "limits": [
            {"limit_tokens": 1000, "period": "minute"},
            {"limit_requests": 10, "period": "total", "mode": "soft"},
        ]
    }
    assert api(tokentill, "PUT", "/quotas/users/bob", json=several).status_code == 200
    assert api(tokentill, "PUT", "/quotas/default", json={"limit_usd": "1", "period": "month"})
    tag = api(
        tokentill, "PUT", "/quotas/tags/customer/acme", json={"limit_usd": "9", "period": "total"}
    )
    assert tag.status_code == 200 and tag.json()["limits"][0]["resets_at"] is None

    # A user with no quota of their own is shown the default.
    carol = api(tokentill, "GET", "/quotas/users/carol").json()
    assert carol["source"] == "default" and carol["limits"][0]["period"] == "month"

    listed = api(tokentill, "GET", "/quotas").json()
    assert [q["subject"] for q in listed] == [
        "default",
        "tag:customer=acme",
        "user:alice",
        "user:bob",
    ]
    assert api(tokentill, "DELETE", "/quotas/users/alice").status_code == 204
    assert api(tokentill, "DELETE", "/quotas/users/alice").status_code == 404
    assert api(tokentill, "GET", "/quotas/users/alice").json()["source"] == "default"

    # Bad input: clear 4xx, never a 500.
    for bad in (
        {"limit_usd": "5", "limit_tokens": 5, "period": "day"},
        {"limit_usd": "-1", "period": "day"},
        {"limit_usd": "5", "period": "week"},
        {"limit_usd": "0.0000000000001", "period": "day"},
        {"limits": [{"limit_usd": "1", "period": "day"}, {"limit_usd": "2", "period": "day"}]},
        {"period": "day"},
    ):
        assert api(tokentill, "PUT", "/quotas/users/x", json=bad).status_code == 422, bad
    wrong_key = api(
        tokentill, "PUT", "/quotas/tags/colour/red", json={"limit_usd": "1", "period": "day"}
    )
    assert wrong_key.status_code == 400 and "TOKENTILL_QUOTA_TAG_KEYS" in wrong_key.json()["detail"]


def test_hard_usd_limit_answers_429_in_openais_shape_and_records_it(
    tokentill: Running, fake_upstream: str
) -> None:
    client = tokentill.client()
    first = client.responses.create(model="gpt-4o", input="hi", user="dave", max_output_tokens=64)
    assert first.usage is not None
    spent = warehouse_cost(tokentill, "dave")
    # What is left cannot hold the next request's worst case.
    limit = Decimal(spent + 10) / 10**12
    assert api(
        tokentill, "PUT", "/quotas/users/dave", json={"limit_usd": str(limit), "period": "day"}
    )
    billed = len(ledger(fake_upstream))
    with pytest.raises(openai.RateLimitError) as refused:
        client.responses.create(model="gpt-4o", input="hi", user="dave", max_output_tokens=64)
    answer = refused.value.response
    assert answer.status_code == 429
    error = answer.json()["error"]
    assert set(error) == QUOTA_ERROR_KEYS
    assert error["type"] == "insufficient_quota"
    assert error["code"] == "user_quota_exceeded"
    assert error["param"] is None
    assert "dave" in error["message"] and "per day" in error["message"]
    assert int(answer.headers["retry-after"]) >= 1
    assert answer.headers["x-tokentill-quota-reset"].endswith("+00:00")
    assert len(ledger(fake_upstream)) == billed  # the upstream was not called

    (row,) = tokentill.rows("user_id = 'dave' AND status = 'error'")
    assert (row["http_status"], row["error_type"], row["error_code"]) == (
        429,
        "insufficient_quota",
        "user_quota_exceeded",
    )
    # Other users are not affected.
    client.responses.create(model="gpt-4o", input="hi", user="erin", max_output_tokens=64)


def test_spend_counts_at_once_at_the_warehouses_price(tokentill: Running) -> None:
    api(tokentill, "PUT", "/quotas/users/fay", json={"limit_usd": "100", "period": "month"})
    client = tokentill.client()
    client.responses.create(model="gpt-5-mini", input="one", user="fay")
    list(client.responses.create(model="o4-mini", input="two", user="fay", stream=True))
    client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "three"}], user="fay"
    )
    # No waiting: the response was counted before the client got its last byte.
    (limit,) = api(tokentill, "GET", "/quotas/users/fay").json()["limits"]
    assert pico(limit["used"]) == warehouse_cost(tokentill, "fay") > 0
    assert pico(limit["reserved"]) == 0
    assert Decimal(limit["burn_rate_per_hour"]) > 0
    assert limit["projected_limit_at"] is None or limit["projected_limit_at"] <= limit["resets_at"]


@pytest.mark.parametrize(
    ("unit", "period", "amount"),
    [
        ("requests", "minute", 2),
        ("requests", "day", 3),
        ("requests", "month", 1),
        ("requests", "total", 2),
        ("tokens", "minute", 500),
        ("tokens", "day", 500),
        ("tokens", "month", 500),
        ("tokens", "total", 500),
        ("usd", "minute", "0.002"),
        ("usd", "day", "0.002"),
        ("usd", "month", "0.002"),
        ("usd", "total", "0.002"),
    ],
)
def test_hard_limits_by_unit_and_period(
    tokentill: Running, unit: str, period: str, amount: int | str
) -> None:
    client = tokentill.client()
    for attempt in range(3):  # a window that rolls over mid-test (a minute) is run again
        who = f"{unit}-{period}-{attempt}"
        body = {f"limit_{unit}": amount, "period": period}
        assert api(tokentill, "PUT", f"/quotas/users/{who}", json=body).status_code == 200
        window_before = api(tokentill, "GET", f"/quotas/users/{who}").json()["limits"][0]
        served = 0
        refused: openai.RateLimitError | None = None
        for _ in range(40):
            try:
                client.responses.create(model="gpt-4o", input="hi", user=who, max_output_tokens=16)
                served += 1
            except openai.RateLimitError as exc:
                refused = exc
                break
        state = api(tokentill, "GET", f"/quotas/users/{who}").json()["limits"][0]
        if window_before["window_start"] != state["window_start"]:
            continue
        assert refused is not None and served >= 1
        if unit == "requests":
            assert served == amount
        assert Decimal(state["used"]) <= Decimal(str(amount))
        assert Decimal(state["reserved"]) == 0
        assert refused.response.json()["error"]["code"] == "user_quota_exceeded"
        has_reset = "retry-after" in refused.response.headers
        assert has_reset == (period != "total")
        return
    pytest.fail("the window rolled over on every attempt")


@pytest.mark.parametrize("period", ["minute", "day", "month", "total"])
@pytest.mark.parametrize(("unit", "amount"), [("requests", 2), ("tokens", 60), ("usd", "0.00002")])
def test_soft_limits_by_unit_and_period_never_refuse(
    tokentill: Running, unit: str, amount: int | str, period: str
) -> None:
    who = f"soft-{unit}-{period}"
    body = {f"limit_{unit}": amount, "period": period, "mode": "soft"}
    assert api(tokentill, "PUT", f"/quotas/users/{who}", json=body).status_code == 200
    client = tokentill.client()
    # Well past the limit whatever the fake's usage draws (4 small ones once summed to 54
    # tokens of a 60-token limit): never refused.
    for _ in range(8):
        client.responses.create(model="gpt-4o-mini", input="hi", user=who, max_output_tokens=16)
    (state,) = api(tokentill, "GET", f"/quotas/users/{who}").json()["limits"]
    assert state["mode"] == "soft"
    if period != "minute":  # (a minute may have rolled over since)
        assert Decimal(state["percent_used"]) >= 100

    def full() -> bool:
        found = api(tokentill, "GET", "/alerts", params={"user_id": who}).json()
        return any(a["rule"] == f"{unit}/{period} 100%" for a in found)

    tokentill.wait_for(full)


def test_soft_limit_never_blocks_and_alerts_once_per_threshold(tokentill: Running) -> None:
    api(
        tokentill,
        "PUT",
        "/quotas/users/gil",
        json={"limit_requests": 4, "period": "day", "mode": "soft"},
    )
    client = tokentill.client()
    for _ in range(7):
        client.responses.create(model="gpt-4o-mini", input="hi", user="gil")

    def alerts() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = api(
            tokentill, "GET", "/alerts", params={"user_id": "gil"}
        ).json()
        return found

    tokentill.wait_for(lambda: len(alerts()) == 3)
    found = alerts()
    assert sorted(a["rule"] for a in found) == [
        "requests/day 100%",
        "requests/day 50%",
        "requests/day 80%",
    ]
    assert {a["kind"] for a in found} == {"quota_threshold"}
    assert {a["evidence"]["mode"] for a in found} == {"soft"}
    (limit,) = api(tokentill, "GET", "/quotas/users/gil").json()["limits"]
    assert Decimal(limit["used"]) == 7 and Decimal(limit["percent_used"]) == 175


def test_a_hundred_concurrent_requests_stay_within_a_nearly_spent_budget(
    tokentill: Running,
) -> None:
    """The issue's case: a user with about a cent left fires 100 requests at once."""
    user = "hasty"
    client = tokentill.client()
    client.responses.create(model="gpt-5", input="warm up", user=user, max_output_tokens=256)
    spent = warehouse_cost(tokentill, user)
    limit = spent + pico("0.01")  # $0.01 left
    body = {"limit_usd": str(Decimal(limit) / 10**12), "period": "day"}
    assert api(tokentill, "PUT", f"/quotas/users/{user}", json=body).status_code == 200

    async def fire() -> list[bool]:
        async with openai.AsyncOpenAI(
            base_url=tokentill.url + "/v1", api_key="sk-test", max_retries=0
        ) as aclient:

            async def one(i: int) -> bool:
                try:
                    await aclient.responses.create(
                        model="gpt-5", input=f"question {i}", user=user, max_output_tokens=256
                    )
                except openai.RateLimitError:
                    return False
                return True

            return await asyncio.gather(*(one(i) for i in range(100)))

    served = asyncio.run(fire())
    print(f"served {sum(served)} of 100; spent {total_spent(tokentill, user, spent)}")
    assert 0 < sum(served) < 100
    total = warehouse_cost(tokentill, user)
    assert total <= limit  # bound 0: every request stated its output bound
    (state,) = api(tokentill, "GET", f"/quotas/users/{user}").json()["limits"]
    assert pico(state["used"]) == total and pico(state["reserved"]) == 0
    refused = tokentill.rows("user_id = ? AND http_status = 429", [user])
    assert len(refused) == 100 - sum(served)


def test_tag_quota_is_shared_by_everyone_carrying_the_tag(tokentill: Running) -> None:
    api(tokentill, "PUT", "/quotas/tags/customer/acme", json={"limit_requests": 2, "period": "day"})
    client = tokentill.client()
    for user in ("t1", "t2"):
        client.responses.create(
            model="gpt-4o-mini", input="hi", user=user, metadata={"customer": "acme"}
        )
    with pytest.raises(openai.RateLimitError) as refused:
        client.responses.create(
            model="gpt-4o-mini", input="hi", user="t3", metadata={"customer": "acme"}
        )
    assert refused.value.response.json()["error"]["code"] == "tag_quota_exceeded"
    client.responses.create(
        model="gpt-4o-mini", input="hi", user="t3", metadata={"customer": "other"}
    )


def test_restart_keeps_limits_counters_and_fired_alerts(tmp_path: Path, fake_upstream: str) -> None:
    settings = Settings(
        db=tmp_path / "q.duckdb", upstream=fake_upstream, writer_flush_interval=0.05
    )

    def serve() -> Any:
        return serve_in_thread(create_app(settings))

    with serve() as url:
        put = httpx.put(
            url + "/api/quotas/users/ivy",
            json={
                "limits": [
                    {"limit_requests": 3, "period": "day"},
                    {"limit_usd": "50", "period": "total"},
                ]
            },
        )
        assert put.status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
        for _ in range(3):
            client.responses.create(model="gpt-4o", input="hi", user="ivy")
        before = httpx.get(url + "/api/quotas/users/ivy").json()["limits"]

        def alerts() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = httpx.get(
                url + "/api/alerts", params={"user_id": "ivy"}
            ).json()
            return found

        deadline = time.monotonic() + 10
        while len(alerts()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(alerts()) == 3
    with serve() as url:
        after = httpx.get(url + "/api/quotas/users/ivy").json()["limits"]
        assert [(x["unit"], x["used"]) for x in after] == [(x["unit"], x["used"]) for x in before]
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.responses.create(model="gpt-4o", input="hi", user="ivy")
        time.sleep(0.3)  # give the outbox a moment: no duplicate alert may appear
        alerts_after = httpx.get(url + "/api/alerts", params={"user_id": "ivy"}).json()
        assert len(alerts_after) == 3


class Receiver:
    """A local webhook receiver that fails its first `failures` deliveries."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: list[tuple[dict[str, str], bytes]] = []

        async def hook(request: Request) -> JSONResponse:
            self.attempts.append((dict(request.headers), await request.body()))
            if len(self.attempts) <= self.failures:
                return JSONResponse({"ok": False}, status_code=503)
            return JSONResponse({"ok": True})

        self.app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    found = Receiver(failures=2)
    with serve_in_thread(found.app) as url:
        yield found, url + "/hook"


def test_alerts_reach_a_webhook_signed_with_retries(
    make_tokentill: Callable[..., Running], receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    secret = "whsec-test-secret"
    running = make_tokentill(
        alert_webhook_url=url, alert_webhook_secret=secret, alert_webhook_backoff=0.05
    )
    api(running, "PUT", "/quotas/users/jo", json={"limit_requests": 2, "period": "day"})
    client = running.client()
    client.responses.create(model="gpt-4o-mini", input="hi", user="jo")  # 50%
    running.wait_for(lambda: len(hook.attempts) >= 3)
    assert len(hook.attempts) == 3  # two refused, the third taken
    deliveries = {headers["x-tokentill-delivery"] for headers, _ in hook.attempts}
    assert len(deliveries) == 1  # one delivery, retried
    for headers, body in hook.attempts:
        timestamp = headers["x-tokentill-timestamp"]
        expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
        assert headers["x-tokentill-signature"] == "sha256=" + expected.hexdigest()
        assert headers["content-type"] == "application/json"
    payload = httpx.Response(200, content=hook.attempts[-1][1]).json()
    assert payload["rule"] == "requests/day 50%" and payload["user_id"] == "jo"


def test_alerts_can_be_filtered_and_acknowledged(tokentill: Running) -> None:
    api(tokentill, "PUT", "/quotas/users/kit", json={"limit_requests": 1, "period": "day"})
    tokentill.client().responses.create(model="gpt-4o-mini", input="hi", user="kit")
    tokentill.wait_for(
        lambda: len(api(tokentill, "GET", "/alerts", params={"user_id": "kit"}).json()) == 3
    )
    critical = api(
        tokentill, "GET", "/alerts", params={"user_id": "kit", "severity": "critical"}
    ).json()
    assert [a["rule"] for a in critical] == ["requests/day 100%"]
    at_least_warning = api(
        tokentill, "GET", "/alerts", params={"user_id": "kit", "min_severity": "warning"}
    ).json()
    assert len(at_least_warning) == 2
    alert_id = critical[0]["alert_id"]
    acked = api(tokentill, "POST", f"/alerts/{alert_id}/acknowledge", json={"by": "ops"})
    assert acked.status_code == 200 and acked.json()["acknowledged_by"] == "ops"
    open_ = api(
        tokentill, "GET", "/alerts", params={"user_id": "kit", "acknowledged": "false"}
    ).json()
    assert alert_id not in {a["alert_id"] for a in open_}
    assert api(tokentill, "POST", "/alerts/999999/acknowledge").status_code == 404
    assert api(tokentill, "GET", "/alerts", params={"severity": "bad"}).status_code == 422


def test_quotas_off_changes_nothing_on_the_proxy(make_tokentill: Callable[..., Running]) -> None:
    running = make_tokentill(quotas_enabled=False)
    running.client().responses.create(model="gpt-4o-mini", input="hi", user="lee")
    assert api(running, "GET", "/quotas").status_code == 409


def test_a_new_price_reaches_the_live_counters(make_tokentill: Callable[..., Running]) -> None:
    running = make_tokentill(quota_price_refresh=0.1)
    api(running, "PUT", "/quotas/users/max", json={"limit_usd": "1000", "period": "day"})
    with duckdb.connect(str(running.db)) as conn:
        insert_rows(
            conn,
            parse_price_entries(
                [
                    {
                        "model": "gpt-4o-mini-2024-07-18",
                        "input_per_mtok": 100,
                        "output_per_mtok": 1000,
                    }
                ],
                "test",
            ),
        )

    def priced_at_override() -> bool:
        before = pico(api(running, "GET", "/quotas/users/max").json()["limits"][0]["used"])
        answer = running.client().responses.create(model="gpt-4o-mini", input="hi", user="max")
        assert answer.usage is not None
        after = pico(api(running, "GET", "/quotas/users/max").json()["limits"][0]["used"])
        expected = (
            answer.usage.input_tokens * 100 * 10**6 + answer.usage.output_tokens * 1000 * 10**6
        )
        return after - before == expected

    # (The warehouse re-prices the earlier responses too; live counts are not re-priced.)
    running.wait_for(priced_at_override)


def test_a_spilled_users_usage_is_read_back_from_the_warehouse(make_tokentill: Any) -> None:
    """Counters past `quota_max_counters` are spilled when idle; a user who returns has
    their usage read back from the warehouse before admission, so the limit holds."""
    running: Running = make_tokentill(
        quota_max_counters=2, quota_spill_after=0.2, quota_price_refresh=0.2
    )
    put = api(running, "PUT", "/quotas/default", json={"limit_requests": 2, "period": "day"})
    assert put.status_code == 200, put.text
    client = running.client()
    for i in range(6):
        client.responses.create(model="gpt-4o-mini", input="hi", user=f"spill-{i}")
    runtime = running.app.runtime
    assert runtime is not None and runtime.quotas is not None
    book = runtime.quotas.book
    running.wait_for(lambda: bool(book.spilled([user_subject("spill-0")])))
    assert book.counters() <= 2
    # spill-0 has used 1 of its 2 requests: one more is served, the next refused.
    client.responses.create(model="gpt-4o-mini", input="hi", user="spill-0")
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model="gpt-4o-mini", input="hi", user="spill-0")
    assert runtime.quotas.reseeds >= 1
    # The API reads a spilled user back too, rather than showing zero.
    running.wait_for(lambda: bool(book.spilled([user_subject("spill-1")])))
    (state,) = api(running, "GET", "/quotas/users/spill-1").json()["limits"]
    assert Decimal(state["used"]) == 1
