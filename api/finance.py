"""Finance: the monthly report (JSON, CSV or Parquet, streamed), closing a month, and
the adjustments late changes post after a close."""

from __future__ import annotations

import asyncio
import io
import tempfile
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal

import duckdb
import polars as pl
from fastapi import APIRouter, HTTPException, Path, Query, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tokentill.api.deps import RuntimeDep
from tokentill.api.money import USD, usd
from tokentill.api.params import Day, bad_request
from tokentill.api.reports import in_thread
from tokentill.warehouse.finance import FinanceQuery, finance_report
from tokentill.warehouse.focus_close import close_month
from tokentill.warehouse.periods import (
    PeriodError,
    close_period,
    closed_periods,
    month_of,
)
from tokentill.warehouse.periods import (
    adjustments as period_adjustments,
)

router = APIRouter(tags=["finance"])
_CHUNK_ROWS = 5_000
_CHUNK_BYTES = 1 << 20


class FinanceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: Day | None = Field(None, description="Inclusive. Default: last month's first day.")
    end: Day | None = Field(None, description="Exclusive. Default: this month's first day.")
    tag_key: str | None = Field(
        None, min_length=1, max_length=64, description="A metadata key to break costs down by."
    )
    format: Literal["json", "csv", "parquet"] = "json"


class FinanceRow(BaseModel):
    section: Literal["model", "endpoint", "user", "tag", "adjustment", "total"]
    month: date | None
    key: str | None
    user_id: str | None
    for_period: date | None
    day: date | None
    requests: int | None
    input_tokens: int | None
    cached_input_tokens: int | None
    output_tokens: int | None
    reasoning_tokens: int | None
    total_tokens: int | None
    unpriced: int | None
    cost_usd: USD = Field(description="Exact.")
    amount_usd: str = Field(description="In cents, allocated so every section adds up.")


class FinanceReport(BaseModel):
    start: date
    end: date
    tag_key: str | None
    closed_months: list[date]
    rows: list[FinanceRow]


def _range(params: FinanceParams) -> FinanceQuery:
    this_month = month_of(datetime.now(UTC).date())
    end = params.end or this_month
    start = params.start or month_of(end - timedelta(days=1))
    if start >= end:
        raise bad_request("start", f"start ({start}) must be before end ({end})")
    if (end - start).days > 3 * 366:
        raise bad_request("end", "the range is longer than 3 years: ask for a shorter one")
    return FinanceQuery(start, end, params.tag_key)


