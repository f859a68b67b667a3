"""The warehouse's storage seam: what the rest of tokentill needs of the engine that holds
the usage events and every table derived from them.

Two faces, both small:

- `EventSink`, the writer's: one batch of new events and of updates to pending ones is
  committed together with the journal position it reaches, so that a replay after a
  crash starts after the last committed batch (exactly once: a batch is either in, with
  its position, or replayed whole). The sink also answers where that position is.
- `Storage.session()`, everyone else's: a connection of its own, for one thread, that
  speaks DuckDB's SQL over the warehouse's tables (the rollup job, the abuse job, the
  report queries, the quota seeds, the alert outbox). The queries live in `warehouse/`,
  never in the proxy, the API or the dashboard, which only call them.

`DuckDBFile` (warehouse/duckdb_file.py) is the first implementation: one DuckDB file,
owned by this process. A second backend (several processes writing one lake) implements
these two faces; the proxy, the API and the dashboard do not change.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Protocol

import duckdb
import polars as pl


class StorageUnavailableError(RuntimeError):
    """The warehouse cannot be reached just now (a lake whose catalog is down): nothing is
    wrong with the batch, which is retried whole once it is back."""


class Position(NamedTuple):
    """A place in the journal: how far it has been written into the warehouse."""

    segment: int
    offset: int


class EventSink(Protocol):
    """Where the writer puts usage events (one writer per sink)."""

    def checkpoint(self) -> Position:
        """The journal position of the last committed batch (0, 0 for none)."""
        ...

    def last_seq(self) -> int:
        """The highest `ingest_seq` committed (each batch takes the next one)."""
        ...

    def append(
        self, creates: pl.DataFrame, updates: pl.DataFrame, *, seq: int, upto: Position
    ) -> None:
        """In one transaction: insert `creates` (a replayed event already stored is
        skipped), apply `updates` to the events still pending, stamp both with `seq`,
        and move the checkpoint to `upto`. Raises, changing nothing, on failure."""
        ...

    def skip(self, upto: Position) -> None:
        """Move the checkpoint past a line that will never be written (set aside)."""
        ...


class Storage(Protocol):
    """The warehouse: its writer's sink and sessions for everything else."""

    @property
    def name(self) -> str:
        """What the warehouse is, for logs and health (say, the file's path)."""
        ...

    @property
    def events(self) -> EventSink: ...

    def session(self) -> duckdb.DuckDBPyConnection:
        """A connection of its own for one thread (UTC), to read, or to run a job."""
        ...

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """A section no other process on this warehouse runs at the same time (adding
        prices, seeding the catalog). The file has one process: its threads' own locks
        suffice, and this is a no-op."""
        ...

    def leads(self) -> bool:
        """Whether this process runs the scheduled jobs now: always, on the file; on a
        lake, while it holds the worker's lease (one active worker at a time)."""
        ...

    def close(self) -> bool:
        """Close (interrupting queries still running); False when it stayed in use."""
        ...
