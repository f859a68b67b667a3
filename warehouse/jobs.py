"""The rollup job: prices usage events and rolls them up, incrementally.

Unit of work: the UTC day. A run finds the days whose rollups may have changed since the
last successful run, and recomputes each of them from the raw events:

- days holding events written or updated since the last run's watermark
  (`usage_events.ingest_seq`): new events, late events, background responses completed
  hours later, rows replayed after a crash;
- days holding events of a model whose price was added or corrected since the last run
  (`prices.price_id`): late prices re-price what they cover, with no manual backfill;
- days of responses whose conversation root changed (a parent that arrived late).

Recomputing a whole day from the raw events makes a run idempotent, and makes an
incremental run and a full rebuild (every day) give identical tables by construction.
Reads and writes go through Arrow; the pipelines in `pricing` and `rollups` are pure.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import duckdb
import polars as pl

from warehouse import pricing, rollups, summaries
from warehouse.db import fetch_one, query_frame, transaction
from warehouse.prices import price_table

log = logging.getLogger(__name__)

ROLLUP = "rollup"


class JobCancelledError(RuntimeError):
    """The run was stopped part way (it is recorded as failed, and redone next time)."""


@dataclass(frozen=True)
class RollupConfig:
    tag_keys: Sequence[str] = ("project", "team", "feature", "customer")
    image_model: str = "gpt-image-1"
    chunk_days: int = 7


@dataclass
class RunResult:
    job: str
    mode: str
    rows_in: int = 0
    rows_out: int = 0
    days: int = 0
    watermark: int = 0
    price_mark: int = 0
    error: str | None = None
    seconds: float = 0.0


# What the pipelines read: no more (strings cost the most to move through Arrow).
_EVENT_COLUMNS = ", ".join(
    f"e.{column}"
    for column in (
        "response_id",
        "endpoint",
        "model",
        "service_tier",
        "status",
        "user_id",
        "created_at",
        "reasoning_tokens",
        "total_tokens",
        *pricing.PRICED_COUNTS,
    )
)


class RollupJob:
    """Runs one at a time (a lock), from the scheduler, the API or the CLI."""

    def __init__(
        self, connect: Callable[[], duckdb.DuckDBPyConnection], config: RollupConfig
    ) -> None:
        self._connect = connect
        self._config = config
        self._lock = threading.Lock()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Make a run in progress stop after its current chunk (shutdown)."""
        self._cancelled.set()

    def run(self, *, full: bool = False) -> RunResult:
        with self._lock:
            conn = self._connect()
            try:
                return self._run(conn, full)
            finally:
                conn.close()

    # -- one run -------------------------------------------------------------------------

    def _run(self, conn: duckdb.DuckDBPyConnection, full: bool) -> RunResult:
        if fetch_one(conn, _LAST_RUN_SQL, [ROLLUP]) is None:
            full = True  # nothing to be incremental from
        latest = fetch_one(
            conn,
            "SELECT mode, error FROM job_runs WHERE job = ? ORDER BY run_id DESC LIMIT 1",
            [ROLLUP],
        )
        if latest is not None and latest[0] == "full" and latest[1] is not None:
            full = True  # a full rebuild that failed part way is finished first
        mode = "full" if full else "incremental"
        started = datetime.now(UTC)
        clock = time.perf_counter()
        run_id = _scalar(
            conn,
            "INSERT INTO job_runs (job, mode, started_at) VALUES (?, ?, ?) RETURNING run_id",
            [ROLLUP, mode, started],
        )
        result = RunResult(ROLLUP, mode)
        try:
            # An incremental run is one transaction: readers see the rollups before it or
            # after it, never half-way, and a failed run leaves nothing behind. A full
            # rebuild commits chunk by chunk (DuckDB holds a transaction's rows in memory),
            # and one that fails is redone in full by the next run.
            with transaction(conn):
                self._work(conn, full, result)
        except Exception as exc:
            log.exception("rollup run %s failed", run_id)
            result.error = f"{type(exc).__name__}: {exc}"
        result.seconds = time.perf_counter() - clock
        conn.execute(
            """UPDATE job_runs SET finished_at = ?, rows_in = ?, rows_out = ?, watermark = ?,
                   price_mark = ?, error = ? WHERE run_id = ?""",
            [
                datetime.now(UTC),
                result.rows_in,
                result.rows_out,
                None if result.error else result.watermark,
                None if result.error else result.price_mark,
                result.error,
                run_id,
            ],
        )
        return result

    def _work(self, conn: duckdb.DuckDBPyConnection, full: bool, result: RunResult) -> None:
        # Marks first: whatever lands while this run works is picked up by the next one.
        watermark = _scalar(conn, "SELECT coalesce(max(ingest_seq), 0) FROM usage_events")
        price_mark = _scalar(conn, "SELECT coalesce(max(price_id), 0) FROM prices")
        last = fetch_one(conn, _LAST_RUN_SQL, [ROLLUP])
        if full or last is None:
            full = True
            last_watermark, last_price_mark = -1, -1
        else:
            last_watermark, last_price_mark = int(last[0]), int(last[1])
        result.watermark, result.price_mark = watermark, price_mark

        prices = price_table(conn)
        intervals = pricing.effective_intervals(prices)
        models = [r[0] for r in conn.execute("SELECT DISTINCT model FROM usage_events").fetchall()]
        model_map = pricing.model_map(models, prices["model"].unique().to_list())

        if full:
            for table in (*_ROLLUP_TABLES, "conversation_links", "conversations"):
                conn.execute(f"DELETE FROM {table}")
        links_changed = self._update_links(conn, full, last_watermark, watermark)
        days = set(self._days(conn, full, last_watermark, last_price_mark, prices, model_map))
        if links_changed.height:
            # A response that now starts or continues a conversation changes its day's
            # conversation sums, wherever that day is.
            ids = pl.concat([links_changed["response_id"], links_changed["root_id"]]).unique()
            days |= set(_days_of_responses(conn, ids))
        conn.execute(
            """CREATE OR REPLACE TEMP TABLE _conversation_roots AS
               SELECT DISTINCT root_id FROM conversation_links"""
        )

        ordered = sorted(days)
        result.days = len(ordered)
        roots: set[str] = set(links_changed["root_id"].to_list())
        for start in range(0, len(ordered), self._config.chunk_days):
            if self._cancelled.is_set():
                raise JobCancelledError("tokentill is stopping; the next run picks up from here")
            chunk = ordered[start : start + self._config.chunk_days]
            rows_in, rows_out, chunk_roots = self._recompute(conn, chunk, model_map, intervals)
            result.rows_in += rows_in
            result.rows_out += rows_out
            if full:
                conn.execute("COMMIT")
                conn.execute("BEGIN TRANSACTION")
            roots |= chunk_roots
        result.rows_out += self._refresh_conversations(conn, full, roots)
        result.rows_out += summaries.refresh(conn, None if full else ordered)

    # -- what changed ----------------------------------------------------------------------

    def _days(
        self,
        conn: duckdb.DuckDBPyConnection,
        full: bool,
        last_watermark: int,
        last_price_mark: int,
        prices: pl.DataFrame,
        model_map: pl.DataFrame,
    ) -> list[datetime]:
        if full:
            return _column(conn, "SELECT DISTINCT date_trunc('day', created_at) FROM usage_events")
        days = _column(
            conn,
            "SELECT DISTINCT date_trunc('day', created_at) FROM usage_events WHERE ingest_seq > ?",
            [last_watermark],
        )
        new_prices = prices.filter(pl.col("price_id") > last_price_mark)
        if new_prices.height:
            affected_keys = set(new_prices["model"].to_list())
            affected_models = model_map.filter(pl.col("price_model").is_in(list(affected_keys)))
            if affected_models.height:
                start = new_prices["effective_from"].min()
                conn.register("_affected_models", affected_models)
                try:
                    days += _column(
                        conn,
                        """SELECT DISTINCT date_trunc('day', created_at) FROM usage_events
                           WHERE model IN (SELECT model FROM _affected_models)
                             AND created_at >= ?""",
                        [start],
                    )
                finally:
                    conn.unregister("_affected_models")
        return days

    def _update_links(
        self, conn: duckdb.DuckDBPyConnection, full: bool, last_watermark: int, watermark: int
    ) -> pl.DataFrame:
        pairs = query_frame(
            conn,
            """SELECT response_id, previous_response_id FROM usage_events
               WHERE previous_response_id IS NOT NULL AND response_id IS NOT NULL
                 AND ingest_seq > ? AND ingest_seq <= ?""",
            [last_watermark, watermark],
        )
        empty = pl.DataFrame(
            schema={"response_id": pl.String, "root_id": pl.String, "depth": pl.Int32}
        )
        if pairs.height == 0:
            return empty
        # Only the stored links these pairs can touch: their parents', and those that end
        # at one of them (a parent that arrived after its child).
        conn.register("_pairs", pairs)
        try:
            known = query_frame(
                conn,
                """SELECT response_id, root_id, depth FROM conversation_links
                   WHERE response_id IN (SELECT previous_response_id FROM _pairs)
                      OR root_id IN (SELECT response_id FROM _pairs)""",
            )
        finally:
            conn.unregister("_pairs")
        known = known.with_columns(pl.col("depth").cast(pl.Int32)) if known.height else empty
        changed = rollups.link_roots(known, pairs)
        if changed.height:
            conn.register("_links", changed)
            try:
                conn.execute(
                    """DELETE FROM conversation_links
                       WHERE response_id IN (SELECT response_id FROM _links)"""
                )
                conn.execute(
                    "INSERT INTO conversation_links SELECT response_id, root_id, depth FROM _links"
                )
            finally:
                conn.unregister("_links")
        return changed

    # -- recomputing days ------------------------------------------------------------------

    def _recompute(
        self,
        conn: duckdb.DuckDBPyConnection,
        days: list[datetime],
        model_map: pl.DataFrame,
        intervals: pl.DataFrame,
    ) -> tuple[int, int, set[str]]:
        keys = list(self._config.tag_keys)
        paths = [_json_path(k) for k in keys]
        day_frame = pl.DataFrame({"day": days}, schema={"day": pl.Datetime("us", "UTC")})
        conn.register("_days", day_frame)
        try:
            events = query_frame(
                conn,
                f"""SELECT {_EVENT_COLUMNS},
                        {"json_extract_string(e.metadata, ?)" if keys else "NULL"} AS tag_values,
                        -- the conversation a response continues, or starts
                        coalesce(l.root_id, r.root_id) AS conversation_root
                    FROM usage_events AS e
                    LEFT JOIN conversation_links AS l ON l.response_id = e.response_id
                    LEFT JOIN _conversation_roots AS r ON r.root_id = e.response_id
                    WHERE e.created_at >= ? AND e.created_at < ?
                      AND date_trunc('day', e.created_at) IN (SELECT day FROM _days)
                    ORDER BY e.created_at""",
                ([paths] if keys else []) + [min(days), max(days) + timedelta(days=1)],
            ).with_columns(pl.col("created_at").set_sorted())
        finally:
            conn.unregister("_days")
        if not keys:
            events = events.with_columns(pl.lit(None, pl.List(pl.String)).alias("tag_values"))
        priced = pricing.price_events(
            events.lazy(), model_map.lazy(), intervals.lazy(), self._config.image_model
        )
        hourly, tags, conv = pl.collect_all(
            [
                rollups.hourly(priced),
                rollups.daily_tags(priced, keys),
                rollups.conversation_days(priced),
            ]
        )
        daily = rollups.daily(hourly.lazy()).collect()
        outputs = {
            "usage_hourly": hourly,
            "usage_daily": daily,
            "usage_daily_tags": tags,
            "conversation_days": conv,
        }
        conn.register("_days", day_frame)
        try:
            for table, frame in outputs.items():
                conn.execute(
                    f"""DELETE FROM {table} WHERE bucket >= ? AND bucket < ?
                          AND date_trunc('day', bucket) IN (SELECT day FROM _days)""",
                    [min(days), max(days) + timedelta(days=1)],
                )
                if frame.height:
                    conn.register("_out", frame)
                    conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _out")
                    conn.unregister("_out")
        finally:
            conn.unregister("_days")
        written = sum(frame.height for frame in outputs.values())
        return events.height, written, set(conv["root_id"].to_list())

    def _refresh_conversations(
        self, conn: duckdb.DuckDBPyConnection, full: bool, roots: set[str]
    ) -> int:
        if full:
            days = query_frame(conn, "SELECT * FROM conversation_days")
        elif roots:
            conn.register(
                "_roots", pl.DataFrame({"root_id": sorted(roots)}, schema={"root_id": pl.String})
            )
            try:
                days = query_frame(
                    conn,
                    "SELECT * FROM conversation_days WHERE root_id IN (SELECT root_id FROM _roots)",
                )
            finally:
                conn.unregister("_roots")
        else:
            return 0
        totals = rollups.conversations(days.lazy()).collect()
        conn.register("_conv", totals)
        conn.register(
            "_roots", pl.DataFrame({"root_id": sorted(roots)}, schema={"root_id": pl.String})
        )
        try:
            if not full:
                conn.execute(
                    "DELETE FROM conversations WHERE root_id IN (SELECT root_id FROM _roots)"
                )
            if totals.height:
                conn.execute("INSERT INTO conversations BY NAME SELECT * FROM _conv")
        finally:
            conn.unregister("_conv")
            conn.unregister("_roots")
        return totals.height


