"""Reconciliation: OpenAI's bill against tokentill's own costs, per UTC day x model.

Both sides name a model as the upstream answered it (a dated snapshot), so they join on
(day, model). Money stays integer pico-dollars (DECIMAL(38, 0)) throughout; OpenAI's
amounts are converted once, on the way in (`usd_to_pico`).

What explains a difference, per row:

- *unpriced*: responses tokentill recorded but could not price (no price for the model
  or tier): their cost is missing from ours. Counted with their tokens.
- *errors*: requests tokentill recorded as an error with no usage (an answer garbled
  or cut on the way, which the upstream may still have billed). Error rows carry the
  model as requested (an alias), so they are matched by model family
  (``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``).
- *interrupted*: responses whose usage tokentill never learned (a Chat Completion cut
  mid-stream), cost 0 on our side.
- *bypassed*: OpenAI billed a model or day tokentill never saw, or (when OpenAI's request
  counts are known, from its Usage API) more requests than tokentill saw and its errors
  account for: traffic that did not go through the proxy.
- *price mismatch*: the same requests on both sides, everything priced, and still a
  difference: tokentill's catalog prices this model differently from OpenAI's bill.

A row is flagged when |difference| passes the absolute threshold and, if one is set, the
relative one (a fraction of OpenAI's figure); a day is flagged the same way on its totals.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import duckdb
import polars as pl

from tokentill.warehouse.db import query_frame
from tokentill.warehouse.pricing import PICO_PER_USD

MONEY = pl.Decimal(38, 0)
# A dated snapshot's family: the same rule as the price catalog's model resolution.
_DATED = r"-(\d{4}-\d{2}-\d{2}|\d{4})$"

OPENAI_SCHEMA: dict[str, pl.DataType] = {
    "day": pl.Date(),
    "model": pl.String(),
    "openai_pico": MONEY,
}
"""OpenAI's bill, one row per line item or already summed (they are added up)."""

OPENAI_REQUESTS_SCHEMA: dict[str, pl.DataType] = {
    "day": pl.Date(),
    "model": pl.String(),
    "openai_requests": pl.Int64(),
}
"""OpenAI's request counts (its Usage API), when known."""


@dataclass(frozen=True)
class Thresholds:
    usd: Decimal = Decimal("0.01")
    ratio: Decimal = Decimal(0)
    """A fraction of OpenAI's figure the difference must also pass (0: absolute only)."""


