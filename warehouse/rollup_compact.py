"""The usage rollups as appended partial sums, and their compaction.

An incremental run appends to `usage_hourly`, `usage_daily`, `usage_daily_tags`,
`usage_daily_users` and `usage_daily_models` the sums of what changed (new events, late
events, and for an event written again, its new sums less the ones counted before) and
never rewrites a stored row: a key may have several rows, one per part, and every
reader adds rows up by key. `rollup_parts` lists the parts appended per day.

Compaction folds a day's parts into one row per key (a key whose sums are all 0 has no
row, as after a rebuild), in the run's transaction, and forgets the day's parts: after
it the tables are those a full rebuild writes. It runs under the rollup job's lock, so
never beside an incremental run.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime

import polars as pl

from tokentill.warehouse import rollups, summaries
from tokentill.warehouse.rollup_run import Run, day_frame, on_days

# table -> (its keys, its measures, more columns kept by a function of the parts)
APPENDED: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]] = {
    "usage_hourly": (rollups.HOURLY_KEYS, rollups.USAGE_MEASURES, {}),
    "usage_daily": (rollups.HOURLY_KEYS, rollups.USAGE_MEASURES, {}),
    "usage_daily_tags": (rollups.TAG_KEYS, rollups.TAG_MEASURES, {}),
    # The user's first and last hour of the day: an event never leaves its hour or its
    # user, so the earliest and latest over the parts are exact.
    "usage_daily_users": (
        summaries.USER_KEYS,
        rollups.USAGE_MEASURES,
        {"first_hour": "min", "last_hour": "max"},
    ),
    "usage_daily_models": (summaries.MODEL_KEYS, rollups.USAGE_MEASURES, {}),
}


def changed(delta: pl.DataFrame, measures: tuple[str, ...]) -> pl.DataFrame:
    """The rows of a partial sum that change something (a key whose every sum is 0,
    such as an event written again with the same usage, adds nothing)."""
    if not delta.height:
        return delta
    return delta.filter(pl.any_horizontal(pl.col(m).fill_null(0) != 0 for m in measures))


def append(run: Run, deltas: dict[str, pl.DataFrame]) -> int:
    """Append each table's partial sums as a part; note the parts per day. Returns the
    rows written."""
    per_day: dict[date, int] = defaultdict(int)
    written = 0
    for table, delta in deltas.items():
        _, measures, _ = APPENDED[table]
        rows = changed(delta, measures)
        run.insert(table, rows)
        written += rows.height
        if rows.height:
            counts = rows.group_by(pl.col("bucket").dt.date().alias("day")).len()
            for day, count in counts.iter_rows():
                per_day[day] += count
    if per_day:
        run.insert(
            "rollup_parts",
            pl.DataFrame(
                {
                    "day": list(per_day),
                    "run_id": [run.run_id] * len(per_day),
                    "rows": list(per_day.values()),
                },
                schema={"day": pl.Date, "run_id": pl.Int64, "rows": pl.Int64},
            ),
        )
    return written


def forget(run: Run, days: list[datetime] | None) -> None:
    """The parts of `days` (all days: None) are gone: rebuilt or recomputed whole."""
    if days is None:
        run.execute("DELETE FROM rollup_parts")
    elif days:
        with run.registered("_days", day_frame(days)):
            run.execute(
                "DELETE FROM rollup_parts WHERE day IN (SELECT CAST(day AS DATE) FROM _days)"
            )


def compact(run: Run, days: list[datetime]) -> tuple[int, int]:
    """Fold the parts of `days` into one row per key. Returns (parts folded, rows
    written)."""
    if not days:
        return 0, 0
    within, bounds = on_days("bucket", days)
    with run.registered("_days", day_frame(days)):
        parts = run.scalar(
            "SELECT count(*) FROM rollup_parts WHERE day IN (SELECT CAST(day AS DATE) FROM _days)"
        )
    written = 0
    for table, (keys, measures, extra) in APPENDED.items():
        sums = ", ".join(f"sum({m}) AS {m}" for m in measures)
        kept = "".join(f", {fn}({c}) AS {c}" for c, fn in extra.items())
        nonzero = " OR ".join(f"coalesce(sum({m}), 0) <> 0" for m in measures)
        with run.registered("_days", day_frame(days)):
            run.execute(
                f"""CREATE OR REPLACE TEMP TABLE _folded AS
                    SELECT {", ".join(keys)}, {sums}{kept} FROM {table} WHERE {within}
                    GROUP BY ALL HAVING {nonzero} ORDER BY {", ".join(keys)}""",
                bounds,
            )
        run.delete_days(table, days)
        run.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _folded")
        written += run.scalar("SELECT count(*) FROM _folded")
    run.execute("DROP TABLE IF EXISTS _folded")
    forget(run, days)
    return parts, written


def days_to_compact(run: Run, max_parts: int, older_than: datetime) -> list[datetime]:
    """Days with more than `max_parts` parts, and days that ended by `older_than` with
    any (UTC days)."""
    found = run.read(
        """SELECT day FROM rollup_parts GROUP BY day
           HAVING count(*) > ? OR day + INTERVAL 1 DAY <= ? ORDER BY day""",
        [max_parts, older_than],
    )
    return [datetime(d.year, d.month, d.day, tzinfo=UTC) for d in found["day"].to_list()]
