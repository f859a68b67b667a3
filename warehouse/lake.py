"""The warehouse as a DuckLake shared by many processes: the second implementation of
`storage.Storage`, for a cluster (docs/cluster.md).

Its catalog lives in PostgreSQL (`TOKENTILL_LAKE_CATALOG`), its data as Parquet files
under `TOKENTILL_LAKE_DATA` (a directory, or an S3 URL). Every process attaches it from
an in-memory DuckDB; sessions are cursors of that instance with the lake as their
default catalog, so the warehouse's queries run unchanged.

Exactly once without a primary key. DuckLake enforces no keys, and its conflict check
is per table (an UPDATE on `usage_events` by one proxy aborts another's INSERT), so:

- events are only ever appended. `usage_event_versions` holds every version of an
  event; an update (a background response that finished) appends the newer version.
  `usage_events` is a view of the latest version per event id, which every reader uses;
- each proxy (`TOKENTILL_INSTANCE_ID`, one per journal) commits a batch together with a
  row of `lake_checkpoints` (its instance, the journal position reached) in one lake
  transaction: after a crash its writer replays from the last committed batch, and an
  event replayed is found by its id and skipped, as in the file;
- commits take a PostgreSQL advisory lock for their few milliseconds, so that
  `ingest_seq` (the number every incremental job keeps its watermark by) grows in commit
  order across proxies: a job that has seen sequence N has seen every row up to N.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata
from pathlib import Path

import duckdb
import polars as pl
import psycopg
from duckdb import sqltypes
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tokentill.warehouse.db import close_in_use, fetch_one, tracked_cursor, transaction
from tokentill.warehouse.events import (
    COLUMNS,
    PENDING_SQL,
    UPDATABLE_COLUMNS,
    insert_new_sql,
    updated_value,
)
from tokentill.warehouse.lake_upkeep import UpkeepResult, upkeep
from tokentill.warehouse.migrate import migrate
from tokentill.warehouse.storage import Position, StorageUnavailableError

log = logging.getLogger(__name__)

ALIAS = "lake"
EVENTS_TABLE = "usage_event_versions"
# Extensions come from their PyPI packages (duckdb-extension-*), never from the network:
# DuckDB looks for them under <dir>/v<version>/<platform>/<name>.duckdb_extension, and
# names the postgres extension postgres_scanner there.
_EXTENSIONS = {"ducklake": "ducklake", "postgres": "postgres_scanner", "httpfs": "httpfs"}
# One number for the commit lock, shared by every tokentill on the catalog.
COMMIT_LOCK = 0x746F6B656E74696C  # "tokentil"
WRITES_LOCK = COMMIT_LOCK + 2  # `Lake.exclusive()`: prices added in id order
WORKER_LOCK = COMMIT_LOCK + 3  # the active worker's lease
# The lock sessions: keepalives on both ends (the server's own settings are what make
# PostgreSQL drop a vanished client's session, and the locks it holds, within about 11 s),
# and no wait for a lock longer than 30 s (a writer then retries its batch, later).
_SESSION: dict[str, str | int | None] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "options": "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 "
    "-c tcp_keepalives_count=3 -c lock_timeout=30s -c statement_timeout=60s",
}


class LakeInstanceBusyError(RuntimeError):
    """Another running process holds this instance id on the lake."""


def instance_key(instance_id: str) -> int:
    """The advisory lock that one process per instance id holds."""
    digest = hashlib.sha256(f"tokentill instance {instance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class LakeUnavailableError(StorageUnavailableError):
    """The lake's catalog cannot be reached (PostgreSQL down or refusing), or a commit met
    another's conflicting change: either way the batch is retried whole, later."""


@dataclass(frozen=True, slots=True)
class LakeConfig:
    catalog: str  # a libpq connection string or postgresql:// URL
    data: str  # the data path: a directory or s3://bucket/prefix/
    instance_id: str  # this process's journal, stable across its restarts
    extension_dir: Path  # where the extension tree is laid out (a private directory)
    journal_id: str = ""  # the journal's own identity (ingest.journal.journal_identity)
    s3_endpoint: str | None = None  # an S3-compatible store (MinIO, a stand-in), host:port
    s3_use_ssl: bool = True
    s3_region: str = "us-east-1"


