"""Numbers that never move, through the admin API: a price added later never rewrites a
cost already incurred (under any name the model is priced by), a correction replaces
exactly what it corrects, unpriced money is null (never 0), and every report route gives
the same numbers whichever table answers it."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.conftest import Running
from tokentill.warehouse import spend

DAY = 86_400


def _yesterday_noon_ago(minutes: int = 0) -> int:
    """Seconds since yesterday at noon UTC, plus `minutes`: a moment well inside one day,
    whenever the test runs (events a day ago, to the second, straddle midnight when the
    suite runs just after it)."""
    noon = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    return int(time.time() - (noon - timedelta(days=1)).timestamp()) - minutes * 60


def _respond(running: Running, model: str, seconds_ago: int, **extra: Any) -> str:
    client = running.client()
    created = int(time.time()) - seconds_ago
    answer = client.responses.create(
        model=model,
        input="price me",
        extra_headers={"x-fake-created-at": str(created)},
        **extra,
    )
    return answer.id


def _rollup(running: Running, *, full: bool = False) -> None:
    running.flush()
    ran = httpx.post(
        running.url + "/api/jobs/rollup/run", params={"full": str(full).lower()}, timeout=120
    )
    assert ran.status_code == 200 and ran.json()["error"] is None, ran.text


def _event_costs(running: Running, ids: list[str]) -> dict[str, str | None]:
    running.flush()  # the events just answered are in the warehouse (the writer batches)
    start = (datetime.now(UTC) - timedelta(days=5)).isoformat()
    page = httpx.get(
        running.url + "/api/events", params={"start": start, "limit": 500}, timeout=30
    ).json()
    return {e["response_id"]: e["cost_usd"] for e in page["events"] if e["response_id"] in ids}


def _day_costs(running: Running, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's cost per day from the rollups, and from the raw events (a range that
    starts one second past midnight is answered from them)."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start, end = today - timedelta(days=3), today + timedelta(days=1)
    params = {"model": [model], "bucket": "day", "end": end.isoformat()}
    rolled = httpx.get(
        running.url + "/api/costs", params={**params, "start": start.isoformat()}, timeout=30
    ).json()
    raw = httpx.get(
        running.url + "/api/costs",
        params={**params, "start": (start + timedelta(seconds=1)).isoformat()},
        timeout=30,
    ).json()
    assert rolled["source"] != "raw" and raw["source"] == "raw"
    return (
        {r["bucket"][:10]: (r["cost_usd"], r["unpriced"]) for r in rolled["rows"]},
        {r["bucket"][:10]: (r["cost_usd"], r["unpriced"]) for r in raw["rows"]},
    )


def _add_price(running: Running, model: str, start: datetime | None, **rates: str) -> None:
    price: dict[str, Any] = {"model": model, **rates}
    if start is not None:
        price["effective_from"] = start.isoformat()
    added = httpx.post(
        running.url + "/api/prices", json={"author": "finance.test", "prices": [price]}, timeout=30
    )
    assert added.status_code == 201, added.text


@pytest.mark.parametrize(
    ("model", "priced_as"),
    [
        ("ft:gpt-4o-mini-2024-07-18:acme::x1", "ft:gpt-4o-mini-2024-07-18:acme::*"),
        ("gpt-4o-mini-2025-06-01", "gpt-4o-mini-2025-06-01"),
    ],
)
def test_a_price_from_now_on_leaves_yesterday_alone(
    make_tokentill: Any, model: str, priced_as: str
) -> None:
    running: Running = make_tokentill(rollup_interval=3600)
    ids = [_respond(running, model, _yesterday_noon_ago(i)) for i in range(3)]
    _rollup(running)
    costs = _event_costs(running, ids)
    rolled, raw = _day_costs(running, model)
    assert rolled == raw and len(rolled) == 1
    assert all(c is not None and Decimal(c) > 0 for c in costs.values())

    # A new, more specific price from now on: yesterday's events keep theirs.
    since = datetime.now(UTC) - timedelta(minutes=5)  # today's event below falls after it
    _add_price(running, priced_as, since, input_per_mtok="9", output_per_mtok="9")
    assert _event_costs(running, ids) == costs
    _rollup(running)
    assert _day_costs(running, model) == (rolled, raw)
    _rollup(running, full=True)
    assert _day_costs(running, model) == (rolled, raw)
    assert _event_costs(running, ids) == costs

    # And today's event is priced at the new price.
    (today,) = [_respond(running, model, 0)]
    assert _event_costs(running, [today])[today] == str(
        (Decimal(_row_tokens(running, today)[0]) * 9 + Decimal(_row_tokens(running, today)[1]) * 9)
        / 10**6
    )


def _row_tokens(running: Running, response_id: str) -> tuple[int, int]:
    (row,) = running.rows("response_id = ?", [response_id])
    return row["input_tokens"], row["output_tokens"]


def test_a_correction_replaces_exactly_the_interval_it_corrects(make_tokentill: Any) -> None:
    running: Running = make_tokentill(rollup_interval=3600)
    model = "house-model-1"  # not in the published catalog: its prices are ours alone
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    _add_price(running, model, None, input_per_mtok="1", output_per_mtok="2")
    _add_price(running, model, midnight, input_per_mtok="4", output_per_mtok="16")
    _add_price(
        running, model, datetime(2027, 6, 1, tzinfo=UTC), input_per_mtok="6", output_per_mtok="20"
    )
    old = _respond(running, model, 2 * DAY)
    new = _respond(running, model, 60)
    _rollup(running)

    def cost(response_id: str, input_rate: int, output_rate: int) -> str:
        tokens_in, tokens_out = _row_tokens(running, response_id)
        return str(Decimal(tokens_in * input_rate + tokens_out * output_rate) / 10**6)

    assert _event_costs(running, [old, new]) == {old: cost(old, 1, 2), new: cost(new, 4, 16)}
    # The first price corrected (same start, recorded later): only its own interval, up to
    # today's price, takes the correction.
    _add_price(running, model, None, input_per_mtok="3", output_per_mtok="5")
    assert _event_costs(running, [old, new]) == {old: cost(old, 3, 5), new: cost(new, 4, 16)}
    _rollup(running)
    rolled, raw = _day_costs(running, model)
    assert rolled == raw
    assert sorted(c for c, _ in rolled.values()) == sorted([cost(old, 3, 5), cost(new, 4, 16)])
    # The catalog says which row is in force when.
    listed = httpx.get(
        running.url + "/api/prices",
        params={"model": model, "in_force_at": (midnight - timedelta(hours=1)).isoformat()},
        timeout=30,
    ).json()["prices"]
    assert sorted(Decimal(p["input_per_mtok"]) for p in listed) == [1, 3]  # both start then
    later = httpx.get(
        running.url + "/api/prices",
        params={"model": model, "in_force_at": (midnight + timedelta(hours=1)).isoformat()},
        timeout=30,
    ).json()["prices"]
    assert [Decimal(p["input_per_mtok"]) for p in later] == [4]


def test_unpriced_money_is_null_never_zero(make_tokentill: Any) -> None:
    running: Running = make_tokentill(rollup_interval=3600)
    _respond(running, "tt-unlisted-model", 60)
    _respond(running, "gpt-4o-mini", 60)
    _rollup(running)
    today = datetime.now(UTC).date()
    days = {"start": str(today - timedelta(days=1)), "end": str(today + timedelta(days=1))}
    report = httpx.get(
        running.url + "/api/costs", params={**days, "group_by": ["model"]}, timeout=30
    ).json()
    by_model = {r["group"]["model"]: r for r in report["rows"]}
    unlisted = by_model["tt-unlisted-model"]
    assert unlisted["cost_usd"] is None and unlisted["unpriced"] == 1
    assert unlisted["priced_cost_usd"] == "0"
    (priced,) = [r for m, r in by_model.items() if m.startswith("gpt-4o-mini")]
    assert Decimal(priced["cost_usd"]) > 0 and priced["unpriced"] == 0
    # The total is not known while a part of it is not.
    assert report["totals"]["cost_usd"] is None and report["totals"]["unpriced"] == 1
    assert report["totals"]["priced_cost_usd"] == priced["cost_usd"]


USERS = ("u-ana", "u-bo", "u-cy", "u-dee")
MODELS = ("gpt-4o-mini", "gpt-4.1-nano", "gpt-4o", "tt-unlisted-model")


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory, fake_upstream: str) -> Any:
    from tests.conftest import serve_tokentill

    db = tmp_path_factory.mktemp("both-ways") / "w.duckdb"
    rng = random.Random(15)
    with serve_tokentill(db, fake_upstream, rollup_interval=3600) as running:
        client = running.client()
        for i in range(60):
            extra: dict[str, Any] = {}
            if rng.random() < 0.15:
                extra["extra_headers"] = {"x-fake-scenario": "incomplete"}
            else:
                extra["extra_headers"] = {}
            extra["extra_headers"]["x-fake-created-at"] = str(
                int(time.time()) - rng.randrange(3 * DAY)
            )
            client.responses.create(
                model=rng.choice(MODELS),
                input="x" * rng.randrange(1, 400),
                user=rng.choice(USERS),
                metadata={"team": rng.choice(("search", "ads")), "feature": f"f{i % 3}"},
                service_tier=rng.choice(("auto", "default", "flex")),
                **extra,
            )
        _rollup(running, full=True)
        yield running


def _both_ways(
    running: Running, monkeypatch: pytest.MonkeyPatch, path: str, params: dict[str, Any]
) -> tuple[Any, Any]:
    first = httpx.get(running.url + path, params=params, timeout=60)
    assert first.status_code == 200, first.text
    with monkeypatch.context() as patch:
        patch.setattr(spend, "choose_source", lambda query: "raw")
        second = httpx.get(running.url + path, params=params, timeout=60)
    assert second.status_code == 200, second.text
    one, other = first.json(), second.json()
    for body in (one, other):
        if isinstance(body, dict):
            body.pop("source", None)
    return one, other


def test_every_report_route_gives_the_same_numbers_whichever_table_answers(
    traffic: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    today = datetime.now(UTC).date()
    days = {"start": str(today - timedelta(days=4)), "end": str(today + timedelta(days=1))}
    start_time = int(datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp())
    openai_range = {"start_time": start_time - 4 * DAY, "end_time": start_time + DAY}
    questions: list[tuple[str, dict[str, Any]]] = [
        ("/api/costs", days),
        ("/api/costs", {**days, "group_by": ["user"]}),
        ("/api/costs", {**days, "group_by": ["model"], "bucket": "day"}),
        ("/api/costs", {**days, "group_by": ["user", "model", "service_tier"]}),
        ("/api/costs", {**days, "group_by": ["status", "endpoint"], "bucket": "hour"}),
        ("/api/costs", {**days, "group_by": ["tag:team"]}),
        ("/api/costs", {**days, "group_by": ["tag:team", "model"], "bucket": "month"}),
        ("/api/costs", {**days, "user": ["u-ana", "u-bo"], "group_by": ["model"]}),
        ("/api/models", days),
        ("/api/users/u-cy", days),
        ("/api/v1/organization/costs", {**openai_range, "group_by": ["line_item"]}),
        ("/api/v1/organization/usage/completions", {**openai_range, "group_by": ["model"]}),
    ]
    compared = 0
    for path, params in questions:
        one, other = _both_ways(traffic, monkeypatch, path, params)
        assert one == other, (path, params)
        compared += 1
    assert compared == len(questions)
    # The data is not trivial: money, several models, some of it unpriced.
    costs, _ = _both_ways(traffic, monkeypatch, "/api/costs", {**days, "group_by": ["model"]})
    assert len(costs["rows"]) >= 4 and costs["totals"]["unpriced"] > 0
    assert Decimal(costs["totals"]["priced_cost_usd"]) > 0
