"""Reconciliation against OpenAI's bill: the pure comparison on hand-computed numbers,
the cost export import, and end to end through a real tokentill and the fake's own
organization Costs and Usage endpoints."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import duckdb
import httpx
import openai
import polars as pl
import pytest

from tests.conftest import Running
from tests.servers import free_port, serve_in_thread
from tokentill.app import create_app
from tokentill.fakeai import FakeUpstream, create_fake_app
from tokentill.fakeai.billing import line_items
from tokentill.settings import Settings
from tokentill.warehouse.openai_bill import read_cost_export
from tokentill.warehouse.reconcile import (
    OPENAI_REQUESTS_SCHEMA,
    OPENAI_SCHEMA,
    OURS_SCHEMA,
    Thresholds,
    by_day,
    compare,
    model_of_line_item,
    usd_to_pico,
)

D1, D2 = date(2026, 5, 1), date(2026, 5, 2)
MINI, FOUR_O = "gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06"


def usd(value: str) -> int:
    return usd_to_pico(Decimal(value))


def ours_row(day: date, model: str, requests: int, cost: str, **counts: int) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(OURS_SCHEMA, 0)
    row.update(day=day, model=model, our_requests=requests, our_pico=usd(cost), **counts)
    return row


def test_line_items_and_money() -> None:
    assert model_of_line_item("gpt-4o-mini-2024-07-18, cached input") == MINI
    assert model_of_line_item("ft:gpt-4o:acme::x, output") == "ft:gpt-4o:acme::x"
    assert model_of_line_item("something else") == "something else"
    assert usd_to_pico(Decimal("0.000000150")) == 150_000
    # OpenAI's float noise beyond the pico-dollar is rounded once, half-even.
    assert usd_to_pico(Decimal("0.06000000000000000083")) == 60_000_000_000


def test_comparison_on_hand_computed_numbers() -> None:
    openai = pl.LazyFrame(
        [
            # line items of one model and day are added up
            {"day": D1, "model": MINI, "openai_pico": usd("1.00")},
            {"day": D1, "model": MINI, "openai_pico": usd("0.25")},
            {"day": D1, "model": FOUR_O, "openai_pico": usd("2.00")},
            {"day": D1, "model": "gpt-5-2025-08-07", "openai_pico": usd("0.40")},
            {"day": D2, "model": MINI, "openai_pico": usd("0.50")},
            {"day": D2, "model": "o3-2025-04-16", "openai_pico": usd("3.00")},
            {"day": D2, "model": "gpt-unlisted", "openai_pico": usd("0.70")},
        ],
        schema=OPENAI_SCHEMA,
    )
    requests = pl.LazyFrame(
        [
            {"day": D1, "model": MINI, "openai_requests": 10},
            {"day": D1, "model": FOUR_O, "openai_requests": 4},
            {"day": D1, "model": "gpt-5-2025-08-07", "openai_requests": 2},
            {"day": D2, "model": MINI, "openai_requests": 5},
            {"day": D2, "model": "o3-2025-04-16", "openai_requests": 3},
            {"day": D2, "model": "gpt-unlisted", "openai_requests": 1},
        ],
        schema=OPENAI_REQUESTS_SCHEMA,
    )
    ours = pl.LazyFrame(
        [
            # 8 seen, 1 garbled answer recorded as an error under the alias, 1 never seen
            ours_row(D1, MINI, 8, "1.00"),
            ours_row(D1, "gpt-4o-mini", 0, "0", errors=1),
            # same 4 requests, priced lower: a price mismatch
            ours_row(D1, FOUR_O, 4, "1.90"),
            # gpt-5 on day 1: exactly equal
            ours_row(D1, "gpt-5-2025-08-07", 2, "0.40"),
            # day 2 mini: one chat cut mid-stream, its usage unknown
            ours_row(D2, MINI, 5, "0.45", interrupted=1),
            # o3: never seen at all; the unlisted model: seen, unpriced
            ours_row(D2, "gpt-unlisted", 1, "0", unpriced=1, unpriced_tokens=300),
            # tokentill's own extra: something OpenAI did not bill
            ours_row(D2, "gpt-4.1-2025-04-14", 1, "0.05"),
        ],
        schema=OURS_SCHEMA,
    )
    rows = {
        (r["day"], r["model"]): r
        for r in compare(openai, ours, Thresholds(Decimal("0.01")), requests).collect().to_dicts()
    }
    assert set(rows) == {
        (D1, MINI),
        (D1, FOUR_O),
        (D1, "gpt-5-2025-08-07"),
        (D2, MINI),
        (D2, "o3-2025-04-16"),
        (D2, "gpt-unlisted"),
        (D2, "gpt-4.1-2025-04-14"),
    }  # the alias's error row is no model of its own

    mini = rows[(D1, MINI)]
    assert (mini["openai_pico"], mini["our_pico"], mini["diff_pico"]) == (
        usd("1.25"),
        usd("1.00"),
        usd("0.25"),
    )
    assert (mini["errors"], mini["bypassed_requests"], mini["flagged"]) == (1, 1, True)
    assert any("error" in e for e in mini["explanations"])
    assert any("1 request more than tokentill saw" in e for e in mini["explanations"])
    assert mini["price_mismatch"] is False

    four_o = rows[(D1, FOUR_O)]
    assert four_o["diff_pico"] == usd("0.10") and four_o["price_mismatch"] is True
    assert four_o["bypassed_requests"] == 0 and four_o["flagged"] is True
    assert four_o["explanations"] == [
        "same traffic, different price: tokentill's catalog prices this model differently "
        "from OpenAI's bill"
    ]

    equal = rows[(D1, "gpt-5-2025-08-07")]
    assert (equal["diff_pico"], equal["flagged"], equal["explanations"]) == (0, False, [])

    cut = rows[(D2, MINI)]
    assert cut["diff_pico"] == usd("0.05") and cut["interrupted"] == 1
    assert cut["price_mismatch"] is False and cut["bypassed_requests"] == 0
    assert cut["explanations"] == ["1 response interrupted before tokentill learned their usage"]

    o3 = rows[(D2, "o3-2025-04-16")]
    assert (o3["our_pico"], o3["diff_pico"], o3["bypassed_requests"]) == (0, usd("3"), 3)
    assert any("bypassed the proxy" in e for e in o3["explanations"])

    unlisted = rows[(D2, "gpt-unlisted")]
    assert (unlisted["unpriced"], unlisted["unpriced_tokens"]) == (1, 300)
    assert unlisted["explanations"] == [
        "1 response (300 tokens) tokentill could not price: their cost is not in ours"
    ]

    extra = rows[(D2, "gpt-4.1-2025-04-14")]
    assert extra["diff_pico"] == -usd("0.05") and extra["flagged"] is True
    assert extra["explanations"] == ["tokentill recorded costs OpenAI did not bill"]

    days = {
        r["day"]: r
        for r in by_day(
            compare(openai, ours, Thresholds(Decimal("0.01")), requests),
            Thresholds(Decimal("0.01")),
        )
        .collect()
        .to_dicts()
    }
    assert days[D1]["openai_pico"] == usd("3.65") and days[D1]["our_pico"] == usd("3.30")
    assert days[D1]["diff_pico"] == usd("0.35") and days[D1]["flagged"] is True
    assert days[D1]["flagged_models"] == 2
    assert days[D2]["diff_pico"] == usd("3.70")


def test_thresholds() -> None:
    openai = pl.LazyFrame(
        [
            {"day": D1, "model": MINI, "openai_pico": usd("100")},
            {"day": D1, "model": FOUR_O, "openai_pico": usd("1")},
        ],
        schema=OPENAI_SCHEMA,
    )
    ours = pl.LazyFrame(
        [ours_row(D1, MINI, 1, "99.50"), ours_row(D1, FOUR_O, 1, "0.98")], schema=OURS_SCHEMA
    )

    def flagged(thresholds: Thresholds) -> dict[str, bool]:
        frame = compare(openai, ours, thresholds).collect()
        return dict(zip(frame["model"], frame["flagged"], strict=True))

    assert flagged(Thresholds(Decimal("0.01"))) == {MINI: True, FOUR_O: True}
    assert flagged(Thresholds(Decimal("0.02"))) == {MINI: True, FOUR_O: False}  # 0.02 not > 0.02
    # 1%: $0.50 of $100 passes $0.01 but not 1% of the bill; $0.02 of $1 passes both.
    assert flagged(Thresholds(Decimal("0.01"), Decimal("0.01"))) == {MINI: False, FOUR_O: True}
    # Without request counts (a cost export), a difference on seen traffic is a mismatch
    # that says it may also be bypass.
    row = compare(openai, ours, Thresholds()).collect().row(0, named=True)
    assert row["openai_requests"] is None and row["price_mismatch"] is True
    assert "may also be bypass" in row["explanations"][0]


# -- end to end ---------------------------------------------------------------------------

PRICES_TOML = """
[[price]]
model = "gpt-4o-2024-08-06"
service_tier = "default"
effective_from = 2020-01-01
input_per_mtok = 3.00
cached_input_per_mtok = 1.50
output_per_mtok = 12.00
note = "a negotiated rate OpenAI's bill does not know about"
"""
ADMIN_KEY = "sk-admin-reconcile-test"


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, FakeUpstream]]:
    """A fake OpenAI of this module's own: its ledger holds this module's traffic only."""
    app = create_fake_app(seed=11)
    with serve_in_thread(app) as url:
        yield url, app.state.fake


def fake_totals(fake: FakeUpstream) -> dict[tuple[date, str], Decimal]:
    """What the fake billed per day x model, from its ledger's own line items."""
    totals: dict[tuple[date, str], Decimal] = defaultdict(Decimal)
    for entry in fake.ledger.entries():
        for item in line_items(entry):
            day = datetime.fromtimestamp(item.created_at, UTC).date()
            totals[(day, item.model)] += item.amount
    return dict(totals)