def _dollars(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    return f"{sign}{abs(cents) // 100}.{abs(cents) % 100:02d}"


def _presentable(frame: pl.DataFrame) -> pl.DataFrame:
    """cost_pico -> exact cost_usd, cost_cents -> amount_usd (strings: no float anywhere)."""
    return frame.with_columns(
        pl.Series("cost_usd", [usd(v) for v in frame["cost_pico"].to_list()], pl.String),
        pl.Series("amount_usd", [_dollars(c) for c in frame["cost_cents"].to_list()], pl.String),
    ).drop("cost_pico", "cost_cents")


# OWASP's CSV injection rule: a cell a spreadsheet would read as a formula starts with
# one of these; it gets a leading apostrophe. Money and counts (plain numbers, negative
# ones included) are left exact.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = r"^[+-]?\d+(\.\d+)?$"


def neutralise_formulas(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` with every text cell that could run as a spreadsheet formula defused."""
    columns = [name for name, dtype in frame.schema.items() if dtype == pl.String]
    return frame.with_columns(_defused(pl.col(name)).alias(name) for name in columns)


def _defused(cell: pl.Expr) -> pl.Expr:
    risky = pl.any_horizontal([cell.str.starts_with(start) for start in _FORMULA_START])
    return (
        pl.when(risky & ~cell.str.contains(_PLAIN_NUMBER)).then(pl.lit("'") + cell).otherwise(cell)
    )


def csv_chunks(frame: pl.DataFrame) -> Iterator[bytes]:
    frame = neutralise_formulas(frame)
    for offset in range(0, max(frame.height, 1), _CHUNK_ROWS):
        buffer = io.BytesIO()
        frame.slice(offset, _CHUNK_ROWS).write_csv(buffer, include_header=offset == 0)
        yield buffer.getvalue()


def parquet_chunks(frame: pl.DataFrame) -> Iterator[bytes]:
    # Parquet's footer comes last: spool to a temporary file, then stream it out.
    with tempfile.TemporaryFile() as spool:
        frame.write_parquet(spool)
        spool.seek(0)
        while chunk := spool.read(_CHUNK_BYTES):
            yield chunk


@router.get(
    "/reports/finance",
    response_model=FinanceReport,
    summary="The finance report: cost by model, user and a metadata key, per month",
    responses={
        200: {
            "content": {
                "text/csv": {},
                "application/vnd.apache.parquet": {},
            }
        }
    },
)
async def finance(
    runtime: RuntimeDep, params: Annotated[FinanceParams, Query()]
) -> FinanceReport | StreamingResponse:
    query = _range(params)

    def read(conn: duckdb.DuckDBPyConnection) -> tuple[pl.DataFrame, list[date]]:
        return finance_report(conn, query), [p.period for p in closed_periods(conn)]

    frame, closed = await in_thread(runtime, read)
    table = _presentable(frame)
    name = f"tokentill-finance-{query.start}-{query.end}"
    if params.format == "csv":
        return StreamingResponse(
            csv_chunks(table),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )
    if params.format == "parquet":
        return StreamingResponse(
            parquet_chunks(table),
            media_type="application/vnd.apache.parquet",
            headers={"Content-Disposition": f'attachment; filename="{name}.parquet"'},
        )
    return FinanceReport(
        start=query.start,
        end=query.end,
        tag_key=query.tag_key,
        closed_months=[c for c in closed if query.start <= c < query.end],
        rows=[FinanceRow(**row) for row in table.iter_rows(named=True)],
    )


# -- closing periods ---------------------------------------------------------------------


class Period(BaseModel):
    period: date
    closed_at: datetime
    closed_by: str
    note: str | None


class CloseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    closed_by: str = Field(min_length=1, max_length=100)
    note: str | None = Field(None, max_length=1000)


class Adjustment(BaseModel):
    adjustment_id: int
    posted_period: date
    posted_at: datetime
    for_period: date
    day: date
    user_id: str | None
    model: str | None
    requests: int
    total_tokens: int | None
    cost_usd: USD


@router.get("/periods", response_model=list[Period], summary="Closed months")
async def periods(runtime: RuntimeDep) -> list[Period]:
    found = await in_thread(runtime, closed_periods)
    return [Period(**p.__dict__) for p in found]


@router.post(
    "/periods/{period}/close",
    response_model=Period,
    status_code=status.HTTP_201_CREATED,
    summary="Close a month: its finance report never changes again",
    responses={409: {"description": "Already closed"}, 404: {"description": "Not found"}},
)
async def close(
    runtime: RuntimeDep,
    period: Annotated[str, Path(pattern=r"^\d{4}-(0[1-9]|1[0-2])$", examples=["2026-10"])],
    body: CloseRequest,
) -> Period:
    month = _month(period, "period", "path")
    # Roll up first, so the copy taken holds everything recorded up to now.
    await asyncio.to_thread(runtime.rollup.run)

    def run(conn: duckdb.DuckDBPyConnection) -> Any:
        now = datetime.now(UTC)

        def focus(c: duckdb.DuckDBPyConnection) -> None:
            close_month(c, month, now, runtime.settings)

        return close_period(conn, month, body.closed_by, body.note, now, also=focus)

    try:
        closed = await in_thread(runtime, run)
    except PeriodError as exc:
        if "already" in str(exc):
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        raise bad_request("period", str(exc), "path") from exc
    return Period(**closed.__dict__)


def _month(text: str, param: str, where: str) -> date:
    year, month = int(text[:4]), int(text[5:])
    if not 1970 <= year <= 9998:
        raise bad_request(param, f"{text}: the year must be between 1970 and 9998", where)
    return date(year, month, 1)


class AdjustmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    posted_period: str | None = Field(None, pattern=r"^\d{4}-(0[1-9]|1[0-2])$")
    limit: int = Field(1000, ge=1, le=10_000)


@router.get(
    "/periods/adjustments",
    response_model=list[Adjustment],
    summary="Adjustments posted after closes (late events, re-pricing)",
)
async def adjustments(
    runtime: RuntimeDep, params: Annotated[AdjustmentParams, Query()]
) -> list[Adjustment]:
    posted_in = (
        _month(params.posted_period, "posted_period", "query") if params.posted_period else None
    )

    def read(conn: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
        return period_adjustments(conn, posted_in, params.limit)

    rows = await in_thread(runtime, read)
    return [
        Adjustment(**{k: v for k, v in r.items() if k != "cost_pico"}, cost_usd=usd(r["cost_pico"]))
        for r in rows
    ]
