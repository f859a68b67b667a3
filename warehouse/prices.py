"""The `prices` table: seeding it from the published catalog, operator overrides from a
TOML file, and reading it back. Rows are only ever added (see migration 0002)."""

from __future__ import annotations

import contextlib
import threading
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import duckdb
import polars as pl

from tokentill.warehouse.catalog import (
    EPOCH,
    OVERRIDE_PRIORITY,
    PRICE_COLUMNS,
    PriceRow,
    published_prices,
    source_version,
)
from tokentill.warehouse.db import fetch_one, query_frame, registered, transaction
from tokentill.warehouse.pricing import effective_intervals

TIERS = ("default", "flex", "priority", "batch", "scale")
# A row prices something only with one of these: tokens in, audio by the hour, characters.
BASE_RATES = ("input_per_mtok", "audio_per_hour", "input_per_mchar")
_ROW_COLUMNS = (
    "model",
    "service_tier",
    "effective_from",
    "effective_to",
    *PRICE_COLUMNS,
    "source",
    "priority",
    "note",
)


class PriceFileError(ValueError):
    """A prices file that cannot be used, with what to fix."""


def insert_rows(conn: duckdb.DuckDBPyConnection, rows: Sequence[PriceRow]) -> int:
    """Add rows to the catalog, skipping any identical row already there (so loading the
    same file or snapshot twice changes nothing). Returns how many were added."""
    if not rows:
        return 0
    frame = pl.DataFrame([row.as_record() for row in rows], infer_schema_length=None)
    with registered(conn, "_new_prices", frame):
        columns = ", ".join(f'"{c}"' for c in _ROW_COLUMNS)
        same = " AND ".join(f'p."{c}" IS NOT DISTINCT FROM n."{c}"' for c in _ROW_COLUMNS)
        before = _count(conn)
        conn.execute(
            f"""INSERT INTO prices ({columns})
                SELECT {columns} FROM _new_prices AS n
                WHERE NOT EXISTS (SELECT 1 FROM prices AS p WHERE {same})"""
        )
        return _count(conn) - before


def _count(conn: duckdb.DuckDBPyConnection) -> int:
    row = fetch_one(conn, "SELECT count(*) FROM prices")
    return int(row[0]) if row else 0


def seed_published(conn: duckdb.DuckDBPyConnection) -> int:
    """Load the published catalog once per genai-prices version."""
    version = source_version()
    seen = fetch_one(conn, "SELECT count(*) FROM prices WHERE source = ?", [version])
    if seen and seen[0]:
        return 0
    return insert_rows(conn, published_prices())


def _decimal(value: Any, where: str) -> Decimal:
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise PriceFileError(f"{where}: {value!r} is not a number") from None
    if number < 0 or number != number.quantize(Decimal("0.000001")):
        raise PriceFileError(f"{where}: {value} must be >= 0 with at most 6 decimals")
    return number