def extension_tree(root: Path) -> Path:
    """Lay out the installed extension packages as DuckDB's extension directory (links
    into site-packages) and return it."""
    platform = duckdb.sql("PRAGMA platform").fetchone()
    version = f"v{duckdb.__version__}"
    target = root / version / (platform[0] if platform else "linux_amd64")
    target.mkdir(parents=True, exist_ok=True)
    for package, name in _EXTENSIONS.items():
        files = metadata.files(f"duckdb-extension-{package}") or []
        found = [f for f in files if f.name == f"{package}.duckdb_extension"]
        if not found:
            raise RuntimeError(f"the duckdb-extension-{package} package has no extension file")
        source = Path(str(found[0].locate())).resolve()
        link = target / f"{name}.duckdb_extension"
        if link.is_symlink() and link.resolve() == source:
            continue
        link.unlink(missing_ok=True)
        link.symlink_to(source)
    return root


def _without_password(catalog: str) -> tuple[str, str | None]:
    """The catalog's connection string without its password, and the password."""
    try:
        params = conninfo_to_dict(catalog)
    except psycopg.ProgrammingError:
        return "(an unreadable connection string)", None
    password = params.pop("password", None)
    return make_conninfo("", **params), None if password is None else str(password)


def redact(catalog: str) -> str:
    """The catalog's connection string without its password, for logs and errors."""
    return _without_password(catalog)[0]


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def connect(config: LakeConfig) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the lake attached as its default catalog."""
    conn = duckdb.connect(
        config={
            "extension_directory": str(extension_tree(config.extension_dir)),
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": True,
        }
    )
    conn.execute("SET TimeZone = 'UTC'")
    conn.execute("LOAD ducklake")
    conn.execute("LOAD postgres")
    if config.data.startswith("s3://"):
        conn.execute("LOAD httpfs")
        # The key pair from the usual AWS variables (DuckDB's credential chain needs its
        # aws extension, which has no package here); none: an instance role's own.
        options = ["TYPE s3", f"REGION {_quote(os.environ.get('AWS_REGION', config.s3_region))}"]
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            options += [f"KEY_ID {_quote(key)}", f"SECRET {_quote(secret)}"]
        if config.s3_endpoint:
            options += [
                f"ENDPOINT {_quote(config.s3_endpoint)}",
                "URL_STYLE 'path'",
                f"USE_SSL {str(config.s3_use_ssl).lower()}",
            ]
        conn.execute(f"CREATE OR REPLACE SECRET tokentill_lake ({', '.join(options)})")
    # The password reaches libpq through its environment, never through a string that
    # DuckDB repeats in its errors (which end up in logs and in job_runs).
    catalog, password = _without_password(config.catalog)
    if password is not None:
        os.environ["PGPASSWORD"] = password
    try:
        conn.execute(
            f"ATTACH {_quote('ducklake:postgres:' + catalog)} AS {ALIAS} "
            f"(DATA_PATH {_quote(config.data)})"
        )
    except duckdb.Error as exc:
        conn.close()
        raise LakeUnavailableError(f"lake catalog {redact(config.catalog)}: {exc}") from exc
    conn.execute(f"USE {ALIAS}")
    return conn


class CatalogSession:
    """A psycopg connection of its own to the lake's catalog database (`_SESSION`'s
    keepalives and timeouts), made again when it broke; one thread at a time."""

    def __init__(self, catalog: str) -> None:
        self._catalog = catalog
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._mutex = threading.Lock()

    def _connection(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                conninfo = make_conninfo(self._catalog, connect_timeout=5, **_SESSION)
                self._conn = psycopg.connect(conninfo, autocommit=True)
            except psycopg.Error as exc:
                raise LakeUnavailableError(f"lake catalog {redact(self._catalog)}: {exc}") from exc
        return self._conn

    def close(self) -> None:
        with self._mutex:
            if self._conn is not None:
                self._conn.close()


class CatalogLock(CatalogSession):
    """A PostgreSQL advisory lock on the lake's catalog database, on a session of its
    own. Released by PostgreSQL if this process dies holding it."""

    def __init__(self, catalog: str, key: int) -> None:
        super().__init__(catalog)
        self._key = key
        self._leased = False

    def try_hold(self) -> bool:
        """Take the lock and keep it (a lease) if it is free; True while this process
        holds it. Checked on the connection: a lock is lost with its session (the
        catalog restarted), and taken again when it can be."""
        with self._mutex:
            try:
                conn = self._connection()
                if self._leased:
                    conn.execute("SELECT 1")
                    return True
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", [self._key]).fetchone()
            except (psycopg.Error, LakeUnavailableError):
                if self._conn is not None:
                    self._conn.close()
                self._leased = False
                return False
            self._leased = bool(row and row[0])
            return self._leased

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._mutex:
            conn = self._connection()
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", [self._key])
            except psycopg.Error as exc:
                conn.close()
                raise LakeUnavailableError(f"lake commit lock: {exc}") from exc
            try:
                yield
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("SELECT pg_advisory_unlock(%s)", [self._key])

    def reachable(self) -> bool:
        """Whether the catalog answers now (on a fresh connection)."""
        try:
            with psycopg.connect(self._catalog, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False


# --- the schema: the migrations' tables, as the lake can hold them -----------------------


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    not_null: bool
    default: str | None


def target_schema() -> dict[str, list[Column]]:
    """The tables the migrations make, read off a scratch in-memory DuckDB: the migrations
    stay the one description of the schema, for the file and for the lake alike."""
    scratch = duckdb.connect()
    try:
        migrate(scratch)
        rows = scratch.execute(
            """SELECT table_name, column_name, data_type, NOT is_nullable, column_default
               FROM duckdb_columns()
               WHERE database_name = 'memory' AND schema_name = 'main'
                 AND table_name <> 'schema_migrations'
               ORDER BY table_name, column_index"""
        ).fetchall()
    finally:
        scratch.close()
    tables: dict[str, list[Column]] = {}
    for table, name, type_, not_null, default in rows:
        tables.setdefault(table, []).append(Column(name, type_, bool(not_null), default))
    tables[EVENTS_TABLE] = tables.pop("usage_events")
    tables["lake_checkpoints"] = [
        Column("instance_id", "VARCHAR", True, None),
        Column("journal_id", "VARCHAR", False, None),
        Column("segment", "BIGINT", True, None),
        Column("offset", "BIGINT", True, None),
        Column("ingest_seq", "BIGINT", True, None),
        Column("committed_at", "TIMESTAMP WITH TIME ZONE", True, None),
    ]
    return tables


_NEXTVAL = re.compile(r"^nextval\('(\w+)'\)$")


def sequences(target: dict[str, list[Column]]) -> list[str]:
    """The sequences the file's columns are numbered from."""
    found = (_NEXTVAL.match(c.default or "") for cs in target.values() for c in cs)
    return sorted({m[1] for m in found if m})


