"""What one rollup run carries, and how it reads and writes the warehouse.

A `Run` is handed to each part of the job (the full rebuild, the incremental merge, the
conversations): the connection (inside the run's transaction), the configuration, the
price snapshot, the watermark, the cancel flag, and its `Phases` clock. Every DuckDB read,
every polars collect and every write goes through the run, so the time of each step is
split into reading, computing and writing without anyone wrapping the job's methods: the
run's result carries the figures (`RunResult.phases`), the bench prints them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import duckdb
import polars as pl

from tokentill.warehouse import pricing
from tokentill.warehouse.db import fetch_one, query_frame, registered


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
    # Seconds per `<step>/<kind>` (see `Phases`), and the days an incremental run
    # recomputed whole from their events (a price added or corrected since).
    phases: dict[str, float] = field(default_factory=dict)
    recomputed: list[datetime] = field(default_factory=list)
    parts_written: int = 0  # rows appended as partial sums
    parts_compacted: int = 0  # parts a compaction folded


# What the pipelines read: no more (strings cost the most to move through Arrow).
USAGE_COLUMNS = (
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
ID_COLUMNS = ("event_id", "response_id")
EVENT_COLUMNS = (*ID_COLUMNS, *USAGE_COLUMNS)
# An event as the rollups counted it (the columns of `rollup_pending`).
COUNTED_COLUMNS = (
    *ID_COLUMNS,
    *USAGE_COLUMNS,
    "tag_values",
    "conversation_root",
    "cost_pico",
    "unpriced",
)
DAY = pl.col("created_at").dt.truncate("1d")
LINKS_SCHEMA = {"response_id": pl.String, "root_id": pl.String, "depth": pl.Int32}
# The tables holding whole days (and the column saying which day), as a recompute writes
# them.
DAY_TABLES = {
    "usage_hourly": "bucket",
    "usage_daily": "bucket",
    "usage_daily_tags": "bucket",
    "conversation_days": "bucket",
    "usage_daily_users": "bucket",
    "usage_daily_models": "bucket",
    "rollup_pending": "created_at",
}


@dataclass(frozen=True)
class PriceSnapshot:
    """The catalog's model names and its price intervals, as the pricing pipeline takes
    them (one snapshot per run)."""

    catalog: list[str]
    intervals: pl.DataFrame


Kind = Literal["read", "compute", "write", "other"]


class Phases:
    """Wall seconds per step of a run, each split by kind: `read` (DuckDB into polars),
    `compute` (polars plans collected), `write` (statements that change tables) and
    `other` (the rest: eager polars, small queries). Times are exclusive: a step inside
    another is not counted in the outer one, a kind inside a kind counts once."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[tuple[str, Kind]] = [("run", "other")]
        self._mark = time.perf_counter()

    def _flush(self) -> None:
        now = time.perf_counter()
        step, kind = self._stack[-1]
        self.seconds[f"{step}/{kind}"] += now - self._mark
        self._mark = now

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self._flush()
        self._stack.append((name, "other"))
        try:
            yield
        finally:
            self._flush()
            self._stack.pop()

    @contextlib.contextmanager
    def kind(self, kind: Kind) -> Iterator[None]:
        nested = self._stack[-1][1] != "other"
        if not nested:
            self._flush()
            self._stack.append((self._stack[-1][0], kind))
        try:
            yield
        finally:
            if not nested:
                self._flush()
                self._stack.pop()

    def finish(self) -> dict[str, float]:
        self._flush()
        return dict(self.seconds)


def shares(phases: dict[str, float]) -> dict[Kind, float]:
    """Seconds by kind over every step."""
    out: dict[Kind, float] = {"read": 0.0, "compute": 0.0, "write": 0.0, "other": 0.0}
    for label, seconds in phases.items():
        kind = label.rsplit("/", 1)[1]
        out[kind if kind in out else "other"] += seconds
    return out


