"""Reconciliation against OpenAI's bill: the pure comparison on hand-computed numbers,
the cost export import, and end to end through a real tokentill and the fake's own
organization Costs and Usage endpoints."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

import polars as pl

from warehouse.reconcile import (
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
    assert any("1 requests more than tokentill saw" in e for e in mini["explanations"])
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
    assert cut["explanations"] == [
        "1 responses were interrupted before tokentill learned their usage"
    ]

    o3 = rows[(D2, "o3-2025-04-16")]
    assert (o3["our_pico"], o3["diff_pico"], o3["bypassed_requests"]) == (0, usd("3"), 3)
    assert any("bypassed the proxy" in e for e in o3["explanations"])

    unlisted = rows[(D2, "gpt-unlisted")]
    assert (unlisted["unpriced"], unlisted["unpriced_tokens"]) == (1, 300)
    assert unlisted["explanations"] == [
        "1 responses (300 tokens) tokentill could not price: their cost is not in ours"
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