def drive_traffic(tokentill: Running, fake_url: str) -> None:
    client = tokentill.client()
    for text in ("one", "two"):
        client.responses.create(model="gpt-4o-mini", input=text, user="ana")
    list(client.responses.create(model="gpt-4o-mini", input="three", stream=True))
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "four"}]
    )
    client.responses.create(model="gpt-5-mini", input="exactly equal")
    for text in ("negotiated", "rate"):
        client.responses.create(model="gpt-4o", input=text)
    for text in ("too new", "for the price list"):
        client.responses.create(model="gpt-unlisted-preview", input=text)
    # Billed upstream, garbled on the way back: an error row with no usage.
    with pytest.raises(openai.InternalServerError):
        client.responses.create(
            model="o4-mini", input="garbled", extra_headers={"x-fake-scenario": "garbage"}
        )
    # Not billed at all.
    with pytest.raises(openai.InternalServerError):
        client.responses.create(
            model="o4-mini", input="500", extra_headers={"x-fake-scenario": "http_500"}
        )
    client.chat.completions.create(
        model="gpt-4.1-mini", messages=[{"role": "user", "content": "whole"}]
    )
    # A Chat Completion cut mid-stream: billed, its usage never seen by tokentill.
    with pytest.raises(openai.APIError):
        list(
            client.chat.completions.create(
                model="gpt-4.1-mini",
                messages=[{"role": "user", "content": "cut"}],
                stream=True,
                extra_headers={"x-fake-scenario": "cut"},
            )
        )
    # Straight to OpenAI (the fake), bypassing the proxy: a model tokentill never sees,
    # and one more request of a model it does see.
    direct = openai.OpenAI(base_url=fake_url + "/v1", api_key="sk-direct", max_retries=0)
    for text in ("around", "the proxy"):
        direct.responses.create(model="gpt-5-nano", input=text)
    direct.responses.create(model="gpt-4o-mini", input="around too")
    tokentill.flush()
    ran = httpx.post(tokentill.url + "/api/jobs/rollup/run", params={"full": "true"}, timeout=60)
    assert ran.status_code == 200 and ran.json()["error"] is None