_LAST_RUN_SQL = """
SELECT watermark, price_mark FROM job_runs
WHERE job = ? AND error IS NULL AND finished_at IS NOT NULL
ORDER BY run_id DESC LIMIT 1
"""
_ROLLUP_TABLES = ("usage_hourly", "usage_daily", "usage_daily_tags", "conversation_days")


def _json_path(key: str) -> str:
    # Metadata keys are free text (up to 64 characters): quote them in the JSON path.
    return '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _scalar(conn: duckdb.DuckDBPyConnection, sql: str, params: list[object] | None = None) -> int:
    row = fetch_one(conn, sql, params or [])
    return int(row[0]) if row and row[0] is not None else 0


def _column(
    conn: duckdb.DuckDBPyConnection, sql: str, params: list[object] | None = None
) -> list[datetime]:
    return [row[0] for row in conn.execute(sql, params or []).fetchall() if row[0] is not None]


def _days_of_responses(conn: duckdb.DuckDBPyConnection, ids: pl.Series) -> list[datetime]:
    conn.register("_ids", pl.DataFrame({"response_id": ids}))
    try:
        return _column(
            conn,
            """SELECT DISTINCT date_trunc('day', created_at) FROM usage_events
               WHERE response_id IN (SELECT response_id FROM _ids)""",
        )
    finally:
        conn.unregister("_ids")


def last_runs(conn: duckdb.DuckDBPyConnection, limit: int = 20) -> pl.DataFrame:
    """The newest job runs first: freshness for the API and the dashboard."""
    return query_frame(conn, "SELECT * FROM job_runs ORDER BY run_id DESC LIMIT ?", [limit])