def _lake_default(default: str | None) -> str | None:
    """DuckLake has no sequences: a column the file numbers from one (a price, a job run,
    an alert, an adjustment) is numbered in the lake by `tokentill_next_id`, over a
    sequence of the catalog's PostgreSQL (`RowNumbers`)."""
    match = _NEXTVAL.match(default or "")
    return f"tokentill_next_id('{match[1]}')" if match else default


def _column_sql(column: Column) -> str:
    sql = f'"{column.name}" {column.type}'
    default = _lake_default(column.default)
    if default is not None:
        sql += f" DEFAULT {default}"
    return sql


# The latest version of each event. An event takes a version only while its latest is
# pending (queued, in progress, interrupted), and its terminal version is its last: so
# the terminal versions are read as they are (a plain scan, which the rollups' ingest_seq
# ranges and the reports' time ranges prune by zone maps), and only the few pending ones
# are looked at twice. (A window over every version cost a sort of the whole table on
# each read.)
_LATEST_SQL = f"""
CREATE OR REPLACE VIEW usage_events AS
SELECT * FROM {EVENTS_TABLE} WHERE status NOT IN ({PENDING_SQL})
UNION ALL
SELECT * FROM {EVENTS_TABLE} AS p
WHERE p.status IN ({PENDING_SQL}) AND NOT EXISTS (
    SELECT 1 FROM {EVENTS_TABLE} AS w
    WHERE w.event_id = p.event_id AND w.ingest_seq > p.ingest_seq
)
"""


