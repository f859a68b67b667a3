"""Spend and usage, grouped and bucketed any way a report asks.

One question shape (`SpendQuery`: a time range, filters, dimensions to group by, a time
bucket) answered from the cheapest table that holds it:

- `usage_daily_users` / `usage_daily_models` (warehouse/summaries.py) for whole UTC days
  grouped or filtered by end user only, or by model, tier, status and endpoint only;
- `usage_daily` for whole days otherwise, when the bucket is a day, a month or none;
- `usage_hourly` when it is whole hours;
- `usage_daily_tags` for a metadata key grouped or filtered with model and time only;
- the raw `usage_events`, priced on the fly by the same pure `pricing.price_events` the
  rollup job uses, for what the rollups do not keep (minutes, API keys, a metadata key
  together with an end user, ranges that cut an hour).

Every path returns the same columns, so callers never know which one answered; the
rollups and the raw path agree to the pico-dollar (tests/test_spend.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import duckdb
import polars as pl

from tokentill.warehouse import pricing
from tokentill.warehouse.db import query_frame
from tokentill.warehouse.prices import CatalogCache
from tokentill.warehouse.rollup_run import EVENT_COLUMNS

Bucket = Literal["minute", "hour", "day", "month"]
# Group-by dimensions; `tag:<key>` groups by a metadata key's value.
PLAIN_DIMENSIONS = ("user", "model", "service_tier", "status", "endpoint", "api_key")
_ROLLUP_COLUMN = {
    "user": "user_id",
    "model": "model",
    "service_tier": "service_tier",
    "status": "status",
    "endpoint": "endpoint",
}
_RAW_COLUMN = {**_ROLLUP_COLUMN, "api_key": "key_fingerprint"}
TAG_PREFIX = "tag:"

# What reports count: requests and tokens, then money and what it leaves out.
COUNTS = (
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
)
MEASURES = (*COUNTS, "cost_pico", "unpriced", "errors", "incomplete", "failed")
_MONEY = pl.Decimal(38, 0)


class QueryError(ValueError):
    """A question that cannot be answered as asked, with what to change (and which
    parameter)."""

    def __init__(self, message: str, param: str = "group_by") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Filters:
    start: datetime  # inclusive, UTC
    end: datetime  # exclusive
    users: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    service_tiers: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()
    api_keys: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()  # metadata key = value, all must hold

    def by_dimension(self) -> dict[str, tuple[str, ...]]:
        return {
            "user": self.users,
            "model": self.models,
            "service_tier": self.service_tiers,
            "status": self.statuses,
            "endpoint": self.endpoints,
            "api_key": self.api_keys,
        }


@dataclass(frozen=True)
class SpendQuery:
    filters: Filters
    group_by: tuple[str, ...] = ()
    bucket: Bucket | None = None


def check_dimension(name: str) -> str:
    if name in PLAIN_DIMENSIONS:
        return name
    if name.startswith(TAG_PREFIX) and 0 < len(name) - len(TAG_PREFIX) <= 64:
        return name
    raise QueryError(
        f"unknown dimension {name!r}: use one of {', '.join(PLAIN_DIMENSIONS)}, "
        "or tag:<metadata key>"
    )


def spend(
    conn: duckdb.DuckDBPyConnection, query: SpendQuery, *, image_model: str, catalog: CatalogCache
) -> pl.DataFrame:
    """Rows of `bucket` (when bucketed), the group-by dimensions (named as asked) and
    MEASURES, ordered by bucket then cost (highest first)."""
    for name in query.group_by:
        check_dimension(name)
    source = choose_source(query)
    if source == "raw":
        frame = _from_raw(conn, query, image_model, catalog)
    else:
        frame = _from_rollup(conn, query, source)
    order = (["bucket"] if query.bucket else []) + ["cost_pico", *query.group_by]
    descending = ([False] if query.bucket else []) + [True] + [False] * len(query.group_by)
    return frame.sort(order, descending=descending, nulls_last=True)


def _tag_keys(query: SpendQuery) -> set[str]:
    keys = {d[len(TAG_PREFIX) :] for d in query.group_by if d.startswith(TAG_PREFIX)}
    return keys | {k for k, _ in query.filters.tags}


def _aligned(moment: datetime, unit: timedelta) -> bool:
    return (moment - datetime(2000, 1, 1, tzinfo=moment.tzinfo)) % unit == timedelta(0)


def choose_source(query: SpendQuery) -> str:
    """Which table answers `query`: usage_daily, usage_daily_tags, usage_hourly or raw."""
    f = query.filters
    dims = set(query.group_by) | {d for d, values in f.by_dimension().items() if values}
    tag_keys = _tag_keys(query)
    whole_days = _aligned(f.start, timedelta(days=1)) and _aligned(f.end, timedelta(days=1))
    whole_hours = _aligned(f.start, timedelta(hours=1)) and _aligned(f.end, timedelta(hours=1))
    daily_bucket = query.bucket in (None, "day", "month")
    if query.bucket == "minute" or "api_key" in dims:
        return "raw"
    if tag_keys:
        plain = dims - {d for d in dims if d.startswith(TAG_PREFIX)}
        if len(tag_keys) == 1 and plain <= {"model"} and whole_days and daily_bucket:
            return "usage_daily_tags"
        return "raw"
    if whole_days and daily_bucket:
        if dims <= {"user"}:
            return "usage_daily_users"
        if not dims & {"user"}:
            return "usage_daily_models"
        return "usage_daily"
    if whole_hours:
        return "usage_hourly"
    return "raw"


def _in_list(column: str, values: Sequence[str], params: list[object]) -> str:
    params.extend(values)
    return f"{column} IN ({', '.join('?' for _ in values)})"


def rollup_where(f: Filters, params: list[object]) -> str:
    """The WHERE clause selecting `f`'s rows of a rollup keyed like usage_daily
    (parameters appended to `params`)."""
    where = ["bucket >= ?", "bucket < ?"]
    params += [f.start, f.end]
    for dim, values in f.by_dimension().items():
        if values:
            where.append(_in_list(_ROLLUP_COLUMN[dim], values, params))
    return " AND ".join(where)


def _from_rollup(conn: duckdb.DuckDBPyConnection, query: SpendQuery, table: str) -> pl.DataFrame:
    f = query.filters
    params: list[object] = []
    select: list[str] = []
    if query.bucket == "day" and table != "usage_hourly":
        # Already whole UTC days: a time-zone-aware date_trunc would double the query's cost.
        select.append("bucket")
    elif query.bucket:
        select.append(f"date_trunc('{query.bucket}', bucket) AS bucket")
    if table == "usage_daily_tags":
        (key,) = _tag_keys(query)
        where = ["bucket >= ?", "bucket < ?", "tag_key = ?"]
        params += [f.start, f.end, key]
        for _, value in f.tags:
            where.append("tag_value = ?")
            params.append(value)
        for dim in query.group_by:
            column = "tag_value" if dim.startswith(TAG_PREFIX) else _ROLLUP_COLUMN[dim]
            select.append(f'{column} AS "{dim}"')
        if f.models:
            where.append(_in_list("model", f.models, params))
    else:
        select += [f'{_ROLLUP_COLUMN[dim]} AS "{dim}"' for dim in query.group_by]
        where = [rollup_where(f, params)]
    measures = [
        f"sum({m})::{'DECIMAL(38, 0)' if m == 'cost_pico' else 'BIGINT'} AS {m}" for m in MEASURES
    ]
    # A key whose parts add up to no request has no row, as after a rebuild (the rollups
    # hold appended partial sums: rollup_compact).
    group = " GROUP BY ALL HAVING sum(requests) <> 0" if select else ""
    sql = f"SELECT {', '.join(select + measures)} FROM {table} WHERE {' AND '.join(where)}{group}"
    frame = query_frame(conn, sql, params)
    if not select and frame.height == 1 and frame["requests"][0] is None:
        frame = frame.clear()  # nothing in range: no rows, as for a grouped query
    return _typed(frame, query)


def _typed(frame: pl.DataFrame, query: SpendQuery) -> pl.DataFrame:
    schema: dict[str, pl.DataType] = {}
    if query.bucket:
        schema["bucket"] = pl.Datetime("us", "UTC")
    schema |= {d: pl.String() for d in query.group_by}
    schema |= {m: (_MONEY if m == "cost_pico" else pl.Int64()) for m in MEASURES}
    return frame.select(pl.col(c).cast(t) for c, t in schema.items())


# -- the raw path ------------------------------------------------------------------------


def tag_path(key: str) -> str:
    """A JSON path naming a metadata key (keys are free text: quote them)."""
    return '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


# What pricing an event needs: the rollup job's own list.
RAW_COLUMNS = EVENT_COLUMNS


def raw_where(f: Filters, params: list[object]) -> str:
    """The WHERE clause selecting `f`'s raw events (parameters appended to `params`)."""
    where = ["created_at >= ?", "created_at < ?"]
    params += [f.start, f.end]
    for dim, values in f.by_dimension().items():
        if values:
            where.append(_in_list(_RAW_COLUMN[dim], values, params))
    for key, value in f.tags:
        where.append("json_extract_string(metadata, ?) = ?")
        params += [tag_path(key), value]
    return " AND ".join(where)


