"""Opening the warehouse. DuckDB allows one read-write process: this one owns the file."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from tokentill.warehouse.migrate import migrate

log = logging.getLogger(__name__)


class WarehouseBusyError(RuntimeError):
    """The DuckDB file is held by another process (normally a running tokentill server)."""


def open_warehouse(
    path: Path, *, read_only: bool = False, memory_limit: str | None = None
) -> duckdb.DuckDBPyConnection:
    """Open (creating and migrating if needed) the warehouse at `path`. `memory_limit`
    bounds DuckDB's buffer pool, which otherwise grows to most of the machine's memory
    as it caches what it has read."""
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise WarehouseBusyError(
                f"{path} is in use by another process (is `tokentill serve` running?). "
                "DuckDB allows one writer: talk to the running server instead, or stop it."
            ) from exc
        raise
    if not read_only:
        _owner_only(path)
    conn.execute("SET TimeZone = 'UTC'")
    if memory_limit is not None:
        conn.execute(f"SET memory_limit = '{_size(memory_limit)}'")
    if not read_only:
        migrate(conn)
    return conn


def _owner_only(path: Path) -> None:
    """The warehouse holds who spent what: readable by its owner only (0600), like the
    journal. DuckDB creates its files with the process umask, which `tokentill serve`
    sets to 077; files made before (or by another program) are narrowed here."""
    for file in (path, path.with_name(path.name + ".wal")):
        with contextlib.suppress(FileNotFoundError):
            if file.stat().st_mode & 0o077:
                file.chmod(0o600)


def _size(value: str) -> str:
    if not re.fullmatch(r"\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)", value.strip()):
        raise ValueError(f"memory limit {value!r}: expected a size such as 2GB or 512MB")
    return value.strip()


@contextlib.contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """BEGIN ... COMMIT, or ROLLBACK on any exception (which is re-raised)."""
    conn.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def fetch_one(
    conn: duckdb.DuckDBPyConnection,
    sql: str,
    params: list[object] | dict[str, object] | None = None,
) -> tuple[Any, ...] | None:
    """The first row, with the result read to its end: DuckDB refuses other work on a
    connection (registering a frame, say) while a result is half-read."""
    rows = conn.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


def query_frame(
    conn: duckdb.DuckDBPyConnection,
    sql: str,
    params: list[object] | dict[str, object] | None = None,
) -> pl.DataFrame:
    """A query's rows as a polars frame (through Arrow), with every time zone-aware
    column in "UTC" (DuckDB says "Etc/UTC", and polars will not join the two)."""
    # execute(), not sql(params=...): on duckdb 1.5 a relation built with parameters
    # costs about 9x as much to bring into polars (50 ms against 6 ms for a day of
    # events), which made the rollup's reads 12x slower than on 2.0 (bench/rollup.py).
    frame: pl.DataFrame = conn.execute(sql, params or []).pl()
    return frame.with_columns(
        pl.col(name).dt.convert_time_zone("UTC")
        for name, dtype in frame.schema.items()
        if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None
    )


@contextlib.contextmanager
def registered(conn: duckdb.DuckDBPyConnection, name: str, frame: pl.DataFrame) -> Iterator[None]:
    """`frame` readable by `name` in this connection's SQL, for the block."""
    conn.register(name, frame)
    try:
        yield
    finally:
        conn.unregister(name)


def newest_seq(conn: duckdb.DuckDBPyConnection) -> int:
    """The newest `ingest_seq` committed: an incremental reader (the rollup job, a billing
    sink, the FOCUS corrections) reads up to it and no further. It grows in commit order,
    on a lake too (its commit lock)."""
    row = fetch_one(conn, "SELECT coalesce(max(ingest_seq), 0) FROM usage_events")
    return int(row[0]) if row else 0


_SEQUENCE = re.compile(r"^[a-z_]+_seq$")


def next_id(conn: duckdb.DuckDBPyConnection, sequence: str) -> int:
    """The next number of `sequence`, on any backend (migration 0016 says how)."""
    if not _SEQUENCE.match(sequence):
        raise ValueError(f"not a sequence name: {sequence!r}")
    row = fetch_one(conn, f"SELECT tokentill_next_id('{sequence}')")
    if row is None:
        raise RuntimeError(f"{sequence} gave no number")
    return int(row[0])


def start_run(conn: duckdb.DuckDBPyConnection, job: str, mode: str) -> int:
    """A row of `job_runs` for a run of `job` starting now; its id. The id is taken
    first and inserted (a lake's INSERT has no RETURNING)."""
    run_id = next_id(conn, "job_run_id_seq")
    conn.execute(
        "INSERT INTO job_runs (run_id, job, mode, started_at) VALUES (?, ?, ?, ?)",
        [run_id, job, mode, datetime.now(UTC)],
    )
    return run_id


def tracked_cursor(
    parent: duckdb.DuckDBPyConnection,
    lock: threading.Lock,
    registry: weakref.WeakSet[duckdb.DuckDBPyConnection],
) -> duckdb.DuckDBPyConnection:
    """A session: a cursor of `parent` (UTC), kept in `registry` so that closing the
    database can interrupt it first (`close_in_use`)."""
    with lock:
        cursor = parent.cursor()
        registry.add(cursor)
    cursor.execute("SET TimeZone = 'UTC'")
    return cursor


def close_in_use(
    sessions: Iterable[duckdb.DuckDBPyConnection],
    connections: Sequence[duckdb.DuckDBPyConnection],
    *,
    timeout: float,
    what: str,
) -> bool:
    """Interrupt the queries still running in `sessions`, then close `connections` once
    they have been given back (DuckDB refuses to close a connection in use). False when
    one stayed busy past `timeout`: left to the process's exit."""
    for session in sessions:
        with contextlib.suppress(duckdb.Error):
            session.interrupt()
    deadline = time.monotonic() + timeout
    for conn in connections:
        while True:
            try:
                conn.close()
                break
            except duckdb.Error:
                if time.monotonic() > deadline:
                    log.error("%s is still in use after %.0f s: not closed", what, timeout)
                    return False
                time.sleep(0.01)
    return True
