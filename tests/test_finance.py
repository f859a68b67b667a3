"""Finance: cents that add up in every section, closed months that never change, and
late changes posted as adjustments in the next open month."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_rollups import Warehouse, make_event
from tokentill.warehouse.catalog import EPOCH, PriceRow
from tokentill.warehouse.finance import FinanceQuery, allocate, cents, finance_report
from tokentill.warehouse.periods import PeriodError, close_period, post_adjustments
from tokentill.warehouse.prices import insert_rows

NOW = datetime(2026, 11, 25, tzinfo=UTC)
MAY, JUNE, JULY = date(2026, 5, 1), date(2026, 6, 1), date(2026, 7, 1)


@given(
    values=st.lists(st.integers(-(10**16), 10**16), min_size=1, max_size=40),
)
def test_cents_are_allocated_to_add_up_and_each_within_a_cent(values: list[int]) -> None:
    target = cents(sum(values))
    out = allocate(values, target)
    assert sum(out) == target
    for value, got in zip(values, out, strict=True):
        assert value // 10**10 <= got <= -(-value // 10**10)


def test_cents_round_half_up_once() -> None:
    assert cents(5 * 10**9) == 1  # half a cent
    assert cents(5 * 10**9 - 1) == 0
    assert cents(-5 * 10**9) == -1
    assert allocate([3 * 10**9] * 3, cents(9 * 10**9)) == [1, 0, 0]


@pytest.fixture
def warehouse(tmp_path: Path) -> Iterator[Warehouse]:
    w = Warehouse(tmp_path)
    yield w
    w.close()


def _report(w: Warehouse, start: date, end: date) -> pl.DataFrame:
    return finance_report(w.conn, FinanceQuery(start, end, "team"))


def _check_adds_up(report: pl.DataFrame) -> None:
    months = report.filter(pl.col("section") == "total", pl.col("month").is_not_null())
    grand = report.filter(pl.col("section") == "total", pl.col("month").is_null()).row(
        0, named=True
    )
    assert months["cost_cents"].sum() == grand["cost_cents"]
    assert grand["cost_cents"] == cents(int(grand["cost_pico"]))
    for total in months.iter_rows(named=True):
        rows = report.filter(pl.col("month") == total["month"])
        adjusted = rows.filter(pl.col("section") == "adjustment")
        for section in ("model", "endpoint", "user", "tag"):
            part = rows.filter(pl.col("section") == section)
            # Each breakdown plus the month's adjustments is the month's total, to the
            # pico-dollar and to the cent.
            assert part["cost_pico"].sum() + (adjusted["cost_pico"].sum() or 0) == Decimal(
                total["cost_pico"]
            )
            assert (
                part["cost_cents"].sum() + (adjusted["cost_cents"].sum() or 0)
                == (total["cost_cents"])
            )


def test_a_closed_month_never_changes_and_late_changes_post_to_the_next_open_one(
    warehouse: Warehouse,
) -> None:
    w = warehouse
    w.ingest([make_event(i, day=i % 4, hour=i % 24) for i in range(200)])  # May
    w.ingest([make_event(1000 + i, day=31 + i % 3, hour=5) for i in range(50)])  # June
    assert w.job.run().error is None
    before = _report(w, MAY, JULY)
    _check_adds_up(before)
    live_may = w.conn.execute(
        "SELECT sum(cost_pico) FROM usage_daily WHERE bucket < ?", [JUNE]
    ).fetchall()[0][0]
    may_total = before.filter(pl.col("section") == "total", pl.col("month") == MAY)
    assert may_total["cost_pico"][0] == live_may

    with pytest.raises(PeriodError, match="not ended"):
        close_period(w.conn, date(2026, 11, 1), "alice", None, NOW)
    close_period(w.conn, MAY, "alice", "books closed", NOW)
    with pytest.raises(PeriodError, match="already closed"):
        close_period(w.conn, MAY, "alice", None, NOW)

    # Late events for May (a background response finished late, an upstream replay),
    # and a price for the model that had none, effective since long ago.
    w.ingest([make_event(5000 + i, day=2, hour=3) for i in range(20)])
    insert_rows(
        w.conn,
        [
            PriceRow(
                "mystery-model",
                "default",
                EPOCH,
                None,
                {"input_per_mtok": Decimal("3"), "output_per_mtok": Decimal("12")},
                "test",
                100,
            )
        ],
    )
    assert w.job.run().error is None
    posted = post_adjustments(w.conn, NOW)
    assert posted > 0
    assert post_adjustments(w.conn, NOW) == 0  # idempotent

    after = _report(w, MAY, JULY)
    _check_adds_up(after)
    may = pl.col("month") == MAY
    # May, closed, reads exactly as it did.
    assert after.filter(may).equals(before.filter(may))
    adjustments = after.filter(pl.col("section") == "adjustment")
    assert adjustments.height and set(adjustments["month"].to_list()) == {JUNE}
    assert set(adjustments["for_period"].to_list()) == {MAY}
    live_may_now = w.conn.execute(
        "SELECT sum(cost_pico) FROM usage_daily WHERE bucket < ?", [JUNE]
    ).fetchall()[0][0]
    assert adjustments["cost_pico"].sum() == live_may_now - live_may > 0
    assert adjustments["requests"].sum() == 20

    # Close June too: the next late change for May posts into July.
    close_period(w.conn, JUNE, "alice", None, NOW)
    june_closed = _report(w, JUNE, JULY)
    w.ingest([make_event(9000, day=1, hour=1)])
    assert w.job.run().error is None
    assert post_adjustments(w.conn, NOW) >= 1
    assert _report(w, JUNE, JULY).equals(june_closed)
    july = _report(w, JULY, date(2026, 8, 1)).filter(pl.col("section") == "adjustment")
    assert july["requests"].sum() == 1 and july["for_period"].to_list() == [MAY]
