"""The one writer: moves journaled usage events into the warehouse in batches.

Fed by a queue (the journal's sink hands it each appended line), it runs in its own
thread, because the warehouse wants few large transactions. A batch of journal lines is
parsed by polars in one go (no row loops) and handed to the storage's `EventSink`, which
commits in one transaction the new rows (idempotent on event_id: a replayed event is a
no-op), the updates to rows still pending, and the journal checkpoint. A crash at any
point either keeps the whole batch or replays it. A line the sink refuses even alone is
set aside in `rejected.jsonl`, never dropped.
"""

from __future__ import annotations

import collections
import io
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import polars as pl

from tokentill.warehouse.events import COLUMNS, now_us
from tokentill.warehouse.storage import EventSink, Position, StorageUnavailableError

log = logging.getLogger(__name__)


class JournalSource(Protocol):
    """What the writer needs of the journal (`ingest.journal.Journal` is one): its lines
    after a checkpoint, to replay at start; to be told what is safely in DuckDB, so it
    can let segments go; and a directory for the lines DuckDB refused."""

    directory: Path

    def replay(
        self, after: Position, upto: Position | None = None
    ) -> Iterator[tuple[Position, bytes]]: ...

    def release(self, upto: Position) -> None: ...


def _as_read(dtype: pl.DataType) -> pl.DataType:
    # polars' NDJSON reader takes 64-bit numbers only; narrower columns are cast after.
    if dtype.is_integer() or isinstance(dtype, pl.Datetime):
        return pl.Int64()
    return dtype


# A journal line as polars reads it (timestamps travel as integer microseconds).
_LINE_SCHEMA: dict[str, pl.DataType] = {
    "kind": pl.String(),
    **{field: _as_read(dtype) for field, (_, dtype) in COLUMNS.items()},
}


def parse_lines(lines: list[bytes]) -> pl.DataFrame:
    """Journal lines -> a frame shaped like `usage_events` (plus `kind`)."""
    frame = pl.read_ndjson(io.BytesIO(b"".join(lines)), schema=_LINE_SCHEMA)
    # Lines journaled before `transport` existed were all HTTP.
    frame = frame.with_columns(pl.col("transport").fill_null("http"))
    return frame.select(
        "kind",
        *(pl.col(field).cast(dtype).alias(column) for field, (column, dtype) in COLUMNS.items()),
    )


def latest_updates(updates: pl.DataFrame) -> pl.DataFrame:
    """One update per response: the last word wins."""
    return updates.unique(subset="event_id", keep="last", maintain_order=True)


@dataclass
class WriterStats:
    events_written: int = 0
    batches: int = 0
    rejected: int = 0
    failures: int = 0


Item = tuple[Position, bytes]


