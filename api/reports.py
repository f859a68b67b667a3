"""Costs, users and models: tokentill's own report routes, read from the rollups.

Money is an exact USD string (`cost_usd`); `unpriced` counts the responses whose model
had no price in force, so a figure always says how much it does not know.
"""

from __future__ import annotations

import asyncio
import calendar
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import duckdb
import orjson
import polars as pl
from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from pydantic import BaseModel, Field

from tokentill.api.deps import RuntimeDep
from tokentill.api.money import USD, usd
from tokentill.api.params import FilterParams, bad_request, filters
from tokentill.warehouse.spend import (
    MEASURES,
    Filters,
    QueryError,
    SpendQuery,
    check_dimension,
    choose_source,
    list_users,
    midnight,
    priced_events,
    raw_where,
    spend,
    spent,
)

if TYPE_CHECKING:
    from tokentill.api.runtime import AdminRuntime

router = APIRouter(tags=["reports"])
T = TypeVar("T")


async def in_thread(runtime: AdminRuntime, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
    """Run a warehouse read on its own cursor, off the event loop."""

    def run() -> T:
        conn = runtime.connect()
        try:
            return work(conn)
        finally:
            conn.close()

    try:
        return await asyncio.to_thread(run)
    except QueryError as exc:
        raise bad_request(exc.param, str(exc)) from exc


class Measures(BaseModel):
    requests: int
    input_tokens: int | None
    cached_input_tokens: int | None = Field(description="Part of input_tokens.")
    output_tokens: int | None
    reasoning_tokens: int | None = Field(description="Part of output_tokens.")
    total_tokens: int | None
    cost_usd: USD | None = Field(
        description="Exact. Null when some responses had no price in force (`unpriced`): "
        "then the total is not known, and `priced_cost_usd` is the part that is."
    )
    priced_cost_usd: USD = Field(description="What the priced responses cost (exact).")
    unpriced: int = Field(description="Responses with no price in force: not in the money.")
    errors: int | None
    incomplete: int | None
    failed: int | None


def measures(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests": row["requests"] or 0,
        "input_tokens": row["input_tokens"],
        "cached_input_tokens": row["cached_input_tokens"],
        "output_tokens": row["output_tokens"],
        "reasoning_tokens": row["reasoning_tokens"],
        "total_tokens": row["total_tokens"],
        # Unpriced money is unknown, never 0: a total missing parts is not a total.
        "cost_usd": None if row["unpriced"] else usd(row["cost_pico"]),
        "priced_cost_usd": usd(row["cost_pico"]),
        "unpriced": row["unpriced"] or 0,
        "errors": row["errors"],
        "incomplete": row["incomplete"],
        "failed": row["failed"],
    }


class CostRow(Measures):
    bucket: datetime | None
    group: dict[str, str | None]


class CostReport(BaseModel):
    start: datetime
    end: datetime
    group_by: list[str]
    bucket: str | None
    source: str = Field(description="The table that answered: a rollup, or raw events.")
    rows: list[CostRow]
    truncated: bool = Field(description="More rows than `limit`; the totals cover them all.")
    totals: Measures


class CostParams(FilterParams):
    group_by: list[str] = Field(
        [],
        max_length=4,
        description="user, model, service_tier, status, endpoint, api_key, tag:<key>.",
    )
    bucket: Literal["hour", "day", "month"] | None = None
    limit: int = Field(1000, ge=1, le=10_000)


def _totals(frame: pl.DataFrame) -> dict[str, Any]:
    sums = frame.select(
        pl.col(c).sum()
        for c in frame.columns
        if c not in ("bucket",) and frame.schema[c] != pl.String
    )
    row = sums.row(0, named=True) if sums.height else {}
    return measures({k: row.get(k) for k in MEASURES})


async def cost_report(runtime: AdminRuntime, params: CostParams) -> dict[str, Any]:
    """CostReport's shape as plain values: what GET /api/costs answers, and what the
    dashboard draws."""
    try:
        dims = tuple(dict.fromkeys(check_dimension(d) for d in params.group_by))
    except QueryError as exc:
        raise bad_request(exc.param, str(exc)) from exc
    query = SpendQuery(filters(params), dims, params.bucket)
    frame = await in_thread(
        runtime,
        lambda conn: spend(
            conn, query, image_model=runtime.settings.image_gen_model, catalog=runtime.catalog
        ),
    )
    rows = [
        {"bucket": row.get("bucket"), "group": {d: row[d] for d in dims}, **measures(row)}
        for row in frame.head(params.limit).iter_rows(named=True)
    ]
    return {
        "start": query.filters.start,
        "end": query.filters.end,
        "group_by": list(dims),
        "bucket": params.bucket,
        "source": choose_source(query),
        "rows": rows,
        "truncated": frame.height > params.limit,
        "totals": _totals(frame),
    }


@router.get("/costs", response_model=CostReport, summary="Costs, grouped and bucketed")
async def costs(runtime: RuntimeDep, params: Annotated[CostParams, Query()]) -> Response:
    # Thousands of rows: serialized straight from plain values (the shape is CostReport's;
    # schemathesis holds the route to it), not validated again row by row.
    report = await cost_report(runtime, params)
    return Response(orjson.dumps(report), media_type="application/json")


# -- month to date -----------------------------------------------------------------------


class Summary(BaseModel):
    as_of: datetime
    today_usd: USD
    month_to_date_usd: USD
    projected_month_end_usd: USD = Field(
        description="Month to date plus the last 7 days' average daily spend for the rest "
        "of the month (the month so far when it is younger than 7 days)."
    )
    last_month_usd: USD
    unpriced_month_to_date: int


def month_summary(conn: duckdb.DuckDBPyConnection, now: datetime) -> Summary:
    today = midnight(now)
    month = today.replace(day=1)
    days_in_month = calendar.monthrange(month.year, month.month)[1]
    month_end = month + timedelta(days=days_in_month)
    last_month = (month - timedelta(days=1)).replace(day=1)
    hour = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    spent_today, _ = spent(conn, today, hour)
    mtd, unpriced = spent(conn, month, hour)
    window_start = max(month, today - timedelta(days=7))
    window, _ = spent(conn, window_start, hour)
    elapsed = (hour - window_start).total_seconds()
    remaining = (month_end - hour).total_seconds()
    rate = Decimal(window) / Decimal(elapsed) if elapsed > 0 else Decimal(0)
    projected = mtd + int(rate * Decimal(max(remaining, 0)))
    previous, _ = spent(conn, last_month, month)
    return Summary(
        as_of=now,
        today_usd=usd(spent_today),
        month_to_date_usd=usd(mtd),
        projected_month_end_usd=usd(projected),
        last_month_usd=usd(previous),
        unpriced_month_to_date=unpriced,
    )


@router.get("/costs/summary", response_model=Summary, summary="Today, month to date, projection")
async def summary(runtime: RuntimeDep) -> Summary:
    now = datetime.now(UTC)
    return await in_thread(runtime, lambda conn: month_summary(conn, now))


# -- users -------------------------------------------------------------------------------


class UserRow(Measures):
    user_id: str | None
    first_seen: datetime | None = Field(description="Start of the first hour with usage.")
    last_seen: datetime | None = Field(description="Start of the last hour with usage.")


class UserPage(BaseModel):
    start: datetime
    end: datetime
    total_users: int
    users: list[UserRow]


class UserParams(FilterParams):
    sort: Literal["cost", "tokens", "requests", "first_seen", "last_seen", "user_id"] = "cost"
    order: Literal["asc", "desc"] = "desc"
    limit: int = Field(100, ge=1, le=10_000)
    offset: int = Field(0, ge=0, le=10_000_000)


@router.get("/users", response_model=UserPage, summary="End users with spend, sortable")
async def users(runtime: RuntimeDep, params: Annotated[UserParams, Query()]) -> UserPage:
    f = filters(params)
    f = _whole_hours(f)
    total, rows = await in_thread(
        runtime,
        lambda conn: list_users(conn, f, params.sort, params.order, params.limit, params.offset),
    )
    return UserPage(
        start=f.start,
        end=f.end,
        total_users=total,
        users=[
            UserRow(
                user_id=r["user_id"],
                first_seen=r["first_seen"],
                last_seen=r["last_seen"],
                **measures(r),
            )
            for r in rows
        ],
    )


def _whole_hours(f: Filters) -> Filters:
    for moment in (f.start, f.end):
        if moment.minute or moment.second or moment.microsecond:
            raise bad_request(
                "start", "users are rolled up by the hour: start and end must be whole hours"
            )
    return f


class ByModel(Measures):
    model: str | None


class ByDay(Measures):
    day: datetime


class EventRow(BaseModel):
    event_id: str
    response_id: str | None
    created_at: datetime
    endpoint: str
    model: str | None
    service_tier: str | None
    status: str
    user_id: str | None
    input_tokens: int | None
    cached_input_tokens: int | None
    output_tokens: int | None
    reasoning_tokens: int | None
    total_tokens: int | None
    cost_usd: USD | None = Field(description="Null when the model had no price in force.")


class UserDetail(BaseModel):
    user_id: str
    start: datetime
    end: datetime
    totals: Measures
    by_model: list[ByModel]
    by_day: list[ByDay]
    recent: list[EventRow]


def event_rows(frame: pl.DataFrame) -> list[EventRow]:
    return [
        EventRow(
            **{k: row[k] for k in EventRow.model_fields if k in row and k != "cost_usd"},
            cost_usd=None if row["cost_pico"] is None else usd(row["cost_pico"]),
        )
        for row in frame.iter_rows(named=True)
    ]


@router.get(
    "/users/{user_id}",
    response_model=UserDetail,
    summary="One end user's detail",
    responses={404: {"description": "No usage for this user in the range"}},
)
async def user_detail(
    runtime: RuntimeDep,
    user_id: Annotated[str, Path(min_length=1, max_length=256)],
    params: Annotated[FilterParams, Query()],
) -> UserDetail:
    base = filters(params)
    f = Filters(**{**base.__dict__, "users": (user_id,)})
    image_model, catalog = runtime.settings.image_gen_model, runtime.catalog

    def read(conn: duckdb.DuckDBPyConnection) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        by_model = spend(conn, SpendQuery(f, ("model",)), image_model=image_model, catalog=catalog)
        by_day = spend(conn, SpendQuery(f, (), "day"), image_model=image_model, catalog=catalog)
        params_: list[object] = []
        where = raw_where(f, params_)
        recent = priced_events(
            conn,
            where,
            params_,
            image_model=image_model,
            catalog=catalog,
            order="ORDER BY created_at DESC, event_id DESC LIMIT 20",
        ).sort("created_at", "event_id", descending=True)
        return by_model, by_day, recent

    by_model, by_day, recent = await in_thread(runtime, read)
    if by_model.height == 0 and recent.height == 0:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no usage for user {user_id!r} in range")
    return UserDetail(
        user_id=user_id,
        start=f.start,
        end=f.end,
        totals=Measures(**_totals(by_model)),
        by_model=[ByModel(model=r["model"], **measures(r)) for r in by_model.iter_rows(named=True)],
        by_day=[ByDay(day=r["bucket"], **measures(r)) for r in by_day.iter_rows(named=True)],
        recent=event_rows(recent),
    )


# -- models ------------------------------------------------------------------------------


class ModelRow(Measures):
    model: str | None
    average_cost_per_request_usd: USD | None
    cached_input_share: float | None = Field(description="cached / input tokens.")
    reasoning_share: float | None = Field(description="reasoning / output tokens.")


class ModelReport(BaseModel):
    start: datetime
    end: datetime
    models: list[ModelRow]
    unpriced_models: list[str] = Field(description="Models with responses that had no price.")


@router.get("/models", response_model=ModelReport, summary="Spend and tokens per model")
async def models(runtime: RuntimeDep, params: Annotated[FilterParams, Query()]) -> ModelReport:
    query = SpendQuery(filters(params), ("model",))
    frame = await in_thread(
        runtime,
        lambda conn: spend(
            conn, query, image_model=runtime.settings.image_gen_model, catalog=runtime.catalog
        ),
    )
    out = []
    for row in frame.iter_rows(named=True):
        priced = (row["requests"] or 0) - (row["unpriced"] or 0)
        cost = int(row["cost_pico"] or 0)
        out.append(
            ModelRow(
                model=row["model"],
                average_cost_per_request_usd=usd(round(Decimal(cost) / priced))
                if priced > 0
                else None,
                cached_input_share=_share(row["cached_input_tokens"], row["input_tokens"]),
                reasoning_share=_share(row["reasoning_tokens"], row["output_tokens"]),
                **measures(row),
            )
        )
    unpriced = sorted(r.model for r in out if r.unpriced and r.model is not None)
    return ModelReport(
        start=query.filters.start, end=query.filters.end, models=out, unpriced_models=unpriced
    )


def _share(part: int | None, whole: int | None) -> float | None:
    return round(part / whole, 6) if part is not None and whole else None
