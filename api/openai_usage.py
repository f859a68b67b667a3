"""OpenAI's organization Usage (completions) and Costs APIs, answered from tokentill's
warehouse, so tools written for them work unchanged, with one gain: `user_id` is the
end user tokentill recorded (OpenAI's is the organization member who owns the key).

Mapping: `project_id` is the `project` metadata tag, `api_key_id` the fingerprint of the
API key (`sha256:...`, never the key), `batch` is service tier `batch`, `line_item` the
model (tokentill does not split a model's cost into input and output lines). Errors use
OpenAI's shape (`{"error": {...}}`) on these two routes, as OpenAI answers them.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import parse_qsl, urlencode

import orjson
import polars as pl
from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from tokentill.api.deps import RuntimeDep
from tokentill.api.reports import in_thread
from tokentill.warehouse.openai_errors import ErrorBody, error_body
from tokentill.warehouse.spend import Bucket, Filters, SpendQuery, spend

if TYPE_CHECKING:
    from tokentill.api.runtime import AdminRuntime

router = APIRouter(prefix="/v1/organization", tags=["openai-compatible"])
PREFIX = "/api/v1/organization"

Width = Literal["1m", "1h", "1d"]
_WIDTH = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}
_BUCKET: dict[str, Bucket] = {"1m": "minute", "1h": "hour", "1d": "day"}
# OpenAI's limits on buckets per page: (default, max) per width.
_USAGE_LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
_COST_LIMITS = (7, 180)

UsageGroup = Literal[
    "project_id", "user_id", "api_key_id", "model", "batch", "service_tier", "api_source"
]
CostGroup = Literal["project_id", "line_item", "user_id", "api_key_id", "model", "api_source"]
# OpenAI labels Agents API traffic `agents_api` and all else `unlabeled`; a proxy in
# front of the API sees no such attribution, so every result is `unlabeled`.
_API_SOURCE = "unlabeled"
_DIMENSION = {
    "project_id": "tag:project",
    "user_id": "user",
    "api_key_id": "api_key",
    "model": "model",
    "line_item": "model",
    "service_tier": "service_tier",
    "batch": "service_tier",
}


class BracketArrays:
    """OpenAI's clients send an array as `name[]=a&name[]=b` (the openai SDK does), others
    as `name=a&name=b`; OpenAI's API takes both. This spells the first as the second
    before the routes under `prefix` read their query, so both reach the same field."""

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app, self.prefix = app, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            raw: bytes = scope.get("query_string", b"")
            if b"%5B%5D" in raw.upper() or b"[]" in raw:
                pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
                renamed = [(k[:-2] if k.endswith("[]") else k, v) for k, v in pairs]
                scope = {**scope, "query_string": urlencode(renamed).encode("latin-1")}
        await self.app(scope, receive, send)


class OpenAIError(Exception):
    """Answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status

    def response(self) -> Response:
        body = error_body(self.message, "invalid_request_error", param=self.param)
        return Response(body, status_code=self.status, media_type="application/json")


# OpenAI answers bad parameters with 400 in its error shape; so do these routes.
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Invalid parameters (OpenAI's error shape)"}
}


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start_time: int = Field(ge=0, le=2**33, description="Unix seconds, inclusive.")
    end_time: int | None = Field(None, ge=0, le=2**33, description="Unix seconds, exclusive.")
    project_ids: list[str] = Field([], max_length=200)
    user_ids: list[str] = Field([], max_length=200)
    api_key_ids: list[str] = Field([], max_length=200)
    limit: int | None = Field(None, ge=1)
    page: str | None = Field(None, max_length=200, description="next_page of the last answer.")


class UsageParams(_Params):
    bucket_width: Width = "1d"
    models: list[str] = Field([], max_length=200)
    batch: bool | None = None
    group_by: list[UsageGroup] = Field([], max_length=6)


class CostParams(_Params):
    bucket_width: Literal["1d"] = "1d"
    group_by: list[CostGroup] = Field([], max_length=6)
    line_items: list[str] = Field([], max_length=200, description="Models (line items) only.")


class UsageResult(BaseModel):
    object: Literal["organization.usage.completions.result"] = (
        "organization.usage.completions.result"
    )
    input_tokens: int
    output_tokens: int
    input_cached_tokens: int
    input_audio_tokens: int = 0
    output_audio_tokens: int = 0
    num_model_requests: int
    project_id: str | None = None
    user_id: str | None = None
    api_key_id: str | None = None
    model: str | None = None
    batch: bool | None = None
    service_tier: str | None = None
    api_source: Literal["agents_api", "unlabeled"] | None = None


class Amount(BaseModel):
    value: float = Field(description="USD (OpenAI sends a number; /api/costs has exact strings).")
    currency: Literal["usd"] = "usd"