@pytest.fixture(scope="module")
def days() -> dict[str, str]:
    today = datetime.now(UTC).date()
    # Yesterday to tomorrow: traffic sent just before midnight UTC is still covered.
    return {
        "start": (today - timedelta(days=1)).isoformat(),
        "end": (today + timedelta(days=1)).isoformat(),
    }


@pytest.fixture(scope="module")
def reconciled(
    fake: tuple[str, FakeUpstream], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("reconcile")
    prices = root / "prices.toml"
    prices.write_text(PRICES_TOML)
    settings = Settings(
        db=root / "w.duckdb",
        upstream=fake[0],
        prices_file=prices,
        openai_admin_key=ADMIN_KEY,
        reconcile_threshold_usd=Decimal(0),
        writer_flush_interval=0.05,
        rollup_interval=3600,
    )
    app = create_app(settings)
    with serve_in_thread(app) as url:
        running = Running(url, app, settings)
        drive_traffic(running, fake[0])
        yield running


def usd_of(value: str) -> Decimal:
    return Decimal(value)


def test_reconcile_against_the_fakes_bill(
    reconciled: Running, fake: tuple[str, FakeUpstream], days: dict[str, str]
) -> None:
    answer = httpx.get(reconciled.url + "/api/reconcile", params=days, timeout=60)
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["source"] == "openai_api"
    # The range is answered as it was asked: end exclusive, as on every /api route.
    assert (report["start"], report["end"]) == (days["start"], days["end"])
    rows = {(date.fromisoformat(r["day"]), r["model"]): r for r in report["rows"]}
    billed = fake_totals(fake[1])
    # OpenAI's figure per day x model is exactly what the fake billed.
    for key, amount in billed.items():
        assert usd_of(rows[key]["openai_usd"]) == amount, key
    # Ours is exactly what the rollup holds.
    with duckdb.connect(str(reconciled.db)) as conn:
        ours = {
            (day, model): cost
            for day, model, cost in conn.execute(
                "SELECT CAST(bucket AS DATE), model, sum(cost_pico) FROM usage_daily "
                "WHERE status <> 'error' GROUP BY ALL"
            ).fetchall()
        }
    for key, pico in ours.items():
        assert usd_of(rows[key]["tokentill_usd"]) == Decimal(pico) / 10**12, key
    for row in rows.values():
        assert usd_of(row["difference_usd"]) == usd_of(row["openai_usd"]) - usd_of(
            row["tokentill_usd"]
        )

    def only(model: str) -> dict[str, Any]:
        (found,) = [r for (_, m), r in rows.items() if m == model]
        return found

    equal = only("gpt-5-mini-2025-08-07")
    assert usd_of(equal["difference_usd"]) == 0 and equal["openai_usd"] == equal["tokentill_usd"]
    assert (equal["flagged"], equal["explanations"]) == (False, [])

    mini = only("gpt-4o-mini-2024-07-18")
    assert (mini["openai_requests"], mini["tokentill_requests"]) == (5, 4)
    assert mini["bypassed_requests"] == 1 and mini["flagged"] is True
    assert mini["explanations"] == [
        "OpenAI billed 1 request more than tokentill saw: they bypassed the proxy"
    ]

    nano = only("gpt-5-nano-2025-08-07")
    assert (nano["tokentill_requests"], nano["bypassed_requests"]) == (0, 2)
    assert usd_of(nano["tokentill_usd"]) == 0 and usd_of(nano["openai_usd"]) > 0
    assert "bypassed the proxy" in nano["explanations"][0]

    negotiated = only("gpt-4o-2024-08-06")
    assert negotiated["price_mismatch"] is True and negotiated["bypassed_requests"] == 0
    assert usd_of(negotiated["difference_usd"]) < 0  # our negotiated rate is higher
    assert "different price" in negotiated["explanations"][0]

    unlisted = only("gpt-unlisted-preview")
    assert unlisted["unpriced_responses"] == 2 and unlisted["unpriced_tokens"] > 0
    assert usd_of(unlisted["tokentill_usd"]) == 0 and usd_of(unlisted["openai_usd"]) > 0
    assert "could not price" in unlisted["explanations"][0]

    garbled = only("o4-mini-2025-04-16")
    assert (garbled["openai_requests"], garbled["tokentill_requests"]) == (1, 0)
    assert garbled["error_responses"] == 2 and garbled["bypassed_requests"] == 0
    assert "ended in an error" in garbled["explanations"][0]

    cut = only("gpt-4.1-mini-2025-04-14")
    assert cut["interrupted_responses"] == 1 and cut["bypassed_requests"] == 0
    assert usd_of(cut["difference_usd"]) > 0
    assert cut["explanations"] == ["1 response interrupted before tokentill learned their usage"]

    # Days: totals add up, and a day with any difference passes a threshold of 0.
    assert sum(usd_of(d["openai_usd"]) for d in report["days"]) == sum(billed.values())
    assert usd_of(report["openai_total_usd"]) == sum(billed.values())
    assert report["flagged_days"] and all(d["flagged"] for d in report["days"])
    assert report["rolled_up_at"] is not None


def test_reconcile_refuses_clearly(
    reconciled: Running, fake: tuple[str, FakeUpstream], days: dict[str, str]
) -> None:
    url = reconciled.url + "/api/reconcile"
    inverted = httpx.get(url, params={"start": days["end"], "end": days["start"]})
    assert inverted.status_code == 422 and "after start" in inverted.json()["detail"][0]["msg"]
    assert httpx.get(url, params={"start": "2026-02-30", "end": days["end"]}).status_code == 422
    assert httpx.get(url, params={"start": days["start"]}).status_code == 422
    too_long = httpx.get(url, params={"start": "2020-01-01", "end": "2026-01-01"})
    assert too_long.status_code == 422 and "split the range" in too_long.json()["detail"][0]["msg"]
    far = httpx.get(url, params={"start": "9999-12-31", "end": "9999-12-31"})
    assert far.status_code == 422 and far.json()["detail"][0]["type"] == "less_than_equal"
    early = httpx.get(url, params={"start": "2019-12-01", "end": "2020-01-02"})
    assert early.status_code == 422 and "must be between" in early.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    ("overrides", "expected_status", "says"),
    [
        ({}, 409, "TOKENTILL_OPENAI_ADMIN_KEY"),
        ({"openai_admin_key": "sk-not-an-admin-key"}, 502, "api.usage.read"),
        ({"openai_admin_key": ADMIN_KEY, "openai_admin_url": "unreachable"}, 502, "unreachable"),
    ],
)
def test_reconcile_when_openai_cannot_answer(
    make_tokentill: Callable[..., Running],
    fake: tuple[str, FakeUpstream],
    days: dict[str, str],
    overrides: dict[str, Any],
    expected_status: int,
    says: str,
) -> None:
    if overrides.get("openai_admin_url") == "unreachable":
        overrides = {**overrides, "openai_admin_url": f"http://127.0.0.1:{free_port()}"}
    tokentill = make_tokentill(upstream=fake[0], **overrides)
    answer = httpx.get(tokentill.url + "/api/reconcile", params=days, timeout=60)
    assert answer.status_code == expected_status
    assert says in answer.json()["detail"]


