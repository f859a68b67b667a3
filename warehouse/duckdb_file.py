"""The warehouse as one DuckDB file, owned by this process: the first implementation of
`storage.Storage` (and tokentill's default).

DuckDB allows one read-write process per file, so the sink and the sessions share one
database instance: the writer thread keeps the main connection to itself, every other
thread gets a cursor of its own. Exactly once rests on the file's own guarantees: a
batch, its `ingest_seq` and the journal checkpoint commit in one transaction, and an
event replayed after a crash is found by its id and skipped.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from pathlib import Path

import duckdb
import polars as pl

from tokentill.warehouse.db import (
    close_in_use,
    fetch_one,
    open_warehouse,
    tracked_cursor,
    transaction,
)
from tokentill.warehouse.events import (
    PENDING_SQL,
    UPDATABLE_COLUMNS,
    insert_new_sql,
    updated_value,
)
from tokentill.warehouse.storage import Position

log = logging.getLogger(__name__)

_INSERT_SQL = insert_new_sql("usage_events")

_SET_UPDATED = ",\n    ".join(f'"{c}" = {updated_value(c)}' for c in UPDATABLE_COLUMNS)
_UPDATE_SQL = f"""
UPDATE usage_events AS u SET
    {_SET_UPDATED},
    ingest_seq = $seq, updated_at = now()
FROM _updates AS b
-- An update carries the created_at of the same response, which lets zone maps skip
-- every row group but its own.
WHERE u.event_id = b.event_id AND u.created_at = b.created_at AND u.status IN ({PENDING_SQL})
"""

_CHECKPOINT_SQL = """
INSERT INTO ingest_checkpoint (id, segment, "offset", updated_at)
VALUES (1, $segment, $offset, now())
ON CONFLICT (id) DO UPDATE SET segment = excluded.segment, "offset" = excluded."offset",
    updated_at = excluded.updated_at
"""


class DuckDBEvents:
    """The writer's sink on a DuckDB connection (the writer thread's alone)."""

    def __init__(self, conn: duckdb.DuckDBPyConnection) -> None:
        self._conn = conn

    def checkpoint(self) -> Position:
        row = fetch_one(self._conn, 'SELECT segment, "offset" FROM ingest_checkpoint WHERE id = 1')
        return Position(int(row[0]), int(row[1])) if row else Position(0, 0)

    def last_seq(self) -> int:
        row = fetch_one(self._conn, "SELECT coalesce(max(ingest_seq), 0) FROM usage_events")
        return int(row[0]) if row else 0

    def append(
        self, creates: pl.DataFrame, updates: pl.DataFrame, *, seq: int, upto: Position
    ) -> None:
        conn = self._conn
        with transaction(conn):
            for name, frame, sql in (
                ("_new_events", creates, _INSERT_SQL),
                ("_updates", updates, _UPDATE_SQL),
            ):
                if frame.height:
                    conn.register(name, frame)
                    try:
                        conn.execute(sql, {"seq": seq})
                    finally:
                        conn.unregister(name)
            conn.execute(_CHECKPOINT_SQL, {"segment": upto.segment, "offset": upto.offset})

    def skip(self, upto: Position) -> None:
        self._conn.execute(_CHECKPOINT_SQL, {"segment": upto.segment, "offset": upto.offset})


class DuckDBFile:
    """One DuckDB file (created and migrated if needed), opened for this process."""

    def __init__(self, path: Path, *, memory_limit: str | None = None) -> None:
        self._path = path
        self._conn = open_warehouse(path, memory_limit=memory_limit)
        self._sessions = self._conn.cursor()
        self._lock = threading.Lock()
        self._events = DuckDBEvents(self._conn)
        # Sessions still open somewhere (a request's thread cut off by the shutdown):
        # interrupted before the database closes, never closed under a running query.
        self._open: weakref.WeakSet[duckdb.DuckDBPyConnection] = weakref.WeakSet()

    @property
    def name(self) -> str:
        return str(self._path)

    @property
    def events(self) -> DuckDBEvents:
        return self._events

    def session(self) -> duckdb.DuckDBPyConnection:
        return tracked_cursor(self._sessions, self._lock, self._open)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def leads(self) -> bool:
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Interrupt the queries still running in sessions, then close the database once
        they have given it back (DuckDB refuses to close a connection in use). False when
        one stayed busy past `timeout`: left to the process's exit."""
        with self._lock:
            sessions = list(self._open)
        return close_in_use(
            sessions, (self._sessions, self._conn), timeout=timeout, what="the warehouse"
        )
