"""A lake's upkeep, run by the active worker after a rollup cycle, every
`lake_upkeep_interval` seconds: what keeps a lake written in many small commits as fast
to read as it was on its first day.

1. Fold superseded event versions: a background response's `queued` version, once its
   outcome is stored, is deleted (`usage_events` reads the latest version per event,
   so no answer changes; the versions table stops growing with pending responses). The
   proxies' checkpoints are pruned to each journal's furthest.
2. Flush inlined rows: DuckLake keeps a small commit's rows in the catalog's tables;
   they are written out to Parquet files.
3. Merge adjacent small files into larger ones.
4. Expire snapshots older than `keep` (no reader of ours travels in time; a query
   running that long would lose the files under it).
5. Delete the files no snapshot references any more, once older than `keep`.

Steps 1 to 3 change tables the proxies append to; DuckLake checks conflicts per table,
so they run holding the commit lock (the proxies' commits wait for them, their journals
hold what they meter meanwhile; the hot path never waits).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

import duckdb

from tokentill.warehouse.db import fetch_one, start_run, transaction

log = logging.getLogger(__name__)

JOB = "lake_upkeep"


@dataclass
class UpkeepResult:
    versions_folded: int = 0
    inlined_rows_flushed: int = 0
    files_merged: int = 0
    snapshots_expired: int = 0
    files_deleted: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None


_FOLD_SQL = """
DELETE FROM usage_event_versions AS v
WHERE EXISTS (
    SELECT 1 FROM usage_event_versions AS w
    WHERE w.event_id = v.event_id AND w.ingest_seq > v.ingest_seq
)
"""


# Each commit adds a checkpoint row; only each journal's furthest one is ever read.
_PRUNE_CHECKPOINTS_SQL = """
DELETE FROM lake_checkpoints AS c
WHERE EXISTS (
    SELECT 1 FROM lake_checkpoints AS d
    WHERE d.instance_id = c.instance_id
      AND coalesce(d.journal_id, '') = coalesce(c.journal_id, '')
      AND (d.segment, d."offset") > (c.segment, c."offset")
)
"""


def upkeep(
    conn: duckdb.DuckDBPyConnection,
    alias: str,
    commit_lock: Callable[[], contextlib.AbstractContextManager[None]],
    *,
    keep: timedelta,
) -> UpkeepResult:
    """Run the five steps on the lake attached as `alias`; record the run in `job_runs`."""
    result = UpkeepResult()
    run_id = start_run(conn, JOB, "scheduled")

    def timed(step: str, work: Callable[[], int]) -> int:
        clock = time.perf_counter()
        try:
            return work()
        finally:
            result.seconds[step] = round(time.perf_counter() - clock, 3)

    def rows(sql: str, column: int | None = None) -> int:
        found = conn.execute(sql).fetchall()
        return sum(int(r[column]) for r in found) if column is not None else len(found)

    def fold() -> int:
        with transaction(conn):
            row = fetch_one(conn, _FOLD_SQL)
            conn.execute(_PRUNE_CHECKPOINTS_SQL)
        return int(row[0]) if row else 0

    older = (datetime.now(UTC) - keep).isoformat()
    try:
        with commit_lock():
            result.versions_folded = timed("fold versions", fold)
            result.inlined_rows_flushed = timed(
                "flush inlined", lambda: rows(f"CALL ducklake_flush_inlined_data('{alias}')", 2)
            )
            result.files_merged = timed(
                "merge files", lambda: rows(f"CALL ducklake_merge_adjacent_files('{alias}')")
            )
        result.snapshots_expired = timed(
            "expire snapshots",
            lambda: rows(
                f"CALL ducklake_expire_snapshots('{alias}', older_than => '{older}'::TIMESTAMPTZ)"
            ),
        )
        result.files_deleted = timed(
            "delete files",
            lambda: rows(
                f"CALL ducklake_cleanup_old_files('{alias}', older_than => '{older}'::TIMESTAMPTZ)"
            ),
        )
    except duckdb.Error as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        log.error("lake upkeep failed: %s", result.error)
    figures = {k: v for k, v in asdict(result).items() if k not in ("seconds", "error")}
    conn.execute(
        """UPDATE job_runs SET finished_at = ?, rows_in = ?, rows_out = ?, error = ?,
               phases = ? WHERE run_id = ?""",
        [
            datetime.now(UTC),
            result.versions_folded + result.inlined_rows_flushed,
            result.files_merged + result.files_deleted,
            result.error,
            json.dumps({"figures": figures, "seconds": result.seconds}),
            run_id,
        ],
    )
    return result