def priced_events(
    conn: duckdb.DuckDBPyConnection,
    where: str,
    params: list[object],
    *,
    image_model: str,
    catalog: CatalogCache,
    extra: Sequence[str] = (),
    order: str = "",
) -> pl.DataFrame:
    """Raw events matching `where`, each with its `cost_pico` (null when unpriced) and
    `unpriced` flag, priced exactly as the rollup job prices them."""
    columns = ", ".join([*RAW_COLUMNS, *extra])
    events = query_frame(conn, f"SELECT {columns} FROM usage_events WHERE {where} {order}", params)
    book = catalog.read(conn)
    models = pricing.model_map(events["model"].unique().to_list(), book.names)
    priced = pricing.price_events(events.lazy(), models.lazy(), book.intervals.lazy(), image_model)
    return priced.collect()


def _from_raw(
    conn: duckdb.DuckDBPyConnection, query: SpendQuery, image_model: str, catalog: CatalogCache
) -> pl.DataFrame:
    params: list[object] = []
    extra: list[str] = []
    for dim in query.group_by:
        if dim.startswith(TAG_PREFIX):
            extra.append(f'json_extract_string(metadata, ?) AS "{dim}"')
            params.append(tag_path(dim[len(TAG_PREFIX) :]))
        elif dim not in RAW_COLUMNS:
            extra.append(f'{_RAW_COLUMN[dim]} AS "{dim}"')
    where = raw_where(query.filters, params)
    events = priced_events(
        conn, where, params, image_model=image_model, catalog=catalog, extra=extra
    )
    renames = {"user": "user_id"}
    keys: list[pl.Expr] = []
    if query.bucket:
        every = {"minute": "1m", "hour": "1h", "day": "1d", "month": "1mo"}[query.bucket]
        keys.append(pl.col("created_at").dt.truncate(every).alias("bucket"))
    for dim in query.group_by:
        source = renames.get(dim, dim)
        keys.append(pl.col(source).alias(dim) if source in events.columns else pl.col(dim))
    measures = [
        pl.len().cast(pl.Int64).alias("requests"),
        *(
            pl.col(c).fill_null(0).sum().cast(pl.Int64).alias(c)
            for c in (
                "input_tokens",
                "cached_input_tokens",
                "output_tokens",
                "reasoning_tokens",
                "total_tokens",
            )
        ),
        pl.col("cost_pico").cast(_MONEY).sum().alias("cost_pico"),
        pl.col("unpriced").sum().cast(pl.Int64).alias("unpriced"),
        (pl.col("status") == "error").sum().cast(pl.Int64).alias("errors"),
        (pl.col("status") == "incomplete").sum().cast(pl.Int64).alias("incomplete"),
        (pl.col("status") == "failed").sum().cast(pl.Int64).alias("failed"),
    ]
    if keys:
        frame = events.group_by(keys).agg(measures)
    else:
        frame = events.select(measures) if events.height else events.select(measures).clear()
    return _typed(frame, query)


