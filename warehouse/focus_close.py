"""FOCUS for closed months: the copy a close takes, and the corrections posted after it.

Closing month M copies M's FOCUS grain (`focus.live_grain`) into `closed_focus`; an
export reads M from that copy from then on (`focus.read_focus`), so a closed month's
export never changes. What later changes M (a late event, a background response settled
late, a price added with a past `effective_from`) is found by `post_corrections` after
each rollup run: it works M's changed days out again from the events, and posts the
difference from the copy (and from what it posted before) per grain row into
`focus_adjustments`, dated on today's day of the first open month after M (its last day,
if that month has ended but is not closed). The export shows them on that day as
`ChargeClass` Correction rows, billed in that month, for the day they correct.

Which days to look at: those of events committed since the last posting (ingest_seq past
`focus_marks.seq`) that fall in closed months, and the closed days on or after the
earliest `effective_from` of the prices added since (`focus_marks.price_mark`). Posting is
idempotent: it compares with the copy plus everything posted before. The grain is worked
out with today's `rollup_tag_keys` and `image_gen_model`: change them and the next
recomputed closed day posts the old tags out and the new ones in.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import duckdb
import polars as pl

from tokentill.warehouse.db import fetch_one, newest_seq, query_frame, registered, transaction
from tokentill.warehouse.focus import (
    GRAIN,
    GRAIN_KEYS,
    GRAIN_SUMS,
    FocusSettings,
    live_grain,
)
from tokentill.warehouse.periods import closed_periods, month_of, next_month, open_period_after


def close_month(
    conn: duckdb.DuckDBPyConnection, month: date, now: datetime, settings: FocusSettings
) -> None:
    """Inside a close's transaction: post what changed in months closed before (it may be
    billed in this one), then freeze this month's grain."""
    _post(conn, now, settings)
    _copy(conn, month, settings)


def post_corrections(
    conn: duckdb.DuckDBPyConnection, now: datetime, settings: FocusSettings
) -> int:
    """Post what changed in closed months since they were closed. Returns rows posted."""
    with transaction(conn):
        return _post(conn, now, settings)


def _copy(conn: duckdb.DuckDBPyConnection, month: date, settings: FocusSettings) -> None:
    _insert(conn, "closed_focus", live_grain(conn, month, next_month(month), settings))
    conn.execute("INSERT INTO focus_copied VALUES (?)", [month])


def _post(conn: duckdb.DuckDBPyConnection, now: datetime, settings: FocusSettings) -> int:
    uncopied = conn.execute(
        "SELECT period FROM closed_periods EXCEPT SELECT period FROM focus_copied"
    ).fetchall()
    for (period,) in uncopied:  # closed before closed_focus existed: copied as it is now
        _copy(conn, period, settings)
    closed = {p.period for p in closed_periods(conn)}
    upto = newest_seq(conn)
    row = fetch_one(conn, "SELECT coalesce(max(price_id), 0) FROM prices")
    price_mark = int(row[0]) if row else 0
    marks = fetch_one(conn, "SELECT seq, price_mark FROM focus_marks")
    seen = int(marks[0]) if marks else 0
    days: set[date] = set()
    if marks is None or int(marks[1]) != price_mark:
        # Prices added since: the closed days they can reach (from their effective_from).
        row = fetch_one(
            conn,
            """SELECT CAST(timezone('UTC', min(effective_from)) AS DATE) FROM prices
               WHERE price_id > ?""",
            [int(marks[1]) if marks else 0],
        )
        reach = row[0] if row and row[0] is not None else None
        if reach is not None:
            days |= {d for month in closed for d in _days_of(month) if d >= reach}
    changed = conn.execute(
        """SELECT DISTINCT CAST(timezone('UTC', created_at) AS DATE) FROM usage_events
           WHERE ingest_seq > ? AND ingest_seq <= ?""",
        [seen, upto],
    ).fetchall()
    days |= {row[0] for row in changed if month_of(row[0]) in closed}
    posted = 0
    for month in sorted({month_of(d) for d in days}):
        wanted = sorted(d for d in days if month_of(d) == month)
        posted += _post_month(conn, month, wanted, closed, now, settings)
    if marks is None or (int(marks[0]), int(marks[1])) != (upto, price_mark):
        conn.execute("DELETE FROM focus_marks")  # (a lake commits only when it moved)
        conn.execute("INSERT INTO focus_marks VALUES (?, ?, ?)", [upto, price_mark, now])
    return posted


def _post_month(
    conn: duckdb.DuckDBPyConnection,
    month: date,
    days: list[date],
    closed: set[date],
    now: datetime,
    settings: FocusSettings,
) -> int:
    first, last = days[0], days[-1] + timedelta(days=1)
    live = live_grain(conn, first, last, settings).filter(pl.col("day").is_in(days))
    held = query_frame(
        conn,
        f"""SELECT {", ".join(GRAIN)} FROM closed_focus WHERE day >= $a AND day < $b
            UNION ALL
            SELECT {", ".join(GRAIN)} FROM focus_adjustments WHERE day >= $a AND day < $b""",
        {"a": first, "b": last},
    ).filter(pl.col("day").is_in(days))
    change = difference(live, held)
    if change.height == 0:
        return 0
    period = open_period_after(closed, month)
    posted_day = min(now.astimezone(UTC).date(), next_month(period) - timedelta(days=1))
    _insert(
        conn,
        "focus_adjustments",
        change.select(
            pl.lit(period).alias("posted_period"),
            pl.lit(posted_day).alias("posted_day"),
            pl.lit(now).cast(pl.Datetime("us", "UTC")).alias("posted_at"),
            *GRAIN,
        ),
    )
    return change.height


def difference(live: pl.DataFrame, held: pl.DataFrame) -> pl.DataFrame:
    """What `live` has that `held` (rows of the same grain, summed per key) does not: per
    grain key, the live sums less the held ones, where any differs (a pure function)."""
    keys = list(GRAIN_KEYS)
    sums = [pl.col(c).sum() for c in GRAIN_SUMS]
    now = live.group_by(keys).agg(*sums)
    before = held.cast(GRAIN).group_by(keys).agg(*sums)  # type: ignore[arg-type]
    both = now.join(before, on=keys, how="full", coalesce=True, nulls_equal=True, suffix="_held")
    delta = both.select(
        *keys,
        *((pl.col(c).fill_null(0) - pl.col(f"{c}_held").fill_null(0)).alias(c) for c in GRAIN_SUMS),
    )
    differs = pl.any_horizontal(pl.col(c) != 0 for c in GRAIN_SUMS)
    return (
        delta.filter(differs)
        .with_columns(
            pl.col("quantity").cast(pl.Int64),
            pl.col("requests").cast(pl.Int64),
            pl.col("cost_pico").cast(pl.Decimal(38, 0)),
        )
        .select(list(GRAIN))
        .sort(keys, nulls_last=True)
    )


def _insert(conn: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame) -> None:
    if frame.height == 0:
        return
    columns = ", ".join(frame.columns)
    with registered(conn, "_focus_rows", frame):
        conn.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _focus_rows")


def _days_of(month: date) -> list[date]:
    return [month + timedelta(days=i) for i in range((next_month(month) - month).days)]