def sync_schema(
    conn: duckdb.DuckDBPyConnection, lock: CatalogLock, numbers: RowNumbers
) -> list[str]:
    """Create the tables, columns and sequences the lake lacks (one process at a time).
    Returns what it changed. Columns are only ever added, as the migrations only add
    them."""
    target = target_schema()
    changed: list[str] = []
    with lock.held():
        numbers.create(sequences(target))
        existing: dict[str, set[str]] = {}
        for table, column in conn.execute(
            """SELECT table_name, column_name FROM duckdb_columns()
               WHERE database_name = ? AND schema_name = 'main'""",
            [ALIAS],
        ).fetchall():
            existing.setdefault(table, set()).add(column)
        with transaction(conn):
            for table, columns in target.items():
                if table not in existing:
                    body = ", ".join(_column_sql(c) for c in columns)
                    conn.execute(f'CREATE TABLE "{table}" ({body})')
                    changed.append(table)
                    continue
                for column in columns:
                    if column.name not in existing[table]:
                        conn.execute(f'ALTER TABLE "{table}" ADD COLUMN {_column_sql(column)}')
                        changed.append(f"{table}.{column.name}")
            # Defined anew at each start (one small commit): a lake made by an older
            # tokentill reads through this version's definition.
            conn.execute(_LATEST_SQL)
    return changed


# --- the writer's sink ------------------------------------------------------------------


_NEXT_SEQ_SQL = f"SELECT coalesce(max(ingest_seq), 0) + 1 FROM {EVENTS_TABLE}"

_INSERT_SQL = insert_new_sql(EVENTS_TABLE)

# An update appends the newer version of a pending event: its other columns as stored.
_KEPT = [c for c, _ in COLUMNS.values() if c not in UPDATABLE_COLUMNS]
_VERSION_COLUMNS = ", ".join(
    [f'u."{c}"' for c in _KEPT] + [f'{updated_value(c)} AS "{c}"' for c in UPDATABLE_COLUMNS]
)
_UPDATE_SQL = f"""
INSERT INTO {EVENTS_TABLE} ({", ".join(f'"{c}"' for c in _KEPT + list(UPDATABLE_COLUMNS))},
                            ingest_seq, updated_at)
SELECT {_VERSION_COLUMNS}, $seq, now()
FROM usage_events AS u JOIN _updates AS b
  ON u.event_id = b.event_id AND u.created_at = b.created_at
WHERE u.status IN ({PENDING_SQL})
"""

_CHECKPOINT_SQL = """
INSERT INTO lake_checkpoints (instance_id, journal_id, segment, "offset", ingest_seq,
                              committed_at)
VALUES ($instance, $journal, $segment, $offset, $seq, now())
"""


# Errors that say the store failed, whatever the batch: files, HTTP, the commit itself.
_OUTAGES = (duckdb.IOException, duckdb.HTTPException, duckdb.TransactionException)