def midnight(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def spent(conn: duckdb.DuckDBPyConnection, start: datetime, end: datetime) -> tuple[int, int]:
    """Cost (pico-dollars) and unpriced count over [start, end): whole days from the
    per-model summary, the hours of a partial last day from usage_hourly."""
    days_end = max(start, midnight(end)) if start == midnight(start) else start
    row = conn.execute(
        """SELECT coalesce(sum(cost_pico), 0), coalesce(sum(unpriced), 0) FROM (
               SELECT cost_pico, unpriced FROM usage_daily_models
               WHERE bucket >= ? AND bucket < ?
               UNION ALL
               SELECT cost_pico, unpriced FROM usage_hourly WHERE bucket >= ? AND bucket < ?)""",
        [start, days_end, days_end, end],
    ).fetchall()[0]
    return int(row[0]), int(row[1])


# How the users list sorts, by the API's names.
USER_SORTS = {
    "cost": "cost_pico",
    "tokens": "total_tokens",
    "requests": "requests",
    "first_seen": "first_seen",
    "last_seen": "last_seen",
    "user_id": "user_id",
}
_SUMS = ", ".join(
    f"sum({m})::{'DECIMAL(38, 0)' if m == 'cost_pico' else 'BIGINT'} AS {m}" for m in MEASURES
)


def list_users(
    conn: duckdb.DuckDBPyConnection,
    f: Filters,
    sort: str,
    order: Literal["asc", "desc"],
    limit: int,
    offset: int,
) -> tuple[int, list[dict[str, Any]]]:
    """End users with their sums over the filters' range, sorted (`USER_SORTS`), one
    page, and how many users there are."""
    if f.tags:
        raise QueryError("the users list filters by user, model, tier, status and endpoint", "tag")
    params: list[object] = []
    where = rollup_where(f, params)
    whole_days = f.start == midnight(f.start) and f.end == midnight(f.end)
    if whole_days and not (f.models or f.service_tiers or f.statuses or f.endpoints):
        # A row per user and day: a few hundred thousand rows for 90 days of 10k users.
        source, first, last = "usage_daily_users", "min(first_hour)", "max(last_hour)"
    else:
        # Rows are partial sums: an hour whose parts net to no request of the filters (a
        # pending response that settled under another status) is not an hour the user
        # was seen in, there. Only an hour holding a negative part can: those few are
        # netted, and the hours left with none are kept out of first and last seen.
        # (IN, not a join: a semi-join on two keys is the cheap plan; NULL users apart.)
        negative = f"SELECT user_id, bucket FROM usage_hourly WHERE {where} AND requests < 0"
        source = f"""(
            SELECT r.*, g.bucket IS NOT NULL AS gone
            FROM (SELECT * FROM usage_hourly WHERE {where}) AS r
            LEFT JOIN (
                SELECT user_id, bucket FROM usage_hourly
                WHERE {where} AND ((user_id, bucket) IN ({negative})
                      OR (user_id IS NULL AND bucket IN (
                          SELECT bucket FROM ({negative}) WHERE user_id IS NULL)))
                GROUP BY user_id, bucket HAVING sum(requests) = 0) AS g
            ON r.user_id IS NOT DISTINCT FROM g.user_id AND r.bucket = g.bucket)"""
        params = params * 4
        where = "true"
        first = "min(bucket) FILTER (WHERE NOT gone)"
        last = "max(bucket) FILTER (WHERE NOT gone)"
    sql = f"""
        WITH per_user AS (
            SELECT user_id, {_SUMS}, {first} AS first_seen, {last} AS last_seen
            FROM {source} WHERE {where} GROUP BY user_id HAVING sum(requests) <> 0
        )
        SELECT *, count(*) OVER () AS total_users FROM per_user
        ORDER BY {USER_SORTS[sort]} {order.upper()} NULLS LAST, user_id ASC NULLS LAST
        LIMIT ? OFFSET ?"""
    cursor = conn.execute(sql, [*params, limit, offset])
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]
    if rows:
        return int(rows[0]["total_users"]), rows
    count = conn.execute(
        f"""SELECT count(*) FROM (SELECT user_id FROM {source} WHERE {where}
                GROUP BY user_id HAVING sum(requests) <> 0)""",
        params,
    ).fetchall()[0][0]
    return int(count), []


def recent_models(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """Models seen in the last 90 days, for filter forms' suggestions (rollup only)."""
    rows = conn.execute(
        """SELECT model FROM usage_daily
           WHERE bucket >= current_date - INTERVAL 90 DAY AND model IS NOT NULL
           GROUP BY model HAVING sum(requests) <> 0  -- parts of a model no longer used
           ORDER BY model LIMIT 500"""
    ).fetchall()
    return [r[0] for r in rows]
