"""The capture journal: an append-only log of finished responses' usage events.

The proxy appends an event (one JSON line, one `write(2)`) before the client gets the
last byte of its response, so once a client holds a full response its event is in
the kernel: a kill -9 of tokentill loses nothing. A background thread fsyncs the
active segment every `fsync_interval` (group fsync), bounding what a power cut can
lose. The writer moves events into DuckDB and records how far it got; segments wholly
behind that checkpoint are deleted.

Segments are `NNNNNNNNNNNN.jsonl`; a position is (segment, byte offset after a line).
Each process start writes to a new segment, so a torn last line (power cut) is only
ever at the end of an old segment, where replay skips it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

from tokentill.warehouse.events import UsageEvent
from tokentill.warehouse.storage import Position

log = logging.getLogger(__name__)


class JournalLockedError(RuntimeError):
    """Another process is writing this journal."""


Sink = Callable[[Position, bytes], None]


def journal_identity(directory: Path) -> str:
    """The journal's own name, made once with it (`<directory>/IDENTITY`): a lake keeps a
    proxy's checkpoint under it, so that a fresh journal under an old instance id never
    skips lines for positions an older journal reached."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "IDENTITY"
    try:
        return path.read_text("ascii").strip()
    except FileNotFoundError:
        identity = uuid.uuid4().hex
        temporary = path.with_suffix(".tmp")
        temporary.write_text(identity, "ascii")
        os.replace(temporary, path)  # all or nothing, even if killed here
        return identity


class Journal:
    def __init__(self, directory: Path, *, segment_bytes: int, fsync_interval: float) -> None:
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._fsync_interval = fsync_interval
        self._lock = threading.Lock()
        self._fd = -1
        self._segment = 0
        self._offset = 0
        self._dirty = False
        self._lock_fd = -1
        self._closing = threading.Event()
        self._fsync_thread: threading.Thread | None = None
        self._sink: Sink | None = None
        self.corrupt_lines = 0
        self.appended = 0

    # -- lifecycle ---------------------------------------------------------------

    def lock(self) -> None:
        """Take the journal for this process (before replaying it)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalLockedError(
                f"{self.directory} is in use by another tokentill process"
            ) from None
        self._lock_fd = fd

    def segments(self) -> list[int]:
        return sorted(int(e.stem) for e in self.directory.glob("*.jsonl") if e.stem.isdigit())

    def replay(
        self, after: Position, upto: Position | None = None
    ) -> Iterator[tuple[Position, bytes]]:
        """Every complete line past `after` (and up to `upto`), in order. A torn last line
        (a power cut mid-write) is counted, logged and skipped; the writer vets the rest.
        (A line past `upto` may still be being written: never read, never counted.)"""
        for segment in self.segments():
            if segment < after.segment:
                continue
            if upto is not None and segment > upto.segment:
                return
            start = after.offset if segment == after.segment else 0
            with open(self._path(segment), "rb") as handle:
                handle.seek(start)
                offset = start
                for line in handle:
                    offset += len(line)
                    if upto is not None and Position(segment, offset) > upto:
                        return
                    if not line.endswith(b"\n"):
                        self.corrupt_lines += 1
                        log.warning("journal %s: torn last line skipped", segment)
                        break
                    yield Position(segment, offset), line

    def start(self, sink: Sink) -> None:
        """Open a fresh segment for appends; every append is handed to `sink`."""
        self._sink = sink
        existing = self.segments()
        self._open_segment((existing[-1] + 1) if existing else 1)
        self._fsync_thread = threading.Thread(
            target=self._fsync_loop, name="tokentill-journal-fsync", daemon=True
        )
        self._fsync_thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._fsync_thread is not None:
            self._fsync_thread.join(timeout=5)
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- hot path ----------------------------------------------------------------

    def append(self, event: UsageEvent) -> Position:
        line = orjson.dumps(event) + b"\n"
        with self._lock:
            if self._fd < 0:
                raise RuntimeError("journal is not open")
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            self._offset += len(line)
            position = Position(self._segment, self._offset)
            self._dirty = True
            self.appended += 1
            if self._offset >= self._segment_bytes:
                self._rotate()
            # Inside the lock: the sink sees lines in the order of their positions, which
            # the writer relies on (it reads past a position back from the journal).
            if self._sink is not None:
                self._sink(position, line)
        return position

    # -- housekeeping --------------------------------------------------------------

    def release(self, upto: Position) -> None:
        """Delete segments wholly behind `upto` (already in DuckDB)."""
        for segment in self.segments():
            if segment >= upto.segment or segment == self._segment:
                break
            with contextlib.suppress(FileNotFoundError):
                self._path(segment).unlink()

    @property
    def position(self) -> Position:
        return Position(self._segment, self._offset)

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:012d}.jsonl"

    def _open_segment(self, segment: int) -> None:
        self._fd = os.open(
            self._path(segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        self._segment = segment
        self._offset = 0
        # Make the new file's name durable too.
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _rotate(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._dirty = False
        self._open_segment(self._segment + 1)

    def _fsync_loop(self) -> None:
        while not self._closing.wait(self._fsync_interval):
            self.sync()

    def sync(self) -> None:
        with self._lock:
            if not self._dirty or self._fd < 0:
                return
            fd = self._fd
            self._dirty = False
        # fsync outside the lock so appends are not held up by the disk; the fd stays
        # valid because only rotate/close (which fsync themselves) close it.
        with contextlib.suppress(OSError):  # rotated or closed meanwhile: fsynced there
            os.fsync(fd)