class CostResult(BaseModel):
    object: Literal["organization.costs.result"] = "organization.costs.result"
    amount: Amount
    line_item: str | None = None
    project_id: str | None = None
    user_id: str | None = None
    api_key_id: str | None = None
    model: str | None = None
    api_source: Literal["agents_api", "unlabeled"] | None = None


class UsageBucket(BaseModel):
    object: Literal["bucket"] = "bucket"
    start_time: int
    end_time: int
    results: list[UsageResult]


class CostBucket(BaseModel):
    object: Literal["bucket"] = "bucket"
    start_time: int
    end_time: int
    results: list[CostResult]


class UsagePage(BaseModel):
    object: Literal["page"] = "page"
    data: list[UsageBucket]
    has_more: bool
    next_page: str | None


class CostPage(BaseModel):
    object: Literal["page"] = "page"
    data: list[CostBucket]
    has_more: bool
    next_page: str | None


def _page_token(start: int) -> str:
    return base64.urlsafe_b64encode(f"tt1:{start}".encode()).decode()


def _page_start(token: str) -> int:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        version, _, value = text.partition(":")
        if version != "tt1":
            raise ValueError(text)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise OpenAIError(
            "Invalid page cursor: pass next_page from the last answer.", "page"
        ) from None


def _window(
    params: _Params, width: Width, limits: tuple[int, int]
) -> tuple[datetime, datetime, datetime, int | None]:
    """(range start, this page's end, the whole range's end, next page start or None)."""
    default, most = limits
    limit = default if params.limit is None else params.limit
    if limit > most:
        raise OpenAIError(
            f"limit must be at most {most} for bucket_width={width} (got {limit}).", "limit"
        )
    step = _WIDTH[width]
    now = datetime.now(UTC)
    end = datetime.fromtimestamp(params.end_time, UTC) if params.end_time is not None else now
    start = datetime.fromtimestamp(params.start_time, UTC)
    if params.page is not None:
        start = datetime.fromtimestamp(_page_start(params.page), UTC)
    if start >= end:
        raise OpenAIError("start_time must be before end_time.", "start_time")
    # Buckets are aligned to the width in UTC, as OpenAI's are.
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    first = epoch + ((start - epoch) // step) * step
    page_end = min(end, first + step * limit)
    more = page_end < end
    nxt = int((first + step * limit).timestamp()) if more else None
    return start, page_end, end, nxt


def _buckets(start: datetime, end: datetime, width: Width) -> list[tuple[datetime, datetime]]:
    step = _WIDTH[width]
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    cursor = epoch + ((start - epoch) // step) * step
    out = []
    while cursor < end:
        out.append((cursor, cursor + step))
        cursor += step
    return out


def _query(
    params: UsageParams | CostParams, start: datetime, end: datetime
) -> tuple[Filters, list[str]]:
    projects = params.project_ids
    models = params.models if isinstance(params, UsageParams) else params.line_items
    group_by: list[str] = [g for g in dict.fromkeys(params.group_by) if g != "api_source"]
    filters = Filters(
        start=start,
        end=end,
        users=tuple(params.user_ids),
        models=tuple(models),
        api_keys=tuple(params.api_key_ids),
        tags=(),
    )
    if projects:
        if len(projects) > 1:
            # Tag filters are all-must-match: one project at a time through tags, else
            # filter after grouping by project.
            group_by.append("project_id")
        else:
            filters = Filters(**{**filters.__dict__, "tags": (("project", projects[0]),)})
    return filters, group_by


async def _answer(
    runtime: AdminRuntime, filters: Filters, group_by: list[str], width: Width
) -> pl.DataFrame:
    dims = tuple(dict.fromkeys(_DIMENSION[g] for g in group_by))
    query = SpendQuery(filters, dims, _BUCKET[width])
    return await in_thread(
        runtime,
        lambda conn: spend(
            conn, query, image_model=runtime.settings.image_gen_model, catalog=runtime.catalog
        ),
    )


@router.get(
    "/usage/completions",
    response_model=UsagePage,
    responses=_ERRORS,
    summary="Completions usage, as OpenAI's organization Usage API answers it",
)
async def usage_completions(
    runtime: RuntimeDep, params: Annotated[UsageParams, Query()]
) -> Response:
    start, page_end, _, nxt = _window(
        params, params.bucket_width, _USAGE_LIMITS[params.bucket_width]
    )
    filters, group_by = _query(params, start, page_end)
    source = _API_SOURCE if "api_source" in params.group_by else None
    if params.batch is not None and "batch" not in group_by:
        group_by.append("batch")
        drop_batch = True
    else:
        drop_batch = False
    frame = await _answer(runtime, filters, group_by, params.bucket_width)
    projects = set(params.project_ids)
    rows: dict[datetime, list[dict[str, Any]]] = {}
    for row in _regroup(frame, group_by, projects, params.batch, drop_batch).iter_rows(named=True):
        if row["requests"] == row["errors"] and not row["total_tokens"]:
            continue  # only requests refused before a response existed: nothing billed
        rows.setdefault(row["bucket"], []).append(
            {
                "object": "organization.usage.completions.result",
                "input_tokens": row["input_tokens"],
                "output_tokens": row["output_tokens"],
                "input_cached_tokens": row["cached_input_tokens"],
                "input_audio_tokens": 0,
                "output_audio_tokens": 0,
                # OpenAI counts responses: not requests refused before one existed.
                "num_model_requests": row["requests"] - row["errors"],
                "project_id": row.get("project_id"),
                "user_id": row.get("user_id"),
                "api_key_id": row.get("api_key_id"),
                "model": row.get("model"),
                "batch": row.get("batch") if not drop_batch else None,
                "service_tier": row.get("service_tier"),
                "api_source": source,
            }
        )
    page = {
        "object": "page",
        "data": [
            {
                "object": "bucket",
                "start_time": int(a.timestamp()),
                "end_time": int(b.timestamp()),
                "results": rows.get(a, []),
            }
            for a, b in _buckets(start, page_end, params.bucket_width)
        ],
        "has_more": nxt is not None,
        "next_page": _page_token(nxt) if nxt else None,
    }
    # UsagePage's shape (schemathesis holds the route to it), serialized without a
    # second validation of every result.
    return Response(orjson.dumps(page), media_type="application/json")


def _regroup(
    frame: pl.DataFrame,
    group_by: list[str],
    projects: set[str],
    batch: bool | None,
    drop_batch: bool,
) -> pl.DataFrame:
    """Rename tokentill's dimensions to OpenAI's, derive `batch`, and filter what only
    grouping could (several projects, batch=true/false)."""
    renames = {"tag:project": "project_id", "user": "user_id", "api_key": "api_key_id"}
    frame = frame.rename({k: v for k, v in renames.items() if k in frame.columns})
    if "batch" in group_by:
        frame = frame.with_columns((pl.col("service_tier") == "batch").alias("batch"))
    if len(projects) > 1:
        frame = frame.filter(pl.col("project_id").is_in(sorted(projects)))
    if batch is not None:
        frame = frame.filter(pl.col("batch") == batch)
    wanted = ["bucket", *dict.fromkeys(g for g in group_by if not (drop_batch and g == "batch"))]
    keys = [k for k in wanted if k in frame.columns or k == "line_item"]
    if "line_item" in keys:
        frame = frame.with_columns(pl.col("model").alias("line_item"))
    sums = [c for c in frame.columns if c not in keys and frame.schema[c].is_numeric()]
    # (`errors` stays: num_model_requests = requests - errors)
    sums = [c for c in sums if c not in ("batch",)]
    out = frame.group_by(keys, maintain_order=True).agg(pl.col(c).sum() for c in sums)
    return out.sort(["bucket", *[k for k in keys if k != "bucket"]], nulls_last=True)


@router.get(
    "/costs",
    response_model=CostPage,
    responses=_ERRORS,
    summary="Costs per day, as OpenAI's organization Costs API answers them",
)
async def costs(runtime: RuntimeDep, params: Annotated[CostParams, Query()]) -> CostPage:
    start, page_end, _, nxt = _window(params, "1d", _COST_LIMITS)
    filters, group_by = _query(params, start, page_end)
    source = _API_SOURCE if "api_source" in params.group_by else None
    frame = await _answer(runtime, filters, group_by, "1d")
    projects = set(params.project_ids)
    rows: dict[datetime, list[CostResult]] = {}
    for row in _regroup(frame, group_by, projects, None, False).iter_rows(named=True):
        cost = row["cost_pico"] or Decimal(0)
        rows.setdefault(row["bucket"], []).append(
            CostResult(
                amount=Amount(value=float(Decimal(int(cost)).scaleb(-12))),
                line_item=row.get("line_item"),
                project_id=row.get("project_id"),
                user_id=row.get("user_id"),
                api_key_id=row.get("api_key_id"),
                model=row.get("model") if "model" in group_by else None,
                api_source=source,
            )
        )
    data = [
        CostBucket(
            start_time=int(a.timestamp()), end_time=int(b.timestamp()), results=rows.get(a, [])
        )
        for a, b in _buckets(start, page_end, "1d")
    ]
    return CostPage(
        data=data, has_more=nxt is not None, next_page=_page_token(nxt) if nxt else None
    )
