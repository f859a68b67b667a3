"""The one writer: moves journaled usage events into DuckDB in batches.

Fed by a queue (the journal's sink), it runs in its own thread, because DuckDB wants
few large transactions and one writing process. Each batch is one transaction that
inserts the new rows (idempotent on event_id: a replayed event is a no-op), applies
updates to rows still pending, and advances the journal checkpoint. So a crash at any
point either keeps the whole batch or replays it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import duckdb
import orjson
import pyarrow as pa

from ingest.events import COLUMNS, PENDING_STATUSES, UPDATABLE_COLUMNS, UsageEvent
from ingest.journal import Journal, Position

log = logging.getLogger(__name__)

_SCHEMA = pa.schema([(column, arrow_type) for column, arrow_type in COLUMNS.values()])
_FIELDS = tuple(COLUMNS)
_COLUMN_LIST = ", ".join(f'"{column}"' for column, _ in COLUMNS.values())
_PENDING_SQL = ", ".join(f"'{status}'" for status in sorted(PENDING_STATUSES))

_INSERT_SQL = f"""
INSERT INTO usage_events ({_COLUMN_LIST}, ingest_seq, updated_at)
SELECT {_COLUMN_LIST}, $seq, now() FROM _new_events
ON CONFLICT DO NOTHING
"""

_UPDATE_SQL = f"""
UPDATE usage_events AS u SET
    {
    ", ".join(
        f'"{c}" = coalesce(b."{c}", u."{c}")' if c == "model" else f'"{c}" = b."{c}"'
        for c in UPDATABLE_COLUMNS
    )
},
    ingest_seq = $seq, updated_at = now()
FROM _updates AS b
WHERE u.event_id = b.event_id AND u.status IN ({_PENDING_SQL})
"""

_CHECKPOINT_SQL = """
INSERT INTO ingest_checkpoint (id, segment, "offset", updated_at)
VALUES (1, $segment, $offset, now())
ON CONFLICT (id) DO UPDATE SET segment = excluded.segment, "offset" = excluded."offset",
    updated_at = excluded.updated_at