class Writer:
    """Owns the writes of usage events to the warehouse (through its `EventSink`)."""

    def __init__(
        self,
        events: EventSink,
        journal: JournalSource,
        *,
        batch_max: int,
        flush_interval: float,
        queue_max: int = 200_000,
    ) -> None:
        """`queue_max`: lines held in memory for the warehouse. Past it (the warehouse away
        for long), new lines are left in the journal alone and read back from it once the
        queue has drained: memory stays bounded however long an outage lasts."""
        self._events = events
        self._journal = journal
        self._batch_max = batch_max
        self._flush_interval = flush_interval
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._queue_max = queue_max
        self._feed = threading.Lock()  # submit (the journal's thread) against the writer
        self._queued = 0
        self._last_queued = Position(0, 0)
        self._last_submitted = Position(0, 0)
        # Spilling: the lines past this position are in the journal only.
        self._spilled_after: Position | None = None
        self.spills = 0
        self._thread: threading.Thread | None = None
        self._enqueued = 0
        self._committed = 0
        self._replayed = 0  # lines queued by recover(): written at once, not batched up
        self._oldest_pending: float | None = None
        # (lines submitted, wall clock µs) now and then: what `committed_through_us` reads.
        self._stamps: collections.deque[tuple[int, int]] = collections.deque(maxlen=4096)
        self._seq = 0
        self.stats = WriterStats()
        self.failed = False
        self.unavailable = False  # the warehouse is away; the journal holds the events
        self.checkpoint = Position(0, 0)

    # -- feeding ---------------------------------------------------------------------

    def submit(self, position: Position, line: bytes) -> None:
        """The journal's sink: called for every appended (or replayed) line."""
        if self._oldest_pending is None:
            self._oldest_pending = time.monotonic()
        with self._feed:
            self._enqueued += 1
            self._last_submitted = position
            stamp = now_us()
            if not self._stamps or stamp - self._stamps[-1][1] >= 10_000:
                self._stamps.append((self._enqueued, stamp))
            if self._spilled_after is None and self._queued < self._queue_max:
                self._queued += 1
                self._last_queued = position
                self._queue.put((position, line))
                return
            if self._spilled_after is None:
                self._spilled_after = self._last_queued
                self.spills += 1
                log.warning(
                    "writer: %d lines wait for the warehouse; the next ones stay in the "
                    "journal alone until it catches up",
                    self._queued,
                )

    @property
    def backlog(self) -> int:
        """Events journaled but not yet committed to DuckDB."""
        return self._enqueued - self._committed

    def committed_through_us(self, margin_us: int = 100_000) -> int:
        """A moment such that every event recorded before it is committed: events are
        stamped `recorded_at` just before the journal hands them here, on the same thread,
        well within `margin_us` (shared quota counters read the lake up to it)."""
        moment = now_us()
        if self._committed >= self._enqueued:
            return moment - margin_us
        committed, through = self._committed, 0
        with self._feed:
            stamps = list(self._stamps)
        for submitted, stamp in stamps:
            if submitted > committed:
                break
            through = stamp
        return through - margin_us if through else 0

    @property
    def lag_seconds(self) -> float:
        oldest = self._oldest_pending
        return 0.0 if oldest is None else time.monotonic() - oldest

    # -- lifecycle -------------------------------------------------------------------

    def recover(self) -> int:
        """Queue every journaled event DuckDB has not got yet; return how many."""
        self.checkpoint = self._last_queued = self._events.checkpoint()
        self._seq = self._events.last_seq()
        replayed = 0
        for position, line in self._journal.replay(self.checkpoint):
            self.submit(position, line)
            replayed += 1
        self._replayed = self._enqueued
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
            if self._spilled_after is not None and self._queued == 0:
                self._catch_up()
                continue
            batch, stopping = self._collect()
            self._write_surely(batch)
        if self._spilled_after is not None:  # stopping: what waits in the journal alone
            self._catch_up()

    def _catch_up(self) -> None:
        """Write the lines left in the journal alone, in order, from where the queue ended
        to the last line submitted when spilling stops: lines after that are queued."""
        with self._feed:
            start = self._spilled_after
            boundary = self._last_submitted
            self._spilled_after = None
        assert start is not None
        while True:
            try:
                batch: list[Item] = []
                # From where the warehouse is (a retry after a read error resumes there).
                for item in self._journal.replay(max(start, self.checkpoint), upto=boundary):
                    batch.append(item)
                    if len(batch) >= self._batch_max:
                        self._write_surely(batch)
                        batch = []
                self._write_surely(batch)
                break
            except OSError:
                # The journal could not be read back (an I/O error): the lines are still
                # on disk; say so loudly (healthz turns 503) and try again.
                log.critical("writer: cannot read the journal back; retrying", exc_info=True)
                self.failed = True
                time.sleep(1.0)
        log.info("writer: caught up with the journal up to %s", boundary)

    def _write_surely(self, batch: list[Item]) -> None:
        """Write `batch`, waiting out an unavailable warehouse and retrying what is left."""
        while batch:
            try:
                self._write_with_retry(batch)
                self.failed = self.unavailable = False
                batch = []
            except StorageUnavailableError as exc:
                # The warehouse is away (a lake's catalog down): the journal holds the
                # events and grows; the proxy serves on. Retry what is left of the batch
                # whole (a half committed before the outage is not again).
                if not self.unavailable:
                    log.error("writer: the warehouse is unavailable (%s); retrying", exc)
                self.unavailable = True
                batch = [item for item in batch if item[0] > self.checkpoint]
                time.sleep(1.0)
            except Exception:
                # Not even a lone line could be set aside (disk full?). The events are safe
                # in the journal; say so loudly (healthz turns 503) and keep trying.
                log.critical("writer: cannot make progress; retrying", exc_info=True)
                self.failed = True
                time.sleep(1.0)

    def _collect(self) -> tuple[list[Item], bool]:
        """Wait for a first line, then gather more for up to `flush_interval` (or until the
        batch is full): DuckDB wants few, large transactions. Returns (batch, stopping)."""
        batch: list[Item] = []
        item = self._take(self._queue.get())
        # The replay at start is written without waiting for more lines: the server's
        # quota counters are seeded from DuckDB once it has landed.
        catching_up = self._committed < self._replayed
        deadline = time.monotonic() + (0.0 if catching_up else self._flush_interval)
        while item is not None:
            batch.append(item)
            if len(batch) >= self._batch_max:
                return batch, False
            remaining = deadline - time.monotonic()
            try:
                item = self._take(
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                return batch, False
        return batch, True

    def _take(self, item: Item | None) -> Item | None:
        if item is not None:
            with self._feed:
                self._queued -= 1
        return item

    def _write_with_retry(self, batch: list[Item]) -> None:
        delay = 0.05
        for attempt in range(3):
            try:
                self._write(batch)
                return
            except StorageUnavailableError:
                raise  # not the batch's fault: never halved, never set aside
            except (Exception, pl.exceptions.PanicException):
                # Anything at all: the batch is retried, then halved down to the bad line.
                self.stats.failures += 1
                log.exception("writer: batch of %d failed (attempt %d)", len(batch), attempt + 1)
                if len(batch) > 1:
                    break  # halve at once: a bad line fails the same way every time
                time.sleep(delay)
                delay *= 4
        # Find the poison lines by halving, so the good ones land.
        if len(batch) == 1:
            self._reject(batch[0])
            return
        middle = len(batch) // 2
        self._write_with_retry(batch[:middle])
        self._write_with_retry(batch[middle:])

    def _reject(self, item: Item) -> None:
        """Keep a line the warehouse refuses in a side file: never drop it silently."""
        position, line = item
        rejected = self._journal.directory / "rejected.jsonl"
        with open(rejected, "ab") as handle:
            handle.write(line)
        self.stats.rejected += 1
        log.error("writer: a journal line was refused; kept in %s", rejected)
        self._events.skip(position)
        self.checkpoint = position
        self._advance(1)

    def _write(self, batch: list[Item]) -> None:
        frame = parse_lines([line for _, line in batch])
        creates = frame.filter(pl.col("kind") == "create").unique(
            subset="event_id", keep="first", maintain_order=True
        )
        updates = latest_updates(frame.filter(pl.col("kind") == "update"))
        last = batch[-1][0]
        seq = self._seq + 1
        self._events.append(creates, updates, seq=seq, upto=last)
        self._seq = seq
        self.checkpoint = last
        self.stats.batches += 1
        self._journal.release(last)
        self._advance(len(batch))

    def _advance(self, count: int) -> None:
        self._committed += count
        self.stats.events_written += count
        self._oldest_pending = None if self._committed >= self._enqueued else time.monotonic()
