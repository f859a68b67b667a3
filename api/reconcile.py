"""Reconciliation against OpenAI's bill, per UTC day x model (see `warehouse.reconcile`).

`GET /reconcile` fetches OpenAI's organization Costs and Usage for the days with the
admin key in settings; `POST /reconcile/import` takes OpenAI's cost export (CSV) instead.
Money is USD as decimal strings, exact (pico-dollar precision).

Errors: a bad range 422; no admin key configured 409; a cost export that cannot be read
422; OpenAI unreachable, slow, refusing the key or answering nonsense 502, with
OpenAI's own message.
"""

from __future__ import annotations

import asyncio
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal

import httpx
import polars as pl
from fastapi import APIRouter, File, HTTPException, Query, UploadFile, status
from pydantic import BaseModel, Field, PlainSerializer

from tokentill.api.deps import RuntimeDep
from tokentill.api.params import Day, bad_request
from tokentill.api.runtime import AdminSettings
from tokentill.warehouse.openai_bill import Bill, BillUnavailableError, ExportError, fetch_bill
from tokentill.warehouse.openai_bill import read_cost_export as parse_export
from tokentill.warehouse.pricing import PICO_PER_USD
from tokentill.warehouse.reconcile import (
    Thresholds,
    by_day,
    compare,
    read_ours,
    rolled_up_at,
)

router = APIRouter(prefix="/reconcile", tags=["reconcile"])

MAX_DAYS = 366
# Days OpenAI's API has figures for, give or take: anything else is a typo.
EARLIEST, LATEST = date(2020, 1, 1), date(2100, 12, 31)
MAX_EXPORT_BYTES = 32 * 1024 * 1024

USD = Annotated[
    Decimal,
    # Plain notation ("0.000000150000"), never "1.5E-7": finance tools parse it as is.
    PlainSerializer(lambda value: format(value, "f"), return_type=str, when_used="json"),
    Field(description="US dollars, exact to the pico-dollar, as a decimal string"),
]


class ReconcileRow(BaseModel):
    day: date
    model: str = Field(description="The model as the upstream answered it (a dated snapshot)")
    openai_usd: USD
    tokentill_usd: USD
    difference_usd: USD = Field(description="OpenAI's figure minus tokentill's")
    openai_requests: int | None = Field(
        description="Requests OpenAI billed (its Usage API); null from a cost export"
    )
    tokentill_requests: int = Field(description="Responses tokentill recorded")
    unpriced_responses: int
    unpriced_tokens: int
    error_responses: int = Field(
        description="Requests of this model family tokentill recorded as errors, no usage"
    )
    interrupted_responses: int
    failed_responses: int
    bypassed_requests: int | None = Field(
        description="Requests OpenAI billed that tokentill never saw (null: unknown count)"
    )
    price_mismatch: bool
    flagged: bool
    explanations: list[str]


class ReconcileDay(BaseModel):
    day: date
    openai_usd: USD
    tokentill_usd: USD
    difference_usd: USD
    flagged: bool
    flagged_models: int


class ReconcileReport(BaseModel):
    source: Literal["openai_api", "cost_export"]
    start: date
    end: date = Field(description="The day after the last, exclusive (as the request's)")
    threshold_usd: USD
    threshold_ratio: Decimal
    rolled_up_at: datetime | None = Field(
        description="When tokentill's rollup last finished: its figures are as of then"
    )
    openai_total_usd: USD
    tokentill_total_usd: USD
    difference_usd: USD
    flagged_days: list[date]
    days: list[ReconcileDay]
    rows: list[ReconcileRow]


def _usd(pico: Decimal | int) -> Decimal:
    return (Decimal(int(pico)) / PICO_PER_USD).quantize(Decimal("1E-12"))


def _last_day(start: date, end: date) -> date:
    """The inclusive last day of [start, end) (end is exclusive, as on every /api route),
    once the range is checked."""
    for name, day in (("start", start), ("end", end)):
        if not EARLIEST <= day <= LATEST:
            raise bad_request(name, f"{name} ({day}) must be between {EARLIEST} and {LATEST}")
    if end <= start:
        raise bad_request("end", f"end ({end}) must be after start ({start}); end is exclusive")
    if (end - start).days > MAX_DAYS:
        raise bad_request("end", f"at most {MAX_DAYS} days at once: split the range")
    return end - timedelta(days=1)


def _thresholds(settings: AdminSettings) -> Thresholds:
    return Thresholds(settings.reconcile_threshold_usd, settings.reconcile_threshold_ratio)


