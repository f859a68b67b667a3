"""Usage events, newest first, with cursor pagination; and conversations by cost."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import duckdb
import polars as pl
from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import BaseModel, Field

from tokentill.api.deps import RuntimeDep
from tokentill.api.money import USD, usd
from tokentill.api.params import FilterParams, RangeParams, bad_request, filters, time_range
from tokentill.api.reports import EventRow, event_rows, in_thread
from tokentill.warehouse.conversations import conversation_detail, conversation_page
from tokentill.warehouse.prices import CatalogCache
from tokentill.warehouse.spend import Filters, priced_events, raw_where

router = APIRouter(tags=["events"])
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class EventParams(FilterParams):
    limit: int = Field(100, ge=1, le=1000)
    cursor: str | None = Field(None, max_length=300, description="next_cursor of the last page.")


class EventPage(BaseModel):
    events: list[EventRow]
    next_cursor: str | None = Field(description="Pass as cursor for older events; null at the end.")


def _encode(created_at: datetime, event_id: str) -> str:
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"{micros}|{event_id}".encode()).decode()


def _decode(cursor: str) -> tuple[datetime, str]:
    try:
        micros, _, event_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        moment = _EPOCH + timedelta(microseconds=int(micros))
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError, OSError):
        raise bad_request("cursor", "not one this API gave; pass next_cursor unchanged") from None
    return moment, event_id


def newest_events(
    conn: duckdb.DuckDBPyConnection,
    f: Filters,
    limit: int,
    after: tuple[datetime, str] | None,
    image_model: str,
    catalog: CatalogCache,
) -> pl.DataFrame:
    """Newest first, `limit` of them, older than `after`. Looks back a day at a time,
    widening the window, so a page reads recent data rather than the whole range."""
    end = f.end
    if after is not None:
        end = min(end, after[0] + timedelta(microseconds=1))
    window = timedelta(days=1)
    found = pl.DataFrame()
    while True:
        start = max(f.start, end - window)
        params: list[object] = []
        where = raw_where(Filters(**{**f.__dict__, "start": start, "end": end}), params)
        if after is not None:
            where += " AND (created_at < ? OR (created_at = ? AND event_id < ?))"
            params += [after[0], after[0], after[1]]
        found = priced_events(
            conn,
            where,
            params,
            image_model=image_model,
            catalog=catalog,
            order=f"ORDER BY created_at DESC, event_id DESC LIMIT {limit + 1}",
        )
        if found.height > limit or start <= f.start:
            break
        window *= 4
    return found.sort("created_at", "event_id", descending=True)


@router.get("/events", response_model=EventPage, summary="Usage events, newest first")
async def events(runtime: RuntimeDep, params: Annotated[EventParams, Query()]) -> EventPage:
    f = filters(params)
    after = _decode(params.cursor) if params.cursor else None
    frame = await in_thread(
        runtime,
        lambda conn: newest_events(
            conn, f, params.limit, after, runtime.settings.image_gen_model, runtime.catalog
        ),
    )
    page = frame.head(params.limit)
    more = frame.height > params.limit
    last = page.row(-1, named=True) if page.height else None
    return EventPage(
        events=event_rows(page),
        next_cursor=_encode(last["created_at"], last["event_id"]) if more and last else None,
    )


# -- conversations -----------------------------------------------------------------------


class Conversation(BaseModel):
    root_id: str = Field(description="The conversation's first response.")
    user_id: str | None
    first_at: datetime
    last_at: datetime
    responses: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cost_usd: USD | None = Field(description="Null while any of its responses is unpriced.")
    unpriced: int


class ConversationPage(BaseModel):
    conversations: list[Conversation]
    total: int


class ConversationParams(RangeParams):
    user: str | None = Field(None, max_length=256)
    limit: int = Field(50, ge=1, le=1000)
    offset: int = Field(0, ge=0, le=1_000_000)


def _conversation(row: dict[str, Any]) -> Conversation:
    return Conversation(
        **{k: row[k] for k in Conversation.model_fields if k != "cost_usd"},
        cost_usd=None if row["unpriced"] else usd(row["cost_pico"]),
    )


@router.get(
    "/conversations",
    response_model=ConversationPage,
    summary="previous_response_id chains, most expensive first (active in the range)",
)
async def conversations(
    runtime: RuntimeDep, params: Annotated[ConversationParams, Query()]
) -> ConversationPage:
    start, end = time_range(params)

    def read(conn: duckdb.DuckDBPyConnection) -> tuple[int, pl.DataFrame]:
        return conversation_page(conn, start, end, params.user, params.limit, params.offset)

    total, frame = await in_thread(runtime, read)
    return ConversationPage(
        conversations=[_conversation(r) for r in frame.iter_rows(named=True)], total=total
    )


class Turn(BaseModel):
    response_id: str
    created_at: datetime
    model: str | None
    total_tokens: int | None
    cost_usd: USD | None = Field(description="Null when unpriced.")
    cumulative_cost_usd: USD = Field(description="What the chain had cost up to this turn.")


class ConversationDetail(Conversation):
    days: list[dict[str, Any]]
    turns: list[Turn] = Field(
        description="Its responses in order (at most 500), each with what the chain had "
        "cost so far: each turn reads the whole conversation again, so the cost grows."
    )


@router.get(
    "/conversations/{root_id}",
    response_model=ConversationDetail,
    summary="What one conversation cost as it grew, day by day",
    responses={404: {"description": "No conversation starts at this response"}},
)
async def conversation(
    runtime: RuntimeDep, root_id: Annotated[str, Path(min_length=1, max_length=256)]
) -> ConversationDetail:
    image_model, catalog = runtime.settings.image_gen_model, runtime.catalog

    def read(conn: duckdb.DuckDBPyConnection) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        return conversation_detail(conn, root_id, image_model=image_model, catalog=catalog)

    head, days, turns = await in_thread(runtime, read)
    if head.height == 0:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no conversation starts at {root_id!r}")
    growing = days.with_columns(
        pl.col("cost_pico").cum_sum().alias("cumulative_cost_pico"),
        pl.col("responses").cum_sum().alias("cumulative_responses"),
    )
    return ConversationDetail(
        **_conversation(head.row(0, named=True)).model_dump(),
        days=[
            {
                "day": r["bucket"],
                "responses": r["responses"],
                "total_tokens": r["total_tokens"],
                "cost_usd": usd(r["cost_pico"]),
                "cumulative_responses": r["cumulative_responses"],
                "cumulative_cost_usd": usd(r["cumulative_cost_pico"]),
            }
            for r in growing.iter_rows(named=True)
        ],
        turns=_turns(turns),
    )


def _turns(events: pl.DataFrame) -> list[Turn]:
    out, spent = [], 0
    for row in events.iter_rows(named=True):
        cost = row["cost_pico"]
        spent += cost or 0
        out.append(
            Turn(
                response_id=row["response_id"],
                created_at=row["created_at"],
                model=row["model"],
                total_tokens=row["total_tokens"],
                cost_usd=None if cost is None else usd(cost),
                cumulative_cost_usd=usd(spent),
            )
        )
    return out
