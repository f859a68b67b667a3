"""Rollups recomputed whole from the raw events: every day (a full rebuild), or some days
(those a price added or corrected since the last run may cover).

Days are rolled up one at a time (a day's groups fit in the CPU's caches, where a week's
do not, and grouping is most of the work), read a few days at a time (`spans`), and
written in batches (`Batch`). A rebuild commits as it goes; a recompute of some days is
part of its incremental run's transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime, timedelta

import duckdb
import polars as pl

from tokentill.warehouse import conversations, rollup_compact, rollups, summaries
from tokentill.warehouse.events import PENDING_SQL, PENDING_STATUSES
from tokentill.warehouse.rollup_run import (
    COUNTED_COLUMNS,
    DAY_TABLES,
    USAGE_COLUMNS,
    Batch,
    Run,
    day_frame,
    on_day,
    on_days,
)


def rebuild(run: Run) -> tuple[int, int, int]:
    """Every rollup from the events up to the watermark. Returns days, rows in, rows out."""
    with run.phases.step("rebuild"):
        for table in (*DAY_TABLES, "conversation_links", "conversations"):
            run.execute(f"DELETE FROM {table}")
        rollup_compact.forget(run, None)
        run.insert("conversation_links", conversations.all_links(run))
        per_day = events_per_day(run, None)
        rows_in, rows_out, _ = recompute(run, per_day, replace=False)
    with run.phases.step("conversations"):
        rows_out += conversations.totals_in_parts(run)
    return len(per_day), rows_in, rows_out


def recompute(
    run: Run, per_day: dict[datetime, int], *, replace: bool
) -> tuple[int, int, set[str]]:
    """Every rollup of whole days (their summaries and pending events included), given
    with their numbers of events. Returns rows in, rows out, and when replacing days, the
    conversations they hold (whose totals are then out of date)."""
    days = list(per_day)
    if replace:
        for table in DAY_TABLES:
            run.delete_days(table, days)
        rollup_compact.forget(run, days)
    rows_in, batch = 0, Batch()
    roots: set[str] = set()
    with _membership(run, None if not replace else days):
        for span in spans(per_day, run.config.read_rows):
            run.check_cancelled()
            events = _read(run, span[0], span[-1] + timedelta(days=1))
            rows_in += events.height
            for day in span:
                outputs = _roll_day(run, on_day(events, day))
                if replace:
                    roots.update(outputs["conversation_days"]["root_id"].unique().to_list())
                batch.add(outputs)
                if batch.rows >= run.config.batch_rows:
                    batch.write(run)
                    if not replace:
                        # A rebuild commits as it goes: DuckDB keeps much of what a
                        # transaction wrote in memory until it commits. One that fails
                        # is finished by the next run (see `RollupJob`).
                        run.execute("COMMIT")
                        run.execute("BEGIN TRANSACTION")
            del events
        batch.write(run)
    return rows_in, batch.written, roots


def events_per_day(run: Run, days: list[datetime] | None) -> dict[datetime, int]:
    """Events per UTC day, in order: every day's, or those of `days` (0 where none)."""
    if days is not None and not days:
        return {}
    where, params = "ingest_seq <= ? AND created_at IS NOT NULL", list[object]([run.watermark])
    if days is not None:
        within, bounds = on_days("created_at", days)
        where, params = f"{where} AND {within}", [*params, *bounds]
    with run.registered("_days", day_frame(days or [])), run.phases.kind("read"):
        counted: dict[datetime, int] = dict(
            run.conn.execute(
                f"""SELECT date_trunc('day', created_at) AS day, count(*) FROM usage_events
                    WHERE {where} GROUP BY day""",
                params,
            ).fetchall()
        )
    if days is None:
        return dict(sorted(counted.items()))
    return {day: counted.get(day, 0) for day in sorted(days)}


def spans(per_day: dict[datetime, int], read_rows: int) -> Iterator[list[datetime]]:
    """The days in runs of consecutive days of up to `read_rows` events (or one day)."""
    span: list[datetime] = []
    events = 0
    for day, count in per_day.items():
        if span and (day - span[-1] != timedelta(days=1) or events + count > read_rows):
            yield span
            span, events = [], 0
        span.append(day)
        events += count
    if span:
        yield span


def _read(run: Run, start: datetime, end: datetime) -> pl.DataFrame:
    """The events of [start, end), each with its conversation (from `_membership`)."""
    return run.read(
        f"""SELECT {run.select(USAGE_COLUMNS, tags=True)}, e.response_id,
                CASE WHEN e.status IN ({PENDING_SQL}) THEN e.event_id END AS event_id,
                c.root_id AS conversation_root
            FROM usage_events AS e LEFT JOIN _in_conversation AS c
              ON c.response_id = e.response_id AND c.created_at = e.created_at
             AND c.created_at >= ? AND c.created_at < ?
            WHERE e.created_at >= ? AND e.created_at < ? AND e.ingest_seq <= ?""",
        [start, end, start, end, run.watermark],
    )


def _roll_day(run: Run, events: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """One day's events rolled up: the rows of every table holding days."""
    # Priced once, eagerly: collecting the branches together prices every branch.
    priced = run.compute(run.price(events)).lazy()
    hourly, tags, conv, counted = run.compute_all(
        [
            rollups.hourly(priced),
            rollups.daily_tags(priced, list(run.config.tag_keys)),
            rollups.conversation_days(priced),
            priced.filter(pl.col("status").is_in(list(PENDING_STATUSES))).select(COUNTED_COLUMNS),
        ]
    )
    daily, users, models = run.compute_all(
        [
            rollups.daily(hourly.lazy()),
            summaries.users(hourly.lazy()),
            summaries.models(hourly.lazy()),
        ]
    )
    return {
        "usage_hourly": hourly,
        "usage_daily": daily,
        "usage_daily_tags": tags,
        "conversation_days": conv,
        "usage_daily_users": users,
        "usage_daily_models": models,
        "rollup_pending": counted,
    }


@contextlib.contextmanager
def _membership(run: Run, days: list[datetime] | None) -> Iterator[None]:
    """`_in_conversation`, a temporary table for recomputing days: each response in a
    conversation (its id and time) -> its root, roots included. One join for all the
    days (each day's read then joins its own slice: the table is in the events' order,
    so zone maps skip the rest); in-memory tables are not compressed, so it is kept
    small."""
    where, params = "e.ingest_seq <= ?", list[object]([run.watermark])
    if days is not None:
        where += " AND date_trunc('day', e.created_at) IN (SELECT day FROM _days)"
    with run.registered("_days", day_frame(days or [])), run.phases.kind("read"):
        run.conn.execute(
            f"""CREATE OR REPLACE TEMP TABLE _in_conversation AS
                WITH members AS (
                    SELECT response_id, root_id FROM conversation_links
                    UNION ALL SELECT DISTINCT root_id, root_id FROM conversation_links
                )
                -- DISTINCT: a day's read joins on (id, time), and must not see an
                -- event twice when the same response was recorded twice
                SELECT DISTINCT e.created_at, e.response_id, m.root_id
                FROM usage_events AS e JOIN members AS m ON m.response_id = e.response_id
                WHERE {where}""",
            params,
        )
    try:
        yield
    finally:
        with contextlib.suppress(duckdb.Error):  # a failed transaction drops it anyway
            run.conn.execute("DROP TABLE IF EXISTS _in_conversation")
