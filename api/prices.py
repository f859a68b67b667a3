"""The price catalog: list it, and add or override prices.

Rows are only ever added (see warehouse/migrations/0002): an override is a new row with
a higher priority, recorded with its author (`source = api:<author>`), its note and when
it was recorded, so the catalog is its own audit log. The next rollup run re-prices the
events the new row covers, and nothing else.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import duckdb
import polars as pl
from fastapi import APIRouter, Query, status
from pydantic import BaseModel, ConfigDict, Field

from tokentill.api.deps import RuntimeDep
from tokentill.api.params import Moment, bad_request, utc
from tokentill.api.reports import in_thread
from tokentill.warehouse.prices import (
    TIERS,
    PriceFileError,
    add_price_rows,
    parse_price_entries,
)
from tokentill.warehouse.prices import list_prices as list_catalog

router = APIRouter(prefix="/prices", tags=["prices"])
Rate = Annotated[Decimal | None, Field(None, ge=0, max_digits=18, decimal_places=6)]


class Price(BaseModel):
    price_id: int
    model: str
    service_tier: str
    effective_from: datetime
    effective_to: datetime | None
    currency: str
    input_per_mtok: Decimal | None
    cached_input_per_mtok: Decimal | None
    cache_write_per_mtok: Decimal | None
    output_per_mtok: Decimal | None
    tier_threshold: int | None
    tier_input_per_mtok: Decimal | None
    tier_cached_input_per_mtok: Decimal | None
    tier_cache_write_per_mtok: Decimal | None
    tier_output_per_mtok: Decimal | None
    web_search_per_call: Decimal | None
    image_input_per_mtok: Decimal | None
    image_cached_input_per_mtok: Decimal | None
    image_output_per_mtok: Decimal | None
    audio_input_per_mtok: Decimal | None = None
    audio_cached_input_per_mtok: Decimal | None = None
    audio_output_per_mtok: Decimal | None = None
    audio_per_hour: Decimal | None = Field(None, description="USD per hour of audio transcribed.")
    input_per_mchar: Decimal | None = Field(None, description="USD per 1M characters spoken.")
    source: str
    priority: int
    recorded_at: datetime
    note: str | None


class PriceList(BaseModel):
    prices: list[Price]
    total: int


class ListParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=256, description="Exact model id or prefix*.")
    source: Literal["published", "override"] | None = None
    in_force_at: Moment | None = Field(None, description="Only rows in force then.")
    limit: int = Field(500, ge=1, le=10_000)
    offset: int = Field(0, ge=0)


@router.get("", response_model=PriceList, summary="The price catalog, newest first")
async def list_prices(runtime: RuntimeDep, params: Annotated[ListParams, Query()]) -> PriceList:
    in_force_at = utc(params.in_force_at) if params.in_force_at is not None else None

    def read(conn: duckdb.DuckDBPyConnection) -> tuple[int, pl.DataFrame]:
        return list_catalog(
            conn,
            model=params.model,
            source=params.source,
            in_force_at=in_force_at,
            limit=params.limit,
            offset=params.offset,
        )

    total, frame = await in_thread(runtime, read)
    return PriceList(
        prices=[Price.model_validate(r) for r in frame.iter_rows(named=True)],
        total=total,
    )


class NewPrice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256, description="An id, or a prefix ending *.")
    service_tier: Literal[TIERS] = "default"  # type: ignore[valid-type]
    effective_from: datetime | None = Field(None, description="Default: the catalog's epoch.")
    effective_to: datetime | None = None
    input_per_mtok: Rate
    cached_input_per_mtok: Rate
    cache_write_per_mtok: Rate
    output_per_mtok: Rate
    tier_threshold: int | None = Field(None, gt=0)
    tier_input_per_mtok: Rate
    tier_cached_input_per_mtok: Rate
    tier_cache_write_per_mtok: Rate
    tier_output_per_mtok: Rate
    web_search_per_call: Rate
    image_input_per_mtok: Rate
    image_cached_input_per_mtok: Rate
    image_output_per_mtok: Rate
    audio_input_per_mtok: Rate
    audio_cached_input_per_mtok: Rate
    audio_output_per_mtok: Rate
    audio_per_hour: Rate
    input_per_mchar: Rate
    note: str | None = Field(None, max_length=1000)


class PriceChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    author: str = Field(min_length=1, max_length=100, pattern=r"^[\w.@+-]+$")
    prices: list[NewPrice] = Field(min_length=1, max_length=1000)


class PriceChangeResult(BaseModel):
    added: int = Field(description="Rows added (an identical row already there is skipped).")
    prices: list[Price]


@router.post(
    "",
    response_model=PriceChangeResult,
    status_code=status.HTTP_201_CREATED,
    summary="Add or override prices (versioned: rows are only ever added)",
)
async def add_prices(runtime: RuntimeDep, change: PriceChange) -> PriceChangeResult:
    entries: list[dict[str, Any]] = [
        {k: v for k, v in p.model_dump().items() if v is not None} for p in change.prices
    ]
    try:
        rows = parse_price_entries(entries, f"api:{change.author}")
    except PriceFileError as exc:
        raise bad_request("prices", str(exc), "body") from exc

    def write(conn: duckdb.DuckDBPyConnection) -> tuple[int, pl.DataFrame]:
        return add_price_rows(conn, runtime.catalog, rows)

    added, frame = await in_thread(runtime, write)
    return PriceChangeResult(
        added=added, prices=[Price.model_validate(r) for r in frame.iter_rows(named=True)]
    )
