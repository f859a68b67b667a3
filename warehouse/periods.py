"""Closed periods and the adjustments that late changes post after a close.

Closing month M copies its rollup rows into `closed_daily` / `closed_daily_tags`; finance
reports read those copies for M from then on, so M's report never changes. Anything that
later changes M's rollups (a late event, a background response completed hours later, a
price added with a past `effective_from`) is found by `post_adjustments`, which posts
the difference, per day and rollup key, as rows of `period_adjustments` dated in the
next open month. Posting is idempotent: it compares the live rollups with the copy plus
what was already posted, so running it twice posts nothing the second time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import duckdb

from tokentill.warehouse.db import fetch_one, transaction
from tokentill.warehouse.spend import COUNTS


class PeriodError(ValueError):
    """A close that cannot be done, with why."""


@dataclass(frozen=True)
class ClosedPeriod:
    period: date
    closed_at: datetime
    closed_by: str
    note: str | None


def month_of(day: date) -> date:
    return date(day.year, day.month, 1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def _moment(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def closed_periods(conn: duckdb.DuckDBPyConnection) -> list[ClosedPeriod]:
    rows = conn.execute(
        "SELECT period, closed_at, closed_by, note FROM closed_periods ORDER BY period"
    ).fetchall()
    return [ClosedPeriod(*row) for row in rows]


def open_period_after(closed: set[date], month: date) -> date:
    """The first month after `month` that is not closed: where its adjustments post."""
    candidate = next_month(month)
    while candidate in closed:
        candidate = next_month(candidate)
    return candidate


def close_period(
    conn: duckdb.DuckDBPyConnection,
    period: date,
    by: str,
    note: str | None,
    now: datetime,
    *,
    also: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
) -> ClosedPeriod:
    """Close `period`; `also` freezes more of it in the same transaction (the FOCUS
    export's copy: `focus_close.close_month`)."""
    if period.day != 1:
        raise PeriodError(f"{period}: a period is a month; give its first day (YYYY-MM-01)")
    if _moment(next_month(period)) > now:
        raise PeriodError(f"{period:%Y-%m} has not ended yet: it can be closed from its last day")
    with transaction(conn):
        if fetch_one(conn, "SELECT 1 FROM closed_periods WHERE period = ?", [period]):
            raise PeriodError(f"{period:%Y-%m} is already closed")
        # Earlier closed months' late changes land in the first open month, which may be
        # this one: post them before its figures are frozen.
        _post(conn, now)
        start, end = _moment(period), _moment(next_month(period))
        conn.execute(
            "INSERT INTO closed_daily SELECT * FROM usage_daily WHERE bucket >= ? AND bucket < ?",
            [start, end],
        )
        conn.execute(
            """INSERT INTO closed_daily_tags SELECT * FROM usage_daily_tags
               WHERE bucket >= ? AND bucket < ?""",
            [start, end],
        )
        if also is not None:
            also(conn)
        conn.execute("INSERT INTO closed_periods VALUES (?, ?, ?, ?)", [period, now, by, note])
    return ClosedPeriod(period, now, by, note)


def post_adjustments(conn: duckdb.DuckDBPyConnection, now: datetime) -> int:
    """Post what changed in closed months since they were closed. Returns rows posted."""
    with transaction(conn):
        return _post(conn, now)


_DAILY_KEYS = "bucket, user_id, model, service_tier, status, endpoint"
_DAILY_SUMS = (*COUNTS, "cost_pico", "unpriced")
_TAG_KEYS = "bucket, tag_key, tag_value, model"
_TAG_SUMS = ("requests", "input_tokens", "output_tokens", "total_tokens", "cost_pico", "unpriced")


def _difference_sql(kind: str, keys: str, sums: tuple[str, ...], live: str, copy: str) -> str:
    """Live rollup minus (the copy taken at close + adjustments already posted), per key;
    rows where nothing differs are dropped."""
    positive = ", ".join(sums)
    negative = ", ".join(f"-{s}" for s in sums)
    totals = ", ".join(f"sum({s}) AS {s}" for s in sums)
    changed = " OR ".join(f"sum({s}) <> 0" for s in sums)
    return f"""
        SELECT {keys}, {totals} FROM (
            SELECT {keys}, {positive} FROM {live} WHERE bucket >= $start AND bucket < $end
            UNION ALL
            SELECT {keys}, {negative} FROM {copy} WHERE bucket >= $start AND bucket < $end
            UNION ALL
            SELECT {keys}, {negative} FROM period_adjustments
            WHERE for_period = $period AND kind = '{kind}'
        ) GROUP BY {keys} HAVING {changed}"""


def _post(conn: duckdb.DuckDBPyConnection, now: datetime) -> int:
    closed = {p.period for p in closed_periods(conn)}
    before = fetch_one(conn, "SELECT count(*) FROM period_adjustments")
    for period in sorted(closed):
        params = {
            "start": _moment(period),
            "end": _moment(next_month(period)),
            "period": period,
            "posted": open_period_after(closed, period),
            "now": now,
        }
        daily = _difference_sql("daily", _DAILY_KEYS, _DAILY_SUMS, "usage_daily", "closed_daily")
        conn.execute(
            f"""INSERT INTO period_adjustments (posted_period, posted_at, for_period, kind,
                    {_DAILY_KEYS}, {", ".join(_DAILY_SUMS)})
                SELECT $posted, $now, $period, 'daily', * FROM ({daily})""",
            params,
        )
        tags = _difference_sql(
            "tags", _TAG_KEYS, _TAG_SUMS, "usage_daily_tags", "closed_daily_tags"
        )
        conn.execute(
            f"""INSERT INTO period_adjustments (posted_period, posted_at, for_period, kind,
                    {_TAG_KEYS}, {", ".join(_TAG_SUMS)})
                SELECT $posted, $now, $period, 'tags', * FROM ({tags})""",
            params,
        )
    after = fetch_one(conn, "SELECT count(*) FROM period_adjustments")
    return int(after[0] if after else 0) - int(before[0] if before else 0)


def adjustments(
    conn: duckdb.DuckDBPyConnection, posted_in: date | None, limit: int
) -> list[dict[str, Any]]:
    """Adjustments posted after closes, oldest first: all, or those posted in the month
    `posted_in`."""
    where, args = "kind = 'daily'", list[object]()
    if posted_in is not None:
        where += " AND posted_period >= ? AND posted_period < ?"
        args = [posted_in, next_month(posted_in)]
    cursor = conn.execute(
        f"""SELECT adjustment_id, posted_period, posted_at, for_period,
                   CAST(bucket AS DATE) AS day, user_id, model, requests, total_tokens,
                   cost_pico
            FROM period_adjustments WHERE {where} ORDER BY adjustment_id LIMIT ?""",
        [*args, limit],
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
