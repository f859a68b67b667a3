"""The admin API end to end: traffic through a real tokentill with the openai SDK, the
rollup job, then every report route read over HTTP and checked against the raw events
and the fake upstream's own ledger."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import openai
import polars as pl
import pytest

from tests.conftest import Running, ledger, serve_tokentill

TOKEN = "admin-token-for-the-api-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USERS = ("ana", "bo", "cy")
MODELS = ("gpt-4o", "gpt-4o-mini", "tt-unlisted-model")
TEAMS = ("search", "ads")


class Api:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, headers=AUTH, timeout=60)

    def get(self, path: str, **params: Any) -> Any:
        answer = self.http.get(path, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, fake_upstream: str
) -> Iterator[tuple[Running, Api, list[dict[str, Any]]]]:
    """One tokentill with traffic of 3 users x 3 models (one unpriced) x 2 teams, some
    failures and a conversation, rolled up. Module-scoped: the routes only read it."""
    db = tmp_path_factory.mktemp("api") / "w.duckdb"
    with serve_tokentill(db, fake_upstream, admin_token=TOKEN, rollup_interval=3600) as running:
        url = running.url
        httpx.delete(fake_upstream + "/_fake/ledger")
        client = running.client()
        combos = itertools.product(USERS, MODELS, TEAMS)
        previous = None
        for i, (user, model, team) in enumerate(combos):
            extra: dict[str, Any] = {}
            if i % 7 == 3:
                extra["extra_headers"] = {"x-fake-scenario": "incomplete"}
            client.responses.create(
                model=model,
                input=f"question {i}",
                user=user,
                metadata={"team": team, "project": "p1" if i % 2 else "p2"},
                **extra,
            )
        for _ in range(3):
            answer = client.responses.create(
                model="gpt-4o", input="go on", user="ana", previous_response_id=previous
            )
            previous = answer.id
        with pytest.raises(openai.InternalServerError):
            client.responses.create(
                model="gpt-4o",
                input="boom",
                user="bo",
                extra_headers={"x-fake-scenario": "http_500"},
            )
        running.flush()
        api = Api(url)
        ran = api.http.post("/api/jobs/rollup/run", params={"full": "true"})
        assert ran.status_code == 200 and ran.json()["error"] is None
        yield running, api, ledger(fake_upstream)


def _day_range() -> dict[str, str]:
    today = datetime.now(UTC).date()
    return {"start": str(today - timedelta(days=2)), "end": str(today + timedelta(days=1))}


def test_costs_from_rollups_equal_costs_priced_from_raw_events(served: Any) -> None:
    _, api, _ = served
    days = _day_range()
    rolled = api.get("/api/costs", group_by=["user", "model"], **days)
    assert rolled["source"] == "usage_daily"
    # A start one second past midnight is not a whole hour: the raw events answer.
    start = datetime.fromisoformat(days["start"]).replace(tzinfo=UTC) + timedelta(seconds=1)
    raw = api.get(
        "/api/costs", group_by=["user", "model"], start=start.isoformat(), end=days["end"]
    )
    assert raw["source"] == "raw"

    def keyed(report: dict[str, Any]) -> dict[tuple[str, str], tuple[str, int, int]]:
        return {
            (r["group"]["user"], r["group"]["model"]): (r["cost_usd"], r["requests"], r["unpriced"])
            for r in report["rows"]
        }

    assert keyed(rolled) == keyed(raw)
    assert rolled["totals"] == raw["totals"]
    # The summaries (per user, per model) agree with the raw events too.
    for dim, source in (("user", "usage_daily_users"), ("model", "usage_daily_models")):
        summary = api.get("/api/costs", group_by=[dim], **days)
        direct = api.get("/api/costs", group_by=[dim], start=start.isoformat(), end=days["end"])
        assert summary["source"] == source and direct["source"] == "raw"
        assert summary["rows"] == direct["rows"] and summary["totals"] == direct["totals"]
    # The unlisted model is counted, unpriced, and not in the money.
    unlisted = [r for r in rolled["rows"] if r["group"]["model"] == "tt-unlisted-model"]
    assert unlisted and all(r["unpriced"] == r["requests"] - r["errors"] for r in unlisted)
    # Unpriced money is unknown, never 0: null, with what is priced beside it.
    assert all(r["cost_usd"] is None and r["priced_cost_usd"] == "0" for r in unlisted)
    assert Decimal(rolled["totals"]["priced_cost_usd"]) > 0


def test_costs_by_tag_and_by_hour_add_up_to_the_same_total(served: Any) -> None:
    _, api, _ = served
    days = _day_range()
    total = api.get("/api/costs", **days)["totals"]
    by_team = api.get("/api/costs", group_by=["tag:team"], **days)
    assert by_team["source"] == "usage_daily_tags"
    assert {r["group"]["tag:team"] for r in by_team["rows"]} == set(TEAMS)
    tagged = sum(Decimal(r["priced_cost_usd"]) for r in by_team["rows"])
    # Every priced response but the conversation (no team) carries a team.
    untagged = api.get("/api/costs", user=["ana"], model=["gpt-4o-2024-08-06"], **days)
    assert tagged < Decimal(total["priced_cost_usd"])
    hourly = api.get("/api/costs", bucket="hour", **days)
    assert hourly["source"] == "usage_hourly"
    assert sum(Decimal(r["priced_cost_usd"]) for r in hourly["rows"]) == Decimal(
        total["priced_cost_usd"]
    )
    search = api.get("/api/costs", tag=["team=search"], group_by=["user"], **days)
    assert search["source"] == "raw"
    assert {r["group"]["user"] for r in search["rows"]} == set(USERS)
    assert Decimal(untagged["totals"]["priced_cost_usd"]) > 0


def test_openai_shaped_usage_matches_the_fake_upstreams_ledger(served: Any) -> None:
    _, api, entries = served
    start = int((datetime.now(UTC) - timedelta(days=1)).timestamp())
    page = api.get(
        "/api/v1/organization/usage/completions",
        start_time=start,
        bucket_width="1d",
        group_by=["user_id", "model"],
        limit=3,
    )
    assert page["object"] == "page" and not page["has_more"]
    results = [r for bucket in page["data"] for r in bucket["results"]]
    assert all(r["object"] == "organization.usage.completions.result" for r in results)
    expected: dict[tuple[str, str], list[int]] = {}
    for entry in entries:
        if entry["input_tokens"] is None:
            continue
        sums = expected.setdefault((entry["user"], entry["model"]), [0, 0, 0, 0])
        sums[0] += entry["input_tokens"]
        sums[1] += entry["output_tokens"]
        sums[2] += entry["cached_input_tokens"] or 0
        sums[3] += 1
    got = {
        (r["user_id"], r["model"]): [
            r["input_tokens"],
            r["output_tokens"],
            r["input_cached_tokens"],
            r["num_model_requests"],
        ]
        for r in results
    }
    assert got == expected


def test_openai_shaped_costs_page_through_days(served: Any) -> None:
    _, api, _ = served
    start = int((datetime.now(UTC) - timedelta(days=4)).timestamp())
    first = api.get("/api/v1/organization/costs", start_time=start, limit=2)
    assert first["has_more"] and len(first["data"]) == 2
    buckets = list(first["data"])
    page = first
    while page["has_more"]:
        page = api.get("/api/v1/organization/costs", start_time=start, page=page["next_page"])
        buckets += page["data"]
    starts = [b["start_time"] for b in buckets]
    assert starts == sorted(starts) and len(set(starts)) == len(starts) == 5
    assert all(b["end_time"] - b["start_time"] == 86400 for b in buckets)
    total = sum(Decimal(str(r["amount"]["value"])) for b in buckets for r in b["results"])
    ours = Decimal(api.get("/api/costs", **_day_range())["totals"]["priced_cost_usd"])
    assert abs(total - ours) < Decimal("0.000001")
    by_line = api.get(
        "/api/v1/organization/costs", start_time=start, group_by=["line_item", "project_id"]
    )
    lines = {r["line_item"] for b in by_line["data"] for r in b["results"]}
    assert "gpt-4o-2024-08-06" in lines
    assert {r["project_id"] for b in by_line["data"] for r in b["results"]} >= {"p1", "p2"}


def test_the_openai_sdks_admin_client_reads_usage_and_costs(served: Any) -> None:
    """The official SDK's admin client, pointed at tokentill: it sends arrays as
    `group_by[]=...` and parses the answers into its own types."""
    from openai.types.admin.organization.usage_completions_response import (
        DataResultOrganizationUsageCompletionsResult as CompletionsResult,
    )
    from openai.types.admin.organization.usage_costs_response import (
        DataResultOrganizationCostsResult as CostsResult,
    )

    running, api, entries = served
    admin = openai.OpenAI(admin_api_key=TOKEN, base_url=running.url + "/api/v1", max_retries=0)
    start = int((datetime.now(UTC) - timedelta(days=1)).timestamp())
    usage = admin.admin.organization.usage.completions(
        start_time=start, group_by=["user_id", "model"], bucket_width="1d"
    )
    results = [r for bucket in usage.data for r in bucket.results]
    assert results and all(isinstance(r, CompletionsResult) for r in results)
    by_user: dict[str, int] = {}
    for entry in entries:
        if entry["input_tokens"] is not None:
            by_user[entry["user"]] = by_user.get(entry["user"], 0) + entry["input_tokens"]
    got: dict[str, int] = {}
    for r in results:
        assert r.user_id is not None and r.model is not None
        got[r.user_id] = got.get(r.user_id, 0) + r.input_tokens
    assert got == by_user
    # Filters as arrays too, and the same answer as the plain query-string spelling.
    one = admin.admin.organization.usage.completions(
        start_time=start, group_by=["model"], user_ids=["ana", "bo"], models=["gpt-4o"]
    )
    plain = api.get(
        "/api/v1/organization/usage/completions",
        start_time=start,
        group_by="model",
        user_ids=["ana", "bo"],
        models="gpt-4o",
    )
    assert one.to_dict() == plain
    assert {r.model for b in one.data for r in b.results} <= {"gpt-4o-2024-08-06"}
    # Paged with `page`, day by day.
    week = int((datetime.now(UTC) - timedelta(days=4)).timestamp())
    page = admin.admin.organization.usage.costs(
        start_time=week, group_by=["user_id", "line_item"], limit=2
    )
    buckets = list(page.data)
    while page.has_more:
        assert page.next_page
        page = admin.admin.organization.usage.costs(
            start_time=week, group_by=["user_id", "line_item"], limit=2, page=page.next_page
        )
        buckets += page.data
    assert len(buckets) == 5
    costs = [r for bucket in buckets for r in bucket.results]
    assert costs and all(isinstance(r, CostsResult) for r in costs)
    assert {r.user_id for r in costs} == set(USERS)
    total = sum(Decimal(str(r.amount.value)) for r in costs if r.amount and r.amount.value)
    ours = Decimal(api.get("/api/costs", **_day_range())["totals"]["priced_cost_usd"])
    assert abs(total - ours) < Decimal("0.000001")


def test_openai_shaped_routes_answer_errors_in_openais_shape(served: Any) -> None:
    _, api, _ = served
    now = int(datetime.now(UTC).timestamp())
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({}, "start_time"),
        ({"start_time": now, "end_time": now - 10}, "start_time"),
        ({"start_time": now - 86400, "limit": 32}, "limit"),
        ({"start_time": now - 86400, "bucket_width": "2d"}, "bucket_width"),
        ({"start_time": now - 86400, "group_by": "colour"}, "group_by"),
        ({"start_time": now - 86400, "page": "bm9wZQ=="}, "page"),
        ({"start_time": now - 86400, "frobnicate": "1"}, "frobnicate"),
    ]
    for params, param in cases:
        answer = api.http.get("/api/v1/organization/usage/completions", params=params)
        assert answer.status_code == 400, (params, answer.text)
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
        assert error["message"]


def test_report_routes_refuse_bad_input_with_a_message(served: Any) -> None:
    _, api, _ = served
    for path, params in [
        ("/api/costs", {"start": "2026-02-30"}),
        ("/api/costs", {"start": "2026-05-02", "end": "2026-05-01"}),
        ("/api/costs", {"group_by": "colour"}),
        ("/api/costs", {"limit": 10**9}),
        ("/api/costs", {"tag": "no-equals-sign"}),
        ("/api/costs", {"unknown": "1"}),
        ("/api/events", {"cursor": "%%%"}),
        ("/api/users", {"sort": "height"}),
        ("/api/users", {"start": "2026-05-01T10:30:00Z"}),
        ("/api/events", {"start": "1999-01-01", "end": "2026-01-01"}),
    ]:
        answer = api.http.get(path, params=params)
        assert answer.status_code == 422, (path, params, answer.status_code, answer.text)
        assert answer.json()["detail"], answer.text


def test_events_page_newest_first_through_every_event(served: Any) -> None:
    running, api, _ = served
    seen: list[dict[str, Any]] = []
    page = api.get("/api/events", limit=7)
    seen += page["events"]
    while page["next_cursor"]:
        page = api.get("/api/events", limit=7, cursor=page["next_cursor"])
        seen += page["events"]
    rows = running.rows()
    assert sorted(e["event_id"] for e in seen) == sorted(r["event_id"] for r in rows)
    moments = [datetime.fromisoformat(e["created_at"]) for e in seen]
    assert moments == sorted(moments, reverse=True)
    priced = [e for e in seen if e["model"] and not e["model"].startswith("tt-")]
    assert all(e["cost_usd"] is not None for e in priced if e["status"] != "error")
    team = api.get("/api/events", tag=["team=ads"], user=["bo"], limit=100)["events"]
    assert len(team) == len(MODELS)


def test_users_models_and_summary(served: Any) -> None:
    _, api, _ = served
    users = api.get("/api/users")
    assert users["total_users"] == len(USERS)
    costs = [Decimal(u["priced_cost_usd"]) for u in users["users"]]
    assert costs == sorted(costs, reverse=True)
    by_name = api.get("/api/users", sort="user_id", order="asc", limit=2, offset=1)
    assert [u["user_id"] for u in by_name["users"]] == ["bo", "cy"]
    ana = api.get("/api/users/ana")
    assert {m["model"] for m in ana["by_model"]} >= {"gpt-4o-2024-08-06"}
    assert sum(Decimal(m["priced_cost_usd"]) for m in ana["by_model"]) == Decimal(
        ana["totals"]["priced_cost_usd"]
    )
    assert len(ana["recent"]) == 9 and ana["recent"][0]["user_id"] == "ana"
    assert api.http.get("/api/users/nobody").status_code == 404
    models = api.get("/api/models")
    assert models["unpriced_models"] == ["tt-unlisted-model"]
    mini = next(m for m in models["models"] if m["model"] == "gpt-4o-mini-2024-07-18")
    assert Decimal(mini["average_cost_per_request_usd"]) > 0
    summary = api.get("/api/costs/summary")
    assert Decimal(summary["month_to_date_usd"]) >= Decimal(summary["today_usd"]) > 0
    assert Decimal(summary["projected_month_end_usd"]) >= Decimal(summary["month_to_date_usd"])
    conversations = api.get("/api/conversations")["conversations"]
    assert conversations[0]["responses"] == 3 and conversations[0]["user_id"] == "ana"
    detail = api.get(f"/api/conversations/{conversations[0]['root_id']}")
    assert detail["days"][-1]["cumulative_cost_usd"] == detail["cost_usd"]


def test_prices_can_be_added_and_listed(served: Any) -> None:
    _, api, _ = served
    change = {
        "author": "finance.alice",
        "prices": [
            {
                "model": "tt-unlisted-model",
                "effective_from": "2020-01-01T00:00:00Z",
                "input_per_mtok": "1.25",
                "output_per_mtok": "5",
                "note": "negotiated",
            }
        ],
    }
    added = api.http.post("/api/prices", json=change)
    assert added.status_code == 201, added.text
    assert added.json()["added"] == 1
    assert added.json()["prices"][0]["source"] == "api:finance.alice"
    again = api.http.post("/api/prices", json=change)
    assert again.json()["added"] == 0  # the same row twice is one row
    listed = api.get("/api/prices", model="tt-unlisted-model")
    assert listed["total"] == 1 and listed["prices"][0]["note"] == "negotiated"
    bad = api.http.post("/api/prices", json={**change, "prices": [{"model": "x"}]})
    assert bad.status_code == 422 and "input_per_mtok" in bad.text
    wrong = {**change, "prices": [{**change["prices"][0], "input_per_mtok": "0.0000001"}]}
    assert api.http.post("/api/prices", json=wrong).status_code == 422


def test_every_route_needs_the_token_and_the_docs_work_offline(served: Any) -> None:
    running, api, _ = served
    schema = api.get("/api/openapi.json")
    routes = [
        (method, path)
        for path, methods in schema["paths"].items()
        for method in methods
        if path.startswith("/api/")
    ]
    assert ("get", "/api/v1/organization/usage/completions") in routes and len(routes) >= 12
    for method, path in [("get", "/api/openapi.json"), ("get", "/api/docs"), *routes]:
        concrete = path.replace("{job}", "rollup").replace("{user_id}", "ana")
        concrete = concrete.replace("{root_id}", "x")
        answer = httpx.request(method, running.url + concrete)
        assert answer.status_code == 401, (method, path, answer.status_code)
    page = api.http.get("/api/docs")
    assert page.status_code == 200 and "/api/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower()
    script = api.http.get("/api/docs-assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000


def test_finance_report_exports_add_up_in_json_csv_and_parquet(served: Any) -> None:
    _, api, _ = served
    month = datetime.now(UTC).date().replace(day=1)
    following = (month + timedelta(days=32)).replace(day=1)
    params = {"start": str(month), "end": str(following), "tag_key": "team"}
    report = api.get("/api/reports/finance", **params)
    rows = report["rows"]
    total = next(r for r in rows if r["section"] == "total" and r["month"] is None)
    assert Decimal(total["cost_usd"]) == Decimal(
        api.get("/api/costs", **_day_range())["totals"]["priced_cost_usd"]
    )
    for section in ("model", "user", "tag"):
        part = [r for r in rows if r["section"] == section]
        assert sum(Decimal(r["amount_usd"]) for r in part) == Decimal(total["amount_usd"])
        assert sum(Decimal(r["cost_usd"]) for r in part) == Decimal(total["cost_usd"])
    assert {r["key"] for r in rows if r["section"] == "tag"} >= set(TEAMS)

    csv = api.http.get("/api/reports/finance", params={**params, "format": "csv"})
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert "attachment" in csv.headers["content-disposition"]
    table = pl.read_csv(io.BytesIO(csv.content), infer_schema=False)
    assert table["cost_usd"].to_list() == [r["cost_usd"] for r in rows]
    assert table["amount_usd"].to_list() == [r["amount_usd"] for r in rows]
    parquet = api.http.get("/api/reports/finance", params={**params, "format": "parquet"})
    assert parquet.status_code == 200
    frame = pl.read_parquet(io.BytesIO(parquet.content))
    assert frame["cost_usd"].to_list() == table["cost_usd"].to_list()
    assert frame["section"].to_list() == [r["section"] for r in rows]


def test_closing_months_through_the_api(served: Any) -> None:
    _, api, _ = served
    this_month = datetime.now(UTC).strftime("%Y-%m")
    not_over = api.http.post(f"/api/periods/{this_month}/close", json={"closed_by": "alice"})
    assert not_over.status_code == 422 and "not ended" in not_over.json()["detail"][0]["msg"]
    bad = api.http.post("/api/periods/2026-13/close", json={"closed_by": "alice"})
    assert bad.status_code == 422
    closed = api.http.post("/api/periods/2020-01/close", json={"closed_by": "alice"})
    assert closed.status_code == 201, closed.text
    again = api.http.post("/api/periods/2020-01/close", json={"closed_by": "bob"})
    assert again.status_code == 409
    assert [p["period"] for p in api.get("/api/periods")] == ["2020-01-01"]
    assert api.get("/api/periods/adjustments") == []