async def _report(
    runtime: RuntimeDep,
    bill: Bill,
    start: date,
    end: date,
    source: Literal["openai_api", "cost_export"],
) -> ReconcileReport:
    """`end` is exclusive, as the request's (and every /api route's)."""
    thresholds = _thresholds(runtime.settings)
    last = end - timedelta(days=1)

    def read() -> tuple[pl.DataFrame, datetime | None]:
        conn = runtime.connect()
        try:
            return read_ours(conn, start, last), rolled_up_at(conn)
        finally:
            conn.close()

    ours, fresh = await asyncio.to_thread(read)
    in_range = pl.col("day").is_between(start, last)
    rows = compare(
        bill.costs.lazy().filter(in_range),
        ours.lazy(),
        thresholds,
        None if bill.requests is None else bill.requests.lazy().filter(in_range),
    ).collect()
    days = by_day(rows.lazy(), thresholds).collect()
    return ReconcileReport(
        source=source,
        start=start,
        end=end,
        threshold_usd=thresholds.usd,
        threshold_ratio=thresholds.ratio,
        rolled_up_at=fresh,
        openai_total_usd=_usd(sum(days["openai_pico"], Decimal(0))),
        tokentill_total_usd=_usd(sum(days["our_pico"], Decimal(0))),
        difference_usd=_usd(sum(days["diff_pico"], Decimal(0))),
        flagged_days=[d["day"] for d in days.to_dicts() if d["flagged"]],
        days=[
            ReconcileDay(
                day=d["day"],
                openai_usd=_usd(d["openai_pico"]),
                tokentill_usd=_usd(d["our_pico"]),
                difference_usd=_usd(d["diff_pico"]),
                flagged=d["flagged"],
                flagged_models=d["flagged_models"],
            )
            for d in days.to_dicts()
        ],
        rows=[
            ReconcileRow(
                day=r["day"],
                model=r["model"],
                openai_usd=_usd(r["openai_pico"]),
                tokentill_usd=_usd(r["our_pico"]),
                difference_usd=_usd(r["diff_pico"]),
                openai_requests=r["openai_requests"],
                tokentill_requests=r["our_requests"],
                unpriced_responses=r["unpriced"],
                unpriced_tokens=r["unpriced_tokens"],
                error_responses=r["errors"],
                interrupted_responses=r["interrupted"],
                failed_responses=r["failed"],
                bypassed_requests=r["bypassed_requests"],
                price_mismatch=r["price_mismatch"],
                flagged=r["flagged"],
                explanations=r["explanations"],
            )
            for r in rows.to_dicts()
        ],
    )


@router.get(
    "",
    response_model=ReconcileReport,
    responses={
        409: {"description": "No OpenAI admin key is configured"},
        502: {"description": "OpenAI unreachable, or it refused the key or the request"},
    },
)
async def reconcile(
    runtime: RuntimeDep,
    start: Annotated[Day, Query(description="First UTC day (YYYY-MM-DD)")],
    end: Annotated[Day, Query(description="The day after the last, exclusive (YYYY-MM-DD)")],
) -> ReconcileReport:
    """OpenAI's bill (its organization Costs and Usage APIs) against tokentill's costs,
    per day x model, with what explains each difference."""
    last = _last_day(start, end)
    settings = runtime.settings
    if settings.openai_admin_key is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            "no OpenAI admin key is configured: set TOKENTILL_OPENAI_ADMIN_KEY "
            "(an sk-admin-... key), or upload OpenAI's cost export to /api/reconcile/import",
        )
    timeout = httpx.Timeout(60.0, connect=settings.upstream_connect_timeout)
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            bill = await fetch_bill(
                client,
                settings.openai_admin_base,
                settings.openai_admin_key.get_secret_value(),
                start,
                last,
            )
    except BillUnavailableError as exc:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(exc)) from exc
    return await _report(runtime, bill, start, end, "openai_api")


@router.post(
    "/import",
    response_model=ReconcileReport,
    responses={
        413: {"description": "The export is too large"},
        422: {"description": "The export cannot be read, or the range is wrong"},
    },
)
async def reconcile_export(
    runtime: RuntimeDep,
    file: Annotated[UploadFile, File(description="OpenAI's cost export, CSV")],
    start: Annotated[
        Day | None, Query(description="First UTC day; default: the export's first")
    ] = None,
    end: Annotated[
        Day | None,
        Query(description="The day after the last, exclusive; default: after the export's last"),
    ] = None,
) -> ReconcileReport:
    """OpenAI's cost export (CSV: a day, `amount_value` in USD and `line_item` per row)
    against tokentill's costs. A cost export has no request counts, so traffic that
    bypassed the proxy on a model tokentill also saw cannot be told from a price
    mismatch."""
    data = await file.read(MAX_EXPORT_BYTES + 1)
    if len(data) > MAX_EXPORT_BYTES:
        raise HTTPException(
            status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            f"the export is over {MAX_EXPORT_BYTES // (1024 * 1024)} MiB: split it",
        )
    try:
        bill = parse_export(data)
    except ExportError as exc:
        raise bad_request("file", str(exc), "body") from exc
    first, final = bill.costs["day"].min(), bill.costs["day"].max()
    if not isinstance(first, date) or not isinstance(final, date):  # an export has rows
        raise bad_request("file", "the export has no days", "body")
    for day in (first, final):
        if not EARLIEST <= day <= LATEST:
            raise bad_request("file", f"a day ({day}) must be between {EARLIEST} and {LATEST}")
    end = end or final + timedelta(days=1)
    start = start or first
    _last_day(start, end)
    return await _report(runtime, bill, start, end, "cost_export")
