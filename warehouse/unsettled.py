"""Responses the warehouse still holds as pending (queued, in progress, interrupted) that
no poller may be watching any more: their poller died with its process. The settlement
sweep (ingest/settlement.py) asks the upstream how they ended."""

from __future__ import annotations

from datetime import datetime

import duckdb

from tokentill.warehouse.events import PENDING_SQL


def unsettled(
    conn: duckdb.DuckDBPyConnection, *, since: datetime, before: datetime, limit: int = 10_000
) -> list[str]:
    """Ids of Responses API responses still pending, created in [since, before)."""
    rows = conn.execute(
        f"""SELECT response_id FROM usage_events
            WHERE endpoint = 'responses' AND response_id IS NOT NULL
              AND status IN ({PENDING_SQL}) AND created_at >= ? AND created_at < ?
            ORDER BY created_at LIMIT ?""",
        [since, before, limit],
    ).fetchall()
    return [str(row[0]) for row in rows]
