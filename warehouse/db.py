"""Opening the warehouse. DuckDB allows one read-write process: this one owns the file."""

from __future__ import annotations

from pathlib import Path

import duckdb

from warehouse.migrate import migrate


class WarehouseBusyError(RuntimeError):
    """The DuckDB file is held by another process (normally a running tokentill server)."""


def open_warehouse(path: Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open (creating and migrating if needed) the warehouse at `path`."""
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
    conn.execute("SET TimeZone = 'UTC'")
    if not read_only:
        migrate(conn)
    return conn
