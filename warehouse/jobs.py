"""The rollup job: prices usage events and rolls them up, incrementally.

A full rebuild recomputes every rollup from the raw events. An incremental run adds to
the stored rollups what changed since the last run's watermark (`usage_events.ingest_seq`),
as partial sums merged into the buckets they belong to:

- events written since (new, late, replayed after a crash: a replay writes nothing) are
  priced and their sums added to their hourly, daily, tag and conversation buckets;
- events written again since (the writer only rewrites rows still pending: background
  responses completed hours later, interrupted streams) have their old sums taken away
  and their new ones added: `rollup_pending` keeps every pending event as it was counted;
- responses whose conversation changed (a parent that arrived after its children, a
  response that became the root of a conversation) move their sums to the new root;
- days holding events of a model whose price was added or corrected since the last run
  (`prices.price_id`) are recomputed whole from the raw events: late prices re-price
  what they cover, with no manual backfill.

Merging partial sums is exact (integers, DECIMAL pico-dollars), so an incremental run and
a full rebuild give identical tables; where a conversation's user cannot be told from the
sums alone, that conversation day is recomputed from its events. Reads and writes go
through Arrow; the pipelines in `pricing` and `rollups` are pure.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import duckdb
import polars as pl

from tokentill.warehouse import pricing, rollups, summaries
from tokentill.warehouse.db import fetch_one, query_frame, transaction
from tokentill.warehouse.events import PENDING_SQL, PENDING_STATUSES
from tokentill.warehouse.prices import CatalogCache

log = logging.getLogger(__name__)

ROLLUP = "rollup"


class JobCancelledError(RuntimeError):
    """The run was stopped part way (it is recorded as failed, and redone next time)."""


@dataclass(frozen=True)
class RollupConfig:
    tag_keys: Sequence[str] = ("project", "team", "feature", "customer")
    image_model: str = "gpt-image-1"
    # Rows per write, and between the commits of a rebuild (about two weeks of the
    # benchmark's rollups): each commit costs a checkpoint, each row held uncommitted
    # costs memory.
    batch_rows: int = 1_500_000
    # Events read at a time (whole days): a day of a small warehouse is one or two of
    # DuckDB's row groups, and a scan shares its row groups out among its threads.
    read_rows: int = 250_000
    # A full rebuild adds up the conversations' days a share of the roots at a time.
    conversation_parts: int = 4


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
_USAGE_COLUMNS = (
    "endpoint",
    "model",
    "service_tier",
    "status",
    "user_id",
    "created_at",
    "reasoning_tokens",
    "total_tokens",
    *pricing.PRICED_FIELDS,
)
_ID_COLUMNS = ("event_id", "response_id")
EVENT_COLUMNS = (*_ID_COLUMNS, *_USAGE_COLUMNS)
# An event as the rollups counted it (the columns of `rollup_pending`).
_COUNTED_COLUMNS = (
    *_ID_COLUMNS,
    *_USAGE_COLUMNS,
    "tag_values",
    "conversation_root",
    "cost_pico",
    "unpriced",
)
_DAY = pl.col("created_at").dt.truncate("1d")
_LINKS_SCHEMA = {"response_id": pl.String, "root_id": pl.String, "depth": pl.Int32}


@dataclass(frozen=True)
class _Prices:
    catalog: list[str]
    intervals: pl.DataFrame


class RollupJob:
    """Runs one at a time (a lock), from the scheduler, the API or the CLI."""

    def __init__(
        self,
        connect: Callable[[], duckdb.DuckDBPyConnection],
        config: RollupConfig,
        catalog: CatalogCache | None = None,
    ) -> None:
        """`catalog`: the process's price snapshot, shared with the reports and the
        quotas (a job of its own, in the CLI or a bench, makes its own)."""
        self._connect = connect
        self._config = config
        self._catalog_cache = catalog or CatalogCache()
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
        # Marks first: whatever lands while this run works is picked up by the next one
        # (every read below stops at the watermark, so nothing is counted twice).
        watermark = _scalar(conn, "SELECT coalesce(max(ingest_seq), 0) FROM usage_events")
        price_mark, prices, priced_by = self._prices(conn)
        last = fetch_one(conn, _LAST_RUN_SQL, [ROLLUP])
        result.watermark, result.price_mark = watermark, price_mark
        if full or last is None:
            self._rebuild(conn, watermark, priced_by, result)
        else:
            self._increment(conn, int(last[0]), watermark, int(last[1]), prices, priced_by, result)

    def _prices(self, conn: duckdb.DuckDBPyConnection) -> tuple[int, pl.DataFrame, _Prices]:
        """The price mark (the highest `price_id`), the catalog and its intervals."""
        catalog = self._catalog_cache.read(conn)
        return catalog.price_mark, catalog.prices, _Prices(catalog.names, catalog.intervals)

    # -- a full rebuild ------------------------------------------------------------------

    def _rebuild(
        self, conn: duckdb.DuckDBPyConnection, watermark: int, prices: _Prices, result: RunResult
    ) -> None:
        for table in (*_DAY_TABLES, "conversation_links", "conversations"):
            conn.execute(f"DELETE FROM {table}")
        _insert(conn, "conversation_links", _all_links(conn, watermark))
        per_day = _events_per_day(conn, watermark, None)
        result.days = len(per_day)
        rows_in, rows_out, _ = self._recompute(conn, per_day, watermark, prices, replace=False)
        # Each conversation's totals, from its days as stored, a share of the roots at a
        # time: holding every day's rows until the end was what set the peak of memory.
        parts = self._config.conversation_parts
        for part in range(parts):
            days = query_frame(
                conn,
                "SELECT * FROM conversation_days WHERE hash(root_id) % ? = ?",
                [parts, part],
            )
            totals = rollups.conversations(days.lazy()).collect()
            del days
            _insert(conn, "conversations", totals)
            rows_out += totals.height
        result.rows_in += rows_in
        result.rows_out += rows_out

    # -- recomputing whole days from the raw events -------------------------------------

    def _recompute(
        self,
        conn: duckdb.DuckDBPyConnection,
        per_day: dict[datetime, int],
        watermark: int,
        prices: _Prices,
        *,
        replace: bool,
    ) -> tuple[int, int, set[str]]:
        """Every rollup of whole days (their summaries and pending events included), given
        with their numbers of events. Rolled up one day at a time: a day's groups fit in
        the CPU's caches, where a week's do not, and grouping is most of the work. Read a
        few days at a time (`_spans`). Returns rows in, rows out, and when replacing days,
        the conversations they hold (whose totals are then out of date)."""
        days = list(per_day)
        if replace:
            for table in _DAY_TABLES:
                _delete_days(conn, table, days)
        rows_in, batch = 0, _Batch()
        roots: set[str] = set()
        with _membership(conn, watermark, None if not replace else days):
            for span in _spans(per_day, self._config.read_rows):
                if self._cancelled.is_set():
                    raise JobCancelledError(
                        "tokentill is stopping; the next run picks up from here"
                    )
                events = self._read(conn, span[0], span[-1] + timedelta(days=1), watermark)
                rows_in += events.height
                for day in span:
                    outputs = self._day(_on_day(events, day), prices)
                    if replace:
                        roots.update(outputs["conversation_days"]["root_id"].unique().to_list())
                    batch.add(outputs)
                    if batch.rows >= self._config.batch_rows:
                        batch.write(conn)
                        if not replace:
                            # A rebuild commits as it goes: DuckDB keeps much of what a
                            # transaction wrote in memory until it commits. One that fails
                            # is finished by the next run (see `_run`).
                            conn.execute("COMMIT")
                            conn.execute("BEGIN TRANSACTION")
                del events
            batch.write(conn)
        return rows_in, batch.written, roots

    def _read(
        self, conn: duckdb.DuckDBPyConnection, start: datetime, end: datetime, watermark: int
    ) -> pl.DataFrame:
        """The events of [start, end), each with its conversation (from `_membership`)."""
        return query_frame(
            conn,
            f"""SELECT {self._select(_USAGE_COLUMNS, tags=True)}, e.response_id,
                    CASE WHEN e.status IN ({PENDING_SQL}) THEN e.event_id END AS event_id,
                    c.root_id AS conversation_root
                FROM usage_events AS e LEFT JOIN _in_conversation AS c
                  ON c.response_id = e.response_id AND c.created_at = e.created_at
                 AND c.created_at >= ? AND c.created_at < ?
                WHERE e.created_at >= ? AND e.created_at < ? AND e.ingest_seq <= ?""",
            [start, end, start, end, watermark],
        )

    def _day(self, events: pl.DataFrame, prices: _Prices) -> dict[str, pl.DataFrame]:
        """One day's events rolled up: the rows of every table holding days."""
        # Priced once, eagerly: collecting the branches together prices every branch.
        priced = self._price(events, prices).collect().lazy()
        hourly, tags, conv, counted = pl.collect_all(
            [
                rollups.hourly(priced),
                rollups.daily_tags(priced, list(self._config.tag_keys)),
                rollups.conversation_days(priced),
                priced.filter(pl.col("status").is_in(list(PENDING_STATUSES))).select(
                    _COUNTED_COLUMNS
                ),
            ]
        )
        daily, users, models = pl.collect_all(
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

    # -- an incremental run ----------------------------------------------------------------

    def _increment(
        self,
        conn: duckdb.DuckDBPyConnection,
        last_watermark: int,
        watermark: int,
        last_price_mark: int,
        prices: pl.DataFrame,
        priced_by: _Prices,
        result: RunResult,
    ) -> None:
        dirty = sorted(set(self._repriced_days(conn, last_price_mark, prices)))
        changed = query_frame(
            conn,
            f"""SELECT {self._select(EVENT_COLUMNS, tags=True)}, e.previous_response_id
                FROM usage_events AS e WHERE e.ingest_seq > ? AND e.ingest_seq <= ?""",
            [last_watermark, watermark],
        )
        links = self._update_links(conn, changed)
        changed = changed.drop("previous_response_id").with_columns(
            links.root_of(pl.col("response_id"))
        )
        # As counted before: the rows being written again (pending until now).
        with _registered(conn, "_changed", changed.select("event_id")):
            counted = query_frame(
                conn,
                """SELECT * FROM rollup_pending
                   WHERE event_id IN (SELECT event_id FROM _changed)""",
            )
        moved = self._moved_into_conversations(conn, links, changed, priced_by)

        clean = ~_DAY.is_in(pl.Series(dirty, dtype=pl.Datetime("us", "UTC")).implode())
        new = self._price(changed.filter(clean), priced_by).collect()
        old = counted.filter(clean).lazy()
        moved = moved.filter(clean)
        touched_days = set(new.select(_DAY.unique())["created_at"]) | set(
            old.select(_DAY.unique()).collect()["created_at"]
        )

        rows_out = self._merge_usage(conn, new.lazy(), old)
        roots, conv_rows = self._merge_conversations(
            conn, new, old.collect(), moved, links, priced_by
        )
        rows_out += conv_rows
        # Pending events, as counted from now on.
        _delete_in(conn, "rollup_pending", "event_id", changed.select("event_id"))
        _insert(
            conn,
            "rollup_pending",
            new.filter(pl.col("status").is_in(list(PENDING_STATUSES))).select(_COUNTED_COLUMNS),
        )
        moved_roots = links.moved_roots()
        if moved_roots.height:
            with _registered(conn, "_moved", moved_roots):
                conn.execute(
                    """UPDATE rollup_pending AS p SET conversation_root = m.root_id
                       FROM _moved AS m WHERE p.response_id = m.response_id"""
                )

        if dirty:
            rows_in, written, recomputed_roots = self._recompute(
                conn, _events_per_day(conn, watermark, dirty), watermark, priced_by, replace=True
            )
            result.rows_in += rows_in
            rows_out += written
            roots |= recomputed_roots
        rows_out += self._refresh_conversations(conn, roots, links.dissolved)
        result.rows_in += changed.height + moved.height
        result.rows_out += rows_out
        result.days = len(touched_days | set(dirty))

    def _repriced_days(
        self, conn: duckdb.DuckDBPyConnection, last_price_mark: int, prices: pl.DataFrame
    ) -> list[datetime]:
        """Days holding events that a price added since the last run may cover."""
        new_prices = prices.filter(pl.col("price_id") > last_price_mark)
        if not new_prices.height:
            return []
        start = new_prices["effective_from"].min()
        models = _column(
            conn, "SELECT DISTINCT model FROM usage_events WHERE created_at >= ?", [start]
        )
        model_map = pricing.model_map([str(m) for m in models], prices["model"].unique().to_list())
        affected = model_map.filter(pl.col("price_model").is_in(new_prices["model"].implode()))
        if not affected.height:
            return []
        with _registered(conn, "_affected_models", affected):
            return _column(
                conn,
                """SELECT DISTINCT date_trunc('day', created_at) FROM usage_events
                   WHERE model IN (SELECT model FROM _affected_models) AND created_at >= ?""",
                [start],
            )

    def _update_links(self, conn: duckdb.DuckDBPyConnection, changed: pl.DataFrame) -> _Links:
        pairs = changed.filter(
            pl.col("previous_response_id").is_not_null() & pl.col("response_id").is_not_null()
        ).select("response_id", "previous_response_id")
        ids = changed.select("response_id").drop_nulls()
        if not ids.height:
            return _Links(pl.DataFrame(schema=_LINKS_SCHEMA), pl.DataFrame(schema=_LINKS_SCHEMA))
        # Only the stored links these rows can touch: their parents' (and the other
        # responses of their parents' conversations), and those that end at one of them
        # (a parent that arrived after its children, or a root seen again). One set of
        # ids for both columns: a few more links than needed, one scan.
        wanted = pl.concat(
            [ids, pairs.select(pl.col("previous_response_id").alias("response_id"))]
        ).unique()
        with _registered(conn, "_wanted", wanted):
            stored = query_frame(
                conn,
                """SELECT rowid AS _rowid, response_id, root_id, depth FROM conversation_links
                   WHERE response_id IN (SELECT response_id FROM _wanted)
                      OR root_id IN (SELECT response_id FROM _wanted)""",
            )
        known = stored.drop("_rowid").cast(_LINKS_SCHEMA)  # type: ignore[arg-type]
        changes = rollups.link_roots(known, pairs) if pairs.height else known.clear()
        if changes.height:
            # Every stored link of a changed response is among those read (its id is
            # wanted, or its root is): deleted by rowid, not by another scan of the ids.
            replaced = stored.join(changes.select("response_id"), on="response_id", how="semi")
            _delete_in(conn, "conversation_links", "rowid", replaced.select("_rowid"))
            _insert(conn, "conversation_links", changes)
        return _Links(known, changes)

    def _moved_into_conversations(
        self,
        conn: duckdb.DuckDBPyConnection,
        links: _Links,
        changed: pl.DataFrame,
        prices: _Prices,
    ) -> pl.DataFrame:
        """Events counted before in no conversation or in one that now continues another
        (not written again since): priced, each with its conversation from now on."""
        skip = changed.select("response_id").drop_nulls()
        parts: list[pl.DataFrame] = []
        # Members of conversations whose root now has a parent: their stored days say
        # where to look.
        dissolved = pl.DataFrame(
            {"root_id": sorted(links.dissolved)}, schema={"root_id": pl.String}
        )
        if dissolved.height:
            with _registered(conn, "_dissolved", dissolved):
                days = _column(
                    conn,
                    """SELECT DISTINCT bucket FROM conversation_days
                       WHERE root_id IN (SELECT root_id FROM _dissolved)""",
                )
            members = pl.concat(
                [
                    links.known.filter(
                        pl.col("root_id").is_in(dissolved["root_id"].implode())
                    ).select("response_id"),
                    dissolved.rename({"root_id": "response_id"}),
                ]
            ).join(skip, on="response_id", how="anti")
            if days and members.height:
                parts.append(self._events_by_id(conn, members, days=days))
        # Roots of new conversations: found among recent days first (a response comes
        # before those that continue it), then anywhere.
        roots = pl.DataFrame(
            {"response_id": sorted(links.new_roots)}, schema={"response_id": pl.String}
        ).join(skip, on="response_id", how="anti")
        if roots.height:
            children = changed.filter(
                pl.col("conversation_root").is_in(roots["response_id"].implode())
            )
            since = children["created_at"].min() if children.height else None
            found = self._events_by_id(
                conn,
                roots,
                since=since - timedelta(days=1) if isinstance(since, datetime) else None,
            )
            missing = roots.join(found.select("response_id"), on="response_id", how="anti")
            if since is not None and missing.height:
                found = pl.concat([found, self._events_by_id(conn, missing)])
            parts.append(found)
        if not parts:
            return self._price(changed.clear(), prices).collect()
        events = pl.concat(parts).with_columns(links.root_of(pl.col("response_id")))
        return self._price(events, prices).collect()

    def _events_by_id(
        self,
        conn: duckdb.DuckDBPyConnection,
        ids: pl.DataFrame,
        *,
        days: list[datetime] | None = None,
        since: datetime | None = None,
    ) -> pl.DataFrame:
        where, params = "e.response_id IN (SELECT response_id FROM _ids)", list[object]()
        if since is not None:
            where += " AND e.created_at >= ?"
            params.append(since)
        with _registered(conn, "_ids", ids):
            if days is not None:
                with _registered(conn, "_days", _day_frame(days)):
                    return query_frame(
                        conn,
                        f"""SELECT {self._select(EVENT_COLUMNS, tags=True)} FROM usage_events AS e
                            WHERE {where} AND e.created_at >= ? AND e.created_at < ?
                              AND date_trunc('day', e.created_at) IN (SELECT day FROM _days)""",
                        [*params, min(days), max(days) + timedelta(days=1)],
                    )
            return query_frame(
                conn,
                f"SELECT {self._select(EVENT_COLUMNS, tags=True)} "
                f"FROM usage_events AS e WHERE {where}",
                params,
            )

    # -- merging partial sums into stored rollups ----------------------------------------

    def _merge_usage(
        self, conn: duckdb.DuckDBPyConnection, new: pl.LazyFrame, old: pl.LazyFrame
    ) -> int:
        keys = list(self._config.tag_keys)
        usage = rollups.USAGE_MEASURES
        hourly = rollups.add_up(
            [rollups.hourly(new), rollups.negate(rollups.hourly(old), usage)],
            rollups.HOURLY_KEYS,
            usage,
        )
        tags = rollups.add_up(
            [
                rollups.daily_tags(new, keys),
                rollups.negate(rollups.daily_tags(old, keys), rollups.TAG_MEASURES),
            ],
            rollups.TAG_KEYS,
            rollups.TAG_MEASURES,
        )
        hourly_delta, tags_delta = pl.collect_all([hourly, tags])
        daily_delta, users_delta, models_delta = pl.collect_all(
            [
                rollups.daily(hourly_delta.lazy()),
                summaries.users_delta(hourly_delta.lazy()),
                summaries.models(hourly_delta.lazy()),
            ]
        )
        written = 0
        for table, delta, grain, measures in (
            ("usage_daily", daily_delta, rollups.HOURLY_KEYS, usage),
            ("usage_daily_tags", tags_delta, rollups.TAG_KEYS, rollups.TAG_MEASURES),
            ("usage_daily_models", models_delta, summaries.MODEL_KEYS, usage),
        ):
            written += _merge_delta(conn, table, delta, grain, measures).height
        changed = _merge_delta(conn, "usage_hourly", hourly_delta, rollups.HOURLY_KEYS, usage)
        written += changed.height
        written += _merge_delta(
            conn,
            "usage_daily_users",
            users_delta,
            summaries.USER_KEYS,
            usage,
            extra={"first_hour": "least", "last_hour": "greatest"},
        ).height
        # An hour a user no longer has (its events all moved away) may have been that
        # day's first or last: those user-days are recomputed from their hours.
        gone = changed.filter(pl.col("merge_action") == "DELETE").select(
            pl.col("bucket").dt.truncate("1d"), "user_id"
        )
        if gone.height:
            written += self._resummarise_users(conn, gone.unique())
        return written

    def _resummarise_users(self, conn: duckdb.DuckDBPyConnection, wanted: pl.DataFrame) -> int:
        """`usage_daily_users` rows (day, user) recomputed from their stored hours."""
        days = sorted(set(wanted["bucket"].to_list()))
        on = "date_trunc('day', h.bucket) = w.bucket AND h.user_id IS NOT DISTINCT FROM w.user_id"
        with _registered(conn, "_wanted", wanted):
            hours = query_frame(
                conn,
                f"""SELECT h.* FROM usage_hourly AS h SEMI JOIN _wanted AS w ON {on}
                    WHERE h.bucket >= ? AND h.bucket < ?""",
                [days[0], days[-1] + timedelta(days=1)],
            )
            conn.execute(
                """DELETE FROM usage_daily_users AS u USING _wanted AS w
                   WHERE u.bucket = w.bucket AND u.user_id IS NOT DISTINCT FROM w.user_id"""
            )
        rows = summaries.users(hours.lazy()).collect()
        _insert(conn, "usage_daily_users", rows)
        return rows.height

    def _merge_conversations(
        self,
        conn: duckdb.DuckDBPyConnection,
        new: pl.DataFrame,
        old: pl.DataFrame,
        moved: pl.DataFrame,
        links: _Links,
        prices: _Prices,
    ) -> tuple[set[str], int]:
        """Add to `conversation_days` the responses entering a conversation and the
        changed sums of those already in one; returns the roots touched."""
        gone = pl.Series(sorted(links.dissolved), dtype=pl.String).implode()
        if links.dissolved:
            dissolved = pl.DataFrame({"root_id": sorted(links.dissolved)})
            _delete_in(conn, "conversation_days", "root_id", dissolved)
        # Rows written again that stay in the conversation they were counted in.
        before = old.filter(
            pl.col("conversation_root").is_not_null() & ~pl.col("conversation_root").is_in(gone)
        )
        staying = new.join(
            before.select("event_id", pl.col("conversation_root").alias("_was")),
            on="event_id",
            how="left",
        )
        again = pl.col("_was").is_not_null() & (pl.col("_was") == pl.col("conversation_root"))
        entering = [staying.filter(~again).drop("_was")]
        if moved.height:
            entering.append(moved.select(new.columns))
        entering_rows = pl.concat(entering, how="vertical_relaxed")
        delta = rollups.conversation_delta(
            rollups.conversation_days_named(entering_rows.lazy()),
            [
                rollups.conversation_days(staying.filter(again).drop("_was").lazy()),
                rollups.negate(
                    rollups.conversation_days(before.lazy()), rollups.CONVERSATION_MEASURES
                ),
            ],
        ).collect()
        if not delta.height:
            return set(), 0
        stored = _stored_rows(conn, "conversation_days", delta, ("root_id", "bucket"))
        merged = rollups.merge_conversation_days(
            stored.drop("_rowid").lazy(), delta.lazy()
        ).collect()
        ambiguous = merged.filter("ambiguous").select("root_id", "bucket")
        merged = merged.filter(~pl.col("ambiguous")).drop("ambiguous")
        _delete_in(conn, "conversation_days", "rowid", stored.select("_rowid"))
        _insert(conn, "conversation_days", merged)
        if ambiguous.height:
            redone = self._conversation_days_of(conn, ambiguous, prices)
            _insert(conn, "conversation_days", redone)
        return set(delta["root_id"].unique().to_list()), merged.height + ambiguous.height

    def _conversation_days_of(
        self, conn: duckdb.DuckDBPyConnection, wanted: pl.DataFrame, prices: _Prices
    ) -> pl.DataFrame:
        """`conversation_days` rows (root, day) recomputed from their events."""
        roots = wanted.select("root_id").unique()
        with _registered(conn, "_roots", roots):
            members = query_frame(
                conn,
                """SELECT response_id, root_id FROM conversation_links
                   WHERE root_id IN (SELECT root_id FROM _roots)
                   UNION ALL SELECT root_id, root_id FROM _roots""",
            )
        days = sorted(set(wanted["bucket"].to_list()))
        events = self._events_by_id(conn, members.select("response_id"), days=days).join(
            members.rename({"root_id": "conversation_root"}), on="response_id"
        )
        conv = rollups.conversation_days(self._price(events, prices)).collect()
        return conv.join(wanted, on=["root_id", "bucket"], how="semi")

    def _refresh_conversations(
        self, conn: duckdb.DuckDBPyConnection, roots: set[str], dissolved: set[str]
    ) -> int:
        everything = sorted(roots | dissolved)
        if not everything:
            return 0
        frame = pl.DataFrame({"root_id": everything}, schema={"root_id": pl.String})
        with _registered(conn, "_roots", frame):
            days = query_frame(
                conn,
                "SELECT * FROM conversation_days WHERE root_id IN (SELECT root_id FROM _roots)",
            )
            conn.execute("DELETE FROM conversations WHERE root_id IN (SELECT root_id FROM _roots)")
        totals = rollups.conversations(days.lazy()).collect()
        _insert(conn, "conversations", totals)
        return totals.height

    # -- reading and pricing -------------------------------------------------------------

    def _select(self, columns: Sequence[str], *, tags: bool) -> str:
        selected = [f"e.{c}" for c in columns]
        keys = list(self._config.tag_keys)
        if tags and keys:
            paths = ", ".join("'" + _json_path(k).replace("'", "''") + "'" for k in keys)
            selected.append(f"json_extract_string(e.metadata, [{paths}]) AS tag_values")
        else:
            selected.append("CAST(NULL AS VARCHAR[]) AS tag_values")
        return ", ".join(selected)

    def _price(self, events: pl.DataFrame, prices: _Prices) -> pl.LazyFrame:
        models = pricing.model_map(events["model"].unique().drop_nulls().to_list(), prices.catalog)
        return pricing.price_events(
            events.lazy(), models.lazy(), prices.intervals.lazy(), self._config.image_model
        )


class _Links:
    """Conversation links before and after an incremental run's new pairs."""

    def __init__(self, known: pl.DataFrame, changes: pl.DataFrame) -> None:
        self.known = known
        self.changes = changes
        after = pl.concat([known, changes]).unique("response_id", keep="last")
        self._root = after.select("response_id", "root_id")
        roots_after = set(after["root_id"].to_list())
        roots_before = set(known["root_id"].to_list())
        linked = set(after["response_id"].to_list())
        self.dissolved: set[str] = roots_before - roots_after
        self.new_roots: set[str] = roots_after - roots_before - linked
        self._roots = pl.DataFrame(
            {"response_id": sorted(roots_after - linked)}, schema={"response_id": pl.String}
        )

    def root_of(self, response_id: pl.Expr) -> pl.Expr:
        """The conversation of each response from now on (of those this run touches)."""
        roots = self._root.rename({"response_id": "_rid", "root_id": "_root"})
        ids = self._roots["response_id"].implode()
        return (
            response_id.replace_strict(roots["_rid"], roots["_root"], default=None)
            .fill_null(pl.when(response_id.is_in(ids)).then(response_id))
            .alias("conversation_root")
        )

    def moved_roots(self) -> pl.DataFrame:
        """response -> root for every response whose conversation this run changed."""
        return pl.concat(
            [
                self.changes.select("response_id", "root_id"),
                pl.DataFrame(
                    {"response_id": sorted(self.new_roots), "root_id": sorted(self.new_roots)},
                    schema={"response_id": pl.String, "root_id": pl.String},
                ),
            ]
        )


_LAST_RUN_SQL = """
SELECT watermark, price_mark FROM job_runs
WHERE job = ? AND error IS NULL AND finished_at IS NOT NULL
ORDER BY run_id DESC LIMIT 1
"""
# The tables holding whole days (and the column saying which day), as `_recompute` writes
# them.
_DAY_TABLES = {
    "usage_hourly": "bucket",
    "usage_daily": "bucket",
    "usage_daily_tags": "bucket",
    "conversation_days": "bucket",
    "usage_daily_users": "bucket",
    "usage_daily_models": "bucket",
    "rollup_pending": "created_at",
}


def _events_per_day(
    conn: duckdb.DuckDBPyConnection, watermark: int, days: list[datetime] | None
) -> dict[datetime, int]:
    """Events per UTC day, in order: every day's, or those of `days` (0 where none)."""
    if days is not None and not days:
        return {}
    where, params = "ingest_seq <= ? AND created_at IS NOT NULL", list[object]([watermark])
    if days is not None:
        on_days, bounds = _on_days("created_at", days)
        where, params = f"{where} AND {on_days}", [*params, *bounds]
    with _registered(conn, "_days", _day_frame(days or [])):
        counted: dict[datetime, int] = dict(
            conn.execute(
                f"""SELECT date_trunc('day', created_at) AS day, count(*) FROM usage_events
                    WHERE {where} GROUP BY day""",
                params,
            ).fetchall()
        )
    if days is None:
        return dict(sorted(counted.items()))
    return {day: counted.get(day, 0) for day in sorted(days)}


def _spans(per_day: dict[datetime, int], read_rows: int) -> Iterator[list[datetime]]:
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


def _on_day(events: pl.DataFrame, day: datetime) -> pl.DataFrame:
    day = day.astimezone(UTC)  # DuckDB's days are in "Etc/UTC", which polars will not compare
    return events.filter(
        (pl.col("created_at") >= day) & (pl.col("created_at") < day + timedelta(days=1))
    )


def _all_links(conn: duckdb.DuckDBPyConnection, watermark: int) -> pl.DataFrame:
    """Every conversation link, from every (response, previous response) pair (a
    function of its own so that the pairs are freed before the days are rolled up)."""
    pairs = query_frame(
        conn,
        """SELECT response_id, previous_response_id FROM usage_events
           WHERE previous_response_id IS NOT NULL AND response_id IS NOT NULL
             AND ingest_seq <= ?""",
        [watermark],
    )
    return rollups.link_roots(pl.DataFrame(schema=_LINKS_SCHEMA), pairs)


@contextlib.contextmanager
def _membership(
    conn: duckdb.DuckDBPyConnection, watermark: int, days: list[datetime] | None
) -> Iterator[None]:
    """`_in_conversation`, a temporary table for recomputing days: each response in a
    conversation (its id and time) -> its root, roots included. One join for all the
    days (each day's read then joins its own slice: the table is in the events' order,
    so zone maps skip the rest); in-memory tables are not compressed, so it is kept
    small."""
    where, params = "e.ingest_seq <= ?", list[object]([watermark])
    if days is not None:
        where += " AND date_trunc('day', e.created_at) IN (SELECT day FROM _days)"
    with _registered(conn, "_days", _day_frame(days or [])):
        conn.execute(
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
            conn.execute("DROP TABLE IF EXISTS _in_conversation")


class _Batch:
    """Rollup rows waiting to be written, some days at a time: inserts that big go
    straight to the file in compressed row groups (DuckDB holds smaller ones in memory
    until the transaction commits), and each costs one statement per table."""

    def __init__(self) -> None:
        self._frames: dict[str, list[pl.DataFrame]] = {}
        self.rows = 0
        self.written = 0

    def add(self, outputs: dict[str, pl.DataFrame]) -> None:
        for table, frame in outputs.items():
            if frame.height:
                self._frames.setdefault(table, []).append(frame)
                self.rows += frame.height

    def write(self, conn: duckdb.DuckDBPyConnection) -> None:
        for table in list(self._frames):
            # Rechunked (one table's copy at a time): DuckDB inserts a frame of many small
            # chunks at half the speed of one chunk, and the copy costs a tenth of that.
            frame = pl.concat(self._frames.pop(table), how="vertical_relaxed", rechunk=True)
            _insert(conn, table, frame)
        self.written += self.rows
        self.rows = 0


@contextlib.contextmanager
def _registered(conn: duckdb.DuckDBPyConnection, name: str, frame: pl.DataFrame) -> Iterator[None]:
    conn.register(name, frame)
    try:
        yield
    finally:
        conn.unregister(name)


def _insert(conn: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame) -> None:
    if frame.height:
        with _registered(conn, "_out", frame):
            conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _out")


def _delete_in(
    conn: duckdb.DuckDBPyConnection, table: str, column: str, keys: pl.DataFrame
) -> None:
    """DELETE the rows of `table` whose `column` is among `keys` (a one-column frame)."""
    if keys.height:
        with _registered(conn, "_keys", keys):
            conn.execute(
                f"DELETE FROM {table} WHERE {column} IN (SELECT {keys.columns[0]} FROM _keys)"
            )


def _delete_days(conn: duckdb.DuckDBPyConnection, table: str, days: list[datetime]) -> None:
    on_days, bounds = _on_days(_DAY_TABLES[table], days)
    with _registered(conn, "_days", _day_frame(days)):
        conn.execute(f"DELETE FROM {table} WHERE {on_days}", bounds)


def _on_days(column: str, days: list[datetime]) -> tuple[str, list[object]]:
    """A condition holding the rows whose `column` falls on one of `days` (registered as
    `_days`), and its parameters: the bounds let zone maps skip the rest (IN would not)."""
    within = f"{column} >= ? AND {column} < ?"
    return (
        f"{within} AND date_trunc('day', {column}) IN (SELECT day FROM _days)",
        [min(days), max(days) + timedelta(days=1)],
    )


def _merge_delta(
    conn: duckdb.DuckDBPyConnection,
    table: str,
    delta: pl.DataFrame,
    grain: tuple[str, ...],
    measures: tuple[str, ...],
    extra: dict[str, str] | None = None,
) -> pl.DataFrame:
    """Add partial sums (`delta`, one row per key of `grain`) to the stored rows of
    `table`, in DuckDB: a key's row is updated, created, or deleted when no event is left
    in it (`requests` back to 0), as a full rebuild would never make it. `extra`: more
    columns merged with a SQL function of the stored and the added value (least,
    greatest). Returns the keys written, with `merge_action`. Only the days of `delta`
    are read."""
    if not delta.height:
        return delta.select(pl.lit("", pl.String).alias("merge_action"), *grain)
    extra = extra or {}
    within, bounds = _days_of(delta)
    sums = ", ".join(f"{c} = t.{c} + d.{c}" for c in measures)
    kept = "".join(f", {c} = {fn}(t.{c}, coalesce(d.{c}, t.{c}))" for c, fn in extra.items())
    keys = ", ".join(grain)
    with _registered(conn, "_delta", delta):
        return query_frame(
            conn,
            f"""MERGE INTO {table} AS t USING _delta AS d
                ON {_same_keys(grain)} AND {within}
                WHEN MATCHED AND t.requests + d.requests = 0 THEN DELETE
                WHEN MATCHED THEN UPDATE SET {sums}{kept}
                WHEN NOT MATCHED AND d.requests <> 0 THEN INSERT BY NAME
                RETURNING merge_action, {keys}""",
            bounds,
        )


def _stored_rows(
    conn: duckdb.DuckDBPyConnection, table: str, delta: pl.DataFrame, grain: tuple[str, ...]
) -> pl.DataFrame:
    """The stored rows of `table` with the keys of `delta`, and their rowids. Only the
    days of `delta` are read (zone maps on `bucket` skip the others)."""
    keys = delta.select(grain)
    within, bounds = _days_of(keys)
    with _registered(conn, "_delta", keys):
        return query_frame(
            conn,
            f"""SELECT t.rowid AS _rowid, t.* FROM {table} AS t SEMI JOIN _delta AS d
                ON {_same_keys(grain)} WHERE {within}""",
            bounds,
        )


def _same_keys(grain: tuple[str, ...]) -> str:
    """Stored rows `t` and partial sums `d` of the same key (nulls are keys too)."""
    return " AND ".join(f"t.{k} IS NOT DISTINCT FROM d.{k}" for k in grain)


def _days_of(rows: pl.DataFrame) -> tuple[str, list[object]]:
    """A condition on `t.bucket` holding the days of `rows` (their `bucket`), and its
    parameters: ranges, which let zone maps skip the other days (IN would not)."""
    days = rows.select(pl.col("bucket").dt.truncate("1d").unique().sort())["bucket"].to_list()
    within = " OR ".join("(t.bucket >= ? AND t.bucket < ?)" for _ in days)
    return f"({within})", [bound for day in days for bound in (day, day + timedelta(days=1))]


def _day_frame(days: list[datetime]) -> pl.DataFrame:
    return pl.DataFrame({"day": days}, schema={"day": pl.Datetime("us", "UTC")})


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


def last_runs(conn: duckdb.DuckDBPyConnection, limit: int = 20) -> pl.DataFrame:
    """The newest job runs first: freshness for the API and the dashboard."""
    return query_frame(conn, "SELECT * FROM job_runs ORDER BY run_id DESC LIMIT ?", [limit])