class LakeEvents:
    """One proxy's sink on the lake: its batches and its own checkpoint, committed
    together, in commit order across the cluster (the catalog lock)."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        lock: CatalogLock,
        instance_id: str,
        journal_id: str = "",
    ) -> None:
        self._conn = conn
        conn.execute(f"USE {ALIAS}")  # a cursor starts in DuckDB's own default catalog
        self._lock = lock
        self._instance = instance_id
        self._journal = journal_id
        self.commits = 0
        self.conflicts = 0  # commits that met another's change, retried
        self.commit_seconds: list[float] = []  # the last commits' durations, lock included

    def checkpoint(self) -> Position:
        row = fetch_one(
            self._conn,
            """SELECT segment, "offset" FROM lake_checkpoints
               WHERE instance_id = ? AND coalesce(journal_id, '') = ?
               ORDER BY segment DESC, "offset" DESC LIMIT 1""",
            [self._instance, self._journal],
        )
        return Position(int(row[0]), int(row[1])) if row else Position(0, 0)

    def last_seq(self) -> int:
        row = fetch_one(self._conn, f"SELECT coalesce(max(ingest_seq), 0) FROM {EVENTS_TABLE}")
        return int(row[0]) if row else 0

    def append(
        self, creates: pl.DataFrame, updates: pl.DataFrame, *, seq: int, upto: Position
    ) -> None:
        """As `EventSink.append`, but the sequence is the lake's next, not the writer's:
        several writers share it, and it must grow in commit order."""
        del seq
        conn = self._conn
        started = time.perf_counter()
        with self._committing():
            row = fetch_one(conn, _NEXT_SEQ_SQL)
            lake_seq = int(row[0]) if row else 1
            # An update may be to an event created in this very batch (a background
            # response that finished within a flush): its version takes the next number,
            # so that the latest version of every event is the one with the highest.
            update_seq = lake_seq + 1 if creates.height else lake_seq
            for name, frame, sql, seq in (
                ("_new_events", creates, _INSERT_SQL, lake_seq),
                ("_updates", updates, _UPDATE_SQL, update_seq),
            ):
                if frame.height:
                    conn.register(name, frame)
                    try:
                        conn.execute(sql, {"seq": seq})
                    finally:
                        conn.unregister(name)
            self._mark(upto, update_seq if updates.height else lake_seq)
        self._timed(started)

    def skip(self, upto: Position) -> None:
        with self._committing():
            self._mark(upto, self.last_seq())

    @contextlib.contextmanager
    def _committing(self) -> Iterator[None]:
        """The commit lock and one lake transaction. A failure the catalog explains (it
        is down, or another commit conflicted) is `LakeUnavailableError`: retried whole;
        any other is the batch's own."""
        try:
            with self._lock.held(), transaction(self._conn):
                yield
        except duckdb.Error as exc:
            if "conflict" in str(exc).lower():
                self.conflicts += 1
                raise LakeUnavailableError(f"lake commit conflicted: {exc}") from exc
            if isinstance(exc, _OUTAGES) or not self._lock.reachable():
                # The data path (a directory, an S3 store) or the catalog failed the
                # commit, not the batch: retried whole, never set aside line by line.
                raise LakeUnavailableError(f"lake unavailable: {exc}") from exc
            raise

    def _mark(self, upto: Position, seq: int) -> None:
        self._conn.execute(
            _CHECKPOINT_SQL,
            {
                "instance": self._instance,
                "journal": self._journal,
                "segment": upto.segment,
                "offset": upto.offset,
                "seq": seq,
            },
        )

    def commit_quantile(self, q: float) -> float:
        """Of the last 1,000 commits' seconds (the lock's wait included)."""
        recent = sorted(self.commit_seconds)
        return recent[min(len(recent) - 1, int(len(recent) * q))] if recent else 0.0

    def _timed(self, started: float) -> None:
        self.commits += 1
        self.commit_seconds.append(time.perf_counter() - started)
        del self.commit_seconds[:-1000]


