"""The finance report: per month, cost by model, by endpoint, by end user and by one
metadata key, plus the adjustments posted into the month, with amounts in cents that add
up.

Figures for a closed month come from its copy taken at the close (warehouse/periods.py),
so they never change; open months read the live daily rollup. Exact costs are integer
pico-dollars; the cent amounts are allocated by largest remainder, top down (grand total
-> month -> section -> row), so every section of every month adds up, to the cent, to
the month's total, and the months to the grand total, which is the exact total rounded
half up once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

import duckdb
import polars as pl

from tokentill.warehouse.db import query_frame
from tokentill.warehouse.spend import COUNTS

PICO_PER_CENT = 10**10
_SUMS = (*COUNTS, "unpriced")
COLUMNS: dict[str, pl.DataType] = {
    "section": pl.String(),  # model | endpoint | user | tag | adjustment | total
    "month": pl.Date(),
    "key": pl.String(),  # the model, user, tag value; for adjustments the model
    "user_id": pl.String(),  # adjustments: the end user
    "for_period": pl.Date(),  # adjustments: the closed month corrected
    "day": pl.Date(),  # adjustments: the day corrected
    **{c: pl.Int64() for c in _SUMS},
    "cost_pico": pl.Decimal(38, 0),
    "cost_cents": pl.Int64(),
}


def cents(pico: int) -> int:
    """Exact pico-dollars to cents, rounded half up (away from zero) once."""
    return int((Decimal(pico) / PICO_PER_CENT).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def allocate(values: list[int], target: int) -> list[int]:
    """Cents for each pico-dollar value, summing exactly to `target` (largest remainder:
    each row is its exact value rounded down or up, never further)."""
    floors = [v // PICO_PER_CENT for v in values]
    left = target - sum(floors)
    order = sorted(
        range(len(values)), key=lambda i: (values[i] - floors[i] * PICO_PER_CENT, -i), reverse=True
    )
    out = list(floors)
    step = 1 if left >= 0 else -1
    for n in range(abs(left)):
        out[order[n % len(order)] if step > 0 else order[-1 - n % len(order)]] += step
    return out


@dataclass(frozen=True)
class FinanceQuery:
    start: date  # inclusive
    end: date  # exclusive
    tag_key: str | None = None


_BOOKED = """
    SELECT * FROM {live} WHERE bucket >= $start AND bucket < $end
       AND CAST(date_trunc('month', bucket) AS DATE) NOT IN (SELECT period FROM closed_periods)
    UNION ALL BY NAME
    SELECT * FROM {copy} WHERE bucket >= $start AND bucket < $end
