"""The `alerts` table (migration 0005): quota thresholds and abuse flags, one row each.

An alert is raised once: `dedupe_key` is unique (for a quota threshold it names the
subject, unit, period, window and threshold), and inserting a key already there does
nothing. That is also how "once per period" survives a restart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import duckdb
import polars as pl

from tokentill.warehouse.db import fetch_one, query_frame

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")


@dataclass(frozen=True)
class Alert:
    dedupe_key: str
    kind: str  # quota_threshold | abuse | quota_store | billing_sink
    rule: str  # what fired: "usd/day 80%", "spend_spike", ...
    severity: Severity
    message: str
    user_id: str | None = None
    subject: str | None = None  # "user:alice", "tag:customer=acme"
    window_start: datetime | None = None
    window_end: datetime | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def payload(self) -> dict[str, Any]:
        """The JSON a webhook receives."""
        return {
            "dedupe_key": self.dedupe_key,
            "kind": self.kind,
            "rule": self.rule,
            "severity": self.severity,
            "message": self.message,
            "user_id": self.user_id,
            "subject": self.subject,
            "window_start": _iso(self.window_start),
            "window_end": _iso(self.window_end),
            "evidence": self.evidence,
            "created_at": _iso(self.created_at),
        }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def insert_alerts(conn: duckdb.DuckDBPyConnection, alerts: Sequence[Alert]) -> list[Alert]:
    """Insert the alerts not already raised; return those that are new."""
    fresh = []
    for alert in alerts:
        # Once per dedupe key. Not ON CONFLICT: a lake has no unique keys (the file's
        # UNIQUE still guards it). The number is taken only for an alert that is new.
        row = fetch_one(
            conn,
            """INSERT INTO alerts (alert_id, dedupe_key, kind, rule, severity, message, user_id,
                   subject, window_start, window_end, evidence, created_at)
               SELECT tokentill_next_id('alert_id_seq'), $1, $2, $3, $4, $5, $6, $7, $8, $9,
                   $10, $11
               WHERE NOT EXISTS (SELECT 1 FROM alerts WHERE dedupe_key = $1)""",
            [
                alert.dedupe_key,
                alert.kind,
                alert.rule,
                alert.severity,
                alert.message,
                alert.user_id,
                alert.subject,
                alert.window_start,
                alert.window_end,
                json.dumps(alert.evidence, default=str),
                alert.created_at,
            ],
        )
        if row is not None and row[0]:
            fresh.append(alert)
    return fresh


def list_alerts(
    conn: duckdb.DuckDBPyConnection,
    *,
    user_id: str | None = None,
    kind: str | None = None,
    severities: Sequence[str] = (),
    since: datetime | None = None,
    until: datetime | None = None,
    acknowledged: bool | None = None,
    limit: int = 100,
) -> pl.DataFrame:
    where: list[str] = ["true"]
    params: list[object] = []
    if user_id is not None:
        where.append("user_id = ?")
        params.append(user_id)
    if kind is not None:
        where.append("kind = ?")
        params.append(kind)
    if severities:
        where.append(f"severity IN ({', '.join('?' for _ in severities)})")
        params.extend(severities)
    if since is not None:
        where.append("created_at >= ?")
        params.append(since)
    if until is not None:
        where.append("created_at < ?")
        params.append(until)
    if acknowledged is not None:
        where.append("acknowledged_at IS NOT NULL" if acknowledged else "acknowledged_at IS NULL")
    params.append(limit)
    return query_frame(
        conn,
        f"""SELECT * FROM alerts WHERE {" AND ".join(where)}
            ORDER BY created_at DESC, alert_id DESC LIMIT ?""",
        params,
    )


def acknowledge(conn: duckdb.DuckDBPyConnection, alert_id: int, by: str | None) -> bool:
    """Mark an alert acknowledged (the first acknowledgement stands). False: no such alert."""
    row = fetch_one(
        conn,
        """UPDATE alerts SET acknowledged_at = coalesce(acknowledged_at, ?),
               acknowledged_by = coalesce(acknowledged_by, ?)
           WHERE alert_id = ?""",
        [datetime.now(UTC), by, alert_id],
    )
    return bool(row and row[0])  # the count of rows updated (no RETURNING on a lake)


def alert_by_id(conn: duckdb.DuckDBPyConnection, alert_id: int) -> dict[str, Any] | None:
    """One alert as the API shows it (its evidence decoded), or None."""
    frame = query_frame(conn, "SELECT * FROM alerts WHERE alert_id = ?", [alert_id])
    if not frame.height:
        return None
    row = frame.drop("dedupe_key").to_dicts()[0]
    row["evidence"] = json.loads(row["evidence"]) if row["evidence"] else {}
    return row


def open_quota_alert_keys(conn: duckdb.DuckDBPyConnection) -> set[str]:
    """The dedupe keys of quota alerts whose period has not ended (not to raise again)."""
    rows = conn.execute(
        """SELECT dedupe_key FROM alerts WHERE kind = 'quota_threshold'
           AND (window_end IS NULL OR window_end > ?)""",
        [datetime.now(UTC)],
    ).fetchall()
    return {str(row[0]) for row in rows}