class RowNumbers(CatalogSession):
    """`tokentill_next_id(name)` for a lake: the next value of the PostgreSQL sequence
    `tokentill_<name>` in the catalog's database, on a connection of its own. Registered
    as a DuckDB function, so the lake's column defaults and the warehouse's SQL call it
    as they call the file's macro (migration 0016)."""

    def create(self, names: list[str]) -> None:
        with self._mutex:
            conn = self._connection()
            for name in names:
                conn.execute(f'CREATE SEQUENCE IF NOT EXISTS "tokentill_{name}"')

    def next(self, name: str) -> int:
        with self._mutex:
            try:
                row = self._connection().execute("SELECT nextval(%s)", [f"tokentill_{name}"])
                value = row.fetchone()
            except psycopg.OperationalError as exc:
                if self._conn is not None:
                    self._conn.close()
                raise LakeUnavailableError(f"lake catalog: {exc}") from exc
        if value is None:
            raise RuntimeError(f"sequence {name} gave no number")
        return int(str(value[0]))

    def register(self, conn: duckdb.DuckDBPyConnection) -> None:
        conn.create_function(
            "tokentill_next_id",
            self.next,
            [sqltypes.VARCHAR],
            sqltypes.BIGINT,
            side_effects=True,  # a new number per call, never folded into one
        )


class Lake:
    """The lake, attached for this process: the writer's sink and sessions."""

    def __init__(self, config: LakeConfig) -> None:
        self._config = config
        self._conn = connect(config)
        self._lock = CatalogLock(config.catalog, COMMIT_LOCK)
        self._numbers = RowNumbers(config.catalog)
        # One process per instance id: two would share one checkpoint, and a replay
        # would skip lines the other had committed (held for the process's lifetime).
        self._instance = CatalogLock(config.catalog, instance_key(config.instance_id))
        try:
            if not self._instance.try_hold():
                raise LakeInstanceBusyError(
                    f"instance id {config.instance_id!r} is in use by another running "
                    "tokentill on this lake: each process needs its own "
                    "TOKENTILL_INSTANCE_ID (and journal)"
                )
            self._numbers.register(self._conn)
            # Under the commit lock: a table altered while a proxy commits would conflict.
            changed = sync_schema(self._conn, self._lock, self._numbers)
        except BaseException:
            self._conn.close()
            for lock in (self._lock, self._instance):
                lock.close()
            self._numbers.close()
            raise
        if changed:
            log.info("lake schema: created %s", ", ".join(changed))
        self._sessions = self._conn.cursor()
        self._mutex = threading.Lock()
        self._events = LakeEvents(
            self._conn.cursor(), self._lock, config.instance_id, config.journal_id
        )
        self._writes = CatalogLock(config.catalog, WRITES_LOCK)
        self._lease = CatalogLock(config.catalog, WORKER_LOCK)
        self._open: weakref.WeakSet[duckdb.DuckDBPyConnection] = weakref.WeakSet()

    @property
    def name(self) -> str:
        return f"lake {self._config.data} (catalog {redact(self._config.catalog)})"

    @property
    def events(self) -> LakeEvents:
        return self._events

    def session(self) -> duckdb.DuckDBPyConnection:
        cursor = tracked_cursor(self._sessions, self._mutex, self._open)
        cursor.execute(f"USE {ALIAS}")
        return cursor

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return self._writes.held()

    def upkeep(self, keep: timedelta) -> UpkeepResult:
        """The lake's upkeep (warehouse/lake_upkeep.py), for the active worker."""
        conn = self.session()
        try:
            return upkeep(conn, ALIAS, self._lock.held, keep=keep)
        finally:
            conn.close()

    def leads(self) -> bool:
        """Whether this process holds the worker's lease (taking it if it is free): the
        standby's next call after the active worker's session ends takes it over."""
        return self._lease.try_hold()

    def close(self, timeout: float = 5.0) -> bool:
        with self._mutex:
            sessions = list(self._open)
        for lock in (self._lock, self._writes, self._lease, self._instance):
            lock.close()
        self._numbers.close()
        return close_in_use(
            sessions, (self._sessions, self._conn), timeout=timeout, what="the lake"
        )