"""


def read_checkpoint(conn: duckdb.DuckDBPyConnection) -> Position:
    row = conn.execute('SELECT segment, "offset" FROM ingest_checkpoint WHERE id = 1').fetchone()
    return Position(int(row[0]), int(row[1])) if row else Position(0, 0)


def to_arrow(events: Sequence[UsageEvent]) -> pa.Table:
    columns = [[getattr(event, name) for event in events] for name in _FIELDS]
    return pa.Table.from_arrays(
        [pa.array(values, type=field.type) for values, field in zip(columns, _SCHEMA, strict=True)],
        schema=_SCHEMA,
    )


@dataclass
class WriterStats:
    events_written: int = 0
    batches: int = 0
    rejected: int = 0
    failures: int = 0
    last_commit_at: float = 0.0


class Writer:
    """Owns the DuckDB connection's writes for usage events."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        journal: Journal,
        *,
        batch_max: int,
        flush_interval: float,
    ) -> None:
        self._conn = conn
        self._journal = journal
        self._batch_max = batch_max
        self._flush_interval = flush_interval
        self._queue: queue.SimpleQueue[tuple[Position, UsageEvent] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # serialises use of the connection
        self._enqueued = 0
        self._committed = 0
        self._oldest_pending: float | None = None
        self._seq = 0
        self.stats = WriterStats()
        self.checkpoint = Position(0, 0)

    # -- feeding ---------------------------------------------------------------------

    def submit(self, position: Position, event: UsageEvent) -> None:
        """The journal's sink: called for every appended (or replayed) event."""
        if self._oldest_pending is None:
            self._oldest_pending = time.monotonic()
        self._enqueued += 1
        self._queue.put((position, event))

    @property
    def backlog(self) -> int:
        """Events journaled but not yet committed to DuckDB."""
        return self._enqueued - self._committed

    @property
    def lag_seconds(self) -> float:
        oldest = self._oldest_pending
        return 0.0 if oldest is None else time.monotonic() - oldest

    # -- lifecycle -------------------------------------------------------------------

    def recover(self) -> int:
        """Queue every journaled event DuckDB has not got yet; return how many."""
        self.checkpoint = read_checkpoint(self._conn)
        row = self._conn.execute("SELECT coalesce(max(ingest_seq), 0) FROM usage_events").fetchone()
        self._seq = int(row[0]) if row else 0
        replayed = 0
        for position, record in self._journal.replay(self.checkpoint):
            self.submit(position, UsageEvent.from_record(record))
            replayed += 1
        return replayed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tokentill-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Flush everything queued, then stop. True if the queue was fully drained."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Block until everything submitted so far is committed (tests, `rollup`)."""
        target = self._enqueued
        deadline = time.monotonic() + timeout
        while self._committed < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # -- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[tuple[Position, UsageEvent]] = []
            try:
                item = self._queue.get(timeout=self._flush_interval)
            except queue.Empty:
                continue
            if item is None:
                stopping = True
            else:
                batch.append(item)
            while len(batch) < self._batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            if batch:
                self._write_with_retry(batch)

    def _write_with_retry(self, batch: list[tuple[Position, UsageEvent]]) -> None:
        delay = 0.05
        for attempt in range(4):
            try:
                self._write(batch)
                return
            except duckdb.Error:
                self.stats.failures += 1
                log.exception("writer: batch of %d failed (attempt %d)", len(batch), attempt + 1)
                time.sleep(delay)
                delay *= 4
        # The batch keeps failing: find the poison events by halving, so the good ones land.
        if len(batch) == 1:
            self._reject(batch[0])
            return
        middle = len(batch) // 2
        self._write_with_retry(batch[:middle])
        self._write_with_retry(batch[middle:])

    def _reject(self, item: tuple[Position, UsageEvent]) -> None:
        """Keep an event DuckDB refuses in a side file, never drop it silently."""
        position, event = item
        rejected = self._journal.directory / "rejected.jsonl"
        with open(rejected, "ab") as handle:
            handle.write(orjson.dumps(event) + b"\n")
        self.stats.rejected += 1
        log.error("writer: event %s rejected, kept in %s", event.event_id, rejected)
        with self._lock:
            self._conn.execute(
                _CHECKPOINT_SQL, {"segment": position.segment, "offset": position.offset}
            )
        self._advance([item])

    def _write(self, batch: list[tuple[Position, UsageEvent]]) -> None:
        creates = [event for _, event in batch if event.kind == "create"]
        updates: dict[str, UsageEvent] = {}
        for _, event in batch:
            if event.kind == "update":
                updates[event.event_id] = event  # the latest word on a response wins
        last = max(position for position, _ in batch)
        with self._lock:
            conn = self._conn
            seq = self._seq + 1
            conn.execute("BEGIN TRANSACTION")
            try:
                if creates:
                    conn.register("_new_events", to_arrow(creates))
                    conn.execute(_INSERT_SQL, {"seq": seq})
                    conn.unregister("_new_events")
                if updates:
                    conn.register("_updates", to_arrow(list(updates.values())))
                    conn.execute(_UPDATE_SQL, {"seq": seq})
                    conn.unregister("_updates")
                conn.execute(_CHECKPOINT_SQL, {"segment": last.segment, "offset": last.offset})
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._seq = seq
        self._advance(batch)
        self.checkpoint = last
        self.stats.batches += 1
        self._journal.release(last)

    def _advance(self, batch: list[tuple[Position, UsageEvent]]) -> None:
        self._committed += len(batch)
        self.stats.events_written += len(batch)
        self.stats.last_commit_at = time.time()
        self._oldest_pending = None if self._committed >= self._enqueued else time.monotonic()
