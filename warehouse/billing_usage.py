"""What a billing sink sends, and where it has got to (tokentill/billing_sinks.py sends).

A sink walks `usage_events` in the order they were committed, (ingest_seq, event_id),
from its mark (`sink_marks`, migration 0018). Each page it reads becomes *records*: the
settled responses of the page (completed, incomplete, failed, cancelled: a response the
upstream answered, with the usage it billed), priced by the catalog in force at their
`created_at` and split into their charges, each with the subject it is billed to (the
end user, or a metadata tag's value such as `customer`). Pending responses are passed
over: they come back with a newer ingest_seq when they settle, and are sent then.

`sink_records` is a pure pipeline; the rest reads and writes the sink's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import duckdb
import polars as pl

from tokentill.warehouse import pricing
from tokentill.warehouse.db import fetch_one, query_frame, transaction
from tokentill.warehouse.events import TERMINAL_STATUSES
from tokentill.warehouse.prices import Catalog
from tokentill.warehouse.rollups import TOKEN_COUNTS

# Settled responses: "error" rows are requests that never had one (nothing was billed).
BILLABLE_STATUSES = tuple(sorted(TERMINAL_STATUSES - {"error"}))
_PAGE_COLUMNS = (
    "ingest_seq",
    "event_id",
    "response_id",
    "endpoint",
    "model",
    "service_tier",
    "status",
    "user_id",
    "metadata",
    "created_at",
    "reasoning_tokens",
    "total_tokens",
    *pricing.PRICED_FIELDS,
)


@dataclass(frozen=True)
class Mark:
    """Where a sink is: every event before (seq, after_event) in commit order is passed
    (`after_event` None: every event of `seq`)."""

    sink: str
    seq: int
    after_event: str | None = None
    delivered: int = 0
    skipped: int = 0
    rejected: int = 0
    caught_up_at: datetime | None = None
    last_error: str | None = None

    def past(self, page: pl.DataFrame) -> Mark:
        """The mark after `page` (read in order from this mark)."""
        last = page.row(page.height - 1, named=True)
        return replace(self, seq=int(last["ingest_seq"]), after_event=str(last["event_id"]))


@dataclass(frozen=True)
class Reject:
    event_id: str
    response_id: str | None
    subject: str | None
    reason: str


_MARK_SQL = """SELECT sink, seq, after_event, delivered, skipped, rejected, caught_up_at,
                      last_error FROM sink_marks"""


def _mark(row: tuple[Any, ...]) -> Mark:
    return Mark(row[0], int(row[1]), row[2], int(row[3]), int(row[4]), int(row[5]), *row[6:])


def read_mark(conn: duckdb.DuckDBPyConnection, sink: str) -> Mark | None:
    row = fetch_one(conn, _MARK_SQL + " WHERE sink = ?", [sink])
    return None if row is None else _mark(row)


def save_mark(conn: duckdb.DuckDBPyConnection, mark: Mark, rejects: Sequence[Reject] = ()) -> None:
    """The sink's new place, and the events it set aside on the way, at once."""
    now = datetime.now(UTC)
    with transaction(conn):
        conn.execute("DELETE FROM sink_marks WHERE sink = ?", [mark.sink])
        conn.execute(
            "INSERT INTO sink_marks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                mark.sink,
                mark.seq,
                mark.after_event,
                mark.delivered,
                mark.skipped,
                mark.rejected,
                mark.caught_up_at,
                mark.last_error,
                now,
            ],
        )
        if rejects:
            conn.executemany(
                "INSERT INTO sink_rejects VALUES (?, ?, ?, ?, ?, ?)",
                [[mark.sink, r.event_id, r.response_id, r.subject, r.reason, now] for r in rejects],
            )


def note_error(conn: duckdb.DuckDBPyConnection, sink: str, error: str) -> None:
    """Why the sink's last run stopped short, leaving its mark as it is."""
    conn.execute(
        "UPDATE sink_marks SET last_error = ?, updated_at = ? WHERE sink = ?",
        [error, datetime.now(UTC), sink],
    )