def _moment(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    raise PriceFileError(f"{where}: {value!r} is not a TOML date or date-time")


def parse_price_entries(entries: Any, source: str) -> list[PriceRow]:
    """Validate override entries (from a TOML file or the API) into rows."""
    if not isinstance(entries, list):
        raise PriceFileError("expected an array of tables [[price]]")
    rows = []
    for index, entry in enumerate(entries, 1):
        where = f"price #{index}"
        if not isinstance(entry, dict):
            raise PriceFileError(f"{where}: expected a table")
        unknown = set(entry) - {
            "model",
            "service_tier",
            "effective_from",
            "effective_to",
            "note",
            *PRICE_COLUMNS,
        }
        if unknown:
            raise PriceFileError(f"{where}: unknown keys {sorted(unknown)}")
        model = entry.get("model")
        if not isinstance(model, str) or not model:
            raise PriceFileError(f"{where}: 'model' is required")
        tier = entry.get("service_tier", "default")
        if tier not in TIERS:
            raise PriceFileError(f"{where}: service_tier must be one of {', '.join(TIERS)}")
        start = _moment(entry.get("effective_from", EPOCH), f"{where}.effective_from")
        end = entry.get("effective_to")
        end_at = None if end is None else _moment(end, f"{where}.effective_to")
        if end_at is not None and end_at <= start:
            raise PriceFileError(f"{where}: effective_to must be after effective_from")
        prices: dict[str, Decimal | int | None] = {}
        for column in PRICE_COLUMNS:
            if column in entry:
                if column == "tier_threshold":
                    threshold = entry[column]
                    if not isinstance(threshold, int) or threshold <= 0:
                        raise PriceFileError(f"{where}: tier_threshold must be a positive integer")
                    prices[column] = threshold
                else:
                    prices[column] = _decimal(entry[column], f"{where}.{column}")
        if all(prices.get(base) is None for base in BASE_RATES):
            # (An output rate is optional: embeddings have none. An answer with output
            # and no output rate is unpriced, never free.)
            raise PriceFileError(f"{where}: it names no rate; give one of {', '.join(BASE_RATES)}")
        note = entry.get("note")
        rows.append(
            PriceRow(
                model,
                tier,
                start,
                end_at,
                prices,
                source,
                OVERRIDE_PRIORITY,
                note if isinstance(note, str) else None,
            )
        )
    return rows


def load_price_file(path: Path) -> list[PriceRow]:
    """Read operator overrides: a TOML file of `[[price]]` tables, for example

    [[price]]
    model = "ft:gpt-4o-mini-2024-07-18:acme::*"   # '*' ends a prefix
    service_tier = "default"
    effective_from = 2026-01-01
    input_per_mtok = 0.30
    cached_input_per_mtok = 0.15
    output_per_mtok = 1.20
    note = "negotiated rate"
    """
    try:
        document = tomllib.loads(path.read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PriceFileError(f"{path}: {exc}") from exc
    return parse_price_entries(document.get("price", []), f"file:{path.name}")


def price_table(conn: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    return query_frame(conn, "SELECT * FROM prices ORDER BY price_id")


@dataclass(frozen=True)
class Catalog:
    """The price catalog at one moment: its rows and their flattened intervals
    (`pricing.effective_intervals`). `mark` (the highest price_id, the row count) names
    it: prices are only ever added."""

    mark: tuple[int, int]
    prices: pl.DataFrame
    intervals: pl.DataFrame

    @property
    def price_mark(self) -> int:
        return self.mark[0]

    @property
    def names(self) -> list[str]:
        """The catalog's model names and prefixes."""
        names: list[str] = self.prices["model"].unique().to_list() if self.prices.height else []
        return names


class CatalogCache:
    """The process's one snapshot of the price catalog, shared by the rollup job, the
    report queries and the quotas: worked out again only when a price was added (a
    cheap check of the mark on each read). Owned by the composition root."""

    def __init__(
        self, exclusive: Callable[[], contextlib.AbstractContextManager[None]] | None = None
    ) -> None:
        """`exclusive`: the warehouse's section that no other process runs at once
        (`Storage.exclusive`): on a lake, price ids commit in order across processes."""
        self._exclusive = exclusive or contextlib.nullcontext
        self._lock = threading.Lock()
        self._current: Catalog | None = None
        # The rollup job takes the prices above the highest id it has seen as new (and
        # re-prices what they cover): a price whose lower id committed after a higher one
        # would be missed. One writer at a time commits ids in order.
        self._adding = threading.Lock()

    @contextlib.contextmanager
    def adding(self, conn: duckdb.DuckDBPyConnection) -> Iterator[None]:
        """A transaction for adding prices, committed before any other price is added."""
        with self._adding, self._exclusive(), transaction(conn):
            yield

    def read(self, conn: duckdb.DuckDBPyConnection) -> Catalog:
        row = fetch_one(conn, "SELECT coalesce(max(price_id), 0), count(*) FROM prices")
        mark = (int(row[0]), int(row[1])) if row else (0, 0)
        with self._lock:
            current = self._current
            if current is None or current.mark != mark:
                prices = price_table(conn)
                current = self._current = Catalog(mark, prices, effective_intervals(prices))
            return current


def list_prices(
    conn: duckdb.DuckDBPyConnection,
    *,
    model: str | None,
    source: Literal["published", "override"] | None,
    in_force_at: datetime | None,
    limit: int,
    offset: int,
) -> tuple[int, pl.DataFrame]:
    """Catalog rows, newest first, and how many match: of a model, of a source
    (published rows have priority 0, overrides more), in force at a moment."""
    where: list[str] = ["true"]
    args: list[object] = []
    if model is not None:
        where.append("model = ?")
        args.append(model)
    if source is not None:
        where.append("priority > 0" if source == "override" else "priority = 0")
    if in_force_at is not None:
        # A row without an end stops where the next of at least its priority starts
        # (pricing._ends): a corrected row is not in force past its correction's
        # interval, nor an old price past a later one.
        where.append(
            """effective_from <= ? AND coalesce(effective_to, (
                   SELECT min(q.effective_from) FROM prices AS q
                   WHERE q.model = p.model AND q.service_tier = p.service_tier
                     AND q.effective_from > p.effective_from AND q.priority >= p.priority
               ), 'infinity'::TIMESTAMPTZ) > ?"""
        )
        args += [in_force_at] * 2
    frame = query_frame(
        conn,
        f"""SELECT *, count(*) OVER () AS total FROM prices AS p WHERE {" AND ".join(where)}
            ORDER BY price_id DESC LIMIT ? OFFSET ?""",
        [*args, limit, offset],
    )
    total = int(frame["total"][0]) if frame.height else 0
    return total, frame.drop("total")


def add_price_rows(
    conn: duckdb.DuckDBPyConnection, catalog: CatalogCache, rows: Sequence[PriceRow]
) -> tuple[int, pl.DataFrame]:
    """Add catalog rows (in the catalog's one adding transaction); returns how many were
    new and the rows stored by this call."""
    with catalog.adding(conn):
        before = fetch_one(conn, "SELECT coalesce(max(price_id), 0) FROM prices")
        added = insert_rows(conn, rows)
        frame = query_frame(
            conn,
            "SELECT * FROM prices WHERE price_id > ? ORDER BY price_id",
            [before[0] if before else 0],
        )
    return added, frame
