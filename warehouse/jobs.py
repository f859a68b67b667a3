"""The rollup job: run bookkeeping. It prices usage events and rolls them up, as a full
rebuild (`rollup_rebuild`: every rollup from the raw events) or an incremental run
(`rollup_merge`: what changed since the last run's watermark, merged as partial sums,
with `conversations` keeping conversations exact), one run at a time.

Each run is a row of `job_runs` (mode, rows in and out, the watermark and the price mark
it reached, its error); the next incremental run starts from the last good one. A run's
parts read and write through a `rollup_run.Run`, which also times them
(`RunResult.phases`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
import polars as pl

from tokentill.warehouse import rollup_compact
from tokentill.warehouse.db import fetch_one, newest_seq, query_frame, start_run, transaction
from tokentill.warehouse.prices import CatalogCache
from tokentill.warehouse.rollup_merge import increment
from tokentill.warehouse.rollup_rebuild import rebuild
from tokentill.warehouse.rollup_run import (
    JobCancelledError,
    PriceSnapshot,
    RollupConfig,
    Run,
    RunResult,
)

__all__ = [
    "ROLLUP",
    "Freshness",
    "JobCancelledError",
    "RollupConfig",
    "RollupJob",
    "RunResult",
    "freshness",
    "last_runs",
]

log = logging.getLogger(__name__)

ROLLUP = "rollup"
COMPACT = "compact"

_LAST_RUN_SQL = """
SELECT watermark, price_mark FROM job_runs
WHERE job = ? AND error IS NULL AND finished_at IS NOT NULL
ORDER BY run_id DESC LIMIT 1
"""


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

    def stop(self, timeout: float) -> bool:
        """At shutdown: cancel, and wait for a run in progress to end, whoever started it
        (the schedule, the API): the warehouse must not close under it. True when no run
        is left; every later run stops at once."""
        self._cancelled.set()
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        return True

    def run(self, *, full: bool = False) -> RunResult:
        with self._lock:
            conn = self._connect()
            try:
                if fetch_one(conn, _LAST_RUN_SQL, [ROLLUP]) is None:
                    full = True  # nothing to be incremental from
                latest = fetch_one(
                    conn,
                    "SELECT mode, error FROM job_runs WHERE job = ? ORDER BY run_id DESC LIMIT 1",
                    [ROLLUP],
                )
                if latest is not None and latest[0] == "full" and latest[1] is not None:
                    full = True  # a full rebuild that failed part way is finished first
                # An incremental run is one transaction: readers see the rollups before it
                # or after it, never half-way, and a failed run leaves nothing behind. A
                # full rebuild commits chunk by chunk (DuckDB holds a transaction's rows in
                # memory), and one that fails is redone in full by the next run.
                return self._recorded(
                    conn,
                    ROLLUP,
                    "full" if full else "incremental",
                    lambda run_id, result: self._work(conn, full, result, run_id),
                )
            finally:
                conn.close()

    def _recorded(
        self,
        conn: duckdb.DuckDBPyConnection,
        job: str,
        mode: str,
        work: Callable[[int, RunResult], None],
    ) -> RunResult:
        """`work` (given its run id and the result to fill) in one transaction, recorded
        as a row of `job_runs`: what it did, how long it took, its error if it failed."""
        clock = time.perf_counter()
        run_id = start_run(conn, job, mode)
        result = RunResult(job, mode)
        try:
            with transaction(conn):
                work(run_id, result)
        except Exception as exc:
            log.exception("%s run %s failed", job, run_id)
            result.error = f"{type(exc).__name__}: {exc}"
        result.seconds = time.perf_counter() - clock
        _finish(conn, run_id, result)
        return result

    def _work(
        self, conn: duckdb.DuckDBPyConnection, full: bool, result: RunResult, run_id: int
    ) -> None:
        # Marks first: whatever lands while this run works is picked up by the next one
        # (every read below stops at the watermark, so nothing is counted twice).
        watermark = newest_seq(conn)
        catalog = self._catalog_cache.read(conn)
        last = fetch_one(conn, _LAST_RUN_SQL, [ROLLUP])
        result.watermark, result.price_mark = watermark, catalog.price_mark
        run = Run(
            conn,
            self._config,
            PriceSnapshot(catalog.names, catalog.intervals),
            watermark,
            self._cancelled,
            run_id,
        )
        try:
            if full or last is None:
                result.days, result.rows_in, result.rows_out = rebuild(run)
            else:
                done = increment(run, int(last[0]), int(last[1]), catalog.prices)
                result.rows_in, result.rows_out, result.days = (
                    done.rows_in,
                    done.rows_out,
                    done.days,
                )
                result.recomputed, result.parts_written = done.recomputed, done.parts_written
        finally:
            result.phases = run.phases.finish()

    # -- compaction ------------------------------------------------------------------------

    def compact(self, *, max_parts: int, older_than: datetime) -> RunResult:
        """Fold the parts of days with more than `max_parts` parts, and of days that
        ended by `older_than` with any, into one row per key (`rollup_compact`); one
        transaction, under the job's lock (never beside a run). Recorded in `job_runs` as
        `compact`."""
        with self._lock:
            conn = self._connect()
            try:
                return self._recorded(
                    conn,
                    COMPACT,
                    "compact",
                    lambda run_id, result: self._fold(conn, result, run_id, max_parts, older_than),
                )
            finally:
                conn.close()

    def _fold(
        self,
        conn: duckdb.DuckDBPyConnection,
        result: RunResult,
        run_id: int,
        max_parts: int,
        older_than: datetime,
    ) -> None:
        run = Run(conn, self._config, PriceSnapshot([], pl.DataFrame()), 0, self._cancelled, run_id)
        try:
            days = rollup_compact.days_to_compact(run, max_parts, older_than)
            with run.phases.step("compact"):
                result.parts_compacted, result.rows_out = rollup_compact.compact(run, days)
            result.days = len(days)
        finally:
            result.phases = run.phases.finish()


def _finish(conn: duckdb.DuckDBPyConnection, run_id: int, result: RunResult) -> None:
    """The run's row in job_runs, completed: what it did, and its error if it failed."""
    conn.execute(
        """UPDATE job_runs SET finished_at = ?, rows_in = ?, rows_out = ?, watermark = ?,
               price_mark = ?, error = ?, phases = ?, parts_written = ?, parts_compacted = ?
           WHERE run_id = ?""",
        [
            datetime.now(UTC),
            result.rows_in,
            result.rows_out,
            None if result.error else result.watermark,
            None if result.error else result.price_mark,
            result.error,
            json.dumps({k: round(v, 6) for k, v in result.phases.items()}),
            result.parts_written,
            result.parts_compacted,
            run_id,
        ],
    )


