"""The `quotas` table (migration 0005), and what the warehouse says a subject has used.

The proxy keeps its quota counters in memory; this is where they come from at start:
`used_before` sums, per subject, the events recorded before the process started (the
journal is replayed first) in one period's window, priced by the same pipeline as the
rollups. Everything recorded after start is counted live by the proxy, so the two never
overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import duckdb
import polars as pl

from tokentill.warehouse import pricing
from tokentill.warehouse.db import query_frame, transaction
from tokentill.warehouse.events import PENDING_SQL
from tokentill.warehouse.prices import price_table

# Requests tokentill refused itself: never forwarded, so never counted in a quota.
OWN_REFUSALS = (
    "user_quota_exceeded",
    "tag_quota_exceeded",
    "user_temporarily_blocked",
    "invalid_tokentill_user",
    "request_too_large",
    "client_disconnected",
    "quota_store_unavailable",
)


@dataclass(frozen=True)
class StoredLimit:
    scope: str  # user | default | tag
    subject_key: str
    subject_value: str
    unit: str
    period: str
    mode: str
    amount: int


def load_limits(conn: duckdb.DuckDBPyConnection) -> list[StoredLimit]:
    rows = conn.execute(
        """SELECT scope, subject_key, subject_value, unit, period, mode, amount FROM quotas
           ORDER BY scope, subject_key, subject_value, unit, period"""
    ).fetchall()
    return [StoredLimit(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6])) for r in rows]


def replace_limits(
    conn: duckdb.DuckDBPyConnection,
    scope: str,
    subject_key: str,
    subject_value: str,
    limits: Sequence[tuple[str, str, str, int]],
) -> bool:
    """Replace one subject's limits ((unit, period, mode, amount) each); an empty list
    removes them. Returns whether the subject had any before."""
    with transaction(conn):
        deleted = conn.execute(
            """DELETE FROM quotas WHERE scope = ? AND subject_key = ? AND subject_value = ?""",
            [scope, subject_key, subject_value],
        ).fetchone()
        now = datetime.now(UTC)
        for unit, period, mode, amount in limits:
            conn.execute(
                """INSERT INTO quotas (scope, subject_key, subject_value, unit, period, mode,
                       amount, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                [scope, subject_key, subject_value, unit, period, mode, Decimal(amount), now],
            )
    return bool(deleted and deleted[0])  # the count deleted (no RETURNING on a lake)


@dataclass(frozen=True)
class UsedBefore:
    """What one subject used in one window, from the warehouse."""

    subject_key: str  # user id, or the tag's value
    pico: int
    tokens: int
    requests: int
    unpriced: int


def used_before(
    conn: duckdb.DuckDBPyConnection,
    *,
    recorded_before: datetime,
    window_start: datetime,
    image_model: str,
    users: Sequence[str] | None = None,
    tag_key: str | None = None,
    tag_values: Sequence[str] | None = None,
    settled: bool = False,
) -> list[UsedBefore]:
    """Per user (or per value of `tag_key`): cost, tokens and requests of the events
    created since `window_start` and recorded before `recorded_before`. `users` None
    (with no tag) means every user. `settled`: only responses whose outcome was recorded
    before `recorded_before` (not pending, and settled before it): what shared counters
    count live from that moment is left out, whenever its response began."""
    if tag_key is not None:
        if '"' in tag_key or "\\" in tag_key:
            raise ValueError(f"tag key {tag_key!r} cannot be read from metadata")
        subject = f"json_extract_string(metadata, '$.\"{tag_key}\"')"
    else:
        subject = "user_id"
    wanted = users if tag_key is None else tag_values
    params: list[object] = [recorded_before, window_start, *OWN_REFUSALS]
    where = f"""recorded_at < ? AND created_at >= ?
                AND coalesce(error_code, '') NOT IN ({", ".join("?" for _ in OWN_REFUSALS)})"""
    if settled:
        where += f""" AND status NOT IN ({PENDING_SQL})
                      AND coalesce(settled_at, recorded_at) < ?"""
        params.append(recorded_before)
    if wanted is not None:
        if not wanted:
            return []
        where += f" AND {subject} IN ({', '.join('?' for _ in wanted)})"
        params.extend(wanted)
    counts = ", ".join(pricing.PRICED_FIELDS)
    events = query_frame(
        conn,
        f"""SELECT {subject} AS subject, model, service_tier, created_at, total_tokens, {counts}
            FROM usage_events WHERE {where} AND {subject} IS NOT NULL""",
        params,
    )
    if events.height == 0:
        return []
    return _sum_by_subject(events, price_table(conn), image_model)


def _sum_by_subject(
    events: pl.DataFrame, prices: pl.DataFrame, image_model: str
) -> list[UsedBefore]:
    models = pricing.model_map(
        events["model"].unique().to_list(), prices["model"].unique().to_list()
    )
    priced = pricing.price_events(
        events.lazy(), models.lazy(), pricing.effective_intervals(prices).lazy(), image_model
    )
    sums = (
        priced.group_by("subject")
        .agg(
            pl.col("cost_pico").fill_null(0).cast(pl.Int128).sum().alias("pico"),
            pl.coalesce(pl.col("total_tokens"), pl.col("input_tokens") + pl.col("output_tokens"))
            .sum()
            .alias("tokens"),
            pl.len().alias("requests"),
            pl.col("unpriced").sum().alias("unpriced"),
        )
        .collect()
    )
    return [
        UsedBefore(
            str(r["subject"]),
            int(r["pico"]),
            int(r["tokens"]),
            int(r["requests"]),
            int(r["unpriced"]),
        )
        for r in sums.to_dicts()
    ]