def read_page(conn: duckdb.DuckDBPyConnection, mark: Mark, upto: int, limit: int) -> pl.DataFrame:
    """The next `limit` events after `mark`, up to ingest_seq `upto`, in commit order."""
    columns = ", ".join(_PAGE_COLUMNS)
    return query_frame(
        conn,
        # `ingest_seq >= $seq` on its own, so that DuckDB skips the row groups before it
        # (a sink reads a page at a time: each read must not scan the whole table).
        f"""SELECT {columns} FROM usage_events
            WHERE ingest_seq >= $seq AND ingest_seq <= $upto
              AND (ingest_seq > $seq
                   OR ($after IS NOT NULL AND event_id > $after))
            ORDER BY ingest_seq, event_id LIMIT $limit""",
        {"seq": mark.seq, "after": mark.after_event, "upto": upto, "limit": limit},
    )


@dataclass(frozen=True)
class Behind:
    events: int  # committed after the mark (pending ones included)
    oldest: datetime | None  # when the oldest of them was recorded

    def lag_seconds(self, now: datetime) -> float:
        """The sink's lag: the age of the oldest event it has not passed (0: caught up)."""
        if not self.events or self.oldest is None:
            return 0.0
        return max(0.0, (now - self.oldest).total_seconds())


def behind(conn: duckdb.DuckDBPyConnection, mark: Mark) -> Behind:
    """How far the sink is behind the warehouse: its lag is the age of `oldest`."""
    row = fetch_one(
        conn,
        """SELECT count(*), min(coalesce(settled_at, recorded_at)) FROM usage_events
           WHERE ingest_seq >= $seq
             AND (ingest_seq > $seq OR ($after IS NOT NULL AND event_id > $after))""",
        {"seq": mark.seq, "after": mark.after_event},
    )
    return Behind(int(row[0]), row[1]) if row else Behind(0, None)


def sink_states(conn: duckdb.DuckDBPyConnection) -> list[tuple[Mark, Behind]]:
    """Every sink that has run, with how far behind it is (the freshness report)."""
    marks = [_mark(row) for row in conn.execute(_MARK_SQL + " ORDER BY sink").fetchall()]
    return [(mark, behind(conn, mark)) for mark in marks]


def sink_records(
    page: pl.DataFrame,
    catalog: Catalog,
    *,
    image_model: str,
    subject: str,
    only: Sequence[str] = (),
    since: datetime | None = None,
) -> tuple[pl.DataFrame, int]:
    """A page's records for one sink, and how many billable events it passes over (no
    subject, not among `only`, created before `since`).

    `subject` is "user" (the end user) or "tag:<key>" (that metadata tag's value). Each
    record has the event's ids, model, tier, endpoint, status, user, metadata, time, its
    `TOKEN_COUNTS`, `subject`, `cost_pico` (null when unpriced), `unpriced`, and its
    charges (`charge_<name>_pico`, summing to the cost)."""
    settled = page.filter(pl.col("status").is_in(BILLABLE_STATUSES))
    if settled.height == 0:
        return settled.with_columns(pl.lit(None, pl.String).alias("subject")), 0
    if subject == "user":
        who = pl.col("user_id")
    else:
        key = subject.removeprefix("tag:")
        who = pl.col("metadata").str.json_path_match(f"$.{key}")  # a plain name (settings)
    keep = pl.col("subject").is_not_null() & (pl.col("subject") != "")
    if only:
        keep &= pl.col("subject").is_in(list(only))
    if since is not None:
        keep &= pl.col("created_at") >= since
    chosen = settled.with_columns(who.alias("subject")).filter(keep)
    passed = settled.height - chosen.height
    if chosen.height == 0:
        return chosen, passed
    models = pricing.model_map(chosen["model"].drop_nulls().unique().to_list(), catalog.names)
    priced = pricing.price_events(
        chosen.lazy(), models.lazy(), catalog.intervals.lazy(), image_model, charges=True
    ).collect()
    # In the events' order: a receiver that fails part way keeps what came before.
    records = priced.with_columns(pl.col(c).fill_null(0) for c in TOKEN_COUNTS)
    return records.sort("ingest_seq", "event_id"), passed