@dataclass
class Run:
    conn: duckdb.DuckDBPyConnection
    config: RollupConfig
    prices: PriceSnapshot
    watermark: int
    cancelled: threading.Event
    run_id: int = 0  # its row in job_runs (the parts it appends name it)
    phases: Phases = field(default_factory=Phases)

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelledError("tokentill is stopping; the next run picks up from here")

    # -- reading -------------------------------------------------------------------------

    def read(self, sql: str, params: list[object] | None = None) -> pl.DataFrame:
        with self.phases.kind("read"):
            return query_frame(self.conn, sql, params or [])

    def scalar(self, sql: str, params: list[object] | None = None) -> int:
        with self.phases.kind("read"):
            return scalar(self.conn, sql, params)

    def column(self, sql: str, params: list[object] | None = None) -> list[datetime]:
        with self.phases.kind("read"):
            rows = self.conn.execute(sql, params or []).fetchall()
        return [row[0] for row in rows if row[0] is not None]

    def select(self, columns: Sequence[str], *, tags: bool) -> str:
        """The SELECT list of `usage_events AS e` for `columns`, with the tag values."""
        return select_events(columns, self.config.tag_keys if tags else ())

    def registered(self, name: str, frame: pl.DataFrame) -> contextlib.AbstractContextManager[None]:
        return registered(self.conn, name, frame)

    # -- computing -----------------------------------------------------------------------

    def compute(self, frame: pl.LazyFrame) -> pl.DataFrame:
        with self.phases.kind("compute"):
            return frame.collect()

    def compute_all(self, frames: list[pl.LazyFrame]) -> list[pl.DataFrame]:
        with self.phases.kind("compute"):
            return pl.collect_all(frames)

    def price(self, events: pl.DataFrame) -> pl.LazyFrame:
        """The events priced (a plan: the caller collects it with the rest of its work)."""
        models = pricing.model_map(
            events["model"].unique().drop_nulls().to_list(), self.prices.catalog
        )
        return pricing.price_events(
            events.lazy(), models.lazy(), self.prices.intervals.lazy(), self.config.image_model
        )

    # -- writing -------------------------------------------------------------------------

    def execute(self, sql: str, params: list[object] | None = None) -> None:
        with self.phases.kind("write"):
            self.conn.execute(sql, params or [])

    def insert(self, table: str, frame: pl.DataFrame) -> None:
        if frame.height:
            with self.registered("_out", frame):
                self.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _out")

    def delete_in(self, table: str, column: str, keys: pl.DataFrame) -> None:
        """DELETE the rows of `table` whose `column` is among `keys` (a one-column frame)."""
        if keys.height:
            with self.registered("_keys", keys):
                self.execute(
                    f"DELETE FROM {table} WHERE {column} IN (SELECT {keys.columns[0]} FROM _keys)"
                )

    def delete_days(self, table: str, days: list[datetime]) -> None:
        where, bounds = on_days(DAY_TABLES[table], days)
        with self.registered("_days", day_frame(days)):
            self.execute(f"DELETE FROM {table} WHERE {where}", bounds)

    def stored_rows(self, table: str, delta: pl.DataFrame, grain: tuple[str, ...]) -> pl.DataFrame:
        """The stored rows of `table` with the keys of `delta`, and their rowids. Only the
        days of `delta` are read (zone maps on `bucket` skip the others)."""
        keys = delta.select(grain)
        within, bounds = days_of(keys)
        with self.registered("_delta", keys):
            return self.read(
                f"""SELECT t.rowid AS _rowid, t.* FROM {table} AS t SEMI JOIN _delta AS d
                    ON {same_keys(grain)} WHERE {within}""",
                bounds,
            )


class Batch:
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

    def write(self, run: Run) -> None:
        for table in list(self._frames):
            # Rechunked (one table's copy at a time): DuckDB inserts a frame of many small
            # chunks at half the speed of one chunk, and the copy costs a tenth of that.
            frame = pl.concat(self._frames.pop(table), how="vertical_relaxed", rechunk=True)
            run.insert(table, frame)
        self.written += self.rows
        self.rows = 0


def select_events(columns: Sequence[str], tag_keys: Sequence[str]) -> str:
    """The SELECT list of `usage_events AS e` for `columns`, and `tag_values`: the values
    of `tag_keys` in the metadata (a list of strings, null where a key is absent)."""
    selected = [f"e.{c}" for c in columns]
    if tag_keys:
        paths = ", ".join("'" + json_path(k).replace("'", "''") + "'" for k in tag_keys)
        selected.append(f"json_extract_string(e.metadata, [{paths}]) AS tag_values")
    else:
        selected.append("CAST(NULL AS VARCHAR[]) AS tag_values")
    return ", ".join(selected)


def json_path(key: str) -> str:
    # Metadata keys are free text (up to 64 characters): quote them in the JSON path.
    return '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def on_days(column: str, days: list[datetime]) -> tuple[str, list[object]]:
    """A condition holding the rows whose `column` falls on one of `days` (registered as
    `_days`), and its parameters: the bounds let zone maps skip the rest (IN would not)."""
    within = f"{column} >= ? AND {column} < ?"
    return (
        f"{within} AND date_trunc('day', {column}) IN (SELECT day FROM _days)",
        [min(days), max(days) + timedelta(days=1)],
    )


def same_keys(grain: tuple[str, ...]) -> str:
    """Stored rows `t` and partial sums `d` of the same key (nulls are keys too)."""
    return " AND ".join(f"t.{k} IS NOT DISTINCT FROM d.{k}" for k in grain)


def days_of(rows: pl.DataFrame) -> tuple[str, list[object]]:
    """A condition on `t.bucket` holding the days of `rows` (their `bucket`), and its
    parameters: ranges, which let zone maps skip the other days (IN would not)."""
    days = rows.select(pl.col("bucket").dt.truncate("1d").unique().sort())["bucket"].to_list()
    within = " OR ".join("(t.bucket >= ? AND t.bucket < ?)" for _ in days)
    return f"({within})", [bound for day in days for bound in (day, day + timedelta(days=1))]


def day_frame(days: list[datetime]) -> pl.DataFrame:
    return pl.DataFrame({"day": days}, schema={"day": pl.Datetime("us", "UTC")})


def on_day(events: pl.DataFrame, day: datetime) -> pl.DataFrame:
    day = day.astimezone(UTC)  # DuckDB's days are in "Etc/UTC", which polars will not compare
    return events.filter(
        (pl.col("created_at") >= day) & (pl.col("created_at") < day + timedelta(days=1))
    )


def scalar(conn: duckdb.DuckDBPyConnection, sql: str, params: list[object] | None = None) -> int:
    row = fetch_one(conn, sql, params or [])
    return int(row[0]) if row and row[0] is not None else 0
