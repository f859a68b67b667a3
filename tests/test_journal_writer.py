"""The journal and the writer on their own: replay, torn lines, poison lines, idempotence."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tokentill.ingest.journal import Journal, JournalLockedError
from tokentill.warehouse.db import open_warehouse
from tokentill.warehouse.duckdb_file import DuckDBEvents
from tokentill.warehouse.events import UsageEvent
from tokentill.warehouse.storage import Position, StorageUnavailableError
from tokentill.warehouse.writer import Writer, parse_lines

T0 = 1_764_000_000_000_000


def event(i: int, **fields: object) -> UsageEvent:
    values: dict[str, object] = {
        "kind": "create",
        "event_id": f"resp_{i}",
        "response_id": f"resp_{i}",
        "endpoint": "responses",
        "status": "completed",
        "created_at_us": T0 + i,
        "request_started_at_us": T0 + i,
        "recorded_at_us": T0 + i,
        "model": "gpt-4o-2024-08-06",
        "input_tokens": 100 + i,
        "cached_input_tokens": 10,
        "output_tokens": 20,
        "reasoning_tokens": 0,
        "total_tokens": 120 + i,
    }
    values.update(fields)
    return UsageEvent(**values)  # type: ignore[arg-type]


class Stack:
    def __init__(
        self,
        root: Path,
        *,
        flush_interval: float = 0.01,
        segment_bytes: int = 4096,
        batch_max: int = 1000,
        queue_max: int = 200_000,
        outage: bool = False,
    ) -> None:
        """`outage`: the warehouse starts away (`self.sink.down`) until told otherwise."""
        self.conn = open_warehouse(root / "w.duckdb")
        self.journal = Journal(root / "journal", segment_bytes=segment_bytes, fsync_interval=0.01)
        self.journal.lock()
        events = DuckDBEvents(self.conn)
        self.sink: Outage | DuckDBEvents = Outage(events) if outage else events
        self.writer = Writer(
            self.sink,
            self.journal,
            batch_max=batch_max,
            flush_interval=flush_interval,
            queue_max=queue_max,
        )
        self.replayed = self.writer.recover()
        self.journal.start(self.writer.submit)
        self.writer.start()

    def close(self) -> None:
        assert self.writer.stop()
        self.journal.close()
        self.conn.close()

    def count(self) -> int:
        assert self.writer.flush(10)
        row = self.conn.execute("SELECT count(*) FROM usage_events").fetchone()
        assert row is not None
        return int(row[0])


def test_events_land_once_and_segments_rotate_and_are_released(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    for i in range(200):
        stack.journal.append(event(i))
    assert stack.count() == 200
    # 4 KiB segments: many were written, and all but the live one deleted once in DuckDB.
    assert stack.journal.position.segment > 5
    assert len(stack.journal.segments()) <= 2
    # The same events again (a replay) change nothing.
    for i in range(200):
        stack.journal.append(event(i, input_tokens=999))
    assert stack.count() == 200
    total = stack.conn.execute("SELECT sum(input_tokens) FROM usage_events").fetchone()
    assert total == (sum(100 + i for i in range(200)),)
    stack.close()


def test_restart_replays_only_what_duckdb_lacks(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    for i in range(50):
        stack.journal.append(event(i))
    assert stack.count() == 50
    stack.close()

    # Lines journaled but never written (the process died before the writer ran).
    journal = Journal(tmp_path / "journal", segment_bytes=1 << 20, fsync_interval=1)
    journal.lock()
    journal.start(lambda position, line: None)
    for i in range(50, 80):
        journal.append(event(i))
    journal.close()

    again = Stack(tmp_path)
    assert again.replayed == 30
    assert again.count() == 80
    again.close()


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal", segment_bytes=1 << 20, fsync_interval=1)
    journal.lock()
    journal.start(lambda position, line: None)
    journal.append(event(1))
    journal.close()
    segment = tmp_path / "journal" / "000000000001.jsonl"
    with open(segment, "ab") as handle:
        handle.write(orjson.dumps(event(2))[:40])  # a power cut mid-write
    stack = Stack(tmp_path)
    assert stack.replayed == 1
    assert stack.count() == 1
    assert stack.journal.corrupt_lines == 1
    stack.close()


def test_a_poison_line_is_set_aside_and_the_rest_land(tmp_path: Path) -> None:
    stack = Stack(tmp_path, flush_interval=0.3)
    stack.journal.append(event(1))
    stack.journal.append(event(2, input_tokens="not a number"))  # type: ignore[arg-type]
    stack.journal.append(event(3))
    assert stack.count() == 2
    rejected = (tmp_path / "journal" / "rejected.jsonl").read_bytes().splitlines()
    assert len(rejected) == 1 and b"not a number" in rejected[0]
    assert stack.writer.stats.rejected == 1
    stack.close()


def test_updates_fill_pending_rows_only(tmp_path: Path) -> None:
    stack = Stack(tmp_path)
    stack.journal.append(event(1, status="queued", input_tokens=None, user_id="u1"))
    stack.journal.append(event(2))
    assert stack.count() == 2
    stack.journal.append(event(1, kind="update", input_tokens=500, user_id=None))
    stack.journal.append(event(2, kind="update", input_tokens=777))  # already final: ignored
    stack.journal.append(event(3, kind="update"))  # never seen: ignored
    assert stack.count() == 2
    got = dict(stack.conn.execute("SELECT event_id, input_tokens FROM usage_events").fetchall())
    assert got == {"resp_1": 500, "resp_2": 102}
    user = stack.conn.execute("SELECT user_id FROM usage_events WHERE event_id='resp_1'")
    assert user.fetchone() == ("u1",)
    stack.close()


def test_one_process_per_journal(tmp_path: Path) -> None:
    first = Journal(tmp_path / "journal", segment_bytes=1 << 20, fsync_interval=1)
    first.lock()
    second = Journal(tmp_path / "journal", segment_bytes=1 << 20, fsync_interval=1)
    with pytest.raises(JournalLockedError):
        second.lock()
    first.close()


def test_parse_lines_types_every_column() -> None:
    frame = parse_lines([orjson.dumps(event(1, http_status=200, latency_ms=1.5)) + b"\n"])
    row = frame.row(0, named=True)
    assert row["created_at"].year == 2025
    assert row["http_status"] == 200 and row["latency_ms"] == 1.5
    assert row["event_id"] == "resp_1"


class Outage:
    """A sink that is away (StorageUnavailableError) while `down`, counting its tries."""

    def __init__(self, inner: DuckDBEvents) -> None:
        self.inner = inner
        self.down = True
        self.tries = 0

    def checkpoint(self) -> Position:
        return self.inner.checkpoint()

    def last_seq(self) -> int:
        return self.inner.last_seq()

    def append(self, creates: Any, updates: Any, *, seq: int, upto: Position) -> None:
        self.tries += 1
        if self.down:
            raise StorageUnavailableError("the warehouse is away")
        self.inner.append(creates, updates, seq=seq, upto=upto)

    def skip(self, upto: Position) -> None:
        if self.down:
            raise StorageUnavailableError("the warehouse is away")
        self.inner.skip(upto)


def test_a_long_outage_keeps_memory_bounded_and_loses_nothing(tmp_path: Path) -> None:
    """The warehouse away while 2,000 lines are journaled, with room for 100 in memory:
    the rest wait in the journal alone, are read back once it returns, and every event
    lands once, in order (an update after its create), none set aside."""
    stack = Stack(tmp_path, segment_bytes=1 << 16, batch_max=50, queue_max=100, outage=True)
    conn, journal, writer, sink = stack.conn, stack.journal, stack.writer, stack.sink
    assert isinstance(sink, Outage)
    try:
        for i in range(2000):
            journal.append(event(i, status="queued") if i % 10 == 0 else event(i))
        for i in range(0, 2000, 10):  # each queued one finishes, after its create
            journal.append(event(i, kind="update", input_tokens=7))
        deadline = time.monotonic() + 10
        while not writer.unavailable and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writer.unavailable and writer.spills == 1
        assert writer.backlog == 2200
        assert writer._queued <= 100  # memory: the queue never held more
        sink.down = False
        assert writer.flush(30), writer.backlog
        rows = conn.execute(
            """SELECT count(*), count(DISTINCT event_id), count(*) FILTER (status = 'queued'),
                      sum(input_tokens) FILTER (i % 10 = 0)
               FROM (SELECT *, CAST(substr(event_id, 6) AS INTEGER) AS i FROM usage_events)"""
        ).fetchone()
        assert rows == (2000, 2000, 0, 7 * 200)
        assert writer.stats.rejected == 0 and not (journal.directory / "rejected.jsonl").exists()
        assert not writer.unavailable
    finally:
        stack.close()


def test_stopping_writes_what_waits_in_the_journal_alone(tmp_path: Path) -> None:
    """A stop while lines were left to the journal alone (spilled) still writes them."""
    stack = Stack(tmp_path, segment_bytes=1 << 16, batch_max=10, queue_max=20, outage=True)
    conn, journal, writer, sink = stack.conn, stack.journal, stack.writer, stack.sink
    assert isinstance(sink, Outage)
    try:
        for i in range(300):
            journal.append(event(i))
        assert writer.spills == 1
        sink.down = False
        assert writer.stop(30)
        assert writer.backlog == 0
        assert journal.corrupt_lines == 0  # the live segment's last line is never misread
        rows = conn.execute("SELECT count(*), count(DISTINCT event_id) FROM usage_events")
        assert rows.fetchone() == (300, 300)
    finally:
        stack.close()