def last_runs(conn: duckdb.DuckDBPyConnection, limit: int = 20) -> pl.DataFrame:
    """The newest job runs first: freshness for the API and the dashboard."""
    return query_frame(conn, "SELECT * FROM job_runs ORDER BY run_id DESC LIMIT ?", [limit])


_FRESHNESS_SQL = """
WITH ok AS (
    SELECT finished_at, watermark FROM job_runs
    WHERE job = 'rollup' AND error IS NULL AND finished_at IS NOT NULL
    ORDER BY run_id DESC LIMIT 1
), newest AS (SELECT error FROM job_runs WHERE job = 'rollup' ORDER BY run_id DESC LIMIT 1)
SELECT (SELECT max(recorded_at) FROM usage_events),
       (SELECT finished_at FROM ok),
       (SELECT error FROM newest),
       (SELECT count(*) FROM usage_events
        WHERE ingest_seq > coalesce((SELECT watermark FROM ok), -1)),
       (SELECT count(*) FROM rollup_parts)
"""


@dataclass(frozen=True)
class Freshness:
    last_event_at: datetime | None
    last_rollup_at: datetime | None
    last_rollup_error: str | None
    events_not_rolled_up: int
    parts_awaiting_compaction: int


def freshness(conn: duckdb.DuckDBPyConnection) -> Freshness:
    """How fresh the rollups are: the newest event, the last good run, the newest run's
    error, and the events written since the last good run."""
    row = conn.execute(_FRESHNESS_SQL).fetchall()[0]
    return Freshness(row[0], row[1], row[2], int(row[3]), int(row[4]))