def cost_export(fake_url: str, days: dict[str, str]) -> bytes:
    """OpenAI's cost export for the days, as its usage dashboard writes it: the Costs
    API's fields as columns, one row per day x line item."""
    start = int(datetime.fromisoformat(days["start"]).replace(tzinfo=UTC).timestamp())
    page = httpx.get(
        fake_url + "/v1/organization/costs",
        params={"start_time": start, "group_by": ["line_item", "project_id"], "limit": 30},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert page.status_code == 200
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "start_time",
            "end_time",
            "start_time_iso",
            "amount_value",
            "amount_currency",
            "line_item",
            "project_id",
        ]
    )
    for bucket in json.loads(page.text, parse_float=Decimal)["data"]:
        for result in bucket["results"]:
            writer.writerow(
                [
                    bucket["start_time"],
                    bucket["end_time"],
                    datetime.fromtimestamp(bucket["start_time"], UTC).isoformat(),
                    result["amount"]["value"],
                    result["amount"]["currency"],
                    result["line_item"],
                    result["project_id"],
                ]
            )
    return out.getvalue().encode()


def test_reconcile_a_cost_export(
    reconciled: Running, fake: tuple[str, FakeUpstream], days: dict[str, str]
) -> None:
    url = reconciled.url + "/api/reconcile/import"
    export = cost_export(fake[0], days)
    answer = httpx.post(url, params=days, files={"file": ("costs.csv", export, "text/csv")})
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["source"] == "cost_export"
    rows = {(date.fromisoformat(r["day"]), r["model"]): r for r in report["rows"]}
    for key, amount in fake_totals(fake[1]).items():
        assert usd_of(rows[key]["openai_usd"]) == amount, key
    assert all(row["openai_requests"] is None for row in rows.values())
    (nano,) = [r for (_, m), r in rows.items() if m == "gpt-5-nano-2025-08-07"]
    assert nano["bypassed_requests"] is None  # no request counts in an export...
    assert "saw none of its traffic" in nano["explanations"][0]  # ...but never seen at all
    (mini,) = [r for (_, m), r in rows.items() if m == "gpt-4o-mini-2024-07-18"]
    assert "may also be bypass" in mini["explanations"][0]

    # Without a range, the export's own days.
    whole = httpx.post(url, files={"file": ("costs.csv", export, "text/csv")})
    assert whole.status_code == 200
    assert whole.json()["openai_total_usd"] == report["openai_total_usd"]
    assert (report["start"], report["end"]) == (days["start"], days["end"])
    last_day = max(date.fromisoformat(d["day"]) for d in whole.json()["days"])
    assert date.fromisoformat(whole.json()["end"]) == last_day + timedelta(days=1)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"foo,bar\n1,2\n", "no 'start_time'"),
        (b"start_time,amount_value,line_item\n", "no rows"),
        (b"start_time,amount_value,line_item\nyesterday,1,gpt-4o\n", "line 2"),
        (b"date,amount_value,line_item\n2026-05-01,lots,gpt-4o\n", "not a number"),
        (b"date,amount,currency,line_item\n2026-05-01,1,eur,gpt-4o\n", "not usd"),
        (b"\xff\xfe\x00", "UTF-8"),
        (b"start_time,amount_value,line_item\n99999999999999,1,gpt-4o\n", "line 2"),
        (b"date,amount_value,line_item\n9999-12-31,1,gpt-4o\n", "must be between"),
        # A bare CR ends a line (it used to stop the csv module: a 500).
        (b"_\ro\xc3\xa9\n", "no 'start_time'"),
        # What the csv module refuses is a 422 too.
        (b"date,amount_value,line_item\n2026-05-01,1," + b"x" * 200_000 + b"\n", "not valid CSV"),
    ],
)
def test_a_bad_cost_export_gets_a_clear_422(reconciled: Running, content: bytes, says: str) -> None:
    answer = httpx.post(
        reconciled.url + "/api/reconcile/import",
        files={"file": ("costs.csv", content, "text/csv")},
    )
    assert answer.status_code == 422
    assert says in answer.json()["detail"][0]["msg"]


def test_reconcile_is_documented_in_openapi(reconciled: Running) -> None:
    schema = reconciled.app.api.openapi()
    assert "/api/reconcile" in schema["paths"] and "/api/reconcile/import" in schema["paths"]
    report = schema["components"]["schemas"]["ReconcileReport"]
    assert "rows" in report["properties"]


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
def test_a_cost_export_reads_with_any_line_end(end: bytes) -> None:
    """Spreadsheets write CRLF, old Mac tools CR alone: the same rows either way, and a
    line break inside a quoted field stays in the field."""
    rows = [b"date,amount_value,line_item", b'2026-05-01,1.5,"gpt-4o, input"', b"2026-05-02,2,o3"]
    bill = read_cost_export(end.join(rows) + end)
    assert bill.costs["model"].to_list() == ["gpt-4o", "o3"]
    assert [int(v) for v in bill.costs["openai_pico"]] == [1_500_000_000_000, 2_000_000_000_000]
