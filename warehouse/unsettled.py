"""Responses the warehouse still holds as pending (queued, in progress, interrupted) that
no poller may be watching any more: their poller died with its process. The settlement
sweep (ingest/settlement.py) asks the upstream how they ended."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import duckdb

from tokentill.warehouse.events import PENDING_SQL


@dataclass(frozen=True)
class Unsettled:
    """A pending response, and whom it counts for (its settled outcome is charged to
    them: shared quota counters charge an outcome no reservation of theirs awaits)."""

    response_id: str
    user_id: str | None
    metadata: str | None


def unsettled(
    conn: duckdb.DuckDBPyConnection,
    *,
    since: datetime,
    before: datetime,
    streams_before: datetime | None = None,
    limit: int = 10_000,
) -> list[Unsettled]:
    """Responses API responses still pending, created in [since, before); a streamed one
    only if created before `streams_before` too, when given (its own proxy is reading it
    to its end: another node polling it would race that proxy's record of it)."""
    streams, params = "", [since, before]
    if streams_before is not None:
        streams = "AND (NOT coalesce(streamed, false) OR created_at < ?)"
        params.append(streams_before)
    rows = conn.execute(
        f"""SELECT response_id, user_id, metadata FROM usage_events
            WHERE endpoint = 'responses' AND response_id IS NOT NULL
              AND status IN ({PENDING_SQL}) AND created_at >= ? AND created_at < ?
              {streams}
            ORDER BY created_at LIMIT ?""",
        [*params, limit],
    ).fetchall()
    return [Unsettled(str(row[0]), row[1], row[2]) for row in rows]
