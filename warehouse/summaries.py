"""Summaries of the daily rollup: per day x end user, and per day x model (x tier,
status, endpoint), refreshed for the days a rollup run recomputed.

They are sums of `usage_daily` (and, for the first and last hour a user was seen, of
`usage_hourly`) and nothing else, so they are plain DuckDB SQL next to the tables they
read: no pricing or event logic lives here. With 10,000 users, 90 days of usage_daily
hold millions of rows; these hold a user-day or a model-day each.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import duckdb
import polars as pl

from warehouse.rollups import USAGE_MEASURES

# usage_daily's measures, in its column order (the summaries keep the same).
_SUMS = USAGE_MEASURES
_TOTALS = ", ".join(f"sum({c}) AS {c}" for c in _SUMS)
SUMMARY_TABLES = ("usage_daily_users", "usage_daily_models")


def refresh(conn: duckdb.DuckDBPyConnection, days: Sequence[datetime] | None) -> int:
    """Recompute the summaries of `days` (UTC midnights), or of every day (None), in the
    caller's transaction. Returns the rows written."""
    if days is not None and not days:
        return 0
    if days is None:
        where = "true"
        for table in SUMMARY_TABLES:
            conn.execute(f"DELETE FROM {table}")
    else:
        conn.register(
            "_summary_days",
            pl.DataFrame({"day": list(days)}, schema={"day": pl.Datetime("us", "UTC")}),
        )
        # The bounds let zone maps skip the rest of the table; IN alone would not.
        low, high = min(days), max(days) + timedelta(days=1)
        where = (
            f"bucket >= '{low.isoformat()}' AND bucket < '{high.isoformat()}' "
            "AND bucket IN (SELECT day FROM _summary_days)"
        )
        for table in SUMMARY_TABLES:
            conn.execute(f"DELETE FROM {table} WHERE {where}")
    hours = where.replace("AND bucket IN", "AND date_trunc('day', bucket) IN")
    try:
        users = conn.execute(
            f"""INSERT INTO usage_daily_users
                SELECT d.*, h.first_hour, h.last_hour
                FROM (SELECT bucket, user_id, {_TOTALS} FROM usage_daily WHERE {where}
                      GROUP BY bucket, user_id) AS d
                JOIN (SELECT date_trunc('day', bucket) AS bucket, user_id,
                             min(bucket) AS first_hour, max(bucket) AS last_hour
                      FROM usage_hourly WHERE {hours} GROUP BY ALL) AS h
                  ON h.bucket = d.bucket AND h.user_id IS NOT DISTINCT FROM d.user_id
                -- in day order: zone maps then skip the days outside a report's range
                ORDER BY d.bucket, d.user_id"""
        ).fetchall()
        models = conn.execute(
            f"""INSERT INTO usage_daily_models
                SELECT bucket, model, service_tier, status, endpoint, {_TOTALS}
                FROM usage_daily WHERE {where} GROUP BY ALL ORDER BY bucket"""
        ).fetchall()
    finally:
        if days is not None:
            conn.unregister("_summary_days")
    return int(users[0][0]) + int(models[0][0])