"""


def _section(conn: duckdb.DuckDBPyConnection, q: FinanceQuery, section: str) -> pl.DataFrame:
    sums = ", ".join(f"sum({c})::BIGINT AS {c}" for c in _SUMS)
    if section == "tag":
        source = _BOOKED.format(live="usage_daily_tags", copy="closed_daily_tags")
        key = "tag_value"
        sums = ", ".join(
            f"sum({c})::BIGINT AS {c}"
            if c in ("requests", "input_tokens", "output_tokens", "total_tokens", "unpriced")
            else f"NULL::BIGINT AS {c}"
            for c in _SUMS
        )
        where = "WHERE tag_key = $tag_key"
    else:
        source = _BOOKED.format(live="usage_daily", copy="closed_daily")
        key = {"model": "model", "endpoint": "endpoint"}.get(section, "user_id")
        where = ""
    params: dict[str, object] = {"start": q.start, "end": q.end}
    if section == "tag":
        params["tag_key"] = q.tag_key
    return query_frame(
        conn,
        f"""SELECT '{section}' AS section, CAST(date_trunc('month', bucket) AS DATE) AS month,
                   {key} AS key, {sums}, sum(cost_pico)::DECIMAL(38, 0) AS cost_pico
            FROM ({source}) {where} GROUP BY ALL
            -- a key whose parts add up to no request has no row (rollup_compact)
            HAVING sum(requests) <> 0
            ORDER BY month, cost_pico DESC, key""",
        params,
    )


def _adjustments(conn: duckdb.DuckDBPyConnection, q: FinanceQuery) -> pl.DataFrame:
    sums = ", ".join(f"sum({c})::BIGINT AS {c}" for c in _SUMS)
    return query_frame(
        conn,
        f"""SELECT 'adjustment' AS section, posted_period AS month, model AS key, user_id,
                   for_period, CAST(bucket AS DATE) AS day, {sums},
                   sum(cost_pico)::DECIMAL(38, 0) AS cost_pico
            FROM period_adjustments
            WHERE kind = 'daily' AND posted_period >= $start AND posted_period < $end
            GROUP BY ALL ORDER BY month, for_period, day, key, user_id""",
        {"start": q.start, "end": q.end},
    )


def _conform(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(
        pl.lit(None, dtype).alias(name)
        for name, dtype in COLUMNS.items()
        if name not in frame.columns and name != "cost_cents"
    ).select(pl.col(n).cast(t) for n, t in COLUMNS.items() if n != "cost_cents")


def finance_report(conn: duckdb.DuckDBPyConnection, q: FinanceQuery) -> pl.DataFrame:
    """Rows of COLUMNS: per month the model, endpoint, user, tag (with an '(untagged)' row for
    responses without the key) and adjustment sections, a total row per month, and a
    grand total row (month null)."""
    models = _conform(_section(conn, q, "model"))
    endpoints = _conform(_section(conn, q, "endpoint"))
    users = _conform(_section(conn, q, "user"))
    adjustments = _conform(_adjustments(conn, q))
    sections = [models, endpoints, users]
    if q.tag_key:
        tags = _conform(_section(conn, q, "tag"))
        booked = models.group_by("month").agg(pl.col("cost_pico").sum().alias("_all"))
        tagged = tags.group_by("month").agg(pl.col("cost_pico").sum().alias("_tagged"))
        untagged = (
            booked.join(tagged, on="month", how="left")
            .with_columns(
                pl.lit("tag").alias("section"),
                pl.lit("(untagged)").alias("key"),
                (pl.col("_all") - pl.col("_tagged").fill_null(0))
                .cast(pl.Decimal(38, 0))
                .alias("cost_pico"),
            )
            .filter(pl.col("cost_pico") != 0)
        )
        sections.append(pl.concat([tags, _conform(untagged)], how="vertical_relaxed"))
    months = sorted(set(models["month"].to_list()) | set(adjustments["month"].to_list()), key=str)
    booked_pico = {m: _sum(models.filter(pl.col("month") == m)) for m in months}
    adjusted_pico = {m: _sum(adjustments.filter(pl.col("month") == m)) for m in months}
    grand = sum(booked_pico.values()) + sum(adjusted_pico.values())
    flat = [booked_pico[m] for m in months] + [adjusted_pico[m] for m in months]
    split = allocate(flat, cents(grand))
    booked_cents = dict(zip(months, split[: len(months)], strict=True))
    adjusted_cents = dict(zip(months, split[len(months) :], strict=True))
    parts = []
    for month in months:
        for frame in sections:
            part = frame.filter(pl.col("month") == month)
            parts.append(_with_cents(part, booked_cents[month]))
        part = adjustments.filter(pl.col("month") == month)
        parts.append(_with_cents(part, adjusted_cents[month]))
        total = booked_pico[month] + adjusted_pico[month]
        parts.append(
            _total(models, adjustments, month, total, booked_cents[month] + adjusted_cents[month])
        )
    parts.append(_total(models, adjustments, None, grand, cents(grand)))
    return pl.concat([p for p in parts if p.height], how="vertical_relaxed").select(
        pl.col(n).cast(t) for n, t in COLUMNS.items()
    )


def _sum(frame: pl.DataFrame) -> int:
    value = frame["cost_pico"].sum() if frame.height else 0
    return int(value or 0)


def _with_cents(frame: pl.DataFrame, target: int) -> pl.DataFrame:
    values = [int(v or 0) for v in frame["cost_pico"].to_list()]
    return frame.with_columns(pl.Series("cost_cents", allocate(values, target), pl.Int64))


def _total(
    models: pl.DataFrame, adjustments: pl.DataFrame, month: date | None, pico: int, cent: int
) -> pl.DataFrame:
    both = pl.concat([models, adjustments], how="vertical_relaxed")
    if month is not None:
        both = both.filter(pl.col("month") == month)
    sums = {c: int(both[c].sum() or 0) for c in _SUMS}
    return pl.DataFrame(
        [
            {
                "section": "total",
                "month": month,
                "key": None,
                "user_id": None,
                "for_period": None,
                "day": None,
                **sums,
                "cost_pico": Decimal(pico),
                "cost_cents": cent,
            }
        ],
        schema=COLUMNS,
    )
