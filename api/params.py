"""Query parameters shared by the report routes: a time range and the filters.

Each route takes one pydantic model of its query parameters with `extra="forbid"`, so an
unknown or misspelt parameter is a 422 naming it, never silently ignored.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from fastapi import HTTPException, status
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from tokentill.warehouse.spend import Filters

MAX_RANGE = timedelta(days=3 * 366)
MAX_LIST = 200
DEFAULT_DAYS = 30

_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}([T ].+)?$")


def _iso_only(value: object) -> object:
    # pydantic would read "0.5" as a Unix timestamp: dates here are ISO 8601 only.
    if isinstance(value, str) and not _ISO.match(value):
        raise ValueError("expected a date (YYYY-MM-DD) or an RFC 3339 date-time")
    return value


Moment = Annotated[
    datetime | date,
    BeforeValidator(_iso_only),
    Field(description="A date (YYYY-MM-DD, midnight UTC) or an RFC 3339 date-time."),
]
IsoTime = Annotated[datetime, BeforeValidator(_iso_only)]
# Days far outside any usage (year 1, year 9999) are refused up front: a month or a day
# before or after them does not exist, and no report is about them.
Day = Annotated[
    date,
    BeforeValidator(_iso_only),
    Field(description="YYYY-MM-DD (UTC).", ge=date(2000, 1, 1), le=date(2199, 12, 31)),
]
Names = Annotated[list[str], Field(max_length=MAX_LIST)]


class RangeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: Moment | None = Field(None, description="Inclusive. Default: 30 days before end.")
    end: Moment | None = Field(None, description="Exclusive. Default: the end of today (UTC).")


class FilterParams(RangeParams):
    user: Names = Field([], description="End user ids (repeat the parameter for several).")
    model: Names = Field([], description="Models, as the upstream answered them.")
    service_tier: Names = Field([], description="default, flex, priority, batch, scale.")
    status: Names = Field([], description="completed, incomplete, failed, error...")
    endpoint: Names = Field(
        [],
        description="responses, chat.completions, completions, embeddings or moderations.",
    )
    tag: Names = Field([], description="Metadata filters as key=value (all must match).")


def utc(moment: datetime | date) -> datetime:
    if isinstance(moment, datetime):
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    return datetime(moment.year, moment.month, moment.day, tzinfo=UTC)


def bad_request(param: str, message: str, where: str = "query") -> HTTPException:
    """A 422 in FastAPI's own validation shape, naming the parameter to fix."""
    detail = [{"loc": [where, param], "msg": message, "type": "value_error", "input": None}]
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail)


def time_range(params: RangeParams, *, now: datetime | None = None) -> tuple[datetime, datetime]:
    today = (now or datetime.now(UTC)).replace(hour=0, minute=0, second=0, microsecond=0)
    end = utc(params.end) if params.end is not None else today + timedelta(days=1)
    start = utc(params.start) if params.start is not None else end - timedelta(days=DEFAULT_DAYS)
    if start >= end:
        raise bad_request(
            "start", f"start ({start.isoformat()}) must be before end ({end.isoformat()})"
        )
    if end - start > MAX_RANGE:
        raise bad_request("end", "the range is longer than 3 years: ask for a shorter one")
    return start, end


def parse_tags(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise bad_request(
                "tag", f"tag {pair!r}: expected key=value, for example tag=team=search"
            )
        if len(key) > 64 or len(value) > 512:
            raise bad_request("tag", f"tag {pair!r}: keys are at most 64 characters, values 512")
        out.append((key, value))
    return tuple(out)


def filters(params: FilterParams) -> Filters:
    start, end = time_range(params)
    return Filters(
        start=start,
        end=end,
        users=tuple(params.user),
        models=tuple(params.model),
        service_tiers=tuple(params.service_tier),
        statuses=tuple(params.status),
        endpoints=tuple(params.endpoint),
        tags=parse_tags(params.tag),
    )