def usd_to_pico(value: Decimal) -> int:
    """USD -> integer pico-dollars, rounded half-even once (OpenAI's amounts can carry
    binary floating-point noise beyond 12 decimals)."""
    return int((value * PICO_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def model_of_line_item(line_item: str) -> str:
    """``"gpt-4o-mini-2024-07-18, cached input"`` -> ``"gpt-4o-mini-2024-07-18"``."""
    model, sep, _ = line_item.rpartition(", ")
    return model if sep else line_item


# -- tokentill's side ---------------------------------------------------------------------

_OURS_SQL = """
SELECT CAST(bucket AS DATE) AS day,
       coalesce(model, '') AS model,
       coalesce(sum(requests) FILTER (WHERE status <> 'error'), 0) AS our_requests,
       coalesce(sum(cost_pico), 0) AS our_pico,
       coalesce(sum(unpriced), 0) AS unpriced,
       -- a rollup row is all priced or all unpriced unless a price changed that very day
       coalesce(sum(total_tokens) FILTER (WHERE unpriced > 0), 0) AS unpriced_tokens,
       coalesce(sum(requests) FILTER (WHERE status = 'error'), 0) AS errors,
       coalesce(sum(requests) FILTER (WHERE status = 'interrupted'), 0) AS interrupted,
       coalesce(sum(failed), 0) AS failed
FROM (
    -- one row per key: the rollup holds parts (rollup_compact), and `unpriced > 0` is a
    -- question about a key's whole sums, not about one part
    SELECT bucket, user_id, model, service_tier, status, endpoint,
           sum(requests) AS requests, sum(cost_pico) AS cost_pico,
           sum(unpriced) AS unpriced, sum(total_tokens) AS total_tokens,
           sum(failed) AS failed
    FROM usage_daily WHERE bucket >= ? AND bucket < ?
    GROUP BY ALL HAVING sum(requests) <> 0
)
GROUP BY ALL
"""

OURS_SCHEMA: dict[str, pl.DataType] = {
    "day": pl.Date(),
    "model": pl.String(),
    "our_requests": pl.Int64(),
    "our_pico": MONEY,
    "unpriced": pl.Int64(),
    "unpriced_tokens": pl.Int64(),
    "errors": pl.Int64(),
    "interrupted": pl.Int64(),
    "failed": pl.Int64(),
}


def read_ours(conn: duckdb.DuckDBPyConnection, start: date, end: date) -> pl.DataFrame:
    """tokentill's cost and counts per day x model for the days [start, end], from
    `usage_daily` (as fresh as the last rollup run)."""
    since = datetime.combine(start, time(), tzinfo=UTC)
    until = datetime.combine(end + timedelta(days=1), time(), tzinfo=UTC)
    frame = query_frame(conn, _OURS_SQL, [since, until])
    return frame.select(pl.col(name).cast(dtype) for name, dtype in OURS_SCHEMA.items())


_ROLLED_UP_SQL = """
SELECT max(finished_at) FROM job_runs
WHERE job = 'rollup' AND error IS NULL AND finished_at IS NOT NULL
"""


def rolled_up_at(conn: duckdb.DuckDBPyConnection) -> datetime | None:
    """When the rollup (`usage_daily`, our side) last finished: how fresh ours is."""
    row = conn.execute(_ROLLED_UP_SQL).fetchone()
    return None if row is None else row[0]


# -- the comparison (pure) ----------------------------------------------------------------


def _family(column: str) -> pl.Expr:
    return pl.col(column).str.replace(_DATED, "")


# What we counted per day and model, beside what OpenAI billed (0 where we saw nothing).
_OUR_COUNTS = ("our_requests", "unpriced", "unpriced_tokens", "errors", "interrupted", "failed")


def compare(
    openai: pl.LazyFrame,
    ours: pl.LazyFrame,
    thresholds: Thresholds,
    openai_requests: pl.LazyFrame | None = None,
) -> pl.LazyFrame:
    """One row per day x model either side has: both figures, the difference (OpenAI's
    minus ours, pico-dollars), the counts that explain it, and whether it is flagged.
    `openai` follows `OPENAI_SCHEMA`, `ours` `OURS_SCHEMA`, `openai_requests`
    `OPENAI_REQUESTS_SCHEMA` (None when only costs are known: a cost export)."""
    billed = openai.group_by("day", "model").agg(pl.col("openai_pico").sum().cast(MONEY))
    if openai_requests is not None:
        billed = billed.join(
            openai_requests.group_by("day", "model").agg(pl.col("openai_requests").sum()),
            on=["day", "model"],
            how="full",
            coalesce=True,
        )
    else:
        billed = billed.with_columns(pl.lit(None, pl.Int64).alias("openai_requests"))
    # Error rows name the requested alias: count them per family, and show them on every
    # model of that family that day.
    errors = (
        ours.filter(pl.col("errors") > 0)
        .group_by("day", _family("model").alias("family"))
        .agg(pl.col("errors").sum())
    )
    seen = ours.drop("errors").filter(
        (pl.col("our_requests") > 0) | (pl.col("our_pico") != 0) | (pl.col("unpriced") > 0)
    )
    rows = (
        billed.join(seen, on=["day", "model"], how="full", coalesce=True)
        .with_columns(_family("model").alias("family"))
        .join(errors, on=["day", "family"], how="left")
        .with_columns(
            pl.col("openai_pico").fill_null(0).cast(MONEY),
            pl.col("our_pico").fill_null(0).cast(MONEY),
            *(pl.col(c).fill_null(0) for c in _OUR_COUNTS),
        )
        .with_columns((pl.col("openai_pico") - pl.col("our_pico")).cast(MONEY).alias("diff_pico"))
    )
    known = pl.col("openai_requests").is_not_null()
    unseen = (pl.col("openai_requests") - pl.col("our_requests")).clip(lower_bound=0)
    # Errors can only explain requests OpenAI billed and we did not see as responses.
    billed_errors = pl.when(known).then(pl.min_horizontal(unseen, "errors")).otherwise("errors")
    never_seen = (pl.col("our_requests") == 0) & (pl.col("openai_pico") > 0)
    bypassed = (
        pl.when(known)
        .then(unseen - pl.col("billed_errors"))
        .when(never_seen & (pl.col("errors") == 0))
        .then(None)  # a model we never saw, its request count unknown
        .otherwise(0)
    )
    explained = (
        (pl.col("unpriced") > 0) | (pl.col("interrupted") > 0) | (pl.col("billed_errors") > 0)
    )
    return (
        rows.with_columns(billed_errors.cast(pl.Int64).alias("billed_errors"))
        .with_columns(bypassed.cast(pl.Int64).alias("bypassed_requests"))
        .with_columns(
            (never_seen & ~explained).alias("bypassed_model"),
            (
                (pl.col("diff_pico") != 0)
                & (pl.col("openai_pico") != 0)
                & (pl.col("our_pico") != 0)
                & ~explained
                & pl.col("bypassed_requests").fill_null(0).eq(0)
            ).alias("price_mismatch"),
            _flag(pl.col("diff_pico"), pl.col("openai_pico"), thresholds).alias("flagged"),
        )
        .with_columns(_explanations().alias("explanations"))
        .select(
            "day",
            "model",
            "openai_pico",
            "our_pico",
            "diff_pico",
            "openai_requests",
            *_OUR_COUNTS,
            "bypassed_requests",
            "price_mismatch",
            "flagged",
            "explanations",
        )
        .sort("day", "model")
    )


def _flag(diff: pl.Expr, openai: pl.Expr, thresholds: Thresholds) -> pl.Expr:
    size = diff.abs()
    over = size > pl.lit(usd_to_pico(thresholds.usd), MONEY)
    if thresholds.ratio > 0:
        # |diff| > ratio x |openai|, in integers: scale the ratio to millionths.
        millionths = int((thresholds.ratio * 1_000_000).to_integral_value())
        over = over & (size * 1_000_000 > openai.abs() * millionths)
    return over


def _count(column: str, noun: str) -> pl.Expr:
    """ "1 response", "3 responses"."""
    return pl.format(
        "{} {}",
        column,
        pl.when(pl.col(column) == 1).then(pl.lit(noun)).otherwise(pl.lit(noun + "s")),
    )


def _explanations() -> pl.Expr:
    """Sentences a finance reader can act on, in the order they usually matter."""
    mismatch_why = (
        pl.when(pl.col("openai_requests").is_null())
        .then(pl.lit(" (a cost export has no request counts: it may also be bypass)"))
        .otherwise(pl.lit(""))
    )
    parts = [
        pl.when(pl.col("unpriced") > 0).then(
            pl.format(
                "{} ({} tokens) tokentill could not price: their cost is not in ours",
                _count("unpriced", "response"),
                "unpriced_tokens",
            )
        ),
        pl.when(pl.col("billed_errors") > 0).then(
            pl.format(
                "{} for this model family ended in an error with no usage recorded; "
                "the upstream may have billed some (answers garbled or cut on the way)",
                _count("errors", "request"),
            )
        ),
        pl.when(pl.col("interrupted") > 0).then(
            pl.format(
                "{} interrupted before tokentill learned their usage",
                _count("interrupted", "response"),
            )
        ),
        pl.when(pl.col("bypassed_model")).then(
            pl.lit(
                "OpenAI billed this model on this day and tokentill saw none of its traffic: "
                "it bypassed the proxy"
            )
        ),
        pl.when((pl.col("bypassed_requests") > 0) & ~pl.col("bypassed_model")).then(
            pl.format(
                "OpenAI billed {} more than tokentill saw: they bypassed the proxy",
                _count("bypassed_requests", "request"),
            )
        ),
        pl.when(pl.col("price_mismatch")).then(
            pl.format(
                "same traffic, different price: tokentill's catalog prices this model "
                "differently from OpenAI's bill{}",
                mismatch_why,
            )
        ),
        pl.when((pl.col("openai_pico") == 0) & (pl.col("our_pico") > 0)).then(
            pl.lit("tokentill recorded costs OpenAI did not bill")
        ),
    ]
    return pl.concat_list(parts).list.drop_nulls()


def by_day(rows: pl.LazyFrame, thresholds: Thresholds) -> pl.LazyFrame:
    """Each day's totals from `compare`'s rows, flagged on the day's own difference."""
    return (
        rows.group_by("day")
        .agg(
            pl.col("openai_pico").sum().cast(MONEY),
            pl.col("our_pico").sum().cast(MONEY),
            pl.col("diff_pico").sum().cast(MONEY),
            pl.col("flagged").sum().cast(pl.Int64).alias("flagged_models"),
        )
        .with_columns(
            _flag(pl.col("diff_pico"), pl.col("openai_pico"), thresholds).alias("flagged")
        )
        .sort("day")
    )
